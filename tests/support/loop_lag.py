"""Event-loop lag of a real server's TokenizerManager (test/benchmark-only, never shipped).

What it measures: how late the TokenizerManager's asyncio loop runs a task that asked to
wake up after 5 ms. A task that sleeps ``asyncio.sleep(0.005)`` again and again records,
per wake-up, ``lag = actual elapsed - 0.005 s`` in milliseconds: the time the loop spent
on something else (a multimodal processor call, pickling, a send) while the task was due.
uvloop's timers have a resolution of 1 ms, so a sample may read slightly below 0. There is
one sample per wake-up: a loop blocked for 100 ms gives one sample of ~95 ms, not twenty,
so percentiles are over wake-ups, not over wall time.

``server_boot/sitecustomize.py`` calls :func:`install` in every server process when
``SGLANG_MMPRE_TEST_LOOP_LAG_LOG`` names a directory. It wraps
``TokenizerManager.auto_create_handle_loop`` (``sglang/srt/managers/tokenizer_manager.py``)
when that module is imported; the first call that has chosen a loop starts the sampler on
it. Only the processes that run a TokenizerManager (the launcher; each
``tokenizer_worker_N`` with ``--tokenizer-worker-num > 1``) sample.

File: ``<dir>/loop_lag-<pid>.txt``, appended by that process only, one line per sample,
``"<time.time()> <lag_ms>\\n"``; samples are buffered and appended at most every 0.5 s
(one ``write`` per flush), so a reader may see an incomplete last line, which it skips.
The readers (:func:`collect_lags`) are the benchmark and tests; whoever set the variable
owns the directory (the benchmark leaves it in its work directory, with the server log). The sampler never raises into sglang: an error stops it silently.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from pathlib import Path
from typing import Any, Optional

from import_hook import on_class_import

__all__ = ["install", "collect_lags"]

INTERVAL_S = 0.005
FLUSH_EVERY_S = 0.5
_TARGET = "sglang.srt.managers.tokenizer_manager"
_task: Optional[asyncio.Task] = None  # one sampler per process; a reference keeps it alive


def _append(path: str, lines: list[str]) -> None:
    try:
        with open(path, "a") as f:
            f.write("".join(lines))
    except OSError:
        pass
    lines.clear()


async def _sample(path: str) -> None:
    buf: list[str] = []
    last_flush = time.perf_counter()
    try:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(INTERVAL_S)
            t1 = time.perf_counter()
            buf.append(f"{time.time():.6f} {(t1 - t0 - INTERVAL_S) * 1e3:.3f}\n")
            if t1 - last_flush >= FLUSH_EVERY_S:
                _append(path, buf)
                last_flush = t1
    except asyncio.CancelledError:
        _append(path, buf)
        raise
    except Exception:  # never into sglang: the samples so far stay valid
        _append(path, buf)


def _patch(cls: Any, directory: str) -> None:
    original = cls.auto_create_handle_loop
    if getattr(original, "_sglang_mmpre_loop_lag", False):
        return

    @functools.wraps(original)
    def auto_create_handle_loop(self: Any) -> Any:
        result = original(self)
        global _task
        try:
            loop = getattr(self, "_chosen_loop", None)
            if _task is None and loop is not None:
                path = os.path.join(directory, f"loop_lag-{os.getpid()}.txt")
                _task = loop.create_task(_sample(path))
        except Exception:
            pass
        return result

    auto_create_handle_loop._sglang_mmpre_loop_lag = True
    cls.auto_create_handle_loop = auto_create_handle_loop


def install(directory: str) -> None:
    """Sample the TokenizerManager's loop of this process, if it runs one (idempotent)."""
    os.makedirs(directory, exist_ok=True)
    on_class_import(_TARGET, "TokenizerManager", lambda cls: _patch(cls, directory))


def _latest(path: Path) -> float:
    """Timestamp of the last complete sample in ``path`` (0.0 if none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 256))
            lines = f.read().split(b"\n")[:-1]
        return float(lines[-1].split()[0]) if lines else 0.0
    except (OSError, ValueError, IndexError):
        return 0.0


def collect_lags(directory: str | os.PathLike, start: float, end: float,
                 timeout_s: float = 5.0) -> list[float]:
    """Lags (ms) of every sampling process in ``directory`` with ``start <= time <= end``.

    Waits (up to ``timeout_s``) until every file holds a sample after ``end``, as the
    samplers flush at most every 0.5 s. Empty if no process sampled (hook not installed).
    """
    files = sorted(Path(directory).glob("loop_lag-*.txt"))
    deadline = time.monotonic() + timeout_s
    while files and time.monotonic() < deadline and min(map(_latest, files)) < end:
        time.sleep(0.1)
    lags = []
    for path in files:
        for line in path.read_text().split("\n")[:-1]:  # the last one may be incomplete
            t, _, lag = line.partition(" ")
            try:
                if start <= float(t) <= end:
                    lags.append(float(lag))
            except ValueError:
                continue
    return lags

