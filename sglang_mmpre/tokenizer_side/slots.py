"""The owner's side of the warm region: slots allocated, filled in one pass, reused.

:class:`RegionSlots` belongs to one TokenizerManager process (its ``TokenizerSide``). It
owns the region file (``transport/region.py``, byte layout and slot table there), carves
page-aligned slots out of its chunks (first fit; a chunk is added, within the cap, when
nothing fits), and recycles a slot once its refcount is 0 (reclaimed lazily, when space or
table entries run out).

- :meth:`RegionSlots.place` puts one item's hashed feature into a slot in a single pass
  over its bytes: 1 MiB at a time, sha256 and copy while the chunk is hot in cache. Its
  digest is sglang's item hash (``hashing.digest_to_hash``). An item whose first MiB and
  then whole sha256 equal those of a slot in the region reuses that slot: its bytes are
  hashed, never copied (repeated images, multi-turn chats, parallel sampling).
- :meth:`RegionSlots.allocate` gives a slot for a request's other tensors.
- :class:`SlotHold` is the creator reference of one request on its slots; it has the
  interface of ``SegmentWriter`` (``add_consumers`` before each send, ``release`` once),
  so ``TokenizerSide.send`` and the request scope treat both alike.

Thread-safety: ``place``/``allocate`` run in the materialization worker threads; one lock
guards the allocator, and every table write goes through ``SlotTable.locked``.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from sglang_mmpre.errors import MmpreError, SegmentAllocationError
from sglang_mmpre.tokenizer_side.hashing import (
    digest_to_hash,
    fast_path_leaves,
    remember_digests,
    remembered_digests,
)
from sglang_mmpre.transport.descriptors import SlotRef, describe, dtype_name, slot_digest
from sglang_mmpre.transport.region import RegionFile, SlotEntry, extent

__all__ = ["RegionFull", "RegionSlots", "Placement", "SlotHold", "HASH_CHUNK"]

HASH_CHUNK = 1 << 20  # bytes hashed and copied per step
_ALIGN = 64


class RegionFull(MmpreError):
    """No slot fits (after reclaiming, and growing within the cap): take a segment.

    ``digest`` is the sha256 of the feature being placed when it was already hashed.
    """

    def __init__(self, digest: Optional[bytes] = None) -> None:
        super().__init__("the shared-memory region is full")
        self.digest = digest


@dataclass
class _Slot:
    """Owner-side record of a slot in use (its entry in the table is the shared truth)."""

    index: int
    generation: int
    offset: int
    nbytes: int
    content: Optional[bytes] = None  # sha256 of the bytes, for reuse (feature slots)
    prefix_key: Optional[tuple] = None

    def ref(self) -> SlotRef:
        return SlotRef(self.index, self.generation, self.offset, self.nbytes)


@dataclass(frozen=True)
class Placement:
    """Where one item's feature leaves are: its slot, each leaf's file offset, the sha256."""

    slot: _Slot
    leaves: tuple
    offsets: tuple[int, ...]
    digest: bytes
    written: int


def _byte_view(leaf: Any) -> np.ndarray:
    if isinstance(leaf, torch.Tensor):
        t = leaf.detach()
        return (t if t.is_contiguous() else t.contiguous()).reshape(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(leaf).reshape(-1).view(np.uint8)


def _fusable(value: Any) -> Optional[list]:
    """The leaves of a feature whose sglang hash is sha256 over their bytes in order, and
    that can travel as they are (not bfloat16: sglang hashes it widened), else None."""
    leaves = fast_path_leaves(value)
    if not leaves or any(dtype_name(t) is None for t in leaves):
        return None
    if isinstance(leaves[0], torch.Tensor) and leaves[0].dtype == torch.bfloat16:
        return None
    return leaves


class SlotHold:
    """The creator reference one request holds on each of its slots.

    ``payload_nbytes`` is 0: the region counts against the cap as a whole, when it grows.
    ``written_nbytes`` is what this request copied into shared memory.
    """

    payload_nbytes = 0

    def __init__(self, slots: "RegionSlots", refs: list[SlotRef], written: int) -> None:
        self._slots = slots
        self.refs = refs
        self.written_nbytes = written
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def add_consumers(self, n: int) -> None:
        """Count ``n`` more consumers on every slot; call before each send."""
        if self._released:
            raise MmpreError("slots released by their creator can't be sent again")
        self._slots.adjust(self.refs, n)

    def release(self) -> None:
        """Drop the creator reference (idempotent)."""
        if not self._released:
            self._released = True
            self._slots.adjust(self.refs, -1)

    abandon = release


class RegionSlots:
    """Slots of this process's region; see the module docstring.

    ``reserve(nbytes)`` asks the owner's cap for ``nbytes`` more (growth); ``dedup``
    switches content reuse on.
    """

    def __init__(self, shm_dir: str, chunk_bytes: int, slot_count: int,
                 reserve: Callable[[int], bool], dedup: bool = True) -> None:
        self.file = RegionFile(shm_dir, slot_count, chunk_bytes)
        self.table = self.file.table
        self._reserve = reserve
        self._dedup = dedup
        self._lock = threading.Lock()
        # Monotonic from a random start: a slot reference from another region (another
        # server's, or an earlier run's) matches no generation here.
        self._generation = secrets.randbits(62)
        self._live: dict[int, _Slot] = {}
        self._free_index = list(range(slot_count - 1, -1, -1))
        self._free: list[tuple[int, int]] = []  # (start, end) file offsets, sorted
        self._by_prefix: dict[tuple, _Slot] = {}
        self._add_chunk_extent()

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def nonce(self) -> bytes:
        return self.file.nonce

    @property
    def size(self) -> int:
        return self.file.size

    def _add_chunk_extent(self) -> None:
        start = self.file.data_offset + self.file.size - self.file.chunk_bytes
        self._free.append((start, start + self.file.chunk_bytes))

    # -- allocation (under self._lock) -----------------------------------------------------
    def _fit(self, need: int) -> Optional[int]:
        for i, (start, end) in enumerate(self._free):
            if end - start >= need:
                self._free[i] = (start + need, end)
                if start + need == end:
                    del self._free[i]
                return start
        return None

    def _give_back(self, start: int, end: int) -> None:
        self._free.append((start, end))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        chunk = self.file.chunk_bytes
        base = self.file.data_offset
        for s, e in self._free:  # merge neighbours, never across a chunk boundary
            if merged and merged[-1][1] == s and (s - base) % chunk:
                merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        self._free = merged

    def _reclaim(self) -> None:
        """Recycle every slot no one references any more (refcount 0 is final for ranks)."""
        for index, slot in list(self._live.items()):
            if self.table.refcount(index) == 0:
                del self._live[index]
                if slot.prefix_key is not None and self._by_prefix.get(slot.prefix_key) is slot:
                    del self._by_prefix[slot.prefix_key]
                self._free_index.append(index)
                self._give_back(slot.offset, slot.offset + extent(slot.nbytes))

    def _allocate_locked(self, nbytes: int) -> _Slot:
        need = extent(nbytes)
        offset = self._fit(need) if self._free_index else None
        if offset is None:
            self._reclaim()
            offset = self._fit(need) if self._free_index else None
        while offset is None and self._free_index and need <= self.file.chunk_bytes \
                and self._reserve(self.file.chunk_bytes):
            try:
                self.file.grow()
            except (SegmentAllocationError, OSError):
                self._reserve(-self.file.chunk_bytes)
                raise RegionFull() from None
            self._add_chunk_extent()
            offset = self._fit(need)
        if offset is None:
            raise RegionFull()
        self._generation += 1
        slot = _Slot(self._free_index.pop(), self._generation, offset, nbytes)
        with self.table.locked():
            self.table.write(slot.index, SlotEntry(slot.generation, 1, offset, nbytes, bytes(16)))
        self._live[slot.index] = slot
        return slot

    def allocate(self, nbytes: int) -> _Slot:
        """A new slot of ``nbytes`` holding one creator reference; raises RegionFull."""
        with self._lock:
            return self._allocate_locked(nbytes)

    def _take(self, slot: _Slot) -> bool:
        """One more creator reference on a slot kept for its content (under self._lock)."""
        if self._live.get(slot.index) is not slot:
            return False
        with self.table.locked():
            entry = self.table.read(slot.index)
            if entry.refcount > 0:
                self.table.add(slot.index, 1)
            else:  # every reference is gone but the bytes are intact: a new generation
                self._generation += 1
                slot.generation = self._generation
                self.table.write(slot.index, entry._replace(generation=slot.generation, refcount=1))
        return True

    # -- one pass over the bytes ----------------------------------------------------------
    def view(self, slot: _Slot) -> np.ndarray:
        """Writable ``uint8`` array over ``slot``'s payload (owner only)."""
        chunk, inside = self.file.chunk_of(slot.offset)
        return np.frombuffer(chunk, dtype=np.uint8, count=slot.nbytes, offset=inside)

    def place(self, value: Any) -> Optional[Placement]:
        """Put a feature in a slot, hashing as it copies; reuse a slot of equal content.

        Returns None when the feature can't take this path (then sglang's hash and the
        request's other slot apply). Raises :class:`RegionFull` (with the digest).
        """
        leaves = _fusable(value)
        if leaves is None:
            return None
        views = [_byte_view(t) for t in leaves]
        rel, total = [], 0
        for v in views:
            total = (total + _ALIGN - 1) // _ALIGN * _ALIGN
            rel.append(total)
            total += v.nbytes
        if total == 0:
            return None
        h = hashlib.sha256()
        first = views[0][:HASH_CHUNK]
        known = remembered_digests(leaves[0]) if len(leaves) == 1 and self._dedup else None
        if known is None:
            h.update(first)
        key = None
        if self._dedup:
            layout = tuple((type(t).__name__, dtype_name(t), tuple(t.shape)) for t in leaves)
            key = (layout, known[0] if known is not None else h.copy().digest())
        candidate = self._by_prefix.get(key) if key is not None else None
        if known is not None or candidate is not None:
            if known is not None:  # Note [remembered digests] in hashing.py: no pass to hash
                digest = known[1]
            else:
                _hash_rest(h, views, len(first))
                digest = h.digest()
                if len(leaves) == 1:
                    remember_digests(leaves[0], key[1], digest)
            with self._lock:
                if candidate is not None and candidate.content == digest \
                        and self._take(candidate):
                    offsets = tuple(candidate.offset + r for r in rel)
                    return Placement(candidate, tuple(leaves), offsets, digest, 0)
            try:
                slot = self.allocate(total)
            except RegionFull:
                raise RegionFull(digest) from None
            _copy_all(views, self.view(slot), rel)
        else:
            try:
                slot = self.allocate(total)
            except RegionFull:
                _hash_rest(h, views, len(first))
                raise RegionFull(h.digest()) from None
            _copy_and_hash(h, views, self.view(slot), rel, len(first))
            digest = h.digest()
        if known is None and key is not None and len(leaves) == 1:
            remember_digests(leaves[0], key[1], digest)
        offsets = tuple(slot.offset + r for r in rel)
        item_hash = digest_to_hash(digest)
        tensors = [describe(t, o, item_hash) for t, o in zip(leaves, offsets)]
        self.publish(slot, slot_digest(slot.ref(), list(dict.fromkeys(tensors))))
        with self._lock:
            slot.content, slot.prefix_key = digest, key
            if key is not None:
                self._by_prefix[key] = slot
        return Placement(slot, tuple(leaves), offsets, digest, total)

    def publish(self, slot: _Slot, digest: bytes) -> None:
        """Write the slot's table digest (before any send that names it)."""
        with self.table.locked():
            entry = self.table.read(slot.index)
            self.table.write(slot.index, entry._replace(digest=digest))

    def adjust(self, refs: list[SlotRef], delta: int) -> None:
        if self.file.closed:
            return  # shut down: the region is gone with its references
        with self.table.locked():
            for ref in refs:
                self.table.add(ref.index, delta)

    def live_slots(self) -> int:
        """Slots with references left (tests and measurements)."""
        with self._lock:
            return sum(1 for i in self._live if self.table.refcount(i) > 0)

    def close(self) -> None:
        """Unmap and unlink the region (at shutdown)."""
        self.file.close()


def _hash_rest(h: "hashlib._Hash", views: list, skip: int) -> None:
    for i, v in enumerate(views):
        for a in range(skip if i == 0 else 0, v.nbytes, HASH_CHUNK):
            h.update(v[a:a + HASH_CHUNK])


def _copy_all(views: list, dst: np.ndarray, rel: list[int]) -> None:
    for v, r in zip(views, rel):
        dst[r:r + v.nbytes] = v


def _copy_and_hash(h: "hashlib._Hash", views: list, dst: np.ndarray, rel: list[int],
                   hashed: int) -> None:
    """Copy every view into ``dst`` at ``rel``, hashing each 1 MiB just before copying it
    (the first ``hashed`` bytes of the first view are already in ``h``)."""
    for i, (v, r) in enumerate(zip(views, rel)):
        start = 0
        if i == 0 and hashed:
            dst[r:r + hashed] = v[:hashed]
            start = hashed
        for a in range(start, v.nbytes, HASH_CHUNK):
            b = min(a + HASH_CHUNK, v.nbytes)
            h.update(v[a:b])
            dst[r + a:r + b] = v[a:b]
