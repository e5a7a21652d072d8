"""runtime.py: ExpertRuntime serves transformers' experts modules through ExpertsInterface.

Per MoE layer: record the routing, ask the predictor about the next layers, hand the routed and
predicted experts to the loader, run the experts that are READY first (in one grouped call per projection
with grouped_hits), then each miss as it lands,
or on the host when the miss cost model says that is sooner, or (approximate, opt-in) from its int4
copy when the full copy would be late. It knows nothing about model loading.
Legend: T tokens, K routed per token, H hidden, I expert width.
"""
from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _grouped_linear, grouped_mm_experts_forward

from activemoe.ids import ExpertId
from activemoe.loader import Loader
from activemoe.predictors import TOKENS, Announcer, NoPredictor, Prediction, Predictor
from activemoe.rest import Rest
from activemoe.store import ExpertStore

IMPLEMENTATION = "activemoe"


@dataclass(frozen=True)
class MissCostModel:
    """Measured costs for the wait-or-compute-on-host decision: host time for one expert on `t` tokens
    is `host_base_s + host_per_token_s * t`, against the link time until the expert is READY."""

    host_base_s: float
    host_per_token_s: float

    def host_s(self, tokens: int) -> float:
        return self.host_base_s + self.host_per_token_s * tokens

    def prefer_host(self, tokens: int, remaining_transfer_s: float) -> bool:
        return self.host_s(tokens) < remaining_transfer_s


@dataclass
class RuntimeStats:
    activations: int = 0  # routed (token, layer, expert) activations
    hits: int = 0  # activations whose expert was READY when routed
    host_computed: int = 0  # experts computed from their host copy instead of a slot
    prefill_experts: int = 0  # distinct experts routed per MoE layer, summed over the prompt's layers
    decode_activations: int = 0  # activations of decode steps (all sequences of a batch)
    decode_experts: int = 0  # distinct experts routed per MoE layer, summed over decode steps
    decode_hits: int = 0  # decode activations whose expert was READY when routed
    late_miss_int4: int = 0  # critical misses served from their int4 copy (--late-miss int4, approximate)
    late_miss_activations: int = 0  # routed activations those served
    late_miss_bytes: int = 0  # int4 bytes those moved
    decode_predict_s: float = 0.0  # wall time of decode steps in the predictor and its announcer, in place
    decode_predict_waiting_s: float = 0.0  # wall time of decode steps in the predictor's deferred work, done while
    # the compute path waited on a load (off its critical path)
    decode_layers: int = 0  # MoE-layer calls of decode steps
    decode_rested: int = 0  # of those, calls at which the predictor rested

    @property
    def hit_rate(self) -> float:
        return self.hits / self.activations if self.activations else 0.0

    @property
    def decode_hit_rate(self) -> float:
        return self.decode_hits / self.decode_activations if self.decode_activations else 0.0

    @property
    def reuse(self) -> float:
        """Decode activations per distinct expert loaded-or-hit: how many sequences share an expert."""
        return self.decode_activations / self.decode_experts if self.decode_experts else 0.0

    def get_and_reset(self) -> RuntimeStats:
        snapshot = RuntimeStats(**{f.name: getattr(self, f.name) for f in fields(self)})
        for f in fields(self):
            setattr(self, f.name, 0)
        return snapshot


def expert_forward(module: torch.nn.Module, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """One expert on its tokens, in the experts module's own conventions (flags, gate, activation)."""
    up_name = "gate_up_proj" if module.has_gate else "up_proj"
    h = x @ w[up_name] if module.is_transposed else F.linear(x, w[up_name])  # [t, 2I] or [t, I]
    if module.has_bias:
        h = h + w[up_name + "_bias"]
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)  # [t, I]
    y = h @ w["down_proj"] if module.is_transposed else F.linear(h, w["down_proj"])  # [t, H]
    if module.has_bias:
        y = y + w["down_proj_bias"]
    if module.has_post_expert_norm:
        y = module.post_expert_norm(y)
    return y


class _ExpertsView:
    """An experts module seen through other weights ([N, ...] per tensor), e.g. one layer of the host
    store, for transformers' own grouped kernel (whose cost grows with N, so not for a large slab)."""

    def __init__(self, module: torch.nn.Module, weights: dict[str, torch.Tensor], num_experts: int):
        self._module = module
        self.__dict__.update(weights)
        self.num_experts = num_experts
        self._is_expert_parallel = False

    def __getattr__(self, name):
        return getattr(self._module, name)


def grouped_forward(module, weights: dict[str, torch.Tensor], num: int, hidden: torch.Tensor,
                    index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """All (token, k) pairs in one grouped call over `weights` ([num, ...] per tensor)."""
    device = next(iter(weights.values())).device
    out = grouped_mm_experts_forward(_ExpertsView(module, weights, num), hidden.to(device), index.to(device),
                                     top_k_weights.to(device))  # [T, H]
    return out.to(hidden.device)


def grouped_slots(module: torch.nn.Module, buffers: dict[str, torch.Tensor], slots: list[int],
                  x: torch.Tensor) -> torch.Tensor:
    """One token `x` [1, H] through the experts in `slots` (ascending) of a slab (`buffers`: [S, ...] per
    tensor), one grouped matmul per projection in the experts module's own conventions, as transformers'
    grouped_mm experts run: a few kernels for the layer instead of a few per expert. Returns [r, H], one
    row per slot. Per expert the same products as expert_forward (equal in float32 on the CPU)."""
    num_slots, r = next(iter(buffers.values())).shape[0], len(slots)
    chosen = [0] * num_slots
    for s in slots:
        chosen[s] = 1
    # group g's rows end at offs[g] (one row per chosen slot at or before g); one host-to-device copy [r + S]
    offs = _on_device(slots + list(itertools.accumulate(chosen)), torch.int32, x.device)
    index, offs = offs[:r].long(), offs[r:]
    rows = x.expand(r, x.shape[-1]).contiguous()  # [r, H]
    up_name = "gate_up_proj" if module.has_gate else "up_proj"
    bias = (lambda name: buffers[name + "_bias"][index]) if module.has_bias else (lambda name: None)  # noqa: E731
    h = _grouped_linear(rows, buffers[up_name], offs, bias(up_name), module.is_transposed)  # [r, 2I] or [r, I]
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)  # [r, I]
    y = _grouped_linear(h, buffers["down_proj"], offs, bias("down_proj"), module.is_transposed)  # [r, H]
    return module.post_expert_norm(y) if module.has_post_expert_norm else y


class ExpertRuntime:
    def __init__(self, store: ExpertStore, loader: Loader, predictor: Predictor | None, budget: int,
                 experts_on: str = "device", miss_cost: MissCostModel | None = None, late_miss=None,
                 stream_prefill: bool = True, grouped_hits: bool = False):
        self.store, self.loader = store, loader
        self.grouped_hits = grouped_hits  # decode: the experts READY together (at a layer's start, or landed
        #                                   while the layer waited) in one grouped call
        self.late_miss = late_miss  # a compressed.Int4Substitute, or None
        self.stream_prefill = stream_prefill  # while the prompt runs, load all of the next MoE layer's experts
        self.predictor = predictor or NoPredictor()
        self.experts_on, self.miss_cost = experts_on, miss_cost
        self.stats = RuntimeStats()
        self.recorder = None  # a trace.Recorder, called with every layer's routing (and hidden state)
        self.event = 0
        self._tokens_at = None
        self.decoding = False  # set by the engine once the prompt's forward is done
        self.announce = Announcer(budget)  # predictions -> loader requests (`budget` per target), live recall
        self.rest = Rest()  # when the predictor rests (rest.py)
        self.reuse_scorer = None  # a reuse.ReuseScorer when the cache's policy is `reuse`: fed every layer's routing

    def begin(self) -> None:
        """A new generation: events restart at 0."""
        self.event = 0
        self._tokens_at = None  # the event before which the current token embeddings were handed over
        self.decoding = False
        self.rest.begin()
        self.announce.begin()
        self.predictor.begin()
        if self.reuse_scorer is not None:
            self.reuse_scorer.begin()

    @property
    def resting(self) -> bool:
        return self.rest.resting(self.predictor)

    def forward(self, layer: int, module: torch.nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        event, self.event = self.event, self.event + 1
        flat = top_k_index.reshape(-1).tolist()  # [T*K]
        counts = Counter(flat)
        routed = sorted(counts)
        self.stats.activations += top_k_index.numel()
        if self.decoding:
            self.stats.decode_activations += top_k_index.numel()
            self.stats.decode_experts += len(routed)
        else:
            self.stats.prefill_experts += len(routed)
        if self.recorder is not None:
            self.recorder(layer, hidden, top_k_index, top_k_weights)
        if self.experts_on == "host":
            self.stats.host_computed += len(routed)
            if self.store.host:  # RAM tier: one grouped call over the layer's host copies
                weights = self.store.layer_weights(layer)
                return grouped_forward(module, weights, self.store.num_experts, hidden, top_k_index, top_k_weights)
        # Each (token, k) contribution gets its own row, summed over k at the end as transformers' grouped_mm
        # experts do: experts finish in the order their loads land, and adding them up in that order would
        # round differently (in bfloat16, enough to change a greedy token). Rows are in the dtype of output
        # times routing weight (float32 where a router keeps float32 weights).
        one = hidden.shape[0] == 1 and len(routed) == len(flat)  # one token routed to K distinct experts (a
        # hash-routed layer may name an expert twice: DeepSeek-V4's token tables; then the general path below)
        if one:  # decode: one token, no gather or scatter; a list of K rows [1, H]
            parts = [None] * top_k_index.shape[-1]
            run = lambda eid, w: self._accumulate_one(module, w, hidden, flat.index(eid.expert), top_k_weights, parts)  # noqa: E731
        else:
            parts = hidden.new_zeros(*top_k_index.shape, hidden.shape[-1],
                                     dtype=torch.promote_types(hidden.dtype, top_k_weights.dtype))  # [T, K, H]
            run = lambda eid, w: self._accumulate(module, eid, w, hidden, top_k_index, top_k_weights, parts)  # noqa: E731
        if self.experts_on == "host":  # no full-precision host copies (disk or compressed tier): expert by expert
            for e in routed:
                run(ExpertId(layer, e), self.store.read(ExpertId(layer, e)))
            return _total(parts, hidden.dtype)

        resting = False
        if self.decoding:
            resting = self.rest.decode_layer(layer == self.store.layers[0], self.loader.core.served, self.predictor)
            self.stats.decode_layers += 1
            self.stats.decode_rested += resting
        start = time.perf_counter()
        predictions = [] if resting else self.predictor.predict(event, layer, hidden, top_k_index)
        if self.stream_prefill and not self.decoding and top_k_index.shape[0] > 1:
            predictions = self._streamed(layer, predictions)
        predicted = self.announce(event, routed, top_k_index.shape[-1], top_k_index.shape[0] == 1, predictions)
        if self.reuse_scorer is not None:  # before the loads: their evictions rank by the scores it updates
            self.reuse_scorer.observe(layer, hidden, flat, parallel=self.decoding)
        if self.decoding:
            self.stats.decode_predict_s += time.perf_counter() - start
        ready, waiting = self.loader.begin_layer(event, [ExpertId(layer, e) for e in routed], predicted)
        if waiting:
            self.rest.miss()
        hits = sum(counts[eid.expert] for eid, _ in ready)
        self.stats.hits += hits
        if self.decoding:
            self.stats.decode_hits += hits
        pending = set(waiting)
        try:
            if self.late_miss is not None and pending:  # decide before the copies start, so dropped ones cost nothing
                self._serve_late(run, pending, counts)
            if self.grouped_hits and one and len(ready) > 1:
                grouped, ready = ready, []  # _run_grouped releases them
                self._run_grouped(module, grouped, hidden, flat, top_k_weights, parts)
            while ready:  # one expert at a time (the default; grouped_hits is for launch-bound CUDA)
                eid, slot = ready.pop()
                self._run_slot(run, eid, slot)
            while pending:
                if self.late_miss is not None:
                    self._serve_late(run, pending, counts)
                    if not pending:
                        break
                if self.experts_on == "auto":
                    for eid in sorted(pending):
                        if self.miss_cost.prefer_host(counts[eid.expert], self.loader.remaining_s(eid)):
                            self.loader.abandon([eid])
                            pending.discard(eid)
                            run(eid, self.store.read(eid))
                            self.stats.host_computed += 1
                    if not pending:
                        break
                idle = hasattr(self.predictor, "idle") or self.reuse_scorer is not None
                eid, slot = self.loader.wait_any(pending, self._idle if idle else None)
                pending.discard(eid)
                landed = [(eid, slot)]
                if self.grouped_hits and one:  # misses that landed together: one grouped call
                    try:
                        landed += self.loader.take_landed(pending)
                    except BaseException:
                        self.loader.release(slot)
                        raise
                    pending.difference_update(e for e, _ in landed)
                if len(landed) > 1:
                    self._run_grouped(module, landed, hidden, flat, top_k_weights, parts)
                else:
                    self._run_slot(run, eid, slot)
        except BaseException:
            for _, slot in ready:
                self.loader.release(slot)
            self.loader.abandon(pending)
            raise
        return _total(parts, hidden.dtype)

    def tokens(self, hidden: torch.Tensor) -> None:
        """A forward's token embeddings ([B, S, H]), before its first MoE layer: recorded, and handed to a
        predictor that sees tokens, whose loads then start before the first MoE layer's attention."""
        if self._tokens_at == self.event:  # already handed over, when the token was sampled
            return
        self._tokens_at = self.event
        x = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
        if self.recorder is not None:
            self.recorder.tokens(x)
        if getattr(self.predictor, "sees_tokens", False) and self.experts_on != "host" and not self.resting:
            start = time.perf_counter()
            predictions = self.predictor.predict(self.event - 1, TOKENS, x, None)
            requests = self.announce.ahead(self.event - 1, predictions, self.announce.budget)
            if self.decoding:
                self.stats.decode_predict_s += time.perf_counter() - start
            self.loader.ahead(requests)

    def _idle(self) -> bool:
        """A piece of the predictor's deferred work, while the compute path waits on a load."""
        start = time.perf_counter()
        more = hasattr(self.predictor, "idle") and self.predictor.idle()
        more = (self.reuse_scorer is not None and self.reuse_scorer.idle()) or more
        if self.decoding:
            self.stats.decode_predict_waiting_s += time.perf_counter() - start
        return more

    def _streamed(self, layer: int, predictions: list[Prediction]) -> list[Prediction]:
        """Prefill streaming: a long prompt routes to nearly every expert, so the next MoE layer's experts
        are all queued (the predictor's ranking first, when it has one) to load while this layer computes."""
        layers = self.store.layers
        position = layers.index(layer)
        if position + 1 == len(layers):
            return predictions
        nxt, num = layers[position + 1], self.store.num_experts
        first = next((p for p in predictions if p.distance == 1), None)
        order = list(first.experts) if first else []
        named = set(order)
        order += [e for e in range(num) if e not in named]
        probs = tuple(1.0 - i / num for i in range(num))  # below every critical load, ranked
        streamed = Prediction(1, nxt, tuple(order), probs, budget=num)
        return [p for p in predictions if p.distance != 1] + [streamed]

    def _serve_late(self, run, pending: set[ExpertId], counts: Counter) -> None:
        """--late-miss int4: compute each miss whose full copy would land after its int4 copy from the
        int4 copy. Its full load is abandoned: dropped if queued, cached if already in flight (requeueing
        it as a prefetch was measured slower: its bytes compete with the next misses on the link)."""
        for eid in sorted(pending):
            if self.late_miss.late(self.loader.remaining_s(eid)):
                self.loader.abandon([eid])
                pending.discard(eid)
                run(eid, self.late_miss.weights(eid))
                self.stats.late_miss_int4 += 1
                self.stats.late_miss_activations += counts[eid.expert]
                self.stats.late_miss_bytes += self.late_miss.store.expert_bytes

    def recall_and_reset(self) -> dict[str, float]:
        return self.announce.recall_and_reset()

    def _run_slot(self, run, eid: ExpertId, slot: int) -> None:
        try:
            run(eid, self.loader.slab.acquire(slot))
        finally:
            self.loader.release(slot)

    def _run_grouped(self, module, ready: list[tuple[ExpertId, int]], hidden, flat: list[int], top_k_weights,
                     parts: list) -> None:
        """Decode: the READY experts in one grouped call over the slab; each row weighted into its k's part."""
        slab = self.loader.slab
        ready = sorted(ready, key=lambda pair: pair[1])  # rows grouped by slot, in slot order
        try:
            for _, slot in ready:
                slab.acquire(slot)
            y = grouped_slots(module, slab.buffers, [slot for _, slot in ready], hidden.to(slab.device))  # [r, H]
            ks = [flat.index(eid.expert) for eid, _ in ready]
            y = y if y.device == top_k_weights.device else y.to(top_k_weights.device)
            weights = top_k_weights[0, _on_device(ks, torch.long, top_k_weights.device), None]  # [r, 1]
            weighted = y * weights  # [r, H], as each expert's [1, H] times its [1, 1] weight
            for row, k in enumerate(ks):
                parts[k] = weighted[row:row + 1]
        finally:
            for _, slot in ready:
                self.loader.release(slot)

    @staticmethod
    def _accumulate_one(module, w, hidden, k: int, top_k_weights, parts) -> None:
        device = next(iter(w.values())).device
        y = expert_forward(module, w, hidden if hidden.device == device else hidden.to(device))  # [1, H]
        # a [1, 1] weight, so a float32 weight promotes the product as in transformers (a 0-d one would not)
        parts[k] = (y if y.device == top_k_weights.device else y.to(top_k_weights.device)) * top_k_weights[:, k, None]

    @staticmethod
    def _accumulate(module, eid, w, hidden, top_k_index, top_k_weights, parts) -> None:
        token, k = torch.where(top_k_index == eid.expert)  # [t], [t]
        device = next(iter(w.values())).device
        y = expert_forward(module, w, hidden[token].to(device)).to(hidden.device)  # [t, H]
        parts[token, k] = (y * top_k_weights[token, k, None]).to(parts.dtype)


def _on_device(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on `device`. On CUDA through pinned memory without blocking: a blocking
    copy from pageable memory makes the host wait for all the GPU work queued before it."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _total(parts: list[torch.Tensor] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The sum over k of a layer's expert outputs, [T, H]: from K rows [1, H] (decode) or a [T, K, H] tensor."""
    total = torch.cat(parts).sum(0, keepdim=True) if isinstance(parts, list) else parts.sum(1)
    return total.to(dtype)


def _dispatch(module, hidden_states, top_k_index, top_k_weights):
    """The function registered in ExpertsInterface: routes to the runtime attached to the module."""
    return module._activemoe_runtime.forward(module._activemoe_layer, module, hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _dispatch)
