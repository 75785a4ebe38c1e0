"""Training: datasets checked and registered (`llm-data`), LoRA/full/freeze runs on LLaMA-Factory (`llm-train`).

`train.data` reads and validates datasets in LLaMA-Factory's formats; `train.cli` turns a YAML config into
a safe, resumable `llamafactory-cli train` run with a progress bar, loss plot and run manifest.
"""
