"""--replay-routing: a trace's routing mapped onto another shape and forced on every runner alike."""
import json
from dataclasses import replace

import torch

import activemoe
from activemoe.bench import BenchConfig, run_bench
from activemoe.config import CacheConfig, EngineConfig
from activemoe.replay import ReplayRouting, _map
from activemoe.trace import Recorder, Trace
from tests.test_cli import run


def _trace(tmp_path, layers=(0, 1), experts=16, top_k=2, tokens=12) -> str:
    gen = torch.Generator().manual_seed(0)
    rows = [(layer, t) for t in range(tokens) for layer in layers]
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in rows]).int()  # [N, K]
    weights = torch.softmax(torch.randn(len(rows), top_k, generator=gen), -1)
    meta = {"format": "activemoe-trace", "version": "1", "model_type": "qwen3_moe", "num_experts": str(experts),
            "top_k": str(top_k), "hidden_size": "8", "layers": json.dumps(list(layers)), "shape_id": "x"}
    path = tmp_path / "replay.trace"
    Trace(torch.tensor([r[0] for r in rows], dtype=torch.int32), torch.tensor([r[1] for r in rows]), ids, weights,
          None, meta).save(path)
    return str(path)


def test_map_widens_each_expert_into_neighbours():
    ids, w = _map(torch.tensor([[3, 7]]), torch.tensor([[0.75, 0.25]]), trace_experts=16, num_experts=64, top_k=8)
    assert ids.tolist() == [[12, 13, 14, 15, 28, 29, 30, 31]]  # 4 neighbours each from e * 64 // 16
    assert torch.allclose(w, torch.tensor([[0.1875] * 4 + [0.0625] * 4]))
    ids, w = _map(torch.tensor([[5, 5]]), torch.tensor([[0.5, 0.5]]), trace_experts=8, num_experts=8, top_k=3)
    assert ids.tolist() == [[5, 6, 7]] and abs(float(w.sum()) - 1) < 1e-6  # distinct, padded with free experts


def test_replay_cursor_wraps_and_resets(tmp_path):
    from activemoe.trace import load_trace

    replay = ReplayRouting(load_trace(_trace(tmp_path)), layers=[1, 3, 5], num_experts=32, top_k=4)
    first, _ = replay.routing(5, 10)  # layer 5 replays trace layer 0 (5 is the third MoE layer: 2 mod 2)
    again, _ = replay.routing(5, 10)  # rows 10, 11, then wraps to 0..7
    assert again[2:].tolist() == first[:8].tolist()
    replay.reset()
    assert replay.routing(5, 10)[0].tolist() == first.tolist()


def test_engine_routes_as_the_trace_says(checkpoint, tmp_path):
    trace = _trace(tmp_path)
    model = checkpoint("qwen3_moe", num_experts=8, top_k=2)
    config = EngineConfig(cache=CacheConfig(num_slots=4), replay_routing=trace)
    with activemoe.load(model, config) as eng:
        recorder = Recorder(0, keep_hidden=False)
        eng.runtime.recorder = recorder
        eng.generate([5, 6, 7], max_new_tokens=3)
        routed = [index for layer, _, index, _ in recorder.rows if layer == 0]
    expected = eng.replay.index[0]  # the mapped trace rows of the first MoE layer
    assert torch.equal(torch.cat(routed)[:5].long(), expected[:5])


def test_bench_with_replay_forces_every_runner_alike(checkpoint, tmp_path, capsys):
    trace = _trace(tmp_path)
    model = checkpoint("qwen3_moe", num_experts=8, top_k=2)
    config = replace(BenchConfig.tiny(model, ("transformers", "reactive", "oracle+belady@2")),
                     engine=EngineConfig(cache=CacheConfig(num_slots=4), replay_routing=trace))
    rows = run_bench(config)
    assert all(r.same_tokens for r in rows)  # the same forced routing gives the same tokens everywhere
    rc, out, _ = run(capsys, "bench", "--model", str(model), "--baselines", "reactive", "--prompt-lengths", "4",
                     "--new-tokens", "3", "--runs", "1", "--replay-routing", trace)
    assert rc == 0 and "replayed from" in json.loads(out.strip().splitlines()[-1])["routing"]
