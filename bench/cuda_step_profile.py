"""Where a CUDA decode step's time goes, at a real expert shape: a random bf16 checkpoint at OLMoE-1B-7B's
shape (fewer layers, said in the output), routing replayed from the bundled model's trace. Reports whether the
host tier is page-locked, the copy speed of one expert from it into the device, each configuration's decode
speed at the default torch threads and at one, and a cProfile and a torch.profiler summary of one decode.
Measured wall clock; a diagnosis tool, not a headline. One table, one JSON line; profiles under --out.

    python3 bench/cuda_step_profile.py --out DIR [--layers 4] [--new-tokens 32]
    python3 bench/cuda_step_profile.py --out DIR --configs reactive --chunk-bytes 1048576,auto --no-profile
    python3 bench/cuda_step_profile.py --out DIR --grouped-hits off,on --no-profile   # per-expert vs grouped hits
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_suite import SHAPES, provenance, record_trace  # noqa: E402  (a sibling script)

from activemoe.atomic import emit_json  # noqa: E402
from activemoe.baselines import make_runner  # noqa: E402
from activemoe.bench import cache_config  # noqa: E402
from activemoe.config import CacheConfig, EngineConfig, LinkConfig  # noqa: E402
from activemoe.hardware import pinned_h2d_gbps  # noqa: E402
from activemoe.tiny import build_tiny_checkpoint  # noqa: E402

CONFIGS = ("reactive", "oracle+belady@2", "history+lfru@3")  # replayed routing: see gpu_suite.BASELINES


def expert_copy_gbps(runtime, device: torch.device, repeats: int = 20) -> float:
    """One expert's tensors from the host tier into fresh device memory, all of them `repeats` times, timed
    with a sync (hardware.copy_gbps times one tensor)."""
    srcs = [t[0, 0] for t in runtime.store.host.values()]  # the first MoE layer's expert 0
    dsts = [torch.empty_like(s, device=device) for s in srcs]
    for d, s in zip(dsts, srcs):
        d.copy_(s, non_blocking=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _: None)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        for d, s in zip(dsts, srcs):
            d.copy_(s, non_blocking=True)
    sync(device)
    return repeats * sum(s.numel() * s.element_size() for s in srcs) / (time.perf_counter() - start) / 1e9


def _parse_chunks(text: str) -> list[int | None]:
    return [None if c == "auto" else int(c) for c in text.split(",")]


def _parse_switch(text: str) -> list[bool]:
    values = {"off": False, "on": True}
    if not text or set(text.split(",")) - set(values):
        raise argparse.ArgumentTypeError(f"expected off, on or off,on; got {text!r}")
    return [values[v] for v in text.split(",")]


def _profile(runner, prompt: list[list[int]], new_tokens: int, out: Path, tag: str) -> None:
    """cProfile (every thread's Python, by own time) and torch.profiler (CPU ops and CUDA kernels) of one decode."""
    profile = cProfile.Profile()
    profile.enable()
    runner.run(prompt, new_tokens)
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(40)
    (out / f"cprofile_{tag}.txt").write_text(text.getvalue())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        runner.run(prompt, new_tokens)
    (out / f"torchprof_{tag}.txt").write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="ActiveMoE baselines, as in activemoe bench")
    parser.add_argument("--chunk-bytes", default="auto", help="copy chunk sizes to compare (auto: by the link)")
    parser.add_argument("--grouped-hits", default="off", type=_parse_switch,
                        help="the experts READY at a decode layer's start one at a time (off), in one grouped call "
                             "(on), or both to compare (off,on); default off")
    parser.add_argument("--one-thread", action=argparse.BooleanOptionalAction, default=True,
                        help="also decode with one torch thread (default on)")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="cProfile and torch.profiler of one decode per row, under --out (default on)")
    parser.add_argument("--out", required=True, help="directory for the profiles")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on CPU: checks the script, no results")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("cuda_step_profile: no CUDA device", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.dry_run else "cuda")
    threads = sorted({torch.get_num_threads()} | ({1} if args.one_thread else set()), reverse=True)
    default_threads = threads[0]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        trace = Path(work) / "bundled.trace"
        record_trace(trace, 256 if args.dry_run else 1024)
        shape = dict(SHAPES["olmoe-1b-7b"], num_layers=args.layers)
        if args.dry_run:
            shape.update(hidden=64, expert_width=32, num_layers=2, heads=4)
        family, _ = shape.pop("family"), shape.pop("real_layers")
        model = build_tiny_checkpoint(family, Path(work) / "model", dtype=torch.bfloat16, vocab=4096,
                                      max_positions=2048, init_range=0.02, max_shard_size="2GB", fast_init=True,
                                      **shape)
        measured = None if args.dry_run else pinned_h2d_gbps(device)  # once, for every engine's copy chunks
        base = EngineConfig(device=device.type, dtype="bfloat16", replay_routing=str(trace),
                            link=LinkConfig(measured_gbps=measured),
                            cache=cache_config("25%", CacheConfig()))
        prompt = [[(7 * i) % 4000 + 5 for i in range(args.prompt_tokens)]]
        for spec in args.configs.split(","):
            for chunk, grouped in [(c, g) for c in _parse_chunks(args.chunk_bytes) for g in args.grouped_hits]:
                runner = make_runner(spec, model, replace(base, prefetch=replace(base.prefetch, chunk_bytes=chunk),
                                                          grouped_hits=grouped))
                try:
                    runtime = runner.engine.runtime
                    row = {"config": spec, "chunk_bytes": chunk or "auto", "grouped_hits": grouped,
                           "chunks_per_expert": len(runtime.loader.slab.chunks),
                           "host_pinned": all(t.is_pinned() for t in runtime.store.host.values()),
                           "expert_copy_gbps": expert_copy_gbps(runtime, device)}
                    runner.run(prompt, 8)  # warm-up
                    for n in threads:
                        torch.set_num_threads(n)
                        result = runner.run(prompt, args.new_tokens)
                        row[f"tok_s_threads_{n}"], row[f"ttft_s_threads_{n}"] = result.decode_tok_s, result.ttft_s
                    torch.set_num_threads(default_threads)
                    if args.profile:
                        _profile(runner, prompt, args.new_tokens, out, f"{spec}_{row['chunk_bytes']}"
                                 f"{'_grouped' if grouped else ''}".replace("+", "_").replace("@", "_"))
                finally:
                    runner.close()
                rows.append(row)
                print(f"{spec:<18} chunk {str(row['chunk_bytes']):>8} ({row['chunks_per_expert']}/expert)  "
                      f"hits {'grouped' if grouped else 'one by one'}  "
                      f"pinned {row['host_pinned']}  copy {row['expert_copy_gbps']:5.1f} GB/s  " + "  ".join(
                          f"{n} thr: {row[f'tok_s_threads_{n}']:6.2f} tok/s "
                          f"TTFT {row[f'ttft_s_threads_{n}'] * 1e3:6.0f} ms" for n in threads), flush=True)
    emit_json({"bench": "cuda_step_profile", "measured": "wall clock", "dry_run": args.dry_run,
               "device": "cpu" if args.dry_run else torch.cuda.get_device_name(),
               "shape": "olmoe-1b-7b", "layers": shape["num_layers"], "prompt_tokens": args.prompt_tokens,
               "new_tokens": args.new_tokens, "routing": "replayed", "cache": "25%", **provenance(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
