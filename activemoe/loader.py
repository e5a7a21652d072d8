"""loader.py runs the expert loads: one worker thread that executes the scheduler's tasks chunk by
chunk with the store (reads) and the slab (copies), and the compute-side calls that wait on them.

One condition variable guards the cache and the scheduler; reads and copies run outside it. The
decisions themselves live in loader_core.LoaderCore (shared with the simulator). The loader knows
nothing about models, predictors or routing weights.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from activemoe.cache import ExpertCache
from activemoe.ids import ExpertId
from activemoe.loader_core import LoaderCore
from activemoe.scheduler import LoadTask, PrefetchScheduler
from activemoe.slots import SlotSlab
from activemoe.store import ExpertStore

log = logging.getLogger(__name__)


@dataclass
class LoaderStats:
    busy_s: float = 0.0  # wall time the worker spent copying (link time included)
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
        self.core = LoaderCore(cache, scheduler)
        self._sources: dict[ExpertId, dict[str, torch.Tensor]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="activemoe-loader", daemon=True)
        self._thread.start()

    # -- compute side ---------------------------------------------------------------------------
    def begin_layer(self, event: int, routed: list[ExpertId], predicted: list[tuple[ExpertId, int, float]]
                    ) -> tuple[list[tuple[ExpertId, int]], list[ExpertId]]:
        """Pin the routed experts that are READY; queue the others as critical; queue predictions."""
        with self.cond:
            ready, waiting = self.core.begin_layer(event, routed, predicted)
            if self.scheduler.tasks:  # waking the worker costs a thread switch: only when there is work
                self.cond.notify_all()
        return ready, waiting

    def wait_any(self, pending: set[ExpertId]) -> tuple[ExpertId, int]:
        """Block until one pending expert is READY; returns it pinned for the caller."""
        start = time.perf_counter()
        with self.cond:
            while True:
                got, requeued = self.core.take_ready(pending)
                if requeued:
                    self.cond.notify_all()
                if got is not None:
                    self.stats.stall_s += time.perf_counter() - start
                    return got
                if self._stop:
                    raise RuntimeError("the loader was closed")
                self.cond.wait()

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
                self.cond.notify_all()

    def abandon(self, eids) -> None:
        """The caller no longer waits for these (error, or computed on the host)."""
        with self.cond:
            self.core.abandon(eids)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        self._thread.join(timeout=10)
        self.store.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                task = self._next()
                while task is None and not self._stop:
                    self.cond.wait()
                    task = self._next()
                if self._stop:
                    return
                fresh = task.chunks_done == 0
            try:
                if fresh:
                    self._sources[task.eid] = self.store.read(task.eid)
                start = time.perf_counter()
                self.slab.copy_chunk(task.slot, self._sources[task.eid], task.chunks_done)
                self.stats.busy_s += time.perf_counter() - start
                self.stats.bytes_moved += self.slab.chunks[task.chunks_done].nbytes
            except BaseException as e:  # noqa: BLE001 - reported to the waiting compute path
                self._fail(task, e)
                continue
            with self.cond:
                task.chunks_done += 1
                if task.chunks_done == len(self.slab.chunks):
                    self._complete(task)
                self.cond.notify_all()

    def _next(self) -> LoadTask | None:
        task = self.core.next_task()
        for eid in self.core.take_dropped():  # cancelled in flight: their sources are no longer needed
            self._sources.pop(eid, None)
        return task

    def _complete(self, task: LoadTask) -> None:
        self._sources.pop(task.eid, None)
        self.core.complete(task)

    def _fail(self, task: LoadTask, error: BaseException) -> None:
        with self.cond:
            log.warning("load of %s failed: %s", task.eid, error)
            self._sources.pop(task.eid, None)
            self.core.fail(task, error)
            self.cond.notify_all()
