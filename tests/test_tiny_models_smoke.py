"""Smoke test: sglang's real TokenizerManager tokenizes a Qwen2-VL image request on CPU."""

from __future__ import annotations

import asyncio
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "support"))

import gpu_module_standin  # noqa: E402

gpu_module_standin.install()

import torch  # noqa: E402

import tiny_models  # noqa: E402


def test_tokenizer_manager_tokenizes_qwen2vl_image(tmp_path: Path, monkeypatch) -> None:
    # The fixture itself, checked on the legacy (switch off) path: a raw mm dict.
    monkeypatch.setenv("SGLANG_MM_PREMATERIALIZE", "0")
    from sglang.srt.managers.io_struct import TokenizedGenerateReqInput

    model_dir = tiny_models.make_tiny_qwen2vl(tmp_path / "qwen2vl")
    assert tiny_models.make_tiny_qwen2vl(model_dir) == model_dir  # idempotent

    tm = tiny_models.make_tokenizer_manager(model_dir)
    try:
        jpeg = tiny_models.image_to_jpeg_bytes(tiny_models.make_image(1120, 700, seed=1))
        tokenized = asyncio.run(tiny_models.tokenize_one(tm, image_data=[jpeg]))
        # The same manager serves a second event loop, with a data-URL image this time.
        url = tiny_models.image_data_url(tiny_models.make_image(1120, 700, seed=2))
        tokenized_url = asyncio.run(tiny_models.tokenize_one(tm, image_data=[url]))
    finally:
        tiny_models.close_tokenizer_manager(tm)

    assert isinstance(tokenized, TokenizedGenerateReqInput)
    item = tokenized.mm_inputs["mm_items"][0]
    grid = tuple(int(x) for x in item.image_grid_thw.reshape(-1))
    assert grid == tiny_models.qwen2vl_expected_grid_thw(1120, 700) == (1, 50, 80)
    assert isinstance(item.feature, torch.Tensor)
    assert item.feature.shape == (math.prod(grid), 3 * 2 * 14 * 14)

    n_pad = math.prod(grid) // 4  # 2x2 spatial merge
    ids = tokenized.input_ids
    assert ids.count(tiny_models.IMAGE_TOKEN_ID) == n_pad
    start = ids.index(tiny_models.VISION_START_TOKEN_ID)
    assert ids[start + 1 : start + 1 + n_pad] == [tiny_models.IMAGE_TOKEN_ID] * n_pad
    assert ids[start + 1 + n_pad] == tiny_models.VISION_END_TOKEN_ID
    assert item.offsets == [(start + 1, start + n_pad)]

    assert isinstance(tokenized_url, TokenizedGenerateReqInput)
    assert tokenized_url.input_ids.count(tiny_models.IMAGE_TOKEN_ID) == n_pad


def test_other_modality_helpers() -> None:
    frames = tiny_models.make_video_frames(n_frames=8, width=224, height=224)
    assert frames.shape == (8, 224, 224, 3)
    video = tiny_models.qwen2vl_video_features(None, frames)
    thw = tuple(int(x) for x in video["video_grid_thw"].reshape(-1))
    assert video["pixel_values_videos"].shape[0] == math.prod(thw)

    audio = tiny_models.make_audio(1.5)
    assert audio.shape == (24000,)
    assert (audio == tiny_models.make_audio(1.5)).all()  # deterministic
    feats = tiny_models.whisper_audio_features(audio)
    assert feats["input_features"].shape == (1, 80, 3000)
