"""The memory planner: what fits is what is planned; a run under the budget stays under it."""
import json

import pytest
import torch

import activemoe
from activemoe.cli import main
from activemoe.config import CacheConfig, EngineConfig
from activemoe.engine import memory_plan, model_shape
from activemoe.errors import UserError
from activemoe.plan import ModelShape, plan
from activemoe.tiny import build_tiny_checkpoint, mxfp4_experts
from tests.test_cli import assert_user_error

MiB = 2**20


def test_plan_arithmetic():
    shape = ModelShape(resident_bytes=100 * MiB, expert_bytes=10 * MiB, total_experts=64, top_k=4,
                       kv_bytes_per_token=1024, hidden_size=1024, vocab_size=32000, dtype_bytes=2)
    p = plan(shape, 1024 * MiB, context_tokens=4096, prompt_tokens=512, workspace_bytes=256 * MiB)
    fixed = 100 * MiB + 4096 * 1024 + 512 * (8 * 1024 * 2 + 4 * 32000) + 256 * MiB
    assert p.fixed_bytes == fixed and p.num_slots == (1024 * MiB - fixed) // (10 * MiB)
    assert p.fixed_bytes + p.slot_bytes <= 1024 * MiB < p.fixed_bytes + p.slot_bytes + 10 * MiB
    assert plan(shape, 100_000 * MiB).num_slots == 64  # capped at all experts
    with pytest.raises(UserError, match=r"at least \d+\.\d MiB"):
        plan(shape, fixed + 3 * 10 * MiB, context_tokens=4096, prompt_tokens=512,
             workspace_bytes=256 * MiB)  # fewer than top-k slots fit


def test_model_shape_matches_the_loaded_model(checkpoint):
    model_dir = checkpoint("qwen3_moe")
    shape = model_shape(model_dir)
    with activemoe.load(model_dir, EngineConfig.tiny(num_slots=4)) as eng:
        resident = sum(p.numel() * p.element_size() for p in eng.model.parameters())
        assert shape.expert_bytes == eng.load_stats.expert_bytes and shape.total_experts == eng.load_stats.total_experts
        assert resident <= shape.resident_bytes <= resident + sum(b.numel() * b.element_size() for b in eng.model.buffers())


def test_model_shape_of_mxfp4_experts_counts_their_host_tier_as_mxfp4(tmp_path):
    """GPT-OSS as released, --precision mxfp4: slots hold bfloat16 experts, the host tier and the link MXFP4."""
    model_dir = mxfp4_experts(build_tiny_checkpoint("gpt_oss", tmp_path, dtype=torch.bfloat16, expert_width=32))
    assert model_shape(model_dir).host_expert_bytes is None  # native: the host tier holds the compute dtype
    shape = model_shape(model_dir, precision="mxfp4")
    with activemoe.load(model_dir, EngineConfig(cache=CacheConfig(num_slots=4), precision="mxfp4")) as eng:
        assert shape.expert_bytes * 4 == eng.load_stats.slab_bytes  # 4 bfloat16 slots
        assert shape.host_expert_bytes == eng.runtime.store.expert_bytes == eng.load_stats.host_store_bytes // shape.total_experts
    assert shape.host_expert_bytes < shape.expert_bytes / 3
    p = plan(shape, 10 * 2**30)
    assert p.num_slots == shape.total_experts and p.host_bytes == 0
    p = plan(shape, p.fixed_bytes + 5 * shape.expert_bytes)
    assert p.num_slots == 5 and p.host_bytes == (shape.total_experts - 5) * shape.host_expert_bytes


def test_run_under_a_budget_stays_under_it(checkpoint):
    model_dir = checkpoint("mixtral")
    probe = memory_plan(model_dir, EngineConfig(cache=CacheConfig(device_memory_bytes=2**30, context_tokens=256)))
    expert_bytes = probe.slot_bytes // probe.num_slots
    budget = probe.fixed_bytes + 5 * expert_bytes + expert_bytes // 2  # room for 5 slots, not 6
    config = EngineConfig(cache=CacheConfig(device_memory_bytes=budget, context_tokens=256))
    planned = memory_plan(model_dir, config)
    assert planned.num_slots == 5
    with activemoe.load(model_dir, config) as eng:
        resident = sum(p.numel() * p.element_size() for p in eng.model.parameters())
        assert eng.load_stats.num_slots == planned.num_slots >= eng.top_k
        assert resident + eng.load_stats.slab_bytes <= budget  # on CPU the budget covers weights and slots
        eng.generate([5, 6, 7], max_new_tokens=4)


def test_plan_command(capsys, checkpoint):
    model_dir = checkpoint("mixtral")
    assert main(["plan", "--model", str(model_dir), "--gpu-memory", "2MiB", "--device", "cpu",
                 "--dtype", "float32", "--context", "256"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_slots"] == 24 and result["host_bytes"] == 0  # all 24 experts fit in 2 MiB
    assert_user_error(capsys, ["plan", "--model", str(model_dir), "--gpu-memory", "64KiB", "--device", "cpu"],
                      "too small", "at least")
    assert_user_error(capsys, ["generate", "--model", str(model_dir), "--prompt-ids", "5", "--gpu-memory", "12 GiBs"],
                      "cannot parse size")
