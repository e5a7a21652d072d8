"""Predictors behind one small protocol: given the MoE layer that is routing now, name the experts of
the next `lookahead` MoE-layer events, with a probability each. They know nothing about memory.

Events count MoE-layer forward calls within one generation (layer order, then token steps), so a
lookahead crosses from the last layer of one step into the first layers of the next.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Protocol

import torch

from activemoe.errors import UserError
from activemoe.ids import ExpertId

Routing = tuple[int, tuple[int, ...]]  # (decoder layer, sorted routed expert ids) of one MoE-layer event


@dataclass(frozen=True)
class Prediction:
    distance: int  # events ahead (1 = the next MoE layer)
    layer: int  # decoder layer of the target event
    experts: tuple[int, ...]  # best first
    probs: tuple[float, ...]


class Predictor(Protocol):
    name: str

    def begin(self) -> None:
        """A new generation starts (event 0)."""

    def predict(self, event: int, layer: int, hidden: torch.Tensor, routed: list[int]) -> list[Prediction]: ...


class NoPredictor:
    """Prefetch nothing: the reactive baseline."""

    name = "none"

    def begin(self) -> None:
        pass

    def predict(self, event, layer, hidden, routed) -> list[Prediction]:
        return []


class OraclePredictor:
    """Replays the routing recorded by a previous identical run: the upper bound of prediction.

    If the live routing departs from the recording (another prompt or sampling), it stops predicting.
    """

    name = "oracle"

    def __init__(self, trace: list[Routing], lookahead: int):
        if lookahead < 1:
            raise UserError("--lookahead must be at least 1")
        self.trace, self.lookahead = trace, lookahead
        self.diverged = False
        self.event = 0
        self._uses: dict[ExpertId, list[int]] = {}
        for i, (layer, experts) in enumerate(trace):
            for e in experts:
                self._uses.setdefault(ExpertId(layer, e), []).append(i)

    def begin(self) -> None:
        self.diverged = False
        self.event = 0

    def next_use(self, eid: ExpertId) -> float:
        """The next event (from the current one on) that routes to `eid`; inf if none."""
        uses = self._uses.get(eid, ())
        i = bisect.bisect_left(uses, self.event)
        return uses[i] if i < len(uses) and not self.diverged else math.inf

    def predict(self, event, layer, hidden, routed) -> list[Prediction]:
        self.event = event
        if self.diverged or event >= len(self.trace) or self.trace[event] != (layer, tuple(routed)):
            self.diverged = True
            return []
        ahead = self.trace[event + 1:event + 1 + self.lookahead]
        return [Prediction(k, target_layer, experts, (1.0,) * len(experts))
                for k, (target_layer, experts) in enumerate(ahead, start=1)]


PREDICTORS = ("none", "oracle")
