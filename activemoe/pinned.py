"""Page-locked host tensors of exactly the size asked for.

torch's pinned allocator (`pin_memory=True`, `Tensor.pin_memory()`) rounds every allocation up to a power
of two so that freed blocks can be reused: the bfloat16 host tier of Qwen3-30B-A3B (buffers of 36 and 18
GiB) would pin 96 GiB instead of 54, Mixtral-8x7B's (56 + 28 GiB) 96 instead of 84. The host tier lives as
long as the engine and is never reused, so its buffers are ordinary host memory,
page-locked in place with cudaHostRegister (copies from it are true asynchronous DMA, as from memory torch
pinned) and unregistered when the tensor is freed.
"""
from __future__ import annotations

import logging
import weakref

import torch

log = logging.getLogger(__name__)


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised page-locked host tensor; torch's own pinned allocator if registration fails."""
    tensor = torch.empty(shape, dtype=dtype)
    nbytes = tensor.untyped_storage().nbytes()
    if nbytes == 0:
        return tensor
    cudart = torch.cuda.cudart()
    ptr = tensor.data_ptr()
    try:
        error = cudart.cudaHostRegister(ptr, nbytes, 0)
    except (AttributeError, RuntimeError) as e:  # a torch build without the binding
        error = e
    if error != cudart.cudaError.success:
        log.warning("cudaHostRegister of %d bytes failed (%s); using torch's pinned allocator, which rounds the "
                    "allocation up to a power of two", nbytes, error)
        return tensor.pin_memory()
    # a view keeps its base alive, so this runs once no view of the buffer remains, before the memory is freed
    weakref.finalize(tensor, cudart.cudaHostUnregister, ptr)
    return tensor


def pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A page-locked host copy of `tensor`."""
    return pinned_empty(tuple(tensor.shape), tensor.dtype).copy_(tensor)
