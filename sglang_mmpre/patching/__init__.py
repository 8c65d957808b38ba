"""The ``sglang-mmpre patch`` tooling: apply, check, revert and inspect the patches in
``patches/`` on an installed sglang 0.5.5 (``installer``), with a strict unified-diff
applier underneath (``unified_diff``) and the command line in ``cli``. ``installer`` plans
each file's new bytes in memory (``plan``), keeps the originals and the manifest in the
backup directory (``backup``), and finds and checks the sglang tree (``sglang_root``)."""

from __future__ import annotations

from sglang_mmpre.patching.installer import (
    DEFAULT_SCHEME,
    SCHEMES,
    Report,
    apply,
    check,
    locate_sglang,
    patch_path,
    revert,
    status,
)
from sglang_mmpre.patching.unified_diff import ExitCode, PatchError

__all__ = [
    "DEFAULT_SCHEME",
    "SCHEMES",
    "ExitCode",
    "PatchError",
    "Report",
    "apply",
    "check",
    "locate_sglang",
    "patch_path",
    "revert",
    "status",
]
