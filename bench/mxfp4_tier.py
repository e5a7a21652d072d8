"""The MXFP4 host tier (measured, wall clock, emulated link): a GPT-OSS checkpoint with MXFP4 experts, as
OpenAI released it, served with `--precision native` (the host tier holds each expert dequantised to the
compute dtype, bfloat16) and with `--precision mxfp4` (the host tier and the link hold the checkpoint's own
MXFP4 codes and exponents; each chunk is dequantised into its slot once it has landed). Both are exact.

Random weights at a small GPT-OSS shape (the routers decisive), reactive LRU at a 25% cache, greedy,
each run from an empty cache after one warm-up, median of --runs rounds that visit every configuration in
turn, at each emulated link speed of --links. On a CPU the dequantisation runs on the loader's thread and is
booked on the emulated link after the chunk's bytes (CompressedSlab), so what it costs is in the figures; on
a GPU it runs on the copy stream. One table, one JSON line.

    .venv/bin/python bench/mxfp4_tier.py --out bench/results/mxfp4_tier_cpu.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

import torch

import activemoe
from activemoe.atomic import emit_json
from activemoe.config import CacheConfig, EngineConfig, LinkConfig
from activemoe.hardware import machine_label
from activemoe.tiny import build_tiny_checkpoint, mxfp4_experts

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from compressed_tiers import GREEDY, interleaved_runs  # noqa: E402

PRECISIONS = ("native", "mxfp4")  # the first is the baseline of the ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", default="0.25,0.05", help="emulated link speeds in GB/s, comma-separated")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512, help="hidden size = expert width (multiples of 32)")
    parser.add_argument("--cache", type=float, default=0.25, help="slots as a share of all routed experts")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--out", help="also write the JSON result here (atomically)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core computes, the other runs the copy thread
    links = [float(x) for x in args.links.split(",")]
    rows, engines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        print("building the checkpoint ...", file=sys.stderr)
        model_dir = mxfp4_experts(build_tiny_checkpoint(
            "gpt_oss", tmp, dtype=torch.bfloat16, fast_init=True, num_layers=args.layers, num_experts=args.experts,
            top_k=args.top_k, hidden=args.hidden, expert_width=args.hidden, vocab=512, heads=8))
        for precision in PRECISIONS:
            for link in links:
                config = EngineConfig(cache=CacheConfig(slot_fraction=args.cache), link=LinkConfig(link),
                                      precision=precision)
                eng = activemoe.load(model_dir, config)
                engines.append(eng)
                rows.append(dict(precision=precision, link_gbps=link, slots=eng.load_stats.num_slots,
                                 expert_link_bytes=eng.runtime.loader.slab.expert_bytes,
                                 host_store_bytes=eng.load_stats.host_store_bytes))
        prompt = torch.randint(3, 512, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
        print(f"decode: {args.runs} interleaved rounds over {len(engines)} configurations ...", file=sys.stderr)
        all_stats = interleaved_runs(engines, prompt, args.new_tokens, args.runs)
        outputs = []
        for row, eng, stats in zip(rows, engines, all_stats):
            outputs.append(eng.generate(prompt, max_new_tokens=args.new_tokens, sampling=GREEDY).token_ids)
            eng.close()
            speeds = [s.decode_tok_s for s in stats]
            row.update(decode_tok_s=statistics.median(speeds), spread=max(speeds) - min(speeds),
                       decode_bytes_per_token=statistics.median(s.decode_bytes_per_token for s in stats),
                       hit_rate=statistics.median(s.hit_rate for s in stats))
    base = {r["link_gbps"]: r for r in rows if r["precision"] == PRECISIONS[0]}
    for r, out in zip(rows, outputs):
        b = base[r["link_gbps"]]
        r.update(speedup_vs_native=r["decode_tok_s"] / b["decode_tok_s"],
                 bytes_vs_native=r["decode_bytes_per_token"] / b["decode_bytes_per_token"],
                 same_tokens=out == outputs[rows.index(b)])

    host = machine_label()
    print(f"\nMXFP4 host tier — measured wall clock on {host}, one torch thread; random GPT-OSS checkpoint with MXFP4 "
          f"experts ({args.layers} layers, {args.experts} experts, top-{args.top_k}, hidden = expert width "
          f"{args.hidden}), bfloat16 slots; cache {args.cache:.0%} ({rows[0]['slots']} slots), reactive LRU, greedy, "
          f"{args.new_tokens} new tokens after a {args.prompt_tokens}-token random prompt, median of {args.runs} "
          f"interleaved runs; emulated link(s) {', '.join(f'{x} GB/s' for x in links)}; both precisions exact")
    head = (f"{'precision':<10} {'link GB/s':>9} {'host MiB':>9} {'KiB/expert':>10} {'MB/token':>9} {'tok/s':>7} "
            f"{'spread':>7} {'vs native':>9} {'hit':>6} {'same':>5}")
    print(head)
    for r in rows:
        print(f"{r['precision']:<10} {r['link_gbps']:>9g} {r['host_store_bytes'] / 2**20:>9.1f} "
              f"{r['expert_link_bytes'] / 2**10:>10.1f} {r['decode_bytes_per_token'] / 1e6:>9.2f} "
              f"{r['decode_tok_s']:>7.1f} {r['spread']:>7.1f} {r['speedup_vs_native']:>8.2f}x {r['hit_rate']:>6.3f} "
              f"{'yes' if r['same_tokens'] else 'NO':>5}")
    emit_json({"bench": "mxfp4_tier", "measured": "wall clock", "machine": host, "links_gbps": links,
               "layers": args.layers, "experts": args.experts, "top_k": args.top_k, "hidden": args.hidden,
               "cache": args.cache, "runs": args.runs, "new_tokens": args.new_tokens,
               "prompt_tokens": args.prompt_tokens, "torch_threads": 1, "baseline": PRECISIONS[0], "rows": rows},
              args.out)


if __name__ == "__main__":
    main()
