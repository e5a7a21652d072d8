"""Predictor evaluation on a recorded trace (teacher-forced): recall@k and precision@k per target
layer and lookahead k at a budget of named experts, and each predictor's cost per token: alone
(`evaluate`), and in place, on an engine's decode path (`cost_in_place`).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from activemoe.config import SamplingConfig
from activemoe.predictors import TOKENS, Predictor
from activemoe.trace import Trace


GREEDY = SamplingConfig(do_sample=False)


@dataclass
class PredictorScore:
    name: str
    budget: int
    hits: dict[tuple[int, int], int] = field(default_factory=dict)  # (target layer, k) -> named and routed
    routed: dict[tuple[int, int], int] = field(default_factory=dict)  # (target layer, k) -> routed
    named: dict[tuple[int, int], int] = field(default_factory=dict)  # (target layer, k) -> named
    seconds: float = 0.0
    tokens: int = 0

    def recall(self, k: int, layer: int | None = None) -> float:
        keys = [key for key in self.routed if key[1] == k and (layer is None or key[0] == layer)]
        total = sum(self.routed[key] for key in keys)
        return sum(self.hits[key] for key in keys) / total if total else float("nan")

    def precision(self, k: int, layer: int | None = None) -> float:
        keys = [key for key in self.named if key[1] == k and (layer is None or key[0] == layer)]
        total = sum(self.named[key] for key in keys)
        return sum(self.hits[key] for key in keys) / total if total else float("nan")

    @property
    def us_per_token(self) -> float:
        return self.seconds / self.tokens * 1e6 if self.tokens else 0.0


def evaluate(trace: Trace, predictor: Predictor, budget: int, max_tokens: int | None = None,
             device: torch.device | str = "cpu") -> PredictorScore:
    """Replay the trace token by token through the predictor, as the runtime would at decode time, its
    inputs on `device` (the model's, where the runtime holds them)."""
    if trace.hidden is None and predictor.name in ("pregate", "learned"):
        from activemoe.errors import UserError

        raise UserError(f"predictor {predictor.name} needs hidden states: record the trace with --hidden")
    score = PredictorScore(predictor.name, budget)
    layers = trace.layers
    predictor.begin()  # one generation: a predictor may carry state from token to token
    sees_tokens = getattr(predictor, "sees_tokens", False) and trace.tokens is not None
    for n, (token, rows) in enumerate(trace.by_token().items()):
        if max_tokens is not None and n >= max_tokens:
            break
        # what the runtime already holds (in float32, the bundled model's dtype; traces store float16)
        inputs = [(n * len(layers) + i, layer, trace.hidden[rows[layer]:rows[layer] + 1].float().to(device)
                   if trace.hidden is not None else torch.zeros(1, 1), trace.experts[rows[layer]:rows[layer] + 1].long())
                  for i, layer in enumerate(layers) if layer in rows]
        if sees_tokens:  # before the first MoE layer: the token's embedding
            inputs.insert(0, (n * len(layers) - 1, TOKENS, trace.tokens[token:token + 1].float().to(device), None))
        start = time.perf_counter()  # the predictor's own time: its calls, as the runtime makes them
        predictions = [predictor.predict(*args) for args in inputs]
        score.seconds += time.perf_counter() - start
        named: dict[tuple[int, int], set[int]] = {}
        for p in (p for ps in predictions for p in ps):
            named[(p.layer, p.distance)] = set(p.experts[:budget])
        score.tokens += 1
        for (layer, k), experts in named.items():
            if layer in rows:
                routed = set(trace.experts[rows[layer]].tolist())
                key = (layer, k)
                score.hits[key] = score.hits.get(key, 0) + len(experts & routed)
                score.routed[key] = score.routed.get(key, 0) + len(routed)
                score.named[key] = score.named.get(key, 0) + len(experts)
    return score


def cost_in_place(eng, predictors: list[Predictor], runs: int = 3, new_tokens: int = 64) -> dict[str, tuple[float, float]]:
    """Each predictor drives greedy decoding on `eng`, which holds every expert in a slot (nothing loads,
    so the step is compute and the predictor alone): name -> (median share of the decode step spent in the
    predictor and its announcer, median step in µs). Resting is off: with every expert resident a predictor
    allowed to rest would not run at all. The engine's own predictor is put back afterwards."""
    runtime = eng.runtime
    kept, after = runtime.predictor, runtime.rest.after
    runtime.rest.after = None
    prompt = list(range(3, 35))
    out = {}
    try:
        for p in predictors:
            runtime.predictor = p
            stats = [eng.generate(prompt, max_new_tokens=new_tokens, sampling=GREEDY).stats for _ in range(runs)]
            out[p.name] = (statistics.median(s.predict_share for s in stats),
                           statistics.median(1e6 / s.decode_tok_s for s in stats if s.decode_tok_s))
    finally:
        runtime.predictor, runtime.rest.after = kept, after
    return out


def heatmap(scores: list[PredictorScore], layers: list[int], lookahead: int, path: str) -> None:
    """One panel per predictor: recall@k by target layer (rows k, columns layers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scores), figsize=(3 + 2.2 * len(scores), 2.6), squeeze=False)
    for i, (ax, score) in enumerate(zip(axes[0], scores)):
        grid = [[score.recall(k, layer) for layer in layers] for k in range(1, lookahead + 1)]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{score.name} (budget {score.budget})")
        ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_yticks(range(lookahead), [str(k) for k in range(1, lookahead + 1)])
        ax.set_xlabel("target layer")
        if i == 0:
            ax.set_ylabel("lookahead k")
        for k in range(lookahead):
            for j in range(len(layers)):
                if grid[k][j] == grid[k][j]:  # not NaN
                    ax.text(j, k, f"{grid[k][j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(image, ax=axes[0].tolist(), label="recall@k")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
