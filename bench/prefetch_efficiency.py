"""Prefetch efficiency (measured, wall clock, emulated link): reactive LRU vs predictive configurations
vs the oracle bound, at caches of 25% and 50% of all experts.

By default a random qwen3_moe checkpoint with 16 layers x 32 experts x top-4 (transfers matter);
`--model DIR` runs a given checkpoint instead (e.g. the bundled trained model, with a held-out text
prompt via `--prompt-file`). Configurations are name:predictor:policy triples (`--configs`). The link is
emulated (CPU copies paced) at the speed where one expert's transfer takes one layer's measured
compute time, unless --link-gbps is given. The oracle bound per token is
max(compute floor, Belady bytes per token / link): perfect prediction, Belady eviction, perfect
overlap; compute floor = decode with every expert resident ("eff" = measured / that bound). The
mechanism bound max(compute floor, the run's own decode bytes / link) isolates how well loads overlap
compute ("mech" = measured / it). One table, one JSON line.

    .venv/bin/python bench/prefetch_efficiency.py [--runs 3] [--new-tokens 48] [--out bench/results/X.json]
    .venv/bin/python bench/prefetch_efficiency.py --model activemoe/assets/tiny-moe --prompt-file F \
        --configs reactive:none:lru,pregate:pregate:slru,learned:learned:slru,oracle:oracle:belady
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import activemoe
from activemoe.atomic import emit_json
from activemoe.config import CacheConfig, EngineConfig, LinkConfig, PrefetchConfig, SamplingConfig
from activemoe.hardware import machine_label
from activemoe.tiny import build_tiny_checkpoint

GREEDY = SamplingConfig(do_sample=False)
DEFAULT_CONFIGS = "reactive LRU:none:lru,oracle + LRU:oracle:lru,oracle + SLRU:oracle:slru,oracle + Belady:oracle:belady"


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
    parser.add_argument("--model", help="checkpoint directory (default: a random 16x32 top-4 qwen3_moe)")
    parser.add_argument("--prompt-file", help="text file whose first --prompt-tokens tokens are the prompt")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="comma-separated name:predictor:policy; the first is the baseline of the speedup, "
                             "the last is compared with it")
    parser.add_argument("--caches", default="0.25,0.5", help="cache sizes as fractions of all experts")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the random model")
    parser.add_argument("--expert-width", type=int, default=512, help="expert intermediate size of the random model")
    parser.add_argument("--precision", default="native",
                        help="expert copies on the link: native (exact), int8 or int4 (approximate; cached in the "
                             "model directory; pass --link-gbps to compare precisions over one link)")
    parser.add_argument("--out", help="also write the JSON result here (atomically)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core computes, the other runs the copy thread
    configs = [tuple(c.split(":")) for c in args.configs.split(",")]
    caches = [float(c) for c in args.caches.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir = Path(args.model)
        else:
            model_dir = build_tiny_checkpoint("qwen3_moe", Path(tmp), num_layers=16, num_experts=32, top_k=4,
                                              hidden=args.hidden, expert_width=args.expert_width, vocab=4096,
                                              max_positions=512)

        def engine(slots, predictor="none", policy="lru", link=None):
            return activemoe.load(model_dir, EngineConfig(
                device=args.device, cache=CacheConfig(num_slots=slots, slot_fraction=1.0, policy=policy),
                prefetch=PrefetchConfig(predictor=predictor, lookahead=args.lookahead),
                link=LinkConfig(link_gbps=link), precision=args.precision))

        print("measuring the compute floor (all experts resident) ...", file=sys.stderr)
        with engine(None) as eng:
            total, top_k = eng.load_stats.total_experts, eng.top_k
            layers = len(eng.runtime.store.layers)
            experts = eng.runtime.store.num_experts
            if args.prompt_file:
                prompt = eng.encode(Path(args.prompt_file).read_text())[:args.prompt_tokens]
            else:
                prompt = torch.randint(3, eng.vocab_size, (args.prompt_tokens,),
                                       generator=torch.Generator().manual_seed(0)).tolist()
            trace = eng.routing_of(prompt, args.new_tokens, GREEDY)  # for the Belady bound
            eng.generate(prompt, max_new_tokens=args.new_tokens, sampling=GREEDY)  # warm: all resident now
            floor = statistics.median(eng.generate(prompt, max_new_tokens=args.new_tokens, sampling=GREEDY)
                                      .stats.decode_tok_s for _ in range(args.runs))
            expert_bytes = eng.load_stats.expert_bytes
        layer_s = 1.0 / floor / layers
        link = args.link_gbps or expert_bytes / layer_s / 1e9
        prefill_events = layers  # the prompt is one forward: one event per MoE layer
        decode_tokens = (len(trace) - prefill_events) / layers

        rows = []
        for fraction in caches:
            slots = int(fraction * total)
            bound_bytes = belady_loads(trace, slots, prefill_events) / decode_tokens * expert_bytes  # decode only
            bound = 1.0 / max(1.0 / floor, bound_bytes / (link * 1e9))
            for name, predictor, policy in configs:
                print(f"cache {fraction:.0%}: {name} ...", file=sys.stderr)
                with engine(slots, predictor, policy, link) as eng:
                    speeds, last = decode_runs(eng, prompt, args.new_tokens, args.runs)
                own = 1.0 / max(1.0 / floor, last.decode_bytes_per_token / (link * 1e9))
                rows.append(dict(cache=fraction, slots=slots, config=name, decode_tok_s=statistics.median(speeds),
                                 spread=max(speeds) - min(speeds), hit_rate=last.hit_rate,
                                 bytes_per_token=last.decode_bytes_per_token, stall_s=last.stall_s,
                                 mechanism_bound_tok_s=own, mechanism_efficiency=statistics.median(speeds) / own,
                                 recall=last.recall, overlap=last.overlap, wasted=last.wasted_loads,
                                 bound_tok_s=bound, efficiency=statistics.median(speeds) / bound))

    print(f"\nprefetch efficiency — measured wall clock, {machine_label()}, "
          f"emulated link {link:.3f} GB/s, fp32"
          f"{'' if args.precision == 'native' else f' slots from {args.precision} transfers (APPROXIMATE)'}, "
          f"{args.model or 'random qwen3_moe'} {layers}x{experts} top-{top_k}, "
          f"expert {expert_bytes / 2**20:.2f} MiB, lookahead {args.lookahead}, {args.new_tokens} new tokens, "
          f"median of {args.runs} runs")
    print(f"compute floor (all resident): {floor:.1f} tok/s; one layer {layer_s * 1e3:.2f} ms; "
          f"one expert over the link {expert_bytes / link / 1e9 * 1e3:.2f} ms")
    header = (f"{'cache':>6} {'config':<16} {'tok/s':>7} {'spread':>7} {'hit':>6} {'recall@1':>8} {'MB/tok':>7} "
              f"{'bound':>7} {'eff':>6} {'mech':>6} {'vs base':>7}")
    print(header)
    n = len(configs)
    for i, r in enumerate(rows):
        r["vs_baseline"] = r["decode_tok_s"] / rows[n * (i // n)]["decode_tok_s"]
        print(f"{r['cache']:>6.0%} {r['config']:<16} {r['decode_tok_s']:>7.2f} {r['spread']:>7.2f} "
              f"{r['hit_rate']:>6.3f} {r['recall'].get('1', float('nan')):>8.3f} {r['bytes_per_token'] / 1e6:>7.2f} "
              f"{r['bound_tok_s']:>7.2f} {r['efficiency']:>6.2f} {r['mechanism_efficiency']:>6.2f} {r['vs_baseline']:>6.2f}x")
    speedup = {f"{int(f * 100)}%": rows[n * i + n - 1]["decode_tok_s"] / rows[n * i]["decode_tok_s"]
               for i, f in enumerate(caches)}
    print(f"{configs[-1][0]} / {configs[0][0]}:", ", ".join(f"{k} cache {v:.2f}x" for k, v in speedup.items()))
    result = {"bench": "prefetch_efficiency",
              "model": args.model or f"random qwen3_moe 16x32 top-4 hidden {args.hidden} width {args.expert_width}",
              "measured": "wall clock", "machine": machine_label(),
              "link_gbps": link, "compute_floor_tok_s": floor, "expert_bytes": expert_bytes, "rows": rows,
              "oracle_over_reactive": speedup, "lookahead": args.lookahead, "new_tokens": args.new_tokens,
              "precision": args.precision}
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
