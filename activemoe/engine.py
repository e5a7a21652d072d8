"""engine.py wires store + slots + cache + runtime around a transformers model and generates.

`load(model_dir, config)` uses transformers' own `from_pretrained` for everything except the routed
experts (never materialised by transformers; the store reads them one at a time). The engine knows
nothing about the command line.
"""
from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from activemoe.cache import ExpertCache
from activemoe.config import CacheConfig, EngineConfig, SamplingConfig
from activemoe.errors import UserError
from activemoe.families import experts_classes, experts_without_weights, offloaded_modules, unsupported_message
from activemoe.policies import make_policy
from activemoe.runtime import IMPLEMENTATION, ExpertRuntime
from activemoe.slots import SlotSlab
from activemoe.store import CheckpointIndex, ExpertStore, model_dir_of

log = logging.getLogger(__name__)
_TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k")


def peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM, not getrusage: Linux carries ru_maxrss across exec from the parent."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS


@dataclass(frozen=True)
class LoadStats:
    model_rss_bytes: int  # peak RSS once transformers has loaded the non-expert weights
    host_store_bytes: int  # host copies of all routed experts
    slab_bytes: int  # device slots
    num_slots: int
    total_experts: int
    expert_bytes: int
    load_s: float


@dataclass(frozen=True)
class GenerationStats:
    hit_rate: float
    loads: int
    evictions: int
    bytes_moved: int
    ttft_s: float
    decode_tok_s: float
    peak_rss_bytes: int
    stall_s: float  # time the compute path spent loading experts


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    stats: GenerationStats


class _TimingStreamer:
    """transformers streamer protocol: first put() is the prompt, then one call per new token."""

    def __init__(self, on_token: Callable[[int], None] | None):
        self.on_token, self.times, self._prompt_seen = on_token, [], False
        self.start = time.perf_counter()

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        if self.on_token:
            for token in value.reshape(-1).tolist():
                self.on_token(token)

    def end(self) -> None:
        pass


class Engine:
    def __init__(self, model, tokenizer, runtime: ExpertRuntime, load_stats: LoadStats, top_k: int):
        self.model, self.tokenizer, self.runtime = model, tokenizer, runtime
        self.load_stats, self.top_k = load_stats, top_k
        self.device = next(model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise UserError("this checkpoint has no tokenizer; pass --prompt-ids instead of --prompt")
        return self.tokenizer(text)["input_ids"]

    def decode(self, ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int = 32, sampling: SamplingConfig = SamplingConfig(),
                 on_token: Callable[[int], None] | None = None) -> Generation:
        if not prompt_ids:
            raise UserError("the prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise UserError(f"prompt ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        kwargs = {k: v for k, v in (("do_sample", sampling.do_sample), ("temperature", sampling.temperature),
                                    ("top_p", sampling.top_p)) if v is not None}
        gen_config = self.model.generation_config
        if gen_config.pad_token_id is None:
            kwargs["pad_token_id"] = gen_config.eos_token_id if gen_config.eos_token_id is not None else 0
        ids = torch.tensor([prompt_ids], device=self.device)
        self.runtime.stats.get_and_reset()
        streamer = _TimingStreamer(on_token)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  streamer=streamer, **kwargs)
        rt = self.runtime.stats.get_and_reset()
        times = streamer.times
        decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
        stats = GenerationStats(hit_rate=rt.hit_rate, loads=rt.loads, evictions=rt.evictions,
                                bytes_moved=rt.bytes_moved, ttft_s=(times[0] - streamer.start) if times else 0.0,
                                decode_tok_s=decode, peak_rss_bytes=peak_rss_bytes(), stall_s=rt.load_s)
        return Generation(token_ids=out[0, len(prompt_ids):].tolist(), stats=stats)


def num_slots_for(cache: CacheConfig, total_experts: int, expert_bytes: int, top_k: int) -> int:
    if cache.num_slots is not None:
        slots = cache.num_slots
        if slots < top_k:
            raise UserError(f"--cache-experts {slots} is smaller than one layer's top-k; the minimum is {top_k}")
    elif cache.expert_memory_bytes is not None:
        slots = cache.expert_memory_bytes // expert_bytes
        if slots < top_k:
            raise UserError(f"--expert-memory {cache.expert_memory_bytes} B holds {slots} experts; the minimum is "
                            f"{top_k} experts = {top_k * expert_bytes} B")
    else:
        slots = max(top_k, round(cache.slot_fraction * total_experts))
    return min(slots, total_experts)


def _top_k(config) -> int:
    for name in _TOP_K_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA device is available")
    return device


def load(model_dir: str | Path, config: EngineConfig = EngineConfig(),
         on_progress: Callable[[int, int], None] | None = None) -> Engine:
    start = time.perf_counter()
    model_dir = model_dir_of(model_dir)
    device = _device(config.device)
    dtype = getattr(torch, config.dtype)
    policy = make_policy(config.cache.policy)
    try:
        hf_config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {model_dir / 'config.json'}: {e}") from None
    model_class = AutoModelForCausalLM._model_mapping.get(type(hf_config), None)
    classes = experts_classes(model_class) if model_class is not None else []
    if not classes:
        raise UserError(unsupported_message(hf_config.model_type))
    index = CheckpointIndex(model_dir)

    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # the skipped expert keys would be reported as "unused"
    transformers.logging.disable_progress_bar()  # the caller shows its own progress
    try:
        with experts_without_weights(classes):
            model, info = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=dtype, experts_implementation=IMPLEMENTATION, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    if info["missing_keys"]:
        raise UserError(f"checkpoint in {model_dir} lacks non-expert weights: {sorted(info['missing_keys'])[:5]}")
    model.to(device)
    model_rss = peak_rss_bytes()

    experts = offloaded_modules(model)
    if not experts:
        raise UserError(f"{model_dir} has no MoE layers with routed experts ({unsupported_message(hf_config.model_type)})")
    store = ExpertStore(index, {layer: m._activemoe_spec for layer, m in experts.items()}, dtype,
                        pin=device.type == "cuda")
    store.preload(on_progress)
    top_k = _top_k(hf_config)
    total = len(store.experts())
    num_slots = num_slots_for(config.cache, total, store.expert_bytes, top_k)
    slab = SlotSlab(num_slots, store.spec.shapes, dtype, device)
    runtime = ExpertRuntime(store, slab, ExpertCache(num_slots, policy))
    for layer, module in experts.items():
        module._activemoe_runtime, module._activemoe_layer = runtime, layer
    tokenizer = _tokenizer(model_dir)
    stats = LoadStats(model_rss_bytes=model_rss, host_store_bytes=store.expert_bytes * total, slab_bytes=slab.nbytes,
                      num_slots=num_slots, total_experts=total, expert_bytes=store.expert_bytes,
                      load_s=time.perf_counter() - start)
    log.info("loaded %s: %s", model_dir, asdict(stats))
    return Engine(model, tokenizer, runtime, stats, top_k)


def _tokenizer(model_dir: Path):
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # a broken tokenizer should not block --prompt-ids use
        log.warning("cannot load the tokenizer in %s: %s", model_dir, e)
        return None
