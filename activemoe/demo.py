"""`make demo`: generate on the bundled trained model with a quarter of the experts in device slots,
reactive (on-demand LRU) and predictive (learned lookahead + SLRU), over an emulated link; prints the
table and saves one plot (out/demo.png). The full grid is `activemoe compare`.

Before the bundled model exists, it builds a small random checkpoint instead and says so.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import activemoe
from activemoe.atomic import write_atomic
from activemoe.config import CacheConfig, EngineConfig, LinkConfig, PrefetchConfig, SamplingConfig
from activemoe.learned import SIDECAR

BUNDLED = Path(__file__).parent / "assets" / "tiny-moe"
PROMPT = "class Config:\n    def __init__(self, path):\n        for key, value in "
LINK_GBPS = 0.25  # emulated host-to-device link: one expert of the bundled model takes ~1.2 ms


def main() -> int:
    console = Console()
    torch.set_num_threads(1)  # one core computes, the other runs the copy thread
    with tempfile.TemporaryDirectory() as tmp:
        if (BUNDLED / "config.json").is_file():
            model_dir, label = BUNDLED, "bundled trained model (activemoe/assets/tiny-moe)"
        else:
            from activemoe.tiny import build_tiny_checkpoint

            model_dir = build_tiny_checkpoint("qwen3_moe", Path(tmp) / "random-qwen3-moe", num_layers=4, num_experts=16,
                                              top_k=2, hidden=64, expert_width=64, vocab=256)
            label = "RANDOM-WEIGHT qwen3_moe checkpoint (no bundled model yet): the output is noise"
        predictor = "learned" if (model_dir / SIDECAR).is_file() else "pregate"
        configs = {
            "reactive LRU": EngineConfig(cache=CacheConfig(slot_fraction=0.25),
                                                     link=LinkConfig(link_gbps=LINK_GBPS)),
            f"{predictor} + SLRU": EngineConfig(
                cache=CacheConfig(slot_fraction=0.25, policy="slru"), link=LinkConfig(link_gbps=LINK_GBPS),
                prefetch=PrefetchConfig(predictor=predictor, lookahead=3)),
        }
        console.print(f"[bold]model:[/] {label}")
        greedy = SamplingConfig(do_sample=False)
        table = Table(title=f"decode, measured wall clock (this CPU), emulated link {LINK_GBPS} GB/s")
        for column in ("configuration", "slots", "decode hit", "recall@1", "MB moved", "stall s", "tok/s"):
            table.add_column(column, justify="right")
        texts, speeds, hits = [], [], []
        for name, config in configs.items():
            with activemoe.load(model_dir, config) as engine:
                prompt = engine.encode(PROMPT) if engine.tokenizer is not None else [5, 6, 7, 8]
                engine.generate(prompt, max_new_tokens=8, sampling=greedy)  # warm-up
                engine.reset_cache()
                out = engine.generate(prompt, max_new_tokens=48, sampling=greedy)
                s, ls = out.stats, engine.load_stats
                texts.append(engine.decode(out.token_ids) if engine.tokenizer is not None else str(out.token_ids))
                recall = s.recall.get("1")
                speeds.append(s.decode_tok_s)
                hits.append(s.decode_hit_rate)
                table.add_row(name, f"{ls.num_slots}/{ls.total_experts}", f"{s.decode_hit_rate:.3f}",
                              "-" if recall is None else f"{recall:.3f}", f"{s.bytes_moved / 1e6:.1f}",
                              f"{s.stall_s:.3f}", f"{s.decode_tok_s:.1f}")
        console.print(f"[bold]prompt:[/] {PROMPT!r}")
        console.print("[bold]completion[/] (identical in both configurations: exact mode):")
        console.print(PROMPT + texts[0], markup=False, highlight=False)
        assert texts[0] == texts[1], "exact mode changed the output"
        console.print(table)
    plot = Path("out") / "demo.png"
    save_plot(list(configs), speeds, hits, plot, f"bundled model, 25% of experts in slots, emulated link {LINK_GBPS} GB/s")
    console.print(f"plot: {plot} (measured wall clock, this CPU)")
    return 0


def save_plot(names: list[str], speeds: list[float], hits: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(names, speeds, color=["tab:gray", "tab:blue"])
    left.set_ylabel("decode tokens/s (measured)")
    right.bar(names, hits, color=["tab:gray", "tab:blue"])
    right.set_ylabel("decode hit rate")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
