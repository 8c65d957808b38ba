"""What applying a patch makes of each file, computed in memory before anything is written.

A patch path ``python/sglang/X`` maps to ``<root>/X``. Every file's hunks are applied to its
current bytes: if they all fit, the file gets a ``FileChange``; if the reversed hunks fit
instead, the file already holds the changes; anything else is a conflict, and the plan
lists every hunk that fits neither way. Nothing here writes to the file system.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sglang_mmpre.patching.backup import safe_rel
from sglang_mmpre.patching.sglang_root import REINSTALL_FIX, read_if_exists
from sglang_mmpre.patching.unified_diff import (
    ApplyResult,
    ExitCode,
    FilePatch,
    PatchError,
    apply_file_patch,
)

__all__ = ["REPO_PREFIX", "FileChange", "dirs_to_create", "plan_changes", "target_rel"]

REPO_PREFIX = "python/sglang/"


@dataclass(frozen=True)
class FileChange:
    """One file's change: its path under the root, its bytes before (None: the patch
    creates the file) and after, and the mode it is written with."""

    rel: str
    original: bytes | None  # None: the patch creates the file
    patched: bytes
    mode: int


def target_rel(patch: FilePatch) -> str:
    """``a/python/sglang/srt/x.py`` -> ``srt/x.py``; refuses deletions and paths outside
    sglang."""
    if patch.is_deletion:
        raise PatchError(f"{patch.path}: the patch deletes a file, which sglang-mmpre never does")
    path = patch.path
    if path.startswith(("a/", "b/")):
        path = path[2:]
    if not path.startswith(REPO_PREFIX):
        raise PatchError(f"{patch.path}: not under {REPO_PREFIX}; sglang-mmpre patches sglang only")
    return safe_rel(path[len(REPO_PREFIX) :], patch.path)


def _apply_all(patches: list[FilePatch], text: str | None) -> ApplyResult:
    for patch in patches:
        result = apply_file_patch(patch, text)
        if not result.ok:
            return result
        text = result.text
    return ApplyResult(text)


def plan_changes(root: Path, patches: list[FilePatch], label: str) -> list[FileChange]:
    """New contents for every file, computed in memory. Empty when every file already holds
    the patch's changes; raises CONFLICT listing every hunk that fits neither way."""
    by_file: dict[str, list[FilePatch]] = {}
    for patch in patches:
        by_file.setdefault(target_rel(patch), []).append(patch)
    changes: list[FileChange] = []
    done: list[str] = []
    problems: list[str] = []
    for rel, file_patches in by_file.items():
        original = read_if_exists(root / rel)
        text = None if original is None else original.decode("utf-8", "surrogateescape")
        forward = _apply_all(file_patches, text)
        if forward.ok and forward.text is not None:
            if original is None:
                mode = (file_patches[0].new_mode or 0o644) & 0o777
            else:
                mode = stat.S_IMODE((root / rel).stat().st_mode)
            patched = forward.text.encode("utf-8", "surrogateescape")
            changes.append(FileChange(rel, original, patched, mode))
        elif _apply_all([p.reversed() for p in reversed(file_patches)], text).ok:
            done.append(rel)  # reverse detection: the changes are already there
        else:
            problems.extend(f"  {rel}: {failure}" for failure in forward.failures)
    if changes and done:
        problems.extend(f"  {rel}: already holds the patch's changes" for rel in done)
        problems.extend(f"  {change.rel}: does not hold them yet" for change in changes)
    if problems:
        raise PatchError(
            f"{label} does not apply to {root}; nothing was changed:\n"
            + "\n".join(problems)
            + f"\nFix: restore pristine sglang files ({REINSTALL_FIX}) and retry; if another "
            "scheme was applied by hand, undo it first.",
            ExitCode.CONFLICT,
        )
    return changes


def dirs_to_create(root: Path, changes: list[FileChange]) -> list[str]:
    """The directories that the files ``changes`` create need and that do not exist yet,
    each once, outermost first."""
    created_dirs: list[str] = []
    for change in changes:
        if change.original is None:
            created_dirs += [d for d in _missing_dirs(root, change.rel) if d not in created_dirs]
    return created_dirs


def _missing_dirs(root: Path, rel: str) -> list[str]:
    """Parent directories of ``rel`` that do not exist yet, outermost first."""
    missing = []
    for parent in reversed(PurePosixPath(rel).parents):
        if str(parent) != "." and not (root / parent).is_dir():
            missing.append(str(parent))
    return missing
