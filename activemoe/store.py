"""store.py is the slow tier: it indexes the safetensors files of a checkpoint and serves one
(layer, expert) at a time as host tensors in transformers' in-memory layout.

Experts are read by byte range with pread, then dropped from the page cache (posix_fadvise DONTNEED),
so neither the RAM preload nor the disk tier is flattered by, or pollutes, the page cache.
Tier "ram" keeps a host copy of every expert (pinned for CUDA); tier "disk" reads on demand on a
small I/O thread pool. It knows nothing about devices beyond pinning, and nothing about policy.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.integrations.mxfp4 import FP4_VALUES

from activemoe.errors import ExpertLoadError, UserError
from activemoe.families import MXFP4, MXFP4_SCALES, ExpertsSpec, TensorPart, layer_expert_keys, resolve_expert
from activemoe.ids import ExpertId
from activemoe.pinned import pinned_empty

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TIERS = ("ram", "disk")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}


@dataclass(frozen=True)
class TensorInfo:
    path: Path
    offset: int  # absolute byte offset of the tensor's data in the file
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]


def checkpoint_files(model_dir: Path) -> list[Path]:
    if (model_dir / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise UserError(f"{model_dir / INDEX_FILE} is not a valid safetensors index ({e})") from None
        files = sorted({model_dir / name for name in weight_map.values()})
    elif (model_dir / SINGLE_FILE).is_file():
        files = [model_dir / SINGLE_FILE]
    else:
        raise UserError(f"{model_dir} has no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are supported)")
    for path in files:
        if not path.is_file():
            raise UserError(f"checkpoint shard {path} is listed in the index but missing")
    return files


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header; fail with the file's name when it is unreadable or truncated."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header length exceeds file size")
            header = json.loads(f.read(header_len))
        tensors, end = {}, 0
        for key, value in header.items():
            if key == "__metadata__":
                continue
            begin, stop = value["data_offsets"]
            end = max(end, stop)
            tensors[key] = TensorInfo(path, 8 + header_len + begin, value["dtype"], tuple(value["shape"]))
        if 8 + header_len + end > size:
            raise ValueError(f"data ends at byte {8 + header_len + end} but the file has {size}")
        return tensors
    except (ValueError, struct.error, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"corrupt or truncated safetensors file {path}: {e}") from None


class Mxfp4:
    """MXFP4 as GPT-OSS checkpoints store it (exact; decode only): per output channel, groups of 32 values
    packed two 4-bit codes per byte (low nibble first), and one power-of-two exponent per group (biased by
    127). The values are those of transformers' dequantiser (convert_moe_packed_tensors): the same code
    table, scaled by ldexp. One lookup per byte in a table of its two values, kept per device, so decoding
    on the copy stream makes no host copy."""

    def __init__(self):
        self._tables: dict[torch.device, torch.Tensor] = {}

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        blocks, scales = parts["blocks"], parts["scales"]  # [r, G, 16] uint8, [r, G] uint8
        table = self._tables.get(blocks.device)
        if table is None:
            values = torch.tensor(FP4_VALUES, dtype=torch.float32)
            pairs = torch.stack((values.repeat(16), values.repeat_interleave(16)), dim=-1)  # [256, 2]: (low, high)
            table = self._tables[blocks.device] = pairs.to(blocks.device)
        out = table.index_select(0, blocks.reshape(-1).int()).reshape(*scales.shape, 32)  # [r, G, 32]
        out *= torch.ldexp(torch.ones(scales.shape, device=scales.device), scales.int() - 127)[..., None]
        return out.reshape(scales.shape[0], -1)  # [r, G*32]


MXFP4_CODEC = Mxfp4()


class CheckpointIndex:
    """Key -> where its bytes are, over all shards; reads byte ranges without the page cache."""

    def __init__(self, model_dir: Path):
        self.files = checkpoint_files(model_dir)
        self.tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            self.tensors.update(read_header(path))

    @property
    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, part: TensorPart) -> torch.Tensor:
        if part.mxfp4:  # [rows, G, 16] codes and [rows, G] exponents -> the weight [G*32, rows], float32 (exact)
            blocks = self.read(TensorPart(part.key + MXFP4, part.index))
            scales = self.read(TensorPart(part.key + MXFP4_SCALES, part.index))
            return MXFP4_CODEC.decode({"blocks": blocks, "scales": scales}).T.contiguous()
        info = self.tensors[part.key]
        dtype = _DTYPES.get(info.dtype)
        if dtype is None:
            raise ValueError(f"{part.key} has dtype {info.dtype}, which ActiveMoE does not read")
        shape = info.shape if part.index is None else info.shape[1:]
        nbytes = math.prod(shape) * dtype.itemsize
        offset = info.offset + (0 if part.index is None else part.index * nbytes)
        fd = os.open(info.path, os.O_RDONLY)
        try:
            data = os.pread(fd, nbytes, offset)
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if len(data) != nbytes:
            raise OSError(f"short read of {part.key} from {info.path}")
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


class ExpertStore:
    """Every routed expert of the model, served one at a time in the compute dtype."""

    def __init__(self, index: CheckpointIndex, specs: dict[int, ExpertsSpec], dtype: torch.dtype, pin: bool,
                 tier: str = "ram", io_threads: int = 4):
        if tier not in TIERS:
            raise UserError(f"unknown store {tier!r}; known: {', '.join(TIERS)}")
        self.index, self.tier, self.dtype, self.pin = index, tier, dtype, pin
        self.layers = list(specs)  # decoder layer indices that have routed experts
        self.spec = _common_spec(specs)
        keys = layer_expert_keys(index.keys, self.layers)
        self.sources = {ExpertId(layer, e): resolve_expert(layer, e, self.spec, keys[layer])
                        for layer in self.layers for e in range(self.spec.num_experts)}
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        self.expert_bytes = sum(math.prod(s) for s in self.spec.shapes.values()) * dtype.itemsize
        self.host: dict[str, torch.Tensor] = {}
        self._views: dict[ExpertId, dict[str, torch.Tensor]] = {}  # read()'s views into the RAM tier, made once
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="activemoe-io") if tier == "disk" else None

    @property
    def num_experts(self) -> int:
        return self.spec.num_experts

    def experts(self) -> list[ExpertId]:
        return list(self.sources)

    def preload(self, on_progress: Callable[[int, int], None] | None = None) -> None:
        """Tier ram: read every expert into host buffers [num_moe_layers, E, *shape]."""
        if self.tier != "ram":
            return
        shape = (len(self.layers), self.num_experts)
        self.host = {name: pinned_empty(shape + s, self.dtype) if self.pin else torch.empty(shape + s, dtype=self.dtype)
                     for name, s in self.spec.shapes.items()}
        self._views.clear()
        eids = self.experts()
        for i, eid in enumerate(eids):
            for name, tensor in self.read_from_checkpoint(eid).items():
                self.host[name][self._row[eid.layer], eid.expert].copy_(tensor)
            if on_progress:
                on_progress(i + 1, len(eids))

    def read_from_checkpoint(self, eid: ExpertId, pool: ThreadPoolExecutor | None = None) -> dict[str, torch.Tensor]:
        try:
            jobs = {name: [pool.submit(self.index.read, p) if pool else p for p in parts]
                    for name, parts in self.sources[eid].items()}
            out = {}
            for name, parts in jobs.items():
                tensors = [p.result() if pool else self.index.read(p) for p in parts]
                tensor = torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0]
                if tuple(tensor.shape) != self.spec.shapes[name]:
                    raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {self.spec.shapes[name]}")
                out[name] = tensor.to(self.dtype)
            return out
        except UserError:
            raise
        except Exception as e:
            raise ExpertLoadError(f"cannot read layer {eid.layer} expert {eid.expert}: {e}") from e

    @property
    def mxfp4(self) -> bool:
        """Every 2-d expert tensor is stored in MXFP4 (GPT-OSS as released)."""
        first = self.sources[self.experts()[0]]
        weights = [parts for name, parts in first.items() if len(self.spec.shapes[name]) == 2]
        return bool(weights) and all(len(parts) == 1 and parts[0].mxfp4 for parts in weights)

    def packed_bytes(self) -> int:
        """Bytes of one expert as read_packed returns it, from the checkpoint's headers."""
        total = 0
        for parts in self.sources[self.experts()[0]].values():
            for part in parts:
                for key in (part.key + MXFP4, part.key + MXFP4_SCALES) if part.mxfp4 else (part.key,):
                    info = self.index.tensors[key]
                    shape = info.shape if part.index is None else info.shape[1:]
                    total += math.prod(shape) * _DTYPES[info.dtype].itemsize
        return total

    def read_packed(self, eid: ExpertId) -> dict[str, dict[str, torch.Tensor]]:
        """One expert as the checkpoint stores it (self.mxfp4): per tensor, its MXFP4 "blocks" [R, G, 16] and
        "scales" [R, G] (R output channels), or a 1-d tensor as "raw"."""
        try:
            out = {}
            for name, parts in self.sources[eid].items():
                part, shape = parts[0], self.spec.shapes[name]
                if not part.mxfp4:
                    out[name] = {"raw": torch.cat([self.index.read(p) for p in parts])}
                    continue
                blocks = self.index.read(TensorPart(part.key + MXFP4, part.index))
                scales = self.index.read(TensorPart(part.key + MXFP4_SCALES, part.index))
                rows, cols = (shape[1], shape[0]) if self.spec.is_transposed else shape
                if blocks.shape != (rows, cols // 32, 16) or scales.shape != blocks.shape[:2]:
                    raise ValueError(f"{name} has MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)}, "
                                     f"expected {(rows, cols // 32, 16)} and {(rows, cols // 32)}")
                out[name] = {"blocks": blocks, "scales": scales}
            return out
        except Exception as e:
            raise ExpertLoadError(f"cannot read layer {eid.layer} expert {eid.expert}: {e}") from e

    def read(self, eid: ExpertId) -> dict[str, torch.Tensor]:
        """One expert's host tensors: views into the RAM tier, or a fresh read from disk."""
        if self.tier == "disk":
            tensors = self.read_from_checkpoint(eid, self._pool)
            return {n: t.pin_memory() for n, t in tensors.items()} if self.pin else tensors
        views = self._views.get(eid)
        if views is None:  # made once per expert: read() runs on the loader thread, whose Python holds the GIL
            row = self._row[eid.layer]
            views = self._views[eid] = {name: buf[row, eid.expert] for name, buf in self.host.items()}
        return views

    @property
    def io_threads(self) -> list:
        return list(self._pool._threads) if self._pool else []

    def layer_weights(self, layer: int) -> dict[str, torch.Tensor]:
        """Tier ram: the host copies of all experts of one layer, [E, *shape] per tensor."""
        return {name: buf[self._row[layer]] for name, buf in self.host.items()}

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _common_spec(specs: dict[int, ExpertsSpec]) -> ExpertsSpec:
    first = next(iter(specs.values()))
    for layer, spec in specs.items():
        if spec != first:
            raise UserError(f"layer {layer} has experts of another shape than the first MoE layer; "
                            "one slot shape per model is supported")
    return first


def model_dir_of(path: str | os.PathLike) -> Path:
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} has no config.json; point --model at a Hugging Face checkpoint directory")
    return model_dir
