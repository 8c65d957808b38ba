"""Tokenized requests and scheduler ranks for the reliability tests (never shipped).

Builds ``TokenizedGenerateReqInput`` objects the way the patched TokenizerManager does
(``TokenizerSide.materialize_request`` then ``TokenizerSide.send``), captures what goes
on the wire as pickles, and replays one pickle through N ``SchedulerUnderTest`` ranks the
way the patched ``recv_requests`` does: the entry rank vouches for its segment, then
sglang's ``broadcast_pyobj`` hands every TP rank its own unpickled copy.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import struct
from typing import Any, Optional

from sglang_mmpre.scheduler_side.hooks import vouch_for_segments

from mm_fixtures import image_mm_dict
from scheduler_harness import SchedulerUnderTest

__all__ = [
    "N_IMAGE_TOKENS",
    "RecordingSocket",
    "tokenized_request",
    "materialized_request",
    "send_captured",
    "run_ranks",
    "segment_refcount",
    "write_refcount",
]

N_IMAGE_TOKENS = 64
IMAGE_TOKEN = 261  # im_token_id of mm_fixtures.image_mm_dict


class RecordingSocket:
    """Stands in for the ZMQ PUSH socket: keeps the pickle of every object sent."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send_pyobj(self, obj: Any) -> None:
        self.sent.append(pickle.dumps(obj))


def tokenized_request(mm_inputs: Optional[dict], rid: str, max_new_tokens: int = 8) -> Any:
    """A ``TokenizedGenerateReqInput`` as ``_create_tokenized_object`` builds it."""
    from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
    from sglang.srt.sampling.sampling_params import SamplingParams

    input_ids = [1, 2, 3] + [IMAGE_TOKEN] * N_IMAGE_TOKENS + [4, 5]
    sp = SamplingParams(max_new_tokens=max_new_tokens)
    return TokenizedGenerateReqInput(
        "Describe:", input_ids, mm_inputs, sp, False, -1, 0, None, False, rid=rid
    )


def materialized_request(side: Any, rid: str, width: int = 64, height: int = 64,
                         seed: int = 0) -> Any:
    """A tokenized request whose inputs ``side`` materialized (segment created, not sent)."""
    req = tokenized_request(image_mm_dict(width, height, seed, n_tokens=N_IMAGE_TOKENS), rid)
    return asyncio.run(side.materialize_request(req))


def send_captured(side: Any, req: Any) -> bytes:
    """``side.send`` ``req`` (counting its consumers) and return the pickle that left."""
    sock = RecordingSocket()
    side.send(sock, req)
    return sock.sent[0]


def run_ranks(blob: bytes, tp_size: int, schedulers: Optional[list] = None) -> list:
    """Feed one pickled request to ``tp_size`` ranks; return the ``Req`` each queued."""
    entry_copy = pickle.loads(blob)  # what recv_pyobj gives the entry rank
    vouch_for_segments([entry_copy])
    blob = pickle.dumps(entry_copy)  # what broadcast_pyobj hands every rank
    if schedulers is None:
        schedulers = [SchedulerUnderTest(tp_size=tp_size, tp_rank=r) for r in range(tp_size)]
    out = []
    for sched in schedulers:
        before = len(sched.queued)
        sched.handle_generate_request(pickle.loads(blob))
        (req,) = sched.queued[before:]
        out.append(req)
    return out


_REFCOUNT = struct.Struct("<q")


def segment_refcount(path: str | os.PathLike) -> int:
    """The refcount field of a segment header (byte 24), read without locking."""
    with open(path, "rb") as f:
        f.seek(24)
        return _REFCOUNT.unpack(f.read(8))[0]


def write_refcount(path: str | os.PathLike, value: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, _REFCOUNT.pack(value), 24)
    finally:
        os.close(fd)
