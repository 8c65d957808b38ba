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
from typing import Any, Iterable, Optional

import numpy as np
import torch

__all__ = ["feature_hash", "digest_to_hash", "fast_path_leaves"]

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
