"""Scheduler ordering, scripted and as properties (hypothesis)."""
from hypothesis import given, settings
from hypothesis import strategies as st

from activemoe.ids import ExpertId
from activemoe.scheduler import PrefetchScheduler


def E(n, layer=0):
    return ExpertId(layer, n)


def test_critical_before_speculative_then_urgency_then_probability():
    s = PrefetchScheduler(issue_window=8)
    s.speculate(E(1), due=5, prob=0.9)
    s.speculate(E(2), due=3, prob=0.2)
    s.speculate(E(3), due=3, prob=0.7)
    s.require(E(4), due=9)
    order = []
    while (c := s.candidates()) and c[0].slot is None:
        order.append(c[0].eid)
        s.start(c[0], len(order))
        s.finish(c[0])
    assert order == [E(4), E(3), E(2), E(1)]


def test_promotion_merge_and_drop():
    s = PrefetchScheduler()
    a = s.speculate(E(1), due=4, prob=0.5)
    assert s.speculate(E(1), due=2, prob=0.4) is a and a.due == 2 and s.stats.merged == 1
    s.speculate(E(2), due=2, prob=0.5)
    s.speculate(E(3), due=7, prob=0.5)
    assert s.require(E(1), due=2) is a and a.critical and s.stats.promoted == 1
    dropped = s.routed(2, needed={E(1)})  # layer event 2 routed without E(2): drop it, keep E(3)
    assert [t.eid for t in dropped] == [E(2)] and set(s.tasks) == {E(1), E(3)}


def test_issue_window_holds_back_speculative_work_but_not_critical():
    s = PrefetchScheduler(issue_window=1)
    first = s.speculate(E(1), 1, 1.0)
    s.start(first, 0)
    s.speculate(E(2), 1, 1.0)
    assert [t.eid for t in s.candidates()] == [E(1)]  # E(2) waits, still cancellable
    s.require(E(3), 1)
    assert s.candidates()[0].eid == E(3)


ops = st.lists(st.tuples(st.sampled_from(["spec", "crit", "start", "finish", "routed"]), st.integers(0, 7),
                         st.integers(0, 6), st.floats(0, 1)), max_size=80)


@settings(max_examples=200, deadline=None)
@given(ops=ops, window=st.integers(1, 3))
def test_critical_never_starved_and_queue_drains(ops, window):
    s = PrefetchScheduler(issue_window=window)
    slot = 0
    for op, n, due, prob in ops:
        eid = E(n)
        if op == "spec":
            s.speculate(eid, due, prob)
        elif op == "crit":
            s.require(eid, due)
        elif op == "start" and s.candidates() and s.candidates()[0].slot is None:
            slot += 1
            s.start(s.candidates()[0], slot)
        elif op == "finish" and s.in_flight():
            s.finish(s.in_flight()[0])
        elif op == "routed":
            s.routed(due, needed=set())
        cands = s.candidates()
        queued_critical = [t for t in s.tasks.values() if t.critical and t.slot is None]
        if queued_critical:  # the best candidate is critical: never starved behind speculative work
            assert cands and cands[0].critical
        assert sum(not t.critical for t in s.in_flight()) <= window + 0  # started speculative within the window
        assert len({id(t) for t in cands}) == len(cands)
    # drain: repeatedly run the best candidate to completion
    for _ in range(100):
        cands = s.candidates()
        if not cands:
            break
        if cands[0].slot is None:
            s.start(cands[0], 99)
        s.finish(cands[0])
    assert not s.tasks
