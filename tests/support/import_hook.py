"""Run a function on a module as soon as it is imported (test/benchmark-only, never shipped).

:func:`on_import` is how the test hooks (``loop_lag.py``, ``forward_cpu.py``) wrap a class
of sglang in every server process: ``server_boot/sitecustomize.py`` installs them before
sglang is imported, and each wraps its class when the module is first executed. If the
module is already imported, the function runs at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any, Callable

__all__ = ["on_import", "on_class_import"]


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then ``on_load`` on the fresh module."""

    def __init__(self, loader: importlib.abc.Loader, on_load: Callable[[Any], None]) -> None:
        self._loader = loader
        self._on_load = on_load

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        self._on_load(module)

    def __getattr__(self, name: str) -> Any:  # get_source (tracebacks), get_filename...
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, target: str, on_load: Callable[[Any], None]) -> None:
        self.target = target
        self.on_load = on_load

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.target:
            return None
        for finder in sys.meta_path:
            if isinstance(finder, _Finder) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader, self.on_load)
                return spec
        return None


def on_import(module_name: str, on_load: Callable[[Any], None]) -> None:
    """Call ``on_load(module)`` once ``module_name`` is imported (now, if it already is).

    One hook per module name; ``on_load`` must be idempotent and must not raise.
    """
    module = sys.modules.get(module_name)
    if module is not None:
        on_load(module)
    elif not any(isinstance(f, _Finder) and f.target == module_name for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder(module_name, on_load))


def on_class_import(module_name: str, class_name: str, patch: Callable[[Any], None]) -> None:
    """Call ``patch(cls)`` with the class ``class_name`` of ``module_name`` once that
    module is imported (now, if it already is); ``patch`` must be idempotent."""

    def on_load(module: Any) -> None:
        cls = getattr(module, class_name, None)
        if cls is not None:
            patch(cls)

    on_import(module_name, on_load)
