"""Dense weights laid out for the matmul shapes of a decode step.

A decode step multiplies every weight by M = 1..64 rows, where CPU BLAS is far from its best with
the textbook `x @ W.T`. Measured on the 2-core AMD EPYC (MKL, fp32, weights out of cache): for M = 2..8 computing `(W @ x.T).T` with the same row-major `W [N, K]` is 1.3-4x
faster (lm_head `[49152, 576]` at M=2: 4.6 ms vs 16.3 ms), and for M = 1 a transposed copy
`W.T [K, N]` read as `x @ W.T` is 1.7-2x faster for wide outputs (lm_head 3.5 vs 7.2 ms, gate+up
0.28 vs 0.48 ms), while it is the slowest form for M >= 2. So every weight keeps its row-major
tensor and, where `tune_single_row` measures that it pays, a transposed copy used for one-row steps.
On GPU plain `F.linear` is used.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Above this many rows plain `F.linear` is faster end to end (a 512-token prefill step: 0.82 vs 0.90 s).
SMALL_M = 128
# Keep a transposed copy only when one-row steps get at least this much faster with it.
MIN_GAIN = 0.15


class Dense:
    """`y = x @ W.T (+ b)` for `x [M, K]`, choosing the fastest formulation for M.

    `y` may be a transposed view (`[M, N]` with strides `(1, M)`); call `.contiguous()` where a
    `view` of it is needed.

    `weight` may carry `lead` extra rows before the output rows: a projection's LoRA A matrices,
    computed in the same matmul (`with_lead`) when a step has adapter rows; `__call__` skips them.
    """

    __slots__ = ("weight", "bias", "weight_t", "cpu", "lead", "w", "w_t")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, lead: int = 0):
        self.weight = weight.contiguous()
        self.bias = bias
        self.lead = lead
        self.cpu = weight.device.type == "cpu"
        self.w = self.weight[lead:]
        self.set_transposed(None)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def set_transposed(self, weight_t: torch.Tensor | None) -> None:
        """Keep (or drop, with None) the `[K, lead + N]` copy used for one-row steps."""
        self.weight_t = weight_t
        self.w_t = weight_t[:, self.lead :] if weight_t is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if not self.cpu or m > SMALL_M:
            return F.linear(x, self.w, self.bias)
        # One row: the transposed copy; else a transposed view, which the next matmul reads as is.
        y = x @ self.w_t if m == 1 and self.w_t is not None else (self.w @ x.t()).t()
        return y if self.bias is None else y + self.bias

    def with_lead(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """All rows, lead included, without bias: `([M, lead + N], False)` or `([lead + N, M], True)`."""
        m = x.shape[0]
        if not self.cpu or m > SMALL_M:
            return F.linear(x, self.weight), False
        if m == 1 and self.weight_t is not None:
            return x @ self.weight_t, False
        return self.weight @ x.t(), True


def tune_single_row(denses: list[Dense], max_extra_bytes: int | None = None) -> int:
    """Give transposed copies to the weights (grouped by shape) whose one-row matmul they speed up.

    Each shape is timed over all its weights in turn, so the figures are for weights out of cache as
    in a real step. Returns the bytes added; stays within `max_extra_bytes` (default: a quarter of
    the memory available now), largest groups first.
    """
    cpu = [d for d in denses if d.cpu]
    if not cpu:
        return 0
    if max_extra_bytes is None:
        max_extra_bytes = _available_memory() // 4
    by_shape: dict[tuple[int, int], list[Dense]] = {}
    for d in cpu:
        by_shape.setdefault(d.shape, []).append(d)
    added = 0
    # Largest groups first: they gain the most; a group that would pass the cap is not tried.
    for shape, group in sorted(by_shape.items(), key=lambda kv: -kv[0][0] * kv[0][1] * len(kv[1])):
        size = sum(d.weight.numel() * d.weight.element_size() for d in group)
        if added + size > max_extra_bytes:
            logger.info("one-row matmul %s x%d: no transposed copy (memory cap)", list(shape), len(group))
            continue
        x = torch.randn(1, shape[1], dtype=group[0].weight.dtype)
        plain = _time_pass(group, x)
        for d in group:
            d.set_transposed(d.weight.t().contiguous())
        copied = _time_pass(group, x)
        gain = 1 - copied / plain
        keep = gain >= MIN_GAIN
        logger.info(
            "one-row matmul %s x%d: %.0f -> %.0f us with a transposed copy (%+.0f%%): %s",
            list(shape), len(group), plain * 1e6, copied * 1e6, -gain * 100, "kept" if keep else "not kept",
        )  # fmt: skip
        if keep:
            added += size
        else:
            for d in group:
                d.set_transposed(None)
    return added


def _time_pass(group: list[Dense], x: torch.Tensor, repeats: int = 3) -> float:
    """Best-of-`repeats` mean time of one matmul, cycling through the group's weights."""
    passes = max(1, 24 // len(group))
    for d in group[:4]:
        d(x)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(passes):
            for d in group:
                d(x)
        best = min(best, (time.perf_counter() - t0) / (passes * len(group)))
    return best


def _available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)
