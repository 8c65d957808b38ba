"""Shared memory runs out: requests travel inline, every one is served, the cause is logged
once, and nothing is left behind.

Two ways to run out:

- the configured cap (``SGLANG_MM_SHM_CAP_BYTES``) on the bytes whose creator reference one
  tokenizer process holds, through the real patched ``TokenizerManager``;
- a real, small tmpfs (``mount -t tmpfs -o size=2m``) that is full: ``posix_fallocate``
  fails with ENOSPC at creation, which must become an inline request, never a SIGBUS when
  the pages are touched later. That part runs in a child process, so that a SIGBUS would
  show as its exit status instead of killing pytest. Skipped where mounting is not
  permitted (it needs CAP_SYS_ADMIN).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import tempfile

import pytest

from sglang_mmpre.errors import SegmentAllocationError
from sglang_mmpre.transport.segment import SegmentWriter, segment_names

from child_process import Child
from scheduler_harness import SchedulerUnderTest
from mm_fixtures import files_left
from mm_requests import RecordingSocket

CAP_LOGGER = "sglang_mmpre.tokenizer_side.manager"


def _jpeg(w, h, seed):
    from tiny_models import image_to_jpeg_bytes, make_image

    return image_to_jpeg_bytes(make_image(w, h, seed))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_models import make_tiny_qwen2vl

    return make_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2vl"))


def _cap_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == CAP_LOGGER and "cap of" in r.getMessage()]


def test_cap_reached_requests_travel_inline_all_served_warning_logged_once(
    model_dir, shm_dir, monkeypatch, caplog
):
    from tiny_models import close_tokenizer_manager, make_tokenizer_manager, tokenize_one

    one_request = 5 << 20  # a 448x448 image: 4.8 MB of pixel_values plus small tensors
    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("SGLANG_MM_SHM_CAP_BYTES", str(one_request))
    caplog.set_level(logging.WARNING, logger=CAP_LOGGER)
    tm = make_tokenizer_manager(model_dir)
    try:
        images = [_jpeg(448, 448, seed) for seed in range(5)]

        async def tokenize_all():
            # Without a scope each segment is held until its send: five in flight at once.
            return [await tokenize_one(tm, image_data=[img]) for img in images]

        reqs = asyncio.run(tokenize_all())
        via = ["shm" if r.materialized_mm_inputs.segment is not None else "inline" for r in reqs]
        assert via == ["shm", "inline", "inline", "inline", "inline"]
        assert len(segment_names(str(shm_dir))) == 1
        assert len(_cap_warnings(caplog)) == 1
        assert "SGLANG_MM_SHM_CAP_BYTES" in _cap_warnings(caplog)[0]

        sock = RecordingSocket()
        for r in reqs:
            tm.mmpre.send(sock, r)
        scheduler = SchedulerUnderTest(tp_size=1)
        for blob in sock.sent:
            scheduler.handle_generate_request(pickle.loads(blob))
        assert len(scheduler.queued) == 5
        hashes = []
        for built in scheduler.queued:
            assert built.to_finish is None, built.to_finish.message
            assert built.multimodal_inputs is not None
            hashes.append(built.multimodal_inputs.mm_items[0].hash)
        assert len(set(hashes)) == 5
        assert segment_names(str(shm_dir)) == []
        assert tm.mmpre.held_bytes == 0

        # Once the bytes are released, requests take shared memory again; still one warning.
        again = asyncio.run(tokenize_one(tm, image_data=[images[0]]))
        assert again.materialized_mm_inputs.segment is not None
        tm.mmpre.release_unsent(again)
        more = asyncio.run(tokenize_all())
        for r in more:
            tm.mmpre.release_unsent(r)
        assert len(_cap_warnings(caplog)) == 1
        assert segment_names(str(shm_dir)) == []
    finally:
        close_tokenizer_manager(tm)


def test_cap_of_zero_sends_every_request_inline_and_all_are_served(
    model_dir, shm_dir, monkeypatch
):
    from tiny_models import close_tokenizer_manager, make_tokenizer_manager, tokenize_one

    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("SGLANG_MM_SHM_CAP_BYTES", "0")
    tm = make_tokenizer_manager(model_dir)
    try:
        sock = RecordingSocket()
        for seed in range(3):
            req = asyncio.run(tokenize_one(tm, image_data=[_jpeg(224, 224, seed)]))
            assert req.materialized_mm_inputs.segment is None
            tm.mmpre.send(sock, req)
        assert os.listdir(shm_dir) == []
        scheduler = SchedulerUnderTest(tp_size=1)
        for blob in sock.sent:
            scheduler.handle_generate_request(pickle.loads(blob))
        assert [r.to_finish for r in scheduler.queued] == [None] * 3
        assert all(r.multimodal_inputs is not None for r in scheduler.queued)
    finally:
        close_tokenizer_manager(tm)


# --- a real, full tmpfs ----------------------------------------------------------------------

@pytest.fixture
def small_tmpfs():
    """A 2 MiB tmpfs mounted for this test, unmounted afterwards."""
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) on this machine")
    path = tempfile.mkdtemp(prefix="mmpre_tmpfs_")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", path],
                         capture_output=True, text=True)
    if res.returncode != 0:
        os.rmdir(path)
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", path], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", path], capture_output=True)
        os.rmdir(path)


def test_segment_creation_on_a_full_tmpfs_raises_allocation_error_and_leaves_no_file(
    small_tmpfs
):
    with pytest.raises(SegmentAllocationError, match="shm-size"):
        SegmentWriter(small_tmpfs, 4 << 20)  # larger than the whole filesystem
    assert files_left(small_tmpfs) == []


# A tokenizer process on the small tmpfs: one request larger than the filesystem, one when
# a foreign file has filled it, one after the space is back. Each is resolved by a rank.
ON_SMALL_TMPFS = """
import asyncio, json, logging, torch
warnings = []
class Keep(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger("sglang_mmpre").addHandler(Keep())
from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem
from sglang_mmpre.tokenizer_side.manager import TokenizerSide
from mm_fixtures import files_left, shm_settings
from mm_requests import run_ranks, send_captured, tokenized_request

side = TokenizerSide(types.SimpleNamespace(tp_size=2, pp_size=1), shm_settings(shm_dir))

def one(rows, rid):
    feature = torch.rand(rows, 1176)
    item = MultimodalDataItem(modality=Modality.IMAGE, feature=feature.clone(),
                              offsets=[(3, 67)])
    req = asyncio.run(side.materialize_request(
        tokenized_request({"mm_items": [item], "im_token_id": 261}, rid)))
    via = "shm" if req.materialized_mm_inputs.segment is not None else "inline"
    ranks = run_ranks(send_captured(side, req), 2)
    return {"via": via, "equal": all(torch.equal(r.multimodal_inputs.mm_items[0].feature, feature)
                                     for r in ranks if r.multimodal_inputs is not None),
            "aborts": [r.to_finish.message for r in ranks if r.to_finish is not None],
            "left": files_left(shm_dir), "held": side.held_bytes}

out = {"larger_than_fs": one(4100, "big")}
print("FILL", flush=True)
sys.stdin.readline()  # the parent fills the filesystem with a foreign file
out["fs_full"] = one(40, "small")
print("FREE", flush=True)
sys.stdin.readline()  # the parent removes it
out["space_back"] = one(40, "again")
out["warnings"] = warnings
print("RESULT", json.dumps(out), flush=True)
"""


def test_full_tmpfs_enospc_falls_back_inline_no_sigbus_no_leftover(small_tmpfs):
    child = Child(ON_SMALL_TMPFS, small_tmpfs)
    filler = os.path.join(small_tmpfs, "foreign_filler")
    try:
        child.expect("FILL")
        st = os.statvfs(small_tmpfs)
        with open(filler, "wb") as f:
            f.write(b"\xab" * (st.f_bavail * st.f_frsize - (16 << 10)))
        child.say("filled")
        child.expect("FREE")
        assert files_left(small_tmpfs) == ["foreign_filler"]
        with open(filler, "rb") as f:
            assert set(f.read()) == {0xAB}
        os.unlink(filler)
        child.say("freed")
        out = json.loads(child.expect("RESULT"))
        code = child.proc.wait()
    finally:
        child.close()
    assert code != -signal.SIGBUS, "SIGBUS: a page of a segment was not backed by tmpfs"
    assert code == 0
    for case, via in [("larger_than_fs", "inline"), ("fs_full", "inline"), ("space_back", "shm")]:
        res = out[case]
        assert res["via"] == via, (case, res)
        assert res["aborts"] == [] and res["equal"], (case, res)
        assert res["left"] == (["foreign_filler"] if case == "fs_full" else []), (case, res)
        assert res["held"] == 0, (case, res)
    alloc = [w for w in out["warnings"] if "cannot reserve" in w]
    assert len(alloc) == 1, out["warnings"]
    assert "--shm-size" in alloc[0] and "inline" in alloc[0]
    assert os.listdir(small_tmpfs) == []
