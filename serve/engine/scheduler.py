"""Continuous-batching scheduler: which sequences decode and which prompt chunks prefill each step.

Pure bookkeeping, no torch. Sequences are admitted from a FIFO queue into free KV slots, up to
`max_num_seqs`. Every step decodes one token for each sequence past its prompt and fills the rest of
a token budget (`max_batched_tokens`) with prompt chunks, oldest first, so a long prompt is split
across steps instead of stalling every stream. Finished sequences leave at once; the last slot is
moved into the hole so running sequences stay in slots 0..N-1 and decode reads the cache as a view.

Prefix sharing: before a prompt's first chunk, the longest prefix it shares with a running sequence
of the same adapter (whose keys/values for it are already computed) is copied from that sequence's
slot instead of being computed again: a common system prompt, or the same document under several
questions, is prefilled once.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from serve.engine.types import GenerationRequest


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    adapter_index: int  # -1: the base model
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys/values are in the cache
    slot: int = -1
    finished: bool = False
    state: object = None  # engine-private per-sequence data (detokenizer, generator, sink)

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int
    length: int

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.length == len(self.seq.prompt_ids)


@dataclass
class StepPlan:
    decode: list[Sequence]
    prefill: list[PrefillChunk]

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(c.length for c in self.prefill)


class Scheduler:
    def __init__(
        self,
        max_num_seqs: int,
        max_batched_tokens: int,
        move_slot: Callable[[int, int, int], None] | None = None,
        copy_prefix: Callable[[int, int, int], None] | None = None,
        min_shared_prefix: int = 16,
    ):
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index == slot
        self.move_slot = move_slot or (lambda src, dst, n: None)
        self.copy_prefix = copy_prefix  # (src slot, dst slot, n): copy positions [0, n); None: no sharing
        self.min_shared_prefix = min_shared_prefix
        self.shared_prefix_tokens = 0  # prompt tokens copied instead of computed, since start

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            seq.slot = len(self.running)
            self.running.append(seq)
        decode = [s for s in self.running if not s.in_prefill]
        budget = max(self.max_batched_tokens - len(decode), 0)
        prefill: list[PrefillChunk] = []
        for seq in self.running:
            if budget <= 0:
                break
            if seq.in_prefill:
                if seq.num_computed == 0:
                    self._share_prefix(seq)
                n = min(len(seq.prompt_ids) - seq.num_computed, budget)
                prefill.append(PrefillChunk(seq, seq.num_computed, n))
                budget -= n
        if not decode and not prefill and self.running:
            # Budget smaller than one chunk: always make progress on the oldest prompt.
            seq = next(s for s in self.running if s.in_prefill)
            prefill.append(PrefillChunk(seq, seq.num_computed, len(seq.prompt_ids) - seq.num_computed))
        return StepPlan(decode=decode, prefill=prefill)

    def _share_prefix(self, seq: Sequence) -> None:
        """Start `seq` past the longest computed prompt prefix a running sequence shares with it."""
        if self.copy_prefix is None or seq.request.params.prompt_logprobs is not None:
            return  # prompt logprobs need every prompt position computed for this sequence
        prompt, need = seq.prompt_ids, self.min_shared_prefix
        best, source = 0, None
        for other in self.running:
            if other is seq or other.adapter_index != seq.adapter_index or other.num_computed < need:
                continue
            # Keep the last prompt token to compute: its logits give the first output token.
            n = _common_prefix(prompt, other.prompt_ids, min(other.num_computed, len(prompt) - 1))
            if n > best:
                best, source = n, other
        if best >= need:
            self.copy_prefix(source.slot, seq.slot, best)
            seq.num_computed = best
            self.shared_prefix_tokens += best

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence, waiting or running."""
        seq.finished = True
        if seq.slot < 0:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
            return
        i, last = seq.slot, self.running[-1]
        if last is not seq:
            self.move_slot(last.slot, i, last.num_computed)
            last.slot = i
            self.running[i] = last
        self.running.pop()
        seq.slot = -1


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of `a` and `b`, at most `limit`."""
    n = min(limit, len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
