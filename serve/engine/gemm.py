"""Dense weights laid out for the matmul shapes of a decode step.

A decode step multiplies every weight by M = 1..64 rows, where CPU BLAS is far from its best with
the textbook `x @ W.T`. Measured on the 2-core AMD EPYC (MKL, fp32, weights out of cache): for M = 2..8 computing `(W @ x.T).T` with the same row-major `W [N, K]` is 1.3-4x
faster (lm_head `[49152, 576]` at M=2: 4.6 ms vs 16.3 ms), and for M = 1 a transposed copy
`W.T [K, N]` read as `x @ W.T` is 1.7-2x faster for wide outputs (lm_head 3.5 vs 7.2 ms, gate+up
0.28 vs 0.48 ms), while it is the slowest form for M >= 2. So every weight keeps its row-major
tensor and, where `tune_single_row` measures that it pays, a transposed copy used for one-row steps.

The `(W @ x.T).T` form also has row counts MKL handles badly: measured on the same CPU (one layer's
q/k/v + gate/up + down), 15 rows took 3.95 ms against 1.83 ms for 16, 31 rows 4.39 ms against 2.25
for 32; rows that are a multiple of 8 are fast, most others pay for a tail. A step's row count is
whatever the batch holds (15 streams after one finished, 15 decode rows next to a 50-token prompt
piece), so `tune_row_padding` times each weight shape at every row count up to `SMALL_M` at load
and, where a few more rows of zeros run faster, the matmul runs padded and the extra rows are
dropped (a view: nothing is copied back).
On GPU plain `F.linear` is used.

The server's load calls the tuning functions with `cache=True`: what they measured (transposed copies'
timings, padding tables, int8 splits) is stored per machine, torch version, thread count and weight
shapes in `$LLM_SERVE_HOME/tune/` (`serve.engine.tune_cache`) and reused by later starts, which then
skip the ~10 s of timing (default model, 2 cores). `LLM_SERVE_RETUNE=1` measures again and
overwrites the stored tables.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from serve.engine import tune_cache

logger = logging.getLogger(__name__)

# Above this many rows plain `F.linear` is faster end to end (a 512-token prefill step: 0.82 vs 0.90 s).
SMALL_M = 128
# Keep a transposed copy only when one-row steps get at least this much faster with it.
MIN_GAIN = 0.15
# Pad a matmul's rows with zeros, by at most this many, when that makes it at least MIN_PAD_GAIN faster.
PAD_REACH = 8
MIN_PAD_GAIN = 0.15


class Dense:
    """`y = x @ W.T (+ b)` for `x [M, K]`, choosing the fastest formulation for M.

    `y` may be a transposed view (`[M, N]` with strides `(1, M)`); call `.contiguous()` where a
    `view` of it is needed.

    `weight` may carry `lead` extra rows before the output rows: a projection's LoRA A matrices,
    computed in the same matmul (`with_lead`) when a step has adapter rows; `__call__` skips them.
    Lead rows are rewritten in place when an adapter is loaded into a slot (`write_lead`).
    """

    __slots__ = ("weight", "bias", "weight_t", "cpu", "lead", "w", "w_t", "pad_to")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, lead: int = 0):
        self.weight = weight.contiguous()
        self.bias = bias
        self.lead = lead
        self.cpu = weight.device.type == "cpu"
        self.w = self.weight[lead:]
        self.pad_to: list[int] | None = None  # pad_to[m]: rows a matmul of m rows runs with
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
        y = x @ self.w_t if m == 1 and self.w_t is not None else (self.w @ self._padded(x).t()).t()[:m]
        return y if self.bias is None else y + self.bias

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """`x` with zero rows added up to the row count `tune_row_padding` found faster."""
        m, pad = x.shape[0], self.pad_to
        if pad is None or m >= len(pad) or pad[m] == m:
            return x
        out = x.new_zeros(pad[m], x.shape[1])
        out[:m] = x
        return out

    def with_lead(self, x: torch.Tensor, skip: int = 0) -> tuple[torch.Tensor, bool]:
        """Rows from `skip` on (lead rows included), without bias: `([M, lead - skip + N], False)` or
        `([lead - skip + N, M], True)`. Skipping leading rows costs nothing: both layouts slice as views."""
        m = x.shape[0]
        if not self.cpu or m > SMALL_M:
            return F.linear(x, self.weight[skip:]), False
        if m == 1 and self.weight_t is not None:
            return x @ self.weight_t[:, skip:], False
        return (self.weight[skip:] @ self._padded(x).t())[:, :m], True

    def write_lead(self, start: int, rows: torch.Tensor) -> None:
        """Overwrite lead rows `[start, start + len(rows))` in the weight and its transposed copy."""
        end = start + rows.shape[0]
        assert end <= self.lead, "only lead rows are rewritten after load"
        self.weight[start:end].copy_(rows)
        if self.weight_t is not None:
            self.weight_t[:, start:end].copy_(rows.t())


def tune_single_row(denses: list[Dense], max_extra_bytes: int | None = None, cache: bool = False) -> int:
    """Give transposed copies to the weights (grouped by shape) whose one-row matmul they speed up.

    Each shape is timed over all its weights in turn, so the figures are for weights out of cache as
    in a real step. Returns the bytes added; stays within `max_extra_bytes` (default: a quarter of
    the memory available now), largest groups first. With `cache`, the timings come from (and go
    to) `tune_cache`; the memory cap is applied anew at every call.
    """
    cpu = [d for d in denses if d.cpu]
    if not cpu:
        return 0
    if max_extra_bytes is None:
        max_extra_bytes = _available_memory() // 4
    by_shape: dict[tuple[int, int], list[Dense]] = {}
    for d in cpu:
        by_shape.setdefault(d.shape, []).append(d)
    # The mean over a group depends on how many weights it cycles through: the count is in the key.
    key = {"shapes": sorted([*s, str(g[0].weight.dtype), len(g)] for s, g in by_shape.items())}
    stored = tune_cache.load("one-row copies", key, _check_timings) if cache else None
    timings: dict[str, list[float]] = dict(stored or {})
    measured, t0 = False, time.perf_counter()
    added = 0
    # Largest groups first: they gain the most; a group that would pass the cap is not tried.
    for shape, group in sorted(by_shape.items(), key=lambda kv: -kv[0][0] * kv[0][1] * len(kv[1])):
        size = sum(d.weight.numel() * d.weight.element_size() for d in group)
        if added + size > max_extra_bytes:
            logger.info("one-row matmul %s x%d: no transposed copy (memory cap)", list(shape), len(group))
            continue
        name = _shape_name(shape)
        if name not in timings:  # no cache, or the cap kept this shape out when it was filled
            x = torch.randn(1, shape[1], dtype=group[0].weight.dtype)
            plain = _time_pass(group, x)
            for d in group:
                d.set_transposed(d.weight.t().contiguous())
            timings[name] = [plain, _time_pass(group, x)]
            measured = True
        plain, copied = timings[name]
        gain = 1 - copied / plain
        keep = gain >= MIN_GAIN
        logger.info(
            "one-row matmul %s x%d: %.0f -> %.0f us with a transposed copy (%+.0f%%): %s",
            list(shape), len(group), plain * 1e6, copied * 1e6, -gain * 100, "kept" if keep else "not kept",
        )  # fmt: skip
        if keep:
            added += size
        for d in group:
            if not keep:
                d.set_transposed(None)
            elif d.weight_t is None:
                d.set_transposed(d.weight.t().contiguous())
    if cache and measured:
        tune_cache.save("one-row copies", key, timings, time.perf_counter() - t0)
    return added


def _check_timings(timings) -> None:
    for plain, copied in timings.values():
        if not (plain > 0 and copied > 0):
            raise ValueError(f"timings must be positive: {plain}, {copied}")


def tune_row_padding(
    denses: list[Dense], head_rows: int = 32, repeats: int = 2, cache: bool = False
) -> dict[tuple[int, int], list[int]]:
    """Time each weight shape's `(W @ x.T)` at every row count from 2 to `SMALL_M`, and give its
    weights a table (`Dense.pad_to`) sending each row count to the count within `PAD_REACH` above it
    that runs at least `MIN_PAD_GAIN` faster, when one does, and still does when the two are timed
    again head to head. Shapes of over 16M values (an LM
    head: only sampled rows reach it) are timed up to `head_rows` rows only, to keep start-up short.
    With `cache`, the tables come from (and go to) `tune_cache`.
    Returns the tables by shape (row counts that are padded only), for the log and tests.
    """
    by_shape: dict[tuple[int, int], list[Dense]] = {}
    for d in denses:
        if d.cpu:
            by_shape.setdefault(d.shape, []).append(d)
    if not by_shape:
        return {}
    limits = {
        shape: SMALL_M if shape[0] * shape[1] <= 16 * 2**20 else min(head_rows, SMALL_M) for shape in by_shape
    }

    def measure() -> dict[str, list[int]]:
        return {_shape_name(s): _pad_table(g[0].weight, limits[s], repeats) for s, g in by_shape.items()}

    def check(tables: dict[str, list[int]]) -> None:
        for shape, limit in limits.items():
            table = tables[_shape_name(shape)]
            if len(table) != limit + 1 or table[:2] != [0, 1]:
                raise ValueError(f"table for {shape} has {len(table)} entries, not {limit + 1}")
            if not all(type(t) is int and m <= t <= min(m + PAD_REACH, limit) for m, t in enumerate(table)):
                raise ValueError(f"table for {shape} pads outside [m, m + {PAD_REACH}]")

    if cache:
        key = {
            "shapes": sorted([*s, str(g[0].weight.dtype), limits[s]] for s, g in by_shape.items()),
            "small_m": SMALL_M, "pad_reach": PAD_REACH, "min_pad_gain": MIN_PAD_GAIN, "repeats": repeats,
        }  # fmt: skip
        tables = tune_cache.cached("row padding", key, measure, check)
    else:
        tables = measure()
    padded: dict[tuple[int, int], list[int]] = {}
    for shape, group in by_shape.items():
        table, limit = tables[_shape_name(shape)], limits[shape]
        for d in group:
            d.pad_to = table
        padded[shape] = [m for m in range(2, limit + 1) if table[m] != m]
        logger.info(
            "matmul %s x%d: %d of %d row counts run padded (%s)", list(shape), len(group),
            len(padded[shape]), limit - 1, ", ".join(f"{m}->{table[m]}" for m in padded[shape][:12]),
        )  # fmt: skip
    return padded


def _pad_table(w: torch.Tensor, limit: int, repeats: int) -> list[int]:
    """`pad_to` for `w`: each row count up to `limit` sent to the one it runs fastest at (see above)."""
    x = torch.randn(limit, w.shape[1], dtype=w.dtype)
    cost = [0.0, 0.0]
    for m in range(2, limit + 1):
        xm = x[:m].t()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            w @ xm  # noqa: B018
            best = min(best, time.perf_counter() - t0)
        cost.append(best)
    table = list(range(limit + 1))
    for m in range(2, limit + 1):
        faster = min(range(m, min(m + PAD_REACH, limit) + 1), key=cost.__getitem__)
        if cost[faster] < (1 - MIN_PAD_GAIN) * cost[m]:
            table[m] = faster
    # One pass over every row count lets a stray slow sample (the OS took the core) pick a
    # padding: confirm each chosen one head to head, interleaved, before trusting it.
    for m in [m for m in range(2, limit + 1) if table[m] != m]:
        a, b = x[:m].t(), x[: table[m]].t()
        plain, pad = _head_to_head(lambda: w @ a, lambda: w @ b, repeats + 1)  # noqa: B023
        if pad >= (1 - MIN_PAD_GAIN) * plain:
            table[m] = m
    return table


def _shape_name(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def _head_to_head(first, second, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` times of two calls, alternating (a drifting machine hits both alike)."""
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, call in enumerate((first, second)):
            t0 = time.perf_counter()
            call()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


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


# Before `tune_int8_rows` measures it: at most this many rows go through torch's int8 weight-only
# kernel; above it the bf16 copy of the int8 values on oneDNN (AMX) is faster (measured on the
# 2-core Xeon, 135M model, a whole step's matmuls: 1 row 39 vs 93 ms, 4 rows 51 vs 90, 8 rows 104
# vs 91, 16 rows 179 vs 101). On a CPU without native bf16 (AMD EPYC, AVX2) the bf16 path is ~3.5x
# slower than the kernel at every row count (gate/up at 16 rows: 3.88 vs 1.04 ms), and a fixed 4
# made `--quantize int8` at 16 streams half as fast as fp32.
INT8_KERNEL_MAX_ROWS = 4
# Row counts at which `tune_int8_rows` compares the two paths.
INT8_TUNE_ROWS = (2, 4, 8, 16, 32, 64, 128, 256)


class QuantizationError(ValueError):
    """`quantize` cannot run here (no kernel on this torch/CPU, or not the native decoder)."""


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: `(q [N, K] int8, scale [N] bf16)`, weight ~= q * scale.

    The scale is rounded to bf16 (the kernel's scale dtype) before the weights are divided by it,
    so the rounding of the scale is part of the quantization rather than an error on top of it.
    """
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1).clamp_min(1e-12)
    scale = (absmax / 127).to(torch.bfloat16)
    # Rounding the scale down could push the largest weight past 127; nudge such scales up one ulp.
    low = absmax / scale.float() > 127.49
    scale[low] = torch.nextafter(scale[low].float(), torch.tensor(float("inf"))).to(torch.bfloat16)
    q = torch.round(w / scale.float().unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class Int8Dense:
    """Weight-only int8 `y = x @ (q * scale).T (+ b)`, the `Dense` of `--quantize int8`.

    Activations are rounded to bf16 and products accumulate in fp32. Up to `kernel_max_rows` rows
    (`INT8_KERNEL_MAX_ROWS` until `tune_int8_rows` measures this CPU) use `aten._weight_int8pack_mm` (reads 1 byte per weight: the memory-bound one-stream
    step); more rows multiply a bf16 copy of the same integer values (exact in bf16), pre-packed
    for oneDNN (AMX where the CPU has it; unpacked, oneDNN would re-layout the weight every call),
    then scale each column: the same figures within bf16 rounding. The output is in the input's
    dtype. No LoRA rows (`lead`): adapters stay in float in `Projection`.
    """

    __slots__ = ("qweight", "scale", "scale_f", "bf16", "packed", "bias", "lead", "cpu", "kernel_max_rows")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.qweight, self.scale = quantize_int8(weight)
        self.scale_f = self.scale.float()
        self.bias = bias
        self.lead = 0
        self.cpu = True
        self.kernel_max_rows: float = INT8_KERNEL_MAX_ROWS
        self.bf16 = self.qweight.to(torch.bfloat16)
        self.packed = None
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            self.packed, self.bf16 = torch.ops.mkldnn._reorder_linear_weight(self.bf16, 16), None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel(x) if x.shape[0] <= self.kernel_max_rows else self.via_bf16(x)
        return y if self.bias is None else y.add_(self.bias)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """Through torch's int8 weight-only kernel (no bias)."""
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scale).to(x.dtype)

    def via_bf16(self, x: torch.Tensor) -> torch.Tensor:
        """Through the bf16 copy of the integers, then the scales (no bias)."""
        xb = x.to(torch.bfloat16)
        if self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(xb, self.packed, None, "none", [], "")
        else:
            y = F.linear(xb, self.bf16)
        return y.to(x.dtype).mul_(self.scale_f)


def tune_int8_rows(
    denses: list[Int8Dense], repeats: int = 2, cache: bool = False
) -> dict[tuple[int, int], float]:
    """Per weight shape, the most rows for which the int8 kernel beats the bf16 path on this CPU.

    Both are timed (head to head, alternating) at each of `INT8_TUNE_ROWS`; `kernel_max_rows` becomes
    the largest count below the first at which the bf16 path wins, or infinity when it never does
    (no native bf16: the kernel serves every step, prefill included). With `cache`, the choices come
    from (and go to) `tune_cache`. Returns it by shape.
    """
    by_shape: dict[tuple[int, int], list[Int8Dense]] = {}
    for d in denses:
        by_shape.setdefault(d.shape, []).append(d)
    if not by_shape:
        return {}

    def measure() -> dict[str, int | None]:  # None: the kernel at every row count (JSON has no infinity)
        return {_shape_name(s): _int8_limit(g[0], repeats) for s, g in by_shape.items()}

    def check(limits: dict[str, int | None]) -> None:
        for shape in by_shape:
            limit = limits[_shape_name(shape)]
            if limit is not None and (type(limit) is not int or limit < 1):
                raise ValueError(f"kernel_max_rows for {shape} is {limit!r}")

    if cache:
        key = {
            "shapes": sorted(list(s) for s in by_shape), "rows": list(INT8_TUNE_ROWS), "repeats": repeats,
            "packed": any(g[0].packed is not None for g in by_shape.values()),  # oneDNN's bf16 path
        }  # fmt: skip
        limits = tune_cache.cached("int8 rows", key, measure, check)
    else:
        limits = measure()
    chosen: dict[tuple[int, int], float] = {}
    for shape, group in by_shape.items():
        stored = limits[_shape_name(shape)]
        limit = float("inf") if stored is None else stored
        for g in group:
            g.kernel_max_rows = limit
        chosen[shape] = limit
        logger.info(
            "int8 matmul %s x%d: the int8 kernel up to %s rows, bf16 above", list(shape), len(group), limit
        )
    return chosen


def _int8_limit(d: Int8Dense, repeats: int) -> int | None:
    """The most rows for which `d.kernel` beats `d.via_bf16`, or None when it always does."""
    x = torch.randn(max(INT8_TUNE_ROWS), d.shape[1])
    previous = 1
    for m in INT8_TUNE_ROWS:
        xm = x[:m]
        d.kernel(xm), d.via_bf16(xm)  # warm-up (oneDNN builds its primitive once per shape)
        kernel, bf16 = _head_to_head(lambda: d.kernel(xm), lambda: d.via_bf16(xm), repeats)  # noqa: B023
        if bf16 < kernel:
            return previous
        previous = m
    return None


def check_int8_support() -> None:
    """Raise `QuantizationError` unless torch's int8 weight-only CPU kernel runs here."""
    try:
        x = torch.randn(2, 64, dtype=torch.bfloat16)
        q, scale = quantize_int8(torch.randn(32, 64))
        y = torch.ops.aten._weight_int8pack_mm(x, q, scale)
        want = x.float() @ (q.float() * scale.float().unsqueeze(1)).t()
        if not torch.allclose(y.float(), want, rtol=2e-2, atol=2e-1):
            raise RuntimeError("the kernel's result does not match the reference")
    except (AttributeError, NotImplementedError, RuntimeError) as exc:
        raise QuantizationError(
            f"quantize=int8 needs torch's CPU int8 weight-only kernel (aten._weight_int8pack_mm), which "
            f"does not run with torch {torch.__version__} here ({type(exc).__name__}: {exc}); "
            "use --quantize none"
        ) from exc
    flags = _cpu_flags()
    if flags and "avx512_bf16" not in flags and "amx_bf16" not in flags:
        logger.warning(
            "quantize=int8: this CPU has no native bf16 (avx512_bf16/amx_bf16); int8 steps may be slower than fp32"
        )


def _cpu_flags() -> set[str]:
    return tune_cache.cpu_info()[1]
