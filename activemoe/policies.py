"""Eviction policies: small pure objects ranking evictable slots; the lowest priority is evicted.

The cache's evict loop never knows which policy runs (SGLang style). A policy sees only SlotMeta.
"""
from __future__ import annotations

from typing import Protocol

from activemoe.cache_meta import SlotMeta


class EvictionPolicy(Protocol):
    name: str

    def priority(self, meta: SlotMeta) -> tuple: ...


class LRU:
    """Least recently used first: mixtral-offloading's shipped algorithm, the reactive baseline."""

    name = "lru"

    def priority(self, meta: SlotMeta) -> tuple:
        return (meta.last_use,)


class LFU:
    """Least frequently used first; ties broken by recency."""

    name = "lfu"

    def priority(self, meta: SlotMeta) -> tuple:
        return (meta.use_count, meta.last_use)


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRU, "lfu": LFU}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        from activemoe.errors import UserError

        raise UserError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None
