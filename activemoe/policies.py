"""Eviction policies: small pure objects; the cache evicts the evictable slot of lowest priority.

The cache's evict loop never knows which policy runs (SGLang style). A policy sees SlotMeta only;
`on_touch` lets segmented policies move entries between hot and cold.
"""
from __future__ import annotations

from activemoe.cache_meta import Segment, SlotMeta


class EvictionPolicy:
    name = "base"

    def priority(self, meta: SlotMeta, now: int) -> tuple:
        raise NotImplementedError

    def may_evict(self, meta: SlotMeta, speculative: bool) -> bool:
        return True

    def on_touch(self, slot: int, metas: list[SlotMeta]) -> None:
        pass


class LRU(EvictionPolicy):
    """Least recently used first: mixtral-offloading's shipped algorithm, the reactive baseline."""

    name = "lru"

    def priority(self, meta: SlotMeta, now: int) -> tuple:
        return (meta.last_use,)


class LFU(EvictionPolicy):
    """Least frequently used first; ties broken by recency."""

    name = "lfu"

    def priority(self, meta: SlotMeta, now: int) -> tuple:
        return (meta.use_count, meta.last_use)


class LFRU(EvictionPolicy):
    """Least frequently *and* recently used: use count decayed by age (half-life in touches)."""

    name = "lfru"

    def __init__(self, half_life: int = 64):
        self.half_life = half_life

    def priority(self, meta: SlotMeta, now: int) -> tuple:
        return (meta.use_count * 0.5 ** ((now - meta.last_use) / self.half_life), meta.last_use)


class SLRU(EvictionPolicy):
    """Segmented LRU: entries used again are promoted to a hot segment of at most `hot_fraction` of the
    slots; cold entries are evicted first; speculative loads enter cold and evict only cold entries."""

    name = "slru"

    def __init__(self, hot_fraction: float = 0.5):
        self.hot_fraction = hot_fraction

    def priority(self, meta: SlotMeta, now: int) -> tuple:
        return (meta.segment, meta.last_use)

    def may_evict(self, meta: SlotMeta, speculative: bool) -> bool:
        return not speculative or meta.segment == Segment.COLD

    def on_touch(self, slot: int, metas: list[SlotMeta]) -> None:
        meta = metas[slot]
        if meta.segment == Segment.HOT or meta.use_count < 2:
            return
        meta.segment = Segment.HOT
        hot = [m for m in metas if m.segment == Segment.HOT and m.expert is not None]
        if len(hot) > max(1, int(self.hot_fraction * len(metas))):
            min(hot, key=lambda m: m.last_use).segment = Segment.COLD  # demote the LRU hot entry


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRU, "lfu": LFU, "lfru": LFRU, "slru": SLRU}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        from activemoe.errors import UserError

        raise UserError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None
