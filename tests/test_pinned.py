"""Exact-size page-locked host buffers (cudaHostRegister), checked against a fake CUDA runtime: this
machine has no GPU, and what matters here is which bytes get registered and when they are released."""
import gc
import logging

import torch

import activemoe
from activemoe.config import EngineConfig
from activemoe.pinned import pinned_copy, pinned_empty
from activemoe.store import ExpertStore


class FakeCudart:
    class cudaError:  # noqa: N801 (the name torch.cuda.cudart() uses)
        success = 0

    def __init__(self, result: int = 0):
        self.result, self.registered, self.unregistered = result, {}, []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802
        self.registered[ptr] = size
        return self.result

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        self.unregistered.append(ptr)
        return 0


def test_registers_the_exact_size_and_unregisters_once_no_view_remains(monkeypatch):
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    buffer = pinned_empty((3, 5, 7), torch.bfloat16)
    ptr = buffer.data_ptr()
    assert fake.registered == {ptr: 3 * 5 * 7 * 2}  # 210 bytes: torch's pinned allocator would take 256
    view = buffer[1, 2]
    del buffer
    gc.collect()
    assert fake.unregistered == []  # the view still reads the buffer
    del view
    gc.collect()
    assert fake.unregistered == [ptr]


def test_pinned_copy_holds_the_values(monkeypatch):
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    source = torch.arange(12, dtype=torch.int8).reshape(3, 4)
    assert torch.equal(pinned_copy(source), source)


def test_falls_back_to_torch_pinning_with_a_warning_when_registration_fails(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart(result=1))
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self) or self)
    with caplog.at_level(logging.WARNING, logger="activemoe.pinned"):
        buffer = pinned_empty((4,), torch.float32)
    assert pinned == [buffer] and "cudaHostRegister of 16 bytes failed" in caplog.text


def test_the_host_tier_registers_exactly_its_experts(checkpoint, monkeypatch):
    eng = activemoe.load(checkpoint("qwen3_moe"), EngineConfig.tiny(num_slots=4))
    base = eng.runtime.store
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    store = ExpertStore(base.index, {layer: base.spec for layer in base.layers}, torch.float32, pin=True)
    store.preload()
    assert sorted(fake.registered) == sorted(t.data_ptr() for t in store.host.values())
    assert sum(fake.registered.values()) == len(base.layers) * base.num_experts * base.expert_bytes
    eid = base.experts()[5]
    assert all(torch.equal(store.read(eid)[n], t) for n, t in base.read(eid).items())
    eng.close()
