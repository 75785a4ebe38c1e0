"""The Llama-family decoder (Llama, Mistral, Qwen2 checkpoints) written for the step loop.

transformers' modeling code runs ~45 tensor ops and several Python layers per decoder layer and
multiplies with `x @ W.T`; a one-token step of the 135M default model spends ~10 ms outside its
matmuls that way. This runs the same math in ~15 ops per layer: q/k/v and gate/up packed into one
matmul each (`gemm.Dense`, which picks the fastest formulation for the row count), RoPE as one
complex multiply (q/k rows are permuted at load into interleaved pairs; permuting q and k alike
leaves every q.k unchanged), fused RMSNorm, and `kv_cache.attend`. LoRA deltas of all adapters
are applied per token, their A matrices fused into the base matmul (`Projection`).

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
    checked_pair,
    column_owners,
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

    The A matrices of every adapter are stacked above the base weight, so a step with adapter rows
    gets `x @ A.T` from the same matmul as the base output (one BLAS call instead of two); then one
    `addmm` adds `B @ xA` (the row's own adapter's columns only, by mask, when adapters mix). Packed
    projections (q/k/v) get a block B. Base-only steps read just the base rows.

    Quantized (`finalize(quantize=True)`): the base rows become an `Int8Dense` and the A matrices
    stay in float beside it (`a_cat`, one extra small matmul on steps with adapter rows), so
    adapters add exactly the float delta they add to the f32 model.
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
        self.dense: Dense | Int8Dense | None = None  # built by `finalize`, once every adapter is known
        self.quantized = False
        self.a_cat: torch.Tensor | None = None  # quantized only: every adapter's A, `[sum r, in]`
        self.lora_a: dict[int, torch.Tensor] = {}  # adapter index -> [r, in]
        self.lora_b: dict[int, torch.Tensor] = {}  # adapter index -> [out, r], scaled, block for packed parts
        self.columns: dict[int, tuple[int, int]] = {}  # adapter index -> (first lead row, rank)
        self.b_cat = self.col_adapter = None

    def add_adapter(self, index: int, ab: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """`ab`: part name -> (A `[r, in]`, scaled B `[out, r]`) for the parts this adapter targets."""
        w = self.pieces[0]
        rank = sum(a.shape[0] for a, _ in ab.values())
        b_block = w.new_zeros(self.out_features, rank)
        col = 0
        for name, (a, b) in ab.items():
            start, out, _, rows = self.parts[name]
            b_block[start : start + out, col : col + a.shape[0]] = b[rows] if rows is not None else b
            col += a.shape[0]
        self.lora_a[index] = torch.cat([a for a, _ in ab.values()]).to(w)
        self.lora_b[index] = b_block.contiguous()

    def finalize(self, quantize: bool = False) -> None:
        """Build the one weight: every adapter's A stacked above the packed base rows (one copy;
        a copy even for a lone Linear: transformers may load the checkpoint as one buffer, which
        would stay alive, whole, while any tensor viewing it does). Quantized: the base rows in
        int8, the A matrices in float beside them."""
        order = sorted(self.lora_a)
        lead = 0
        for i in order:
            self.columns[i] = (lead, self.lora_a[i].shape[0])
            lead += self.lora_a[i].shape[0]
        device = self.pieces[0].device
        if quantize:
            self.quantized = True
            base = torch.cat(self.pieces) if len(self.pieces) > 1 else self.pieces[0]
            self.dense = Int8Dense(base, self.bias)
            if order:
                self.a_cat = torch.cat([self.lora_a[i] for i in order]).contiguous()
        else:
            rows = [*(self.lora_a[i] for i in order), *self.pieces]
            self.dense = Dense(torch.cat(rows) if len(rows) > 1 else rows[0].clone(), self.bias, lead=lead)
        self.pieces = []
        if order:
            self.b_cat = torch.cat([self.lora_b[i] for i in order], dim=1).contiguous()
            self.col_adapter = self.ctx.shared(column_owners({i: self.columns[i][1] for i in order}, device))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ctx, dense = self.ctx, self.dense
        single = ctx.single
        if not self.columns or (single is not None and single not in self.columns):
            return dense(x)  # base rows only, or an adapter that does not target this projection
        if self.quantized:
            y = dense(x)  # [M, N], bias added
            if single is not None:
                first, r = self.columns[single]
                xa = x @ self.a_cat[first : first + r].t()
                return y.addmm_(xa, self.lora_b[single].t())
            xa = (x @ self.a_cat.t()) * ctx.mask_for(self.col_adapter, x.dtype)
            return y.addmm_(xa, self.b_cat.t())
        full, transposed = dense.with_lead(x)
        lead = dense.lead
        if transposed:  # [lead + N, M]
            xa, y = full[:lead], full[lead:]
            if single is not None:
                first, r = self.columns[single]
                y.addmm_(self.lora_b[single], xa[first : first + r])
            else:
                y.addmm_(self.b_cat, xa * ctx.mask_t_for(self.col_adapter, x.dtype))
            y = y.t()
        else:  # [M, lead + N]
            xa, y = full[:, :lead], full[:, lead:]
            if single is not None:
                first, r = self.columns[single]
                y = torch.addmm(y, xa[:, first : first + r], self.lora_b[single].t())
            else:
                y = torch.addmm(y, xa * ctx.mask_for(self.col_adapter, x.dtype), self.b_cat.t())
        return y if dense.bias is None else y + dense.bias


class _Layer:
    __slots__ = ("input_norm", "qkv", "o", "post_norm", "gate_up", "down")


class NativeLlama:
    """`forward(input_ids [T], positions [T], layout) -> hidden [T, H]`; `lm_head(hidden) -> logits`.

    Takes the weights out of `model` (its copied Linears are removed as it goes, so the checkpoint
    is not held twice); add adapters, then `finalize()`.
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

    def add_adapter(self, index: int, name: str, path: Path) -> None:
        cfg, modules = read_adapter_weights(path)
        _, scale = lora_scale(cfg)
        per_projection: dict[int, tuple[Projection, dict]] = {}
        for module_name, ab in modules.items():
            target = self.targets.get(module_name)
            if target is None:
                raise LoRALoadError(
                    f"adapter {name!r}: no LoRA-capable Linear {module_name!r} in the base model (only the "
                    "attention and MLP projections can be served per request; merge it with llm-export)"
                )
            proj, part = target
            _, out, in_features, _ = proj.parts[part]
            a, b = checked_pair(name, module_name, ab, in_features, out)
            per_projection.setdefault(id(proj), (proj, {}))[1][part] = (a, b * scale)
        for proj, ab in per_projection.values():
            proj.add_adapter(index, ab)

    def finalize(self, quantize: str = "none", quantize_lm_head: bool = False) -> None:
        """Build every projection's weight; call once, after `add_adapter` for each adapter.

        `quantize="int8"`: weight-only int8 for the attention and MLP projections (the embedding,
        norms and, unless `quantize_lm_head`, the LM head stay in float)."""
        int8 = quantize == "int8"
        for layer in self.layers:
            for proj in (layer.qkv, layer.o, layer.gate_up, layer.down):
                proj.finalize(quantize=int8)
        if int8 and quantize_lm_head:
            self.lm_head_dense = Int8Dense(self.lm_head_dense.weight)

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
