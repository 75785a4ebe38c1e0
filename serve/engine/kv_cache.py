"""Slot KV cache and the attention function that reads and writes it.

Every admitted sequence owns one slot of a preallocated cache `[slots, kv_heads, max_len, head_dim]`
per layer. A model step runs one packed row of tokens `[1, T]`: first one decode token for each
decoding sequence, then prefill chunks. `attend` writes the new keys/values into the slots and
attends over each sequence's own prefix, so sequences of any length share one forward pass
(continuous batching) without padding. The native Llama (`llama.py`) calls it directly;
`slot_attention` registers it as a transformers attention implementation for other models.
Memory is bounded by construction, and `torch.empty` commits pages only as they are first used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "llm_serve_slots"
ZERO_AHEAD = 256  # positions a slot's never-written cache is zeroed ahead of its reads


@dataclass
class PrefillSegment:
    slot: int
    start: int  # position of the first token of this chunk in its sequence
    length: int
    offset: int  # index of the chunk's first token in the packed row


@dataclass
class StepLayout:
    """Where each packed token goes; built once per step and shared by all layers."""

    cache: SlotKVCache
    decode_slots: torch.Tensor  # [B] long
    decode_positions: torch.Tensor  # [B] long, position of each decode token
    decode_max_len: int  # longest attended prefix among decode rows (position + 1)
    prefills: list[PrefillSegment] = field(default_factory=list)
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, decode_max_len], 0 or -inf
    decode_rows: torch.Tensor | None = None  # [B * kv_heads] rows of the flattened cache the new tokens go to
    decode_is_prefix: bool = False  # decode slots are exactly 0..B-1: read the cache as a view

    @property
    def num_decode(self) -> int:
        return int(self.decode_slots.numel())


class SlotKVCache:
    def __init__(
        self, num_layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device
    ):
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots, self.max_len = slots, max_len
        # Positions below this mark hold finite values in every layer. Decode rows attend over the
        # longest row's length, so shorter rows read past their own end (masked out); never-written
        # memory may hold NaN bit patterns, which a mask does not neutralise (NaN * 0 = NaN).
        self.initialized = [0] * slots

    def mark_written(self, slot: int, end: int) -> None:
        """Prefill wrote positions [0, end) of `slot`."""
        self.initialized[slot] = max(self.initialized[slot], end)

    def ensure_initialized(self, slots: list[int], length: int) -> None:
        """Positions below `length` of every slot in `slots` hold finite values.

        Zeroes ahead in blocks of `ZERO_AHEAD` positions: rows lagging behind the longest decode
        row would otherwise need one zeroing per layer at every step.
        """
        for slot in slots:
            start = self.initialized[slot]
            if start < length:
                end = min(self.max_len, max(length, start + ZERO_AHEAD))
                for k, v in zip(self.keys, self.values, strict=True):
                    k[slot, :, start:end].zero_()
                    v[slot, :, start:end].zero_()
                self.initialized[slot] = end

    @staticmethod
    def bytes_needed(num_layers, slots, kv_heads, max_len, head_dim, dtype) -> int:
        return (
            2
            * num_layers
            * slots
            * kv_heads
            * max_len
            * head_dim
            * torch.tensor([], dtype=dtype).element_size()
        )

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into `dst` (slot compaction)."""
        for k, v in zip(self.keys, self.values, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]
        self.initialized[dst] = max(self.initialized[dst], length)


def attend(
    layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: StepLayout, scaling: float | None
) -> torch.Tensor:
    """Write this step's keys/values into the slots and attend; `q [T, heads, d]`, `k/v [T, kv_heads, d]`.

    Returns `[T, heads, d]`. Decode rows attend together in one batched call over the longest
    prefix (shorter rows masked); each prefill chunk attends over its own slot's prefix.
    """
    kc, vc = layout.cache.keys[layer], layout.cache.values[layer]
    n_dec = layout.num_decode
    out = q.new_empty(q.shape)

    if n_dec:
        slots, d = layout.decode_slots, k.shape[-1]
        kc.view(-1, d).index_copy_(0, layout.decode_rows, k[:n_dec].reshape(-1, d))
        vc.view(-1, d).index_copy_(0, layout.decode_rows, v[:n_dec].reshape(-1, d))
        length = layout.decode_max_len
        kk = kc[:n_dec, :, :length] if layout.decode_is_prefix else kc[slots, :, :length]
        vv = vc[:n_dec, :, :length] if layout.decode_is_prefix else vc[slots, :, :length]
        # The query heads sharing a KV head attend as that head's "rows" (no causal order among
        # them): K/V are read once per KV head, not once per query head.
        kv_heads = kk.shape[1]
        qd = q[:n_dec].reshape(n_dec, kv_heads, q.shape[1] // kv_heads, d)
        o = F.scaled_dot_product_attention(qd, kk, vv, attn_mask=layout.decode_mask, scale=scaling)
        out[:n_dec] = o.view(n_dec, q.shape[1], d)

    for seg in layout.prefills:
        a, b = seg.offset, seg.offset + seg.length
        end = seg.start + seg.length
        kc[seg.slot, :, seg.start : end] = k[a:b].transpose(0, 1)
        vc[seg.slot, :, seg.start : end] = v[a:b].transpose(0, 1)
        qq = q[a:b].transpose(0, 1).unsqueeze(0)  # [1, heads, L, d]
        kk = kc[seg.slot : seg.slot + 1, :, :end]
        vv = vc[seg.slot : seg.slot + 1, :, :end]
        if seg.start == 0:
            o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            rows = torch.arange(seg.length, device=q.device).unsqueeze(1) + seg.start
            mask = torch.arange(end, device=q.device).unsqueeze(0) <= rows
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scaling, enable_gqa=True)
        out[a:b] = o[0].transpose(0, 1)
    return out


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """`attend` as a transformers attention function: `query/key/value` are `[1, heads, T, head_dim]`."""
    out = attend(
        module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
        kwargs["step_layout"], scaling,
    )  # fmt: skip
    return out.unsqueeze(0), None


def finalize_layout(layout: StepLayout) -> StepLayout:
    """Precompute cache rows, the decode mask and whether decode slots are exactly 0..B-1 (a view, no gather)."""
    n = layout.num_decode
    if n:
        cache, dev = layout.cache, layout.decode_positions.device
        kv_heads = cache.keys[0].shape[1]
        heads = torch.arange(kv_heads, device=dev).unsqueeze(0)
        rows = (layout.decode_slots.unsqueeze(1) * kv_heads + heads) * cache.max_len
        layout.decode_rows = (rows + layout.decode_positions.unsqueeze(1)).flatten()
        arange = torch.arange(layout.decode_max_len, device=dev)
        if n > 1:  # one row attends over exactly its own prefix: no mask needed
            # Additive float mask, built once per step (SDPA would convert a bool mask in every layer).
            past_end = arange.unsqueeze(0) > layout.decode_positions.unsqueeze(1)
            dtype = cache.keys[0].dtype
            mask = torch.zeros(past_end.shape, dtype=dtype, device=dev).masked_fill_(past_end, float("-inf"))
            layout.decode_mask = mask.view(n, 1, 1, -1)
        layout.decode_is_prefix = bool(
            torch.equal(layout.decode_slots, torch.arange(n, device=layout.decode_slots.device))
        )
    return layout


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, slot_attention)
