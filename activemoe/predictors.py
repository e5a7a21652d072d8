"""Predictors behind one small protocol: given the MoE layer that is routing now, name experts of the
next `lookahead` MoE-layer events with a score each. They know nothing about memory.

Events count MoE-layer forward calls within one generation (layer order, then token steps).
Predictors other than the oracle look ahead within the current token's step only. A predictor whose
`sees_tokens` is true is also called before the first MoE layer of each forward, with layer TOKENS
and the token embeddings: its distance k then names the k-th MoE layer of that step.
Legend: T tokens, K routed per token, H hidden, E experts.
"""
from __future__ import annotations

import bisect
import math
from typing import NamedTuple, Protocol

import numpy as np
import torch

from activemoe.errors import UserError
from activemoe.families import RouterParts
from activemoe.ids import ExpertId

Routing = tuple[int, tuple[int, ...]]  # (decoder layer, sorted routed expert ids) of one MoE-layer event
TOKENS = -1  # the source "layer" of predictions made from the token embeddings, before the first MoE layer


class Prediction(NamedTuple):  # a tuple: cheap to build, several per MoE layer
    distance: int  # events ahead (1 = the next MoE layer)
    layer: int  # decoder layer of the target event
    experts: tuple[int, ...]  # best first
    probs: tuple[float, ...]
    budget: int | None = None  # experts worth prefetching; None: the runtime's configured budget


class Predictor(Protocol):
    name: str

    def begin(self) -> None:
        """A new generation starts (event 0)."""

    def predict(self, event: int, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor) -> list[Prediction]:
        """`hidden` [T, H] is the MoE input of `layer`; `top_k_index` [T, K] its routing."""

    # Optional: `idle() -> bool` does a piece of work the predictor deferred from predict() (work only a later
    # call needs), returning whether more is left. The runtime calls it while it waits on a load; what is left
    # at the next call, that call does.


class Announcer:
    """Predictions to loader requests, and their live recall: per target, the first `budget` experts
    (the prediction's own budget, else the configured one, else the model's top-k), each (expert, due
    event) handed over once (the loader keeps what it was told). Recall@k is scored over decode steps:
    the share of a layer's routed experts named k layers earlier. The runtime and the simulator share it."""

    def __init__(self, budget: int | None):
        self.budget = budget
        self.sent: dict[int, set[ExpertId]] = {}  # due event -> experts already handed over for it
        self.predicted: dict[int, dict[int, set[int]]] = {}  # due event -> distance -> experts named for it
        self.recall: dict[int, tuple[int, int]] = {}  # distance -> (named and routed, routed)

    def begin(self) -> None:
        self.sent.clear()
        self.predicted.clear()

    def __call__(self, event: int, routed: list[int], top_k: int, decode: bool,
                 predictions: list[Prediction]) -> list[tuple[ExpertId, int, float]]:
        """Score what was named for `event`, then the requests (expert, due event, probability) to make."""
        named_at = self.predicted.pop(event, {})
        if decode:  # prefill layers route many tokens at once and are not scored
            for distance, named in named_at.items():
                hit, total = self.recall.get(distance, (0, 0))
                self.recall[distance] = (hit + len(named.intersection(routed)), total + len(routed))
        for due in [d for d in self.sent if d <= event]:
            del self.sent[due]
        return self.ahead(event, predictions, self.budget or top_k)

    def ahead(self, event: int, predictions: list[Prediction], budget: int) -> list[tuple[ExpertId, int, float]]:
        """The requests for predictions made at `event` (-1 + the first MoE layer's event, for TOKENS)."""
        out = []
        for p in predictions:
            experts = p.experts[:budget if p.budget is None else p.budget]
            due = event + p.distance
            self.predicted.setdefault(due, {})[p.distance] = set(experts)
            sent = self.sent.setdefault(due, set())
            out += [(eid, due, prob) for e, prob in zip(experts, p.probs)
                    if (eid := ExpertId(p.layer, e)) not in sent and not sent.add(eid)]
        return out

    def recall_and_reset(self) -> dict[str, float]:
        out = {str(k): hit / total for k, (hit, total) in sorted(self.recall.items()) if total}
        self.recall = {}
        return out


class NoPredictor:
    """Prefetch nothing: the reactive baseline."""

    name = "none"
    may_rest = False  # it costs nothing: its stats should not report it resting

    def begin(self) -> None:
        pass

    def predict(self, event, layer, hidden, top_k_index) -> list[Prediction]:
        return []


class OraclePredictor:
    """Replays the routing recorded by a previous identical run: the upper bound of prediction.

    If the live routing departs from the recording (another prompt or sampling), it stops predicting.
    """

    name = "oracle"
    may_rest = False  # Belady's eviction reads its clock, which predict() advances

    def __init__(self, trace: list[Routing], lookahead: int):
        if lookahead < 1:
            raise UserError("--lookahead must be at least 1")
        self.trace, self.lookahead = trace, lookahead
        self.diverged = False
        self.event = 0
        self._uses: dict[ExpertId, list[int]] = {}
        for i, (layer, experts) in enumerate(trace):
            for e in experts:
                self._uses.setdefault(ExpertId(layer, e), []).append(i)

    def begin(self) -> None:
        self.diverged = False
        self.event = 0

    def next_use(self, eid: ExpertId, after: int) -> float:
        """The first event later than `after` that routes to `eid`; inf if none (or diverged)."""
        uses = self._uses.get(eid, ())
        i = bisect.bisect_right(uses, after)
        return uses[i] if i < len(uses) and not self.diverged else math.inf

    def now(self) -> int:
        return self.event

    def predict(self, event, layer, hidden, top_k_index) -> list[Prediction]:
        self.event = event
        routed = tuple(top_k_index.unique().tolist())
        if self.diverged or event >= len(self.trace) or self.trace[event] != (layer, routed):
            self.diverged = True
            return []
        ahead = self.trace[event + 1:event + 1 + self.lookahead]
        return [Prediction(k, target_layer, experts, (1.0,) * len(experts))
                for k, (target_layer, experts) in enumerate(ahead, start=1)]


class StackedHeads:
    """Per source layer, the linear scorers of its next `lookahead` layers stacked into one matrix, so
    a prediction costs one matmul, one softmax and one sort per layer."""

    def __init__(self, heads: dict[int, list[tuple]]):
        # source layer -> [(target layer, W [E, H], b [E])], nearest first
        self.targets = {src: [t for t, *_ in items] for src, items in heads.items()}
        # stored transposed and contiguous, so a prediction is addmm(bias, x, weight) with no view per call
        self.weight = {src: torch.cat([h[1] for h in items]).T.contiguous() for src, items in heads.items() if items}  # [H, k*E]
        self.bias = {src: torch.cat([h[2] for h in items]) for src, items in heads.items() if items}  # [k*E]

    def predict(self, layer: int, hidden: torch.Tensor) -> list[Prediction]:
        weight = self.weight.get(layer)
        if weight is None:
            return []
        targets = self.targets[layer]
        x = hidden.float()
        logits = torch.addmm(self.bias[layer], x, weight)  # [T, k*E]
        probs = logits.view(len(targets), -1).softmax(-1) if x.shape[0] == 1 else (  # decode: one token
            logits.view(x.shape[0], len(targets), -1).softmax(-1).amax(0))  # [k, E]
        values, experts = probs.sort(-1, descending=True)
        return [Prediction(k, target, tuple(e), tuple(v))
                for k, (target, e, v) in enumerate(zip(targets, experts.tolist(), values.tolist()), start=1)]


def pregate_weights(routers: dict[int, RouterParts], src: int, dst: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer `dst`'s router behind its own norm, as a linear map of layer `src`'s MoE input: that input
    is RMS-normalised with src's gain, so dividing it out and applying dst's gives dst's norm."""
    s, d = routers[src], routers[dst]
    weight = d.weight.float().clone()  # [E, H]
    if s.norm_weight is not None and d.norm_weight is not None:
        weight = weight * (d.norm_weight.float() / s.norm_weight.float().clamp_min(1e-6))
    bias = d.bias.float().clone() if d.bias is not None else weight.new_zeros(weight.shape[0])  # [E], on the router's device
    return weight, bias


class PregatePredictor:
    """Training-free lookahead: layer N+k's own router, behind its own norm, applied to layer N's MoE input."""

    name = "pregate"

    def __init__(self, routers: dict[int, RouterParts], lookahead: int):
        layers = sorted(routers)
        self.heads = StackedHeads({src: [(dst, *pregate_weights(routers, src, dst))
                                         for dst in layers[i + 1:i + 1 + lookahead]]
                                   for i, src in enumerate(layers)})

    def begin(self) -> None:
        pass

    def predict(self, event, layer, hidden, top_k_index) -> list[Prediction]:
        return self.heads.predict(layer, hidden)


class HistoryPredictor:
    """Expert-transition statistics: how often expert e at layer L-j (j = 0, 1, 2) of a token was
    followed by expert e' at layer L+k of the same token. Learned online as the model runs (and from
    traces via `observe`). In numpy: a call is a few tiny array operations, which torch would pay a
    dispatch for each."""

    name = "history"

    def __init__(self, layers: list[int], num_experts: int, lookahead: int, depth: int = 3):
        self.layers, self.lookahead, self.depth = sorted(layers), lookahead, depth
        self.position = {layer: i for i, layer in enumerate(self.layers)}
        n = len(self.layers)
        self.counts = np.zeros((n, n, num_experts, num_experts), np.float32)  # [src, tgt, e_src, e_tgt]
        self._recent: dict[int, np.ndarray] = {}  # position -> [T, K] routing of the current step

    def begin(self) -> None:
        self._recent.clear()

    def observe(self, position: int, top_k_index: torch.Tensor) -> None:
        """Record a layer's routing [T, K] and learn the transitions into it from the earlier layers."""
        if position == 0:
            self._recent.clear()
        routing = top_k_index.numpy(force=True)  # [T, K]
        num = self.counts.shape[-1]
        for src in range(max(0, position - self.depth - self.lookahead), position):
            prev = self._recent.get(src)
            if prev is not None and prev.shape[0] == routing.shape[0]:
                pairs = (prev[:, :, None] * num + routing[:, None, :]).reshape(-1)  # [T*K*K] flat (e_src, e_tgt)
                self.counts[src, position] += np.bincount(pairs, minlength=num * num).reshape(num, num)
        self._recent[position] = routing

    def predict(self, event, layer, hidden, top_k_index) -> list[Prediction]:
        position = self.position[layer]
        self.observe(position, top_k_index)
        out = []
        for k in range(1, self.lookahead + 1):
            target = position + k
            if target >= len(self.layers):
                break
            score = np.zeros(self.counts.shape[-1], np.float32)
            for src in range(max(0, position - self.depth + 1), position + 1):
                rows = self.counts[src, target][self._recent[src].reshape(-1)]  # [T*K, E]
                score += (rows / np.maximum(rows.sum(-1, keepdims=True), 1)).sum(0)
            experts = np.argsort(-score, kind="stable")  # [E] best first, ties by expert id
            probs = score[experts] / max(1e-9, float(score.sum()))
            out.append(Prediction(k, self.layers[target], tuple(experts.tolist()), tuple(probs.tolist())))
        return out


class AdaptivePredictor:
    """Combines predictors by their measured per-(layer, k) recall, and sizes each prefetch from its
    confidence: the fewest experts whose combined probability reaches `mass`, at most `max_budget`,
    and none when the best component's recall for that target is under `min_recall` (a wrong guess
    would only evict a resident expert)."""

    name = "adaptive"

    def __init__(self, components: list, top_k: int, mass: float = 0.8, min_recall: float = 0.3,
                 max_budget: int | None = None, warmup: int = 16):
        self.components, self.top_k, self.mass, self.min_recall = components, top_k, mass, min_recall
        self.max_budget, self.warmup = max_budget or 2 * top_k, warmup
        self.hits: dict[tuple[str, int, int], list[int]] = {}  # (component, layer, k) -> [named & routed, routed]
        self._pending: dict[int, list[tuple[str, int, set[int]]]] = {}  # target layer -> (component, k, named)

    def begin(self) -> None:
        self._pending.clear()
        for c in self.components:
            c.begin()

    def recall(self, name: str, layer: int, k: int) -> float:
        hit, total = self.hits.get((name, layer, k), (0, 0))
        return hit / total if total >= self.warmup * self.top_k else 0.5  # an uninformed prior until measured

    @property
    def sees_tokens(self) -> bool:
        return any(getattr(c, "sees_tokens", False) for c in self.components)

    def idle(self) -> bool:
        # a piece from each component in turn until one says more is left (one that just finished says no)
        return any(c.idle() for c in self.components if hasattr(c, "idle"))

    def predict(self, event, layer, hidden, top_k_index) -> list[Prediction]:
        components = self.components
        if layer == TOKENS:
            components = [c for c in components if getattr(c, "sees_tokens", False)]
        elif top_k_index.shape[0] == 1:  # score what the components named for this layer (decode steps)
            routed = set(top_k_index[0].tolist())
            for name, k, named in self._pending.pop(layer, []):
                entry = self.hits.setdefault((name, layer, k), [0, 0])
                entry[0] += len(named & routed)
                entry[1] += len(routed)
        by_target: dict[tuple[int, int], list[tuple[str, Prediction]]] = {}
        for c in components:
            for p in c.predict(event, layer, hidden, top_k_index):
                by_target.setdefault((p.layer, p.distance), []).append((c.name, p))
                self._pending.setdefault(p.layer, []).append((c.name, p.distance, set(p.experts[:self.top_k])))
        out = []
        for (target, k), preds in by_target.items():
            weights = {name: self.recall(name, target, k) for name, _ in preds}
            combined: dict[int, float] = {}
            for name, p in preds:
                for e, prob in zip(p.experts, p.probs):
                    combined[e] = combined.get(e, 0.0) + weights[name] * prob
            total = sum(combined.values()) or 1.0
            ranked_experts = sorted(combined, key=combined.get, reverse=True)
            probs = tuple(combined[e] / total for e in ranked_experts)
            budget = 0
            if max(weights.values()) >= self.min_recall:
                covered = 0.0
                while budget < min(self.max_budget, len(probs)) and covered < self.mass:
                    covered += probs[budget]
                    budget += 1
            out.append(Prediction(k, target, tuple(ranked_experts), probs, budget))
        return out


PREDICTORS = ("none", "oracle", "pregate", "history", "learned", "adaptive")
