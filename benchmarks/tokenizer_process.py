"""The tokenizer process of the scheme comparison: builds each request, does the mode's
tokenizer-side work on an asyncio loop, sends it to rank 0 and measures the cell from the
client's side. (The processes and their messages: ``benchmarks/harness.py``.)

- The tokenizer runs an asyncio loop. The processor output of each workload (real HF
  Qwen2-VL image processor on generated images, or the video processor on generated
  frames) is computed once at start-up; each request gets a fresh mm dict around it and
  then the mode's tokenizer-side work (nothing / pickling only for the legacy modes;
  ``set_pad_value`` + one shm segment per feature for upstream; ``materialize_request``
  in worker threads for tokenizer_stage; a sha256 over the feature bytes in a worker
  thread for hash_floor), then is sent with ``send_pyobj`` over a ZMQ
  PUSH socket to rank 0. A closed loop keeps at most ``C`` requests in flight.
- A cell issues requests until its request cap is reached or, once ``min_requests`` were
  issued, its ``seconds`` have passed; then it waits for those in flight.
- A ticker coroutine sleeps ``--lag-interval-ms`` at a time on the same loop and records how
  late it wakes up (the event-loop lag) while a cell is measured.

In the window of a cell the tokenizer measures each request's latency, its own process CPU
time, the bytes it pickles into ZMQ frames, the bytes written into shared-memory segments
and the loop lags; it puts them on the results queue as ``("tok", cell id, stats)``
(``report.cell_row`` turns them into the metrics).
"""

from __future__ import annotations

import asyncio
import hashlib
import pickle
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from benchmarks.harness import CTL, Cell, RunConfig

__all__ = ["CountingSocket", "tokenizer_main"]


class CountingSocket:
    """``send_pyobj`` as pyzmq does it (pickle, then send), counting the frame bytes."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.bytes = 0

    def send_pyobj(self, obj, flags: int = 0) -> None:
        data = pickle.dumps(obj, pickle.DEFAULT_PROTOCOL)
        self.bytes += len(data)
        self.sock.send(data, flags)


def _sha256(feature) -> bytes:
    """hash_floor's tokenizer-side work: sha256 over the feature's bytes (GIL released)."""
    import torch

    return hashlib.sha256(feature.reshape(-1).view(torch.uint8).numpy()).digest()


def tokenizer_main(tp: int, req_addr: str, done_addr: str, results: Any,
                   cells: list[Cell], cfg: RunConfig) -> None:
    """Entry point of the spawned tokenizer process: run every cell of ``cells`` in order,
    then ``stop`` the ranks; on failure put ``("error", "tokenizer", traceback)`` on
    ``results`` and re-raise."""
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
        tokenizer_side,
        transport_of,
        upstream_prepare,
    )

    features = {}
    for w in dict.fromkeys(c.workload for c in cells):
        features[w] = compute_features(w, seed=cfg.seed)
    results.put(("ready", {w: {"feature_shape": list(f.feature.shape),
                               "feature_bytes": f.nbytes,
                               "tokens": len(f.input_ids)} for w, f in features.items()}))

    side = tokenizer_side(tp)
    # hash_floor: the same number of worker threads as the TokenizerSide, hashing only.
    hash_pool = ThreadPoolExecutor(side.settings.threads, thread_name_prefix="hash_floor")
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
    state = types.SimpleNamespace(measuring=False, lags=[], shm_bytes=0, token=0,
                                  transport={})

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
        if mode in ("floor", "hash_floor"):
            req = make_request(rid, f, None)
            req.bench_placeholder = PLACEHOLDER
            if mode == "hash_floor":
                await loop.run_in_executor(hash_pool, _sha256, f.feature)
        else:
            req = make_request(rid, f, fresh_mm_dict(f))
        if mode == "upstream_shm_barrier":
            _, nbytes = upstream_prepare(req.mm_inputs)
            state.shm_bytes += nbytes
        elif mode == "tokenizer_stage":
            await side.materialize_request(req)
            how = transport_of(req.materialized_mm_inputs)
            state.transport[how] = state.transport.get(how, 0) + 1
            writer = req.materialized_mm_inputs.writer
            if writer is not None:  # bytes copied into shared memory (slots: not reused ones)
                state.shm_bytes += getattr(writer, "written_nbytes", writer.payload_nbytes)
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
        state.transport = {}
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
            "transport": state.transport,
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
        hash_pool.shutdown(wait=False)
        push.close(linger=1000)
        pull.close(linger=0)
        sync_ctx.term()
        actx.term()
