"""Batched multi-LoRA: many adapters applied per token inside one forward pass.

Adapters live in a fixed number of slots (`--max-loras`); which adapter holds which slot is decided
by `adapter_pool.py`. On the transformers path each targeted `nn.Linear` of the base model is
wrapped once by `MultiLoRALinear`, which holds the A/B matrices of the slots that target it (scale
folded into B); the native decoder (`llama.py`) keeps slots inside its stacked weights. Before a
step the runner sets, on the shared `LoRAContext`, which rows of the packed token batch use which
slot; rows of the base model get no delta. This is PEFT's mixed-adapter batching done per token instead of per
padded row, so decode tokens and prefill chunks of different adapters share one batch. Adapter
files are PEFT's format; the loader refuses what it cannot apply exactly (DoRA, modules_to_save,
embedding LoRA) with a message saying to merge such adapters with `llm-export` instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from serve.artifacts.model_folder import AdapterConfig, read_adapter_config

KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


class LoRALoadError(ValueError):
    pass


@dataclass
class LoRAContext:
    """Which adapter each packed row of the current step uses (-1: the base model).

    `single` is set when every row uses the same adapter (the common case: no masking needed);
    `rows` holds the per-row adapter indices when the batch mixes adapters. Masks are cached per
    module layout for the duration of one step.
    """

    single: int | None = None
    rows: torch.Tensor | None = None
    _masks: dict = field(default_factory=dict)
    _masks_t: dict = field(default_factory=dict)
    _shared: dict = field(default_factory=dict)

    def set_rows(self, adapter_per_row: list[int], device=None) -> None:
        self._masks, self._masks_t = {}, {}
        first = adapter_per_row[0] if adapter_per_row else -1
        if all(a == first for a in adapter_per_row):
            self.single, self.rows = first, None
        else:
            self.single, self.rows = None, torch.tensor(adapter_per_row, dtype=torch.long, device=device)

    def mask_for(self, col_adapter: torch.Tensor, dtype) -> torch.Tensor:
        """`[T, cols]` with 1 where the row's adapter owns the column."""
        key = col_adapter.data_ptr()
        mask = self._masks.get(key)
        if mask is None:
            mask = (self.rows.unsqueeze(1) == col_adapter.unsqueeze(0)).to(dtype)
            self._masks[key] = mask
        return mask

    def mask_t_for(self, col_adapter: torch.Tensor, dtype) -> torch.Tensor:
        """`mask_for` transposed (`[cols, T]`), for matmuls done in transposed space."""
        key = col_adapter.data_ptr()
        mask = self._masks_t.get(key)
        if mask is None:
            mask = (col_adapter.unsqueeze(1) == self.rows.unsqueeze(0)).to(dtype)
            self._masks_t[key] = mask
        return mask

    def shared(self, col_adapter: torch.Tensor) -> torch.Tensor:
        """One tensor per distinct column layout, so each step builds a layout's mask once, not once
        per projection of every layer."""
        return self._shared.setdefault((col_adapter.device, tuple(col_adapter.tolist())), col_adapter)


class MultiLoRALinear(nn.Module):
    """A Linear of a transformers model plus the LoRA deltas of the adapters in the engine's slots.

    For a batch mixing adapters, the A matrices of all slots are concatenated (`[sum r, in]`) and
    applied to every row in one matmul; a row-by-column mask keeps each row's own adapter's columns,
    and one more matmul with the concatenated B (`[out, sum r]`) adds the deltas. The extra work is
    `sum r / out` of the base matmul (about 2% for four rank-8 adapters) and the op count does not
    grow with the number of adapters in the batch. (The native decoder, `llama.py`, goes further
    and computes `x @ A.T` in the base matmul itself.)
    """

    def __init__(self, base: nn.Linear, ctx: LoRAContext):
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_a: dict[int, torch.Tensor] = {}  # slot -> [r, in]
        self.lora_b: dict[int, torch.Tensor] = {}  # slot -> [out, r] * scale
        self.a_cat = self.b_cat = self.col_adapter = None

    def set_slot(self, slot: int, a: torch.Tensor | None, b_scaled: torch.Tensor | None = None) -> None:
        """Put an adapter's (A, scaled B) in `slot`, or empty the slot with `a=None`."""
        if a is None:
            self.lora_a.pop(slot, None)
            self.lora_b.pop(slot, None)
        else:
            self.lora_a[slot], self.lora_b[slot] = a.contiguous(), b_scaled.contiguous()
        order = sorted(self.lora_a)
        if not order:
            self.a_cat = self.b_cat = self.col_adapter = None
            return
        self.a_cat = torch.cat([self.lora_a[i] for i in order]).contiguous()
        self.b_cat = torch.cat([self.lora_b[i] for i in order], dim=1).contiguous()
        device = self.a_cat.device
        self.col_adapter = self.ctx.shared(column_owners({i: self.lora_a[i].shape[0] for i in order}, device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ctx = self.ctx
        if ctx.single is not None:
            a = self.lora_a.get(ctx.single)
            if a is None:  # the base model, or an adapter that does not target this module
                return y
            return y + (x @ a.t()) @ self.lora_b[ctx.single].t()
        if self.a_cat is None:
            return y
        x2 = x.reshape(-1, self.in_features)
        xa = (x2 @ self.a_cat.t()) * ctx.mask_for(self.col_adapter, x.dtype)
        return y + (xa @ self.b_cat.t()).view_as(y)


def column_owners(ranks: dict[int, int], device) -> torch.Tensor:
    """`[sum r]`: the adapter index owning each column of concatenated A matrices (in `ranks` order)."""
    return torch.cat([torch.full((r,), i, dtype=torch.long, device=device) for i, r in ranks.items()])


def checked_pair(adapter: str, module_name: str, ab: dict, in_features: int, out_features: int):
    """`(A, B)` of one module of an adapter, refused unless both exist and fit the base Linear."""
    if set(ab) != {"A", "B"}:
        raise LoRALoadError(f"adapter {adapter!r}: {module_name} lacks lora_{'B' if 'A' in ab else 'A'}")
    a, b = ab["A"], ab["B"]
    if a.shape != (a.shape[0], in_features) or b.shape != (out_features, a.shape[0]):
        raise LoRALoadError(
            f"adapter {adapter!r}: {module_name} has A {list(a.shape)} / B {list(b.shape)}, which does "
            f"not fit the base's {in_features}->{out_features}; wrong base model"
        )
    return a, b


def lora_scale(cfg: AdapterConfig) -> tuple[int, float]:
    """(rank, scale): PEFT's alpha / r, or alpha / sqrt(r) with rsLoRA."""
    r = cfg.rank
    return r, cfg.alpha / math.sqrt(r) if cfg.use_rslora else cfg.alpha / r


def read_adapter_weights(path: Path) -> tuple[AdapterConfig, dict[str, dict[str, torch.Tensor]]]:
    """Return (adapter_config, {module_name: {"A": tensor, "B": tensor}})."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(path)
    if cfg.use_dora:
        raise LoRALoadError(f"{path}: DoRA adapters are not supported for serving; merge it with llm-export")
    if cfg.modules_to_save:
        raise LoRALoadError(
            f"{path}: the adapter also trains full modules ({cfg.modules_to_save}), which cannot be "
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


class TransformersLoRA:
    """LoRA slots on a transformers model: each targeted `nn.Linear` is wrapped (once, when an adapter
    first targets it) by a `MultiLoRALinear`, and an adapter in slot `s` puts its A/B there."""

    def __init__(self, model: nn.Module, ctx: LoRAContext, max_rank: int):
        self.model, self.ctx, self.max_rank = model, ctx, max_rank
        self.named = dict(model.named_modules())
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.slot_modules: dict[int, list[MultiLoRALinear]] = {}

    def prepare(self, name: str, path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Read and check an adapter: `{module: (A, scaled B)}` in host memory (any thread)."""
        cfg, modules = read_adapter_weights(path)
        _, scale = lora_scale(cfg)
        out = {}
        for module_name, ab in modules.items():
            target = self.named.get(module_name)
            if isinstance(target, MultiLoRALinear):
                target = target.base
            if target is None:
                raise LoRALoadError(f"adapter {name!r}: the base model has no module {module_name!r}")
            if not isinstance(target, nn.Linear):
                raise LoRALoadError(f"adapter {name!r}: {module_name} is not a Linear layer")
            a, b = checked_pair(name, module_name, ab, target.in_features, target.out_features)
            check_rank(name, a.shape[0], self.max_rank)
            out[module_name] = (a.to(self.dtype), b.to(self.dtype) * scale)
        return out

    def install(self, slot: int, prepared: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put a prepared adapter in `slot` (engine thread, between steps)."""
        self.clear(slot)
        wrappers = []
        for module_name, (a, b) in prepared.items():
            target = self.named[module_name]
            if not isinstance(target, MultiLoRALinear):
                target = MultiLoRALinear(target, self.ctx)
                parent_name, _, child = module_name.rpartition(".")
                setattr(self.named[parent_name] if parent_name else self.model, child, target)
                self.named[module_name] = target
            target.set_slot(slot, a.to(self.device), b.to(self.device))
            wrappers.append(target)
        self.slot_modules[slot] = wrappers

    def clear(self, slot: int) -> None:
        for wrapper in self.slot_modules.pop(slot, []):
            wrapper.set_slot(slot, None)


def check_rank(name: str, rank: int, max_rank: int) -> None:
    if rank > max_rank:
        raise LoRALoadError(
            f"adapter {name!r} has LoRA rank {rank}, above the server's --max-lora-rank {max_rank}; "
            f"restart llm-serve with --max-lora-rank {rank} (or higher)"
        )
