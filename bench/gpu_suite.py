"""The real-shape GPU benchmark, one call: random bf16 checkpoints at real expert shapes (OLMoE-1B-7B,
Qwen3-30B-A3B; fewer layers than the real models so that they fit the machine's disk and time, said in
the output), slots capped to 25% and 50% of the experts, routing replayed from a trace of the bundled
trained model (--replay-routing: hit rates reflect learned routing; transfers and kernels are real).
Every baseline of `activemoe bench` runs through its real path. Results: bench/results/gpu_<shape>_<device>.json.
Then the predictors' share of a decode step with their heads on the device, at OLMoE-1B-7B's shape with all
16 layers (bench/predictor_cost.py): bench/results/predictor_cost_<device>.json.

    .venv/bin/python bench/gpu_suite.py                 # on a CUDA machine
    .venv/bin/python bench/gpu_suite.py --dry-run       # the same pipeline at toy sizes on CPU (CI checks it)
One part per call, where a call's time is capped (10 minutes each on an H100 with --work /dev/shm):
    B=transformers,reactive,oracle+belady@2,history+lfru@3,host
    .venv/bin/python bench/gpu_suite.py --shapes olmoe-1b-7b --baselines $B --grouped-hits --no-predictor-cost
    .venv/bin/python bench/gpu_suite.py --shapes qwen3-30b-a3b --baselines $B --grouped-hits --no-predictor-cost
    .venv/bin/python bench/gpu_suite.py --shapes "" --predictor-cost
    .venv/bin/python bench/gpu_suite.py --shapes olmoe-1b-7b --baselines accelerate --runs 1 --new-tokens 16 \
        --no-predictor-cost    # accelerate takes over 2 s a token at these shapes on an H100
A shape's result file is written after each baseline's rows (with "partial": true until the last), so a
call stopped at its time limit keeps what it finished.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

import activemoe
from activemoe.atomic import emit_json, write_text_atomic
from activemoe.bench import BenchConfig, BenchRow, cache_config, run_bench
from activemoe.cli_bench import link_label
from activemoe.config import CacheConfig, EngineConfig, LinkConfig
from activemoe.demo import BUNDLED
from activemoe.hardware import pinned_h2d_gbps
from activemoe.tiny import build_tiny_checkpoint
from activemoe.trace import split_texts

sys.path.insert(0, str(Path(__file__).parent))
import predictor_cost  # noqa: E402  (a sibling script)

# Real shapes (the models' config.json): hidden, expert width, experts, top-k, attention heads, real layers.
SHAPES = {
    "olmoe-1b-7b": dict(family="olmoe", hidden=2048, expert_width=1024, num_experts=64, top_k=8, heads=16,
                        real_layers=16, num_layers=16),
    "qwen3-30b-a3b": dict(family="qwen3_moe", hidden=2048, expert_width=768, num_experts=128, top_k=8, heads=32,
                          real_layers=48, num_layers=12),
}
# accelerate last: it is the slowest by far, and a call cut off at its time limit keeps the rows before it.
# The predictor is history (routing statistics): under replayed routing the random checkpoint's hidden states say
# nothing of its routing, so pregate and the learned heads cannot predict it (pregate measured recall@1 0.13 on
# an H100, 0.60x reactive), while history learns from the replayed routing itself.
BASELINES = ("transformers", "reactive", "oracle+belady@2", "history+lfru@3", "host", "accelerate")
WHOLE_MODEL = ("transformers", "accelerate")  # no slots: the same at every cache size, so run at the first only
SLOTTED = tuple(b for b in BASELINES if b not in WHOLE_MODEL)


def provenance() -> dict:
    """What a result was measured with: torch and transformers versions, and the commit when git knows it."""
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, text=True,
                                capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "commit": commit}


def record_trace(path: Path, tokens: int) -> None:
    """Teacher-forced routing of the bundled model over held-out text."""
    with activemoe.load(BUNDLED, EngineConfig(cache=CacheConfig(slot_fraction=1.0))) as eng:
        ids: list[int] = []
        for text in split_texts(BUNDLED, "heldout"):
            ids += eng.encode(text)
            if len(ids) >= tokens:
                break
        eng.record_trace([ids[i:i + 256] for i in range(0, tokens, 256)], keep_hidden=False).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on CPU: checks the pipeline, no results")
    parser.add_argument("--out", default="bench/results", help="results directory (default bench/results)")
    parser.add_argument("--work", help="where checkpoints are built (default: a temporary directory; /dev/shm "
                        "keeps a slow disk out of the build and the loads, where RAM allows)")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help=f"a subset, in this order (default all: {','.join(BASELINES)})")
    parser.add_argument("--grouped-hits", action="store_true",
                        help="ActiveMoE runs the experts READY at a decode layer's start in one grouped call "
                             "(results in their own file, suffixed _grouped)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--predictor-cost", action=argparse.BooleanOptionalAction, default=True,
                        help="end with the predictors' cost at OLMoE-1B-7B's shape (default on)")
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shape {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    baselines = tuple(b for b in BASELINES if b in args.baselines.split(","))
    if not baselines or set(args.baselines.split(",")) - set(BASELINES):
        parser.error(f"--baselines: choose from {', '.join(BASELINES)}")
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; use --dry-run to check the pipeline on CPU", file=sys.stderr)
        return 2
    name = "dry-run-cpu" if args.dry_run else torch.cuda.get_device_name().replace(" ", "-").lower()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the TTFT floors and link shares are taken against the real link's measured speed (none on the dry run)
    link_gbps = None if args.dry_run else pinned_h2d_gbps(torch.device(device))
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        trace = Path(work) / "bundled.trace"
        if shapes:
            record_trace(trace, 512 if args.dry_run else 4096)
        for shape_name in shapes:
            shape = dict(SHAPES[shape_name])
            family, real_layers = shape.pop("family"), shape.pop("real_layers")
            if args.dry_run:
                shape.update(hidden=64, expert_width=32, num_layers=2, heads=4)
            print(f"[gpu_suite] building {shape_name}: {shape}", file=sys.stderr, flush=True)
            started = time.perf_counter()
            model = build_tiny_checkpoint(family, Path(work) / shape_name, dtype=torch.bfloat16, vocab=4096,
                                          max_positions=2048, init_range=0.02, max_shard_size="2GB", fast_init=True,
                                          **shape)
            built_s = time.perf_counter() - started
            base = EngineConfig(device=device, dtype="bfloat16", replay_routing=str(trace),
                                link=LinkConfig(measured_gbps=link_gbps), grouped_hits=args.grouped_hits)
            config = BenchConfig(model, baselines, (8,) if args.dry_run else (16, 512), (1,),
                                 4 if args.dry_run else args.new_tokens, 1 if args.dry_run else args.runs, engine=base)
            rows: dict[str, list[dict]] = {}
            result = {"bench": "gpu_suite", "shape": shape_name, "layers": shape["num_layers"],
                      "real_layers": real_layers, "device": name, "dtype": "bfloat16",
                      "measured": "wall clock", "routing": "replayed from the bundled model's held-out trace "
                      "(mapped onto the shape; approximate)", "link": link_label(config),
                      "note": f"{' and '.join(WHOLE_MODEL)} hold no slots: they run at the 25% cache only",
                      "checkpoint_build_s": built_s, "shape_config": shape, "baselines": list(baselines),
                      "same_tokens_against": baselines[0], "grouped_hits": args.grouped_hits, "runs": config.runs,
                      "new_tokens": config.new_tokens, "torch_threads": torch.get_num_threads(), **provenance(),
                      "rows": rows}
            part = "" if baselines == BASELINES else "_" + "-".join(re.sub(r"[+@]", "_", b) for b in baselines)
            part += "_grouped" if args.grouped_hits else ""
            path = None if args.dry_run else out / f"gpu_{shape_name}_{name}{part}.json"  # a subset has its own file
            suite_started = time.perf_counter()

            def progress(text: str, cache: str) -> None:
                elapsed = time.perf_counter() - suite_started
                print(f"[gpu_suite {elapsed:6.0f} s] {shape_name} cache {cache}: {text}", file=sys.stderr, flush=True)

            def done(row: BenchRow, cache: str) -> None:
                r = asdict(row)
                rows.setdefault(cache, []).append(r)
                print(f"{shape_name:>14} {cache:>4} {r['baseline']:<18} prompt {r['prompt_tokens']:>4} "
                      f"{r['decode_tok_s']:8.2f} tok/s  TTFT {r['ttft_s'] * 1e3:8.1f} ms  "
                      f"hit {r['hit_rate'] if r['hit_rate'] is not None else float('nan'):.3f}  "
                      f"link {r['link_share'] * 100 if r['link_share'] is not None else float('nan'):.0f}%", flush=True)
                if path:  # after every row, so that a call cut off at its time limit keeps what it finished
                    write_text_atomic(path, json.dumps(dict(result, partial=True)) + "\n")

            for cache in ("25%", "50%"):
                bench = replace(config, engine=replace(base, cache=cache_config(cache, CacheConfig())),
                                baselines=baselines if cache == "25%" else tuple(b for b in baselines if b in SLOTTED))
                if not bench.baselines:
                    continue
                run_bench(bench, partial(progress, cache=cache), on_row=partial(done, cache=cache))
            emit_json(result, path)
    if not args.predictor_cost:
        return 0
    cost = (["--dry-run", "--runs", "1", "--new-tokens", "4", "--trace-tokens", "256"] if args.dry_run else
            ["--device", device, "--layers", str(predictor_cost.REAL_LAYERS), "--runs", str(args.runs),
             "--out", str(out / f"predictor_cost_{name}.json")])
    return predictor_cost.main(cost)


if __name__ == "__main__":
    sys.exit(main())
