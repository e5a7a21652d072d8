"""simulate.py: trace-driven, discrete-event simulation of offloaded decode on a virtual clock.

It drives the engine's own decision code — loader_core.LoaderCore over cache.ExpertCache, the
policies, scheduler.PrefetchScheduler and the predictors — with a copy engine and a compute path that
advance a virtual clock by a named costmodel.CostModel instead of moving tensors. So for one
configuration the hits, loads and evictions are the engine's. It knows nothing about CUDA or torch
modules. Every figure it produces is simulated.
"""
from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field

import torch

from activemoe.cache import ExpertCache
from activemoe.config import CacheConfig, PrefetchConfig, chunk_bytes_for
from activemoe.costmodel import CostModel
from activemoe.errors import UserError
from activemoe.ids import ExpertId
from activemoe.loader import QUEUE_DEPTH
from activemoe.loader_core import LoaderCore, first_layer_reserve
from activemoe.policies import Belady, Reuse, make_policy
from activemoe.predictors import TOKENS, Announcer, HistoryPredictor, NoPredictor, OraclePredictor, Prediction
from activemoe.rest import Rest
from activemoe.reuse import ReuseHeads, ReuseScorer
from activemoe.scheduler import LoadTask, PrefetchScheduler
from activemoe.workload import Event, Workload

SIM_PREDICTORS = ("none", "oracle", "history", "learned")  # learned: from a trace's hidden states; pregate and
# adaptive also need the model's routers


@dataclass(frozen=True)
class SimConfig:
    cache: CacheConfig  # num_slots must be set
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    prefill_tokens: int = 0  # leading tokens of the workload run as one prefill forward
    oracle_recall: float | None = None  # degrade the oracle to this recall (wrong guesses replace misses)
    seed: int = 0  # of the degraded oracle's choices
    predict_s: float = 0.0  # virtual time charged per predictor call (the cost model has no predictor)

    def label(self) -> str:
        p = self.prefetch
        pred = p.predictor if self.oracle_recall is None else f"oracle@{self.oracle_recall:g}"
        return f"{self.cache.num_slots} slots {self.cache.policy} {pred} L{p.lookahead}"


@dataclass(frozen=True)
class SimResult:
    config: str
    tokens: int  # decode tokens
    decode_s: float  # virtual time of the decode steps
    prefill_s: float
    tok_s: float  # decode tokens per simulated second
    activations: int
    hits: int  # activations whose expert was READY when routed
    hit_rate: float  # over prefill and decode, as GenerationStats.hit_rate
    decode_hit_rate: float  # over the decode steps alone, as GenerationStats.decode_hit_rate
    lookups: int  # (layer event, routed expert) lookups; cache hits/misses count these
    loads: int
    evictions: int
    critical: int
    speculative: int
    wasted: int
    stall_s: float  # decode time the compute path waited for loads
    bytes_moved: int
    decode_bytes: int  # moved from the first decode step on (a prefill's loads still landing count here)
    recall: dict[str, float]  # lookahead k -> recall@k over decode steps
    predictor_rested: float  # share of decode MoE-layer events at which the predictor rested (rest.py)
    compute_floor_tok_s: float  # every expert resident
    link_floor_tok_s: float  # Belady's (minimum) decode loads over the link, no compute
    oracle_bound_tok_s: float  # perfect prediction + Belady + perfect overlap
    efficiency: float  # tok_s / oracle_bound_tok_s


class DegradedOracle:
    """The oracle at a chosen recall: each expert it names is kept with probability `recall`, else
    replaced by an expert of the same layer that is not routed there (the budget stays the same)."""

    name = "oracle-degraded"
    may_rest = False  # it models a predictor's accuracy alone, as the oracle it degrades

    def __init__(self, oracle: OraclePredictor, recall: float, num_experts: int, seed: int):
        self.oracle, self.recall, self.num_experts = oracle, recall, num_experts
        self.rng = random.Random(seed)

    def begin(self) -> None:
        self.oracle.begin()

    def predict(self, event, layer, hidden, top_k_index) -> list[Prediction]:
        out = []
        for p in self.oracle.predict(event, layer, hidden, top_k_index):
            wrong = [e for e in range(self.num_experts) if e not in p.experts]
            self.rng.shuffle(wrong)
            named = tuple(e if self.rng.random() < self.recall or not wrong else wrong.pop() for e in p.experts)
            out.append(Prediction(p.distance, p.layer, named, p.probs, p.budget))
        return out


class _CopyEngine:
    """The loader's worker thread on the virtual clock: up to QUEUE_DEPTH chunks on the link, the next
    chunk chosen by LoaderCore when one lands (or when work comes and the queue has room); waiting, it
    reacts to the compute path's notify `cost.wake_s` later."""

    def __init__(self, core: LoaderCore, cost: CostModel, chunk_bytes: list[int]):
        self.core, self.cost, self.chunks = core, cost, chunk_bytes
        self.flight: deque[tuple[LoadTask, float]] = deque()  # (task, landing time), oldest first
        self.wake_at = math.inf  # a notify reaches the worker then
        self.bytes_moved = 0

    @property
    def idle(self) -> bool:
        return not self.flight and self.wake_at == math.inf

    @property
    def end(self) -> float:
        """The engine's next step: a landing or a wake-up."""
        return min(self.flight[0][1] if self.flight else math.inf, self.wake_at)

    def _issue(self, now: float) -> None:
        while len(self.flight) < QUEUE_DEPTH:
            picked = self.core.next_chunk()
            if picked is None:
                return
            task, index = picked
            nbytes = self.chunks[index]
            latency = self.cost.link_latency_s if index == 0 else 0.0
            start = max(now, self.flight[-1][1]) if self.flight else now
            self.flight.append((task, start + latency + self.cost.transfer_s(nbytes)))
            self.bytes_moved += nbytes

    def advance(self, t: float) -> None:
        """Run the worker up to `t`: land the chunks due by then, issuing more at each step."""
        while self.end <= t:
            if self.wake_at <= (self.flight[0][1] if self.flight else math.inf):
                now, self.wake_at = self.wake_at, math.inf
            else:
                task, now = self.flight.popleft()
                self.core.land(task)
            self._issue(now)

    def kick(self, now: float) -> None:
        """The compute path notified the worker (new work, a released slot): unless its queue is full,
        it picks after its wake-up, so the compute path's next step (e.g. touching a hit) comes first."""
        if len(self.flight) < QUEUE_DEPTH and self.wake_at == math.inf:
            self.wake_at = now + self.cost.wake_s


def _chunk_plan(expert_bytes: int, chunk_bytes: int) -> list[int]:
    n = max(1, -(-expert_bytes // chunk_bytes))
    return [expert_bytes // n + (i < expert_bytes % n) for i in range(n)]


def num_slots(cache: str, total_experts: int, top_k: int) -> int:
    """'25%' of all routed experts, or a slot count; refused below one layer's top-k."""
    text = cache.strip()
    try:
        slots = round(float(text[:-1]) / 100 * total_experts) if text.endswith("%") else int(text)
    except ValueError:
        raise UserError(f"bad --cache {cache!r}: use a share of all experts (25%) or a slot count") from None
    if slots < top_k:
        raise UserError(f"--cache {cache} gives {slots} slots, fewer than one layer's top-k; the minimum is {top_k}")
    return min(slots, total_experts)


def simulate(workload: Workload, config: SimConfig, cost: CostModel, chunk_bytes: list[int] | None = None,
             learned=None, reuse: ReuseHeads | None = None) -> SimResult:
    """Replay `workload` under `config` on the virtual clock of `cost`. `learned`: the LearnedPredictor
    that config's predictor "learned" names; `reuse`: the heads policy "reuse" ranks by. Both read the
    workload's hidden states, as the runtime's."""
    events = workload.events(config.prefill_tokens)
    routing = [(e.layer, e.routed) for e in events]
    slots = config.cache.num_slots
    if slots is None or slots < workload.top_k:
        raise UserError(f"the cache needs at least {workload.top_k} slots (one layer's top-k)")
    p = config.prefetch
    predictor, clock = _predictor(workload, config, routing, learned)
    inputs = _Inputs(workload, predictor) if p.predictor == "learned" or config.cache.policy == "reuse" else None
    policy, scorer = make_policy(config.cache.policy), None
    if config.cache.policy == "belady":
        future = OraclePredictor(routing, 1)
        policy = Belady(future.next_use, lambda: clock[0])
    if config.cache.policy == "reuse":
        if reuse is None:
            raise UserError("policy reuse ranks experts by the reuse heads: give --predictor-file")
        scorer = ReuseScorer(reuse, workload.num_experts)
        policy = Reuse(scorer.score)
    cache = ExpertCache(slots, policy)
    chunk_bytes = chunk_bytes or _chunk_plan(cost.expert_bytes, chunk_bytes_for(p.chunk_bytes, cost.link_gbps))
    core = LoaderCore(cache, PrefetchScheduler(p.issue_window), len(chunk_bytes))
    announce = Announcer(p.budget or workload.top_k)  # as the engine's runtime
    if config.cache.first_layer_reserve and p.predictor not in ("none", "oracle"):  # as the engine: the oracle
        reserve = first_layer_reserve(slots, p.lookahead, announce.budget, len(workload.layers))  # crosses tokens
        core.reserve_for(workload.layers[0], reserve)
    if slots >= len(workload.layers) * workload.num_experts:  # as the engine: everything fits, loaded at start
        core.fill([ExpertId(layer, e) for layer in workload.layers for e in range(workload.num_experts)],
                  copy=lambda eid, slot: None)
        cache.stats.get_and_reset()
    engine = _CopyEngine(core, cost, chunk_bytes)
    predictor.begin()
    rest, rested = Rest(), 0  # as the runtime: the predictor rests through quiet decode steps
    t, stall, hits, activations, decode_start, decode_stall = 0.0, 0.0, 0, 0, None, 0.0
    decode_from = (0, 0, 0)  # (hits, activations, bytes moved) when decode began
    n_prefill = len(workload.layers) if config.prefill_tokens else 0
    for event, ev in enumerate(events):
        if event == n_prefill:
            decode_start, decode_stall, decode_from = t, stall, (hits, activations, engine.bytes_moved)
        if inputs is not None and inputs.sees_tokens and ev.layer == workload.layers[0] \
                and not rest.resting(predictor):  # as runtime.tokens: before the first layer's attention
            t += config.predict_s
            core.ahead(announce.ahead(event - 1, predictor.predict(event - 1, TOKENS, inputs.embedded(ev), None),
                                      announce.budget))
            if core.scheduler.tasks:
                engine.kick(t)
        t += cost.layer_s(ev.tokens)  # attention, norms, router of this decoder layer
        engine.advance(t)
        clock[0] = event  # the event a future-knowing policy sees from now on (the oracle's `now`)
        predicted, resting = [], False
        if event >= n_prefill:
            resting = rest.decode_layer(ev.layer == workload.layers[0], core.served, predictor)
            rested += resting
        if not isinstance(predictor, NoPredictor) and not resting:
            index = torch.tensor([ev.routed]) if ev.tokens == 1 else torch.tensor(ev.routed)[:, None]
            hidden = None if inputs is None else inputs.hidden(ev)
            t += config.predict_s
            predicted = announce(event, ev.routed, workload.top_k, ev.tokens == 1,
                                 predictor.predict(event, ev.layer, hidden, index))
        if scorer is not None:  # as the runtime: before the loads, with each token's routing
            rows = workload.experts[ev.first:ev.first + ev.tokens, inputs.position[ev.layer]]  # [T, K]
            scorer.observe(ev.layer, inputs.hidden(ev), rows.reshape(-1).tolist(), parallel=event >= n_prefill)
        routed = [ExpertId(ev.layer, e) for e in ev.routed]
        ready, waiting = core.begin_layer(event, routed, predicted)
        if waiting:
            rest.miss()
        if core.scheduler.tasks:  # as Loader.begin_layer: a notify only when there is work
            engine.kick(t)
        counts = dict(zip(ev.routed, ev.counts))
        activations += sum(ev.counts)  # tokens x top-k
        hits += sum(counts[eid.expert] for eid, _ in ready)
        pending = set(waiting)
        while ready:
            eid, slot = ready.pop()
            t = _compute(core, engine, cost, slot, counts[eid.expert], t)
        while pending:
            got, requeued = core.take_ready(pending)
            if requeued:
                engine.kick(t)
            if got is None:
                if engine.idle:
                    raise RuntimeError(f"simulation stalled at event {event}: nothing loading for {pending}")
                stall += engine.end - t
                t = engine.end
                engine.advance(t)
                continue
            pending.discard(got[0])
            t = _compute(core, engine, cost, got[1], counts[got[0].expert], t)
    if decode_start is None:
        decode_start, decode_stall, decode_from = t, stall, (hits, activations, engine.bytes_moved)
    decode = (hits - decode_from[0], activations - decode_from[1], engine.bytes_moved - decode_from[2])
    return _result(workload, config, cost, events[n_prefill:], slots, t - decode_start, decode_start,
                   stall - decode_stall, hits, activations, decode, cache, core, engine, announce, rested)


class _Inputs:
    """What the runtime hands a learned predictor, from the workload: an event's MoE input [T, H] and its
    tokens' embeddings [T, H], in float32 (traces store float16)."""

    def __init__(self, workload: Workload, predictor):
        if workload.hidden is None:
            raise UserError("the learned predictor reads hidden states: record the trace with --hidden")
        self.workload = workload
        self.position = {layer: i for i, layer in enumerate(workload.layers)}
        # called with the token embeddings before each forward's first MoE layer, as the runtime calls it
        self.sees_tokens = getattr(predictor, "sees_tokens", False) and workload.embedded is not None

    def hidden(self, ev: Event) -> torch.Tensor:
        return torch.from_numpy(self.workload.hidden[ev.first:ev.first + ev.tokens, self.position[ev.layer]]).float()

    def embedded(self, ev: Event) -> torch.Tensor:
        return torch.from_numpy(self.workload.embedded[ev.first:ev.first + ev.tokens]).float()


def _predictor(workload: Workload, config: SimConfig, routing, learned) -> tuple[object, list[int]]:
    p = config.prefetch
    if p.predictor not in SIM_PREDICTORS:
        raise UserError(f"the simulator runs predictors {', '.join(SIM_PREDICTORS)} (and oracle@RECALL); "
                        f"{p.predictor!r} needs the model's routers")
    if p.predictor == "learned":
        if learned is None:
            raise UserError("the learned predictor needs its heads: give --predictor-file")
        return learned, [0]
    if config.cache.policy == "belady" or config.oracle_recall is not None or p.predictor == "oracle":
        if p.lookahead < 1:
            raise UserError("--lookahead must be at least 1")
    if config.oracle_recall is not None:
        if not 0 <= config.oracle_recall <= 1:
            raise UserError("an oracle's recall must lie in [0, 1]")
        return DegradedOracle(OraclePredictor(routing, p.lookahead), config.oracle_recall, workload.num_experts,
                              config.seed), [0]
    if p.predictor == "oracle":
        return OraclePredictor(routing, p.lookahead), [0]
    if p.predictor == "history":
        return HistoryPredictor(list(workload.layers), workload.num_experts, p.lookahead), [0]
    return NoPredictor(), [0]


def _compute(core: LoaderCore, engine: _CopyEngine, cost: CostModel, slot: int, tokens: int, t: float) -> float:
    """runtime._run_slot: run the expert (LoaderCore touched it when it pinned it), release the slot
    (Loader.release wakes the worker only when loads are queued)."""
    t += cost.expert_s(tokens)
    engine.advance(t)
    core.release(slot)
    if core.scheduler.tasks:
        engine.kick(t)
    return t


def belady_loads(events: list[Event], num_slots: int) -> int:
    """The fewest loads any cache of `num_slots` needs to serve `events` one expert at a time, from the
    best possible starting content (the first `num_slots` distinct experts, free): Belady's MIN."""
    seq = [(ev.layer, e) for ev in events for e in ev.routed]
    next_use = [math.inf] * len(seq)
    last: dict = {}
    for i in range(len(seq) - 1, -1, -1):
        next_use[i] = last.get(seq[i], math.inf)
        last[seq[i]] = i
    resident: dict = {}  # expert -> its next use
    heap: list = []  # (-next use, expert), lazily invalidated
    loads = 0
    for i, eid in enumerate(seq):  # while the cache is not full, experts enter free (the warm start)
        if eid not in resident:
            if len(resident) >= num_slots:
                while True:
                    neg, victim = heapq.heappop(heap)
                    if resident.get(victim) == -neg:
                        del resident[victim]
                        break
                loads += 1
        resident[eid] = next_use[i]
        heapq.heappush(heap, (-next_use[i], eid))
    return loads


def bounds(events: list[Event], tokens: int, num_slots: int, cost: CostModel) -> tuple[float, float, float]:
    """(compute floor, link floor, oracle bound) in tokens per second for these events of `tokens` tokens."""
    compute = sum(cost.layer_s(ev.tokens) + sum(cost.expert_s(c) for c in ev.counts) for ev in events)
    link = belady_loads(events, num_slots) * (cost.transfer_s(cost.expert_bytes) + cost.link_latency_s)
    rate = lambda s: tokens / s if s > 0 else math.inf  # noqa: E731
    return rate(compute), rate(link), rate(max(compute, link))


def _result(workload, config, cost, decode_events, slots, decode_s, prefill_s, stall, hits, activations, decode,
            cache, core, engine, announce, rested: int) -> SimResult:
    tokens = workload.num_tokens - config.prefill_tokens
    compute_floor, link_floor, bound = bounds(decode_events, tokens, slots, cost)
    tok_s = tokens / decode_s if decode_s > 0 else math.inf
    cs, ss = cache.stats, core.scheduler.stats
    return SimResult(
        config=config.label(), tokens=tokens, decode_s=decode_s, prefill_s=prefill_s, tok_s=tok_s,
        activations=activations, hits=hits, hit_rate=hits / activations if activations else 0.0,
        decode_hit_rate=decode[0] / decode[1] if decode[1] else 0.0,
        lookups=cs.hits + cs.misses, loads=cs.loads, evictions=cs.evictions, critical=ss.critical,
        speculative=cs.loads - ss.critical, wasted=cs.wasted, stall_s=stall, bytes_moved=engine.bytes_moved,
        decode_bytes=decode[2],
        recall={str(k): h / n for k, (h, n) in sorted(announce.recall.items()) if n},
        predictor_rested=rested / len(decode_events) if decode_events else 0.0,
        compute_floor_tok_s=compute_floor, link_floor_tok_s=link_floor, oracle_bound_tok_s=bound,
        efficiency=tok_s / bound if bound and bound != math.inf else 1.0)
