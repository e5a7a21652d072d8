"""Prefetch runtime: exact parity for every policy, predictor, lookahead, link speed, store and
--experts-on mode; the wait-or-compute decision; faults; no deadlock."""
import threading
from dataclasses import replace

import pytest

import activemoe
from activemoe.config import CacheConfig, EngineConfig, LinkConfig, PrefetchConfig, SamplingConfig
from activemoe.runtime import MissCostModel
from tests.test_parity import GEN, PROMPT, _assert_parity, _reference

GREEDY = SamplingConfig(do_sample=False)

CONFIGS = {
    "slru-oracle-l2": EngineConfig(cache=CacheConfig(num_slots=6, policy="slru"),
                                   prefetch=PrefetchConfig(predictor="oracle", lookahead=2)),
    "lfru-oracle-l3-link": EngineConfig(cache=CacheConfig(num_slots=4, policy="lfru"),
                                        prefetch=PrefetchConfig(predictor="oracle", lookahead=3, chunk_bytes=1024),
                                        link=LinkConfig(link_gbps=0.05)),
    "lru-none-disk": EngineConfig(cache=CacheConfig(num_slots=3), store="disk"),
    "lfu-oracle-disk": EngineConfig(cache=CacheConfig(num_slots=5, policy="lfu"), store="disk",
                                    prefetch=PrefetchConfig(predictor="oracle", lookahead=1)),
    "host": EngineConfig(cache=CacheConfig(num_slots=2), experts_on="host"),
    "auto": EngineConfig(cache=CacheConfig(num_slots=2), experts_on="auto", link=LinkConfig(link_gbps=0.01)),
}


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_for_prefetch_configurations(family, name, checkpoint):
    model_dir = checkpoint(family)
    ref = _reference(model_dir)
    with activemoe.load(model_dir, CONFIGS[name]) as eng:
        ref_ids = ref.sequences[0, PROMPT.shape[1]:].tolist()
        out = eng.generate(PROMPT[0].tolist(), max_new_tokens=16, sampling=GREEDY)
        assert out.token_ids == ref_ids[:len(out.token_ids)] and len(out.token_ids) >= 1
        _assert_parity(ref, eng.model.generate(PROMPT, **GEN))  # logits too (oracle predicts nothing here)


def test_oracle_prefetch_replays_and_hits(checkpoint):
    cfg = EngineConfig(cache=CacheConfig(num_slots=8), prefetch=PrefetchConfig(predictor="oracle", lookahead=2))
    with activemoe.load(checkpoint("olmoe"), cfg) as eng:
        out = eng.generate([5, 6, 7, 8], max_new_tokens=24, sampling=GREEDY)
        assert not eng.runtime.predictor.diverged
        s = out.stats
        assert s.speculative_loads > 0 and s.hit_rate > 0.5
    with activemoe.load(checkpoint("olmoe"), EngineConfig(cache=CacheConfig(num_slots=8))) as eng:
        reactive = eng.generate([5, 6, 7, 8], max_new_tokens=24, sampling=GREEDY)
    assert reactive.token_ids == out.token_ids
    assert reactive.stats.speculative_loads == 0 and s.hit_rate > reactive.stats.hit_rate


def test_late_loads_count_predictions_that_had_not_landed(checkpoint):
    """A prediction one layer ahead over a link far slower than a layer's compute is still in flight when
    its layer routes: the compute path waits for it (a late load), and it is a speculative load."""
    slow = EngineConfig(cache=CacheConfig(num_slots=4), link=LinkConfig(link_gbps=0.005),
                        prefetch=PrefetchConfig(predictor="oracle", lookahead=1))
    with activemoe.load(checkpoint("qwen3_moe"), slow) as eng:
        s = eng.generate([5, 6, 7, 8], max_new_tokens=8, sampling=GREEDY).stats
    assert 0 < s.late_loads <= s.speculative_loads
    with activemoe.load(checkpoint("qwen3_moe"), replace(slow, prefetch=PrefetchConfig())) as eng:
        assert eng.generate([5, 6, 7, 8], max_new_tokens=8, sampling=GREEDY).stats.late_loads == 0  # nothing predicted


def test_miss_cost_model_decision():
    model = MissCostModel(host_base_s=1e-3, host_per_token_s=1e-4)
    assert model.prefer_host(tokens=1, remaining_transfer_s=5e-3)
    assert not model.prefer_host(tokens=1, remaining_transfer_s=5e-4)
    assert not model.prefer_host(tokens=100, remaining_transfer_s=5e-3)  # 11 ms on the host


@pytest.mark.parametrize("host_base_s,expect_host", [(0.0, True), (1e9, False)])
def test_auto_mode_follows_the_cost_model(checkpoint, host_base_s, expect_host):
    cfg = EngineConfig(cache=CacheConfig(num_slots=2), experts_on="auto", link=LinkConfig(link_gbps=0.01))
    with activemoe.load(checkpoint("qwen3_moe"), cfg) as eng:
        eng.runtime.miss_cost = MissCostModel(host_base_s=host_base_s, host_per_token_s=0.0)
        out = eng.generate([5, 6, 7], max_new_tokens=6, sampling=GREEDY)
        with activemoe.load(checkpoint("qwen3_moe"), EngineConfig.tiny(num_slots=2)) as plain:
            assert out.token_ids == plain.generate([5, 6, 7], max_new_tokens=6, sampling=GREEDY).token_ids
        assert (out.stats.host_computed > 0) == expect_host
        assert all(m.pin_count == 0 for m in eng.runtime.loader.cache.meta)


def test_closing_midway_stops_the_threads(checkpoint):
    cfg = EngineConfig(cache=CacheConfig(num_slots=2), store="disk",
                       prefetch=PrefetchConfig(predictor="oracle", lookahead=2))
    eng = activemoe.load(checkpoint("qwen3_moe"), cfg)

    def stop_after_three(token, seen=[]):
        seen.append(token)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        eng.generate([5, 6, 7], max_new_tokens=20, sampling=GREEDY, on_token=stop_after_three)
    io_threads = eng.runtime.store.io_threads
    assert io_threads and eng.runtime.loader.alive
    eng.close()
    assert not eng.runtime.loader.alive
    assert not [t for t in io_threads if t.is_alive()]


@pytest.mark.slow
def test_thousand_decode_steps_smallest_cache_no_deadlock(tmp_path):
    from activemoe.tiny import build_tiny_checkpoint

    model_dir = build_tiny_checkpoint("qwen3_moe", tmp_path, max_positions=1100, num_layers=2)
    cfg = EngineConfig(cache=CacheConfig(num_slots=2, policy="slru"),
                       prefetch=PrefetchConfig(predictor="oracle", lookahead=3, issue_window=1))
    with activemoe.load(model_dir, cfg) as eng:
        done = []
        worker = threading.Thread(target=lambda: done.append(
            eng.generate([5, 6, 7], max_new_tokens=1000, sampling=GREEDY)))
        worker.start()
        worker.join(timeout=300)
        assert not worker.is_alive(), "generation deadlocked"
        assert done and all(m.pin_count == 0 for m in eng.runtime.loader.cache.meta)


class _CountingPredictor:
    """Names nothing; counts its calls."""

    name = "counting"

    def __init__(self):
        self.calls = 0

    def begin(self) -> None:
        pass

    def predict(self, event, layer, hidden, top_k_index):
        self.calls += 1
        return []


def test_predictor_rests_while_nothing_misses_and_a_miss_wakes_it(checkpoint):
    with activemoe.load(checkpoint("qwen3_moe"), EngineConfig(cache=CacheConfig(slot_fraction=1.0))) as eng:
        predictor, runtime = _CountingPredictor(), eng.runtime
        runtime.predictor, runtime.rest.after = predictor, 2
        calls = []  # predictor calls made before each new token

        def on_token(_):
            calls.append(predictor.calls)
            if len(calls) == 12:  # resting by now: empty the slots, so the next step misses
                runtime.loader.reset()

        out = eng.generate(PROMPT[0].tolist(), max_new_tokens=20, sampling=GREEDY, on_token=on_token)
    per_step = [b - a for a, b in zip(calls, calls[1:])]  # calls in decode steps 1, 2, ...
    layers = len(runtime.store.layers)
    assert per_step[:2] == [layers] * 2  # awake for two quiet steps (rest.after), then it rests
    assert per_step[2:11] == [0] * 9  # every expert resident: no miss, no call
    assert per_step[11] > 0  # the emptied slots miss: it predicts again, from the layer after the first miss
    assert per_step[-1] == 0  # and rests once the experts are back
    assert 0 < out.stats.predictor_rested < 1
