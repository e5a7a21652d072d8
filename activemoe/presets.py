"""presets.py: hardware and model-shape presets for the simulator, each figure with its source.

Hardware figures are vendor spec-sheet peaks; the usable link rate is the spec rate times a stated
efficiency. Model shapes come from the checkpoints' config.json on the Hugging Face Hub. Pure data
and arithmetic; it knows nothing about torch or the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

from activemoe.errors import UserError

GB = 1e9
DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "int4": 0.5, "mxfp4": 4.25 / 8}
PCIE_EFFICIENCY = 0.8  # pinned host-to-device copies reach ~80% of the PCIe spec rate (protocol overhead)


@dataclass(frozen=True)
class HardwarePreset:
    name: str
    memory_bytes: int  # device memory
    memory_gbps: float  # device memory bandwidth (spec)
    link_gbps_spec: float  # slow tier -> device, one direction (spec)
    link_efficiency: float  # usable share of the spec link rate
    tflops: float  # dense fp16/bf16 tensor throughput (spec)
    source: str

    @property
    def link_gbps(self) -> float:
        return self.link_gbps_spec * self.link_efficiency


HARDWARE: dict[str, HardwarePreset] = {p.name: p for p in (
    HardwarePreset("rtx3090", 24 * 2**30, 936.0, 31.5, PCIE_EFFICIENCY, 71.0,
                   "NVIDIA Ampere GA102 whitepaper: 24 GB GDDR6X, 936 GB/s, PCIe 4.0 x16, "
                   "71 TFLOPS FP16 tensor (FP32 accumulate)"),
    HardwarePreset("rtx4090", 24 * 2**30, 1008.0, 31.5, PCIE_EFFICIENCY, 165.2,
                   "NVIDIA Ada Lovelace whitepaper: 24 GB GDDR6X, 1008 GB/s, PCIe 4.0 x16, "
                   "165.2 TFLOPS FP16 tensor (FP32 accumulate)"),
    HardwarePreset("rtx4060-laptop", 8 * 2**30, 256.0, 15.75, PCIE_EFFICIENCY, 58.0,
                   "NVIDIA GeForce RTX 4060 Laptop spec page: 8 GB GDDR6 128-bit at 16 Gbps (256 GB/s), "
                   "PCIe 4.0 x8; 233 AI TOPS (FP8, sparse) -> ~58 TFLOPS FP16 dense (approximate)"),
    HardwarePreset("a100-pcie", 80 * 2**30, 1935.0, 31.5, PCIE_EFFICIENCY, 312.0,
                   "NVIDIA A100 datasheet (80 GB PCIe): HBM2e 1,935 GB/s, PCIe 4.0 x16 (64 GB/s both "
                   "directions), 312 TFLOPS BF16 tensor dense"),
    HardwarePreset("h100-pcie", 80 * 2**30, 2000.0, 63.0, PCIE_EFFICIENCY, 756.0,
                   "NVIDIA H100 datasheet (PCIe): 80 GB HBM2e 2 TB/s, PCIe 5.0 x16 (128 GB/s both directions), "
                   "1,513 TFLOPS BF16 with sparsity -> 756 dense"),
    HardwarePreset("jetson-agx-orin", 64 * 2**30, 204.8, 7.88, 0.45, 42.5,
                   "NVIDIA Jetson AGX Orin 64GB datasheet: 64 GB LPDDR5 204.8 GB/s shared by CPU and GPU, so "
                   "the slow tier is an NVMe SSD on the M.2 PCIe Gen4 x4 slot (7.88 GB/s spec; 0.45: a typical "
                   "~3.5 GB/s drive); GPU FP16 dense ~42.5 TFLOPS (approximate, 2048 CUDA / 64 tensor cores)"),
)}


@dataclass(frozen=True)
class ShapePreset:
    name: str
    moe_layers: int  # decoder layers with routed experts
    dense_layers: int  # decoder layers without (their MLP is resident)
    num_experts: int  # routed experts per MoE layer
    top_k: int
    hidden_size: int
    expert_width: int  # intermediate size of one routed expert
    attention_params: int  # per decoder layer (q, k, v, o and MLA projections), resident
    other_params_per_layer: int  # shared experts, dense MLP averaged over layers, routers, norms
    vocab_size: int
    checkpoint_dtype: str  # dtype of the routed experts in the published checkpoint
    source: str

    def expert_bytes(self, dtype: str = "bfloat16") -> int:
        """Gated expert: gate, up and down projections, H x I each."""
        if dtype not in DTYPE_BYTES:
            raise UserError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
        return int(3 * self.hidden_size * self.expert_width * DTYPE_BYTES[dtype])

    def layer_resident_bytes(self, dtype: str = "bfloat16") -> int:
        """Non-expert weights read once per decode step per layer."""
        return int((self.attention_params + self.other_params_per_layer) * DTYPE_BYTES[dtype])

    @property
    def total_experts(self) -> int:
        return self.moe_layers * self.num_experts


def _mha(h: int, heads: int, kv_heads: int, head_dim: int) -> int:
    return h * heads * head_dim * 2 + h * kv_heads * head_dim * 2


SHAPES: dict[str, ShapePreset] = {s.name: s for s in (
    ShapePreset("mixtral-8x7b", 32, 0, 8, 2, 4096, 14336, _mha(4096, 32, 8, 128), 4096 * 8, 32000, "bfloat16",
                "mistralai/Mixtral-8x7B-v0.1 config.json: 32 layers, 8 experts top-2, hidden 4096, "
                "intermediate 14336, 32 heads / 8 KV heads"),
    ShapePreset("qwen3-30b-a3b", 48, 0, 128, 8, 2048, 768, _mha(2048, 32, 4, 128), 2048 * 128, 151936, "bfloat16",
                "Qwen/Qwen3-30B-A3B config.json: 48 layers, 128 experts top-8, hidden 2048, "
                "moe_intermediate 768, 32 heads / 4 KV heads, head_dim 128"),
    ShapePreset("deepseek-v2-lite", 26, 1, 64, 6, 2048, 1408,
                2048 * 16 * 192 + 2048 * 576 + 512 * 16 * 256 + 16 * 128 * 2048,
                3 * 2048 * 2816 + 3 * 2048 * 10944 // 27 + 2048 * 64, 102400, "bfloat16",
                "deepseek-ai/DeepSeek-V2-Lite config.json: 27 layers (first dense), 64 routed + 2 shared "
                "experts top-6, hidden 2048, moe_intermediate 1408, MLA kv_lora_rank 512"),
    ShapePreset("olmoe-1b-7b", 16, 0, 64, 8, 2048, 1024, _mha(2048, 16, 16, 128), 2048 * 64, 50304, "bfloat16",
                "allenai/OLMoE-1B-7B-0924 config.json: 16 layers, 64 experts top-8, hidden 2048, "
                "intermediate 1024, 16 heads"),
    ShapePreset("gpt-oss-20b", 24, 0, 32, 4, 2880, 2880, _mha(2880, 64, 8, 64), 2880 * 32, 201088, "mxfp4",
                "openai/gpt-oss-20b config.json: 24 layers, 32 experts top-4, hidden 2880, intermediate 2880, "
                "64 heads / 8 KV heads, head_dim 64; experts published in MXFP4"),
    ShapePreset("qwen1.5-moe-a2.7b", 24, 0, 60, 4, 2048, 1408, _mha(2048, 16, 16, 128),
                3 * 2048 * 5632 + 2048 * 61, 151936, "bfloat16",
                "Qwen/Qwen1.5-MoE-A2.7B config.json: 24 layers, 60 experts top-4 + a shared expert of "
                "5632, hidden 2048, moe_intermediate 1408, 16 heads"),
)}


def hardware_preset(name: str) -> HardwarePreset:
    try:
        return HARDWARE[name.lower()]
    except KeyError:
        raise UserError(f"unknown hardware preset {name!r}; known: {', '.join(HARDWARE)}") from None


def shape_preset(name: str) -> ShapePreset:
    try:
        return SHAPES[name.lower()]
    except KeyError:
        raise UserError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}") from None
