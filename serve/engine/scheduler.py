"""Continuous-batching scheduler: which sequences decode and which prompt chunks prefill each step.

Pure bookkeeping, no torch. Sequences are admitted from a FIFO queue into free KV slots, up to
`max_num_seqs`; one whose LoRA adapter is not loaded yet (`admit` says no) keeps its place in the
queue while later ones pass it. Every step decodes one token for each sequence past its prompt first,
then fills a budget with prompt chunks, oldest first: with nothing decoding, up to `max_batched_tokens`;
while sequences decode, as many prompt tokens as keep the step within `step_time_ratio` times a decode
step, by the measured step cost (`step_budget.py`), so admitting prompts does not stall the streams.
Finished sequences leave at once; the last slot is
moved into the hole so running sequences stay in slots 0..N-1 and decode reads the cache as a view.

Prefix reuse: before a prompt's first chunk, the longest prefix it shares with a running sequence
of the same adapter (whose keys/values for it are already computed) is copied from that sequence's
slot, or, when longer, the longest prefix the prefix cache (`prefix_cache.py`) holds for that
adapter from finished sequences: a common system prompt, the same document under several
questions, or a chat's history is prefilled once. Sequences that leave hand their computed tokens
to the cache before their slot is reused.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from serve.engine.prefix_cache import PrefixCache, has_logprob, trimmed
from serve.engine.step_budget import StepCostModel, StepLoad, prefill_budget
from serve.engine.types import GenerationRequest, TokenLogprob

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    adapter_index: int  # -1: the base model; else the adapter pool's id (unique per adapter version)
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys/values are in the cache
    slot: int = -1
    finished: bool = False
    state: object = None  # engine-private per-sequence data (detokenizer, generator, sink)
    # The weights this sequence runs with, for prefix reuse: a per-load id that is never reused
    # (an adapter unloaded and another loaded at the same index must not share cached keys/values).
    adapter_key: Hashable = None
    # Log-probability of each prompt token computed so far (index = position; [0] is None), when
    # the request asked for them.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    lora_slot: int = -1  # the LoRA slot its adapter holds while it runs (-1: none)
    adapter_held: bool = False  # counted by the adapter pool until it leaves

    def __post_init__(self) -> None:
        if self.adapter_key is None:
            self.adapter_key = self.adapter_index
        if self.request.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

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
    decode_kv: int = 0  # positions the decode rows attend over, summed

    @property
    def load(self) -> StepLoad:
        return StepLoad(len(self.decode), sum(c.length for c in self.prefill), self.decode_kv)

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
        min_shared_prefix: int = 4,
        prefix_cache: PrefixCache | None = None,
        load_cached: Callable[[list[int], int], None] | None = None,
        save_cached: Callable[[int, int, list[int]], None] | None = None,
        step_time_ratio: float = 0.0,
        admit: Callable[[Sequence], bool] | None = None,
    ):
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        # While sequences decode, prompt chunks keep a step within this many times a decode step
        # of the full batch (`step_budget.py`); 0: chunks as large as `max_batched_tokens` allows.
        self.step_time_ratio = step_time_ratio
        self.cost = StepCostModel()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index == slot
        self.move_slot = move_slot or (lambda src, dst, n: None)
        self.copy_prefix = copy_prefix  # (src slot, dst slot, n): copy positions [0, n); None: no sharing
        self.min_shared_prefix = min_shared_prefix
        self.shared_prefix_tokens = 0  # prompt tokens copied from running sequences, since start
        self.prefix_cache = prefix_cache
        self.load_cached = load_cached or (lambda rows, slot: None)  # pool rows -> slot positions [0, n)
        self.save_cached = save_cached or (lambda slot, start, rows: None)  # slot [start, ...) -> rows
        self.prompt_tokens = 0  # prompt tokens of admitted sequences, since start
        self.cache_hit_tokens = 0  # of those, copied from the prefix cache instead of computed
        self.admit = admit  # may this waiting sequence start now (its adapter loaded)? None: always

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        if self.waiting and len(self.running) < self.max_num_seqs:
            held: deque[Sequence] = deque()  # waiting on their adapter: later ones may pass them
            while self.waiting and len(self.running) < self.max_num_seqs:
                seq = self.waiting.popleft()
                if self.admit is not None and not self.admit(seq):
                    held.append(seq)
                    continue
                seq.slot = len(self.running)
                self.running.append(seq)
            held.extend(self.waiting)
            self.waiting = held
        decode = [s for s in self.running if not s.in_prefill]
        kv = sum(s.num_computed + 1 for s in decode)
        budget = prefill_budget(
            self.cost, len(decode), kv, min(len(self.running) + len(self.waiting), self.max_num_seqs),
            ratio=self.step_time_ratio, max_tokens=self.max_batched_tokens,
        )  # fmt: skip
        prefill: list[PrefillChunk] = []
        for seq in self.running:
            if budget <= 0:
                break
            if seq.in_prefill:
                if seq.num_computed == 0:
                    self._reuse_prefix(seq)
                n = min(len(seq.prompt_ids) - seq.num_computed, budget)
                prefill.append(PrefillChunk(seq, seq.num_computed, n))
                budget -= n
        if not decode and not prefill and self.running:
            # Budget smaller than one chunk: always make progress on the oldest prompt.
            seq = next(s for s in self.running if s.in_prefill)
            prefill.append(PrefillChunk(seq, seq.num_computed, len(seq.prompt_ids) - seq.num_computed))
        return StepPlan(decode=decode, prefill=prefill, decode_kv=kv)

    def record(self, plan: StepPlan, seconds: float) -> None:
        """What `plan` took to run: the step cost model learns from it."""
        self.cost.observe(plan.load, seconds)

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Start `seq` past the longest prompt prefix whose keys/values a running sequence of the
        same adapter or the prefix cache already holds."""
        prompt, top = seq.prompt_ids, seq.request.params.prompt_logprobs
        self.prompt_tokens += len(prompt)
        best, source = 0, None
        if self.copy_prefix is not None:
            for other in self.running:
                if other is seq or other.adapter_key != seq.adapter_key:
                    continue
                limit = min(other.num_computed, len(prompt))
                if top is not None:
                    limit = min(limit, _logprobs_known(other.prompt_logprobs, top))
                n = _common_prefix(prompt, other.prompt_ids, limit)
                if n > best:
                    best, source = n, other
        hit = None
        if self.prefix_cache is not None:
            hit = self.prefix_cache.lookup(seq.adapter_key, prompt, len(prompt), top)
            if hit.length <= best:
                hit = None
        # The last prompt token is always computed: its logits give the first output token. A
        # request asking for prompt logprobs also recomputes the last matched token: its hidden
        # state gives the log-probability of the first token not matched.
        n = min(max(best, hit.length if hit else 0) - (top is not None), len(prompt) - 1)
        if n < self.min_shared_prefix:
            return
        if hit is not None:
            self.load_cached(hit.rows[:n], seq.slot)
            self.cache_hit_tokens += n
            known = hit.logprobs
        else:
            self.copy_prefix(source.slot, seq.slot, n)
            self.shared_prefix_tokens += n
            known = source.prompt_logprobs
        seq.num_computed = n
        logger.debug(
            "%s: %d of %d prompt tokens from %s", seq.request.request_id, n, len(prompt),
            "the prefix cache" if hit is not None else "a running sequence",
        )  # fmt: skip
        if top is not None:
            seq.prompt_logprobs = [None, *(trimmed(r, top) for r in known[1 : n + 1])]

    def cache_stats(self) -> dict[str, float]:
        """Prefix-cache figures for /metrics (zeros when the cache is off)."""
        cache, queries = self.prefix_cache, self.prompt_tokens
        return {
            "prefix_cache_queries": float(queries),
            "prefix_cache_hits": float(self.cache_hit_tokens),
            "prefix_cache_hit_rate": self.cache_hit_tokens / queries if queries else 0.0,
            "prefix_cache_tokens": float(cache.cached_tokens if cache else 0),
            "prefix_cache_capacity_tokens": float(cache.capacity if cache else 0),
            "prefix_cache_evicted_tokens": float(cache.evicted_tokens if cache else 0),
        }

    def remove(self, seq: Sequence, cache: bool = True) -> None:
        """Drop a finished or aborted sequence, waiting or running.

        With `cache`, the tokens whose keys/values its slot holds go to the prefix cache first
        (pass False when they may be wrong, e.g. after a failed step).
        """
        seq.finished = True
        if seq.slot < 0:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
            return
        if cache and self.prefix_cache is not None and seq.num_computed > 0:
            tokens = (seq.prompt_ids + seq.output_ids)[: seq.num_computed]
            start, rows = self.prefix_cache.insert(seq.adapter_key, tokens, seq.prompt_logprobs)
            self.save_cached(seq.slot, start, rows)
        i, last = seq.slot, self.running[-1]
        if last is not seq:
            self.move_slot(last.slot, i, last.num_computed)
            last.slot = i
            self.running[i] = last
        self.running.pop()
        seq.slot = -1

    def drop_cached(self, adapter_key: Hashable) -> int:
        """Forget the prefix cache's tokens of one adapter load (unloaded); returns how many."""
        return self.prefix_cache.drop(adapter_key) if self.prefix_cache is not None else 0


def _logprobs_known(records: list[TokenLogprob | None] | None, top: int) -> int:
    """How many leading tokens have log-probabilities with at least `top` alternatives."""
    if records is None:
        return 0
    n = 0
    while n < len(records) and has_logprob(records[n], n, top):
        n += 1
    return n


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
