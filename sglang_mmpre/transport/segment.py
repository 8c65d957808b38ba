"""The shared-memory segment that carries one request's tensors to every scheduler rank.

Owner / writer / readers / who unlinks
--------------------------------------
- **Owner and writer**: the TokenizerManager process that materialized the request
  (:class:`SegmentWriter`). It creates the file ``O_EXCL``, mode 0600, reserves every page
  with ``posix_fallocate`` (a full tmpfs raises ``ENOSPC`` here instead of a SIGBUS later),
  writes header and payload, and holds one *creator reference* while it may still send the
  request.
- **Readers**: the scheduler ranks (:func:`map_segment`). Each maps the whole file with a
  private copy-on-write mapping, so one rank's writes never reach another rank, and drops
  one *consumer reference*.
- **Who unlinks**: whoever drops the last reference, under the segment's ``flock``. That
  is exactly once, and only after every consumer has mapped it. No collective is involved.
  If something else deleted the file first (``rm /dev/shm/*``, systemd's ``RemoveIPC``),
  that unlink finds nothing and the reference still counts as dropped; mappings and open
  fds keep the pages until they go.

Lifetime protocol (``refcount`` in the header, changed only under ``flock(LOCK_EX)``)::

    create                      refcount = 1                 (creator reference)
    before each send            refcount += consumers_per_send
    a rank maps it              refcount -= 1                (0: that rank unlinks)
    creator done sending        refcount -= 1                (0: the creator unlinks)

The creator's reference keeps the count above zero between sends (parallel sampling sends
the same request several times), so no rank can unlink a segment that will still be sent.
A mapping outlives the unlink, as the pages stay until the last mapping goes.

Byte layout (little endian; the payload starts at byte 64, each tensor 64-byte aligned)::

    0        8        12       16               24               32               48        64
    +--------+--------+--------+----------------+----------------+----------------+---------+
    | magic  | version| hdr len| payload nbytes | refcount (i64) | nonce (16 B)   | digest  |
    |SGLMMPR1|  u32=1 | u32=64 |      u64       | under flock    | random         | 16 B    |
    +--------+--------+--------+----------------+----------------+----------------+---------+
    | payload: tensor bytes at the offsets named by the TensorDescriptors ...              |

``digest`` is :func:`descriptors.table_digest` of the descriptor table; a rank compares it
with the one it computes from the descriptors it received.

Names are ``<creator stem>_<96 random bits in hex>``, the stem being
``sglmmpre_<creator pid>_<64 random bits in hex>`` (``liveness.new_name``):
``liveness.sweep`` unlinks them once their creator is dead, and nothing else.
"""

from __future__ import annotations

import errno
import fcntl
import hmac
import mmap
import os
import secrets
import stat
import struct
from typing import Optional

from sglang_mmpre.errors import (
    MultimodalTransportError,
    SegmentAllocationError,
    SegmentUnreachableError,
)
from sglang_mmpre.transport.descriptors import SegmentDescriptor
from sglang_mmpre.transport.liveness import OWNED_NAME_RE, create_owned

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "SegmentWriter",
    "probe_segment",
    "map_segment",
    "segment_names",
]

MAGIC = b"SGLMMPR1"
VERSION = 1
HEADER = struct.Struct("<8sIIQq16s16s")
HEADER_SIZE = 64
_REFCOUNT_OFFSET = 24
_REFCOUNT = struct.Struct("<q")
ALIGN = 64

if HEADER.size != HEADER_SIZE:  # pragma: no cover - layout guard
    raise ImportError("segment header layout changed size")

_OPEN_FLAGS = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _path(shm_dir: str, name: str) -> str:
    if not OWNED_NAME_RE.match(name):
        raise MultimodalTransportError(
            f"refused segment name {name!r}: not a sglang_mmpre segment name"
        )
    return os.path.join(shm_dir, name)


def _adjust_refcount(fd: int, path: str, delta: int) -> int:
    """Add ``delta`` to the header refcount under ``flock``; unlink at zero. Returns it."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        (count,) = _REFCOUNT.unpack(os.pread(fd, 8, _REFCOUNT_OFFSET))
        if count <= 0:
            raise MultimodalTransportError(
                f"segment {os.path.basename(path)} was already consumed (refcount {count})"
            )
        count += delta
        os.pwrite(fd, _REFCOUNT.pack(count), _REFCOUNT_OFFSET)
        if count == 0:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass  # deleted from outside already: nothing left to do
        return count
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


class SegmentWriter:
    """A segment being written and sent by its creator (the tokenizer side).

    Call :meth:`seal` once the payload is written, :meth:`add_consumers` before each send,
    and :meth:`release` exactly once when the request will not be sent again (the
    creator's reference; it unlinks if every consumer has already mapped). Never rely on
    garbage collection to release.
    """

    # Class-level defaults let a half-built object still clean up.
    _fd: int = -1
    _mmap: Optional[mmap.mmap] = None
    _released: bool = False

    def __init__(self, shm_dir: str, payload_nbytes: int) -> None:
        self.payload_nbytes = int(payload_nbytes)
        self.nonce = secrets.token_bytes(16)
        total = HEADER_SIZE + self.payload_nbytes
        self.name, self.path, self._fd = create_owned(shm_dir)  # holds the creator lock
        try:
            try:
                os.posix_fallocate(self._fd, 0, total)
            except OSError as e:
                raise SegmentAllocationError(
                    f"cannot reserve {total} bytes in {shm_dir}: {e.strerror}. Enlarge it "
                    "(docker run --shm-size, or mount -o remount,size=... /dev/shm) or lower "
                    "SGLANG_MM_SHM_CAP_BYTES; meanwhile requests travel inline."
                ) from e
            self._mmap = mmap.mmap(self._fd, total, flags=mmap.MAP_SHARED)
            self._mmap[:HEADER_SIZE] = HEADER.pack(
                MAGIC, VERSION, HEADER_SIZE, self.payload_nbytes, 1, self.nonce, b"\0" * 16
            )
        except BaseException:
            self._destroy()
            raise

    @property
    def payload(self) -> memoryview:
        """Writable view of the payload (valid until :meth:`seal`)."""
        if self._mmap is None:
            raise MultimodalTransportError(f"segment {self.name} is sealed")
        return memoryview(self._mmap)[HEADER_SIZE:]

    def seal(self, digest: bytes, consumers: int) -> SegmentDescriptor:
        """Write the descriptor-table digest, unmap, and return the segment descriptor."""
        if self._mmap is None:
            raise MultimodalTransportError(f"segment {self.name} is already sealed")
        self._mmap[48:64] = digest
        self._mmap.close()
        self._mmap = None
        return self.descriptor(consumers)

    def descriptor(self, consumers: int) -> SegmentDescriptor:
        return SegmentDescriptor(self.name, self.payload_nbytes, self.nonce, consumers)

    def add_consumers(self, n: int) -> None:
        """Count ``n`` more consumers; call before each send of the request."""
        if self._released:
            raise MultimodalTransportError(
                f"segment {self.name} was released by its creator and can't be sent again"
            )
        _adjust_refcount(self._fd, self.path, n)

    def release(self) -> None:
        """Drop the creator's reference (idempotent); unlinks if it was the last."""
        if self._released:
            return
        self._released = True
        try:
            _adjust_refcount(self._fd, self.path, -1)
        finally:
            os.close(self._fd)
            self._fd = -1

    def hand_over(self) -> None:
        """Give the creator reference to another process of this TokenizerManager (a pool
        worker hands it to its parent, which takes it with :meth:`adopt`): close this
        process's fd and mark it released here, leaving the refcount as it is."""
        self._released = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @classmethod
    def adopt(cls, shm_dir: str, seg: SegmentDescriptor) -> "SegmentWriter":
        """Take the creator reference that a pool worker handed over for ``seg``.

        The returned writer adds consumers and releases like the creator's own. Raises as
        :func:`probe_segment` when the file is gone or not ``seg``.
        """
        self = cls.__new__(cls)
        self._fd, _, _ = _open_ours(shm_dir, seg)
        self.name, self.path = seg.name, _path(shm_dir, seg.name)
        self.payload_nbytes, self.nonce = seg.payload_nbytes, seg.nonce
        return self

    def _destroy(self) -> None:
        """Unlink and close after a failed construction."""
        self._released = True
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # a view is still alive (e.g. in a traceback); it unmaps when freed
            self._mmap = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def released(self) -> bool:
        """Whether the creator reference was dropped (or the segment destroyed)."""
        return self._released

    def abandon(self) -> None:
        """Unlink a segment that was never sent (a failure before sending)."""
        self._destroy()


def _open_ours(shm_dir: str, seg: SegmentDescriptor) -> tuple[int, os.stat_result, tuple]:
    """Open ``seg`` and check that it is a segment and carries ``seg``'s nonce.

    Returns ``(fd, stat, header fields)``; the caller closes ``fd``. Raises
    :class:`SegmentUnreachableError` when it can't be opened (gone, or refused by the
    OS), :class:`MultimodalTransportError` when it is not ours.
    """
    path = _path(shm_dir, seg.name)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise SegmentUnreachableError(
            f"segment {seg.name} does not exist (already consumed, swept, deleted from "
            "outside, or never created)", errno.ENOENT
        ) from None
    except OSError as e:
        raise SegmentUnreachableError(
            f"cannot open segment {seg.name}: {e.strerror}", e.errno
        ) from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < HEADER_SIZE:
            raise MultimodalTransportError(f"segment {seg.name} is truncated or not a file")
        header = HEADER.unpack(os.pread(fd, HEADER_SIZE, 0))
        magic, version, hdr, _, _, nonce, _ = header
        if magic != MAGIC or version != VERSION or hdr != HEADER_SIZE:
            raise MultimodalTransportError(f"segment {seg.name} has no valid header")
        if not hmac.compare_digest(nonce, bytes(seg.nonce)):
            raise MultimodalTransportError(
                f"descriptor does not belong to segment {seg.name} (nonce mismatch)"
            )
        return fd, st, header
    except BaseException:
        os.close(fd)
        raise


def probe_segment(shm_dir: str, seg: SegmentDescriptor) -> None:
    """Check that ``seg`` exists with a valid header and its nonce; touch nothing.

    What the entry rank vouches for (``resolve.vouch``). Raises as :func:`map_segment`.
    """
    os.close(_open_ours(shm_dir, seg)[0])


def map_segment(shm_dir: str, seg: SegmentDescriptor, digest: bytes) -> mmap.mmap:
    """Map ``seg`` privately (copy-on-write) and drop one consumer reference.

    ``digest`` is the table digest computed from the descriptors this rank received. The
    returned mapping covers header and payload. Raises :class:`MultimodalTransportError`
    for a forged, stale or inconsistent descriptor, and its subclass
    :class:`SegmentUnreachableError` when the file can't be opened or mapped here. The
    reference is dropped whenever the segment is ours (nonce matches), so a refused
    request leaks nothing.
    """
    fd, st, header = _open_ours(shm_dir, seg)
    _, _, _, payload_nbytes, _, _, stored_digest = header
    try:
        # From here on the segment is ours: drop the reference even if we refuse it.
        problem: Optional[MultimodalTransportError] = None
        mapping = None
        if payload_nbytes != seg.payload_nbytes or st.st_size != HEADER_SIZE + payload_nbytes:
            problem = MultimodalTransportError(
                f"segment {seg.name} is truncated or resized: {st.st_size} bytes, "
                f"descriptor says {HEADER_SIZE + seg.payload_nbytes}"
            )
        elif not hmac.compare_digest(stored_digest, digest):
            problem = MultimodalTransportError(
                f"descriptors of segment {seg.name} do not match its header "
                "(wrong dtype, shape, nbytes, offset or hash)"
            )
        else:
            try:
                mapping = mmap.mmap(fd, st.st_size, flags=mmap.MAP_PRIVATE,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as e:
                problem = SegmentUnreachableError(
                    f"cannot map segment {seg.name}: {e.strerror}", e.errno
                )
        _adjust_refcount(fd, _path(shm_dir, seg.name), -1)
        if problem is not None:
            raise problem
        return mapping
    finally:
        os.close(fd)


def segment_names(shm_dir: str) -> list[str]:
    """Names of every sglang_mmpre segment in ``shm_dir``."""
    try:
        entries = os.listdir(shm_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in entries if OWNED_NAME_RE.match(n))
