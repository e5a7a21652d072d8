"""Learned reuse heads: one head per MoE layer scoring how likely that layer routes to each of its experts
again within the next few tokens, which the `reuse` eviction policy (policies.Reuse) ranks slots by.

Why: at decode, a layer's experts come back only at the next token, so what an eviction should know is
which resident experts the next tokens will route to. LRU and its kin guess from the past alone; Belady
knows the future and, on the bundled model's 512-token workload at a 25% cache, hits 0.60 of decode
lookups against LRU's 0.34 (SIMULATED). Knowing only whether an expert returns within two tokens already
recovers most of that, and that much a small head can learn from what the runtime holds when the layer
routes: its MoE input, the experts it routed to, and a decayed count of the experts it routed to
before. Trained on a trace (best one with decode steps, `trace record --new-tokens`: greedy decode
repeats itself in ways teacher-forced text does not), stored in the predictor sidecar beside the
lookahead heads. Legend: T rows, H hidden, E experts, K routed per token, M head width.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from activemoe.errors import UserError
from activemoe.ids import ExpertId
from activemoe.learned import read_sidecar
from activemoe.trace import Trace

PREFIX = "reuse."  # a reuse head's tensors in the predictor sidecar: reuse.LAYER.NAME
HORIZON, HALF_LIFE, WIDTH = 3, 8.0, 64  # tokens ahead a reuse counts; the history's half-life in tokens


@dataclass(frozen=True)
class ReuseHead:
    mlp_in: torch.Tensor  # [M, H + 2E] on [MoE input, routed one-hot, decayed history]
    mlp_in_bias: torch.Tensor  # [M]
    mlp_out: torch.Tensor  # [E, M]
    bias: torch.Tensor  # [E]  logits = mlp_out silu(mlp_in x + mlp_in_bias) + bias


@dataclass(frozen=True)
class ReuseHeads:
    heads: dict[int, ReuseHead]  # MoE layer -> head
    half_life: float  # tokens: the history feature's decay, as trained
    horizon: int  # tokens ahead the heads were trained to see a reuse

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}{layer}.{name}": getattr(head, name) for layer, head in self.heads.items()
                for name in ("mlp_in", "mlp_in_bias", "mlp_out", "bias")}

    def meta(self) -> dict[str, str]:
        return {"reuse_half_life": str(self.half_life), "reuse_horizon": str(self.horizon)}

    @classmethod
    def from_file(cls, path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> ReuseHeads:
        """From a sidecar's reuse tensors (read_sidecar with PREFIX) and its metadata."""
        parts: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            _, layer, name = key.split(".", 2)
            parts.setdefault(int(layer), {})[name] = t.float()
        if not parts:
            raise UserError(f"predictor file {path} has no reuse heads (--policy reuse ranks experts by them): add "
                            f"them with `activemoe train-predictor --reuse-only --trace TRACE --out {path}`")
        try:
            return cls({layer: ReuseHead(**p) for layer, p in parts.items()}, float(meta["reuse_half_life"]),
                       int(meta["reuse_horizon"]))
        except (TypeError, KeyError, ValueError) as e:
            raise UserError(f"predictor file {path} has malformed reuse heads: {e}") from None


def _decayed(onehot: np.ndarray, starts: np.ndarray, half_life: float) -> np.ndarray:
    """Each row's decayed count of the experts routed at its row and before, restarting where `starts`. [N, E]"""
    out, h, a = np.empty_like(onehot), np.zeros(onehot.shape[1], onehot.dtype), 0.5 ** (1 / half_life)
    for i, row in enumerate(onehot):
        h = row if starts[i] else h * a + row
        out[i] = h
    return out


def examples(trace: Trace, layer: int, horizon: int, half_life: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's training rows: features [N, H + 2E] and targets [N, E] (1 where the expert is routed at
    that layer within the next `horizon` tokens), over tokens followed by `horizon` more in the trace."""
    rows = torch.nonzero(trace.layer == layer).flatten()
    rows = rows[torch.argsort(trace.token[rows], stable=True)]
    tokens = trace.token[rows].numpy()
    n, E = len(rows), trace.num_experts
    onehot = np.zeros((n, E), np.float32)
    np.put_along_axis(onehot, trace.experts[rows].long().numpy(), 1.0, 1)
    starts = np.ones(n, bool)
    starts[1:] = tokens[1:] != tokens[:-1] + 1
    history = _decayed(onehot, starts, half_life)
    target, valid = np.zeros_like(onehot), np.zeros(n, bool)
    valid[:n - horizon] = tokens[horizon:] == tokens[:n - horizon] + horizon
    for d in range(1, horizon + 1):
        target[:n - d] = np.maximum(target[:n - d], onehot[d:])
    H = trace.hidden.shape[1]
    x = torch.empty(int(valid.sum()), H + 2 * E, dtype=torch.float32)  # filled part by part, the valid rows only:
    x[:, :H] = trace.hidden[rows[torch.from_numpy(valid)]]  # a whole-split trace's rows are gigabytes a copy
    x[:, H:H + E] = torch.from_numpy(onehot[valid])
    x[:, H + E:] = torch.from_numpy(history[valid])
    return x, torch.from_numpy(target[valid])


def train_reuse_heads(trace: Trace, horizon: int = HORIZON, half_life: float = HALF_LIFE, width: int = WIDTH,
                      epochs: int = 8, lr: float = 3e-3, seed: int = 0,
                      on_progress: Callable[[int, int], None] | None = None) -> ReuseHeads:
    """An MLP per MoE layer, binary cross-entropy on each expert's return within `horizon` tokens (Adam)."""
    if trace.hidden is None:
        raise UserError("the trace has no hidden states; record it with --hidden")
    if horizon < 1 or width < 1 or half_life <= 0:
        raise UserError("the reuse horizon and width must be at least 1 and the half-life positive")
    generator = torch.Generator().manual_seed(seed)
    heads = {}
    for n, layer in enumerate(trace.layers):
        x, y = examples(trace, layer, horizon, half_life)
        if not len(x):
            raise UserError(f"the trace has no run of {horizon + 1} consecutive tokens to train reuse heads on")
        w1 = (torch.randn(width, x.shape[1], generator=generator) / x.shape[1] ** 0.5).requires_grad_()
        b1 = torch.zeros(width, requires_grad=True)
        w2 = (torch.randn(y.shape[1], width, generator=generator) / width ** 0.5).requires_grad_()
        prior = y.mean(0).clamp(1e-4, 1 - 1e-4)
        b2 = torch.logit(prior).requires_grad_()  # starts at each expert's base rate
        opt = torch.optim.Adam([w1, b1, w2, b2], lr=lr)
        with torch.enable_grad():
            for _ in range(epochs):
                for batch in torch.randperm(len(x), generator=generator).split(1024):
                    logits = F.silu(x[batch] @ w1.T + b1) @ w2.T + b2
                    loss = F.binary_cross_entropy_with_logits(logits, y[batch])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        heads[layer] = ReuseHead(w1.detach(), b1.detach(), w2.detach(), b2.detach())
        if on_progress:
            on_progress(n + 1, len(trace.layers))
    return ReuseHeads(heads, half_life, horizon)


class ReuseScorer:
    """The runtime side: called with each MoE layer's input and routing (before its loads are queued), it keeps
    the layer's decayed routing history and its head's scores, which `score` hands the Reuse policy. A
    prefill's rows are consecutive tokens (the history takes them in order, the scores come from the last);
    a decode batch's rows are parallel sequences (their mean routing enters the history, an expert scores
    its best over the rows). Numpy on the host, as the learned lookahead heads (their matmuls are this small);
    the first layer is split by input, so the routed one-hot is a sum of K rows, not a matmul. Only that
    first matmul runs in `observe`; the rest of a layer's head runs when an eviction first asks for its
    scores, or in `idle` (the runtime calls it while it waits on a load): when nothing is evicted, nothing
    more is computed, and the scores are the same whenever they are."""

    def __init__(self, heads: ReuseHeads, num_experts: int):
        self.num_experts, self.decay = num_experts, 0.5 ** (1 / heads.half_life)
        self.weights = {}
        for layer, h in heads.heads.items():
            w1 = h.mlp_in.T.contiguous().numpy()  # [H + 2E, M]
            H = w1.shape[0] - 2 * num_experts
            self.weights[layer] = (w1[:H], w1[H:H + num_experts], w1[H + num_experts:], h.mlp_in_bias.numpy(),
                                   h.mlp_out.T.contiguous().numpy(), h.bias.numpy())
        self._lock = threading.Lock()  # score() runs in the loader's evict loop, idle() on the compute path
        self.begin()

    def begin(self) -> None:
        self.history: dict[int, np.ndarray] = {}  # layer -> [E] decayed routing counts
        self.scores: dict[int, list[float]] = {}  # layer -> [E] logits of a return within the horizon
        self.pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # layer -> (first-layer part [t, M], history)

    def score(self, expert: ExpertId) -> float:
        if expert.layer in self.pending:
            with self._lock:
                self._finish(expert.layer)
        scores = self.scores.get(expert.layer)
        return -np.inf if scores is None else scores[expert.expert]

    def idle(self) -> bool:
        """Finish one layer's scores; whether more wait."""
        with self._lock:
            if self.pending:
                self._finish(next(iter(self.pending)))
            return bool(self.pending)

    def observe(self, layer: int, hidden: torch.Tensor, routed: list[int], parallel: bool) -> None:
        """`hidden` [T, H] is the layer's MoE input, `routed` its routing, row by row ([T * K] expert ids);
        `parallel`: the rows are a decode batch's sequences rather than consecutive tokens."""
        weights = self.weights.get(layer)
        if weights is None:
            return
        w_hidden, w_routed = weights[:2]
        T = hidden.shape[0]
        history = self.history.get(layer)
        history = np.zeros(self.num_experts, np.float32) if history is None else history
        if T == 1 and len(set(routed)) == len(routed):  # a decode step of one sequence (the hot path): the
            # same arithmetic as a batch of one, without the scatter-add and gathers a batch or a prompt needs
            history = history * self.decay
            history[routed] += 1.0
            x, part = hidden, w_routed[routed].sum(0)  # [1, H], [M]
        else:
            rows = np.asarray(routed, dtype=np.intp).reshape(T, -1)  # [T, K]
            if parallel:
                history = history * self.decay
                np.add.at(history, rows, 1.0 / T)
                x, part = hidden, w_routed[rows].sum(1)  # [T, H], [T, M]
            else:
                steps = self.decay ** np.arange(T - 1, -1, -1, dtype=np.float32)  # [T] the last row weighs 1
                history = history * self.decay ** T
                np.add.at(history, rows, steps[:, None])
                x, part = hidden[-1:], w_routed[rows[-1]].sum(0)  # [1, H], [M]
        self.history[layer] = history
        x = x.detach().numpy() if x.dtype == torch.float32 and x.device.type == "cpu" else x.float().numpy(force=True)
        self.pending[layer] = (x @ w_hidden + part, history)  # [t, M]

    def _finish(self, layer: int) -> None:
        """Under the lock: the rest of the head on a pending first-layer part."""
        job = self.pending.pop(layer, None)
        if job is None:
            return
        pre, history = job
        _, _, w_history, b1, w2, b2 = self.weights[layer]
        pre = pre + (history @ w_history + b1)
        # silu, then [E]; a list: the evict loop reads one score per resident expert
        self.scores[layer] = ((pre * (0.5 + 0.5 * np.tanh(pre / 2))) @ w2 + b2).max(0).tolist()


def has_reuse_heads(path) -> bool:
    """Whether a predictor file holds reuse heads (reads its header only)."""
    try:
        with safe_open(path, "pt") as f:
            return any(k.startswith(PREFIX) for k in f.keys())
    except (SafetensorError, OSError):
        return False


def load_reuse_heads(path, expected_shape_id: str) -> ReuseHeads:
    tensors, meta = read_sidecar(path, expected_shape_id, PREFIX)  # the lookahead heads' tensors stay unread
    return ReuseHeads.from_file(path, tensors, meta)
