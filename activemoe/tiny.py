"""Tiny random MoE checkpoints built from transformers configs, for tests, the fallback demo and benches.

Weights are random; routers are scaled up so that routing is decisive rather than a near-tie that
rounding could flip. Saved with `save_pretrained`, so loading goes through the real checkpoint path.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

# Per family: config overrides on top of the shared shape below.
_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_FAMILY_OVERRIDES = {
    "deepseek_v2": dict(num_key_value_heads=4, first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_shared_experts=1),
    "deepseek_v3": dict(num_key_value_heads=4, first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=24,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_shared_experts=1),
    "gpt_oss": dict(head_dim=8, sliding_window=16, layer_types=None),
    # hybrids: at least one attention layer among the three (their defaults put the first one further down)
    "qwen3_next": dict(head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                       linear_num_value_heads=4, layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0, mamba_d_state=4,
                  mamba_dt_rank=4),
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["conv", "full_attention", "conv"]),
    "deepseek_v32": dict(num_key_value_heads=4, first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=16,
                         q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8, n_shared_experts=1,
                         index_n_heads=2, index_head_dim=16, index_topk=4),
    "deepseek_v4": dict(mlp_layer_types=["hash_moe", "moe", "moe"]),  # a hash-routed layer, then learned routers
    "dots1": dict(n_shared_experts=1, first_k_dense_replace=1),
    "hunyuan_v1_moe": dict(head_dim=8),
    "qwen3_5_moe_text": dict(head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                             linear_num_value_heads=4, layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "gemma4_text": dict(enable_moe_block=True, head_dim=8, global_head_dim=8, sliding_window=16, num_kv_shared_layers=0,
                        layer_types=["sliding_attention", "full_attention", "full_attention"], hidden_size_per_layer_input=0),
    "llama4_text": dict(head_dim=8, intermediate_size_mlp=64),  # intermediate_size: the experts' width
    "kimi_linear": dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8,
                        v_head_dim=8, linear_head_dim=8, linear_num_heads=4, mlp_layer_types=["dense", "sparse", "sparse"],
                        layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "glm_moe_dsa": dict(num_key_value_heads=4, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
                        qk_rope_head_dim=8, v_head_dim=8, head_dim=8, n_shared_experts=1, index_n_heads=2,
                        index_head_dim=16, index_topk=4),
    "glm4v_moe_text": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                            "mrope_section": [1, 1, 0]}),  # sections of the rotary half: 8 * 0.5 / 2
    "mistral_large4_text": dict(num_key_value_heads=4, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
                                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8, n_shared_experts=1,
                                index_n_heads=2, index_head_dim=16, index_topk=4),
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_state=8, mamba_d_head=16, layer_types=["mamba", "attention", "mamba"]),
}
# Vision-language families, built as released (a ...ForConditionalGeneration whose text model holds the experts):
# family -> (its text family, the tiny vision tower, other sub-configs)
_COMPOSITE = {
    "qwen3_5_moe": ("qwen3_5_moe_text", dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2,
                                             out_hidden_size=32), {}),
    "llama4": ("llama4_text", dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
                                   projector_output_dim=32), {}),
    "qwen3_vl_moe": ("qwen3_vl_moe_text", dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2,
                                               out_hidden_size=32, deepstack_visual_indexes=[0]), {}),
    "glm4v_moe": ("glm4v_moe_text", dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32),
                  {}),
    "mistral_large4": ("mistral_large4_text", dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, head_dim=16, image_size=28, patch_size=14), {}),
    "gemma4": ("gemma4_text", dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, head_dim=16), dict(audio_config=None)),
}


def tiny_config(family: str, num_layers: int = 3, num_experts: int = 8, top_k: int = 2, hidden: int = 32,
                expert_width: int = 16, vocab: int = 96, max_positions: int = 256, heads: int = 4,
                init_range: float = 0.1):
    # init_range 0.1: logits of order 1 at tiny widths, so a 1e-5 parity bound means something
    if family in _COMPOSITE:
        text_family, vision, others = _COMPOSITE[family]
        text = tiny_config(text_family, num_layers, num_experts, top_k, hidden, expert_width, vocab, max_positions, heads,
                           init_range)
        return AutoConfig.for_model(family, text_config=text.to_dict(), vision_config=vision, **others)
    fields = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                  num_attention_heads=heads, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=max_positions,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                  initializer_range=init_range)
    fields.update(_FAMILY_OVERRIDES.get(family, {}))
    cfg = AutoConfig.for_model(family, **fields)
    for name in _EXPERT_FIELDS:
        if hasattr(cfg, name):
            setattr(cfg, name, num_experts)
    cfg.num_experts_per_tok = top_k
    for name in ("moe_topk", "moe_k", "top_k_experts"):  # HunYuan's, ERNIE's and Gemma 4's names for it
        if hasattr(cfg, name):
            setattr(cfg, name, top_k)
    for name in ("moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size"):
        if hasattr(cfg, name):
            setattr(cfg, name, expert_width)
    if family in ("mixtral", "phimoe", "granitemoe", "gpt_oss", "olmoe", "llama4_text"):  # their experts are intermediate_size wide
        cfg.intermediate_size = expert_width
    if family == "gpt_oss":
        cfg.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    return cfg


def build_tiny_checkpoint(family: str, out_dir: str | Path, seed: int = 0, router_scale: float = 20.0,
                          max_shard_size: str | None = None, dtype: torch.dtype = torch.float32, fast_init: bool = False,
                          **shape) -> Path:
    """Random weights, decisive routers, saved to `out_dir`; returns the directory. `fast_init` draws the
    weights in parallel instead of through transformers' initialisation (for checkpoints at real shapes)."""
    cfg = tiny_config(family, **shape)
    torch.manual_seed(seed)
    model = _drawn_in_parallel(cfg, dtype, seed) if fast_init else _auto_class(family).from_config(cfg, dtype=dtype)
    text = cfg.get_text_config()
    num_experts = next(getattr(text, n) for n in _EXPERT_FIELDS if hasattr(text, n))
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_router = p.ndim == 2 and p.shape == (num_experts, text.hidden_size) and "experts" not in name
            if is_router:
                p.normal_(0.0, router_scale / text.hidden_size**0.5)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):  # DeepSeek-V4's hash routing table (token -> its experts): random, and so
                b.random_(0, num_experts, generator=torch.Generator().manual_seed(seed))  # now and then one twice
    out_dir = Path(out_dir)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir, **kwargs)
    finally:
        if bars:
            transformers.logging.enable_progress_bar()
    return out_dir


def _auto_class(family: str):
    return AutoModelForImageTextToText if family in _COMPOSITE else AutoModelForCausalLM


def _drawn_in_parallel(cfg, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """The model with every matrix drawn from N(0, initializer_range) and every vector (the norms) set to 1,
    one thread and one generator (seeded from `seed` and the parameter's index) per parameter. transformers'
    initialisation draws them one after another: for two OLMoE-shape layers 8.8 s against 3.3 s here on
    2 cores, and a 16-layer build (initialisation and saving) took 259 s on the H100 machine's 16."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.to_empty(device="cpu")
    saved = set(model.state_dict())
    params = dict(model.named_parameters())
    if saved - set(params):  # a buffer that would be saved uninitialised
        raise ValueError(f"fast_init cannot draw buffers {sorted(saved - set(params))[:3]}")

    def draw(index: int, p: torch.nn.Parameter) -> None:
        with torch.no_grad():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, cfg.initializer_range, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(draw, range(len(params)), params.values()))
    return model


def mxfp4_experts(model_dir: str | Path, seed: int = 0) -> Path:
    """Rewrite a tiny GPT-OSS checkpoint's experts in MXFP4, the layout of OpenAI's released checkpoints:
    `<name>_blocks` [E, rows, G, 16] uint8 (two 4-bit codes per byte, 32 values per group) and `<name>_scales`
    [E, rows, G] uint8 (a power-of-two exponent per group, biased by 127), where the weight is [E, G*32, rows];
    `quantization_config` names the method. Random codes and scales of 2**-4 to 2**-6. In place; returns the
    directory. Hidden size and expert width must be multiples of 32."""
    from safetensors.torch import load_file, save_file

    from activemoe.families import MXFP4, MXFP4_SCALES

    model_dir = Path(model_dir)
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(seed)
    for key in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, cols, rows = tensors.pop(key).shape  # [E, in, out]
        tensors[key + MXFP4] = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=generator,
                                                 dtype=torch.uint8)
        tensors[key + MXFP4_SCALES] = torch.randint(127 - 6, 127 - 3, (experts, rows, cols // 32), generator=generator,
                                                 dtype=torch.uint8)
    save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    return model_dir
