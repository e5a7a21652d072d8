"""families.py knows where routed experts live: in a transformers model and in its checkpoint files.

It is generic over transformers' ExpertsInterface: any experts class decorated with
`use_experts_implementation` (it has `_apply_gate` and the has_gate/has_bias/is_transposed flags) is
served, whatever the family. On disk it understands per-expert keys (`experts.E.w1|w2|w3` and
`experts.E.gate_proj|up_proj|down_proj`) and expert-major fused tensors (`experts.gate_up_proj`,
GraniteMoE's `input_linear/output_linear`), which transformers stores in memory as they are on disk.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from activemoe import llama4
from activemoe.errors import UserError

# Families proven by the parity tests; other families using the registry's standard layout work too.
TESTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "phimoe", "granitemoe",
                   "gpt_oss", "glm4_moe", "glm4_moe_lite", "minimax_m2", "minimax", "qwen3_next", "deepseek_v32",
                   "deepseek_v4", "ernie4_5_moe", "hunyuan_v1_moe", "hy_v3", "dots1", "lfm2_moe", "jamba", "nemotron_h",
                   "mimo_v2_flash", "solar_open", "exaone_moe", "cohere2_moe", "afmoe", "laguna", "flex_olmo",
                   "granitemoeshared", "qwen3_5_moe", "qwen3_5_moe_text", "gemma4", "gemma4_text", "llama4", "llama4_text",
                   "kimi_linear", "glm_moe_dsa", "granitemoehybrid", "qwen3_vl_moe", "glm4v_moe",
                   "mistral_large4", "flint", "granitemoe_swa", "hy_v4", "kolibri1", "mellum")

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_PER_EXPERT = re.compile(r"\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.(weight|bias)$")
# Granite's experts sit in block_sparse_moe; its shared MLP (shared_mlp) has input_linear/output_linear keys too
_FUSED = re.compile(r"\.(?:experts\.(gate_up_proj|up_proj|down_proj)(_bias|_blocks)?|"
                    r"block_sparse_moe\.(input_linear|output_linear)\.weight)$")
MXFP4, MXFP4_SCALES = "_blocks", "_scales"  # suffixes of an MXFP4 tensor's packed codes and exponents (GPT-OSS)
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_GRANITE = {"input_linear": "gate_up_proj", "output_linear": "down_proj"}


@dataclass(frozen=True)
class ExpertsSpec:
    """The per-expert tensors of one experts module, in transformers' in-memory layout."""

    shapes: dict[str, tuple[int, ...]]  # e.g. {"gate_up_proj": (2I, H), "down_proj": (H, I)}
    num_experts: int
    is_transposed: bool
    is_concatenated: bool


@dataclass(frozen=True)
class TensorPart:
    key: str  # checkpoint key
    index: int | None  # expert row of an expert-major fused tensor; None for a per-expert key
    mxfp4: bool = False  # `key` names MXFP4 tensors: key + MXFP4 and key + MXFP4_SCALES, dequantised on read


def auto_class(config):
    """The transformers Auto class that builds a checkpoint for text generation: its causal LM, or else its
    vision-language model (Qwen3-VL-MoE, GLM-4.5V: these generate from text alone too); None if neither."""
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if auto._model_mapping.get(type(config), None) is not None:
            return auto
    return None


def experts_classes(model_class: type, stand_in: bool = True) -> list[type]:
    """The registry-dispatched experts classes in the module that defines `model_class`; for Llama 4 the
    stand-in ActiveMoE builds (llama4.py), or with `stand_in` False the class transformers builds."""
    if llama4.serves(model_class):
        return [llama4.Llama4Experts if stand_in else llama4.TRANSFORMERS_EXPERTS]
    module = sys.modules[model_class.__module__]
    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and hasattr(obj, "_apply_gate")]


@contextmanager
def experts_without_weights(classes: list[type]) -> Iterator[None]:
    """While active, new experts modules record their per-expert shapes and drop their weights (and Llama 4's
    are built as their stand-ins, llama4.py).

    transformers then never materialises the routed experts: their checkpoint keys match no parameter
    and are skipped unread. A meta placeholder keeps attribute access (weight init) working.
    """
    originals = {cls: cls.__init__ for cls in classes}

    def make_init(original):
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            params = dict(self.named_parameters(recurse=False))
            num_experts = next(iter(params.values())).shape[0]
            self._activemoe_spec = ExpertsSpec(
                shapes={n: tuple(p.shape[1:]) for n, p in params.items() if p.shape[0] == num_experts},
                num_experts=num_experts, is_transposed=self.is_transposed, is_concatenated=self.is_concatenated)
            for name in self._activemoe_spec.shapes:
                meta = torch.empty(params[name].shape, dtype=params[name].dtype, device="meta")
                del self._parameters[name]
                object.__setattr__(self, name, meta)

        return __init__

    for cls, original in originals.items():
        cls.__init__ = make_init(original)
    try:
        with llama4.stand_ins(classes):
            yield
    finally:
        for cls, original in originals.items():
            cls.__init__ = original


def offloaded_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Decoder layer index -> experts module, for every experts module built without weights."""
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "_activemoe_spec"):
            match = _LAYER.search(name + ".")
            if match is None:
                raise UserError(f"experts module {name!r} is not inside a `layers.N` decoder layer; not supported")
            found[int(match.group(1))] = module
    return dict(sorted(found.items()))


def experts_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Decoder layer index -> experts module (any registry experts class, with weights or without)."""
    found = {}
    for name, module in model.named_modules():
        match = _LAYER.search(name + ".")
        if hasattr(type(module), "_apply_gate") and match is not None:
            found[int(match.group(1))] = module
    return dict(sorted(found.items()))


def layer_expert_keys(keys: list[str], layers: list[int]) -> dict[int, dict[str, list[str]]]:
    """Checkpoint keys of routed experts per decoder layer, split into 'per_expert' and 'fused'."""
    wanted = set(layers)
    out: dict[int, dict[str, list[str]]] = {layer: {"per_expert": [], "fused": []} for layer in layers}
    for key in keys:
        match = _LAYER.search(key)
        if match is None or int(match.group(1)) not in wanted:
            continue
        kind = "per_expert" if _PER_EXPERT.search(key) else "fused" if _FUSED.search(key) else None
        if kind:
            out[int(match.group(1))][kind].append(key)
    return out


def resolve_expert(layer: int, expert: int, spec: ExpertsSpec, keys: dict[str, list[str]]) -> dict[str, list[TensorPart]]:
    """For each in-memory tensor of one expert, the checkpoint parts to concatenate along dim 0."""
    per_expert = {}  # (role, "weight"|"bias") -> key, for this expert
    for key in keys["per_expert"]:
        m = _PER_EXPERT.search(key)
        if int(m.group(1)) == expert:
            per_expert[(_ROLE[m.group(2)], m.group(3))] = key
    fused = {}
    for key in keys["fused"]:
        m = _FUSED.search(key)
        if m.group(2) == MXFP4:
            fused[m.group(1)] = TensorPart(key.removesuffix(MXFP4), expert, mxfp4=True)
            continue
        name = (m.group(1) + (m.group(2) or "")) if m.group(1) else _GRANITE[m.group(3)]
        fused[name] = TensorPart(key, expert)

    sources = {}
    for name in spec.shapes:
        if name in fused:
            sources[name] = [fused[name]]
            continue
        kind = "bias" if name.endswith("_bias") else "weight"
        roles = ("gate", "up") if name.startswith("gate_up_proj") else ("up",) if name.startswith("up_proj") else ("down",)
        if name.startswith("gate_up_proj") and (spec.is_transposed or not spec.is_concatenated):
            raise UserError(f"layer {layer}: per-expert checkpoint keys for a transposed or interleaved experts "
                            "layout are not supported")
        parts = [per_expert.get((role, kind)) for role in roles]
        if None in parts:
            raise UserError(f"checkpoint has no tensor for layer {layer} expert {expert} ({name}); "
                            "the file may be incomplete or in a quantized format ActiveMoE does not read yet")
        sources[name] = [TensorPart(key, None) for key in parts]
    return sources


def unsupported_message(model_type: str) -> str:
    return (f"model type {model_type!r} has no routed experts that ActiveMoE can serve (it needs a MoE family whose "
            f"experts go through transformers' ExpertsInterface); tested families: {', '.join(TESTED_FAMILIES)}")


@dataclass(frozen=True)
class RouterParts:
    """What a pre-gate needs of one MoE layer: its router and the norm in front of it."""

    norm_weight: torch.Tensor | None  # [H] gain of the RMSNorm feeding the MoE block, if any
    weight: torch.Tensor  # [E, H] router
    bias: torch.Tensor | None  # [E] router bias or score correction, if any


def routers(model: torch.nn.Module, experts: dict[int, torch.nn.Module]
            ) -> dict[int, tuple[torch.nn.Module, torch.nn.Module]]:
    """Per MoE layer, (router, decoder layer): the router is the child of the MoE block with an [E, H]
    weight; it returns (logits, top_k_weights, top_k_index) as transformers' routers do."""
    names = {module: name for name, module in model.named_modules()}
    modules = dict(model.named_modules())
    out = {}
    for layer, module in experts.items():
        block_name = names[module].rsplit(".", 1)[0]
        block, decoder = modules[block_name], modules[block_name.rsplit(".", 1)[0]]
        num_experts, hidden = module._activemoe_spec.num_experts, model.config.get_text_config().hidden_size
        router = next((m for n, m in block.named_children() if m is not module and getattr(m, "weight", None) is not None
                       and tuple(m.weight.shape) == (num_experts, hidden)), None)
        if router is None:
            raise UserError(f"layer {layer}: no router with an [{num_experts}, {hidden}] weight found for pre-gating "
                            f"(the MoE block of {model.config.model_type!r} routes otherwise); predict with learned "
                            "or history instead")
        out[layer] = (router, decoder)
    return out


def router_parts(model: torch.nn.Module, experts: dict[int, torch.nn.Module]) -> dict[int, RouterParts]:
    """Per MoE layer, the router's weights and the decoder layer's post-attention norm gain."""
    parts = {}
    for layer, (router, decoder) in routers(model, experts).items():
        norm = getattr(decoder, "post_attention_layernorm", None)
        norm_weight = getattr(norm, "weight", None)
        bias = getattr(router, "bias", None)
        if bias is None:
            bias = getattr(router, "e_score_correction_bias", None)
        parts[layer] = RouterParts(norm_weight.detach() if norm_weight is not None and norm_weight.ndim == 1 else None,
                                   router.weight.detach(), bias.detach() if bias is not None else None)
    return parts
