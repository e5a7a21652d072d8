"""baselines.py: the systems a benchmark compares, each run through its own real code path: ActiveMoE
configurations, plain transformers with every expert resident, and Hugging Face accelerate's offload
(`dispatch_model` with a device map that offloads the experts). Runners know nothing about tables.

Spec names: `transformers`, `accelerate`, `reactive` (on-demand LRU), `host` (experts computed on the
host), and predictive configurations `PREDICTOR[+POLICY][@LOOKAHEAD]`, e.g. `learned+slru@2`.
"""
from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch

import activemoe
from activemoe.config import EngineConfig, PrefetchConfig, SamplingConfig
from activemoe.engine import TimingStreamer, left_pad, pad_token_of, peak_rss_bytes, plain_model, top_k_of
from activemoe.errors import UserError
from activemoe.families import experts_classes, experts_modules
from activemoe.policies import POLICIES
from activemoe.predictors import PREDICTORS
from activemoe.replay import ReplayRouting
from activemoe.slots import EmulatedLink
from activemoe.trace import load_trace

GREEDY = SamplingConfig(do_sample=False)
FIXED = ("transformers", "accelerate", "reactive", "host")
_PREDICTIVE = re.compile(r"(?P<predictor>[a-z]+)(?:\+(?P<policy>[a-z]+))?(?:@(?P<lookahead>\d+))?")


@dataclass(frozen=True)
class RunResult:
    sequences: list[list[int]]
    ttft_s: float
    per_token_s: tuple[float, ...]  # wall time of each decode step (all sequences of the batch)
    batch_size: int
    peak_host_bytes: int  # this process's peak RSS during the run (reset before it)
    peak_device_bytes: int | None  # CUDA peak allocated; None on CPU (the host figure covers it)
    hit_rate: float | None = None  # ActiveMoE only: the engine's GenerationStats (decode steps' hit rate)
    recall: dict[str, float] = field(default_factory=dict)
    decode_bytes_per_token: float | None = None
    stall_s: float | None = None
    overlap: float | None = None
    reuse: float | None = None
    prefill_bytes_needed: int | None = None
    predict_share: float | None = None  # share of decode wall time spent predicting (in place)

    @property
    def decode_tok_s(self) -> float:
        """Tokens of all sequences per second of decode."""
        total = sum(self.per_token_s)
        return len(self.per_token_s) * self.batch_size / total if total > 0 else 0.0


class Runner(Protocol):
    name: str

    def run(self, prompts: list[list[int]], new_tokens: int) -> RunResult: ...

    def close(self) -> None: ...


def engine_config(spec: str, base: EngineConfig) -> EngineConfig:
    """The EngineConfig of an ActiveMoE spec name (`reactive`, `host`, `learned+slru@2`, ...)."""
    plain = PrefetchConfig(chunk_bytes=base.prefetch.chunk_bytes)  # no predictor; the copy granularity kept
    if spec == "reactive":
        return replace(base, prefetch=plain, cache=replace(base.cache, policy="lru"))
    if spec == "host":
        return replace(base, experts_on="host", prefetch=plain)
    match = _PREDICTIVE.fullmatch(spec)
    if match is None or match["predictor"] not in PREDICTORS or (match["policy"] or "lru") not in POLICIES:
        raise UserError(f"unknown baseline {spec!r}; known: {', '.join(FIXED)}, or PREDICTOR[+POLICY][@LOOKAHEAD] "
                        f"with predictors {', '.join(p for p in PREDICTORS if p != 'none')} and policies "
                        f"{', '.join(sorted(POLICIES))}, e.g. learned+slru@2")
    prefetch = replace(base.prefetch, predictor=match["predictor"], lookahead=int(match["lookahead"] or 2))
    return replace(base, prefetch=prefetch, cache=replace(base.cache, policy=match["policy"] or "lru"))


def make_runner(spec: str, model_dir: Path, base: EngineConfig) -> Runner:
    if spec in ("transformers", "accelerate"):
        runner = (TransformersRunner if spec == "transformers" else AccelerateRunner)(model_dir, base)
        if base.replay_routing:  # the same forced routing as the ActiveMoE runs, reset before each run
            experts = experts_modules(runner.model)
            runner.replay = ReplayRouting(load_trace(base.replay_routing), list(experts),
                                          next(iter(experts.values())).num_experts, top_k_of(runner.model.config))
            runner.replay.install(experts)
        return runner
    return ActiveMoERunner(spec, model_dir, engine_config(spec, base))


def reset_peaks(device: torch.device) -> None:
    """Start a fresh peak: VmHWM via /proc/self/clear_refs (Linux), and CUDA's allocator peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


class ActiveMoERunner:
    def __init__(self, name: str, model_dir: Path, config: EngineConfig):
        self.name, self.engine = name, activemoe.load(model_dir, config)

    def run(self, prompts: list[list[int]], new_tokens: int) -> RunResult:
        self.engine.reset_cache()  # every run starts cold
        reset_peaks(self.engine.device)
        out = self.engine.generate(prompts, max_new_tokens=new_tokens, sampling=GREEDY)
        s = out.stats
        return RunResult(out.sequences, s.ttft_s, s.per_token_s, len(prompts), peak_rss_bytes(),
                         device_peak(self.engine.device), s.decode_hit_rate, s.recall, s.decode_bytes_per_token, s.stall_s,
                         s.overlap, s.reuse, s.prefill_bytes_needed, s.predict_share)

    def close(self) -> None:
        self.engine.close()


def _timed_generate(model, prompts: list[list[int]], new_tokens: int, device: torch.device,
                    replay: ReplayRouting | None) -> RunResult:
    pad = pad_token_of(model.generation_config)
    ids, mask = left_pad(prompts, pad, device)
    if replay is not None:
        replay.reset()
    reset_peaks(device)
    timer = TimingStreamer()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, streamer=timer,
                             pad_token_id=pad)
    steps = tuple(b - a for a, b in zip(timer.times, timer.times[1:]))
    return RunResult(out[:, ids.shape[1]:].tolist(), timer.times[0] - timer.start, steps, len(prompts),
                     peak_rss_bytes(), device_peak(device))


class TransformersRunner:
    """Plain transformers, every expert resident on the compute device (when it fits)."""

    name = "transformers"
    replay: ReplayRouting | None = None

    def __init__(self, model_dir: Path, config: EngineConfig):
        self.device = torch.device(config.device)
        self.model = plain_model(model_dir, config.dtype).to(self.device)

    def run(self, prompts: list[list[int]], new_tokens: int) -> RunResult:
        return _timed_generate(self.model, prompts, new_tokens, self.device, self.replay)

    def close(self) -> None:
        del self.model


class _PacedWeights(Mapping):
    """accelerate's weights map, each fetched tensor paced to the emulated link (as ActiveMoE's copies are)."""

    def __init__(self, inner: Mapping, link: EmulatedLink):
        self.inner, self.link = inner, link

    def __getitem__(self, key):
        start = time.perf_counter()
        value = self.inner[key]
        self.link.pace(start, value.numel() * value.element_size())
        return value

    def __iter__(self):
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)


class AccelerateRunner:
    """accelerate's documented big-model offload: `dispatch_model` with the routed experts offloaded
    (to host RAM on CUDA; on CPU to an `offload_dir` on disk, whose page cache is dropped before every
    experts forward so reads are not served from RAM, and paced to the emulated link when one is set).
    transformers' own `from_pretrained(device_map=..., offload_folder=...)` cannot offload experts that
    are fused on load (5.23 raises "gate_up_proj is on the meta device"), hence dispatch_model."""

    name = "accelerate"
    replay: ReplayRouting | None = None

    def __init__(self, model_dir: Path, config: EngineConfig):
        from accelerate import dispatch_model

        self.device = torch.device(config.device)
        model = plain_model(model_dir, config.dtype)
        classes = tuple(experts_classes(type(model), stand_in=False))
        offload_to = "cpu" if self.device.type == "cuda" else "disk"
        device_map = _device_map(model, classes, str(self.device), offload_to)
        self._dir = tempfile.TemporaryDirectory(prefix="activemoe-accelerate-")
        self.model = dispatch_model(model, device_map=device_map, offload_dir=self._dir.name,
                                    main_device=str(self.device))
        link = EmulatedLink(config.link.link_gbps) if self.device.type == "cpu" else None
        for name, module in self.model.named_modules():
            if isinstance(module, classes):
                if link is not None and link.bytes_per_s:
                    module._hf_hook.weights_map = _PacedWeights(module._hf_hook.weights_map, link)
                if offload_to == "disk":
                    files = sorted(Path(self._dir.name).glob(f"{name}.*.dat"))
                    module.register_forward_pre_hook(lambda *_, files=files: _drop_page_cache(files))

    def run(self, prompts: list[list[int]], new_tokens: int) -> RunResult:
        return _timed_generate(self.model, prompts, new_tokens, self.device, self.replay)

    def close(self) -> None:
        del self.model
        self._dir.cleanup()


def _device_map(model: torch.nn.Module, classes: tuple[type, ...], device: str, offload_to: str) -> dict[str, str]:
    """Every leaf-level module on `device`, except the experts modules, which go to `offload_to`; a module
    holding experts below it has its own parameters and buffers placed one by one (Gemma 4's layer scalar)."""
    out = {}

    def walk(prefix: str, module: torch.nn.Module) -> None:
        for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            out[f"{prefix}{name}"] = device
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, classes):
                out[full] = offload_to
            elif any(isinstance(m, classes) for m in child.modules()):
                walk(full + ".", child)
            else:
                out[full] = device

    walk("", model)
    return out


def _drop_page_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
