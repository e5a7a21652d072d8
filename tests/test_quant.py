"""Compressed expert tiers (approximate, opt-in): codec error bounds and layout, the cache file (stale,
corrupt, rebuilt), generation through compressed slots, bytes moved, the int4 late-miss substitute."""
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import activemoe
from activemoe import quant
from activemoe.compressed import CompressedStore
from activemoe.config import CacheConfig, EngineConfig, LinkConfig
from activemoe.errors import UserError
from activemoe.slots import CompressedSlab
from activemoe.store import Mxfp4
from activemoe.tiny import build_tiny_checkpoint, mxfp4_experts
from tests.test_cli import assert_user_error, gen

PROMPT = torch.tensor([[5, 17, 33, 8, 60, 41, 3]])


def _weights(rows=48, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, rows)[:, None]  # rows of very different scale
    w[3] = 0.0  # an all-zero row must not divide by zero
    return w


def test_int8_round_trip_error_is_half_a_step_per_row():
    w = _weights()
    parts = quant.Int8().encode(w)
    assert parts["q"].dtype == torch.int8 and parts["q"].shape == w.shape and parts["scale"].shape == (48, 1)
    err = (quant.Int8().decode(parts) - w).abs()
    step = w.abs().amax(1, keepdim=True) / 127
    assert (err <= 0.5 * step * (1 + 2e-3) + 1e-7).all()  # round to nearest; fp16 scale rounding (2^-11)
    assert err[3].max() == 0


def test_int4_round_trip_error_is_half_a_step_per_group():
    w = _weights()
    parts = quant.Int4().encode(w)
    assert parts["q"].dtype == torch.uint8 and parts["q"].shape == (48, 64)  # two per byte
    assert parts["scale"].shape == parts["min"].shape == (48, 128 // quant.GROUP_SIZE)
    err = (quant.Int4().decode(parts) - w).abs().reshape(48, -1, quant.GROUP_SIZE)
    wg = w.reshape(48, -1, quant.GROUP_SIZE)
    step = (wg.amax(-1) - wg.amin(-1)) / 15
    slack = 2e-3 * wg.abs().amax(-1)  # fp16 scale and min
    assert (err.amax(-1) <= 0.5 * step + slack + 1e-7).all()


def test_int4_packing_layout():
    w = torch.tensor([[0.0, 15, 1, 14, 7, 8, 2, 3]])  # min 0, max 15: q equals w
    parts = quant.Int4().encode(w)
    assert quant.group_size(8) == 8
    assert parts["q"].tolist() == [[0 | 15 << 4, 1 | 14 << 4, 7 | 8 << 4, 2 | 3 << 4]]  # even column in the low nibble
    assert torch.equal(quant.Int4().decode(parts), w)


def test_mxfp4_decodes_as_transformers_does_row_range_by_row_range():
    """The checkpoint's MXFP4 codes and exponents (every exponent, every code) decode to exactly the values
    of transformers' dequantiser, and any row range decodes to those rows (the slab decodes chunk by chunk)."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (40, 3, 16), generator=g, dtype=torch.uint8)  # [R, G, 16]
    scales = torch.linspace(0, 254, 120).round().to(torch.uint8).reshape(40, 3)  # [R, G]: 2**-127 to 2**127
    full = convert_moe_packed_tensors(blocks[None], scales[None], dtype=torch.float32)[0].T  # [R, G*32]
    decoded = Mxfp4().decode({"blocks": blocks, "scales": scales})
    assert decoded.shape == (40, 96) and torch.equal(decoded, full)
    assert torch.isinf(decoded).any() and (decoded != 0).any()  # the extreme exponents are in the test
    assert torch.equal(Mxfp4().decode({"blocks": blocks[7:19], "scales": scales[7:19]}), full[7:19])


def test_group_size_falls_back_to_a_divisor():
    assert [quant.group_size(c) for c in (128, 192, 96, 48, 16)] == [64, 64, 32, 16, 16]


# -- the cache file ----------------------------------------------------------------------------
@pytest.fixture
def model_dir(tmp_path):
    return build_tiny_checkpoint("qwen3_moe", tmp_path / "m")


def _load(model_dir, precision="int8", **config):
    return activemoe.load(model_dir, EngineConfig(cache=CacheConfig(num_slots=4), precision=precision, **config))


def test_cache_is_built_once_and_reused(model_dir, monkeypatch):
    with _load(model_dir) as eng:
        first = {k: t.clone() for k, t in eng.runtime.store.tensors.items()}
    assert (model_dir / "activemoe-int8.safetensors").is_file()
    assert not [p for p in os.listdir(model_dir) if p.endswith(".tmp")]
    monkeypatch.setattr(quant, "_quantise", lambda *a: pytest.fail("the cache was rebuilt"))
    with _load(model_dir) as eng:
        assert all(torch.equal(first[k], t) for k, t in eng.runtime.store.tensors.items())


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_cache_is_rebuilt(model_dir, caplog, damage):
    _load(model_dir, "int4").close()
    path = model_dir / "activemoe-int4.safetensors"
    good, tensors = path.read_bytes(), {k: t.clone() for k, t in load_file(path).items()}
    if damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "flip":
        path.write_bytes(good[:-100] + bytes(b ^ 0xFF for b in good[-100:]))
    else:
        path.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="activemoe.quant"):
        _load(model_dir, "int4").close()
    assert "rebuilding" in caplog.text and ("unreadable" in caplog.text or "corrupt" in caplog.text)
    rebuilt = load_file(path)  # equal to the one built first (the header's key order may differ)
    assert rebuilt.keys() == tensors.keys() and all(torch.equal(rebuilt[k], t) for k, t in tensors.items())


def test_stale_cache_is_rebuilt_when_the_model_changes(model_dir, tmp_path, caplog):
    with _load(model_dir) as eng:
        before = eng.runtime.store.tensors["down_proj.q"].clone()
    other = build_tiny_checkpoint("qwen3_moe", tmp_path / "other", seed=1)  # same shapes, other weights
    shutil.copy(other / "model.safetensors", model_dir / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="activemoe.quant"), _load(model_dir) as eng:
        after = eng.runtime.store.tensors["down_proj.q"]
    assert "stale" in caplog.text
    assert not torch.equal(before, after)


def test_cache_dir_option_keeps_the_model_dir_untouched(model_dir, tmp_path):
    cache = tmp_path / "qcache"
    cache.mkdir()
    _load(model_dir, quant_cache_dir=str(cache)).close()
    assert (cache / "activemoe-int8.safetensors").is_file()
    assert not (model_dir / "activemoe-int8.safetensors").exists()


def test_read_only_model_dir_asks_for_a_cache_dir(model_dir, monkeypatch):
    monkeypatch.setattr(quant.os, "access", lambda path, mode: False)  # as root, chmod would not stop us
    with pytest.raises(UserError, match="--quant-cache"):
        _load(model_dir)


def test_unknown_precision_names_are_clear_errors(capsys, checkpoint):
    model_dir = checkpoint("qwen3_moe")
    assert_user_error(capsys, gen(model_dir, "--precision", "int3"), "unknown precision 'int3'", "native, mxfp4, int8, int4")
    assert_user_error(capsys, gen(model_dir, "--precision", "mxfp4"), "does not store its experts in MXFP4")
    assert_user_error(capsys, gen(model_dir, "--late-miss", "fp8"), "unknown --late-miss 'fp8'")
    assert_user_error(capsys, gen(model_dir, "--precision", "int4", "--late-miss", "int4"), "int4 already")
    assert_user_error(capsys, ["perplexity", "--model", str(model_dir), "--prompts", "x", "--precision", "INT8"],
                      "unknown precision")
    with pytest.raises(UserError, match="--store ram"):
        activemoe.load(model_dir, EngineConfig(precision="int8", store="disk"))


# -- the slab and generation -------------------------------------------------------------------
def test_compressed_slab_chunks_dequantise_into_the_slot(model_dir):
    with _load(model_dir, "int4") as eng:
        store = eng.runtime.store
        slab = CompressedSlab(2, store.spec.shapes, torch.float32, torch.device("cpu"), store.part_shapes(),
                              store.layout.decode_into, chunk_bytes=100)  # several chunks per tensor
        assert len(slab.chunks) > len(store.spec.shapes)
        assert slab.expert_bytes == store.expert_bytes
        expert = store.read(store.experts()[5])
        for i in range(len(slab.chunks)):
            slab.copy_chunk(1, expert, i)
        for name, buf in slab.buffers.items():
            assert torch.equal(buf[1], expert[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compressed_slab_dequantises_on_the_cuda_copy_stream(model_dir):
    with _load(model_dir, "int8") as eng:
        store = eng.runtime.store
        slab = CompressedSlab(2, store.spec.shapes, torch.float32, torch.device("cuda"), store.part_shapes(),
                              store.layout.decode_into, chunk_bytes=256)
        expert = store.read(store.experts()[3])
        for i in range(len(slab.chunks)):
            slab.copy_chunk(0, expert, i)
        weights = slab.acquire(0)
        for name, w in weights.items():
            torch.testing.assert_close(w.cpu(), expert[name], rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mxfp4_host_tier_dequantises_on_the_cuda_copy_stream(tmp_path):
    model_dir = mxfp4_experts(build_tiny_checkpoint("gpt_oss", tmp_path, dtype=torch.bfloat16, expert_width=32))
    with activemoe.load(model_dir, EngineConfig(device="cuda", cache=CacheConfig(num_slots=4), precision="mxfp4")) as eng:
        store = eng.runtime.store
        assert store.precision == "mxfp4"
        slab = CompressedSlab(2, store.spec.shapes, torch.bfloat16, torch.device("cuda"), store.part_shapes(),
                              store.layout.decode_into, chunk_bytes=256)
        expert = store.read(store.experts()[3])
        for i in range(len(slab.chunks)):
            slab.copy_chunk(0, expert, i)
        for name, w in slab.acquire(0).items():
            assert torch.equal(w.cpu(), expert[name])


def _teacher_forced_logits(model_dir, sequence=None, **config):
    """Logits of one forward over `sequence` (default: the greedy continuation of PROMPT), so precisions
    are compared on the same context rather than after generations diverge."""
    with activemoe.load(model_dir, EngineConfig(cache=CacheConfig(num_slots=4), **config)) as eng, \
            torch.inference_mode():
        if sequence is None:
            sequence = eng.model.generate(PROMPT, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
        return sequence, eng.model(sequence).logits[0]  # [L, V]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])  # gpt_oss: transposed layout and biases
def test_compressed_generation_stays_close(family, checkpoint, tmp_path):
    model_dir = tmp_path / family
    shutil.copytree(checkpoint(family), model_dir)
    sequence, ref = _teacher_forced_logits(model_dir)
    # Round-to-nearest moves a Gaussian weight by step/sqrt(12) on average: about 0.5% of its norm with
    # int8 (step = row max / 127) and 6-8% with int4 (step = group range / 15), as measured on these
    # experts. Logits through a few such layers err by the same order, so the bounds are about 3x that;
    # a random tiny model has near-tie argmaxes and routers, so greedy tokens are compared as the share of
    # positions whose argmax agrees (all with int8 on these models, 0.87 measured with int4).
    for precision, rel_bound, agree_bound in (("int8", 0.02, 1.0), ("int4", 0.2, 0.75)):
        _, out = _teacher_forced_logits(model_dir, sequence, precision=precision)
        rel = ((out - ref).norm() / ref.norm()).item()
        agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
        assert rel <= rel_bound and agree >= agree_bound, (precision, rel, agree)


def test_bytes_moved_is_the_compressed_size(checkpoint, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(checkpoint("qwen3_moe"), model_dir)
    expected = {  # per expert: int8 = a byte per weight + an fp16 scale per row; int4 = half a byte per weight
        # + an fp16 scale and min per group (fp32: 4 bytes per weight)
        "int8": lambda r, c: r * c + 2 * r, "int4": lambda r, c: r * c // 2 + 4 * r * (c // quant.group_size(c))}
    for precision, size in expected.items():
        with _load(model_dir, precision) as eng:
            expert_bytes = eng.runtime.store.expert_bytes
            native_bytes = 4 * sum(r * c for r, c in eng.runtime.store.spec.shapes.values())
            assert expert_bytes == sum(size(r, c) for r, c in eng.runtime.store.spec.shapes.values())
            assert expert_bytes < native_bytes * (0.3 if precision == "int8" else 0.2)
            out = eng.generate([5, 6, 7, 8], max_new_tokens=6)
            assert out.stats.loads > 0 and out.stats.bytes_moved == out.stats.loads * expert_bytes


def test_late_miss_int4_serves_late_misses(checkpoint, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(checkpoint("qwen3_moe"), model_dir)
    # A slow emulated link: a full fp32 expert (6 KiB) takes 0.6 ms, its int4 copy ~0.1 ms, so a cold
    # critical miss is late and is computed from its int4 copy.
    config = EngineConfig(cache=CacheConfig(num_slots=2), late_miss="int4", link=LinkConfig(link_gbps=0.01))
    with activemoe.load(model_dir, config) as eng:
        int4_bytes = eng.runtime.late_miss.store.expert_bytes
        out = eng.generate([5, 6, 7, 8], max_new_tokens=6)
        assert out.stats.late_miss_int4 > 0
        full = eng.runtime.loader.slab.expert_bytes
        assert out.stats.bytes_moved >= out.stats.late_miss_int4 * int4_bytes
        assert out.stats.bytes_moved <= out.stats.late_miss_int4 * int4_bytes + out.stats.loads * full
        assert eng.runtime.late_miss.late(eng.runtime.late_miss.transfer_s * 1.01)
        assert not eng.runtime.late_miss.late(eng.runtime.late_miss.transfer_s * 0.99)
    with activemoe.load(model_dir, EngineConfig(cache=CacheConfig(num_slots=2), late_miss="int4")) as eng:
        assert eng.generate([5, 6, 7, 8], max_new_tokens=6).stats.late_miss_int4 == 0  # unpaced: never late


def test_compressed_store_serves_host_compute(checkpoint, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(checkpoint("qwen3_moe"), model_dir)
    sequence, base = _teacher_forced_logits(model_dir, precision="int8")
    _, host = _teacher_forced_logits(model_dir, sequence, precision="int8", experts_on="host")
    torch.testing.assert_close(host, base, rtol=0, atol=1e-5)  # same dequantised weights, computed on the host
    # --experts-on auto profiles host compute on a compressed expert
    with activemoe.load(model_dir, EngineConfig(precision="int8", experts_on="auto")) as eng:
        assert isinstance(eng.runtime.store, CompressedStore) and eng.runtime.miss_cost.host_s(1) > 0


def test_generate_cli_reports_the_approximate_mode(capsys, checkpoint, tmp_path):
    import json

    from activemoe.cli import main

    argv = gen(checkpoint("qwen3_moe"), "--json", "--greedy", "--precision", "int4", "--quant-cache", str(tmp_path))
    assert main(argv) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["precision"] == "int4 (approximate)" and stats["late_miss_int4"] == 0 and stats["bytes_moved"] > 0
    assert (tmp_path / "activemoe-int4.safetensors").is_file()


def test_sharded_checkpoint_is_fingerprinted_over_all_shards(tmp_path, caplog):
    model_dir = build_tiny_checkpoint("mixtral", tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(p.name for p in model_dir.glob("model-*.safetensors"))
    assert len(shards) > 1
    with _load(model_dir, "int8") as eng:
        assert eng.generate([5, 6, 7], max_new_tokens=3).stats.bytes_moved > 0
    other = build_tiny_checkpoint("mixtral", tmp_path / "other", seed=1, max_shard_size="40KB")
    shutil.copy(other / shards[-1], model_dir / shards[-1])  # only the last shard changes
    with caplog.at_level(logging.WARNING, logger="activemoe.quant"):
        _load(model_dir, "int8").close()
    assert "stale" in caplog.text
