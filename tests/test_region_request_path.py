"""The real patched TokenizerManager and Scheduler, end to end on one process, through the
warm region (its default path): requests carry slot references, ranks build what sglang's
``from_dict`` builds without any distributed call, the same image is copied once, and every
slot is released once the ranks' tensors are freed. The segment path of the same tests is
``test_patched_request_path.py``.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import pickle

import pytest

from sglang_mmpre.scheduler_side import region_cache
from sglang_mmpre.transport.descriptors import RegionDescriptor
from sglang_mmpre.transport.segment import segment_names

from scheduler_harness import DistributedCallCounter, SchedulerUnderTest, schedule_one
from test_materialize_equivalence import assert_equal_inputs
from test_patched_request_path import _jpeg, _legacy_request


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_models import make_tiny_qwen2vl

    return make_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2vl"))


@pytest.fixture
def tokenizer_manager(model_dir, shm_dir, monkeypatch):
    from tiny_models import close_tokenizer_manager, make_tokenizer_manager

    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("SGLANG_MM_SHM_REGION_CHUNK_BYTES", str(32 << 20))
    tm = make_tokenizer_manager(model_dir)
    assert tm.mmpre.region is not None
    yield tm
    close_tokenizer_manager(tm)  # unlinks the region
    assert segment_names(str(shm_dir)) == []


def _others(tm, shm_dir) -> list[str]:
    """Our files in the shm directory besides the manager's region."""
    return [n for n in segment_names(str(shm_dir)) if n != tm.mmpre.region.name]


def _settled_live_slots(tm) -> int:
    gc.collect()
    assert region_cache.flush()
    return tm.mmpre.region.live_slots()


class _Socket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send_pyobj(self, obj) -> None:
        self.sent.append(pickle.dumps(obj))


def test_request_carries_slot_references_under_2kb_and_holds_slots_until_released(
    tokenizer_manager, shm_dir
):
    from tiny_models import tokenize_one

    req = asyncio.run(tokenize_one(tokenizer_manager, image_data=[_jpeg()]))
    assert req.mm_inputs is None
    region = req.materialized_mm_inputs.segment
    assert isinstance(region, RegionDescriptor) and len(region.slots) == 2
    assert region.name == tokenizer_manager.mmpre.region.name
    without_mm = copy.copy(req)
    without_mm.materialized_mm_inputs = None
    assert 0 < len(pickle.dumps(req)) - len(pickle.dumps(without_mm)) < 2048
    assert _others(tokenizer_manager, shm_dir) == []  # no per-request file
    assert tokenizer_manager.mmpre.region.live_slots() == 2
    tokenizer_manager.mmpre.release_unsent(req)
    assert tokenizer_manager.mmpre.region.live_slots() == 0


def test_scheduler_builds_req_equal_to_legacy_from_slots_with_no_distributed_call(
    tokenizer_manager, model_dir, shm_dir, monkeypatch
):
    from sglang.srt.managers.schedule_batch import MultimodalInputs
    from tiny_models import tokenize_one

    image = _jpeg(seed=7)
    legacy_req = _legacy_request(model_dir, monkeypatch, image)
    legacy_inputs = MultimodalInputs.from_dict(legacy_req.mm_inputs)
    req = asyncio.run(tokenize_one(tokenizer_manager, image_data=[image]))
    socket = _Socket()
    tokenizer_manager.mmpre.send(socket, req)  # no scope: creator released after the send
    built = schedule_one(monkeypatch, socket.sent[0])
    assert_equal_inputs(built.multimodal_inputs, legacy_inputs)
    assert built.origin_input_ids == SchedulerUnderTest().pad_input_ids_func(
        list(legacy_req.input_ids), legacy_inputs
    )
    assert _settled_live_slots(tokenizer_manager) == 2  # the Req still views them
    del built
    assert _settled_live_slots(tokenizer_manager) == 0


def test_same_image_twice_is_copied_once_and_both_requests_are_served(tokenizer_manager, shm_dir):
    from tiny_models import tokenize_one

    image = _jpeg(seed=3)
    reqs = [asyncio.run(tokenize_one(tokenizer_manager, image_data=[image])) for _ in range(2)]
    first, second = (r.materialized_mm_inputs for r in reqs)
    assert first.segment.slots[0] == second.segment.slots[0]
    assert first.writer.written_nbytes > 18_000_000 > 100_000 > second.writer.written_nbytes
    socket = _Socket()
    for r in reqs:
        tokenizer_manager.mmpre.send(socket, r)
    scheduler = SchedulerUnderTest(tp_size=1)
    for blob in socket.sent:
        scheduler.handle_generate_request(pickle.loads(blob))
    a, b = scheduler.queued
    assert a.to_finish is None and b.to_finish is None
    assert a.multimodal_inputs.mm_items[0].hash == b.multimodal_inputs.mm_items[0].hash
    del a, b, scheduler
    assert _settled_live_slots(tokenizer_manager) == 0


def test_embedding_request_uses_slots(tokenizer_manager, shm_dir, monkeypatch):
    from sglang.srt.managers.io_struct import TokenizedEmbeddingReqInput
    from tiny_models import tokenize_one

    gen = asyncio.run(tokenize_one(tokenizer_manager, image_data=[_jpeg(448, 448)]))
    emb = TokenizedEmbeddingReqInput(gen.input_text, gen.input_ids, None, [], gen.sampling_params,
                                     rid="emb-1")
    emb.materialized_mm_inputs = gen.materialized_mm_inputs
    socket = _Socket()
    tokenizer_manager.mmpre.send(socket, emb)
    counter = DistributedCallCounter(monkeypatch)
    scheduler = SchedulerUnderTest(tp_size=1)
    scheduler.handle_embedding_request(pickle.loads(socket.sent[0]))
    assert counter.calls == []
    assert scheduler.queued[0].multimodal_inputs is not None
    del scheduler
    assert _settled_live_slots(tokenizer_manager) == 0


def test_region_retired_between_attach_and_lease_stays_mapped_until_its_slots_are_leased(
    tokenizer_manager, model_dir, monkeypatch
):
    """The releaser thread forgets retired regions; one that a rank is resolving a
    request from (attached, slots not leased yet) is pinned, so the request is built."""
    from sglang.srt.managers.schedule_batch import MultimodalInputs
    from sglang_mmpre.transport.region import retire
    from tiny_models import tokenize_one

    image = _jpeg(seed=13)
    legacy = MultimodalInputs.from_dict(_legacy_request(model_dir, monkeypatch, image).mm_inputs)
    req = asyncio.run(tokenize_one(tokenizer_manager, image_data=[image]))
    socket = _Socket()
    tokenizer_manager.mmpre.send(socket, req)
    tokenizer_manager.mmpre.release_unsent(req)
    lease = region_cache.AttachedRegion.lease

    def lease_after_retirement(region, refs):
        retire(region.fd)  # the owner retired it meanwhile (its shutdown) ...
        region_cache._forget_retired()  # ... and the releaser thread ran right here
        return lease(region, refs)

    monkeypatch.setattr(region_cache.AttachedRegion, "lease", lease_after_retirement)
    built = schedule_one(monkeypatch, socket.sent[0])
    assert_equal_inputs(built.multimodal_inputs, legacy)
    monkeypatch.setattr(region_cache.AttachedRegion, "lease", lease)
    name = req.materialized_mm_inputs.segment.name
    assert name in region_cache.attached_names()
    del built
    gc.collect()
    assert region_cache.flush()
    assert name not in region_cache.attached_names(), "a retired region stayed mapped"
