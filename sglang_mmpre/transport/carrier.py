"""The object a tokenized request carries in place of the raw multimodal dict.

``TokenizedGenerateReqInput.materialized_mm_inputs`` and
``TokenizedEmbeddingReqInput.materialized_mm_inputs`` hold a
:class:`MaterializedMultimodalInputs`: sglang's own ``MultimodalInputs``, already built as
``MultimodalInputs.from_dict`` builds it (items filtered, ``hash`` and ``pad_value`` set,
optional fields copied). When ``segment`` is set, every tensor in it has been replaced by
a :class:`TensorDescriptor` and its bytes live in that segment; otherwise (the inline
fallback) the tensors are in place and are pickled as sglang pickles them today.

:func:`walk_tensors` fixes the order in which both sides visit tensor slots, so the
descriptor table digest that the tokenizer side writes can be recomputed by every rank.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

from sglang_mmpre.transport.descriptors import SegmentDescriptor, TensorDescriptor

__all__ = ["MaterializedMultimodalInputs", "walk_tensors", "raw_mm_field", "HASHED_FIELDS"]

# The item fields sglang hashes for pad_value (feature first, else precomputed_embeddings).
HASHED_FIELDS = ("feature", "precomputed_embeddings")
_TOP_FIELDS = ("mrope_positions", "mrope_position_delta")

Leaf = Any  # torch.Tensor | np.ndarray | TensorDescriptor


def _is_leaf(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray, TensorDescriptor))


def _map_value(value: Any, fn: Callable[[Leaf, Optional[int]], Leaf], item_hash) -> Any:
    if _is_leaf(value):
        return fn(value, item_hash)
    if isinstance(value, list) and any(_is_leaf(v) or isinstance(v, list) for v in value):
        return [_map_value(v, fn, item_hash) for v in value]
    return value


def raw_mm_field(tokenized_obj: Any) -> Optional[str]:
    """The attribute that holds the raw multimodal dict on a tokenized request:
    ``mm_inputs`` (generate) or ``image_inputs`` (embedding)."""
    for name in ("mm_inputs", "image_inputs"):
        if hasattr(tokenized_obj, name):
            return name
    return None


def walk_tensors(inputs: Any, fn: Callable[[Leaf, Optional[int]], Leaf]) -> None:
    """Replace, in place and in a fixed order, each tensor slot of a ``MultimodalInputs``
    by ``fn(leaf, item_hash)``; ``item_hash`` is the item's hash for the hashed fields and
    None elsewhere. Leaves are tensors, numpy arrays or descriptors, also inside lists."""
    for item in inputs.mm_items:
        for name in HASHED_FIELDS:
            value = item.__dict__.get(name)
            if value is not None:
                item.__dict__[name] = _map_value(value, fn, item.hash)
        msd = item.__dict__.get("model_specific_data")
        if isinstance(msd, dict):
            for key in list(msd):
                msd[key] = _map_value(msd[key], fn, None)
    for name in _TOP_FIELDS:
        value = getattr(inputs, name, None)
        if value is not None:
            new = _map_value(value, fn, None)
            if new is not value:
                setattr(inputs, name, new)


class MaterializedMultimodalInputs:
    """Pre-materialized multimodal inputs of one request (see the module docstring).

    Pickled: ``inputs``, ``segment`` and the entry rank's verdict on the segment
    (``vouched``: it exists with a valid header and its nonce; ``refusal``: why not). The
    entry rank sets both in ``recv_requests``, before ``broadcast_pyobj`` hands every rank
    its copy, so every rank follows one verdict (``resolve.vouch``). The tokenizer side
    keeps its ``SegmentWriter`` in ``writer`` (never pickled); the scheduler side marks
    the object ``resolved`` so that a reference is dropped once per rank and request.
    """

    __slots__ = ("inputs", "segment", "writer", "resolved", "vouched", "refusal")

    def __init__(self, inputs: Any, segment: Optional[SegmentDescriptor] = None,
                 writer: Any = None) -> None:
        self.inputs = inputs
        self.segment = segment
        self.writer = writer
        self.resolved = False
        self.vouched = False
        self.refusal: Optional[str] = None

    def __getstate__(self):
        return (self.inputs, self.segment, self.vouched, self.refusal)

    def __setstate__(self, state) -> None:
        self.inputs, self.segment, self.vouched, self.refusal = state
        self.writer = None
        self.resolved = False

    def __repr__(self) -> str:
        where = self.segment.name if self.segment is not None else "inline"
        return f"MaterializedMultimodalInputs({len(self.inputs.mm_items)} items, {where})"
