"""workload.py: what the simulator replays — per-token, per-MoE-layer routed expert ids — from a
recorded trace (trace.py) or generated synthetically at any model shape with named parameters
(labelled synthetic everywhere). It turns a workload into MoE-layer events (one prefill forward, then
one decode step per token), as the engine's runtime sees them. It knows nothing about caches or time.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from activemoe.errors import UserError

# N tokens, L MoE layers, K routed per token


@dataclass(frozen=True)
class Event:
    layer: int
    routed: tuple[int, ...]  # sorted distinct expert ids
    counts: tuple[int, ...]  # activations per routed expert (tokens routed to it), aligned with `routed`
    tokens: int
    first: int = 0  # workload index of the event's first token


@dataclass(frozen=True)
class Workload:
    layers: tuple[int, ...]  # decoder layer of each MoE layer
    num_experts: int
    top_k: int
    experts: np.ndarray  # [N, L, K] routed expert ids
    label: str  # "recorded: PATH" or "synthetic: SPEC"
    hidden: np.ndarray | None = None  # [N, L, H] float16: each MoE layer's input (a trace recorded with --hidden)
    embedded: np.ndarray | None = None  # [N, H] float16: the token embeddings (idem)
    shape_id: str | None = None  # the recorded model's shape digest (trace.shape_id)

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    def head(self, tokens: int) -> Workload:
        """The first `tokens` tokens."""
        cut = lambda a: None if a is None else a[:tokens]  # noqa: E731
        return replace(self, experts=self.experts[:tokens], hidden=cut(self.hidden), embedded=cut(self.embedded))

    def events(self, prefill_tokens: int = 0) -> list[Event]:
        """The first `prefill_tokens` tokens in one forward, then one decode step per token."""
        out = []
        n_layers = len(self.layers)
        if prefill_tokens:
            block = self.experts[:prefill_tokens]  # [P, L, K]
            for i, layer in enumerate(self.layers):
                ids, counts = np.unique(block[:, i], return_counts=True)
                out.append(Event(layer, tuple(ids.tolist()), tuple(counts.tolist()), prefill_tokens))
        rows = np.sort(self.experts[prefill_tokens:], axis=-1).tolist()  # [N-P, L, K]
        for n, token in enumerate(rows, start=prefill_tokens):
            for i in range(n_layers):
                ids = token[i]
                if len(set(ids)) == len(ids):
                    out.append(Event(self.layers[i], tuple(ids), (1,) * len(ids), 1, n))
                else:
                    u, c = np.unique(ids, return_counts=True)
                    out.append(Event(self.layers[i], tuple(u.tolist()), tuple(c.tolist()), 1, n))
        return out

    def check_shape(self, moe_layers: int, num_experts: int, top_k: int, name: str) -> None:
        got = (len(self.layers), self.num_experts, self.top_k)
        if got != (moe_layers, num_experts, top_k):
            raise UserError(f"the trace ({got[0]} MoE layers, {got[1]} experts, top-{got[2]}) does not match "
                            f"shape {name} ({moe_layers} MoE layers, {num_experts} experts, top-{top_k})")


def from_trace(trace, label: str) -> Workload:
    """A recorded trace.Trace as a workload (tokens in order; every token must have every MoE layer)."""
    layers = tuple(trace.layers)
    position = {layer: i for i, layer in enumerate(layers)}
    token = trace.token.numpy()
    layer_pos = np.array([position.get(int(x), -1) for x in trace.layer.tolist()])
    if (layer_pos < 0).any():
        raise UserError(f"{label}: rows name layers outside the trace's layer list {list(layers)}")
    tokens = np.unique(token)
    if len(token) != len(tokens) * len(layers):
        raise UserError(f"{label}: not every token has a row for every MoE layer; the trace is damaged")
    k = trace.experts.shape[1]
    experts = np.full((len(tokens), len(layers), k), -1, dtype=np.int64)
    where = np.searchsorted(tokens, token), layer_pos
    experts[where] = trace.experts.numpy()
    if (experts < 0).any() or (experts >= trace.num_experts).any():
        raise UserError(f"{label}: expert ids outside 0..{trace.num_experts - 1}; the trace is damaged")
    hidden = embedded = None
    if trace.hidden is not None:
        hidden = np.zeros((len(tokens), len(layers), trace.hidden.shape[1]), dtype=np.float16)
        hidden[where] = trace.hidden.numpy()
        if trace.tokens is not None and len(trace.tokens) == len(tokens):
            embedded = trace.tokens.numpy()
    return Workload(layers, trace.num_experts, k, experts, label, hidden, embedded, trace.meta.get("shape_id"))


@dataclass(frozen=True)
class SyntheticSpec:
    """Named parameters of a synthetic routing trace."""

    tokens: int = 1000
    skew: float = 1.0  # Zipf exponent of expert popularity within a layer (0: uniform)
    reuse: float = 0.3  # probability a routed slot repeats one of the previous token's experts at that layer
    corr: float = 0.3  # probability it follows the expert the same slot chose one layer earlier (a fixed map)
    seed: int = 0

    @staticmethod
    def parse(text: str) -> SyntheticSpec:
        """'tokens=1000,skew=1.0,reuse=0.3,corr=0.3,seed=0' (any subset; defaults for the rest)."""
        values = {}
        names = {f: type(getattr(SyntheticSpec(), f)) for f in ("tokens", "skew", "reuse", "corr", "seed")}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            if key not in names or not value:
                raise UserError(f"bad --synthetic item {part!r}; use NAME=VALUE with NAME in {', '.join(names)}")
            try:
                values[key] = names[key](value)
            except ValueError:
                raise UserError(f"bad --synthetic value {part!r}") from None
        spec = SyntheticSpec(**values)
        if spec.tokens < 1 or spec.skew < 0 or not (0 <= spec.reuse <= 1 and 0 <= spec.corr <= 1):
            raise UserError("--synthetic needs tokens >= 1, skew >= 0, and reuse, corr in [0, 1]")
        return spec

    def label(self) -> str:
        return (f"synthetic: tokens={self.tokens},skew={self.skew},reuse={self.reuse},corr={self.corr},"
                f"seed={self.seed}")


def synthetic(spec: SyntheticSpec, moe_layers: int, num_experts: int, top_k: int) -> Workload:
    """Each token, each layer, each of the K slots: with probability `reuse` one of the previous token's
    experts at this layer; else with probability `corr` the fixed image of the expert this slot chose one
    layer earlier; else a draw from the layer's Zipf(skew) popularity. Duplicates are redrawn."""
    if top_k > num_experts:
        raise UserError(f"top-k {top_k} exceeds {num_experts} experts")
    rng = np.random.default_rng(spec.seed)
    rank_weight = 1.0 / np.arange(1, num_experts + 1) ** spec.skew
    popularity = [rng.permutation(num_experts) for _ in range(moe_layers)]  # rank -> expert, per layer
    follow = [rng.permutation(num_experts) for _ in range(moe_layers)]  # expert at L-1 -> expert at L
    p = rank_weight / rank_weight.sum()
    experts = np.zeros((spec.tokens, moe_layers, top_k), dtype=np.int64)
    u = rng.random((spec.tokens, moe_layers, top_k, 2))
    draws = rng.choice(num_experts, size=(spec.tokens, moe_layers, top_k * 4), p=p)
    for t in range(spec.tokens):
        for layer in range(moe_layers):
            chosen: list[int] = []
            spare = iter(draws[t, layer].tolist())
            for k in range(top_k):
                e = None
                if t and u[t, layer, k, 0] < spec.reuse:
                    e = int(experts[t - 1, layer, k])
                elif layer and u[t, layer, k, 1] < spec.corr:
                    e = int(follow[layer][experts[t, layer - 1, k]])
                while e is None or e in chosen:
                    r = next(spare, None)
                    e = int(popularity[layer][r if r is not None else rng.choice(num_experts, p=p)])
                chosen.append(e)
            experts[t, layer] = chosen
    return Workload(tuple(range(moe_layers)), num_experts, top_k, experts, spec.label())
