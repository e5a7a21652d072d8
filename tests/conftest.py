import pytest
import torch

from activemoe.tiny import build_tiny_checkpoint

torch.set_num_threads(2)

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "phimoe", "granitemoe",
            "gpt_oss")


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
