"""The runtime: a failing expert read is a clear error and leaves it usable; long decodes; the compute dtype."""
import threading
from dataclasses import replace

import pytest
import torch

import activemoe
from activemoe.cache_meta import SlotState
from activemoe.config import EngineConfig, SamplingConfig
from activemoe.errors import ExpertLoadError
from activemoe.ids import ExpertId


@pytest.mark.parametrize("grouped_hits", [False, True])  # with grouped hits a failure may surface in take_landed
def test_failed_expert_read_is_reported_and_recoverable(checkpoint, monkeypatch, grouped_hits):
    eng = activemoe.load(checkpoint("qwen3_moe"), replace(EngineConfig.tiny(num_slots=3), grouped_hits=grouped_hits))
    store = eng.runtime.store
    real_read = store.read
    calls = {"n": 0}

    def flaky(eid: ExpertId):
        calls["n"] += 1
        if calls["n"] == 5:
            raise ExpertLoadError(f"cannot read layer {eid.layer} expert {eid.expert}: injected I/O error")
        return real_read(eid)

    monkeypatch.setattr(store, "read", flaky)
    greedy = SamplingConfig(do_sample=False)
    with pytest.raises(ExpertLoadError, match=r"layer \d+ expert \d+: injected"):
        eng.generate([5, 6, 7], max_new_tokens=8, sampling=greedy)
    cache = eng.runtime.loader.cache
    assert all(m.state != SlotState.LOADING and m.pin_count == 0 for m in cache.meta)
    again = eng.generate([5, 6, 7], max_new_tokens=8, sampling=greedy)
    monkeypatch.setattr(store, "read", real_read)
    clean = activemoe.load(checkpoint("qwen3_moe"), EngineConfig.tiny(num_slots=3))
    assert again.token_ids == clean.generate([5, 6, 7], max_new_tokens=8, sampling=greedy).token_ids


def test_a_loader_fault_outside_a_load_is_raised_not_waited_on_forever(checkpoint, monkeypatch):
    """A device fault while the worker polls its copies (on CUDA, an event query after an illegal access)
    stops the loader; the compute path, waiting on a miss, gets the error instead of hanging."""
    eng = activemoe.load(checkpoint("qwen3_moe"), EngineConfig.tiny(num_slots=3))

    def fault(ticket):
        raise RuntimeError("injected device fault")

    monkeypatch.setattr(eng.runtime.loader.slab, "landed", fault)
    outcome = []

    def generate():
        try:
            eng.generate([5, 6, 7], max_new_tokens=8, sampling=SamplingConfig(do_sample=False))
        except RuntimeError as e:
            outcome.append(e)

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the compute path hung on a stopped loader"
    assert "injected device fault" in str(outcome[0]) and isinstance(outcome[0].__cause__, RuntimeError)


def test_long_decode_with_smallest_cache(checkpoint):
    eng = activemoe.load(checkpoint("olmoe"), EngineConfig.tiny(num_slots=2))
    out = eng.generate([5, 6, 7], max_new_tokens=200, sampling=SamplingConfig(do_sample=False))
    cache = eng.runtime.loader.cache
    assert len(out.token_ids) >= 1 and all(m.pin_count == 0 for m in cache.meta)
    assert len(cache.resident()) == 2


@pytest.mark.parametrize("asked, expected", [("auto", torch.bfloat16), ("float32", torch.float32)])
def test_dtype_auto_keeps_the_checkpoints_dtype(checkpoint, asked, expected):
    """A bf16 checkpoint stays bf16 by default (not doubled in host RAM, slots and link bytes)."""
    model_dir = checkpoint("qwen3_moe", dtype=torch.bfloat16)
    with activemoe.load(model_dir, EngineConfig(dtype=asked)) as eng:
        assert eng.runtime.store.dtype == expected and eng.model.dtype == expected
        assert eng.runtime.loader.slab.buffers["down_proj"].dtype == expected
