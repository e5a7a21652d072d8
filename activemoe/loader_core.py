"""loader_core.py holds the loader's decisions over the cache and the scheduler: which routed experts
are hits, what is queued, which task gets the next chunk, what a finished load hands over. It knows
nothing about threads, locks, tensors or clocks: the threaded Loader calls it under its lock and the
simulator calls it on a virtual clock, so both make the same decisions (one code path).
"""
from __future__ import annotations

from activemoe.cache import ExpertCache, NoEvictableSlot
from activemoe.cache_meta import SlotState
from activemoe.errors import ExpertLoadError
from activemoe.ids import ExpertId
from activemoe.scheduler import LoadTask, PrefetchScheduler


def first_layer_reserve(num_slots: int, lookahead: int, budget: int, num_layers: int) -> int:
    """Slots worth keeping for the experts of a token's first MoE layer, which a predictor that looks
    ahead within a token never names (the cache is their only defence): all but what the prefetch
    pipeline needs in flight, `budget` experts for each of the current and `lookahead` next layers, and
    never more than the layer's even share of the slots. Uncapped, the first layer could hoard all but
    (lookahead + 1) x budget slots and the other layers thrashed: simulated on the bundled model's bench
    workloads (learned heads, lookahead 3, 0.25 GB/s), learned + LFRU fell to 0.85x reactive LRU after a
    16-token prompt at a 25% cache (1.06x capped), and to 1.27x from 1.47x after a 512-token one at 50%."""
    return max(0, min(num_slots - (lookahead + 1) * budget, num_slots // max(1, num_layers)))


class LoaderCore:
    def __init__(self, cache: ExpertCache, scheduler: PrefetchScheduler, num_chunks: int):
        self.cache, self.scheduler = cache, scheduler
        self.num_chunks = num_chunks  # chunks per expert copy
        self.reserved_layer: int | None = None  # a MoE layer no prediction reaches (see first_layer_reserve)
        self.reserve = 0  # its `reserve` most recently used resident experts are evicted only if nothing else may go
        self.handed: set[ExpertId] = set()  # critical loads done, their pin held for the consumer
        self.failed: dict[ExpertId, BaseException] = {}
        self.dropped: list[ExpertId] = []  # cancelled in-flight loads since take_dropped()
        self.landed: dict[ExpertId, int] = {}  # loads completed since this layer began, in order

    # -- compute side ---------------------------------------------------------------------------
    def begin_layer(self, event: int, routed: list[ExpertId], predicted: list[tuple[ExpertId, int, float]]
                    ) -> tuple[list[tuple[ExpertId, int]], list[ExpertId]]:
        """Pin the routed experts that are READY; queue the others as critical; queue predictions."""
        ready, waiting = [], []
        self.landed.clear()  # what is pending from now on lands after this point
        self.scheduler.routed(event, set(routed))
        for eid in routed:
            slot = self.cache.lookup(eid)
            if slot is not None:
                self.cache.pin(slot)
                self.cache.touch(slot)  # used now: touched before any eviction this layer's misses cause
                ready.append((eid, slot))
            else:
                self.failed.pop(eid, None)
                self.scheduler.require(eid, event)
                waiting.append(eid)
        self.ahead(predicted)
        self.start_critical()
        return ready, waiting

    def ahead(self, predicted: list[tuple[ExpertId, int, float]]) -> None:
        """Queue predictions (expert, due event, probability); a resident one is protected until due."""
        for eid, due, prob in predicted:
            if self.cache.slot_of(eid) is not None and eid not in self.scheduler.tasks:
                self.scheduler.protect(eid, due)
            else:
                self.scheduler.speculate(eid, due, prob)

    @property
    def served(self) -> int:
        """Misses plus prefetched experts used, so far: while it stands still, prediction saves nothing
        (the count rest.Rest watches)."""
        return self.scheduler.stats.critical + self.cache.stats.prefetch_used

    def reserve_for(self, layer: int | None, slots: int) -> None:
        """Keep up to `slots` of `layer`'s experts from eviction by other loads (0 or None: off)."""
        self.reserved_layer, self.reserve = layer, slots if layer is not None else 0

    def _protected(self, eid: ExpertId) -> frozenset[ExpertId]:
        """What a load of `eid` should not evict: predicted and loading experts, and the reserved
        layer's most recently used ones (unless the load is for that layer)."""
        protected = self.scheduler.protected_set()
        if self.reserve and eid.layer != self.reserved_layer:
            meta = self.cache.meta
            held = sorted(self.cache.slots_of_layer(self.reserved_layer), key=lambda s: meta[s].last_use)
            protected |= frozenset(meta[s].expert for s in held[-self.reserve:])
        return protected - {eid}

    def start_critical(self) -> None:
        """Give slots to queued critical loads now, best first, while a slot may be evicted. The compute
        path calls this (under the loader's lock) when it queues misses and when it releases a slot, so
        a critical load's victim is chosen at those fixed points, never at a thread's whim."""
        for task in self.scheduler.queued_critical():
            try:
                slot, _ = self.cache.allocate(task.eid, protected=self._protected(task.eid), due=task.due)
            except NoEvictableSlot:
                return
            self.scheduler.start(task, slot)

    def release(self, slot: int) -> None:
        """The compute path is done with `slot`: it may now make room for a waiting critical load."""
        self.cache.unpin(slot)
        self.start_critical()

    def take_ready(self, pending: set[ExpertId]) -> tuple[tuple[ExpertId, int] | None, bool]:
        """The pending expert that became READY first, pinned for the caller (or None), so a caller that
        comes late takes them in landing order, as a punctual one would; and whether an expert evicted
        before it was picked up was queued again (the worker must be woken)."""
        requeued, best = False, None
        for eid in pending:
            if eid in self.failed:
                raise self.failed.pop(eid)
            slot = self.cache.slot_of(eid)
            if slot is not None and self.cache.meta[slot].state == SlotState.READY:
                order = self.landed.get(eid, -1)
                if best is None or order < best[2]:
                    best = (eid, slot, order)
            elif slot is None and eid not in self.scheduler.tasks:
                self.scheduler.require(eid, 0)  # evicted before we picked it up: load again
                self.start_critical()
                requeued = True
        if best is None:
            return None, requeued
        eid, slot, _ = best
        if eid in self.handed:
            self.handed.discard(eid)  # the load's pin becomes the caller's
        else:
            self.cache.pin(slot)
        self.cache.touch(slot)
        return (eid, slot), requeued

    def remaining_bytes(self, eid: ExpertId, chunk_bytes: list[int], expert_bytes: int) -> int:
        """Bytes to copy before `eid` could be READY: its own remaining chunks plus critical work ahead."""
        task = self.scheduler.tasks.get(eid)
        if task is None:
            return 0
        ahead = sum(1 for t in self.scheduler.tasks.values() if t.critical and t.key() > task.key())
        return sum(chunk_bytes[task.chunks_done:]) + ahead * expert_bytes

    def abandon(self, eids) -> None:
        """The caller no longer waits for these (error, or computed on the host)."""
        for eid in eids:
            self.failed.pop(eid, None)
            if eid in self.handed:
                self.handed.discard(eid)
                self.cache.unpin(self.cache.slot_of(eid))
            task = self.scheduler.tasks.get(eid)
            if task is not None:
                if task.slot is None:
                    self.scheduler.drop(task)
                else:  # in flight (its slot is given when queued): stop it before its next chunk
                    task.abandoned = task.cancelled = True

    # -- worker side ----------------------------------------------------------------------------
    def next_chunk(self) -> tuple[LoadTask, int] | None:
        """The next chunk to hand to the link, as (task, chunk index); starts the task (allocates its
        slot) if needed. The copy queue holds a few chunks (the next one is issued before the current
        one lands), so a task may have chunks in flight: it gets no more once cancelled, and its slot
        is freed only when none is in flight."""
        for task in self.scheduler.candidates():
            if task.cancelled:
                if task.chunks_issued == task.chunks_done:  # stale between chunks: free its slot
                    self.cache.abort(task.slot)
                    self.scheduler.finish(task)
                    self.dropped.append(task.eid)
                continue
            if task.chunks_issued == self.num_chunks:  # all on the link, landing
                continue
            if task.slot is None:
                try:
                    slot, _ = self.cache.allocate(task.eid, speculative=not task.critical,
                                                  protected=self._protected(task.eid), due=task.due)
                except NoEvictableSlot:
                    # Never force a load in: it waits (queued, cancellable) until a slot may be evicted;
                    # a speculative one is dropped once its layer has routed. Work in flight may progress.
                    continue
                self.scheduler.start(task, slot)
            task.chunks_issued += 1
            return task, task.chunks_issued - 1
        return None

    def land(self, task: LoadTask) -> bool:
        """A chunk of `task` has landed; True when that completed the expert. A chunk of a task that
        failed meanwhile is ignored."""
        if self.scheduler.tasks.get(task.eid) is not task:
            return False
        task.chunks_done += 1
        if task.chunks_done < self.num_chunks:
            return False
        self.complete(task)
        return True

    def fill(self, eids: list[ExpertId], copy) -> None:
        """Give `eids` slots in order and mark them READY, `copy(eid, slot)` moving each one's bytes
        first: the start of a run where every expert has a slot (nothing else is loading)."""
        for eid in eids:
            slot, _ = self.cache.allocate(eid)
            copy(eid, slot)
            self.cache.mark_ready(slot)
            self.cache.unpin(slot)

    def take_dropped(self) -> list[ExpertId]:
        dropped, self.dropped = self.dropped, []
        return dropped

    def complete(self, task: LoadTask) -> None:
        self.cache.mark_ready(task.slot)
        self.landed[task.eid] = len(self.landed)
        if task.critical and not task.abandoned:
            self.handed.add(task.eid)
        else:
            self.cache.unpin(task.slot)
        if not task.critical and not task.cancelled:
            # A prefetch that landed stays protected until the layer it was predicted for routes, as a resident
            # prediction is: unused yet, it is the first victim of a frequency-ranked policy, and was often evicted by
            # the next load before its layer came, which then waited for it again.
            self.scheduler.protect(task.eid, task.due)
        self.scheduler.finish(task)

    def fail(self, task: LoadTask, error: BaseException) -> None:
        self.cache.abort(task.slot)
        self.scheduler.finish(task)
        if task.critical and not task.abandoned:
            if not isinstance(error, ExpertLoadError):
                error = ExpertLoadError(f"cannot load layer {task.eid.layer} expert {task.eid.expert}: {error}")
            self.failed[task.eid] = error
