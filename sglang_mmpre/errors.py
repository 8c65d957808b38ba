"""The errors a user of sglang_mmpre can meet. Each message names the fix."""

from __future__ import annotations

__all__ = [
    "MmpreError",
    "SegmentAllocationError",
    "MultimodalTransportError",
    "SegmentUnreachableError",
    "SegmentVanishedError",
]


class MmpreError(Exception):
    """Base class of every error this package raises on purpose."""


class SegmentAllocationError(MmpreError):
    """A shared-memory segment could not be created (full /dev/shm, cap reached, ...).

    The tokenizer side catches it and sends the request's tensors inline instead.
    """


class MultimodalTransportError(MmpreError, ValueError):
    """A request's multimodal descriptors can't be resolved on a scheduler rank.

    Raised for forged, stale or inconsistent descriptors. The scheduler aborts that one
    request. Every rank reaches the same verdict: the checks behind it are functions of
    the descriptor and the segment's bytes alone, and whether the segment still exists
    is decided once, by the entry rank (``hooks.vouch_for_segments``).
    """


class SegmentUnreachableError(MultimodalTransportError):
    """This rank could not open or map a segment (it is gone, or the OS refused).

    A per-request error only where the entry rank did not vouch for the segment;
    otherwise it becomes :class:`SegmentVanishedError`. ``errno`` says why
    (``ENOENT``: the file is gone).
    """

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class SegmentVanishedError(MmpreError):
    """Fatal: a segment the entry rank found intact can't be opened on this rank.

    Not a per-request error on purpose. Aborting the request on this rank alone would
    give the ranks different batches and hang their next collective, so the scheduler
    stops instead (sglang then tears the server down). See docs/reliability.md,
    "Segments deleted from outside".
    """
