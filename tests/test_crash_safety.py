"""Crashes (SIGKILL) at the worst moments leave nothing that a sweep does not remove, and a
sweep removes nothing else.

- a tokenizer process killed in the middle of copying a feature into its segment;
- a tokenizer process killed after sending, before any rank mapped;
- a scheduler-rank process killed between receiving a descriptor and mapping it;
- a rank killed while it holds the segment's flock;
- two servers in different pid namespaces sharing one shm directory.

What removes the leftovers is :func:`sweep`, which every ``TokenizerSide`` runs at start-up
(a restarted server). A creator is alive while it holds the flock on its lock file, in any
pid namespace; a segment whose creator is alive is never swept, and nothing outside our
exact name pattern, or that is not a regular file, is ever touched.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import signal
import subprocess
import sys
import types

import pytest

from sglang_mmpre.tokenizer_side.manager import TokenizerSide
from sglang_mmpre.transport.liveness import LOCK_NAME_RE, sweep
from sglang_mmpre.transport.segment import segment_names

from child_process import PRELUDE
from mm_fixtures import shm_settings
from mm_requests import materialized_request, run_ranks, segment_refcount, send_captured
from scheduler_harness import SchedulerUnderTest


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert proc.wait() == 0
    return proc.pid


def _startup_sweep(shm_dir) -> None:
    """What a restarted TokenizerManager does first (TokenizerSide.__init__ sweeps)."""
    TokenizerSide(types.SimpleNamespace(tp_size=2, pp_size=1), shm_settings(shm_dir)).shutdown()


# A tokenizer process whose copy of the first tensor into the segment stalls half way.
MID_WRITE = """
import torch
from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem
from sglang_mmpre.tokenizer_side import materialize as mat
from sglang_mmpre.tokenizer_side.manager import TokenizerSide
from mm_fixtures import shm_settings

def copy_then_stall(payload, leaf, offset):
    half = leaf.reshape(-1)[: leaf.numel() // 2]
    torch.frombuffer(payload, dtype=torch.uint8, count=half.numel() * half.element_size(),
                     offset=offset).view(leaf.dtype).copy_(half)
    print("MID-WRITE", flush=True)
    sys.stdin.read()  # blocks until killed

mat._copy_into = copy_then_stall
side = TokenizerSide(types.SimpleNamespace(tp_size=4, pp_size=1), shm_settings(shm_dir))
feature = torch.rand(4100, 1176)  # 19 MB, about the pixel_values of a 1120x700 image
item = MultimodalDataItem(modality=Modality.IMAGE, feature=feature, offsets=[(0, 1025)])
side.build({"mm_items": [item], "im_token_id": 261})
"""


def test_tokenizer_killed_mid_write_leaves_a_segment_the_startup_sweep_removes(
    shm_dir, children
):
    child = children(MID_WRITE, str(shm_dir))
    child.expect("MID-WRITE")
    (name,) = segment_names(str(shm_dir))
    assert name.startswith(f"sglmmpre_{child.pid}_")
    assert os.stat(shm_dir / name).st_size > 4100 * 1176 * 4  # fully reserved up front
    sweep(str(shm_dir))
    assert segment_names(str(shm_dir)) == [name], "swept while its creator was alive"
    child.kill9()
    assert segment_names(str(shm_dir)) == [name]  # nobody could release it
    _startup_sweep(shm_dir)
    assert os.listdir(shm_dir) == []  # the segment and its creator's lock file


# A tokenizer process that materialized and sent a request (TP=2), holding its scope.
SENT = """
import asyncio, torch
from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem
from sglang_mmpre.tokenizer_side.manager import TokenizerSide
from mm_fixtures import shm_settings
from mm_requests import RecordingSocket, tokenized_request

side = TokenizerSide(types.SimpleNamespace(tp_size=2, pp_size=1), shm_settings(shm_dir))
sock = RecordingSocket()
item = MultimodalDataItem(modality=Modality.IMAGE, feature=torch.rand(256, 1176),
                          offsets=[(3, 67)])  # the pixel_values of a 224x224 image

async def generate():
    with side.request_scope():
        req = await side.materialize_request(
            tokenized_request({"mm_items": [item], "im_token_id": 261}, "r"))
        side.send(sock, req)
        print("SENT", base64.b64encode(sock.sent[0]).decode(), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    # the scope closed: the creator reference is released
    print("RELEASED", flush=True)
    sys.stdin.readline()

asyncio.run(generate())
"""


def test_tokenizer_killed_after_send_before_any_map_is_swept_and_ranks_abort_cleanly(
    shm_dir, children, monkeypatch
):
    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    child = children(SENT, str(shm_dir))
    blob = base64.b64decode(child.expect("SENT"))
    (name,) = segment_names(str(shm_dir))
    assert segment_refcount(shm_dir / name) == 1 + 2  # creator + two consumers
    child.kill9()
    _startup_sweep(shm_dir)
    assert segment_names(str(shm_dir)) == []
    # A rank that receives the stale descriptor afterwards aborts that request, nothing more.
    for req in run_ranks(blob, 2):
        assert "does not exist" in req.to_finish.message


# A scheduler rank that received a request and is killed before mapping it.
RANK_STALLS_BEFORE_MAP = """
from scheduler_harness import SchedulerUnderTest
import sglang.srt.managers.io_struct  # what unpickling a request imports
blob = base64.b64decode(sys.stdin.readline())
req = pickle.loads(blob)  # received (recv_pyobj / broadcast_pyobj)
print("RECEIVED", req.materialized_mm_inputs.segment.name, flush=True)
sys.stdin.readline()  # killed here, before handle_generate_request maps it
SchedulerUnderTest(tp_size=2, tp_rank=1).handle_generate_request(req)
"""


@pytest.mark.parametrize("creator_end", ["killed", "exits_after_release"])
def test_rank_killed_between_receive_and_map_leaves_a_segment_swept_once_creator_is_gone(
    creator_end, shm_dir, children, monkeypatch
):
    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    rank1 = children(RANK_STALLS_BEFORE_MAP, str(shm_dir))  # imports while the creator works
    creator = children(SENT, str(shm_dir))
    blob = base64.b64decode(creator.expect("SENT"))
    rank1.say(base64.b64encode(blob).decode())
    (name,) = segment_names(str(shm_dir))
    assert rank1.expect("RECEIVED") == name
    rank1.kill9()
    # Rank 0 (this process) is unaffected: it maps and serves the request.
    (served,) = run_ranks(blob, 2, [SchedulerUnderTest(tp_size=2, tp_rank=0)])
    assert served.to_finish is None and served.multimodal_inputs is not None
    assert segment_refcount(shm_dir / name) == 2  # creator + the dead rank's reference
    sweep(str(shm_dir))
    assert segment_names(str(shm_dir)) == [name], "swept while its creator was alive"
    if creator_end == "killed":
        creator.kill9()
    else:
        creator.say("done")
        creator.expect("RELEASED")
        assert segment_refcount(shm_dir / name) == 1  # only the dead rank's reference
        creator.say("exit")
        assert creator.proc.wait() == 0
    _startup_sweep(shm_dir)
    assert segment_names(str(shm_dir)) == []


# A rank that dies while holding the segment's flock (inside _adjust_refcount).
RANK_DIES_HOLDING_LOCK = """
import fcntl
from sglang_mmpre.transport import segment as seg_mod
real_flock = fcntl.flock

def flock_then_stall(fd, op):
    real_flock(fd, op)
    if op == fcntl.LOCK_EX:
        print("LOCKED", flush=True)
        sys.stdin.readline()

seg_mod.fcntl = types.SimpleNamespace(flock=flock_then_stall, LOCK_EX=fcntl.LOCK_EX,
                                      LOCK_UN=fcntl.LOCK_UN)
from scheduler_harness import SchedulerUnderTest
req = pickle.loads(base64.b64decode(sys.stdin.readline()))
SchedulerUnderTest(tp_size=2, tp_rank=1).handle_generate_request(req)
"""


def test_rank_killed_holding_the_segment_lock_does_not_block_other_ranks(
    shm_dir, children, monkeypatch
):
    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    side = TokenizerSide(types.SimpleNamespace(tp_size=2, pp_size=1), shm_settings(shm_dir))
    blob = send_captured(side, materialized_request(side, "r"))
    (name,) = segment_names(str(shm_dir))
    rank1 = children(RANK_DIES_HOLDING_LOCK, str(shm_dir))
    rank1.say(base64.b64encode(blob).decode())
    rank1.expect("LOCKED")
    fd = os.open(shm_dir / name, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by the child
        rank1.kill9()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel released it
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    assert segment_refcount(shm_dir / name) == 2  # the dead rank never wrote
    (served,) = run_ranks(blob, 2, [SchedulerUnderTest(tp_size=2, tp_rank=0)])
    assert served.to_finish is None
    assert segment_names(str(shm_dir)) == [name]  # the dead rank's reference remains
    side.shutdown()
    os.unlink(shm_dir / name)  # what the sweep does once this process (its creator) is gone


# A tokenizer process that is alive and holds segments (a running server).
LIVE_CREATOR = """
from sglang_mmpre.transport.segment import SegmentWriter
writers = [SegmentWriter(shm_dir, 4096) for _ in range(3)]
print("READY", flush=True)
sys.stdin.readline()
"""


def _lock_files(shm_dir) -> list[str]:
    return sorted(n for n in os.listdir(shm_dir) if LOCK_NAME_RE.match(n))


def test_sweep_never_removes_segments_of_a_live_creator(shm_dir, children):
    live = children(LIVE_CREATOR, str(shm_dir))
    live.expect("READY")
    names = segment_names(str(shm_dir))
    assert len(names) == 3 and all(n.startswith(f"sglmmpre_{live.pid}_") for n in names)
    lock = _lock_files(shm_dir)
    assert lock == [names[0].rsplit("_", 1)[0] + ".lock"]
    # Our own sweep, and a second server starting up against the same directory.
    assert sweep(str(shm_dir)) == []
    _startup_sweep(shm_dir)
    starter = subprocess.run(
        [sys.executable, "-c", PRELUDE + "from sglang_mmpre.transport.liveness import sweep;"
         "print(sweep(shm_dir))", str(shm_dir)],
        capture_output=True, text=True,
    )
    assert starter.returncode == 0, starter.stderr
    assert starter.stdout.strip() == "[]"
    assert segment_names(str(shm_dir)) == names
    live.kill9()
    assert sorted(sweep(str(shm_dir))) == sorted(names + lock)
    assert os.listdir(shm_dir) == []


def test_sweep_never_touches_anything_outside_our_exact_name_pattern(shm_dir, tmp_path, children):
    dead = _dead_pid()
    hex16, hex24 = "0123456789abcdef", "0123456789abcdef01234567"
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    # A genuine dead creator's segments and lock file: the only things the sweep may remove.
    creator = children(LIVE_CREATOR, str(shm_dir))
    creator.expect("READY")
    creator.kill9()
    ours = sorted(os.listdir(shm_dir))
    stem = segment_names(str(shm_dir))[0].rsplit("_", 1)[0]  # its creator, dead
    lookalikes = [
        f"{stem}_{hex24}.tmp", f"{stem}_{hex24[:-1]}", f"{stem}_{hex24}0",
        f"{stem}_{hex24.upper()}", f"S{stem[1:]}_{hex24}", f"x{stem}_{hex24}",
        f"{stem}_{hex24}\n", f" {stem}_{hex24}", f"{stem}_{hex24} ", f"{stem}-{hex24}",
        f"{stem}.lock.tmp", f"{stem}.LOCK", f"{stem}lock", f"{stem}.lock\n",
        f"sglmmpre_0{dead}_{hex16}_{hex24}", f"sglmmpre__{hex16}_{hex24}",
        f"sglmmpre_{dead}_{hex24}",  # the name format of before creator lock files
        "sglmmpre_", "psm_4f2a1c", "sem.mp-abc123", "torch_123_456", "sglang_mmpre_test_x",
    ]
    for name in lookalikes:
        (shm_dir / name).write_bytes(b"foreign")
    # Exactly our pattern and a dead creator, but not a regular file we could have made.
    (shm_dir / f"{stem}_{'a' * 24}").mkdir()
    os.symlink(victim, shm_dir / f"{stem}_{'b' * 24}")
    os.mkfifo(shm_dir / f"{stem}_{'c' * 24}")
    (shm_dir / "sub").mkdir()
    (shm_dir / "sub" / f"{stem}_{'d' * 24}").write_bytes(b"nested")
    # Creators whose lock is missing (deleted from outside), a directory, or a symlink to a
    # file that nobody locks: their liveness is unknown, so their files stay.
    no_lock = f"sglmmpre_{dead}_{'e' * 16}"
    dir_lock = f"sglmmpre_{dead}_{'f' * 16}"
    link_lock = f"sglmmpre_{dead}_{'9' * 16}"
    for other in (no_lock, dir_lock, link_lock):
        (shm_dir / f"{other}_{hex24}").write_bytes(b"unknown creator")
    (shm_dir / f"{dir_lock}.lock").mkdir()
    os.symlink(victim, shm_dir / f"{link_lock}.lock")
    before = sorted(os.listdir(shm_dir))

    assert sorted(sweep(str(shm_dir))) == ours

    assert sorted(os.listdir(shm_dir)) == sorted(set(before) - set(ours))
    for name in lookalikes:
        assert (shm_dir / name).read_bytes() == b"foreign"
    assert victim.read_bytes() == b"precious"
    assert (shm_dir / "sub" / f"{stem}_{'d' * 24}").read_bytes() == b"nested"


# --- two servers in different pid namespaces sharing one shm directory ------------------------

UNSHARE = ["unshare", "--pid", "--fork", "--kill-child"]
# Run directly, python is pid 1 of its namespace. Under this `sh -c` (pid 1), which first
# uses up 200 pids, it is pid 202: above any thread id of a python process in another
# namespace (kill(2) finds threads too, so a small pid would look alive there).
UNDER_SH = ["sh", "-c", 'i=0; while [ $i -lt 200 ]; do /bin/true; i=$((i+1)); done; "$@"; exit $?',
            "sh"]

# A running server's tokenizer process: three segments in flight. /proc is the host's, so
# /proc/self names its pid as the test sees it.
LIVE_CREATOR_NAMING_HOST_PID = """
from sglang_mmpre.transport.segment import SegmentWriter
writers = [SegmentWriter(shm_dir, 4096) for _ in range(3)]
print("READY", os.getpid(), os.readlink("/proc/self"), flush=True)
sys.stdin.readline()
"""

# A second server starting on the same directory: TokenizerSide sweeps at start-up, then
# holds a segment of its own while it serves. It first says whether the other creator's
# pid (argv[2]) exists in its own namespace.
SECOND_SERVER = """
import json, torch
from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem
from sglang_mmpre.tokenizer_side.manager import TokenizerSide
from sglang_mmpre.transport.liveness import sweep
from mm_fixtures import shm_settings

try:
    os.kill(int(sys.argv[2]), 0)
    print("OTHER-PID exists", flush=True)
except ProcessLookupError:
    print("OTHER-PID absent", flush=True)
side = TokenizerSide(types.SimpleNamespace(tp_size=2, pp_size=1), shm_settings(shm_dir))
item = MultimodalDataItem(modality=Modality.IMAGE, feature=torch.rand(64, 1176), offsets=[(3, 67)])
writer = side.build({"mm_items": [item], "im_token_id": 261}).writer
print("STARTED", os.getpid(), writer.name, flush=True)
sys.stdin.readline()
print("SWEPT", json.dumps(sweep(shm_dir)), flush=True)
sys.stdin.readline()
side.release(writer)
print("HELD", side.held_bytes, flush=True)
"""


def _pid_namespaces_or_skip() -> None:
    try:
        probe = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no unshare(1) on this machine")
    if probe.returncode != 0:
        pytest.skip(f"cannot create pid namespaces here: {probe.stderr.strip()}")


def test_server_in_another_pid_namespace_never_sweeps_a_live_creators_segments(
    shm_dir, children
):
    """The names carry pids that mean nothing across namespaces: A's pid does not exist
    in B's namespace. Liveness by pid would have B's start-up sweep delete A's segments;
    A's lock file tells B that A is alive, and that it is dead once killed."""
    _pid_namespaces_or_skip()
    a = children(LIVE_CREATOR_NAMING_HOST_PID, str(shm_dir), wrapper=UNSHARE + UNDER_SH)
    a_pid, a_host_pid = map(int, a.expect("READY").split())
    a_names = segment_names(str(shm_dir))
    assert len(a_names) == 3 and all(n.startswith(f"sglmmpre_{a_pid}_") for n in a_names)
    a_lock = _lock_files(shm_dir)

    b = children(SECOND_SERVER, str(shm_dir), str(a_pid), wrapper=UNSHARE)
    assert b.expect("OTHER-PID") == "absent"  # by pid, B would judge A dead
    b_pid, b_name = b.expect("STARTED").split()
    assert int(b_pid) == 1 and b_name.startswith("sglmmpre_1_")
    assert segment_names(str(shm_dir)) == sorted(a_names + [b_name]), "B's start-up swept A's"

    os.kill(a_host_pid, signal.SIGKILL)
    assert a.proc.wait() == 128 + signal.SIGKILL  # sh reports python's death, unshare passes it on
    b.say("sweep")
    assert sorted(json.loads(b.expect("SWEPT"))) == sorted(a_names + a_lock)
    assert segment_names(str(shm_dir)) == [b_name]  # B's own segment: its creator lives
    b.say("release")
    assert b.expect("HELD") == "0"
    assert b.proc.wait() == 0
    assert os.listdir(shm_dir) == []  # B removed its lock file at its clean exit
