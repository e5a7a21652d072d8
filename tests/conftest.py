import pytest
import torch

from activemoe.families import TESTED_FAMILIES
from activemoe.tiny import build_tiny_checkpoint

torch.set_num_threads(2)

FAMILIES = TESTED_FAMILIES  # each proven by the parity tests


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """Build (once per session) a tiny random checkpoint of a family: checkpoint(family, **shape) -> dir."""
    built = {}

    def get(family: str, **kwargs):
        key = (family, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = build_tiny_checkpoint(family, tmp_path_factory.mktemp(family), **kwargs)
        return built[key]

    return get
