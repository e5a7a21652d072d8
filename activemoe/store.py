"""store.py is the slow tier: it indexes the safetensors files of a checkpoint and serves one
(layer, expert) at a time as host tensors in transformers' in-memory layout.

It knows nothing about devices beyond pinning host memory, and nothing about caching policy.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from activemoe.errors import ExpertLoadError, UserError
from activemoe.families import ExpertsSpec, TensorPart, layer_expert_keys, resolve_expert
from activemoe.ids import ExpertId

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


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
        _check_header(path)
    return files


def _check_header(path: Path) -> None:
    """Fail with the file's name when its header is unreadable or its data is truncated."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header length exceeds file size")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise ValueError(f"data ends at byte {8 + header_len + end} but the file has {size}")
    except (ValueError, struct.error, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"corrupt or truncated safetensors file {path}: {e}") from None


class CheckpointIndex:
    """Key -> file over all shards, with lazily opened (memory-mapped) handles."""

    def __init__(self, model_dir: Path):
        self.files = checkpoint_files(model_dir)
        self.key_file: dict[str, Path] = {}
        self._handles = {}
        for path in self.files:
            handle = self._open(path)
            for key in handle.keys():
                self.key_file[key] = path

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise UserError(f"corrupt safetensors file {path}: {e}") from None
        return self._handles[path]

    def close(self) -> None:
        """Drop the memory maps (their touched pages count in RSS); reopened on the next read."""
        self._handles.clear()

    def read(self, part: TensorPart) -> torch.Tensor:
        handle = self._open(self.key_file[part.key])
        if part.index is None:
            return handle.get_tensor(part.key)
        return handle.get_slice(part.key)[part.index]


class ExpertStore:
    """Host copies of every routed expert, one buffer per tensor name: [num_moe_layers, E, *shape]."""

    def __init__(self, index: CheckpointIndex, specs: dict[int, ExpertsSpec], dtype: torch.dtype, pin: bool):
        self.index = index
        self.layers = list(specs)  # decoder layer indices that have routed experts
        self.spec = _common_spec(specs)
        self.dtype = dtype
        keys = layer_expert_keys(list(index.key_file), self.layers)
        self.sources = {ExpertId(layer, e): resolve_expert(layer, e, self.spec, keys[layer])
                        for layer in self.layers for e in range(self.spec.num_experts)}
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        shape = (len(self.layers), self.spec.num_experts)
        self.host = {name: torch.empty(shape + s, dtype=dtype, pin_memory=pin) for name, s in self.spec.shapes.items()}
        self.expert_bytes = sum(t[0, 0].numel() * t.element_size() for t in self.host.values())

    @property
    def num_experts(self) -> int:
        return self.spec.num_experts

    def experts(self) -> list[ExpertId]:
        return list(self.sources)

    def preload(self, on_progress: Callable[[int, int], None] | None = None) -> None:
        """Read every expert from the checkpoint into the host buffers."""
        eids = self.experts()
        for i, eid in enumerate(eids):
            for name, tensor in self.read_from_checkpoint(eid).items():
                self.host[name][self._row[eid.layer], eid.expert].copy_(tensor)
            if eid.expert == self.num_experts - 1:
                self.index.close()  # bound the mapped checkpoint pages in RSS to about one layer
            if on_progress:
                on_progress(i + 1, len(eids))

    def read_from_checkpoint(self, eid: ExpertId) -> dict[str, torch.Tensor]:
        try:
            out = {}
            for name, parts in self.sources[eid].items():
                tensor = torch.cat([self.index.read(p) for p in parts], dim=0) if len(parts) > 1 else self.index.read(parts[0])
                if tuple(tensor.shape) != self.spec.shapes[name]:
                    raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {self.spec.shapes[name]}")
                out[name] = tensor
            return out
        except UserError:
            raise
        except Exception as e:
            raise ExpertLoadError(f"cannot read layer {eid.layer} expert {eid.expert}: {e}") from e

    def read(self, eid: ExpertId) -> dict[str, torch.Tensor]:
        """The host copy of one expert (views into the host buffers)."""
        row = self._row[eid.layer]
        return {name: buf[row, eid.expert] for name, buf in self.host.items()}


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
