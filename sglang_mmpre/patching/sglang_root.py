"""The sglang package directory the patches edit: finding it, checking that it is one, its
version (only sglang 0.5.5 may be patched), and reading its files.

The root is the directory holding ``srt/`` and ``version.py`` (``.../site-packages/sglang``).
Nothing here imports sglang.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path

from sglang_mmpre.patching.unified_diff import ExitCode, PatchError

__all__ = [
    "REINSTALL_FIX",
    "SUPPORTED_VERSION",
    "check_root",
    "installed_version",
    "locate_sglang",
    "read_if_exists",
    "require_supported_version",
    "sglang_version",
]

SUPPORTED_VERSION = "0.5.5"
REINSTALL_FIX = f"pip install --force-reinstall --no-deps sglang=={SUPPORTED_VERSION}"


def locate_sglang() -> Path:
    """The installed sglang package directory, found without importing sglang."""
    spec = importlib.util.find_spec("sglang")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / "srt").is_dir():
            return Path(location).resolve()
    raise PatchError(
        "sglang is not installed in this Python environment. "
        f"Fix: pip install sglang=={SUPPORTED_VERSION}, or pass --sglang-root DIR "
        "(the sglang package directory that contains srt/)."
    )


def installed_version() -> str:
    """The version of the installed sglang distribution, from its metadata."""
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError as exc:
        raise PatchError(
            f"sglang is not installed. Fix: pip install sglang=={SUPPORTED_VERSION}"
        ) from exc


def sglang_version(root: Path) -> str:
    """The sglang version of the tree at ``root``, read (not imported) from its version.py."""
    version_file = Path(root) / "version.py"
    try:
        text = version_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise PatchError(
            f"cannot read {version_file} ({exc.strerror}). Fix: point --sglang-root at the "
            "sglang package directory, the one holding srt/ and version.py."
        ) from exc
    match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.MULTILINE)
    if match is None:
        raise PatchError(f"{version_file} defines no __version__ string")
    return match[1]


def require_supported_version(root: Path, version: str | None = None) -> str:
    """Return ``version`` (default: read from ``root``'s version.py); raise WRONG_VERSION,
    naming the fix, unless it is 0.5.5."""
    if version is None:
        version = sglang_version(root)
    if version != SUPPORTED_VERSION:
        raise PatchError(
            f"sglang-mmpre patches sglang {SUPPORTED_VERSION} only, but {root} holds sglang "
            f"{version}. Fix: pip install sglang=={SUPPORTED_VERSION} (or pass --sglang-root "
            f"pointing at an sglang {SUPPORTED_VERSION} package directory).",
            ExitCode.WRONG_VERSION,
        )
    return version


def check_root(root: Path) -> Path:
    """``root`` resolved; raises, naming the fix, unless it holds ``srt/``."""
    root = Path(root).resolve()
    if not (root / "srt").is_dir():
        raise PatchError(
            f"{root} is not an sglang package directory (no srt/ inside). Fix: pass "
            "--sglang-root the directory that holds srt/ and version.py, "
            "e.g. .../site-packages/sglang."
        )
    return root


def read_if_exists(path: Path) -> bytes | None:
    """The bytes of ``path``; None when there is no such file."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
