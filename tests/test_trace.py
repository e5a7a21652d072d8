"""Traces and learned heads: format round trip, refusal of damaged or foreign files."""
import json

import pytest
import torch

import activemoe
import activemoe.tiny
from activemoe.cli import main
from activemoe.demo import BUNDLED
from activemoe.config import EngineConfig, SamplingConfig
from activemoe.errors import UserError
from activemoe.predictors import TOKENS
from activemoe.store import ExpertStore
from activemoe.learned import RANKED_ROWS, Head, LearnedPredictor, load_heads, save_heads, train_heads
from activemoe.trace import load_trace
from tests.test_cli import assert_user_error


def _record(eng, path) -> str:
    """Record four 40-token chunks of random ids (with hidden states) to `path`; returns the shape id."""
    chunks = [torch.randint(3, 90, (40,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(4)]
    eng.record_trace(chunks, keep_hidden=True).save(path)
    return eng.shape_id


def record_chunks(model_dir, path) -> str:
    """_record with a tiny engine of the checkpoint."""
    with activemoe.load(model_dir, EngineConfig.tiny(num_slots=24)) as eng:
        return _record(eng, path)


@pytest.fixture(scope="module")
def recorded(checkpoint, tmp_path_factory):
    model_dir = checkpoint("qwen3_moe")
    path = tmp_path_factory.mktemp("trace") / "t.trace"
    return model_dir, path, record_chunks(model_dir, path)


def test_trace_round_trip(recorded):
    model_dir, path, shape = recorded
    trace = load_trace(path)
    assert trace.meta["version"] == "1" and trace.layers == [0, 1, 2]
    assert trace.layer.shape[0] == trace.experts.shape[0] == 4 * 40 * 3 and trace.experts.shape[1] == 2
    assert trace.hidden.shape == (480, 32) and int(trace.token.max()) == 159
    assert trace.tokens.shape == (160, 32)  # one embedding per token
    trace.check_model(shape)
    assert not list(path.parent.glob(".*.tmp")), "the temp file was left behind"


def test_damaged_and_foreign_traces_are_refused(recorded, tmp_path):
    _, path, _ = recorded
    damaged = tmp_path / "damaged.trace"
    damaged.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="damaged|not a readable"):
        load_trace(damaged)
    with pytest.raises(UserError, match="another model"):
        load_trace(path).check_model("0000")


def test_unknown_version_is_refused(recorded, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path, _ = recorded
    trace = load_trace(path)
    future = tmp_path / "future.trace"
    save_file(load_file(path), future, metadata={**trace.meta, "version": "9"})
    with pytest.raises(UserError, match="version 9"):
        load_trace(future)


def test_learned_heads_fit_and_predict(recorded, tmp_path):
    _, path, shape = recorded
    trace = load_trace(path)
    heads = train_heads(trace, lookahead=2, epochs=40, lr=1e-2)
    assert set(heads) == {(TOKENS, 1), (TOKENS, 2), (0, 1), (0, 2), (1, 1)}  # TOKENS: from the embeddings
    save_heads(tmp_path / "p.safetensors", heads, {"shape_id": shape, "model_type": "qwen3_moe"})
    loaded = load_heads(tmp_path / "p.safetensors", shape)
    predictor = LearnedPredictor(loaded, [0, 1, 2], lookahead=2)
    row = 0  # layer 0 of token 0
    preds = predictor.predict(0, 0, trace.hidden[row:row + 1], trace.experts[row:row + 1].long())
    assert [(p.layer, p.distance) for p in preds] == [(1, 1), (2, 2)]
    with pytest.raises(UserError, match="another model"):
        load_heads(tmp_path / "p.safetensors", "ffff")


def _replay(predictor, trace, tokens: int, budget: int = 2) -> float:
    """Teacher-forced recall of `predictor` over the first `tokens` tokens of `trace`, in order."""
    from activemoe.evaluation import evaluate

    score = evaluate(trace, predictor, budget, max_tokens=tokens)
    return sum(score.hits.values()) / sum(score.routed.values())


def test_mlp_heads_round_trip_and_fit_better(recorded, tmp_path):
    _, path, shape = recorded
    trace = load_trace(path)
    torch.manual_seed(0)
    linear = train_heads(trace, lookahead=1, epochs=30, lr=1e-2, context=False)
    mlp = train_heads(trace, lookahead=1, epochs=30, lr=1e-2, mlp_width=32)
    head = mlp[(0, 1)]
    assert head.mlp_in.shape == head.mlp_in_context.shape == (32, 32) and head.context.shape == (8, 32)
    save_heads(tmp_path / "m.safetensors", mlp, {"shape_id": shape, "model_type": "qwen3_moe"})
    loaded = load_heads(tmp_path / "m.safetensors", shape)
    for name in ("weight", "bias", "context", "mlp_in", "mlp_in_bias", "mlp_out", "mlp_in_context"):
        assert torch.equal(getattr(loaded[(0, 1)], name), getattr(head, name))
    fit = lambda heads: _replay(LearnedPredictor(heads, [0, 1, 2], lookahead=1), trace, 120)  # noqa: E731
    assert fit(loaded) >= fit(linear)


def _synthetic_trace(tokens: int, seed: int = 0):
    """Two MoE layers, E = 8, top-2. Layer 1 routes to the pair a token's *previous* token carried in its
    layer-1 input (a one-hot code in hidden dims 0-3), so layer 0's own input says nothing about it."""
    from activemoe.trace import Trace

    gen = torch.Generator().manual_seed(seed)
    pair = torch.randint(0, 4, (tokens,), generator=gen)  # the pair layer 1 of token t+1 routes to
    hidden = torch.randn(tokens, 2, 8, generator=gen) * 0.1
    hidden[torch.arange(tokens), 1, pair] += 3.0
    routed = torch.roll(pair, 1)  # token t routes to its predecessor's code
    experts = torch.stack([torch.stack([routed * 2, routed * 2 + 1], -1),
                           torch.randint(0, 8, (tokens, 2), generator=gen)], 1)  # [T, layer, K]: layer 0 random
    experts = experts[:, [1, 0]]  # row order per token: layer 0, layer 1
    meta = {"layers": "[0, 1]", "num_experts": "8", "top_k": "2", "hidden_size": "8", "shape_id": "s"}
    return Trace(torch.tensor([0, 1] * tokens, dtype=torch.int32), torch.arange(tokens).repeat_interleave(2),
                 experts.reshape(-1, 2).int(), torch.full((2 * tokens, 2), 0.5), hidden.reshape(-1, 8).half(), meta)


def test_context_heads_learn_what_only_the_previous_token_knows():
    """Layer 1's routing is a function of the previous token's layer-1 input: heads that read that
    context predict it perfectly on held-out tokens; heads on layer 0's input alone cannot."""
    torch.manual_seed(0)
    train, held = _synthetic_trace(2000, seed=0), _synthetic_trace(300, seed=1)
    with_context = train_heads(train, lookahead=1, epochs=20, lr=1e-2)
    without = train_heads(train, lookahead=1, epochs=20, lr=1e-2, context=False)
    assert _replay(LearnedPredictor(with_context, [0, 1], lookahead=1), held, 300) > 0.99
    assert _replay(LearnedPredictor(without, [0, 1], lookahead=1), held, 300) < 0.5


def test_token_heads_predict_the_first_layer_from_the_embedding():
    """Layer 0 routes to the pair a token's embedding codes: heads on the embeddings (source TOKENS,
    called before the first MoE layer) predict it perfectly; within-token heads cannot reach layer 0."""
    from activemoe.trace import Trace

    def trace(tokens, seed):
        gen = torch.Generator().manual_seed(seed)
        pair = torch.randint(0, 4, (tokens,), generator=gen)
        embedded = torch.randn(tokens, 8, generator=gen) * 0.1
        embedded[torch.arange(tokens), pair] += 3.0
        experts = torch.stack([torch.stack([pair * 2, pair * 2 + 1], -1), torch.randint(0, 8, (tokens, 2), generator=gen)], 1)
        meta = {"layers": "[0, 1]", "num_experts": "8", "top_k": "2", "hidden_size": "8", "shape_id": "s"}
        return Trace(torch.tensor([0, 1] * tokens, dtype=torch.int32), torch.arange(tokens).repeat_interleave(2),
                     experts.reshape(-1, 2).int(), torch.full((2 * tokens, 2), 0.5),
                     torch.randn(2 * tokens, 8, generator=gen).half(), meta, embedded.half())

    torch.manual_seed(0)
    heads = train_heads(trace(2000, 0), lookahead=1, epochs=40, lr=1e-2)
    assert set(heads) == {(TOKENS, 1), (0, 1)}
    predictor = LearnedPredictor(heads, [0, 1], lookahead=1)
    assert predictor.sees_tokens
    from activemoe.evaluation import evaluate

    score = evaluate(trace(300, 1), predictor, budget=2)
    assert score.recall(1, layer=0) == 1.0


def test_training_pairs_match_tokens_across_layers():
    """pairs(): per (source, k), the rows of each token that reaches both layers, in token order, with the
    previous token's row at the target layer as context (-1 where it has none); the embeddings' row is the
    token. Token 1 skips layer 1 (rows of a layer a token never reached are absent)."""
    from activemoe.learned import pairs
    from activemoe.trace import Trace

    # rows: token 0 at layers 0, 1; token 1 at layer 0 only; token 2 at layers 0, 1 (in recording order)
    layer, token = [0, 1, 0, 0, 1], [0, 0, 1, 2, 2]
    meta = {"layers": "[0, 1]", "num_experts": "4", "top_k": "1", "hidden_size": "2", "shape_id": "s"}
    trace = Trace(torch.tensor(layer, dtype=torch.int32), torch.tensor(token), torch.zeros(5, 1, dtype=torch.int32),
                  torch.ones(5, 1), torch.zeros(5, 2).half(), meta, torch.zeros(3, 2).half())
    got = {key: tuple(part.tolist() for part in parts) for key, parts in pairs(trace, lookahead=2).items()}
    assert got == {(TOKENS, 1): ([0, 1, 2], [0, 2, 3], [-1, 0, 2]),  # token 1's context: token 0 at layer 0
                   (TOKENS, 2): ([0, 2], [1, 4], [-1, -1]),  # token 2's predecessor never reached layer 1
                   (0, 1): ([0, 3], [1, 4], [-1, -1])}


def test_context_rows_follow_the_sequences():
    """A decode batch reads its own rows' context; after a prefill of B sequences, each sequence's last
    prompt row; with nothing recorded yet (or rows that cannot be matched), none."""
    code = torch.eye(8, 4) * 10  # expert e < 4 scores 10 * (previous token's layer-1 input)[e]
    heads = {(0, 1): Head(torch.zeros(8, 4), torch.zeros(8), context=code)}
    predictor = LearnedPredictor(heads, [0, 1], lookahead=1)
    top = lambda rows: [set(p.experts[:rows]) for p in predictor.predict(0, 0, torch.zeros(rows, 4), None)]  # noqa: E731
    flat = lambda rows: [p.probs[0] == p.probs[-1] for p in predictor.predict(0, 0, torch.zeros(rows, 4), None)]  # noqa: E731
    assert flat(1) == [True]  # nothing recorded: every expert scores the same
    prefill = torch.zeros(2 * 3, 4)  # two sequences of three prompt tokens
    prefill[2, 1] = prefill[5, 3] = 1.0  # the last prompt rows code experts 1 and 3
    predictor.predict(0, 1, prefill, None)
    assert top(1) == [{3}]  # one sequence: the prompt's last row
    predictor.predict(0, 1, prefill, None)
    assert top(2) == [{1, 3}]  # a batch of two: each sequence's last row (the best over both rows)
    decode = torch.zeros(2, 4)
    decode[0, 2] = decode[1, 0] = 1.0
    predictor.predict(0, 1, decode, None)
    assert top(2) == [{0, 2}]
    predictor.predict(0, 1, decode.bfloat16(), None)  # a bfloat16 model's states (numpy has no bfloat16)
    assert top(2) == [{0, 2}]
    predictor.predict(0, 1, decode, None)
    assert flat(4) == [True]  # 2 rows cannot serve 4
    predictor.predict(0, 1, prefill, None)
    predictor.begin()
    assert flat(1) == [True]


def test_heads_on_the_model_device_predict_as_on_the_host():
    """The matmul on the model's device (here torch on the CPU, as it would run on CUDA) gives the host
    path's predictions: same ranking, probabilities within float tolerance, through steps and a prefill."""
    gen = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    heads = {(src, k): Head(r(8, 6), r(8), r(8, 6), r(4, 6), r(4), r(8, 4), r(4, 6))
             for src, k in [(TOKENS, 1), (TOKENS, 2), (0, 1), (0, 2), (1, 1)]}
    host = LearnedPredictor(heads, [0, 1, 2], lookahead=2)
    device = LearnedPredictor(heads, [0, 1, 2], lookahead=2, device=torch.device("cpu"))
    for rows in (3, 1, 1):  # a prefill of three rows, then two decode steps
        for layer in (TOKENS, 0, 1, 2):
            x = r(rows, 6)
            for a, b in zip(host.predict(0, layer, x, None), device.predict(0, layer, x, None), strict=True):
                assert (a.layer, a.distance, a.experts) == (b.layer, b.distance, b.experts)
                assert a.probs == pytest.approx(b.probs, abs=1e-6)


def test_predictor_files_of_another_version_are_refused(recorded, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path, shape = recorded
    heads = train_heads(load_trace(path), lookahead=1, epochs=1)
    save_heads(tmp_path / "h.safetensors", heads, {"shape_id": shape})
    for version in ("1", "9"):
        save_file(load_file(tmp_path / "h.safetensors"), tmp_path / "old.safetensors",
                  {"format": "activemoe-predictor", "version": version, "shape_id": shape})
        with pytest.raises(UserError, match=f"version {version}.*train it again"):
            load_heads(tmp_path / "old.safetensors", shape)


def test_parity_with_learned_heads_single_and_batched(recorded, tmp_path):
    """Exact parity with context heads in play, for one sequence and a padded batch of two."""
    from transformers import AutoModelForCausalLM

    from activemoe.config import CacheConfig, PrefetchConfig
    from tests.test_parity import GEN, PROMPT, _assert_parity

    model_dir, path, shape = recorded
    heads = train_heads(load_trace(path), lookahead=2, epochs=3, mlp_width=8)
    save_heads(tmp_path / "h.safetensors", heads, {"shape_id": shape, "model_type": "qwen3_moe"})
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch = torch.tensor([[0, 0, 9, 12, 40], PROMPT[0, :5].tolist()])
    mask = (batch != 0).long()
    cfg = EngineConfig(cache=CacheConfig(num_slots=6, policy="slru"),
                       prefetch=PrefetchConfig(predictor="learned", lookahead=2,
                                               predictor_file=str(tmp_path / "h.safetensors")))
    with activemoe.load(model_dir, cfg) as eng:
        early = []  # loads requested from the token embeddings, before the first MoE layer
        ahead = eng.runtime.loader.ahead
        eng.runtime.loader.ahead = lambda requests: (early.extend(requests), ahead(requests))
        _assert_parity(ref_model.generate(PROMPT, **GEN), eng.model.generate(PROMPT, **GEN))
        assert {eid.layer for eid, _, _ in early} == {0, 1}
        calls = []  # token-stage predictions: once per forward, from the sampled token (else the embedding hook)
        predict = eng.runtime.predictor.predict
        eng.runtime.predictor.predict = lambda e, layer, *a: (calls.append(e) if layer == TOKENS else None,
                                                               predict(e, layer, *a))[1]
        out = eng.generate(PROMPT[0].tolist(), max_new_tokens=6, sampling=SamplingConfig(do_sample=False))
        assert len(out.token_ids) == 6 and calls == [-1, 2, 5, 8, 11, 14]  # 3 MoE layers per forward
        _assert_parity(ref_model.generate(batch, attention_mask=mask, **GEN),
                       eng.model.generate(batch, attention_mask=mask, **GEN))


def test_trace_cli_flow_and_bad_input(capsys, recorded, tmp_path, monkeypatch):
    model_dir, path, _ = recorded
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("5 6 7\n")
    assert_user_error(capsys, ["trace", "record", "--model", str(model_dir), "--prompts", str(prompts),
                               "--out", str(tmp_path / "x.trace")], "no tokenizer")
    assert_user_error(capsys, ["trace", "record", "--model", str(model_dir), "--split", "heldout",
                               "--out", str(tmp_path / "x.trace")], "heldout_files.txt")
    out = tmp_path / "p.safetensors"
    assert main(["train-predictor", "--trace", str(path), "--model", str(model_dir), "--out", str(out),
                 "--lookahead", "2", "--epochs", "2", "--mlp-width", "12,4"]) == 0  # one width per lookahead
    capsys.readouterr()
    heads = load_heads(out, load_trace(path).meta["shape_id"])
    assert {(k, h.mlp_in.shape[0]) for (_, k), h in heads.items()} == {(1, 12), (2, 4)}
    for bad in ("12,0", "-1", "wide"):
        assert_user_error(capsys, ["train-predictor", "--trace", str(path), "--out", str(tmp_path / "bad.safetensors"),
                                   "--mlp-width", bad], "width")
        assert not (tmp_path / "bad.safetensors").exists()
    assert main(["predict-eval", "--model", str(model_dir), "--trace", str(path), "--predictor-file", str(out),
                 "--lookahead", "2", "--json", "--plot", str(tmp_path / "h.png")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["predictors"]) == {"pregate", "history", "learned", "adaptive"}
    assert all(0 < p["step_share_in_place"] < 1 for p in result["predictors"].values())  # measured in place
    assert (tmp_path / "h.png").stat().st_size > 1000
    # recall alone: no expert weight is read (a model larger than the machine can be evaluated), same recall
    reads = []
    monkeypatch.setattr(ExpertStore, "read_from_checkpoint", lambda self, eid, pool=None: reads.append(eid))
    assert main(["predict-eval", "--model", str(model_dir), "--trace", str(path), "--predictor-file", str(out),
                 "--lookahead", "2", "--json", "--no-cost"]) == 0
    recall_only = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reads == [] and recall_only["decode_step_us"] is None
    for name, p in recall_only["predictors"].items():
        assert p["recall"] == result["predictors"][name]["recall"] and p["step_share_in_place"] is None
    monkeypatch.undo()
    other = activemoe.tiny.build_tiny_checkpoint("olmoe", tmp_path / "olmoe")
    assert_user_error(capsys, ["predict-eval", "--model", str(other), "--trace", str(path)], "another model")
    assert_user_error(capsys, ["generate", "--model", str(other), "--prompt-ids", "5", "--predictor", "learned",
                               "--predictor-file", str(out)], "another model")


def test_fused_heads_compute_each_head_as_written():
    """The predictor fuses every head a layer's input feeds into one matmul per call; each prediction still
    equals its head computed alone, softmax(W x + b + C c + W2 silu(W1 x + W1c c + b1)) with c the previous
    token's input at the target layer, when the MLP width differs per lookahead."""
    gen = torch.Generator().manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    width = {1: 6, 2: 3}
    heads = {(src, k): Head(r(8, 5), r(8), r(8, 5), r(width[k], 5), r(width[k]), r(8, width[k]), r(width[k], 5))
             for src, k in [(TOKENS, 1), (TOKENS, 2), (0, 1), (0, 2), (1, 1)]}
    predictor = LearnedPredictor(heads, [0, 1, 2], lookahead=2)
    previous: dict[int, torch.Tensor] = {}
    checked = 0
    for _ in range(3):  # decode steps
        inputs = {layer: r(1, 5) for layer in (TOKENS, 0, 1, 2)}
        for layer, x in inputs.items():
            for p in predictor.predict(0, layer, x, None):
                h, c = heads[(layer, p.distance)], previous.get(p.layer, torch.zeros(1, 5))
                hidden = torch.nn.functional.silu(x @ h.mlp_in.T + c @ h.mlp_in_context.T + h.mlp_in_bias)
                probs = (x @ h.weight.T + h.bias + c @ h.context.T + hidden @ h.mlp_out.T).softmax(-1)[0]
                assert list(p.experts) == probs.argsort(descending=True).tolist()
                assert p.probs == pytest.approx(probs[list(p.experts)].tolist(), abs=1e-5)
                checked += 1
        previous = inputs
    assert checked == 3 * 5


def test_long_prefill_ranks_a_sample_and_defers_the_context():
    """A prefill longer than RANKED_ROWS ranks the experts from RANKED_ROWS evenly spaced rows (the last one
    included), and the next decode step of B sequences reads each sequence's last prompt row as context:
    the same predictions as a predictor that saw only those rows."""
    gen = torch.Generator().manual_seed(2)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    heads = {(src, k): Head(r(8, 5), r(8), r(8, 5), r(6, 5), r(6), r(8, 6), r(6, 5))
             for src, k in [(TOKENS, 1), (TOKENS, 2), (0, 1), (0, 2), (1, 1)]}
    same = lambda a, b: len(a) == len(b) and all(  # noqa: E731
        p.experts == q.experts and p.probs == pytest.approx(q.probs, abs=1e-5) for p, q in zip(a, b))
    for batch, length in [(1, 70), (3, 20)]:
        rows = batch * length
        assert rows > RANKED_ROWS
        prefill = {layer: r(rows, 5) for layer in (TOKENS, 0, 1, 2)}
        decode = {layer: r(batch, 5) for layer in (TOKENS, 0, 1, 2)}
        sample = torch.linspace(rows - 1, 0, RANKED_ROWS).round().long()
        last = torch.arange(length - 1, rows, length)  # each sequence's last prompt row
        long, ranked, short = (LearnedPredictor(heads, [0, 1, 2], lookahead=2) for _ in range(3))
        for layer, x in prefill.items():
            assert same(long.predict(0, layer, x, None), ranked.predict(0, layer, x[sample], None))
            short.predict(0, layer, x[last], None)
        for layer, x in decode.items():
            assert same(long.predict(1, layer, x, None), short.predict(1, layer, x, None))


def test_deferred_context_work_predicts_as_done_at_once():
    """A step's context parts wait for `idle()` or the next step: calling idle between calls (all of it, or
    one piece), or never, gives the same predictions, through a long prefill, decode steps and a batch;
    and the input a call keeps is a copy, so a caller reusing its buffer changes nothing."""
    gen = torch.Generator().manual_seed(3)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    heads = {(src, k): Head(r(8, 5), r(8), r(8, 5), r(6, 5), r(6), r(8, 6), r(6, 5))
             for src, k in [(TOKENS, 1), (TOKENS, 2), (0, 1), (0, 2), (1, 1)]}
    never, piece, drain = (LearnedPredictor(heads, [0, 1, 2], lookahead=2) for _ in range(3))
    worked = []
    for rows in (40, 1, 1, 1, 2, 2):  # a long prefill, decode steps, a batch of two
        for layer in (TOKENS, 0, 1, 2):
            x = r(rows, 5)
            out = [p.predict(0, layer, x.clone(), None) for p in (never, piece, drain)]
            for a, b in zip(out[0] * 2, out[1] + out[2], strict=True):
                assert (a.layer, a.distance, a.experts) == (b.layer, b.distance, b.experts)
                assert a.probs == pytest.approx(b.probs, abs=1e-6)
            while drain.idle():
                pass
            assert not drain.pending
        worked.append(piece.idle())  # one piece per step: the other layers' parts wait for the next step
    assert all(worked)
    kept = torch.ones(1, 5)
    fresh = LearnedPredictor(heads, [0, 1, 2], lookahead=2)
    for p, x in ((drain, kept), (fresh, torch.ones(1, 5))):
        for layer in (TOKENS, 0, 1, 2):
            p.predict(0, layer, x, None)
    kept.zero_()  # the caller reuses its buffer before the next step reads the kept input
    assert [q.experts for q in drain.predict(0, 0, torch.ones(1, 5), None)] == \
        [q.experts for q in fresh.predict(0, 0, torch.ones(1, 5), None)]


def test_the_runtime_does_deferred_predictor_work_while_it_waits(recorded, tmp_path):
    """Over a slow emulated link the compute path waits on its misses; the learned predictor's deferred
    context work runs in those waits, counted apart from its critical-path share; the tokens are those of an
    unpaced link."""
    from activemoe.config import CacheConfig, LinkConfig, PrefetchConfig

    model_dir, path, shape = recorded
    heads = train_heads(load_trace(path), lookahead=2, epochs=1, mlp_width=8)
    save_heads(tmp_path / "h.safetensors", heads, {"shape_id": shape, "model_type": "qwen3_moe"})
    greedy, tokens = SamplingConfig(do_sample=False), {}
    for gbps in (None, 0.005):
        cfg = EngineConfig(cache=CacheConfig(num_slots=6), link=LinkConfig(gbps),
                           prefetch=PrefetchConfig(predictor="learned", lookahead=2,
                                                   predictor_file=str(tmp_path / "h.safetensors")))
        with activemoe.load(model_dir, cfg) as eng:
            out = eng.generate(list(range(5, 25)), max_new_tokens=8, sampling=greedy)
        tokens[gbps] = out.token_ids
    assert out.stats.stall_s > 0 and out.stats.predict_share > 0
    assert 0 < out.stats.predict_waiting_share * sum(out.stats.per_token_s) <= out.stats.stall_s
    assert tokens[None] == tokens[0.005]


@pytest.mark.skipif(not (BUNDLED / "config.json").is_file(), reason="bundled model not built")
def test_trace_record_of_a_model_larger_than_the_device(tmp_path, capsys):
    """`trace record` and `perplexity` take generate's memory flags, so a model that does not fit can be
    traced and scored offloaded: a few slots over the disk tier record the same routing and the same
    perplexity as every expert resident (exact mode)."""
    base = ["--model", str(BUNDLED), "--split", "heldout", "--max-tokens", "256"]
    small = ["--cache-experts", "4", "--store", "disk"]
    traces, slots = {}, []
    for name, flags in (("all", []), ("small", small)):
        assert main(["trace", "record", *base, "--hidden", "--out", str(tmp_path / name), *flags]) == 0
        traces[name] = load_trace(tmp_path / name)
        slots.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_slots"])
    assert slots == [64, 4]
    assert torch.equal(traces["all"].experts, traces["small"].experts)
    assert torch.equal(traces["all"].hidden, traces["small"].hidden)
    scores = []
    for flags in ([], small):
        assert main(["perplexity", *base, *flags]) == 0
        result = json.loads(capsys.readouterr().out)
        scores.append((result["perplexity"], result["num_slots"], result["store"]))
    assert scores[1] == (scores[0][0], 4, "disk") and scores[0][1:] == (64, "ram")


@pytest.mark.skipif(not (BUNDLED / "config.json").is_file(), reason="bundled model not built")
def test_trace_record_new_tokens_records_bench_workload(tmp_path, capsys):
    """`--new-tokens N` records each prompt chunk and its greedy continuation's N-1 decode steps (the last
    token is never run): the routing `bench` replays at that prompt length, with hidden states."""
    out = tmp_path / "w.safetensors"
    base = ["trace", "record", "--model", str(BUNDLED), "--split", "heldout", "--max-tokens", "16", "--seq-len", "16"]
    assert main([*base, "--new-tokens", "5", "--hidden", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    trace = load_trace(out)
    assert result["tokens"] == 20 and trace.tokens.shape[0] == 20 and trace.hidden.shape[0] == 20 * 4
    assert_user_error(capsys, [*base, "--new-tokens", "-1", "--out", str(out)], "--new-tokens at least 0")


@pytest.mark.parametrize("family,top_k", [("qwen3_5_moe", 2), ("gemma4", 2), ("llama4", 1), ("qwen3_vl_moe", 2)])
def test_vision_language_checkpoints_record_train_and_predict(checkpoint, family, top_k, tmp_path):
    """Qwen3.5-MoE, Gemma 4, Llama 4 (top-1, as released) and Qwen3-VL-MoE (which transformers builds only as a
    vision-language model, not as a causal LM) come as vision-language checkpoints, whose config
    keeps top-k and the hidden size in its text config: traces record, learned heads train on them, and the
    learned predictor keeps parity while it prefetches."""
    from activemoe.config import CacheConfig, PrefetchConfig
    from tests.test_parity import GEN, PROMPT, _assert_parity, _reference

    model_dir = checkpoint(family, top_k=top_k)
    with activemoe.load(model_dir, EngineConfig.tiny(num_slots=24)) as eng:
        assert eng.top_k == top_k  # the text config's: 1 where only the outer config was read
        shape = _record(eng, tmp_path / "t.trace")
    heads = train_heads(load_trace(tmp_path / "t.trace"), lookahead=2, epochs=2)
    save_heads(tmp_path / "h.safetensors", heads, {"shape_id": shape, "model_type": family})
    cfg = EngineConfig(cache=CacheConfig(num_slots=6, policy="slru"),
                       prefetch=PrefetchConfig(predictor="learned", lookahead=2,
                                               predictor_file=str(tmp_path / "h.safetensors")))
    ref = _reference(model_dir)
    with activemoe.load(model_dir, cfg) as eng:
        _assert_parity(ref, eng.model.generate(PROMPT, **GEN))
        out = eng.generate(PROMPT[0].tolist(), max_new_tokens=8, sampling=SamplingConfig(do_sample=False))
        assert out.stats.speculative_loads > 0 and out.stats.recall  # the heads predicted and prefetched


def test_a_llama4_trace_needs_top_1(checkpoint):
    with activemoe.load(checkpoint("llama4_text"), EngineConfig.tiny(num_slots=24)) as eng:
        with pytest.raises(UserError, match="top-1 routing.*routes 2"):
            eng.record_trace([[5, 6, 7]])
