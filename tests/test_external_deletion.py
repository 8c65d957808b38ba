"""Segments deleted from outside, at each point of a request's life, never crash a rank,
never leak the cap (``held_bytes``) and never split the ranks' verdicts.

What deletes them in production: ``rm /dev/shm/*``, systemd-logind with ``RemoveIPC=yes``,
a cleanup job. Here: ``soak_harness.external_rm``, which removes every file of the shm
directory (the creator's lock file too), as ``rm <dir>/*`` does.

| when | what the system does |
|---|---|
| before the send | the entry rank finds it missing; every rank aborts the request alike |
| between ranks | ranks that mapped it serve; the others stop on ``SegmentVanishedError`` |
| after every rank mapped | served everywhere (mappings keep the pages) |
| before the scope exits | the creator's release finds nothing to unlink; cap back to 0 |

The multi-process cases run a tokenizer process (sglang's real patched TokenizerManager, its
processor in that process) and four gloo rank processes calling the real patched
``Scheduler.recv_requests`` and ``handle_generate_request`` (``soak_harness``),
with the warm region off (``region_chunk_bytes=0``): one segment per request, whose file a
deletion reaches at each of those points. ``test_region_deleted_before_a_rank_first_maps_it_
stops_that_rank`` covers the region.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import subprocess
import sys
import types

import pytest

from sglang_mmpre.errors import SegmentVanishedError
from sglang_mmpre.scheduler_side.hooks import take_multimodal_inputs, vouch_for_segments
from sglang_mmpre.tokenizer_side.manager import TokenizerSide
from sglang_mmpre.transport import segment as segment_module
from sglang_mmpre.transport.liveness import LOCK_NAME_RE
from sglang_mmpre.transport.segment import segment_names

from mm_fixtures import files_left, shm_settings
from mm_requests import materialized_request, run_ranks, send_captured
from scheduler_harness import SchedulerUnderTest
from soak_harness import external_rm, run_harness

WORLD = 4


@pytest.fixture
def side(shm_dir, monkeypatch):
    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    s = TokenizerSide(types.SimpleNamespace(tp_size=2, pp_size=1), shm_settings(shm_dir))
    yield s
    s.shutdown()


# --- in one process: the tokenizer side and one rank -------------------------------------------

def test_scope_releases_every_segment_and_returns_the_cap_even_if_one_release_raises(
    side, shm_dir, monkeypatch
):
    real = segment_module._adjust_refcount
    writers = []

    def second_fails(fd, path, delta):
        if delta == -1 and path == writers[1].path:
            raise OSError("flock refused")
        return real(fd, path, delta)

    with pytest.raises(OSError, match="flock refused"):
        with side.request_scope():
            for i in range(3):  # each adopted by the scope, as in generate_request
                writers.append(materialized_request(side, f"r{i}").materialized_mm_inputs.writer)
            monkeypatch.setattr(segment_module, "_adjust_refcount", second_fails)
    assert [w.released for w in writers] == [True] * 3
    assert segment_names(str(shm_dir)) == [writers[1].name]  # the one whose release failed
    assert side.held_bytes == 0
    os.unlink(writers[1].path)


def test_last_reference_dropped_after_an_external_rm_unlinks_nothing_and_returns_the_cap(
    side, shm_dir
):
    with side.request_scope():
        blob = send_captured(side, materialized_request(side, "r"))
        assert [r.to_finish for r in run_ranks(blob, 2)] == [None, None]
        external_rm(str(shm_dir))
    assert side.held_bytes == 0
    assert os.listdir(shm_dir) == []


def test_segment_vanishing_between_a_ranks_open_and_its_decrement_is_still_served(
    side, shm_dir, monkeypatch
):
    """The rank holds an fd: it maps the file and drops the last reference, whose unlink
    finds nothing. Before, ``FileNotFoundError`` escaped the scheduler hook."""
    req = materialized_request(side, "r")
    blob = send_captured(side, req)
    side.release(req.materialized_mm_inputs.writer)
    (rank0,) = run_ranks(blob, 2, [SchedulerUnderTest(tp_size=2, tp_rank=0)])
    assert rank0.to_finish is None
    real_flock = fcntl.flock

    def rm_then_flock(fd, op):
        if op == fcntl.LOCK_EX:
            external_rm(str(shm_dir))
        real_flock(fd, op)

    monkeypatch.setattr(segment_module, "fcntl",
                        types.SimpleNamespace(flock=rm_then_flock, LOCK_EX=fcntl.LOCK_EX,
                                              LOCK_UN=fcntl.LOCK_UN))
    (rank1,) = run_ranks(blob, 2, [SchedulerUnderTest(tp_size=2, tp_rank=1)])
    assert rank1.to_finish is None and rank1.multimodal_inputs is not None
    assert os.listdir(shm_dir) == [] and side.held_bytes == 0


def test_rank_that_cannot_find_a_vouched_segment_raises_a_fatal_error_naming_cause_and_fix(
    side, shm_dir
):
    req = materialized_request(side, "r")
    blob = send_captured(side, req)
    entry = pickle.loads(blob)  # what the entry rank's recv_pyobj gives it
    vouch_for_segments([entry])
    assert entry.materialized_mm_inputs.vouched
    copies = [pickle.loads(pickle.dumps(entry)) for _ in range(2)]  # broadcast_pyobj
    inputs, error = take_multimodal_inputs(SchedulerUnderTest(tp_size=2), copies[0])
    assert error is None and inputs is not None
    external_rm(str(shm_dir))
    with pytest.raises(SegmentVanishedError) as caught:
        take_multimodal_inputs(SchedulerUnderTest(tp_size=2, tp_rank=1), copies[1])
    message = str(caught.value)
    for words in ("does not exist", "entry rank", "RemoveIPC=yes", "cleanup job",
                  "pid namespace", "RemoveIPC=no", "SGLANG_MM_SHM_DIR"):
        assert words in message, (words, message)
    side.release(req.materialized_mm_inputs.writer)
    assert side.held_bytes == 0


def test_creator_makes_its_lock_file_again_after_an_external_rm_and_stays_alive_to_sweeps(
    side, shm_dir
):
    first = materialized_request(side, "a").materialized_mm_inputs.writer
    (lock,) = [n for n in os.listdir(shm_dir) if LOCK_NAME_RE.match(n)]
    external_rm(str(shm_dir))
    second = materialized_request(side, "b").materialized_mm_inputs.writer
    assert sorted(os.listdir(shm_dir)) == sorted([lock, second.name])  # same stem, made again
    other = subprocess.run(  # another server starting on the same directory
        [sys.executable, "-c", "import sys; from sglang_mmpre.transport.liveness import sweep;"
         "print(sweep(sys.argv[1]))", str(shm_dir)],
        capture_output=True, text=True,
    )
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == "[]"
    side.release(first)
    side.release(second)
    assert side.held_bytes == 0
    assert files_left(shm_dir) == []


# --- four rank processes ---------------------------------------------------------------------

def test_external_rm_before_send_after_mapping_and_before_scope_exit_on_four_rank_processes(
    tmp_path, shm_dir
):
    plan = ["good", "rm_before_send", "good", "rm_after_mapped", "good", "rm_before_scope_exit",
            "good"]
    result = run_harness(tmp_path, shm_dir, world=WORLD, plan=plan, warmup=0, window=1,
                         region_chunk_bytes=0)
    ranks, tok = result["ranks"], result["tokenizer"]
    for i, kind in enumerate(plan):
        outcomes = [r["outcomes"][f"req{i}-0"] for r in ranks]
        if kind == "rm_before_send":
            # The entry rank found it missing and said so in the request: one verdict.
            assert len(set(outcomes)) == 1, outcomes
            assert outcomes[0].startswith("Invalid multimodal inputs: segment "), outcomes[0]
            assert "does not exist" in outcomes[0]
        else:
            assert outcomes == ["served"] * WORLD, (i, kind, outcomes)
    assert tok["held_after"] == {f"req{i}": 0 for i, k in enumerate(plan) if k.startswith("rm_")}
    assert tok["after"]["held_bytes"] == 0
    assert os.listdir(shm_dir) == []  # no segment; the tokenizer removed its lock at exit


def test_external_rm_between_ranks_stops_the_ranks_that_cannot_map_with_a_named_fatal_error(
    tmp_path, shm_dir
):
    """Rank 0 mapped and serves it; ranks 1-3 find it gone. They must not abort it alone
    (their batches would differ from rank 0's and the next collective would hang): each
    stops on SegmentVanishedError, and the server is torn down (here: by the harness)."""
    plan = ["good", "rm_between_ranks"]
    result = run_harness(tmp_path, shm_dir, world=WORLD, plan=plan, warmup=0, window=1,
                         region_chunk_bytes=0, fatal_ranks=(1, 2, 3))
    codes, logs = result["codes"], result["logs"]
    for r in (1, 2, 3):
        log = logs[f"rank{r}"]
        assert codes[f"rank{r}"] == 1, (r, log[-3000:])
        assert "sglang_mmpre.errors.SegmentVanishedError: segment " in log, log[-3000:]
        assert "RemoveIPC" in log and "SGLANG_MM_SHM_DIR" in log
        assert "OUTCOME req0-0 served" in log
        assert "OUTCOME req1-0" not in log  # no silent abort
    assert "OUTCOME req1-0 served" in logs["rank0"]
    assert "SegmentVanishedError" not in logs["rank0"]
    # Torn down once ranks 1-3 had stopped: killed, or failed at its next broadcast.
    assert codes["rank0"] in (-9, 1), logs["rank0"][-3000:]
    assert codes["tokenizer0"] == -9, logs["tokenizer0"][-3000:]
    assert "HELD req1 0" in logs["tokenizer0"]  # the cap was back to zero for that request
    assert segment_names(str(shm_dir)) == []
