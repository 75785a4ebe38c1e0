"""Datasets in LLaMA-Factory's formats: readers, per-format row checks, `dataset_info.json` entries.

Run as `llm-data validate FILE` or `llm-data register FILE --name NAME --dataset-dir DIR`.
"""
