"""Per-slot metadata, shared by the cache (which owns it) and the policies (which read it)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from activemoe.ids import ExpertId


class SlotState(IntEnum):
    EMPTY = 0
    LOADING = 1  # a copy into the slot is in flight: never handed out, never evicted
    READY = 2


@dataclass
class SlotMeta:
    expert: ExpertId | None = None
    state: SlotState = SlotState.EMPTY
    last_use: int = -1  # logical clock of the last touch
    use_count: int = 0  # touches since the expert entered the slot
    pin_count: int = 0  # > 0 while the layer being computed needs the slot
