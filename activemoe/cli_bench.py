"""`activemoe bench` and `activemoe compare`: flags to a BenchConfig, a progress bar while bench.py
measures, then one aligned table, one JSON line, and with --out a directory of JSON and PNG plots
(written to temporary names and renamed, so an interrupted run leaves no half-written result).
"""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from activemoe.atomic import emit_json, write_atomic
from activemoe.bench import (BenchConfig, BenchRow, cache_config, compare_grid, default_baselines, link_speed,
                             run_bench)
from activemoe.cli_tools import add_dtype_flag, add_grouped_hits_flag, add_issue_window_flag, check_prefetch_flags
from activemoe.config import CacheConfig, EngineConfig, LinkConfig, PrefetchConfig
from activemoe.errors import UserError

CPU_LINK_GBPS = 0.25  # default emulated link on CPU: one expert of the bundled model takes ~1.2 ms


def _common(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--device", default="cpu", help="compute device: cpu or cuda (default cpu)")
    add_dtype_flag(p)
    p.add_argument("--link-gbps", type=float,
                   help=f"emulated host-to-device link in GB/s (CPU only; default {CPU_LINK_GBPS} on CPU; CUDA uses "
                        "its real link)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default 64)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per row after a warm-up (default 3)")
    p.add_argument("--interleave", action="store_true",
                   help="load every baseline at once and alternate their runs, so a slow spell of the machine hits "
                        "all alike (fairer ratios on a noisy machine; needs memory for all baselines together)")
    p.add_argument("--lookahead", type=int, default=2, help="lookahead of predictive configs without @K (default 2)")
    p.add_argument("--replay-routing", metavar="TRACE",
                   help="force every baseline's routing from a recorded trace mapped onto this model's shape "
                        "(benchmarks of random checkpoints at real shapes; labelled replay)")
    add_issue_window_flag(p)
    add_grouped_hits_flag(p)
    p.add_argument("--out", help="directory for the JSON result and PNG plots")


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="benchmark ActiveMoE against the baselines users would pick",
                       description="Decode tokens/s, TTFT (against its link floor), per-token p50/p99, hit rate, "
                                   "recall, bytes per token, link share, stall, overlap and peak memory, for each "
                                   "baseline at each prompt length and batch size. Measured wall clock. Baselines: "
                                   "transformers (all experts resident), accelerate (its device_map offload of the "
                                   "experts), reactive (on-demand LRU), host (experts computed on the host), and "
                                   "PREDICTOR[+POLICY][@LOOKAHEAD], e.g. learned+slru@2. Floors and link shares are "
                                   "taken against the emulated link on CPU and the measured pinned host-to-device "
                                   "speed on CUDA.")
    _common(p)
    p.add_argument("--baselines", help="comma-separated baselines (default: transformers,accelerate,reactive,host,"
                                       "pregate+slru@3, and learned+slru@3,learned+lfru@3 when the model ships learned heads, "
                                       "learned+reuse@3 when they include reuse heads)")
    p.add_argument("--prompt-lengths", default="16,128,512", help="prompt tokens, comma-separated (default 16,128,512)")
    p.add_argument("--batch-size", default="1", help="batch sizes, comma-separated, e.g. 1,4,8 (default 1)")
    p.add_argument("--cache", default="25%", help="expert slots: a share of all experts (25%%) or a count (default 25%%)")
    p = sub.add_parser("compare", help="a grid of predictors x policies x cache sizes on one model",
                       description="Decode tokens/s and hit rate of every predictor x policy at each cache size, "
                                   "measured wall clock, as a table, a JSON line and (with --out) plots.")
    _common(p)
    p.add_argument("--predictors", default="none,pregate,learned", help="comma-separated (default %(default)s)")
    p.add_argument("--policies", default="lru,slru", help="comma-separated (default %(default)s)")
    p.add_argument("--caches", default="25%,50%", help="comma-separated shares or slot counts (default %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (default 16)")


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise UserError(f"{flag} must be comma-separated positive integers, got {text!r}")
    return values


def _config(args, baselines: tuple[str, ...], prompt_lengths, batch_sizes, cache: str) -> BenchConfig:
    import torch

    if args.device == "cpu":  # one core computes (every baseline alike), one is left for the copy thread
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise UserError(f"{model} is not a checkpoint directory (no config.json)")
    link = args.link_gbps if args.link_gbps is not None else (CPU_LINK_GBPS if args.device == "cpu" else None)
    if link is not None and link <= 0:
        raise UserError("--link-gbps must be positive")
    check_prefetch_flags([args.lookahead], args.issue_window)
    if args.replay_routing and not Path(args.replay_routing).is_file():
        raise UserError(f"trace file {args.replay_routing} does not exist")
    measured = None
    if args.device.startswith("cuda"):  # the TTFT floor and link share are taken against the real link's speed,
        from activemoe.hardware import pinned_h2d_gbps  # measured once here and handed to every engine

        measured = pinned_h2d_gbps(torch.device(args.device))
    engine = EngineConfig(device=args.device, dtype=args.dtype, link=LinkConfig(link_gbps=link, measured_gbps=measured),
                          replay_routing=args.replay_routing, grouped_hits=args.grouped_hits,
                          cache=cache_config(cache, CacheConfig()),
                          prefetch=PrefetchConfig(lookahead=args.lookahead, issue_window=args.issue_window))
    return BenchConfig(model, baselines, prompt_lengths, batch_sizes, args.new_tokens, args.runs,
                       args.interleave, engine)


def _out_dir(args) -> Path | None:
    if not args.out:
        return None
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UserError(f"cannot write to --out {out}: {e.strerror or e}") from None
    return out


def _measure(fn):
    """Run fn(progress) under a rich progress bar on stderr (plain lines when stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if not sys.stderr.isatty():
        return fn(lambda text: print(f"[bench] {text}", file=sys.stderr, flush=True))
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True,
                  console=Console(stderr=True)) as bar:
        task = bar.add_task("starting", total=None)
        return fn(lambda text: bar.update(task, description=text))


def link_label(config: BenchConfig) -> str:
    """The link a result's floors and shares are taken against (bench.link_speed), as its JSON names it."""
    gbps = link_speed(config)
    if not gbps:
        return "real"
    if config.engine.device == "cpu":
        return f"emulated {gbps} GB/s"
    return f"real, pinned host-to-device measured {gbps:.1f} GB/s"


def conditions(config: BenchConfig) -> dict:
    import torch

    from activemoe.engine import checkpoint_dtype_name
    from activemoe.hardware import machine_label

    e = config.engine
    dtype = checkpoint_dtype_name(config.model_dir, e.dtype)
    return {"measured": "wall clock", "machine": machine_label(e.device), "device": e.device, "dtype": dtype,
            "link": link_label(config),
            "torch_threads": torch.get_num_threads(), "model": str(config.model_dir),
            "routing": f"replayed from {e.replay_routing} (approximate)" if e.replay_routing else "exact",
            "new_tokens": config.new_tokens, "runs": config.runs, "interleaved": config.interleave,
            "grouped_hits": e.grouped_hits, "issue_window": e.prefetch.issue_window}


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def print_table(rows: list[BenchRow], title: str, tags: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = (["cache"] if tags else []) + ["baseline", "prompt", "batch", "tok/s", "min-max", "TTFT ms", "floor ms",
                                             "p50 ms", "p99 ms", "decode hit", "recall@1", "predict %", "MB/tok",
                                             "link %", "stall s", "overlap", "reuse", "host MiB", "dev MiB",
                                             "same tokens"]
    for c in columns:
        table.add_column(c, justify="left" if c in ("baseline", "cache") else "right")
    for i, r in enumerate(rows):
        cells = [r.baseline, str(r.prompt_tokens), str(r.batch_size), f"{r.decode_tok_s:.1f}",
                 f"{r.decode_tok_s_min:.1f}-{r.decode_tok_s_max:.1f}", f"{r.ttft_s * 1e3:.1f}",
                 _fmt(r.ttft_floor_s, ".1f", 1e3), f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", _fmt(r.hit_rate, ".3f"),
                 _fmt(r.recall_1, ".3f"), _fmt(r.predict_share, ".1f", 100),
                 _fmt(r.decode_bytes_per_token, ".2f", 1e-6), _fmt(r.link_share, ".0f", 100), _fmt(r.stall_s, ".3f"),
                 _fmt(r.overlap, ".2f"), _fmt(r.reuse, ".2f"), f"{r.peak_host_bytes / 2**20:.0f}",
                 _fmt(r.peak_device_bytes, ".0f", 2**-20), {None: "-", True: "yes", False: "NO"}[r.same_tokens]]
        table.add_row(*(([tags[i]] if tags else []) + cells))
    Console(width=None if sys.stdout.isatty() else 240).print(table)


def _plot_bench(rows: list[BenchRow], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(dict.fromkeys(r.baseline for r in rows))
    shapes = list(dict.fromkeys((r.prompt_tokens, r.batch_size) for r in rows))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        by = {(r.prompt_tokens, r.batch_size): r for r in rows if r.baseline == name}
        xs = [j + i * width for j in range(len(shapes))]
        left.bar(xs, [by[s].decode_tok_s if s in by else 0 for s in shapes], width, label=name)
        right.bar(xs, [by[s].ttft_s * 1e3 if s in by else 0 for s in shapes], width, label=name)
    floors = {(r.prompt_tokens, r.batch_size): r.ttft_floor_s for r in rows if r.ttft_floor_s}
    for j, s in enumerate(shapes):
        if s in floors:
            right.hlines(floors[s] * 1e3, j - width / 2, j + 0.8 - width / 2, colors="k", linestyles="--",
                         label="link floor" if j == 0 else None)
    for ax, label in ((left, "decode tokens/s (measured)"), (right, "TTFT ms (measured)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], [f"prompt {p}\nbatch {b}" for p, b in shapes])
        ax.set_ylabel(label)
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _plot_compare(tagged: list[tuple[str, BenchRow]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    caches = list(dict.fromkeys(c for c, _ in tagged))
    for name in dict.fromkeys(r.baseline for _, r in tagged):
        by = {c: r for c, r in tagged if r.baseline == name}
        left.plot(caches, [by[c].decode_tok_s for c in caches], marker="o", label=name)
        right.plot(caches, [by[c].hit_rate for c in caches], marker="o", label=name)
    left.set_ylabel("decode tokens/s (measured)")
    right.set_ylabel("hit rate")
    for ax in (left, right):
        ax.set_xlabel("cache (share of all experts or slots)")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def cmd_bench(args) -> int:
    baselines = (tuple(b for b in args.baselines.split(",") if b) if args.baselines
                 else default_baselines(Path(args.model)))
    config = _config(args, baselines, _ints(args.prompt_lengths, "--prompt-lengths"),
                     _ints(args.batch_size, "--batch-size"), args.cache)
    out = _out_dir(args)
    skipped: list[str] = []
    rows = _measure(lambda progress: run_bench(config, progress, skipped))
    cond = conditions(config)
    print_table(rows, f"activemoe bench — measured wall clock, {cond['machine']}, {cond['device']}, link {cond['link']}, "
                      f"cache {args.cache}, routing {cond['routing']}")
    for reason in skipped:
        print(reason)
    result = {"bench": "activemoe bench", **cond, "cache": args.cache, "skipped": skipped,
              "rows": [asdict(r) for r in rows]}
    emit_json(result, out / "bench.json" if out else None)
    if out:
        write_atomic(out / "bench.png", lambda tmp: _plot_bench(rows, tmp))
    return 0


def cmd_compare(args) -> int:
    split = lambda text: [v for v in text.split(",") if v]  # noqa: E731
    config = _config(args, (), (args.prompt_tokens,), (1,), "25%")
    out = _out_dir(args)
    tagged = _measure(lambda progress: compare_grid(config, split(args.predictors), split(args.policies),
                                                    split(args.caches), progress))
    cond = conditions(config)
    print_table([r for _, r in tagged], f"activemoe compare — measured wall clock, {cond['machine']}, "
                                        f"{cond['device']}, link {cond['link']}", tags=[c for c, _ in tagged])
    emit_json({"bench": "activemoe compare", **cond, "rows": [{"cache": c, **asdict(r)} for c, r in tagged]},
              out / "compare.json" if out else None)
    if out:
        write_atomic(out / "compare.png", lambda tmp: _plot_compare(tagged, tmp))
    return 0


COMMANDS = {"bench": cmd_bench, "compare": cmd_compare}
