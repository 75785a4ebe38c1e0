"""Where the prefix cache keeps keys/values: per layer `[rows, kv_heads, head_dim]`, one row per token.

Running sequences keep their keys/values in contiguous slots (`kv_cache.SlotKVCache`), which decode
attention reads as a view with no gather. The pool is separate: a finished sequence's new tokens
are copied into free rows once (`save`), and a prompt that hits the cache copies its prefix back
into its slot once (`load`), at ~46 KB per token for the default model (a 1,500-token chat history
in ~10 ms, against ~2 s to compute it on the 2-core CPU). No step pays anything for the cache.

The pool is allocated and zeroed at start-up, so its memory is committed once and resident memory
stays flat however the cache fills.
"""

from __future__ import annotations

import torch

from serve.engine.kv_cache import SlotKVCache


class PrefixKVPool:
    def __init__(self, cache: SlotKVCache, rows: int):
        k0 = cache.keys[0]
        shape = (rows, k0.shape[1], k0.shape[3])
        self.cache = cache
        self.keys = [torch.zeros(shape, dtype=k0.dtype, device=k0.device) for _ in cache.keys]
        self.values = [torch.zeros(shape, dtype=k0.dtype, device=k0.device) for _ in cache.keys]
        self.rows = rows
        self.nbytes = sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @staticmethod
    def bytes_per_row(num_layers: int, kv_heads: int, head_dim: int, dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def save(self, slot: int, start: int, rows: list[int]) -> None:
        """Copy positions `[start, start + len(rows))` of `slot` into pool `rows`."""
        if not rows:
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.keys[0].device)
        end = start + len(rows)
        for src, dst in ((self.cache.keys, self.keys), (self.cache.values, self.values)):
            for layer, pool in zip(src, dst, strict=True):
                pool.index_copy_(0, index, layer[slot, :, start:end].transpose(0, 1))

    def load(self, rows: list[int], slot: int) -> None:
        """Copy pool `rows` into positions `[0, len(rows))` of `slot`."""
        if not rows:
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.keys[0].device)
        n = len(rows)
        for src, dst in ((self.keys, self.cache.keys), (self.values, self.cache.values)):
            for pool, layer in zip(src, dst, strict=True):
                layer[slot, :, :n] = pool.index_select(0, index).transpose(0, 1)
        self.cache.mark_written(slot, n)
