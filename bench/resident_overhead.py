"""No regression when everything fits: ActiveMoE with every expert in a slot (preloaded, no transfers)
against plain transformers, measured wall clock with their runs interleaved (A, B, A, B, ...) so that
machine noise hits both alike. One table, one JSON line.

    .venv/bin/python bench/resident_overhead.py [--model DIR] [--runs 15] [--new-tokens 64] [--out FILE]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from activemoe.atomic import emit_json
from activemoe.baselines import ActiveMoERunner, TransformersRunner
from activemoe.bench import prompts_for
from activemoe.config import CacheConfig, EngineConfig
from activemoe.demo import BUNDLED
from activemoe.hardware import machine_label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(BUNDLED))
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--out", help="also write the JSON result here (atomically)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in every CPU benchmark here: one core computes
    model = Path(args.model)
    config = EngineConfig(cache=CacheConfig(slot_fraction=1.0))
    runners = {"transformers": TransformersRunner(model, config),
               "activemoe (all resident)": ActiveMoERunner("resident", model, config)}
    engine = runners["activemoe (all resident)"].engine
    prompt = prompts_for(model, engine.encode if engine.tokenizer else None, engine.vocab_size, args.prompt_tokens, 1)
    speeds: dict[str, list[float]] = {name: [] for name in runners}
    tokens = {}
    for name, runner in runners.items():
        runner.run(prompt, 8)  # warm-up
    for _ in range(args.runs):
        for name, runner in runners.items():
            out = runner.run(prompt, args.new_tokens)
            speeds[name].append(out.decode_tok_s)
            tokens[name] = out.sequences
    medians = {name: statistics.median(v) for name, v in speeds.items()}
    ratio = medians["activemoe (all resident)"] / medians["transformers"]
    print(f"all experts resident — measured wall clock, {machine_label()}, 1 torch "
          f"thread, {model.name}, prompt {args.prompt_tokens}, {args.new_tokens} new tokens, {args.runs} interleaved "
          f"runs each")
    print(f"{'runner':<26} {'median tok/s':>12} {'min':>8} {'max':>8}")
    for name, values in speeds.items():
        print(f"{name:<26} {medians[name]:>12.1f} {min(values):>8.1f} {max(values):>8.1f}")
    same = tokens["transformers"] == tokens["activemoe (all resident)"]
    print(f"activemoe / transformers: {ratio:.3f}x; same tokens: {same}")
    emit_json({"bench": "resident_overhead", "measured": "wall clock",
                       "machine": machine_label(), "torch_threads": 1,
                       "model": str(model), "runs": args.runs, "new_tokens": args.new_tokens,
                       "median_tok_s": medians, "ratio": ratio, "same_tokens": same}, args.out)


if __name__ == "__main__":
    main()
