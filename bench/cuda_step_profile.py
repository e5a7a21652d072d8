"""Where a CUDA decode step's time goes, at a real expert shape: a random bf16 checkpoint at OLMoE-1B-7B's
shape (fewer layers, said in the output), routing replayed from the bundled model's trace. Reports whether the
host tier is page-locked, the copy speed of one expert from it into the device, each configuration's decode
speed at the default torch threads and at one, and a cProfile and a torch.profiler summary of one decode.
Measured wall clock; a diagnosis tool, not a headline. One table, one JSON line; profiles under --out.

    python3 bench/cuda_step_profile.py --out DIR [--layers 4] [--new-tokens 32]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_suite import SHAPES, record_trace  # noqa: E402  (a sibling script)

from activemoe.atomic import emit_json  # noqa: E402
from activemoe.baselines import make_runner  # noqa: E402
from activemoe.config import EngineConfig, LinkConfig  # noqa: E402
from activemoe.bench import cache_config  # noqa: E402
from activemoe.config import CacheConfig  # noqa: E402
from activemoe.tiny import build_tiny_checkpoint  # noqa: E402

CONFIGS = ("reactive", "oracle+belady@2", "pregate+slru@2")


def copy_gbps(runtime, device: torch.device, repeats: int = 20) -> float:
    """One expert's tensors from the host tier into fresh device memory, `repeats` times, timed with a sync."""
    host = runtime.store.host
    layer_row = 0
    srcs = [t[layer_row, 0] for t in host.values()]
    dsts = [torch.empty_like(s, device=device) for s in srcs]
    for d, s in zip(dsts, srcs):
        d.copy_(s, non_blocking=True)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        for d, s in zip(dsts, srcs):
            d.copy_(s, non_blocking=True)
    torch.cuda.synchronize(device)
    return repeats * sum(s.numel() * s.element_size() for s in srcs) / (time.perf_counter() - start) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", required=True, help="directory for the profiles")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_step_profile: no CUDA device", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        trace = Path(work) / "bundled.trace"
        record_trace(trace, 1024)
        shape = dict(SHAPES["olmoe-1b-7b"], num_layers=args.layers)
        family, _ = shape.pop("family"), shape.pop("real_layers")
        model = build_tiny_checkpoint(family, Path(work) / "model", dtype=torch.bfloat16, vocab=4096,
                                      max_positions=2048, init_range=0.02, max_shard_size="2GB", **shape)
        base = EngineConfig(device="cuda", dtype="bfloat16", replay_routing=str(trace), link=LinkConfig(),
                            cache=cache_config("25%", CacheConfig()))
        prompt = [[(7 * i) % 4000 + 5 for i in range(16)]]
        for spec in CONFIGS:
            runner = make_runner(spec, model, base)
            try:
                runtime = runner.engine.runtime
                pinned = all(t.is_pinned() for t in runtime.store.host.values())
                gbps = copy_gbps(runtime, device)
                runner.run(prompt, 8)  # warm-up
                speeds = {}
                for n in (threads, 1):
                    torch.set_num_threads(n)
                    speeds[n] = runner.run(prompt, args.new_tokens).decode_tok_s
                torch.set_num_threads(threads)
                profile = cProfile.Profile()
                profile.enable()
                runner.run(prompt, args.new_tokens)
                profile.disable()
                text = io.StringIO()
                pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(40)
                (out / f"cprofile_{spec.replace('+', '_').replace('@', '_')}.txt").write_text(text.getvalue())
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
                    runner.run(prompt, args.new_tokens)
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
                (out / f"torchprof_{spec.replace('+', '_').replace('@', '_')}.txt").write_text(table)
                rows.append({"config": spec, "host_pinned": pinned, "expert_copy_gbps": gbps,
                             f"tok_s_threads_{threads}": speeds[threads], "tok_s_threads_1": speeds[1]})
                print(f"{spec:<18} pinned {pinned}  copy {gbps:6.1f} GB/s  tok/s {speeds[threads]:7.2f} "
                      f"({threads} threads)  {speeds[1]:7.2f} (1 thread)", flush=True)
            finally:
                runner.close()
    emit_json({"bench": "cuda_step_profile", "measured": "wall clock", "device": torch.cuda.get_device_name(),
               "shape": "olmoe-1b-7b", "layers": args.layers, "new_tokens": args.new_tokens, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
