"""bench/gpu_suite.py and bench/cuda_step_profile.py run end to end at toy sizes on CPU (the real runs need CUDA)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parent.parent / "bench"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _suite():
    return _script("gpu_suite")


def test_dry_run_covers_every_baseline_and_cache_then_the_predictor_cost(tmp_path, capsys):
    suite = _suite()
    assert suite.main(["--dry-run", "--shapes", "olmoe-1b-7b", "--out", str(tmp_path / "out"),
                       "--work", str(tmp_path)]) == 0
    results = {r["bench"]: r for line in capsys.readouterr().out.splitlines() if line.startswith("{")
               for r in [json.loads(line)]}
    result = results["gpu_suite"]
    assert result["shape"] == "olmoe-1b-7b" and "replayed" in result["routing"]
    cost = {r["predictor"]: r["step_share_in_place"] for r in results["predictor_cost"]["rows"]}
    assert 0 < cost["learned"] < 1  # then the predictors' cost, heads on the device
    assert set(result["rows"]) == {"25%", "50%"}
    # the whole-model baselines hold no slots: they run at the first cache size only
    assert [r["baseline"] for r in result["rows"]["25%"]] == list(suite.BASELINES)
    assert [r["baseline"] for r in result["rows"]["50%"]] == [b for b in suite.BASELINES
                                                              if b not in ("transformers", "accelerate")]
    for rows in result["rows"].values():
        assert all(r["same_tokens"] for r in rows)  # one forced routing: every baseline computes the same tokens
    assert not list((tmp_path / "out").iterdir())  # a dry run writes no result file


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(capsys):
    assert _suite().main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_a_subset_of_baselines_runs_alone_and_bad_names_are_refused(tmp_path, capsys):
    suite = _suite()
    assert suite.main(["--dry-run", "--shapes", "olmoe-1b-7b", "--baselines", "reactive,transformers",
                       "--no-predictor-cost", "--work", str(tmp_path), "--grouped-hits"]) == 0
    result = next(json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{"))
    assert result["baselines"] == ["transformers", "reactive"]  # in the suite's order: the first is the reference
    assert result["grouped_hits"] is True
    assert result["torch"] == torch.__version__ and result["transformers"] and "commit" in result
    assert all(r["same_tokens"] for rows in result["rows"].values() for r in rows)
    assert [r["baseline"] for r in result["rows"]["25%"]] == ["transformers", "reactive"]
    assert [r["baseline"] for r in result["rows"]["50%"]] == ["reactive"]
    with pytest.raises(SystemExit):
        suite.main(["--dry-run", "--baselines", "reactive,bogus"])
    assert "--baselines: choose from" in capsys.readouterr().err


def test_fast_init_draws_the_same_checkpoint_from_a_seed_with_norms_at_one(tmp_path):
    """The real-shape benches draw their weights in parallel (transformers' own initialisation took most of a
    16-layer build): still one checkpoint per seed (the dry run above loads one through every baseline)."""
    from safetensors.torch import load_file

    from activemoe.tiny import build_tiny_checkpoint

    shape = dict(hidden=32, expert_width=16, num_experts=8, top_k=2, num_layers=2)
    a, b, c = (load_file(build_tiny_checkpoint("olmoe", tmp_path / name, seed=seed, fast_init=True, **shape)
                         / "model.safetensors") for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].ndim > 1)
    norms = [k for k in a if a[k].ndim == 1]
    assert norms and all(torch.equal(a[k], torch.ones_like(a[k])) for k in norms)
    assert all(a[k].std() > 0 for k in a if a[k].ndim > 1)  # drawn, not left empty


def test_cuda_step_profile_compares_grouped_hits_on_a_dry_run(tmp_path, capsys):
    """Each configuration once with its READY experts one at a time and once grouped: rows say which."""
    profile = _script("cuda_step_profile")
    assert profile.main(["--dry-run", "--configs", "reactive", "--grouped-hits", "off,on", "--no-profile",
                         "--no-one-thread", "--new-tokens", "4", "--out", str(tmp_path)]) == 0
    result = next(json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{"))
    assert [(r["config"], r["grouped_hits"]) for r in result["rows"]] == [("reactive", False), ("reactive", True)]
    assert all(r[f"tok_s_threads_{torch.get_num_threads()}"] > 0 for r in result["rows"])
    with pytest.raises(SystemExit):
        profile.main(["--dry-run", "--grouped-hits", "maybe", "--out", str(tmp_path)])
