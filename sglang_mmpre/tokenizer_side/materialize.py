"""Materialize a processor's output dict into sglang's own ``MultimodalInputs``, with its
tensors in slots of the warm region (:func:`materialize_into_region`) or, as a fallback,
packed into a shared-memory segment (:func:`pack`).

:func:`materialize` pre-sets each valid item's ``hash`` with :func:`hashing.feature_hash`
and then calls sglang 0.5.5's real ``MultimodalInputs.from_dict``: items are filtered by
``is_valid``, ``set_pad_value`` finds the hash already set, and the optional fields are
copied by sglang's own code. The result is therefore what every scheduler rank would
have built, with one hashing pass over each feature's own buffer.

:func:`pack` moves every tensor of the result into one segment and leaves descriptors in
their place (see ``transport.carrier``). :func:`materialize_into_region` hashes each
feature while copying it into its slot (one pass), and copies nothing for content already
in a slot. All of them run in a worker thread, off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sglang_mmpre.tokenizer_side.hashing import digest_to_hash, feature_hash
from sglang_mmpre.tokenizer_side.slots import RegionFull, RegionSlots, SlotHold
from sglang_mmpre.transport.carrier import MaterializedMultimodalInputs, walk_tensors
from sglang_mmpre.transport.descriptors import (
    RegionDescriptor,
    TensorDescriptor,
    describe,
    dtype_name,
    slot_digest,
    table_digest,
)
from sglang_mmpre.transport.segment import ALIGN, SegmentWriter

__all__ = ["materialize", "materialize_into_region", "plan", "pack", "PackPlan", "shm_eligible"]


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


def materialize_into_region(mm_dict: dict, slots: RegionSlots, consumers: int) -> MaterializedMultimodalInputs:
    """``materialize(mm_dict)`` with every tensor in slots of ``slots``' region.

    Each valid item's hashed feature goes into a slot of its own, hashed as it is copied, or
    into nothing new when a slot already holds equal content (``RegionSlots.place``); the
    request's other non-empty tensors go into one more slot; empty ones stay inline.
    Raises :class:`RegionFull` with no reference held and no tensor replaced (item hashes
    already computed stay set, so ``materialize`` does not hash them again).
    """
    from sglang.srt.managers.schedule_batch import MultimodalDataItem

    placements = []
    try:
        items = mm_dict.get("mm_items") if isinstance(mm_dict, dict) else None
        for item in items if isinstance(items, list) else []:
            if isinstance(item, MultimodalDataItem) and item.is_valid() and item.hash is None:
                value = item.feature if item.feature is not None else item.precomputed_embeddings
                try:
                    placed = slots.place(value) if value is not None else None
                except RegionFull as full:
                    if full.digest is not None:
                        item.hash = digest_to_hash(full.digest)
                    raise
                if placed is not None:
                    item.hash = digest_to_hash(placed.digest)
                    placements.append(placed)
        inputs = materialize(mm_dict)
        in_slot = {id(leaf): (off, digest_to_hash(p.digest))
                   for p in placements for leaf, off in zip(p.leaves, p.offsets)}
        rest: dict[int, tuple[Any, int]] = {}
        total = 0

        def is_placed(leaf, item_hash) -> bool:
            found = in_slot.get(id(leaf))
            return found is not None and item_hash == found[1]

        def visit(leaf, item_hash):
            nonlocal total
            if not is_placed(leaf, item_hash) and shm_eligible(leaf) and _nbytes(leaf) \
                    and id(leaf) not in rest:
                total = (total + ALIGN - 1) // ALIGN * ALIGN
                rest[id(leaf)] = (leaf, total)
                total += _nbytes(leaf)
            return leaf

        walk_tensors(inputs, visit)
        rest_slot = slots.allocate(total) if total else None
    except BaseException:
        slots.adjust([p.slot.ref() for p in placements], -1)
        raise
    refs = list(dict.fromkeys(p.slot.ref() for p in placements))
    extra = [p.slot.ref() for p in placements]
    for ref in refs:
        extra.remove(ref)
    hold = SlotHold(slots, refs + ([rest_slot.ref()] if rest_slot else []),
                    sum(p.written for p in placements) + total)
    try:
        slots.adjust(extra, -1)  # one creator reference per slot, however many items share it
        rest_tensors: list[TensorDescriptor] = []
        if rest_slot is not None:
            dst = slots.view(rest_slot)
            for leaf, offset in rest.values():
                _copy_into(dst, leaf, offset)

        def to_descriptor(leaf, item_hash):
            if is_placed(leaf, item_hash):
                return describe(leaf, in_slot[id(leaf)][0], item_hash)
            if id(leaf) in rest and rest_slot is not None:
                desc = describe(leaf, rest_slot.offset + rest[id(leaf)][1], item_hash)
                rest_tensors.append(desc)
                return desc
            return leaf

        walk_tensors(inputs, to_descriptor)
        if rest_slot is not None:
            slots.publish(rest_slot, slot_digest(rest_slot.ref(), list(dict.fromkeys(rest_tensors))))
    except BaseException:
        hold.release()
        raise
    region = RegionDescriptor(slots.name, slots.nonce, consumers, tuple(hold.refs))
    return MaterializedMultimodalInputs(inputs, region, hold)
