"""`activemoe bench` / `compare`: every baseline runs through its real path and agrees token for token;
batches share loads; results are written whole or not at all; bad input is one clear line."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from activemoe.atomic import write_atomic
from activemoe.baselines import AccelerateRunner, engine_config
from activemoe.bench import BenchConfig, cache_config, compare_grid, link_share, run_bench
from activemoe.config import CacheConfig, EngineConfig, LinkConfig
from activemoe.errors import UserError
from activemoe.hardware import machine_label
from tests.test_cli import assert_user_error, run


def test_engine_config_of_spec_names():
    base = EngineConfig(cache=CacheConfig(slot_fraction=0.25))
    c = engine_config("learned+slru@3", base)
    assert (c.prefetch.predictor, c.cache.policy, c.prefetch.lookahead) == ("learned", "slru", 3)
    assert engine_config("pregate", base).cache.policy == "lru"
    assert engine_config("host", base).experts_on == "host"
    assert engine_config("reactive", base).prefetch.predictor == "none"
    with pytest.raises(UserError, match="unknown baseline 'magic'.*transformers, accelerate"):
        engine_config("magic", base)
    with pytest.raises(UserError, match="unknown baseline"):
        engine_config("learned+fifo", base)


def test_link_share_is_bytes_per_second_over_the_link():
    assert link_share(100.0, 1.5e6, 0.25) == pytest.approx(0.6)  # 150 MB/s of a 250 MB/s link
    assert link_share(100.0, None, 0.25) is None  # no expert bytes (transformers, accelerate)
    assert link_share(100.0, 1.5e6, None) is None  # a real link of unknown speed


def test_cache_sizes():
    assert cache_config("25%", CacheConfig()).slot_fraction == 0.25
    assert cache_config("12", CacheConfig()).num_slots == 12
    for bad in ("0%", "abc", "150%"):
        with pytest.raises(UserError, match="cannot parse cache size"):
            cache_config(bad, CacheConfig())


def test_every_baseline_agrees_and_batches_share_loads(checkpoint):
    model = checkpoint("qwen3_moe", num_experts=8, top_k=2)
    config = replace(BenchConfig.tiny(model, ("transformers", "accelerate", "reactive", "host", "pregate+slru@2")),
                     batch_sizes=(1, 3), prompt_lengths=(6,), new_tokens=5,
                     engine=EngineConfig(cache=CacheConfig(num_slots=4), link=LinkConfig(link_gbps=2.0)))
    seen = []
    rows = run_bench(config, seen.append)
    assert [(r.baseline, r.batch_size) for r in rows] == [(b, n) for b in config.baselines for n in (1, 3)]
    assert all(r.same_tokens for r in rows), [(r.baseline, r.batch_size) for r in rows if not r.same_tokens]
    assert all(r.decode_tok_s > 0 and r.p99_ms >= r.p50_ms > 0 for r in rows)
    reactive = {r.batch_size: r for r in rows if r.baseline == "reactive"}
    assert reactive[1].reuse == 1.0 and reactive[3].reuse > 1.0  # three sequences share experts per step
    assert reactive[1].ttft_floor_s > 0 and reactive[1].decode_bytes_per_token > 0
    # the share of the 2 GB/s link decode used: its bytes per second over the link's speed
    assert reactive[1].link_share == pytest.approx(reactive[1].decode_tok_s * reactive[1].decode_bytes_per_token / 2e9)
    assert 0 < reactive[1].link_share < 1
    assert {r.link_share for r in rows if r.baseline in ("transformers", "accelerate")} == {None}
    assert {r.hit_rate for r in rows if r.baseline in ("transformers", "accelerate")} == {None}
    assert any("run 1/1" in text for text in seen)


def test_interleaved_runs_alternate_baselines_and_reduce_alike(checkpoint, monkeypatch):
    """Interleaved: every baseline is loaded first, then runs go A, B, A, B per prompt shape; the rows are the
    same rows in the same order as baseline after baseline."""
    from activemoe import bench
    from activemoe.baselines import RunResult

    events = []

    class Fake:
        def __init__(self, spec):
            self.spec = spec

        def run(self, prompts, new_tokens):
            events.append(("run", self.spec, len(prompts[0]), new_tokens))
            return RunResult([[1] * new_tokens], 0.01, (0.001,) * (new_tokens - 1), 1, 0, None)

        def close(self):
            events.append(("close", self.spec))

    def make(spec, model_dir, engine):
        events.append(("load", spec))
        return Fake(spec)

    monkeypatch.setattr(bench, "make_runner", make)
    config = replace(BenchConfig.tiny(checkpoint("qwen3_moe"), ("reactive", "host")), prompt_lengths=(3, 5),
                     runs=2, new_tokens=4)
    by_order = run_bench(config)
    sequential, events[:] = list(events), []
    interleaved = run_bench(replace(config, interleave=True))
    assert [(r.baseline, r.prompt_tokens) for r in interleaved] == [(r.baseline, r.prompt_tokens) for r in by_order]
    assert interleaved == by_order and all(r.same_tokens for r in interleaved)
    warm = [("run", "reactive", 3, 4), ("run", "host", 3, 4)]
    timed = [("run", spec, n, 4) for n in (3, 5) for _ in range(2) for spec in ("reactive", "host")]
    assert events == [("load", "reactive"), ("load", "host"), *warm, *timed, ("close", "reactive"), ("close", "host")]
    assert sequential[:2] == [("load", "reactive"), ("run", "reactive", 3, 4)]  # one baseline at a time
    assert sequential.index(("close", "reactive")) < sequential.index(("load", "host"))


# gemma4: a decoder layer holds a parameter beside its experts; llama4: offloaded as transformers builds it
@pytest.mark.parametrize("family", ["qwen3_moe", "gemma4", "llama4"])
def test_accelerate_offloads_the_experts(checkpoint, family):
    from transformers import AutoModelForCausalLM

    model_dir = checkpoint(family)
    runner = AccelerateRunner(model_dir, EngineConfig(link=LinkConfig(link_gbps=10.0)))
    try:
        experts = [m for n, m in runner.model.named_modules() if n.endswith("experts")]
        assert experts and all(m.gate_up_proj.device.type == "meta" for m in experts)  # weights live on disk
        assert all(m._hf_hook.offload for m in experts)
        assert list(Path(runner._dir.name).glob("*.dat"))
        out = runner.run([[5, 6, 7]], 3)
        assert len(out.sequences[0]) == 3 and len(out.per_token_s) == 2
        ref = AutoModelForCausalLM.from_pretrained(model_dir).generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3,
                                                                       do_sample=False, pad_token_id=0)
        assert out.sequences[0] == ref[0, 3:].tolist()
    finally:
        runner.close()


def test_whole_model_baselines_that_do_not_fit_are_skipped(checkpoint, monkeypatch):
    from activemoe import bench

    config = BenchConfig.tiny(checkpoint("qwen3_moe"), ("transformers", "accelerate", "reactive"))
    monkeypatch.setattr(bench, "available_bytes", lambda device: 1000)  # a machine with 1 kB free
    skipped = []
    rows = run_bench(config, skipped=skipped)
    assert [r.baseline for r in rows] == ["reactive"]
    assert len(skipped) == 2 and all("skipped, the whole model needs" in s for s in skipped)


def test_compare_grid_rows(checkpoint):
    model = checkpoint("qwen3_moe")
    config = replace(BenchConfig.tiny(model, ()), new_tokens=3)
    tagged = compare_grid(config, ["none", "pregate"], ["lru", "slru"], ["4", "50%"])
    assert [c for c, _ in tagged] == ["4"] * 4 + ["50%"] * 4
    assert [r.baseline for _, r in tagged][:4] == ["none+lru@1", "none+slru@1", "pregate+lru@1", "pregate+slru@1"]
    assert all(r.same_tokens for _, r in tagged)


def test_bench_cli_writes_results_whole(capsys, checkpoint, tmp_path):
    out = tmp_path / "results"
    rc, stdout, _ = run(capsys, "bench", "--model", str(checkpoint("qwen3_moe")), "--baselines", "reactive,pregate",
                        "--prompt-lengths", "4", "--new-tokens", "3", "--runs", "1", "--interleave", "--grouped-hits",
                        "--issue-window", "3", "--out", str(out))
    assert rc == 0
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["measured"] == "wall clock" and result["link"] == "emulated 0.25 GB/s" and result["interleaved"]
    assert result["grouped_hits"] is True and all(r["same_tokens"] for r in result["rows"])
    assert result["issue_window"] == 3
    assert result["machine"] == machine_label("cpu")
    assert [r["baseline"] for r in result["rows"]] == ["reactive", "pregate"]
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.png"]
    assert json.loads((out / "bench.json").read_text()) == result


def test_interrupted_write_leaves_nothing(tmp_path):
    def fail(tmp):
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "bench.json", fail)
    assert list(tmp_path.iterdir()) == []


def test_bench_bad_input(capsys, checkpoint, tmp_path):
    model = str(checkpoint("qwen3_moe"))
    base = ["bench", "--model", model, "--prompt-lengths", "4", "--new-tokens", "3", "--runs", "1"]
    assert_user_error(capsys, base + ["--baselines", "reactive,warp"], "unknown baseline 'warp'", "accelerate")
    assert_user_error(capsys, base + ["--batch-size", "0"], "--batch-size")
    assert_user_error(capsys, base + ["--issue-window", "0"], "--issue-window must be at least 1")
    assert_user_error(capsys, base + ["--cache", "1"], "minimum is 2")  # below one layer's top-k
    assert_user_error(capsys, base + ["--prompt-lengths", "254"], "254-token prompt plus 3 new tokens", "context of 256 positions")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_user_error(capsys, base + ["--out", str(blocker / "sub")], "cannot write to --out")
    assert_user_error(capsys, ["bench", "--model", str(tmp_path)], "not a checkpoint directory")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_cuda_reports_device_peak(checkpoint):
    config = replace(BenchConfig.tiny(checkpoint("qwen3_moe"), ("transformers", "reactive")),
                     engine=EngineConfig(device="cuda", cache=CacheConfig(num_slots=4),
                                         link=LinkConfig(measured_gbps=20.0)))
    rows = run_bench(config)
    assert all(r.peak_device_bytes and r.same_tokens for r in rows)
    reactive = next(r for r in rows if r.baseline == "reactive")  # floors and shares against the measured link
    assert reactive.ttft_floor_s > 0 and reactive.link_share is not None
