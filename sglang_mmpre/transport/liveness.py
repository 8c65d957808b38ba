"""Which creators of files in the shm directory are alive, judged without pids.

Owner / writer / readers / who unlinks (the creator's lock file, ``<stem>.lock``)
--------------------------------------------------------------------------------
- **Owner**: every process that creates files in a shm directory (a TokenizerManager
  process). Before its first file there (:func:`new_name`) it creates ``<stem>.lock``
  (``O_EXCL``, mode 0600, empty) and holds ``flock(LOCK_EX)`` on it for the rest of its
  life. The kernel drops the lock when the process dies, whatever pid namespace it
  lived in: no pid is ever compared.
- **Writer**: nobody; the file stays empty.
- **Readers**: :func:`creator_alive` and :func:`sweep`, in any process that shares the
  directory (a server starting up, in this or another pid namespace). A creator is dead
  when its lock can be taken with ``LOCK_EX | LOCK_NB``.
- **Who unlinks**: the creator itself when it shuts down (:func:`release_held`: at
  ``atexit``, and from ``TokenizerSide.shutdown`` before sglang kills its own process tree)
  if none of its files is left; otherwise the sweep that took the lock, after the creator's files. If something
  else deletes it while its creator lives (``rm /dev/shm/*``, systemd's ``RemoveIPC``),
  the creator makes it again before its next file; meanwhile a creator whose lock file
  is missing counts as alive (a leak at worst, never an early unlink).

Names: a creator's *stem* is ``sglmmpre_<pid>_<64 random bits in hex>``. The pid is for
people reading ``ls /dev/shm``; two pid namespaces can hand out the same pid, the random
bits tell the creators apart. Every file a creator makes is ``<stem>_<96 random bits in
hex>`` (:func:`new_name`); :func:`sweep` removes the regular files named exactly so whose
creator is dead, and its lock file, and nothing else.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import logging
import os
import re
import secrets
import stat
import threading

from sglang_mmpre.errors import SegmentAllocationError
from typing import Optional

__all__ = [
    "OWNED_NAME_RE",
    "LOCK_NAME_RE",
    "creator_stem",
    "new_name",
    "creator_alive",
    "sweep",
    "release_held",
    "create_owned",
]

logger = logging.getLogger(__name__)

_STEM = r"(sglmmpre_([1-9][0-9]{0,9})_[0-9a-f]{16})"
# \Z, not $: $ also matches before a trailing newline, which would let "<name>\n" pass.
OWNED_NAME_RE = re.compile(rf"^{_STEM}_[0-9a-f]{{24}}\Z")  # group 1: stem, group 2: pid
LOCK_NAME_RE = re.compile(rf"^{_STEM}\.lock\Z")
_LOCK_SUFFIX = ".lock"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

_guard = threading.Lock()
_held: dict[str, tuple[str, int]] = {}  # abspath(shm_dir) -> (stem, fd of its locked lock file)


def _lock_path(shm_dir: str, stem: str) -> str:
    return os.path.join(shm_dir, stem + _LOCK_SUFFIX)


def _make_lock(shm_dir: str, stem: str) -> Optional[int]:
    """Create ``<stem>.lock`` and hold its lock; ``None`` if the name is taken or was swept."""
    try:
        fd = os.open(_lock_path(shm_dir, stem), os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW,
                     0o600)
    except FileExistsError:
        return None
    try:
        # A sweep that saw the new file before we locked it took it for a dead creator's:
        # it holds the lock now, or already unlinked the file. Either way, start again.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_nlink > 0:
            return fd
    except BlockingIOError:
        pass
    os.close(fd)
    return None


def creator_stem(shm_dir: str) -> str:
    """This process's stem in ``shm_dir``, holding its lock (made, or made again, here).

    Raises ``OSError`` when the lock file can't be created (no such directory, no
    permission, no inode left).
    """
    key = os.path.abspath(shm_dir)
    with _guard:
        held = _held.pop(key, None)
        candidates = []
        if held is not None:
            stem, fd = held
            if os.fstat(fd).st_nlink > 0:
                _held[key] = held
                return stem
            os.close(fd)  # deleted from outside: make it again, under the same stem first
            candidates.append(stem)
        pid = os.getpid()
        candidates += [f"sglmmpre_{pid}_{secrets.token_hex(8)}" for _ in range(3)]
        for stem in candidates:
            fd = _make_lock(shm_dir, stem)
            if fd is not None:
                _held[key] = (stem, fd)
                return stem
    raise OSError(errno.EEXIST, f"could not create a creator lock file in {shm_dir}")


def new_name(shm_dir: str) -> str:
    """A fresh name for a file this process is about to create in ``shm_dir``.

    It is ``<stem>_<96 random bits in hex>``: :func:`sweep` removes it once this process
    is dead, and never before.
    """
    return f"{creator_stem(shm_dir)}_{secrets.token_hex(12)}"


def _lock_if_dead(shm_dir: str, stem: str) -> Optional[int]:
    """An fd holding the lock of creator ``stem`` if it is dead, else ``None``."""
    try:
        fd = os.open(_lock_path(shm_dir, stem), os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    except OSError:  # missing (the creator makes it again), a symlink, no permission
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
    except BlockingIOError:  # its creator holds it: alive
        pass
    os.close(fd)
    return None


def create_owned(shm_dir: str) -> tuple[str, str, int]:
    """Create a new file of ours (:func:`new_name`; ``O_EXCL``, mode 0600, read-write) and
    return ``(name, path, fd)``. Segments and regions are made here, so the sweep covers
    both. Raises :class:`SegmentAllocationError` naming the fix."""
    try:
        name = new_name(shm_dir)
        path = os.path.join(shm_dir, name)
        fd = os.open(path, os.O_RDWR | _NOFOLLOW | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise SegmentAllocationError(
            f"cannot create a file in {shm_dir}: {e.strerror}. Check that {shm_dir} exists "
            "and is writable (docker: --shm-size), or set SGLANG_MM_SHM_DIR."
        ) from e
    return name, path, fd


def creator_alive(shm_dir: str, stem: str) -> bool:
    """Whether creator ``stem`` may still use its files in ``shm_dir``.

    False only when its lock file exists and its lock can be taken (its process is dead,
    in any pid namespace). A missing or foreign lock file counts as alive.
    """
    fd = _lock_if_dead(shm_dir, stem)
    if fd is None:
        return True
    os.close(fd)
    return False


def _unlink_regular(path: str) -> bool:
    try:
        # We only ever create regular files: a directory, link or fifo is not ours.
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as e:  # pragma: no cover - permissions of a foreign file
        if e.errno in (errno.EPERM, errno.EACCES, errno.EISDIR):
            return False
        raise


def sweep(shm_dir: str, only: Optional[str] = None) -> list[str]:
    """Remove the files of dead creators, then their lock files; return the names removed.

    Only regular files named exactly ``<stem>_<24 hex>`` or ``<stem>.lock`` are
    considered, and a creator that holds its lock (a running server, in any pid
    namespace) keeps every file. ``only``: the files of that one creator stem.
    """
    try:
        entries = os.listdir(shm_dir)
    except FileNotFoundError:
        return []
    by_stem: dict[str, list[str]] = {}
    for name in entries:
        owned = OWNED_NAME_RE.match(name)
        if owned:
            by_stem.setdefault(owned.group(1), []).append(name)
        elif LOCK_NAME_RE.match(name):
            by_stem.setdefault(name[: -len(_LOCK_SUFFIX)], [])
    removed = []
    for stem, names in sorted(by_stem.items()):
        if only is not None and stem != only:
            continue
        fd = _lock_if_dead(shm_dir, stem)
        if fd is None:
            continue
        try:  # hold its lock while removing, so that a concurrent sweep skips it
            for name in sorted(names) + [stem + _LOCK_SUFFIX]:
                if _unlink_regular(os.path.join(shm_dir, name)):
                    removed.append(name)
        finally:
            os.close(fd)
    if removed:
        logger.warning(
            "sglang_mmpre: removed %d file(s) left by dead processes in %s", len(removed), shm_dir
        )
    return removed


def release_held() -> None:
    """Remove each lock file of this process that no file of ours still needs, and drop
    its lock. Call it only when this process will create no more files (shutdown)."""
    for directory, (stem, fd) in list(_held.items()):
        try:
            if not any(n.startswith(stem + "_") for n in os.listdir(directory)):
                os.unlink(_lock_path(directory, stem))
        except OSError:
            pass  # the directory or the file is gone already: nothing to remove
        os.close(fd)
    _held.clear()


def _forget_in_child() -> None:
    """A forked child is not the creator of its parent's files: drop the inherited locks.

    Closing our copy of the fd keeps the parent's lock (it lives as long as any fd does).
    """
    global _guard
    _guard = threading.Lock()
    for _stem, fd in _held.values():
        os.close(fd)
    _held.clear()


atexit.register(release_held)
os.register_at_fork(after_in_child=_forget_in_child)
