"""Per-row sampling for a batch of sequences with different parameters.

Penalties follow OpenAI's definition (subtract `frequency * count + presence * [count > 0]` over the
tokens generated so far); temperature 0 is greedy; top-p keeps the smallest set of tokens whose
probability reaches p; a seed gives each request its own generator, so its samples do not depend on
what else is in the batch. Log-probabilities are those of the model's distribution (before
penalties and temperature), which is what scoring clients such as lm-eval expect.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve.engine.types import SamplingParams, TokenLogprob


@dataclass
class RowState:
    params: SamplingParams
    output_ids: list[int]
    generator: torch.Generator | None


def make_generator(seed: int | None, device) -> torch.Generator | None:
    """A generator for a seeded request (seeds are validated to [0, 2**63) by the protocol)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def sample(
    logits: torch.Tensor, rows: list[RowState], allowed=None
) -> tuple[list[int], list[TokenLogprob | None]]:
    """`logits` is `[B, V]` float; returns chosen ids and, for rows that asked, their logprobs.

    `allowed` is a grammar's `(bitmask, row indices)` (serve.structured.bitmask): those rows choose
    only among allowed tokens; logprobs stay the model's own distribution, as vLLM reports them."""
    logits = logits.float()
    want_lp = [r.params.logprobs is not None for r in rows]
    logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None

    processed = logits
    if allowed is not None:
        from serve.structured.bitmask import apply_bitmask

        processed = logits.clone()
        apply_bitmask(processed, *allowed)
    for i, r in enumerate(rows):
        p = r.params
        if r.output_ids and (p.presence_penalty or p.frequency_penalty):
            if processed is logits:
                processed = logits.clone()
            ids = torch.tensor(r.output_ids, device=logits.device)
            counts = torch.bincount(ids, minlength=logits.shape[-1]).to(logits.dtype)
            processed[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)

    chosen = torch.argmax(processed, dim=-1).tolist()
    for i, r in enumerate(rows):
        if not r.params.greedy:
            chosen[i] = _sample_row(processed[i], r.params, r.generator)

    lps: list[TokenLogprob | None] = []
    for i, r in enumerate(rows):
        if logprobs is None or r.params.logprobs is None:
            lps.append(None)
            continue
        lps.append(token_logprob(logprobs[i], chosen[i], r.params.logprobs))
    return chosen, lps


def token_logprob(row_logprobs: torch.Tensor, token_id: int, top_k: int) -> TokenLogprob:
    top: list[tuple[int, float]] = []
    if top_k > 0:
        vals, idx = torch.topk(row_logprobs, top_k)
        top = list(zip(idx.tolist(), vals.tolist(), strict=True))
    return TokenLogprob(token_id=int(token_id), logprob=float(row_logprobs[token_id]), top=top)


def _sample_row(row: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """Sample one token, safe for every value the protocol admits.

    Temperature is at least 1e-5 here (lower is greedy) and softmax subtracts the maximum, so scaling
    never overflows. top-p always keeps the most likely token: a `top_p` below float32's smallest
    number (1e-46 rounds to 0) would otherwise keep nothing and leave an all-zero distribution.
    """
    if not torch.isfinite(row).any():
        raise ValueError("every token has probability zero (the logits are all -inf or NaN)")
    scaled = row / p.temperature
    if p.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        keep = (torch.cumsum(probs, dim=-1) - probs) < p.top_p
        keep[0] = True
        choice = torch.multinomial(probs * keep, 1, generator=generator)
        return int(sorted_idx[choice])
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
