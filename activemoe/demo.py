"""`make demo`: generate on the bundled trained model with a quarter of the experts in device slots.

Before the bundled model exists, it builds a small random checkpoint instead and says so.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

import activemoe
from activemoe.config import CacheConfig, EngineConfig, SamplingConfig

BUNDLED = Path(__file__).parent / "assets" / "tiny-moe"
PROMPT = "def read_config(path):\n"


def main() -> int:
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        if (BUNDLED / "config.json").is_file():
            model_dir, label = BUNDLED, "bundled trained model (activemoe/assets/tiny-moe)"
        else:
            from activemoe.tiny import build_tiny_checkpoint

            model_dir = build_tiny_checkpoint("qwen3_moe", Path(tmp) / "random-qwen3-moe", num_layers=4, num_experts=16,
                                              top_k=2, hidden=64, expert_width=64, vocab=256)
            label = "RANDOM-WEIGHT qwen3_moe checkpoint (no bundled model yet): the output is noise"
        engine = activemoe.load(model_dir, EngineConfig(cache=CacheConfig(slot_fraction=0.25)))
        console.print(f"[bold]model:[/] {label}")
        ls = engine.load_stats
        console.print(f"[bold]slots:[/] {ls.num_slots} of {ls.total_experts} experts on the device "
                      f"({ls.slab_bytes / 2**20:.2f} MiB slab, {ls.host_store_bytes / 2**20:.2f} MiB in host RAM)")
        greedy = SamplingConfig(do_sample=False)
        if engine.tokenizer is not None:
            console.print(f"[bold]prompt:[/] {PROMPT!r}")
            out = engine.generate(engine.encode(PROMPT), max_new_tokens=48, sampling=greedy)
            console.print("[bold]completion:[/]")
            console.print(PROMPT + engine.decode(out.token_ids), markup=False, highlight=False)
        else:
            out = engine.generate([5, 6, 7, 8], max_new_tokens=48, sampling=greedy)
            console.print(f"[bold]generated ids:[/] {out.token_ids}")
        table = Table(title="generation statistics (measured, wall clock, this machine's CPU)")
        for column in ("hit rate", "loads", "evictions", "bytes moved", "stall s", "TTFT s", "decode tok/s"):
            table.add_column(column, justify="right")
        s = out.stats
        table.add_row(f"{s.hit_rate:.3f}", str(s.loads), str(s.evictions), f"{s.bytes_moved:,}", f"{s.stall_s:.4f}",
                      f"{s.ttft_s:.3f}", f"{s.decode_tok_s:.1f}")
        console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
