"""Traces and learned heads: format round trip, refusal of damaged or foreign files."""
import json

import pytest
import torch

import activemoe
import activemoe.tiny
from activemoe.cli import main
from activemoe.config import EngineConfig
from activemoe.errors import UserError
from activemoe.learned import LearnedPredictor, load_heads, save_heads, train_heads
from activemoe.trace import load_trace
from tests.test_cli import assert_user_error


@pytest.fixture(scope="module")
def recorded(checkpoint, tmp_path_factory):
    model_dir = checkpoint("qwen3_moe")
    tmp = tmp_path_factory.mktemp("trace")
    with activemoe.load(model_dir, EngineConfig.tiny(num_slots=24)) as eng:
        chunks = [torch.randint(3, 90, (40,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(4)]
        trace = eng.record_trace(chunks, keep_hidden=True)
        shape = eng.shape_id
    path = tmp / "t.trace"
    trace.save(path)
    return model_dir, path, shape


def test_trace_round_trip(recorded):
    model_dir, path, shape = recorded
    trace = load_trace(path)
    assert trace.meta["version"] == "1" and trace.layers == [0, 1, 2]
    assert trace.layer.shape[0] == trace.experts.shape[0] == 4 * 40 * 3 and trace.experts.shape[1] == 2
    assert trace.hidden.shape == (480, 32) and int(trace.token.max()) == 159
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
    assert set(heads) == {(0, 1), (0, 2), (1, 1)}
    save_heads(tmp_path / "p.safetensors", heads, {"shape_id": shape, "model_type": "qwen3_moe"})
    loaded = load_heads(tmp_path / "p.safetensors", shape)
    predictor = LearnedPredictor(loaded, [0, 1, 2], lookahead=2)
    row = 0  # layer 0 of token 0
    preds = predictor.predict(0, 0, trace.hidden[row:row + 1], trace.experts[row:row + 1].long())
    assert [(p.layer, p.distance) for p in preds] == [(1, 1), (2, 2)]
    with pytest.raises(UserError, match="another model"):
        load_heads(tmp_path / "p.safetensors", "ffff")


def test_mlp_heads_round_trip_and_fit_better(recorded, tmp_path):
    _, path, shape = recorded
    trace = load_trace(path)
    torch.manual_seed(0)
    linear = train_heads(trace, lookahead=1, epochs=30, lr=1e-2)
    mlp = train_heads(trace, lookahead=1, epochs=30, lr=1e-2, mlp_width=32)
    assert len(mlp[(0, 1)]) == 3 and mlp[(0, 1)][2][0].shape == (32, 32)  # W1 [M, H]
    save_heads(tmp_path / "m.safetensors", mlp, {"shape_id": shape, "model_type": "qwen3_moe"})
    loaded = load_heads(tmp_path / "m.safetensors", shape)
    assert all(torch.equal(a, b) for a, b in zip(loaded[(0, 1)][2], mlp[(0, 1)][2]))

    def fit(heads) -> float:  # recall@2 of layer 1 from layer 0's hidden state, on the training trace
        predictor = LearnedPredictor(heads, [0, 1, 2], lookahead=1)
        rows = trace.by_token()
        hits = total = 0
        for token in list(rows)[:120]:
            src, dst = rows[token][0], rows[token][1]
            named = predictor.predict(0, 0, trace.hidden[src:src + 1], None)[0].experts[:2]
            hits += len(set(named) & set(trace.experts[dst].tolist()))
            total += 2
        return hits / total

    assert fit(loaded) >= fit(linear)


def test_trace_cli_flow_and_bad_input(capsys, recorded, tmp_path):
    model_dir, path, _ = recorded
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("5 6 7\n")
    assert_user_error(capsys, ["trace", "record", "--model", str(model_dir), "--prompts", str(prompts),
                               "--out", str(tmp_path / "x.trace")], "no tokenizer")
    assert_user_error(capsys, ["trace", "record", "--model", str(model_dir), "--split", "heldout",
                               "--out", str(tmp_path / "x.trace")], "heldout_files.txt")
    out = tmp_path / "p.safetensors"
    assert main(["train-predictor", "--trace", str(path), "--model", str(model_dir), "--out", str(out),
                 "--lookahead", "2", "--epochs", "2"]) == 0
    capsys.readouterr()
    assert main(["predict-eval", "--model", str(model_dir), "--trace", str(path), "--predictor-file", str(out),
                 "--lookahead", "2", "--json", "--plot", str(tmp_path / "h.png")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["predictors"]) == {"pregate", "history", "learned", "adaptive"}
    assert (tmp_path / "h.png").stat().st_size > 1000
    other = activemoe.tiny.build_tiny_checkpoint("olmoe", tmp_path / "olmoe")
    assert_user_error(capsys, ["predict-eval", "--model", str(other), "--trace", str(path)], "another model")
    assert_user_error(capsys, ["generate", "--model", str(other), "--prompt-ids", "5", "--predictor", "learned",
                               "--predictor-file", str(out)], "another model")
