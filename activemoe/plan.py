"""plan.py splits a device-memory budget: resident (non-expert) weights, the KV cache at the requested
context length, activations and workspace first; whatever remains becomes expert slots. Pure
arithmetic over a model's config and checkpoint header sizes; it knows nothing about CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass

from activemoe.errors import UserError

MiB = 2**20


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model, in bytes at the compute dtype."""

    resident_bytes: int  # every weight that is not a routed expert
    expert_bytes: int  # one routed expert
    total_experts: int
    top_k: int
    kv_bytes_per_token: int  # K and V of every layer for one token
    hidden_size: int
    vocab_size: int
    dtype_bytes: int
    moe_layers: int = 1  # decoder layers with routed experts (total_experts / moe_layers per layer)
    host_expert_bytes: int | None = None  # one expert in the host tier and on the link, where that is not
    #                                       expert_bytes (MXFP4 checkpoints keep their MXFP4 there); None: the same

    @property
    def link_bytes(self) -> int:
        return self.host_expert_bytes or self.expert_bytes


@dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: int
    resident_bytes: int
    kv_bytes: int  # at `context_tokens`
    activation_bytes: int  # largest forward: hidden states and fp32 logits of `prompt_tokens`
    workspace_bytes: int  # allocator and library workspace (CUDA), named and printed
    num_slots: int
    slot_bytes: int
    host_bytes: int  # experts that stay in the slow tier
    context_tokens: int

    @property
    def fixed_bytes(self) -> int:
        return self.resident_bytes + self.kv_bytes + self.activation_bytes + self.workspace_bytes

    def rows(self) -> list[tuple[str, str]]:
        return [("resident weights (non-expert)", f"{self.resident_bytes / MiB:10.1f} MiB"),
                (f"KV cache ({self.context_tokens} tokens)", f"{self.kv_bytes / MiB:10.1f} MiB"),
                ("activations", f"{self.activation_bytes / MiB:10.1f} MiB"),
                ("workspace", f"{self.workspace_bytes / MiB:10.1f} MiB"),
                (f"expert slots ({self.num_slots})", f"{self.slot_bytes / MiB:10.1f} MiB"),
                ("total on the device", f"{(self.fixed_bytes + self.slot_bytes) / MiB:10.1f} MiB"
                 f" of {self.budget_bytes / MiB:.1f} MiB"),
                ("experts in the slow tier", f"{self.host_bytes / MiB:10.1f} MiB")]


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """K and V per token over all layers, from the config (MLA families cache decompressed heads)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if getattr(config, "qk_nope_head_dim", None):  # DeepSeek-style attention
        k = heads * (config.qk_nope_head_dim + config.qk_rope_head_dim)
        v = heads * config.v_head_dim
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        k = v = kv_heads * head_dim
    return config.num_hidden_layers * (k + v) * dtype_bytes


def plan(shape: ModelShape, budget_bytes: int, context_tokens: int = 4096, prompt_tokens: int = 512,
         workspace_bytes: int = 0) -> MemoryPlan:
    """The most expert slots that fit; refuses with the minimum when not even top-k slots fit."""
    kv = shape.kv_bytes_per_token * context_tokens
    activations = prompt_tokens * (8 * shape.hidden_size * shape.dtype_bytes + 4 * shape.vocab_size)
    fixed = shape.resident_bytes + kv + activations + workspace_bytes
    minimum = fixed + shape.top_k * shape.expert_bytes
    if budget_bytes < minimum:
        raise UserError(f"a budget of {budget_bytes / MiB:.3g} MiB is too small: this model needs at least "
                        f"{minimum / MiB:.1f} MiB ({fixed / MiB:.1f} MiB for the resident weights, the KV cache at "
                        f"{context_tokens} tokens, activations and workspace, plus {shape.top_k} expert slots)")
    slots = min(shape.total_experts, (budget_bytes - fixed) // shape.expert_bytes)
    return MemoryPlan(budget_bytes=budget_bytes, resident_bytes=shape.resident_bytes, kv_bytes=kv,
                      activation_bytes=activations, workspace_bytes=workspace_bytes, num_slots=slots,
                      slot_bytes=slots * shape.expert_bytes,
                      host_bytes=(shape.total_experts - slots) * shape.link_bytes, context_tokens=context_tokens)
