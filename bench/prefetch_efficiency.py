"""Prefetch efficiency (measured, wall clock, emulated link): reactive LRU vs oracle prefetch vs the
oracle bound, at caches of 25% and 50% of all experts.

A random qwen3_moe checkpoint with 16 layers x 32 experts x top-4 (transfers matter). The link is
emulated (CPU copies paced) at the speed where one expert's transfer takes one layer's measured
compute time, unless --link-gbps is given. The oracle bound per token is
max(compute floor, Belady bytes per token / link): perfect prediction, Belady eviction, perfect
overlap; compute floor = decode with every expert resident. One table, one JSON line.

    .venv/bin/python bench/prefetch_efficiency.py [--runs 3] [--new-tokens 48] [--out bench/results/X.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import activemoe
from activemoe.config import CacheConfig, EngineConfig, LinkConfig, PrefetchConfig, SamplingConfig
from activemoe.tiny import build_tiny_checkpoint

GREEDY = SamplingConfig(do_sample=False)
CONFIGS = (("reactive LRU", "none", "lru"), ("oracle + LRU", "oracle", "lru"), ("oracle + SLRU", "oracle", "slru"),
           ("oracle + Belady", "oracle", "belady"))  # the last is the oracle configuration: perfect prediction + Belady


def belady_loads(trace: list[tuple[int, tuple[int, ...]]], num_slots: int, start: int) -> int:
    """Loads of Belady's eviction (evict the expert used farthest in the future) over a routing trace,
    counted from event `start` on (the decode phase); the cache state before it is simulated too."""
    events = [[(layer, e) for e in experts] for layer, experts in trace]
    next_use: list[dict] = [dict() for _ in events]
    upcoming: dict = {}
    for i in range(len(events) - 1, -1, -1):
        next_use[i] = dict(upcoming)
        for eid in events[i]:
            upcoming[eid] = i
    resident: set = set()
    loads = 0
    for i, needed in enumerate(events):
        for eid in needed:
            if eid in resident:
                continue
            if len(resident) >= num_slots:
                victims = [r for r in resident if r not in needed]
                resident.remove(max(victims, key=lambda r: next_use[i].get(r, float("inf"))))
            resident.add(eid)
            loads += i >= start
    return loads


def decode_runs(engine, prompt, new_tokens, runs) -> list[float]:
    """Median-ready list of decode tok/s, each run from an empty cache, after one warm-up run."""
    engine.reset_cache()
    engine.generate(prompt, max_new_tokens=new_tokens, sampling=GREEDY)
    speeds, stats = [], []
    for _ in range(runs):
        engine.reset_cache()
        out = engine.generate(prompt, max_new_tokens=new_tokens, sampling=GREEDY)
        speeds.append(out.stats.decode_tok_s)
        stats.append(out.stats)
    return speeds, stats[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--lookahead", type=int, default=4)
    parser.add_argument("--link-gbps", type=float, help="default: one expert's transfer = one layer's compute")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="also write the JSON result here (atomically)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core computes, the other runs the copy thread

    layers, experts, top_k = 16, 32, 4
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_checkpoint("qwen3_moe", Path(tmp), num_layers=layers, num_experts=experts, top_k=top_k,
                                          hidden=256, expert_width=512, vocab=4096, max_positions=512)
        prompt = torch.randint(3, 4096, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
        total = layers * experts

        def engine(slots, predictor="none", policy="lru", link=None):
            return activemoe.load(model_dir, EngineConfig(
                device=args.device, cache=CacheConfig(num_slots=slots, policy=policy),
                prefetch=PrefetchConfig(predictor=predictor, lookahead=args.lookahead),
                link=LinkConfig(link_gbps=link)))

        print("measuring the compute floor (all experts resident) ...", file=sys.stderr)
        with engine(total) as eng:
            eng.runtime.trace = []
            eng.generate(prompt, max_new_tokens=args.new_tokens, sampling=GREEDY)
            trace, eng.runtime.trace = eng.runtime.trace, None
            eng.generate(prompt, max_new_tokens=args.new_tokens, sampling=GREEDY)  # warm: all resident now
            floor = statistics.median(eng.generate(prompt, max_new_tokens=args.new_tokens, sampling=GREEDY)
                                      .stats.decode_tok_s for _ in range(args.runs))
            expert_bytes = eng.load_stats.expert_bytes
        layer_s = 1.0 / floor / layers
        link = args.link_gbps or expert_bytes / layer_s / 1e9
        prefill_events = layers  # the prompt is one forward: one event per MoE layer
        decode_tokens = (len(trace) - prefill_events) / layers

        rows = []
        for fraction in (0.25, 0.5):
            slots = int(fraction * total)
            bound_bytes = belady_loads(trace, slots, prefill_events) / decode_tokens * expert_bytes
            bound = 1.0 / max(1.0 / floor, bound_bytes / (link * 1e9))
            for name, predictor, policy in CONFIGS:
                print(f"cache {fraction:.0%}: {name} ...", file=sys.stderr)
                with engine(slots, predictor, policy, link) as eng:
                    speeds, last = decode_runs(eng, prompt, args.new_tokens, args.runs)
                rows.append(dict(cache=fraction, slots=slots, config=name, decode_tok_s=statistics.median(speeds),
                                 spread=max(speeds) - min(speeds), hit_rate=last.hit_rate,
                                 bytes_per_token=last.bytes_moved / max(1, args.new_tokens), stall_s=last.stall_s,
                                 bound_tok_s=bound, efficiency=statistics.median(speeds) / bound))

    print(f"\nprefetch efficiency — measured wall clock, {os.uname().machine} CPU ({os.cpu_count()} cores), "
          f"emulated link {link:.3f} GB/s, fp32, qwen3_moe-shaped random model {layers}x{experts} top-{top_k}, "
          f"expert {expert_bytes / 2**20:.2f} MiB, lookahead {args.lookahead}, {args.new_tokens} new tokens, "
          f"median of {args.runs} runs")
    print(f"compute floor (all resident): {floor:.1f} tok/s; one layer {layer_s * 1e3:.2f} ms; "
          f"one expert over the link {expert_bytes / link / 1e9 * 1e3:.2f} ms")
    header = f"{'cache':>6} {'config':<16} {'tok/s':>7} {'spread':>7} {'hit':>6} {'MB/tok':>7} {'bound':>7} {'eff':>6}"
    print(header)
    for r in rows:
        print(f"{r['cache']:>6.0%} {r['config']:<16} {r['decode_tok_s']:>7.2f} {r['spread']:>7.2f} "
              f"{r['hit_rate']:>6.3f} {r['bytes_per_token'] / 1e6:>7.2f} {r['bound_tok_s']:>7.2f} {r['efficiency']:>6.2f}")
    n = len(CONFIGS)
    speedup = {f"{int(f * 100)}%": rows[n * i + n - 1]["decode_tok_s"] / rows[n * i]["decode_tok_s"]
               for i, f in enumerate((0.25, 0.5))}
    print("oracle + Belady / reactive LRU:", ", ".join(f"{k} cache {v:.2f}x" for k, v in speedup.items()))
    result = {"bench": "prefetch_efficiency", "measured": "wall clock", "machine": f"{os.cpu_count()}-core CPU",
              "link_gbps": link, "compute_floor_tok_s": floor, "expert_bytes": expert_bytes, "rows": rows,
              "oracle_over_reactive": speedup, "lookahead": args.lookahead, "new_tokens": args.new_tokens}
    line = json.dumps(result)
    print(line)
    if args.out:
        out = Path(args.out)
        tmp_path = out.with_suffix(out.suffix + ".tmp")
        tmp_path.write_text(line + "\n")
        os.replace(tmp_path, out)


if __name__ == "__main__":
    main()
