"""How accurate must a predictor be to pay off? SIMULATED decode tokens/s against predictor recall (the
oracle degraded to a chosen recall: each expert it names is right with probability `recall`, else an
expert that is not routed; precision equals recall), for several cache sizes and two hardware presets,
against the reactive baseline (no predictor) and the oracle bound. Workload: a synthetic trace (labelled)
at a model-shape preset. One table, one JSON line; JSON to bench/results/, the plot to docs/.

    flock /tmp/activemoe-cpu.lock .venv/bin/python bench/predictor_accuracy.py [--tokens 300]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from activemoe.atomic import emit_json
from activemoe.config import CacheConfig, PrefetchConfig
from activemoe.costmodel import from_preset
from activemoe.presets import hardware_preset, shape_preset
from activemoe.simulate import SimConfig, num_slots, simulate
from activemoe.workload import SyntheticSpec, synthetic

RECALLS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen3-30b-a3b")
    parser.add_argument("--hardware", default="rtx4090,rtx4060-laptop")
    parser.add_argument("--cache", default="10%,25%,50%")
    parser.add_argument("--policy", default="lru")
    parser.add_argument("--lookahead", type=int, default=1)
    parser.add_argument("--synthetic", default="tokens=300,skew=1.0,reuse=0.3,corr=0.3,seed=0")
    parser.add_argument("--out", default="bench/results/predictor_accuracy_sim.json")
    parser.add_argument("--plot", default="docs/predictor-accuracy.png")
    args = parser.parse_args()
    shape = shape_preset(args.shape)
    workload = synthetic(SyntheticSpec.parse(args.synthetic), shape.moe_layers, shape.num_experts, shape.top_k)
    rows, costs = [], {}
    for hw_name in args.hardware.split(","):
        cost = costs[hw_name] = from_preset(hardware_preset(hw_name), shape)
        for share in args.cache.split(","):
            slots = num_slots(share, shape.total_experts, shape.top_k)
            cache = CacheConfig(num_slots=slots, policy=args.policy)
            reactive = simulate(workload, SimConfig(cache), cost)
            for recall in RECALLS:
                r = simulate(workload, SimConfig(cache, PrefetchConfig(predictor="oracle", lookahead=args.lookahead),
                                                 oracle_recall=recall), cost)
                rows.append({"hardware": hw_name, "cache": share, "num_slots": slots, "recall": recall,
                             "measured_recall": r.recall.get("1"), "tok_s": r.tok_s, "hit_rate": r.hit_rate,
                             "wasted": r.wasted, "reactive_tok_s": reactive.tok_s,
                             "speedup": r.tok_s / reactive.tok_s, "oracle_bound_tok_s": r.oracle_bound_tok_s,
                             "efficiency": r.efficiency})
    print(f"SIMULATED decode tokens/s vs predictor recall ({args.policy}, lookahead {args.lookahead}), "
          f"{workload.label}, shape {shape.name}")
    for name, cost in costs.items():
        print(f"  {cost.describe()}")
    print(f"{'hardware':<15} {'cache':>5} {'recall':>6} {'tok/s':>8} {'reactive':>8} {'speedup':>7} {'hit':>6} "
          f"{'wasted':>7} {'bound':>7} {'eff':>5}")
    for r in rows:
        print(f"{r['hardware']:<15} {r['cache']:>5} {r['recall']:>6.1f} {r['tok_s']:>8.2f} {r['reactive_tok_s']:>8.2f} "
              f"{r['speedup']:>6.2f}x {r['hit_rate']:>6.3f} {r['wasted']:>7} {r['oracle_bound_tok_s']:>7.2f} "
              f"{r['efficiency']:>5.2f}")
    result = {"bench": "predictor_accuracy", "simulated": True, "workload": workload.label, "shape": shape.name,
              "policy": args.policy, "lookahead": args.lookahead,
              "cost_models": {k: c.to_json() for k, c in costs.items()}, "rows": rows}
    emit_json(result, args.out, indent=2)
    if args.plot:
        plot(rows, costs, workload.label, shape.name, args.plot)
    return 0


def plot(rows, costs, label: str, shape: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(costs), figsize=(6 * len(costs), 4.5), squeeze=False)
    for ax, hw in zip(axes[0], costs):
        for share in dict.fromkeys(r["cache"] for r in rows):
            pts = [r for r in rows if r["hardware"] == hw and r["cache"] == share]
            line, = ax.plot([r["recall"] for r in pts], [r["tok_s"] for r in pts], marker="o",
                            label=f"cache {share} ({pts[0]['num_slots']} slots)")
            ax.axhline(pts[0]["reactive_tok_s"], color=line.get_color(), linestyle="--", linewidth=1)
            ax.axhline(pts[0]["oracle_bound_tok_s"], color=line.get_color(), linestyle=":", linewidth=1)
        ax.set(title=f"{hw} (link {costs[hw].link_gbps:.3g} GB/s)", xlabel="predictor recall (= precision)",
               ylabel="decode tokens/s (SIMULATED)")
        ax.legend(fontsize=8, title="solid: predictor; dashed: reactive; dotted: oracle bound", title_fontsize=7)
    fig.suptitle(f"SIMULATED — shape {shape}, {label}; cost models {', '.join(c.name for c in costs.values())}",
                 fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
