"""engine.py wires store + slots + cache + runtime around a transformers model and generates.

`load(model_dir, config)` uses transformers' own `from_pretrained` for everything except the routed
experts (never materialised by transformers; the store reads them one at a time). The engine knows
nothing about the command line.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer

from activemoe import llama4, quant
from activemoe.cache import ExpertCache
from activemoe.compressed import CompressedStore, Int4Substitute
from activemoe.config import (EXPERTS_ON, ROUTING, CacheConfig, EngineConfig, PrefetchConfig, SamplingConfig,
                              chunk_bytes_for)
from activemoe.errors import UserError
from activemoe.families import (auto_class, experts_classes, experts_without_weights, offloaded_modules, router_parts,
                                routers, unsupported_message)
from activemoe.hardware import pinned_h2d_gbps, profile_host_expert
from activemoe.learned import SIDECAR, LearnedPredictor, load_heads
from activemoe.loader import Loader
from activemoe.loader_core import first_layer_reserve
from activemoe.policies import FUTURE_POLICIES, LEARNED_POLICIES, Belady, Reuse, make_policy
from activemoe.plan import MemoryPlan, ModelShape, kv_bytes_per_token, plan
from activemoe.pregated import PregatedRouting
from activemoe.predictors import (PREDICTORS, AdaptivePredictor, HistoryPredictor, NoPredictor, OraclePredictor,
                                  PregatePredictor)
from activemoe.runtime import IMPLEMENTATION, ExpertRuntime
from activemoe.scheduler import PrefetchScheduler
from activemoe.slots import CompressedSlab, EmulatedLink, SlotSlab
from activemoe.store import TIERS, CheckpointIndex, ExpertStore, model_dir_of
from activemoe.replay import ReplayRouting
from activemoe.reuse import ReuseScorer, load_reuse_heads
from activemoe.trace import Recorder, Trace, load_trace, shape_id

log = logging.getLogger(__name__)
_TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k", "top_k_experts")  # Gemma 4: the last


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
    hit_rate: float  # routed activations whose expert was READY when routed (prompt and decode)
    loads: int  # slots filled (critical + speculative)
    evictions: int
    bytes_moved: int  # bytes copied into slots
    ttft_s: float
    decode_tok_s: float
    peak_rss_bytes: int
    stall_s: float  # time the compute path waited on expert loads
    overlap: float  # share of transfer time during which the compute path was not stalled
    critical_loads: int  # loads the compute path had to wait for (misses)
    speculative_loads: int  # loads started on a prediction
    wasted_loads: int  # speculative loads evicted before any use
    late_loads: int  # speculative loads the compute path had to wait for (predicted, not landed when routed)
    host_computed: int  # experts computed from their host copy
    recall: dict[str, float] = field(default_factory=dict)  # lookahead k -> live recall@k over decode steps
    decode_bytes_per_token: float = 0.0  # bytes copied into slots per decode step (prefill excluded)
    per_token_s: tuple[float, ...] = ()  # wall time of each decode step
    batch_size: int = 1
    decode_hit_rate: float = 0.0  # hit rate of the decode steps alone
    reuse: float = 0.0  # decode activations per distinct expert per layer step (> 1 when a batch shares experts)
    prefill_bytes_needed: int = 0  # distinct experts the prompt routed x expert bytes (the TTFT link floor's bytes)
    late_miss_int4: int = 0  # critical misses computed from their int4 copy (--late-miss int4, approximate)
    predict_share: float = 0.0  # share of decode wall time in the predictor and its announcer (measured in place)
    predict_waiting_share: float = 0.0  # share of decode wall time in the predictor's deferred work, done while the
    # compute path waited on a load (so not on its critical path; counted in stall_s, not in predict_share)
    predictor_rested: float = 0.0  # share of decode MoE-layer calls at which the predictor rested (nothing was loading)


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]  # the new tokens of the first (or only) sequence
    stats: GenerationStats
    sequences: list[list[int]] = field(default_factory=list)  # new tokens of every sequence of the batch


class TimingStreamer:
    """transformers streamer protocol: first put() is the prompt, then one call per new token (step);
    records each step's time and `bytes_moved()`, calls `on_first` once the prompt is done."""

    def __init__(self, on_token: Callable[[int], None] | None = None, bytes_moved: Callable[[], int] = lambda: 0,
                 on_first: Callable[[], None] = lambda: None, on_step: Callable[[torch.Tensor], None] = lambda _: None):
        self.on_token, self.times, self.bytes, self._prompt_seen = on_token, [], [], False
        self.bytes_moved, self.on_first, self.on_step = bytes_moved, on_first, on_step
        self.start = time.perf_counter()

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.bytes.append(self.bytes_moved())
        if len(self.times) == 1:
            self.on_first()
        self.on_step(value)
        if self.on_token:
            for token in value.reshape(-1).tolist():
                self.on_token(token)

    def end(self) -> None:
        pass


class Engine:
    def __init__(self, model, tokenizer, runtime: ExpertRuntime, load_stats: LoadStats, top_k: int,
                 config: EngineConfig):
        self.model, self.tokenizer, self.runtime = model, tokenizer, runtime
        self.load_stats, self.top_k, self.config = load_stats, top_k, config
        self.device = next(model.parameters()).device
        weakref.finalize(self, runtime.loader.close)  # an engine dropped without close() stops its threads

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the loader and I/O threads; the engine cannot generate afterwards."""
        self.runtime.loader.close()

    @property
    def shape_id(self) -> str:
        return _shape_id(self.model.config, self.runtime.store.layers, self.runtime.store.num_experts)

    def trace_meta(self) -> dict[str, str]:
        c = self.model.config.get_text_config()
        return {"model_type": self.model.config.model_type, "num_experts": str(self.runtime.store.num_experts),
                "top_k": str(self.top_k), "hidden_size": str(c.hidden_size),
                "layers": json.dumps(self.runtime.store.layers), "shape_id": self.shape_id}

    @torch.inference_mode()
    def record_trace(self, chunks: list[list[int]], keep_hidden: bool = True, on_progress=None,
                     new_tokens: int = 0) -> Trace:
        """Forward each token chunk (teacher-forced, no sampling) and record every layer's routing; with
        `new_tokens`, each chunk is a prompt, and its greedy continuation's decode steps are recorded too."""
        if self.top_k > 1 and any(isinstance(m, llama4.Llama4Experts) for m in self.model.modules()):
            raise UserError(f"a Llama 4 model's experts run on one row per routed expert (llama4.py): a trace needs "
                            f"one row per token, so top-1 routing, as Llama 4 was released; this one routes {self.top_k}")
        recorder = Recorder(self.runtime.store.layers[0], keep_hidden)
        self.runtime.recorder = recorder
        try:
            for i, chunk in enumerate(chunks):
                if new_tokens:
                    self._generate([chunk], new_tokens, SamplingConfig(do_sample=False), None)
                else:
                    self.runtime.begin()
                    self.model(torch.tensor([chunk], device=self.device), use_cache=False)
                if on_progress:
                    on_progress(i + 1, len(chunks))
        finally:
            self.runtime.recorder = None
        return recorder.trace(self.trace_meta())

    @torch.inference_mode()
    def perplexity(self, chunks: list[list[int]], on_progress=None) -> tuple[float, int]:
        """Teacher-forced perplexity over token chunks (each predicts its own next tokens); returns
        (perplexity, tokens predicted). Under --routing pregated this measures its quality cost."""
        nll, count = 0.0, 0
        for i, chunk in enumerate(chunks):
            if len(chunk) < 2:
                continue
            self.runtime.begin()
            ids = torch.tensor([chunk], device=self.device)
            logits = self.model(ids, use_cache=False).logits[0, :-1].float()  # [L-1, V]
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += len(chunk) - 1
            if on_progress:
                on_progress(i + 1, len(chunks))
        if count == 0:
            raise UserError("no tokens to score")
        return math.exp(nll / count), count

    @property
    def all_resident(self) -> bool:
        return self.load_stats.num_slots >= self.load_stats.total_experts

    def reset_cache(self) -> None:
        """Empty all slots, so the next generation starts cold; when every expert has a slot they were
        loaded at start and stay (nothing to reset)."""
        if not self.all_resident:
            self.runtime.loader.reset()

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise UserError("this checkpoint has no tokenizer; pass --prompt-ids instead of --prompt")
        return encode_text(self.tokenizer, text)

    def decode(self, ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int] | list[list[int]], max_new_tokens: int = 32,
                 sampling: SamplingConfig = SamplingConfig(), on_token: Callable[[int], None] | None = None
                 ) -> Generation:
        """Generate for one prompt, or a batch of prompts (a list of lists; left-padded, and each step's
        expert loads shared by all sequences). With the oracle predictor, a first identical pass records
        the routing to replay."""
        batch = _as_batch(prompt_ids)
        if not all(batch):
            raise UserError("the prompt is empty")
        bad = [t for p in batch for t in p if not 0 <= t < self.vocab_size]
        if bad:
            raise UserError(f"prompt ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")
        if max_new_tokens < 1:
            raise UserError("max_new_tokens must be at least 1")
        check_context(self.model.config, max(map(len, batch)), max_new_tokens)
        if len(batch) > 1 and on_token is not None:
            raise UserError("streaming tokens needs a single prompt")
        prompt_ids = batch
        if self.config.prefetch.predictor == "oracle":
            if sampling.seed is None and sampling.do_sample is not False:
                sampling = SamplingConfig(sampling.do_sample, sampling.temperature, sampling.top_p,
                                          seed=int(torch.randint(2**31, ()).item()))
            events = self.routing_of(prompt_ids, max_new_tokens, sampling)
            self.runtime.predictor = OraclePredictor(events, self.config.prefetch.lookahead)
            self.reset_cache()
            if self.config.cache.policy == "belady":
                self.runtime.loader.cache.policy = Belady(self.runtime.predictor.next_use, self.runtime.predictor.now)
        return self._generate(prompt_ids, max_new_tokens, sampling, on_token)

    def routing_of(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig
                   ) -> list[tuple[int, tuple[int, ...]]]:
        """Generate once and return the routing of every MoE-layer call, in order (the oracle's input)."""
        recorder = Recorder(self.runtime.store.layers[0], keep_hidden=False)
        self.runtime.recorder = recorder
        try:
            self._generate(_as_batch(prompt_ids), max_new_tokens, sampling, None)
        finally:
            self.runtime.recorder = None
        return recorder.events()

    def _generate(self, prompt_ids, max_new_tokens, sampling, on_token) -> Generation:
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        kwargs = {k: v for k, v in (("do_sample", sampling.do_sample), ("temperature", sampling.temperature),
                                    ("top_p", sampling.top_p)) if v is not None}
        gen_config = self.model.generation_config
        if gen_config.pad_token_id is None:
            kwargs["pad_token_id"] = gen_config.eos_token_id if gen_config.eos_token_id is not None else 0
        ids, mask = left_pad(prompt_ids, pad_token_of(gen_config), self.device)
        width = ids.shape[1]
        loader = self.runtime.loader
        self.runtime.begin()
        if self.replay is not None:
            self.replay.reset()
        for stats in (self.runtime.stats, loader.stats, loader.cache.stats, loader.scheduler.stats):
            stats.get_and_reset()
        self.runtime.recall_and_reset()
        embed = self.model.get_input_embeddings()

        def sampled(tokens: torch.Tensor) -> None:  # the next step's tokens [B]: its token stage starts now
            if len(streamer.times) < max_new_tokens and getattr(self.runtime.predictor, "sees_tokens", False):
                self.runtime.tokens(embed(tokens.to(self.device)))

        streamer = TimingStreamer(on_token, lambda: loader.stats.bytes_moved + self.runtime.stats.late_miss_bytes,
                                   on_first=lambda: setattr(self.runtime, "decoding", True), on_step=sampled)
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, streamer=streamer, **kwargs)
        rt, ld = self.runtime.stats.get_and_reset(), loader.stats.get_and_reset()
        cs, ss = loader.cache.stats.get_and_reset(), loader.scheduler.stats.get_and_reset()
        times = streamer.times
        steps = tuple(b - a for a, b in zip(times, times[1:]))
        decode_s = sum(steps)
        share = lambda seconds: seconds / decode_s if decode_s > 0 else 0.0  # noqa: E731  of decode wall time
        stats = GenerationStats(
            hit_rate=rt.hit_rate, loads=cs.loads, evictions=cs.evictions, bytes_moved=ld.bytes_moved + rt.late_miss_bytes,
            ttft_s=(times[0] - streamer.start) if times else 0.0,
            decode_tok_s=len(steps) / decode_s if decode_s > 0 else 0.0,
            peak_rss_bytes=peak_rss_bytes(), stall_s=ld.stall_s,
            overlap=max(0.0, 1.0 - ld.stall_s / ld.busy_s) if ld.busy_s > 0 else 1.0,
            critical_loads=ss.critical, speculative_loads=cs.loads - ss.critical, wasted_loads=cs.wasted,
            late_loads=ss.promoted,
            host_computed=rt.host_computed, recall=self.runtime.recall_and_reset(), per_token_s=steps,
            decode_bytes_per_token=(streamer.bytes[-1] - streamer.bytes[0]) / len(steps) / len(prompt_ids)
            if steps else 0.0, batch_size=len(prompt_ids), reuse=rt.reuse, decode_hit_rate=rt.decode_hit_rate,
            prefill_bytes_needed=rt.prefill_experts * self.load_stats.expert_bytes,
            late_miss_int4=rt.late_miss_int4, predict_share=share(rt.decode_predict_s),
            predict_waiting_share=share(rt.decode_predict_waiting_s),
            predictor_rested=rt.decode_rested / rt.decode_layers if rt.decode_layers else 0.0)
        sequences = out[:, width:].tolist()
        return Generation(token_ids=sequences[0], stats=stats, sequences=sequences)


def pad_token_of(gen_config) -> int:
    """The token that pads a batch: the generation config's pad token, else its (first) EOS, else 0."""
    pad = gen_config.pad_token_id if gen_config.pad_token_id is not None else gen_config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad
    return 0 if pad is None else pad


def left_pad(prompts: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one batch: ids and attention mask, [B, P], padded on the left."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def _as_batch(prompt_ids: list[int] | list[list[int]]) -> list[list[int]]:
    return prompt_ids if prompt_ids and isinstance(prompt_ids[0], list) else [prompt_ids]


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


def compute_dtype(hf_config, name: str) -> torch.dtype:
    """`name`, or for "auto" the checkpoint's own dtype (as transformers' dtype="auto"), so that a bf16
    checkpoint is not doubled in host RAM, in the slots and on the link; float32 when its config names none
    or one ActiveMoE does not compute in."""
    if name != "auto":
        return getattr(torch, name)
    saved = getattr(hf_config.get_text_config(), "dtype", None)
    saved = getattr(torch, saved, None) if isinstance(saved, str) else saved
    return saved if saved in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def checkpoint_config(model_dir: str | Path):
    """The transformers config of the checkpoint in `model_dir`; a clear error when it cannot be read."""
    return _config(model_dir_of(model_dir))


def checkpoint_dtype(model_dir: str | Path, name: str) -> torch.dtype:
    """compute_dtype of the checkpoint in `model_dir`."""
    return compute_dtype(checkpoint_config(model_dir), name)


def plain_model(model_dir: str | Path, dtype_name: str = "auto") -> torch.nn.Module:
    """The checkpoint as plain transformers loads it to generate text (the baselines' and the tests' reference)."""
    config = checkpoint_config(model_dir)
    auto = auto_class(config)
    if auto is None:
        raise UserError(unsupported_message(config.model_type))
    return auto.from_pretrained(model_dir, dtype=compute_dtype(config, dtype_name))


def checkpoint_dtype_name(model_dir: str | Path, name: str) -> str:
    """checkpoint_dtype's name, as results and cost models print it ("auto" resolved)."""
    return dtype_name(checkpoint_dtype(model_dir, name))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_context(hf_config, prompt_tokens: int, new_tokens: int) -> None:
    """Refuse a generation longer than the model's context (max_position_embeddings), when its config names one."""
    limit = getattr(hf_config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and prompt_tokens + new_tokens > limit:
        raise UserError(f"a {prompt_tokens}-token prompt plus {new_tokens} new tokens exceeds the model's context of "
                        f"{limit} positions (max_position_embeddings); generate fewer tokens")


def model_shape(model_dir: str | Path, dtype_name: str = "auto", precision: str = "native") -> ModelShape:
    """The planner's view of a checkpoint: the model built on the meta device (no memory), experts
    stripped as the loader strips them, so resident bytes and expert shapes are exact. With precision
    mxfp4 the host tier and the link hold the checkpoint's MXFP4 bytes."""
    model_dir = model_dir_of(model_dir)
    hf_config = _config(model_dir)
    dtype = compute_dtype(hf_config, dtype_name)
    classes = _experts_classes(hf_config)
    with experts_without_weights(classes), torch.device("meta"):
        model = auto_class(hf_config).from_config(hf_config, dtype=dtype)
    experts = offloaded_modules(model)
    if not experts:
        raise UserError(f"{model_dir} has no MoE layers with routed experts ({unsupported_message(hf_config.model_type)})")
    spec = next(iter(experts.values()))._activemoe_spec
    tied = {id(p) for p in model.parameters()}
    resident = sum(p.numel() for p in model.parameters()) * dtype.itemsize + sum(
        b.numel() * b.element_size() for b in model.buffers() if id(b) not in tied)
    expert_bytes = sum(math.prod(s) for s in spec.shapes.values()) * dtype.itemsize
    text = hf_config.get_text_config()
    host_expert_bytes = None
    if precision == "mxfp4":
        store = ExpertStore(CheckpointIndex(model_dir), {layer: spec for layer in experts}, dtype, pin=False)
        host_expert_bytes = store.packed_bytes() if store.mxfp4 else None
    return ModelShape(resident_bytes=resident, expert_bytes=expert_bytes, total_experts=len(experts) * spec.num_experts,
                      top_k=top_k_of(hf_config), kv_bytes_per_token=kv_bytes_per_token(text, dtype.itemsize),
                      hidden_size=text.hidden_size, vocab_size=text.vocab_size, dtype_bytes=dtype.itemsize,
                      moe_layers=len(experts), host_expert_bytes=host_expert_bytes)


def memory_plan(model_dir: str | Path, config: EngineConfig) -> MemoryPlan:
    workspace = 256 * 2**20 if config.device.startswith("cuda") else 0  # allocator and cuBLAS workspace
    return plan(model_shape(model_dir, config.dtype, config.precision), config.cache.device_memory_bytes,
                config.cache.context_tokens, workspace_bytes=workspace)


def _config(model_dir: Path):
    """The checkpoint's config. MXFP4 experts (GPT-OSS) are read by the store (dequantised as they are read,
    or kept MXFP4 with --precision mxfp4), so their quantization config is dropped: transformers would
    otherwise swap in its own experts class."""
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {model_dir / 'config.json'}: {e}") from None
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = (quantization.get("quant_method") if isinstance(quantization, dict)
                  else getattr(quantization, "quant_method", None))
        if method != "mxfp4":
            raise UserError(f"{model_dir} is quantized with {method}; ActiveMoE reads unquantized checkpoints and "
                            "MXFP4 experts (GPT-OSS)")
        del config.quantization_config
    return config


def _experts_classes(hf_config) -> list[type]:
    auto = auto_class(hf_config)
    classes = experts_classes(auto._model_mapping[type(hf_config)]) if auto is not None else []
    if not classes:
        raise UserError(unsupported_message(hf_config.model_type))
    return classes


def top_k_of(config) -> int:
    config = config.get_text_config()  # a vision-language checkpoint's (Qwen3.5-MoE, Gemma 4) are its text model's
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
    policy = make_policy(config.cache.policy)
    _check_choices(config)
    hf_config = _config(model_dir)
    dtype = compute_dtype(hf_config, config.dtype)
    classes = _experts_classes(hf_config)
    index = CheckpointIndex(model_dir)
    budget = memory_plan(model_dir, config) if config.cache.device_memory_bytes is not None else None

    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # the skipped expert keys would be reported as "unused"
    transformers.logging.disable_progress_bar()  # the caller shows its own progress
    try:
        with experts_without_weights(classes):
            model, info = auto_class(hf_config).from_pretrained(
                model_dir, config=hf_config, dtype=dtype, experts_implementation=IMPLEMENTATION,
                output_loading_info=True)
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
                        pin=device.type == "cuda", tier=config.store)
    top_k = top_k_of(hf_config)
    total = len(store.experts())
    num_slots = budget.num_slots if budget else num_slots_for(config.cache, total, store.expert_bytes, top_k)
    # unpaced on CUDA: the real link's measured speed (given, or measured here: it pins and copies 64 MiB) sizes
    # the copy chunks, and --experts-on auto and --late-miss weigh a transfer's estimated time at it
    measured = None
    if device.type == "cuda" and not config.link.link_gbps:
        measured = config.link.measured_gbps or pinned_h2d_gbps(device)
    prefetch, link = config.prefetch, EmulatedLink(config.link.link_gbps, measured)
    chunk_bytes = chunk_bytes_for(prefetch.chunk_bytes, config.link.link_gbps or measured)
    if config.precision == "mxfp4" and not store.mxfp4:
        raise UserError(f"--precision mxfp4 keeps a checkpoint's own MXFP4 experts (GPT-OSS as released) as MXFP4; "
                        f"{model_dir} does not store its experts in MXFP4")
    if config.precision == "native":
        if config.store == "ram" and store.mxfp4:
            log.info("the experts are MXFP4: the host tier holds them in %s; --precision mxfp4 keeps the checkpoint's "
                     "own bytes (about 3.8x fewer in RAM and on the link, same values)", dtype)
        store.preload(on_progress)
        slab = SlotSlab(num_slots, store.spec.shapes, dtype, device, link, chunk_bytes)
    else:  # compressed host copies (the checkpoint's MXFP4: exact; int8/int4: approximate), dequantised into slots
        store = (CompressedStore.mxfp4(store, on_progress) if config.precision == "mxfp4" else
                 CompressedStore.open(store, model_dir, config.precision, config.quant_cache_dir, on_progress))
        slab = CompressedSlab(num_slots, store.spec.shapes, dtype, device, store.part_shapes(),
                              store.layout.decode_into, link, chunk_bytes)
    late_miss = None
    if config.late_miss == "int4":
        int4 = CompressedStore.open(store.base if isinstance(store, CompressedStore) else store, model_dir, "int4",
                                    config.quant_cache_dir, on_progress)
        late_miss = Int4Substitute(int4, link, device)
    loader = Loader(store, slab, ExpertCache(num_slots, policy), PrefetchScheduler(prefetch.issue_window))
    first = next(iter(experts.values()))
    miss_cost = profile_host_expert(first, store) if config.experts_on == "auto" else None
    everything_fits = num_slots >= total and config.experts_on != "host"  # every expert gets a slot
    if config.routing == "pregated":
        if llama4.Llama4Experts in classes:
            raise UserError("--routing pregated substitutes a router's decision (its top-k experts and weights); "
                            "Llama 4's router returns scores that scale the experts' input instead: use exact routing")
        predictor = PregatedRouting({layer: r for layer, (r, _) in routers(model, experts).items()},
                                    router_parts(model, experts))
    else:
        predictor = _predictor(prefetch, model, experts, store.num_experts)  # built, so a bad predictor file fails
        if everything_fits:  # nothing will be loaded: predicting only costs
            log.info("every expert fits in a slot: the %s predictor is not run", prefetch.predictor)
            predictor = NoPredictor()
    per_target = prefetch.budget or top_k  # predicted experts prefetched per target layer
    runtime = ExpertRuntime(store, loader, predictor,
                            budget=per_target,
                            experts_on=config.experts_on, miss_cost=miss_cost, late_miss=late_miss,
                            stream_prefill=prefetch.stream_prefill and prefetch.predictor != "none",
                            grouped_hits=config.grouped_hits)
    if config.cache.policy in LEARNED_POLICIES and not everything_fits:
        runtime.reuse_scorer = ReuseScorer(load_reuse_heads(_sidecar(prefetch, model), _shape_id(
            model.config, list(experts), store.num_experts)), store.num_experts)
        loader.cache.policy = Reuse(runtime.reuse_scorer.score)
    for layer, module in experts.items():
        module._activemoe_runtime, module._activemoe_layer = runtime, layer
    model.get_input_embeddings().register_forward_hook(lambda _module, _args, out: runtime.tokens(out))
    if config.cache.first_layer_reserve and prefetch.predictor not in ("none", "oracle") and config.routing == "exact":
        loader.core.reserve_for(store.layers[0], first_layer_reserve(num_slots, prefetch.lookahead, per_target,
                                                                     len(store.layers)))
    replay = None
    if config.replay_routing:
        replay = ReplayRouting(load_trace(config.replay_routing), store.layers, store.num_experts, top_k)
        replay.install(experts)
    if everything_fits:
        loader.preload(store.experts())  # no transfer is left for generation
    tokenizer = load_tokenizer(model_dir)
    stats = LoadStats(model_rss_bytes=model_rss,
                      host_store_bytes=(store.expert_bytes * total if config.store == "ram" else 0)
                      + (late_miss.store.expert_bytes * total if late_miss else 0),
                      slab_bytes=slab.nbytes, num_slots=num_slots, total_experts=total,
                      expert_bytes=store.expert_bytes, load_s=time.perf_counter() - start)
    log.info("loaded %s: %s", model_dir, asdict(stats))
    engine = Engine(model, tokenizer, runtime, stats, top_k, config)
    engine.plan, engine.replay = budget, replay
    return engine


def _predictor(prefetch: PrefetchConfig, model, experts: dict, num_experts: int):
    """The live predictor; the oracle is built per generation, from a recording pass."""
    if prefetch.predictor == "pregate":
        return PregatePredictor(router_parts(model, experts), prefetch.lookahead)
    if prefetch.predictor == "history":
        return HistoryPredictor(list(experts), num_experts, prefetch.lookahead)
    if prefetch.predictor == "learned":
        return _learned(prefetch, model, list(experts), num_experts)
    if prefetch.predictor == "adaptive":
        components = [PregatePredictor(router_parts(model, experts), prefetch.lookahead),
                      HistoryPredictor(list(experts), num_experts, prefetch.lookahead)]
        learned = _learned(prefetch, model, list(experts), num_experts, required=False)
        return AdaptivePredictor(components + ([learned] if learned else []), top_k_of(model.config))
    return NoPredictor()


def _learned(prefetch: PrefetchConfig, model, layers: list[int], num_experts: int,
             required: bool = True) -> LearnedPredictor | None:
    """Learned heads from --predictor-file or the model directory's sidecar (None if optional and absent)."""
    sidecar = _sidecar(prefetch, model)
    if not required and not sidecar.is_file():
        return None
    return LearnedPredictor(load_heads(sidecar, _shape_id(model.config, layers, num_experts)), layers,
                            prefetch.lookahead, next(model.parameters()).device)


def _sidecar(prefetch: PrefetchConfig, model) -> Path:
    """--predictor-file, or the model directory's sidecar."""
    return Path(prefetch.predictor_file) if prefetch.predictor_file else Path(model.config.name_or_path) / SIDECAR


def _shape_id(config, layers: list[int], num_experts: int) -> str:
    """What ties traces and predictor files to a model: family, MoE layers, experts, top-k, hidden size."""
    return shape_id(config.model_type, layers, num_experts, top_k_of(config), config.get_text_config().hidden_size)


def _check_choices(config: EngineConfig) -> None:
    p = config.prefetch
    if p.predictor not in PREDICTORS:
        raise UserError(f"unknown predictor {p.predictor!r}; known: {', '.join(PREDICTORS)}")
    if p.lookahead < 1 or p.issue_window < 1 or (p.chunk_bytes is not None and p.chunk_bytes < 1):
        raise UserError("--lookahead, the issue window and the chunk size must be at least 1")
    if config.routing not in ROUTING:
        raise UserError(f"unknown --routing {config.routing!r}; known: {', '.join(ROUTING)}")
    if config.routing == "pregated" and p.predictor != "none":
        raise UserError("--routing pregated decides (and prefetches) the next layer's experts itself; "
                        "use it without --predictor")
    if config.cache.policy in FUTURE_POLICIES and p.predictor != "oracle":
        raise UserError(f"--policy {config.cache.policy} needs the future: use it with --predictor oracle")
    if config.store not in TIERS:
        raise UserError(f"unknown store {config.store!r}; known: {', '.join(TIERS)}")
    if config.experts_on not in EXPERTS_ON:
        raise UserError(f"unknown --experts-on {config.experts_on!r}; known: {', '.join(EXPERTS_ON)}")
    quant.check_precision(config.precision, config.late_miss)
    if config.precision != "native" and config.store != "ram":
        raise UserError(f"--precision {config.precision} keeps the compressed copies in RAM; use it with --store ram")
    if config.link.link_gbps is not None and config.link.link_gbps <= 0:
        raise UserError("--link-gbps must be positive")


def encode_text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, verbose=False)["input_ids"]


def load_tokenizer(model_dir: Path):
    """The checkpoint's tokenizer, or None when it has none (or a broken one)."""
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # a broken tokenizer should not block --prompt-ids use
        log.warning("cannot load the tokenizer in %s: %s", model_dir, e)
        return None
