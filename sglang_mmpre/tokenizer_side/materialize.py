"""Materialize a processor's output dict into sglang's own ``MultimodalInputs``, and pack
its tensors into a shared-memory segment.

:func:`materialize` pre-sets each valid item's ``hash`` with :func:`hashing.feature_hash`
and then calls sglang 0.5.5's real ``MultimodalInputs.from_dict``: items are filtered by
``is_valid``, ``set_pad_value`` finds the hash already set, and the optional fields are
copied by sglang's own code. The result is therefore what every scheduler rank would
have built, with one hashing pass over each feature's own buffer.

:func:`pack` moves every tensor of the result into one segment and leaves descriptors in
their place (see ``transport.carrier``). Both run in a worker thread, off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sglang_mmpre.tokenizer_side.hashing import feature_hash
from sglang_mmpre.transport.carrier import MaterializedMultimodalInputs, walk_tensors
from sglang_mmpre.transport.descriptors import TensorDescriptor, dtype_name, table_digest
from sglang_mmpre.transport.segment import ALIGN, SegmentWriter

__all__ = ["materialize", "plan", "pack", "PackPlan", "shm_eligible"]


def materialize(mm_dict: dict) -> Any:
    """Return what ``MultimodalInputs.from_dict(mm_dict)`` returns, hashing faster.

    Like ``from_dict``, it sets ``hash`` and ``pad_value`` on the dict's item objects.
    """
    from sglang.srt.managers.schedule_batch import MultimodalDataItem, MultimodalInputs

    items = mm_dict.get("mm_items") if isinstance(mm_dict, dict) else None
    if isinstance(items, list):
        for item in items:
            if isinstance(item, MultimodalDataItem) and item.is_valid() and item.hash is None:
                value = item.feature if item.feature is not None else item.precomputed_embeddings
                if value is not None:
                    item.hash = feature_hash(value)
    return MultimodalInputs.from_dict(mm_dict)


def shm_eligible(leaf: Any) -> bool:
    """Whether ``leaf`` can travel through shared memory (a CPU tensor or a numeric
    array of a supported dtype)."""
    if isinstance(leaf, torch.Tensor):
        return leaf.device.type == "cpu" and dtype_name(leaf) is not None and not leaf.is_sparse
    if isinstance(leaf, np.ndarray):
        return dtype_name(leaf) is not None
    return False


def _nbytes(leaf: Any) -> int:
    return leaf.nbytes if isinstance(leaf, np.ndarray) else leaf.numel() * leaf.element_size()


@dataclass(frozen=True)
class PackPlan:
    """Where each shm-eligible tensor of one request goes in the payload (walk order)."""

    leaves: tuple[tuple[Any, int], ...]
    payload_nbytes: int


def plan(inputs: Any) -> PackPlan:
    """Lay out ``inputs``' shm-eligible tensors, 64-byte aligned, without copying."""
    leaves: list[tuple[Any, int]] = []
    total = 0

    def visit(leaf, _hash):
        nonlocal total
        if shm_eligible(leaf):
            total = (total + ALIGN - 1) // ALIGN * ALIGN
            leaves.append((leaf, total))
            total += _nbytes(leaf)
        return leaf

    walk_tensors(inputs, visit)
    return PackPlan(tuple(leaves), total)


def _copy_into(payload: memoryview, leaf: Any, offset: int) -> None:
    n = _nbytes(leaf)
    if not n:
        return
    if isinstance(leaf, torch.Tensor):
        dst = torch.frombuffer(payload, dtype=torch.uint8, count=n, offset=offset)
        dst.view(leaf.dtype).view(leaf.shape).copy_(leaf.detach())
    else:
        dst = np.frombuffer(payload, dtype=np.uint8, count=n, offset=offset)
        np.copyto(dst.view(leaf.dtype).reshape(leaf.shape), leaf)


def pack(inputs: Any, layout: PackPlan, shm_dir: str, consumers: int) -> MaterializedMultimodalInputs:
    """Write ``inputs``' tensors into a new segment laid out by ``layout`` (from
    :func:`plan`, which must hold at least one tensor) and replace them by descriptors.

    The replacement is in place, in the item objects (and their ``model_specific_data``)
    that the processor returned for this request, as ``from_dict`` also mutates them.
    Raises ``SegmentAllocationError`` (nothing created, ``inputs`` untouched) when the
    segment can't be created.
    """
    leaves, total = layout.leaves, layout.payload_nbytes
    writer = SegmentWriter(shm_dir, total)
    try:
        payload = writer.payload
        for leaf, offset in leaves:
            _copy_into(payload, leaf, offset)
        del payload
        offsets = {id(leaf): offset for leaf, offset in leaves}
        table: list[TensorDescriptor] = []

        def describe(leaf, item_hash):
            offset = offsets.get(id(leaf))
            if offset is None:
                return leaf
            kind = "torch" if isinstance(leaf, torch.Tensor) else "numpy"
            desc = TensorDescriptor(kind, dtype_name(leaf), tuple(leaf.shape), offset,
                                    _nbytes(leaf), item_hash)
            table.append(desc)
            return desc

        walk_tensors(inputs, describe)
        digest = table_digest(writer.descriptor(consumers), table)
        segment = writer.seal(digest, consumers)
    except BaseException:
        writer.abandon()
        raise
    return MaterializedMultimodalInputs(inputs, segment, writer)
