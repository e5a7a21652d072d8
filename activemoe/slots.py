"""slots.py owns the device slab, one preallocated buffer per expert tensor, [num_slots, *shape], and
the copies into it. It is the only file that touches CUDA streams and events.

CUDA: copies go on one dedicated copy stream. Before a slot is overwritten, the copy stream waits on
the slot's `free` event (recorded on the compute stream when the slot was last released), so a kernel
still reading it finishes first. The compute stream waits on the slot's `ready` event, never a host sync.
CPU: copies run on the caller's (loader) thread, paced to an emulated link speed when one is given.
Copies are chunked (rows of one tensor at a time) so a critical load can overtake between chunks.
A chunk is issued (`issue_chunk`, returns a Ticket) and lands later (`landed`, `wait`), so the loader
can queue the next chunk behind it as a copy engine's queue would, keeping the link busy.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# S slots; a chunk is a row range of one tensor of one expert


@dataclass(frozen=True)
class Chunk:
    name: str
    start: int  # first row (dim 0) of the tensor
    stop: int
    nbytes: int
    whole: bool = False  # the chunk is the whole tensor: its source needs no slicing


class EmulatedLink:
    """Paces copies to `gbps` GB/s: each chunk finishes no earlier than the link could carry it. Unpaced
    (None), copies run at the real link's speed, which `measured_gbps` (the real link's, when known) lets
    the miss-handling decisions estimate."""

    def __init__(self, gbps: float | None, measured_gbps: float | None = None):
        self.bytes_per_s = gbps * 1e9 if gbps else None
        self.estimate_bytes_per_s = self.bytes_per_s or (measured_gbps * 1e9 if measured_gbps else None)
        self._free_at = 0.0
        self._lock = threading.Lock()

    def transfer_s(self, nbytes: int) -> float:
        """Link time for `nbytes` (0.0 when the link's speed is unknown)."""
        return nbytes / self.estimate_bytes_per_s if self.estimate_bytes_per_s else 0.0

    def reserve(self, started: float, nbytes: int, extra_s: float = 0.0) -> float:
        """Book `nbytes` (plus `extra_s` of serial work behind them) issued at `started`: returns when
        they are delivered, after everything booked before (0.0 when unpaced)."""
        if self.bytes_per_s is None:
            return 0.0
        with self._lock:
            deadline = max(started, self._free_at) + nbytes / self.bytes_per_s + extra_s
            self._free_at = deadline
        return deadline

    def pace(self, started: float, nbytes: int) -> None:
        """Block until `nbytes` issued at `started` are delivered."""
        delay = self.reserve(started, nbytes) - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


@dataclass(frozen=True)
class Ticket:
    """A chunk on its way, issued at `issued`: delivered at `deadline` (perf_counter; the emulated link)
    and, on CUDA, once `event` has completed."""

    issued: float
    deadline: float
    event: object = None  # torch.cuda.Event


NEVER = None  # no wake-up: wait() sleeps until the chunk has landed


class SlotSlab:
    def __init__(self, num_slots: int, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device,
                 link: EmulatedLink | None = None, chunk_bytes: int = 1 << 20):
        self.num_slots, self.device = num_slots, device
        self.buffers = {name: torch.empty((num_slots, *shape), dtype=dtype, device=device)  # [S, *shape]
                        for name, shape in shapes.items()}
        self.views = [{name: buf[slot] for name, buf in self.buffers.items()} for slot in range(num_slots)]
        self.link = link or EmulatedLink(None)
        self.chunks = self._plan(shapes, dtype, chunk_bytes)
        self.expert_bytes = sum(c.nbytes for c in self.chunks)
        # each (slot, chunk)'s destination view, made once: the loader thread issues chunks while the compute
        # path runs, and its Python holds the GIL the compute path needs (indexing a view costs microseconds)
        self.targets = [[self.buffers[c.name][slot, c.start:c.stop] for c in self.chunks] for slot in range(num_slots)]
        self.cuda = device.type == "cuda"
        if self.cuda:
            # the device's index, once: torch.cuda.current_stream(device) with an index-less device looks the
            # current device up on every call (13% of a decode step's host time in cProfile on an H100)
            self.index = device.index if device.index is not None else torch.cuda.current_device()
            self.copy_stream = torch.cuda.Stream(self.index)
            self.free = [torch.cuda.Event() for _ in range(num_slots)]
            self.ready = [torch.cuda.Event() for _ in range(num_slots)]

    @staticmethod
    def _plan(shapes, dtype, chunk_bytes) -> list[Chunk]:
        chunks = []
        for name, shape in shapes.items():
            row_bytes = max(1, int(torch.Size(shape[1:]).numel()) * dtype.itemsize)
            rows_per_chunk = max(1, chunk_bytes // row_bytes)
            for start in range(0, shape[0], rows_per_chunk):
                stop = min(shape[0], start + rows_per_chunk)
                chunks.append(Chunk(name, start, stop, (stop - start) * row_bytes, stop - start == shape[0]))
        return chunks

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def issue_chunk(self, slot: int, host: dict[str, torch.Tensor], index: int) -> Ticket:
        """Start copying chunk `index` of one expert into `slot`. CUDA: queued on the copy stream. CPU:
        the bytes are copied now and count as landed when the emulated link would deliver them."""
        chunk = self.chunks[index]
        src = host[chunk.name] if chunk.whole else host[chunk.name][chunk.start:chunk.stop]
        dst = self.targets[slot][index]
        started = time.perf_counter()
        if not self.cuda:
            dst.copy_(src)
            return Ticket(started, self.link.reserve(started, chunk.nbytes))
        if index == 0:
            self.copy_stream.wait_event(self.free[slot])  # kernels still reading the slot finish first
        with self._on_copy_stream():
            dst.copy_(src, non_blocking=True)
        return Ticket(started, self.link.reserve(started, chunk.nbytes), self._recorded(slot, index))

    @contextmanager
    def _on_copy_stream(self):
        """torch.cuda.stream(copy_stream) without its per-call lookups of the current device."""
        previous = torch.cuda.current_stream(self.index)
        torch.cuda.set_stream(self.copy_stream)
        try:
            yield
        finally:
            torch.cuda.set_stream(previous)

    def _recorded(self, slot: int, index: int):
        """On the copy stream: the slot's ready event after its last chunk, and this chunk's own event."""
        if index == len(self.chunks) - 1:
            self.ready[slot].record(self.copy_stream)
        done = torch.cuda.Event()
        done.record(self.copy_stream)
        return done

    @staticmethod
    def landed(ticket: Ticket) -> bool:
        return time.perf_counter() >= ticket.deadline and (ticket.event is None or ticket.event.query())

    @staticmethod
    def wait(ticket: Ticket, wake: threading.Event | None) -> None:
        """Block until the chunk has landed, or (on the emulated link) until `wake` is set."""
        if ticket.event is not None:
            ticket.event.synchronize()  # on the loader thread; the compute stream never waits on the host
        delay = ticket.deadline - time.perf_counter()
        if delay > 0:
            if wake is NEVER:
                time.sleep(delay)
            else:
                wake.wait(delay)

    def copy_chunk(self, slot: int, host, index: int) -> None:
        """Copy chunk `index` of one expert into `slot`; returns when the bytes have landed."""
        ticket = self.issue_chunk(slot, host, index)
        while not self.landed(ticket):
            self.wait(ticket, NEVER)

    def acquire(self, slot: int) -> dict[str, torch.Tensor]:
        """The slot's weights for compute; on CUDA the compute stream waits for the slot's copy."""
        if self.cuda:
            torch.cuda.current_stream(self.index).wait_event(self.ready[slot])
        return self.views[slot]

    def release(self, slot: int) -> None:
        """Compute is done with the slot (as far as the host knows); copies into it wait for the kernels."""
        if self.cuda:
            self.free[slot].record(torch.cuda.current_stream(self.index))


class CompressedSlab(SlotSlab):
    """Slots in the compute dtype, filled from compressed host copies (int8/int4, approximate): a chunk
    is a row range (output channels) of one tensor's compressed parts, which is what the link carries
    and paces; each chunk is dequantised into its rows of the slot once it has landed. CUDA: the parts
    are staged on the device and dequantised on the copy stream, before the slot's ready event."""

    def __init__(self, num_slots: int, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device,
                 parts: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]], decode_into,
                 link: EmulatedLink | None = None, chunk_bytes: int = 1 << 20):
        super().__init__(num_slots, shapes, dtype, device, link, chunk_bytes)
        self.decode_into = decode_into  # (name, {part: rows}, slot tensor, start, stop) -> None
        self.chunks = []
        for name, ps in parts.items():
            row_bytes = sum(max(1, torch.Size(s[1:]).numel()) * dt.itemsize for s, dt in ps.values())
            rows = next(iter(ps.values()))[0][0]
            step = max(1, chunk_bytes // row_bytes)
            self.chunks += [Chunk(name, a, min(rows, a + step), (min(rows, a + step) - a) * row_bytes)
                            for a in range(0, rows, step)]
        self.expert_bytes = sum(c.nbytes for c in self.chunks)  # compressed bytes per expert
        if self.cuda:  # one staging buffer per part, the size of the largest chunk (copies are serialised)
            most: dict[str, int] = {}
            for c in self.chunks:
                most[c.name] = max(most.get(c.name, 0), c.stop - c.start)
            self.staging = {name: {p: torch.empty((most[name], *s[1:]), dtype=dt, device=device)
                                   for p, (s, dt) in ps.items()} for name, ps in parts.items()}

    def issue_chunk(self, slot: int, host, index: int) -> Ticket:
        """`host` is a CompressedExpert: its `parts[name][part]` are [rows, ...] host tensors."""
        chunk = self.chunks[index]
        src = {p: t[chunk.start:chunk.stop] for p, t in host.parts[chunk.name].items()}
        dst = self.buffers[chunk.name][slot]
        started = time.perf_counter()
        if not self.cuda:  # the dequantisation is booked on the emulated link after the compressed bytes
            self.decode_into(chunk.name, src, dst, chunk.start, chunk.stop)  # (serial, no overlap flattered)
            return Ticket(started, self.link.reserve(started, chunk.nbytes, extra_s=time.perf_counter() - started))
        if index == 0:
            self.copy_stream.wait_event(self.free[slot])
        with self._on_copy_stream():  # the next chunk's staging copy queues behind this decode
            staged = {p: self.staging[chunk.name][p][:chunk.stop - chunk.start].copy_(t, non_blocking=True)
                      for p, t in src.items()}
            self.decode_into(chunk.name, staged, dst, chunk.start, chunk.stop)
            return Ticket(started, self.link.reserve(started, chunk.nbytes), self._recorded(slot, index))
