"""Per-slot metadata, shared by the cache (which owns it) and the policies (which read it)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from activemoe.ids import ExpertId


class SlotState(IntEnum):
    EMPTY = 0
    LOADING = 1  # a copy into the slot is in flight: never handed out, never evicted
    READY = 2


class Segment(IntEnum):
    COLD = 0  # probation: new and speculative entries; evicted first by SLRU
    HOT = 1  # used again since it entered


@dataclass
class SlotMeta:
    expert: ExpertId | None = None
    state: SlotState = SlotState.EMPTY
    last_use: int = -1  # logical clock of the last touch (or of the load)
    use_count: int = 0  # touches since the expert entered the slot
    pin_count: int = 0  # > 0 while the layer being computed (or a critical load) needs the slot
    segment: Segment = Segment.COLD
    speculative: bool = False  # loaded on a prediction and not used yet
    next_use: float = float("inf")  # future-knowing policies only: the next event that routes to the expert
