"""loader.py runs the expert loads: one worker thread that executes the scheduler's tasks chunk by
chunk with the store (reads) and the slab (copies), and the compute-side calls that wait on them.

One condition variable guards the cache and the scheduler; reads and copies run outside it.
The loader knows nothing about models, predictors or routing weights.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from activemoe.cache import ExpertCache, NoEvictableSlot
from activemoe.cache_meta import SlotState
from activemoe.errors import ExpertLoadError
from activemoe.ids import ExpertId
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
        self._handed: set[ExpertId] = set()  # critical loads done, their pin held for the consumer
        self._failed: dict[ExpertId, BaseException] = {}
        self._sources: dict[ExpertId, dict[str, torch.Tensor]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="activemoe-loader", daemon=True)
        self._thread.start()

    # -- compute side ---------------------------------------------------------------------------
    def begin_layer(self, event: int, routed: list[ExpertId], predicted: list[tuple[ExpertId, int, float]]
                    ) -> tuple[list[tuple[ExpertId, int]], list[ExpertId]]:
        """Pin the routed experts that are READY; queue the others as critical; queue predictions."""
        ready, waiting = [], []
        with self.cond:
            self.scheduler.routed(event, set(routed))
            for eid in routed:
                slot = self.cache.lookup(eid)
                if slot is not None:
                    self.cache.pin(slot)
                    ready.append((eid, slot))
                else:
                    self._failed.pop(eid, None)
                    self.scheduler.require(eid, event)
                    waiting.append(eid)
            for eid, due, prob in predicted:
                if self.cache.slot_of(eid) is not None and eid not in self.scheduler.tasks:
                    self.scheduler.protect(eid, due)
                else:
                    self.scheduler.speculate(eid, due, prob)
            self.cond.notify_all()
        return ready, waiting

    def wait_any(self, pending: set[ExpertId]) -> tuple[ExpertId, int]:
        """Block until one pending expert is READY; returns it pinned for the caller."""
        start = time.perf_counter()
        with self.cond:
            while True:
                for eid in pending:
                    if eid in self._failed:
                        raise self._failed.pop(eid)
                    slot = self.cache.slot_of(eid)
                    if slot is not None and self.cache.meta[slot].state == SlotState.READY:
                        if eid in self._handed:
                            self._handed.discard(eid)  # the load's pin becomes the caller's
                        else:
                            self.cache.pin(slot)
                        self.stats.stall_s += time.perf_counter() - start
                        return eid, slot
                    if slot is None and eid not in self.scheduler.tasks:
                        self.scheduler.require(eid, 0)  # evicted before we picked it up: load again
                        self.cond.notify_all()
                if self._stop:
                    raise RuntimeError("the loader was closed")
                self.cond.wait()

    def remaining_s(self, eid: ExpertId) -> float:
        """Link time until `eid` could be READY: its own remaining chunks plus critical work ahead."""
        with self.cond:
            task = self.scheduler.tasks.get(eid)
            if task is None:
                return 0.0
            chunks = self.slab.chunks[task.chunks_done:]
            ahead = sum(1 for t in self.scheduler.tasks.values() if t.critical and t.key() > task.key())
            return self.slab.link.transfer_s(sum(c.nbytes for c in chunks) + ahead * self.slab.expert_bytes)

    def touch(self, slot: int) -> None:
        with self.cond:
            self.cache.touch(slot)

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
            self.cache.unpin(slot)
            self.cond.notify_all()

    def abandon(self, eids) -> None:
        """The caller no longer waits for these (error, or computed on the host)."""
        with self.cond:
            for eid in eids:
                self._failed.pop(eid, None)
                if eid in self._handed:
                    self._handed.discard(eid)
                    self.cache.unpin(self.cache.slot_of(eid))
                task = self.scheduler.tasks.get(eid)
                if task is not None:
                    if task.slot is None:
                        self.scheduler.drop(task)
                    else:
                        task.abandoned = True
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
        """The task to give the next chunk to; starts it (allocates its slot) if needed."""
        for task in self.scheduler.candidates():
            if task.slot is not None:
                return task
            try:
                slot, _ = self.cache.allocate(task.eid, speculative=not task.critical,
                                              protected=self.scheduler.protected_set() - {task.eid}, due=task.due)
            except NoEvictableSlot:
                # Never force a load in: it waits (queued, cancellable) until a slot may be evicted;
                # a speculative one is dropped once its layer has routed. Work in flight may progress.
                continue
            self.scheduler.start(task, slot)
            return task
        return None

    def _complete(self, task: LoadTask) -> None:
        self.cache.mark_ready(task.slot)
        self._sources.pop(task.eid, None)
        if task.critical and not task.abandoned:
            self._handed.add(task.eid)
        else:
            self.cache.unpin(task.slot)
        self.scheduler.finish(task)

    def _fail(self, task: LoadTask, error: BaseException) -> None:
        with self.cond:
            log.warning("load of %s failed: %s", task.eid, error)
            self.cache.abort(task.slot)
            self._sources.pop(task.eid, None)
            self.scheduler.finish(task)
            if task.critical and not task.abandoned:
                if not isinstance(error, ExpertLoadError):
                    error = ExpertLoadError(f"cannot load layer {task.eid.layer} expert {task.eid.expert}: {error}")
                self._failed[task.eid] = error
            self.cond.notify_all()
