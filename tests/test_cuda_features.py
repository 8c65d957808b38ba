"""GPU-resident features (sglang's ``SGLANG_USE_CUDA_IPC_TRANSPORT=1``,
``--keep-mm-feature-on-device``, fast image processors on cuda).

What holds today: the item hash of a CUDA tensor is sglang's own ``gpu_tensor_hash`` (the
tokenizer side delegates to ``hash_feature``), and CUDA tensors are never written to shared
memory: they travel inline, as in sglang 0.5.5. Sharing them through CUDA IPC is not built
yet. These tests need a CUDA GPU and skip without one.
"""

from __future__ import annotations

import pickle
import types

import pytest
import torch

from sglang_mmpre.scheduler_side.resolve import resolve
from sglang_mmpre.tokenizer_side.hashing import feature_hash
from sglang_mmpre.tokenizer_side.manager import TokenizerSide
from sglang_mmpre.tokenizer_side.materialize import shm_eligible

from mm_fixtures import shm_settings

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (GPU-resident multimodal features); none on this machine",
)


def test_cuda_feature_hash_is_sglangs_gpu_tensor_hash():
    from sglang.srt.managers.mm_utils import hash_feature

    t = torch.randn(1000, 1176, device="cuda")
    assert feature_hash(t) == hash_feature(t)


def test_cuda_features_travel_inline_and_resolve_equal(shm_dir):
    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

    feature = torch.randn(256, 1176, device="cuda")
    assert not shm_eligible(feature)
    item = MultimodalDataItem(modality=Modality.IMAGE, feature=feature, offsets=[(0, 64)])
    side = TokenizerSide(types.SimpleNamespace(tp_size=1, pp_size=1), shm_settings(shm_dir))
    built = side.build({"mm_items": [item]})
    assert built.segment is None
    out = resolve(pickle.loads(pickle.dumps(built)), 1, str(shm_dir))
    assert torch.equal(out.mm_items[0].feature.cpu(), feature.cpu())
