"""Forge one descriptor of chosen requests inside a real server (test-only, never shipped).

``server_boot/sitecustomize.py`` calls :func:`install` when ``SGLANG_MMPRE_TEST_FORGE_PREFIX``
is set. In the TokenizerManager, every request whose ``rid`` starts with that prefix has the
hash of its first tensor descriptor flipped just before it is sent: what a corrupted or
forged request looks like to the scheduler ranks (its descriptor table no longer matches
the segment's header). The segment itself is genuine, so the ranks still drop their
references and nothing may leak.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["install"]


def _forge(materialized: Any) -> None:
    from sglang_mmpre.transport.carrier import walk_tensors
    from sglang_mmpre.transport.descriptors import TensorDescriptor

    done = []

    def flip(leaf, _hash):
        if isinstance(leaf, TensorDescriptor) and not done:
            done.append(leaf)
            return dataclasses.replace(leaf, hash=leaf.hash ^ 1)
        return leaf

    walk_tensors(materialized.inputs, flip)
    if not done:
        raise RuntimeError("forge hook: the request carries no tensor descriptor to forge")


def install(prefix: str) -> None:
    from sglang_mmpre.tokenizer_side.manager import TokenizerSide

    original = TokenizerSide.send

    def send(self, socket, obj):
        batch = getattr(obj, "batch", None)
        for req in batch if isinstance(batch, list) else [obj]:
            m = getattr(req, "materialized_mm_inputs", None)
            if m is not None and str(getattr(req, "rid", "")).startswith(prefix):
                _forge(m)
        return original(self, socket, obj)

    TokenizerSide.send = send
