"""hardware.py measures this machine: the costs that the miss-handling decision needs.

(Hardware and model-shape presets for the simulator come with the simulator issue.)
"""
from __future__ import annotations

import time

import torch

from activemoe.ids import ExpertId
from activemoe.runtime import MissCostModel, expert_forward
from activemoe.store import ExpertStore


def profile_host_expert(module: torch.nn.Module, store: ExpertStore, repeats: int = 20) -> MissCostModel:
    """Measured host time of one expert of `module`'s shape on 1 and 8 tokens; a linear fit of the two."""
    weights = store.read(ExpertId(store.layers[0], 0))
    width = next(iter(store.spec.shapes.values()))
    hidden = width[0] if store.spec.is_transposed else width[-1]
    timings = {}
    with torch.inference_mode():
        for tokens in (1, 8):
            x = torch.randn(tokens, hidden, dtype=store.dtype)
            expert_forward(module, weights, x)  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                expert_forward(module, weights, x)
            timings[tokens] = (time.perf_counter() - start) / repeats
    per_token = max(0.0, (timings[8] - timings[1]) / 7)
    return MissCostModel(host_base_s=max(0.0, timings[1] - per_token), host_per_token_s=per_token)
