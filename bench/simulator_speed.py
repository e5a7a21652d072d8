"""Simulator speed: wall time to simulate --tokens decode tokens of a synthetic Qwen3-30B-A3B-shaped
trace (48 MoE layers x 128 experts, top-8; 25% cache = 1536 slots) per configuration. The wall times
are MEASURED on this machine; the tokens/s in the table are SIMULATED (cost model printed).
One table, one JSON line, saved to bench/results/simulator_speed_cpu.json (--out).

    flock /tmp/activemoe-cpu.lock .venv/bin/python bench/simulator_speed.py [--tokens 1000]
"""
from __future__ import annotations

import argparse
import sys
import time

from activemoe.atomic import emit_json
from activemoe.config import CacheConfig, PrefetchConfig
from activemoe.costmodel import from_preset
from activemoe.hardware import machine_label
from activemoe.presets import hardware_preset, shape_preset
from activemoe.simulate import SimConfig, num_slots, simulate
from activemoe.workload import SyntheticSpec, synthetic

CONFIGS = [("lru", "none", 1), ("lru", "oracle", 2), ("slru", "oracle", 2), ("belady", "oracle", 2), ("lfu", "none", 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--shape", default="qwen3-30b-a3b")
    parser.add_argument("--hardware", default="rtx4090")
    parser.add_argument("--out", default="bench/results/simulator_speed_cpu.json")
    args = parser.parse_args()
    shape = shape_preset(args.shape)
    cost = from_preset(hardware_preset(args.hardware), shape)
    start = time.perf_counter()
    workload = synthetic(SyntheticSpec(tokens=args.tokens), shape.moe_layers, shape.num_experts, shape.top_k)
    synth_s = time.perf_counter() - start
    slots = num_slots("25%", shape.total_experts, shape.top_k)
    rows = []
    for policy, predictor, lookahead in CONFIGS:
        start = time.perf_counter()
        r = simulate(workload, SimConfig(CacheConfig(num_slots=slots, policy=policy),
                                         PrefetchConfig(predictor=predictor, lookahead=lookahead)), cost)
        rows.append({"config": r.config, "wall_s": time.perf_counter() - start, "events": args.tokens * shape.moe_layers,
                     "simulated_tok_s": r.tok_s, "hit_rate": r.hit_rate, "loads": r.loads,
                     "oracle_bound_tok_s": r.oracle_bound_tok_s})
    print(f"simulator speed: MEASURED wall time on {machine_label()} to simulate "
          f"{args.tokens} tokens of a {workload.label} trace at shape {shape.name} ({slots} slots); "
          f"generating the trace took {synth_s:.2f} s")
    print(f"tok/s and hit rate: SIMULATED, {cost.describe()}")
    print(f"{'configuration':<32} {'wall s':>7} {'events/s':>9} {'tok/s (sim)':>11} {'hit (sim)':>9} {'loads':>7}")
    for r in rows:
        print(f"{r['config']:<32} {r['wall_s']:>7.2f} {r['events'] / r['wall_s']:>9.0f} {r['simulated_tok_s']:>11.2f} "
              f"{r['hit_rate']:>9.3f} {r['loads']:>7}")
    result = {"bench": "simulator_speed", "measured": "wall clock", "machine": machine_label(), "tokens": args.tokens,
              "shape": shape.name, "num_slots": slots, "synthetic_s": synth_s, "workload": workload.label,
              "simulated": cost.to_json(), "rows": rows}
    emit_json(result, args.out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
