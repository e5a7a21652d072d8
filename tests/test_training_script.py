"""The bundled model's training script refuses bad input with one clear line and exit code 2."""
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "scripts" / "train_tiny_moe.py"


@pytest.mark.parametrize("argv,needle", [
    (["--corpus", "/nonexistent/corpus"], "corpus path does not exist"),
    (["--corpus", "EMPTY"], "corpus is empty"),
    (["--num-experts", "4", "--top-k", "8"], "must not exceed --num-experts"),
    (["--num-experts", "1"], "--num-experts must be >= 2"),
])
def test_bad_input(tmp_path, argv, needle):
    argv = [str(tmp_path) if a == "EMPTY" else a for a in argv]
    out = tmp_path / "model"
    result = subprocess.run([sys.executable, str(SCRIPT), *argv, "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
