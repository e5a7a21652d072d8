"""The bundled, trained model loads with plain transformers and with ActiveMoE, identically."""
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import activemoe
from activemoe.config import CacheConfig, EngineConfig, PrefetchConfig, SamplingConfig

BUNDLED = Path(activemoe.__file__).parent / "assets" / "tiny-moe"
pytestmark = pytest.mark.skipif(not (BUNDLED / "config.json").is_file(), reason="bundled model not built")


def test_bundled_model_parity_and_text():
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    ids = tokenizer("def read_config(path):\n")["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32)
    gen = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = ref.generate(torch.tensor([ids]), **gen)
    config = EngineConfig(cache=CacheConfig(slot_fraction=0.25), prefetch=PrefetchConfig(predictor="oracle"))
    with activemoe.load(BUNDLED, config) as engine:
        assert engine.load_stats.num_slots == engine.load_stats.total_experts // 4
        got = engine.model.generate(torch.tensor([ids]), **gen)
        assert torch.equal(got.sequences, expected.sequences)
        for a, b in zip(expected.logits, got.logits):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        out = engine.generate(ids, max_new_tokens=12, sampling=SamplingConfig(do_sample=False))
        assert out.token_ids == expected.sequences[0, len(ids):].tolist()[:len(out.token_ids)]
        text = engine.decode(out.token_ids)
        assert isinstance(text, str) and text.strip()


def test_bench_prompts_are_held_out_text_whichever_baseline_runs_first():
    """The bench's prompts for a bundled-style model are its held-out text, also when the first baseline
    is plain transformers (no ActiveMoE engine to ask for a tokenizer: it once fell back to random ids)."""
    from activemoe.bench import BenchConfig, bench_prompts
    from activemoe.trace import split_texts

    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    text = tokenizer(split_texts(BUNDLED, "heldout")[0], verbose=False)["input_ids"]
    for baselines in (("transformers", "reactive"), ("reactive", "transformers")):
        prompts = bench_prompts(BenchConfig(BUNDLED, baselines, prompt_lengths=(16, 128), batch_sizes=(1, 2)))
        assert prompts[(16, 1)] == [text[:16]] and prompts[(128, 2)] == [text[:128], text[128:256]]
