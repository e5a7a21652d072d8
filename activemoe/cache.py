"""cache.py maps ExpertId to slot ids and keeps the slot metadata; it knows nothing about tensors or CUDA.

Invariants: a slot holds at most one expert and an expert sits in at most one slot; a pinned or LOADING
slot is never evicted; the policy only ranks the slots that may be evicted. Policies whose ranking
changes only when the cache touches or inserts a slot, or where on_touch says (`indexed = True`), get
an O(log S) lazy heap instead of the O(S) scan; both choose the same victim (lowest priority, then
lowest slot id).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, fields

from activemoe.cache_meta import SlotMeta, SlotState
from activemoe.ids import ExpertId
from activemoe.policies import EvictionPolicy


class NoEvictableSlot(RuntimeError):
    """Every slot is pinned or loading: the caller asked for more experts at once than there are slots."""


@dataclass
class CacheStats:
    hits: int = 0  # lookups that found the expert READY
    misses: int = 0
    loads: int = 0  # slots assigned to a new expert
    evictions: int = 0  # loads that displaced a resident expert
    wasted: int = 0  # speculative loads evicted (or aborted) before their first use
    prefetch_used: int = 0  # speculative loads used (their first use)

    def get_and_reset(self) -> CacheStats:
        snapshot = CacheStats(**{f.name: getattr(self, f.name) for f in fields(self)})
        for f in fields(self):
            setattr(self, f.name, 0)
        return snapshot


class ExpertCache:
    def __init__(self, num_slots: int, policy: EvictionPolicy):
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        self.meta = [SlotMeta() for _ in range(num_slots)]
        self.stats = CacheStats()
        self._slot_of: dict[ExpertId, int] = {}
        self._layer_slots: dict[int, set[int]] = {}  # MoE layer -> slots holding its experts
        self._clock = 0
        self.policy = policy  # builds the index

    @property
    def policy(self) -> EvictionPolicy:
        return self._policy

    @policy.setter
    def policy(self, policy: EvictionPolicy) -> None:
        self._policy = policy
        self._reindex()

    @property
    def num_slots(self) -> int:
        return len(self.meta)

    def slot_of(self, eid: ExpertId) -> int | None:
        return self._slot_of.get(eid)

    def resident(self) -> dict[ExpertId, int]:
        return dict(self._slot_of)

    def slots_of_layer(self, layer: int) -> set[int]:
        """The slots holding (or loading) experts of `layer`."""
        return self._layer_slots.get(layer, set())

    def lookup(self, eid: ExpertId) -> int | None:
        """The READY slot holding `eid`, counted as a hit or a miss."""
        slot = self._slot_of.get(eid)
        if slot is not None and self.meta[slot].state == SlotState.READY:
            self.stats.hits += 1
            return slot
        self.stats.misses += 1
        return None

    def touch(self, slot: int) -> None:
        self._clock += 1
        meta = self.meta[slot]
        meta.last_use = self._clock
        meta.use_count += 1
        self.stats.prefetch_used += meta.speculative
        meta.speculative = False
        for changed in self.policy.on_touch(slot, self.meta) or ():
            self._push(changed)
        self._push(slot)

    def pin(self, slot: int) -> None:
        self.meta[slot].pin_count += 1

    def unpin(self, slot: int) -> None:
        meta = self.meta[slot]
        if meta.pin_count <= 0:
            raise RuntimeError(f"unpin of unpinned slot {slot}")
        meta.pin_count -= 1

    def allocate(self, eid: ExpertId, speculative: bool = False, protected: frozenset[ExpertId] = frozenset(),
                 due: int | None = None) -> tuple[int, ExpertId | None]:
        """Claim a slot for `eid` (state LOADING, pinned once); returns (slot, evicted expert or None).

        A speculative allocation never evicts a `protected` expert (needed soon) nor what the policy
        reserves; it raises NoEvictableSlot rather than force anything out. A critical one evicts a
        protected expert only when no other slot may go.
        """
        if eid in self._slot_of:
            raise RuntimeError(f"{eid} already has slot {self._slot_of[eid]}")
        slot = self._victim(speculative, protected, due)
        meta = self.meta[slot]
        evicted = meta.expert
        if evicted is not None:
            del self._slot_of[evicted]
            self._layer_slots[evicted.layer].discard(slot)
            self.stats.evictions += 1
            self.stats.wasted += meta.speculative
        self._clock += 1
        self.meta[slot] = SlotMeta(expert=eid, state=SlotState.LOADING, pin_count=1, last_use=self._clock,
                                   speculative=speculative)
        self.policy.on_insert(self.meta[slot])
        self._slot_of[eid] = slot
        self._layer_slots.setdefault(eid.layer, set()).add(slot)
        self.stats.loads += 1
        return slot, evicted

    def mark_ready(self, slot: int) -> None:
        meta = self.meta[slot]
        if meta.state != SlotState.LOADING:
            raise RuntimeError(f"slot {slot} is {meta.state.name}, not LOADING")
        meta.state = SlotState.READY
        self._push(slot)

    def abort(self, slot: int) -> None:
        """A load failed: the slot goes back to EMPTY so nothing waits on it forever."""
        meta = self.meta[slot]
        if meta.expert is not None:
            self._slot_of.pop(meta.expert, None)
            self._layer_slots[meta.expert.layer].discard(slot)
        self.stats.wasted += meta.speculative
        self.meta[slot] = SlotMeta()
        heapq.heappush(self._empty, slot)

    def clear(self) -> None:
        if any(m.pin_count or m.state == SlotState.LOADING for m in self.meta):
            raise RuntimeError("cannot clear a cache with pinned or loading slots")
        self.meta = [SlotMeta() for _ in self.meta]
        self.policy.clear()
        self._slot_of.clear()
        self._layer_slots.clear()
        self._reindex()

    def _victim(self, speculative: bool, protected: frozenset[ExpertId], due: int | None = None) -> int:
        if self._heap is not None:
            return self._victim_indexed(speculative, protected, due)
        best, best_priority = None, None
        for slot, meta in enumerate(self.meta):
            if meta.state == SlotState.EMPTY:
                return slot
            if meta.pin_count > 0 or meta.state != SlotState.READY:
                continue
            if speculative and (meta.expert in protected or not self.policy.may_evict(meta, speculative, due)):
                continue
            # a critical load may evict a protected (predicted) expert, but only when nothing else may go
            shielded = meta.expert in protected
            priority = (shielded, self.policy.priority(meta, self._clock))
            if best_priority is None or priority < best_priority:
                best, best_priority = slot, priority
                if not shielded and self.policy.is_ideal(priority[1]):
                    break
        if best is None:
            raise NoEvictableSlot(f"all {self.num_slots} slots are pinned or loading")
        return best

    # -- the index of indexed policies: a min-heap of (priority, slot) pushed on every touch and
    # mark_ready; an entry is valid while its slot is READY at that priority (stale ones are dropped)
    def _reindex(self) -> None:
        self._empty = [i for i, m in enumerate(self.meta) if m.state == SlotState.EMPTY]  # a sorted list is a heap
        self._heap = [] if getattr(self._policy, "indexed", False) else None
        if self._heap is not None:
            for slot, meta in enumerate(self.meta):
                if meta.state == SlotState.READY:
                    self._push(slot)

    def _push(self, slot: int) -> None:
        if self._heap is None:
            return
        heapq.heappush(self._heap, (self.policy.priority(self.meta[slot], self._clock), slot))
        if len(self._heap) > 4 * len(self.meta) + 64:
            self._heap = [(p, s) for p, s in self._heap if self._valid(p, s)]
            heapq.heapify(self._heap)

    def _valid(self, priority: tuple, slot: int) -> bool:
        meta = self.meta[slot]
        return meta.state == SlotState.READY and self.policy.priority(meta, self._clock) == priority

    def _victim_indexed(self, speculative: bool, protected: frozenset[ExpertId], due: int | None) -> int:
        while self._empty:
            slot = heapq.heappop(self._empty)
            if self.meta[slot].state == SlotState.EMPTY:
                return slot
        skipped, seen, found, shielded = [], set(), None, None
        while self._heap:
            priority, slot = entry = heapq.heappop(self._heap)
            if not self._valid(priority, slot) or slot in seen:
                continue
            seen.add(slot)
            skipped.append(entry)
            meta = self.meta[slot]
            if meta.pin_count > 0:
                continue
            if speculative and (meta.expert in protected or not self.policy.may_evict(meta, speculative, due)):
                if self.policy.no_later_evictable(priority, speculative, due):
                    break
                continue
            if not speculative and meta.expert in protected:  # only if nothing else may go (as in the scan)
                shielded = slot if shielded is None else shielded
                continue
            found = slot
            break
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        found = shielded if found is None else found
        if found is None:
            raise NoEvictableSlot(f"all {self.num_slots} slots are pinned or loading")
        return found
