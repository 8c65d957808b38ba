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

from typing import Any, Optional

import numpy as np
import torch

from sglang_mmpre.tokenizer_side.hashing import feature_hash
from sglang_mmpre.transport.carrier import MaterializedMultimodalInputs, walk_tensors
from sglang_mmpre.transport.descriptors import TensorDescriptor, dtype_name, table_digest
from sglang_mmpre.transport.segment import ALIGN, SegmentWriter

__all__ = ["materialize", "pack", "shm_eligible"]


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


def _plan(inputs: Any) -> tuple[list, int]:
    """Leaves in walk order with their payload offsets, and the payload size."""
    leaves: list[tuple[Any, int]] = []
    total = 0

    def visit(leaf, _hash):
        nonlocal total
        if shm_eligible(leaf):
            total = (total + ALIGN - 1) // ALIGN * ALIGN
            leaves.append((leaf, total))
            total += leaf.nbytes if isinstance(leaf, np.ndarray) else leaf.numel() * leaf.element_size()
        return leaf

    walk_tensors(inputs, visit)
    return leaves, total


def _copy_into(payload: memoryview, leaf: Any, offset: int) -> None:
    if isinstance(leaf, torch.Tensor):
        n = leaf.numel() * leaf.element_size()
        if n:
            dst = torch.frombuffer(payload, dtype=torch.uint8, count=n, offset=offset)
            dst.view(leaf.dtype).view(leaf.shape).copy_(leaf.detach())
    else:
        if leaf.nbytes:
            dst = np.frombuffer(payload, dtype=np.uint8, count=leaf.nbytes, offset=offset)
            np.copyto(dst.view(leaf.dtype).reshape(leaf.shape), leaf)


def pack_size(inputs: Any) -> int:
    """Payload bytes that :func:`pack` would need for ``inputs``."""
    return _plan(inputs)[1]


def pack(inputs: Any, shm_dir: str, consumers: int) -> Optional[MaterializedMultimodalInputs]:
    """Write ``inputs``' tensors into a new segment and replace them by descriptors.

    The replacement is in place, in the item objects (and their ``model_specific_data``)
    that the processor returned for this request, as ``from_dict`` also mutates them.

    Returns None when ``inputs`` holds no tensor that can travel. Raises
    ``SegmentAllocationError`` (nothing created, ``inputs`` untouched) when the segment
    can't be created.
    """
    leaves, total = _plan(inputs)
    if not leaves:
        return None
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
            nbytes = leaf.nbytes if kind == "numpy" else leaf.numel() * leaf.element_size()
            desc = TensorDescriptor(kind, dtype_name(leaf), tuple(leaf.shape), offset, nbytes,
                                    item_hash)
            table.append(desc)
            return desc

        walk_tensors(inputs, describe)
        digest = table_digest(writer.descriptor(consumers), table)
        segment = writer.seal(digest, consumers)
    except BaseException:
        writer.abandon()
        raise
    return MaterializedMultimodalInputs(inputs, segment, writer)
