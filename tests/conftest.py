"""Test session setup.

1. ``support/gpu_module_standin`` answers ``import sgl_kernel`` / ``import vllm`` with
   placeholder modules (they need libcuda, or a CPU with AMX). It exists only so that the
   tests can import sglang 0.5.5's *real* modules on a CPU-only machine; the code paths
   under test never call into them. It is never shipped in the package.
2. A copy of the installed sglang 0.5.5 is patched with ``patches/optimized_implementation.patch``
   through this project's own installer, and put first on ``sys.path``, so that every test
   (and every child process it spawns) runs the patched sglang. The installed sglang is
   never modified.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "support"))
sys.path.insert(0, str(HERE))

import gpu_module_standin  # noqa: E402

gpu_module_standin.install()


def _patched_sglang_site() -> Path:
    if "sglang" in sys.modules:
        raise RuntimeError("sglang was imported before the patched copy was put on sys.path")
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("sglang 0.5.5 is not installed; run the README's test command")
    installed = Path(list(spec.submodule_search_locations)[0])
    site = Path(tempfile.mkdtemp(prefix="sglang_mmpre_site_"))
    atexit.register(shutil.rmtree, site, ignore_errors=True)
    shutil.copytree(installed, site / "sglang", ignore=shutil.ignore_patterns("__pycache__"))
    from sglang_mmpre.patching import installer

    installer.apply(site / "sglang", "optimized")
    return site


PATCHED_SITE = _patched_sglang_site()
sys.path.insert(0, str(PATCHED_SITE))
# Child processes (spawned ranks, subprocess-run snippets) see the same sglang.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(PATCHED_SITE), str(HERE / "support"), str(HERE), str(REPO)]
    + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)


# In-process tests drive the TokenizerManager's own path; tests of the processor pool, and
# real servers (tests/support/real_server.py), set the pool size themselves.
os.environ["SGLANG_MM_PROCESSOR_WORKERS"] = "0"


@pytest.fixture
def shm_dir():
    """A private directory on the real tmpfs (/dev/shm when present), removed afterwards."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = Path(tempfile.mkdtemp(prefix="sglang_mmpre_test_", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def served_model(tmp_path_factory) -> Path:
    """A tiny Qwen2-VL with random weights that a real server loads (built once, ~10 s)."""
    from served_model import make_served_qwen2vl

    return make_served_qwen2vl(tmp_path_factory.getbasetemp() / "served_qwen2vl")


@pytest.fixture
def children():
    """``children(code, *args, wrapper=())`` starts a ``child_process.Child``; all are reaped
    (killed if still running) at the end of the test."""
    from child_process import Child

    made: list = []

    def spawn(code: str, *args: str, wrapper=()) -> Child:
        made.append(Child(code, *args, wrapper=wrapper))
        return made[-1]

    yield spawn
    for child in made:
        child.close()
