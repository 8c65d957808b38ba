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
import threading
import time
from pathlib import Path

import pytest

from sglang_mmpre.scheduler_side import region_cache
from sglang_mmpre.tokenizer_side.pool import PooledProcessor, ProcessorWorkerDied
from sglang_mmpre.transport.descriptors import RegionDescriptor, SegmentDescriptor
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
    (ledger,) = [ledger for ledger in tm.mmpre.pool._ledgers.values()
                 if region.name in ledger.regions]
    table = ledger.regions[region.name].attached.table
    return [table.refcount(ref.index) for ref in region.slots]


def test_pooled_request_equals_legacy_from_dict_with_tensors_in_the_workers_region(
    pooled, model_dir, monkeypatch
):
    from sglang.srt.managers.schedule_batch import MultimodalInputs
    from tiny_models import tokenize_and_send

    image = _jpeg(seed=11)
    legacy_req = _legacy_request(model_dir, monkeypatch, image)
    legacy_inputs = MultimodalInputs.from_dict(legacy_req.mm_inputs)

    req, sent = tokenize_and_send(pooled, image_data=[image])
    assert req.mm_inputs is None and list(req.input_ids) == list(legacy_req.input_ids)
    region = req.materialized_mm_inputs.segment
    assert isinstance(region, RegionDescriptor)
    assert int(OWNED_NAME_RE.match(region.name).group(2)) in _worker_pids(pooled), \
        "the tensors are not in a region of a worker"
    assert len(sent) < len(pickle.dumps(legacy_req)) - 18_000_000, \
        "the pixels travelled with the request"
    assert _refcounts(pooled, region) == [1, 1]  # the scope ended: only the rank's left
    built = schedule_one(monkeypatch, sent)
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


@pytest.mark.parametrize("workers", ["1", "0"])
def test_multi_node_server_args_send_every_tensor_inline_and_create_no_file(
    model_dir, shm_dir, monkeypatch, workers
):
    """``--nnodes 2 --dist-init-addr``: ranks on the other node can't open this node's
    shared memory, so neither the TokenizerManager nor a pool worker makes a region (the
    entry rank would vouch for one its peers can't open); the request is inline, and
    the scheduler builds what the legacy ``from_dict`` builds."""
    from sglang.srt.managers.schedule_batch import MultimodalInputs
    from tiny_models import close_tokenizer_manager, make_tokenizer_manager, tokenize_and_send

    image = _jpeg(seed=21)
    legacy_inputs = MultimodalInputs.from_dict(_legacy_request(model_dir, monkeypatch, image).mm_inputs)
    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("SGLANG_MM_PROCESSOR_WORKERS", workers)
    monkeypatch.setenv("SGLANG_MM_SHM_REGION_CHUNK_BYTES", str(8 << 20))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(BOOT_DIR), os.environ["PYTHONPATH"]]))
    tm = make_tokenizer_manager(model_dir, nnodes=2, node_rank=0,
                                dist_init_addr="127.0.0.1:29517")
    try:
        assert tm.mmpre.region is None, "a region on a multi-node server"
        assert tm.mmpre.pool is None, "a pool would send every tensor through its pipes"

        req, sent = tokenize_and_send(tm, image_data=[image])
        assert req.materialized_mm_inputs.segment is None, "the tensors are not inline"
        assert os.listdir(shm_dir) == [], "a file of ours on a multi-node server"
        built = schedule_one(monkeypatch, sent)
        assert_equal_inputs(built.multimodal_inputs, legacy_inputs)
    finally:
        close_tokenizer_manager(tm)
    assert os.listdir(shm_dir) == []


def _wait_gone(shm_dir, stem: str, timeout: float = 30.0) -> list[str]:
    """Names of ``stem``'s files still in ``shm_dir`` once they went (or the time is up)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [n for n in os.listdir(shm_dir) if n.startswith(stem)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _wait_dead(pid: int, timeout: float = 30.0) -> None:
    """Wait until ``pid`` is a zombie or gone (its pipes closed), without reaping it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} still runs {timeout:g} s after SIGKILL")


def _kill_idle_worker(tm) -> int:
    """SIGKILL the one worker while idle and return its pid (the next request finds it
    dead and starts a replacement)."""
    (worker,) = tm.mmpre.pool._workers
    victim = worker.process.pid
    os.kill(victim, signal.SIGKILL)
    worker.process.join(30)
    return victim


@pytest.fixture
def pooled_segments(model_dir, shm_dir, monkeypatch):
    """A pool of one worker whose share of the cap is below the region's chunk: every
    request takes a segment (docker --shm-size=1g with 4+ workers)."""
    from tiny_models import close_tokenizer_manager, make_tokenizer_manager

    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("SGLANG_MM_PROCESSOR_WORKERS", "1")
    monkeypatch.setenv("SGLANG_MM_SHM_REGION_CHUNK_BYTES", str(32 << 20))
    monkeypatch.setenv("SGLANG_MM_SHM_CAP_BYTES", str(16 << 20))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(BOOT_DIR), os.environ["PYTHONPATH"]]))
    tm = make_tokenizer_manager(model_dir)
    try:
        yield tm
    finally:
        close_tokenizer_manager(tm)
    assert os.listdir(shm_dir) == [], "files left after the pool shut down"


def test_dead_workers_adopted_segment_stays_until_the_rank_mapped_it(
    pooled_segments, shm_dir, monkeypatch
):
    from tiny_models import tokenize_one

    tm = pooled_segments
    socket = _Socket()

    async def scenario():
        with tm.mmpre.request_scope():
            req = await tokenize_one(tm, image_data=[_jpeg(448, 448, seed=7)])
            seg = req.materialized_mm_inputs.segment
            assert isinstance(seg, SegmentDescriptor), "the request took no segment"
            tm.mmpre.send(socket, req)
            victim = _kill_idle_worker(tm)
            # The next job finds the worker dead and starts a replacement.
            other = await tokenize_one(tm, image_data=[_jpeg(448, 448, seed=8)])
            assert other.materialized_mm_inputs.segment is not None
            assert seg.name in os.listdir(shm_dir), \
                "the dead worker's segment was swept under a request in flight"
        return seg, victim

    seg, victim = asyncio.run(scenario())
    # The request was aborted while queued at the scheduler: the rank maps it only now.
    assert seg.name in os.listdir(shm_dir)
    built = schedule_one(monkeypatch, socket.sent[0])
    assert built.multimodal_inputs is not None
    del built
    gc.collect()
    assert _wait_gone(shm_dir, f"sglmmpre_{victim}_") == []


def test_dead_workers_region_stays_while_a_rank_holds_a_slot_after_the_scope_closed(
    pooled, shm_dir, monkeypatch
):
    from tiny_models import tokenize_one

    socket = _Socket()

    async def scenario():
        with pooled.mmpre.request_scope():  # aborted while queued: the scope closes first
            req = await tokenize_one(pooled, image_data=[_jpeg(seed=9)])
            pooled.mmpre.send(socket, req)
        region = req.materialized_mm_inputs.segment
        assert isinstance(region, RegionDescriptor)
        victim = _kill_idle_worker(pooled)
        pooled.mmpre.release_unsent(await tokenize_one(pooled, image_data=[_jpeg(seed=10)]))
        return region, victim

    region, victim = asyncio.run(scenario())
    assert region.name in os.listdir(shm_dir), \
        "the dead worker's region was retired while a request naming it was queued"
    built = schedule_one(monkeypatch, socket.sent[0])
    assert built.multimodal_inputs is not None
    del built
    gc.collect()
    assert region_cache.flush()
    assert _wait_gone(shm_dir, f"sglmmpre_{victim}_") == []
    deadline = time.monotonic() + 30
    while region.name in region_cache.attached_names() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert region.name not in region_cache.attached_names(), "the rank kept the retired region"


def _region_refcounts(shm_dir, name: str) -> list[int]:
    """Every slot refcount of region ``name``, read through a mapping of its own."""
    from sglang_mmpre.scheduler_side.region_cache import open_region

    region = open_region(str(shm_dir), name)
    try:
        return [region.table.refcount(i) for i in range(region.slot_count)]
    finally:
        region.close()


def test_job_that_cannot_be_pickled_runs_in_the_parent_and_keeps_the_workers_credit(pooled):
    pool = pooled.mmpre.pool
    (worker,) = pool._workers
    with pool._lock:
        worker.credit = 12345  # segment bytes released since the worker's last job
    future = pool.submit({"image_data": [lambda: None]})  # a lambda can't be pickled
    with pytest.raises(Exception) as info:
        future.result(60)
    assert type(info.value).__name__ == "_RunInParent"
    assert worker.credit == 12345, "the credit was lost with the job"


def test_unreadable_reply_fails_its_request_and_leaks_no_slot(pooled, shm_dir, monkeypatch):
    from multiprocessing.reduction import ForkingPickler

    from sglang_mmpre.tokenizer_side.pool import ProcessorReplyUnreadable
    from tiny_models import tokenize_one

    real_loads, failed = ForkingPickler.loads, []

    def loads(data, *args, **kwargs):
        if not failed:  # the next reply that the parent reads
            failed.append(True)
            raise pickle.UnpicklingError("no such class here")
        return real_loads(data, *args, **kwargs)

    monkeypatch.setattr(ForkingPickler, "loads", loads)
    with pytest.raises(ProcessorReplyUnreadable, match="could not be read"):
        asyncio.run(tokenize_one(pooled, image_data=[_jpeg(seed=31)]))
    monkeypatch.setattr(ForkingPickler, "loads", real_loads)
    # The next request, on the same worker, is served; once it is released no slot of
    # the worker's region is referenced: the unread reply's slots were released too.
    req = asyncio.run(tokenize_one(pooled, image_data=[_jpeg(seed=32)]))
    region = req.materialized_mm_inputs.segment
    assert isinstance(region, RegionDescriptor)
    pooled.mmpre.release_unsent(req)
    assert set(_region_refcounts(shm_dir, region.name)) == {0}


def test_hung_worker_is_killed_at_the_job_deadline_and_replaced(model_dir, shm_dir, monkeypatch):
    from sglang_mmpre.tokenizer_side.pool import ProcessorWorkerHung
    from tiny_models import close_tokenizer_manager, make_tokenizer_manager, tokenize_one

    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("SGLANG_MM_PROCESSOR_WORKERS", "1")
    monkeypatch.setenv("SGLANG_MM_SHM_REGION_CHUNK_BYTES", str(32 << 20))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(BOOT_DIR), os.environ["PYTHONPATH"]]))
    tm = make_tokenizer_manager(model_dir, mm_per_request_timeout=5)
    try:
        pool = tm.mmpre.pool
        futures = []
        submit = pool.submit
        monkeypatch.setattr(pool, "submit", lambda job: futures.append(submit(job)) or futures[-1])
        (hung,) = _worker_pids(tm)
        with stalling_image_url(trickle=True) as (url, hit):
            with pytest.raises(Exception):  # sglang's own timeout, or the deadline's error
                asyncio.run(tokenize_one(tm, image_data=[url]))
            assert hit.is_set()
            with pytest.raises(ProcessorWorkerHung, match=rf"pid {hung}\) did not finish"):
                futures[0].result(60)
        deadline = time.monotonic() + 60
        while _worker_pids(tm) in ([hung], []) and time.monotonic() < deadline:
            time.sleep(0.1)
        (replacement,) = _worker_pids(tm)
        assert replacement != hung
        req = asyncio.run(tokenize_one(tm, image_data=[_jpeg(seed=33)]))
        assert int(OWNED_NAME_RE.match(req.materialized_mm_inputs.segment.name).group(2)) \
            == replacement
        tm.mmpre.release_unsent(req)
        assert _wait_gone(shm_dir, f"sglmmpre_{hung}_") == []
    finally:
        close_tokenizer_manager(tm)
    assert os.listdir(shm_dir) == []


def test_dead_forkserver_is_restarted_for_the_replacement_worker(pooled):
    """The forkserver killed, then the worker: the next job finds the worker dead, and its
    replacement comes from a new forkserver (multiprocessing starts one; it imports sglang
    again, so that first job may meet sglang's --mm-per-request-timeout meanwhile)."""
    from multiprocessing import forkserver

    from tiny_models import tokenize_one

    server = forkserver._forkserver._forkserver_pid
    assert server is not None, "the pool did not start a forkserver"
    os.kill(server, signal.SIGKILL)
    (worker,) = pooled.mmpre.pool._workers
    victim = worker.process.pid
    os.kill(victim, signal.SIGKILL)
    # Both are dead before the job is queued (a kill is delivered asynchronously; a worker
    # that dies after the pool's idle check fails the job it was sent, by design).
    _wait_dead(server)
    _wait_dead(victim)
    try:
        pooled.mmpre.release_unsent(asyncio.run(tokenize_one(pooled, image_data=[_jpeg(seed=34)])))
    except TimeoutError:
        pass
    deadline = time.monotonic() + 300
    while _worker_pids(pooled) in ([victim], [None], []) and time.monotonic() < deadline:
        time.sleep(0.2)
    (replacement,) = _worker_pids(pooled)
    assert replacement not in (victim, None)
    assert forkserver._forkserver._forkserver_pid not in (None, server)
    req = asyncio.run(tokenize_one(pooled, image_data=[_jpeg(seed=35)]))
    assert int(OWNED_NAME_RE.match(req.materialized_mm_inputs.segment.name).group(2)) \
        == replacement
    pooled.mmpre.release_unsent(req)


def test_stop_signal_to_the_process_group_leaves_workers_serving_until_their_pipe_closes(
    pooled, shm_dir
):
    """Ctrl-C or ``systemctl stop`` signal every process of the server: the workers keep
    serving the requests sglang drains, and exit (their files with them) at shutdown."""
    from tiny_models import tokenize_one

    (worker,) = _worker_pids(pooled)
    os.kill(worker, signal.SIGTERM)
    os.kill(worker, signal.SIGINT)
    req = asyncio.run(tokenize_one(pooled, image_data=[_jpeg(seed=37)]))
    assert _worker_pids(pooled) == [worker], "a stop signal killed the worker"
    assert int(OWNED_NAME_RE.match(req.materialized_mm_inputs.segment.name).group(2)) == worker
    pooled.mmpre.release_unsent(req)


def test_shutdown_with_a_job_in_every_worker_removes_every_file_before_sglang_kills_the_tree(
    model_dir, shm_dir, monkeypatch
):
    """sglang's SIGTERM drain counts a request only once it is sent to the scheduler, so
    it can end while workers still run the processor (here: image downloads that never
    end). The patched ``sigterm_watchdog`` then shuts the pool down and SIGKILLs the
    server's whole process tree (Note [pool shutdown]): when shutdown returns, no worker
    may be left for that kill, nor a file of ours; the requests fail with a clear error."""
    from contextlib import ExitStack

    from tiny_models import close_tokenizer_manager, make_tokenizer_manager, tokenize_one

    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("SGLANG_MM_PROCESSOR_WORKERS", "2")
    monkeypatch.setenv("SGLANG_MM_SHM_REGION_CHUNK_BYTES", str(32 << 20))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(BOOT_DIR), os.environ["PYTHONPATH"]]))
    tm = make_tokenizer_manager(model_dir, mm_per_request_timeout=600)
    outcome: list = []
    try:
        pids = _worker_pids(tm)
        assert len(pids) == 2
        made = {int(m.group(2)) for m in map(OWNED_NAME_RE.match, os.listdir(shm_dir)) if m}
        assert made == set(pids), "each worker should have its region before any request"
        with ExitStack() as stack:
            stalls = [stack.enter_context(stalling_image_url(trickle=True)) for _ in pids]

            async def both() -> list:
                return await asyncio.gather(
                    *(tokenize_one(tm, image_data=[url]) for url, _ in stalls),
                    return_exceptions=True)

            client = threading.Thread(target=lambda: outcome.extend(asyncio.run(both())))
            client.start()
            for _, hit in stalls:
                assert hit.wait(60), "a worker never fetched its image"
            tm.mmpre.shutdown()  # what the patched sigterm_watchdog does after the drain
            left = sorted(os.listdir(shm_dir))
            alive = [pid for pid in pids if _alive(pid)]
            client.join(60)
        assert alive == [], f"workers left running for sglang's SIGKILL: {alive}"
        assert left == [], f"files of ours left for sglang's SIGKILL: {left}"
        assert len(outcome) == 2 and all(
            isinstance(e, ProcessorWorkerDied) and "shutting down" in str(e) for e in outcome
        ), outcome
    finally:
        for pid in _worker_pids(tm):  # as sglang's kill_process_tree would
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        close_tokenizer_manager(tm)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
