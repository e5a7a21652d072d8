#!/usr/bin/env python3
"""Train the tiny Qwen3-MoE language model shipped in activemoe/assets/tiny-moe/.

The model is a genuine (if very small) causal LM trained from scratch on the
Python standard library source of the running interpreter:

  * corpus   : every *.py file under sysconfig.get_paths()["stdlib"], excluding
               site-packages/dist-packages and test directories (test/, tests/,
               idle_test/), sorted by relative path.  Every 20th file (sorted
               index i with i % 20 == 19) is held out for evaluation.
  * tokenizer: byte-level BPE (HF `tokenizers`) trained on the train split,
               saved as a PreTrainedTokenizerFast (tokenizer.json +
               tokenizer_config.json) loadable with AutoTokenizer.
  * model    : transformers.Qwen3MoeForCausalLM (standard HF format) with
               fine-grained experts and the family's load-balancing aux loss.
  * schedule : AdamW, linear warmup + cosine decay.  Progress is measured as
               max(step / max_steps, elapsed / time_budget), so the schedule
               always completes within --time-budget-min.

The output is built in a temporary directory next to --out and renamed into
place only when complete, so an interrupted run never leaves a half-written
model.  Bad input (missing/empty corpus, inconsistent MoE config) is reported
as a one-line error with exit status 2.

The corpus/split/perplexity helpers in this file are imported by
scripts/eval_tiny_moe.py so that both use the identical held-out split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "activemoe", "assets", "tiny-moe")
HELDOUT_EVERY = 20  # file i (sorted) is held out iff i % HELDOUT_EVERY == HELDOUT_EVERY - 1
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPLIT_RULE = (
    f"files sorted by path relative to the corpus root; file index i is held out iff "
    f"i % {HELDOUT_EVERY} == {HELDOUT_EVERY - 1} (every {HELDOUT_EVERY}th file), the rest is train"
)


class UsageError(Exception):
    """Bad user input: reported as a single line, exit status 2."""


def die(prog: str, msg: str) -> None:
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(2)


# --------------------------------------------------------------------------- corpus


def default_corpus_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_corpus_files(root: str) -> list[str]:
    """Sorted relative paths of the *.py files under root (deterministic)."""
    if not os.path.exists(root):
        raise UsageError(f"corpus path does not exist: {root}")
    if not os.path.isdir(root):
        raise UsageError(f"corpus path is not a directory: {root}")
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for fn in filenames:
            if fn.endswith(".py"):
                rels.append(os.path.relpath(os.path.join(dirpath, fn), root))
    rels.sort()
    return rels


def read_text(root: str, rel: str) -> str:
    with open(os.path.join(root, rel), "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def split_corpus(root: str) -> tuple[list[str], list[str]]:
    """(train_files, heldout_files), both sorted relative paths, non-empty texts only."""
    files = list_corpus_files(root)
    train, held = [], []
    for i, rel in enumerate(files):
        (held if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else train).append(rel)
    # Drop empty files (e.g. empty __init__.py) *after* the split so the rule stays simple.
    train = [r for r in train if read_text(root, r).strip()]
    held = [r for r in held if read_text(root, r).strip()]
    if not train:
        raise UsageError(f"corpus is empty: no non-empty .py files under {root}")
    if not held:
        raise UsageError(f"corpus too small: no held-out file under {root} (need >= {HELDOUT_EVERY} files)")
    return train, held


def encode_stream(tokenizer, root: str, rels: list[str]) -> list[int]:
    """Concatenate files as  <eos> file0 <eos> file1 ...  (eos doubles as bos/document separator)."""
    eos = tokenizer.token_to_id(EOS_TOKEN) if hasattr(tokenizer, "token_to_id") else tokenizer.eos_token_id
    texts = [read_text(root, r) for r in rels]
    if hasattr(tokenizer, "encode_batch"):  # raw tokenizers.Tokenizer
        encs = [e.ids for e in tokenizer.encode_batch(texts)]
    else:  # transformers tokenizer
        encs = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for e in encs:
        ids.append(eos)
        ids.extend(e)
    return ids


def heldout_chunks(ids: list[int], seq_len: int, max_tokens: int | None):
    """Non-overlapping windows of seq_len+1 tokens (seq_len predicted tokens each)."""
    import torch

    n_chunks = (len(ids) - 1) // seq_len
    if max_tokens:
        n_chunks = min(n_chunks, max(1, max_tokens // seq_len))
    t = torch.tensor(ids[: n_chunks * seq_len + 1], dtype=torch.long)
    return [t[i * seq_len : (i + 1) * seq_len + 1] for i in range(n_chunks)]


def unigram_ppl(train_ids: list[int], eval_targets, vocab_size: int) -> float:
    """Perplexity of an add-one (Laplace) smoothed unigram model estimated on train_ids."""
    import torch

    counts = torch.bincount(torch.tensor(train_ids, dtype=torch.long), minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    tgt = torch.cat([c[1:] for c in eval_targets])
    return math.exp(-logp[tgt].mean().item())


def model_ppl(model, chunks, batch_size: int = 8, hook=None) -> tuple[float, int]:
    """Held-out perplexity of a causal LM over the given windows; returns (ppl, n_predicted_tokens)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(chunks), batch_size):
            batch = torch.stack(chunks[b : b + batch_size]).to(next(model.parameters()).device)
            x, y = batch[:, :-1], batch[:, 1:]
            out = model(input_ids=x, use_cache=False, output_router_logits=hook is not None)
            if hook is not None:
                hook(x, out)
            logits = out.logits.float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
            n += y.numel()
    return math.exp(nll / n), n


# --------------------------------------------------------------------------- training


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_tiny_moe.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("data / output")
    g.add_argument("--corpus", default=None, help="corpus root dir (default: the running interpreter's stdlib)")
    g.add_argument("--out", default=DEFAULT_OUT, help="output model dir (default: %(default)s)")
    g.add_argument("--vocab-size", type=int, default=4096, help="BPE vocab size incl. special tokens (default: %(default)s)")
    g = p.add_argument_group("model (Qwen3MoeConfig)")
    g.add_argument("--hidden-size", type=int, default=192)
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--num-heads", type=int, default=4)
    g.add_argument("--num-kv-heads", type=int, default=2)
    g.add_argument("--head-dim", type=int, default=48)
    g.add_argument("--num-experts", type=int, default=16)
    g.add_argument("--top-k", type=int, default=2, help="num_experts_per_tok")
    g.add_argument("--moe-intermediate-size", type=int, default=128)
    g.add_argument("--norm-topk-prob", type=int, choices=[0, 1], default=1)
    g.add_argument("--tie-embeddings", type=int, choices=[0, 1], default=1)
    g.add_argument("--aux-loss-coef", type=float, default=0.01, help="router_aux_loss_coef (default: %(default)s)")
    g.add_argument("--aux-per-layer", type=int, choices=[0, 1], default=1,
                   help="1: apply the load-balancing loss to each layer separately and average (default); "
                        "0: HF default, one loss over all layers' router logits concatenated")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the saved weights")
    g = p.add_argument_group("optimisation")
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr = lr * ratio (default: %(default)s)")
    g.add_argument("--warmup-frac", type=float, default=0.04)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--max-steps", type=int, default=100000, help="hard cap on optimizer steps")
    g.add_argument("--time-budget-min", type=float, default=22.0,
                   help="wall-clock budget for the training loop; the LR schedule is stretched to end exactly there")
    g.add_argument("--eval-max-tokens", type=int, default=131072, help="held-out tokens used for the card's perplexities")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    g.add_argument("--device", default=None,
                   help="cpu or cuda (default: cuda when available, else cpu); on CUDA, raise --time-budget-min "
                        "or --max-steps to train on more tokens")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--experts-impl", default=None, choices=["eager", "batched_mm", "grouped_mm"],
                   help="transformers experts kernel used for training only (default: transformers' default)")
    g.add_argument("--bench-steps", type=int, default=0, help="only time N training steps and exit (no output written)")
    return p


def validate(args) -> None:
    if args.num_experts < 2:
        raise UsageError(f"--num-experts must be >= 2 (got {args.num_experts})")
    if args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1 (got {args.top_k})")
    if args.top_k > args.num_experts:
        raise UsageError(f"--top-k ({args.top_k}) must not exceed --num-experts ({args.num_experts})")
    if args.top_k == args.num_experts:
        raise UsageError(f"--top-k == --num-experts ({args.top_k}) is a dense model, not a sparse MoE")
    for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "moe_intermediate_size",
                 "seq_len", "batch_size", "vocab_size", "max_steps", "threads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_heads % args.num_kv_heads:
        raise UsageError(f"--num-heads ({args.num_heads}) must be a multiple of --num-kv-heads ({args.num_kv_heads})")
    if args.vocab_size < 300:
        raise UsageError("--vocab-size must be >= 300 (256 bytes + specials + merges)")
    if args.time_budget_min <= 0:
        raise UsageError("--time-budget-min must be > 0")
    if args.aux_loss_coef < 0:
        raise UsageError("--aux-loss-coef must be >= 0")


def train_tokenizer(root: str, train_files: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((read_text(root, r) for r in train_files), trainer=trainer, length=len(train_files))
    return tok


def save_tokenizer(tok, out_dir: str):
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        model_max_length=4096, clean_up_tokenization_spaces=False,
    )
    hf_tok.save_pretrained(out_dir)
    # transformers 5 writes its internal class name ("TokenizersBackend"); the portable name loads
    # under transformers 4.x as well and resolves to the same class under 5.x.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        tcfg = json.load(f)
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w") as f:
        json.dump(tcfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return hf_tok


def lr_at(progress: float, args) -> float:
    if progress < args.warmup_frac:
        return args.lr * max(progress, 1e-3) / args.warmup_frac
    p = min(1.0, (progress - args.warmup_frac) / max(1e-9, 1.0 - args.warmup_frac))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def count_params(model) -> tuple[int, int]:
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - expert + expert * cfg.num_experts_per_tok // cfg.num_experts
    return total, active


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    corpus = os.path.abspath(args.corpus or default_corpus_dir())
    try:
        validate(args)
        train_files, held_files = split_corpus(corpus)
    except UsageError as e:
        die(prog, str(e))

    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import torch.nn.functional as F
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM, GenerationConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func as lb_loss

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    print(f"corpus {corpus}: {len(train_files)} train files, {len(held_files)} held-out files", flush=True)

    tok = train_tokenizer(corpus, train_files, args.vocab_size)
    vocab = tok.get_vocab_size()
    eos_id, pad_id = tok.token_to_id(EOS_TOKEN), tok.token_to_id(PAD_TOKEN)
    train_ids = encode_stream(tok, corpus, train_files)
    held_ids = encode_stream(tok, corpus, held_files)
    print(f"tokenizer: vocab {vocab}; train {len(train_ids)} tokens, held-out {len(held_ids)} tokens "
          f"({time.time() - t_start:.1f}s)", flush=True)

    config = Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,  # unused: every layer is sparse (mlp_only_layers=[])
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=bool(args.tie_embeddings),
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=args.moe_intermediate_size,
        num_experts=args.num_experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=bool(args.norm_topk_prob),
        output_router_logits=False,  # turned on explicitly in the training forward pass
        router_aux_loss_coef=args.aux_loss_coef,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
    )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"device: {device}", flush=True)
    model = Qwen3MoeForCausalLM(config).to(device)
    if args.experts_impl:
        model.set_experts_implementation(args.experts_impl)
    print(f"experts implementation: {model.config._experts_implementation}", flush=True)
    model.train()
    n_total, n_active = count_params(model)
    print(f"model: {n_total / 1e6:.2f}M params, {n_active / 1e6:.2f}M active per token", flush=True)

    data = torch.tensor(train_ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    budget_s = args.time_budget_min * 60.0
    max_steps = args.bench_steps or args.max_steps
    tokens_seen, step = 0, 0
    t0 = time.time()
    ema_loss = None
    while step < max_steps:
        elapsed = time.time() - t0
        progress = max(step / max_steps, elapsed / budget_s)
        if progress >= 1.0 and not args.bench_steps:
            break
        lr = lr_at(progress, args)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch_size,), generator=gen)
        batch = torch.stack([data[s : s + args.seq_len + 1] for s in starts.tolist()]).to(device)
        out = model(input_ids=batch[:, :-1], output_router_logits=True, use_cache=False)
        logits = out.logits.float()
        ce_t = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        if args.aux_per_layer:
            # The family's load_balancing_loss_func applied to each layer separately, then averaged.
            # (HF's default concatenates all layers' router logits, which lets per-layer imbalance
            # cancel out across layers: an expert can be dead in one layer and overused in another.)
            aux_t = sum(lb_loss((rl,), args.num_experts, args.top_k) for rl in out.router_logits) / len(out.router_logits)
        else:  # exactly Qwen3MoeForCausalLM(labels=...): CE + router_aux_loss_coef * aux
            aux_t = out.aux_loss
        loss = ce_t + args.aux_loss_coef * aux_t
        ce, aux = ce_t.item(), aux_t.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += batch[:, 1:].numel()
        ema_loss = ce if ema_loss is None else 0.95 * ema_loss + 0.05 * ce
        if step % args.log_every == 0 or step == 1:
            el = time.time() - t0
            print(f"step {step:5d} | ce {ce:.3f} (ema {ema_loss:.3f}) | aux {aux:.3f} | lr {lr:.2e} | "
                  f"tokens {tokens_seen} | {tokens_seen / el:.0f} tok/s | {el / 60:.1f} min", flush=True)
    train_s = time.time() - t0
    print(f"training done: {step} steps, {tokens_seen} tokens, {train_s / 60:.1f} min", flush=True)
    if args.bench_steps:
        return 0

    # ---- evaluation for the model card
    t_eval = time.time()
    chunks = heldout_chunks(held_ids, args.seq_len, args.eval_max_tokens)
    ppl, n_eval = model_ppl(model, chunks)
    uni = unigram_ppl(train_ids, chunks, vocab)
    print(f"held-out ppl {ppl:.2f} vs unigram ppl {uni:.2f} on {n_eval} tokens ({time.time() - t_eval:.0f}s)",
          flush=True)

    # ---- write atomically
    out_dir = os.path.abspath(args.out)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        save_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        model.config.use_cache = True
        model.to("cpu", save_dtype).save_pretrained(tmp, safe_serialization=True)
        hf_tok = save_tokenizer(tok, tmp)
        GenerationConfig(
            bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
            do_sample=False, max_new_tokens=64, repetition_penalty=1.0,
        ).save_pretrained(tmp)
        stats = dict(
            python=platform.python_version(), corpus=corpus, train_files=len(train_files),
            heldout_files=len(held_files), train_tokens=len(train_ids), heldout_tokens=len(held_ids),
            steps=step, tokens_seen=tokens_seen, train_minutes=train_s / 60, total_minutes=(time.time() - t_start) / 60,
            heldout_ppl=ppl, unigram_ppl=uni, eval_tokens=n_eval, params=n_total, active_params=n_active,
            final_ce_ema=ema_loss,
        )
        with open(os.path.join(tmp, "heldout_files.txt"), "w") as f:
            f.write("\n".join(held_files) + "\n")
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(args, argv, config, stats, hf_tok))
        for fn in os.listdir(tmp):
            os.chmod(os.path.join(tmp, fn), 0o644)
        os.chmod(tmp, 0o755)
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".old-", dir=parent)
            os.rmdir(old)
            os.rename(out_dir, old)
        os.replace(tmp, out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out_dir}", flush=True)
    return 0


def reproduce_command(argv) -> str:
    a = sys.argv[1:] if argv is None else list(argv)
    return " ".join([".venv/bin/python", "scripts/train_tiny_moe.py"] + a)


def model_card(args, argv, config, s, hf_tok) -> str:
    stdlib_pat = "sysconfig.get_paths()['stdlib']" if args.corpus is None else args.corpus
    return f"""# tiny-moe: a small Qwen3-MoE trained on the Python standard library

A genuinely trained (not random) tiny Mixture-of-Experts causal LM, in standard
Hugging Face format (`Qwen3MoeForCausalLM`), shipped for ActiveMoE tests and demos.
Load with `AutoModelForCausalLM.from_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)`.
It writes Python-looking code; it is far too small to be useful for anything else.

## Architecture
| | |
|---|---|
| model | Qwen3MoeForCausalLM, {s['params'] / 1e6:.2f}M params ({s['active_params'] / 1e6:.2f}M active per token), saved as {args.dtype} |
| layers | {config.num_hidden_layers}, all sparse MoE (`decoder_sparse_step=1`, `mlp_only_layers=[]`) |
| hidden size | {config.hidden_size} |
| attention | {config.num_attention_heads} query heads, {config.num_key_value_heads} KV heads, head_dim {config.head_dim}, RoPE theta 10000 |
| experts | {config.num_experts} per layer, top-{config.num_experts_per_tok} (`num_experts_per_tok`), `moe_intermediate_size` {config.moe_intermediate_size}, `norm_topk_prob={config.norm_topk_prob}` |
| router aux loss | Switch-style load-balancing loss (the family's `load_balancing_loss_func`), `router_aux_loss_coef={config.router_aux_loss_coef}`, {"applied to each layer separately and averaged over layers (HF's default pools all layers, which lets an expert be dead in one layer and overused in another)" if args.aux_per_layer else "HF default: one loss over all layers' router logits pooled"} |
| embeddings | vocab {config.vocab_size}, `tie_word_embeddings={config.tie_word_embeddings}` |
| special tokens | `{EOS_TOKEN}` = bos = eos = id {config.eos_token_id} (document separator), `{PAD_TOKEN}` = pad = id {config.pad_token_id} |

## Tokenizer
Byte-level BPE trained with `tokenizers` on the train split (GPT-2 style ByteLevel
pre-tokenizer, no prefix space, min_frequency 2), vocab {config.vocab_size} incl. 2 special tokens.
No special tokens are added automatically; training text is `<eos> file0 <eos> file1 ...`.

## Corpus
Python {s['python']} standard library source, `*.py` under `{stdlib_pat}`
(here `{s['corpus']}`), recursively, excluding directories named
{', '.join(sorted(EXCLUDED_DIRS))}; empty files dropped.
Split rule: {SPLIT_RULE}.
Train: {s['train_files']} files, {s['train_tokens']:,} tokens. Held-out: {s['heldout_files']} files,
{s['heldout_tokens']:,} tokens (list in `heldout_files.txt`).

## Training
AdamW (betas 0.9/0.95, eps 1e-8, weight decay {args.weight_decay} on matrices, none on norms),
peak lr {args.lr}, linear warmup over the first {args.warmup_frac:.0%} of the run then cosine decay to
{args.min_lr_ratio} x peak, grad-norm clip 1.0, batch {args.batch_size} x {args.seq_len} tokens
(random windows of the concatenated train stream), seed {args.seed}, float32 training.
The schedule's progress is max(step/{args.max_steps}, elapsed/{args.time_budget_min} min).

* steps: {s['steps']}, tokens seen: {s['tokens_seen']:,} (~{s['tokens_seen'] / max(1, s['train_tokens']):.1f} epochs)
* training wall time: {s['train_minutes']:.1f} min (whole script {s['total_minutes']:.1f} min) on a 2-core CPU, 1 torch thread ({platform.machine()}, torch {__import__('torch').__version__}, transformers {__import__('transformers').__version__})

## Evaluation (held-out split, first {s['eval_tokens']:,} predicted tokens, windows of {args.seq_len})
| | perplexity |
|---|---|
| this model | **{s['heldout_ppl']:.2f}** |
| unigram model of the same tokenizer (counts from the train split, add-one smoothing) | {s['unigram_ppl']:.2f} |

Routing statistics (per-expert share, entropy, layer-to-layer expert overlap):
`.venv/bin/python scripts/eval_tiny_moe.py --model activemoe/assets/tiny-moe`.

## Reproduce
```
{reproduce_command(argv)}
```
(Timing-based schedule: on a different machine the number of steps, and hence the
weights, will differ; pass `--max-steps {s['steps']} --time-budget-min 1000` to fix the step count.)
"""


if __name__ == "__main__":
    sys.exit(main())
