"""Import-time set-up shared by the benchmark modules and the pytest conftest.

sglang 0.5.5 imports GPU-only modules (``sgl_kernel``, ``vllm``...) at module level, which
can't load on a CPU-only machine. The benchmarks reuse the *test-only* stand-in from
``tests/support/gpu_module_standin.py``: it answers those imports with inert placeholder
modules (calling one raises), so sglang's real ``scheduler``/``schedule_batch``/``io_struct``
modules import. None of the code paths benchmarked here calls into a placeholder.
``install()`` must run before anything imports sglang; it is idempotent.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SUPPORT_DIR = REPO_ROOT / "tests" / "support"


def install() -> None:
    for p in (str(REPO_ROOT), str(SUPPORT_DIR)):
        if p not in sys.path:
            sys.path.insert(0, p)
    import gpu_module_standin

    gpu_module_standin.install()
