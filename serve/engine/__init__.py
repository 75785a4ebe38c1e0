"""Engines turn token ids into token ids. They know nothing about HTTP.

`types.py` holds the data passed across the boundary, `base.py` the interface every engine
implements, `hf.py` the transformers+PEFT engine (the default) and `vllm.py` the vLLM one.
"""
