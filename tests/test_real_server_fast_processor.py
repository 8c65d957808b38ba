"""The real sglang 0.5.5 server on CPU with its default fast (torchvision) image processor,
that is without ``--disable-fast-image-processor``, at TP=1.

As shipped, sglang passes ``device="cuda"`` to a fast image processor whatever the server's
device, so on a CPU server every image request fails. Patched, with
``SGLANG_MM_PREPROCESSING_DEVICE`` at ``auto``, the processor pool's worker runs the same
fast processor on the CPU and the server answers. What the worker computes is bitwise the
HF fast processor's output in process (``tests/test_preprocessing_device.py``); here the
check is that the whole server path carries it to the model.
"""

from __future__ import annotations

import pytest

from real_server import RealServer, ServerConfig, segment_files
from server_cases import gen_body, generate, post
from tiny_models import qwen2vl_expected_grid_thw

pytestmark = [pytest.mark.real_server, pytest.mark.timeout(900)]


def _server(scheme: str, served_model, tmp_path_factory, env: tuple = ()) -> RealServer:
    work = tmp_path_factory.mktemp(f"fast_{scheme}")
    config = ServerConfig(scheme, tp=1, env=env, fast_image_processor=True)
    return RealServer(config, served_model, work / "server").start()


def _text_body() -> dict:
    return gen_body(0, seed=0, text="Text only: " + "word " * 40)


def test_fast_image_processor_on_a_cpu_server_fails_as_shipped_and_is_served_patched(
    served_model, tmp_path_factory
):
    as_shipped = _server("as_shipped", served_model, tmp_path_factory)
    try:
        r = post(as_shipped.url, "/generate", gen_body(1, seed=1))
        shipped_image = (r.status_code, r.text)
        shipped_text = generate(as_shipped.url, _text_body())
    finally:
        as_shipped.stop()
    # sglang answers a bare 500; its log names the cause: the processor asked for cuda.
    assert shipped_image == (500, "Internal Server Error"), shipped_image
    assert "RuntimeError: Found no NVIDIA driver" in as_shipped.log_path.read_text(errors="replace")

    patched = _server("optimized", served_model, tmp_path_factory,
                      env=(("SGLANG_MM_PROCESSOR_WORKERS", "1"),))
    try:
        assert "mm_processor_0" in patched.processes().values()
        a = generate(patched.url, gen_body(1, seed=1))
        b = generate(patched.url, gen_body(1, seed=99))
        assert generate(patched.url, _text_body()) == shipped_text
    finally:
        patched.stop()
    assert segment_files(patched.shm_dir, with_locks=True, with_regions=True) == []
    # The image reaches the model: the same tokens (a random model), other logprobs.
    assert a["ids"] == b["ids"] and a["logprobs"] != b["logprobs"]
    t, h, w = qwen2vl_expected_grid_thw(1120, 700)
    assert a["prompt_tokens"] > t * h * w // 4  # the image's tokens are in the prompt
