"""Routing traces: record, save, load — one documented format.

A trace is one safetensors file (written to a temp file, then renamed). Tensors, one row per
(token, MoE layer) in execution order:
  layer   [N] int32    decoder layer of the row
  token   [N] int64    token index within the trace (all prompts concatenated)
  experts [N, K] int32 routed expert ids, in the router's order
  weights [N, K] float32 routing weights
  hidden  [N, H] float16 (optional) the MoE input of that layer for that token
and, with hidden, one row per token:
  tokens  [T, H] float16 (optional) the token's embedding, the input of the first decoder layer
Metadata (strings): format="activemoe-trace", version="1", model_type, num_experts, top_k,
hidden_size, layers (JSON list of the MoE layers), shape_id (a digest of the model's shape).
It knows nothing about policies.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from activemoe.atomic import save_safetensors_atomic
from activemoe.errors import UserError

FORMAT, VERSION = "activemoe-trace", "1"
HELDOUT_LIST = "heldout_files.txt"


def shape_id(model_type: str, layers: list[int], num_experts: int, top_k: int, hidden_size: int) -> str:
    text = json.dumps([model_type, layers, num_experts, top_k, hidden_size])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Trace:
    layer: torch.Tensor  # [N]
    token: torch.Tensor  # [N]
    experts: torch.Tensor  # [N, K]
    weights: torch.Tensor  # [N, K]
    hidden: torch.Tensor | None  # [N, H]
    meta: dict[str, str]
    tokens: torch.Tensor | None = None  # [T, H] token embeddings, row = token index

    @property
    def layers(self) -> list[int]:
        return json.loads(self.meta["layers"])

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    def save(self, path: str | os.PathLike) -> None:
        tensors = {"layer": self.layer, "token": self.token, "experts": self.experts, "weights": self.weights}
        if self.hidden is not None:
            tensors["hidden"] = self.hidden
        if self.tokens is not None:
            tensors["tokens"] = self.tokens
        save_safetensors_atomic(tensors, path, self.meta)

    def check_model(self, expected_shape_id: str) -> None:
        if self.meta.get("shape_id") != expected_shape_id:
            raise UserError(f"this trace was recorded with another model ({self.meta.get('model_type')}, "
                            f"shape {self.meta.get('shape_id')}); record one with this model")

    def by_token(self) -> dict[int, dict[int, int]]:
        """token -> {layer: row}."""
        out: dict[int, dict[int, int]] = {}
        for row, (layer, token) in enumerate(zip(self.layer.tolist(), self.token.tolist())):
            out.setdefault(token, {})[layer] = row
        return out


def load_trace(path: str | os.PathLike) -> Trace:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"trace file {path} does not exist")
    try:
        tensors = load_file(path)
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable trace (damaged or not safetensors): {e}") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not an ActiveMoE trace")
    if meta.get("version") != VERSION:
        raise UserError(f"{path} has trace format version {meta.get('version')}; this ActiveMoE reads {VERSION}")
    missing = {"layer", "token", "experts", "weights"} - set(tensors)
    if missing:
        raise UserError(f"{path} lacks {sorted(missing)}; the trace is damaged")
    return Trace(tensors["layer"], tensors["token"], tensors["experts"], tensors["weights"], tensors.get("hidden"), meta,
                 tensors.get("tokens"))


class Recorder:
    """Collects rows as the runtime routes; attach with `runtime.recorder = Recorder(...)`. Hidden states go
    into large blocks (each its own allocation, which the allocator returns to the system when freed), and
    `trace()` moves them into the trace block by block: a whole-split recording is held about once, not as
    a list of small parts plus their concatenation."""

    BLOCK_BYTES = 64 << 20

    def __init__(self, first_layer: int, keep_hidden: bool):
        self.first_layer, self.keep_hidden = first_layer, keep_hidden
        self.rows: list[tuple] = []  # (layer, token ids [n], top-k index [n, K], top-k weights [n, K])
        self.base = 0  # token index of row 0 of the current forward
        self._width = 0
        self.hidden, self.embedded = _Blocks(self.BLOCK_BYTES), _Blocks(self.BLOCK_BYTES)  # with keep_hidden

    def tokens(self, hidden: torch.Tensor) -> None:
        """A forward's token embeddings [T, H], before its first MoE layer."""
        if self.keep_hidden:
            self.embedded.append(hidden.detach())

    def __call__(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if layer == self.first_layer:
            self.base += self._width
            self._width = hidden.shape[0]
        tokens = torch.arange(self.base, self.base + hidden.shape[0])
        self.rows.append((layer, tokens, top_k_index.cpu().int(), top_k_weights.detach().float().cpu()))
        if self.keep_hidden:
            self.hidden.append(hidden.detach())

    def events(self) -> list[tuple[int, tuple[int, ...]]]:
        """(layer, sorted routed expert ids) per MoE-layer call, in order: what the oracle replays."""
        return [(layer, tuple(index.unique().tolist())) for layer, _, index, _ in self.rows]

    def trace(self, meta: dict[str, str]) -> Trace:
        """The rows as a Trace; the hidden states move into it (the recorder keeps none)."""
        layer = torch.cat([torch.full((t.shape[0],), l, dtype=torch.int32) for l, t, *_ in self.rows])
        return Trace(layer, torch.cat([r[1] for r in self.rows]), torch.cat([r[2] for r in self.rows]),
                     torch.cat([r[3] for r in self.rows]), self.hidden.take(), {**meta, "format": FORMAT, "version": VERSION},
                     self.embedded.take())


class _Blocks:
    """Rows [n, H] appended as float16 into blocks of about `block_bytes`; `take()` returns them as one
    tensor [N, H] (None when empty), freeing each block once copied."""

    def __init__(self, block_bytes: int):
        self.block_bytes = block_bytes
        self.blocks: list[torch.Tensor] = []
        self.used = 0  # rows filled in the last block

    def append(self, rows: torch.Tensor) -> None:
        rows = rows.reshape(-1, rows.shape[-1])
        while len(rows):
            if not self.blocks or self.used == len(self.blocks[-1]):
                per_row = rows.shape[1] * 2
                self.blocks.append(torch.empty(max(1, self.block_bytes // per_row), rows.shape[1], dtype=torch.float16))
                self.used = 0
            block = self.blocks[-1]
            n = min(len(rows), len(block) - self.used)
            block[self.used:self.used + n] = rows[:n]  # cast to float16 (and to the host) on copy
            self.used += n
            rows = rows[n:]

    def take(self) -> torch.Tensor | None:
        if not self.blocks:
            return None
        total = sum(len(b) for b in self.blocks[:-1]) + self.used
        out = torch.empty(total, self.blocks[0].shape[1], dtype=torch.float16)  # [N, H]
        at = 0
        while self.blocks:
            block = self.blocks.pop(0)
            n = self.used if not self.blocks else len(block)
            out[at:at + n] = block[:n]
            at += n
        self.used = 0
        return out


def split_texts(model_dir: Path, split: str) -> list[str]:
    """Texts of a bundled-style model's corpus split: files named in heldout_files.txt (relative to this
    interpreter's standard library) are held out; the train split is every other .py file there."""
    listing = model_dir / HELDOUT_LIST
    if not listing.is_file():
        raise UserError(f"{model_dir} has no {HELDOUT_LIST}; use --prompts FILE instead of --split")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    held = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if split == "heldout":
        names = held
    else:
        skip = set(held)
        names = sorted(str(p.relative_to(stdlib)) for p in stdlib.rglob("*.py")
                       if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
                       and str(p.relative_to(stdlib)) not in skip)
    return [(stdlib / n).read_text(errors="replace") for n in names if (stdlib / n).is_file()]
