"""The simulator: the engine's hits, loads and evictions on the same trace; Belady and the oracle
bound as bounds; the indexed victim search equals the scan; presets, synthetic traces, bad input."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import activemoe
from activemoe.cache import ExpertCache, NoEvictableSlot
from activemoe.config import CacheConfig, EngineConfig, LinkConfig, PrefetchConfig, SamplingConfig
from activemoe.costmodel import CostModel, from_preset
from activemoe.ids import ExpertId
from activemoe.policies import LFU, LRU, SLRU
from activemoe.presets import HARDWARE, SHAPES, hardware_preset, shape_preset
from activemoe.simulate import SimConfig, belady_loads, simulate
from activemoe.trace import Recorder
from activemoe.workload import SyntheticSpec, Workload, from_trace, synthetic
from tests.test_cli import assert_user_error, run

GREEDY = SamplingConfig(do_sample=False)
PROMPT = [5, 17, 33, 8, 60, 41, 3]
LINK_GBPS = 0.01  # one expert every ~0.6 ms (the reactive match also holds at 2 GB/s on a loaded machine:
# critical victims are chosen by the compute path at fixed points and landed experts taken in landing order)


def test_cost(expert_bytes: int = 6144) -> CostModel:
    return CostModel("test", link_gbps=LINK_GBPS, link_latency_s=0.0, layer_base_s=100e-6, layer_per_token_s=0.0,
                     expert_base_s=40e-6, expert_per_token_s=1e-6, host_expert_base_s=40e-6,
                     host_expert_per_token_s=1e-6, expert_bytes=expert_bytes, source="test figures")


test_cost.__test__ = False


def _engine_run(model_dir, cache: CacheConfig, prefetch: PrefetchConfig, new_tokens: int = 12):
    """Generate with the emulated link, recording the routing of that very generation (the oracle
    records a first pass itself, so its routing comes from a reactive run: exact mode, same tokens)."""
    if prefetch.predictor != "none":
        _, workload, _, _ = _engine_run(model_dir, CacheConfig(num_slots=cache.num_slots), PrefetchConfig(),
                                        new_tokens)
    cfg = EngineConfig(cache=cache, prefetch=prefetch, link=LinkConfig(link_gbps=LINK_GBPS))
    with activemoe.load(model_dir, cfg) as eng:
        eng.generate(PROMPT, max_new_tokens=2, sampling=GREEDY)  # a process's first forward is slow: warm up
        eng.reset_cache()
        if prefetch.predictor == "none":
            eng.runtime.recorder = recorder = Recorder(eng.runtime.store.layers[0], keep_hidden=False)
        stats = eng.generate(PROMPT, max_new_tokens=new_tokens, sampling=GREEDY).stats
        if prefetch.predictor == "none":
            eng.runtime.recorder = None
            workload = from_trace(recorder.trace(eng.trace_meta()), "recorded in test")
        chunks = [c.nbytes for c in eng.runtime.loader.slab.chunks]
        expert_bytes = eng.runtime.loader.slab.expert_bytes
    return stats, workload, chunks, expert_bytes


@pytest.mark.parametrize("policy", ["lru", "lfu", "lfru", "slru"])
def test_simulator_matches_the_engine_exactly_reactive(policy, checkpoint):
    """Predictor none: hits, loads and evictions are equal, prefill (7 tokens in one forward) and decode
    alike, for several cache sizes. Nothing here depends on thread timing: LoaderCore gives critical
    loads their slots when the compute path queues them or releases a slot, hits are touched when
    pinned, and a late compute path takes landed experts in landing order."""
    model_dir = checkpoint("qwen3_moe")
    for slots in (2, 5, 12):
        cache = CacheConfig(num_slots=slots, policy=policy)
        stats, workload, chunks, expert_bytes = _engine_run(model_dir, cache, PrefetchConfig())
        sim = simulate(workload, SimConfig(cache, PrefetchConfig(), prefill_tokens=len(PROMPT)),
                       test_cost(expert_bytes), chunks)
        assert (sim.hit_rate, sim.loads, sim.evictions, sim.critical) == (
            stats.hit_rate, stats.loads, stats.evictions, stats.critical_loads), (slots, sim, stats)
        assert stats.evictions > 0 or slots == 12


def test_simulator_matches_the_engine_with_the_oracle_where_timing_cannot_matter(checkpoint):
    """With prefetching, which load lands first depends on the engine's thread timing. With a cache
    holding every expert, both load every expert at start (nothing is left to move), so hits, loads,
    evictions and wasted loads are pinned; with fewer slots they are not (see the docstring)."""
    model_dir = checkpoint("qwen3_moe")
    cache, prefetch = CacheConfig(num_slots=24), PrefetchConfig(predictor="oracle", lookahead=2)
    stats, workload, chunks, expert_bytes = _engine_run(model_dir, cache, prefetch)
    sim = simulate(workload, SimConfig(cache, prefetch, prefill_tokens=len(PROMPT)), test_cost(expert_bytes), chunks)
    assert (sim.hit_rate, sim.loads, sim.evictions, sim.wasted) == (
        stats.hit_rate, stats.loads, stats.evictions, stats.wasted_loads) == (1.0, 0, 0, 0)


def _random_workload(seed: int, tokens: int = 30, layers: int = 3, experts: int = 8, top_k: int = 2) -> Workload:
    spec = SyntheticSpec(tokens=tokens, skew=seed % 3 * 0.6, reuse=0.3, corr=0.3, seed=seed)
    return synthetic(spec, layers, experts, top_k)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), slots=st.integers(2, 20), prefill=st.integers(0, 6))
def test_belady_never_misses_more_than_any_policy(seed, slots, prefill):
    workload = _random_workload(seed)
    cost = test_cost()
    results = {policy: simulate(workload, SimConfig(CacheConfig(num_slots=slots, policy=policy),
                                                    prefill_tokens=prefill), cost)
               for policy in ("belady", "lru", "lfu", "lfru", "slru")}
    misses = {policy: r.critical for policy, r in results.items()}  # reactive: every miss is one critical load
    assert all(misses["belady"] <= m for m in misses.values()), misses


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), slots=st.integers(2, 24), policy=st.sampled_from(["lru", "slru", "belady"]),
       predictor=st.sampled_from(["none", "oracle", "history", "oracle@0.5"]), lookahead=st.integers(1, 3),
       gbps=st.sampled_from([0.01, 0.05, 1.0]))
def test_oracle_bound_is_never_below_a_simulated_configuration(seed, slots, policy, predictor, lookahead, gbps):
    workload = _random_workload(seed)
    recall = 0.5 if predictor == "oracle@0.5" else None
    cfg = SimConfig(CacheConfig(num_slots=slots, policy=policy),
                    PrefetchConfig(predictor="oracle" if recall else predictor, lookahead=lookahead),
                    prefill_tokens=4, oracle_recall=recall)
    cost = CostModel(**{**test_cost().to_json(), "link_gbps": gbps})
    r = simulate(workload, cfg, cost)
    assert r.tok_s <= r.oracle_bound_tok_s * (1 + 1e-9)
    assert r.oracle_bound_tok_s <= min(r.compute_floor_tok_s, r.link_floor_tok_s) * (1 + 1e-9)
    assert 0 < r.efficiency <= 1 + 1e-9


def test_the_simulated_predictor_rests_as_the_runtime_does(monkeypatch):
    """rest.Rest, shared with the runtime: after REST_AFTER quiet decode steps (every routed expert
    resident, no prefetch used) the history predictor is not called; a miss wakes it from the next layer."""
    from activemoe.predictors import HistoryPredictor
    from activemoe.rest import REST_AFTER

    calls: list[int] = []  # the token of each predictor call
    predict = HistoryPredictor.predict
    monkeypatch.setattr(HistoryPredictor, "predict", lambda self, event, *a: calls.append(event // 3) or predict(
        self, event, *a))
    loop, switched = [[[i, i + 1] for i in range(3)]] * 25, [[[i + 4, i + 5] for i in range(3)]] * 15
    workload = Workload((0, 1, 2), 8, 2, np.array(loop + switched), "scripted")  # [40, 3, 2]
    r = simulate(workload, SimConfig(CacheConfig(num_slots=12), PrefetchConfig(predictor="history", lookahead=1),
                                     prefill_tokens=1), test_cost())
    per_token = [calls.count(t) for t in range(40)]
    assert per_token[1:1 + REST_AFTER] == [3] * REST_AFTER  # awake through the quiet steps it counts
    assert per_token[1 + REST_AFTER:25] == [0] * (24 - REST_AFTER)  # then resting: the loop's experts stay
    assert per_token[25] == 2  # the switch misses at the first layer: predicting again from the second
    assert per_token[-1] == 0 and 0 < r.predictor_rested < 1  # and resting once the new experts stay


def test_belady_loads_is_the_minimum_on_a_scripted_sequence():
    from activemoe.workload import Event

    events = [Event(0, (e,), (1,), 1) for e in [0, 1, 2, 0, 1, 3, 0, 1, 2]]
    # warm start 0, 1 free; then 2 (evicts 1, used later than 0), 1 (evicts 2), 3 (evicts 1), 1, 2
    assert belady_loads(events, 2) == 5
    assert belady_loads(events, 4) == 0  # four slots: the warm start holds all four experts


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 11), st.booleans(), st.booleans()), min_size=1, max_size=80),
       slots=st.integers(1, 6), base=st.sampled_from([LRU, LFU, SLRU]))
def test_indexed_victim_search_equals_the_scan(ops, slots, base):
    """The lazy heap picks exactly the slot the O(S) scan picks, pins, loading and protection included."""
    scan_policy = type("Scan", (base,), {"indexed": False})
    caches = [ExpertCache(slots, base()), ExpertCache(slots, scan_policy())]
    assert caches[0]._heap is not None and caches[1]._heap is None
    pinned: list[int] = []
    for expert, speculative, hold in ops:
        outcomes = []
        for cache in caches:
            eid = ExpertId(0, expert)
            slot = cache.lookup(eid)
            try:
                if slot is None:
                    slot, evicted = cache.allocate(eid, speculative=speculative, protected=frozenset({ExpertId(0, 0)}))
                    cache.mark_ready(slot)
                    cache.unpin(slot)
                else:
                    evicted = None
                cache.touch(slot)
                if hold:
                    cache.pin(slot)
                outcomes.append((slot, evicted))
            except NoEvictableSlot:
                outcomes.append("full")
        assert outcomes[0] == outcomes[1]
        if hold and outcomes[0] != "full":
            pinned.append(outcomes[0][0])
        if len(pinned) > slots // 2:
            released = pinned.pop(0)
            for cache in caches:
                cache.unpin(released)


def test_presets_have_sources_and_sane_figures():
    assert set(HARDWARE) == {"rtx3090", "rtx4090", "rtx4060-laptop", "a100-pcie", "h100-pcie", "jetson-agx-orin"}
    for hw in HARDWARE.values():
        assert hw.source and 0 < hw.link_gbps < hw.memory_gbps and hw.tflops > 0
    qwen = shape_preset("qwen3-30b-a3b")
    assert (qwen.moe_layers, qwen.num_experts, qwen.top_k) == (48, 128, 8)
    assert qwen.expert_bytes("bfloat16") == 3 * 2048 * 768 * 2
    for shape in SHAPES.values():
        cost = from_preset(hardware_preset("rtx4090"), shape)
        assert shape.source and cost.transfer_s(cost.expert_bytes) > 0 and "rtx4090" in cost.describe()


def test_synthetic_parameters_shape_the_trace():
    flat = synthetic(SyntheticSpec(tokens=400, skew=0.0, reuse=0.0, corr=0.0, seed=1), 2, 16, 2)
    skewed = synthetic(SyntheticSpec(tokens=400, skew=2.0, reuse=0.0, corr=0.0, seed=1), 2, 16, 2)
    sticky = synthetic(SyntheticSpec(tokens=400, skew=0.0, reuse=0.9, corr=0.0, seed=1), 2, 16, 2)
    assert flat.experts.shape == (400, 2, 2) and flat.label.startswith("synthetic:")
    top_share = lambda w: np.bincount(w.experts[:, 0].ravel(), minlength=16).max() / w.experts[:, 0].size  # noqa: E731
    assert top_share(skewed) > 2 * top_share(flat)
    repeat = lambda w: np.mean([len(set(a) & set(b)) for a, b in zip(w.experts[1:, 0], w.experts[:-1, 0])])  # noqa: E731
    assert repeat(sticky) > 3 * repeat(flat)
    for w in (flat, skewed, sticky):  # routed ids are distinct within a token's layer
        assert (np.sort(w.experts, -1)[..., 1:] != np.sort(w.experts, -1)[..., :-1]).all()


# -- the command line -------------------------------------------------------------------------------
def test_simulate_cli_table_and_json(capsys, tmp_path):
    plot = tmp_path / "sweep.png"
    rc, out, err = run(capsys, "simulate", "--synthetic", "tokens=40", "--shape", "olmoe-1b-7b", "--hardware",
                       "rtx4090", "--sweep", "cache,policy", "--cache", "10%,25%", "--policy", "lru,belady",
                       "--plot", str(plot))
    assert rc == 0, err
    lines = out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["simulated"] and result["cost_model"]["name"] == "rtx4090/olmoe-1b-7b/bfloat16"
    assert len(result["rows"]) == 4 and plot.is_file()
    assert any("simulated" in line for line in lines) and any("link 25.2 GB/s" in line for line in lines)
    for row in result["rows"]:
        assert row["tok_s"] <= row["oracle_bound_tok_s"] * (1 + 1e-9)
        assert not math.isnan(row["efficiency"])


def test_simulate_cli_recorded_trace(capsys, checkpoint, tmp_path):
    model_dir = checkpoint("qwen3_moe")
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    trace = tmp_path / "t.safetensors"
    with activemoe.load(model_dir, EngineConfig.tiny(num_slots=24)) as eng:
        eng.record_trace([PROMPT * 3], keep_hidden=False).save(trace)
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"device": "cpu", "host": "test", "dtype": "float32", "expert_bytes": 6144,
                                   "host_copy_gbps": 10.0, "expert_host_ms": {"1": 0.05, "8": 0.06, "64": 0.2},
                                   "decode_layer_ms": 0.3}))
    rc, out, err = run(capsys, "simulate", "--trace", str(trace), "--profile", str(profile), "--link-gbps", "0.05",
                       "--cache", "6", "--json")
    assert rc == 0, err
    row = json.loads(out)["rows"][0]
    assert row["tokens"] == 21 and row["loads"] > 0
    assert_user_error(capsys, ["simulate", "--trace", str(trace), "--shape", "qwen3-30b-a3b", "--hardware", "rtx4090"],
                      "does not match shape qwen3-30b-a3b")


def test_simulate_cli_bad_input(capsys, tmp_path):
    base = ["simulate", "--synthetic", "tokens=5"]
    assert_user_error(capsys, [*base, "--shape", "olmoe-1b-7b", "--hardware", "rtx5090"],
                      "unknown hardware preset 'rtx5090'", "rtx4090", "jetson-agx-orin")
    assert_user_error(capsys, [*base, "--shape", "grok", "--hardware", "rtx4090"], "unknown model shape 'grok'",
                      "qwen3-30b-a3b")
    assert_user_error(capsys, [*base, "--shape", "olmoe-1b-7b", "--hardware", "rtx4090", "--cache", "7"],
                      "the minimum is 8")
    assert_user_error(capsys, [*base, "--shape", "olmoe-1b-7b", "--hardware", "rtx4090", "--cache", "0.1%"],
                      "the minimum is 8")
    assert_user_error(capsys, [*base, "--shape", "olmoe-1b-7b"], "--hardware NAME (with --shape) or --profile FILE")
    assert_user_error(capsys, [*base, "--hardware", "rtx4090"], "--synthetic needs --shape")
    assert_user_error(capsys, ["simulate", "--synthetic", "tokens=x", "--shape", "olmoe-1b-7b", "--hardware",
                               "rtx4090"], "bad --synthetic value")
    assert_user_error(capsys, [*base, "--shape", "olmoe-1b-7b", "--hardware", "rtx4090", "--predictor", "pregate"],
                      "needs hidden states")
    assert_user_error(capsys, ["simulate", "--trace", str(tmp_path / "none.safetensors"), "--shape", "olmoe-1b-7b",
                               "--hardware", "rtx4090"], "does not exist")


def test_the_simulated_learned_predictor_names_what_predict_eval_scores(checkpoint, monkeypatch):
    """The simulator hands the learned heads the trace's hidden states as the runtime would hand them its
    own (token embeddings first, then each MoE layer's input): its live recall at every lookahead equals
    predict-eval's teacher-forced recall on the same trace, with the same heads."""
    from activemoe.evaluation import evaluate
    from activemoe.learned import LearnedPredictor, train_heads
    from activemoe.rest import Rest

    monkeypatch.setattr("activemoe.simulate.Rest", lambda: Rest(after=None))  # predict-eval never rests
    with activemoe.load(checkpoint("qwen3_moe"), EngineConfig.tiny(num_slots=24)) as eng:
        trace = eng.record_trace([PROMPT * 4, PROMPT[::-1] * 3], keep_hidden=True)
    heads = train_heads(trace, lookahead=2, epochs=3, lr=1e-2)
    workload = from_trace(trace, "recorded in test")
    layers = list(workload.layers)
    sim = simulate(workload, SimConfig(CacheConfig(num_slots=6), PrefetchConfig(predictor="learned", lookahead=2)),
                   test_cost(), learned=LearnedPredictor(heads, layers, 2))
    score = evaluate(trace, LearnedPredictor(heads, layers, 2), budget=workload.top_k)
    assert set(sim.recall) == {"1", "2"}
    for k in (1, 2):
        assert sim.recall[str(k)] == pytest.approx(score.recall(k), abs=1e-12), k
    assert sim.speculative > 0


def test_a_recorded_generation_is_the_workload_the_engine_ran(checkpoint):
    """`trace record --new-tokens N` records a prompt and its greedy continuation's decode steps; simulated
    with --prefill = the prompt's length, reactive LRU hits, loads and evicts exactly as the engine did when
    it generated from that prompt (bench's workload, replayed)."""
    model_dir = checkpoint("qwen3_moe")
    progress = []
    with activemoe.load(model_dir, EngineConfig.tiny(num_slots=24)) as eng:
        trace = eng.record_trace([PROMPT], keep_hidden=True, new_tokens=9,
                                 on_progress=lambda done, total: progress.append((done, total)))
    workload = from_trace(trace, "recorded in test")
    assert progress == [(1, 1)]
    assert workload.num_tokens == len(PROMPT) + 8 and workload.hidden.shape[:2] == (15, len(workload.layers))
    cache = CacheConfig(num_slots=5, policy="lru")
    with activemoe.load(model_dir, EngineConfig(cache=cache, link=LinkConfig(link_gbps=LINK_GBPS))) as eng:
        eng.generate(PROMPT, max_new_tokens=2, sampling=GREEDY)  # warm-up
        eng.reset_cache()
        stats = eng.generate(PROMPT, max_new_tokens=9, sampling=GREEDY).stats
        chunks = [c.nbytes for c in eng.runtime.loader.slab.chunks]
        expert_bytes = eng.runtime.loader.slab.expert_bytes
    sim = simulate(workload, SimConfig(cache, prefill_tokens=len(PROMPT)), test_cost(expert_bytes), chunks)
    assert (sim.hit_rate, sim.decode_hit_rate, sim.loads, sim.evictions) == (
        stats.hit_rate, stats.decode_hit_rate, stats.loads, stats.evictions)
    assert sim.tokens == 8 and stats.evictions > 0


def test_simulate_cli_learned(capsys, checkpoint, tmp_path):
    from activemoe.learned import save_heads, train_heads

    with activemoe.load(checkpoint("qwen3_moe"), EngineConfig.tiny(num_slots=24)) as eng:
        hidden = eng.record_trace([PROMPT * 3], keep_hidden=True)
        bare = eng.record_trace([PROMPT * 3], keep_hidden=False)
    paths = {name: tmp_path / f"{name}.safetensors" for name in ("hidden", "bare", "heads")}
    hidden.save(paths["hidden"])
    bare.save(paths["bare"])
    save_heads(paths["heads"], train_heads(hidden, lookahead=2, epochs=2), {**hidden.meta, "lookahead": "2"})
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"device": "cpu", "host": "test", "dtype": "float32", "expert_bytes": 6144,
                                   "host_copy_gbps": 10.0, "expert_host_ms": {"1": 0.05, "8": 0.06, "64": 0.2},
                                   "decode_layer_ms": 0.3}))
    base = ["simulate", "--profile", str(profile), "--link-gbps", "0.05", "--cache", "6", "--predictor", "learned",
            "--lookahead", "1,2"]
    rc, out, err = run(capsys, *base, "--trace", str(paths["hidden"]), "--predictor-file", str(paths["heads"]),
                       "--predict-us", "50")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert "predictor 50 us per call" in lines[1]
    rows = json.loads(lines[-1])["rows"]
    assert [r["config"] for r in rows] == ["6 slots lru learned L1", "6 slots lru learned L2"]
    assert all(r["recall"]["1"] > 0 and r["speculative"] > 0 for r in rows)
    rc, out, err = run(capsys, *base, "--trace", str(paths["hidden"]), "--predictor-file", str(paths["heads"]),
                       "--predict-us", "50", "--no-first-layer-reserve", "--json")
    assert rc == 0, err
    unreserved = json.loads(out)["rows"]  # the first layer's experts no longer held back: other victims
    assert [r["evictions"] for r in unreserved] != [r["evictions"] for r in rows], (unreserved, rows)
    assert_user_error(capsys, [*base, "--trace", str(paths["bare"]), "--predictor-file", str(paths["heads"])],
                      "recorded with --hidden")
    assert_user_error(capsys, [*base, "--trace", str(paths["hidden"])], "needs --predictor-file")
    assert_user_error(capsys, [*base, "--trace", str(paths["hidden"]), "--predictor-file", str(paths["bare"])],
                      "not an ActiveMoE predictor file")
    assert_user_error(capsys, [*base, "--trace", str(paths["hidden"]), "--predictor-file", str(paths["heads"]),
                               "--predict-us", "-1"], "--predict-us must not be negative")


def test_plan_prints_the_simulated_tokens_per_second(capsys, checkpoint):
    model_dir = str(checkpoint("qwen3_moe"))
    rc, out, err = run(capsys, "plan", "--model", model_dir, "--gpu-memory", "2.4MiB", "--device", "cpu",
                       "--dtype", "float32", "--hardware", "rtx4090", "--synthetic", "tokens=20")
    assert rc == 0, err
    estimate = json.loads(out.strip().splitlines()[-1])["estimate"]
    assert estimate["simulated"] and 0 < estimate["reactive_lru_tok_s"] <= estimate["oracle_bound_tok_s"]
    assert "expected decode (SIMULATED" in out and "rtx4090" in out
    rc, out, _ = run(capsys, "plan", "--model", model_dir, "--gpu-memory", "2.4MiB", "--device", "cpu")
    assert rc == 0 and "estimate" not in json.loads(out.strip().splitlines()[-1])
    assert_user_error(capsys, ["plan", "--model", model_dir, "--gpu-memory", "2.4MiB", "--device", "cpu",
                               "--hardware", "tpu"], "unknown hardware preset 'tpu'", "rtx3090")


def test_profile_load_overhead_becomes_the_per_transfer_latency(tmp_path):
    from activemoe.costmodel import from_profile

    profile = {"device": "cpu", "host": "test", "dtype": "float32", "expert_bytes": 6144, "host_copy_gbps": 10.0,
               "expert_host_ms": {"1": 0.05, "8": 0.06, "64": 0.2}, "decode_layer_ms": 0.3}
    (tmp_path / "old.json").write_text(json.dumps(profile))  # written before the field existed
    (tmp_path / "new.json").write_text(json.dumps({**profile, "load_overhead_ms": 0.25}))
    assert from_profile(tmp_path / "old.json", link_gbps=1.0).link_latency_s == 0.0
    assert abs(from_profile(tmp_path / "new.json", link_gbps=1.0).link_latency_s - 0.25e-3) < 1e-12
