"""rest.py decides when the predictor rests. The runtime and the simulator share it, so a simulated
configuration makes the engine's prefetch decisions in quiet stretches too.

While the routed experts stay resident (a short loop of tokens, a large cache), predictions save
nothing and cost time, and their wrong guesses cost link bytes and evictions. After `after` decode
steps without a miss or a use of a prefetched expert, the predictor is not called until a routed
expert misses. That miss is loaded on demand, as reactive LRU would.
"""
from __future__ import annotations

from dataclasses import dataclass

REST_AFTER = 8  # quiet decode steps in a row, after which the predictor rests until a miss


@dataclass
class Rest:
    after: int | None = REST_AFTER  # None: the predictor never rests
    quiet: int = 0  # decode steps in a row without a miss or a use of a prefetched expert
    _count: int | None = None  # misses + prefetches used, before the current decode step

    def begin(self) -> None:
        """A new generation."""
        self.quiet, self._count = 0, None

    def decode_layer(self, first: bool, count: int, predictor) -> bool:
        """At each decode MoE layer, whether `predictor` rests there. `first`: the step's first MoE layer,
        where `count`, the running count of misses plus prefetched experts used (LoaderCore.served), says
        whether the step before it was quiet."""
        if first:
            if self._count is not None:
                self.quiet = self.quiet + 1 if count == self._count else 0
            self._count = count
        return self.resting(predictor)

    def miss(self) -> None:
        """A routed expert missed: the predictor is needed again (from the next layer on)."""
        self.quiet = 0

    def resting(self, predictor) -> bool:
        """Whether `predictor` rests now; one that says `may_rest = False` never does."""
        return self.after is not None and self.quiet >= self.after and getattr(predictor, "may_rest", True)
