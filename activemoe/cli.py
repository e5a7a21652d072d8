"""The `activemoe` command: the parser, `generate`, and error handling; the other subcommands live in
cli_tools.py. Flags become configs at the edge; results are printed here, never in the library.

User errors print one line and exit with code 2 (`--debug` shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from activemoe.config import (EXPERTS_ON, ROUTING, CacheConfig, EngineConfig, LinkConfig, PrefetchConfig,
                              SamplingConfig)
from activemoe import cli_bench, cli_simulate, cli_tools
from activemoe.errors import UserError
from activemoe.policies import POLICIES
from activemoe.predictors import PREDICTORS


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
    p.add_argument("--temperature", type=float, help="sampling temperature (turns sampling on); 0 means greedy")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold (turns sampling on)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    cli_tools.add_dtype_flag(p)
    cli_tools.add_memory_flags(p, "25%% of all experts")
    p.add_argument("--policy", default="lru", choices=sorted(POLICIES),
                   help="eviction policy: lru, lfu, lfru (decayed use count, kept across evictions), slru (hot/cold segments), belady (future knowledge, with --predictor oracle only); default lru")
    p.add_argument("--predictor", default="none", choices=PREDICTORS,
                   help="expert predictor for prefetching: none (reactive), pregate (the next layers' routers on "
                        "this layer's hidden state), history (transition statistics learned online), learned (trained "
                        "lookahead heads), adaptive (combines them by measured recall, sizes each prefetch by "
                        "confidence), oracle "
                        "(replays a first identical run's routing: the upper bound); default none")
    p.add_argument("--lookahead", type=int, default=1, help="MoE layers ahead to prefetch (default 1)")
    p.add_argument("--no-first-layer-reserve", action="store_true",
                   help="with a predictor other than oracle: do not keep slots for the first MoE layer's experts "
                        "(no prediction reaches a token's first layer, so by default speculative and other loads "
                        "leave up to min(slots - (lookahead + 1) x budget, slots / MoE layers) of its recently "
                        "used experts alone)")
    p.add_argument("--predictor-file", help="learned heads for --predictor learned (default: the model "
                                            "directory's activemoe-predictor.safetensors)")
    p.add_argument("--link-gbps", type=float,
                   help="emulate a host-to-device link of this many GB/s (CPU copies are paced to it)")
    p.add_argument("--experts-on", default="device", choices=EXPERTS_ON,
                   help="where routed experts run: device (slots), host (host copies, llama.cpp --cpu-moe style), "
                        "auto (per miss, whichever a measured cost model says finishes sooner); default device")
    p.add_argument("--routing", default="exact", choices=ROUTING,
                   help="exact (default), or pregated: APPROXIMATE, opt-in — layer N+1 is routed by a decision "
                        "made at layer N, so no load is late; it changes the output (see `activemoe perplexity`)")
    p.add_argument("--replay-routing", metavar="TRACE",
                   help="APPROXIMATE, for benchmarks: force the routing recorded in TRACE (`activemoe trace record`), "
                        "mapped onto this model's shape; the output is not the model's")
    cli_tools.add_precision_flags(p)
    p.add_argument("--late-miss", default="none", metavar="{none,int4}",
                   help="none (default), or int4: APPROXIMATE, opt-in — a miss whose full copy would arrive later "
                        "than its int4 copy is computed from the int4 copy (counted as late_miss_int4)")
    cli_tools.add_issue_window_flag(p)
    cli_tools.add_grouped_hits_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def _prompt_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def cmd_generate(args) -> int:
    from activemoe import engine

    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    cache = cli_tools.memory_cache(args, CacheConfig.slot_fraction, policy=args.policy,
                                   first_layer_reserve=not args.no_first_layer_reserve)
    cli_tools.check_prefetch_flags([args.lookahead], args.issue_window)
    config = EngineConfig(device=args.device, dtype=args.dtype, cache=cache, store=args.store, routing=args.routing,
                          experts_on=args.experts_on, link=LinkConfig(link_gbps=args.link_gbps),
                          replay_routing=args.replay_routing, precision=args.precision, late_miss=args.late_miss,
                          quant_cache_dir=args.quant_cache, grouped_hits=args.grouped_hits,
                          prefetch=PrefetchConfig(predictor=args.predictor, lookahead=args.lookahead,
                                                  issue_window=args.issue_window, predictor_file=args.predictor_file))
    greedy = args.greedy or args.temperature == 0  # as in llama.cpp and the OpenAI API
    temperature = None if args.temperature == 0 else args.temperature
    do_sample = False if greedy else (True if temperature is not None or args.top_p is not None else None)
    sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_p=args.top_p, seed=args.seed)
    with cli_tools.progress_bar("reading experts") as on_progress:
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
    from activemoe.quant import approximate
    stats = {**{k: v for k, v in asdict(out.stats).items() if k != "per_token_s"}, "num_slots": eng.load_stats.num_slots, "total_experts": eng.load_stats.total_experts,
             "device": str(eng.device), "link_gbps": args.link_gbps, "measured": "wall clock",
             "routing": ("replayed from " + args.replay_routing if args.replay_routing else args.routing)
             + (" (approximate)" if args.routing != "exact" or args.replay_routing else ""),
             "precision": args.precision + (" (approximate)" if approximate(args.precision) else ""),
             "late_miss": args.late_miss + (" (approximate)" if args.late_miss != "none" else "")}
    eng.close()
    if args.json:
        print(json.dumps({"token_ids": out.token_ids, "text": eng.decode(out.token_ids), "stats": stats}))
    else:
        print()
        summary = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())
        print(f"[activemoe] {summary}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="activemoe", description="Run MoE language models with experts offloaded.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    cli_tools.add_parsers(sub)
    cli_bench.add_parsers(sub)
    cli_simulate.add_parser(sub)
    return parser


COMMANDS = {"generate": cmd_generate, **cli_tools.COMMANDS, **cli_bench.COMMANDS, "simulate": cli_simulate.cmd_simulate}


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
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as the Python docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
