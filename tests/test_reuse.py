"""Reuse heads and the `reuse` eviction policy: what the heads learn, what the scorer keeps, how the policy
ranks, the sidecar and CLI, and exact parity with the policy in play."""
import json

import numpy as np
import pytest
import torch

import activemoe
from activemoe.cache import ExpertCache
from activemoe.cli import main
from activemoe.config import CacheConfig, EngineConfig, PrefetchConfig, SamplingConfig
from activemoe.errors import UserError
from activemoe.ids import ExpertId
from activemoe.learned import load_heads, save_heads, train_heads
from activemoe.policies import Reuse
from activemoe.reuse import ReuseScorer, examples, load_reuse_heads, train_reuse_heads
from activemoe.trace import Trace, load_trace
from tests.test_cache import access
from tests.test_cli import assert_user_error
from tests.test_parity import GEN, PROMPT, _assert_parity, _reference
from tests.test_trace import record_chunks


def _trace(experts: list[list[int]], tokens: list[int], hidden: torch.Tensor, num_experts: int = 8) -> Trace:
    """One MoE layer (layer 0), top-2: row i is token tokens[i] routed to experts[i]."""
    meta = {"layers": "[0]", "num_experts": str(num_experts), "top_k": "2", "hidden_size": str(hidden.shape[1]),
            "shape_id": "s"}
    n = len(experts)
    return Trace(torch.zeros(n, dtype=torch.int32), torch.tensor(tokens), torch.tensor(experts, dtype=torch.int32),
                 torch.full((n, 2), 0.5), hidden.half(), meta)


def test_examples_mark_each_return_within_the_horizon_and_restart_the_history():
    routed = [[0, 1], [2, 3], [0, 4], [5, 6], [1, 2], [0, 7]]
    tokens = [0, 1, 2, 3, 10, 11]  # a new sequence starts at token 10
    x, y = examples(_trace(routed, tokens, torch.zeros(6, 4)), 0, horizon=2, half_life=1.0)
    # rows with 2 consecutive tokens after them: tokens 0, 1 (token 2 is followed by 3, then a gap)
    assert y.shape == (2, 8)
    assert y[0].nonzero().flatten().tolist() == [0, 2, 3, 4]  # token 0: tokens 1 and 2 route to 2,3 and 0,4
    assert y[1].nonzero().flatten().tolist() == [0, 4, 5, 6]
    onehot, history = x[:, 4:12], x[:, 12:]
    assert onehot[1].nonzero().flatten().tolist() == [2, 3]
    torch.testing.assert_close(history[1], torch.tensor([0.5, 0.5, 1, 1, 0, 0, 0, 0]))  # half-life 1 token


def test_heads_learn_returns_the_hidden_state_announces():
    """Expert 7 comes back at the next token exactly when hidden dim 0 says so; the head learns to rank it."""
    gen = torch.Generator().manual_seed(0)
    n = 3000
    flag = torch.rand(n, generator=gen) < 0.3
    routed = torch.randint(0, 7, (n, 2), generator=gen)  # experts 0-6, 7 only where announced
    routed[:, 1] = (routed[:, 0] + 1 + torch.randint(0, 6, (n,), generator=gen)) % 7
    hidden = torch.randn(n, 4, generator=gen) * 0.1
    hidden[:, 0] += flag.float() * 3
    for t in torch.nonzero(flag).flatten().tolist():
        if t + 1 < n:
            routed[t + 1, 0] = 7
    heads = train_reuse_heads(_trace(routed.tolist(), list(range(n)), hidden), horizon=1, width=16, epochs=40, lr=1e-2)
    scorer = ReuseScorer(heads, 8)
    ranks = {True: [], False: []}
    for t in range(n - 200, n):
        scorer.observe(0, hidden[t:t + 1], routed[t].tolist(), parallel=True)
        ranks[bool(flag[t])].append(scorer.score(ExpertId(0, 7)))
    assert min(ranks[True]) > max(ranks[False])  # held-out tail: announced returns always rank higher


def test_the_scorer_takes_a_prefill_as_its_tokens_one_by_one():
    heads = train_reuse_heads(_trace([[0, 1], [2, 3], [0, 2], [1, 3], [0, 1]], [0, 1, 2, 3, 4], torch.randn(5, 4)),
                              horizon=1, width=4, epochs=1)
    hidden, routed = torch.randn(6, 4), [[0, 1], [2, 3], [4, 5], [0, 1], [6, 7], [1, 2]]
    at_once, one_by_one = ReuseScorer(heads, 8), ReuseScorer(heads, 8)
    at_once.observe(0, hidden, sum(routed, []), parallel=False)
    for t in range(6):
        one_by_one.observe(0, hidden[t:t + 1], routed[t], parallel=False)
    np.testing.assert_allclose(at_once.history[0], one_by_one.history[0], rtol=1e-6)
    scores = lambda s: [s.score(ExpertId(0, e)) for e in range(8)]  # noqa: E731
    np.testing.assert_allclose(scores(at_once), scores(one_by_one), rtol=1e-5)
    one_by_one.observe(0, hidden[:1], routed[0], parallel=False)  # work left for idle(): the same scores
    assert one_by_one.idle() is False and not one_by_one.pending
    at_once.observe(0, hidden[:1], routed[0], parallel=False)
    np.testing.assert_allclose(scores(at_once), one_by_one.scores[0], rtol=1e-6)
    assert at_once.score(ExpertId(3, 0)) == -np.inf  # a layer without scores yet: evicted first
    at_once.begin()
    assert at_once.scores == {} and at_once.history == {}


def test_reuse_evicts_the_lowest_score_then_the_least_recently_used():
    scores = {ExpertId(0, e): s for e, s in enumerate([0.9, 0.1, 0.1, 0.5, 0.0])}
    cache = ExpertCache(3, Reuse(lambda eid: scores[eid]))
    assert [access(cache, ExpertId(0, e)) for e in (0, 1, 2, 1)] == [None] * 4  # 1 used again: 2 is the tied LRU
    assert access(cache, ExpertId(0, 3)) == ExpertId(0, 2)
    scores[ExpertId(0, 0)] = -1.0  # scores move between evictions: the policy reads them live
    assert access(cache, ExpertId(0, 4)) == ExpertId(0, 0)


@pytest.fixture(scope="module")
def sidecar(checkpoint, tmp_path_factory):
    """A qwen3_moe checkpoint, a trace of it, and a sidecar with lookahead and reuse heads."""
    model_dir = checkpoint("qwen3_moe")
    tmp = tmp_path_factory.mktemp("reuse")
    path = tmp / "t.trace"
    shape = record_chunks(model_dir, path)
    trace = load_trace(path)
    reuse = train_reuse_heads(trace, horizon=2, width=8, epochs=2)
    heads = train_heads(trace, lookahead=2, epochs=3, mlp_width=8)
    out = tmp / "h.safetensors"
    save_heads(out, heads, {"shape_id": shape, "model_type": "qwen3_moe"} | reuse.meta(), reuse.tensors())
    return model_dir, path, out, shape


@pytest.mark.parametrize("predictor,slots", [("none", 4), ("learned", 6), ("learned", 4)])
def test_parity_with_the_reuse_policy_single_and_batched(sidecar, predictor, slots):
    model_dir, _, out, _ = sidecar
    ref = _reference(model_dir)
    cfg = EngineConfig(cache=CacheConfig(num_slots=slots, policy="reuse"),
                       prefetch=PrefetchConfig(predictor=predictor, lookahead=2, predictor_file=str(out)))
    with activemoe.load(model_dir, cfg) as eng:
        assert isinstance(eng.runtime.loader.cache.policy, Reuse)
        _assert_parity(ref, eng.model.generate(PROMPT, **GEN))
        result = eng.generate(PROMPT[0].tolist(), max_new_tokens=8, sampling=SamplingConfig(do_sample=False))
        assert result.stats.evictions > 0 and set(eng.runtime.reuse_scorer.history) == {0, 1, 2}
        batch = torch.tensor([[0, 0, 9, 12, 40], PROMPT[0, :5].tolist()])
        mask = (batch != 0).long()
        ref_batch = activemoe.engine.plain_model(model_dir, "float32").generate(batch, attention_mask=mask, **GEN)
        _assert_parity(ref_batch, eng.model.generate(batch, attention_mask=mask, **GEN))


def test_sidecars_keep_both_kinds_of_heads_apart(sidecar, tmp_path):
    _, path, out, shape = sidecar
    assert len(load_heads(out, shape)) == 5  # the lookahead heads load as before, the reuse heads beside them
    reuse = load_reuse_heads(out, shape)
    assert set(reuse.heads) == {0, 1, 2} and reuse.horizon == 2
    plain = tmp_path / "plain.safetensors"
    save_heads(plain, load_heads(out, shape), {"shape_id": shape, "model_type": "qwen3_moe"})
    with pytest.raises(UserError, match="no reuse heads.*--reuse-only"):
        load_reuse_heads(plain, shape)
    with pytest.raises(UserError, match="another model"):
        load_reuse_heads(out, "ffff")


def test_train_predictor_reuse_only_adds_heads_and_keeps_the_rest(sidecar, tmp_path, capsys):
    from safetensors import safe_open

    model_dir, path, out, shape = sidecar
    plain = tmp_path / "plain.safetensors"
    save_heads(plain, load_heads(out, shape), {"shape_id": shape, "model_type": "qwen3_moe"})
    before = plain.read_bytes()
    assert main(["train-predictor", "--reuse-only", "--trace", str(path), "--out", str(plain),
                 "--reuse-horizon", "2", "--reuse-width", "8"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reuse_heads"] == 3
    with safe_open(plain, "pt") as f:
        keys = set(f.keys())
        assert {k for k in keys if k.startswith("reuse.")} and f.metadata()["reuse_horizon"] == "2"
        assert f.get_slice(next(k for k in keys if k.endswith(".mlp_in"))).get_shape()[0] == 8  # --reuse-width
    for key, head in load_heads(plain, shape).items():  # the lookahead heads are untouched
        torch.testing.assert_close(head.weight, load_heads(out, shape)[key].weight, rtol=0, atol=0)
    assert plain.read_bytes() != before and not list(tmp_path.glob(".*.tmp"))
    assert_user_error(capsys, ["train-predictor", "--reuse-only", "--trace", str(path),
                               "--out", str(tmp_path / "none.safetensors")], "does not exist")
    assert_user_error(capsys, ["train-predictor", "--reuse-only", "--reuse-horizon", "0", "--trace", str(path),
                               "--out", str(plain)], "--reuse-horizon")
    assert_user_error(capsys, ["train-predictor", "--reuse-only", "--reuse-width", "0", "--trace", str(path),
                               "--out", str(plain)], "--reuse-width")
    assert_user_error(capsys, ["generate", "--model", str(model_dir), "--prompt-ids", "5", "--policy", "reuse",
                               "--cache-experts", "4"], "does not exist")  # no sidecar in the model directory


def test_the_simulator_runs_the_reuse_policy(sidecar, capsys, tmp_path):
    model_dir, path, out, _ = sidecar
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"device": "cpu", "host": "test", "dtype": "float32", "expert_bytes": 6144,
                                   "host_copy_gbps": 10.0, "expert_host_ms": {"1": 0.05, "8": 0.06, "64": 0.2},
                                   "decode_layer_ms": 0.3}))
    base = ["simulate", "--trace", str(path), "--prefill", "40", "--profile", str(profile), "--link-gbps", "0.05",
            "--policy", "lru,reuse", "--cache", "4", "--json"]
    assert_user_error(capsys, base, "--predictor-file")
    assert main(base + ["--predictor-file", str(out)]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [r["config"].split()[2] for r in rows] == ["lru", "reuse"] and all(r["tokens"] > 0 for r in rows)


def test_the_bench_adds_the_reuse_policy_when_the_sidecar_has_its_heads(sidecar, tmp_path):
    from activemoe.bench import default_baselines
    from activemoe.learned import SIDECAR

    _, _, out, shape = sidecar
    assert not [b for b in default_baselines(tmp_path) if "learned" in b]
    (tmp_path / SIDECAR).write_bytes(out.read_bytes())
    assert default_baselines(tmp_path)[-3:] == ("learned+slru@3", "learned+lfru@3", "learned+reuse@3")
    save_heads(tmp_path / SIDECAR, load_heads(out, shape), {"shape_id": shape, "model_type": "qwen3_moe"})
    assert default_baselines(tmp_path)[-2:] == ("learned+slru@3", "learned+lfru@3")
