"""One scheduler rank of the multi-process tests (run as a script, one process per rank).

Every rank calls the real patched ``Scheduler.recv_requests``: rank 0 pulls tokenized
requests from a ZMQ socket and vouches for their segments, every rank receives the batch
through sglang's own ``broadcast_pyobj`` over a gloo group and hands each request to the
real patched ``Scheduler.handle_generate_request``. Each rank
writes what it built (hashes, pad values, a digest of every feature's bytes) and the
``torch.distributed`` calls made inside request handling to ``<out_dir>/rank<k>.json``.

usage: rank_worker.py RANK WORLD_SIZE GLOO_PORT ZMQ_ADDR OUT_DIR N_REQUESTS
"""

from __future__ import annotations

import hashlib
import json
import sys
import time


def main(rank: int, world: int, port: int, addr: str, out_dir: str, n_requests: int) -> None:
    import gpu_module_standin

    gpu_module_standin.install()
    import torch
    import torch.distributed as dist
    import zmq

    from scheduler_harness import SchedulerUnderTest

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    group = dist.group.WORLD
    socket = None
    if rank == 0:
        socket = zmq.Context.instance().socket(zmq.PULL)
        socket.bind(addr)
    scheduler = SchedulerUnderTest(tp_size=world, cpu_group=group, is_entry_rank=rank == 0,
                                   tp_rank=rank, recv_from_tokenizer=socket)
    calls: list[str] = []
    real = {name: getattr(dist, name) for name in ("broadcast", "broadcast_object_list",
                                                   "all_reduce", "barrier", "get_world_size")}
    seen = 0
    deadline = time.monotonic() + 120
    while seen < n_requests:
        if time.monotonic() > deadline:
            raise SystemExit(f"rank {rank}: only {seen}/{n_requests} requests arrived")
        batch = scheduler.recv_requests()
        for name, fn in real.items():  # count calls made while handling requests only
            setattr(dist, name, lambda *a, __fn=fn, __n=name, **k: (calls.append(__n), __fn(*a, **k))[1])
        for req in batch:
            scheduler.handle_generate_request(req)
        for name, fn in real.items():
            setattr(dist, name, fn)
        seen += len(batch)
        if not batch:
            time.sleep(0.005)
    built = []
    for req in scheduler.queued:
        mm = req.multimodal_inputs
        built.append({
            "rid": req.rid,
            "aborted": None if req.to_finish is None else req.to_finish.message,
            "hashes": [it.hash for it in mm.mm_items] if mm else None,
            "pad_values": [it.pad_value for it in mm.mm_items] if mm else None,
            "features": [hashlib.sha256(it.feature.contiguous().view(torch.uint8).numpy()).hexdigest()
                         for it in mm.mm_items] if mm else None,
            "input_ids": hashlib.sha256(repr(req.origin_input_ids).encode()).hexdigest(),
        })
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"built": built, "dist_calls": calls}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), int(a[1]), int(a[2]), a[3], a[4], int(a[5]))
