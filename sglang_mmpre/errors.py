"""The errors a user of sglang_mmpre can meet. Each message names the fix."""

from __future__ import annotations

__all__ = ["MmpreError", "SegmentAllocationError", "MultimodalTransportError"]


class MmpreError(Exception):
    """Base class of every error this package raises on purpose."""


class SegmentAllocationError(MmpreError):
    """A shared-memory segment could not be created (full /dev/shm, cap reached, ...).

    The tokenizer side catches it and sends the request's tensors inline instead.
    """


class MultimodalTransportError(MmpreError, ValueError):
    """A request's multimodal descriptors can't be resolved on a scheduler rank.

    Raised for forged, stale or inconsistent descriptors. Every check behind it is a
    function of the descriptor and the segment's bytes alone, so every rank that receives
    the same request reaches the same verdict and aborts the same request.
    """
