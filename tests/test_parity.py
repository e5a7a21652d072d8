"""The test that matters most: offloaded generation equals plain transformers, token for token."""
import json
import logging
import math
import shutil
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import activemoe
from activemoe.cache_meta import SlotState
from activemoe.config import CacheConfig, EngineConfig
from activemoe.engine import plain_model
from activemoe.errors import UserError
from activemoe.loader import Loader
from activemoe.runtime import ExpertRuntime
from activemoe.store import CheckpointIndex
from activemoe.tiny import build_tiny_checkpoint, mxfp4_experts
from tests.conftest import FAMILIES

PROMPT = torch.tensor([[5, 17, 33, 8, 60, 41, 3]])
GEN = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True,
           pad_token_id=0)


def _reference(model_dir):
    model = plain_model(model_dir, "float32")
    return model.generate(PROMPT, **GEN)


def _assert_parity(ref, out):
    assert torch.equal(ref.sequences, out.sequences)
    assert len(ref.logits) == len(out.logits) == 16
    for a, b in zip(ref.logits, out.logits):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def _spy_routed(eng) -> set[tuple[int, int]]:
    """The (layer, expert) pairs the engine's runtime is asked for from now on, filled as it runs."""
    routed, forward = set(), eng.runtime.forward

    def spy(layer, module, hidden, top_k_index, top_k_weights):
        routed.update((layer, e) for e in top_k_index.reshape(-1).tolist())
        return forward(layer, module, hidden, top_k_index, top_k_weights)

    eng.runtime.forward = spy
    return routed


@pytest.mark.parametrize("family", FAMILIES)
def test_family_parity_across_cache_sizes(family, checkpoint):
    model_dir = checkpoint(family)
    ref = _reference(model_dir)
    top_k, total = None, None
    for fraction in ("top_k", "half", "all"):
        eng = activemoe.load(model_dir, EngineConfig.tiny(num_slots=2))  # smallest legal cache to read the sizes
        top_k, total = eng.top_k, eng.load_stats.total_experts
        slots = {"top_k": top_k, "half": total // 2, "all": total}[fraction]
        eng = activemoe.load(model_dir, EngineConfig.tiny(num_slots=slots))
        routed = _spy_routed(eng)
        out = eng.model.generate(PROMPT, **GEN)
        _assert_parity(ref, out)
        assert eng.runtime.stats.activations > 0, "the offloaded runtime was not used"
        stats = eng.runtime.loader.cache.stats
        if slots < total:  # a cache smaller than the experts the run routed to must evict (a random model that
            # loops on one token, as ERNIE's does here, may route to fewer than half of them: then it must not)
            assert (stats.evictions > 0) == (len(routed) > slots), (len(routed), slots, stats)
            assert fraction == "half" or stats.evictions > 0, "a cache of one layer's top-k should evict"
        else:
            assert stats.evictions == 0 and stats.loads <= total
        eng.close()


@pytest.mark.parametrize("grouped_hits", [False, True])
def test_a_token_routed_to_one_expert_twice_keeps_parity(grouped_hits, tmp_path):
    """DeepSeek-V4's hash-routed layers take a token's experts from a table (token id -> K experts), which may
    name one expert twice; that expert's output then counts once per k, as in transformers. The decode path
    once kept one part per expert and failed on the second."""
    model_dir = build_tiny_checkpoint("deepseek_v4", tmp_path)
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("tid2eid"))
    tensors[key][::2] = tensors[key][::2, :1]  # every even token id: its first expert twice
    save_file(tensors, path, metadata={"format": "pt"})
    ref = _reference(model_dir)
    twice = [t for t in ref.sequences[0, PROMPT.shape[1] - 1:-1].tolist() if t % 2 == 0]
    assert twice, "no decode step read a doubled entry"
    eng = activemoe.load(model_dir, replace(EngineConfig.tiny(num_slots=4), grouped_hits=grouped_hits))
    _assert_parity(ref, eng.model.generate(PROMPT, **GEN))
    eng.close()


def test_llama4_as_released_top_1_with_dense_layers_between(tmp_path):
    """Llama 4 routes one expert per token and Maverick puts dense layers between its MoE layers; the block is
    served through stand-ins of transformers' classes (activemoe/llama4.py) that take their places only while
    the model is built."""
    from transformers.models.llama4 import modeling_llama4

    from activemoe.tiny import tiny_config

    classes = modeling_llama4.Llama4TextExperts, modeling_llama4.Llama4TextMoe
    cfg = tiny_config("llama4_text", top_k=1)
    cfg.moe_layers = [0, 2]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(0.0, 20.0 / cfg.hidden_size**0.5)
    model.save_pretrained(tmp_path)
    ref = _reference(tmp_path)
    with activemoe.load(tmp_path, EngineConfig.tiny(num_slots=3)) as eng:
        assert eng.runtime.store.layers == [0, 2] and eng.top_k == 1
        _assert_parity(ref, eng.model.generate(PROMPT, **GEN))
        assert eng.runtime.stats.activations > 0 and eng.runtime.loader.cache.stats.evictions > 0
    assert (modeling_llama4.Llama4TextExperts, modeling_llama4.Llama4TextMoe) == classes


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_bfloat16_logits_are_bitwise_those_of_transformers(family, checkpoint):
    """Experts finish in the order their loads land; their outputs are summed over k as transformers sums
    them, so a bfloat16 model's logits are bit for bit equal at any cache size (summed in landing order
    they differed by up to 0.07 here; a greedy token can flip on such a difference). Top-4 routing: with two
    experts per token, bfloat16 addition is commutative and any order rounds alike. Mixtral keeps
    float32 routing weights, which promote the weighted outputs; the others do not."""
    model_dir = checkpoint(family, dtype=torch.bfloat16, top_k=4)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).generate(PROMPT, **GEN)
    for slots in (4, 12):
        eng = activemoe.load(model_dir, EngineConfig.tiny(num_slots=slots))
        out = eng.model.generate(PROMPT, **GEN)
        assert torch.equal(ref.sequences, out.sequences)
        assert all(torch.equal(a, b) for a, b in zip(ref.logits, out.logits, strict=True))
        eng.close()


def _count_grouped(monkeypatch) -> list[int]:
    """Spy on the grouped path: the number of experts of each grouped call."""
    calls, run = [], ExpertRuntime._run_grouped
    monkeypatch.setattr(ExpertRuntime, "_run_grouped", lambda self, module, ready, *rest: (
        calls.append(len(ready)), run(self, module, ready, *rest))[1])
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_hits_keep_parity(family, checkpoint, monkeypatch):
    """--grouped-hits: a decode layer's READY experts in one grouped matmul per projection over the slab, in
    each family's conventions (gate, bias, transposed weights, post-expert norm); float32 logits within 1e-5
    of transformers and the same tokens, with half the experts in slots and with all of them. Llama 4's block
    sends each (token, k) as its own row, scaled for its one expert (llama4.py): nothing to group. A family
    whose decode layers never start with two experts READY at half the slots (nemotron_h) groups only misses
    that land together, which depends on thread timing: the waits are held until a layer's misses have all
    landed, so whether the grouped path runs does not."""
    model_dir = checkpoint(family)
    ref = _reference(model_dir)
    calls = _count_grouped(monkeypatch)
    _patient_waits(monkeypatch)
    groups = not family.startswith("llama4")
    for fraction in (0.5, 1.0):
        eng = activemoe.load(model_dir, EngineConfig(cache=CacheConfig(slot_fraction=fraction), grouped_hits=True))
        before = len(calls)
        _assert_parity(ref, eng.model.generate(PROMPT, **GEN))
        assert (len(calls) > before) == groups and min(calls, default=2) >= 2, "the grouped path did not run"
        eng.close()


def _patient_waits(monkeypatch) -> list[int]:
    """Make the compute path wait until all of a layer's misses have landed before it picks one up (as a
    GPU's host does when its copies outrun its launches), unless one of them waits for a slot (a prompt
    routed to more experts than there are slots), and count the misses taken together with it."""
    taken, wait_any, take_landed = [], Loader.wait_any, Loader.take_landed

    def settled(self, pending) -> bool:  # all landed, or one waits for a slot only the layer itself can free
        slots = [self.cache.slot_of(e) for e in pending]
        return None in slots or all(self.cache.meta[slot].state == SlotState.READY for slot in slots)

    def patient(self, pending, idle=None):
        deadline = time.monotonic() + 5.0
        with self.cond:
            while time.monotonic() < deadline and not settled(self, pending):
                self.cond.wait(0.01)
        return wait_any(self, pending, idle)

    monkeypatch.setattr(Loader, "wait_any", patient)
    monkeypatch.setattr(Loader, "take_landed", lambda self, pending: (
        got := take_landed(self, pending), taken.append(len(got)))[0])
    return taken


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "gpt_oss"])
def test_grouped_hits_group_misses_that_land_together(family, checkpoint, monkeypatch):
    """--grouped-hits: misses that have landed by the time the layer picks one up run in one grouped call
    with it; parity holds, and the grouping is seen to happen (with a quarter of the experts in slots)."""
    model_dir = checkpoint(family)
    ref = _reference(model_dir)
    taken = _patient_waits(monkeypatch)
    with activemoe.load(model_dir, EngineConfig(cache=CacheConfig(slot_fraction=0.25), grouped_hits=True)) as eng:
        _assert_parity(ref, eng.model.generate(PROMPT, **GEN))
    assert max(taken, default=0) >= 1, "no misses were grouped"


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_grouped_hits_bfloat16_logits_are_bitwise_those_of_transformers(family, checkpoint, monkeypatch):
    """transformers runs experts with grouped_mm by default, so the grouped path matches it bit for bit too."""
    model_dir = checkpoint(family, dtype=torch.bfloat16, top_k=4)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).generate(PROMPT, **GEN)
    calls = _count_grouped(monkeypatch)
    for slots in (4, 12):
        eng = activemoe.load(model_dir, EngineConfig(cache=CacheConfig(num_slots=slots), grouped_hits=True))
        out = eng.model.generate(PROMPT, **GEN)
        assert torch.equal(ref.sequences, out.sequences)
        assert all(torch.equal(a, b) for a, b in zip(ref.logits, out.logits, strict=True))
        eng.close()
    assert calls


def test_gpt_oss_mxfp4_experts_as_released(tmp_path, caplog):
    """GPT-OSS as OpenAI released it, experts in MXFP4 (packed codes and exponents): the store dequantises
    each expert as it reads it, from RAM and from disk; with --precision mxfp4 the experts stay MXFP4 in RAM
    and on the link and are dequantised into their slots, also where they run on the host. Every way the
    bfloat16 logits are bit for bit those of transformers, which dequantises every expert at load."""
    model_dir = mxfp4_experts(build_tiny_checkpoint("gpt_oss", tmp_path, dtype=torch.bfloat16, expert_width=32))
    keys = CheckpointIndex(model_dir).keys
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in keys and not [k for k in keys if k.endswith("_proj")]
    ref = AutoModelForCausalLM.from_pretrained(model_dir).generate(PROMPT, **GEN)
    caplog.set_level(logging.INFO, logger="activemoe.engine")
    for store, precision, experts_on in (("ram", "native", "device"), ("disk", "native", "device"),
                                         ("ram", "mxfp4", "device"), ("ram", "mxfp4", "host")):
        eng = activemoe.load(model_dir, EngineConfig(cache=CacheConfig(num_slots=4), store=store, precision=precision,
                                                     experts_on=experts_on))
        out = eng.model.generate(PROMPT, **GEN)
        assert torch.equal(ref.sequences, out.sequences)
        assert all(torch.equal(a, b) for a, b in zip(ref.logits, out.logits, strict=True))
        store_ = eng.runtime.store
        full = sum(math.prod(s) for s in store_.spec.shapes.values()) * 2  # one expert in bfloat16
        if precision == "mxfp4":  # codes, exponents and the bfloat16 biases
            assert store_.precision == "mxfp4" and store_.expert_bytes == store_.base.packed_bytes() < full / 3
            loader = eng.runtime.loader
            assert loader.slab.expert_bytes == store_.expert_bytes
            if experts_on == "device":
                assert loader.stats.bytes_moved == loader.cache.stats.loads * store_.expert_bytes > 0
        else:
            assert store_.expert_bytes == full
        hinted = "--precision mxfp4 keeps the checkpoint's own bytes" in caplog.text  # the RAM tier in bf16 says so
        assert hinted == ((store, precision) == ("ram", "native"))
        caplog.clear()
        eng.close()


def test_precision_mxfp4_needs_mxfp4_experts(checkpoint):
    with pytest.raises(UserError, match="does not store its experts in MXFP4"):
        activemoe.load(checkpoint("qwen3_moe"), EngineConfig(cache=CacheConfig(num_slots=4), precision="mxfp4"))


def test_other_quantized_checkpoints_are_refused(checkpoint, tmp_path):
    model_dir = tmp_path / "fp8"
    shutil.copytree(checkpoint("qwen3_moe"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="quantized with fp8; ActiveMoE reads unquantized checkpoints and MXFP4"):
        activemoe.load(model_dir, EngineConfig.tiny())


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_policies_keep_parity(policy, checkpoint):
    model_dir = checkpoint("qwen3_moe")
    ref = _reference(model_dir)
    eng = activemoe.load(model_dir, EngineConfig(cache=CacheConfig(num_slots=5, policy=policy)))
    _assert_parity(ref, eng.model.generate(PROMPT, **GEN))


def test_sharded_checkpoint_parity(checkpoint):
    model_dir = checkpoint("mixtral", max_shard_size="50KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    ref = _reference(model_dir)
    eng = activemoe.load(model_dir, EngineConfig.tiny(num_slots=4))
    _assert_parity(ref, eng.model.generate(PROMPT, **GEN))


def test_experts_are_never_materialised_by_transformers(checkpoint):
    model_dir = checkpoint("qwen3_moe")
    eng = activemoe.load(model_dir, EngineConfig.tiny(num_slots=4))
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expert_keys = [k for k in ref.state_dict() if ".experts." in k]
    assert expert_keys and not [k for k in eng.model.state_dict() if ".experts." in k]
    expert_numel = sum(ref.state_dict()[k].numel() for k in expert_keys)
    resident = sum(p.numel() for p in eng.model.parameters())
    assert resident == sum(p.numel() for p in ref.parameters()) - expert_numel
    # the slab holds exactly num_slots experts
    assert eng.load_stats.slab_bytes == 4 * eng.load_stats.expert_bytes


def test_engine_generate_stats_and_streaming(checkpoint):
    eng = activemoe.load(checkpoint("olmoe"), EngineConfig.tiny(num_slots=4))
    seen = []
    out = eng.generate([5, 6, 7], max_new_tokens=6, sampling=activemoe.SamplingConfig(do_sample=False),
                       on_token=seen.append)
    assert seen == out.token_ids and 1 <= len(out.token_ids) <= 6
    s = out.stats
    assert s.loads > 0 and s.bytes_moved == s.loads * eng.load_stats.expert_bytes
    assert 0.0 <= s.hit_rate <= 1.0 and s.ttft_s > 0 and s.peak_rss_bytes > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("grouped_hits", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_parity_cuda(family, grouped_hits, checkpoint):
    model_dir = checkpoint(family)
    ref_model = plain_model(model_dir, "float32").to("cuda")
    ref = ref_model.generate(PROMPT.cuda(), **GEN)
    eng = activemoe.load(model_dir, EngineConfig(device="cuda", cache=CacheConfig(num_slots=4),
                                                 grouped_hits=grouped_hits))
    _assert_parity(ref, eng.model.generate(PROMPT.cuda(), **GEN))
