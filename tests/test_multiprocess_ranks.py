"""Four scheduler-rank processes (gloo) receive requests through sglang's own
``broadcast_pyobj`` and map their tensors from shared memory, with no collective of ours."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from sglang_mmpre.tokenizer_side.manager import TokenizerSide
from sglang_mmpre.transport.segment import segment_names

from mm_fixtures import image_mm_dict, shm_settings

HERE = Path(__file__).resolve().parent
WORLD = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(rid: str, mm: dict):
    from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
    from sglang.srt.sampling.sampling_params import SamplingParams

    n = mm["mm_items"][0].offsets[0][1]
    ids = [1, 2, 259] + [261] * (n - 3) + [260, 5]
    params = SamplingParams(max_new_tokens=4)
    params.normalize(None)
    return TokenizedGenerateReqInput("text", ids, mm, params, False, -1, 0, None, False, rid=rid)


@pytest.mark.parametrize("region_chunk_bytes", [64 << 20, 0], ids=["region", "segments"])
def test_four_ranks_map_equal_tensors_and_shm_returns_to_baseline(tmp_path, shm_dir,
                                                                   region_chunk_bytes):
    import zmq
    from sglang.srt.managers.schedule_batch import MultimodalInputs

    sizes = [(448, 448), (1120, 700), (224, 672), (640, 480), (448, 448), (1120, 700)]
    expected = {}
    for i, (w, h) in enumerate(sizes):
        ref = MultimodalInputs.from_dict(image_mm_dict(w, h, seed=i))
        expected[f"r{i}"] = (
            [it.hash for it in ref.mm_items],
            [hashlib.sha256(it.feature.contiguous().view(torch.uint8).numpy()).hexdigest()
             for it in ref.mm_items],
        )
    addr = f"ipc://{tmp_path}/scheduler_input"
    port = free_port()
    env = {**os.environ, "SGLANG_MM_SHM_DIR": str(shm_dir)}
    procs = [
        subprocess.Popen([sys.executable, str(HERE / "rank_worker.py"), str(r), str(WORLD),
                          str(port), addr, str(tmp_path), str(len(sizes))], env=env)
        for r in range(WORLD)
    ]
    try:
        side = TokenizerSide(types.SimpleNamespace(tp_size=WORLD, pp_size=1),
                             shm_settings(shm_dir, region_chunk_bytes=region_chunk_bytes))
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(addr)
        for i, (w, h) in enumerate(sizes):
            req = _request(f"r{i}", image_mm_dict(w, h, seed=i))
            asyncio.run(side.materialize_request(req))
            assert req.mm_inputs is None and req.materialized_mm_inputs.segment is not None
            side.send(push, req)
        codes = [p.wait(timeout=180) for p in procs]
        push.close(linger=0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0] * WORLD
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert res["dist_calls"] == [], f"rank {r} made torch.distributed calls for mm inputs"
        assert [b["rid"] for b in res["built"]] == [f"r{i}" for i in range(len(sizes))]
        for b in res["built"]:
            assert b["aborted"] is None
            assert (b["hashes"], b["features"]) == expected[b["rid"]]
        assert res["built"] == results[0]["built"]
    side.shutdown()  # unlinks the region, if any (the ranks exited with their mappings)
    assert segment_names(str(shm_dir)) == []
    assert side.held_bytes == 0
