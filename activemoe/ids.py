"""Typed identifiers shared by every component."""
from typing import NamedTuple


class ExpertId(NamedTuple):
    layer: int  # decoder layer index in the model (dense layers keep their numbers)
    expert: int  # routed expert index within that layer
