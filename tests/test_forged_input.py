"""Forged, stale or inconsistent multimodal inputs abort one request, the same way on
every rank, and the next request is served; nothing outside our segments is ever opened.

Each case takes a genuine request (materialized and sent by ``TokenizerSide`` for TP=3),
forges it after it left the tokenizer, and runs the same pickle through the entry rank's
check (``vouch_for_segments``, as the patched ``recv_requests`` runs it) and three
``SchedulerUnderTest`` ranks (the real patched ``Scheduler.handle_generate_request``), as
``broadcast_pyobj`` hands every rank its own copy. The multi-process version (four gloo
ranks) is ``test_forged_requests_abort_identically_on_four_rank_processes``.

The hypothesis tests fuzz ``take_multimodal_inputs`` (and through it ``resolve``): it may
return inputs or ``(None, "Invalid multimodal inputs: ...")``, nothing else, and it may
open only ``<shm dir>/sglmmpre_<pid>_<16 hex>_<24 hex>``.
"""

from __future__ import annotations

import builtins
import dataclasses
import io
import os
import pickle
import re
import stat
import types
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_mmpre.errors import SegmentAllocationError
from sglang_mmpre.scheduler_side.hooks import take_multimodal_inputs, vouch_for_segments
from sglang_mmpre.tokenizer_side.manager import TokenizerSide
from sglang_mmpre.transport.carrier import MaterializedMultimodalInputs
from sglang_mmpre.transport.descriptors import SegmentDescriptor, TensorDescriptor
from sglang_mmpre.transport.segment import SegmentWriter, segment_names

from mm_fixtures import shm_settings
from mm_requests import (
    materialized_request,
    run_ranks,
    segment_refcount,
    send_captured,
    tokenized_request,
    write_refcount,
)
from scheduler_harness import SchedulerUnderTest

TP = 3
# Written out here, independently of liveness.OWNED_NAME_RE.
OUR_NAME = re.compile(r"sglmmpre_[1-9][0-9]{0,9}_[0-9a-f]{16}_[0-9a-f]{24}")
FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture
def side(shm_dir, monkeypatch):
    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    s = TokenizerSide(types.SimpleNamespace(tp_size=TP, pp_size=1), shm_settings(shm_dir))
    yield s
    s.shutdown()


class OpenRecorder:
    """Records every path passed to ``os.open`` / ``open`` while active."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    @contextmanager
    def active(self):
        real_os_open, real_open = os.open, builtins.open

        def os_open(path, *a, **k):
            self.paths.append(os.fsdecode(path) if not isinstance(path, int) else f"<fd {path}>")
            return real_os_open(path, *a, **k)

        def py_open(file, *a, **k):
            self.paths.append(os.fsdecode(file) if not isinstance(file, int) else f"<fd {file}>")
            return real_open(file, *a, **k)

        os.open, builtins.open, io.open = os_open, py_open, py_open
        try:
            yield self
        finally:
            os.open, builtins.open, io.open = real_os_open, real_open, real_open

    def assert_only_segments_in(self, shm_dir) -> None:
        for p in self.paths:
            assert os.path.dirname(p) == str(shm_dir) and OUR_NAME.fullmatch(os.path.basename(p)), (
                f"opened {p!r}, which is not a segment path in {shm_dir}"
            )


def _genuine(side, rid: str, seed: int = 0) -> bytes:
    """A request as it left the tokenizer (creator reference released: refcount == TP)."""
    return send_captured(side, materialized_request(side, rid, seed=seed))


def _forge(blob: bytes, mutate) -> bytes:
    req = pickle.loads(blob)
    mutate(req)
    return pickle.dumps(req)


def _seg(req) -> SegmentDescriptor:
    return req.materialized_mm_inputs.segment


def _set_seg(req, **changes) -> None:
    req.materialized_mm_inputs.segment = dataclasses.replace(_seg(req), **changes)


def _item(req):
    return req.materialized_mm_inputs.inputs.mm_items[0]


def _set_feature_desc(req, **changes) -> None:
    item = _item(req)
    item.feature = dataclasses.replace(item.feature, **changes)


def _assert_same_abort_everywhere(reqs, *fragments) -> str:
    messages = [r.to_finish.message if r.to_finish is not None else None for r in reqs]
    assert None not in messages, f"some rank served a forged request: {messages}"
    assert len(set(messages)) == 1, f"ranks disagree: {messages}"
    msg = messages[0]
    assert msg.startswith("Invalid multimodal inputs: "), msg
    for fragment in fragments:
        assert fragment in msg, msg
    assert all(r.multimodal_inputs is None for r in reqs)
    return msg


def _assert_served_everywhere(reqs) -> None:
    for r in reqs:
        assert r.to_finish is None, r.to_finish.message
        assert r.multimodal_inputs is not None
        assert r.multimodal_inputs.mm_items[0].feature.shape[0] > 0


# --- forged descriptors: refused before the segment is touched ---------------------------

REFUSED_UNTOUCHED = {
    "unknown_prefix": (lambda r: _set_seg(r, name="notours_" + _seg(r).name.split("_", 1)[1]),
                       "not ours"),
    "dotdot_prefix": (lambda r: _set_seg(r, name="../" + _seg(r).name), "not ours"),
    "dotdot_suffix": (lambda r: _set_seg(r, name=_seg(r).name + "/../../etc/passwd"), "not ours"),
    "absolute_path": (lambda r: _set_seg(r, name="/etc/passwd"), "not ours"),
    "relative_traversal": (lambda r: _set_seg(r, name="../../../../etc/passwd"), "not ours"),
    "trailing_newline": (lambda r: _set_seg(r, name=_seg(r).name + "\n"), "not ours"),
    "uppercase_hex": (lambda r: _set_seg(r, name=_seg(r).name.upper()), "not ours"),
    "wrong_nonce": (lambda r: _set_seg(r, nonce=bytes(16)), "nonce mismatch"),
    "short_nonce": (lambda r: _set_seg(r, nonce=b"\1" * 8), "malformed segment nonce"),
    "negative_size": (lambda r: _set_seg(r, payload_nbytes=-1), "malformed segment size"),
    "not_a_segment_descriptor": (
        lambda r: setattr(r.materialized_mm_inputs, "segment", ("name", 1, b"", 3)),
        "malformed segment descriptor"),
    "descriptors_without_segment": (
        lambda r: setattr(r.materialized_mm_inputs, "segment", None),
        "tensor descriptors without a segment"),
    "not_materialized_inputs": (
        lambda r: setattr(r, "materialized_mm_inputs", {"mm_items": []}),
        "not MaterializedMultimodalInputs"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_UNTOUCHED))
def test_forged_descriptor_is_refused_identically_without_touching_the_segment(
    case, side, shm_dir
):
    mutate, fragment = REFUSED_UNTOUCHED[case]
    blob = _genuine(side, "bad", seed=1)
    (name,) = segment_names(str(shm_dir))
    ranks = [SchedulerUnderTest(tp_size=TP, tp_rank=r) for r in range(TP)]
    recorder = OpenRecorder()
    with recorder.active():
        aborted = run_ranks(_forge(blob, mutate), TP, ranks)
    _assert_same_abort_everywhere(aborted, fragment)
    recorder.assert_only_segments_in(shm_dir)
    if case != "wrong_nonce":  # that one opens the segment named, which is ours
        assert recorder.paths == [], f"opened {recorder.paths} for a descriptor not ours"
    assert segment_refcount(shm_dir / name) == TP, "a refused descriptor moved the refcount"
    # The genuine request still resolves on every rank, and then the segment is gone.
    _assert_served_everywhere(run_ranks(blob, TP, ranks))
    next_blob = _genuine(side, "next", seed=2)
    _assert_served_everywhere(run_ranks(next_blob, TP, ranks))
    assert segment_names(str(shm_dir)) == []


# --- forged descriptors of our own segment: refused, references still dropped -----------

def _other_dtype(r) -> None:
    d = _item(r).feature
    _set_feature_desc(r, dtype="float16", shape=(d.shape[0], d.shape[1] * 2))


REFUSED_RELEASED = {
    "wrong_nbytes": (lambda r: _set_feature_desc(r, nbytes=_item(r).feature.nbytes - 4),
                     "do not match its header"),
    "wrong_shape": (lambda r: _set_feature_desc(
        r, shape=(_item(r).feature.shape[0] // 2, _item(r).feature.shape[1] * 2)),
        "do not match its header"),
    "wrong_dtype": (_other_dtype, "do not match its header"),
    "wrong_offset": (lambda r: _set_feature_desc(r, offset=_item(r).feature.offset + 64),
                     "do not match its header"),
    "wrong_kind": (lambda r: _set_feature_desc(r, kind="numpy"), "do not match its header"),
    "descriptor_hash_changed": (lambda r: _set_feature_desc(r, hash=_item(r).feature.hash ^ 1),
                                "do not match its header"),
    "consumers_changed": (lambda r: _set_seg(r, consumers=TP + 1), "disagree on the topology"),
    "payload_size_changed": (lambda r: _set_seg(r, payload_nbytes=_seg(r).payload_nbytes + 64),
                             "truncated or resized"),
    "item_hash_changed": (lambda r: setattr(_item(r), "hash", _item(r).hash ^ 1),
                          "inconsistent"),
    "item_hash_and_pad_value_changed": (
        lambda r: (setattr(_item(r), "hash", _item(r).hash ^ 1),
                   setattr(_item(r), "pad_value", (_item(r).hash) % (1 << 30))),
        "does not match the hash its feature was written with"),
    "item_hash_not_an_int": (lambda r: setattr(_item(r), "hash", "0xdeadbeef"), "hash"),
    "feature_descriptor_shape_not_a_tuple": (lambda r: _set_feature_desc(r, shape=7),
                                             "do not match its header"),
    "feature_descriptor_nbytes_not_an_int": (lambda r: _set_feature_desc(r, nbytes="many"),
                                             "do not match its header"),
    "consumers_not_an_int": (lambda r: _set_seg(r, consumers="all"), "disagree on the topology"),
    "size_over_64_bits": (lambda r: _set_seg(r, payload_nbytes=1 << 70), "truncated or resized"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_RELEASED))
def test_forged_descriptor_of_our_segment_aborts_on_every_rank_and_leaks_nothing(
    case, side, shm_dir
):
    mutate, fragment = REFUSED_RELEASED[case]
    bad = _forge(_genuine(side, "bad", seed=1), mutate)
    ranks = [SchedulerUnderTest(tp_size=TP, tp_rank=r) for r in range(TP)]
    recorder = OpenRecorder()
    with recorder.active():
        aborted = run_ranks(bad, TP, ranks)
    _assert_same_abort_everywhere(aborted, fragment)
    recorder.assert_only_segments_in(shm_dir)
    # The nonce matched on every rank, so each dropped its reference: nothing is left.
    assert segment_names(str(shm_dir)) == []
    _assert_served_everywhere(run_ranks(_genuine(side, "next", seed=2), TP, ranks))
    assert segment_names(str(shm_dir)) == []


def test_topology_mismatch_aborts_on_every_rank_and_leaks_nothing(shm_dir, monkeypatch):
    """The tokenizer counted 2 consumers, the scheduler has 3 ranks (a misconfiguration):
    every rank aborts with the same message (the last one finds the segment already
    gone, but the count is checked first) and the segment is unlinked once."""
    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    side = TokenizerSide(types.SimpleNamespace(tp_size=2, pp_size=1), shm_settings(shm_dir))
    blob = _genuine(side, "mismatch")
    reqs = run_ranks(blob, 3)
    messages = [r.to_finish.message for r in reqs if r.to_finish is not None]
    assert len(messages) == 3
    assert all(m.startswith("Invalid multimodal inputs: ") for m in messages)
    assert len(set(messages)) == 1 and "disagree on the topology" in messages[0]
    assert segment_names(str(shm_dir)) == []
    side.shutdown()


# --- the segment file itself is damaged or gone -------------------------------------------

def test_truncated_segment_aborts_on_every_rank_and_is_unlinked(side, shm_dir):
    blob = _genuine(side, "bad")
    (name,) = segment_names(str(shm_dir))
    os.truncate(shm_dir / name, os.stat(shm_dir / name).st_size // 2)
    ranks = [SchedulerUnderTest(tp_size=TP, tp_rank=r) for r in range(TP)]
    _assert_same_abort_everywhere(run_ranks(blob, TP, ranks), "truncated or resized")
    assert segment_names(str(shm_dir)) == []
    _assert_served_everywhere(run_ranks(_genuine(side, "next", seed=3), TP, ranks))
    assert segment_names(str(shm_dir)) == []


def test_segment_truncated_below_its_header_aborts_on_every_rank(side, shm_dir):
    """Without a header the nonce can't be checked, so no rank touches the file; it stays
    until its creator is gone and a sweep removes it."""
    blob = _genuine(side, "bad")
    (name,) = segment_names(str(shm_dir))
    os.truncate(shm_dir / name, 10)
    ranks = [SchedulerUnderTest(tp_size=TP, tp_rank=r) for r in range(TP)]
    _assert_same_abort_everywhere(run_ranks(blob, TP, ranks), "truncated or not a file")
    assert os.stat(shm_dir / name).st_size == 10
    _assert_served_everywhere(run_ranks(_genuine(side, "next", seed=3), TP, ranks))
    os.unlink(shm_dir / name)


def test_enlarged_segment_aborts_on_every_rank(side, shm_dir):
    blob = _genuine(side, "bad")
    (name,) = segment_names(str(shm_dir))
    os.truncate(shm_dir / name, os.stat(shm_dir / name).st_size + 4096)
    ranks = [SchedulerUnderTest(tp_size=TP, tp_rank=r) for r in range(TP)]
    _assert_same_abort_everywhere(run_ranks(blob, TP, ranks), "truncated or resized")
    assert segment_names(str(shm_dir)) == []


def test_missing_segment_aborts_on_every_rank(side, shm_dir):
    blob = _genuine(side, "bad")
    (name,) = segment_names(str(shm_dir))
    os.unlink(shm_dir / name)
    ranks = [SchedulerUnderTest(tp_size=TP, tp_rank=r) for r in range(TP)]
    _assert_same_abort_everywhere(run_ranks(blob, TP, ranks), name, "does not exist")
    _assert_served_everywhere(run_ranks(_genuine(side, "next", seed=3), TP, ranks))
    assert segment_names(str(shm_dir)) == []


def test_replayed_request_after_consumption_aborts_on_every_rank(side, shm_dir):
    blob = _genuine(side, "once")
    ranks = [SchedulerUnderTest(tp_size=TP, tp_rank=r) for r in range(TP)]
    _assert_served_everywhere(run_ranks(blob, TP, ranks))
    assert segment_names(str(shm_dir)) == []
    _assert_same_abort_everywhere(run_ranks(blob, TP, ranks), "does not exist")
    _assert_served_everywhere(run_ranks(_genuine(side, "next", seed=3), TP, ranks))


def test_segment_with_zero_refcount_is_refused_as_already_consumed(side, shm_dir):
    blob = _genuine(side, "bad")
    (name,) = segment_names(str(shm_dir))
    write_refcount(shm_dir / name, 0)
    ranks = [SchedulerUnderTest(tp_size=TP, tp_rank=r) for r in range(TP)]
    _assert_same_abort_everywhere(run_ranks(blob, TP, ranks), "already consumed")
    assert segment_refcount(shm_dir / name) == 0  # never driven negative, never unlinked twice
    os.unlink(shm_dir / name)


def test_segment_path_that_is_a_symlink_is_refused(side, shm_dir, tmp_path):
    blob = _genuine(side, "bad")
    (name,) = segment_names(str(shm_dir))
    target = tmp_path / "elsewhere"
    target.write_bytes(b"x" * 4096)
    os.replace(shm_dir / name, shm_dir / "moved")
    os.symlink(target, shm_dir / name)
    ranks = [SchedulerUnderTest(tp_size=TP, tp_rank=r) for r in range(TP)]
    _assert_same_abort_everywhere(run_ranks(blob, TP, ranks), "cannot open segment")
    assert target.read_bytes() == b"x" * 4096
    os.unlink(shm_dir / name)
    os.unlink(shm_dir / "moved")


# --- raw dicts sglang's own from_dict rejects ----------------------------------------------

RAW_DICTS = {
    "missing_mm_items": ({"im_token_id": 261}, "KeyError"),
    "mm_items_not_a_list": ({"mm_items": "pixels"}, "AssertionError"),
    "mm_items_of_non_items": ({"mm_items": [1, 2]}, "AttributeError"),
    "not_a_dict": ([("mm_items", [])], "TypeError"),
}


@pytest.mark.parametrize("case", sorted(RAW_DICTS))
def test_raw_dict_rejected_by_from_dict_aborts_identically_and_next_is_served(
    case, side, shm_dir
):
    raw, error = RAW_DICTS[case]
    ranks = [SchedulerUnderTest(tp_size=TP, tp_rank=r) for r in range(TP)]
    bad = pickle.dumps(tokenized_request(raw, "raw"))
    _assert_same_abort_everywhere(run_ranks(bad, TP, ranks), "from_dict failed", error)
    _assert_served_everywhere(run_ranks(_genuine(side, "next", seed=3), TP, ranks))
    assert segment_names(str(shm_dir)) == []


# --- security -------------------------------------------------------------------------------

def test_descriptor_naming_another_live_segment_is_refused_without_touching_it(side, shm_dir):
    """Right name (another request's live segment), wrong nonce (this request's)."""
    blob_a = _genuine(side, "a", seed=1)
    blob_b = _genuine(side, "b", seed=2)
    name_b = _seg(pickle.loads(blob_b)).name
    name_a = _seg(pickle.loads(blob_a)).name
    forged = _forge(blob_a, lambda r: _set_seg(r, name=name_b))
    ranks = [SchedulerUnderTest(tp_size=TP, tp_rank=r) for r in range(TP)]
    _assert_same_abort_everywhere(run_ranks(forged, TP, ranks), "nonce mismatch")
    assert segment_refcount(shm_dir / name_b) == TP
    assert segment_refcount(shm_dir / name_a) == TP
    _assert_served_everywhere(run_ranks(blob_b, TP, ranks))
    _assert_served_everywhere(run_ranks(blob_a, TP, ranks))
    assert segment_names(str(shm_dir)) == []


def test_segments_are_created_0600_by_their_owner_even_under_a_permissive_umask(shm_dir):
    old = os.umask(0)
    try:
        writers = [SegmentWriter(str(shm_dir), 128) for _ in range(3)]
    finally:
        os.umask(old)
    try:
        for w in writers:
            st = os.lstat(w.path)
            assert stat.S_ISREG(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_uid == os.getuid()
    finally:
        for w in writers:
            w.abandon()


def test_segment_names_carry_96_unguessable_bits_and_nonces_16_random_bytes(shm_dir):
    names, nonces = [], []
    for _ in range(64):
        w = SegmentWriter(str(shm_dir), 64)
        names.append(w.name)
        nonces.append(w.nonce)
        w.abandon()
    pattern = re.compile(rf"sglmmpre_{os.getpid()}_[0-9a-f]{{16}}_([0-9a-f]{{24}})")
    values = [int(pattern.fullmatch(n).group(1), 16) for n in names]
    assert len(set(values)) == 64 and len(set(nonces)) == 64
    assert all(len(n) == 16 for n in nonces)
    # Every one of the 96 bits takes both values across 64 names: a counter, a clock or a
    # pid would leave the high bits fixed (false alarm odds: 96 * 2**-63).
    for bit in range(96):
        assert len({(v >> bit) & 1 for v in values}) == 2, f"bit {bit} never changes"


def test_segment_creation_refuses_a_file_or_symlink_planted_at_its_name(
    shm_dir, tmp_path, monkeypatch
):
    import secrets

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    monkeypatch.setattr(secrets, "token_hex", lambda n: "ab" * n)  # a guessed name
    planted = shm_dir / f"sglmmpre_{os.getpid()}_{'ab' * 8}_{'ab' * 12}"
    os.symlink(victim, planted)
    with pytest.raises(SegmentAllocationError):
        SegmentWriter(str(shm_dir), 4096)
    assert planted.is_symlink() and victim.read_bytes() == b"precious"
    planted.unlink()
    planted.write_bytes(b"planted")
    with pytest.raises(SegmentAllocationError):
        SegmentWriter(str(shm_dir), 4096)
    assert planted.read_bytes() == b"planted"


def test_item_hash_is_sha256_of_the_feature_bytes_and_equals_sglang_hash_feature():
    import hashlib

    import numpy as np
    import torch
    from sglang.srt.managers.mm_utils import hash_feature
    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

    from sglang_mmpre.tokenizer_side.hashing import feature_hash
    from sglang_mmpre.tokenizer_side.materialize import materialize

    def sha(data: bytes) -> int:
        return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")

    t = torch.rand(37, 1176)
    bf16 = torch.rand(5, 64).to(torch.bfloat16)
    arr = np.arange(300, dtype=np.float32).reshape(10, 30)
    cases = [(t, sha(t.numpy().tobytes())),
             (bf16, sha(bf16.float().numpy().tobytes())),  # sglang widens bfloat16
             (arr, sha(arr.tobytes())),
             ([t, t], sha(t.numpy().tobytes() * 2))]
    for value, expected in cases:
        assert feature_hash(value) == expected == hash_feature(value)
    item = MultimodalDataItem(modality=Modality.IMAGE, feature=t, offsets=[(0, 4)])
    (built,) = materialize({"mm_items": [item], "im_token_id": 261}).mm_items
    assert built.hash == sha(t.numpy().tobytes())
    assert built.pad_value == built.hash % (1 << 30)


# --- hypothesis: nothing but a result or an "Invalid multimodal inputs" error -----------------

def _check_outcome(outcome, carries_inputs: bool = True) -> None:
    inputs, error = outcome
    if error is None:
        # (None, None) means "no multimodal inputs": right only when none were sent.
        assert inputs is not None or not carries_inputs
    else:
        assert inputs is None
        assert isinstance(error, str) and error.startswith("Invalid multimodal inputs: "), error


@pytest.fixture
def immortal(side, shm_dir):
    """A genuine materialized request whose segment outlives any number of maps."""
    req = materialized_request(side, "fuzz", seed=5)
    writer = req.materialized_mm_inputs.writer
    writer.add_consumers(1 << 40)
    blob = pickle.dumps(req.materialized_mm_inputs)
    yield types.SimpleNamespace(blob=blob, seg=req.materialized_mm_inputs.segment,
                                feature=req.materialized_mm_inputs.inputs.mm_items[0].feature)
    side.release(writer)


def _take(m, recorder) -> tuple:
    """What a rank makes of ``m`` once the entry rank has vouched for it (recv_requests)."""
    recv = types.SimpleNamespace(materialized_mm_inputs=m, mm_inputs=None)
    with recorder.active():
        vouch_for_segments([recv])
        return take_multimodal_inputs(SchedulerUnderTest(tp_size=TP), recv)


_anything = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                      st.binary(max_size=20), st.tuples(st.integers(-2, 9)))


def _forge_fields(data, real, strategies: dict) -> dict:
    """The real field values, one or two of them replaced by drawn values (a forgery close
    to a genuine descriptor reaches the deepest checks)."""
    changed = data.draw(st.sets(st.sampled_from(sorted(strategies)), min_size=1, max_size=2))
    values = {f: getattr(real, f) for f in strategies}
    for f in sorted(changed):
        values[f] = data.draw(strategies[f], label=f)
    return values


def test_fuzzed_segment_descriptor_yields_result_or_abort_and_opens_only_segments(
    immortal, shm_dir
):
    real = immortal.seg
    strategies = {
        "name": st.one_of(
            st.text(max_size=40),
            st.from_regex(r"sglmmpre_[0-9]{1,11}_[0-9a-fA-F]{15,17}_[0-9a-fA-F]{22,26}\n?",
                          fullmatch=True),
            st.sampled_from(["../" + real.name, "./" + real.name, real.name + "\n",
                             real.name + "/", "/etc/passwd", "../../../etc/passwd",
                             real.name.upper(), real.name[:-1], f"{real.name}\x00",
                             "sglmmpre_1_" + "0" * 16 + "_" + "0" * 24]),
            _anything),
        "payload_nbytes": st.one_of(st.integers(-(1 << 70), 1 << 70),
                                    st.integers(real.payload_nbytes - 70, real.payload_nbytes + 70),
                                    _anything),
        "nonce": st.one_of(st.binary(min_size=15, max_size=17), _anything),
        "consumers": st.one_of(st.integers(-3, 8), st.integers(), _anything),
    }
    recorder = OpenRecorder()

    @FUZZ
    @given(data=st.data())
    def run(data):
        m = pickle.loads(immortal.blob)
        m.segment = SegmentDescriptor(**_forge_fields(data, real, strategies))
        outcome = _take(m, recorder)
        _check_outcome(outcome)
        if outcome[1] is None:
            assert m.segment == real, "a forged segment descriptor was accepted"
        recorder.assert_only_segments_in(shm_dir)

    run()


def test_fuzzed_tensor_descriptor_yields_result_or_abort_and_accepts_only_the_real_one(
    immortal, shm_dir
):
    real = immortal.feature
    ints = st.one_of(st.integers(-(1 << 65), 1 << 65), st.integers(-1, 1 << 22))
    strategies = {
        "kind": st.one_of(st.sampled_from(["torch", "numpy", "cuda"]), _anything),
        "dtype": st.one_of(st.sampled_from(["float32", "float16", "bfloat16", "int64", "uint8",
                                            "bool", "object", "complex64"]), _anything),
        "shape": st.one_of(st.tuples(ints, ints), st.lists(ints, max_size=3), st.tuples(),
                           _anything),
        "offset": st.one_of(ints, _anything),
        "nbytes": st.one_of(ints, _anything),
        "hash": st.one_of(st.integers(0, (1 << 64) - 1), _anything),
    }
    item_strategies = {"item_hash": st.one_of(st.integers(0, (1 << 64) - 1), _anything),
                       "item_pad_value": st.one_of(st.integers(0, 1 << 30), _anything)}
    recorder = OpenRecorder()

    @FUZZ
    @given(data=st.data())
    def run(data):
        m = pickle.loads(immortal.blob)
        item = m.inputs.mm_items[0]
        if data.draw(st.booleans(), label="forge the item instead"):
            genuine = types.SimpleNamespace(item_hash=item.hash, item_pad_value=item.pad_value)
            values = _forge_fields(data, genuine, item_strategies)
            item.hash, item.pad_value = values["item_hash"], values["item_pad_value"]
            forged = real
        else:
            forged = TensorDescriptor(**_forge_fields(data, real, strategies))
            item.feature = forged
        outcome = _take(m, recorder)
        _check_outcome(outcome)
        if outcome[1] is None:
            assert forged == real, "a forged tensor descriptor was accepted"
            assert (item.hash, item.pad_value) == (real.hash, real.hash % (1 << 30))
        recorder.assert_only_segments_in(shm_dir)

    run()


_objects = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
              st.binary(max_size=64)),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=8), children, max_size=4),
                               st.builds(dict, mm_items=st.lists(children, max_size=3))),
    max_leaves=12,
)


def test_fuzzed_objects_as_materialized_or_raw_inputs_yield_result_or_abort(immortal, shm_dir):
    recorder = OpenRecorder()

    @FUZZ
    @given(obj=_objects, where=st.sampled_from(["materialized", "inputs", "inputs_with_segment",
                                                "raw"]))
    def run(obj, where):
        if where == "raw":
            recv = types.SimpleNamespace(materialized_mm_inputs=None, mm_inputs=obj)
            with recorder.active():
                outcome = take_multimodal_inputs(SchedulerUnderTest(tp_size=TP), recv)
            _check_outcome(outcome, carries_inputs=obj is not None)
            recorder.assert_only_segments_in(shm_dir)
            return
        elif where == "materialized":
            outcome = _take(pickle.loads(pickle.dumps(obj)), recorder)
            _check_outcome(outcome, carries_inputs=obj is not None)
            recorder.assert_only_segments_in(shm_dir)
            return
        else:
            seg = immortal.seg if where == "inputs_with_segment" else None
            outcome = _take(pickle.loads(pickle.dumps(MaterializedMultimodalInputs(obj, seg))),
                            recorder)
        _check_outcome(outcome)
        recorder.assert_only_segments_in(shm_dir)

    run()


def test_fuzzed_mutated_pickles_yield_result_or_abort_and_open_only_segments(immortal, shm_dir):
    blob = immortal.blob
    real = pickle.loads(blob)
    recorder = OpenRecorder()

    @FUZZ
    @given(edits=st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)),
                          min_size=1, max_size=4))
    def run(edits):
        data = bytearray(blob)
        for pos, value in edits:
            data[pos] = value
        try:
            m = pickle.loads(bytes(data))
        except Exception:
            return  # the scheduler's recv_pyobj would fail before our code runs
        outcome = _take(m, recorder)
        _check_outcome(outcome)
        if outcome[1] is None and isinstance(m, MaterializedMultimodalInputs):
            assert m.segment in (None, real.segment)
        recorder.assert_only_segments_in(shm_dir)

    run()


# --- the same, across four real rank processes -------------------------------------------

@pytest.mark.parametrize("region_chunk_bytes, nbytes_message", [
    (0, "do not match its header"),  # a segment per request
    (64 << 20, "does not match dtype"),  # slots of a warm region
], ids=["segments", "region"])
def test_forged_requests_abort_identically_on_four_rank_processes(
    tmp_path, shm_dir, region_chunk_bytes, nbytes_message
):
    """A tokenizer process and four gloo ranks (sglang's broadcast_pyobj): each forged
    request is aborted with one message on all four ranks, every genuine one is served on
    all four, and no segment is left (see soak_harness for the plan kinds)."""
    from soak_harness import run_harness

    plan = ["good", "forged_nonce", "good", "forged_nbytes", "good", "raw_bad", "good",
            "forged_name", "good"]
    expected = {"forged_nonce": "nonce mismatch", "forged_nbytes": nbytes_message,
                "raw_bad": "from_dict failed", "forged_name": "not ours"}
    result = run_harness(tmp_path, shm_dir, world=4, plan=plan, warmup=0,
                         region_chunk_bytes=region_chunk_bytes)
    ranks = result["ranks"]
    for i, kind in enumerate(plan):
        messages = [r["outcomes"].get(f"req{i}-0") for r in ranks]
        if kind == "good":
            assert messages == ["served"] * 4, (i, kind, messages)
            continue
        assert len(set(messages)) == 1, f"ranks disagree on {kind}: {messages}"
        assert messages[0].startswith("Invalid multimodal inputs: "), messages[0]
        assert expected[kind] in messages[0], messages[0]
        if kind in ("forged_nonce", "forged_name"):  # then the genuine copy is served
            assert [r["outcomes"].get(f"req{i}-1") for r in ranks] == ["served"] * 4
    assert result["tokenizer"]["after"]["shm_count"] == 0
    assert result["tokenizer"]["after"]["held_bytes"] == 0
    assert segment_names(str(shm_dir)) == []
