"""Descriptors: all that crosses a process boundary for a tensor sent through shared memory.

A request's tensors live either in slots of its tokenizer process's warm region (see
``region.py``; the request carries one :class:`RegionDescriptor`) or, as a fallback, in one
per-request segment (see ``segment.py``; one :class:`SegmentDescriptor`). Inside the
pickled ``MultimodalInputs`` each tensor is replaced by a :class:`TensorDescriptor`. All are
small frozen dataclasses of plain values, a few dozen bytes each once pickled, whatever the
tensor's size.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch

__all__ = [
    "TensorDescriptor",
    "SegmentDescriptor",
    "SlotRef",
    "RegionDescriptor",
    "dtype_name",
    "torch_dtype",
    "numpy_dtype",
    "table_digest",
    "slot_digest",
    "slot_of",
    "describe",
]

# dtypes that may travel; anything else travels inline.
_TORCH_DTYPES = {
    str(t).removeprefix("torch."): t
    for t in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}
_NUMPY_DTYPES = {
    n: np.dtype(n)
    for n in ("float64", "float32", "float16", "int64", "int32", "int16", "int8",
              "uint8", "bool")
}


def dtype_name(value: torch.Tensor | np.ndarray) -> Optional[str]:
    """The descriptor name of ``value``'s dtype, or ``None`` if it can't travel."""
    if isinstance(value, torch.Tensor):
        name = str(value.dtype).removeprefix("torch.")
        return name if name in _TORCH_DTYPES else None
    name = value.dtype.name
    return name if name in _NUMPY_DTYPES and value.dtype.isnative else None


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


def numpy_dtype(name: str) -> np.dtype:
    return _NUMPY_DTYPES[name]


@dataclass(frozen=True, slots=True)
class TensorDescriptor:
    """One tensor inside a segment's payload.

    ``kind`` is ``"torch"`` or ``"numpy"`` (the type the scheduler rebuilds), ``offset`` is
    relative to the payload start, ``hash`` is the item hash when this tensor is the one
    sglang hashes for ``pad_value`` (``feature`` or ``precomputed_embeddings``), else None.
    """

    kind: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    hash: Optional[int] = None

    def expected_nbytes(self) -> int:
        """nbytes implied by dtype and shape; raises KeyError/ValueError when invalid."""
        if self.kind == "torch":
            itemsize = torch_dtype(self.dtype).itemsize
        elif self.kind == "numpy":
            itemsize = numpy_dtype(self.dtype).itemsize
        else:
            raise ValueError(f"unknown tensor kind {self.kind!r}")
        count = 1
        for dim in self.shape:
            if not isinstance(dim, int) or dim < 0:
                raise ValueError(f"bad dimension {dim!r}")
            count *= dim
        return count * itemsize


def describe(leaf: torch.Tensor | np.ndarray, offset: int, item_hash: Optional[int]) -> TensorDescriptor:
    """The descriptor of ``leaf`` once its bytes are at ``offset``."""
    kind = "torch" if isinstance(leaf, torch.Tensor) else "numpy"
    nbytes = leaf.nbytes if kind == "numpy" else leaf.numel() * leaf.element_size()
    return TensorDescriptor(kind, dtype_name(leaf), tuple(leaf.shape), offset, nbytes, item_hash)


@dataclass(frozen=True, slots=True)
class SegmentDescriptor:
    """The segment a request's tensors live in.

    ``nonce`` is 16 random bytes also written in the segment header: a descriptor that
    names a segment it did not come with is refused. ``consumers`` is the number of
    scheduler ranks that map the segment per send (see ``config.consumers_per_send``).
    """

    name: str
    payload_nbytes: int
    nonce: bytes
    consumers: int


def table_digest(segment: SegmentDescriptor, tensors: Iterable[TensorDescriptor]) -> bytes:
    """16-byte digest of the descriptor table, stored in the header at creation.

    A rank recomputes it from the descriptors it received; any change to a name, size,
    dtype, shape, offset or hash makes it differ.
    """
    h = hashlib.sha256()
    h.update(segment.name.encode())
    h.update(struct.pack("<qq", segment.payload_nbytes, segment.consumers))
    for t in tensors:
        h.update(
            repr((t.kind, t.dtype, tuple(t.shape), t.offset, t.nbytes, t.hash)).encode()
        )
    return h.digest()[:16]


@dataclass(frozen=True, slots=True)
class SlotRef:
    """One slot of a region that a request's tensors view.

    ``offset`` and ``nbytes`` locate the slot's payload in the region file; ``generation``
    must equal the slot table entry's, or the reference is stale (the slot was recycled).
    A :class:`TensorDescriptor` of the request lies in exactly one slot: its ``offset`` is a
    region file offset inside ``[offset, offset + nbytes)``.
    """

    index: int
    generation: int
    offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class RegionDescriptor:
    """The region (and the slots in it) a request's tensors live in.

    ``name`` and ``nonce`` identify one region instance (the nonce is also in its header);
    ``consumers`` is the number of ranks that take a reference per send, as for segments.
    """

    name: str
    nonce: bytes
    consumers: int
    slots: tuple[SlotRef, ...]


def slot_of(slots: Iterable[SlotRef], t: TensorDescriptor) -> Optional[SlotRef]:
    """The first of ``slots`` whose payload holds ``t`` (a zero-byte tensor may sit at its
    end). Both sides group a request's descriptors by slot with it."""
    for r in slots:
        if r.offset <= t.offset and t.offset + t.nbytes <= r.offset + r.nbytes:
            return r
    return None


def slot_digest(slot: SlotRef, tensors: Iterable[TensorDescriptor]) -> bytes:
    """16-byte digest of the descriptors that view one slot, stored in its table entry.

    It covers the slot's place (not its generation: a revived slot keeps its bytes) and
    each tensor's kind, dtype, shape, offset, nbytes and hash, in walk order.
    """
    h = hashlib.sha256(struct.pack("<qq", slot.offset, slot.nbytes))
    for t in tensors:
        h.update(
            repr((t.kind, t.dtype, tuple(t.shape), t.offset, t.nbytes, t.hash)).encode()
        )
    return h.digest()[:16]
