"""The `activemoe` subcommands beyond generate: routing traces, predictor training and evaluation,
perplexity, the machine profile and the memory plan. Flags become configs here; nothing below prints.
"""
from __future__ import annotations

import contextlib
import json
import sys

from activemoe import cli_simulate
from activemoe.config import DTYPES, ROUTING, CacheConfig, EngineConfig, PrefetchConfig, parse_size
from activemoe.errors import UserError
from activemoe.families import offloaded_modules, router_parts
from activemoe.reuse import WIDTH


@contextlib.contextmanager
def progress_bar(description: str):
    """A rich progress bar on stderr while the block runs; yields its (done, total) callback, or None when stderr
    is not a terminal."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


ALL_EXPERTS = "every expert; with a model larger than the device, give a size"


def add_dtype_flag(p) -> None:
    """--dtype, shared by every command that loads a checkpoint's weights (or plans for them)."""
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="compute dtype of the resident weights and expert slots (default auto: the checkpoint's own, "
                        "float32 when its config names none)")


def add_grouped_hits_flag(p) -> None:
    """--grouped-hits, shared by generate and bench."""
    p.add_argument("--grouped-hits", action="store_true",
                   help="decode: run the experts already in slots at a layer's start, and misses that land "
                        "together, as one grouped matmul per projection: a few kernel launches per layer instead of "
                        "a few per expert (for CUDA, where launching kernels bounds a decode step; measured faster "
                        "on an H100 with the oracle, level with reactive LRU). Exact: the same products, summed "
                        "in the same order")


def add_issue_window_flag(p) -> None:
    """--issue-window, shared by generate, bench, compare and simulate."""
    p.add_argument("--issue-window", type=int, default=PrefetchConfig.issue_window,
                   help="speculative loads in flight at once; the rest stay queued and are dropped if their layer "
                        f"routes first (default {PrefetchConfig.issue_window})")


def check_prefetch_flags(lookaheads: list[int], issue_window: int) -> None:
    """--lookahead (each value of a sweep) and --issue-window, as generate, bench, compare and simulate take them."""
    if min(lookaheads) < 1 or issue_window < 1:
        raise UserError("--lookahead and --issue-window must be at least 1")


def add_memory_flags(p, default: str) -> None:
    """Where the model computes and how much of it the device holds, shared by every command that runs a
    model: --device, one of --cache-experts / --expert-memory / --gpu-memory (`default` when none), --context
    (what --gpu-memory reserves KV cache for) and --store."""
    from activemoe.store import TIERS

    p.add_argument("--device", default="cpu", help="compute device: cpu or cuda (default cpu)")
    slots = p.add_mutually_exclusive_group()
    slots.add_argument("--cache-experts", type=int, help=f"expert slots on the device (default: {default})")
    slots.add_argument("--expert-memory", help="memory for expert slots, e.g. 2GiB; sets the slot count")
    slots.add_argument("--gpu-memory", help="device budget, e.g. 12GiB: the planner reserves resident weights, the "
                                            "KV cache at --context, activations and workspace; slots get the rest")
    p.add_argument("--context", type=int, default=4096, help="context length the planner reserves KV cache for")
    p.add_argument("--store", default="ram", choices=TIERS,
                   help="slow tier: ram (host copies of all experts) or disk (read on demand from the checkpoint "
                        "files, bypassing the page cache, for models larger than RAM); default ram")


def memory_cache(args, slot_fraction: float, **cache) -> CacheConfig:
    """The CacheConfig of add_memory_flags' flags (`slot_fraction` of all experts when no size is given)."""
    return CacheConfig(num_slots=args.cache_experts, slot_fraction=slot_fraction,
                       expert_memory_bytes=parse_size(args.expert_memory) if args.expert_memory else None,
                       device_memory_bytes=parse_size(args.gpu_memory) if args.gpu_memory else None,
                       context_tokens=args.context, **cache)


def add_precision_flags(p) -> None:
    """--precision and --quant-cache, shared by generate, perplexity and the benchmarks' parsers."""
    p.add_argument("--precision", default="native", metavar="{native,mxfp4,int8,int4}",
                   help="expert copies in the host tier and on the link: native (default, exact: the compute "
                        "dtype); mxfp4 (exact, MXFP4 checkpoints such as GPT-OSS: their own 4.25-bit experts, "
                        "about 3.8x fewer bytes than bfloat16, dequantised into the slots); or int8 (per output "
                        "channel) / int4 (grouped): APPROXIMATE, opt-in — fewer bytes moved, dequantised into "
                        "full-precision slots; quality cost: `activemoe perplexity --precision`")
    p.add_argument("--quant-cache", metavar="DIR", help="directory for the quantised copies (default: the model directory; "
                                         "built once, rebuilt when stale or corrupt)")


def _add_perplexity(sub) -> None:
    p = sub.add_parser("perplexity", help="teacher-forced perplexity of a model over text (e.g. held-out)",
                       description="Perplexity through ActiveMoE, exact or with --routing pregated: the quality "
                                   "cost of the approximate mode, measured.")
    p.add_argument("--model", required=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="text file, one text per line")
    source.add_argument("--split", choices=("heldout", "train"), help="a bundled-style model's corpus split")
    p.add_argument("--routing", default="exact", choices=ROUTING)
    add_dtype_flag(p)
    add_memory_flags(p, ALL_EXPERTS)
    add_precision_flags(p)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=256)


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="show how a device-memory budget would be split for a model",
                       description="Plan a device budget: resident (non-expert) weights, KV cache at --context, "
                                   "activations and workspace, then as many expert slots as fit; refuse with the "
                                   "minimum when the budget is too small. Nothing is loaded.")
    p.add_argument("--model", required=True)
    p.add_argument("--gpu-memory", required=True, help="e.g. 12GiB")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--device", default="cuda", help="cuda (reserves 256 MiB workspace) or cpu")
    p.add_argument("--precision", default="native", choices=("native", "mxfp4"),
                   help="mxfp4: the host tier and the link hold an MXFP4 checkpoint's own experts (as generate "
                        "--precision mxfp4); the slots hold the compute dtype either way")
    add_dtype_flag(p)
    cli_simulate.add_estimate_flags(p)


def cmd_plan(args) -> int:
    from dataclasses import asdict

    from activemoe.engine import checkpoint_dtype_name, memory_plan, model_shape

    config = EngineConfig(device=args.device, dtype=args.dtype, precision=args.precision,
                          cache=CacheConfig(device_memory_bytes=parse_size(args.gpu_memory), context_tokens=args.context))
    result = memory_plan(args.model, config)
    args.dtype = checkpoint_dtype_name(args.model, args.dtype)  # names the estimate's cost model
    print(f"memory plan for {args.model} ({args.dtype}, {args.device}):")
    for name, value in result.rows():
        print(f"  {name:<34} {value}")
    estimate = cli_simulate.plan_estimate(args, model_shape(args.model, args.dtype, args.precision), result.num_slots)
    if estimate:
        print(estimate.pop("line"))
    print(json.dumps({**asdict(result), **({"estimate": estimate} if estimate else {})}))
    return 0


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="measure this machine for a model: bandwidths and expert compute time",
                       description="Detect the device; measure host copy, pinned and pageable host-to-device "
                                   "bandwidth (CUDA), checkpoint read bandwidth with the page cache dropped, and "
                                   "one expert's compute time on host and device for the model's expert shape; "
                                   "recommend --experts-on; save it all as JSON.")
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cpu")
    add_dtype_flag(p)
    p.add_argument("--out", help="write the profile JSON here (atomically)")


def cmd_profile(args) -> int:
    from pathlib import Path

    from activemoe import hardware

    if args.out and not Path(args.out).parent.is_dir():
        raise UserError(f"cannot write {args.out}: its directory does not exist")
    result = hardware.measure(args.model, args.device, args.dtype)
    if args.out:
        result.save(args.out)
    print(f"profile (measured, wall clock) of {result.device} on {result.host}, {result.dtype} experts of "
          f"{result.expert_bytes / 2**20:.2f} MiB")
    rows = [("host memcpy", f"{result.host_copy_gbps:.2f} GB/s"),
            ("H2D pinned / pageable", "n/a (no CUDA device)" if result.h2d_pinned_gbps is None else
             f"{result.h2d_pinned_gbps:.2f} / {result.h2d_pageable_gbps:.2f} GB/s"),
            ("checkpoint read, page cache dropped", f"{result.disk_read_gbps:.2f} GB/s"),
            ("one expert on the host (1/8/64 tokens)", " / ".join(f"{v:.3f}" for v in result.expert_host_ms.values())
             + " ms"),
            ("one expert on the device (1/8/64 tokens)", "n/a" if result.expert_device_ms is None else
             " / ".join(f"{v:.3f}" for v in result.expert_device_ms.values()) + " ms"),
            ("recommended --experts-on", f"{result.recommend_experts_on}: {result.reason}"),
            ("non-expert time per MoE layer (decode)", f"{result.decode_layer_ms:.3f} ms"),
            ("per-load overhead beyond the link's byte time", f"{result.load_overhead_ms:.3f} ms")]
    for name, value in rows:
        print(f"  {name:<42} {value}")
    from dataclasses import asdict

    print(json.dumps(asdict(result)))
    return 0


def cmd_perplexity(args) -> int:

    from activemoe import engine, quant

    if args.max_tokens < 2 or args.seq_len < 2:
        raise UserError("--max-tokens and --seq-len must be at least 2")
    config = EngineConfig(device=args.device, cache=memory_cache(args, 1.0), store=args.store, routing=args.routing,
                          dtype=args.dtype, precision=args.precision, quant_cache_dir=args.quant_cache)
    with progress_bar("reading experts") as on_progress:  # and quantising them, once
        eng = engine.load(args.model, config, on_progress)
    with eng:
        ppl, tokens = eng.perplexity(_chunks(eng, _texts(args), args.seq_len, args.max_tokens))
        slots = eng.load_stats.num_slots
    dtype = engine.checkpoint_dtype_name(args.model, args.dtype)
    print(json.dumps({"model": args.model, "routing": args.routing, "precision": args.precision, "dtype": dtype,
                      "perplexity": ppl, "tokens": tokens, "num_slots": slots, "store": args.store,
                      "approximate": args.routing != "exact" or quant.approximate(args.precision)}))
    return 0


def _add_trace(sub) -> None:
    trace = sub.add_parser("trace", help="record routing traces")
    tsub = trace.add_subparsers(dest="trace_command", required=True)
    p = tsub.add_parser("record", help="record per-token routing (and hidden states) of a model over text",
                        description="Forward text through the model (teacher-forced) and record, per token and MoE "
                                    "layer, the routed experts and weights, optionally the MoE input hidden state.")
    p.add_argument("--model", required=True, help="checkpoint directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="text file, one prompt per line")
    source.add_argument("--split", choices=("heldout", "train"),
                        help="the corpus split of a bundled-style model (its heldout_files.txt)")
    p.add_argument("--out", required=True, help="trace file to write (safetensors; written atomically)")
    p.add_argument("--hidden", action="store_true", help="also record hidden states (needed by pregate/learned)")
    p.add_argument("--max-tokens", type=int, default=8192, help="stop after this many tokens (default 8192)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per forward pass (default 256)")
    p.add_argument("--new-tokens", type=int, default=0,
                   help="treat each --seq-len chunk as a prompt, generate this many greedy tokens after it as `bench` "
                        "does, and record its decode steps too: `--max-tokens 512 --seq-len 512 "
                        "--new-tokens 64` records bench's 512-token workload, which `simulate --prefill 512` "
                        "replays (default 0: teacher-forced text only)")
    add_memory_flags(p, ALL_EXPERTS)


def _add_predictor_commands(sub) -> None:
    p = sub.add_parser("train-predictor", help="train learned lookahead heads from a trace",
                       description="Train one head per (MoE layer, lookahead k) on a trace recorded with --hidden: "
                                   "a linear map (with --model, started from the pre-gate) plus a residual MLP, on "
                                   "the source layer's MoE input and the previous token's MoE input at the target "
                                   "layer.")
    p.add_argument("--trace", required=True)
    p.add_argument("--out", required=True, help="predictor sidecar to write (safetensors)")
    p.add_argument("--model", help="the trace's model directory: start the heads from its routers (recommended)")
    p.add_argument("--lookahead", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--mlp-width", default="64",
                   help="width of each head's residual MLP, or one per lookahead k = 1,2,... (the last repeats), "
                        "e.g. 512,64: 0 for linear heads only (default 64)")
    p.add_argument("--no-context", dest="context", action="store_false",
                   help="heads read only the source layer's input, not the previous token's target-layer input")
    p.add_argument("--reuse-horizon", type=int, default=3,
                   help="also train reuse heads (what `--policy reuse` evicts by): per MoE layer, which experts it "
                        "routes to again within this many tokens; 0: none (default 3). Best on a trace with decode "
                        "steps (`trace record --new-tokens`)")
    p.add_argument("--reuse-width", type=int, default=WIDTH,
                   help=f"width of each reuse head's hidden layer (default {WIDTH}: on the bundled model, 32 to 256 "
                        f"evicted alike in simulation, and a narrow head costs less per decode step)")
    p.add_argument("--reuse-only", action="store_true",
                   help="train only the reuse heads and add them to the existing --out file, keeping its "
                        "lookahead heads")
    e = sub.add_parser("predict-eval", help="recall@k and precision@k of each predictor on a trace",
                       description="Teacher-forced evaluation of pregate, history and learned predictors on a "
                                   "trace: recall@k / precision@k per target layer and lookahead at a budget of "
                                   "experts per layer, and each predictor's cost per token.")
    e.add_argument("--model", required=True)
    e.add_argument("--trace", required=True)
    e.add_argument("--predictor-file", help="learned heads (default: the model directory's sidecar, if any)")
    e.add_argument("--budget", type=int, help="experts named per target layer (default: the model's top-k)")
    e.add_argument("--lookahead", type=int, default=3)
    e.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens")
    e.add_argument("--plot", help="write a recall heatmap PNG here")
    e.add_argument("--device", default="cpu",
                   help="where the model's routers and the learned heads run, as the runtime runs them: cpu or "
                        "cuda (default cpu)")
    e.add_argument("--no-cost", dest="cost", action="store_false",
                   help="skip the in-place cost, which decodes with every expert in a slot (memory for the whole "
                        "model, twice on CPU); recall alone reads no expert weights, so a model larger than "
                        "this machine can be evaluated")
    e.add_argument("--json", action="store_true", help="print only the JSON line")


def _texts(args) -> list[str]:
    """The texts of --prompts FILE (one per line) or of --split heldout|train."""
    from pathlib import Path

    from activemoe.trace import split_texts

    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise UserError(f"prompts file {path} does not exist")
        return [line for line in path.read_text().splitlines() if line.strip()]
    return split_texts(Path(args.model), args.split)


def _chunks(eng, texts: list[str], seq_len: int, max_tokens: int) -> list[list[int]]:
    ids: list[int] = []
    for text in texts:
        ids += eng.encode(text)
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    if not ids:
        raise UserError("no tokens to record: the prompts are empty")
    return [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]


def cmd_trace(args) -> int:
    from pathlib import Path

    from activemoe import engine

    if args.max_tokens < 1 or args.seq_len < 1 or args.new_tokens < 0:
        raise UserError("--max-tokens and --seq-len must be at least 1, --new-tokens at least 0")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: directory {out.parent} does not exist")
    config = EngineConfig(device=args.device, cache=memory_cache(args, 1.0), store=args.store)
    with engine.load(args.model, config) as eng, progress_bar("recording") as on_progress:
        trace = eng.record_trace(_chunks(eng, _texts(args), args.seq_len, args.max_tokens), keep_hidden=args.hidden,
                                 on_progress=on_progress, new_tokens=args.new_tokens)
        slots = eng.load_stats.num_slots
    trace.save(out)
    print(json.dumps({"trace": str(out), "rows": int(trace.layer.numel()), "tokens": int(trace.token.max()) + 1,
                      "hidden": trace.hidden is not None, "shape_id": trace.meta["shape_id"], "num_slots": slots,
                      "store": args.store}))
    return 0


def cmd_train_predictor(args) -> int:
    from activemoe import engine
    from activemoe.atomic import save_safetensors_atomic
    from activemoe.learned import mlp_widths, read_sidecar, save_heads, train_heads
    from activemoe.reuse import PREFIX, train_reuse_heads
    from activemoe.trace import load_trace

    try:  # checked before the trace (gigabytes) is read
        widths = mlp_widths([int(w) for w in args.mlp_width.split(",")])
    except ValueError:
        raise UserError(f"--mlp-width must be integers separated by commas, got {args.mlp_width!r}") from None
    if args.reuse_horizon < 0 or (args.reuse_only and args.reuse_horizon < 1):
        raise UserError("--reuse-horizon must be at least 1 with --reuse-only, and never negative")
    if args.reuse_width < 1:
        raise UserError("--reuse-width must be at least 1")
    if args.reuse_only:  # checked before the trace is read
        kept, kept_meta = read_sidecar(args.out, None)
    trace = load_trace(args.trace)
    reuse = None
    if args.reuse_horizon:
        with progress_bar("training reuse heads") as on_progress:
            reuse = train_reuse_heads(trace, args.reuse_horizon, width=args.reuse_width, on_progress=on_progress)
    if args.reuse_only:
        if kept_meta.get("shape_id") != trace.meta.get("shape_id"):
            raise UserError(f"{args.out} was trained for another model than the trace's")
        tensors = {k: t for k, t in kept.items() if not k.startswith(PREFIX)} | reuse.tensors()
        save_safetensors_atomic(tensors, args.out, kept_meta | reuse.meta())
        print(json.dumps({"predictor_file": args.out, "reuse_heads": len(reuse.heads), "reuse_horizon": reuse.horizon}))
        return 0
    routers = None
    if args.model:
        with engine.load(args.model, EngineConfig()) as eng:
            trace.check_model(eng.shape_id)
            routers = router_parts(eng.model, offloaded_modules(eng.model))
    with progress_bar("training heads") as on_progress:
        heads = train_heads(trace, args.lookahead, routers, epochs=args.epochs, mlp_width=widths,
                            context=args.context, on_progress=on_progress)
    meta = {k: trace.meta[k] for k in ("model_type", "num_experts", "top_k", "hidden_size", "layers", "shape_id")}
    meta["lookahead"] = str(args.lookahead)
    save_heads(args.out, heads, meta | (reuse.meta() if reuse else {}), reuse.tensors() if reuse else None)
    print(json.dumps({"predictor_file": args.out, "heads": len(heads), "lookahead": args.lookahead,
                      "reuse_heads": len(reuse.heads) if reuse else 0}))
    return 0


def cmd_predict_eval(args) -> int:
    from pathlib import Path

    from activemoe import engine
    from activemoe.evaluation import cost_in_place, evaluate, heatmap
    from activemoe.hardware import machine_label
    from activemoe.learned import SIDECAR, LearnedPredictor, load_heads
    from activemoe.predictors import AdaptivePredictor, HistoryPredictor, NoPredictor, PregatePredictor
    from activemoe.trace import load_trace

    trace = load_trace(args.trace)
    # the in-place cost needs every expert resident; recall needs only the routers (and the heads): then the
    # experts stay in the checkpoint files (disk tier, the minimum of slots) and none is read
    config = (EngineConfig(device=args.device, cache=CacheConfig(slot_fraction=1.0)) if args.cost else
              EngineConfig(device=args.device, cache=CacheConfig(slot_fraction=0.0), store="disk"))
    with engine.load(args.model, config) as eng:
        trace.check_model(eng.shape_id)
        experts = offloaded_modules(eng.model)
        layers, budget = sorted(experts), args.budget or eng.top_k
        predictors = [PregatePredictor(router_parts(eng.model, experts), args.lookahead),
                      HistoryPredictor(layers, trace.num_experts, args.lookahead)]
        sidecar = Path(args.predictor_file) if args.predictor_file else Path(args.model) / SIDECAR
        if args.predictor_file or sidecar.is_file():
            predictors.append(LearnedPredictor(load_heads(sidecar, eng.shape_id), layers, args.lookahead, eng.device))
        predictors.append(AdaptivePredictor([PregatePredictor(router_parts(eng.model, experts), args.lookahead),
                                             HistoryPredictor(layers, trace.num_experts, args.lookahead),
                                             *predictors[2:]], eng.top_k))
        scores = [evaluate(trace, p, budget, args.max_tokens, eng.device) for p in predictors]
        cost = cost_in_place(eng, [NoPredictor(), *predictors]) if args.cost else {}
        shares = {name: share for name, (share, _) in cost.items()}
        steps = {name: step for name, (_, step) in cost.items()}
    ks = range(1, args.lookahead + 1)
    machine = machine_label(args.device)
    if not args.json:
        in_place = (f" and % of the decode step in place (all experts resident, 64 greedy tokens; step "
                    f"{steps['none']:.0f} us with no predictor)" if cost else " (in-place cost skipped: --no-cost)")
        print(f"predictor evaluation (teacher-forced on {args.trace}; budget {budget} experts per layer). Cost "
              f"measured, wall clock, on {machine}: us/token isolated (the predictor's calls alone, back to "
              f"back){in_place}")
        head = " ".join(f"{'R@' + str(k):>6}" for k in ks) + " " + " ".join(f"{'P@' + str(k):>6}" for k in ks)
        print(f"{'predictor':<10} {head} {'us/token':>9} {'% step':>7}")
        for s in scores:
            cells = " ".join(f"{s.recall(k):>6.3f}" for k in ks) + " " + " ".join(f"{s.precision(k):>6.3f}" for k in ks)
            share = f"{100 * shares[s.name]:>6.2f}%" if cost else f"{'-':>7}"
            print(f"{s.name:<10} {cells} {s.us_per_token:>9.1f} {share}")
    if args.plot:
        heatmap(scores, layers, args.lookahead, args.plot)
    print(json.dumps({"measured": "wall clock", "machine": machine, "budget": budget,
                      "decode_step_us": steps.get("none"), "predictors": {
        s.name: {"recall": {str(k): s.recall(k) for k in ks}, "precision": {str(k): s.precision(k) for k in ks},
                 "recall_by_layer": {str(k): {str(layer): s.recall(k, layer) for layer in layers
                                             if s.recall(k, layer) == s.recall(k, layer)} for k in ks},
                 "us_per_token_isolated": s.us_per_token, "step_share_in_place": shares.get(s.name),
                 "decode_step_us_in_place": steps.get(s.name)} for s in scores}}))
    return 0


def add_parsers(sub) -> None:
    _add_trace(sub)
    _add_predictor_commands(sub)
    _add_perplexity(sub)
    _add_profile(sub)
    _add_plan(sub)


COMMANDS = {"trace": cmd_trace, "train-predictor": cmd_train_predictor, "predict-eval": cmd_predict_eval,
            "perplexity": cmd_perplexity, "profile": cmd_profile, "plan": cmd_plan}
