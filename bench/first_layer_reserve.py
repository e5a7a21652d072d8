"""The first-layer reserve, measured: decode tokens/s of a predictive configuration with the reserve
on and off (and reactive LRU for scale), their runs interleaved (A, B, C, A, B, C, ...) so that
machine noise hits all alike, at each emulated link speed and prompt length, on the bundled model's
held-out text. One table, one JSON line.

    .venv/bin/python bench/first_layer_reserve.py [--links 0.1,0.25] [--prompt-tokens 16,256] [--runs 5] [--out FILE]
"""
from __future__ import annotations

import argparse
import itertools
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from activemoe.atomic import emit_json
from activemoe.baselines import ActiveMoERunner, engine_config
from activemoe.bench import prompts_for
from activemoe.config import CacheConfig, EngineConfig, LinkConfig
from activemoe.demo import BUNDLED
from activemoe.hardware import machine_label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(BUNDLED))
    parser.add_argument("--spec", default="learned+slru@3", help="the predictive configuration (bench spec name)")
    parser.add_argument("--links", default="0.1,0.25", help="emulated link speeds in GB/s")
    parser.add_argument("--cache", type=float, default=0.25, help="slots as a share of all experts")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", default="256", help="held-out prompt lengths, e.g. 16,256")
    parser.add_argument("--out", help="also write the JSON result here (atomically)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in every CPU benchmark here: one core computes, the other copies
    model = Path(args.model)
    rows = []
    lengths = [int(x) for x in args.prompt_tokens.split(",")]
    for link, prompt_tokens in itertools.product([float(x) for x in args.links.split(",")], lengths):
        base = EngineConfig(cache=CacheConfig(slot_fraction=args.cache), link=LinkConfig(link_gbps=link))
        on = engine_config(args.spec, base)
        configs = {"reactive": engine_config("reactive", base), f"{args.spec} reserve on": on,
                   f"{args.spec} reserve off": replace(on, cache=replace(on.cache, first_layer_reserve=False))}
        runners = {name: ActiveMoERunner(name, model, config) for name, config in configs.items()}
        engine = next(iter(runners.values())).engine
        prompts = prompts_for(model, engine.encode if engine.tokenizer else None, engine.vocab_size,
                              prompt_tokens, 1)
        results: dict[str, list] = {name: [] for name in runners}
        for runner in runners.values():
            runner.run(prompts, 8)  # warm-up
        for _ in range(args.runs):
            for name, runner in runners.items():
                results[name].append(runner.run(prompts, args.new_tokens))
        for name, runner in runners.items():
            runs = results[name]
            speeds = [r.decode_tok_s for r in runs]
            rows.append(dict(link_gbps=link, prompt_tokens=prompt_tokens, config=name,
                             decode_tok_s=statistics.median(speeds), min=min(speeds), max=max(speeds),
                             hit_rate=statistics.median(r.hit_rate for r in runs),
                             bytes_per_token=statistics.median(r.decode_bytes_per_token for r in runs)))
            runner.close()
    print(f"first-layer reserve — measured wall clock, {machine_label()}, 1 torch "
          f"thread, {model.name}, cache {args.cache:.0%}, held-out prompts, "
          f"{args.new_tokens} new tokens, median of {args.runs} interleaved runs")
    print(f"{'link GB/s':>9} {'prompt':>6} {'config':<32} {'tok/s':>7} {'min-max':>13} {'decode hit':>10} "
          f"{'MB/token':>9}")
    for r in rows:
        print(f"{r['link_gbps']:>9.2f} {r['prompt_tokens']:>6} {r['config']:<32} {r['decode_tok_s']:>7.1f} "
              f"{r['min']:>6.1f}-{r['max']:<6.1f} {r['hit_rate']:>10.3f} {r['bytes_per_token'] / 1e6:>9.2f}")
    emit_json({"bench": "first_layer_reserve", "measured": "wall clock",
               "machine": machine_label(), "torch_threads": 1,
               "model": str(model), "cache": args.cache, "runs": args.runs, "new_tokens": args.new_tokens,
               "prompt_tokens": lengths, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
