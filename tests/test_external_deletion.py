"""Segments deleted from outside never crash a process and never leak the cap
(``held_bytes``).

What deletes them in production: ``rm /dev/shm/*``, systemd-logind with ``RemoveIPC=yes``,
a cleanup job. Here: ``soak_harness.external_rm``, which removes every file of the shm
directory (the creator's lock file too), as ``rm <dir>/*`` does.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import types

import pytest

from sglang_mmpre.tokenizer_side.manager import TokenizerSide
from sglang_mmpre.transport import segment as segment_module
from sglang_mmpre.transport.liveness import LOCK_NAME_RE
from sglang_mmpre.transport.segment import segment_names

from mm_fixtures import files_left, shm_settings
from mm_requests import materialized_request, run_ranks, send_captured
from scheduler_harness import SchedulerUnderTest
from soak_harness import external_rm


@pytest.fixture
def side(shm_dir, monkeypatch):
    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    s = TokenizerSide(types.SimpleNamespace(tp_size=2, pp_size=1), shm_settings(shm_dir))
    yield s
    s.shutdown()


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
