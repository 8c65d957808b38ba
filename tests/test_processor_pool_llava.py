"""The processor pool (``tokenizer_side/pool.py``) for a LLaVA model: sglang 0.5.5's
``LlavaImageProcessor``, not only Qwen2-VL's, runs in a worker and gives what sglang gives.

The tiny ``LlavaLlamaForCausalLM`` directory (``tiny_models.make_tiny_llava``) makes sglang
pick ``LlavaImageProcessor`` with ``image_aspect_ratio="pad"``. That processor differs from
Qwen2-VL's in what this project carries: its output has no ``input_ids`` (the prompt's
tokenization stands), its feature is a float16 *numpy* array, not a torch tensor, and its
``model_specific_data`` holds ``image_sizes`` as a list of tuples. It is also the only
processor of sglang 0.5.5 that runs the HF image processor through its ``cpu_executor`` (a
``ProcessPoolExecutor`` of forked processes), so a pool worker must be able to run that.
"""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from sglang_mmpre.scheduler_side import region_cache
from sglang_mmpre.tokenizer_side.pool import PooledProcessor
from sglang_mmpre.transport.descriptors import RegionDescriptor, TensorDescriptor
from sglang_mmpre.transport.liveness import OWNED_NAME_RE

from scheduler_harness import schedule_one
from test_materialize_equivalence import assert_equal_inputs
from test_patched_request_path import _jpeg

BOOT_DIR = Path(__file__).resolve().parent / "support" / "server_boot"
PROMPT = "USER: <image>\nDescribe it. ASSISTANT:"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_models import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture
def pooled(model_dir, shm_dir, monkeypatch):
    """A patched TokenizerManager for the tiny LLaVA with a pool of one worker; the worker
    exits cleanly and no file of ours is left after."""
    from tiny_models import close_tokenizer_manager, make_tokenizer_manager

    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("SGLANG_MM_PROCESSOR_WORKERS", "1")
    monkeypatch.setenv("SGLANG_MM_SHM_REGION_CHUNK_BYTES", str(8 << 20))
    # The workers import sglang too: they need the GPU-module stand-in.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(BOOT_DIR), os.environ["PYTHONPATH"]]))
    tm = make_tokenizer_manager(model_dir)
    workers = []
    try:
        assert type(tm.mm_processor).__name__ == "LlavaImageProcessor"
        assert isinstance(tm.mm_data_processor.mm_processor, PooledProcessor)
        assert tm.mmpre.region is None, "the pool's parent should allocate no region"
        yield tm
        workers = [w.process for w in tm.mmpre.pool._workers if w.process is not None]
    finally:
        close_tokenizer_manager(tm)
    assert [w.exitcode for w in workers] == [0] * len(workers), "a worker did not exit cleanly"
    assert os.listdir(shm_dir) == [], "files left after the pool shut down"


def _tokenize_and_send(tm, image: bytes):
    """Tokenize one LLaVA request in ``tm`` and send it; returns (request, pickled)."""
    from tiny_models import tokenize_and_send

    return tokenize_and_send(tm, PROMPT, image_data=[image])


def _pad_image_token(input_ids: list, mm_inputs) -> list:
    """The image token replaced by its item's ``pad_value``, as sglang's
    ``LlavaBaseForCausalLM.pad_input_ids`` does (without repeating it once per image
    feature: that length needs the vision tower; nor recording offsets in ``mm_inputs``)."""
    from tiny_models import LLAVA_IMAGE_TOKEN, LLAVA_SPECIAL_TOKEN_IDS

    image_token = LLAVA_SPECIAL_TOKEN_IDS[LLAVA_IMAGE_TOKEN]
    pad_values = iter([item.pad_value for item in mm_inputs.mm_items])
    return [next(pad_values) if t == image_token else t for t in input_ids]


def _legacy(model_dir, monkeypatch, image: bytes):
    """Unpatched sglang's request for the same prompt (``SGLANG_MM_PREMATERIALIZE=0``, as
    ``_legacy_request`` in test_patched_request_path.py), and its ``from_dict``."""
    from sglang.srt.managers.schedule_batch import MultimodalInputs

    from tiny_models import close_tokenizer_manager, make_tokenizer_manager, tokenize_one

    monkeypatch.setenv("SGLANG_MM_PREMATERIALIZE", "0")
    tm = make_tokenizer_manager(model_dir)
    try:
        legacy_req = asyncio.run(tokenize_one(tm, PROMPT, image_data=[image]))
    finally:
        close_tokenizer_manager(tm)
        monkeypatch.delenv("SGLANG_MM_PREMATERIALIZE")
    assert isinstance(legacy_req.mm_inputs, dict), "the legacy path did not run unpatched"
    return legacy_req, MultimodalInputs.from_dict(legacy_req.mm_inputs)


def test_pooled_llava_request_equals_legacy_from_dict_with_feature_in_the_workers_region(
    pooled, model_dir, monkeypatch
):
    image = _jpeg(seed=11)
    legacy_req, legacy_inputs = _legacy(model_dir, monkeypatch, image)
    (legacy_item,) = legacy_inputs.mm_items
    assert isinstance(legacy_item.feature, np.ndarray) and legacy_item.feature.dtype == np.float16

    req, sent = _tokenize_and_send(pooled, image)
    assert req.mm_inputs is None and list(req.input_ids) == list(legacy_req.input_ids)
    region = req.materialized_mm_inputs.segment
    assert isinstance(region, RegionDescriptor)
    worker_pids = [w.process.pid for w in pooled.mmpre.pool._workers]
    assert int(OWNED_NAME_RE.match(region.name).group(2)) in worker_pids, \
        "the feature is not in a region of a worker"
    (item,) = req.materialized_mm_inputs.inputs.mm_items
    assert isinstance(item.feature, TensorDescriptor) and item.feature.kind == "numpy"
    assert len(sent) < legacy_item.feature.nbytes // 10 < len(pickle.dumps(legacy_req)) // 10, \
        "the pixels travelled with the request"
    (ledger,) = [ledger for ledger in pooled.mmpre.pool._ledgers.values()
                 if region.name in ledger.regions]
    table = ledger.regions[region.name].attached.table
    assert [table.refcount(ref.index) for ref in region.slots] == [1] * len(region.slots)

    built = schedule_one(monkeypatch, sent, pad_input_ids_func=_pad_image_token)
    assert_equal_inputs(built.multimodal_inputs, legacy_inputs)
    assert built.origin_input_ids == _pad_image_token(list(legacy_req.input_ids), legacy_inputs)
    assert built.origin_input_ids != list(legacy_req.input_ids), "no image token was padded"
    del built
    gc.collect()
    assert region_cache.flush()
    assert [table.refcount(ref.index) for ref in region.slots] == [0] * len(region.slots)


def test_llava_request_with_the_pool_equals_the_request_without_it(
    pooled, model_dir, shm_dir, monkeypatch
):
    from tiny_models import close_tokenizer_manager, make_tokenizer_manager

    image = _jpeg(seed=5)
    req, sent = _tokenize_and_send(pooled, image)
    with_pool = schedule_one(monkeypatch, sent, pad_input_ids_func=_pad_image_token)

    monkeypatch.setenv("SGLANG_MM_PROCESSOR_WORKERS", "0")
    plain = make_tokenizer_manager(model_dir)
    try:
        assert not isinstance(plain.mm_data_processor.mm_processor, PooledProcessor)
        plain_req, plain_sent = _tokenize_and_send(plain, image)
        assert isinstance(plain_req.materialized_mm_inputs.segment, RegionDescriptor)
        assert OWNED_NAME_RE.match(plain_req.materialized_mm_inputs.segment.name).group(2) \
            == str(os.getpid()), "without the pool the tokenizer process holds the feature"
        without_pool = schedule_one(monkeypatch, plain_sent, pad_input_ids_func=_pad_image_token)
    finally:
        close_tokenizer_manager(plain)

    assert list(req.input_ids) == list(plain_req.input_ids)
    assert_equal_inputs(with_pool.multimodal_inputs, without_pool.multimodal_inputs)
    assert with_pool.origin_input_ids == without_pool.origin_input_ids
    del with_pool, without_pool
    gc.collect()
    assert region_cache.flush()
