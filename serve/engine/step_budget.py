"""How many prompt tokens a step may carry: a budget from the measured step time.

A step that carries a 512-token prompt chunk next to 15 decoding sequences takes several times as
long as their decode step alone, and every one of those streams waits for it (issue 19: ITL p99
3x vLLM's). So while sequences decode, prompt chunks are sized to a target step time:

- `StepCostModel` learns what a step costs on this machine, now: `t = c0 + c_tok * (decode rows +
  prompt tokens) + c_dec * decode rows + c_kv * cached positions the decode rows read` (c0: reading
  every weight once; c_tok: a token through the matmuls; c_dec: what a decode row adds, its lm_head
  row and sampling; c_kv: attention reads), by least squares with exponential forgetting (a shared
  machine's speed drifts) and a ridge pull toward a prior, so it never runs away on steps that all
  look alike. Decode-only steps and steps with prompt chunks differ in `tokens`, which separates
  the fixed cost from the per-token one.
- `prefill_budget`: decode first; with nothing decoding, a step takes as many prompt tokens as
  `max_tokens` allows (no stream to stall: the burst reaches its first tokens soonest). Otherwise
  the step may take `ratio` times the decode step of the batch it is filling (the running
  sequences plus the waiting ones that fit), and prompt tokens fill what is left, at least
  `min_chunk` so prompts always progress.

Pure Python, no torch: it runs once per step next to the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

# Feature scales (a full step of the default model): keeps the least-squares system well conditioned.
SCALE = (1.0, 512.0, 16.0, 16384.0)
# What a step of the 135M default model costs on the 2-core CPU (s), before anything is measured:
# 30 ms fixed, 1.5 ms a token, 3.5 ms more a decode row, 3 us a cached position read.
PRIOR = (0.03, 0.77, 0.056, 0.05)
WARMUP_STEPS = 20  # observations taken as they are before outliers are clipped


@dataclass(frozen=True)
class StepLoad:
    """What one step carries."""

    decode_rows: int
    prompt_tokens: int
    decode_kv: int  # positions the decode rows attend over, summed

    def features(self) -> list[float]:
        raw = (1.0, self.decode_rows + self.prompt_tokens, self.decode_rows, self.decode_kv)
        return [v / s for v, s in zip(raw, SCALE, strict=True)]


class StepCostModel:
    def __init__(self, forget: float = 0.995, prior_weight: float = 2.0, prior=PRIOR):
        self.forget = forget
        self.prior = list(prior)
        self.prior_weight = prior_weight
        n = len(prior)
        self._a = [[0.0] * n for _ in range(n)]  # sum of forget^age * x x^T
        self._b = [0.0] * n  # sum of forget^age * x t
        self.theta = list(prior)
        self.steps = 0

    def observe(self, load: StepLoad, seconds: float) -> None:
        x = load.features()
        predicted = self.predict(load)
        # A step the OS descheduled (another process took the core) must not teach the model that
        # every step is slow: the budget plans on typical steps. A lasting slowdown still moves it.
        seconds = min(seconds, 1.25 * predicted) if self.steps >= WARMUP_STEPS else seconds
        lam = self.forget
        for i, xi in enumerate(x):
            row = self._a[i]
            for j, xj in enumerate(x):
                row[j] = lam * row[j] + xi * xj
            self._b[i] = lam * self._b[i] + xi * seconds
        self.steps += 1
        self.theta = self._solve()

    def predict(self, load: StepLoad) -> float:
        return sum(max(c, 0.0) * f for c, f in zip(self.theta, load.features(), strict=True))

    def per_token(self) -> float:
        """Seconds one more prompt token adds to a step."""
        return max(self.theta[1], 0.0) / SCALE[1]

    def _solve(self) -> list[float]:
        """theta = (A + w I)^-1 (b + w prior), by Gaussian elimination (4 x 4)."""
        n, w = len(self.prior), self.prior_weight
        m = [
            [*(self._a[i][j] + (w if i == j else 0.0) for j in range(n)), self._b[i] + w * self.prior[i]]
            for i in range(n)
        ]
        for col in range(n):
            pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
            m[col], m[pivot] = m[pivot], m[col]
            for r in range(n):
                if r != col and m[r][col]:
                    f = m[r][col] / m[col][col]
                    m[r] = [a - f * b for a, b in zip(m[r], m[col], strict=True)]
        return [m[i][n] / m[i][i] for i in range(n)]


def prefill_budget(
    model: StepCostModel,
    decode_rows: int,
    decode_kv: int,
    batch_rows: int,
    *,
    ratio: float,
    max_tokens: int,
    min_chunk: int = 16,
) -> int:
    """Prompt tokens the next step may carry next to `decode_rows` decoding sequences.

    `batch_rows`: sequences that will decode together once the admitted prompts finish (running
    plus waiting, at most max_num_seqs); the step may take `ratio` times their decode step.
    """
    room = max(max_tokens - decode_rows, 0)
    if decode_rows == 0 or ratio <= 0:
        return room
    per_row_kv = decode_kv / decode_rows
    target = ratio * model.predict(StepLoad(batch_rows, 0, int(per_row_kv * batch_rows)))
    base = model.predict(StepLoad(decode_rows, 0, decode_kv))
    per_token = model.per_token()
    tokens = int((target - base) / per_token) if per_token > 0 else room
    return min(room, max(tokens, min_chunk))
