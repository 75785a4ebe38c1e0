"""Make real PEFT LoRA adapters for tests (random non-zero lora_B, so they change the outputs)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    seed: int = 0,
    r: int = 8,
    *,
    alpha: int = 16,
    scale: float = 0.05,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    base_model_name: str | None = None,
) -> Path:
    """Write a LoRA adapter for `base_dir` into `out_dir` (safetensors) and return `out_dir`.

    lora_B is drawn from N(0, scale) instead of PEFT's zeros so the adapter measurably changes logits.
    `base_model_name` overrides what adapter_config.json records as the base (default: base_dir).
    """
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, scale)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    cfg_path = Path(out_dir) / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_model_name or str(base_dir)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return Path(out_dir)
