"""What the patched ``Scheduler.handle_generate_request`` / ``handle_embedding_request``
call, first thing, before any early return (so that every received request drops its
segment reference on every rank, even when it is aborted right after)."""

from __future__ import annotations

import logging
from typing import Any, Optional

from sglang_mmpre.config import scheduler_consumers_per_send, shm_dir
from sglang_mmpre.errors import MultimodalTransportError
from sglang_mmpre.scheduler_side.resolve import resolve
from sglang_mmpre.transport.carrier import raw_mm_field

__all__ = ["take_multimodal_inputs"]

logger = logging.getLogger(__name__)


def take_multimodal_inputs(scheduler: Any, recv_req: Any) -> tuple[Optional[Any], Optional[str]]:
    """Return ``(MultimodalInputs or None, error message or None)`` for ``recv_req``.

    - materialized inputs: resolved from their descriptors (no ``from_dict``, no collective);
    - a raw dict (the switch is off, or an unpatched tokenizer): sglang's legacy local
      ``MultimodalInputs.from_dict`` on this rank, never the per-request broadcast;
    - an error: a message for ``req.set_finish_with_abort``; every rank gets the same.
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
