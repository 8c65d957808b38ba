"""The lifetime protocol of a segment: unlinked exactly once, after the last consumer maps."""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
import types

import pytest
import torch

from sglang_mmpre.config import consumers_per_send
from sglang_mmpre.errors import MultimodalTransportError, SegmentAllocationError
from sglang_mmpre.scheduler_side.resolve import resolve
from sglang_mmpre.tokenizer_side.manager import TokenizerSide
from sglang_mmpre.transport.descriptors import SegmentDescriptor
from sglang_mmpre.transport.liveness import sweep
from sglang_mmpre.transport.segment import SegmentWriter, map_segment, segment_names

from mm_fixtures import files_left, image_mm_dict, shm_settings


def _writer(shm_dir, nbytes=4096):
    w = SegmentWriter(str(shm_dir), nbytes)
    w.payload[:4] = b"abcd"
    return w


def test_segment_unlinked_after_last_rank_maps(shm_dir):
    w = _writer(shm_dir)
    seg = w.seal(b"\1" * 16, consumers=3)
    w.add_consumers(3)
    w.release()
    for i in range(3):
        assert segment_names(str(shm_dir)) == [seg.name], f"unlinked before consumer {i} mapped"
        mapping = map_segment(str(shm_dir), seg, b"\1" * 16)
        assert mapping[64:68] == b"abcd"
    assert segment_names(str(shm_dir)) == []


def test_creator_reference_keeps_segment_between_sends(shm_dir):
    """Parallel sampling sends one tokenized object several times."""
    w = _writer(shm_dir)
    seg = w.seal(b"\2" * 16, consumers=2)
    for _send in range(3):
        w.add_consumers(2)
        for _rank in range(2):
            map_segment(str(shm_dir), seg, b"\2" * 16)
        assert segment_names(str(shm_dir)) == [seg.name]
    w.release()
    assert segment_names(str(shm_dir)) == []


def test_creator_release_last_unlinks_once(shm_dir):
    w = _writer(shm_dir)
    seg = w.seal(b"\3" * 16, consumers=1)
    w.add_consumers(1)
    map_segment(str(shm_dir), seg, b"\3" * 16)
    assert segment_names(str(shm_dir)) == [seg.name]
    w.release()
    w.release()  # idempotent: no second unlink, no error
    assert segment_names(str(shm_dir)) == []


def test_consumed_segment_is_refused_not_unlinked_twice(shm_dir):
    w = _writer(shm_dir)
    seg = w.seal(b"\4" * 16, consumers=1)
    w.add_consumers(1)
    w.release()
    map_segment(str(shm_dir), seg, b"\4" * 16)
    with pytest.raises(MultimodalTransportError, match="does not exist"):
        map_segment(str(shm_dir), seg, b"\4" * 16)


def test_private_mapping_writes_stay_on_their_rank(shm_dir):
    w = _writer(shm_dir)
    seg = w.seal(b"\5" * 16, consumers=2)
    w.add_consumers(2)
    w.release()
    first = map_segment(str(shm_dir), seg, b"\5" * 16)
    first[64:68] = b"XXXX"
    second = map_segment(str(shm_dir), seg, b"\5" * 16)
    assert second[64:68] == b"abcd"


def test_failed_construction_leaves_no_file(shm_dir, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(SegmentAllocationError, match="shm-size"):
        SegmentWriter(str(shm_dir), 1 << 20)
    assert files_left(shm_dir) == []


def test_segment_file_is_private_to_its_user(shm_dir):
    w = _writer(shm_dir)
    assert (os.stat(w.path).st_mode & 0o777) == 0o600
    w.abandon()
    assert files_left(shm_dir) == []


def test_sweep_removes_dead_creators_files_and_lock_only(shm_dir):
    child = subprocess.run(
        [sys.executable, "-c",
         "import os, sys; from sglang_mmpre.transport.segment import SegmentWriter;"
         "w = SegmentWriter(sys.argv[1], 128); print(w.name); os._exit(0)", str(shm_dir)],
        check=True, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    dead = child.stdout.strip()  # os._exit: no clean-up ran, as after a crash
    dead_lock = dead.rsplit("_", 1)[0] + ".lock"
    live = _writer(shm_dir)
    live_lock = live.name.rsplit("_", 1)[0] + ".lock"
    foreign = shm_dir / "not_ours_123"
    foreign.write_bytes(b"x")
    lookalike = shm_dir / "sglmmpre_1_zz"
    lookalike.write_bytes(b"x")
    assert sorted(os.listdir(shm_dir)) == sorted(
        [dead, dead_lock, live.name, live_lock, "not_ours_123", "sglmmpre_1_zz"])
    assert sweep(str(shm_dir)) == [dead, dead_lock]
    assert sorted(os.listdir(shm_dir)) == sorted(
        [live.name, live_lock, "not_ours_123", "sglmmpre_1_zz"])
    live.abandon()


@pytest.mark.parametrize(
    "topology, expected",
    [
        (dict(tp_size=1, dp_size=1, pp_size=1, enable_dp_attention=False), 1),
        (dict(tp_size=4, dp_size=1, pp_size=1, enable_dp_attention=False), 4),
        # DP without DP-attention: the controller sends a request to one replica of tp ranks
        (dict(tp_size=2, dp_size=4, pp_size=1, enable_dp_attention=False), 2),
        # DP-attention: broadcast within one attention-TP group of tp/dp ranks
        (dict(tp_size=8, dp_size=4, pp_size=1, enable_dp_attention=True), 2),
        (dict(tp_size=8, dp_size=8, pp_size=1, enable_dp_attention=True), 1),
        # PP: every stage receives the request and broadcasts it to its group
        (dict(tp_size=4, dp_size=1, pp_size=2, enable_dp_attention=False), 8),
        (dict(tp_size=8, dp_size=2, pp_size=2, enable_dp_attention=True), 8),
    ],
)
def test_consumer_count_per_topology(topology, expected):
    assert consumers_per_send(types.SimpleNamespace(**topology)) == expected


def test_consumer_count_matches_sglang_attention_tp_size():
    """Our DP-attention group size is sglang's own attn_tp_size for the same topology."""
    from sglang.srt.layers.dp_attention import compute_dp_attention_world_info

    for tp, dp in [(8, 4), (8, 2), (4, 4), (16, 2)]:
        for tp_rank in range(tp):
            _, attn_tp_size, _ = compute_dp_attention_world_info(True, tp_rank, tp, dp)
            ours = consumers_per_send(
                types.SimpleNamespace(tp_size=tp, dp_size=dp, pp_size=1, enable_dp_attention=True)
            )
            assert ours == attn_tp_size


def test_request_scope_releases_unsent_segment(shm_dir):
    side = TokenizerSide(types.SimpleNamespace(tp_size=2, pp_size=1), shm_settings(shm_dir))
    req = types.SimpleNamespace(mm_inputs=image_mm_dict(64, 64))

    async def tokenize_then_fail():
        with side.request_scope():
            await side.materialize_request(req)
            assert len(segment_names(str(shm_dir))) == 1
            raise RuntimeError("validation failed before sending")

    with pytest.raises(RuntimeError):
        asyncio.run(tokenize_then_fail())
    assert segment_names(str(shm_dir)) == []
    assert side.held_bytes == 0


def test_cancelled_materialization_leaves_no_segment(shm_dir):
    side = TokenizerSide(types.SimpleNamespace(tp_size=2, pp_size=1), shm_settings(shm_dir))
    req = types.SimpleNamespace(mm_inputs=image_mm_dict(448, 448))

    async def cancel_midway():
        with side.request_scope():
            task = asyncio.ensure_future(side.materialize_request(req))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.sleep(0.5)  # let the worker finish and its callback run

    asyncio.run(cancel_midway())
    side.shutdown()
    assert segment_names(str(shm_dir)) == []


def test_send_counts_consumers_and_ranks_release(shm_dir):
    side = TokenizerSide(types.SimpleNamespace(tp_size=3, pp_size=1), shm_settings(shm_dir))
    req = types.SimpleNamespace(mm_inputs=image_mm_dict(64, 64))
    sent = []
    asyncio.run(side.materialize_request(req))
    side.send(types.SimpleNamespace(send_pyobj=lambda o: sent.append(pickle.dumps(o))), req)
    assert len(segment_names(str(shm_dir))) == 1  # creator released; 3 consumers pending
    for blob in sent * 3:
        resolve(pickle.loads(blob).materialized_mm_inputs, 3, str(shm_dir))
    assert segment_names(str(shm_dir)) == []


def test_failed_send_uncounts_consumers(shm_dir):
    side = TokenizerSide(types.SimpleNamespace(tp_size=2, pp_size=1), shm_settings(shm_dir))
    req = types.SimpleNamespace(mm_inputs=image_mm_dict(64, 64))

    def broken(_obj):
        raise OSError("socket closed")

    async def run():
        with side.request_scope():
            await side.materialize_request(req)
            with pytest.raises(OSError):
                side.send(types.SimpleNamespace(send_pyobj=broken), req)

    asyncio.run(run())
    assert segment_names(str(shm_dir)) == []


def test_pipeline_stage_forwarding_after_handling_resolves_again(shm_dir):
    """sglang forwards recv_reqs to the next PP stage after process_input_requests: the
    forwarded object must still carry descriptors, and every stage's ranks map it."""
    tp, pp = 2, 2
    side = TokenizerSide(types.SimpleNamespace(tp_size=tp, pp_size=pp), shm_settings(shm_dir))
    req = types.SimpleNamespace(mm_inputs=image_mm_dict(224, 224))
    sent = []
    asyncio.run(side.materialize_request(req))
    side.send(types.SimpleNamespace(send_pyobj=lambda o: sent.append(pickle.dumps(o))), req)
    stage_input = sent[0]
    results = []
    for _stage in range(pp):
        ranks = [pickle.loads(stage_input) for _ in range(tp)]
        for rank_req in ranks:
            results.append(resolve(rank_req.materialized_mm_inputs, tp * pp, str(shm_dir)))
        stage_input = pickle.dumps(ranks[0])  # the stage entry rank forwards what it handled
        assert len(stage_input) < 4096
    first = results[0].mm_items[0].feature
    assert all(torch.equal(r.mm_items[0].feature, first) for r in results)
    assert segment_names(str(shm_dir)) == []


def test_abandon_unlinks_even_while_a_view_of_the_payload_is_alive(shm_dir):
    """A failed copy can leave a view in a traceback; the file must still go."""
    w = SegmentWriter(str(shm_dir), 4096)
    view = torch.frombuffer(w.payload, dtype=torch.uint8)
    w.abandon()
    assert files_left(shm_dir) == []
    del view
