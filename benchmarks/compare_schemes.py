"""Side-by-side benchmark of every multimodal-input scheme.

    python -m benchmarks.compare_schemes            # default run (< 10 min on 2 cores)
    python -m benchmarks.compare_schemes --quick    # smoke run (< 1 min)
    python -m benchmarks.compare_schemes --help

The schemes (``--modes``) are described in ``benchmarks/schemes.py``.

Harness
-------
One *tokenizer* process and ``--tp`` *scheduler-rank* processes (spawned; ranks form a
gloo group through ``torch.distributed`` on a free TCP port found at run time). All of
them import sglang 0.5.5 through the test-only GPU-module stand-in
(``tests/support/gpu_module_standin.py``, see ``benchmarks/_standin.py``); nothing
benchmarked calls into it.

- The tokenizer runs an asyncio loop. The processor output of each workload (real HF
  Qwen2-VL image processor on generated images, or the video processor on generated
  frames) is computed once at start-up; each request gets a fresh mm dict around it and
  then the mode's tokenizer-side work (nothing / pickling only for the legacy modes;
  ``set_pad_value`` + one shm segment per feature for upstream; ``materialize_request``
  in worker threads for tokenizer_stage), then is sent with ``send_pyobj`` over a ZMQ
  PUSH socket to rank 0. A closed loop keeps at most ``C`` requests in flight.
- Rank 0 iterates like sglang's ``recv_requests``: drain its PULL socket without
  blocking (``--max-recv-bytes`` caps one drain), ``broadcast_pyobj`` the list to every
  rank (all ranks call it every iteration), then every rank handles the multimodal
  inputs per mode, then a simulated forward step (``--forward-ms`` wait + an
  ``all_reduce`` of a small tensor, which keeps the ranks in lockstep as NCCL would).
  After that step rank 0 reports the iteration's requests as complete to the tokenizer
  (ZMQ PUSH -> PULL). A request lives for exactly one such iteration.
- When idle (the previous iteration had no request), rank 0 waits up to 20 ms on its
  socket before draining, instead of spinning (peers wait inside the gloo broadcast).

Measurement window of a cell: the tokenizer sends a ``begin`` control message through
the same path and waits for its acknowledgement, runs the cell, waits for every
completion, sends ``end``; each rank measures between processing ``begin`` and ``end``.
Before the first cell of each (mode, workload) ``--warmup`` requests run unmeasured.

Metrics (one row per mode, workload, TP, concurrency)
----------------------------------------------------
throughput_rps           measured requests / wall time from the first send to the last
                         completion report (tokenizer clock).
p50_ms, p99_ms           per request: start of its tokenizer-side handling (fresh dict,
                         mode work, pickling, send) -> its completion report arriving.
sched_cpu_ms_per_req     sum over ranks of process CPU time (``time.process_time``: all
                         threads, user+sys) in the window, minus the CPU spent inside the
                         simulated forward step (wait + its all_reduce), / requests.
                         Includes receiving/unpickling on rank 0, ``broadcast_pyobj``,
                         the mode's multimodal handling and idle-loop overhead.
sched_mm_cpu_ms_per_req  the part of it spent in the mode's multimodal handling only.
tok_cpu_ms_per_req       tokenizer process CPU time (all threads) in the window /
                         requests: building requests, mode work, pickling, ZMQ, the
                         event loop itself (floor is the baseline of this overhead).
bytes_per_req            bytes pickled into ZMQ frames by the tokenizer (requests only)
                         + payload bytes rank 0 broadcasts through gloo for
                         ``broadcast_pyobj`` + for the multimodal collectives
                         (``broadcast_object_list``), counted once at the source (not
                         times the receivers), / requests. Split in zmq_/req_bcast_/
                         mm_bcast_bytes_per_req. Shared-memory traffic is not in it; it
                         is shm_bytes_per_req (bytes written into segments).
collectives_per_req      collective calls issued by one rank for multimodal handling
                         (``broadcast_object_list``, ``barrier``, ``all_reduce`` of the
                         failure flags), / requests. Not included, reported apart:
                         req_bcast_per_req (``broadcast_pyobj`` calls, one per loop
                         iteration in every mode) and fwd_allreduce_per_req (the
                         simulated forward's all_reduce).
loop_lag_ms_max, _p99    lag of a 5 ms ticker coroutine on the tokenizer's event loop
                         (actual sleep - requested) during the window. A loop blocked for
                         long stretches yields few ticks, so there p99 approaches max.

Outputs: ``<out>/<timestamp>.json``, ``<timestamp>.md`` (the table, also printed last on
stdout), ``<timestamp>_throughput_vs_concurrency.png`` (the sweep workload, first TP) and
``<timestamp>_sched_cpu_vs_feature_size.png`` (main concurrency, first TP).

Default run and its budget (2 CPU cores, 10 minutes)
----------------------------------------------------
TP=4; all six modes; workloads 448x448, 1120x700, 1920x1080, video16 at concurrency 64,
plus concurrency 1, 16, 100 for 1120x700 (42 cells). A cell issues requests until its
request cap is reached or, once at least ``--min-requests`` (default: twice the
concurrency, within the cap) were issued, ``--cell-seconds`` (3 s) have passed; then it
waits for those in flight. Each cell starts cold: its first C requests are built and sent
back to back. The request cap is ``--requests`` (200), but ``--legacy-max-requests`` (32)
for original / per_request_broadcast / batch_broadcast: on 2 cores with TP=4 those run at
~1-3 req/s for the large workloads, so one closed-loop wave of 64 or 100 requests alone
would take 30-60 s per cell. Where the cap is below the concurrency, the cell measures a
burst of that many requests, all in flight at once ("C eff" = min(C, n)): throughput is
the saturated throughput, but latency is that of an n-request burst, i.e. *lower* than the
steady state of C requests in flight (about C / throughput). The ``n`` column says how
many requests a cell measured; p99 over fewer than 100 requests is their maximum.
``loop_lag_ms_max`` includes the cell's opening burst (up to C requests built and sent
back to back on the loop).

Forward wait: ``--forward-wait auto`` busy-waits when the machine has at least TP + 2
cores, else sleeps: with 4 ranks on 2 cores, four spinning ranks would starve the
tokenizer and the very multimodal work being measured. ``spin`` forces busy-waiting.
Each process uses one torch thread (``torch.set_num_threads(1)``).

Memory: ``--max-recv-bytes`` (512 MiB) caps what rank 0 drains in one iteration (as
upstream's ``max_recv_per_poll`` caps counts) so that the legacy modes' per-iteration
``broadcast_pyobj`` of whole feature tensors (pickled once, copied, then received,
copied and unpickled on every peer) fits in memory; 0 = unlimited, as sglang 0.5.5.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import multiprocessing as mp
import os
import pickle
import platform
import queue as queue_mod
import shutil
import socket
import sys
import tempfile
import time
import traceback
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Optional

from benchmarks import _standin

_standin.install()  # before any sglang import (see _standin's docstring)

from benchmarks.schemes import LEGACY_MODES, MODES, UPSTREAM_PREFIX, WORKLOADS  # noqa: E402

CTL = "__bench_ctl__"
SEGMENT_PREFIXES = ("sglmmpre_", UPSTREAM_PREFIX)
SHM_DIR = "/dev/shm"
IDLE_POLL_MS = 20
DEFAULT_OUT = _standin.REPO_ROOT / "benchmarks" / "results"


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Cell:
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
    forward_ms: float
    forward_wait: str
    max_recv_bytes: int
    warmup: int
    lag_interval_ms: float
    seed: int


def _csv(kind):
    def parse(text: str):
        return [kind(x) for x in text.split(",") if x.strip()]

    return parse


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare_schemes",
        description="Side-by-side benchmark of the multimodal-input schemes "
        "(see the module docstring for the metrics).",
    )
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run (< 1 min): TP=2, 448x448, C=4, 6 requests per cell, 5 ms "
                   "forward (options given explicitly still apply)")
    p.add_argument("--modes", type=_csv(str), default=list(MODES),
                   help=f"comma list of modes (default: all: {','.join(MODES)})")
    p.add_argument("--workloads", type=_csv(str), default=list(WORKLOADS),
                   help=f"comma list of workloads (default: all: {','.join(WORKLOADS)})")
    p.add_argument("--tp", type=_csv(int), default=[4],
                   help="comma list of TP sizes, e.g. 1,2,4,8 (default: 4)")
    p.add_argument("--concurrency", type=_csv(int), default=[64],
                   help="concurrency for every workload (default: 64)")
    p.add_argument("--sweep-workload", default="1120x700",
                   help="workload that also runs the concurrency sweep (default: 1120x700; "
                   "'none' to skip)")
    p.add_argument("--sweep-concurrency", type=_csv(int), default=[1, 16, 64, 100],
                   help="concurrency values of the sweep (default: 1,16,64,100)")
    p.add_argument("--requests", type=int, default=200,
                   help="most requests one cell issues (default: 200)")
    p.add_argument("--legacy-max-requests", type=int, default=32,
                   help="most requests one cell of a legacy mode (original, "
                   "per_request_broadcast, batch_broadcast) issues (default: 32; 0 = --requests). "
                   "Where it is below the concurrency, the cell measures one burst of that many "
                   "requests (column 'C eff')")
    p.add_argument("--min-requests", type=int, default=None,
                   help="fewest requests one cell issues before --cell-seconds may stop it "
                   "(default: twice the cell's concurrency, within the cell's request cap)")
    p.add_argument("--cell-seconds", type=float, default=3.0,
                   help="stop issuing after this many seconds once --min-requests were "
                   "issued (default: 3)")
    p.add_argument("--forward-ms", type=float, default=20.0,
                   help="simulated forward step per iteration with requests (default: 20)")
    p.add_argument("--forward-wait", choices=("auto", "spin", "sleep"), default="auto",
                   help="busy-wait or sleep during the forward step (default: auto = spin "
                   "when cores >= TP + 2, else sleep)")
    p.add_argument("--max-recv-bytes", type=int, default=512 << 20,
                   help="most ZMQ bytes rank 0 drains per iteration (default: 512 MiB; "
                   "0 = unlimited)")
    p.add_argument("--warmup", type=int, default=2,
                   help="unmeasured requests before the first cell of each mode+workload "
                   "(default: 2)")
    p.add_argument("--lag-interval-ms", type=float, default=5.0,
                   help="period of the event-loop lag ticker (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="image generator seed")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="output directory (default: benchmarks/results)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--from-json", type=Path, default=None, metavar="PATH",
                   help="run nothing: rewrite the Markdown table and the plots of an earlier "
                   "run's JSON next to it, and print the table")
    args = p.parse_args(argv)
    if args.quick:  # overrides only what the command line left at its default
        quick = {"tp": [2], "workloads": ["448x448"], "concurrency": [4],
                 "sweep_workload": "none", "requests": 6, "min_requests": 6,
                 "cell_seconds": 0.5, "forward_ms": 5.0, "warmup": 1}
        for key, value in quick.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    for w in args.workloads + ([] if args.sweep_workload == "none" else [args.sweep_workload]):
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    if any(t < 1 for t in args.tp) or any(c < 1 for c in args.concurrency + args.sweep_concurrency):
        p.error("TP sizes and concurrency values must be >= 1")
    return args


def build_cells(args: argparse.Namespace) -> list[Cell]:
    """Cells grouped by TP; inside a group, modes interleave per (workload, concurrency)."""
    combos: list[tuple[str, int]] = []
    for w in args.workloads:
        for c in args.concurrency:
            combos.append((w, c))
    if args.sweep_workload != "none":
        for c in args.sweep_concurrency:
            if (args.sweep_workload, c) not in combos:
                combos.append((args.sweep_workload, c))
    cells = []
    for tp in args.tp:
        for w, c in combos:
            for mode in args.modes:
                max_req = args.requests
                if mode in LEGACY_MODES and args.legacy_max_requests > 0:
                    max_req = min(max_req, args.legacy_max_requests)
                min_req = args.min_requests
                if min_req is None:
                    min_req = min(2 * c, max_req)
                cells.append(Cell(len(cells), mode, w, tp, c, max_req,
                                  min(min_req, max_req), args.cell_seconds))
    return cells


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(k, len(ordered)) - 1]


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


def machine_info() -> dict:
    from importlib import metadata

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass

    def version(dist: str) -> Optional[str]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    try:
        st = os.statvfs(SHM_DIR)
        shm_gib = round(st.f_blocks * st.f_frsize / 2**30, 1)
    except OSError:
        shm_gib = None
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": mem_gib,
        "dev_shm_gib": shm_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "sglang": version("sglang"),
        "transformers": version("transformers"),
        "pyzmq": version("pyzmq"),
        "gpu": None,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


# --------------------------------------------------------------------------------------
# Scheduler-rank process
# --------------------------------------------------------------------------------------


class RankCounters:
    """Collective calls and broadcast bytes by phase, plus CPU by phase, in the window."""

    def __init__(self) -> None:
        self.phase = "other"
        self.reset()

    def reset(self) -> None:
        self.calls: dict[str, int] = {}
        self.bcast_bytes: dict[str, int] = {}
        self.cpu: dict[str, float] = {}
        self.n_reqs = 0
        self.errors = 0
        self.iterations = 0
        self.work_iterations = 0

    def call(self, op: str) -> None:
        key = f"{self.phase}:{op}"
        self.calls[key] = self.calls.get(key, 0) + 1

    def add_cpu(self, phase: str, seconds: float) -> None:
        self.cpu[phase] = self.cpu.get(phase, 0.0) + seconds


def install_collective_counting(counters: RankCounters) -> None:
    """Count, by phase, the collectives issued through ``torch.distributed``.

    ``broadcast`` is wrapped under both names it is called by: ``torch.distributed.broadcast``
    (sglang's ``broadcast_pyobj``) and ``distributed_c10d.broadcast`` (what
    ``broadcast_object_list`` calls); its tensor bytes are the collective's payload. The
    API-level calls ``broadcast_object_list``, ``barrier`` and ``all_reduce`` are counted as
    calls (sglang's scheduler calls ``torch.distributed.broadcast_object_list`` by attribute,
    so the wrapper sees it).
    """
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    original_broadcast = c10d.broadcast

    def broadcast(tensor, *args, **kwargs):
        counters.bcast_bytes[counters.phase] = (
            counters.bcast_bytes.get(counters.phase, 0) + tensor.numel() * tensor.element_size()
        )
        counters.call("broadcast")
        return original_broadcast(tensor, *args, **kwargs)

    c10d.broadcast = broadcast
    dist.broadcast = broadcast

    for name in ("broadcast_object_list", "barrier", "all_reduce"):
        original = getattr(dist, name)

        def wrapper(*args, __original=original, __name=name, **kwargs):
            counters.call(__name)
            return __original(*args, **kwargs)

        setattr(dist, name, wrapper)


def rank_main(rank: int, world: int, port: int, req_addr: str, done_addr: str,
              results: Any, cfg: RunConfig) -> None:
    try:
        _rank_loop(rank, world, port, req_addr, done_addr, results, cfg)
    except BaseException:
        results.put(("error", f"rank{rank}", traceback.format_exc()))
        raise


def _drain(sock, max_bytes: int) -> list:
    """sglang's ``recv_requests`` drain: non-blocking ``recv_pyobj`` until empty (or the
    byte cap is reached)."""
    import zmq

    out = []
    total = 0
    while True:
        if max_bytes and total >= max_bytes:
            break
        try:
            frame = sock.recv(zmq.NOBLOCK)
        except zmq.ZMQError:
            break
        total += len(frame)
        out.append(pickle.loads(frame))
    return out


def _rank_loop(rank: int, world: int, port: int, req_addr: str, done_addr: str,
               results: Any, cfg: RunConfig) -> None:
    import warnings

    import torch

    # sglang's broadcast_pyobj wraps a read-only bytes buffer; torch warns once per process.
    warnings.filterwarnings("ignore", message="The given buffer is not writable")

    torch.set_num_threads(1)
    import torch.distributed as dist
    import zmq

    from benchmarks.schemes import RankContext, handle_batch, wait_forward
    from sglang.srt.managers.scheduler import Scheduler  # noqa: F401  (import cost up front)
    from sglang.srt.utils import broadcast_pyobj

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(minutes=10),
    )
    group = dist.group.WORLD
    counters = RankCounters()
    install_collective_counting(counters)
    ctx = RankContext(rank=rank, world=world, group=group)
    fwd_tensor = torch.zeros(8)

    zctx = pull = push = poller = None
    if rank == 0:
        zctx = zmq.Context()
        pull = zctx.socket(zmq.PULL)
        pull.bind(req_addr)
        push = zctx.socket(zmq.PUSH)
        push.connect(done_addr)
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)

    mode: Optional[str] = None
    cell_id: Optional[int] = None
    window_cpu0 = 0.0
    idle = True
    stop = False
    cpu = time.process_time
    try:
        while not stop:
            c0 = cpu()
            if rank == 0:
                if idle:
                    poller.poll(IDLE_POLL_MS)
                counters.phase = "recv"
                batch = _drain(pull, cfg.max_recv_bytes)
            else:
                batch = []
            c1 = cpu()
            counters.phase = "req_bcast"
            if world > 1:
                batch = broadcast_pyobj(batch, rank, group, src=0)
                counters.call("broadcast_pyobj")
            counters.phase = "other"
            c2 = cpu()
            counters.add_cpu("recv", c1 - c0)
            counters.add_cpu("req_bcast", c2 - c1)

            gen = []
            acks = []
            for item in batch:
                if isinstance(item, tuple) and item and item[0] == CTL:
                    _, kind, payload, token = item
                    if kind == "mode":
                        mode = payload["mode"]
                        cell_id = payload["cell"]
                        ctx.cache.clear()
                    elif kind == "begin":
                        counters.reset()
                        window_cpu0 = cpu()
                    elif kind == "end":
                        total = cpu() - window_cpu0
                        results.put(("rank", cell_id, rank, {
                            "cpu_s": total,
                            "cpu_by_phase_s": dict(counters.cpu),
                            "calls": dict(counters.calls),
                            "bcast_bytes": dict(counters.bcast_bytes),
                            "n_reqs": counters.n_reqs,
                            "errors": counters.errors,
                            "iterations": counters.iterations,
                            "work_iterations": counters.work_iterations,
                        }))
                    elif kind == "stop":
                        stop = True
                    acks.append(token)
                else:
                    gen.append(item)
            batch = None

            if gen:
                c3 = cpu()
                counters.phase = "mm"
                handled = handle_batch(mode, ctx, gen)
                counters.phase = "fwd"
                c4 = cpu()
                wait_forward(cfg.forward_ms, cfg.forward_wait)
                if world > 1:
                    dist.all_reduce(fwd_tensor, group=group)
                counters.phase = "other"
                c5 = cpu()
                counters.add_cpu("mm", c4 - c3)
                counters.add_cpu("fwd", c5 - c4)
                counters.n_reqs += len(gen)
                counters.work_iterations += 1
                done = [(rid, err) for rid, _inputs, err in handled]
                counters.errors += sum(1 for _, err in done if err)
                handled = None  # drop the inputs (and their mappings) with the iteration
                if rank == 0:
                    push.send_pyobj(("done", done))
            if rank == 0 and acks:
                push.send_pyobj(("ack", acks))
            counters.iterations += 1
            idle = not gen
            gen = None
    finally:
        if rank == 0:
            pull.close(linger=0)
            push.close(linger=2000)
            zctx.term()
        if dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------
# Tokenizer process
# --------------------------------------------------------------------------------------


class CountingSocket:
    """``send_pyobj`` as pyzmq does it (pickle, then send), counting the frame bytes."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.bytes = 0

    def send_pyobj(self, obj, flags: int = 0) -> None:
        data = pickle.dumps(obj, pickle.DEFAULT_PROTOCOL)
        self.bytes += len(data)
        self.sock.send(data, flags)


def tokenizer_main(tp: int, req_addr: str, done_addr: str, results: Any,
                   cells: list[Cell], cfg: RunConfig) -> None:
    try:
        asyncio.run(_tokenizer(tp, req_addr, done_addr, results, cells, cfg))
    except BaseException:
        results.put(("error", "tokenizer", traceback.format_exc()))
        raise


async def _tokenizer(tp: int, req_addr: str, done_addr: str, results: Any,
                     cells: list[Cell], cfg: RunConfig) -> None:
    import types

    import torch

    torch.set_num_threads(1)
    import zmq
    import zmq.asyncio

    from benchmarks.schemes import (
        PLACEHOLDER,
        compute_features,
        fresh_mm_dict,
        make_request,
        upstream_prepare,
    )
    from sglang_mmpre.tokenizer_side.manager import TokenizerSide

    features = {}
    for w in dict.fromkeys(c.workload for c in cells):
        features[w] = compute_features(w, seed=cfg.seed)
    results.put(("ready", {w: {"feature_shape": list(f.feature.shape),
                               "feature_bytes": f.nbytes,
                               "tokens": len(f.input_ids)} for w, f in features.items()}))

    side = TokenizerSide(types.SimpleNamespace(
        tp_size=tp, pp_size=1, dp_size=1, enable_dp_attention=False, dist_init_addr=None,
        nnodes=1,
    ))
    sync_ctx = zmq.Context()
    push = sync_ctx.socket(zmq.PUSH)
    push.connect(req_addr)
    sock = CountingSocket(push)
    actx = zmq.asyncio.Context()
    pull = actx.socket(zmq.PULL)
    pull.bind(done_addr)

    loop = asyncio.get_running_loop()
    pending: dict[str, asyncio.Future] = {}
    acks: dict[int, asyncio.Future] = {}
    state = types.SimpleNamespace(measuring=False, lags=[], shm_bytes=0, token=0)

    async def reader() -> None:
        while True:
            kind, payload = await pull.recv_pyobj()
            if kind == "done":
                for rid, err in payload:
                    fut = pending.pop(rid, None)
                    if fut is not None and not fut.done():
                        fut.set_result(err)
            elif kind == "ack":
                for token in payload:
                    fut = acks.pop(token, None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)

    async def ticker() -> None:
        interval = cfg.lag_interval_ms / 1000.0
        while True:
            t = time.perf_counter()
            await asyncio.sleep(interval)
            lag = time.perf_counter() - t - interval
            if state.measuring:
                state.lags.append(lag)

    async def control(kind: str, payload: Any = None, timeout: float = 600.0) -> None:
        state.token += 1
        fut = loop.create_future()
        acks[state.token] = fut
        sock.send_pyobj((CTL, kind, payload, state.token))
        await asyncio.wait_for(fut, timeout)

    async def one(rid: str, mode: str, f, latencies: Optional[list]) -> Optional[str]:
        t0 = time.perf_counter()
        if mode == "floor":
            req = make_request(rid, f, None)
            req.bench_placeholder = PLACEHOLDER
        else:
            req = make_request(rid, f, fresh_mm_dict(f))
        if mode == "upstream_shm_barrier":
            _, nbytes = upstream_prepare(req.mm_inputs)
            state.shm_bytes += nbytes
        elif mode == "tokenizer_stage":
            await side.materialize_request(req)
            writer = req.materialized_mm_inputs.writer
            state.shm_bytes += writer.payload_nbytes if writer is not None else 0
        fut = loop.create_future()
        pending[rid] = fut
        if mode == "tokenizer_stage":
            side.send(sock, req)
        else:
            sock.send_pyobj(req)
        del req
        err = await fut
        if latencies is not None:
            latencies.append(time.perf_counter() - t0)
        return err

    async def run_cell(cell: Cell, warmed: set) -> dict:
        f = features[cell.workload]
        await control("mode", {"mode": cell.mode, "cell": cell.id})
        if (cell.mode, cell.workload) not in warmed:
            for i in range(cfg.warmup):
                await one(f"c{cell.id}-w{i}", cell.mode, f, None)
            warmed.add((cell.mode, cell.workload))
        await control("begin")
        sock.bytes = 0
        state.shm_bytes = 0
        state.lags = []
        latencies: list[float] = []
        sem = asyncio.Semaphore(cell.concurrency)
        tasks: list[asyncio.Task] = []
        state.measuring = True
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        deadline = t0 + cell.seconds
        n = 0
        while n < cell.max_requests:
            if n >= cell.min_requests and time.perf_counter() >= deadline:
                break
            await sem.acquire()
            if n >= cell.min_requests and time.perf_counter() >= deadline:
                sem.release()
                break
            task = loop.create_task(one(f"c{cell.id}-{n}", cell.mode, f, latencies))
            task.add_done_callback(lambda _t: sem.release())
            tasks.append(task)
            n += 1
        errs = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        state.measuring = False
        zmq_bytes = sock.bytes
        await control("end")
        return {
            "n": n,
            "errors": sum(1 for e in errs if e),
            "first_error": next((e for e in errs if e), None),
            "wall_s": wall,
            "cpu_s": cpu,
            "latencies_s": latencies,
            "zmq_bytes": zmq_bytes,
            "shm_bytes": state.shm_bytes,
            "lags_s": state.lags,
        }

    reader_task = loop.create_task(reader())
    ticker_task = loop.create_task(ticker())
    warmed: set = set()
    try:
        for cell in cells:
            stats = await run_cell(cell, warmed)
            results.put(("tok", cell.id, stats))
        await control("stop", timeout=60)
    finally:
        reader_task.cancel()
        ticker_task.cancel()
        side.shutdown()
        push.close(linger=1000)
        pull.close(linger=0)
        sync_ctx.term()
        actx.term()


# --------------------------------------------------------------------------------------
# Coordinator
# --------------------------------------------------------------------------------------


def _row(cell: Cell, tok: dict, ranks: list[dict], features: dict) -> dict:
    n = max(1, tok["n"])
    lat_ms = [x * 1000 for x in tok["latencies_s"]]
    lags_ms = [x * 1000 for x in tok["lags_s"]]
    sched_cpu = sum(r["cpu_s"] - r["cpu_by_phase_s"].get("fwd", 0.0) for r in ranks)
    sched_mm_cpu = sum(r["cpu_by_phase_s"].get("mm", 0.0) for r in ranks)
    r0 = next(r for r in ranks if r["rank"] == 0)
    calls0 = r0["calls"]
    mm_coll = sum(calls0.get(f"mm:{op}", 0) for op in ("broadcast_object_list", "barrier", "all_reduce"))
    req_bcast_bytes = r0["bcast_bytes"].get("req_bcast", 0)
    mm_bcast_bytes = r0["bcast_bytes"].get("mm", 0)
    return {
        "mode": cell.mode,
        "workload": cell.workload,
        "tp": cell.tp,
        "concurrency": cell.concurrency,
        "requests": tok["n"],
        "effective_concurrency": min(cell.concurrency, tok["n"]),
        "errors": tok["errors"],
        "rank_errors": sum(r["errors"] for r in ranks),
        "first_error": tok["first_error"],
        "feature_mb": round(features[cell.workload]["feature_bytes"] / 1e6, 2),
        "throughput_rps": tok["n"] / tok["wall_s"] if tok["wall_s"] > 0 else float("nan"),
        "p50_ms": percentile(lat_ms, 50),
        "p99_ms": percentile(lat_ms, 99),
        "sched_cpu_ms_per_req": sched_cpu * 1000 / n,
        "sched_mm_cpu_ms_per_req": sched_mm_cpu * 1000 / n,
        "tok_cpu_ms_per_req": tok["cpu_s"] * 1000 / n,
        "bytes_per_req": (tok["zmq_bytes"] + req_bcast_bytes + mm_bcast_bytes) / n,
        "zmq_bytes_per_req": tok["zmq_bytes"] / n,
        "req_bcast_bytes_per_req": req_bcast_bytes / n,
        "mm_bcast_bytes_per_req": mm_bcast_bytes / n,
        "shm_bytes_per_req": tok["shm_bytes"] / n,
        "collectives_per_req": mm_coll / n,
        "req_bcast_per_req": calls0.get("req_bcast:broadcast_pyobj", 0) / n,
        "fwd_allreduce_per_req": calls0.get("fwd:all_reduce", 0) / n,
        "loop_lag_ms_max": max(lags_ms) if lags_ms else float("nan"),
        "loop_lag_ms_p99": percentile(lags_ms, 99),
        "wall_s": tok["wall_s"],
        "rank_iterations": r0["iterations"],
        "rank_work_iterations": r0["work_iterations"],
    }


def run_group(tp: int, cells: list[Cell], cfg: RunConfig, pbar, log) -> tuple[list[dict], dict]:
    """Run every cell of one TP size in one set of processes; returns rows and info."""
    spawn = mp.get_context("spawn")
    tmpdir = tempfile.mkdtemp(prefix="sglbench_")
    req_addr = f"ipc://{tmpdir}/req"
    done_addr = f"ipc://{tmpdir}/done"
    results = spawn.Queue()
    port = free_port()
    procs = [
        spawn.Process(target=rank_main, name=f"bench-rank{r}",
                      args=(r, tp, port, req_addr, done_addr, results, cfg))
        for r in range(tp)
    ]
    procs.append(spawn.Process(target=tokenizer_main, name="bench-tokenizer",
                               args=(tp, req_addr, done_addr, results, cells, cfg)))
    by_id = {c.id: c for c in cells}
    tok_stats: dict[int, dict] = {}
    rank_stats: dict[int, list] = {c.id: [] for c in cells}
    rows: list[dict] = []
    info: dict = {"tp": tp, "port": port}
    pids: set[int] = set()
    try:
        for p in procs:
            p.start()
            pids.add(p.pid)
        features = None
        done_cells = 0
        while done_cells < len(cells):
            try:
                msg = results.get(timeout=2.0)
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"benchmark process {dead[0].name} exited with {dead[0].exitcode}")
                continue
            kind = msg[0]
            if kind == "error":
                raise RuntimeError(f"{msg[1]} failed:\n{msg[2]}")
            if kind == "ready":
                features = msg[1]
                info["features"] = features
                continue
            cid = msg[1]
            if kind == "tok":
                tok_stats[cid] = msg[2]
            elif kind == "rank":
                stats = dict(msg[3])
                stats["rank"] = msg[2]
                rank_stats[cid].append(stats)
            if cid in tok_stats and len(rank_stats[cid]) == tp:
                cell = by_id[cid]
                row = _row(cell, tok_stats.pop(cid), rank_stats.pop(cid), features)
                rows.append(row)
                done_cells += 1
                pbar.set_postfix_str(f"TP={tp} {cell.workload} C={cell.concurrency} {cell.mode}: "
                                     f"{row['throughput_rps']:.1f} rps")
                pbar.update(1)
        for p in procs:
            p.join(timeout=120)
        codes = {p.name: p.exitcode for p in procs}
        info["exit_codes"] = codes
        if any(code != 0 for code in codes.values()):
            raise RuntimeError(f"benchmark processes did not exit cleanly: {codes}")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        results.close()
        leaked = our_segments(pids)
        info["leaked_segments"] = len(leaked)
        if leaked:
            log(f"warning: {len(leaked)} shared-memory segment(s) left by TP={tp} processes; "
                f"removing: {leaked[:5]}")
        for name in leaked:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except FileNotFoundError:
                pass
        assert not our_segments(pids), "segments remain in /dev/shm after cleanup"
        shutil.rmtree(tmpdir, ignore_errors=True)
    return rows, info


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------

_TABLE_COLUMNS = [
    ("mode", "mode", "{}"),
    ("workload", "workload", "{}"),
    ("tp", "TP", "{}"),
    ("concurrency", "C", "{}"),
    ("requests", "n", "{}"),
    ("effective_concurrency", "C eff", "{}"),
    ("throughput_rps", "req/s", "{:.1f}"),
    ("p50_ms", "p50 ms", "{:.0f}"),
    ("p99_ms", "p99 ms", "{:.0f}"),
    ("sched_cpu_ms_per_req", "sched CPU ms/req", "{:.1f}"),
    ("tok_cpu_ms_per_req", "tok CPU ms/req", "{:.1f}"),
    ("bytes_per_req", "MB/req", "{:.2f}"),
    ("collectives_per_req", "mm coll/req", "{:.2f}"),
    ("loop_lag_ms_p99", "lag p99 ms", "{:.1f}"),
    ("loop_lag_ms_max", "lag max ms", "{:.1f}"),
    ("errors", "err", "{}"),
]


def _fmt(key: str, fmt: str, value: Any) -> str:
    if key == "bytes_per_req":
        value = value / 1e6
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return fmt.format(value)


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title, _ in _TABLE_COLUMNS) + " |"
    sep = "|" + "|".join("---" if i < 2 else "---:" for i in range(len(_TABLE_COLUMNS))) + "|"
    lines = [head, sep]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(k, f, row[k]) for k, _, f in _TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def sort_rows(rows: list[dict]) -> list[dict]:
    wl = {w: i for i, w in enumerate(WORKLOADS)}
    md = {m: i for i, m in enumerate(MODES)}
    return sorted(rows, key=lambda r: (r["tp"], wl[r["workload"]], r["concurrency"], md[r["mode"]]))


def make_plots(rows: list[dict], args: argparse.Namespace, stem: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(MODES)}
    tp = args.tp[0]
    sweep = [r for r in rows if r["tp"] == tp and r["workload"] == args.sweep_workload]
    if len({r["concurrency"] for r in sweep}) > 1:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode in MODES:
            pts = sorted((r["concurrency"], r["throughput_rps"], r["effective_concurrency"])
                         for r in sweep if r["mode"] == mode)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode,
                    color=colors[mode])
            burst = [p for p in pts if p[2] < p[0]]
            if burst:  # cells that measured a burst of fewer requests than C
                ax.plot([p[0] for p in burst], [p[1] for p in burst], linestyle="none",
                        marker="o", markersize=9, markerfacecolor="white",
                        markeredgecolor=colors[mode])
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel("throughput (req/s)")
        ax.set_yscale("log")
        ax.set_title(f"Throughput vs concurrency, TP={tp}, {args.sweep_workload}\n"
                     "(hollow: a burst of fewer requests than C, see 'C eff')", fontsize=10)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=8)
        path = Path(f"{stem}_throughput_vs_concurrency.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    conc = args.concurrency[0]
    sized = [r for r in rows if r["tp"] == tp and r["concurrency"] == conc]
    if len({r["workload"] for r in sized}) > 1:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode in MODES:
            pts = sorted((r["feature_mb"], r["sched_cpu_ms_per_req"], r["workload"])
                         for r in sized if r["mode"] == mode)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode,
                        color=colors[mode])
        for mb, label in sorted({(r["feature_mb"], r["workload"]) for r in sized}):
            ax.annotate(label, (mb, 0), xytext=(0, 4), textcoords="offset points",
                        fontsize=7, ha="center", xycoords=("data", "axes fraction"))
        ax.set_xlabel("feature size per request (MB)")
        ax.set_ylabel("scheduler CPU per request, all ranks (ms)")
        ax.set_yscale("log")
        ax.set_title(f"Scheduler CPU vs feature size, TP={tp}, C={conc}")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=8)
        path = Path(f"{stem}_sched_cpu_vs_feature_size.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    return written


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _write_table(md_path: Path, stamp: str, report: dict) -> str:
    table = markdown_table(report["results"])
    cfg = report["config"]
    md_path.write_text(
        f"# compare_schemes {stamp}\n\n"
        f"{report['machine']['cpu_model']}, {report['machine']['cores']} cores "
        f"(load average at start {report['machine'].get('load_average_1_5_15')}); "
        f"forward {cfg['forward_ms']:g} ms ({cfg['forward_wait']}); "
        f"wall {report['wall_s']:.0f} s. Metrics: see benchmarks/compare_schemes.py.\n\n"
        + table + "\n"
    )
    return table


def _from_json(path: Path, no_plots: bool) -> int:
    report = json.loads(path.read_text())
    cfg = report["config"]
    nan = float("nan")
    report["results"] = [{k: (nan if v is None else v) for k, v in r.items()}
                         for r in report["results"]]
    stem = path.with_suffix("")
    table = _write_table(Path(f"{stem}.md"), stem.name, report)
    plot_args = argparse.Namespace(tp=cfg["tp"], concurrency=cfg["concurrency"],
                                   sweep_workload=cfg["sweep_workload"])
    for p in ([] if no_plots else make_plots(report["results"], plot_args, stem)):
        print(f"plot:    {p}")
    print()
    print(table)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    from tqdm import tqdm

    started = time.perf_counter()
    args = parse_args(argv)
    if args.from_json is not None:
        return _from_json(args.from_json, args.no_plots)
    machine = machine_info()  # load average before the run (the machine may be shared)
    cores = os.cpu_count() or 1
    forward_wait = args.forward_wait
    if forward_wait == "auto":
        forward_wait = "spin" if cores >= max(args.tp) + 2 else "sleep"
    cfg = RunConfig(
        forward_ms=args.forward_ms,
        forward_wait=forward_wait,
        max_recv_bytes=args.max_recv_bytes,
        warmup=args.warmup,
        lag_interval_ms=args.lag_interval_ms,
        seed=args.seed,
    )
    cells = build_cells(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = args.out / stamp

    def log(text: str) -> None:
        tqdm.write(text, file=sys.stderr)

    rows: list[dict] = []
    groups: list[dict] = []
    with tqdm(total=len(cells), desc="cells", unit="cell", file=sys.stderr,
              dynamic_ncols=True) as pbar:
        for tp in args.tp:
            group_rows, info = run_group(tp, [c for c in cells if c.tp == tp], cfg, pbar, log)
            rows.extend(group_rows)
            groups.append(info)
    rows = sort_rows(rows)
    wall = time.perf_counter() - started
    config = {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "quick": args.quick,
        "modes": args.modes,
        "workloads": args.workloads,
        "tp": args.tp,
        "concurrency": args.concurrency,
        "sweep_workload": args.sweep_workload,
        "sweep_concurrency": args.sweep_concurrency,
        "requests": args.requests,
        "legacy_max_requests": args.legacy_max_requests,
        "min_requests": args.min_requests,
        "cell_seconds": args.cell_seconds,
        **dataclasses.asdict(cfg),
        "forward_wait_requested": args.forward_wait,
        "idle_poll_ms": IDLE_POLL_MS,
        "torch_threads_per_process": 1,
        "groups": groups,
    }
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {"machine": machine, "config": config, "wall_s": round(wall, 1),
              "results": rows}
    json_path = Path(f"{stem}.json")
    json_path.write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    md_path = Path(f"{stem}.md")
    table = _write_table(md_path, stamp, report)
    plots = [] if args.no_plots else make_plots(rows, args, stem)
    print(f"results: {json_path}")
    print(f"table:   {md_path}")
    for p in plots:
        print(f"plot:    {p}")
    print(f"wall time: {wall:.1f} s")
    print()
    print(table)
    return 0


if __name__ == "__main__":
    # Run through the importable module so that the spawned processes' targets and the
    # pickled Cell/RunConfig objects resolve to ``benchmarks.compare_schemes``.
    from benchmarks import compare_schemes as _module

    sys.exit(_module.main())
