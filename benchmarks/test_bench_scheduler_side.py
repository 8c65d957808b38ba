"""pytest-benchmark: the scheduler-side handling of ONE request, per scheme and feature size.

    pytest benchmarks --benchmark-only --benchmark-group-by=param

Single process, TP=1 semantics (no collective), one test per mode, each parametrized by
the feature size only, so that grouping by param puts the six modes side by side:

- ``original`` / ``per_request_broadcast`` / ``batch_broadcast``: ``from_dict`` of a fresh
  processor dict (per_request_broadcast through sglang's real, unbound
  ``Scheduler._process_and_broadcast_mm_inputs``, which at world size 1 materializes
  locally; batch_broadcast through the seed's cache, which is skipped at TP=1);
- ``upstream_shm_barrier``: unpickling the request (which maps its per-feature segment,
  as upstream's ``__setstate__`` does), copying the feature out, unlinking, and the
  hash-free ``from_dict``; hashing and segment creation are in the setup;
- ``tokenizer_stage``: the entry rank's ``vouch_for_segments`` and ``take_multimodal_inputs``
  on a freshly unpickled request whose features were put in slots of the tokenizer
  process's warm region (``TokenizerSide.build``, the side built as in a TokenizerManager
  without a processor pool: ``schemes.tokenizer_side``) and sent (``TokenizerSide.send``)
  in setup; the test checks that the request travelled in region slots and that the ranks
  got the features back;
- ``floor``: nothing but the harness's per-batch dispatch; the test checks that the request
  carried no multimodal data and that nothing was built for it.

Setup (fresh dicts, segment creation, pickling) runs outside the timed region
(``benchmark.pedantic(setup=...)``). No timing assertions.
"""

from __future__ import annotations

import itertools
import os
import pickle
import types

import pytest
import torch

from benchmarks import _standin

_standin.install()

from benchmarks.schemes import (  # noqa: E402
    PLACEHOLDER,
    UPSTREAM_PREFIX,
    RankContext,
    compute_features,
    fresh_mm_dict,
    handle_batch,
    make_request,
    tokenizer_side,
    transport_of,
    upstream_prepare,
)

SIZES = ["448x448", "1120x700", "1920x1080"]
ROUNDS = {"448x448": 30, "1120x700": 15, "1920x1080": 15}
_rid = itertools.count()


@pytest.fixture(scope="module")
def features():
    return {size: compute_features(size) for size in SIZES}


@pytest.fixture(scope="module")
def ctx():
    return RankContext(rank=0, world=1, group=None)


def _own_segments() -> list[str]:
    pid = os.getpid()
    prefixes = (f"sglmmpre_{pid}_", f"{UPSTREAM_PREFIX}{pid}_")
    # Not this process's creator lock file: it is held (and needed) until the process exits.
    return [n for n in os.listdir("/dev/shm") if n.startswith(prefixes) and not n.endswith(".lock")]


@pytest.fixture(autouse=True)
def no_segments_left():
    yield
    left = _own_segments()
    for name in left:  # clean up before failing, so one failure does not cascade
        os.unlink(os.path.join("/dev/shm", name))
    assert not left, f"segments left in /dev/shm: {left}"


def _bench(benchmark, size, setup, target):
    benchmark.group = size
    benchmark.extra_info["feature_size"] = size
    result = benchmark.pedantic(target, setup=setup, rounds=ROUNDS[size], iterations=1,
                                warmup_rounds=1)
    return result


def _check(inputs) -> None:
    assert inputs is not None
    assert inputs.mm_items and inputs.mm_items[0].hash is not None


@pytest.mark.parametrize("size", SIZES)
def test_original(benchmark, features, size):
    from sglang.srt.managers.schedule_batch import MultimodalInputs

    f = features[size]
    _check(_bench(benchmark, size, lambda: ((fresh_mm_dict(f),), {}), MultimodalInputs.from_dict))


@pytest.mark.parametrize("size", SIZES)
def test_per_request_broadcast(benchmark, features, size):
    from sglang.srt.managers.scheduler import Scheduler

    f = features[size]
    sglang_self = types.SimpleNamespace(cpu_group=None, is_entry_rank=True)

    def target(mm):
        return Scheduler._process_and_broadcast_mm_inputs(sglang_self, mm)

    _check(_bench(benchmark, size, lambda: ((fresh_mm_dict(f),), {}), target))


@pytest.mark.parametrize("size", SIZES)
def test_batch_broadcast(benchmark, features, ctx, size):
    f = features[size]

    def setup():
        return ((make_request(f"b{next(_rid)}", f, fresh_mm_dict(f)),), {})

    def target(req):
        [(_rid_, inputs, err)] = handle_batch("batch_broadcast", ctx, [req])
        assert err is None
        return inputs

    _check(_bench(benchmark, size, setup, target))


@pytest.mark.parametrize("size", SIZES)
def test_upstream_shm_barrier(benchmark, features, ctx, size):
    f = features[size]

    def setup():
        mm, _ = upstream_prepare(fresh_mm_dict(f))  # tokenizer side: hash + segment
        return ((pickle.dumps(make_request(f"u{next(_rid)}", f, mm)),), {})

    def target(data):
        req = pickle.loads(data)  # maps the segment (upstream's __setstate__)
        [(_rid_, inputs, err)] = handle_batch("upstream_shm_barrier", ctx, [req])
        assert err is None
        return inputs

    _check(_bench(benchmark, size, setup, target))


class _CaptureSocket:
    def __init__(self) -> None:
        self.data = None

    def send_pyobj(self, obj) -> None:
        self.data = pickle.dumps(obj)


@pytest.mark.parametrize("size", SIZES)
def test_tokenizer_stage(benchmark, features, ctx, size):
    from sglang_mmpre.scheduler_side.hooks import take_multimodal_inputs, vouch_for_segments

    f = features[size]
    side = tokenizer_side(tp=1)
    transports = []

    def setup():
        req = make_request(f"t{next(_rid)}", f, None)
        req.materialized_mm_inputs = side.build(fresh_mm_dict(f))
        sock = _CaptureSocket()
        side.send(sock, req)  # counts the one consumer, drops the creator reference
        received = pickle.loads(sock.data)
        transports.append(transport_of(received.materialized_mm_inputs))
        return ((received,), {})

    def target(req):
        vouch_for_segments([req])  # the entry rank's check in recv_requests (TP=1: this rank)
        inputs, err = take_multimodal_inputs(ctx.scheduler_like, req)
        assert err is None
        return inputs

    try:
        inputs = _bench(benchmark, size, setup, target)
        _check(inputs)
        # What the scheme names: every request went through slots of the warm region, and
        # the rank got the processor's features, not a copy of something else.
        assert transports and set(transports) == {"region"}, transports
        assert torch.equal(inputs.mm_items[0].feature, f.feature)
    finally:
        side.shutdown()


@pytest.mark.parametrize("size", SIZES)
def test_floor(benchmark, features, ctx, size):
    f = features[size]
    sent = []

    def setup():
        req = make_request(f"f{next(_rid)}", f, None)
        req.bench_placeholder = PLACEHOLDER
        assert req.mm_inputs is None and getattr(req, "materialized_mm_inputs", None) is None
        sent.append(len(pickle.dumps(req)))
        return ((req,), {})

    def target(req):
        return handle_batch("floor", ctx, [req])

    [(rid, inputs, err)] = _bench(benchmark, size, setup, target)
    # What the floor names: no multimodal data travelled (the pickled request, its ids and
    # the placeholder, is under 1% of the feature's bytes) and the ranks built nothing.
    assert inputs is None and err is None
    assert max(sent) < f.nbytes // 100, (max(sent), f.nbytes)
