"""bench/mxfp4_tier.py runs end to end at toy sizes: both precisions, the same tokens, MXFP4 bytes on the link."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "bench" / "mxfp4_tier.py"


def test_toy_run_compares_the_two_host_tiers(tmp_path):
    out = tmp_path / "r.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--layers", "2", "--experts", "8", "--top-k", "2",
                             "--hidden", "64", "--runs", "1", "--new-tokens", "4", "--prompt-tokens", "8",
                             "--links", "0.25", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r == json.loads(result.stdout.strip().splitlines()[-1])
    native, mxfp4 = r["rows"]
    assert (native["precision"], mxfp4["precision"]) == ("native", "mxfp4")
    assert mxfp4["expert_link_bytes"] < native["expert_link_bytes"] / 3
    assert mxfp4["host_store_bytes"] == mxfp4["expert_link_bytes"] * 2 * 8  # every expert, MXFP4 bytes
    assert mxfp4["same_tokens"] and native["same_tokens"] and native["speedup_vs_native"] == 1.0
    assert 0 < mxfp4["bytes_vs_native"] < 0.35 and mxfp4["decode_tok_s"] > 0
