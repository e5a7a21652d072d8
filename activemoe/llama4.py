"""llama4.py serves Llama 4 (`llama4`, `llama4_text`), whose MoE block predates transformers' ExpertsInterface.

transformers' Llama4TextMoe runs every expert on every token: each on the token scaled by its router score
(the sigmoid of its logit for the top-k experts, zero for the others, whose outputs are then exactly zero),
then sums over the experts. While ActiveMoE builds such a model, two stand-ins take the classes' places in
transformers' module (and only then; its classes are left as they are):
- the experts, declared to ExpertsInterface as they are laid out (gate_up_proj [E, H, 2I] and down_proj
  [E, I, H]: transposed, gate then up), so the runtime serves them as any other family's;
- the block, whose forward sends each token to its top-k experts only: row (t, k) is token t scaled by its
  score for expert k, routed to expert k with weight 1; the block sums over k where transformers sums over
  all experts (the others add exact zeros).
Legend: T tokens, K routed per token, E experts, H hidden.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.integrations.moe import use_experts_implementation
from transformers.models.llama4 import modeling_llama4 as llama4


TRANSFORMERS_EXPERTS = llama4.Llama4TextExperts  # the class transformers builds (a plain model: the baselines)


@use_experts_implementation(is_transposed=True)
class Llama4Experts(TRANSFORMERS_EXPERTS):
    """Llama4TextExperts as an ExpertsInterface class: forward(rows, top_k_index, top_k_weights)."""


class Llama4Moe(llama4.Llama4TextMoe):
    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, self.hidden_dim)  # [T, H]
        scores, logits = self.router(x)  # [T, E] each; scores are zero off the top-k
        index = torch.topk(logits, self.top_k, dim=1).indices  # [T, K], the router's own choice
        rows = (x[:, None, :] * scores.gather(1, index)[..., None]).reshape(-1, self.hidden_dim)  # [T*K, H]
        ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
        routed = self.experts(rows, index.reshape(-1, 1), ones)  # [T*K, H]
        out = self.shared_expert(x)
        out.add_(routed.reshape(x.shape[0], self.top_k, self.hidden_dim).sum(dim=1))
        return out, logits


def serves(model_class: type) -> bool:
    return model_class.__module__ == llama4.__name__


@contextmanager
def stand_ins(classes: list[type]) -> Iterator[None]:
    """While active (for experts classes that include the stand-in), Llama 4 models are built with the stand-ins."""
    if Llama4Experts not in classes:
        yield
        return
    saved = llama4.Llama4TextExperts, llama4.Llama4TextMoe
    llama4.Llama4TextExperts, llama4.Llama4TextMoe = Llama4Experts, Llama4Moe
    try:
        yield
    finally:
        llama4.Llama4TextExperts, llama4.Llama4TextMoe = saved
