"""--routing pregated: the approximate mode decides layer N+1's routing at layer N."""
from pathlib import Path

import pytest
import torch

import activemoe
from activemoe.cli import main
from activemoe.config import CacheConfig, EngineConfig, PrefetchConfig, SamplingConfig
from activemoe.errors import UserError
from tests.test_cli import assert_user_error

BUNDLED = Path(activemoe.__file__).parent / "assets" / "tiny-moe"


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_pregated_routing_substitutes_early_decisions(checkpoint, family):
    cfg = EngineConfig(cache=CacheConfig(num_slots=4), routing="pregated")
    with activemoe.load(checkpoint(family), cfg) as eng:
        out = eng.generate([5, 6, 7, 8], max_new_tokens=8, sampling=SamplingConfig(do_sample=False))
        routing = eng.runtime.predictor
        assert routing.name == "pregated" and routing.substituted > 0
        assert out.token_ids and out.stats.recall.get("1") == 1.0  # decisions are what gets routed
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        routing.begin()
        approx = eng.model(ids).logits
    with activemoe.load(checkpoint(family), EngineConfig.tiny(num_slots=4)) as exact:
        assert not torch.allclose(approx, exact.model(ids).logits), "pregated routing should change the model"


def test_pregated_refuses_a_second_predictor(checkpoint):
    cfg = EngineConfig(routing="pregated", prefetch=PrefetchConfig(predictor="pregate"))
    with pytest.raises(UserError, match="without --predictor"):
        activemoe.load(checkpoint("qwen3_moe"), cfg)


@pytest.mark.skipif(not (BUNDLED / "config.json").is_file(), reason="bundled model not built")
def test_perplexity_command_exact_and_pregated(capsys):
    import json

    results = {}
    for routing in ("exact", "pregated"):
        assert main(["perplexity", "--model", str(BUNDLED), "--split", "heldout", "--routing", routing,
                     "--max-tokens", "512"]) == 0
        results[routing] = json.loads(capsys.readouterr().out)
    assert results["exact"]["tokens"] == results["pregated"]["tokens"] > 500
    assert 1 < results["exact"]["perplexity"] < 1000 and results["pregated"]["approximate"]
    assert results["exact"]["perplexity"] != results["pregated"]["perplexity"]


def test_perplexity_bad_input(capsys, checkpoint, tmp_path):
    assert_user_error(capsys, ["perplexity", "--model", str(checkpoint("qwen3_moe")), "--prompts",
                               str(tmp_path / "missing.txt")], "does not exist")
