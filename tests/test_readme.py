"""The README's measured section is generated from bench/results: it cannot drift from them."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_results_are_generated_from_bench_results():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_results.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _script(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_suite_results_become_readme_tables(tmp_path, capsys, monkeypatch):
    """What bench/gpu_suite.py writes (here its dry run's JSON line) is rendered, one table per file, with its
    machine and conditions; a superseded run is left out."""
    import json

    suite = _script(ROOT / "bench" / "gpu_suite.py")
    assert suite.main(["--dry-run", "--shapes", "olmoe-1b-7b", "--baselines", "transformers,reactive",
                       "--no-predictor-cost", "--work", str(tmp_path)]) == 0
    result = next(json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{"))
    (tmp_path / "gpu_olmoe-1b-7b_dry-run-cpu.json").write_text(json.dumps(dict(result, partial=True)))
    (tmp_path / "gpu_olmoe-1b-7b_old.json").write_text(json.dumps(dict(result, superseded="a fault fixed since")))
    readme = _script(ROOT / "scripts" / "readme_results.py")
    monkeypatch.setattr(readme, "RESULTS", tmp_path)
    text = readme.gpu_suites()
    assert text.count("GPU suite, olmoe-1b-7b shape") == 1 and "gpu_olmoe-1b-7b_dry-run-cpu.json" in text
    assert "on one dry-run-cpu" in text and "**Partial**" in text and "2 of its 16 layers" in text
    table = [line for line in text.splitlines() if line.startswith("| 25% |") or line.startswith("| 50% |")]
    assert [line.split(" | ")[1] for line in table] == ["transformers", "reactive", "reactive"]
    assert all(line.endswith("| yes |") for line in table)
    reactive = next(line for line in table if line.startswith("| 25% | reactive"))
    assert reactive.split(" | ")[5] == "1.00×"
