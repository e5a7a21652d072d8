"""compressed.py: the compressed host tier (approximate, opt-in) and the int4 late-miss substitute.

CompressedStore serves the loader one expert's compressed parts (the link carries those; the slab
dequantises them into a full-precision slot) and serves host compute its dequantised weights.
Int4Substitute is `--late-miss int4`. Neither knows about caching policy or the model's layers.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from activemoe import quant
from activemoe.ids import ExpertId
from activemoe.pinned import pinned_copy, pinned_empty
from activemoe.slots import EmulatedLink
from activemoe.store import ExpertStore


class CompressedExpert(Mapping):
    """One expert: `parts[name][part]` are its compressed tensors (views into the host tier); indexing
    by tensor name dequantises it (once) into `dtype`, so host compute reads it like a native expert."""

    def __init__(self, parts: dict[str, dict[str, torch.Tensor]], layout: quant.Layout, shapes: dict, dtype):
        self.parts, self.layout, self.shapes, self.dtype = parts, layout, shapes, dtype
        self._full: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._full:
            parts = self.parts[name]  # KeyError for unknown names, as a dict would
            device = next(iter(parts.values())).device
            out = torch.empty(self.shapes[name], dtype=self.dtype, device=device)
            rows = next(iter(parts.values())).shape[0]
            self.layout.decode_into(name, parts, out, 0, rows)
            self._full[name] = out
        return self._full[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)

    def to(self, device: torch.device) -> CompressedExpert:
        """The compressed parts moved to `device` (dequantised there on first use)."""
        parts = {n: {p: t.to(device) for p, t in ps.items()} for n, ps in self.parts.items()}
        return CompressedExpert(parts, self.layout, self.shapes, self.dtype)


class CompressedStore:
    """Every routed expert in int8 or int4 (approximate), or in the checkpoint's own MXFP4 (exact), in host
    RAM ([N, ...] per part, pinned for CUDA); the interface of ExpertStore's RAM tier as the loader, runtime
    and profiler use it."""

    tier = "ram"

    def __init__(self, base: ExpertStore, tensors: dict[str, torch.Tensor], precision: str, pinned: bool = False):
        self.base, self.precision = base, precision
        self.index, self.layers, self.spec = base.index, base.layers, base.spec
        self.dtype, self.pin = base.dtype, base.pin
        self.layout = quant.Layout(base.spec, precision)
        self.host: dict = {}  # no full-precision host copies: host compute goes expert by expert through read()
        self.tensors = {k: pinned_copy(t) if base.pin and not pinned else t for k, t in tensors.items()}  # [N, ...]
        self.expert_bytes = quant.compressed_bytes(self.tensors)
        self._row = {layer: i for i, layer in enumerate(self.layers)}

    @classmethod
    def open(cls, base: ExpertStore, model_dir: Path, precision: str, cache_dir=None,
             on_progress: Callable[[int, int], None] | None = None) -> CompressedStore:
        return cls(base, quant.load_or_build(base, model_dir, precision, cache_dir, on_progress), precision)

    @classmethod
    def mxfp4(cls, base: ExpertStore, on_progress: Callable[[int, int], None] | None = None) -> CompressedStore:
        """The host tier of a checkpoint whose experts are MXFP4 (base.mxfp4): its codes and exponents as
        stored, about 4.25 bits a weight in RAM and on the link, dequantised into the slots (exact)."""
        empty = pinned_empty if base.pin else None  # page-locked in place for CUDA
        return cls(base, quant.stack(base.experts(), base.read_packed, on_progress, empty), "mxfp4", pinned=True)

    @property
    def num_experts(self) -> int:
        return self.spec.num_experts

    @property
    def io_threads(self) -> list:
        return []

    def experts(self) -> list[ExpertId]:
        return self.base.experts()

    def part_shapes(self) -> dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
        """name -> part -> (per-expert shape, dtype): what the slab stages and chunks."""
        out: dict = {}
        for key, t in self.tensors.items():
            name, part = key.rsplit(".", 1)
            out.setdefault(name, {})[part] = (tuple(t.shape[1:]), t.dtype)
        return out

    def read(self, eid: ExpertId) -> CompressedExpert:
        row = self._row[eid.layer] * self.num_experts + eid.expert
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in self.tensors.items():
            name, part = key.rsplit(".", 1)
            parts.setdefault(name, {})[part] = t[row]
        return CompressedExpert(parts, self.layout, self.spec.shapes, self.dtype)

    def read_from_checkpoint(self, eid: ExpertId, pool=None) -> dict[str, torch.Tensor]:
        return self.base.read_from_checkpoint(eid, pool)

    def preload(self, on_progress=None) -> None:
        pass

    def close(self) -> None:
        self.base.close()


class Int4Substitute:
    """`--late-miss int4` (approximate, opt-in; HOBBIT's idea): a critical miss whose full copy would be
    READY later than its int4 copy could be is computed from the int4 copy instead. The int4 bytes move
    to the device on the compute path (on CPU paced on the emulated link) and are dequantised there."""

    def __init__(self, store: CompressedStore, link: EmulatedLink, device: torch.device):
        self.store, self.link, self.device = store, link, device
        self.transfer_s = link.transfer_s(store.expert_bytes)

    def late(self, remaining_s: float) -> bool:
        return remaining_s > self.transfer_s

    def weights(self, eid: ExpertId) -> CompressedExpert:
        started = time.perf_counter()
        expert = self.store.read(eid).to(self.device)
        self.link.pace(started, self.store.expert_bytes)
        return expert
