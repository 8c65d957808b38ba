"""What the patched ``Scheduler`` calls.

- ``recv_requests``, on the entry rank, before ``broadcast_pyobj``:
  :func:`vouch_for_segments` (see Note [verdicts decided once] in ``resolve.py``);
- ``handle_generate_request`` / ``handle_embedding_request``, first thing, before any early
  return (so that every received request drops its segment reference on every rank, even
  when it is aborted right after): :func:`take_multimodal_inputs`.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from sglang_mmpre.config import scheduler_consumers_per_send, shm_dir
from sglang_mmpre.errors import MultimodalTransportError
from sglang_mmpre.scheduler_side.resolve import resolve, vouch
from sglang_mmpre.transport.carrier import raw_mm_field

__all__ = ["vouch_for_segments", "take_multimodal_inputs"]

logger = logging.getLogger(__name__)


def vouch_for_segments(recv_reqs: Optional[list]) -> None:
    """Check each received request's segment once, on the entry rank, before the broadcast.

    Writes the verdict into the request (``resolve.vouch``), so that every rank aborts a
    request whose segment is missing or invalid with the same message. Costs one
    ``open``/``pread``/``close`` per request with a segment; other objects are skipped.
    """
    if not recv_reqs:
        return
    directory = shm_dir()
    for obj in recv_reqs:
        batch = getattr(obj, "batch", None)
        for req in batch if isinstance(batch, list) else [obj]:
            vouch(getattr(req, "materialized_mm_inputs", None), directory)


def take_multimodal_inputs(scheduler: Any, recv_req: Any) -> tuple[Optional[Any], Optional[str]]:
    """Return ``(MultimodalInputs or None, error message or None)`` for ``recv_req``.

    - materialized inputs: resolved from their descriptors (no ``from_dict``, no collective);
    - a raw dict (the switch is off, or an unpatched tokenizer): sglang's legacy local
      ``MultimodalInputs.from_dict`` on this rank, never the per-request broadcast;
    - an error: a message for ``req.set_finish_with_abort``; every rank gets the same.

    The only exception it lets out is ``SegmentVanishedError``, on purpose: this rank
    can't map a segment the entry rank vouched for, and must not abort the request alone.
    """
    materialized = getattr(recv_req, "materialized_mm_inputs", None)
    field = raw_mm_field(recv_req)
    raw = getattr(recv_req, field) if field else None
    if materialized is not None:
        try:
            return resolve(materialized, scheduler_consumers_per_send(scheduler), shm_dir()), None
        except MultimodalTransportError as e:
            return None, f"Invalid multimodal inputs: {e}"
    if raw is None:
        return None, None
    from sglang.srt.managers.schedule_batch import MultimodalInputs

    try:
        return MultimodalInputs.from_dict(raw), None
    except Exception as e:  # sglang's from_dict raises assorted errors on bad dicts
        return None, f"Invalid multimodal inputs: from_dict failed: {type(e).__name__}: {e}"
