"""hardware.py measures this machine: link and disk bandwidth, and expert compute time for a model's
expert shape. The miss-handling decision uses the host timing; `activemoe profile` saves it all.

The simulator's hardware and model-shape presets live in presets.py; costmodel.py reads a saved profile.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from activemoe.atomic import write_text_atomic
from activemoe.ids import ExpertId
from activemoe.runtime import MissCostModel, expert_forward
from activemoe.store import ExpertStore

TOKENS = (1, 8, 64)


def host_label() -> str:
    """This host: its CPU's model, architecture and cores ("AMD EPYC (x86_64), 2 cores")."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "CPU"
    return f"{cpu} ({platform.machine()}), {os.cpu_count()} cores"


def machine_label(device: str | torch.device = "cpu") -> str:
    """The machine a measurement ran on, as every result names it: the host, and the CUDA device when the
    work ran there ("AMD EPYC (x86_64), 2 cores, CPU only"; "NVIDIA H100 80GB HBM3, host AMD EPYC ...")."""
    host, device = host_label(), torch.device(device)
    if device.type == "cpu":
        return f"{host}, CPU only"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else str(device)
    return f"{name}, host {host}"


@dataclass(frozen=True)
class Profile:
    device: str  # "cpu" or the CUDA device's name
    device_memory_bytes: int | None
    host: str
    dtype: str
    expert_bytes: int
    host_copy_gbps: float  # host-to-host memcpy (what an emulated link costs the CPU)
    h2d_pinned_gbps: float | None  # CUDA only
    h2d_pageable_gbps: float | None  # CUDA only
    disk_read_gbps: float  # expert reads from the checkpoint with the page cache dropped first
    expert_host_ms: dict[str, float]  # tokens -> ms for one expert on the host
    expert_device_ms: dict[str, float] | None  # CUDA only
    recommend_experts_on: str
    reason: str
    decode_layer_ms: float | None = None  # non-expert time of one MoE layer in a decode step (every expert resident)
    load_overhead_ms: float | None = None  # one critical load's round trip beyond its byte time (thread hand-overs)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        write_text_atomic(path, json.dumps(asdict(self), indent=2) + "\n")


def _time(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def copy_gbps(src: torch.Tensor, dst: torch.Tensor, repeats: int = 10) -> float:
    sync = torch.cuda.synchronize if dst.is_cuda else (lambda: None)
    seconds = _time(lambda: dst.copy_(src, non_blocking=True), repeats, sync)
    return src.numel() * src.element_size() / seconds / 1e9


def pinned_h2d_gbps(device: torch.device, nbytes: int = 64 * 2**20) -> float:
    """The host-to-`device` copy speed from pinned memory, GB/s (what the loader's copies get on CUDA)."""
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    return copy_gbps(src, torch.empty_like(src, device=device))


def expert_ms(module: torch.nn.Module, weights: dict[str, torch.Tensor], hidden: int, dtype: torch.dtype,
              device: torch.device, repeats: int = 20) -> dict[str, float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {}
    with torch.inference_mode():
        for tokens in TOKENS:
            x = torch.randn(tokens, hidden, dtype=dtype, device=device)
            out[str(tokens)] = 1e3 * _time(lambda: expert_forward(module, weights, x), repeats, sync)
    return out


def decode_layer_ms(engine, expert_ms_1: float, prompt_ids: list[int], new_tokens: int = 32, runs: int = 5) -> float:
    """Decode with every expert resident (`engine` loaded with all slots; a warm-up run fills them):
    the median step time less its routed experts' measured compute, per MoE layer. It holds the
    attention, norms, routers, lm_head and sampling, and the runtime's per-expert overhead."""
    from activemoe.config import SamplingConfig

    greedy = SamplingConfig(do_sample=False)
    for _ in range(2):  # warm-up: loads every expert, warms the allocator
        engine.generate(prompt_ids, max_new_tokens=new_tokens, sampling=greedy)
    steps = []
    for _ in range(runs):
        steps += engine.generate(prompt_ids, max_new_tokens=new_tokens, sampling=greedy).stats.per_token_s
    step_ms = sorted(steps)[len(steps) // 2] * 1e3
    layers = len(engine.runtime.store.layers)
    return max(0.0, step_ms / layers - engine.top_k * expert_ms_1)


def load_overhead_ms(model_dir, device: str, dtype: str, link_gbps: float, emulate: bool, repeats: int = 24) -> float:
    """What one critical load costs beyond its bytes over the link: the loader's thread hand-overs (and,
    over an emulated link, its sleep overshoot). Median round trip of a miss (queue it, wait for it,
    release it) through the engine's own loader, minus bytes / link."""
    from activemoe.config import CacheConfig, EngineConfig, LinkConfig
    from activemoe.engine import load

    config = EngineConfig(device=device, dtype=dtype, cache=CacheConfig(slot_fraction=0.0),
                          link=LinkConfig(link_gbps if emulate else None))
    with load(model_dir, config) as eng:  # top-k slots: cycling through every expert misses each time
        loader, eids = eng.runtime.loader, eng.runtime.store.experts()
        times = []
        for i in range(repeats + 2):
            start = time.perf_counter()
            ready, waiting = loader.begin_layer(i, [eids[i % len(eids)]], [])
            for _, slot in ready:
                loader.release(slot)
            if waiting:
                loader.release(loader.wait_any(set(waiting))[1])
            times.append(time.perf_counter() - start)
        byte_s = loader.slab.expert_bytes / (link_gbps * 1e9)
    return max(0.0, sorted(times[2:])[repeats // 2] - byte_s) * 1e3


def disk_read_gbps(store: ExpertStore, max_experts: int = 32) -> float:
    """Read experts straight from the checkpoint after dropping its pages from the page cache."""
    for path in store.index.files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    eids = store.experts()[:: max(1, len(store.experts()) // max_experts)][:max_experts]
    start = time.perf_counter()
    for eid in eids:
        store.read_from_checkpoint(eid)
    return len(eids) * store.expert_bytes / (time.perf_counter() - start) / 1e9


def _hidden_size(store: ExpertStore) -> int:
    first = next(iter(store.spec.shapes.values()))
    return first[0] if store.spec.is_transposed else first[-1]


def profile_host_expert(module: torch.nn.Module, store: ExpertStore, repeats: int = 20) -> MissCostModel:
    """Measured host time of one expert of `module`'s shape on 1 and 8 tokens; a linear fit of the two."""
    weights = store.read(ExpertId(store.layers[0], 0))
    ms = expert_ms(module, weights, _hidden_size(store), store.dtype, torch.device("cpu"), repeats)
    per_token = max(0.0, (ms["8"] - ms["1"]) / 7 / 1e3)
    return MissCostModel(host_base_s=max(0.0, ms["1"] / 1e3 - per_token), host_per_token_s=per_token)


def profile(module: torch.nn.Module, store: ExpertStore, device: torch.device) -> Profile:
    """Measure this machine for one model (its expert shape and dtype) on `device`."""
    host_weights = store.read_from_checkpoint(ExpertId(store.layers[0], 0))
    hidden = _hidden_size(store)
    buf = torch.empty(64 * 2**20, dtype=torch.uint8)
    host_copy = copy_gbps(buf, torch.empty_like(buf))
    pinned = pageable = device_ms = None
    memory, name = None, "cpu"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, memory = props.name, props.total_memory
        target = torch.empty_like(buf, device=device)
        pinned = pinned_h2d_gbps(device, buf.numel())
        pageable = copy_gbps(buf, target)
        device_ms = expert_ms(module, {k: v.to(device) for k, v in host_weights.items()}, hidden, store.dtype, device)
    host_ms = expert_ms(module, host_weights, hidden, store.dtype, torch.device("cpu"))
    link = pinned if pinned else host_copy
    transfer_ms = store.expert_bytes / (link * 1e9) * 1e3
    if device.type == "cpu":
        choice, reason = "host", "the compute device is the host: experts need no transfer at all"
    elif host_ms["1"] < transfer_ms:
        choice = "auto"
        reason = (f"one expert on the host takes {host_ms['1']:.2f} ms for 1 token, less than its "
                  f"{transfer_ms:.2f} ms transfer: compute late misses on the host")
    else:
        choice = "device"
        reason = f"a transfer ({transfer_ms:.2f} ms) beats host compute ({host_ms['1']:.2f} ms)"
    return Profile(device=name, device_memory_bytes=memory, host=host_label(),
                   dtype=str(store.dtype).removeprefix("torch."), expert_bytes=store.expert_bytes,
                   host_copy_gbps=host_copy, h2d_pinned_gbps=pinned, h2d_pageable_gbps=pageable,
                   disk_read_gbps=disk_read_gbps(store), expert_host_ms=host_ms, expert_device_ms=device_ms,
                   recommend_experts_on=choice, reason=reason)


def measure(model_dir, device: str = "cpu", dtype: str = "float32") -> Profile:
    """Everything `activemoe profile` measures for a model: `profile()` on its expert shape, the decode
    time per MoE layer with every expert resident, and the loader's per-load overhead (over an emulated
    link where one expert takes ~1 ms on CPU; over the real one on CUDA)."""
    from dataclasses import replace

    from activemoe.config import CacheConfig, EngineConfig
    from activemoe.engine import load
    from activemoe.families import offloaded_modules

    probe = EngineConfig(device=device, dtype=dtype, store="disk", cache=CacheConfig(slot_fraction=0.0))
    with load(model_dir, probe) as eng:
        result = profile(next(iter(offloaded_modules(eng.model).values())), eng.runtime.store, eng.device)
    resident = EngineConfig(device=device, dtype=dtype, cache=CacheConfig(slot_fraction=1.0))
    with load(model_dir, resident) as eng:  # the simulator's per-layer time (costmodel.from_profile)
        expert_ms_1 = (result.expert_device_ms or result.expert_host_ms)["1"]
        prompt = list(range(3, 3 + min(16, eng.vocab_size - 3)))
        result = replace(result, decode_layer_ms=decode_layer_ms(eng, expert_ms_1, prompt))
    cuda = device.startswith("cuda")
    link = result.h2d_pinned_gbps if cuda else result.expert_bytes / 1e-3 / 1e9
    return replace(result, load_overhead_ms=load_overhead_ms(model_dir, device, dtype, link, emulate=not cuda))

