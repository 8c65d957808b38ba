"""Count ``torch.distributed`` calls in a real server's processes (test-only, never shipped).

``server_boot/sitecustomize.py`` calls :func:`install` in every server process when
``SGLANG_MMPRE_TEST_COLLECTIVE_LOG`` names a directory. Every collective and point-to-point
function of ``torch.distributed`` is wrapped; each call is counted under the key
``"<handler>/<method>:<function>"``: ``<method>`` is the innermost ``Scheduler`` method (in
``sglang/srt/managers/scheduler.py``) on the call stack, ``<handler>`` the request handler
(``handle_generate_request`` or ``handle_embedding_request``) it runs under, each ``"-"`` when
there is none. A daemon thread writes the counts of each process to
``<dir>/<pid>.json`` (``{"role": ..., "counts": {key: n}}``) every 0.2 s,
replacing the file atomically.

So a test can tell the collectives that request handling makes (``handle_generate_request``:
sglang 0.5.5's per-request ``broadcast_object_list``) from the ones every loop iteration
makes anyway (``recv_requests``: ``broadcast_pyobj``) and the model's own (``all_reduce``).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from collections import Counter

__all__ = ["install", "read_counts"]

_FUNCTIONS = (
    "broadcast", "broadcast_object_list", "all_reduce", "all_gather", "all_gather_object",
    "all_gather_into_tensor", "reduce_scatter_tensor", "reduce", "gather", "scatter",
    "all_to_all_single", "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
)
_SCHEDULER_FILE = os.path.join("managers", "scheduler.py")
_counts: Counter = Counter()
_lock = threading.Lock()


_HANDLERS = ("handle_generate_request", "handle_embedding_request")


def _caller() -> str:
    method = handler = "-"
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith(_SCHEDULER_FILE):
            if method == "-":
                method = frame.f_code.co_name
            if frame.f_code.co_name in _HANDLERS:
                handler = frame.f_code.co_name
                break
        frame = frame.f_back
    return f"{handler}/{method}"


def _wrap(name: str, fn):
    @functools.wraps(fn)
    def counted(*args, **kwargs):
        key = f"{_caller()}:{name}"
        with _lock:
            _counts[key] += 1
        return fn(*args, **kwargs)

    counted._sglang_mmpre_counted = True
    return counted


def _role() -> str:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        cmd = ""
    return cmd.split()[0][len("sglang::"):] if cmd.startswith("sglang::") else "tokenizer"


def _writer(directory: str) -> None:
    path = os.path.join(directory, f"{os.getpid()}.json")
    while True:
        with _lock:
            data = {"role": _role(), "counts": dict(_counts)}
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
        time.sleep(0.2)


def install(directory: str) -> None:
    """Wrap the ``torch.distributed`` functions and start the writer thread."""
    import torch.distributed as dist

    for name in _FUNCTIONS:
        fn = getattr(dist, name, None)
        if fn is not None and not getattr(fn, "_sglang_mmpre_counted", False):
            setattr(dist, name, _wrap(name, fn))
    os.makedirs(directory, exist_ok=True)
    threading.Thread(target=_writer, args=(directory,), daemon=True, name="collective_counter").start()


def read_counts(directory: str) -> dict[str, Counter]:
    """``role -> Counter`` of keys over the live files in ``directory``."""
    out: dict[str, Counter] = {}
    for name in os.listdir(directory):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(directory, name)) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        out.setdefault(data["role"], Counter()).update(data["counts"])
    return out
