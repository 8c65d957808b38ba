"""The real patched TokenizerManager and Scheduler, end to end on one process.

The TokenizerManager is sglang 0.5.5's own (patched), built for a tiny local Qwen2-VL
model; the scheduler methods are the patched ``Scheduler.handle_generate_request`` itself
(see ``scheduler_harness``). Legacy results come from the same TokenizerManager with the
switch off (``SGLANG_MM_PREMATERIALIZE=0``) followed by sglang's own ``from_dict``.

These tests pin the per-request segment path (``SGLANG_MM_SHM_REGION_CHUNK_BYTES=0``, as
when the region is full); the same path through the warm region is
``test_region_request_path.py``.
"""

from __future__ import annotations

import asyncio
import copy
import pickle

import pytest

from sglang_mmpre.transport.carrier import MaterializedMultimodalInputs
from sglang_mmpre.transport.segment import segment_names

from scheduler_harness import DistributedCallCounter, SchedulerUnderTest
from test_materialize_equivalence import assert_equal_inputs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_models import make_tiny_qwen2vl

    return make_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2vl"))


@pytest.fixture
def tokenizer_manager(model_dir, shm_dir, monkeypatch):
    from tiny_models import close_tokenizer_manager, make_tokenizer_manager

    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("SGLANG_MM_SHM_REGION_CHUNK_BYTES", "0")
    tm = make_tokenizer_manager(model_dir)
    yield tm
    close_tokenizer_manager(tm)


def _jpeg(w=1120, h=700, seed=0):
    from tiny_models import image_to_jpeg_bytes, make_image

    return image_to_jpeg_bytes(make_image(w, h, seed))


def _legacy_request(model_dir, monkeypatch, image):
    from tiny_models import close_tokenizer_manager, make_tokenizer_manager, tokenize_one

    monkeypatch.setenv("SGLANG_MM_PREMATERIALIZE", "0")
    tm = make_tokenizer_manager(model_dir)
    try:
        return asyncio.run(tokenize_one(tm, image_data=[image]))
    finally:
        close_tokenizer_manager(tm)
        monkeypatch.delenv("SGLANG_MM_PREMATERIALIZE")


def test_patched_tokenizer_builds_request_with_materialized_inputs(tokenizer_manager, shm_dir):
    from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
    from tiny_models import tokenize_one

    req = asyncio.run(tokenize_one(tokenizer_manager, image_data=[_jpeg()]))
    assert isinstance(req, TokenizedGenerateReqInput)
    assert req.mm_inputs is None
    assert isinstance(req.materialized_mm_inputs, MaterializedMultimodalInputs)
    assert req.materialized_mm_inputs.segment is not None
    assert len(segment_names(str(shm_dir))) == 1
    tokenizer_manager.mmpre.release_unsent(req)
    assert segment_names(str(shm_dir)) == []


def test_pickled_request_stays_under_2kb_beyond_text_and_ids(tokenizer_manager):
    from tiny_models import tokenize_one

    req = asyncio.run(tokenize_one(tokenizer_manager, image_data=[_jpeg()]))
    without_mm = copy.copy(req)
    without_mm.materialized_mm_inputs = None
    extra = len(pickle.dumps(req)) - len(pickle.dumps(without_mm))
    tokenizer_manager.mmpre.release_unsent(req)
    assert 0 < extra < 2048


def test_patched_scheduler_builds_req_equal_to_legacy_with_no_distributed_call(
    tokenizer_manager, model_dir, shm_dir, monkeypatch
):
    from sglang.srt.managers.schedule_batch import MultimodalInputs
    from tiny_models import tokenize_one

    image = _jpeg(seed=7)
    legacy_req = _legacy_request(model_dir, monkeypatch, image)
    assert isinstance(legacy_req.mm_inputs, dict) and legacy_req.materialized_mm_inputs is None
    legacy_inputs = MultimodalInputs.from_dict(legacy_req.mm_inputs)

    req = asyncio.run(tokenize_one(tokenizer_manager, image_data=[image]))
    sent = []
    socket = type("Socket", (), {"send_pyobj": lambda self, o: sent.append(pickle.dumps(o))})()
    tokenizer_manager.mmpre.send(socket, req)  # no scope: creator released after the send

    counter = DistributedCallCounter(monkeypatch)
    scheduler = SchedulerUnderTest(tp_size=1)
    scheduler.handle_generate_request(pickle.loads(sent[0]))
    assert counter.calls == []
    (built,) = scheduler.queued
    assert built.finished_reason is None and built.to_finish is None
    assert_equal_inputs(built.multimodal_inputs, legacy_inputs)
    assert built.origin_input_ids == SchedulerUnderTest().pad_input_ids_func(
        list(legacy_req.input_ids), legacy_inputs
    )
    assert segment_names(str(shm_dir)) == []


def test_raw_dict_request_takes_legacy_local_from_dict_not_broadcast(model_dir, monkeypatch):
    from sglang.srt.managers.schedule_batch import MultimodalInputs

    req = _legacy_request(model_dir, monkeypatch, _jpeg(448, 448, seed=2))
    expected = MultimodalInputs.from_dict(copy.deepcopy(req.mm_inputs))
    counter = DistributedCallCounter(monkeypatch)
    scheduler = SchedulerUnderTest(tp_size=4, is_entry_rank=False)
    scheduler.handle_generate_request(req)
    assert counter.calls == []
    assert_equal_inputs(scheduler.queued[0].multimodal_inputs, expected)


def test_embedding_request_uses_materialized_inputs(tokenizer_manager, shm_dir, monkeypatch):
    from sglang.srt.managers.io_struct import TokenizedEmbeddingReqInput
    from tiny_models import tokenize_one

    gen = asyncio.run(tokenize_one(tokenizer_manager, image_data=[_jpeg(448, 448)]))
    emb = TokenizedEmbeddingReqInput(gen.input_text, gen.input_ids, None, [], gen.sampling_params,
                                     rid="emb-1")
    emb.materialized_mm_inputs = gen.materialized_mm_inputs
    sent = []
    socket = type("Socket", (), {"send_pyobj": lambda self, o: sent.append(pickle.dumps(o))})()
    tokenizer_manager.mmpre.send(socket, emb)
    counter = DistributedCallCounter(monkeypatch)
    scheduler = SchedulerUnderTest(tp_size=1)
    scheduler.handle_embedding_request(pickle.loads(sent[0]))
    assert counter.calls == []
    assert scheduler.queued[0].multimodal_inputs is not None
    assert segment_names(str(shm_dir)) == []


def test_bad_descriptor_aborts_request_and_next_request_is_served(tokenizer_manager, shm_dir):
    from tiny_models import tokenize_one

    sent = []
    socket = type("Socket", (), {"send_pyobj": lambda self, o: sent.append(pickle.dumps(o))})()
    for seed in (1, 2):
        req = asyncio.run(tokenize_one(tokenizer_manager, image_data=[_jpeg(448, 448, seed)]))
        tokenizer_manager.mmpre.send(socket, req)
    bad, good = (pickle.loads(b) for b in sent)
    seg = bad.materialized_mm_inputs.segment
    bad.materialized_mm_inputs.segment = type(seg)(seg.name, seg.payload_nbytes, b"\0" * 16, seg.consumers)
    scheduler = SchedulerUnderTest(tp_size=1)
    scheduler.handle_generate_request(bad)
    scheduler.handle_generate_request(good)
    aborted, served = scheduler.queued
    assert "Invalid multimodal inputs" in aborted.to_finish.message
    assert "nonce" in aborted.to_finish.message
    assert served.to_finish is None and served.multimodal_inputs is not None
    # The forged descriptor never touched the segment: its creator can still release it.
    assert len(segment_names(str(shm_dir))) == 1
