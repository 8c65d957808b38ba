"""CPU time each scheduler rank spends inside ``ModelRunner.forward`` (test/benchmark-only).

What it measures: around every call of ``ModelRunner.forward``
(``sglang/srt/model_executor/model_runner.py``: the model's forward, the vision encoder
included, for every prefill and decode batch), the process's CPU time
(``time.process_time``: every thread of the process, so the OpenMP threads of the forward
count, and so would another thread of the rank running at the same moment; sglang's
scheduler does its work on the calling thread). What a rank's CPU holds beyond it
(receiving and broadcasting requests, ``from_dict``, hashing, scheduling, sampling,
sending outputs) is what bounds a scheduler once a GPU runs the forward.

``server_boot/sitecustomize.py`` calls :func:`install` in every server process when
``SGLANG_MMPRE_TEST_FORWARD_CPU_LOG`` names a directory; only processes that import
``model_runner`` and call ``forward`` (the scheduler ranks) write.

File: ``<dir>/forward_cpu-<pid>.txt``, appended by that process only, one line per call,
``"<time.time() at the call's end> <cumulative CPU seconds inside forward>\\n"``, flushed
after every line (a reader may still see an incomplete last line, which it skips). The
readers (:func:`forward_cpu_between`) are the benchmark and tests; whoever set the variable
owns the directory. The hook never raises into sglang: an error stops the recording.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

from import_hook import on_class_import

__all__ = ["install", "forward_cpu_between"]

_TARGET = "sglang.srt.model_executor.model_runner"
ENV = "SGLANG_MMPRE_TEST_FORWARD_CPU_LOG"


def _patch(cls: Any, directory: str) -> None:
    original = cls.forward
    if getattr(original, "_sglang_mmpre_forward_cpu", False):
        return
    state = {"total": 0.0, "file": None, "broken": False}

    @functools.wraps(original)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.process_time()
        try:
            return original(self, *args, **kwargs)
        finally:
            if not state["broken"]:
                state["total"] += time.process_time() - t0
                try:
                    if state["file"] is None:
                        path = os.path.join(directory, f"forward_cpu-{os.getpid()}.txt")
                        state["file"] = open(path, "a", buffering=1)
                    state["file"].write(f"{time.time():.6f} {state['total']:.6f}\n")
                except Exception:
                    state["broken"] = True

    forward._sglang_mmpre_forward_cpu = True
    cls.forward = forward


def install(directory: str) -> None:
    """Record the CPU inside ``ModelRunner.forward`` in this process (idempotent)."""
    os.makedirs(directory, exist_ok=True)
    on_class_import(_TARGET, "ModelRunner", lambda cls: _patch(cls, directory))


def _cumulative_at(lines: list[tuple[float, float]], t: float) -> float:
    """The cumulative CPU of the last call that ended at or before ``t`` (0.0 if none)."""
    value = 0.0
    for when, total in lines:
        if when > t:
            break
        value = total
    return value


def forward_cpu_between(directory: str | os.PathLike, start: float,
                        end: float) -> dict[int, float]:
    """``pid -> CPU seconds`` inside ``forward`` in calls that ended in ``(start, end]``."""
    out = {}
    for path in sorted(Path(directory).glob("forward_cpu-*.txt")):
        lines = []
        for line in path.read_text().split("\n")[:-1]:  # the last one may be incomplete
            try:
                when, total = (float(x) for x in line.split())
            except ValueError:
                continue
            lines.append((when, total))
        pid = int(path.stem.rpartition("-")[2])
        out[pid] = _cumulative_at(lines, end) - _cumulative_at(lines, start)
    return out
