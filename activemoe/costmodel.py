"""costmodel.py: the simulator's named cost model, built from a hardware preset and a model shape, or
from a profile measured on this machine (`activemoe profile --out FILE`). Every simulated figure is
printed with it. Pure arithmetic; it knows nothing about torch, caches or the engine.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from activemoe.errors import UserError
from activemoe.presets import HardwarePreset, ShapePreset

# Assumptions for presets (no spec sheet gives them): eager-mode kernel launch overheads of the
# transformers layer (attention, norms, router) and of one routed expert (three matmuls + activation),
# a per-transfer DMA setup latency, and the host's memory bandwidth for host-side expert compute.
LAYER_OVERHEAD_S = 150e-6
EXPERT_OVERHEAD_S = 20e-6
LINK_LATENCY_S = 10e-6
HOST_GBPS = 50.0


@dataclass(frozen=True)
class CostModel:
    name: str
    link_gbps: float  # slow tier -> slots, GB/s
    link_latency_s: float  # added once per expert transfer
    layer_base_s: float  # non-expert time of one MoE layer event (attention, norms, router, its share of
    layer_per_token_s: float  # embedding/lm_head/sampling): base + per_token * tokens
    expert_base_s: float  # one routed expert from a slot on t tokens: base + per_token * t
    expert_per_token_s: float
    host_expert_base_s: float  # one routed expert computed from its host copy
    host_expert_per_token_s: float
    expert_bytes: int
    source: str  # where the figures come from
    wake_s: float = 20e-6  # an idle copy engine's reaction to new work (the loader thread's wake-up)

    def layer_s(self, tokens: int) -> float:
        return self.layer_base_s + self.layer_per_token_s * tokens

    def expert_s(self, tokens: int) -> float:
        return self.expert_base_s + self.expert_per_token_s * tokens

    def host_expert_s(self, tokens: int) -> float:
        return self.host_expert_base_s + self.host_expert_per_token_s * tokens

    def transfer_s(self, nbytes: int) -> float:
        return nbytes / (self.link_gbps * 1e9)

    def describe(self) -> str:
        """One line with every parameter, printed next to every simulated figure."""
        us = 1e6
        return (f"cost model {self.name!r}: link {self.link_gbps:.3g} GB/s + {self.link_latency_s * us:.3g} us/transfer, "
                f"layer {self.layer_base_s * us:.3g} us + {self.layer_per_token_s * us:.3g} us/token, "
                f"expert {self.expert_base_s * us:.3g} us + {self.expert_per_token_s * us:.3g} us/token, "
                f"host expert {self.host_expert_base_s * us:.3g} us + {self.host_expert_per_token_s * us:.3g} us/token, "
                f"copy-engine wake-up {self.wake_s * us:.3g} us, expert {self.expert_bytes / 2**20:.3g} MiB ({self.source})")

    def to_json(self) -> dict:
        return asdict(self)


def from_preset(hw: HardwarePreset, shape: ShapePreset, dtype: str = "bfloat16") -> CostModel:
    """Roofline figures: a step reads each weight once (memory bound at decode) or is compute bound."""
    layers_per_event = (shape.moe_layers + shape.dense_layers) / shape.moe_layers
    lm_head = shape.vocab_size * shape.hidden_size * 2 // (shape.moe_layers + shape.dense_layers)  # read once a step
    return roofline(hw, f"{hw.name}/{shape.name}/{dtype}", shape.expert_bytes(dtype),
                    3 * shape.hidden_size * shape.expert_width,
                    layers_per_event * (shape.layer_resident_bytes(dtype) + lm_head),
                    layers_per_event * (shape.attention_params + shape.other_params_per_layer), shape.source)


def roofline(hw: HardwarePreset, name: str, expert_bytes: int, expert_params: float, layer_bytes: float,
             layer_params: float, shape_source: str) -> CostModel:
    """A cost model on preset hardware for one MoE-layer event reading `layer_bytes` of resident weights
    (`layer_params` multiply-adds per token) and experts of `expert_bytes` (`expert_params`)."""
    bw, flops = hw.memory_gbps * 1e9, hw.tflops * 1e12
    return CostModel(
        name=name, link_gbps=hw.link_gbps, link_latency_s=LINK_LATENCY_S,
        layer_base_s=LAYER_OVERHEAD_S + layer_bytes / bw, layer_per_token_s=2 * layer_params / flops,
        expert_base_s=EXPERT_OVERHEAD_S + expert_bytes / bw, expert_per_token_s=2 * expert_params / flops,
        host_expert_base_s=expert_bytes / (HOST_GBPS * 1e9), host_expert_per_token_s=2 * expert_params / 1e12,
        expert_bytes=expert_bytes,
        source=f"preset: {hw.source}; {shape_source}; link x{hw.link_efficiency}; assumed overheads: layer "
               f"{LAYER_OVERHEAD_S * 1e6:.0f} us, expert {EXPERT_OVERHEAD_S * 1e6:.0f} us, host {HOST_GBPS} GB/s")


def from_profile(path: str | Path, link_gbps: float | None = None) -> CostModel:
    """A profile measured here by `activemoe profile` (its model's expert shape, on its device).
    The link is `link_gbps` when given (e.g. the emulated link of a run), else the profile's
    measured pinned H2D rate (CUDA) or host memcpy rate (CPU)."""
    path = Path(path)
    try:
        p = json.loads(path.read_text())
        host_ms, expert_bytes = p["expert_host_ms"], int(p["expert_bytes"])
        device_ms = p.get("expert_device_ms") or host_ms
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a profile written by `activemoe profile --out`: {e}") from None
    layer_ms = p.get("decode_layer_ms")
    if layer_ms is None:
        raise UserError(f"{path} lacks decode_layer_ms; write it again with this version's `activemoe profile --out`")
    given = link_gbps is not None
    if not given:
        link_gbps = p.get("h2d_pinned_gbps") or p["host_copy_gbps"]
    base, per_token = _fit(device_ms)
    host_base, host_per_token = _fit(host_ms)
    overhead_ms = p.get("load_overhead_ms") or 0.0  # per-load thread hand-overs, measured
    return CostModel(name=f"profile:{path.name}", link_gbps=link_gbps, link_latency_s=overhead_ms / 1e3,
                     layer_base_s=layer_ms / 1e3, layer_per_token_s=0.0, expert_base_s=base,
                     expert_per_token_s=per_token, host_expert_base_s=host_base,
                     host_expert_per_token_s=host_per_token, expert_bytes=expert_bytes,
                     source=f"measured by `activemoe profile` on {p.get('device')} ({p.get('host')}), "
                            f"{p.get('dtype')}; link {'as given' if given else 'measured'}")


def _fit(ms: dict[str, float]) -> tuple[float, float]:
    """base + per_token * t through the 1- and 8-token timings (the decode and small-batch regime)."""
    per_token = max(0.0, (ms["8"] - ms["1"]) / 7 / 1e3)
    return max(0.0, ms["1"] / 1e3 - per_token), per_token
