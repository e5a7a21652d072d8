"""Learned lookahead heads: one linear head per (source MoE layer, distance k) on the source layer's
MoE input, predicting the experts routed k MoE layers later. Initialised from the pre-gate (the
target router with the norm ratio folded in) when the model is given, then trained on a trace.
Saved as a safetensors sidecar tied to the model's shape. Legend: N rows, H hidden, E experts.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from activemoe.errors import UserError
from activemoe.families import RouterParts
from activemoe.predictors import Prediction, StackedHeads, pregate_weights
from activemoe.trace import Trace, save_atomic

SIDECAR = "activemoe-predictor.safetensors"
Heads = dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]  # (source layer, k) -> (W [E, H], b [E])


def pairs(trace: Trace, lookahead: int) -> dict[tuple[int, int], tuple[list[int], list[int]]]:
    """(source layer, k) -> (source rows, target rows) over tokens that reach both layers."""
    layers = trace.layers
    out: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
    for rows in trace.by_token().values():
        for i, src in enumerate(layers):
            for k in range(1, lookahead + 1):
                if i + k < len(layers) and src in rows and layers[i + k] in rows:
                    a, b = out.setdefault((src, k), ([], []))
                    a.append(rows[src])
                    b.append(rows[layers[i + k]])
    return out


def train_heads(trace: Trace, lookahead: int, routers: dict[int, RouterParts] | None = None, epochs: int = 30,
                lr: float = 3e-3, on_progress=None) -> Heads:
    if trace.hidden is None:
        raise UserError("the trace has no hidden states; record it with --hidden")
    E, H = trace.num_experts, trace.hidden.shape[1]
    layers = trace.layers
    heads: Heads = {}
    jobs = pairs(trace, lookahead)
    for n, ((src, k), (src_rows, dst_rows)) in enumerate(sorted(jobs.items())):
        x = trace.hidden[src_rows].float()  # [N, H]
        y = torch.zeros(len(dst_rows), E).scatter_(1, trace.experts[dst_rows].long(), 1.0)  # [N, E] multi-hot
        y = y / y.sum(-1, keepdim=True)
        dst = layers[layers.index(src) + k]
        w, b = pregate_weights(routers, src, dst) if routers else (torch.zeros(E, H), torch.zeros(E))
        w, b = w.requires_grad_(), b.requires_grad_()
        opt = torch.optim.Adam([w, b], lr=lr)
        with torch.enable_grad():
            for _ in range(epochs):
                for batch in torch.randperm(len(x)).split(2048):
                    loss = -(y[batch] * (x[batch] @ w.T + b).log_softmax(-1)).sum(-1).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        heads[(src, k)] = (w.detach(), b.detach())
        if on_progress:
            on_progress(n + 1, len(jobs))
    return heads


def save_heads(path: str | os.PathLike, heads: Heads, meta: dict[str, str]) -> None:
    tensors = {}
    for (src, k), (w, b) in heads.items():
        tensors[f"head.{src}.{k}.weight"], tensors[f"head.{src}.{k}.bias"] = w, b
    save_atomic(tensors, path, {**meta, "format": "activemoe-predictor", "version": "1"})


def load_heads(path: str | os.PathLike, expected_shape_id: str) -> Heads:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"predictor file {path} does not exist; train one with `activemoe train-predictor`")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable predictor file: {e}") from None
    if meta.get("format") != "activemoe-predictor":
        raise UserError(f"{path} is not an ActiveMoE predictor file")
    if meta.get("shape_id") != expected_shape_id:
        raise UserError(f"predictor file {path} was trained for another model ({meta.get('model_type')}, shape "
                        f"{meta.get('shape_id')}); train one for this model")
    heads: Heads = {}
    for key, w in tensors.items():
        if key.endswith(".weight"):
            _, src, k, _ = key.split(".")
            heads[(int(src), int(k))] = (w.float(), tensors[key[:-len("weight")] + "bias"].float())
    return heads


class LearnedPredictor:
    name = "learned"

    def __init__(self, heads: Heads, layers: list[int], lookahead: int):
        layers = sorted(layers)
        self.heads = StackedHeads({src: [(dst, *heads[(src, k)]) for k, dst in
                                         enumerate(layers[i + 1:i + 1 + lookahead], start=1) if (src, k) in heads]
                                   for i, src in enumerate(layers)})

    def begin(self) -> None:
        pass

    def predict(self, event, layer, hidden, top_k_index) -> list[Prediction]:
        return self.heads.predict(layer, hidden)
