"""LoRA adapters for the benchmark, made once with PEFT and cached under `artifacts/bench/adapters/`.

Rank 8 on q/k/v/o/gate/up/down with a random non-zero `lora_B` (PEFT initialises it to zeros, which
would make an adapter a no-op that a clever server could skip). Each adapter is written to a
temporary directory and renamed into place, so an interrupted run never leaves half an adapter.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def adapter_complete(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and any(path.glob("adapter_model.*"))


def make_bench_adapters(
    base_dir: Path, cache_dir: Path, count: int, *, rank: int = 8, scale: float = 0.02
) -> dict[str, Path]:
    """Return {"a0": path, ...}: `count` adapters for `base_dir`, reusing complete ones in `cache_dir`."""
    names = [f"a{i}" for i in range(count)]
    key = f"{Path(base_dir).name}-r{rank}"
    paths = {name: cache_dir / key / name for name in names}
    missing = [name for name in names if not adapter_complete(paths[name])]
    if not missing:
        return paths

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(
        model,
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGET_MODULES), lora_dropout=0.0),
    )
    (cache_dir / key).mkdir(parents=True, exist_ok=True)
    for name in missing:
        seed = names.index(name)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if "lora_A" in pname or "lora_B" in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir / key))
        try:
            peft_model.save_pretrained(tmp, safe_serialization=True)
            cfg_path = tmp / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = str(base_dir)
            cfg_path.write_text(json.dumps(cfg, indent=2))
            if paths[name].exists():
                shutil.rmtree(paths[name])
            tmp.rename(paths[name])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return paths
