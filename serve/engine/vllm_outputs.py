"""Turn vLLM's request outputs into this project's incremental `GenerationOutput`s.

vLLM reports a request either cumulatively (every update repeats the whole completion so far: its
default) or as deltas. `OutputTracker` accepts both and always hands out only what is new since the
previous update: token ids, text, per-token logprobs (chosen token plus its top-k alternatives) and,
once with the first update, the prompt logprobs for `echo`. Pure data mapping: no vLLM import, so it is
unit-tested with plain objects of the same shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from serve.engine.types import FinishReason, GenerationOutput, TokenLogprob

_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "abort",
    "error": "error",
}


def to_token_logprob(token_id: int, entries: Mapping[int, Any], top_k: int) -> TokenLogprob:
    """One position: vLLM gives `{token_id: Logprob(logprob, rank)}` holding the top-k and the chosen token."""
    chosen = entries.get(token_id)
    logprob = float(chosen.logprob) if chosen is not None else float("-inf")
    top: list[tuple[int, float]] = []
    if top_k > 0:
        ranked = sorted(
            ((tid, lp) for tid, lp in entries.items() if lp.rank is not None and lp.rank <= top_k),
            key=lambda item: (item[1].rank, -item[1].logprob),
        )
        top = [(int(tid), float(lp.logprob)) for tid, lp in ranked[:top_k]]
    return TokenLogprob(token_id=int(token_id), logprob=logprob, top=top)


def to_prompt_logprobs(
    prompt_token_ids: Sequence[int], prompt_logprobs: Sequence[Mapping[int, Any] | None], top_k: int
) -> list[TokenLogprob | None]:
    """Per prompt token; the first has no logprob (nothing precedes it), as in vLLM and OpenAI."""
    out: list[TokenLogprob | None] = []
    for tid, entries in zip(prompt_token_ids, prompt_logprobs, strict=False):
        out.append(None if entries is None else to_token_logprob(tid, entries, top_k))
    return out


class OutputTracker:
    """Per-request state that turns successive vLLM `CompletionOutput`s into increments."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        *,
        cumulative: bool,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.cumulative = cumulative
        self.top_logprobs = logprobs
        self.top_prompt_logprobs = prompt_logprobs
        self.num_tokens = 0  # generated tokens handed out so far
        self.num_chars = 0  # characters of text handed out so far (cumulative mode)
        self.sent_prompt_logprobs = False
        self.finished = False

    def update(self, completion: Any, prompt_logprobs: Sequence | None = None) -> GenerationOutput:
        """`completion` is a vLLM CompletionOutput (`token_ids`, `text`, `logprobs`, `finish_reason`)."""
        token_ids = list(completion.token_ids)
        text = completion.text or ""
        logprobs = completion.logprobs
        if self.cumulative:
            token_ids = token_ids[self.num_tokens :]
            text = text[self.num_chars :]
            if logprobs is not None:
                logprobs = list(logprobs)[self.num_tokens :]
            self.num_chars += len(text)
        out = GenerationOutput(
            request_id=self.request_id,
            token_ids=token_ids,
            text=text,
            num_prompt_tokens=len(self.prompt_token_ids),
        )
        if self.top_logprobs is not None:
            entries = list(logprobs or [])
            out.logprobs = [
                to_token_logprob(tid, entry, self.top_logprobs)
                for tid, entry in zip(token_ids, entries, strict=False)
            ]
        if self.top_prompt_logprobs is not None and not self.sent_prompt_logprobs and prompt_logprobs:
            out.prompt_logprobs = to_prompt_logprobs(
                self.prompt_token_ids, prompt_logprobs, self.top_prompt_logprobs
            )
            self.sent_prompt_logprobs = True
        self.num_tokens += len(token_ids)
        out.num_generated_tokens = self.num_tokens
        if completion.finish_reason is not None:
            out.finish_reason = _FINISH_REASONS.get(str(completion.finish_reason), "stop")
            self.finished = True
        return out

    def aborted(self, reason: FinishReason = "abort", error: str | None = None) -> GenerationOutput:
        """The closing update when vLLM ended the request without a finish reason of its own."""
        self.finished = True
        return GenerationOutput(
            request_id=self.request_id,
            finish_reason=reason,
            error=error,
            num_prompt_tokens=len(self.prompt_token_ids),
            num_generated_tokens=self.num_tokens,
        )
