"""quant.py: int8 and int4 copies of the routed experts, and their cache file next to the model; the
codecs the compressed tiers decode with (a checkpoint's own MXFP4 experts, exact, through store.Mxfp4).

Approximate, opt-in. int8 is symmetric per output channel (one fp16 scale per row); int4 is
asymmetric, grouped along the input dim (fp16 scale and min per group of GROUP_SIZE), packed two per
byte. Quantisation runs once per model and precision, from the checkpoint's own weights (read in
fp32), into `activemoe-<precision>.safetensors`; a stale (model changed) or corrupt cache is detected
and rebuilt. This file knows tensors and files only: not slots, links or caching.
Why plain torch and not torchao / hqq / bitsandbytes / optimum-quanto: docs/compressed_tiers.md.
Legend: R output channels (rows), C input dim, G group size, N = MoE layers x experts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from activemoe.atomic import save_safetensors_atomic
from activemoe.errors import UserError
from activemoe.families import ExpertsSpec
from activemoe.store import MXFP4_CODEC, ExpertStore

log = logging.getLogger(__name__)

PRECISIONS = ("native", "mxfp4", "int8", "int4")  # native: the checkpoint's weights in the compute dtype (exact);
# mxfp4: a checkpoint's own MXFP4 experts kept as MXFP4 in RAM and on the link, dequantised into slots (exact)
EXACT = ("native", "mxfp4")
LATE_MISS = ("none", "int4")
GROUP_SIZE = 64  # int4 group along the input dim (smaller where the input dim is not a multiple)
FORMAT = "activemoe-quant-1"
_SAMPLE_BLOCKS, _BLOCK = 16, 4096  # fingerprint: data blocks sampled per checkpoint file


class Int8:
    """Symmetric, per output channel: w ~ q * scale, q in [-127, 127]."""

    def encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        scale = (w.abs().amax(1, keepdim=True) / 127).to(torch.float16)  # [R, 1]
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round(w / scale.float()).clamp(-127, 127).to(torch.int8)  # [R, C]
        return {"q": q, "scale": scale}

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["q"].float() * parts["scale"].float()  # [r, C]


class Int4:
    """Asymmetric, grouped along the input dim: w ~ q * scale + min, q in [0, 15], two per byte
    (even column in the low nibble)."""

    def encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        rows, cols = w.shape
        if cols % 2:
            raise UserError(f"int4 packs two values per byte: an expert tensor with {cols} columns cannot be packed")
        g = group_size(cols)
        wg = w.reshape(rows, cols // g, g)  # [R, C/G, G]
        lo, hi = wg.amin(-1), wg.amax(-1)  # [R, C/G]
        scale = ((hi - lo) / 15).to(torch.float16)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        low = lo.to(torch.float16)
        q = torch.round((wg - low.float()[..., None]) / scale.float()[..., None]).clamp(0, 15)
        q = q.to(torch.uint8).reshape(rows, cols)  # [R, C]
        return {"q": q[:, 0::2] | (q[:, 1::2] << 4), "scale": scale, "min": low}  # q: [R, C/2]

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        packed = parts["q"]  # [r, C/2]
        rows, groups = parts["scale"].shape
        q = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(rows, groups, -1)  # [r, C/G, G]
        return (q.float() * parts["scale"].float()[..., None] + parts["min"].float()[..., None]).reshape(rows, -1)


class Raw:
    """1-d tensors (biases) travel as they are, in fp32."""

    def encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"raw": w.float().clone()}

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["raw"].float()


CODECS = {"int8": Int8(), "int4": Int4(), "mxfp4": MXFP4_CODEC}  # mxfp4: store.Mxfp4, the checkpoint reader's


def group_size(cols: int) -> int:
    g = GROUP_SIZE
    while cols % g:
        g //= 2
    return g


def approximate(precision: str) -> bool:
    return precision not in EXACT


def check_precision(precision: str, late_miss: str = "none") -> None:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if late_miss not in LATE_MISS:
        raise UserError(f"unknown --late-miss {late_miss!r}; known: {', '.join(LATE_MISS)}")
    if late_miss == "int4" and precision == "int4":
        raise UserError("--late-miss int4 substitutes int4 copies for late full ones; with --precision int4 every "
                        "copy is int4 already")


class Layout:
    """How each expert tensor of a model is compressed: its codec, and whether it is stored transposed
    (so that rows are output channels whatever the family's in-memory layout). Precision "mxfp4" is
    the checkpoint's own MXFP4 (ExpertStore.mxfp4), read as it is stored rather than encoded here."""

    def __init__(self, spec: ExpertsSpec, precision: str):
        self.precision = precision
        self.codecs = {n: CODECS[precision] if len(s) == 2 else Raw() for n, s in spec.shapes.items()}
        self.transposed = {n: spec.is_transposed and len(s) == 2 for n, s in spec.shapes.items()}
        for name, shape in spec.shapes.items():
            if len(shape) > 2:
                raise UserError(f"expert tensor {name} has shape {shape}; compressed tiers handle 1-d and 2-d only")

    def encode(self, weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        return {n: self.codecs[n].encode(w.T.contiguous() if self.transposed[n] else w) for n, w in weights.items()}

    def decode_into(self, name: str, parts: dict[str, torch.Tensor], out: torch.Tensor, start: int, stop: int) -> None:
        """Dequantise rows start:stop (output channels) of tensor `name` into `out` (its full-size slot tensor)."""
        w = self.codecs[name].decode(parts)  # [stop - start, C]
        if self.transposed[name]:
            out[:, start:stop].copy_(w.T)
        else:
            out[start:stop].copy_(w)


# -- the cache file ----------------------------------------------------------------------------
def cache_path(model_dir: Path, precision: str, cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or model_dir) / f"activemoe-{precision}.safetensors"


def fingerprint(files: list[Path], spec: ExpertsSpec, layers: list[int], precision: str) -> str:
    """What ties a cache to its checkpoint: file names, sizes, safetensors headers and a sample of data
    blocks of each file (a retrained model changes them), the expert layout and the codec."""
    h = hashlib.sha256(f"{FORMAT}|{precision}|{GROUP_SIZE}|{layers}|{spec}".encode())
    for path in files:
        size = path.stat().st_size
        h.update(f"|{path.name}|{size}|".encode())
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(min(header_len, size - 8)))
            data = 8 + header_len
            for i in range(_SAMPLE_BLOCKS):
                f.seek(data + (size - data) * i // _SAMPLE_BLOCKS)
                h.update(f.read(_BLOCK))
    return h.hexdigest()


def _crc(tensors: dict[str, torch.Tensor]) -> str:
    crc = 0
    for key in sorted(tensors):
        crc = zlib.crc32(tensors[key].contiguous().view(torch.uint8).reshape(-1).numpy(), crc)
    return f"{crc:08x}"


def load_or_build(store: ExpertStore, model_dir: Path, precision: str, cache_dir: str | os.PathLike | None = None,
                  on_progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """The compressed copies of all experts, [N, ...] per `name.part`, row = MoE layer row * E + expert:
    from the cache file when it matches the checkpoint, else quantised now and cached (atomically)."""
    path = cache_path(model_dir, precision, cache_dir)
    layout = Layout(store.spec, precision)
    expected = fingerprint(store.index.files, store.spec, store.layers, precision)
    if path.is_file():
        tensors, problem = _read(path, expected)
        if problem is None:
            return tensors
        log.warning("quantisation cache %s is %s: rebuilding it", path, problem)
    tensors = _quantise(store, layout, on_progress)
    _write(path, tensors, {"format": FORMAT, "precision": precision, "fingerprint": expected, "crc32": _crc(tensors),
                           "layers": json.dumps(store.layers), "num_experts": str(store.num_experts)})
    return tensors


def _read(path: Path, expected: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """(tensors, None) when the file is intact and made from this checkpoint; else ({}, what is wrong)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                return {}, f"of another format ({meta.get('format')!r})"
            if meta.get("fingerprint") != expected:
                return {}, "stale (the checkpoint changed since it was written)"
            # copied out of the file's memory map: the host tier is RAM, and a file rewritten in place later
            # must not pull pages from under a running engine
            tensors = {key: f.get_tensor(key).clone() for key in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated or garbled files
        return {}, f"unreadable ({type(e).__name__}: {str(e)[:120]})"
    if _crc(tensors) != meta.get("crc32"):
        return {}, "corrupt (checksum mismatch)"
    return tensors, None


def _quantise(store: ExpertStore, layout: Layout, on_progress) -> dict[str, torch.Tensor]:
    reader = ExpertStore(store.index, {layer: store.spec for layer in store.layers}, torch.float32, pin=False)
    eids = reader.experts()
    log.info("quantising %d experts to %s (once; cached next to the model)", len(eids), layout.precision)
    return stack(eids, lambda eid: layout.encode(reader.read_from_checkpoint(eid)), on_progress)


def stack(eids: list, parts_of: Callable[[object], dict[str, dict[str, torch.Tensor]]],
          on_progress: Callable[[int, int], None] | None = None,
          empty: Callable[[tuple, torch.dtype], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every expert's compressed parts (`parts_of(eid)`: name -> part -> tensor) stacked as [N, ...] per
    `name.part`, row i holding eids[i] (ExpertStore.experts() order: row = layer row * E + expert);
    `empty(shape, dtype)` allocates each stack (default: torch.empty)."""
    empty = empty or (lambda shape, dtype: torch.empty(shape, dtype=dtype))
    out: dict[str, torch.Tensor] = {}
    for row, eid in enumerate(eids):
        for name, parts in parts_of(eid).items():
            for part, t in parts.items():
                key = f"{name}.{part}"
                if key not in out:
                    out[key] = empty((len(eids), *t.shape), t.dtype)  # [N, ...]
                out[key][row] = t
        if on_progress:
            on_progress(row + 1, len(eids))
    return out


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"cannot write the quantisation cache into {path.parent} (read-only); "
                        "pass --quant-cache DIR to keep it elsewhere")
    save_safetensors_atomic(tensors, path, meta)
    log.info("wrote quantisation cache %s (%.1f MiB)", path, sum(t.nbytes for t in tensors.values()) / 2**20)


def compressed_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of one expert's compressed copy (what the link carries per expert)."""
    return sum(math.prod(t.shape[1:]) * t.element_size() for t in tensors.values())
