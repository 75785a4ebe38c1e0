"""Structured outputs: constrain generation to a JSON schema, JSON, a regex, a choice or a grammar.

`spec.py` says what the output must match (engine-agnostic, built from the request), `schema_check.py`
refuses JSON-schema keywords the grammar compiler would not enforce (`strict`), `compiler.py` compiles
with xgrammar once per (tokenizer, constraint) and caches, and `bitmask.py` is the engine side: one
matcher per sequence and a per-row token mask applied to a batch's logits.
"""
