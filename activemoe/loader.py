"""loader.py runs the expert loads: one worker thread that executes the scheduler's tasks chunk by
chunk with the store (reads) and the slab (copies), and the compute-side calls that wait on them.
The worker keeps up to QUEUE_DEPTH chunks on the link: it issues the next chunk before the current
one lands, as work is fed to a copy engine, so its own hand-over costs no link time.

One condition variable guards the cache and the scheduler; reads and copies run outside it. The
decisions themselves live in loader_core.LoaderCore (shared with the simulator). The loader knows
nothing about models, predictors or routing weights.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from activemoe.cache import ExpertCache
from activemoe.ids import ExpertId
from activemoe.loader_core import LoaderCore
from activemoe.scheduler import LoadTask, PrefetchScheduler
from activemoe.slots import NEVER, SlotSlab, Ticket
from activemoe.store import ExpertStore

log = logging.getLogger(__name__)

QUEUE_DEPTH = 2  # chunks issued to the link at once (one landing, the next queued behind it)


@dataclass
class LoaderStats:
    busy_s: float = 0.0  # wall time chunks were on the link (from issue, or the previous landing, to landing)
    stall_s: float = 0.0  # wall time the compute path waited for loads
    bytes_moved: int = 0  # bytes of chunks copied into slots

    def get_and_reset(self) -> "LoaderStats":
        snapshot = LoaderStats(self.busy_s, self.stall_s, self.bytes_moved)
        self.busy_s = self.stall_s = 0.0
        self.bytes_moved = 0
        return snapshot


class Loader:
    def __init__(self, store: ExpertStore, slab: SlotSlab, cache: ExpertCache, scheduler: PrefetchScheduler):
        self.store, self.slab, self.cache, self.scheduler = store, slab, cache, scheduler
        self.cond = threading.Condition()
        self.stats = LoaderStats()
        self.core = LoaderCore(cache, scheduler, len(slab.chunks))
        self._sources: dict[ExpertId, dict[str, torch.Tensor]] = {}
        self._stop = False
        self._crash: BaseException | None = None  # what stopped the worker, if not close()
        self._wake = threading.Event()  # set with every notify from the compute side: new work for the worker
        self._thread = threading.Thread(target=self._run, name="activemoe-loader", daemon=True)
        self._thread.start()

    # -- compute side ---------------------------------------------------------------------------
    def begin_layer(self, event: int, routed: list[ExpertId], predicted: list[tuple[ExpertId, int, float]]
                    ) -> tuple[list[tuple[ExpertId, int]], list[ExpertId]]:
        """Pin the routed experts that are READY; queue the others as critical; queue predictions."""
        with self.cond:
            ready, waiting = self.core.begin_layer(event, routed, predicted)
            if self.scheduler.tasks:  # waking the worker costs a thread switch: only when there is work
                self._notify()
        return ready, waiting

    def ahead(self, predicted: list[tuple[ExpertId, int, float]]) -> None:
        """Queue predictions made between layers (from the token embeddings)."""
        with self.cond:
            self.core.ahead(predicted)
            if self.scheduler.tasks:
                self._notify()

    def wait_any(self, pending: set[ExpertId], idle: Callable[[], bool] | None = None) -> tuple[ExpertId, int]:
        """Block until one pending expert is READY; returns it pinned for the caller. `idle`: side work done
        while nothing has landed, a piece per call, outside the lock; it returns whether more is left."""
        start = time.perf_counter()
        with self.cond:
            while True:
                got, requeued = self.core.take_ready(pending)
                if requeued:
                    self._notify()
                if got is not None:
                    self.stats.stall_s += time.perf_counter() - start
                    return got
                if self._stop:
                    raise RuntimeError(f"the expert loader stopped: {self._crash!r}" if self._crash else
                                       "the loader was closed") from self._crash
                if idle is None:
                    self.cond.wait()
                    continue
                self.cond.release()
                try:
                    more = idle()
                finally:
                    self.cond.acquire()
                idle = idle if more else None

    def take_landed(self, pending: set[ExpertId]) -> list[tuple[ExpertId, int]]:
        """Every pending expert already READY, pinned for the caller, in landing order; never waits."""
        out: list[tuple[ExpertId, int]] = []
        with self.cond:
            rest = set(pending)
            try:
                while rest:
                    got, requeued = self.core.take_ready(rest)
                    if requeued:
                        self._notify()
                    if got is None:
                        break
                    out.append(got)
                    rest.discard(got[0])
            except BaseException:  # a failed load: the ones already pinned go back before it is raised
                for _, slot in out:
                    self.core.release(slot)
                raise
        return out

    def remaining_s(self, eid: ExpertId) -> float:
        """Link time until `eid` could be READY: its own remaining chunks plus critical work ahead."""
        with self.cond:
            nbytes = self.core.remaining_bytes(eid, [c.nbytes for c in self.slab.chunks], self.slab.expert_bytes)
            return self.slab.link.transfer_s(nbytes)

    def preload(self, eids: list[ExpertId]) -> None:
        """Load `eids` into slots now, in order, before any generation (when every expert has a slot)."""
        def copy(eid: ExpertId, slot: int) -> None:
            source = self.store.read(eid)
            for index in range(len(self.slab.chunks)):
                self.slab.copy_chunk(slot, source, index)

        with self.cond:  # nothing else runs yet: holding the lock through the copies costs nothing
            self.core.fill(eids, copy)

    def reset(self) -> None:
        """Empty every slot (between benchmark runs); only when nothing is loading or pinned."""
        with self.cond:
            while self.scheduler.tasks:
                self.cond.wait()
            self.cache.clear()
            self.scheduler.protected.clear()

    def release(self, slot: int) -> None:
        self.slab.release(slot)
        with self.cond:
            self.core.release(slot)
            if self.scheduler.tasks:  # a queued load may have been waiting for an evictable slot
                self._notify()

    def abandon(self, eids) -> None:
        """The caller no longer waits for these (error, or computed on the host)."""
        with self.cond:
            self.core.abandon(eids)
            self._notify()

    def close(self) -> None:
        with self.cond:
            self._stop = True
            self._notify()
        self._thread.join(timeout=10)
        if self.slab.cuda:  # chunks the worker left on the copy stream still write into the slab
            self.slab.copy_stream.synchronize()
        self.store.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _notify(self) -> None:
        """Under the lock: wake the worker, idle (on the condition) or waiting for a chunk (on `_wake`)."""
        self.cond.notify_all()
        self._wake.set()

    # -- worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        """The worker; an error outside a single load (a device fault while polling copies) stops it and is
        raised to the compute path, which would otherwise wait forever."""
        try:
            self._work()
        except BaseException as e:  # noqa: BLE001 - re-raised on the compute path
            log.error("the expert loader stopped: %r", e)
            with self.cond:
                self._crash, self._stop = e, True
                self.cond.notify_all()

    def _work(self) -> None:
        flight: deque[tuple[LoadTask, Ticket]] = deque()  # chunks on the link, oldest first
        link_free = 0.0  # when the link finished its last chunk
        while True:
            with self.cond:
                while True:
                    if self._stop:
                        return
                    landed = False
                    while flight and self.slab.landed(flight[0][1]):
                        task, ticket = flight.popleft()
                        now = time.perf_counter()
                        self.stats.busy_s += now - max(link_free, ticket.issued)
                        link_free = now
                        if self.core.land(task):
                            self._sources.pop(task.eid, None)
                        landed = True
                    if landed:
                        self.cond.notify_all()
                    issue = self._next() if len(flight) < QUEUE_DEPTH else None
                    if issue is not None or flight:
                        break
                    self.cond.wait()
                self._wake.clear()
            if issue is None:  # nothing to add: until the oldest chunk lands, or (queue not full) new work comes
                self.slab.wait(flight[0][1], self._wake if len(flight) < QUEUE_DEPTH else NEVER)
                continue
            task, index = issue
            try:
                if index == 0:
                    self._sources[task.eid] = self.store.read(task.eid)
                ticket = self.slab.issue_chunk(task.slot, self._sources[task.eid], index)
                self.stats.bytes_moved += self.slab.chunks[index].nbytes
            except BaseException as e:  # noqa: BLE001 - reported to the waiting compute path
                flight = deque(f for f in flight if f[0] is not task)
                self._fail(task, e)
                continue
            flight.append((task, ticket))

    def _next(self) -> tuple[LoadTask, int] | None:
        picked = self.core.next_chunk()
        for eid in self.core.take_dropped():  # cancelled in flight: their sources are no longer needed
            self._sources.pop(eid, None)
        return picked

    def _fail(self, task: LoadTask, error: BaseException) -> None:
        with self.cond:
            log.warning("load of %s failed: %s", task.eid, error)
            self._sources.pop(task.eid, None)
            self.core.fail(task, error)
            self.cond.notify_all()
