#!/usr/bin/env python3
"""Evaluate a tiny Qwen3-MoE model (default: activemoe/assets/tiny-moe) on the held-out split.

Uses exactly the corpus listing and split rule of scripts/train_tiny_moe.py
(files sorted by relative path, every 20th file held out) and reports:

  * held-out perplexity of the model (non-overlapping windows of --seq-len tokens,
    documents concatenated as "<eos> file0 <eos> file1 ...", first --max-tokens tokens);
  * unigram perplexity of the same tokenizer on the same predicted tokens, with
    unigram counts estimated on the *train* split and add-one (Laplace) smoothing;
  * routing statistics per MoE layer (from the routers' logits,
    model.model.layers[i].mlp.gate, via output_router_logits=True):
      share      per-expert fraction of routed (token, expert) assignments
      entropy    entropy (nats) of that usage distribution; its max is log E
      max/min    largest / smallest expert share (fair share = 1/E)
      same->next "same-experts" predictability: for each token, the fraction of
                 layer N+1's top-k experts that were also in layer N's top-k
                 (chance level for independent uniform routing = k/E).

Prints an aligned table and ends with one JSON line (--json: only the JSON line).
With --check, exits 1 unless ppl < unigram ppl and every expert in every layer
gets >= 1% and <= 4/E of the assignments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_tiny_moe as T  # noqa: E402  (corpus + split + perplexity helpers)

PROMPTS = ["def ", "import os\n", "class Foo("]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="eval_tiny_moe.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=T.DEFAULT_OUT, help="model dir (default: %(default)s)")
    p.add_argument("--corpus", default=None, help="corpus root (default: the running interpreter's stdlib)")
    p.add_argument("--max-tokens", type=int, default=131072, help="held-out tokens to evaluate (0 = all)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--samples", type=int, default=48,
                   help="greedy-complete %d code prompts with N new tokens (0 = skip)" % len(PROMPTS))
    p.add_argument("--json", action="store_true", help="print only the final JSON line")
    p.add_argument("--check", action="store_true", help="exit 1 if an acceptance target fails")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    if not os.path.isfile(os.path.join(args.model, "config.json")):
        T.die(p.prog, f"not a model directory (no config.json): {args.model}")
    if args.seq_len < 2 or args.max_tokens < 0 or args.batch_size < 1:
        T.die(p.prog, "--seq-len must be >= 2, --max-tokens >= 0, --batch-size >= 1")
    corpus = os.path.abspath(args.corpus or T.default_corpus_dir())
    try:
        train_files, held_files = T.split_corpus(corpus)
    except T.UsageError as e:
        T.die(p.prog, str(e))

    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    cfg = model.config
    E, k, L = cfg.num_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers
    backend = tok.backend_tokenizer  # identical tokenization to training
    train_ids = T.encode_stream(backend, corpus, train_files)
    held_ids = T.encode_stream(backend, corpus, held_files)
    chunks = T.heldout_chunks(held_ids, args.seq_len, args.max_tokens or None)

    counts = torch.zeros(L, E, dtype=torch.float64)
    overlap = torch.zeros(max(L - 1, 1), dtype=torch.float64)
    n_tok = [0]

    def hook(x, out):
        tops = [torch.topk(torch.softmax(rl.float(), -1), k, dim=-1).indices for rl in out.router_logits]
        for i, t in enumerate(tops):
            counts[i] += torch.bincount(t.reshape(-1), minlength=E).double()
        for i in range(L - 1):
            a = torch.zeros(tops[i].shape[0], E, dtype=torch.bool).scatter_(1, tops[i], True)
            overlap[i] += a.gather(1, tops[i + 1]).double().sum() / k
        n_tok[0] += tops[0].shape[0]

    ppl, n_eval = T.model_ppl(model, chunks, args.batch_size, hook=hook)
    uni = T.unigram_ppl(train_ids, chunks, cfg.vocab_size)

    layers = []
    for i in range(L):
        share = counts[i] / counts[i].sum()
        ent = -(share * share.clamp_min(1e-12).log()).sum().item()
        layers.append(dict(layer=i, entropy=ent, max_entropy=math.log(E), max_share=share.max().item(),
                           min_share=share.min().item(),
                           same_next=(overlap[i].item() / n_tok[0]) if i < L - 1 else None,
                           share=[round(v, 5) for v in share.tolist()]))
    balanced = all(l["min_share"] >= 0.01 and l["max_share"] <= 4.0 / E for l in layers)

    samples = {}
    if args.samples:
        for pr in PROMPTS:
            ids = tok(pr, return_tensors="pt", add_special_tokens=False).input_ids
            with torch.no_grad():
                g = model.generate(ids, max_new_tokens=args.samples, do_sample=False)
            samples[pr] = tok.decode(g[0], skip_special_tokens=False)

    result = dict(model=os.path.abspath(args.model), corpus=corpus, split_rule=T.SPLIT_RULE,
                  heldout_files=len(held_files), eval_tokens=n_eval, heldout_ppl=ppl, unigram_ppl=uni,
                  unigram_smoothing="add-one, counts from train split", num_experts=E, top_k=k,
                  chance_same_next=k / E, balanced=balanced, layers=layers, samples=samples)
    if not args.json:
        print(f"model {args.model}: {L} layers x {E} experts, top-{k}")
        print(f"held-out: {len(held_files)} files, {n_eval} predicted tokens (windows of {args.seq_len})")
        print(f"  model ppl    {ppl:10.2f}")
        print(f"  unigram ppl  {uni:10.2f}   (train-split counts, add-one smoothing)")
        print()
        print(f"{'layer':>5} {'entropy':>8} {'log E':>6} {'max share':>10} {'min share':>10} {'same->next':>11}")
        for l in layers:
            sn = f"{l['same_next']:.3f}" if l["same_next"] is not None else "-"
            print(f"{l['layer']:>5} {l['entropy']:8.3f} {l['max_entropy']:6.3f} {l['max_share']:10.4f} "
                  f"{l['min_share']:10.4f} {sn:>11}")
        print(f"fair share 1/E = {1 / E:.4f}; chance same->next = k/E = {k / E:.3f}; "
              f"balance target (every share in [0.01, {4 / E:.4f}]): {'PASS' if balanced else 'FAIL'}")
        for pr, text in samples.items():
            print(f"--- greedy completion of {pr!r}:\n{text}")
    print(json.dumps(result))
    if args.check and not (ppl < uni and balanced):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
