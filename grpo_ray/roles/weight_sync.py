"""Bucketed weight transfer from the learner to the generators.

The learner packs its parameters into a few large contiguous byte buffers (buckets) instead of
one message per tensor; Ray stores each bucket once in the object store and every generator on a
node maps the same shared-memory copy (numpy buffers are zero-copy in Ray). The generator turns
each bucket back into named tensors (views, no copy) and loads them into the running engine.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class WeightBucket:
    # [nbytes] uint8, the tensors back to back, each at a multiple of ALIGN: a numpy array (the
    # object store maps it zero-copy), or a torch tensor a collective broadcast filled
    data: np.ndarray | torch.Tensor
    # (name, torch dtype name, shape, byte offset, nbytes) per tensor
    entries: list[tuple[str, str, tuple[int, ...], int, int]] = field(default_factory=list)


ALIGN = 16  # bytes: a view as int64 or float32 needs an offset that its element size divides


def payload_bytes(buckets: list) -> int:
    """Bytes a sync sends to each generator: weight buckets, an adapter (AdapterWeights), or
    layouts of buckets that go by broadcast."""
    return sum(int(b.data.nbytes) if isinstance(b, WeightBucket) else b.nbytes for b in buckets)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def pack_state_dict(named_tensors, bucket_bytes: int = 256 << 20, dtype: torch.dtype | None = None) -> list[WeightBucket]:
    """Pack (name, tensor) pairs into buckets of at most bucket_bytes (a larger tensor gets a
    bucket of its own). dtype: cast floating tensors (e.g. to the generator's bf16) on the way."""
    buckets: list[WeightBucket] = []
    pending: list[tuple[str, torch.Tensor]] = []
    size = 0

    def flush():
        nonlocal pending, size
        if not pending:
            return
        data = np.empty(size, dtype=np.uint8)
        entries, offset = [], 0
        for name, t in pending:
            nbytes = t.numel() * t.element_size()
            data[offset:offset + nbytes] = t.reshape(-1).view(torch.uint8).numpy()
            entries.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, nbytes))
            offset += _aligned(nbytes)
        buckets.append(WeightBucket(data, entries))
        pending, size = [], 0

    for name, tensor in named_tensors:
        t = tensor.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        nbytes = _aligned(t.numel() * t.element_size())
        if size and size + nbytes > bucket_bytes:
            flush()
        pending.append((name, t))
        size += nbytes
    flush()
    return buckets


def unpack_bucket(bucket: WeightBucket):
    """Yield (name, tensor) views into the bucket's buffer, no copy. A bucket fetched from Ray's
    object store is read-only shared memory: the views are only read (the engine copies them into
    its own parameters), so torch's non-writable warning is silenced rather than paid for."""
    if isinstance(bucket.data, torch.Tensor):
        raw = bucket.data
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(bucket.data)
    for name, dtype, shape, offset, nbytes in bucket.entries:
        yield name, raw[offset:offset + nbytes].view(getattr(torch, dtype)).view(shape)


@dataclass(frozen=True)
class BucketLayout:
    """A bucket without its bytes: what each generator is sent through Ray when the bytes
    themselves come by broadcast (sync.method=collective, roles/collective.py)."""
    nbytes: int
    entries: list[tuple[str, str, tuple[int, ...], int, int]]


def layouts(buckets: list[WeightBucket]) -> list[BucketLayout]:
    return [BucketLayout(int(b.data.nbytes), b.entries) for b in buckets]


@dataclass
class AdapterWeights:
    """A LoRA policy's adapter as PEFT writes it (file name -> bytes): what travels to the
    generators instead of weight buckets with model.lora.sync=adapter (vLLM serves it as a LoRA)."""
    files: dict[str, bytes]

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.files.values())
