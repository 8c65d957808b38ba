"""Where a fast (torchvision) image processor runs: ``SGLANG_MM_PREPROCESSING_DEVICE``
(``tokenizer_side/preprocessing_device.py``), on sglang 0.5.5's real, patched
TokenizerManager and its processor pool, on CPU.

sglang 0.5.5 passes ``device="cuda"`` to a fast image processor whatever the server's
device, so with today's path a CPU server fails every image request. With the setting at
``auto`` (a CPU server) or ``cpu``, the pool's workers run the same fast processor through
sglang's own ``process_mm_data`` on the CPU, and give bitwise what the same HF processor
gives when called in the tokenizer process with ``device="cpu"``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import types
from pathlib import Path

import pytest
import torch

from sglang_mmpre.scheduler_side import region_cache
from sglang_mmpre.tokenizer_side.pool import PooledProcessor, pool_unsupported_reason
from sglang_mmpre.tokenizer_side.preprocessing_device import (
    chosen_device,
    gpu_processor_reason,
    run_fast_processor_on,
)
from sglang_mmpre.transport.descriptors import RegionDescriptor
from sglang_mmpre.transport.liveness import OWNED_NAME_RE

from scheduler_harness import schedule_one
from test_patched_request_path import _jpeg, model_dir  # noqa: F401 - fixture

BOOT_DIR = Path(__file__).resolve().parent / "support" / "server_boot"


def _hf_processors(model_dir):
    from transformers import AutoProcessor

    return (AutoProcessor.from_pretrained(str(model_dir), use_fast=True),
            AutoProcessor.from_pretrained(str(model_dir), use_fast=False))


def _in_process(processor, jpeg: bytes, text: str, **kwargs) -> dict:
    """``processor`` called in this process on the image as sglang's Qwen-VL processor
    hands it over (sglang's own ``load_image`` and ``resize_image``); tensors on the CPU."""
    from sglang.srt.multimodal.processors.qwen_vl import resize_image
    from sglang.srt.utils import load_image

    image, _ = load_image(jpeg)
    out = processor(text=[text], images=[resize_image(image)], padding=True,
                    return_tensors="pt", **kwargs)
    return {k: v.cpu() for k, v in out.items()}


def _fast_in_process(model_dir, jpeg: bytes, text: str, device: str = "cpu") -> dict:
    """The HF fast processor, called in this process with ``device``."""
    return _in_process(_hf_processors(model_dir)[0], jpeg, text, device=device)


def _slow_in_process(model_dir, jpeg: bytes, text: str) -> dict:
    return _in_process(_hf_processors(model_dir)[1], jpeg, text)


@pytest.mark.parametrize(
    "setting, server_device, fast, disabled, device, pool",
    [
        # a fast processor on a CPU server: sglang would pass cuda; auto and cpu choose cpu
        ("auto", "cpu", True, False, "cpu", True),
        ("cpu", "cpu", True, False, "cpu", True),
        ("cuda", "cpu", True, False, "cuda", True),
        # on a GPU server auto keeps sglang's own choice and path; cpu and cuda take the pool
        ("auto", "cuda", True, False, "cuda", False),
        ("cpu", "cuda", True, False, "cpu", True),
        ("cuda", "cuda", True, False, "cuda", True),
        # --disable-fast-image-processor or a slow processor: sglang passes no device
        ("auto", "cuda", True, True, None, True),
        ("cuda", "cuda", False, False, None, True),
    ],
)
def test_device_chosen_for_each_setting_and_server(model_dir, setting, server_device, fast,
                                                   disabled, device, pool):
    fast_proc, slow_proc = _hf_processors(model_dir)
    mm_processor = types.SimpleNamespace(_processor=fast_proc if fast else slow_proc)
    server_args = types.SimpleNamespace(device=server_device,
                                        disable_fast_image_processor=disabled)
    assert chosen_device(mm_processor, server_args, setting) == device
    assert (gpu_processor_reason(mm_processor, server_args, setting) is None) == pool


def test_unknown_setting_is_refused_with_the_valid_values():
    from sglang_mmpre.config import load_settings

    with pytest.raises(ValueError, match="use auto, cpu or cuda"):
        load_settings({"SGLANG_MM_PREPROCESSING_DEVICE": "gpu"})


def test_override_replaces_the_device_sglangs_process_mm_data_passes(model_dir, monkeypatch):
    """sglang's own ``process_mm_data`` (unpatched logic) passes ``device="cuda"`` to the
    fast processor on this CPU-only machine and fails; with the override it runs on the
    CPU and gives bitwise what the HF fast processor gives in process."""
    from tiny_models import IMAGE_PLACEHOLDER, close_tokenizer_manager, make_tokenizer_manager

    monkeypatch.setenv("SGLANG_MM_PREMATERIALIZE", "0")
    tm = make_tokenizer_manager(model_dir, disable_fast_image_processor=False)
    try:
        # (after the TokenizerManager: sglang's modules import in its order)
        from sglang.srt.multimodal.processors.qwen_vl import resize_image
        from sglang.srt.utils import load_image

        mm_processor = tm.mm_processor
        jpeg = _jpeg(seed=21)
        text = "Describe: " + IMAGE_PLACEHOLDER
        image = resize_image(load_image(jpeg)[0])
        calls = []
        real_call = type(mm_processor._processor).__call__

        def spy(self, *args, **kwargs):
            calls.append(kwargs.get("device"))
            return real_call(self, *args, **kwargs)

        monkeypatch.setattr(type(mm_processor._processor), "__call__", spy)
        if not torch.cuda.is_available():
            with pytest.raises(Exception, match="(?i)cuda|nvidia"):
                mm_processor.process_mm_data(text, images=[image])
        assert calls == ["cuda"], "sglang should pass device='cuda' to a fast processor"

        server_args = tm.server_args
        assert run_fast_processor_on(mm_processor, server_args, "auto") == "cpu"
        assert run_fast_processor_on(mm_processor, server_args, "cpu") == "cpu"  # idempotent
        got = mm_processor.process_mm_data(text, images=[image])
        assert calls == ["cuda", "cpu"]
        want = _fast_in_process(model_dir, jpeg, text)
        for key in ("pixel_values", "image_grid_thw", "input_ids"):
            assert got[key].device.type == "cpu"
            assert got[key].dtype == want[key].dtype
            assert torch.equal(got[key], want[key]), key
    finally:
        close_tokenizer_manager(tm)


def _pooled_fast(model_dir, shm_dir, monkeypatch, setting: str, server_device: str):
    """A patched TokenizerManager with the fast image processor (sglang's default) and a
    pool of one worker."""
    from tiny_models import make_tokenizer_manager

    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("SGLANG_MM_PROCESSOR_WORKERS", "1")
    monkeypatch.setenv("SGLANG_MM_SHM_REGION_CHUNK_BYTES", str(32 << 20))
    monkeypatch.setenv("SGLANG_MM_PREPROCESSING_DEVICE", setting)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(BOOT_DIR), os.environ["PYTHONPATH"]]))
    return make_tokenizer_manager(model_dir, device=server_device,
                                  disable_fast_image_processor=False)


def _assert_pooled_equals_fast_in_process(tm, model_dir, monkeypatch, device: str) -> None:
    """One request through the pool of ``tm`` gives, on the scheduler side, bitwise the
    tensors of the HF fast processor called in this process on ``device``."""
    from transformers.image_processing_utils_fast import BaseImageProcessorFast
    from tiny_models import IMAGE_PLACEHOLDER, tokenize_and_send

    assert isinstance(tm.processor.image_processor, BaseImageProcessorFast)
    assert isinstance(tm.mm_data_processor.mm_processor, PooledProcessor)

    jpeg = _jpeg(seed=23)
    text = "Describe: " + IMAGE_PLACEHOLDER

    req, sent = tokenize_and_send(tm, text=text, image_data=[jpeg])
    region = req.materialized_mm_inputs.segment
    assert isinstance(region, RegionDescriptor)
    workers = [w.process.pid for w in tm.mmpre.pool._workers]
    start = "SpawnProcess" if device == "cuda" else "ForkServerProcess"
    assert {type(w.process).__name__ for w in tm.mmpre.pool._workers} == {start}
    assert int(OWNED_NAME_RE.match(region.name).group(2)) in workers, \
        "the tensors are not in a region of a worker"

    want = _fast_in_process(model_dir, jpeg, text, device)
    # The slow processor gives other bytes for this image: equality below shows that the
    # worker ran the fast one.
    assert not torch.equal(_slow_in_process(model_dir, jpeg, text)["pixel_values"],
                           want["pixel_values"])

    assert list(req.input_ids) == want["input_ids"].flatten().tolist()
    built = schedule_one(monkeypatch, sent)
    (item,) = built.multimodal_inputs.mm_items
    assert item.feature.dtype == want["pixel_values"].dtype
    assert torch.equal(item.feature, want["pixel_values"]), "pixel_values differ"
    assert torch.equal(item.image_grid_thw, want["image_grid_thw"])
    del built, item
    gc.collect()
    assert region_cache.flush()


@pytest.mark.parametrize("setting", ["auto", "cpu"])
def test_fast_processor_in_the_pool_on_cpu_equals_the_hf_fast_processor_in_process(
    setting, model_dir, shm_dir, monkeypatch
):
    from tiny_models import close_tokenizer_manager

    tm = _pooled_fast(model_dir, shm_dir, monkeypatch, setting, "cpu")
    try:
        assert pool_unsupported_reason(tm.mm_processor, tm.server_args, setting) is None
        _assert_pooled_equals_fast_in_process(tm, model_dir, monkeypatch, "cpu")
    finally:
        close_tokenizer_manager(tm)
    assert os.listdir(shm_dir) == [], "files left after the pool shut down"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_processor_in_the_pool_on_cuda_equals_the_hf_fast_processor_in_process_on_cuda(
    model_dir, shm_dir, monkeypatch
):
    """On a GPU server: ``auto`` keeps sglang's path (the processor on the loop, on cuda);
    ``cuda`` runs it on cuda in the workers, bitwise as in process."""
    from tiny_models import close_tokenizer_manager

    tm = _pooled_fast(model_dir, shm_dir, monkeypatch, "cuda", "cuda")
    try:
        assert pool_unsupported_reason(tm.mm_processor, tm.server_args, "auto") is not None
        _assert_pooled_equals_fast_in_process(tm, model_dir, monkeypatch, "cuda")
    finally:
        close_tokenizer_manager(tm)
    assert os.listdir(shm_dir) == [], "files left after the pool shut down"


def test_cuda_setting_spawns_the_workers_and_a_spawned_worker_serves_as_a_forked_one(
    model_dir, shm_dir, monkeypatch
):
    """With ``cuda`` the workers are spawned (a forkserver that imported sglang may have
    initialized CUDA). The slow processor (``--disable-fast-image-processor``) needs no
    device, so on this CPU machine a spawned worker serves the request; the scheduler side
    builds what sglang's ``from_dict`` builds from the unpatched path."""
    from sglang.srt.managers.schedule_batch import MultimodalInputs
    from test_materialize_equivalence import assert_equal_inputs
    from test_patched_request_path import _legacy_request
    from tiny_models import close_tokenizer_manager, make_tokenizer_manager, tokenize_and_send

    image = _jpeg(seed=31)
    legacy = MultimodalInputs.from_dict(_legacy_request(model_dir, monkeypatch, image).mm_inputs)
    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("SGLANG_MM_PROCESSOR_WORKERS", "1")
    monkeypatch.setenv("SGLANG_MM_SHM_REGION_CHUNK_BYTES", str(32 << 20))
    monkeypatch.setenv("SGLANG_MM_PREPROCESSING_DEVICE", "cuda")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(BOOT_DIR), os.environ["PYTHONPATH"]]))
    tm = make_tokenizer_manager(model_dir)  # --disable-fast-image-processor
    try:
        (worker,) = tm.mmpre.pool._workers
        assert type(worker.process).__name__ == "SpawnProcess"

        _, sent = tokenize_and_send(tm, image_data=[image])
        built = schedule_one(monkeypatch, sent)
        assert_equal_inputs(built.multimodal_inputs, legacy)
        del built
        gc.collect()
        assert region_cache.flush()
    finally:
        close_tokenizer_manager(tm)
    assert os.listdir(shm_dir) == [], "files left after the pool shut down"



def test_a_job_the_pool_cannot_take_runs_in_the_tokenizer_on_the_workers_device(
    model_dir, shm_dir, monkeypatch
):
    """A request object that can't be pickled is processed in the tokenizer process, as
    in sglang; with the fast processor on a CPU server it runs there on the CPU too (as
    shipped it would ask for cuda and fail), and gives what the worker gives."""
    from sglang.srt.managers.io_struct import GenerateReqInput
    from tiny_models import IMAGE_PLACEHOLDER, close_tokenizer_manager, tokenize_one

    tm = _pooled_fast(model_dir, shm_dir, monkeypatch, "auto", "cpu")
    jpeg = _jpeg(seed=41)
    text = "Describe: " + IMAGE_PLACEHOLDER
    try:
        (worker,) = tm.mmpre.pool._workers
        jobs = []
        real_run = worker.run
        monkeypatch.setattr(worker, "run", lambda job: (jobs.append(1), real_run(job))[1])

        async def both():
            pooled = await tokenize_one(tm, text=text, image_data=[jpeg])
            obj = GenerateReqInput(text=text, image_data=[jpeg])
            obj.normalize_batch_and_arguments()
            obj.unpicklable = lambda: None  # the job can't be sent to a worker
            local = await tm._tokenize_one_request(obj)
            return pooled, local

        pooled, local = asyncio.run(both())
        assert len(jobs) == 2, "both jobs should have been offered to the worker"
        assert list(local.input_ids) == list(pooled.input_ids)
        for req in (pooled, local):
            tm.mmpre.release_unsent(req)
        a = pooled.materialized_mm_inputs.inputs.mm_items[0]
        b = local.materialized_mm_inputs.inputs.mm_items[0]
        assert (a.hash, a.pad_value) == (b.hash, b.pad_value)  # sha256 of the features
    finally:
        close_tokenizer_manager(tm)
    assert os.listdir(shm_dir) == [], "files left after the pool shut down"
