"""pytest set-up for ``benchmarks/``.

Installs the test-only GPU-module stand-in (``tests/support/gpu_module_standin.py``, put on
``sys.path`` by ``benchmarks._standin``) before any benchmark module imports sglang 0.5.5,
whose modules import ``sgl_kernel``/``vllm`` at import time.
"""

from benchmarks import _standin

_standin.install()
