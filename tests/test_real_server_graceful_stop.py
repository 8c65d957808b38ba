"""A patched TP=2 server stopped as an operator stops it, with our files in the default
``/dev/shm``: nothing of ours is left.

``kill <pid>`` of ``python -m sglang.launch_server`` (SIGTERM to the launcher only): sglang
0.5.5 drains and then SIGKILLs its own process tree, the processor workers included
(Note [pool shutdown] in ``tokenizer_side/pool.py``). Its drain counts a request only once
it was sent to the scheduler, so here it ends while both workers still fetch an image that
never arrives. The idle stop (every request answered) is the ``pool_default`` variant of
``test_real_server.py``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest
import requests

from real_server import RealServer, ServerConfig
from server_cases import gen_body, generate, image, post, stalling_image_url
from tiny_models import IMAGE_PLACEHOLDER

pytestmark = [pytest.mark.real_server, pytest.mark.timeout(900)]


def _stalled(url: str, image_url: str) -> object:
    body = dict(gen_body(0, seed=0), text="Stalled: " + IMAGE_PLACEHOLDER, image_data=image_url)
    try:
        return post(url, "/generate", body, timeout=300)
    except requests.RequestException as e:  # the server stopped under it
        return e


def test_sigterm_to_the_launcher_with_jobs_in_every_worker_leaves_no_file_in_dev_shm(
    served_model, tmp_path
):
    config = ServerConfig(
        "optimized", default_shm_dir=True,  # the pool at its default size
        # No per-request deadline while the stop runs: the workers stay busy until then.
        extra_args=("--mm-per-request-timeout", "600"),
    )
    server = RealServer(config, served_model, tmp_path / "server").start()
    try:
        workers = [pid for pid, role in server.processes().items()
                   if role.startswith("mm_processor_")]
        assert len(workers) >= 2, server.processes()
        bodies = [dict(gen_body(0, seed=0), text=f"Request {i}: " + IMAGE_PLACEHOLDER,
                       image_data=image(300 + i, 448, 448)) for i in range(12)]
        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(lambda body: generate(server.url, body), bodies))
        made = server.own_files(with_locks=True, with_regions=True)
        for pid in workers:  # its lock file and its region
            assert len([n for n in made if n.startswith(f"sglmmpre_{pid}_")]) >= 2, made

        with ExitStack() as stack, ThreadPoolExecutor(len(workers)) as pool:
            stalls = [stack.enter_context(stalling_image_url(trickle=True)) for _ in workers]
            answers = [pool.submit(_stalled, server.url, url) for url, _ in stalls]
            for _, hit in stalls:
                assert hit.wait(120), "a processor worker never fetched its image"
            # As `kill <pid>`: SIGTERM to the launcher only. stop() checks that sglang
            # drained ("Remaining number of requests 0") and then killed its tree.
            server.stop()
            for answer in answers:
                assert not isinstance(answer.result(60), requests.Response), \
                    "a stalled request was answered"
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()
    left = server.own_files(with_locks=True, with_regions=True)
    for name in left:  # its processes are gone: leave nothing behind, even on failure
        os.unlink(os.path.join(server.shm_dir, name))
    assert left == [], f"files of ours left in /dev/shm after a graceful stop: {left}"
