"""Bad input gets one line on stderr and exit code 2, never a traceback; good input works."""
import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from activemoe.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(capsys, argv, *needles):
    rc, out, err = run(capsys, *argv)
    assert rc == 2, (rc, err)
    errors = [line for line in err.splitlines() if line.startswith("activemoe: error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def gen(model_dir, *extra):
    return ["generate", "--model", str(model_dir), "--prompt-ids", "5,6,7", "--max-new-tokens", "4", *extra]


def test_generate_json(capsys, checkpoint):
    rc, out, err = run(capsys, *gen(checkpoint("qwen3_moe"), "--json", "--greedy", "--cache-experts", "4"))
    assert rc == 0
    result = json.loads(out)
    assert len(result["token_ids"]) == 4 and result["text"] is None
    for key in ("hit_rate", "loads", "evictions", "bytes_moved", "ttft_s", "decode_tok_s", "peak_rss_bytes"):
        assert key in result["stats"]
    assert result["stats"]["num_slots"] == 4


def test_expert_memory_sets_slot_count(capsys, checkpoint):
    model_dir = checkpoint("qwen3_moe")
    rc, out, _ = run(capsys, *gen(model_dir, "--json", "--expert-memory", "30KiB"))
    assert rc == 0
    expert_bytes = 3 * 16 * 32 * 4  # gate, up, down of a 32x16 fp32 expert
    assert json.loads(out)["stats"]["num_slots"] == 30 * 1024 // expert_bytes


def test_missing_directory(capsys, tmp_path):
    assert_user_error(capsys, gen(tmp_path / "nope"), "does not exist")


def test_directory_without_config(capsys, tmp_path):
    assert_user_error(capsys, gen(tmp_path), "no config.json")


def test_dense_model_is_refused(capsys, tmp_path):
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    assert_user_error(capsys, gen(tmp_path), "'llama'", "tested families: mixtral")


def test_truncated_safetensors_names_the_file(capsys, checkpoint, tmp_path):
    src = checkpoint("mixtral")
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert_user_error(capsys, gen(tmp_path), "model.safetensors", "truncated")


def test_garbage_safetensors_names_the_file(capsys, checkpoint, tmp_path):
    for f in checkpoint("mixtral").iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"\x07" * 64)
    assert_user_error(capsys, gen(tmp_path), "model.safetensors")


@pytest.mark.parametrize("family,key", [
    ("qwen3_moe", "model.layers.1.mlp.experts.3.up_proj.weight"),
    ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w2.weight"),
])
def test_missing_expert_tensor_names_layer_and_expert(capsys, checkpoint, tmp_path, family, key):
    for f in checkpoint(family).iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors[key]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert_user_error(capsys, gen(tmp_path), "layer 1 expert 3")


def test_cache_smaller_than_top_k(capsys, checkpoint):
    assert_user_error(capsys, gen(checkpoint("qwen3_moe"), "--cache-experts", "1"), "minimum is 2")


def test_expert_memory_too_small(capsys, checkpoint):
    assert_user_error(capsys, gen(checkpoint("qwen3_moe"), "--expert-memory", "1KiB"), "minimum is 2 experts")


def test_prompt_ids_outside_vocabulary(capsys, checkpoint):
    argv = ["generate", "--model", str(checkpoint("qwen3_moe")), "--prompt-ids", "5,96"]
    assert_user_error(capsys, argv, "outside the vocabulary", "0..95")


def test_prompt_ids_not_integers(capsys, checkpoint):
    argv = ["generate", "--model", str(checkpoint("qwen3_moe")), "--prompt-ids", "5,x"]
    assert_user_error(capsys, argv, "comma-separated integers")


@pytest.mark.parametrize("flag, value, needle", [("--temperature", "-1", "temperature must be positive"),
                                                ("--top-p", "0", "top-p must be in (0, 1]"),
                                                ("--top-p", "1.5", "top-p must be in (0, 1]")])
def test_sampling_values_out_of_range(capsys, checkpoint, flag, value, needle):
    assert_user_error(capsys, gen(checkpoint("qwen3_moe"), flag, value), needle)


def test_temperature_zero_is_greedy(capsys, checkpoint):
    model_dir = checkpoint("qwen3_moe")
    outputs = []
    for flags in (["--greedy"], ["--temperature", "0", "--seed", "1"]):
        rc, out, err = run(capsys, *gen(model_dir, "--json", "--max-new-tokens", "8", *flags))
        assert rc == 0, err
        outputs.append(json.loads(out)["token_ids"])
    assert outputs[0] == outputs[1]


def test_generation_longer_than_the_context(capsys, checkpoint):  # the tiny checkpoints have 256 positions
    argv = gen(checkpoint("qwen3_moe"), "--max-new-tokens", "254")
    assert_user_error(capsys, argv, "3-token prompt plus 254 new tokens", "context of 256 positions")


def test_size_string_that_does_not_parse(capsys, checkpoint):
    assert_user_error(capsys, gen(checkpoint("qwen3_moe"), "--expert-memory", "12 parsecs"), "cannot parse size")


def test_text_prompt_without_tokenizer(capsys, checkpoint):
    argv = ["generate", "--model", str(checkpoint("qwen3_moe")), "--prompt", "hello"]
    assert_user_error(capsys, argv, "--prompt-ids")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        main(["--debug", *gen(tmp_path / "nope")])


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "activemoe", "generate", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--cache-experts" in result.stdout and "--expert-memory" in result.stdout


def test_belady_needs_the_oracle(capsys, checkpoint):
    assert_user_error(capsys, gen(checkpoint("qwen3_moe"), "--policy", "belady"), "--predictor oracle")


def test_link_speed_must_be_positive(capsys, checkpoint):
    assert_user_error(capsys, gen(checkpoint("qwen3_moe"), "--link-gbps", "0"), "--link-gbps must be positive")


def test_generate_with_prefetch_flags_reports_runtime_stats(capsys, checkpoint):
    argv = gen(checkpoint("olmoe"), "--json", "--predictor", "oracle", "--lookahead", "2", "--policy", "slru",
               "--link-gbps", "0.5", "--store", "disk", "--cache-experts", "6")
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    stats = json.loads(out)["stats"]
    for key in ("stall_s", "overlap", "critical_loads", "speculative_loads", "wasted_loads", "late_loads",
                "host_computed"):
        assert key in stats
    assert stats["speculative_loads"] > 0 and stats["link_gbps"] == 0.5


def test_grouped_hits_and_issue_window_flags_give_the_same_tokens(capsys, checkpoint):
    model_dir = checkpoint("qwen3_moe")
    tokens = []
    for extra in ((), ("--grouped-hits",), ("--predictor", "pregate", "--lookahead", "2", "--issue-window", "4")):
        rc, out, err = run(capsys, *gen(model_dir, "--json", "--greedy", "--cache-experts", "12", *extra))
        assert rc == 0, err
        tokens.append(json.loads(out)["token_ids"])
    assert tokens[0] == tokens[1] == tokens[2] and len(tokens[0]) == 4
    assert_user_error(capsys, gen(model_dir, "--issue-window", "0"), "--issue-window must be at least 1")
