"""Test-only stand-in for GPU-only modules that sglang 0.5.5 imports at module level.

Why this exists: ``sgl_kernel`` loads libcuda when imported, and on a CPU without AMX
sglang's ``layernorm.py`` falls back to ``import vllm...``. Neither can load on a CPU-only
test machine, yet the tests must import sglang's *real* ``scheduler``, ``tokenizer_manager``
and ``schedule_batch`` modules. This finder answers ``import sgl_kernel...`` and
``import vllm...`` with placeholder modules whose attributes are inert callables.

The code paths this project touches (materialization, transport, request handling) never
call into them; a placeholder that *is* called raises, so a test can't silently pass through
one. This module is never shipped in the package.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

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


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
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
