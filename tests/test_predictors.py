"""Predictors on synthetic routing where the right answer is known, and exact parity with each."""
from dataclasses import replace

import pytest
import torch

import activemoe
from activemoe.config import CacheConfig, EngineConfig, PrefetchConfig, SamplingConfig
from activemoe.families import RouterParts
from activemoe.predictors import HistoryPredictor, OraclePredictor, PregatePredictor, pregate_weights
from tests.test_parity import GEN, PROMPT, _assert_parity, _reference

E, K = 8, 2


def test_history_learns_a_deterministic_transition_perfectly():
    """Layer N+1 routes to (e + 3) % E for every e routed at layer N: once every expert has been seen
    often enough to outweigh chance co-occurrence (40 tokens), recall is 1."""
    layers = [0, 1, 2, 3]
    predictor = HistoryPredictor(layers, E, lookahead=2)
    gen = torch.Generator().manual_seed(0)
    hits = total = 0
    for step in range(60):
        first = torch.randperm(E, generator=gen)[:K]
        routing = [(first + 3 * i) % E for i in range(len(layers))]
        predicted = {}
        for i, layer in enumerate(layers):
            for p in predictor.predict(step * 4 + i, layer, torch.zeros(1, 4), routing[i][None]):
                predicted[(layer, p.distance)] = set(p.experts[:K])
        if step >= 40:
            for (layer, k), named in predicted.items():
                hits += len(named & set(routing[layers.index(layer) + k].tolist()))
                total += K
    assert total and hits == total


def test_pregate_equals_the_target_router_when_routers_share_the_hidden_state():
    torch.manual_seed(0)
    weight = torch.randn(E, 16)
    norm0, norm1 = torch.rand(16) + 0.5, torch.rand(16) + 0.5
    routers = {0: RouterParts(norm0, torch.randn(E, 16), None), 1: RouterParts(norm1, weight, None)}
    predictor = PregatePredictor(routers, lookahead=1)
    residual = torch.randn(3, 16)
    rms = residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True))
    moe_input_0 = rms * norm0  # what layer 0's experts receive
    (pred,) = predictor.predict(0, 0, moe_input_0, torch.zeros(3, K, dtype=torch.long))
    expected = ((rms * norm1) @ weight.T).softmax(-1).amax(0)  # layer 1's router on the same residual
    assert pred.layer == 1 and pred.distance == 1
    assert list(pred.experts) == expected.argsort(descending=True).tolist()


def test_oracle_stops_when_routing_diverges():
    oracle = OraclePredictor([(0, (1, 2)), (1, (3, 4)), (0, (5, 6))], lookahead=2)
    (p1, p2) = oracle.predict(0, 0, None, torch.tensor([[1, 2]]))
    assert (p1.layer, p1.experts, p2.experts) == (1, (3, 4), (5, 6))
    assert oracle.predict(1, 1, None, torch.tensor([[3, 7]])) == [] and oracle.diverged


@pytest.mark.parametrize("predictor", ["pregate", "history"])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_parity_with_each_predictor(checkpoint, family, predictor):
    model_dir = checkpoint(family)
    ref = _reference(model_dir)
    cfg = EngineConfig(cache=CacheConfig(num_slots=5, policy="slru"),
                       prefetch=PrefetchConfig(predictor=predictor, lookahead=2))
    with activemoe.load(model_dir, cfg) as eng:
        _assert_parity(ref, eng.model.generate(PROMPT, **GEN))
        out = eng.generate(PROMPT[0].tolist(), max_new_tokens=8, sampling=SamplingConfig(do_sample=False))
        assert set(out.stats.recall) <= {"1", "2"} and all(0 <= r <= 1 for r in out.stats.recall.values())
        assert 0 < out.stats.predict_share < 1  # the predictor's time, measured in place


def test_no_predictor_runs_when_every_expert_fits(checkpoint):
    """Every expert in a slot: nothing is ever loaded, so the predictor is not run (it would only cost time)."""
    model_dir = checkpoint("qwen3_moe")
    ref = _reference(model_dir)
    cfg = EngineConfig(cache=CacheConfig(slot_fraction=1.0), prefetch=PrefetchConfig(predictor="pregate"))
    with activemoe.load(model_dir, cfg) as eng:
        assert eng.runtime.predictor.name == "none"
        _assert_parity(ref, eng.model.generate(PROMPT, **GEN))
        out = eng.generate(PROMPT[0].tolist(), max_new_tokens=8, sampling=SamplingConfig(do_sample=False))
        assert out.stats.recall == {} and out.stats.loads == 0


class _Fixed:
    """A component that always names the same experts for the next layer."""

    def __init__(self, name, experts, probs):
        self.name, self.experts, self.probs = name, experts, probs

    def begin(self):
        pass

    def predict(self, event, layer, hidden, top_k_index):
        from activemoe.predictors import Prediction

        return [Prediction(1, layer + 1, self.experts, self.probs)] if layer == 0 else []


def _run_adaptive(adaptive, truth_next, steps=40):
    for step in range(steps):
        preds = adaptive.predict(2 * step, 0, torch.zeros(1, 4), torch.tensor([[0, 1]]))
        adaptive.predict(2 * step + 1, 1, torch.zeros(1, 4), torch.tensor([truth_next]))
    return preds


def test_adaptive_trusts_the_component_that_is_right():
    from activemoe.predictors import AdaptivePredictor

    good = _Fixed("good", (3, 4, 5, 6), (0.45, 0.45, 0.05, 0.05))
    bad = _Fixed("bad", (6, 7, 3, 4), (0.45, 0.45, 0.05, 0.05))
    adaptive = AdaptivePredictor([good, bad], top_k=2, mass=0.8, warmup=4)
    (pred,) = _run_adaptive(adaptive, [3, 4])
    assert adaptive.recall("good", 1, 1) == 1.0 and adaptive.recall("bad", 1, 1) == 0.0
    assert set(pred.experts[:2]) == {3, 4} and 2 <= pred.budget <= 4


def test_adaptive_prefetches_nothing_when_no_component_is_reliable():
    from activemoe.predictors import AdaptivePredictor

    wrong = _Fixed("wrong", (6, 7, 3, 4), (0.45, 0.45, 0.05, 0.05))
    adaptive = AdaptivePredictor([wrong], top_k=2, min_recall=0.3, warmup=4)
    (pred,) = _run_adaptive(adaptive, [0, 1])
    assert pred.budget == 0


def test_parity_with_adaptive(checkpoint):
    model_dir = checkpoint("mixtral")
    ref = _reference(model_dir)
    cfg = EngineConfig(cache=CacheConfig(num_slots=4, policy="slru"),
                       prefetch=PrefetchConfig(predictor="adaptive", lookahead=2))
    with activemoe.load(model_dir, cfg) as eng:
        _assert_parity(ref, eng.model.generate(PROMPT, **GEN))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_parity_with_the_first_layer_reserve(checkpoint, family):
    """With a within-token predictor the first MoE layer keeps a reserve of slots (and not with the flag
    off, nor with the oracle); the output stays exact."""
    model_dir = checkpoint(family)
    ref = _reference(model_dir)
    cfg = EngineConfig(cache=CacheConfig(num_slots=10, policy="lru"),
                       prefetch=PrefetchConfig(predictor="pregate", lookahead=1))
    with activemoe.load(model_dir, cfg) as eng:
        layers = len(eng.runtime.store.layers)
        assert eng.runtime.loader.core.reserve == min(10 - 2 * eng.top_k, 10 // layers) > 0
        assert eng.runtime.loader.core.reserved_layer == eng.runtime.store.layers[0]
        _assert_parity(ref, eng.model.generate(PROMPT, **GEN))
        out = eng.generate(PROMPT[0].tolist(), max_new_tokens=12, sampling=SamplingConfig(do_sample=False))
        assert out.stats.evictions > 0  # the reserve was in play
        assert out.token_ids == ref.sequences[0, PROMPT.shape[1]:].tolist()[:len(out.token_ids)]
    off = replace(cfg, cache=replace(cfg.cache, first_layer_reserve=False))
    oracle = replace(cfg, prefetch=replace(cfg.prefetch, predictor="oracle"))
    for other in (off, oracle):
        with activemoe.load(model_dir, other) as eng:
            assert eng.runtime.loader.core.reserve == 0


def test_adaptive_passes_the_token_stage_to_components_that_see_tokens():
    from activemoe.predictors import TOKENS, AdaptivePredictor

    class Tokens(_Fixed):
        sees_tokens = True

        def predict(self, event, layer, hidden, top_k_index):
            from activemoe.predictors import Prediction

            return [Prediction(1, 0, self.experts, self.probs)] if layer == TOKENS else []

    blind = _Fixed("blind", (6, 7), (0.5, 0.5))
    assert not AdaptivePredictor([blind], top_k=2).sees_tokens
    adaptive = AdaptivePredictor([blind, Tokens("tokens", (3, 4), (0.5, 0.5))], top_k=2, min_recall=0.0)
    assert adaptive.sees_tokens
    (pred,) = adaptive.predict(-1, TOKENS, torch.zeros(1, 4), None)
    assert (pred.layer, pred.distance, set(pred.experts)) == (0, 1, {3, 4})


def test_pregate_weights_stay_on_the_routers_device():
    """A router without a bias (Qwen3-MoE, OLMoE, Mixtral) on a device: the pre-gate's zero bias is made there
    too, so the pregate predictor's addmm never mixes a host bias with device weights (a CUDA-only failure)."""
    routers = {layer: RouterParts(torch.ones(4, device="meta"), torch.ones(8, 4, device="meta"), None)
               for layer in (0, 1)}
    weight, bias = pregate_weights(routers, 0, 1)
    assert weight.device.type == bias.device.type == "meta" and bias.shape == (8,)
