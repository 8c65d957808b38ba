"""Loaded by every process of a test-started sglang server (test-only, never shipped).

``tests/support/real_server.py`` puts this directory on the server's ``PYTHONPATH``, so
Python imports this module at start-up in the launcher and in every process sglang spawns
(tokenizer, scheduler ranks, detokenizer). It installs the GPU-module stand-in and, when
``SGLANG_MMPRE_TEST_COLLECTIVE_LOG`` names a directory, the collective counter
(``collective_counter.py``); when ``SGLANG_MMPRE_TEST_FORGE_PREFIX`` is set, the forge hook
(``forge_hook.py``); when ``SGLANG_MMPRE_TEST_LOOP_LAG_LOG`` names a directory, the
TokenizerManager's event-loop lag sampler (``loop_lag.py``); when
``SGLANG_MMPRE_TEST_FORWARD_CPU_LOG`` names a directory, the CPU time inside each rank's
``ModelRunner.forward`` (``forward_cpu.py``).
"""

import os
import sys

_SUPPORT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _SUPPORT not in sys.path:
    sys.path.append(_SUPPORT)

import gpu_module_standin  # noqa: E402

gpu_module_standin.install()

if os.environ.get("SGLANG_MMPRE_TEST_COLLECTIVE_LOG"):
    import collective_counter  # noqa: E402

    collective_counter.install(os.environ["SGLANG_MMPRE_TEST_COLLECTIVE_LOG"])

if os.environ.get("SGLANG_MMPRE_TEST_FORGE_PREFIX"):
    import forge_hook  # noqa: E402

    forge_hook.install(os.environ["SGLANG_MMPRE_TEST_FORGE_PREFIX"])

if os.environ.get("SGLANG_MMPRE_TEST_LOOP_LAG_LOG"):
    import loop_lag  # noqa: E402

    loop_lag.install(os.environ["SGLANG_MMPRE_TEST_LOOP_LAG_LOG"])

if os.environ.get("SGLANG_MMPRE_TEST_FORWARD_CPU_LOG"):
    import forward_cpu  # noqa: E402

    forward_cpu.install(os.environ["SGLANG_MMPRE_TEST_FORWARD_CPU_LOG"])
