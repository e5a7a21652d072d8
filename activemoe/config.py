"""Frozen configuration, one dataclass per concern; the CLI parses flags into these at the edge.

No torch here: configs are plain values that tests and the simulator can build freely.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from activemoe.errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: the checkpoint's own


@dataclass(frozen=True)
class CacheConfig:
    num_slots: int | None = None  # expert slots on the compute device; None: see slot_fraction
    expert_memory_bytes: int | None = None  # alternative to num_slots: bytes for the slot slab
    device_memory_bytes: int | None = None  # a device budget: the planner gives what remains to slots
    context_tokens: int = 4096  # KV cache the planner reserves for
    slot_fraction: float = 0.25  # default when no size is given: this share of all routed experts
    policy: str = "lru"  # key of policies.POLICIES
    first_layer_reserve: bool = True  # with a predictor that looks ahead within a token (all but the oracle),
    #                                   keep slots for the first MoE layer's experts (loader_core.first_layer_reserve)


@dataclass(frozen=True)
class PrefetchConfig:
    predictor: str = "none"  # key of predictors.PREDICTORS
    lookahead: int = 1  # MoE layers ahead that predictions reach
    issue_window: int = 1  # speculative loads in flight at once; the rest stay queued and cancellable. One: a
    #                        second holds a slot (evicting) for a guess the first's landing may make stale; simulated
    #                        (docs/simulator.md) it moved 7-13% fewer bytes per token and decoded faster, never slower
    chunk_bytes: int | None = None  # copy granularity: a critical load overtakes, a stale speculative one stops,
    #                                 between chunks, which never span two tensors. None: chunk_bytes_for the link
    budget: int | None = None  # predicted experts prefetched per target layer; None: the model's top-k
    predictor_file: str | None = None  # learned heads; None: activemoe-predictor.safetensors in the model dir
    stream_prefill: bool = True  # while a prompt runs layer N, queue layer N+1's experts (not with predictor "none")


MIN_CHUNK_BYTES = 1 << 20
CHUNK_LINK_S = 0.004  # an automatic chunk holds about this much of the link's time


def chunk_bytes_for(configured: int | None, link_gbps: float | None) -> int:
    """The copy granularity: as configured, else about CHUNK_LINK_S of the link's time and at least 1 MiB
    (1 MiB where the link's speed is unknown). Each chunk costs the loader thread a hand-over of Python
    work: on the CPU's emulated 0.25 GB/s link 1 MiB takes 4 ms (smaller chunks and one chunk per whole
    expert both measured slower with a predictor); on an H100's 54 GB/s link it takes 19 us while issuing
    it took 0.16 ms (bench/cuda_step_profile.py, cProfile), which held the copies to about 6.6 GB/s, so
    there a chunk is a whole tensor of the expert."""
    if configured is not None:
        return configured
    return max(MIN_CHUNK_BYTES, int(link_gbps * 1e9 * CHUNK_LINK_S)) if link_gbps else MIN_CHUNK_BYTES


@dataclass(frozen=True)
class LinkConfig:
    link_gbps: float | None = None  # emulated host-to-device link in GB/s (CPU copies paced to it); None: unpaced
    measured_gbps: float | None = None  # CUDA: the real link's pinned host-to-device speed, when the caller has
    #                                     measured it (a benchmark, for its floors); None: the engine measures it


EXPERTS_ON = ("device", "host", "auto")
ROUTING = ("exact", "pregated")


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"  # compute device: "cpu" or "cuda[:N]"
    dtype: str = "auto"  # compute dtype of the resident weights and the slots (one of DTYPES; auto: the checkpoint's)
    cache: CacheConfig = field(default_factory=CacheConfig)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    store: str = "ram"  # slow tier: "ram" (host copies, pinned on CUDA) or "disk" (checkpoint reads, no page cache)
    experts_on: str = "device"  # where routed experts run: device slots, host copies, or auto (per miss, cost model)
    routing: str = "exact"  # "exact", or "pregated" (approximate, opt-in: layer N+1 routed at layer N)
    replay_routing: str | None = None  # a trace whose routing is forced (benchmarks at real shapes; approximate)
    precision: str = "native"  # expert copies in the host tier and on the link: native (exact), int8 or int4 (approximate)
    late_miss: str = "none"  # "int4" (approximate, opt-in): a late critical miss is computed from its int4 copy
    quant_cache_dir: str | None = None  # where quantised copies are cached; None: the model directory
    grouped_hits: bool = False  # decode: the experts READY at a layer's start, and misses that land together,
    #                             run as one grouped matmul per projection (a few kernel launches per layer, not a
    #                             few per expert: for CUDA, where launching kernels bounds a decode step); off: one
    #                             expert at a time

    @staticmethod
    def tiny(num_slots: int = 4, policy: str = "lru") -> EngineConfig:
        return EngineConfig(cache=CacheConfig(num_slots=num_slots, policy=policy))


@dataclass(frozen=True)
class SamplingConfig:
    """None fields fall back to the model's generation config."""

    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.temperature is not None and not self.temperature > 0:
            raise UserError(f"temperature must be positive, got {self.temperature} (greedy decoding: do_sample=False, or --greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top-p must be in (0, 1], got {self.top_p}")


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str) -> int:
    """'12GiB', '512MB', '1.5g', '4096' -> bytes. Decimal units for kB/MB/GB, binary for KiB/MiB/GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise UserError(f"cannot parse size {text!r}: use a number with an optional unit, e.g. 512MiB, 12GiB, 2GB")
    return int(float(match.group(1)) * _UNITS[unit])
