"""The processes of the scheme comparison and what passes between them.

One *tokenizer* process (``benchmarks/tokenizer_process.py``) and ``--tp`` *scheduler-rank*
processes (``benchmarks/rank_process.py``), spawned for each TP size by
``compare_schemes.run_group`` (ranks form a gloo group through ``torch.distributed`` on a free
TCP port found at run time). All of them import sglang 0.5.5 through the test-only GPU-module
stand-in (``tests/support/gpu_module_standin.py``, see ``benchmarks/_standin.py``); nothing
benchmarked calls into it.

A request's path: the tokenizer builds it and does the mode's tokenizer-side work, then sends
it over a ZMQ PUSH socket to rank 0; rank 0 drains its PULL socket and ``broadcast_pyobj``s
the batch to every rank; every rank does the mode's multimodal handling and a simulated
forward step; then rank 0 reports the request complete to the tokenizer (ZMQ PUSH -> PULL).
A request lives for exactly one iteration of the rank loop.

Measurement window of a cell: the tokenizer sends a ``begin`` control message through
the same path and waits for its acknowledgement, runs the cell, waits for every
completion, sends ``end``; each rank measures between processing ``begin`` and ``end``.
Before the first cell of each (mode, workload) ``--warmup`` requests run unmeasured.

What crosses a process boundary
-------------------------------
- At spawn (pickled): a ``RunConfig`` to every process, the TP group's ``Cell`` list to the
  tokenizer.
- On the request path, among the requests: control messages ``(CTL, kind, payload, token)``
  with kind ``mode`` (payload ``{"mode", "cell"}``: the next cell; the ranks clear their
  per-mode cache), ``begin``, ``end`` (every rank reports its counters) or ``stop``. Rank 0
  answers, after the iteration that carried them, ``("ack", [token, ...])``, and reports
  finished requests as ``("done", [(rid, error or None), ...])``.
- On the results queue (``multiprocessing``, read by the coordinator): ``("ready",
  {workload: feature info})`` from the tokenizer at start-up, ``("tok", cell id, stats)``,
  ``("rank", cell id, rank, stats)``, and ``("error", who, traceback)`` from a process that
  failed.

Segments: both shared-memory modes name their segments with the creating process's pid
(``sglmmpre_<pid>_...``, ``sglbenchup_<pid>_...``); after a TP group the coordinator lists
what its processes left in ``/dev/shm`` (``our_segments``) and removes it.
"""

from __future__ import annotations

import dataclasses
import os
import socket

from benchmarks.schemes import UPSTREAM_PREFIX

__all__ = ["CTL", "SEGMENT_PREFIXES", "SHM_DIR", "Cell", "RunConfig", "free_port", "our_segments"]

CTL = "__bench_ctl__"
SEGMENT_PREFIXES = ("sglmmpre_", UPSTREAM_PREFIX)
SHM_DIR = "/dev/shm"


@dataclasses.dataclass
class Cell:
    """One measured cell: a mode, a workload, a TP size and a concurrency, with its request
    cap (``max_requests``) and the fewest requests (``min_requests``) it issues before
    ``seconds`` may stop it."""

    id: int
    mode: str
    workload: str
    tp: int
    concurrency: int
    max_requests: int
    min_requests: int
    seconds: float


@dataclasses.dataclass
class RunConfig:
    """The run's settings that every benchmark process needs (``forward_wait`` is resolved:
    ``spin`` or ``sleep``)."""

    forward_ms: float
    forward_wait: str
    max_recv_bytes: int
    warmup: int
    lag_interval_ms: float
    seed: int


def free_port() -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def our_segments(pids: set[int]) -> list[str]:
    """Segment files in /dev/shm whose creator pid (in the name) is one of ``pids``."""
    found = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return found
    for name in names:
        for prefix in SEGMENT_PREFIXES:
            if name.startswith(prefix):
                try:
                    pid = int(name[len(prefix):].split("_", 1)[0])
                except ValueError:
                    continue
                if pid in pids:
                    found.append(name)
    return sorted(found)
