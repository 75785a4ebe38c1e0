"""Batched multi-LoRA: many adapters applied per token inside one forward pass.

Each targeted `nn.Linear` of the base model is wrapped once by `MultiLoRALinear`, which holds the
A/B matrices of every adapter that targets it (scale folded into B). Before a step the runner sets,
on the shared `LoRAContext`, which rows of the packed token batch use which adapter; rows of the
base model get no delta. This is PEFT's mixed-adapter batching done per token instead of per
padded row, so decode tokens and prefill chunks of different adapters share one batch. Adapter
files are PEFT's format; the loader refuses what it cannot apply exactly (DoRA, modules_to_save,
embedding LoRA) with a message saying to merge such adapters with `llm-export` instead.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


class LoRALoadError(ValueError):
    pass


Rows = slice | torch.Tensor | None  # None: every row


@dataclass
class LoRAContext:
    """Which packed rows use which adapter in the current step: [(adapter_index, rows)]."""

    groups: list[tuple[int, Rows]] = field(default_factory=list)

    def set_rows(self, adapter_per_row: list[int]) -> None:
        """`adapter_per_row[i]` is the adapter index of packed row i, or -1 for the base model."""
        self.groups = group_rows(adapter_per_row)


def group_rows(adapter_per_row: list[int]) -> list[tuple[int, Rows]]:
    if not adapter_per_row:
        return []
    first = adapter_per_row[0]
    if all(a == first for a in adapter_per_row):
        return [] if first < 0 else [(first, None)]
    groups = []
    for idx in sorted({a for a in adapter_per_row if a >= 0}):
        rows = [i for i, a in enumerate(adapter_per_row) if a == idx]
        if rows[-1] - rows[0] + 1 == len(rows):
            groups.append((idx, slice(rows[0], rows[-1] + 1)))
        else:
            groups.append((idx, torch.tensor(rows, dtype=torch.long)))
    return groups


class MultiLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, ctx: LoRAContext):
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_a: dict[int, torch.Tensor] = {}  # adapter index -> [r, in]
        self.lora_b: dict[int, torch.Tensor] = {}  # adapter index -> [out, r] * scale

    def add(self, index: int, a: torch.Tensor, b_scaled: torch.Tensor) -> None:
        self.lora_a[index], self.lora_b[index] = a, b_scaled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        groups = self.ctx.groups
        if not groups or not self.lora_a:
            return y
        x2 = x.reshape(-1, self.in_features)
        y2 = y.view(-1, self.out_features)
        for idx, rows in groups:
            a = self.lora_a.get(idx)
            if a is None:
                continue
            b = self.lora_b[idx]
            if rows is None:
                y2 += (x2 @ a.t()) @ b.t()
            elif isinstance(rows, slice):
                y2[rows] += (x2[rows] @ a.t()) @ b.t()
            else:
                y2.index_add_(0, rows, (x2.index_select(0, rows) @ a.t()) @ b.t())
        return y


@dataclass
class LoadedAdapter:
    name: str
    index: int
    rank: int
    modules: list[str]


def read_adapter_weights(path: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Return (adapter_config, {module_name: {"A": tensor, "B": tensor}})."""
    from safetensors.torch import load_file

    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("use_dora"):
        raise LoRALoadError(f"{path}: DoRA adapters are not supported for serving; merge it with llm-export")
    if cfg.get("modules_to_save"):
        raise LoRALoadError(
            f"{path}: the adapter also trains full modules ({cfg['modules_to_save']}), which cannot be "
            "batched per request; merge it with `llm-export` and serve the merged model"
        )
    tensors = load_file(str(path / "adapter_model.safetensors"))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = KEY_RE.match(key)
        if not m:
            raise LoRALoadError(
                f"{path}: unsupported tensor {key!r} (only LoRA A/B of Linear layers can be served; "
                "merge this adapter with llm-export)"
            )
        modules.setdefault(m["module"], {})[m["which"]] = tensor
    return cfg, modules


def install_adapters(
    model: nn.Module, adapters: list[tuple[str, Path]], ctx: LoRAContext
) -> list[LoadedAdapter]:
    """Wrap targeted Linears of `model` and load every adapter into them (index = list position)."""
    named = dict(model.named_modules())
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    loaded = []
    for index, (name, path) in enumerate(adapters):
        cfg, modules = read_adapter_weights(path)
        r = int(cfg.get("r", 8))
        alpha = float(cfg.get("lora_alpha", r))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        for module_name, ab in modules.items():
            if set(ab) != {"A", "B"}:
                raise LoRALoadError(f"adapter {name!r}: {module_name} lacks lora_{'B' if 'A' in ab else 'A'}")
            target = named.get(module_name)
            if target is None:
                raise LoRALoadError(f"adapter {name!r}: the base model has no module {module_name!r}")
            if not isinstance(target, MultiLoRALinear):
                if not isinstance(target, nn.Linear):
                    raise LoRALoadError(f"adapter {name!r}: {module_name} is not a Linear layer")
                wrapper = MultiLoRALinear(target, ctx)
                parent_name, _, child = module_name.rpartition(".")
                setattr(named[parent_name] if parent_name else model, child, wrapper)
                named[module_name] = wrapper
                target = wrapper
            a, b = ab["A"].to(device, dtype), ab["B"].to(device, dtype)
            if a.shape != (a.shape[0], target.in_features) or b.shape != (target.out_features, a.shape[0]):
                raise LoRALoadError(
                    f"adapter {name!r}: {module_name} has A {list(a.shape)} / B {list(b.shape)}, which does "
                    f"not fit the base's {target.in_features}->{target.out_features}; wrong base model"
                )
            target.add(index, a.contiguous(), (b * scale).contiguous())
        loaded.append(LoadedAdapter(name=name, index=index, rank=r, modules=sorted(modules)))
    return loaded
