"""The item hash, bit for bit equal to sglang 0.5.5's ``mm_utils.hash_feature``.

sglang hashes ``sha256(bytes)`` of the feature, first 8 bytes big-endian. For a tensor it
gets those bytes through ``torch.concat`` of flattened copies, ``.contiguous()``,
``.float()`` for bfloat16, and ``memoryview(...).tobytes()``: up to four copies. Here the
digest is fed from the tensor's own contiguous buffer (bfloat16 is widened chunk by chunk),
and ``hashlib`` releases the GIL while it hashes, so worker threads hash in parallel.
Inputs outside the cases below go to sglang's own ``hash_feature``.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from typing import Any, Iterable, Optional

import numpy as np
import torch

__all__ = ["feature_hash", "digest_to_hash", "fast_path_leaves", "pin_immutable",
           "remembered_digests", "remember_digests"]

_BF16_CHUNK = 1 << 22  # elements widened to fp32 at a time


def digest_to_hash(digest: bytes) -> int:
    """sglang's ``data_hash`` reduction of a sha256 digest."""
    return int.from_bytes(digest[:8], byteorder="big", signed=False)


def _update_from_tensor(h: "hashlib._Hash", t: torch.Tensor) -> None:
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    flat = t.reshape(-1)
    if t.dtype == torch.bfloat16:
        for start in range(0, flat.numel(), _BF16_CHUNK):
            h.update(flat[start:start + _BF16_CHUNK].float().numpy())
    elif flat.numel():
        h.update(flat.view(torch.uint8).numpy())


def _tensor_list_hash(tensors: Iterable[torch.Tensor]) -> int:
    h = hashlib.sha256()
    for t in tensors:
        _update_from_tensor(h, t)
    return digest_to_hash(h.digest())


def _fast_path_tensors(f: Any):
    """The flat tensor list when sglang's ``tensor_hash`` reduces to hashing each CPU
    tensor's bytes in order (one dtype, so ``torch.concat`` promotes nothing), else None."""
    from sglang.srt.utils import flatten_nested_list

    flat = [f] if isinstance(f, torch.Tensor) else flatten_nested_list(f)
    if not flat or not all(isinstance(t, torch.Tensor) for t in flat):
        return None
    if len({t.dtype for t in flat}) != 1 or any(t.is_cuda for t in flat):
        return None
    try:
        flat[0].reshape(-1)[:0].view(torch.uint8).numpy()
    except (RuntimeError, TypeError):
        return None
    return flat


def fast_path_leaves(f: Any) -> Optional[list]:
    """The leaves whose bytes, in order, sglang's ``hash_feature`` hashes (bfloat16 widened
    first): CPU tensors of one dtype, or one non-object numpy array; else None."""
    if isinstance(f, np.ndarray):
        return [f] if f.dtype != object else None
    if isinstance(f, torch.Tensor) or (isinstance(f, list) and f and isinstance(f[0], torch.Tensor)):
        return _fast_path_tensors(f)
    return None


def feature_hash(f: Any) -> int:
    """Return ``sglang.srt.managers.mm_utils.hash_feature(f)`` without its copies."""
    if isinstance(f, torch.Tensor) or (isinstance(f, list) and f and isinstance(f[0], torch.Tensor)):
        flat = _fast_path_tensors(f)
        if flat is not None:
            return _tensor_list_hash(flat)
    elif isinstance(f, np.ndarray) and f.dtype != object:
        arr = np.ascontiguousarray(f)
        return digest_to_hash(hashlib.sha256(arr.reshape(-1).view(np.uint8)).digest())
    from sglang.srt.managers.mm_utils import hash_feature

    return hash_feature(f)


# Note [remembered digests]: the processor cache (``processor_cache.py``) hands the same
# feature tensor to every request that repeats an image. It pins that tensor here as
# never written again; ``RegionSlots.place`` then remembers its sha256 (and that of its
# first MiB, the slot lookup key) the first time it hashes it, and later placements of the
# same tensor object skip the pass over its bytes. A pinned tensor whose ``_version``
# changed (an in-place write) is forgotten and hashed again.
_pinned: dict[int, tuple["weakref.ref", int, Optional[tuple[bytes, bytes]]]] = {}
_pinned_lock = threading.Lock()


def pin_immutable(t: torch.Tensor) -> None:
    """Mark ``t`` as never written again; see Note [remembered digests]."""
    key = id(t)

    def forget(_ref, key=key) -> None:
        with _pinned_lock:
            entry = _pinned.get(key)
            if entry is not None and entry[0] is _ref:
                del _pinned[key]

    with _pinned_lock:
        _pinned[key] = (weakref.ref(t, forget), t._version, None)


def remembered_digests(t: Any) -> Optional[tuple[bytes, bytes]]:
    """(sha256 of the first MiB, sha256 of all bytes) of a pinned tensor, if known."""
    if not isinstance(t, torch.Tensor):
        return None
    with _pinned_lock:
        entry = _pinned.get(id(t))
    if entry is None or entry[0]() is not t or entry[1] != t._version:
        return None
    return entry[2]


def remember_digests(t: Any, prefix: bytes, digest: bytes) -> None:
    """Remember ``t``'s digests if it is pinned and unwritten since; else nothing."""
    if not isinstance(t, torch.Tensor):
        return
    with _pinned_lock:
        entry = _pinned.get(id(t))
        if entry is not None and entry[0]() is t and entry[1] == t._version:
            _pinned[id(t)] = (entry[0], entry[1], (prefix, digest))
