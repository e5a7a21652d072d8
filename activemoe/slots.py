"""slots.py owns the device slab: one preallocated buffer per expert tensor name, [num_slots, *shape].

It is the only file that copies into device memory. Copies from pinned host memory are issued on the
current stream with non_blocking=True: kernels queued after the copy on that stream see the new
weights, and the host never synchronises. (A dedicated copy stream with per-slot events comes with the
asynchronous prefetch runtime.)
"""
from __future__ import annotations

import torch

# S slots, plus the per-expert shape of each tensor


class SlotSlab:
    def __init__(self, num_slots: int, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device):
        self.num_slots = num_slots
        self.device = device
        self.buffers = {name: torch.empty((num_slots, *shape), dtype=dtype, device=device)  # [S, *shape]
                        for name, shape in shapes.items()}
        self.bytes_copied = 0

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def load(self, slot: int, host: dict[str, torch.Tensor]) -> int:
        """Copy one expert's host tensors into `slot`; returns the bytes moved."""
        moved = 0
        for name, buf in self.buffers.items():
            buf[slot].copy_(host[name], non_blocking=True)
            moved += host[name].numel() * host[name].element_size()
        self.bytes_copied += moved
        return moved

    def weights(self, slot: int) -> dict[str, torch.Tensor]:
        return {name: buf[slot] for name, buf in self.buffers.items()}
