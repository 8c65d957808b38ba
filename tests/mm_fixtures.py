"""Multimodal dicts shaped like sglang 0.5.5 processor output, built from real processors."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from sglang_mmpre.config import Settings
from sglang_mmpre.transport.liveness import LOCK_NAME_RE, creator_alive

__all__ = ["image_mm_dict", "qwen2vl_pixels", "shm_settings", "files_left"]


def shm_settings(shm_dir: Path, cap: int = 1 << 34, enabled: bool = True,
                 region_chunk_bytes: int = 0) -> Settings:
    """Settings for a ``TokenizerSide`` in ``shm_dir``: per-request segments only, unless a
    region chunk size is given (then requests take slots of a warm region first)."""
    return Settings(enabled=enabled, shm_dir=str(shm_dir), shm_cap_bytes=cap, threads=2,
                    region_chunk_bytes=region_chunk_bytes)


def files_left(shm_dir: str | Path) -> list[str]:
    """Every file in ``shm_dir`` but the lock files of live creators (this process's, for
    one): what must be gone once every segment is released."""
    return sorted(n for n in os.listdir(shm_dir)
                  if not (LOCK_NAME_RE.match(n) and creator_alive(str(shm_dir), n[:-len(".lock")])))


@functools.lru_cache(maxsize=None)
def _image_processor():
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor()


def qwen2vl_pixels(width: int, height: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values and image_grid_thw from transformers' real Qwen2-VL image processor."""
    from tiny_models import make_image

    out = _image_processor()(images=[make_image(width, height, seed)], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def image_mm_dict(width: int, height: int, seed: int = 0, n_tokens: int = 64) -> dict[str, Any]:
    """A fresh Qwen2-VL-style mm dict (one image item, mrope fields) for one request."""
    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

    pixels, grid = qwen2vl_pixels(width, height, seed)
    item = MultimodalDataItem(
        modality=Modality.IMAGE, feature=pixels, offsets=[(3, 3 + n_tokens)],
        model_specific_data={"image_grid_thw": grid},
    )
    return {
        "mm_items": [item],
        "im_token_id": 261,
        "video_token_id": 262,
        "mrope_positions": torch.arange(3 * (n_tokens + 8)).view(3, -1),
        "mrope_position_delta": torch.tensor([[-5]]),
    }
