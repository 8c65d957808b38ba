"""A tokenizer process and N scheduler-rank processes (gloo) for the soak, the
multi-process forged-input and the external-deletion tests (never shipped).

Data path, as in a TP=N sglang server with this project's patch::

    tokenizer process: sglang's real patched TokenizerManager
    _tokenize_one_request (the processor runs   every rank: real patched Scheduler.recv_requests
    in the pool's workers, or in the process)
    TokenizerSide.send (counts consumers) --ZMQ-->  rank 0: drain, vouch_for_segments
                                                 --sglang broadcast_pyobj (gloo)--> ranks 1..N-1
                                                 every rank: real patched handle_generate_request
                                      <--ZMQ--  rank 0: "done" rids      (take_multimodal_inputs)

Each request carries one JPEG (``IMAGE_SIDE`` square, made from a seed:
``image_seeds`` of :func:`run_harness`) and runs inside ``tm.mmpre.request_scope()`` as
``generate_request`` does, so the creator reference is held until the "response" (the
done rid) comes back. Plan kinds: ``good``; ``disconnect`` (the scope closes right after
the send, as when a client goes away, before any rank has mapped the request's tensors);
``n3`` (parallel sampling: one tokenized object sent 1 + 3 times);
``forged_nonce``/``forged_name`` (a forged copy that no rank may touch, then the genuine
one); ``forged_nbytes`` (a forged table for our own segment or region: every rank drops
its reference and aborts); ``raw_bad`` (a raw dict sglang's ``from_dict`` rejects). Files
deleted from outside (every file of the shm directory, as ``rm /dev/shm/*`` does, the
creator's lock file included) at one point of a request's life: ``rm_before_send``
(materialized, not yet sent), ``rm_between_ranks`` (rank 0 has mapped it, the other ranks
have not), ``rm_after_mapped`` (every rank mapped it, no rank has read the features yet),
``rm_before_scope_exit`` (every rank is done, which rank 0 waits for before it reports the
request done; the creator reference is still held). The tokenizer prints ``HELD <rid
prefix> <held_bytes>`` after each of these requests' scope and every rank prints
``OUTCOME <rid> <outcome>`` for every request, so that a run whose ranks stop on
``SegmentVanishedError`` still shows what happened (see ``fatal_ranks`` of
:func:`run_harness`).

Control messages travel the same path: ``measure`` makes every process record its open
fds, RSS and mapped segments (after ``gc.collect()`` and, on ranks, once every slot
release queued so far is done; the ranks meet at a barrier first, so every earlier request
has been handled everywhere), ``stop`` ends the ranks. The tokenizer process also records
every region (size, live slots), and for each processor worker its fds, RSS, mapped
segments, files in the shm directory and processor-cache counters (as its last reply
carried them, ``ProcessorPool.cache_stats``). A region
is not counted as a segment: a process maps it once, for good.

usage: soak_harness.py tokenizer|rank RANK CONFIG_JSON
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
BOOT_DIR = HERE / "support" / "server_boot"
#: Width and height of every request's image.
IMAGE_SIDE = 224

__all__ = ["run_harness", "free_port", "process_metrics", "external_rm"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_metrics(shm_dir: str, regions: tuple[str, ...] = (),
                    pid: Optional[int] = None) -> dict[str, int]:
    """Open fds, RSS bytes (``rss``; ``rss_shmem`` of it are pages of shared memory, such
    as the regions' pages this process touched) and segments of ``shm_dir`` mapped (the
    files named in ``regions`` apart) of this process (after ``gc.collect()``) or of
    process ``pid``."""
    if pid is None:
        gc.collect()
    proc = f"/proc/{pid or 'self'}"
    fds = len(os.listdir(f"{proc}/fd"))
    status = {}
    with open(f"{proc}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.split()
    mapped = 0
    with open(f"{proc}/maps") as f:
        for line in f:
            if shm_dir in line and not any(r in line for r in regions):
                mapped += 1
    return {"pid": pid or os.getpid(), "fds": fds, "rss": int(status["VmRSS"][0]) * 1024,
            "rss_shmem": int(status["RssShmem"][0]) * 1024, "mapped_segments": mapped}


def external_rm(shm_dir: str) -> None:
    """What ``rm <shm dir>/*`` does (systemd's RemoveIPC, a cleanup job): every file goes."""
    for name in os.listdir(shm_dir):
        try:
            os.unlink(os.path.join(shm_dir, name))
        except FileNotFoundError:
            pass


def _kind(cfg: dict, rid: str) -> str:
    """The plan kind of request ``rid`` ("req<i>-<k>"; warm-up requests are "good")."""
    head = rid.split("-", 1)[0]
    return cfg["plan"][int(head[3:])] if head.startswith("req") else "good"


def _shm_usage(shm_dir: str, regions: tuple[str, ...] = ()) -> dict[str, int]:
    from sglang_mmpre.transport.segment import segment_names

    names = [n for n in segment_names(shm_dir) if n not in regions]
    total = 0
    for n in names:
        try:
            total += os.stat(os.path.join(shm_dir, n)).st_size
        except FileNotFoundError:
            pass
    return {"shm_count": len(names), "shm_bytes": total}


# --------------------------------------------------------------------------------------
# tokenizer process
# --------------------------------------------------------------------------------------

def _pool_state(side: Any, shm_dir: str) -> tuple[dict, list[dict]]:
    """Every region (the parent's own, and each worker's through the parent's mapping of
    its slot table) with its size and live slots (refcount > 0), and each processor
    worker's process metrics, files and cache counters."""
    regions: dict[str, dict[str, int]] = {}
    if side.region is not None:
        regions[side.region.name] = {"bytes": side.region.size,
                                     "live_slots": side.region.live_slots()}
    workers: list[dict] = []
    pool = side.pool
    if pool is None:
        return regions, workers
    cache = pool.cache_stats()  # each worker's counters at its last reply
    with pool._lock:
        ledgers = {stem: dict(ledger.regions) for stem, ledger in pool._ledgers.items()}
    for stem, held in ledgers.items():
        for name, region in held.items():
            regions[name] = {"bytes": os.stat(region.path).st_size,
                             "live_slots": region.attached.table.referenced()}
    for w, stats in zip(pool._workers, cache):
        own = tuple(ledgers.get(w.stem, ()))
        files = {n: os.stat(os.path.join(shm_dir, n)).st_size for n in os.listdir(shm_dir)
                 if n.startswith(f"{w.stem}_") or n == f"{w.stem}.lock"}
        workers.append({**process_metrics(shm_dir, own, pid=w.process.pid),
                        "regions": sorted(own), "files": files,
                        "cache": {} if stats is None else
                        {"hits": stats.hits, "misses": stats.misses,
                         "bytes_held": stats.bytes_held}})
    return regions, workers


async def _tokenizer(cfg: dict) -> dict:
    import asyncio
    import collections
    import copy
    import dataclasses

    import zmq
    import zmq.asyncio

    from mm_requests import tokenized_request
    from sglang_mmpre.transport.carrier import MaterializedMultimodalInputs
    from tiny_models import (close_tokenizer_manager, image_to_jpeg_bytes, make_image,
                             make_tiny_qwen2vl, make_tokenizer_manager, tokenize_one)

    shm_dir = cfg["shm_dir"]
    model_dir = make_tiny_qwen2vl(Path(cfg["out_dir"], "qwen2vl"))
    tm = make_tokenizer_manager(model_dir, tp_size=cfg["world"])
    side = tm.mmpre
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(cfg["to_ranks"])
    actx = zmq.asyncio.Context()
    pull = actx.socket(zmq.PULL)
    pull.bind(cfg["to_tokenizer"])
    seeds = cfg["image_seeds"]
    repeated = {s for s, n in collections.Counter(seeds).items() if n > 1}
    jpegs: dict[int, bytes] = {}  # of the repeated images only: a unique one is made once

    def image(i: int) -> bytes:
        seed = seeds[i]
        data = jpegs.get(seed)
        if data is None:
            data = image_to_jpeg_bytes(make_image(IMAGE_SIDE, IMAGE_SIDE, seed))
            if seed in repeated:
                jpegs[seed] = data
        return data

    events: dict[str, asyncio.Event] = {}
    acks: dict[str, asyncio.Event] = {}

    async def reader() -> None:
        while True:
            msg = await pull.recv_pyobj()
            for rid in msg.get("done", ()):
                events.pop(rid).set()
            if "ack" in msg:
                acks[msg["ack"]].set()

    def expect(rid: str) -> asyncio.Event:
        ev = events[rid] = asyncio.Event()
        return ev

    def with_rid(obj, rid: str, m: Any = None):
        o = copy.copy(obj)
        o.rid = rid
        if m is not None:
            o.materialized_mm_inputs = m
        return o

    async def one(prefix: str, kind: str, seq: int, pending: list) -> None:
        with side.request_scope():
            await scoped(prefix, kind, seq, pending)
        if kind.startswith("rm_"):
            out.setdefault("held_after", {})[prefix] = side.held_bytes
            print("HELD", prefix, side.held_bytes, flush=True)

    async def scoped(prefix: str, kind: str, seq: int, pending: list) -> None:
        waits = []
        if kind == "raw_bad":
            obj = tokenized_request({"mm_items": "not a list"}, f"{prefix}-0")
            waits.append(expect(obj.rid))
            push.send_pyobj(obj)
        else:
            obj = await tokenize_one(tm, image_data=[image(seq)], rid=prefix)
            m = obj.materialized_mm_inputs
            if kind in ("forged_nonce", "forged_name"):
                change = ({"nonce": bytes(16)} if kind == "forged_nonce"
                          else {"name": "../../etc/passwd"})
                forged = MaterializedMultimodalInputs(
                    m.inputs, dataclasses.replace(m.segment, **change))
                waits.append(expect(f"{prefix}-0"))
                push.send_pyobj(with_rid(obj, f"{prefix}-0", forged))  # not counted
                waits.append(expect(f"{prefix}-1"))
                side.send(push, with_rid(obj, f"{prefix}-1"))
            elif kind == "forged_nbytes":
                inputs = copy.deepcopy(m.inputs)
                item = inputs.mm_items[0]
                item.feature = dataclasses.replace(item.feature,
                                                   nbytes=item.feature.nbytes - 4)
                waits.append(expect(f"{prefix}-0"))
                side.send(push, with_rid(
                    obj, f"{prefix}-0",
                    MaterializedMultimodalInputs(inputs, m.segment, m.writer)))
            else:
                if kind == "rm_before_send":
                    external_rm(shm_dir)
                sends = 4 if kind == "n3" else 1
                for k in range(sends):
                    waits.append(expect(f"{prefix}-{k}"))
                    side.send(push, with_rid(obj, f"{prefix}-{k}"))
        if kind == "disconnect":
            pending.extend(waits)  # the client is gone: the scope closes now
            return
        for ev in waits:
            await ev.wait()
        if kind == "rm_before_scope_exit":
            external_rm(shm_dir)

    async def phase(name: str, kinds: list[str], first: int) -> None:
        # ``window`` clients, each sending its next request once the previous one ended:
        # at most ``window`` requests in flight, and no task per request created up front.
        pending: list = []
        todo = iter(enumerate(kinds))

        async def client() -> None:
            for i, kind in todo:
                await one(f"{name}{i}", kind, first + i, pending)

        await asyncio.gather(*(client() for _ in range(cfg["window"])))
        for ev in pending:
            await ev.wait()
        pending.clear()

    async def measure(tag: str) -> dict:
        acks[tag] = asyncio.Event()
        push.send_pyobj({"ctl": "measure", "tag": tag})
        await acks[tag].wait()
        regions, workers = _pool_state(side, shm_dir)
        return {**process_metrics(shm_dir, tuple(regions)), **_shm_usage(shm_dir, tuple(regions)),
                "held_bytes": side.held_bytes, "regions": regions, "workers": workers}

    reader_task = asyncio.ensure_future(reader())
    out: dict[str, Any] = {}
    await phase("w", ["good"] * cfg["warmup"], 0)
    out["baseline"] = await measure("baseline")
    t0 = time.monotonic()
    await phase("req", cfg["plan"], cfg["warmup"])
    out["seconds"] = time.monotonic() - t0
    out["after"] = await measure("after")
    push.send_pyobj({"ctl": "stop"})
    reader_task.cancel()
    push.close(linger=5000)
    pull.close(linger=0)
    actx.term()
    close_tokenizer_manager(tm)  # stops the pool's workers; unlinks every region
    return out


# --------------------------------------------------------------------------------------
# rank processes
# --------------------------------------------------------------------------------------

def _read_features(req: Any) -> None:
    """Read every feature page, as the model's forward would (no reference kept)."""
    for item in req.multimodal_inputs.mm_items:
        float(item.feature.sum())


def _rank(rank: int, cfg: dict) -> dict:
    import torch.distributed as dist
    import zmq

    from scheduler_harness import SchedulerUnderTest
    from sglang_mmpre.scheduler_side import region_cache

    world, shm_dir = cfg["world"], cfg["shm_dir"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{cfg['port']}", rank=rank,
                            world_size=world)
    group = dist.group.WORLD
    pull = push = None
    if rank == 0:
        ctx = zmq.Context.instance()
        pull = ctx.socket(zmq.PULL)
        pull.bind(cfg["to_ranks"])
        push = ctx.socket(zmq.PUSH)
        push.connect(cfg["to_tokenizer"])
    scheduler = SchedulerUnderTest(tp_size=world, cpu_group=group, is_entry_rank=rank == 0,
                                   tp_rank=rank, recv_from_tokenizer=pull)
    out: dict[str, Any] = {"outcomes": {}, "served": 0}
    running = True
    while running:
        if rank == 0:
            pull.poll(timeout=20)  # wait for work rather than spin; peers wait in the broadcast
        batch = scheduler.recv_requests()
        done = []
        for obj in batch:
            if isinstance(obj, dict):
                if obj["ctl"] == "stop":
                    running = False
                    continue
                gc.collect()
                region_cache.flush()  # the releases of every request freed so far are done
                dist.barrier(group=group)  # every rank has handled every earlier request
                out[obj["tag"]] = {**process_metrics(shm_dir, tuple(region_cache.attached_names())),
                                   "leases": region_cache.leases_held()}
                dist.barrier(group=group)
                if rank == 0:
                    push.send_pyobj({"ack": obj["tag"]})
                continue
            kind = _kind(cfg, obj.rid)
            if kind == "rm_between_ranks":  # rank 0 maps it, the files go, then the others map
                if rank != 0:
                    dist.barrier(group=group)
                scheduler.handle_generate_request(obj)  # ranks 1.. raise SegmentVanishedError
                if rank == 0:
                    external_rm(shm_dir)
                    dist.barrier(group=group)
            else:
                scheduler.handle_generate_request(obj)
            if kind == "rm_after_mapped":  # every rank mapped it; the files go before any read
                dist.barrier(group=group)
                if rank == 0:
                    external_rm(shm_dir)
                dist.barrier(group=group)
            elif kind == "rm_before_scope_exit":
                # rank 0 reports "done" once every rank has mapped it (the tokenizer removes
                # the files then); otherwise that removal could come between ranks.
                dist.barrier(group=group)
            (req,) = scheduler.queued
            scheduler.queued.clear()
            if req.to_finish is None:
                _read_features(req)
                out["served"] += 1
                out["outcomes"][req.rid] = "served"
            else:
                out["outcomes"][req.rid] = req.to_finish.message
            print("OUTCOME", req.rid, out["outcomes"][req.rid], flush=True)
            done.append(req.rid)
            del req
        if rank == 0 and done:
            push.send_pyobj({"done": done})
    if rank == 0:
        pull.close(linger=0)
        push.close(linger=5000)
    dist.barrier(group=group)
    dist.destroy_process_group()
    return out


def _child_main(role: str, rank: int, cfg_path: str) -> None:
    import gpu_module_standin

    gpu_module_standin.install()
    cfg = json.loads(Path(cfg_path).read_text())
    if role == "tokenizer":
        import asyncio

        out = asyncio.run(_tokenizer(cfg))
        name = "tokenizer.json"
    else:
        out = _rank(rank, cfg)
        name = f"rank{rank}.json"
    Path(cfg["out_dir"], name).write_text(json.dumps(out))
    # Every atexit handler runs; the interpreter's teardown of its modules (a garbage
    # collection over everything sglang, torch and transformers loaded: up to half a
    # minute on two busy cores) is skipped. Everything of ours was released above.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------------------------
# the launcher (runs in pytest)
# --------------------------------------------------------------------------------------

def run_harness(out_dir: Path, shm_dir: Path, world: int, plan: list[str], warmup: int,
                window: int = 8, timeout_s: float | None = None,
                fatal_ranks: tuple[int, ...] = (),
                region_chunk_bytes: Optional[int] = 64 << 20,
                processor_workers: Optional[int] = 0,
                image_seeds: Optional[list[int]] = None) -> dict:
    """Run ``plan`` through a tokenizer process and ``world`` rank processes.

    The tokenizer process is sglang's real patched ``TokenizerManager`` with a processor
    pool of ``processor_workers`` (0: none, the tensors are materialized in the tokenizer
    process; None: the default size, ``SGLANG_MM_PROCESSOR_WORKERS`` unset), each with
    the default processor cache; requests take slots of regions of ``region_chunk_bytes``
    (0: a segment per request; None: the default size). Request ``i`` (the warm-up's
    first) carries one IMAGE_SIDE x IMAGE_SIDE JPEG made from seed ``image_seeds[i]``
    (default: the same image for every request).

    Without ``fatal_ranks``: asserts every exit code is 0 (killing the rest on timeout)
    and returns ``{"tokenizer": ..., "ranks": [...]}`` as the processes reported it.

    With ``fatal_ranks``: those ranks are expected to stop on an exception. Once they all
    have exited, the others are killed, as sglang tears a server down when one of its
    schedulers dies (the scheduler signals its parent, which kills the process tree).
    Returns ``{"codes": {"rank<k>"|"tokenizer0": exit code}, "logs": {...: text}}``.
    """
    ipc_dir = tempfile.mkdtemp(prefix="mmpre_ipc_", dir="/tmp")  # short: ipc paths are capped
    cfg = {
        "world": world, "port": free_port(), "shm_dir": str(shm_dir), "out_dir": str(out_dir),
        "to_ranks": f"ipc://{ipc_dir}/to_ranks", "to_tokenizer": f"ipc://{ipc_dir}/to_tok",
        "plan": plan, "warmup": warmup, "window": window,
        "image_seeds": image_seeds or [0] * (warmup + len(plan)),
    }
    if len(cfg["image_seeds"]) != warmup + len(plan):
        raise ValueError("image_seeds needs one seed per warm-up and plan request")
    cfg_path = Path(out_dir, "harness.json")
    cfg_path.write_text(json.dumps(cfg))
    env = {**os.environ, "SGLANG_MM_SHM_DIR": str(shm_dir),
           # else importing sglang starts a pool of inductor compile workers that nothing
           # uses, and the process waits for it at exit (see real_server.CPU_ENV)
           "TORCHINDUCTOR_COMPILE_THREADS": "1",
           # the processor workers install the GPU-module stand-in at start-up too
           "PYTHONPATH": os.pathsep.join([str(BOOT_DIR), os.environ.get("PYTHONPATH", "")])}
    for name, value in (("SGLANG_MM_SHM_REGION_CHUNK_BYTES", region_chunk_bytes),
                        ("SGLANG_MM_PROCESSOR_WORKERS", processor_workers)):
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    roles = [("rank", r) for r in range(world)] + [("tokenizer", 0)]
    names = [f"{role}{rank}" for role, rank in roles]
    logs = []
    procs = []
    if timeout_s is None:
        timeout_s = 300 + 0.5 * (len(plan) + warmup)
    try:
        for role, rank in roles:
            log = open(Path(out_dir, f"{role}{rank}.log"), "wb")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), role, str(rank), str(cfg_path)],
                env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout_s
        codes = []
        for p in [procs[r] for r in fatal_ranks] if fatal_ranks else procs:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append("timeout")
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
        shutil.rmtree(ipc_dir, ignore_errors=True)
    text = {n: Path(out_dir, f"{n}.log").read_text(errors="replace") for n in names}
    if fatal_ranks:
        if "timeout" in codes:
            raise AssertionError(f"ranks {fatal_ranks} did not stop; logs: {json.dumps(text)}")
        return {"codes": dict(zip(names, (p.returncode for p in procs))), "logs": text}
    if codes != [0] * len(roles):
        tails = {n: t[-3000:] for n, t in text.items()}
        raise AssertionError(f"exit codes {codes} for {roles}; logs: {json.dumps(tails, indent=1)}")
    return {
        "tokenizer": json.loads(Path(out_dir, "tokenizer.json").read_text()),
        "ranks": [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)],
    }


if __name__ == "__main__":
    _child_main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
