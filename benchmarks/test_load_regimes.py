"""The main job's workloads and measurements, without a server: which images each regime
sends, that runs never share images unless asked to, and the forward-CPU hook's arithmetic.
(A check of the harness, not of timings: nothing here asserts a speed.)"""

from __future__ import annotations

import importlib
import os
import sys
import types

from benchmarks import _standin

_standin.install()

import forward_cpu  # noqa: E402
from benchmarks.chat_load import (  # noqa: E402
    MULTI_TURN_TURNS,
    NEW_IMAGE_EVERY,
    REPEATED_K,
    conversations,
)
from benchmarks.server_comparison import (  # noqa: E402
    parse_args,
    processor_cache_counts,
    run_seeds,
)
from import_hook import on_import  # noqa: E402


def _images(convs) -> list[int]:
    return [s for c in convs for seeds, _ in c.turns for s in seeds]


def test_unique_sends_a_new_image_with_every_request():
    convs = conversations("unique", 32, seed=3, input_len=32)
    assert len(convs) == 32 and all(len(c.turns) == 1 for c in convs)
    assert len(set(_images(convs))) == 32


def test_repeated_resends_a_fixed_set_of_k_images():
    convs = conversations("repeated", 32, seed=3, input_len=32)
    images = _images(convs)
    assert len(images) == 32 and len(set(images)) == REPEATED_K


def test_multi_turn_adds_an_image_every_other_turn():
    convs = conversations("multi_turn", 64, seed=3, input_len=32)
    assert len(convs) == 64 // MULTI_TURN_TURNS
    for c in convs:
        assert len(c.turns) == MULTI_TURN_TURNS
        # a new image on turns 0, 2, ...; turn t re-sends every earlier turn's images
        assert [len(seeds) for seeds, _ in c.turns] == [
            int(t % NEW_IMAGE_EVERY == 0) for t in range(MULTI_TURN_TURNS)]
    images = _images(convs)
    assert len(images) == len(set(images))  # no two conversations share an image


def test_every_run_of_a_job_has_images_of_its_own_and_every_scheme_the_same():
    args = parse_args(["--rounds", "3", "--concurrency", "4,16",
                       "--models", "tiny:unique+repeated,gpu_proxy"])
    seeds = run_seeds(args)
    # a seed per round and cell (no scheme in the key: every scheme gets the same images)
    assert len(seeds) == 3 * (2 + 3) * 2
    assert 0 not in seeds.values()  # the warm-up's
    images = [set(_images(conversations("multi_turn", 64, s, 32))) for s in seeds.values()]
    assert all(a.isdisjoint(b) for i, a in enumerate(images) for b in images[i + 1:])
    assert set(run_seeds(parse_args(["--same-images"])).values()) == {1}


def test_forward_cpu_counts_only_the_calls_inside_the_window(tmp_path, monkeypatch):
    clock = types.SimpleNamespace(cpu=0.0, wall=1000.0)
    monkeypatch.setattr(forward_cpu, "time", types.SimpleNamespace(
        process_time=lambda: clock.cpu, time=lambda: clock.wall))

    class Runner:
        def forward(self, cpu_s: float) -> str:
            clock.cpu += cpu_s
            clock.wall += 1.0
            return "out"

    forward_cpu._patch(Runner, str(tmp_path))
    forward_cpu._patch(Runner, str(tmp_path))  # idempotent: one wrapper
    runner = Runner()
    assert runner.forward(0.5) == "out"  # ends at wall 1001, before the window
    clock.cpu += 7.0  # CPU outside forward is not counted
    for cpu_s in (0.1, 0.2, 0.3):  # end at 1002, 1003, 1004: inside
        runner.forward(cpu_s)
    runner.forward(0.9)  # ends at 1005, after it
    got = forward_cpu.forward_cpu_between(tmp_path, 1001.5, 1004.5)
    assert list(got) == [os.getpid()]
    assert abs(got[os.getpid()] - 0.6) < 1e-6


def test_on_import_wraps_a_module_when_it_is_first_imported(tmp_path, monkeypatch):
    (tmp_path / "mmpre_hook_target.py").write_text("class Runner:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    on_import("mmpre_hook_target", lambda m: seen.append(m.Runner))
    try:
        module = importlib.import_module("mmpre_hook_target")
        assert seen == [module.Runner]
    finally:
        sys.modules.pop("mmpre_hook_target", None)
        sys.meta_path[:] = [f for f in sys.meta_path
                            if getattr(f, "target", None) != "mmpre_hook_target"]


def test_processor_cache_counts_are_per_worker_deltas_of_the_workers_log_lines(tmp_path):
    """The rows' cache counts: each worker's cumulative line (``ProcessorCache.log`` in
    the workers' log format), the last one after the run minus the last one before it."""
    import logging

    from sglang_mmpre.tokenizer_side.pool_worker import LOG_FORMAT
    from sglang_mmpre.tokenizer_side.processor_cache import ProcessorCache

    log = tmp_path / "server.log"
    handler = logging.FileHandler(log)
    handler.setFormatter(logging.Formatter(LOG_FORMAT.format(index=0)))
    pid = {"now": 0}

    def as_worker(record):  # two workers' lines in one file, as in the server log
        record.process = pid["now"]
        return True

    handler.addFilter(as_worker)
    cache_logger = logging.getLogger("sglang_mmpre.tokenizer_side.processor_cache")
    cache_logger.addHandler(handler)
    cache_logger.setLevel(logging.INFO)
    caches = {101: ProcessorCache(1 << 20, b"fingerprint"),
              102: ProcessorCache(1 << 20, b"fingerprint")}

    def line(worker, hits, misses):
        pid["now"] = worker
        caches[worker].stats.hits, caches[worker].stats.misses = hits, misses
        caches[worker].log()

    try:
        line(101, 3, 2)
        line(102, 1, 1)
        start = log.stat().st_size
        line(101, 7, 3)
        line(102, 5, 2)
        line(101, 9, 3)
    finally:
        cache_logger.removeHandler(handler)
        handler.close()
    assert processor_cache_counts(log, start) == {"hits": 10, "misses": 2, "evictions": 0,
                                                  "bypasses": 0}
