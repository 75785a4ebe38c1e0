"""How many prompt tokens a step may carry: a budget from the measured step time.

A step that carries a 512-token prompt chunk next to 15 decoding sequences takes several times as
long as their decode step alone, and every one of those streams waits for it (issue 19: ITL p99
3x vLLM's). So while sequences decode, prompt chunks are sized to a target step time:

- `StepCostModel` learns what a step costs on this machine, now: `t = c0 + c_tok * prompt tokens +
  c_dec * decode rows + c_kv * cached positions the decode rows read` (c0: reading every weight
  once; c_tok: a prompt token through the matmuls; c_dec: a decode row, far cheaper than a prompt
  token on a CPU where a small batch's matmuls are bound by reading the weights, not by their
  rows; c_kv: attention reads), by least squares with
  exponential forgetting (a shared machine's speed drifts) and a ridge pull toward a prior, so it
  never runs away on steps that all look alike. Every coefficient is a cost, so none is negative:
  an earlier form that charged decode rows as prompt tokens plus a correction clipped the
  correction at 0 and over-predicted the full batch's decode step by a quarter, and with it the
  prompt budget.
- `prefill_budget`: decode first; with nothing decoding, a step takes as many prompt tokens as
  `max_tokens` allows (no stream to stall: the burst reaches its first tokens soonest). Otherwise
  the step may take `ratio` times the decode step of the batch it is filling (the running
  sequences plus the waiting ones that fit), and prompt tokens fill what is left, at least
  `min_chunk` so prompts always progress.
- The plan is only as good as the model: steps that carried prompt tokens next to decoding rows
  are remembered as measured / predicted, and the target is divided by a high quantile of that
  ratio (`margin`, 1 to 1.5), so a model that runs short on such steps (they are the inter-token
  latency tail: a fixed cost per prompt piece, attention that grows with the piece, a noisy
  machine) sizes them smaller instead of overshooting the target. (A per-piece term in the model
  was tried: on real steps it could not be told apart from the prompt length and took 65 ms a
  piece, starving prompts of budget.)

Pure Python, no torch: it runs once per step next to the scheduler.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

# Feature scales (a full step of the default model): keeps the least-squares system well conditioned.
SCALE = (1.0, 512.0, 16.0, 16384.0)
# What a step of the 135M default model costs on the 2-core CPU (s), before anything is measured:
# 30 ms fixed, 1.5 ms a prompt token, 2 ms a decode row, 3 us a cached position read.
PRIOR = (0.03, 0.77, 0.032, 0.05)
WARMUP_STEPS = 20  # observations taken as they are before outliers are clipped
MARGIN_WINDOW = 64  # recent mixed (prompt + decode) steps whose measured/predicted ratio is kept
MARGIN_MIN_SAMPLES = 8
MARGIN_QUANTILE = 0.9
MARGIN_MAX = 1.5


@dataclass(frozen=True)
class StepLoad:
    """What one step carries."""

    decode_rows: int
    prompt_tokens: int
    decode_kv: int  # positions the decode rows attend over, summed

    def features(self) -> list[float]:
        raw = (1.0, self.prompt_tokens, self.decode_rows, self.decode_kv)
        return [v / s for v, s in zip(raw, SCALE, strict=True)]


class StepCostModel:
    def __init__(self, forget: float = 0.995, prior_weight: float = 0.5, prior=PRIOR):
        self.forget = forget
        self.prior = list(prior)
        self.prior_weight = prior_weight
        n = len(prior)
        self._a = [[0.0] * n for _ in range(n)]  # sum of forget^age * x x^T
        self._b = [0.0] * n  # sum of forget^age * x t
        self.theta = list(prior)
        self.steps = 0
        self._mixed: deque[float] = deque(maxlen=MARGIN_WINDOW)  # measured / predicted, mixed steps

    def observe(self, load: StepLoad, seconds: float) -> None:
        x = load.features()
        predicted = self.predict(load)
        if load.decode_rows and load.prompt_tokens and predicted > 0:
            self._mixed.append(seconds / predicted)
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

    def margin(self) -> float:
        """How far recent steps with prompt tokens next to decoding rows ran over the prediction:
        the MARGIN_QUANTILE of measured / predicted, within [1, MARGIN_MAX] (1 until enough seen)."""
        if len(self._mixed) < MARGIN_MIN_SAMPLES:
            return 1.0
        ratios = sorted(self._mixed)
        q = ratios[min(int(MARGIN_QUANTILE * len(ratios)), len(ratios) - 1)]
        return min(max(q, 1.0), MARGIN_MAX)

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
    plus waiting, at most max_num_seqs); the step may take `ratio` times their decode step,
    divided by the model's recent `margin` on such steps.
    """
    room = max(max_tokens - decode_rows, 0)
    if decode_rows == 0 or ratio <= 0:
        return room
    per_row_kv = decode_kv / decode_rows
    full = model.predict(StepLoad(batch_rows, 0, int(per_row_kv * batch_rows)))
    target = ratio * full / model.margin()
    base = model.predict(StepLoad(decode_rows, 0, decode_kv))
    per_token = model.per_token()
    tokens = int((target - base) / per_token) if per_token > 0 else room
    return min(room, max(tokens, min_chunk))
