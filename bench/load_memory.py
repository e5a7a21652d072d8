"""Peak host RSS while loading: plain transformers vs ActiveMoE (measured, wall clock, this machine).

Builds a random qwen3_moe checkpoint whose routed experts dominate its size, then loads it in fresh
processes: (1) imports only, (2) plain `from_pretrained`, (3) ActiveMoE, reporting the peak RSS once
transformers has loaded the non-expert weights (experts never materialised), and after the host store
and slots are filled. Prints one table and one JSON line.

    .venv/bin/python bench/load_memory.py [--layers 8 --experts 64 --hidden 256 --expert-width 512]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile

from activemoe.atomic import emit_json
from activemoe.hardware import machine_label

PROBE = r"""
import json, re, sys, torch
def status(field): return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
def rss(): return status("VmHWM")  # not getrusage: ru_maxrss survives exec, inheriting the parent's peak
def current(): return status("VmRSS")
import transformers, activemoe
from activemoe.config import CacheConfig, EngineConfig
mode, path, slots = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = {"imports": rss()}
if mode == "plain":
    transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out["loaded"], out["current"] = rss(), current()
elif mode == "activemoe":
    eng = activemoe.load(path, EngineConfig(cache=CacheConfig(num_slots=slots)))
    out.update(model=eng.load_stats.model_rss_bytes, loaded=rss(), current=current(), slab=eng.load_stats.slab_bytes,
               host_store=eng.load_stats.host_store_bytes)
print(json.dumps(out))
"""


def probe(mode: str, path: str, slots: int) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, mode, path, str(slots)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"probe {mode} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--expert-width", type=int, default=512)
    parser.add_argument("--slot-fraction", type=float, default=0.25)
    parser.add_argument("--out", help="also write the JSON result here (atomically)")
    args = parser.parse_args()

    from safetensors import safe_open

    from activemoe.tiny import build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_checkpoint("qwen3_moe", tmp, num_layers=args.layers, num_experts=args.experts, top_k=4,
                                     hidden=args.hidden, expert_width=args.expert_width, vocab=4096)
        expert_bytes = other_bytes = 0
        with safe_open(f"{tmp}/model.safetensors", "pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                n = 4 * math.prod(t.get_shape())
                if ".experts." in key:
                    expert_bytes += n
                else:
                    other_bytes += n
        slots = max(4, int(args.slot_fraction * args.layers * args.experts))
        base = probe("imports", path, slots)["imports"]
        plain = probe("plain", path, slots)
        ours = probe("activemoe", path, slots)

    mib = 2**20
    rows = [
        ("checkpoint: non-expert weights", other_bytes, None),
        ("checkpoint: routed experts", expert_bytes, None),
        ("plain transformers: peak RSS - imports", plain["loaded"] - base, None),
        ("ActiveMoE after transformers load: peak RSS - imports", ours["model"] - base,
         "non-expert weights only; experts never materialised"),
        ("ActiveMoE slot slab", ours["slab"], f"{slots} slots"),
        ("ActiveMoE host store (all experts, RAM tier)", ours["host_store"], None),
        ("ActiveMoE fully loaded: peak RSS - imports", ours["loaded"] - base, "non-expert + host store + slots"),
        ("ActiveMoE fully loaded: current RSS - imports", ours["current"] - base, None),
        ("plain transformers loaded: current RSS - imports", plain["current"] - base, None),
    ]
    print(f"load memory, measured (peak RSS = VmHWM) on {machine_label()}, fp32, {args.layers} layers x "
          f"{args.experts} experts, hidden {args.hidden}, expert width {args.expert_width}")
    for name, value, note in rows:
        print(f"{name:<56} {value / mib:9.1f} MiB  {note or ''}")
    emit_json({"bench": "load_memory", "measured": "peak RSS (VmHWM)", "machine": machine_label(),
               "expert_bytes": expert_bytes, "layers": args.layers, "experts": args.experts, "hidden": args.hidden,
               "expert_width": args.expert_width, "slots": slots, "non_expert_bytes": other_bytes,
               "plain_load_rss": plain["loaded"] - base, "activemoe_model_load_rss": ours["model"] - base,
               "slab_bytes": ours["slab"], "host_store_bytes": ours["host_store"],
               "activemoe_total_rss": ours["loaded"] - base, "activemoe_current_rss": ours["current"] - base,
               "plain_current_rss": plain["current"] - base}, args.out)


if __name__ == "__main__":
    main()
