"""Cache bookkeeping over integer slot ids: scripted eviction orders and hypothesis invariants."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from activemoe.cache import ExpertCache, NoEvictableSlot
from activemoe.cache_meta import SlotState
from activemoe.ids import ExpertId
from activemoe.cache_meta import Segment
from activemoe.policies import LFRU, LFU, LRU, SLRU, Belady, make_policy
from activemoe.errors import UserError


def access(cache: ExpertCache, eid: ExpertId):
    """What the runtime does for one routed expert; returns the evicted expert (or None)."""
    slot = cache.lookup(eid)
    evicted = None
    if slot is None:
        slot, evicted = cache.allocate(eid)
        cache.mark_ready(slot)
    else:
        cache.pin(slot)
    cache.touch(slot)
    cache.unpin(slot)
    return evicted


def E(n):
    return ExpertId(0, n)


def test_lru_scripted_eviction_order():
    cache = ExpertCache(4, LRU())
    evicted = [access(cache, E(n)) for n in [0, 1, 2, 3, 0, 4, 5, 1, 0, 6]]
    # 4 evicts the LRU (1: 0 was re-used), 5 evicts 2, 1 evicts 3, 0 is resident, 6 evicts 4
    assert evicted == [None, None, None, None, None, E(1), E(2), E(3), None, E(4)]
    assert set(cache.resident()) == {E(0), E(5), E(1), E(6)}
    assert (cache.stats.hits, cache.stats.loads, cache.stats.evictions) == (2, 8, 4)


def test_lfu_scripted_eviction_order():
    cache = ExpertCache(3, LFU())
    evicted = [access(cache, E(n)) for n in [0, 0, 0, 1, 1, 2, 3, 4, 1]]
    # 3 evicts 2 (1 use), 4 evicts 3 (1 use, 2 more recent than nothing), 1 stays (2 uses)
    assert evicted == [None, None, None, None, None, None, E(2), E(3), None]


def test_pinned_and_loading_slots_are_never_evicted():
    cache = ExpertCache(2, LRU())
    s0, _ = cache.allocate(E(0))  # LOADING and pinned
    s1, _ = cache.allocate(E(1))
    cache.mark_ready(s1)  # READY but still pinned by allocate
    with pytest.raises(NoEvictableSlot):
        cache.allocate(E(2))
    cache.unpin(s1)
    slot, evicted = cache.allocate(E(2))
    assert (slot, evicted) == (s1, E(1))
    assert cache.meta[s0].state == SlotState.LOADING


def test_abort_frees_the_slot():
    cache = ExpertCache(2, LRU())
    slot, _ = cache.allocate(E(0))
    cache.abort(slot)
    assert cache.meta[slot].state == SlotState.EMPTY and cache.slot_of(E(0)) is None
    assert cache.lookup(E(0)) is None


def test_unknown_policy_is_a_user_error():
    with pytest.raises(UserError, match="known: lru"):
        make_policy("nope")


layers = st.lists(st.lists(st.integers(0, 11), min_size=1, max_size=3, unique=True), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(num_slots=st.integers(3, 8), steps=layers, policy=st.sampled_from([LRU, LFU]))
def test_invariants_under_random_layers(num_slots, steps, policy):
    """Each step is one layer routing up to 3 experts (top-k 3 <= num_slots): the runtime's protocol."""
    cache = ExpertCache(num_slots, policy())
    for layer, routed in enumerate(steps):
        eids = [ExpertId(layer % 4, e) for e in routed]
        pinned = {}
        for eid in eids:  # resident experts of this layer are pinned first
            slot = cache.lookup(eid)
            if slot is not None:
                cache.pin(slot)
                pinned[eid] = slot
        for eid in eids:
            if eid not in pinned:
                slot, evicted = cache.allocate(eid)
                assert evicted not in pinned, "evicted an expert the current layer needs"
                cache.mark_ready(slot)
                pinned[eid] = slot
        # every routed expert is resident at once, in distinct slots
        assert len(set(pinned.values())) == len(eids)
        assert all(cache.slot_of(eid) == slot for eid, slot in pinned.items())
        for slot in pinned.values():
            cache.touch(slot)
            cache.unpin(slot)
        # the two maps agree and no slot is double-assigned
        owners = [m.expert for m in cache.meta if m.expert is not None]
        assert len(owners) == len(set(owners)) == len(cache.resident())
        assert all(cache.meta[s].expert == e for e, s in cache.resident().items())
        assert all(m.pin_count == 0 for m in cache.meta)


def test_belady_scripted_eviction_order():
    seq = [0, 1, 2, 0, 3, 0, 1, 2]
    state = {"now": 0}

    def future(eid, after):
        later = [i for i in range(after + 1, len(seq)) if seq[i] == eid.expert]
        return later[0] if later else float("inf")

    cache = ExpertCache(3, Belady(future, lambda: state["now"]))
    evicted = []
    for i, n in enumerate(seq):
        state["now"] = i
        evicted.append(access(cache, E(n)))
    # at 3 (event 4): residents 0,1,2 next used at 5,6,7 -> evict 2; at 2 (event 7): evict 0 or 3 (never used)
    assert evicted[4] == E(2)
    assert cache.stats.loads == 5  # LRU would need 6 on this sequence


def _misses(policy, seq, num_slots):
    cache = ExpertCache(num_slots, policy)
    for n in seq:
        access(cache, E(n))
    return cache.stats.loads


@settings(max_examples=200, deadline=None)
@given(seq=st.lists(st.integers(0, 9), min_size=1, max_size=120), num_slots=st.integers(1, 6))
def test_belady_never_misses_more_than_other_policies(seq, num_slots):
    state = {"now": 0}

    def future(eid, after):
        return next((i for i in range(after + 1, len(seq)) if seq[i] == eid.expert), float("inf"))

    cache = ExpertCache(num_slots, Belady(future, lambda: state["now"]))
    for i, n in enumerate(seq):
        state["now"] = i
        access(cache, E(n))
    for other in (LRU(), LFU(), SLRU(), LFRU()):
        assert cache.stats.loads <= _misses(other, seq, num_slots)


def test_slru_promotes_reused_experts_and_speculation_evicts_only_cold():
    cache = ExpertCache(4, SLRU(hot_fraction=0.5))
    for n in [0, 0, 1, 1, 2, 3]:  # 0 and 1 used twice: hot
        access(cache, E(n))
    segments = {m.expert.expert: m.segment for m in cache.meta}
    assert segments[0] == Segment.HOT and segments[1] == Segment.HOT and segments[2] == Segment.COLD
    slot, evicted = cache.allocate(E(7), speculative=True)
    assert evicted in (E(2), E(3))
    cache.mark_ready(slot)
    cache.unpin(slot)
    slot, evicted = cache.allocate(E(8), speculative=True)  # the other cold one (E(7) is cold and newest)
    assert evicted in (E(2), E(3))


def test_lfru_remembers_an_experts_uses_across_its_eviction():
    """Two slots: 0 and then 1 are used three times; 2 evicts 0 (as often used, longer ago); 0 comes back
    (evicting 2, used once) with its count, now 4, so the next load evicts 1, not 0. A count that
    restarted at every load would give 0 one use and evict it. Emptying the cache forgets the counts."""
    policy = LFRU(half_life=1000)
    cache = ExpertCache(2, policy)
    evicted = [access(cache, E(n)) for n in [0, 0, 0, 1, 1, 1, 2, 0]]
    assert evicted[-2:] == [E(0), E(2)]
    assert access(cache, E(3)) == E(1)
    cache.clear()
    assert policy.counts == {}
