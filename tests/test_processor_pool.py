"""The processor pool (``tokenizer_side/pool.py``) inside sglang 0.5.5's real, patched
TokenizerManager, on one process plus its spawned workers.

Each worker builds sglang's own Qwen2-VL processor and writes the tensors into its own
region; the TokenizerManager's request carries descriptors, and the patched
``Scheduler.handle_generate_request`` builds what sglang's ``from_dict`` builds from the
unpatched path. A worker killed while it processes a request fails that request only;
the next one is served by its replacement, and every file goes once nothing needs it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
import re
import signal
from pathlib import Path

import pytest

from sglang_mmpre.scheduler_side import region_cache
from sglang_mmpre.tokenizer_side.pool import PooledProcessor, ProcessorWorkerDied
from sglang_mmpre.transport.descriptors import RegionDescriptor
from sglang_mmpre.transport.liveness import OWNED_NAME_RE

from server_cases import stalling_image_url
from scheduler_harness import schedule_one
from test_materialize_equivalence import assert_equal_inputs
from test_patched_request_path import _jpeg, _legacy_request, model_dir  # noqa: F401 - fixture
from test_region_request_path import _Socket

BOOT_DIR = Path(__file__).resolve().parent / "support" / "server_boot"


@pytest.fixture
def pooled(model_dir, shm_dir, monkeypatch):
    """A patched TokenizerManager with a pool of one worker; no file of ours is left after."""
    from tiny_models import close_tokenizer_manager, make_tokenizer_manager

    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("SGLANG_MM_PROCESSOR_WORKERS", "1")
    monkeypatch.setenv("SGLANG_MM_SHM_REGION_CHUNK_BYTES", str(32 << 20))
    monkeypatch.setenv("REQUEST_TIMEOUT", "120")  # sglang's image download timeout
    # The workers import sglang too: they need the GPU-module stand-in.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(BOOT_DIR), os.environ["PYTHONPATH"]]))
    tm = make_tokenizer_manager(model_dir)
    try:
        assert isinstance(tm.mm_data_processor.mm_processor, PooledProcessor)
        assert tm.mmpre.region is None, "the pool's parent should allocate no region"
        yield tm
    finally:
        close_tokenizer_manager(tm)
    assert os.listdir(shm_dir) == [], "files left after the pool shut down"


def _worker_pids(tm) -> list[int]:
    return [w.process.pid for w in tm.mmpre.pool._workers if w.process is not None]


def _refcounts(tm, region: RegionDescriptor) -> list[int]:
    table = tm.mmpre.pool._regions[region.name].attached.table
    return [table.refcount(ref.index) for ref in region.slots]


def test_pooled_request_equals_legacy_from_dict_with_tensors_in_the_workers_region(
    pooled, model_dir, monkeypatch
):
    from sglang.srt.managers.schedule_batch import MultimodalInputs
    from tiny_models import tokenize_one

    image = _jpeg(seed=11)
    legacy_req = _legacy_request(model_dir, monkeypatch, image)
    legacy_inputs = MultimodalInputs.from_dict(legacy_req.mm_inputs)

    async def tokenize_and_send(socket):
        with pooled.mmpre.request_scope():
            req = await tokenize_one(pooled, image_data=[image])
            pooled.mmpre.send(socket, req)
            return req

    socket = _Socket()
    req = asyncio.run(tokenize_and_send(socket))
    assert req.mm_inputs is None and list(req.input_ids) == list(legacy_req.input_ids)
    region = req.materialized_mm_inputs.segment
    assert isinstance(region, RegionDescriptor)
    assert int(OWNED_NAME_RE.match(region.name).group(2)) in _worker_pids(pooled), \
        "the tensors are not in a region of a worker"
    assert len(socket.sent[0]) < len(pickle.dumps(legacy_req)) - 18_000_000, \
        "the pixels travelled with the request"
    assert _refcounts(pooled, region) == [1, 1]  # the scope ended: only the rank's left
    built = schedule_one(monkeypatch, socket.sent[0])
    assert_equal_inputs(built.multimodal_inputs, legacy_inputs)
    del built
    gc.collect()
    assert region_cache.flush()
    assert _refcounts(pooled, region) == [0, 0]


def test_processor_error_reaches_the_request_as_in_sglang(pooled, model_dir, monkeypatch):
    from tiny_models import close_tokenizer_manager, make_tokenizer_manager, tokenize_one

    async def error_of(tm):
        with pytest.raises(Exception) as info:
            await tokenize_one(tm, image_data=[b"\xff\xd8 not a jpeg"])
        return info.value

    pooled_error = asyncio.run(error_of(pooled))
    monkeypatch.setenv("SGLANG_MM_PROCESSOR_WORKERS", "0")
    plain = make_tokenizer_manager(model_dir)
    try:
        assert not isinstance(plain.mm_data_processor.mm_processor, PooledProcessor)
        plain_error = asyncio.run(error_of(plain))
    finally:
        close_tokenizer_manager(plain)
    def answer(e):  # sglang's message names a BytesIO object by its address
        return type(e), re.sub(r" at 0x[0-9a-f]+", "", str(e))

    assert answer(pooled_error) == answer(plain_error)
    # and the pool still serves
    assert asyncio.run(tokenize_one(pooled, image_data=[_jpeg()])).materialized_mm_inputs


def test_killed_worker_fails_only_its_request_and_is_replaced_without_leaks(pooled, shm_dir):
    from tiny_models import tokenize_one

    async def scenario(url, hit):
        with pooled.mmpre.request_scope():  # a request that holds slots of the first worker
            held = await tokenize_one(pooled, image_data=[_jpeg(seed=1)])
        first_region = held.materialized_mm_inputs.segment.name
        with pooled.mmpre.request_scope():
            held = await tokenize_one(pooled, image_data=[_jpeg(seed=2)])
            assert held.materialized_mm_inputs.segment.name == first_region
            stalled = asyncio.ensure_future(tokenize_one(pooled, image_data=[url]))
            assert await asyncio.to_thread(hit.wait, 60), "the worker never fetched the image"
            queued = asyncio.ensure_future(tokenize_one(pooled, image_data=[_jpeg(seed=3)]))
            (victim,) = _worker_pids(pooled)
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(ProcessorWorkerDied, match=rf"pid {victim}\) .* died"):
                await stalled
            served = await queued
            (replacement,) = _worker_pids(pooled)
            assert replacement != victim
            assert served.materialized_mm_inputs.segment.name != first_region
            # The dead worker's region stays while a request placed there is live ...
            assert first_region in os.listdir(shm_dir)
        # ... and goes, with the dead worker's lock file, once it ended.
        return first_region, victim

    with stalling_image_url() as (url, hit):
        first_region, victim = asyncio.run(scenario(url, hit))
    left = os.listdir(shm_dir)
    assert first_region not in left
    assert not [n for n in left if n.startswith(f"sglmmpre_{victim}_")], left


def test_fast_image_processor_on_a_cpu_server_takes_the_pool(model_dir, shm_dir, monkeypatch):
    """sglang's default fast image processor used to keep today's path (the processor on
    the loop). With SGLANG_MM_PREPROCESSING_DEVICE at auto, a CPU server runs it in the
    pool's workers, on the CPU (tests/test_preprocessing_device.py: bitwise what the same
    HF processor gives in process). On a GPU server auto keeps today's path."""
    from tiny_models import close_tokenizer_manager, make_tokenizer_manager, tokenize_one

    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("SGLANG_MM_PROCESSOR_WORKERS", "1")
    monkeypatch.setenv("SGLANG_MM_SHM_REGION_CHUNK_BYTES", str(8 << 20))
    monkeypatch.delenv("SGLANG_MM_PREPROCESSING_DEVICE", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(BOOT_DIR), os.environ["PYTHONPATH"]]))
    tm = make_tokenizer_manager(model_dir, disable_fast_image_processor=False)
    try:
        assert tm.mmpre.pool is not None
        assert isinstance(tm.mm_data_processor.mm_processor, PooledProcessor)
        assert tm.mmpre.region is None, "the pool's parent should allocate no region"
        req = asyncio.run(tokenize_one(tm, image_data=[_jpeg(seed=7)]))
        region = req.materialized_mm_inputs.segment
        assert int(OWNED_NAME_RE.match(region.name).group(2)) in _worker_pids(tm)
        tm.mmpre.release_unsent(req)
    finally:
        close_tokenizer_manager(tm)
    assert os.listdir(shm_dir) == []


def test_worker_killed_while_idle_fails_no_request(pooled):
    from tiny_models import tokenize_one

    (worker,) = pooled.mmpre.pool._workers
    victim = worker.process.pid
    os.kill(victim, signal.SIGKILL)
    worker.process.join(30)
    assert not worker.process.is_alive()
    req = asyncio.run(tokenize_one(pooled, image_data=[_jpeg(seed=5)]))
    (replacement,) = _worker_pids(pooled)
    assert replacement != victim
    region = req.materialized_mm_inputs.segment
    assert int(OWNED_NAME_RE.match(region.name).group(2)) == replacement
    pooled.mmpre.release_unsent(req)
