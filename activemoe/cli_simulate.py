"""The `activemoe simulate` subcommand: flags become a workload, a cost model and simulator configs
here; it prints one aligned table (every figure simulated, the cost model's parameters above it) and
one JSON line, and optionally plots tokens/s and hit rate against cache size per strategy.
"""
from __future__ import annotations

import itertools
import json
import sys
from dataclasses import asdict, replace

from activemoe.config import CacheConfig, PrefetchConfig
from activemoe.errors import UserError
from activemoe.policies import LEARNED_POLICIES, POLICIES

SWEEP_DEFAULTS = {"cache": "5%,10%,25%,50%", "policy": ",".join(p for p in POLICIES if p not in LEARNED_POLICIES),
                  "predictor": "none,oracle",
                  "lookahead": "1,2,3"}


def add_parser(sub) -> None:
    p = sub.add_parser("simulate", help="simulate offloaded decode of a routing trace on a virtual clock",
                       description="Trace-driven simulation (SIMULATED figures, virtual clock of a named cost model) "
                                   "of decode with the engine's own cache, policies, scheduler and predictors. "
                                   "Lists (a,b,c) of --cache/--policy/--predictor/--lookahead are crossed; --sweep "
                                   "fills the named ones with default ranges.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", help="a trace recorded by `activemoe trace record`")
    source.add_argument("--synthetic", help="a synthetic trace (labelled synthetic): tokens=N,skew=S,reuse=R,"
                                            "corr=C,seed=N (Zipf popularity skew, temporal reuse, cross-layer "
                                            "correlation); needs --shape")
    p.add_argument("--shape", help="model-shape preset (checked against a --trace)")
    cost = p.add_mutually_exclusive_group()
    cost.add_argument("--hardware", help="hardware preset (needs --shape)")
    cost.add_argument("--profile", help="a profile JSON of this machine from `activemoe profile --out`")
    p.add_argument("--dtype", default="bfloat16", help="expert dtype for presets (default bfloat16)")
    p.add_argument("--link-gbps", type=float, help="override the cost model's link (e.g. an emulated link)")
    p.add_argument("--cache", help="slots: a share of all experts (25%%) or a count; a list sweeps (default 25%%)")
    p.add_argument("--policy", help="eviction policies, e.g. lru,belady (default lru)")
    p.add_argument("--predictor", help="none, oracle, history, learned (its heads on the trace's hidden states: a "
                                       "trace recorded with --hidden, and --predictor-file), or oracle@RECALL (an "
                                       "oracle degraded to that recall); a list sweeps (default none)")
    p.add_argument("--predictor-file", help="the learned heads (`activemoe train-predictor`, or a model "
                                            "directory's activemoe-predictor.safetensors) for --predictor learned "
                                            "and --policy reuse")
    p.add_argument("--predict-us", type=float, default=0.0,
                   help="virtual microseconds charged per predictor call, e.g. its measured cost on the machine "
                        "the profile describes (default 0: the cost model has no predictor)")
    p.add_argument("--lookahead", help="MoE layers ahead to prefetch; a list sweeps (default 1)")
    p.add_argument("--no-first-layer-reserve", action="store_true",
                   help="as generate's: keep no slots for the first MoE layer's experts")
    p.add_argument("--sweep", help="dimensions to sweep over default ranges: cache,policy,predictor,lookahead")
    from activemoe.cli_tools import add_issue_window_flag  # cli_tools imports this module

    add_issue_window_flag(p)
    p.add_argument("--prefill", type=int, default=0, help="leading trace tokens run as one prefill forward")
    p.add_argument("--tokens", type=int, help="simulate at most this many tokens of the trace")
    p.add_argument("--plot", help="write tokens/s and hit rate against cache size per strategy (PNG)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")


def _workload(args, shape):
    from activemoe.workload import SyntheticSpec, from_trace, synthetic

    if args.synthetic is not None:
        if shape is None:
            raise UserError("--synthetic needs --shape (the model shape to generate routing for)")
        spec = SyntheticSpec.parse(args.synthetic)
        if args.tokens:
            spec = SyntheticSpec(**{**asdict(spec), "tokens": min(spec.tokens, args.tokens)})
        return synthetic(spec, shape.moe_layers, shape.num_experts, shape.top_k)
    from activemoe.trace import load_trace

    workload = from_trace(load_trace(args.trace), f"recorded: {args.trace}")
    if shape is not None:
        workload.check_shape(shape.moe_layers, shape.num_experts, shape.top_k, shape.name)
    if args.tokens:
        workload = workload.head(args.tokens)
    return workload


def _cost(args, shape):
    from activemoe.costmodel import CostModel, from_preset, from_profile
    from activemoe.presets import hardware_preset

    if args.link_gbps is not None and args.link_gbps <= 0:
        raise UserError("--link-gbps must be positive")
    if args.profile:
        return from_profile(args.profile, args.link_gbps)
    if not args.hardware:
        raise UserError("give the cost model: --hardware NAME (with --shape) or --profile FILE")
    hw = hardware_preset(args.hardware)
    if shape is None:
        raise UserError("--hardware needs --shape: the expert size and compute come from the model shape")
    cost = from_preset(hw, shape, args.dtype)
    if args.link_gbps is not None:
        cost = CostModel(**{**asdict(cost), "link_gbps": args.link_gbps, "name": cost.name + f"@{args.link_gbps:g}GB/s"})
    return cost


def _values(args, name: str, default: str) -> list[str]:
    sweep = {s.strip() for s in (args.sweep or "").split(",") if s.strip()}
    unknown = sweep - set(SWEEP_DEFAULTS)
    if unknown:
        raise UserError(f"unknown --sweep dimension {sorted(unknown)[0]!r}; known: {', '.join(SWEEP_DEFAULTS)}")
    given = getattr(args, name)
    text = given if given is not None else (SWEEP_DEFAULTS[name] if name in sweep else default)
    return [v.strip() for v in text.split(",") if v.strip()]


def _configs(args, workload) -> list:
    from activemoe.simulate import SIM_PREDICTORS, SimConfig, num_slots

    total = len(workload.layers) * workload.num_experts
    caches = [num_slots(c, total, workload.top_k) for c in _values(args, "cache", "25%")]
    policies = _values(args, "policy", "lru")
    for policy in policies:
        if policy not in POLICIES:
            raise UserError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    predictors = []
    for text in _values(args, "predictor", "none"):
        name, _, recall = text.partition("@")
        if name not in SIM_PREDICTORS:
            raise UserError(f"the simulator runs predictors {', '.join(SIM_PREDICTORS)} and oracle@RECALL; "
                            f"{name!r} needs hidden states and router weights")
        try:
            predictors.append((name, float(recall) if recall else None))
        except ValueError:
            raise UserError(f"bad --predictor {text!r}: use oracle@0.8") from None
    try:
        lookaheads = [int(v) for v in _values(args, "lookahead", "1")]
    except ValueError:
        raise UserError("--lookahead takes integers") from None
    from activemoe.cli_tools import check_prefetch_flags  # cli_tools imports this module

    check_prefetch_flags(lookaheads, args.issue_window)
    if args.predict_us < 0:
        raise UserError("--predict-us must not be negative")
    if not 0 <= args.prefill < workload.num_tokens:
        raise UserError(f"--prefill must lie in 0..{workload.num_tokens - 1} (the trace has {workload.num_tokens} tokens)")
    out, reserve = [], not args.no_first_layer_reserve
    for slots, policy, (pred, recall), lookahead in itertools.product(caches, policies, predictors, lookaheads):
        if pred == "none" and len(lookaheads) > 1 and lookahead != lookaheads[0]:
            continue  # lookahead does not matter without a predictor
        out.append(SimConfig(CacheConfig(num_slots=slots, policy=policy, first_layer_reserve=reserve),
                             PrefetchConfig(predictor=pred, lookahead=lookahead, issue_window=args.issue_window),
                             prefill_tokens=args.prefill, oracle_recall=recall, predict_s=args.predict_us * 1e-6))
    return out


def _learned(args, configs, workload) -> dict[int, object]:
    """lookahead -> the LearnedPredictor of --predictor-file, for the configs that name it."""
    lookaheads = sorted({c.prefetch.lookahead for c in configs if c.prefetch.predictor == "learned"})
    if not lookaheads:
        return {}
    path = _heads_file(args, workload, "--predictor learned", "the heads")
    from activemoe.learned import LearnedPredictor, load_heads

    heads = load_heads(path, workload.shape_id or "")
    return {k: LearnedPredictor(heads, list(workload.layers), k) for k in lookaheads}


def _reuse(args, configs, workload):
    """The reuse heads of --predictor-file, when a config's policy is reuse (else None)."""
    if not any(c.cache.policy in LEARNED_POLICIES for c in configs):
        return None
    path = _heads_file(args, workload, "--policy reuse", "a predictor file with reuse heads")
    from activemoe.reuse import load_reuse_heads

    return load_reuse_heads(path, workload.shape_id or "")


def _heads_file(args, workload, flag: str, what: str) -> str:
    """--predictor-file, for `flag`, which runs heads on the trace's hidden states."""
    if workload.hidden is None:
        raise UserError(f"{flag} reads hidden states: give a --trace recorded with --hidden")
    if not args.predictor_file:
        raise UserError(f"{flag} needs --predictor-file ({what}, e.g. a model directory's "
                        "activemoe-predictor.safetensors)")
    return args.predictor_file


def cmd_simulate(args) -> int:
    from activemoe.presets import shape_preset
    from activemoe.simulate import simulate

    shape = shape_preset(args.shape) if args.shape else None
    workload = _workload(args, shape)
    cost = _cost(args, shape)
    configs = _configs(args, workload)
    learned, reuse = _learned(args, configs, workload), _reuse(args, configs, workload)
    results = [simulate(workload, c, cost, learned=learned.get(c.prefetch.lookahead), reuse=reuse) for c in configs]
    if not args.json:
        total = len(workload.layers) * workload.num_experts
        print(f"SIMULATED (virtual clock) decode of {workload.num_tokens - args.prefill} tokens, {workload.label}; "
              f"{len(workload.layers)} MoE layers x {workload.num_experts} experts, top-{workload.top_k} "
              f"({total} experts)")
        print(cost.describe() + (f"; predictor {args.predict_us:g} us per call" if args.predict_us else
                                 "; predictor calls cost nothing (--predict-us)"))
        head = (f"{'configuration':<34} {'tok/s':>9} {'hit':>6} {'MB/tok':>6} {'loads':>7} {'evict':>7} "
                f"{'stall s':>8} {'bound tok/s':>11} {'eff':>5} {'R@1':>5}")
        print(head)
        for r in results:
            recall = r.recall.get("1")
            mb_per_token = r.decode_bytes / max(r.tokens, 1) / 1e6
            print(f"{r.config:<34} {r.tok_s:>9.2f} {r.decode_hit_rate:>6.3f} {mb_per_token:>6.2f} {r.loads:>7} "
                  f"{r.evictions:>7} {r.stall_s:>8.3f} {r.oracle_bound_tok_s:>11.2f} {r.efficiency:>5.2f} "
                  f"{'-' if recall is None else f'{recall:.2f}':>5}")
        print("hit = decode hit rate; MB/tok = bytes moved per decode token; "
              "bound = max(compute floor, Belady link floor) per token: perfect prediction, Belady eviction, "
              "perfect overlap; eff = tok/s / bound")
    if args.plot:
        plot(results, configs, cost, workload.label, args.plot)
    print(json.dumps({"simulated": True, "workload": workload.label, "cost_model": cost.to_json(),
                      "rows": [asdict(r) for r in results]}))
    sys.stdout.flush()
    return 0


def plot(results, configs, cost, label: str, path: str) -> None:
    """Tokens/s and hit rate against cache size (slots), one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list] = {}
    for r, c in zip(results, configs):
        strategy = c.label().split(" ", 2)[2]  # policy predictor lookahead
        lines.setdefault(strategy, []).append((c.cache.num_slots, r.tok_s, r.hit_rate, r.oracle_bound_tok_s))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    policies = list(dict.fromkeys(s.split(" ")[0] for s in lines))  # colour: policy; line style: predictor
    predictors = list(dict.fromkeys(s.split(" ", 1)[1] for s in lines))
    styles = ["-", "--", ":", "-."]
    for strategy, points in lines.items():
        points.sort()
        policy, predictor = strategy.split(" ", 1)
        style = dict(marker="o", label=strategy, color=plt.get_cmap("tab10")(policies.index(policy) % 10),
                     linestyle=styles[predictors.index(predictor) % len(styles)])
        ax1.plot([p[0] for p in points], [p[1] for p in points], **style)
        ax2.plot([p[0] for p in points], [p[2] for p in points], **style)
    bound = sorted({(p[0], p[3]) for points in lines.values() for p in points})
    ax1.plot([b[0] for b in bound], [b[1] for b in bound], color="k", linewidth=2.5, alpha=0.4, label="oracle bound")
    ax1.set(xlabel="cache size (slots)", ylabel="decode tokens/s (simulated)")
    ax2.set(xlabel="cache size (slots)", ylabel="hit rate (simulated)")
    ax1.legend(fontsize=7)
    fig.suptitle(f"SIMULATED, cost model {cost.name}; {label}", fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e}") from None
    finally:
        plt.close(fig)


# -- `activemoe plan --hardware NAME | --profile FILE`: the tokens/s the planned slots should give ------
def add_estimate_flags(p) -> None:
    p.add_argument("--hardware", help="also simulate decode tokens/s for the plan on this hardware preset")
    p.add_argument("--profile", help="... or with a profile of this machine (`activemoe profile --out`)")
    p.add_argument("--synthetic", default="tokens=200",
                   help="the synthetic trace (labelled synthetic) the estimate replays (default tokens=200)")


def plan_estimate(args, shape, num_slots: int) -> dict | None:
    """SIMULATED decode tokens/s of a plan (ModelShape, slots): reactive LRU and the oracle bound, on a
    synthetic trace at the model's shape; None when neither --hardware nor --profile is given."""
    from activemoe.costmodel import from_profile, roofline
    from activemoe.presets import hardware_preset
    from activemoe.simulate import SimConfig, simulate
    from activemoe.workload import SyntheticSpec, synthetic

    if not (args.hardware or args.profile):
        return None
    if args.hardware:
        per_layer = shape.resident_bytes / shape.moe_layers
        cost = roofline(hardware_preset(args.hardware), f"{args.hardware}/{args.model}/{args.dtype}",
                        shape.expert_bytes, shape.expert_bytes / shape.dtype_bytes, per_layer,
                        per_layer / shape.dtype_bytes, f"shape of {args.model}")
        cost = replace(cost, expert_bytes=shape.link_bytes)  # what the link carries (MXFP4 checkpoints: MXFP4)
    else:
        cost = from_profile(args.profile)
    workload = synthetic(SyntheticSpec.parse(args.synthetic), shape.moe_layers,
                         shape.total_experts // shape.moe_layers, shape.top_k)
    r = simulate(workload, SimConfig(CacheConfig(num_slots=num_slots, policy="lru")), cost)
    return {"simulated": True, "reactive_lru_tok_s": r.tok_s, "hit_rate": r.hit_rate,
            "oracle_bound_tok_s": r.oracle_bound_tok_s, "workload": workload.label, "cost_model": cost.to_json(),
            "line": f"expected decode (SIMULATED, {workload.label}): {r.tok_s:.1f} tokens/s reactive LRU "
                    f"(hit rate {r.hit_rate:.2f}), oracle bound {r.oracle_bound_tok_s:.1f} tokens/s; {cost.describe()}"}
