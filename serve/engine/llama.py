"""The Llama-family decoder (Llama, Mistral, Qwen2 checkpoints) written for the step loop.

transformers' modeling code runs ~45 tensor ops and several Python layers per decoder layer and
multiplies with `x @ W.T`; a one-token step of the 135M default model spends ~10 ms outside its
matmuls that way. This runs the same math in ~15 ops per layer: q/k/v and gate/up packed into one
matmul each (`gemm.Dense`, which picks the fastest formulation for the row count), RoPE as one
complex multiply (q/k rows are permuted at load into interleaved pairs; permuting q and k alike
leaves every q.k unchanged), fused RMSNorm, and `kv_cache.attend`. LoRA deltas of the adapters
in the engine's slots are applied per token, their A matrices fused into the base matmul (`Projection`).

Weights are taken from the loaded transformers model (no second read of the checkpoint). Models it
does not cover keep running through transformers; `unsupported_reason` says why.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from serve.engine.gemm import Dense, Int8Dense
from serve.engine.kv_cache import StepLayout, attend
from serve.engine.lora import (
    LoRAContext,
    LoRALoadError,
    check_rank,
    checked_pair,
    lora_scale,
    read_adapter_weights,
)

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# RoPE variants whose frequencies do not depend on the sequence length.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def unsupported_reason(model: nn.Module, max_model_len: int) -> str | None:
    """Why `model` cannot run natively (None when it can)."""
    cfg, name = model.config, type(model).__name__
    if name not in ARCHITECTURES:
        return f"{name} is not one of {', '.join(ARCHITECTURES)}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act={cfg.hidden_act}"
    if getattr(cfg, "mlp_bias", False):
        return "mlp_bias=True"
    rope_type = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope_type not in STATIC_ROPE:
        return f"rope_type={rope_type} (frequencies change with the length)"
    window = getattr(cfg, "sliding_window", None)
    uses_window = name != "Qwen2ForCausalLM" or getattr(cfg, "use_sliding_window", False)
    if window and uses_window and window < max_model_len:
        return f"sliding_window={window} < max_model_len={max_model_len}"
    return None


def _rope_pairs(heads: int, head_dim: int) -> torch.Tensor:
    """Row order turning transformers' half-split RoPE layout (i, i + d/2) into adjacent pairs."""
    half = head_dim // 2
    pairs = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    return (torch.arange(heads).unsqueeze(1) * head_dim + pairs).flatten()


class Projection:
    """One matmul standing for one or several Linears of the checkpoint, plus their LoRA deltas.

    The A matrices of the adapters in the engine's LoRA slots are stacked above the base weight, so
    a step with adapter rows gets `x @ A.T` from the same matmul as the base output (one BLAS call
    instead of two); then one `addmm` adds `B @ xA` (the row's own slot's columns only, by mask,
    when adapters mix). Packed projections (q/k/v) get a block B. Base-only steps read just the
    base rows.

    Slots are preallocated at the server's max rank (`width` lead rows each, zero where an adapter
    has a lower rank or does not target this projection), so loading an adapter is copying its A/B
    into its slot's rows: nothing else moves and no other slot is touched. Slot `s` sits at lead rows
    `[(slots - 1 - s) * width, ...)`: slot 0 next to the base rows, so a step computes only the lead
    rows from the highest slot in use down (`skip`), and a server using 1 of 8 slots pays for 1.

    Quantized (`finalize(..., quantize=True)`): the base rows become an `Int8Dense` and the slots' A
    rows stay in float beside it (`a_lead`, same layout; one extra small matmul on steps with adapter
    rows), so adapters add exactly the float delta they add to the f32 model.
    """

    def __init__(self, parts: dict[str, tuple[nn.Linear, torch.Tensor | None]], ctx: LoRAContext):
        self.pieces, biases, self.parts = [], [], {}
        start = 0
        for name, (linear, rows) in parts.items():
            w = linear.weight.detach()
            b = linear.bias.detach() if linear.bias is not None else None
            if rows is not None:
                w, b = w[rows], (b[rows] if b is not None else None)
            self.pieces.append(w)
            biases.append(b if b is not None else w.new_zeros(w.shape[0]))
            self.parts[name] = (start, w.shape[0], linear.in_features, rows)
            start += w.shape[0]
        has_bias = any(linear.bias is not None for linear, _ in parts.values())
        self.bias = (torch.cat(biases) if len(biases) > 1 else biases[0]) if has_bias else None
        self.out_features = start
        self.ctx = ctx
        self.dense: Dense | Int8Dense | None = None  # built by `finalize`
        self.quantized = False
        self.a_lead: torch.Tensor | None = None  # quantized only: the slots' A rows, `[lead, in]`
        self.slots = self.width = self.skip = 0
        self.used: dict[int, int] = {}  # slot -> columns its adapter uses here (absent: not targeted)
        self.b_cat: torch.Tensor | None = None  # [out, lead]: column j is the B column of lead row j
        self.col_slot: torch.Tensor | None = None  # [lead]: the slot owning each lead row

    def finalize(self, slots: int, max_rank: int, quantize: bool = False) -> None:
        """Build the one weight: `slots` empty LoRA slots above the packed base rows (one copy; a
        copy even for a lone Linear: transformers may load the checkpoint as one buffer, which
        would stay alive, whole, while any tensor viewing it does). Quantized: the base rows in
        int8, the slots' A rows in float beside them."""
        w = self.pieces[0]
        self.in_features = w.shape[1]
        self.slots, self.width = slots, max_rank * len(self.parts)
        lead = slots * self.width
        if quantize:
            self.quantized = True
            base = torch.cat(self.pieces) if len(self.pieces) > 1 else self.pieces[0]
            self.dense = Int8Dense(base, self.bias)
            self.a_lead = w.new_zeros(lead, w.shape[1]) if lead else None
        else:
            rows = [w.new_zeros(lead, w.shape[1])] if lead else []
            rows += self.pieces
            self.dense = Dense(torch.cat(rows) if len(rows) > 1 else rows[0].clone(), self.bias, lead=lead)
        self.pieces = []
        self.skip = lead
        if lead:
            self.b_cat = w.new_zeros(self.out_features, lead)
            owners = torch.arange(slots - 1, -1, -1).repeat_interleave(self.width)
            self.col_slot = self.ctx.shared(owners.to(w.device))

    def row0(self, slot: int) -> int:
        return (self.slots - 1 - slot) * self.width

    def _write_lead(self, start: int, rows: torch.Tensor) -> None:
        if self.quantized:
            self.a_lead[start : start + rows.shape[0]].copy_(rows)
        else:
            self.dense.write_lead(start, rows)

    def load_slot(self, slot: int, ab: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """`ab`: part name -> (A `[r, in]`, scaled B `[out, r]`, rows already in the packed order)."""
        start, width = self.row0(slot), self.width
        a_rows = self.b_cat.new_zeros(width, self.in_features)
        b_block = self.b_cat[:, start : start + width]
        b_block.zero_()
        col = 0
        for name, (a, b) in ab.items():
            first, out, _, _ = self.parts[name]
            r = a.shape[0]
            a_rows[col : col + r] = a
            b_block[first : first + out, col : col + r] = b
            col += r
        self._write_lead(start, a_rows)
        self.used[slot] = col
        self.skip = min(self.row0(s) for s in self.used)

    def clear_slot(self, slot: int) -> None:
        if self.used.pop(slot, None) is None:
            return
        start = self.row0(slot)
        self._write_lead(start, self.b_cat.new_zeros(self.width, self.in_features))
        self.b_cat[:, start : start + self.width].zero_()
        self.skip = min((self.row0(s) for s in self.used), default=self.slots * self.width)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ctx, dense = self.ctx, self.dense
        single = ctx.single
        if not self.used or (single is not None and single not in self.used):
            return dense(x)  # base rows only, or an adapter that does not target this projection
        skip = self.skip
        if single is not None:
            first, cols = self.row0(single), self.used[single]
            b = self.b_cat[:, first : first + cols]
        if self.quantized:
            y = dense(x)  # [M, N], bias added
            if single is not None:
                return y.addmm_(x @ self.a_lead[first : first + cols].t(), b.t())
            xa = (x @ self.a_lead[skip:].t()) * ctx.mask_for(self.col_slot, x.dtype)[:, skip:]
            return y.addmm_(xa, self.b_cat[:, skip:].t())
        full, transposed = dense.with_lead(x, skip)
        n_lead = dense.lead - skip
        if single is not None:
            first -= skip
        if transposed:  # [n_lead + N, M]
            xa, y = full[:n_lead], full[n_lead:]
            if single is not None:
                y.addmm_(b, xa[first : first + cols])
            else:
                y.addmm_(self.b_cat[:, skip:], xa * ctx.mask_t_for(self.col_slot, x.dtype)[skip:])
            y = y.t()
        else:  # [M, n_lead + N]
            xa, y = full[:, :n_lead], full[:, n_lead:]
            if single is not None:
                y = torch.addmm(y, xa[:, first : first + cols], b.t())
            else:
                y = torch.addmm(
                    y, xa * ctx.mask_for(self.col_slot, x.dtype)[:, skip:], self.b_cat[:, skip:].t()
                )
        return y if dense.bias is None else y + dense.bias


class _Layer:
    __slots__ = ("input_norm", "qkv", "o", "post_norm", "gate_up", "down")


class NativeLlama:
    """`forward(input_ids [T], positions [T], layout) -> hidden [T, H]`; `lm_head(hidden) -> logits`.

    Takes the weights out of `model` (its copied Linears are removed as it goes, so the checkpoint
    is not held twice); `finalize(slots, max_rank)` once, then `install`/`clear` adapters in slots.
    """

    def __init__(self, model: nn.Module, ctx: LoRAContext, max_model_len: int):
        cfg = model.config
        self.hidden = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.heads
        self.intermediate = cfg.intermediate_size
        self.eps = cfg.rms_norm_eps
        self.scaling = model.model.layers[0].self_attn.scaling
        self.dtype = model.model.embed_tokens.weight.dtype
        self.embed = model.model.embed_tokens.weight.detach().clone()
        self.norm = model.model.norm.weight.detach().clone()
        tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        self.lm_head_dense = Dense(self.embed if tied else model.lm_head.weight.detach().clone())
        q_rows = _rope_pairs(self.heads, self.head_dim)
        k_rows = _rope_pairs(self.kv_heads, self.head_dim)
        self.layers: list[_Layer] = []
        self.targets: dict[str, tuple[Projection, str]] = {}  # checkpoint module name -> (projection, part)
        for i, block in enumerate(model.model.layers):
            attn, mlp, layer = block.self_attn, block.mlp, _Layer()
            layer.input_norm = block.input_layernorm.weight.detach().clone()
            layer.post_norm = block.post_attention_layernorm.weight.detach().clone()
            layer.qkv = Projection({"q_proj": (attn.q_proj, q_rows), "k_proj": (attn.k_proj, k_rows),
                                    "v_proj": (attn.v_proj, None)}, ctx)  # fmt: skip
            layer.o = Projection({"o_proj": (attn.o_proj, None)}, ctx)
            layer.gate_up = Projection(
                {"gate_proj": (mlp.gate_proj, None), "up_proj": (mlp.up_proj, None)}, ctx
            )
            layer.down = Projection({"down_proj": (mlp.down_proj, None)}, ctx)
            for linear in ("q_proj", "k_proj", "v_proj"):  # copied (permuted or packed): free them now
                setattr(attn, linear, None)
            mlp.gate_proj = mlp.up_proj = None
            for proj, prefix in ((layer.qkv, "self_attn"), (layer.o, "self_attn"),
                                 (layer.gate_up, "mlp"), (layer.down, "mlp")):  # fmt: skip
                for part in proj.parts:
                    self.targets[f"model.layers.{i}.{prefix}.{part}"] = (proj, part)
            self.layers.append(layer)
        rotary = model.model.rotary_emb
        angles = torch.outer(torch.arange(max_model_len, dtype=torch.float32), rotary.inv_freq.float().cpu())
        scale = torch.full_like(angles, float(rotary.attention_scaling))
        self.rope = torch.polar(scale, angles).to(self.embed.device)  # [max_len, d/2] complex64

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head_dense(hidden).contiguous()

    def denses(self) -> list[Dense | Int8Dense]:
        out = [self.lm_head_dense]
        for layer in self.layers:
            out += [layer.qkv.dense, layer.o.dense, layer.gate_up.dense, layer.down.dense]
        return out

    def projections(self) -> list[Projection]:
        return [p for layer in self.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]

    def prepare(self, name: str, path: Path) -> list[tuple[int, dict]]:
        """Read and check an adapter into host memory, laid out for `install` (safe in any thread:
        it reads the model's shapes only). Returns `[(projection index, {part: (A, scaled B)})]`."""
        cfg, modules = read_adapter_weights(path)
        _, scale = lora_scale(cfg)
        index = {id(p): i for i, p in enumerate(self._projections)}
        max_rank = self._projections[0].width // len(self._projections[0].parts)
        per_projection: dict[int, dict] = {}
        for module_name, ab in modules.items():
            target = self.targets.get(module_name)
            if target is None:
                raise LoRALoadError(
                    f"adapter {name!r}: no LoRA-capable Linear {module_name!r} in the base model (only the "
                    "attention and MLP projections can be served per request; merge it with llm-export)"
                )
            proj, part = target
            _, out, in_features, rows = proj.parts[part]
            a, b = checked_pair(name, module_name, ab, in_features, out)
            check_rank(name, a.shape[0], max_rank)
            b = b[rows] if rows is not None else b
            per_projection.setdefault(index[id(proj)], {})[part] = (
                a.to(self.dtype),
                b.to(self.dtype) * scale,
            )
        # Parts in the projection's own order, so a slot's columns are laid out the same every load.
        return [
            (i, {part: ab[part] for part in self._projections[i].parts if part in ab})
            for i, ab in sorted(per_projection.items())
        ]

    def finalize(
        self, slots: int, max_rank: int, quantize: str = "none", quantize_lm_head: bool = False
    ) -> None:
        """Build every projection's weight with `slots` empty LoRA slots of rank `max_rank`; once.

        `quantize="int8"`: weight-only int8 for the attention and MLP projections (the embedding,
        norms and, unless `quantize_lm_head`, the LM head stay in float)."""
        int8 = quantize == "int8"
        self._projections = self.projections()
        for proj in self._projections:
            proj.finalize(slots, max_rank, quantize=int8)
        if int8 and quantize_lm_head:
            self.lm_head_dense = Int8Dense(self.lm_head_dense.weight)

    def install(self, slot: int, prepared: list[tuple[int, dict]]) -> None:
        """Copy a prepared adapter into `slot` (engine thread, between steps)."""
        self.clear(slot)
        device = self.embed.device
        for i, ab in prepared:
            self._projections[i].load_slot(
                slot, {k: (a.to(device), b.to(device)) for k, (a, b) in ab.items()}
            )

    def clear(self, slot: int) -> None:
        for proj in self._projections:
            proj.clear_slot(slot)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, layout: StepLayout) -> torch.Tensor:
        t, d, nq, nkv = input_ids.shape[0], self.head_dim, self.heads, self.kv_heads
        qk_size, inter, hidden = (nq + nkv) * d, self.intermediate, (self.hidden,)
        rot = self.rope[positions].unsqueeze(1)  # [T, 1, d/2]
        h = F.embedding(input_ids, self.embed)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(F.rms_norm(h, hidden, layer.input_norm, self.eps)).contiguous()
            qk = qkv[:, :qk_size].view(t, nq + nkv, d // 2, 2)
            if self.dtype == torch.float32:
                qk = torch.view_as_real(torch.view_as_complex(qk) * rot).view(t, nq + nkv, d)
            else:
                qk = (
                    torch.view_as_real(torch.view_as_complex(qk.float()) * rot)
                    .to(self.dtype)
                    .view(t, nq + nkv, d)
                )
            v = qkv[:, qk_size:].view(t, nkv, d)
            attn = attend(i, qk[:, :nq], qk[:, nq:], v, layout, self.scaling)
            h = h + layer.o(attn.view(t, nq * d))
            gu = layer.gate_up(F.rms_norm(h, hidden, layer.post_norm, self.eps))
            h = h + layer.down(F.silu(gu[:, :inter]) * gu[:, inter:])
        return F.rms_norm(h, hidden, self.norm, self.eps)
