"""bench.py measures: it runs each baseline over prompt lengths and batch sizes, a warm-up then several
timed runs from a cold expert cache (baseline after baseline, or interleaved), and reduces the runs to one
row per (baseline, prompt, batch).
It prints nothing; cli_bench.py turns rows into a table, a JSON line and plots.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from activemoe.baselines import RunResult, Runner, make_runner
from activemoe.config import CacheConfig, EngineConfig
from activemoe.engine import check_context, checkpoint_config, encode_text, load_tokenizer, model_shape
from activemoe.errors import UserError
from activemoe.learned import SIDECAR
from activemoe.reuse import has_reuse_heads
from activemoe.trace import HELDOUT_LIST, split_texts

Progress = Callable[[str], None]  # called before each run with a description


@dataclass(frozen=True)
class BenchConfig:
    model_dir: Path
    baselines: tuple[str, ...] = ("transformers", "accelerate", "reactive", "host", "pregate+slru@3")
    prompt_lengths: tuple[int, ...] = (16, 128, 512)
    batch_sizes: tuple[int, ...] = (1,)
    new_tokens: int = 64
    runs: int = 3  # timed runs per row, after one warm-up per baseline
    interleave: bool = False  # all baselines loaded at once, their runs alternating
    engine: EngineConfig = field(default_factory=EngineConfig)  # device, dtype, cache size, link for ActiveMoE

    @staticmethod
    def tiny(model_dir: Path, baselines: tuple[str, ...] = ("transformers", "reactive")) -> BenchConfig:
        return BenchConfig(model_dir, baselines, prompt_lengths=(4,), new_tokens=4, runs=1,
                           engine=EngineConfig(cache=CacheConfig(slot_fraction=0.25)))


@dataclass(frozen=True)
class BenchRow:
    baseline: str
    prompt_tokens: int
    batch_size: int
    decode_tok_s: float  # median over runs; tokens of all sequences per second
    decode_tok_s_min: float
    decode_tok_s_max: float
    ttft_s: float  # median
    p50_ms: float  # per decode step, all runs pooled
    p99_ms: float
    peak_host_bytes: int
    peak_device_bytes: int | None
    same_tokens: bool | None  # greedy tokens equal the reference baseline's (the first exact one run)
    hit_rate: float | None = None  # decode steps
    recall_1: float | None = None
    decode_bytes_per_token: float | None = None
    stall_s: float | None = None
    overlap: float | None = None
    reuse: float | None = None
    ttft_floor_s: float | None = None  # prefill's distinct experts x expert bytes / link (link_speed)
    predict_share: float | None = None  # median share of decode wall time in the predictor (ActiveMoE, in place)
    link_share: float | None = None  # share of the link's capacity decode used (see link_share)


def default_baselines(model_dir: Path) -> tuple[str, ...]:
    """The baselines, plus the learned predictor (with SLRU and with LFRU, and with the reuse policy when the file
    has reuse heads) when the model directory ships its heads."""
    sidecar = model_dir / SIDECAR
    learned = ("learned+slru@3", "learned+lfru@3") if sidecar.is_file() else ()
    learned += ("learned+reuse@3",) if has_reuse_heads(sidecar) else ()
    return BenchConfig.__dataclass_fields__["baselines"].default + learned


def prompts_for(model_dir: Path, encode, vocab_size: int, length: int, batch: int) -> list[list[int]]:
    """`batch` prompts of `length` tokens: consecutive held-out text of a bundled-style model, else
    random ids (fixed seed)."""
    if encode is not None and (model_dir / HELDOUT_LIST).is_file():
        ids: list[int] = []
        for text in split_texts(model_dir, "heldout"):
            ids += encode(text)
            if len(ids) >= length * batch:
                return [ids[i * length:(i + 1) * length] for i in range(batch)]
    gen = torch.Generator().manual_seed(length * 1000 + batch)
    return torch.randint(3, vocab_size, (batch, length), generator=gen).tolist()


def bench_prompts(config: BenchConfig) -> dict[tuple[int, int], list[list[int]]]:
    """Per (prompt length, batch size), the prompts: held-out text with the checkpoint's own tokenizer
    for a bundled-style model, whichever baseline runs first; else random ids."""
    tokenizer = load_tokenizer(config.model_dir)
    encode = None if tokenizer is None else partial(encode_text, tokenizer)
    vocab = checkpoint_config(config.model_dir).get_text_config().vocab_size
    return {(length, batch): prompts_for(config.model_dir, encode, vocab, length, batch)
            for length in config.prompt_lengths for batch in config.batch_sizes}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def reduce_runs(baseline: str, prompt_tokens: int, results: list[RunResult], reference: list[list[int]] | None,
                link_gbps: float | None) -> BenchRow:
    speeds = [r.decode_tok_s for r in results]
    speed = statistics.median(speeds)
    steps_ms = [s * 1e3 for r in results for s in r.per_token_s]
    last = results[-1]
    needed = last.prefill_bytes_needed
    floor = needed / (link_gbps * 1e9) if needed and link_gbps else None
    return BenchRow(
        baseline, prompt_tokens, last.batch_size, speed, min(speeds), max(speeds),
        statistics.median(r.ttft_s for r in results), _percentile(steps_ms, 0.5), _percentile(steps_ms, 0.99),
        max(r.peak_host_bytes for r in results),
        None if last.peak_device_bytes is None else max(r.peak_device_bytes for r in results),
        None if reference is None else all(r.sequences == reference for r in results),
        last.hit_rate, last.recall.get("1"), last.decode_bytes_per_token, last.stall_s, last.overlap, last.reuse, floor,
        None if last.predict_share is None else statistics.median(r.predict_share for r in results),
        link_share(speed, last.decode_bytes_per_token, link_gbps))


def link_share(decode_tok_s: float, bytes_per_token: float | None, link_gbps: float | None) -> float | None:
    """The share of the link's capacity that decode used: bytes per second over the link's speed. Near 1 the
    run is bound by the link (only fewer bytes make it faster); well below 1 it is bound by compute or waiting."""
    return None if bytes_per_token is None or not link_gbps else decode_tok_s * bytes_per_token / (link_gbps * 1e9)


def available_bytes(device: str) -> int:
    """Free memory where a whole model would have to sit: CUDA's free memory, or the host's MemAvailable."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 1 << 62  # unknown: try


def does_not_fit(spec: str, config: BenchConfig) -> str | None:
    """Why a whole-model baseline cannot run here (transformers holds every expert on the device;
    accelerate loads the whole model into host RAM before dispatching), or None."""
    if spec not in ("transformers", "accelerate"):
        return None
    shape = model_shape(config.model_dir, config.engine.dtype)
    need = shape.resident_bytes + shape.total_experts * shape.expert_bytes
    where = config.engine.device if spec == "transformers" else "cpu"
    free = available_bytes(where)
    if need > 0.9 * free:
        return f"{spec}: skipped, the whole model needs {need / 2**30:.1f} GiB and {where} has {free / 2**30:.1f} GiB free"
    return None


def run_bench(config: BenchConfig, progress: Progress = lambda _: None, skipped: list[str] | None = None,
              on_row: Callable[[BenchRow], None] = lambda _: None) -> list[BenchRow]:
    """All rows; the reference tokens come from the first baseline run (exact baselines agree with it).
    Whole-model baselines that cannot fit are left out, with the reason appended to `skipped`.
    Interleaved: every baseline is loaded at once and their runs alternate (A, B, C, A, B, C, ...), so a
    slow spell of the machine hits them alike; else one baseline is loaded at a time. `on_row` is called
    with each row as soon as its baseline's runs are done."""
    if config.runs < 1 or config.new_tokens < 2:
        raise UserError("--runs must be at least 1 and --new-tokens at least 2")
    check_context(checkpoint_config(config.model_dir), max(config.prompt_lengths), config.new_tokens)
    shapes = [(length, batch) for length in config.prompt_lengths for batch in config.batch_sizes]
    fitting = []
    for spec in config.baselines:
        reason = does_not_fit(spec, config)
        if reason:
            progress(reason)
            if skipped is not None:
                skipped.append(reason)
        else:
            fitting.append(spec)
    prompts: dict[tuple[int, int], list[list[int]]] = {}
    references: dict[tuple[int, int], list[list[int]]] = {}
    rows = []
    for group in [fitting] if config.interleave else [[spec] for spec in fitting]:
        runners: dict[str, Runner] = {}
        try:
            for spec in group:
                progress(f"{spec}: loading")
                runners[spec] = make_runner(spec, config.model_dir, config.engine)
            if not prompts:
                prompts = bench_prompts(config)
            for spec, runner in runners.items():
                progress(f"{spec}: warm-up")
                runner.run(prompts[shapes[0]], min(8, config.new_tokens))
            results: dict[tuple[str, tuple[int, int]], list[RunResult]] = {}
            for shape in shapes:
                for i in range(config.runs):
                    for spec, runner in runners.items():
                        progress(f"{spec}: prompt {shape[0]}, batch {shape[1]}, run {i + 1}/{config.runs}")
                        results.setdefault((spec, shape), []).append(runner.run(prompts[shape], config.new_tokens))
            for spec in group:
                for shape in shapes:
                    reference = references.setdefault(shape, results[(spec, shape)][0].sequences)
                    rows.append(reduce_runs(spec, shape[0], results[(spec, shape)], reference, link_speed(config)))
                    on_row(rows[-1])
        finally:
            for runner in runners.values():
                runner.close()
    return rows


def link_speed(config: BenchConfig) -> float | None:
    """The link speed floors and shares are taken against: the emulated one on CPU, the measured one on CUDA."""
    link = config.engine.link
    return link.link_gbps if config.engine.device == "cpu" else link.measured_gbps


def compare_grid(config: BenchConfig, predictors: list[str], policies: list[str], caches: list[str],
                 progress: Progress = lambda _: None) -> list[tuple[str, BenchRow]]:
    """`activemoe compare`: predictors x policies x cache sizes (each `N%` of all experts or `N` slots),
    one prompt length, rows tagged with their cache size."""
    out = []
    for cache in caches:
        bench = replace(config, baselines=tuple(f"{p}+{q}@{config.engine.prefetch.lookahead}"
                                                for p in predictors for q in policies),
                        engine=replace(config.engine, cache=cache_config(cache, config.engine.cache)))
        out += [(cache, row) for row in run_bench(bench, lambda text, c=cache: progress(f"cache {c}: {text}"))]
    return out


def cache_config(text: str, base: CacheConfig) -> CacheConfig:
    """'25%' -> a share of all experts; '12' -> that many slots."""
    try:
        if text.endswith("%"):
            fraction = float(text[:-1]) / 100
            if not 0 < fraction <= 1:
                raise ValueError
            return replace(base, num_slots=None, expert_memory_bytes=None, slot_fraction=fraction)
        return replace(base, num_slots=int(text), expert_memory_bytes=None)
    except ValueError:
        raise UserError(f"cannot parse cache size {text!r}: use a share like 25% or a slot count like 12") from None
