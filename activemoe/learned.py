"""Learned lookahead heads: one head per (source MoE layer, distance k), predicting the experts routed
k MoE layers later from two inputs the runtime already holds when the source layer routes: the
source layer's MoE input for this token, and the *target* layer's MoE input for the previous token
(its context: consecutive tokens route alike, and that state was computed one step earlier). Heads
from source TOKENS read the token embeddings instead, so the first MoE layers are predicted before
layer 0's attention runs (no within-token source reaches the first MoE layer). A head
is a linear map, initialised from the pre-gate (the target router with the norm ratio folded in)
when the model is given, plus an optional residual MLP (width M, starting at zero, so training
starts from the pre-gate). Trained on a trace, saved as a safetensors sidecar tied to the model's
shape. Legend: N rows, T tokens, H hidden, E experts, M MLP width.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from activemoe.errors import UserError
from activemoe.families import RouterParts
from activemoe.predictors import TOKENS, Prediction, pregate_weights
from activemoe.atomic import save_safetensors_atomic
from activemoe.trace import Trace

SIDECAR = "activemoe-predictor.safetensors"
RANKED_ROWS = 32  # a longer prefill ranks the experts of the layers ahead from this many evenly spaced rows
# (the heads' cost grows with rows, and a long prompt routes to nearly every expert anyway)
MAX_BATCH = 64  # after a long prefill, decode batches up to this size read their context
VERSION = "2"  # 2: SiLU MLPs, heads may read the previous token's target-layer input (1: GELU, source only)


@dataclass(frozen=True)
class Head:
    weight: torch.Tensor  # [E, H] on the source layer's MoE input
    bias: torch.Tensor  # [E]
    context: torch.Tensor | None = None  # [E, H] on the target layer's MoE input of the previous token
    mlp_in: torch.Tensor | None = None  # [M, H] residual MLP: logits += mlp_out silu(mlp_in x + mlp_in_context c + b1)
    mlp_in_bias: torch.Tensor | None = None  # [M]
    mlp_out: torch.Tensor | None = None  # [E, M]
    mlp_in_context: torch.Tensor | None = None  # [M, H]


Heads = dict[tuple[int, int], Head]  # (source layer, k) -> head
HEAD_PREFIX = "head."  # a lookahead head's tensors in the sidecar: head.SOURCE.K.NAME (reuse heads: reuse.PREFIX)
_TENSORS = ("weight", "bias", "context", "mlp_in", "mlp_in_bias", "mlp_out", "mlp_in_context")


def pairs(trace: Trace, lookahead: int) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(source layer, k) -> (source rows, target rows, context rows) over tokens that reach both layers, in
    token order; a context row is the previous token's row at the target layer, or -1 when there is none.
    Source TOKENS (when the trace has token embeddings) reads rows of `trace.tokens`, the others of `hidden`.
    Vectorised: a whole-split trace has millions of rows, which as Python lists took gigabytes."""
    sources = ([TOKENS] if trace.tokens is not None else []) + trace.layers
    token, layer = trace.token.numpy(), trace.layer.numpy()
    num_tokens = int(token.max()) + 1 if len(token) else 0
    row_of = np.full((num_tokens, len(sources)), -1, np.int64)  # [T, sources] a token's row per source
    for column, src in enumerate(sources):
        if src != TOKENS:
            at = np.flatnonzero(layer == src)
            row_of[token[at], column] = at
    if sources[0] == TOKENS:  # a token with any row reads its own embedding row
        seen = (row_of[:, 1:] >= 0).any(1)
        row_of[seen, 0] = np.flatnonzero(seen)
    previous = np.vstack([np.full((1, len(sources)), -1, np.int64), row_of[:-1]])  # [T, sources]
    out: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for i, src in enumerate(sources):
        for k in range(1, lookahead + 1):
            if i + k < len(sources):
                both = (row_of[:, i] >= 0) & (row_of[:, i + k] >= 0)
                if both.any():
                    out[(src, k)] = (row_of[both, i], row_of[both, i + k], previous[both, i + k])
    return out


def context_rows(hidden: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """hidden[rows] (in its dtype) with zeros where a row is -1 (no previous token). [N, H]"""
    index = torch.from_numpy(rows)
    out = hidden[index.clamp_min(0)]
    out[index < 0] = 0
    return out


def mlp_widths(mlp_width: int | Sequence[int]) -> list[int]:
    """One MLP width per lookahead k = 1, 2, ... (the last repeats); refused unless all 0 (linear heads) or all
    positive."""
    widths = [mlp_width] if isinstance(mlp_width, int) else list(mlp_width)
    if not widths or min(widths) < 0 or (0 in widths and max(widths) > 0):
        raise UserError(f"MLP widths must be all 0 (linear heads) or all positive, got {widths}")
    return widths


def train_heads(trace: Trace, lookahead: int, routers: dict[int, RouterParts] | None = None, epochs: int = 30,
                lr: float = 3e-3, mlp_width: int | Sequence[int] = 0, context: bool = True, on_progress=None) -> Heads:
    """Adam with cosine decay to lr/20. `mlp_width`: one width for every head, or one per lookahead k = 1, 2, ...
    (the last repeats): the nearest layer is worth the widest MLP, and a narrow far head costs less per call."""
    widths = mlp_widths(mlp_width)
    if trace.hidden is None:
        raise UserError("the trace has no hidden states; record it with --hidden")
    E, H = trace.num_experts, trace.hidden.shape[1]
    D = 2 * H if context else H  # head input: [source input, context]
    sources = [TOKENS, *trace.layers]
    heads: Heads = {}
    jobs = pairs(trace, lookahead)
    for n, ((src, k), (src_rows, dst_rows, ctx_rows)) in enumerate(sorted(jobs.items())):
        # [N, D] in the trace's dtype (float16 as recorded), made float32 a batch at a time: a whole-split
        # trace's inputs in float32 took twice the memory of the trace itself
        x = trace.hidden.new_empty(len(src_rows), D)  # filled part by part: a concatenation would hold it twice
        x[:, :H] = (trace.tokens if src == TOKENS else trace.hidden)[torch.from_numpy(src_rows)]
        if context:
            x[:, H:] = context_rows(trace.hidden, ctx_rows)
        target = trace.experts[torch.from_numpy(dst_rows)].long()  # [N, K]
        y = torch.zeros(len(dst_rows), E).scatter_(1, target, 1.0)  # [N, E] multi-hot
        y = y / y.sum(-1, keepdim=True)
        dst = sources[sources.index(src) + k]
        w, b = (map(torch.Tensor.cpu, pregate_weights(routers, src, dst)) if routers and src != TOKENS
                else (torch.zeros(E, H), torch.zeros(E)))  # trained on the host; embeddings have no pre-gate
        w = torch.cat([w, torch.zeros(E, D - H)], 1)  # [E, D]: the context starts with no say
        params = [w.requires_grad_(), b.requires_grad_()]
        mlp_width = widths[min(k, len(widths)) - 1]
        if mlp_width:
            w1 = (torch.randn(mlp_width, D) / D**0.5).requires_grad_()
            b1, w2 = torch.zeros(mlp_width).requires_grad_(), torch.zeros(E, mlp_width).requires_grad_()
            params += [w1, b1, w2]

        def logits(xb):  # [n, E]
            out = xb @ w.T + b
            return out + F.silu(xb @ w1.T + b1) @ w2.T if mlp_width else out

        opt = torch.optim.Adam(params, lr=lr)
        batch_size = 1024 if mlp_width else 2048
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(x) // batch_size), lr / 20)
        with torch.enable_grad():
            for _ in range(epochs):
                for batch in torch.randperm(len(x)).split(batch_size):
                    loss = -(y[batch] * logits(x[batch].float()).log_softmax(-1)).sum(-1).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    decay.step()
        w, b = w.detach(), b.detach()
        mlp = {}
        if mlp_width:
            w1 = w1.detach()
            mlp = dict(mlp_in=w1[:, :H].contiguous(), mlp_in_bias=b1.detach(), mlp_out=w2.detach(),
                       mlp_in_context=w1[:, H:].contiguous() if context else None)
        heads[(src, k)] = Head(w[:, :H].contiguous(), b, w[:, H:].contiguous() if context else None, **mlp)
        if on_progress:
            on_progress(n + 1, len(jobs))
    return heads


def save_heads(path: str | os.PathLike, heads: Heads, meta: dict[str, str], extra: dict[str, torch.Tensor] | None = None
               ) -> None:
    """The sidecar: the lookahead heads, plus `extra` tensors (reuse heads: reuse.ReuseHeads.tensors)."""
    tensors = {f"{HEAD_PREFIX}{src}.{k}.{name}": t for (src, k), head in heads.items()
               for name in _TENSORS if (t := getattr(head, name)) is not None}
    save_safetensors_atomic({**tensors, **(extra or {})}, path,
                            {**meta, "format": "activemoe-predictor", "version": VERSION})


def read_sidecar(path: str | os.PathLike, expected_shape_id: str | None, prefix: str = ""
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A predictor file's tensors whose names start with `prefix` (the lookahead heads' HEAD_PREFIX, the reuse
    heads' reuse.PREFIX, or all), and its metadata, checked to be one for this model (None: any model)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"predictor file {path} does not exist; train one with `activemoe train-predictor`")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable predictor file: {e}") from None
    if meta.get("format") != "activemoe-predictor":
        raise UserError(f"{path} is not an ActiveMoE predictor file")
    if meta.get("version") != VERSION:
        raise UserError(f"predictor file {path} has version {meta.get('version')}; this ActiveMoE reads version "
                        f"{VERSION}: train it again with `activemoe train-predictor`")
    if expected_shape_id is not None and meta.get("shape_id") != expected_shape_id:
        raise UserError(f"predictor file {path} was trained for another model ({meta.get('model_type')}, shape "
                        f"{meta.get('shape_id')}); train one for this model")
    return tensors, meta


def load_heads(path: str | os.PathLike, expected_shape_id: str) -> Heads:
    tensors, _ = read_sidecar(path, expected_shape_id, HEAD_PREFIX)
    heads: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        _, src, k, name = key.split(".", 3)
        heads.setdefault((int(src), int(k)), {})[name] = t.float()
    try:
        return {key: Head(**parts) for key, parts in heads.items()}
    except TypeError as e:
        raise UserError(f"predictor file {path} has unexpected tensors: {e}") from None


class LearnedPredictor:
    """The heads laid out so a call costs one matmul for its own heads' source parts. The context parts of
    the heads that target a layer read that layer's input too, but only the next step needs them: the call
    keeps the input, and `idle()` (which the runtime calls while it waits on a load) or the next step's
    first call multiplies it into one buffer, which that call gathers (plus the biases) into each source's
    addend, so a call adds one slice. Legend: n own heads, P their width n*(E+M), C the context width at a
    layer, A the width of all own columns, R the rows a step keeps for the next."""

    name = "learned"

    def __init__(self, heads: Heads, layers: list[int], lookahead: int, device: torch.device | None = None):
        """`device`: the model's device. On CUDA the matmuls run there (a large model's head weights,
        megabytes per layer, are not read by the host every token); on the CPU (or None) numpy runs them,
        faster than torch for matmuls this small. The small result comes back to the host either way."""
        device = device if device is not None and torch.device(device).type != "cpu" else None
        if len({h.context is None for h in heads.values()}) > 1:
            raise UserError("the predictor file mixes heads with and without context")
        layers = [TOKENS] + sorted(layers)  # TOKENS: the token embeddings, before the first MoE layer
        own = {src: [(dst, heads[(src, k)]) for k, dst in enumerate(layers[i + 1:i + 1 + lookahead], start=1)
                     if (src, k) in heads] for i, src in enumerate(layers)}  # source -> [(target, head)]
        self.sees_tokens = bool(own[TOKENS])
        self.targets = {src: [dst for dst, _ in items] for src, items in own.items()}
        into: dict[int, list[tuple[int, Head]]] = {}  # target -> [(source, head)] that read its context
        for src, items in own.items():
            for dst, h in items:
                if h.context is not None:
                    into.setdefault(dst, []).append((src, h))
        at: dict[tuple[int, int], int] = {}  # (source, target) -> its context part's column in the buffer
        self.context_at: dict[int, tuple[int, int]] = {}  # target -> its context parts' columns [start, end)
        column = 0
        for dst in layers:
            start = column
            for src, h in into.get(dst, []):
                at[(src, dst)] = column
                column += h.bias.shape[0] + _mlp_width(h)
            if column > start:
                self.context_at[dst] = (start, column)
        self.context_width = column

        def placed(rows: list[torch.Tensor]) -> np.ndarray | torch.Tensor:  # [H, width]: numpy, or on `device`
            fused = torch.cat(rows).T.contiguous()
            return fused.numpy() if device is None else fused.to(device)

        self.weight, self.context_weight, self.own_at, self.lin_width, self.mlp = {}, {}, {}, {}, {}
        perm, bias = [], []  # per own column (all sources): its context column, its bias
        for layer in layers:
            items = own[layer]
            # the MLP's first layer is stored halved (x' = x/2), so silu(x) = x' (1 + tanh x') costs three ops
            if items:  # [H, P]
                self.weight[layer] = placed([h.weight for _, h in items] +
                                            [h.mlp_in / 2 for _, h in items if _mlp_width(h)])
            if layer in self.context_at:  # [H, C]
                self.context_weight[layer] = placed([part for _, h in into[layer] for part in
                                                     [h.context] + ([h.mlp_in_context / 2] if _mlp_width(h) else [])])
            start = len(bias)
            bias += [b for _, h in items for b in h.bias.tolist()]
            bias += [b / 2 for _, h in items if _mlp_width(h) for b in h.mlp_in_bias.tolist()]
            if into:
                for dst, h in items:
                    perm += range(at[(layer, dst)], at[(layer, dst)] + h.bias.shape[0])
                for dst, h in items:
                    E = h.bias.shape[0]
                    perm += range(at[(layer, dst)] + E, at[(layer, dst)] + E + _mlp_width(h))
            self.own_at[layer] = (start, len(bias))
            self.lin_width[layer] = sum(h.bias.shape[0] for _, h in items)
            if items and all(_mlp_width(h) for _, h in items):
                self.mlp[layer] = torch.block_diag(*[h.mlp_out.T for _, h in items]).contiguous().numpy()  # [nM, nE]
        self.perm, self.bias = np.array(perm, dtype=np.intp), np.array(bias, dtype=np.float32)  # [A]
        self._rows = np.arange(lookahead)[:, None]  # row index of a [n, E] gather
        self.begin()

    def begin(self) -> None:
        self.rows = 0  # rows of the current step
        self.kept: np.ndarray | None = None  # a long step's rows a next step may read (None: a short step, all)
        self.pending: dict[int, np.ndarray | torch.Tensor] = {}  # layer -> its input at the kept rows [R, H], whose
        # context parts are not computed yet
        self.context: np.ndarray | None = None  # [R, C total] the current step's context parts, as computed
        self.addend = self.bias[None]  # [T, A] the previous step's context parts in own layout, plus the biases
        self._last = None  # the last layer called: a call at or before it starts a new step

    def idle(self) -> bool:
        """Compute one layer's deferred context parts (the runtime calls this while it waits on a load);
        whether more wait."""
        if self.pending:
            layer, x = self.pending.popitem()
            a, b = self.context_at[layer]
            self.context[:, a:b] = _mul(x, self.context_weight[layer])
        return bool(self.pending)

    def predict(self, event, layer, hidden, top_k_index) -> list[Prediction]:
        weight, context_weight = self.weight.get(layer), self.context_weight.get(layer)
        if weight is None and context_weight is None:
            return []
        rows = hidden.shape[0]
        if self._last is None or layer <= self._last or rows != self.rows:
            self._step(rows)
        self._last = layer
        side = weight if weight is not None else context_weight
        if self.kept is None:  # a short step: every row's context, and every row ranked
            x = _input(hidden, side)  # [T, H]
            if context_weight is not None:
                self.pending[layer] = x
            addend = self.addend
        else:  # a long prefill: the context at the kept rows; the heads on a sample of rows
            if context_weight is not None:
                self.pending[layer] = _input(hidden[torch.from_numpy(self.kept)], side)
            sample = np.linspace(rows - 1, 0, RANKED_ROWS).round().astype(np.intp)  # [S] the last row first
            x = _input(hidden[torch.from_numpy(sample)], side)  # [S, H]
            addend = self.addend if self.addend.shape[0] == 1 else self.addend[sample]
        if weight is None:
            return []
        start, end = self.own_at[layer]
        own = _mul(x, weight)  # [T or S, P]
        own += addend[:, start:end]
        targets, lin = self.targets[layer], self.lin_width[layer]
        logits = own[:, :lin]  # [T, n*E]
        if layer in self.mlp:
            half = own[:, lin:]  # [T, n*M], half the MLP's pre-activation
            silu = np.tanh(half)
            silu *= half
            silu += half  # silu(2 half) = half + half tanh(half)
            logits += silu @ self.mlp[layer]  # + silu(2 half) W2
        n = len(targets)
        logits = logits.reshape(own.shape[0], n, -1)  # [T, n, E]
        if own.shape[0] == 1:  # decode: rank the logits, then softmax the ranked row
            logits = logits[0]
            experts = logits.argsort(-1, kind="stable")[:, ::-1]  # [n, E] best first
            values = np.sort(logits, -1)[:, ::-1]
            values = np.exp(values - values[:, :1])
            values /= np.add.reduce(values, -1, keepdims=True)
        else:  # several rows: an expert's best probability over them
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs = (probs / probs.sum(-1, keepdims=True)).max(0)  # [n, E]
            experts = probs.argsort(-1, kind="stable")[:, ::-1]
            values = probs[self._rows[:n], experts]
        return [Prediction(k, target, tuple(e), tuple(v))
                for k, (target, e, v) in enumerate(zip(targets, experts.tolist(), values.tolist()), start=1)]

    def _step(self, rows: int) -> None:
        """A new step of `rows` rows: the context parts of the last step (computed now where `idle()` has
        not) become this step's addend, one row per current row (the same rows for a batch of decode steps,
        each sequence's last prompt row after a prefill, none when they cannot be matched)."""
        while self.idle():
            pass
        previous, c, kept = self.rows, self.context, self.kept
        self.addend = self.bias[None]
        if c is not None and previous and previous % rows == 0 and rows <= MAX_BATCH:
            want = _last_rows(previous, rows)  # [rows] the previous step's rows these continue
            if kept is None:
                c = c if previous == rows else c[want]
            else:
                c = c[np.searchsorted(kept, want)]
            self.addend = c[:, self.perm] + self.bias  # [rows, A]
        self.rows = rows
        if rows <= RANKED_ROWS:
            self.kept = None
        else:  # a long step keeps the inputs at each sequence's last row, for any decode batch up to MAX_BATCH
            batches = [b for b in range(1, min(rows, MAX_BATCH) + 1) if rows % b == 0]
            self.kept = np.unique(np.concatenate([_last_rows(rows, b) for b in batches]))
        kept_rows = rows if self.kept is None else len(self.kept)
        self.context = np.zeros((kept_rows, self.context_width), np.float32) if self.context_width else None


def _last_rows(total: int, batch: int) -> np.ndarray:
    """Each sequence's last row, when `total` rows are `batch` sequences one after another. [batch]"""
    every = total // batch
    return np.arange(every - 1, total, every)


def _input(x: torch.Tensor, weight: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """A copy of the rows `x` as `_mul` with this weight takes them: float32 numpy on the host (numpy has no
    bfloat16), or a tensor on the weight's device in its dtype. A copy: the caller may keep it past the step."""
    if isinstance(weight, np.ndarray):
        return x.numpy(force=True).copy() if x.dtype == torch.float32 else x.float().numpy(force=True)
    return x.to(weight.device, weight.dtype, copy=True)


def _mul(x: np.ndarray | torch.Tensor, weight: np.ndarray | torch.Tensor) -> np.ndarray:
    """x @ weight on the weight's side, back on the host as numpy."""
    if isinstance(weight, np.ndarray):
        return x @ weight
    return (x @ weight).cpu().numpy()


def _mlp_width(head: Head) -> int:
    return 0 if head.mlp_in is None else head.mlp_in.shape[0]
