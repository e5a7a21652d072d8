"""replay.py forces a model's routing from a recorded trace (`--replay-routing PATH`), for benchmarks at
real expert shapes whose random routers would route uniformly: hit rates then reflect a trained model's
routing while transfers and kernels are real. APPROXIMATE by construction: the output is not the model's.

The trace's shape is mapped onto the model's: MoE layer i replays trace layer i mod L_trace; each
trace expert e becomes r = ceil(K / K_trace) neighbouring experts starting at e * E // E_trace, the first
K kept; weights split evenly among the copies, then normalised. Token rows are taken in order per layer,
wrapping around the trace. Legend: T tokens, K routed per token.
"""
from __future__ import annotations

import math

import torch

from activemoe.errors import UserError
from activemoe.trace import Trace


class ReplayRouting:
    def __init__(self, trace: Trace, layers: list[int], num_experts: int, top_k: int):
        if not layers or top_k > num_experts:
            raise UserError("replay needs a model with MoE layers and top-k <= experts")
        trace_layers = trace.layers
        rows = {layer: (trace.layer == layer).nonzero().squeeze(1) for layer in trace_layers}
        if min(len(r) for r in rows.values()) == 0:
            raise UserError("the trace has a MoE layer without rows; record it again")
        self.index: dict[int, torch.Tensor] = {}  # model layer -> [N, K] expert ids
        self.weights: dict[int, torch.Tensor] = {}  # model layer -> [N, K]
        for i, layer in enumerate(layers):
            picked = rows[trace_layers[i % len(trace_layers)]]
            self.index[layer], self.weights[layer] = _map(trace.experts[picked].long(), trace.weights[picked].float(),
                                                          trace.num_experts, num_experts, top_k)
        self.cursor = dict.fromkeys(layers, 0)

    def reset(self) -> None:
        """A new generation replays from the trace's start."""
        self.cursor = dict.fromkeys(self.cursor, 0)

    def routing(self, layer: int, tokens: int, device: torch.device | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `tokens` rows of `layer`: ([T, K] ids, [T, K] weights), on `device` (default: where they are).
        A layer's tables move to the device at its first use, so a step copies nothing from the host: on
        CUDA a blocking host-to-device copy makes the host wait for all the work queued before it."""
        if device is not None and self.index[layer].device != device:
            self.index[layer], self.weights[layer] = self.index[layer].to(device), self.weights[layer].to(device)
        table = self.index[layer]
        rows = (torch.arange(tokens, device=table.device) + self.cursor[layer]) % table.shape[0]  # [T]
        self.cursor[layer] += tokens
        return table[rows], self.weights[layer][rows]

    def install(self, experts: dict[int, torch.nn.Module]) -> None:
        """A forward pre-hook on each experts module swaps in the replayed routing (any runner's model)."""
        for layer, module in experts.items():
            module.register_forward_pre_hook(self._hook(layer), with_kwargs=True)

    def _hook(self, layer: int):
        def swap(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            index, weights = self.routing(layer, hidden.shape[0], hidden.device)
            return (hidden, index, weights.to(hidden.dtype)), {}
        return swap


def _map(experts: torch.Tensor, weights: torch.Tensor, trace_experts: int, num_experts: int, top_k: int
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K_t] trace routing -> [N, K] model routing (see the module docstring)."""
    copies = math.ceil(top_k / experts.shape[1])
    start = experts * num_experts // trace_experts  # [N, K_t]
    ids = (start[:, :, None] + torch.arange(copies)) % num_experts  # [N, K_t, r]
    w = (weights / copies)[:, :, None].expand_as(ids)  # [N, K_t, r]
    ids, w = ids.reshape(len(ids), -1), w.reshape(len(ids), -1)  # [N, K_t * r]
    out_ids, out_w = [], []
    for row_ids, row_w in zip(ids.tolist(), w.tolist()):  # plain lists: a torch call per row took minutes
        seen = list(dict.fromkeys(row_ids))  # distinct ids in rank order, padded with the next free experts
        e = seen[-1]
        while len(seen) < top_k:
            e = (e + 1) % num_experts
            if e not in seen:
                seen.append(e)
        lookup = dict(zip(row_ids, row_w))
        out_ids.append(seen[:top_k])
        out_w.append([lookup.get(e, 0.0) for e in seen[:top_k]])
    out_ids, out_w = torch.tensor(out_ids, dtype=torch.long), torch.tensor(out_w)  # [N, K]
    out_w = torch.where(out_w.sum(1, keepdim=True) > 0, out_w, torch.ones_like(out_w))
    return out_ids, out_w / out_w.sum(1, keepdim=True)
