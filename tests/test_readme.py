"""The README's measured section is generated from bench/results: it cannot drift from them."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_results_are_generated_from_bench_results():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_results.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
