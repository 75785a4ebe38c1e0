"""Serving benchmark: a load generator for OpenAI-compatible endpoints and `make bench`.

`python -m serve.bench.run` (what `make bench` runs) starts our `llm-serve` and the peers one after
another, drives each with `serve.bench.loadgen` and writes `artifacts/bench/<timestamp>.json`.
"""
