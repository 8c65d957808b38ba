"""A scheduler-rank process of the scheme comparison: sglang's receive loop, the mode's
multimodal handling and a simulated forward step, with CPU time and collectives counted by
phase. (The processes and their messages: ``benchmarks/harness.py``.)

- Rank 0 iterates like sglang's ``recv_requests``: drain its PULL socket without
  blocking (``--max-recv-bytes`` caps one drain), run the mode's entry-rank check
  (``schemes.entry_rank_check``), ``broadcast_pyobj`` the list to every
  rank (all ranks call it every iteration), then every rank handles the multimodal
  inputs per mode, then a simulated forward step (``--forward-ms`` wait + an
  ``all_reduce`` of a small tensor, which keeps the ranks in lockstep as NCCL would).
  After that step rank 0 reports the iteration's requests as complete to the tokenizer
  (ZMQ PUSH -> PULL). A request lives for exactly one such iteration.
- When idle (the previous iteration had no request), rank 0 waits up to 20 ms on its
  socket before draining, instead of spinning (peers wait inside the gloo broadcast).

Each iteration is split into phases (``RankCounters.phase``): ``recv`` (rank 0's drain,
unpickling and entry-rank check), ``req_bcast`` (``broadcast_pyobj``), ``mm`` (the mode's
multimodal handling), ``fwd`` (the simulated forward step) and ``other``. ``mm`` also holds
dropping the iteration's inputs (a mapping closed, or slot leases queued) and the CPU time
of ``sglang_mmpre``'s releaser thread (a slot's pages and reference dropped). Between the
``begin`` and ``end`` control messages a rank counts, by phase, its process CPU time, the
collectives it calls and the bytes it broadcasts; at ``end`` it puts them on the results
queue (``report.cell_row`` turns them
into the metrics).
"""

from __future__ import annotations

import pickle
import time
import traceback
from datetime import timedelta
from typing import Any, Optional

from benchmarks.harness import CTL, RunConfig

__all__ = ["IDLE_POLL_MS", "RankCounters", "install_collective_counting", "rank_main"]

IDLE_POLL_MS = 20


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
    """Entry point of a spawned rank process: run the rank loop until ``stop``; on failure
    put ``("error", "rank<N>", traceback)`` on ``results`` and re-raise."""
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

    from benchmarks.schemes import RankContext, entry_rank_check, handle_batch, wait_forward
    from sglang_mmpre.scheduler_side.region_cache import release_cpu_seconds
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
    release_cpu0 = 0.0
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
                entry_rank_check(mode, batch)
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
                        release_cpu0 = release_cpu_seconds()
                    elif kind == "end":
                        total = cpu() - window_cpu0
                        counters.add_cpu("mm", release_cpu_seconds() - release_cpu0)
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
                c6 = cpu()
                handled = None  # drop the inputs (and their mappings) with the iteration
                counters.add_cpu("mm", cpu() - c6)
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
