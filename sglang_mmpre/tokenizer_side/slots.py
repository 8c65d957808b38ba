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
- :meth:`RegionSlots.kept_view` hands out a copy-on-write tensor over a slot's bytes that
  ``place`` recognizes as already in that slot (Note [kept slots]).

Thread-safety: ``place``/``allocate`` run in the materialization worker threads; one lock
guards the allocator, and every table write goes through ``SlotTable.locked``.

Note [kept slots]
-----------------
A slot whose refcount reached 0 keeps its bytes until the owner reuses its space: it
stays in ``_live``, and ``_take`` revives it under a new generation (a rank's reference
from before is refused, Note [slot isolation] in ``scheduler_side/region_cache.py``).
The processor cache (``processor_cache.py``) is built on that, so that the slots are the
one copy of a cached image's rows:

- ``_live`` is in least-recently-used order (an allocation or a ``_take`` moves a slot to
  the end). With ``keep_bytes`` 0 (no cache) an allocation that does not fit frees every
  unreferenced slot, then grows the region. With ``keep_bytes`` set, every allocation
  first frees the unreferenced slots that hold no feature (a request's other tensors,
  which nothing finds again: they would fill the slot table) and the least recently used
  unreferenced feature slots beyond ``keep_bytes``; one that
  does not fit grows the region within the cap, and only when it can't frees
  unreferenced slots, least recently used first, until it fits (the cache shrinks before
  a request falls back to a segment). A slot a request or a rank references is never
  freed, so the cache can't free bytes in use; and it holds no count of its own, so a
  worker killed leaves no reference behind (Note [one ledger per worker] in
  ``pool.py``).
- :meth:`RegionSlots.kept_view` maps a kept slot's bytes ``MAP_PRIVATE`` (copy-on-write:
  a write through the tensor never reaches the slot) and *pins* the slot while the
  tensor or any view of it lives: a pinned slot is not freed, whatever its refcount. A
  pin is this process's own count (``_Slot.pins``), lost with the process. Its release
  runs in a finalizer, which may run in any thread, even one holding the lock: it only
  appends to ``_unpinned``, which the allocator drains under the lock.
- :meth:`RegionSlots.place` given such a tensor of a whole slot, unwritten since
  (``_version``), takes the slot again with no pass over its bytes: the item hash is the
  slot's stored sha256. ``observer.placed(leaf, slot)`` tells the cache where a feature
  went; ``observer.reclaimed(slot)`` that a slot's bytes are gone.
"""

from __future__ import annotations

import collections
import hashlib
import mmap
import secrets
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch

from sglang_mmpre.errors import MmpreError, SegmentAllocationError
from sglang_mmpre.tokenizer_side.hashing import digest_to_hash, fast_path_leaves
from sglang_mmpre.transport.descriptors import SlotRef, describe, dtype_name, slot_digest
from sglang_mmpre.transport.region import RegionFile, SlotEntry, extent

__all__ = ["RegionFull", "RegionSlots", "Placement", "SlotHold", "SlotObserver", "HASH_CHUNK"]

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
    pins: int = 0  # kept views alive (Note [kept slots])

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


class SlotObserver(Protocol):
    """What the processor cache learns from a region (Note [kept slots])."""

    def placed(self, leaf: Any, slot: "_Slot") -> None:
        """``leaf`` (a one-tensor feature) is in ``slot``: copied there, or equal to it."""

    def reclaimed(self, slot: "_Slot") -> None:
        """``slot``'s bytes are gone (its space is reused)."""


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
    switches content reuse on. ``keep_bytes`` and ``observer`` are the processor cache's
    (Note [kept slots]).
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
        self._live: "collections.OrderedDict[int, _Slot]" = collections.OrderedDict()
        self._free_index = list(range(slot_count - 1, -1, -1))
        self._free: list[tuple[int, int]] = []  # (start, end) file offsets, sorted
        self._by_prefix: dict[tuple, _Slot] = {}
        self._unpinned: "collections.deque[_Slot]" = collections.deque()
        self._views: dict[int, tuple["weakref.ref", int, _Slot]] = {}  # id(tensor) ->
        self._freed: list[_Slot] = []  # reclaimed, not yet told to the observer
        self.keep_bytes = 0
        self.observer: Optional[SlotObserver] = None
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
        if not self._free_index:
            return None
        for i, (start, end) in enumerate(self._free):
            if end - start >= need:
                self._free[i] = (start + need, end)
                if start + need == end:
                    del self._free[i]
                return start
        return None

    def _fits(self, need: int) -> bool:
        return bool(self._free_index) and any(e - s >= need for s, e in self._free)

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

    def _unreferenced(self) -> list[tuple[int, _Slot]]:
        """Slots no one references or pins, least recently used first (refcount 0 is
        final for ranks)."""
        while self._unpinned:
            self._unpinned.popleft().pins -= 1
        return [(i, slot) for i, slot in self._live.items()
                if not slot.pins and self.table.refcount(i) == 0]

    def _free_slot(self, index: int, slot: _Slot) -> None:
        del self._live[index]
        if slot.prefix_key is not None and self._by_prefix.get(slot.prefix_key) is slot:
            del self._by_prefix[slot.prefix_key]
        self._free_index.append(index)
        self._give_back(slot.offset, slot.offset + extent(slot.nbytes))
        if self.observer is not None:
            self._freed.append(slot)

    def _reclaim(self, need: Optional[int] = None) -> None:
        """Free unreferenced slots, least recently used first: all of them, or (``need``)
        until ``need`` bytes fit."""
        for index, slot in self._unreferenced():
            self._free_slot(index, slot)
            if need is not None and self._fits(need):
                return

    def _trim(self) -> None:
        """Free every unreferenced slot kept for no content (a request's other tensors:
        nothing finds them again), and the least recently used unreferenced ones beyond
        ``keep_bytes``."""
        unreferenced = self._unreferenced()
        over = sum(extent(slot.nbytes) for _, slot in unreferenced
                   if slot.content is not None) - self.keep_bytes
        for index, slot in unreferenced:
            if slot.content is None:
                self._free_slot(index, slot)
            elif over > 0:
                self._free_slot(index, slot)
                over -= extent(slot.nbytes)

    def _grow(self, need: int) -> bool:
        """Add a chunk within the cap, if ``need`` fits in one; False if it can't."""
        chunk = self.file.chunk_bytes
        if not self._free_index or need > chunk or not self._reserve(chunk):
            return False
        try:
            self.file.grow()
        except (SegmentAllocationError, OSError):
            self._reserve(-chunk)
            raise RegionFull() from None
        self._add_chunk_extent()
        return True

    def _allocate_locked(self, nbytes: int) -> _Slot:
        need = extent(nbytes)
        if self.keep_bytes:
            self._trim()
        offset = self._fit(need)
        if offset is None and not self.keep_bytes:
            self._reclaim()
            offset = self._fit(need)
        while offset is None and self._grow(need):
            offset = self._fit(need)
        if offset is None and self.keep_bytes:
            self._reclaim(need)  # the cache shrinks before the request takes a segment
            offset = self._fit(need)
        if offset is None:
            raise RegionFull()
        self._generation += 1
        slot = _Slot(self._free_index.pop(), self._generation, offset, nbytes)
        with self.table.locked():
            self.table.write(slot.index, SlotEntry(slot.generation, 1, offset, nbytes, bytes(16)))
        self._live[slot.index] = slot
        return slot

    def _tell_freed(self) -> None:
        """Tell the observer of the slots just freed, in order (outside self._lock)."""
        with self._lock:
            freed, self._freed = self._freed, []
        for slot in freed if self.observer is not None else ():
            self.observer.reclaimed(slot)

    def allocate(self, nbytes: int) -> _Slot:
        """A new slot of ``nbytes`` holding one creator reference; raises RegionFull."""
        try:
            with self._lock:
                return self._allocate_locked(nbytes)
        finally:
            self._tell_freed()

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
        self._live.move_to_end(slot.index)
        return True

    def kept_view(self, slot: _Slot, start: int, nbytes: int, dtype: torch.dtype,
                  shape: tuple) -> Optional[torch.Tensor]:
        """A tensor over bytes ``start:start+nbytes`` of ``slot``, or None if its space
        was reused (or it can't be mapped): copy-on-write, and the slot pinned while it
        lives (Note [kept slots]). A view of the whole slot is one ``place`` takes again
        without a copy."""
        with self._lock:
            if self._live.get(slot.index) is not slot or start + nbytes > slot.nbytes:
                return None
            slot.pins += 1
            self._live.move_to_end(slot.index)
        try:
            mapping = mmap.mmap(self.file.fd, extent(slot.nbytes), flags=mmap.MAP_PRIVATE,
                                offset=slot.offset)
            array = np.frombuffer(mapping, dtype=np.uint8, count=nbytes, offset=start)
        except (OSError, ValueError):  # closed at shutdown, or out of address space
            self._unpinned.append(slot)
            return None
        weakref.finalize(array, self._unpinned.append, slot)
        tensor = torch.from_numpy(array).view(dtype).view(shape)
        if start == 0 and nbytes == slot.nbytes and slot.content is not None:
            key = id(tensor)

            def forget(ref: "weakref.ref", key: int = key) -> None:
                if self._views.get(key, (None,))[0] is ref:
                    self._views.pop(key, None)

            self._views[key] = (weakref.ref(tensor, forget), tensor._version, slot)
        return tensor

    def _kept_slot(self, leaf: Any) -> Optional[_Slot]:
        """The slot ``leaf`` is a whole, unwritten kept view of, if it is one."""
        found = self._views.get(id(leaf))
        if found is None or found[0]() is not leaf or leaf._version != found[1]:
            return None
        return found[2]

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
        placed = self._place(leaves)
        if placed is not None and self.observer is not None and len(leaves) == 1:
            self.observer.placed(leaves[0], placed.slot)
        return placed

    def _place(self, leaves: list) -> Optional[Placement]:
        views = [_byte_view(t) for t in leaves]
        rel, total = [], 0
        for v in views:
            total = (total + _ALIGN - 1) // _ALIGN * _ALIGN
            rel.append(total)
            total += v.nbytes
        if total == 0:
            return None
        kept = self._kept_slot(leaves[0]) if len(leaves) == 1 else None
        if kept is not None:  # Note [kept slots]: no pass over the bytes
            with self._lock:
                if self._take(kept):
                    return Placement(kept, tuple(leaves), (kept.offset,), kept.content, 0)
        h = hashlib.sha256()
        first = views[0][:HASH_CHUNK]
        h.update(first)
        key = None
        if self._dedup:
            layout = tuple((type(t).__name__, dtype_name(t), tuple(t.shape)) for t in leaves)
            key = (layout, h.copy().digest())
        candidate = self._by_prefix.get(key) if key is not None else None
        if candidate is not None:
            _hash_rest(h, views, len(first))
            digest = h.digest()
            with self._lock:
                if candidate.content == digest and self._take(candidate):
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
