"""scheduler.py orders expert loads; it knows nothing about how a copy is done, nor about threads.

A max-heap of load tasks keyed by (critical first, then urgency = the MoE-layer event at which the
expert is due, then predicted probability). Speculative tasks past the issue window stay queued,
cancellable and re-orderable; a speculative task that becomes critical is promoted; queued
speculative tasks for a layer that has routed without them are dropped; duplicates are merged.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field, fields

from activemoe.ids import ExpertId


@dataclass(eq=False)
class LoadTask:
    eid: ExpertId
    critical: bool
    due: int  # MoE-layer event at which the expert is needed
    prob: float  # predicted probability (1.0 for critical loads)
    seq: int  # arrival order, the last tie-breaker
    slot: int | None = None  # set when the task starts (in flight)
    chunks_issued: int = 0  # chunks handed to the link (copy queue)
    chunks_done: int = 0  # chunks landed in the slot
    abandoned: bool = False  # its consumer went away (error or host compute): release on completion
    cancelled: bool = False  # in flight but no longer wanted (stale speculative, abandoned critical): no more chunks
    version: int = 0  # bumped on re-prioritisation; stale heap entries are skipped

    def key(self) -> tuple:
        """Larger is more important (heapq is a min-heap, so entries store the negation)."""
        return (self.critical, -self.due, self.prob, -self.seq)


@dataclass
class SchedulerStats:
    critical: int = 0  # critical tasks created (misses on the compute path)
    speculative: int = 0  # speculative tasks created
    promoted: int = 0  # speculative tasks that became critical
    merged: int = 0  # duplicate requests folded into an existing task
    dropped: int = 0  # queued speculative tasks cancelled
    cancelled: int = 0  # in-flight speculative tasks stopped between chunks

    def get_and_reset(self) -> SchedulerStats:
        snapshot = SchedulerStats(**{f.name: getattr(self, f.name) for f in fields(self)})
        for f in fields(self):
            setattr(self, f.name, 0)
        return snapshot


@dataclass
class PrefetchScheduler:
    issue_window: int = 1  # speculative tasks in flight at once (config.PrefetchConfig.issue_window)
    tasks: dict[ExpertId, LoadTask] = field(default_factory=dict)  # queued and in flight
    protected: dict[ExpertId, int] = field(default_factory=dict)  # resident experts predicted for event `due`
    stats: SchedulerStats = field(default_factory=SchedulerStats)

    def __post_init__(self):
        self._heap: list[tuple[tuple, int, LoadTask]] = []
        self._seq = itertools.count()

    # -- requests -------------------------------------------------------------------------------
    def require(self, eid: ExpertId, due: int) -> LoadTask:
        """The compute path needs `eid` now: a critical task, new or promoted."""
        task = self.tasks.get(eid)
        if task is None:
            self.stats.critical += 1
            return self._add(LoadTask(eid, True, due, 1.0, next(self._seq)))
        if task.critical and task.cancelled:  # abandoned by an earlier consumer, wanted again
            task.cancelled = task.abandoned = False
        elif not task.critical:
            self.stats.promoted += 1
            task.critical, task.due, task.prob, task.cancelled = True, min(task.due, due), 1.0, False
            self._reprioritise(task)
        return task

    def speculate(self, eid: ExpertId, due: int, prob: float) -> LoadTask:
        task = self.tasks.get(eid)
        if task is None:
            self.stats.speculative += 1
            return self._add(LoadTask(eid, False, due, prob, next(self._seq)))
        self.stats.merged += 1
        if task.cancelled:  # wanted again before it stopped
            task.cancelled, task.due, task.prob = False, due, prob
        elif not task.critical and (due < task.due or (due == task.due and prob > task.prob)):
            task.due, task.prob = min(due, task.due), max(prob, task.prob)
            self._reprioritise(task)
        return task

    def protect(self, eid: ExpertId, due: int) -> None:
        self.protected[eid] = max(due, self.protected.get(eid, due))

    def routed(self, event: int, needed: set[ExpertId]) -> list[LoadTask]:
        """Layer event `event` has routed: drop queued speculative tasks due by then that it did not need,
        and mark such tasks in flight cancelled (the loader stops them between chunks)."""
        stale = [t for t in self.tasks.values() if not t.critical and t.due <= event and t.eid not in needed]
        for task in stale:
            if task.slot is None:
                self.drop(task)
            elif not task.cancelled:
                task.cancelled = True
                self.stats.cancelled += 1
        self.protected = {e: due for e, due in self.protected.items() if due > event}
        return stale

    # -- execution ------------------------------------------------------------------------------
    def queued_critical(self) -> list[LoadTask]:
        """Critical tasks without a slot yet, best first."""
        return sorted((t for t in self.tasks.values() if t.critical and t.slot is None), key=LoadTask.key, reverse=True)

    def in_flight(self) -> list[LoadTask]:
        return [t for t in self.tasks.values() if t.slot is not None]

    def candidates(self) -> list[LoadTask]:
        """Tasks worth a copy chunk now, best first: the top queued task if the window admits it,
        and the tasks in flight."""
        flying = self.in_flight()
        out = sorted(flying, key=LoadTask.key, reverse=True)
        top = self._peek()
        if top is not None:
            window_open = sum(not t.critical for t in flying) < self.issue_window
            if top.critical or window_open:
                out.insert(0, top) if not out or top.key() > out[0].key() else out.append(top)
        return out

    def start(self, task: LoadTask, slot: int) -> None:
        task.slot = slot
        task.version += 1  # its heap entry is now stale: in-flight tasks live outside the heap

    def finish(self, task: LoadTask) -> None:
        self.tasks.pop(task.eid, None)
        task.version += 1

    def drop(self, task: LoadTask) -> None:
        self.stats.dropped += not task.critical
        self.finish(task)

    def protected_set(self) -> frozenset[ExpertId]:
        return frozenset(self.protected) | frozenset(self.tasks)

    # -- heap -----------------------------------------------------------------------------------
    def _add(self, task: LoadTask) -> LoadTask:
        self.tasks[task.eid] = task
        self._push(task)
        return task

    def _reprioritise(self, task: LoadTask) -> None:
        if task.slot is None:
            task.version += 1
            self._push(task)

    def _push(self, task: LoadTask) -> None:
        heapq.heappush(self._heap, (tuple(-x for x in task.key()), task.version, task))

    def _peek(self) -> LoadTask | None:
        while self._heap:
            _, version, task = self._heap[0]
            if version == task.version and task.slot is None and self.tasks.get(task.eid) is task:
                return task
            heapq.heappop(self._heap)
        return None
