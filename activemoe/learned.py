"""Learned lookahead heads: one head per (source MoE layer, distance k) on the source layer's MoE
input, predicting the experts routed k MoE layers later: a linear map, initialised from the pre-gate
(the target router with the norm ratio folded in) when the model is given, plus an optional residual
MLP (width M, starting at zero, so training starts from the pre-gate). Trained on a trace, saved as
a safetensors sidecar tied to the model's shape. Legend: N rows, H hidden, E experts, M MLP width.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from activemoe.errors import UserError
from activemoe.families import RouterParts
from activemoe.predictors import Prediction, StackedHeads, pregate_weights
from activemoe.atomic import save_safetensors_atomic
from activemoe.trace import Trace

SIDECAR = "activemoe-predictor.safetensors"
MLP = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (W1 [M, H], b1 [M], W2 [E, M])
Heads = dict[tuple[int, int], tuple]  # (source layer, k) -> (W [E, H], b [E]) or (W, b, MLP)


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
                lr: float = 3e-3, mlp_width: int = 0, on_progress=None) -> Heads:
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
        params = [w.requires_grad_(), b.requires_grad_()]
        if mlp_width:
            w1 = (torch.randn(mlp_width, H) / H**0.5).requires_grad_()
            b1, w2 = torch.zeros(mlp_width).requires_grad_(), torch.zeros(E, mlp_width).requires_grad_()
            params += [w1, b1, w2]

        def logits(xb):  # [n, E]
            out = xb @ w.T + b
            return out + F.gelu(xb @ w1.T + b1) @ w2.T if mlp_width else out

        opt = torch.optim.Adam(params, lr=lr)
        with torch.enable_grad():
            for _ in range(epochs):
                for batch in torch.randperm(len(x)).split(1024 if mlp_width else 2048):
                    loss = -(y[batch] * logits(x[batch]).log_softmax(-1)).sum(-1).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        heads[(src, k)] = tuple(p.detach() for p in params[:2]) + ((tuple(p.detach() for p in params[2:]),)
                                                                 if mlp_width else ())
        if on_progress:
            on_progress(n + 1, len(jobs))
    return heads


def save_heads(path: str | os.PathLike, heads: Heads, meta: dict[str, str]) -> None:
    tensors = {}
    for (src, k), (w, b, *mlp) in heads.items():
        tensors[f"head.{src}.{k}.weight"], tensors[f"head.{src}.{k}.bias"] = w, b
        if mlp:
            for name, t in zip(("mlp_in.weight", "mlp_in.bias", "mlp_out.weight"), mlp[0]):
                tensors[f"head.{src}.{k}.{name}"] = t
    save_safetensors_atomic(tensors, path, {**meta, "format": "activemoe-predictor", "version": "1"})


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
        parts = key.split(".")
        if len(parts) == 4 and parts[3] == "weight":  # head.SRC.K.weight
            prefix = key[:-len("weight")]
            head = (w.float(), tensors[prefix + "bias"].float())
            if prefix + "mlp_in.weight" in tensors:
                head += (tuple(tensors[prefix + n].float() for n in ("mlp_in.weight", "mlp_in.bias", "mlp_out.weight")),)
            heads[(int(parts[1]), int(parts[2]))] = head
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
