"""llm-serve: serve a base model and its LoRA adapters behind an OpenAI-compatible API.

Layout: `protocol.py` (request/response models), `engine/` (where a request becomes tokens),
`http/` (FastAPI routes), `models/` (resolving `default` and local checkpoints), `cli.py`.
"""
