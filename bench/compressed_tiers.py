"""Compressed expert tiers (measured, wall clock, emulated link): held-out perplexity, bytes moved per
decode token and decode tokens/s of native, int8 and int4 expert copies (int8/int4 and --late-miss int4
are APPROXIMATE modes), on the bundled model at a 25% cache.

Perplexity: teacher-forced over the held-out split with every expert resident; its delta is against
native fp32 (the checkpoint's own weights). Speed: reactive loading (no predictor), LRU, greedy, each
run from an empty cache after one warm-up, median of --runs rounds that visit every configuration in
turn; the link is emulated (CPU copies paced) at each speed of --links. Quantised copies go to a
temporary --quant-cache, never into the model directory. One table, one JSON line.

    .venv/bin/python bench/compressed_tiers.py --out bench/results/compressed_tiers_cpu.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import activemoe
from activemoe.atomic import emit_json
from activemoe.config import CacheConfig, EngineConfig, LinkConfig, SamplingConfig
from activemoe.hardware import machine_label
from activemoe.trace import split_texts

GREEDY = SamplingConfig(do_sample=False)
BUNDLED = Path(activemoe.__file__).parent / "assets" / "tiny-moe"
# (label, compute dtype, precision, late miss); the first is the baseline of the speedups
CONFIGS = (("native bf16", "bfloat16", "native", "none"), ("int8", "bfloat16", "int8", "none"),
           ("int4", "bfloat16", "int4", "none"), ("native bf16 + late-miss int4", "bfloat16", "native", "int4"),
           ("native fp32", "float32", "native", "none"))


def token_ids(eng, texts: list[str], limit: int) -> list[int]:
    ids: list[int] = []
    for text in texts:
        ids += eng.encode(text)
        if len(ids) >= limit:
            break
    return ids[:limit]


def perplexity(model_dir, config: EngineConfig, texts: list[str], tokens: int, seq_len: int) -> float:
    """(perplexity, share of routed activations computed from an int4 substitute)."""
    with activemoe.load(model_dir, config) as eng:
        ids = token_ids(eng, texts, tokens)
        ppl = eng.perplexity([ids[i:i + seq_len] for i in range(0, len(ids), seq_len)])[0]
        stats = eng.runtime.stats.get_and_reset()
        return ppl, stats.late_miss_activations / max(1, stats.activations)


def interleaved_runs(engines: list, prompt: list[int], new_tokens: int, runs: int, warm: object = None) -> list[list]:
    """Decode stats per engine: one warm-up each, then `runs` rounds that visit every engine in turn,
    each generation from an empty cache (except `warm`'s, which keeps its experts resident), so a slow
    spell of the shared machine hits all alike."""
    for eng in engines:
        eng.reset_cache()
        eng.generate(prompt, max_new_tokens=new_tokens, sampling=GREEDY)
    stats: list[list] = [[] for _ in engines]
    for _ in range(runs):
        for eng, out in zip(engines, stats):
            if eng is not warm:
                eng.reset_cache()
            out.append(eng.generate(prompt, max_new_tokens=new_tokens, sampling=GREEDY).stats)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(BUNDLED))
    parser.add_argument("--links", default="0.25,0.05", help="emulated link speeds in GB/s, comma-separated")
    parser.add_argument("--cache", type=float, default=0.25, help="slots as a share of all routed experts")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--ppl-tokens", type=int, default=16384, help="held-out tokens scored for perplexity")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", help="also write the JSON result here (atomically)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core computes, the other runs the copy thread
    links = [float(x) for x in args.links.split(",")]
    texts = split_texts(Path(args.model), "heldout")
    rows, engines = [], []
    with tempfile.TemporaryDirectory() as qcache:
        for label, dtype, precision, late in CONFIGS:
            base = dict(dtype=dtype, precision=precision, late_miss=late, quant_cache_dir=qcache)
            print(f"perplexity: {label} ...", file=sys.stderr)
            # late-miss substitution depends on timing: its perplexity is taken where it substitutes, at
            # the benchmark's cache over the slowest link; the others with every expert resident
            cache, link = (CacheConfig(slot_fraction=args.cache), min(links)) if late != "none" else \
                (CacheConfig(slot_fraction=1.0), None)
            ppl, substituted = perplexity(args.model, EngineConfig(cache=cache, link=LinkConfig(link), **base), texts,
                                          args.ppl_tokens, args.seq_len)
            for link in links:
                config = EngineConfig(cache=CacheConfig(slot_fraction=args.cache), link=LinkConfig(link), **base)
                eng = activemoe.load(args.model, config)
                engines.append(eng)
                rows.append(dict(config=label, dtype=dtype, precision=precision, late_miss=late, link_gbps=link,
                                 approximate=precision != "native" or late != "none", ppl=ppl,
                                 ppl_at=f"cache {args.cache:.0%}, link {min(links)} GB/s (timing-dependent)"
                                 if late != "none" else "all experts resident",
                                 ppl_substituted_share=substituted, expert_bytes=eng.runtime.loader.slab.expert_bytes,
                                 slots=eng.load_stats.num_slots))
        # the compute floor: native bf16 with every expert resident after the warm-up, no link
        floor_engine = activemoe.load(args.model, EngineConfig(cache=CacheConfig(slot_fraction=1.0),
                                                               dtype="bfloat16"))
        print(f"decode: {args.runs} interleaved rounds over {len(engines)} configurations ...", file=sys.stderr)
        prompt = token_ids(engines[0], texts[:1], args.prompt_tokens)
        all_stats = interleaved_runs(engines + [floor_engine], prompt, args.new_tokens, args.runs, warm=floor_engine)
        floor = statistics.median(s.decode_tok_s for s in all_stats[-1])
        floor_engine.close()
        for row, eng, stats in zip(rows, engines, all_stats):
            eng.close()
            speeds = [s.decode_tok_s for s in stats]
            row.update(decode_bytes_per_token=statistics.median(s.decode_bytes_per_token for s in stats),
                       decode_tok_s=statistics.median(speeds), spread=max(speeds) - min(speeds),
                       hit_rate=statistics.median(s.hit_rate for s in stats),
                       late_miss_int4=statistics.median(s.late_miss_int4 for s in stats))
    ref_ppl = next(r["ppl"] for r in rows if r["config"] == "native fp32")
    base_rows = {r["link_gbps"]: r for r in rows if r["config"] == CONFIGS[0][0]}
    for r in rows:
        r["ppl_delta_pct"] = 100 * (r["ppl"] / ref_ppl - 1)
        base = base_rows[r["link_gbps"]]
        r["bytes_vs_baseline"] = r["decode_bytes_per_token"] / base["decode_bytes_per_token"]
        r["speedup_vs_baseline"] = r["decode_tok_s"] / base["decode_tok_s"]

    host = machine_label()
    model = os.path.relpath(args.model) if Path(args.model).resolve().is_relative_to(Path.cwd()) else args.model
    print(f"\ncompressed expert tiers — measured wall clock on {host}, one torch thread; {model}; cache {args.cache:.0%} "
          f"({rows[0]['slots']} slots), reactive LRU, greedy, {args.new_tokens} new tokens after a "
          f"{args.prompt_tokens}-token held-out prompt, median of {args.runs} interleaved runs; emulated link(s) "
          f"{', '.join(f'{x} GB/s' for x in links)}; perplexity over {args.ppl_tokens} held-out tokens, delta vs "
          "native fp32 (late-miss: at the cache above over the slowest link, where it substitutes; timing-dependent); "
          "int8, int4 and late-miss int4 are APPROXIMATE; 'int4 subs' = misses computed from int4 copies per run")
    print(f"compute floor: native bf16, every expert resident, no link: {floor:.1f} tok/s (the most any "
          f"transfer saving can reach); one bf16 expert over the link: "
          + ", ".join(f"{base_rows[x]['expert_bytes'] / x / 1e6:.2f} ms at {x} GB/s" for x in links))
    print(f"{'config':<28} {'link GB/s':>9} {'ppl':>8} {'dppl %':>7} {'KB/expert':>9} {'KB/token':>9} "
          f"{'bytes x':>7} {'tok/s':>7} {'spread':>7} {'hit':>5} {'int4 subs':>9} {'speedup':>7}")
    for r in rows:
        print(f"{r['config']:<28} {r['link_gbps']:>9.3g} {r['ppl']:>8.3f} {r['ppl_delta_pct']:>+7.2f} "
              f"{r['expert_bytes'] / 1e3:>9.1f} "
              f"{r['decode_bytes_per_token'] / 1e3:>9.1f} {r['bytes_vs_baseline']:>7.2f} {r['decode_tok_s']:>7.2f} "
              f"{r['spread']:>7.2f} {r['hit_rate']:>5.2f} {r['late_miss_int4']:>9.1f} "
              f"{r['speedup_vs_baseline']:>6.2f}x")
    for r in rows:
        if r["late_miss"] != "none" and r["link_gbps"] == min(links):
            print(f"{r['config']}: perplexity taken at {r['ppl_at']}, where {100 * r['ppl_substituted_share']:.0f}% "
                  "of routed activations were computed from int4 copies (teacher-forced chunks miss almost every "
                  "expert: an upper bound on its cost in decoding)")
    result = {"bench": "compressed_tiers", "model": model, "measured": "wall clock", "machine": host,
              "links_gbps": links, "cache": args.cache, "runs": args.runs, "new_tokens": args.new_tokens,
              "prompt_tokens": args.prompt_tokens, "ppl_tokens": args.ppl_tokens, "baseline": CONFIGS[0][0],
              "ppl_reference": "native fp32", "compute_floor_tok_s": floor,
              "compute_floor": "native bf16, every expert resident, no link", "rows": rows}
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
