"""The warm shared-memory region of one TokenizerManager process, and its slot table.

A region is allocated once, at start-up, by each TokenizerManager process, and request
tensors are carved out of it as *slots*. Scheduler ranks map it once and keep the
mapping, so resolving a request is a table lookup plus views. Per-request segments
(``segment.py``) remain the fallback when the region is full.

Owner / writer / readers / who unlinks
--------------------------------------
- **Owner and writer**: the TokenizerManager process that created it
  (:class:`RegionFile`, driven by ``tokenizer_side/slots.py``). It creates the file
  ``O_EXCL``, mode 0600, reserves every page with ``posix_fallocate``, faults the pages in,
  allocates slots, writes their payload, and publishes each slot's table entry.
- **Readers**: the scheduler ranks (``scheduler_side/region_cache.py``). Each maps the
  table ``MAP_SHARED`` and the chunks ``MAP_PRIVATE`` (copy-on-write), once per process.
  Ranks write nothing but a slot's ``refcount``, under the region's ``flock``.
- **Who unlinks**: the owner, when it shuts down (``TokenizerSide.shutdown`` or at exit);
  the start-up sweep of another TokenizerManager if the owner died. Mappings outlive the
  unlink. Slots are never unlinked: a slot whose refcount reached 0 is reused by the owner.

Byte layout (little endian; ``P`` = page size, ``S`` = slot count, ``C`` = chunk bytes)::

    0        8        12       16       20       24          32               48         64
    +--------+--------+--------+--------+--------+-----------+----------------+----------+
    | magic  | version| hdr len| slots S| retired| chunk C   | nonce (16 B)   | zero     |
    |SGLMMRG1|  u32=1 | u32=64 |  u32   |  u32   |   u64     | random         | 16 B     |
    +--------+--------+--------+--------+--------+-----------+----------------+----------+
    | slot entry 0 (64 B) | slot entry 1 | ... | slot entry S-1 | zero up to a page      |
    +---------------------+--------------+-----+----------------+------------------------+
    | chunk 0: C bytes of slot payloads, each slot page aligned  | chunk 1 ... (grown)    |
    +------------------------------------------------------------+------------------------+
    ^ data_offset(S) = 64 + 64*S rounded up to P                  ^ data_offset + C

    slot entry (64 B):
    0            8            16           24           32                48          64
    +------------+------------+------------+------------+-----------------+-----------+
    | generation | refcount   | offset     | nbytes     | table digest    | zero      |
    | u64        | i64        | u64 (file) | u64        | 16 B            | 16 B      |
    +------------+------------+------------+------------+-----------------+-----------+

- ``retired``: 0 while requests may name the region; the owner writes 1 just before it
  unlinks the file when none can any more (at shutdown, or ``tokenizer_side/pool.py`` for
  a dead worker's region), and ranks then unmap it once they view none of its slots.
- ``generation``: 0 for a slot never used; otherwise the owner's counter (monotonic, from a
  random start per region) at the moment the slot's refcount last went from 0 to 1. A reference carries it; a rank refuses
  a reference whose generation differs (the slot was recycled) or whose slot has no
  references left (refcount 0): see Note [slot isolation] in ``scheduler_side/region_cache``.
- ``refcount``: the creator reference of each request holding the slot, plus
  ``consumers`` per send not yet released by a rank. Changed only under ``flock(LOCK_EX)``
  on the region file (and a thread lock in each process).
- ``offset``/``nbytes``: where the payload lies in the file; a slot occupies
  ``extent(nbytes)`` bytes from ``offset`` and never crosses a chunk boundary.
- ``table digest``: :func:`descriptors.slot_digest` of the tensor descriptors that view
  the slot; a rank recomputes it from what it received.

The region grows by whole chunks (``posix_fallocate`` at the end of the file), each faulted
in once, within the cap; it never shrinks while its owner lives.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import secrets
import struct
import threading
from typing import Iterator, NamedTuple, Optional

from sglang_mmpre.errors import MultimodalTransportError, SegmentAllocationError
from sglang_mmpre.transport.liveness import create_owned

__all__ = [
    "REGION_MAGIC",
    "REGION_HEADER",
    "ENTRY",
    "PAGE",
    "SlotEntry",
    "SlotTable",
    "RegionFile",
    "data_offset",
    "extent",
    "is_retired",
    "retire",
]

REGION_MAGIC = b"SGLMMRG1"
REGION_VERSION = 1
REGION_HEADER = struct.Struct("<8sIIIIQ16s16s")
ENTRY = struct.Struct("<QqQQ16s16s")
HEADER_SIZE = 64
PAGE = mmap.PAGESIZE
_REFCOUNT = struct.Struct("<q")
_RETIRED = struct.Struct("<I")
_RETIRED_OFFSET = 20
_MADV_POPULATE_WRITE = 23  # Linux 5.14+; older kernels: pages are touched one by one

if REGION_HEADER.size != HEADER_SIZE or ENTRY.size != 64:  # pragma: no cover - layout guard
    raise ImportError("region layout changed size")



def data_offset(slot_count: int) -> int:
    """File offset of chunk 0: header and slot table, rounded up to a page."""
    return extent(HEADER_SIZE + ENTRY.size * slot_count)


def extent(nbytes: int) -> int:
    """Bytes a slot of ``nbytes`` occupies: whole pages, at least one."""
    return max(PAGE, (nbytes + PAGE - 1) // PAGE * PAGE)


def retire(fd: int) -> None:
    """Mark the region open on ``fd`` retired (see the layout); then unlink it."""
    os.pwrite(fd, _RETIRED.pack(1), _RETIRED_OFFSET)


def is_retired(fd: int) -> bool:
    """Whether the region open on ``fd`` was retired by its owner."""
    return _RETIRED.unpack(os.pread(fd, 4, _RETIRED_OFFSET))[0] == 1


class SlotEntry(NamedTuple):
    generation: int
    refcount: int
    offset: int
    nbytes: int
    digest: bytes


class SlotTable:
    """The slot table of one region as one process sees it (``MAP_SHARED``).

    Every read-modify-write of an entry happens inside :meth:`locked`: a thread lock (a
    ``flock`` is per open file, so it does not exclude threads sharing the fd) and then
    ``flock(LOCK_EX)`` on the region file (other processes). Never call back into user
    code while holding it.
    """

    def __init__(self, fd: int, slot_count: int) -> None:
        self.fd = fd
        self.slot_count = slot_count
        self._map = mmap.mmap(fd, data_offset(slot_count), flags=mmap.MAP_SHARED)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def locked(self) -> Iterator["SlotTable"]:
        with self._lock:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                yield self
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    def read(self, index: int) -> SlotEntry:
        gen, ref, off, n, digest, _ = ENTRY.unpack_from(self._map, HEADER_SIZE + ENTRY.size * index)
        return SlotEntry(gen, ref, off, n, digest)

    def refcount(self, index: int) -> int:
        """The refcount, read without the lock (only the owner raises it from 0)."""
        return _REFCOUNT.unpack_from(self._map, HEADER_SIZE + ENTRY.size * index + 8)[0]

    def referenced(self) -> int:
        """How many slots have references left (the pool's reaping, tests, measurements)."""
        return sum(1 for i in range(self.slot_count) if self.refcount(i) > 0)

    def write(self, index: int, entry: SlotEntry) -> None:
        """Write a whole entry (owner only; inside :meth:`locked`)."""
        ENTRY.pack_into(self._map, HEADER_SIZE + ENTRY.size * index, entry.generation,
                        entry.refcount, entry.offset, entry.nbytes, entry.digest, bytes(16))

    def add(self, index: int, delta: int) -> int:
        """Add ``delta`` to a refcount (inside :meth:`locked`); returns the new value.

        Raises :class:`MultimodalTransportError` rather than drive it below zero.
        """
        pos = HEADER_SIZE + ENTRY.size * index + 8
        (count,) = _REFCOUNT.unpack_from(self._map, pos)
        if count + delta < 0:
            raise MultimodalTransportError(
                f"slot {index} has {count} references left, cannot drop {-delta}"
            )
        _REFCOUNT.pack_into(self._map, pos, count + delta)
        return count + delta

    def close(self) -> None:
        self._map.close()


class RegionFile:
    """The owner's handle on its region: the file, its table and its chunks (``MAP_SHARED``).

    Create it with :meth:`create`; :meth:`grow` adds a chunk; :meth:`close` unmaps, closes
    and (by default) unlinks. Pickle nothing of it: a request carries the name and nonce.
    """

    _fd: int = -1
    table: Optional[SlotTable] = None
    _closed: bool = False

    def __init__(self, shm_dir: str, slot_count: int, chunk_bytes: int) -> None:
        if chunk_bytes <= 0 or chunk_bytes % PAGE:
            raise ValueError(f"chunk size {chunk_bytes} is not a positive multiple of {PAGE}")
        self.nonce = secrets.token_bytes(16)
        self.slot_count = slot_count
        self.chunk_bytes = chunk_bytes
        self.data_offset = data_offset(slot_count)
        self.chunks: list[mmap.mmap] = []
        # Swept like a segment once its creator is dead.
        self.name, self.path, self._fd = create_owned(shm_dir)
        try:
            self._reserve(0, self.data_offset)
            self.table = SlotTable(self._fd, slot_count)
            REGION_HEADER.pack_into(self.table._map, 0, REGION_MAGIC, REGION_VERSION,
                                    HEADER_SIZE, slot_count, 0, chunk_bytes, self.nonce,
                                    bytes(16))
            self.grow()
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        """Bytes of payload chunks (what the region adds to the shm directory's use)."""
        return len(self.chunks) * self.chunk_bytes

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def fd(self) -> int:
        """The open region file (the owner maps slots of it copy-on-write from it)."""
        return self._fd

    def vanished(self) -> bool:
        """Whether the name no longer leads to this file (deleted from outside: ``rm``,
        systemd's ``RemoveIPC``, a cleanup job). Ranks that have not attached it yet can't."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        own = os.fstat(self._fd)
        return (st.st_ino, st.st_dev) != (own.st_ino, own.st_dev)

    def _reserve(self, offset: int, length: int) -> None:
        try:
            os.posix_fallocate(self._fd, offset, length)
        except OSError as e:
            raise SegmentAllocationError(
                f"cannot reserve {length} bytes in {os.path.dirname(self.path)}: {e.strerror}. "
                "Enlarge it (docker run --shm-size) or lower SGLANG_MM_SHM_CAP_BYTES / "
                "SGLANG_MM_SHM_REGION_CHUNK_BYTES."
            ) from e

    def grow(self) -> mmap.mmap:
        """Append one chunk: reserve it, map it and fault every page in."""
        start = self.data_offset + self.size
        self._reserve(start, self.chunk_bytes)
        chunk = mmap.mmap(self._fd, self.chunk_bytes, flags=mmap.MAP_SHARED, offset=start)
        try:
            chunk.madvise(_MADV_POPULATE_WRITE)
        except OSError:
            for page in range(0, self.chunk_bytes, PAGE):
                chunk[page] = 0
        self.chunks.append(chunk)
        return chunk

    def chunk_of(self, offset: int) -> tuple[mmap.mmap, int]:
        """The chunk holding file offset ``offset`` and the offset inside it."""
        k, inside = divmod(offset - self.data_offset, self.chunk_bytes)
        return self.chunks[k], inside

    def close(self, unlink: bool = True) -> None:
        """Unmap, close and unlink (idempotent). A view still alive keeps its chunk mapped."""
        if self._closed:
            return
        self._closed = True
        for m in self.chunks + ([self.table._map] if self.table is not None else []):
            try:
                m.close()
            except BufferError:
                pass  # a view is still alive; the mapping goes when it is freed
        self.chunks = []
        if unlink:
            if self._fd >= 0:
                retire(self._fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
