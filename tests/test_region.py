"""The warm region: slots reused only when no rank still views them, isolation of in-place
writes, reuse of repeated content, uniform refusal of stale and forged slot references,
fallback to segments then inline, growth within the cap, and crashes.

In-process cases run the real patched ``Scheduler.handle_generate_request`` on three
``SchedulerUnderTest`` ranks (``mm_requests.run_ranks``); they share this process's one
mapping of the region, as TP ranks of one process would. The isolation and crash cases
use real rank processes (``child_process.Child``), each with its own mapping.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gc
import os
import pickle
import stat
import types

import pytest
import torch

from sglang_mmpre.scheduler_side import region_cache
from sglang_mmpre.tokenizer_side.manager import TokenizerSide
from sglang_mmpre.transport.liveness import OWNED_NAME_RE
from sglang_mmpre.transport.descriptors import (
    RegionDescriptor,
    SegmentDescriptor,
    SlotRef,
)
from sglang_mmpre.transport.region import data_offset
from sglang_mmpre.transport.liveness import sweep
from sglang_mmpre.transport.segment import segment_names

from child_process import Child
from mm_fixtures import image_mm_dict, shm_settings
from mm_requests import materialized_request, run_ranks, send_captured, tokenized_request
from scheduler_harness import SchedulerUnderTest

TP = 3
CHUNK = 8 << 20  # one 448x448 image (4.8 MB of features) per chunk, so slots get reused


def _side(shm_dir, tp: int = TP, chunk: int = CHUNK, cap: int = 1 << 34) -> TokenizerSide:
    return TokenizerSide(types.SimpleNamespace(tp_size=tp, pp_size=1),
                         shm_settings(shm_dir, cap=cap, region_chunk_bytes=chunk))


@pytest.fixture
def side(shm_dir, monkeypatch):
    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    s = _side(shm_dir)
    yield s
    s.shutdown()


def _send(side, rid: str, seed: int = 0, size: int = 448) -> bytes:
    """A request as it left the tokenizer (no scope: the creator reference is released)."""
    return send_captured(side, materialized_request(side, rid, size, size, seed=seed))


def _region(blob: bytes) -> RegionDescriptor:
    return pickle.loads(blob).materialized_mm_inputs.segment


def _refcounts(side, blob: bytes) -> list[int]:
    return [side.region.table.read(r.index).refcount for r in _region(blob).slots]


def _settle() -> None:
    """Free what the test dropped and wait for the releaser thread."""
    gc.collect()
    assert region_cache.flush()


def _aborts(reqs) -> str:
    messages = {r.to_finish.message if r.to_finish is not None else None for r in reqs}
    assert None not in messages and len(messages) == 1, f"ranks disagree: {messages}"
    assert all(r.multimodal_inputs is None for r in reqs)
    return messages.pop()


def _served(reqs) -> None:
    for r in reqs:
        assert r.to_finish is None, r.to_finish.message
        assert r.multimodal_inputs.mm_items[0].feature.shape[0] > 0


# --- the region itself ---------------------------------------------------------------------

def test_region_is_allocated_at_startup_0600_named_for_the_sweep_and_unlinked_at_shutdown(shm_dir):
    old = os.umask(0)
    try:
        side = _side(shm_dir)
    finally:
        os.umask(old)
    name = side.region.name
    assert OWNED_NAME_RE.match(name) and name.startswith(f"sglmmpre_{os.getpid()}_")
    st = os.lstat(shm_dir / name)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == data_offset(4096) + CHUNK
    assert st.st_blocks * 512 >= CHUNK  # reserved (posix_fallocate), not sparse
    sweep(str(shm_dir))
    assert segment_names(str(shm_dir)) == [name], "the sweep took a live creator's region"
    side.shutdown()
    assert os.listdir(shm_dir) == []


def test_slot_is_reused_only_after_every_rank_freed_its_tensors(side, shm_dir):
    blob = _send(side, "a", seed=1)
    feature_slot = _region(blob).slots[0]
    assert _refcounts(side, blob) == [TP, TP]  # creator released; TP consumer references
    ranks = run_ranks(blob, TP)
    _served(ranks)
    for freed in range(TP):
        _settle()
        assert _refcounts(side, blob) == [TP - freed, TP - freed], "released while viewed"
        ranks[freed].multimodal_inputs = None
    _settle()
    assert _refcounts(side, blob) == [0, 0]
    # Only now may other content take its place (one image per chunk: it must).
    other = _send(side, "b", seed=2)
    reused = _region(other).slots[0]
    assert reused.offset == feature_slot.offset and reused.generation > feature_slot.generation
    _served(run_ranks(other, TP))


# A rank process: resolves pickled inputs, writes into a feature in place, reads, drops.
RANK = """
from sglang_mmpre.scheduler_side import region_cache
from sglang_mmpre.scheduler_side.resolve import resolve
import gc
held = []
def show():
    f = held[-1].mm_items[0].feature
    print("VALUES", float(f.reshape(-1)[0]), float(f.double().sum()), flush=True)
print("READY", flush=True)
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "resolve":
        held.append(resolve(pickle.loads(base64.b64decode(arg)), 2, shm_dir))
        show()
    elif cmd == "write":
        held[-1].mm_items[0].feature.fill_(7.0)
        show()
    elif cmd == "read":
        show()
    elif cmd == "drop":
        held.clear(); gc.collect(); region_cache.flush()
        print("DROPPED", flush=True)
"""


def _values(feature: torch.Tensor) -> tuple[float, float]:
    return float(feature.reshape(-1)[0]), float(feature.double().sum())


def _ask(child: Child, line: str) -> tuple[float, float]:
    child.say(line)
    first, total = child.expect("VALUES").split()
    return float(first), float(total)


def test_in_place_write_on_one_rank_reaches_neither_another_rank_nor_the_slots_next_content(
    shm_dir, monkeypatch
):
    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    side = _side(shm_dir, tp=2)
    ranks = [Child(RANK, str(shm_dir)) for _ in range(2)]
    try:
        for r in ranks:
            r.expect("READY")
        a_dict = image_mm_dict(448, 448, seed=1)
        a_values = _values(a_dict["mm_items"][0].feature)
        blob_a = send_captured(side, materialized_request(side, "a", 448, 448, seed=1))
        m_a = base64.b64encode(pickle.dumps(pickle.loads(blob_a).materialized_mm_inputs)).decode()
        assert [_ask(r, f"resolve {m_a}") for r in ranks] == [a_values, a_values]
        assert _ask(ranks[0], "write")[0] == 7.0  # rank 0 wrote into its feature in place
        assert _ask(ranks[1], "read") == a_values  # rank 1 does not see it
        slot = _region(blob_a).slots[0]
        assert side.region.view(side.region._live[slot.index])[:4].tobytes() == \
            a_dict["mm_items"][0].feature.reshape(-1)[:1].numpy().tobytes()  # nor the owner
        for r in ranks:
            r.say("drop")
            r.expect("DROPPED")
        # The slot now holds other bytes; rank 0's private copy of the old ones is gone.
        b_values = _values(image_mm_dict(448, 448, seed=2)["mm_items"][0].feature)
        blob_b = send_captured(side, materialized_request(side, "b", 448, 448, seed=2))
        assert _region(blob_b).slots[0].offset == slot.offset
        m_b = base64.b64encode(pickle.dumps(pickle.loads(blob_b).materialized_mm_inputs)).decode()
        assert [_ask(r, f"resolve {m_b}") for r in ranks] == [b_values, b_values]
    finally:
        for r in ranks:
            r.close()
        side.shutdown()


def test_repeated_content_reuses_its_slot_and_copies_nothing(side, shm_dir):
    first = materialized_request(side, "a", 448, 448, seed=3)
    again = materialized_request(side, "b", 448, 448, seed=3)
    feature_bytes = first.materialized_mm_inputs.writer.written_nbytes
    assert feature_bytes > 4_000_000
    assert again.materialized_mm_inputs.writer.written_nbytes < 8192  # its small tensors only
    s1, s2 = first.materialized_mm_inputs.segment.slots, again.materialized_mm_inputs.segment.slots
    assert s1[0] == s2[0] and s1[1] != s2[1]
    reqs = run_ranks(send_captured(side, first), TP) + run_ranks(send_captured(side, again), TP)
    _served(reqs)
    f0 = reqs[0].multimodal_inputs.mm_items[0]
    assert all(torch.equal(r.multimodal_inputs.mm_items[0].feature, f0.feature) for r in reqs)
    assert {r.multimodal_inputs.mm_items[0].hash for r in reqs} == {f0.hash}
    del reqs, f0
    _settle()
    assert side.region.live_slots() == 0


def test_revived_slot_gets_a_new_generation_and_the_old_reference_is_refused(side, shm_dir):
    blob = _send(side, "a", seed=4)
    ranks = run_ranks(blob, TP)
    _served(ranks)
    del ranks
    _settle()
    again = _send(side, "b", seed=4)  # same content: the slot comes back to life
    old, new = _region(blob).slots[0], _region(again).slots[0]
    assert (new.index, new.offset) == (old.index, old.offset) and new.generation > old.generation
    message = _aborts(run_ranks(blob, TP))
    assert message.startswith("Invalid multimodal inputs: stale slot reference")
    assert _refcounts(side, again)[0] == TP, "a refused stale reference moved the refcount"
    _served(run_ranks(again, TP))


# --- kept slots: what the processor cache is built on (Note [kept slots] in slots.py) -----

def _kept_region(shm_dir, keep_bytes: int, chunk: int = 16 << 20, cap: int = 1 << 34):
    """A region keeping ``keep_bytes`` of unreferenced slots, as the processor cache sets
    it up; the list the slots it frees are appended to."""
    side = TokenizerSide(types.SimpleNamespace(tp_size=1, pp_size=1),
                         shm_settings(shm_dir, cap=cap, region_chunk_bytes=chunk))
    reclaimed = []
    side.region.keep_bytes = keep_bytes
    side.region.observer = types.SimpleNamespace(placed=lambda leaf, slot: None,
                                                 reclaimed=reclaimed.append)
    return side, reclaimed


def _placed_and_released(region, seed: int, rows: int = 1024):
    feature = torch.randn(rows, 1176, generator=torch.Generator().manual_seed(seed))
    placed = region.place(feature)
    region.adjust([placed.slot.ref()], -1)  # as after its request: refcount 0, bytes kept
    return feature, placed


def test_kept_view_is_placed_again_without_a_pass_and_a_write_to_it_never_reaches_the_slot(
    shm_dir, monkeypatch
):
    """A whole-slot kept view goes back into its own slot with no copy and no sha256 (the
    item hash is the slot's); a write through another view stays in that view (copy-on-
    write): the slot's bytes are unchanged, and that view's placement hashes and copies
    what it now holds."""
    import hashlib

    from sglang_mmpre.tokenizer_side import slots as slots_module
    from sglang_mmpre.tokenizer_side.slots import _copy_and_hash, _hash_rest

    side, _ = _kept_region(shm_dir, keep_bytes=64 << 20)
    try:
        region = side.region
        feature, first = _placed_and_released(region, seed=1)
        slot = first.slot
        passes = []
        monkeypatch.setattr(slots_module, "_hash_rest",
                            lambda *a: passes.append("hash") or _hash_rest(*a))
        monkeypatch.setattr(slots_module, "_copy_and_hash",
                            lambda *a: passes.append("copy") or _copy_and_hash(*a))
        view = region.kept_view(slot, 0, slot.nbytes, feature.dtype, tuple(feature.shape))
        assert torch.equal(view, feature)
        again = region.place(view)
        assert (again.slot, again.written, again.digest, passes) == (slot, 0, first.digest, [])
        assert region.table.refcount(slot.index) == 1
        region.adjust([again.slot.ref()], -1)
        written = region.kept_view(slot, 0, slot.nbytes, feature.dtype, tuple(feature.shape))
        written.add_(1.0)
        assert torch.equal(torch.from_numpy(region.view(slot)).view(torch.float32).view(
            feature.shape), feature), "a write through a kept view reached the slot"
        assert torch.equal(region.kept_view(slot, 0, slot.nbytes, feature.dtype,
                                            tuple(feature.shape)), feature)
        other = region.place(written)
        assert other.slot is not slot and other.written > 0 and "copy" in passes
        assert other.digest == hashlib.sha256(written.numpy().tobytes()).digest()
        region.adjust([other.slot.ref()], -1)
    finally:
        side.shutdown()


def test_unreferenced_slots_are_kept_within_keep_bytes_least_recently_used_first(shm_dir):
    """With room for two kept slots: A, B, C placed and released, B viewed (used), then D
    and E placed: A (least recently used) goes at D, C at E; B stays. The observer hears
    of each slot freed."""
    import gc

    from sglang_mmpre.transport.region import extent

    one = extent(1024 * 1176 * 4)
    side, reclaimed = _kept_region(shm_dir, keep_bytes=2 * one)
    try:
        region = side.region
        (_, a), (_, b), (_, c) = (_placed_and_released(region, s) for s in (1, 2, 3))
        assert reclaimed == []
        view = region.kept_view(b.slot, 0, b.slot.nbytes, torch.float32, (1024, 1176))
        del view
        gc.collect()
        _placed_and_released(region, 4)
        assert reclaimed == [a.slot]
        _placed_and_released(region, 5)
        assert reclaimed == [a.slot, c.slot]
        assert region.kept_view(a.slot, 0, 4, torch.uint8, (4,)) is None
        assert region.kept_view(b.slot, 0, 4, torch.uint8, (4,)) is not None
    finally:
        side.shutdown()


def test_unreferenced_slots_of_no_feature_are_not_kept(shm_dir):
    """A request's other tensors (a slot with no content, which nothing finds again) go at
    the next allocation whatever room ``keep_bytes`` leaves; a feature slot stays. Kept,
    one per request, they would fill the slot table and every allocation would scan it."""
    side, reclaimed = _kept_region(shm_dir, keep_bytes=1 << 30)
    try:
        region = side.region
        _, feature = _placed_and_released(region, 1)
        others = [region.allocate(4096) for _ in range(3)]
        region.adjust([o.ref() for o in others], -1)
        _placed_and_released(region, 2)
        assert reclaimed == others
        assert region.kept_view(feature.slot, 0, 4, torch.uint8, (4,)) is not None
    finally:
        side.shutdown()


def test_kept_slots_never_free_a_referenced_or_pinned_slot_and_give_way_when_full(shm_dir):
    """One 16 MiB chunk and a cap of one chunk: a slot a request references, or one a
    kept view pins, survives any allocation; unreferenced ones are freed, least recently
    used first, when a new slot would not fit (the cache shrinks before a request falls
    back to a segment), and only when nothing else can go is the region full."""
    from sglang_mmpre.tokenizer_side.slots import RegionFull

    side, reclaimed = _kept_region(shm_dir, keep_bytes=1 << 40, cap=16 << 20)
    try:
        region = side.region
        held = region.place(torch.full((1024, 1176), 1.0))  # its request still holds it
        _, pinned = _placed_and_released(region, 2)
        view = region.kept_view(pinned.slot, 0, 16, torch.float32, (4,))
        _, kept = _placed_and_released(region, 3)
        assert reclaimed == []  # 3 slots of 4.8 MB fit in 16 MiB
        fourth = region.place(torch.full((1024, 1176), 4.0))
        assert reclaimed == [kept.slot]
        with pytest.raises(RegionFull):
            region.place(torch.full((1024, 1176), 5.0))
        assert reclaimed == [kept.slot]
        assert torch.equal(view, torch.from_numpy(region.view(pinned.slot)[:16]).view(torch.float32))
        assert region.table.refcount(held.slot.index) == 1
        region.adjust([held.slot.ref(), fourth.slot.ref()], -1)
    finally:
        side.shutdown()


# --- stale and forged slot references: one abort on every rank, references dropped if ours --

def _set_region(req, **changes) -> None:
    m = req.materialized_mm_inputs
    m.segment = dataclasses.replace(m.segment, **changes)


def _set_slot(req, k: int = 0, **changes) -> None:
    slots = list(req.materialized_mm_inputs.segment.slots)
    slots[k] = dataclasses.replace(slots[k], **changes)
    _set_region(req, slots=tuple(slots))


def _shift_generations(req, by: int) -> None:
    slots = req.materialized_mm_inputs.segment.slots
    _set_region(req, slots=tuple(dataclasses.replace(s, generation=s.generation + by) for s in slots))


def _set_feature(req, **changes) -> None:
    item = req.materialized_mm_inputs.inputs.mm_items[0]
    item.feature = dataclasses.replace(item.feature, **changes)


def _forge(blob: bytes, mutate) -> bytes:
    req = pickle.loads(blob)
    mutate(req)
    return pickle.dumps(req)


def _feature(req):
    return req.materialized_mm_inputs.inputs.mm_items[0].feature


# Refused without touching any refcount: not ours, or ours no longer.
UNTOUCHED = {
    "generation_older": (lambda r: _shift_generations(r, -1), "stale slot reference"),
    "generation_newer": (lambda r: _shift_generations(r, 7), "stale slot reference"),
    "index_out_of_range": (lambda r: _set_slot(r, index=1 << 30), "slot index out of range"),
    "slot_repeated": (lambda r: _set_region(r, slots=r.materialized_mm_inputs.segment.slots[:1] * 2),
                      "malformed slot references"),
    "slot_not_a_ref": (lambda r: _set_region(r, slots=((0, 1, 2, 3),)), "malformed slot references"),
    "negative_offset": (lambda r: _set_slot(r, offset=-4096), "malformed slot references"),
    "wrong_nonce": (lambda r: _set_region(r, nonce=bytes(16)), "nonce mismatch"),
    "name_not_ours": (lambda r: _set_region(r, name="../" + r.materialized_mm_inputs.segment.name),
                      "not ours"),
}

# Refused with this rank's references dropped: the generation matches (the reference is
# ours), the rest is forged. Nothing is left referenced afterwards.
RELEASED = {
    "consumers_changed": (lambda r: _set_region(r, consumers=TP + 1), "disagree on the topology"),
    "slot_offset_out_of_range": (lambda r: _set_slot(r, offset=1 << 40), "lies outside its slots"),
    "slot_offset_moved": (lambda r: _set_slot(r, offset=r.materialized_mm_inputs.segment.slots[0].offset + 4096),
                          "lies outside its slots"),
    "slot_nbytes_changed": (lambda r: _set_slot(r, nbytes=r.materialized_mm_inputs.segment.slots[0].nbytes + 64),
                            "do not match the slot table"),
    "feature_nbytes_changed": (lambda r: _set_feature(r, nbytes=_feature(r).nbytes - 4),
                               "does not match dtype"),
    "feature_dtype_changed": (lambda r: _set_feature(r, dtype="float16",
                                                     shape=(_feature(r).shape[0], _feature(r).shape[1] * 2)),
                              "do not match the slot table"),
    "feature_offset_moved": (lambda r: _set_feature(r, offset=_feature(r).offset + 64),
                             "outside"),
    "feature_hash_changed": (lambda r: _set_feature(r, hash=_feature(r).hash ^ 1), "hash"),
}


@pytest.mark.parametrize("case", sorted(UNTOUCHED))
def test_stale_or_foreign_slot_reference_aborts_identically_without_touching_refcounts(
    case, side, shm_dir
):
    mutate, fragment = UNTOUCHED[case]
    blob = _send(side, "bad", seed=5)
    before = _refcounts(side, blob)
    message = _aborts(run_ranks(_forge(blob, mutate), TP))
    assert message.startswith("Invalid multimodal inputs: ") and fragment in message, message
    assert _refcounts(side, blob) == before
    _served(run_ranks(blob, TP))  # the genuine copy is still served everywhere


@pytest.mark.parametrize("case", sorted(RELEASED))
def test_forged_reference_to_our_slot_aborts_identically_and_leaks_nothing(case, side, shm_dir):
    mutate, fragment = RELEASED[case]
    blob = _send(side, "bad", seed=6)
    message = _aborts(run_ranks(_forge(blob, mutate), TP))
    assert message.startswith("Invalid multimodal inputs: ") and fragment in message, message
    assert _refcounts(side, blob) == [0, 0]
    _served(run_ranks(_send(side, "next", seed=7), TP))


def test_reference_into_another_servers_region_is_refused_and_leaves_it_alone(side, shm_dir):
    """Another TokenizerManager's region in the same shm directory: a descriptor carrying
    its name (with our nonce, or with its own nonce but our slots) is refused everywhere."""
    other = _side(shm_dir)
    try:
        theirs = _send(other, "theirs", seed=8)
        ours = _send(side, "ours", seed=9)
        their_region = _region(theirs)
        before = _refcounts(other, theirs)
        with_our_nonce = _forge(ours, lambda r: _set_region(r, name=their_region.name))
        assert "nonce mismatch" in _aborts(run_ranks(with_our_nonce, TP))
        with_their_nonce = _forge(ours, lambda r: _set_region(r, name=their_region.name,
                                                              nonce=their_region.nonce))
        assert "Invalid multimodal inputs: " in _aborts(run_ranks(with_their_nonce, TP))
        assert _refcounts(other, theirs) == before
        _served(run_ranks(ours, TP))
        _served(run_ranks(theirs, TP))
    finally:
        other.shutdown()


# --- full, growing, crashed ------------------------------------------------------------------

def test_region_full_falls_back_to_a_segment_then_inline_and_all_are_served(shm_dir, monkeypatch):
    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    side = _side(shm_dir, chunk=CHUNK, cap=CHUNK + (6 << 20))  # no room to grow; one segment
    try:
        reqs = [materialized_request(side, f"r{i}", 448, 448, seed=10 + i) for i in range(3)]
        kinds = [type(r.materialized_mm_inputs.segment).__name__ for r in reqs]
        assert kinds == ["RegionDescriptor", "SegmentDescriptor", "NoneType"]
        assert side.held_bytes > 0 and side.region.size == CHUNK
        for r in reqs:
            _served(run_ranks(send_captured(side, r), TP))
        _settle()
        assert side.held_bytes == 0 and side.region.live_slots() == 0
    finally:
        side.shutdown()
    assert segment_names(str(shm_dir)) == []


def test_region_grows_by_whole_chunks_within_the_cap_and_ranks_map_new_chunks(shm_dir, monkeypatch):
    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    side = _side(shm_dir, chunk=CHUNK, cap=3 * CHUNK)
    try:
        reqs = [materialized_request(side, f"r{i}", 448, 448, seed=20 + i) for i in range(4)]
        kinds = [type(r.materialized_mm_inputs.segment) for r in reqs]
        assert kinds == [RegionDescriptor] * 3 + [type(None)]  # the cap: 3 chunks, no segment
        assert side.region.size == 3 * CHUNK
        assert os.stat(shm_dir / side.region.name).st_size == data_offset(4096) + 3 * CHUNK
        served = [run_ranks(send_captured(side, r), TP) for r in reqs]
        for reqs_ in served:
            _served(reqs_)
        del served
        _settle()
        assert side.region.live_slots() == 0
    finally:
        side.shutdown()


TOKENIZER_WITH_REGION = """
from mm_fixtures import shm_settings
from sglang_mmpre.tokenizer_side.manager import TokenizerSide
side = TokenizerSide(types.SimpleNamespace(tp_size=2, pp_size=1),
                     shm_settings(shm_dir, region_chunk_bytes=4 << 20))
print("REGION", side.region.name, flush=True)
sys.stdin.read()
"""


def test_tokenizer_killed_leaves_its_region_to_the_startup_sweep_only(shm_dir, monkeypatch):
    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    child = Child(TOKENIZER_WITH_REGION, str(shm_dir))
    try:
        dead = child.expect("REGION")
        live = _side(shm_dir, chunk=4 << 20)
        sweep(str(shm_dir))
        assert sorted(segment_names(str(shm_dir))) == sorted([dead, live.region.name])
        child.kill9()
        _side(shm_dir, chunk=0).shutdown()  # a restarted TokenizerManager sweeps first
        assert segment_names(str(shm_dir)) == [live.region.name]
        live.shutdown()
    finally:
        child.close()
    assert segment_names(str(shm_dir)) == []


def test_rank_killed_holding_a_lease_keeps_its_slot_out_of_reuse(shm_dir, monkeypatch):
    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    side = _side(shm_dir, tp=2, chunk=16 << 20)
    rank = Child(RANK, str(shm_dir))
    try:
        rank.expect("READY")
        blob = send_captured(side, materialized_request(side, "a", 448, 448, seed=30))
        m = base64.b64encode(pickle.dumps(pickle.loads(blob).materialized_mm_inputs)).decode()
        _ask(rank, f"resolve {m}")
        rank.kill9()
        in_process = run_ranks(blob, 1, [SchedulerUnderTest(tp_size=2)])  # the other rank
        _served(in_process)
        del in_process
        _settle()
        assert _refcounts(side, blob) == [1, 1]  # the dead rank's references stay
        held = _region(blob).slots[0]
        later = [materialized_request(side, f"b{i}", 448, 448, seed=31 + i) for i in range(2)]
        offsets = {r.materialized_mm_inputs.segment.slots[0].offset for r in later
                   if isinstance(r.materialized_mm_inputs.segment, RegionDescriptor)}
        assert held.offset not in offsets
        for r in later:
            side.release_unsent(r)
    finally:
        rank.close()
        side.shutdown()


def test_region_deleted_from_outside_aborts_its_unattached_requests_alike_then_a_new_one_serves(
    side, shm_dir
):
    """``rm`` of the region before any rank attached it: the entry rank can't attach it, so
    every rank aborts those requests with its message (no rank decides alone); the next
    request finds the tokenizer on a new region and is served everywhere."""
    blob = _send(side, "sent-before-rm", seed=11)
    lost = _region(blob).name
    os.unlink(os.path.join(shm_dir, lost))  # rm, RemoveIPC=yes, a cleanup job
    message = _aborts(run_ranks(blob, TP))
    assert message.startswith("Invalid multimodal inputs: region ") and "does not exist" in message
    after = _send(side, "sent-after-rm", seed=12)
    assert _region(after).name != lost
    _served(run_ranks(after, TP))
    assert side.region.name in os.listdir(shm_dir)


# --- hypothesis: a forged region descriptor yields the real inputs or one abort -------------

def test_fuzzed_region_and_slot_references_yield_result_or_abort_and_open_only_ours(side, shm_dir):
    from hypothesis import given
    from hypothesis import strategies as st

    from sglang_mmpre.scheduler_side.hooks import take_multimodal_inputs
    from test_forged_input import FUZZ, OpenRecorder, _anything, _check_outcome, _forge_fields

    req = materialized_request(side, "fuzz", 448, 448, seed=40)
    hold = req.materialized_mm_inputs.writer
    hold.add_consumers(1 << 40)  # references enough for every example
    blob = pickle.dumps(req.materialized_mm_inputs)
    real = req.materialized_mm_inputs.segment
    ints = st.one_of(st.integers(-(1 << 65), 1 << 65), st.integers(-2, 1 << 22))
    ref_strategies = {"index": st.one_of(ints, _anything), "generation": st.one_of(ints, _anything),
                      "offset": st.one_of(ints, _anything), "nbytes": st.one_of(ints, _anything)}
    region_strategies = {
        "name": st.one_of(st.text(max_size=40), st.sampled_from(
            ["../" + real.name, real.name + "\n", real.name.upper(), "/etc/passwd"]), _anything),
        "nonce": st.one_of(st.binary(min_size=15, max_size=17), _anything),
        "consumers": st.one_of(st.integers(-3, 8), _anything),
        "slots": st.one_of(st.just(()), st.just(real.slots[:1]), st.just(real.slots * 2),
                           st.lists(_anything, max_size=3).map(tuple), _anything),
    }
    recorder = OpenRecorder()

    @FUZZ
    @given(data=st.data())
    def run(data):
        m = pickle.loads(blob)
        if data.draw(st.booleans(), label="forge a slot reference"):
            k = data.draw(st.integers(0, len(real.slots) - 1), label="slot")
            slots = list(real.slots)
            slots[k] = SlotRef(**_forge_fields(data, real.slots[k], ref_strategies))
            m.segment = dataclasses.replace(real, slots=tuple(slots))
        else:
            m.segment = RegionDescriptor(**_forge_fields(data, real, region_strategies))
        recv = types.SimpleNamespace(materialized_mm_inputs=m, mm_inputs=None)
        with recorder.active():
            outcome = take_multimodal_inputs(SchedulerUnderTest(tp_size=TP), recv)
        _check_outcome(outcome)
        if outcome[1] is None:
            assert m.segment == real, "a forged region descriptor was accepted"
        recorder.assert_only_segments_in(shm_dir)

    run()
    _settle()
    side.release(hold)
