"""runtime.py: ExpertRuntime serves transformers' experts modules through ExpertsInterface.

For each MoE layer it computes the routed experts from device slots: experts already READY first,
then each miss loaded (synchronously, the reactive baseline) into a slot the policy frees. It knows
nothing about how the model was loaded. Legend: T tokens, K routed per token, H hidden, I expert width.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from activemoe.cache import ExpertCache
from activemoe.ids import ExpertId
from activemoe.slots import SlotSlab
from activemoe.store import ExpertStore

IMPLEMENTATION = "activemoe"


@dataclass
class RuntimeStats:
    activations: int = 0  # routed (token, layer, expert) activations
    hits: int = 0  # activations whose expert was READY when routed
    loads: int = 0
    evictions: int = 0
    bytes_moved: int = 0
    load_s: float = 0.0  # wall time spent loading experts on the compute path (stall)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.activations if self.activations else 0.0

    def get_and_reset(self) -> RuntimeStats:
        snapshot = RuntimeStats(**{f.name: getattr(self, f.name) for f in fields(self)})
        for f in fields(self):
            setattr(self, f.name, type(getattr(self, f.name))())
        return snapshot


def expert_forward(module: torch.nn.Module, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """One expert on its tokens, in the experts module's own conventions (flags, gate, activation)."""
    up_name = "gate_up_proj" if module.has_gate else "up_proj"
    h = x @ w[up_name] if module.is_transposed else F.linear(x, w[up_name])  # [t, 2I] or [t, I]
    if module.has_bias:
        h = h + w[up_name + "_bias"]
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)  # [t, I]
    y = h @ w["down_proj"] if module.is_transposed else F.linear(h, w["down_proj"])  # [t, H]
    if module.has_bias:
        y = y + w["down_proj_bias"]
    if module.has_post_expert_norm:
        y = module.post_expert_norm(y)
    return y


class ExpertRuntime:
    def __init__(self, store: ExpertStore, slab: SlotSlab, cache: ExpertCache):
        self.store, self.slab, self.cache = store, slab, cache
        self.stats = RuntimeStats()

    def forward(self, layer: int, module: torch.nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)  # [T, H]
        routed = top_k_index.unique().tolist()
        counts = dict(zip(routed, (top_k_index == top_k_index.new_tensor(routed)[:, None, None]).sum((1, 2)).tolist()))
        ready, missing = [], []
        for e in routed:
            eid = ExpertId(layer, e)
            slot = self.cache.lookup(eid)
            self.stats.activations += counts[e]
            if slot is None:
                missing.append(eid)
                continue
            self.stats.hits += counts[e]
            self.cache.pin(slot)  # the misses below must not evict what this layer still needs
            ready.append((eid, slot))
        for eid, slot in ready:
            self._compute(module, eid, slot, hidden, top_k_index, top_k_weights, out)
        for eid in missing:
            self._compute(module, eid, self._load(eid), hidden, top_k_index, top_k_weights, out)
        return out

    def _load(self, eid: ExpertId) -> int:
        """Synchronous on-demand load; the slot comes back pinned."""
        start = time.perf_counter()
        slot, evicted = self.cache.allocate(eid)
        try:
            self.stats.bytes_moved += self.slab.load(slot, self.store.read(eid))
        except BaseException:
            self.cache.abort(slot)
            raise
        self.cache.mark_ready(slot)
        self.stats.loads += 1
        self.stats.evictions += evicted is not None
        self.stats.load_s += time.perf_counter() - start
        return slot

    def _compute(self, module, eid, slot, hidden, top_k_index, top_k_weights, out) -> None:
        try:
            self.cache.touch(slot)
            token, k = torch.where(top_k_index == eid.expert)  # [t], [t]
            y = expert_forward(module, self.slab.weights(slot), hidden[token])  # [t, H]
            out.index_add_(0, token, (y * top_k_weights[token, k, None]).to(out.dtype))
        finally:
            self.cache.unpin(slot)


def _dispatch(module, hidden_states, top_k_index, top_k_weights):
    """The function registered in ExpertsInterface: routes to the runtime attached to the module."""
    return module._activemoe_runtime.forward(module._activemoe_layer, module, hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _dispatch)
