"""A patched real server killed with SIGKILL under load, restarted at TP=1 on the same shm directory.

1. sglang 0.5.5 as shipped at TP=1 answers the reference cases, then stops.
2. A patched TP=2 server is loaded with image requests and its whole process group is
   killed with SIGKILL while requests are in flight: its warm region (and any segment) and
   its lock file stay behind, their creator dead.
3. A patched TP=1 server starts on the same directory: its start-up sweep must remove every
   file of the dead server, and once it stops the directory is as it was before the first
   start. It then serves the cases with outputs equal
   to sglang's at TP=1, and leaves nothing when it stops.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

from real_server import RealServer, ServerConfig, segment_files
from server_cases import case_one_image, case_two_images, gen_body, generate, post

pytestmark = [pytest.mark.real_server, pytest.mark.timeout(900)]

TP1_CASES = {"one_1120x700_image": case_one_image, "two_images_one_prompt": case_two_images}


def _load_until_segments_are_live(server: RealServer, stop: threading.Event) -> list[str]:
    def client(i: int) -> None:
        while not stop.is_set():
            body = gen_body(1, seed=200 + i)
            body["sampling_params"].update(max_new_tokens=200, ignore_eos=True)
            try:
                post(server.url, "/generate", body, timeout=60)
            except requests.RequestException:
                return  # the server was killed under us

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    live: list[str] = []
    while time.monotonic() < deadline and not live:
        live = segment_files(server.shm_dir, with_regions=True)
        time.sleep(0.05)
    time.sleep(3.0)  # requests in flight, with their slots or segments taken
    return live


def test_kill_9_under_load_then_restart_sweep_restores_shm_and_tp1_matches_as_shipped(
    served_model, tmp_path
):
    shipped = RealServer(ServerConfig("as_shipped", tp=1), served_model, tmp_path / "shipped")
    shipped.start()
    try:
        want = {name: fn(shipped.url) for name, fn in TP1_CASES.items()}
    finally:
        shipped.stop()

    shm = Path(tempfile.mkdtemp(prefix="sglang_mmpre_server_", dir="/dev/shm"))
    try:
        before = sorted(os.listdir(shm))
        crashed = RealServer(ServerConfig("optimized", tp=2), served_model, tmp_path / "crash",
                             shm_dir=shm).start()
        stop = threading.Event()
        try:
            live = _load_until_segments_are_live(crashed, stop)
            crashed.kill()
        finally:
            stop.set()
        assert crashed.proc.returncode == -9
        assert live, "no file was live under load: the crash would prove nothing"
        assert segment_files(shm, with_regions=True), "the killed server left nothing to sweep"
        dead = set(os.listdir(shm))  # its region (and segments), and its lock file

        restarted = RealServer(ServerConfig("optimized", tp=1), served_model,
                               tmp_path / "restart", shm_dir=shm).start()
        try:
            # The new server owns a warm region from start-up; none of the dead one's stays.
            assert not dead & set(os.listdir(shm)), "the start-up sweep left files behind"
            for name, fn in TP1_CASES.items():
                assert fn(restarted.url) == want[name], name
            other = generate(restarted.url, gen_body(1, seed=77))
            assert other["logprobs"] != want["one_1120x700_image"]["logprobs"]
        finally:
            restarted.stop()
        assert sorted(os.listdir(shm)) == before
    finally:
        for name in segment_files(shm, with_locks=True, with_regions=True):
            os.unlink(shm / name)
        shm.rmdir()
