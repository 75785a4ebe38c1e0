"""Which adapter holds which of the engine's `max_loras` LoRA slots, and which one to give up next.

Pure bookkeeping (no torch), used by `adapter_pool.py` from the engine thread. Adapters are
identified by their pool id (an int never reused). A free slot is always taken first, lowest index
first: the native decoder computes LoRA rows only up to the highest slot in use, so packing adapters
into low slots keeps a lightly used server cheap. Otherwise the least recently used idle adapter
(no sequence of it queued or running) gives up its slot.
"""

from __future__ import annotations

from collections.abc import Callable


class Residency:
    def __init__(self, slots: int):
        self.owner: list[int | None] = [None] * slots
        self._slot: dict[int, int] = {}
        self._last_used: dict[int, int] = {}
        self._clock = 0

    @property
    def slots(self) -> int:
        return len(self.owner)

    def slot_of(self, adapter: int) -> int | None:
        return self._slot.get(adapter)

    def resident(self) -> list[int]:
        return list(self._slot)

    def touch(self, adapter: int) -> None:
        self._clock += 1
        self._last_used[adapter] = self._clock

    def free_slot(self, idle: Callable[[int], bool]) -> int | None:
        """A free slot, else the slot of the least recently used adapter for which `idle(id)`; None
        when every slot is held by an adapter in use."""
        for slot, owner in enumerate(self.owner):
            if owner is None:
                return slot
        candidates = [a for a in self._slot if idle(a)]
        if not candidates:
            return None
        return self._slot[min(candidates, key=lambda a: self._last_used.get(a, 0))]

    def least_recent_first(self, adapters: list[int]) -> list[int]:
        return sorted(adapters, key=lambda a: self._last_used.get(a, 0))

    def assign(self, slot: int, adapter: int) -> int | None:
        """Give `slot` to `adapter`; returns the adapter evicted from it, if any."""
        evicted = self.owner[slot]
        if evicted is not None:
            del self._slot[evicted]
        self.owner[slot] = adapter
        self._slot[adapter] = slot
        self.touch(adapter)
        return evicted

    def release(self, adapter: int) -> int | None:
        """Free the slot `adapter` holds (if any) and return it."""
        slot = self._slot.pop(adapter, None)
        if slot is not None:
            self.owner[slot] = None
        self._last_used.pop(adapter, None)
        return slot
