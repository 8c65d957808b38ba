"""Tokenizer-side materialization equals sglang 0.5.5's own ``MultimodalInputs.from_dict``.

Every case builds the same processor output twice (``from_dict`` and materialization
mutate their items), runs sglang's real ``from_dict`` on one and this project's path on the
other, and compares everything: items, hash and pad_value bit for bit, features, optional
fields. The round-trip cases also send the result through a segment, or through slots of
a warm region (hashed while copied, then reused for the same content), pickle and a rank's
``resolve``.
"""

from __future__ import annotations

import dataclasses
import gc
import pickle
import types

import numpy as np
import pytest
import torch

from sglang_mmpre.scheduler_side import region_cache
from sglang_mmpre.scheduler_side.resolve import resolve
from sglang_mmpre.tokenizer_side.hashing import feature_hash
from sglang_mmpre.tokenizer_side.manager import TokenizerSide
from sglang_mmpre.tokenizer_side.materialize import materialize
from sglang_mmpre.transport.segment import segment_names

from mm_fixtures import qwen2vl_pixels, shm_settings


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and np.array_equal(a, b))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def assert_equal_inputs(ours, theirs) -> None:
    assert type(ours) is type(theirs)
    assert len(ours.mm_items) == len(theirs.mm_items)
    for x, y in zip(ours.mm_items, theirs.mm_items):
        assert x.hash == y.hash and x.hash is not None
        assert x.pad_value == y.pad_value
        for f in dataclasses.fields(x):
            assert _same(getattr(x, f.name), getattr(y, f.name)), f.name
    for f in dataclasses.fields(ours):
        if f.name != "mm_items":
            assert _same(getattr(ours, f.name), getattr(theirs, f.name)), f.name


def _item(modality: str, **kw):
    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

    return MultimodalDataItem(modality=Modality[modality], **kw)


def _qwen2vl_images(sizes) -> dict:
    pixels, grids = zip(*(qwen2vl_pixels(w, h, seed=i) for i, (w, h) in enumerate(sizes)))
    n = int(sum(int(g.prod()) for g in grids) // 4)
    return {
        "mm_items": [_item("IMAGE", feature=torch.cat(pixels), offsets=[(2, 2 + n)],
                           model_specific_data={"image_grid_thw": torch.cat(grids)})],
        "im_token_id": 261, "im_start_id": 259, "im_end_id": 260, "video_token_id": 262,
        "mrope_positions": torch.arange(3 * (n + 6)).view(3, -1),
        "mrope_position_delta": torch.tensor([[-n + 4]]),
    }


def _video() -> dict:
    from tiny_models import make_video_frames, qwen2vl_video_features

    out = qwen2vl_video_features(None, make_video_frames(16, 224, 224))
    return {
        "mm_items": [_item("VIDEO", feature=out["pixel_values_videos"], offsets=[(1, 65)],
                           model_specific_data={"video_grid_thw": out["video_grid_thw"],
                                                "second_per_grid_ts": [1.0]})],
        "video_token_id": 262,
        "mrope_positions": torch.arange(3 * 70).view(3, -1),
        "mrope_position_delta": torch.tensor([[2]]),
    }


def _audio(dtype=torch.float32) -> dict:
    from tiny_models import make_audio, whisper_audio_features

    feats = whisper_audio_features(make_audio(3.0))
    return {
        "mm_items": [_item("AUDIO", feature=feats["input_features"].to(dtype), offsets=[(1, 40)],
                           model_specific_data={"audio_feature_lens": torch.tensor([300])})],
        "audio_token_id": 263, "audio_start_id": 264, "audio_end_id": 265,
    }


def _precomputed() -> dict:
    torch.manual_seed(1)
    return {"mm_items": [_item("IMAGE", precomputed_embeddings=torch.randn(64, 32).to(torch.bfloat16),
                               offsets=[(0, 64)])],
            "im_token_id": 261}


def _llava() -> dict:
    """LLaVA-style: per-image tensors of different shapes in a list, image_sizes, no mrope."""
    a, _ = qwen2vl_pixels(336, 336, seed=3)
    b, _ = qwen2vl_pixels(448, 224, seed=4)
    return {"mm_items": [_item("MULTI_IMAGES", feature=[a, b], offsets=[(1, 50), (60, 90)],
                               model_specific_data={"image_sizes": [(336, 336), (224, 448)]})],
            "im_token_id": 32000}


def _numpy_and_invalid() -> dict:
    from sglang.srt.managers.schedule_batch import MultimodalDataItem

    rng = np.random.default_rng(0)
    invalid = MultimodalDataItem(modality=None, feature=torch.ones(3))
    return {"mm_items": [_item("AUDIO", feature=rng.standard_normal((80, 100)).astype(np.float32)),
                         invalid],
            "audio_token_id": 263}


CASES = {
    "qwen2vl_one_image_1120x700": lambda: _qwen2vl_images([(1120, 700)]),
    "qwen2vl_several_images_different_sizes": lambda: _qwen2vl_images([(448, 448), (1120, 700), (320, 640)]),
    "qwen2vl_video_16_frames": _video,
    "whisper_audio_features": _audio,
    "audio_features_bfloat16": lambda: _audio(torch.bfloat16),
    "precomputed_embeddings_bfloat16": _precomputed,
    "llava_style_list_of_tensors": _llava,
    "numpy_feature_and_invalid_item_filtered": _numpy_and_invalid,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_materialize_equals_sglang_from_dict(case):
    from sglang.srt.managers.schedule_batch import MultimodalInputs

    theirs = MultimodalInputs.from_dict(CASES[case]())
    ours = materialize(CASES[case]())
    assert_equal_inputs(ours, theirs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_roundtrip_through_segment_equals_from_dict(case, shm_dir):
    from sglang.srt.managers.schedule_batch import MultimodalInputs

    theirs = MultimodalInputs.from_dict(CASES[case]())
    side = TokenizerSide(types.SimpleNamespace(tp_size=2, pp_size=1), shm_settings(shm_dir))
    built = side.build(CASES[case]())
    assert built.segment is not None
    built.writer.add_consumers(2)
    side.release(built.writer)
    blob = pickle.dumps(built)
    for _rank in range(2):
        assert_equal_inputs(resolve(pickle.loads(blob), 2, str(shm_dir)), theirs)
    assert segment_names(str(shm_dir)) == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_roundtrip_through_region_slots_equals_from_dict_also_when_content_is_reused(case, shm_dir):
    from sglang.srt.managers.schedule_batch import MultimodalInputs

    theirs = MultimodalInputs.from_dict(CASES[case]())
    side = TokenizerSide(types.SimpleNamespace(tp_size=2, pp_size=1),
                         shm_settings(shm_dir, region_chunk_bytes=64 << 20))
    built = [side.build(CASES[case]()) for _ in range(2)]  # the second reuses the first's slots
    resolved = []
    for b in built:
        assert type(b.segment).__name__ == "RegionDescriptor"
        b.writer.add_consumers(2)
        side.release(b.writer)
        blob = pickle.dumps(b)
        for _rank in range(2):
            resolved.append(resolve(pickle.loads(blob), 2, str(shm_dir)))
            assert_equal_inputs(resolved[-1], theirs)
    assert side.region.live_slots() > 0  # the ranks' tensors still view their slots
    del resolved
    gc.collect()
    assert region_cache.flush()
    assert side.region.live_slots() == 0
    side.shutdown()
    assert segment_names(str(shm_dir)) == []


def test_pickled_request_size_is_independent_of_feature_size(shm_dir):
    side = TokenizerSide(types.SimpleNamespace(tp_size=4, pp_size=1), shm_settings(shm_dir))
    sizes = []
    for dims in ([(448, 448)], [(1920, 1080)]):
        built = side.build(_qwen2vl_images(dims))
        sizes.append(len(pickle.dumps(built)))
        built.writer.abandon()
    assert max(sizes) < 2048
    assert abs(sizes[0] - sizes[1]) < 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8])
def test_feature_hash_matches_sglang_hash_feature_for_strided_tensors(dtype):
    from sglang.srt.managers.mm_utils import hash_feature

    base = (torch.arange(4 * 6 * 5) % 251).view(4, 6, 5).to(dtype)
    for t in (base, base.transpose(0, 2), base[:, ::2], [base, base[1:]], [base.transpose(0, 1)]):
        assert feature_hash(t) == hash_feature(t)


def test_feature_hash_delegates_mixed_dtype_lists_to_sglang():
    from sglang.srt.managers.mm_utils import hash_feature

    mixed = [torch.ones(3, dtype=torch.float32), torch.ones(2, dtype=torch.int64)]
    assert feature_hash(mixed) == hash_feature(mixed)
