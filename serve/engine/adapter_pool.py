"""The HF engine's adapters at run time: known, held in host memory, or in one of the LoRA slots.

Many adapters may be known (start-up ones, folders below `--adapter-dir`, runtime loads); at most
`max_loras` are in the batched weights at once (`Residency`), and at most `max_cpu_loras` prepared
copies are kept in host memory (the rest are read from disk again when needed).

- `register` + `prepare` (event loop): an adapter becomes known and its weights are read, checked
  and laid out in a worker thread, never on the engine thread.
- `admit` (scheduler, engine thread): a sequence starts only when its adapter holds a slot and is
  not being drained; otherwise it waits, and its wait shows in its time to first token.
- `place` (engine thread, once per loop iteration, before scheduling): gives a free slot, or the
  slot of the least recently used idle adapter, to the oldest waiting adapter whose weights are in
  host memory, copying its A/B in (one adapter per iteration: the only work a load adds between two
  decode steps). When every slot is in use, the least recently used busy adapter is drained: its
  running sequences finish, new ones wait, then its slot is taken, so no waiting adapter starves.
- `retire` (event loop): unload or in-place reload. The adapter takes no new requests; its queued and
  running ones finish on its weights, then it leaves its slot and host memory. Each version of an
  adapter has its own id (never reused), so a reload never mixes weights within a request, and a
  prefix computed under one version is never shared with another.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from serve.engine.residency import Residency
from serve.engine.types import UnknownAdapterError

logger = logging.getLogger(__name__)

#: Histogram buckets (seconds) for the time to load an adapter into a slot.
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class SlotModel(Protocol):
    """What a decoder offers the pool: `NativeLlama` or `lora.TransformersLoRA`."""

    def prepare(self, name: str, path: Path) -> Any: ...
    def install(self, slot: int, prepared: Any) -> None: ...
    def clear(self, slot: int) -> None: ...


@dataclass(eq=False)
class PoolAdapter:
    key: str  # what requests name (GenerationRequest.adapter)
    id: int  # unique in the process, never reused: Sequence.adapter_index
    name: str  # the served name, for metrics
    path: Path
    prepared: Any = None  # host copy laid out for `install`, when held
    loading: Future | None = None
    prepare_seconds: float = 0.0  # reading the held host copy took this long (part of its next load)
    active: int = 0  # sequences queued or running
    running: int = 0
    retired: bool = False
    draining: bool = False


@dataclass
class AdapterTotals:
    """Per served name, across versions, since start: what /metrics reports."""

    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    loads: int = 0
    load_seconds: float = 0.0


@dataclass
class PoolStats:
    resident: dict[str, bool]  # served name -> holds a slot (any version)
    totals: dict[str, AdapterTotals]
    slots: int
    load_buckets: list[int] = field(default_factory=list)  # cumulative counts per LOAD_BUCKETS bound
    load_count: int = 0
    load_sum: float = 0.0
    max_copy_seconds: float = 0.0  # the longest pause a load put between two engine steps


class AdapterPool:
    def __init__(
        self,
        model: SlotModel,
        slots: int,
        host_capacity: int,
        wake: Callable[[], None],
        on_free: Callable[[int], object] | None = None,
    ):
        """`wake` rouses the engine loop (a read finished, an adapter retired); `on_free(id)` runs on
        the engine thread when an adapter version is freed for good (the engine drops its cached
        prefixes)."""
        self.model = model
        self.on_free = on_free or (lambda _id: None)
        self.residency = Residency(slots)
        self.host_capacity = max(host_capacity, slots)
        self.wake = wake
        self._by_key: dict[str, PoolAdapter] = {}
        self._by_id: dict[int, PoolAdapter] = {}
        self._successor: dict[str, str] = {}  # retired key -> the key that replaced it in place
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._host: OrderedDict[int, None] = OrderedDict()  # ids holding a host copy, LRU first
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llm-serve-lora")
        self._totals: dict[str, AdapterTotals] = {}
        self._buckets = [0] * len(LOAD_BUCKETS)
        self._load_count, self._load_sum = 0, 0.0
        self.max_install_seconds = 0.0  # the longest engine-thread pause a load caused

    # ---------------------------------------------------------------- event loop side

    def register(self, key: str, name: str, path: Path) -> PoolAdapter:
        with self._lock:
            if key in self._by_key:
                raise ValueError(f"adapter key {key!r} is already registered")
            adapter = PoolAdapter(key, next(self._ids), name, Path(path))
            self._by_key[key] = adapter
            self._by_id[adapter.id] = adapter
            self._totals.setdefault(name, AdapterTotals())
        return adapter

    def prepare_now(self, key: str) -> None:
        """Read an adapter into host memory in this thread; unregisters it and raises on failure."""
        adapter = self._by_key[key]
        try:
            prepared, seconds = self._read(adapter)
        except BaseException:
            self._forget(adapter)
            raise
        self._hold(adapter, prepared, seconds)

    async def prepare(self, key: str) -> None:
        """`prepare_now` in the pool's worker thread (the engine thread keeps stepping)."""
        adapter = self._by_key[key]
        loop = asyncio.get_running_loop()
        try:
            prepared, seconds = await loop.run_in_executor(self._executor, self._read, adapter)
        except BaseException:
            self._forget(adapter)
            raise
        self._hold(adapter, prepared, seconds)

    def acquire(self, key: str, prompt_tokens: int) -> PoolAdapter:
        """Count a new request for `key`, or for the version that replaced it in place (a request
        resolved just before a reload); raises UnknownAdapterError when unknown or unloaded."""
        with self._lock:
            seen = set()
            while key in self._successor and key not in seen:
                seen.add(key)
                key = self._successor[key]
            adapter = self._by_key.get(key)
            if adapter is None:
                raise UnknownAdapterError(key)
            adapter.active += 1
            totals = self._totals[adapter.name]
            totals.requests += 1
            totals.prompt_tokens += prompt_tokens
        return adapter

    def retire(self, key: str, successor: str | None = None) -> bool:
        """No new requests for `key` (they go to `successor` when given: an in-place reload); freed
        once its last sequence ends. False when unknown."""
        with self._lock:
            adapter = self._by_key.pop(key, None)
            if adapter is None:
                return False
            adapter.retired = True
            if successor is not None:
                self._successor[key] = successor
        self.wake()
        return True

    def install_now(self, key: str) -> bool:
        """Before the engine loop runs: put `key` in a free slot, if one is left."""
        adapter = self._by_key[key]
        slot = self.residency.free_slot(lambda _: False)
        if slot is None:
            return False
        self._install(slot, adapter)
        return True

    def id_of(self, key: str) -> int:
        """The pool id of a registered key (UnknownAdapterError when there is none)."""
        with self._lock:
            adapter = self._by_key.get(key)
        if adapter is None:
            raise UnknownAdapterError(key)
        return adapter.id

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._by_key)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- engine thread

    def admit(self, seq) -> bool:
        """Scheduler hook: may `seq` start now? Sets `seq.lora_slot` when it may."""
        if seq.adapter_index < 0:
            seq.lora_slot = -1
            return True
        adapter = self._by_id[seq.adapter_index]
        slot = self.residency.slot_of(adapter.id)
        if slot is None or adapter.draining:
            return False
        self.residency.touch(adapter.id)
        adapter.running += 1
        seq.lora_slot = slot
        return True

    def released(self, seq, was_running: bool) -> None:
        """A sequence left (finished, aborted or failed): stop counting it."""
        if seq.adapter_index < 0 or not seq.adapter_held:
            return
        seq.adapter_held = False
        adapter = self._by_id.get(seq.adapter_index)
        if adapter is None:
            return
        with self._lock:
            adapter.active -= 1
            self._totals[adapter.name].generated_tokens += len(seq.output_ids)
        if was_running:
            adapter.running -= 1

    def place(self, waiting: Iterable) -> list[tuple[int, str]]:
        """Free retired adapters, collect finished reads, load at most one adapter into a slot.

        Returns `[(adapter id, error)]` for adapters whose weights could not be read: the engine
        fails their waiting sequences.
        """
        self._collect_retired()
        failed = self._collect_reads()
        wanted: dict[int, PoolAdapter] = {}
        for seq in waiting:
            aid = seq.adapter_index
            if aid >= 0 and aid not in wanted and self.residency.slot_of(aid) is None:
                wanted[aid] = self._by_id[aid]
        blocked = 0
        for rank, adapter in enumerate(wanted.values()):
            if adapter.prepared is None:
                # Read ahead only as many as the host cache holds: host memory stays bounded however
                # many adapters the queue asks for.
                if adapter.loading is None and rank < self.host_capacity:
                    self._start_read(adapter)
                continue
            slot = self.residency.free_slot(lambda a: self._by_id[a].active == 0)
            if slot is None:
                slot = self.residency.free_slot(
                    lambda a: self._by_id[a].draining and self._by_id[a].running == 0
                )
            if slot is not None:
                self._install(slot, adapter)
                return failed  # one load per iteration: decode steps run between loads
            blocked += 1
        self._drain_for(blocked)
        return failed

    def slot_of(self, adapter_id: int) -> int | None:
        return self.residency.slot_of(adapter_id)

    def stats(self) -> PoolStats:
        with self._lock:
            resident = dict.fromkeys(self._totals, False)
            for aid in self.residency.resident():
                adapter = self._by_id.get(aid)
                if adapter is not None:
                    resident[adapter.name] = True
            totals = {n: AdapterTotals(**vars(t)) for n, t in self._totals.items()}
            return PoolStats(
                resident,
                totals,
                self.residency.slots,
                list(self._buckets),
                self._load_count,
                self._load_sum,
                self.max_install_seconds,
            )

    # ---------------------------------------------------------------- internals

    def _read(self, adapter: PoolAdapter) -> tuple[Any, float]:
        t0 = time.perf_counter()
        prepared = self.model.prepare(adapter.name, adapter.path)
        return prepared, time.perf_counter() - t0

    def _hold(self, adapter: PoolAdapter, prepared: Any, seconds: float) -> None:
        with self._lock:
            adapter.prepared, adapter.prepare_seconds = prepared, seconds
            self._host[adapter.id] = None
            self._host.move_to_end(adapter.id)
            over = len(self._host) - self.host_capacity
            for aid in list(self._host):
                if over <= 0:
                    break
                other = self._by_id.get(aid)
                if aid == adapter.id or other is None or other.active:
                    continue  # in use: its host copy may be needed again soon
                other.prepared = None
                del self._host[aid]
                over -= 1

    def _forget(self, adapter: PoolAdapter) -> None:
        with self._lock:
            self._by_key.pop(adapter.key, None)
            self._by_id.pop(adapter.id, None)
            self._host.pop(adapter.id, None)

    def _start_read(self, adapter: PoolAdapter) -> None:
        adapter.loading = self._executor.submit(self._read, adapter)
        adapter.loading.add_done_callback(lambda _: self.wake())

    def _collect_reads(self) -> list[tuple[int, str]]:
        failed = []
        for adapter in list(self._by_id.values()):
            future = adapter.loading
            if future is None or not future.done():
                continue
            adapter.loading = None
            try:
                prepared, seconds = future.result()
            except Exception as exc:  # deleted or rewritten since it was checked
                logger.warning("adapter %r could not be read again: %s", adapter.name, exc)
                failed.append((adapter.id, f"adapter `{adapter.name}` could not be loaded: {exc}"))
                continue
            self._hold(adapter, prepared, seconds)
        return failed

    def _install(self, slot: int, adapter: PoolAdapter) -> None:
        t0 = time.perf_counter()
        self.model.install(slot, adapter.prepared)
        installed = time.perf_counter() - t0
        evicted = self.residency.assign(slot, adapter.id)
        if evicted is not None and evicted in self._by_id:
            self._by_id[evicted].draining = False
        seconds = installed + adapter.prepare_seconds
        adapter.prepare_seconds = 0.0  # a later reload from the host copy costs only the copy
        self.max_install_seconds = max(self.max_install_seconds, installed)
        with self._lock:
            totals = self._totals[adapter.name]
            totals.loads += 1
            totals.load_seconds += seconds
            self._load_count += 1
            self._load_sum += seconds
            for i, bound in enumerate(LOAD_BUCKETS):
                if seconds <= bound:
                    self._buckets[i] += 1
        logger.debug(
            "adapter %r -> slot %d in %.1f ms (copy %.1f ms)",
            adapter.name,
            slot,
            seconds * 1e3,
            installed * 1e3,
        )

    def _drain_for(self, blocked: int) -> None:
        """Keep exactly `blocked` resident adapters draining towards a free slot, one per waiting adapter
        that has none. No more: a draining adapter admits no new requests, so one left draining after
        the adapter it drained for found another slot would hold its next requests back for ever."""
        resident = self.residency.least_recent_first(self.residency.resident())
        draining = [a for a in resident if self._by_id[a].draining]
        for aid in draining[blocked:]:  # the most recently used of the surplus take requests again
            self._by_id[aid].draining = False
        if len(draining) >= blocked:
            return
        busy = [a for a in resident if not self._by_id[a].draining]
        for aid in busy[: blocked - len(draining)]:
            self._by_id[aid].draining = True

    def _collect_retired(self) -> None:
        for adapter in [a for a in self._by_id.values() if a.retired and a.active == 0]:
            slot = self.residency.release(adapter.id)
            if slot is not None:
                self.model.clear(slot)
            with self._lock:
                self._by_id.pop(adapter.id, None)
                self._host.pop(adapter.id, None)
            adapter.prepared = None
            self.on_free(adapter.id)
