"""Simulator calibration: measured decode tokens/s of the engine (wall clock, emulated link) against the
simulator's tokens/s for the very routing of those runs, with the cost model calibrated by the
profiler on this machine (`activemoe profile`). Also checks hits, loads and evictions agree.

Defaults: the bundled model (activemoe/assets/tiny-moe), a held-out text prompt, link 0.25 GB/s,
caches of 25% and 50%. Median over --runs generations (each from a cold cache). One table, one JSON
line; the JSON is saved to bench/results/simulator_calibration_cpu.json (--out).

    flock /tmp/activemoe-cpu.lock .venv/bin/python bench/simulator_calibration.py [--runs 3] [--new-tokens 64]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import activemoe
from activemoe import hardware
from activemoe.atomic import emit_json
from activemoe.config import CacheConfig, EngineConfig, LinkConfig, PrefetchConfig, SamplingConfig
from activemoe.costmodel import from_profile
from activemoe.simulate import SimConfig, simulate
from activemoe.trace import Recorder, split_texts
from activemoe.workload import from_trace

GREEDY = SamplingConfig(do_sample=False)
MODEL = Path(activemoe.__file__).parent / "assets" / "tiny-moe"
# name: (cache share, policy, predictor, lookahead)
CONFIGS = {"100% (all resident)": (1.0, "lru", "none", 1), "25% lru reactive": (0.25, "lru", "none", 1), "25% slru reactive": (0.25, "slru", "none", 1),
           "50% lru reactive": (0.50, "lru", "none", 1), "25% lru oracle L1": (0.25, "lru", "oracle", 1),
           "25% belady oracle L2": (0.25, "belady", "oracle", 2)}


def run_config(model: Path, share: float, policy: str, predictor: str, lookahead: int, link_gbps: float,
               prompt: list[int], new_tokens: int, runs: int):
    """Measured: median decode tok/s over `runs` cold-cache generations, the last run's stats, and the
    routing of the generation (recorded from a reactive run: exact mode, the same tokens)."""
    cfg = EngineConfig(cache=CacheConfig(slot_fraction=share, policy=policy), link=LinkConfig(link_gbps=link_gbps),
                       prefetch=PrefetchConfig(predictor=predictor, lookahead=lookahead))
    with activemoe.load(model, cfg) as eng:
        recorder = Recorder(eng.runtime.store.layers[0], keep_hidden=False)
        if predictor == "none":
            eng.runtime.recorder = recorder
        speeds, stats = [], None
        for i in range(runs + 1):  # run 0 warms the process (allocator, kernels) and is not counted
            eng.reset_cache()
            stats = eng.generate(prompt, max_new_tokens=new_tokens, sampling=GREEDY).stats
            eng.runtime.recorder = None
            if i:
                speeds.append(stats.decode_tok_s)
        num_slots, chunks = eng.load_stats.num_slots, [c.nbytes for c in eng.runtime.loader.slab.chunks]
        meta = eng.trace_meta()
    return statistics.median(speeds), stats, recorder, meta, num_slots, chunks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--profile", help="a saved profile JSON (default: measure one now)")
    parser.add_argument("--link-gbps", type=float, default=0.25)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default="bench/results/simulator_calibration_cpu.json")
    args = parser.parse_args()
    model = Path(args.model)
    profile = Path(args.profile) if args.profile else Path(args.out).with_name("profile_simulator_cpu.json")
    if not args.profile:
        hardware.measure(model).save(profile)  # what `activemoe profile --model M --out PATH` does
    cost = from_profile(profile, link_gbps=args.link_gbps)
    with activemoe.load(model, EngineConfig.tiny(num_slots=2)) as eng:
        prompt = eng.encode(split_texts(model, "heldout")[0])[:args.prompt_tokens]
    rows, reactive_trace = [], {}
    for name, (share, policy, predictor, lookahead) in CONFIGS.items():
        measured, stats, recorder, meta, slots, chunks = run_config(
            model, share, policy, predictor, lookahead, args.link_gbps, prompt, args.new_tokens, args.runs)
        if predictor == "none":
            reactive_trace[share] = from_trace(recorder.trace(meta), "recorded: this run's routing")
        workload = reactive_trace.get(share) or next(iter(reactive_trace.values()))
        sim = simulate(workload, SimConfig(CacheConfig(num_slots=slots, policy=policy),
                                           PrefetchConfig(predictor=predictor, lookahead=lookahead),
                                           prefill_tokens=len(prompt)), cost, chunks)
        rows.append({"config": name, "num_slots": slots, "measured_tok_s": measured, "simulated_tok_s": sim.tok_s,
                     "error_pct": 100 * (sim.tok_s - measured) / measured,
                     "measured": {"hit_rate": stats.hit_rate, "loads": stats.loads, "evictions": stats.evictions},
                     "simulated": {"hit_rate": sim.hit_rate, "loads": sim.loads, "evictions": sim.evictions},
                     "oracle_bound_tok_s": sim.oracle_bound_tok_s})
    print(f"simulator calibration on {model.name}: MEASURED wall clock ({hardware.machine_label()}, "
          f"emulated link {args.link_gbps} GB/s, median of {args.runs} runs, {args.new_tokens} new "
          f"tokens after a {len(prompt)}-token prompt) vs SIMULATED")
    print(cost.describe())
    print(f"{'configuration':<22} {'slots':>5} {'measured':>9} {'simulated':>9} {'error':>7} "
          f"{'hit m/s':>13} {'loads m/s':>11} {'evict m/s':>11} {'bound':>7}")
    for r in rows:
        m, s = r["measured"], r["simulated"]
        print(f"{r['config']:<22} {r['num_slots']:>5} {r['measured_tok_s']:>9.1f} {r['simulated_tok_s']:>9.1f} "
              f"{r['error_pct']:>+6.1f}% {m['hit_rate']:>6.3f}/{s['hit_rate']:.3f} {m['loads']:>5}/{s['loads']:<5} "
              f"{m['evictions']:>5}/{s['evictions']:<5} {r['oracle_bound_tok_s']:>7.1f}")
    result = {"bench": "simulator_calibration", "model": model.name, "link_gbps": args.link_gbps,
              "measured": "wall clock", "machine": hardware.machine_label(), "simulated": cost.to_json(),
              "runs": args.runs, "new_tokens": args.new_tokens, "prompt_tokens": len(prompt), "rows": rows}
    emit_json(result, args.out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
