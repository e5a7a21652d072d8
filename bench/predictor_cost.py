"""The predictors' cost at a real expert shape, measured on this machine: a random checkpoint at
OLMoE-1B-7B's shape (hidden 2048, 64 experts of width 1024, top-8, bf16; fewer layers than the real
16, said in the output), learned heads of the bundled model's architecture (an MLP 512 wide at
lookahead 1, 64 at 2-3, with context) trained briefly on its own trace (their recall on a random model
means nothing; their cost does not depend on it), and each predictor's share of the all-resident
decode step in place, as `predict-eval` measures it on the bundled model. One table, one JSON line.
On CUDA the heads run on the device, as `generate` runs them there (bench/gpu_suite.py calls this).

    .venv/bin/python bench/predictor_cost.py [--layers 4] [--runs 3] [--device cuda] [--out FILE]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

import activemoe
from activemoe.atomic import emit_json
from activemoe.bench import prompts_for
from activemoe.config import CacheConfig, EngineConfig
from activemoe.demo import BUNDLED
from activemoe.engine import encode_text, load_tokenizer
from activemoe.evaluation import cost_in_place
from activemoe.families import offloaded_modules, router_parts
from activemoe.hardware import machine_label
from activemoe.learned import LearnedPredictor, train_heads
from activemoe.predictors import NoPredictor, PregatePredictor
from activemoe.tiny import build_tiny_checkpoint

SHAPE = dict(family="olmoe", hidden=2048, expert_width=1024, num_experts=64, top_k=8, heads=16)  # OLMoE-1B-7B
REAL_LAYERS = 16
VOCAB = 4096  # the bundled model's, so its held-out text (in its tokenizer) feeds the checkpoint built here
LOOKAHEAD = 3
WIDTHS = (512, 64)  # the bundled model's heads: 512 wide at lookahead 1, 64 beyond


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help=f"decoder layers (the real model has {REAL_LAYERS})")
    parser.add_argument("--runs", type=int, default=3, help="generations per predictor (median)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--trace-tokens", type=int, default=1024, help="tokens the heads are trained on")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the model and the heads run")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes: checks the pipeline, no results")
    parser.add_argument("--out", help="also write the JSON result here (atomically)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("predictor_cost: no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # as in every CPU benchmark here
    shape = dict(SHAPE, num_layers=args.layers)
    if args.dry_run:
        shape.update(hidden=64, expert_width=32, num_layers=2, heads=4)
    with tempfile.TemporaryDirectory() as work:
        print(f"[predictor_cost] building a random bf16 checkpoint: {shape}", file=sys.stderr, flush=True)
        layers_built = shape["num_layers"]
        model = build_tiny_checkpoint(shape.pop("family"), Path(work) / "model", dtype=torch.bfloat16, vocab=VOCAB,
                                      max_positions=2048, init_range=0.02, max_shard_size="2GB", fast_init=True,
                                      **shape)
        ids = prompts_for(BUNDLED, partial(encode_text, load_tokenizer(BUNDLED)), VOCAB, args.trace_tokens, 1)[0]
        with activemoe.load(model, EngineConfig(device=args.device, cache=CacheConfig(slot_fraction=1.0))) as eng:
            started = time.perf_counter()
            trace = eng.record_trace([ids[i:i + 256] for i in range(0, len(ids), 256)], keep_hidden=True)
            experts = offloaded_modules(eng.model)
            routers, layers = router_parts(eng.model, experts), sorted(experts)
            heads = train_heads(trace, LOOKAHEAD, routers, epochs=2, mlp_width=list(WIDTHS))
            print(f"[predictor_cost] trace and heads in {time.perf_counter() - started:.0f} s; measuring",
                  file=sys.stderr, flush=True)
            predictors = [NoPredictor(), PregatePredictor(routers, LOOKAHEAD),
                          LearnedPredictor(heads, layers, LOOKAHEAD, eng.device)]
            cost = cost_in_place(eng, predictors, args.runs, args.new_tokens)
    rows = [{"predictor": name, "step_share_in_place": share, "decode_step_us_in_place": step}
            for name, (share, step) in cost.items()]
    machine = machine_label(args.device)
    print(f"predictor cost in place — measured wall clock, {machine}, 1 torch thread; random checkpoint at "
          f"OLMoE-1B-7B's expert shape, bf16, {layers_built} of its {REAL_LAYERS} layers, every expert resident, "
          f"{args.new_tokens} greedy tokens, median of {args.runs} runs" + (" (DRY RUN: toy sizes)" if args.dry_run else ""))
    print(f"{'predictor':<10} {'% of step':>9} {'step ms':>8}")
    for r in rows:
        print(f"{r['predictor']:<10} {100 * r['step_share_in_place']:>8.2f}% {r['decode_step_us_in_place'] / 1e3:>8.2f}")
    emit_json({"bench": "predictor_cost", "measured": "wall clock", "machine": machine, "torch_threads": 1,
               "dry_run": args.dry_run, "shape": "olmoe-1b-7b", "layers": layers_built, "real_layers": REAL_LAYERS,
               "dtype": "bfloat16", "lookahead": LOOKAHEAD, "mlp_widths": list(WIDTHS), "runs": args.runs,
               "new_tokens": args.new_tokens, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
