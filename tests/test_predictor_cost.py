"""bench/predictor_cost.py runs end to end at toy sizes (the real run builds a 3 GB checkpoint)."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "bench" / "predictor_cost.py"


def test_dry_run_measures_every_predictor_in_place(capsys):
    spec = importlib.util.spec_from_file_location("predictor_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--dry-run", "--runs", "1", "--new-tokens", "4", "--trace-tokens", "256"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["dry_run"] and result["layers"] == 2
    rows = {r["predictor"]: r for r in result["rows"]}
    assert list(rows) == ["none", "pregate", "learned"]
    assert all(r["decode_step_us_in_place"] > 0 for r in rows.values())
    assert 0 < rows["learned"]["step_share_in_place"] < 1  # the heads ran on the decode path
