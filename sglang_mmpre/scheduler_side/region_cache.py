"""Regions as a scheduler rank sees them: mapped once and kept; slots leased per request.

Like torch's receiver-side cache of CUDA IPC handles (``torch/multiprocessing/reductions.py``),
each rank process opens a region the first time a request names it and keeps the file
descriptor and the mappings for the life of the process, keyed by the region's name and
checked against its nonce. Resolving a request is then a table lookup plus views: no
``open``, ``mmap`` or ``munmap`` per request. A chunk the owner added later is mapped the
first time a slot in it is named (once per chunk and process).

Owner / writer / readers / who frees, per rank process
------------------------------------------------------
- the table is mapped ``MAP_SHARED``: this rank writes only a slot's refcount, under the
  region lock (``SlotTable.locked``);
- the chunks are mapped ``MAP_PRIVATE``: every view this rank builds reads the owner's
  bytes, and any write through a view stays in this process (copy-on-write);
- a *lease* ties the ``uint8`` arrays over a request's slots (one per slot) that every
  tensor or array view of the request keeps alive (``torch.frombuffer`` holds the object
  it was given; numpy views hold their base). When the last view is freed, the lease's
  finalizer queues the release, and the releaser thread drops this rank's pages of each
  slot it no longer leases, then its references.

Note [slot isolation]
---------------------
A slot is refilled by its owner only after its refcount reached 0, and each rank drops its
reference only once every tensor built from the slot is gone (the lease finalizer), after
``madvise(MADV_DONTNEED)`` on the slot's pages in this rank's private mapping, done when
the last lease of the slot on this rank goes. So when new bytes are written into a slot:
(1) no tensor of an earlier request views it on any rank; (2) no rank holds private
copy-on-write pages of it (an in-place write by sglang would have made one; it is
discarded, and the next read sees the file again). A stale reference (the slot's
generation changed, or its refcount is 0) is refused before any view is built.
Two live requests that share one slot on one rank (repeated content, parallel sampling)
share this rank's pages of it: sglang 0.5.5 writes into no feature tensor (no in-place op
on ``feature``/``pixel_values`` in ``managers/`` or ``models/``), and a write on one rank
still never reaches another rank or a later occupant.

Releases run on one daemon thread per process: a finalizer may run anywhere, including
inside a section holding a lock it would need, so it only enqueues (``SimpleQueue`` is
safe there). :func:`flush` waits until everything enqueued so far is released.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import queue
import stat
import threading
import time
import weakref
from typing import Optional

import numpy as np

from sglang_mmpre.errors import MultimodalTransportError, SegmentUnreachableError
from sglang_mmpre.transport.descriptors import SlotRef
from sglang_mmpre.transport.liveness import OWNED_NAME_RE
from sglang_mmpre.transport.region import (
    HEADER_SIZE,
    PAGE,
    REGION_HEADER,
    REGION_MAGIC,
    REGION_VERSION,
    SlotTable,
    data_offset,
    is_retired,
    extent,
)

__all__ = ["AttachedRegion", "attach", "unpin", "attached_names", "flush", "leases_held",
           "open_region", "release_cpu_seconds", "start_releaser"]

logger = logging.getLogger(__name__)

_OPEN_FLAGS = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class AttachedRegion:
    """One region mapped by this rank process (kept until the process exits)."""

    def __init__(self, name: str, fd: int, nonce: bytes, slot_count: int, chunk_bytes: int) -> None:
        self.name = name
        self.nonce = nonce
        self.fd = fd
        self.slot_count = slot_count
        self.chunk_bytes = chunk_bytes
        self.data_offset = data_offset(slot_count)
        self.table = SlotTable(fd, slot_count)
        self._chunks: dict[int, mmap.mmap] = {}
        self._leases: dict[int, int] = {}  # slot index -> live leases on this rank
        self._local = threading.Lock()
        self.pins = 0  # resolutions between attach(pin=True) and lease() (under _ATTACH_LOCK)

    def slot_in_bounds(self, ref: SlotRef) -> bool:
        """Whether ``ref`` lies inside one chunk the owner has reserved."""
        k, inside = divmod(ref.offset - self.data_offset, self.chunk_bytes)
        if ref.offset < self.data_offset or inside % PAGE or inside + extent(ref.nbytes) > self.chunk_bytes:
            return False
        return self.data_offset + (k + 1) * self.chunk_bytes <= os.fstat(self.fd).st_size

    def _chunk(self, k: int) -> mmap.mmap:
        chunk = self._chunks.get(k)
        if chunk is None:
            chunk = mmap.mmap(self.fd, self.chunk_bytes, flags=mmap.MAP_PRIVATE,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE,
                              offset=self.data_offset + k * self.chunk_bytes)
            self._chunks[k] = chunk
        return chunk

    def lease(self, refs: "tuple[SlotRef, ...]") -> dict[int, np.ndarray]:
        """One ``uint8`` array per slot of a request, all tied to one lease: this rank's
        references are dropped when every array (and every view of one) is freed. Call
        only for checked references."""
        start_releaser()
        token = _Lease()
        arrays = {}
        with self._local:
            for ref in refs:
                k, inside = divmod(ref.offset - self.data_offset, self.chunk_bytes)
                self._leases[ref.index] = self._leases.get(ref.index, 0) + 1
                arr = np.frombuffer(self._chunk(k), dtype=np.uint8, count=ref.nbytes,
                                    offset=inside).view(_LeaseArray)
                arr.lease = token
                arrays[ref.index] = arr
        fin = weakref.finalize(token, _RELEASES.put,
                               (self, tuple((r.index, r.offset, r.nbytes) for r in refs)))
        fin.atexit = False  # a rank that exits holds nothing worth returning
        return arrays

    def release(self, slots: "list[tuple[int, int, int]]") -> None:
        """Drop one lease of each ``(index, offset, nbytes)``: for a slot's last lease on
        this rank its pages first, then every reference under one lock."""
        with self._local:
            for index, offset, nbytes in slots:
                left = self._leases[index] - 1
                if left:
                    self._leases[index] = left
                    continue
                del self._leases[index]
                k, inside = divmod(offset - self.data_offset, self.chunk_bytes)
                self._chunks[k].madvise(mmap.MADV_DONTNEED, inside, extent(nbytes))
        with self.table.locked():
            for index, _, _ in slots:
                self.table.add(index, -1)

    def live_leases(self) -> int:
        """Leases this rank still holds (tests and measurements)."""
        with self._local:
            return sum(self._leases.values())

    def retired(self) -> bool:
        """Whether its owner retired it: no request will name it again."""
        return is_retired(self.fd)

    def close(self) -> None:
        """Unmap and close (only once nothing views a slot)."""
        for m in list(self._chunks.values()) + [self.table._map]:
            try:
                m.close()
            except BufferError:
                pass  # a view is still alive; the mapping goes when it is freed
        self._chunks.clear()
        os.close(self.fd)


class _Lease:
    """What the lease arrays of one request share; its finalizer queues their release."""

    __slots__ = ("__weakref__",)


class _LeaseArray(np.ndarray):
    """A ``uint8`` array over one slot that keeps its request's lease alive (views of it,
    numpy or ``torch.frombuffer``, keep it alive in turn)."""


_ATTACHED: dict[str, AttachedRegion] = {}
_ATTACH_LOCK = threading.Lock()


def attach(shm_dir: str, name: str, nonce: bytes, pin: bool = False) -> AttachedRegion:
    """The region ``name`` mapped in this process (opened the first time).

    Raises :class:`MultimodalTransportError` for a name that is not ours, a file that is
    missing, not a region, or whose nonce differs (another region, e.g. another server's).
    Nothing is kept for a refused name. ``pin``: the region stays mapped (a retired one
    is not forgotten) until :func:`unpin`; call it once the request's slots are leased
    or refused.
    """
    if not isinstance(name, str) or not OWNED_NAME_RE.match(name):
        raise MultimodalTransportError(f"refused region name {name!r}: not ours")
    if not isinstance(nonce, bytes) or len(nonce) != 16:
        raise MultimodalTransportError("malformed region nonce")
    with _ATTACH_LOCK:
        region = _ATTACHED.get(name)
        if region is None:
            region = open_region(shm_dir, name)
            _ATTACHED[name] = region
        if pin:
            region.pins += 1
    if region.nonce != nonce:
        if pin:
            unpin(region)
        raise MultimodalTransportError(
            f"descriptor does not belong to region {name} (nonce mismatch)"
        )
    return region


def unpin(region: AttachedRegion) -> None:
    """Undo one ``attach(..., pin=True)``."""
    with _ATTACH_LOCK:
        region.pins -= 1


def open_region(shm_dir: str, name: str) -> AttachedRegion:
    """Open region ``name`` and check its header (not cached; :func:`attach` caches).
    Raises :class:`SegmentUnreachableError` or :class:`MultimodalTransportError`."""
    try:
        fd = os.open(os.path.join(shm_dir, name), _OPEN_FLAGS)
    except FileNotFoundError:
        raise SegmentUnreachableError(
            f"region {name} does not exist (its tokenizer process is gone)", errno.ENOENT
        ) from None
    except OSError as e:
        raise SegmentUnreachableError(f"cannot open region {name}: {e.strerror}", e.errno) from e
    try:
        st = os.fstat(fd)
        header = os.pread(fd, HEADER_SIZE, 0)
        if not stat.S_ISREG(st.st_mode) or len(header) < HEADER_SIZE:
            raise MultimodalTransportError(f"region {name} is truncated or not a file")
        magic, version, hdr, slots, _, chunk_bytes, nonce, _ = REGION_HEADER.unpack(header)
        if (magic, version, hdr) != (REGION_MAGIC, REGION_VERSION, HEADER_SIZE) or not (
            0 < slots <= 1 << 20 and chunk_bytes > 0 and chunk_bytes % PAGE == 0
            and st.st_size >= data_offset(slots)
        ):
            raise MultimodalTransportError(f"{name} is not a region (bad header)")
        return AttachedRegion(name, fd, nonce, slots, chunk_bytes)
    except BaseException:
        os.close(fd)
        raise


def attached_names() -> list[str]:
    """Names of the regions this process has mapped."""
    with _ATTACH_LOCK:
        return sorted(_ATTACHED)


def leases_held() -> int:
    """Slot leases this process still holds, over every region (tests, measurements)."""
    with _ATTACH_LOCK:
        regions = list(_ATTACHED.values())
    return sum(r.live_leases() for r in regions)


# -- the releaser thread ----------------------------------------------------------------

_RELEASES: "queue.SimpleQueue" = queue.SimpleQueue()
#: Seconds between checks for retired regions while no release comes.
FORGET_INTERVAL_S = 2.0
_releaser: Optional[threading.Thread] = None
_releaser_lock = threading.Lock()
_release_cpu = [0.0]  # CPU seconds the releaser thread spent releasing


def _release_forever() -> None:
    while True:
        try:
            items = [_RELEASES.get(timeout=FORGET_INTERVAL_S)]
        except queue.Empty:  # idle: forget regions retired since the last release
            _forget_retired()
            continue
        t0 = time.thread_time()
        while True:  # take everything queued meanwhile: one lock per region and batch
            try:
                items.append(_RELEASES.get_nowait())
            except queue.Empty:
                break
        by_region: dict[AttachedRegion, list] = {}
        events = []
        for item in items:
            if isinstance(item, threading.Event):
                events.append(item)
            else:
                by_region.setdefault(item[0], []).extend(item[1])
        for region, slots in by_region.items():
            try:
                region.release(slots)
            except Exception:  # keep releasing the others; a bad entry only leaks its slots
                logger.exception("sglang_mmpre: releasing slots of %s failed", region.name)
        _forget_retired()
        _release_cpu[0] += time.thread_time() - t0
        for event in events:
            event.set()


def _forget_retired() -> None:
    """Unmap every retired region that this rank views no slot of and no resolution has
    pinned.

    A region is retired (``transport/region.py``) only when no request can name it again
    (its owner shut down, or it belonged to a pool worker that died and every slot of it
    has refcount 0: ``tokenizer_side/pool.py``), so every rank may forget it on its own.
    Without this, this rank's mappings would keep its pages in the shm directory until the
    rank exits. Checked after each batch of releases and every ``FORGET_INTERVAL_S`` while
    idle (the owner retires it after the last release). A region deleted from outside is
    not retired: requests already sent may still name it, and the entry rank's verdict on
    them must hold on every rank.
    """
    with _ATTACH_LOCK:
        for name, region in list(_ATTACHED.items()):
            try:
                gone = region.pins == 0 and region.live_leases() == 0 and region.retired()
            except OSError:  # pragma: no cover - the fd is ours until close
                continue
            if gone:
                del _ATTACHED[name]
                region.close()


def release_cpu_seconds() -> float:
    """CPU seconds this process's releaser thread has spent releasing slots (benchmarks)."""
    return _release_cpu[0]


def start_releaser() -> None:
    """Start the releaser thread of this process (idempotent)."""
    global _releaser
    with _releaser_lock:
        if _releaser is None or not _releaser.is_alive():
            _releaser = threading.Thread(target=_release_forever, name="sglang_mmpre-release",
                                         daemon=True)
            _releaser.start()


def flush(timeout: Optional[float] = 10.0) -> bool:
    """Wait until every release queued so far is done; False on timeout."""
    start_releaser()
    done = threading.Event()
    _RELEASES.put(done)
    return done.wait(timeout)
