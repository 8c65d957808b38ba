"""Test-only stand-in for GPU-only modules that sglang 0.5.5 imports at module level.

Why this exists: ``sgl_kernel`` loads libcuda when imported, and on a CPU without AMX
sglang's ``layernorm.py`` falls back to ``import vllm...``. Neither can load on a CPU-only
test machine, yet the tests must import sglang's *real* ``scheduler``, ``tokenizer_manager``
and ``schedule_batch`` modules. This finder answers ``import sgl_kernel...`` and
``import vllm...`` with placeholder modules whose attributes are inert callables.

The code paths this project touches (materialization, transport, request handling) never
call into them; a placeholder that *is* called raises, so a test can't silently pass through
one. This module is never shipped in the package.

Four names are answered with real code, so that a whole sglang server computes on a CPU
without AMX (``tests/support/real_server.py`` loads this module in every server process
through ``sitecustomize``): ``layers/activation.py`` and ``layers/layernorm.py`` end with
``from vllm.model_executor.layers... import SiluAndMul, GeluAndMul, RMSNorm, GemmaRMSNorm``,
which would replace sglang's own classes. The stand-in hands back those very sglang classes
(already defined higher up in the module being imported); their ``forward_native`` computes
on CPU. ``vllm.logger.logger`` is a real ``logging.Logger`` (``suppress_other_loggers``
calls ``setLevel`` on it).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import types
from typing import Any, Callable

__all__ = ["install"]

_STUBBED_ROOTS = ("sgl_kernel", "vllm", "flashinfer", "torch_memory_saver", "decord")


class _Placeholder:
    """An attribute of a stand-in module: importable, never callable."""

    def __init__(self, qualname: str) -> None:
        self._qualname = qualname

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            f"{self._qualname} is a test stand-in for a GPU-only module and must not be called"
        )

    def __getattr__(self, name: str) -> "_Placeholder":
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self._qualname}.{name}")

    def __mro_entries__(self, bases):
        return (object,)


def _sglang_class(module: str, name: str) -> Callable[[], Any]:
    return lambda: getattr(sys.modules[module], name)


# (stand-in module, attribute) -> the real object it answers with.
_REAL_ATTRIBUTES: dict[tuple[str, str], Callable[[], Any]] = {
    ("vllm.model_executor.layers.activation", name): _sglang_class(
        "sglang.srt.layers.activation", name
    )
    for name in ("SiluAndMul", "GeluAndMul")
} | {
    ("vllm.model_executor.layers.layernorm", name): _sglang_class(
        "sglang.srt.layers.layernorm", name
    )
    for name in ("RMSNorm", "GemmaRMSNorm")
} | {("vllm.logger", "logger"): lambda: logging.getLogger("vllm")}


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        real = _REAL_ATTRIBUTES.get((self.__name__, name))
        if real is not None:
            return real()
        return _Placeholder(f"{self.__name__}.{name}")


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in _STUBBED_ROOTS:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0+standin"
        return module

    def exec_module(self, module):
        return None


def install() -> None:
    """Put the stand-in finder first on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, _StandInFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _StandInFinder())
