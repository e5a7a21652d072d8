"""The `activemoe` command: parses flags into configs at the edge and prints results.

User errors print one line and exit with code 2 (`--debug` shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from activemoe.config import (DTYPES, EXPERTS_ON, ROUTING, CacheConfig, EngineConfig, LinkConfig, PrefetchConfig,
                              SamplingConfig, parse_size)
from activemoe.errors import UserError
from activemoe.policies import POLICIES
from activemoe.predictors import PREDICTORS
from activemoe.store import TIERS


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with routed experts offloaded",
                       description="Generate from a Hugging Face MoE checkpoint while only a fixed number of routed "
                                   "experts sit in device slots; the rest stay in host RAM. Exact: the tokens are "
                                   "those of plain transformers.")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3 (works without a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (default: the model's generation config)")
    p.add_argument("--temperature", type=float, help="sampling temperature (turns sampling on)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold (turns sampling on)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--device", default="cpu", help="compute device: cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (default float32)")
    slots = p.add_mutually_exclusive_group()
    slots.add_argument("--cache-experts", type=int, help="expert slots on the device (default: 25%% of all experts)")
    slots.add_argument("--expert-memory", help="memory for expert slots, e.g. 2GiB; sets the slot count")
    slots.add_argument("--gpu-memory", help="device budget, e.g. 12GiB: the planner reserves resident weights, the "
                                            "KV cache at --context, activations and workspace; slots get the rest")
    p.add_argument("--context", type=int, default=4096, help="context length the planner reserves KV cache for")
    p.add_argument("--policy", default="lru", choices=sorted(POLICIES),
                   help="eviction policy: lru, lfu, lfru (decayed frequency), slru (hot/cold segments), belady (future knowledge, with --predictor oracle only); default lru")
    p.add_argument("--predictor", default="none", choices=PREDICTORS,
                   help="expert predictor for prefetching: none (reactive), pregate (the next layers' routers on "
                        "this layer's hidden state), history (transition statistics learned online), learned (trained "
                        "lookahead heads), adaptive (combines them by measured recall, sizes each prefetch by "
                        "confidence), oracle "
                        "(replays a first identical run's routing: the upper bound); default none")
    p.add_argument("--lookahead", type=int, default=1, help="MoE layers ahead to prefetch (default 1)")
    p.add_argument("--predictor-file", help="learned heads for --predictor learned (default: the model "
                                            "directory's activemoe-predictor.safetensors)")
    p.add_argument("--link-gbps", type=float,
                   help="emulate a host-to-device link of this many GB/s (CPU copies are paced to it)")
    p.add_argument("--store", default="ram", choices=TIERS,
                   help="slow tier: ram (host copies of all experts) or disk (read on demand from the checkpoint "
                        "files, bypassing the page cache, for models larger than RAM); default ram")
    p.add_argument("--experts-on", default="device", choices=EXPERTS_ON,
                   help="where routed experts run: device (slots), host (host copies, llama.cpp --cpu-moe style), "
                        "auto (per miss, whichever a measured cost model says finishes sooner); default device")
    p.add_argument("--routing", default="exact", choices=ROUTING,
                   help="exact (default), or pregated: APPROXIMATE, opt-in — layer N+1 is routed by a decision "
                        "made at layer N, so no load is late; it changes the output (see `activemoe perplexity`)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def _add_perplexity(sub) -> None:
    p = sub.add_parser("perplexity", help="teacher-forced perplexity of a model over text (e.g. held-out)",
                       description="Perplexity through ActiveMoE, exact or with --routing pregated: the quality "
                                   "cost of the approximate mode, measured.")
    p.add_argument("--model", required=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="text file, one text per line")
    source.add_argument("--split", choices=("heldout", "train"), help="a bundled-style model's corpus split")
    p.add_argument("--routing", default="exact", choices=ROUTING)
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
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)


def cmd_plan(args) -> int:
    from dataclasses import asdict

    from activemoe.engine import memory_plan

    config = EngineConfig(device=args.device, dtype=args.dtype,
                          cache=CacheConfig(device_memory_bytes=parse_size(args.gpu_memory), context_tokens=args.context))
    result = memory_plan(args.model, config)
    print(f"memory plan for {args.model} ({args.dtype}, {args.device}):")
    for name, value in result.rows():
        print(f"  {name:<34} {value}")
    print(json.dumps(asdict(result)))
    return 0


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="measure this machine for a model: bandwidths and expert compute time",
                       description="Detect the device; measure host copy, pinned and pageable host-to-device "
                                   "bandwidth (CUDA), checkpoint read bandwidth with the page cache dropped, and "
                                   "one expert's compute time on host and device for the model's expert shape; "
                                   "recommend --experts-on; save it all as JSON.")
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--out", help="write the profile JSON here (atomically)")


def cmd_profile(args) -> int:
    from pathlib import Path

    from activemoe import engine, hardware

    if args.out and not Path(args.out).parent.is_dir():
        raise UserError(f"cannot write {args.out}: its directory does not exist")
    config = EngineConfig(device=args.device, dtype=args.dtype, store="disk",
                          cache=CacheConfig(slot_fraction=0.0))
    with engine.load(args.model, config) as eng:
        module = next(m for m in eng.model.modules() if hasattr(m, "_activemoe_layer"))
        result = hardware.profile(module, eng.runtime.store, eng.device)
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
            ("recommended --experts-on", f"{result.recommend_experts_on}: {result.reason}")]
    for name, value in rows:
        print(f"  {name:<42} {value}")
    from dataclasses import asdict

    print(json.dumps(asdict(result)))
    return 0


def cmd_perplexity(args) -> int:
    from pathlib import Path

    from activemoe import engine

    if args.max_tokens < 2 or args.seq_len < 2:
        raise UserError("--max-tokens and --seq-len must be at least 2")
    with engine.load(args.model, EngineConfig(cache=CacheConfig(slot_fraction=1.0), routing=args.routing)) as eng:
        ppl, tokens = eng.perplexity(_chunks(eng, _texts(args), args.seq_len, args.max_tokens))
    print(json.dumps({"model": args.model, "routing": args.routing, "perplexity": ppl, "tokens": tokens,
                      "approximate": args.routing != "exact"}))
    return 0


def _prompt_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def _progress():
    """A rich progress bar on stderr for the host-store preload; a no-op callback when not a terminal."""
    from rich.progress import Progress

    if not sys.stderr.isatty():
        return None, None
    bar = Progress(transient=True, console=__import__("rich.console").console.Console(stderr=True))
    task = bar.add_task("reading experts", total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


def cmd_generate(args) -> int:
    from activemoe import engine

    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    cache = CacheConfig(num_slots=args.cache_experts, policy=args.policy,
                        expert_memory_bytes=parse_size(args.expert_memory) if args.expert_memory else None,
                        device_memory_bytes=parse_size(args.gpu_memory) if args.gpu_memory else None,
                        context_tokens=args.context)
    if args.lookahead < 1:
        raise UserError("--lookahead must be at least 1")
    config = EngineConfig(device=args.device, dtype=args.dtype, cache=cache, store=args.store, routing=args.routing,
                          experts_on=args.experts_on, link=LinkConfig(link_gbps=args.link_gbps),
                          prefetch=PrefetchConfig(predictor=args.predictor, lookahead=args.lookahead,
                                                  predictor_file=args.predictor_file))
    do_sample = False if args.greedy else (True if args.temperature is not None or args.top_p is not None else None)
    sampling = SamplingConfig(do_sample=do_sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    bar, on_progress = _progress()
    if bar:
        with bar:
            eng = engine.load(args.model, config, on_progress)
    else:
        eng = engine.load(args.model, config, on_progress)
    ids = _prompt_ids(args.prompt_ids) if args.prompt_ids is not None else eng.encode(args.prompt)

    streamed: list[int] = []
    printed = [""]

    def on_token(token: int) -> None:  # print the new suffix of the decoded text so far
        streamed.append(token)
        text = eng.decode(streamed)
        if text is None:
            print(token, end=" ", flush=True)
            return
        if text.startswith(printed[0]) and not text.endswith("\ufffd"):
            print(text[len(printed[0]):], end="", flush=True)
            printed[0] = text

    out = eng.generate(ids, args.max_new_tokens, sampling, on_token=None if args.json else on_token)
    stats = {**{k: v for k, v in asdict(out.stats).items() if k != "per_token_s"}, "num_slots": eng.load_stats.num_slots, "total_experts": eng.load_stats.total_experts,
             "device": str(eng.device), "link_gbps": args.link_gbps, "measured": "wall clock",
             "routing": args.routing + (" (approximate)" if args.routing != "exact" else "")}
    eng.close()
    if args.json:
        print(json.dumps({"token_ids": out.token_ids, "text": eng.decode(out.token_ids), "stats": stats}))
    else:
        print()
        summary = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())
        print(f"[activemoe] {summary}", file=sys.stderr)
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


def _add_predictor_commands(sub) -> None:
    p = sub.add_parser("train-predictor", help="train learned lookahead heads from a trace",
                       description="Train one linear head per (MoE layer, lookahead k) on a trace recorded with "
                                   "--hidden; with --model, heads start from the pre-gate.")
    p.add_argument("--trace", required=True)
    p.add_argument("--out", required=True, help="predictor sidecar to write (safetensors)")
    p.add_argument("--model", help="the trace's model directory: start the heads from its routers (recommended)")
    p.add_argument("--lookahead", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
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

    if args.max_tokens < 1 or args.seq_len < 1:
        raise UserError("--max-tokens and --seq-len must be at least 1")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: directory {out.parent} does not exist")
    with engine.load(args.model, EngineConfig(cache=CacheConfig(slot_fraction=1.0))) as eng:
        trace = eng.record_trace(_chunks(eng, _texts(args), args.seq_len, args.max_tokens), keep_hidden=args.hidden)
    trace.save(out)
    print(json.dumps({"trace": str(out), "rows": int(trace.layer.numel()), "tokens": int(trace.token.max()) + 1,
                      "hidden": trace.hidden is not None, "shape_id": trace.meta["shape_id"]}))
    return 0


def cmd_train_predictor(args) -> int:
    from activemoe import engine
    from activemoe.families import router_parts
    from activemoe.learned import save_heads, train_heads
    from activemoe.trace import load_trace

    trace = load_trace(args.trace)
    routers = None
    if args.model:
        with engine.load(args.model, EngineConfig()) as eng:
            trace.check_model(eng.shape_id)
            routers = router_parts(eng.model, {m._activemoe_layer: m for m in _experts(eng)})
    heads = train_heads(trace, args.lookahead, routers, epochs=args.epochs)
    meta = {k: trace.meta[k] for k in ("model_type", "num_experts", "top_k", "hidden_size", "layers", "shape_id")}
    save_heads(args.out, heads, {**meta, "lookahead": str(args.lookahead)})
    print(json.dumps({"predictor_file": args.out, "heads": len(heads), "lookahead": args.lookahead}))
    return 0


def _experts(eng):
    return [m for m in eng.model.modules() if hasattr(m, "_activemoe_layer")]


def cmd_predict_eval(args) -> int:
    from pathlib import Path

    from activemoe import engine
    from activemoe.evaluation import evaluate, heatmap
    from activemoe.families import router_parts
    from activemoe.learned import SIDECAR, LearnedPredictor, load_heads
    from activemoe.predictors import AdaptivePredictor, HistoryPredictor, PregatePredictor
    from activemoe.trace import load_trace

    trace = load_trace(args.trace)
    with engine.load(args.model, EngineConfig(cache=CacheConfig(slot_fraction=1.0))) as eng:
        trace.check_model(eng.shape_id)
        experts = {m._activemoe_layer: m for m in _experts(eng)}
        layers, budget = sorted(experts), args.budget or eng.top_k
        predictors = [PregatePredictor(router_parts(eng.model, experts), args.lookahead),
                      HistoryPredictor(layers, trace.num_experts, args.lookahead)]
        sidecar = Path(args.predictor_file) if args.predictor_file else Path(args.model) / SIDECAR
        if args.predictor_file or sidecar.is_file():
            predictors.append(LearnedPredictor(load_heads(sidecar, eng.shape_id), layers, args.lookahead))
        predictors.append(AdaptivePredictor([PregatePredictor(router_parts(eng.model, experts), args.lookahead),
                                             HistoryPredictor(layers, trace.num_experts, args.lookahead),
                                             *predictors[2:]], eng.top_k))
        prompt = trace.experts.new_tensor(range(3, 35)).tolist()
        step = eng.generate(prompt, max_new_tokens=32, sampling=SamplingConfig(do_sample=False)).stats
        step_us = 1e6 / step.decode_tok_s if step.decode_tok_s else float("nan")
    scores = [evaluate(trace, p, budget, args.max_tokens) for p in predictors]
    ks = range(1, args.lookahead + 1)
    if not args.json:
        print(f"predictor evaluation (teacher-forced on {args.trace}; budget {budget} experts per layer; cost "
              f"measured, wall clock, this machine's CPU; decode step {step_us:.0f} us with all experts resident)")
        head = " ".join(f"{'R@' + str(k):>6}" for k in ks) + " " + " ".join(f"{'P@' + str(k):>6}" for k in ks)
        print(f"{'predictor':<10} {head} {'us/token':>9} {'% step':>7}")
        for s in scores:
            cells = " ".join(f"{s.recall(k):>6.3f}" for k in ks) + " " + " ".join(f"{s.precision(k):>6.3f}" for k in ks)
            print(f"{s.name:<10} {cells} {s.us_per_token:>9.1f} {100 * s.us_per_token / step_us:>6.2f}%")
    if args.plot:
        heatmap(scores, layers, args.lookahead, args.plot)
    print(json.dumps({"budget": budget, "decode_step_us": step_us, "predictors": {
        s.name: {"recall": {str(k): s.recall(k) for k in ks}, "precision": {str(k): s.precision(k) for k in ks},
                 "recall_by_layer": {str(k): {str(layer): s.recall(k, layer) for layer in layers
                                             if s.recall(k, layer) == s.recall(k, layer)} for k in ks},
                 "us_per_token": s.us_per_token} for s in scores}}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="activemoe", description="Run MoE language models with experts offloaded.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_trace(sub)
    _add_predictor_commands(sub)
    _add_perplexity(sub)
    _add_profile(sub)
    _add_plan(sub)
    return parser


COMMANDS = {"generate": cmd_generate, "trace": cmd_trace, "train-predictor": cmd_train_predictor,
            "predict-eval": cmd_predict_eval, "perplexity": cmd_perplexity,
            "profile": cmd_profile, "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        if args.debug:
            raise
        print(f"activemoe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("activemoe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
