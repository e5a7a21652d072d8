"""Approximate, opt-in routing (`--routing pregated`, the Pre-gated MoE idea, training-free): layer
N+1 is routed by a decision made at layer N — layer N+1's own router, behind its own norm, applied to
layer N's MoE input — so its experts are known, and prefetched, a whole layer early and no load is
ever late. The first MoE layer routes exactly. This changes the model's output: its quality cost is
reported as held-out perplexity against exact routing (`activemoe perplexity`).
"""
from __future__ import annotations

import torch

from activemoe.families import RouterParts
from activemoe.predictors import Prediction


def renormalise(hidden: torch.Tensor, src: RouterParts, dst: RouterParts) -> torch.Tensor:
    """Layer src's MoE input [T, H] as layer dst's norm would have produced it from the same residual."""
    if src.norm_weight is None or dst.norm_weight is None:
        return hidden
    return (hidden.float() / src.norm_weight.float().clamp_min(1e-6) * dst.norm_weight.float()).to(hidden.dtype)


class PregatedRouting:
    """A predictor whose predictions are decisions: it routes layer N+1 at layer N and makes layer
    N+1's router return that decision (a forward hook), prefetching exactly those experts."""

    name = "pregated"

    def __init__(self, routers: dict[int, torch.nn.Module], parts: dict[int, RouterParts]):
        layers = sorted(routers)
        self.next = dict(zip(layers, layers[1:]))
        self.routers, self.parts = routers, parts
        self.decided: dict[int, tuple] = {}  # layer -> (logits, top_k_weights, top_k_index) decided early
        self.substituted = 0  # router calls answered by an early decision
        self._bypass = False
        for layer, router in routers.items():
            router.register_forward_hook(self._hook(layer))

    def _hook(self, layer: int):
        def hook(module, args, output):
            if self._bypass:
                return None
            decided = self.decided.pop(layer, None)
            if decided is None or decided[2].shape != output[2].shape:
                return None  # no early decision for these tokens: route exactly
            self.substituted += 1
            return decided

        return hook

    def begin(self) -> None:
        self.decided.clear()

    def predict(self, event, layer, hidden, top_k_index) -> list[Prediction]:
        target = self.next.get(layer)
        if target is None:
            return []
        self._bypass = True
        try:
            decision = self.routers[target](renormalise(hidden, self.parts[layer], self.parts[target]))
        finally:
            self._bypass = False
        self.decided[target] = decision
        experts = tuple(decision[2].unique().tolist())
        return [Prediction(1, target, experts, (1.0,) * len(experts), budget=len(experts))]
