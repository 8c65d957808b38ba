"""Apply, check, revert and inspect the sglang 0.5.5 source patches on an sglang package root.

The root is the directory holding ``srt/`` and ``version.py`` (``.../site-packages/sglang``;
finding and checking it: ``sglang_root``); a patch path ``python/sglang/X`` maps to
``<root>/X``. Three schemes exist (``SCHEMES``) and at most one is applied at a time.

``apply`` computes every file's new bytes in memory first (``plan``), saves the originals
and a manifest in ``<root>/.sglang_mmpre_backup/`` (``backup``), then replaces each file
atomically; ``revert`` puts the saved bytes back. The backup is what tells sglang-mmpre's
files from foreign ones: see Note [ownership marker] in ``backup``.

``apply`` and ``check`` refuse anything but sglang 0.5.5; ``revert`` and ``status`` work on
any version, since they only put back bytes whose hashes they can verify.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sglang_mmpre.patching.backup import (
    BACKUP_DIRNAME,
    load_applied,
    new_manifest,
    read_originals,
    sha256,
    write_backup,
)
from sglang_mmpre.patching.plan import FileChange, dirs_to_create, plan_changes
from sglang_mmpre.patching.sglang_root import (
    REINSTALL_FIX,
    SUPPORTED_VERSION,
    check_root,
    installed_version,
    locate_sglang,
    require_supported_version,
    sglang_version,
)
from sglang_mmpre.patching.unified_diff import ExitCode, PatchError, parse_patch

__all__ = [
    "BACKUP_DIRNAME",
    "DEFAULT_SCHEME",
    "SCHEMES",
    "SUPPORTED_VERSION",
    "Report",
    "apply",
    "check",
    "installed_version",
    "locate_sglang",
    "patch_path",
    "require_supported_version",
    "revert",
    "sglang_version",
    "status",
]

SCHEMES = {
    "optimized": "optimized_implementation.patch",
    "revert": "solution_1_revert.patch",
    "batch_broadcast": "improved_batch_broadcast.patch",
}
DEFAULT_SCHEME = "optimized"
# Where the patches sit in a source checkout: <repo>/patches, next to <repo>/sglang_mmpre.
_REPO_PATCHES_DIR = Path(__file__).resolve().parents[2] / "patches"


@dataclass(frozen=True)
class Report:
    """What an operation did. ``outcome`` is a short keyword tests and scripts can match
    (``applied``, ``already-applied``, ``would-apply``, ``reverted``, ``nothing-to-revert``,
    ``status``); ``message`` is for people; ``exit_code`` is what the CLI returns."""

    outcome: str
    message: str
    exit_code: int = ExitCode.OK


def patch_path(scheme: str, patches_dir: Path | None = None) -> Path:
    """The .patch file for ``scheme``: from ``patches_dir`` if given, else the copy shipped in
    the package (``sglang_mmpre/_patches``), else the source checkout's ``patches/``."""
    if scheme not in SCHEMES:
        raise PatchError(f"unknown scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    name = SCHEMES[scheme]
    if patches_dir is not None:
        candidates = [Path(patches_dir) / name]
    else:
        packaged = importlib.resources.files("sglang_mmpre").joinpath("_patches", name)
        candidates = [packaged] if isinstance(packaged, Path) else []
        candidates.append(_REPO_PATCHES_DIR / name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise PatchError(
        f"patch file {name} for scheme {scheme!r} not found (looked in: "
        f"{', '.join(str(c.parent) for c in candidates)}). Fix: reinstall sglang-mmpre, "
        "or run from a source checkout that has patches/."
    )


# ----------------------------------------------------------------------------- writing


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file in the same directory and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove_created(root: Path, rel: str) -> None:
    target = root / rel
    target.unlink(missing_ok=True)
    for cached in target.parent.glob(f"__pycache__/{target.stem}.*.pyc"):
        cached.unlink(missing_ok=True)


def _remove_dirs(root: Path, created_dirs: list[str]) -> list[str]:
    """Remove the directories apply created, innermost first; return those left (not empty)."""
    left = []
    for rel in reversed(created_dirs):
        for path in (root / rel / "__pycache__", root / rel):
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                left.append(rel)
                break
    return left


def _write_changes(root: Path, changes: list[FileChange], created_dirs: list[str]) -> None:
    """Write every change atomically; on failure put back what was written and drop the
    backup, so that the tree is as it was."""
    written: list[FileChange] = []
    where = root
    try:
        for rel in created_dirs:
            where = root / rel
            where.mkdir()
        for change in changes:
            where = root / change.rel
            _atomic_write(where, change.patched, change.mode)
            written.append(change)
    except OSError as exc:
        try:
            for change in reversed(written):
                if change.original is None:
                    _remove_created(root, change.rel)
                else:
                    _atomic_write(root / change.rel, change.original, change.mode)
            _remove_dirs(root, created_dirs)
        except OSError as undo_exc:
            raise PatchError(
                f"writing {where} failed ({exc}), and so did putting files back ({undo_exc}). "
                "Fix: sglang-mmpre patch revert --force restores the originals from "
                f"{root / BACKUP_DIRNAME}."
            ) from exc
        shutil.rmtree(root / BACKUP_DIRNAME, ignore_errors=True)
        raise PatchError(
            f"writing {where} failed ({exc}); every file was put back as it was. "
            f"Fix: make {root} writable (and its disk not full) for this user, then retry."
        ) from exc


# ----------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class _Prepared:
    root: Path
    version: str
    source: Path
    patch_sha256: str
    changes: tuple[FileChange, ...]
    already: str | None  # why there is nothing to do, when there is nothing to do
    stale: bool  # a stale backup is in the way and apply must discard it


def _prepare(root: Path, scheme: str, patches_dir: Path | None) -> _Prepared:
    """Everything apply and check share: gate, load, compare with the backup, plan."""
    root = check_root(root)
    version = require_supported_version(root)
    source = patch_path(scheme, patches_dir)
    raw = source.read_bytes()
    digest = sha256(raw)
    applied = load_applied(root)
    if applied is not None and not applied.stale:
        recorded = applied.manifest["scheme"]
        if recorded != scheme or applied.manifest["patch_sha256"] != digest:
            what = (
                f"scheme {recorded!r}"
                if recorded != scheme
                else f"another revision of {source.name}"
            )
            raise PatchError(
                f"{what} is applied to {root}; schemes exclude each other. "
                f"Fix: sglang-mmpre patch revert, then sglang-mmpre patch apply --scheme {scheme}.",
                ExitCode.OTHER_SCHEME,
            )
        if applied.foreign:
            raise PatchError(
                f"files changed since sglang-mmpre applied scheme {scheme!r} to {root}: "
                f"{', '.join(applied.foreign)}. Fix: sglang-mmpre patch revert --force puts the "
                "original files back (discarding those changes); then apply again.",
                ExitCode.FOREIGN_MODIFICATION,
            )
        if any(state != "patched" for state in applied.states.values()):
            raise PatchError(
                f"scheme {scheme!r} is only partly applied to {root} (an interrupted apply?). "
                "Fix: sglang-mmpre patch revert, then apply again."
            )
        already = f"scheme {scheme!r} is already applied to {root}; nothing to do"
        return _Prepared(root, version, source, digest, (), already, False)
    try:
        patches = parse_patch(raw.decode("utf-8", "surrogateescape"))
    except PatchError as exc:
        raise PatchError(f"{source}: {exc}", exc.exit_code) from exc
    changes = tuple(plan_changes(root, patches, source.name))
    already = None
    if not changes:
        already = (
            f"the changes of scheme {scheme!r} are already in {root}, but sglang-mmpre did not "
            "make them: there is no backup, so `sglang-mmpre patch revert` cannot undo them; "
            f"nothing to do ({REINSTALL_FIX} gives pristine files)"
        )
    return _Prepared(root, version, source, digest, changes, already, applied is not None)


def apply(root: Path, scheme: str = DEFAULT_SCHEME, *, patches_dir: Path | None = None) -> Report:
    """Apply ``scheme`` to the sglang tree at ``root``, all or nothing.

    Every hunk is checked in memory before anything is written; on a conflict nothing
    changes and the error lists every failing file and hunk. The originals and a manifest go
    to ``<root>/.sglang_mmpre_backup/`` first, then each file is replaced atomically with its
    mode kept. Applying the scheme that is already applied does nothing.
    """
    prepared = _prepare(root, scheme, patches_dir)
    if prepared.already is not None:
        return Report("already-applied", prepared.already)
    root, changes = prepared.root, list(prepared.changes)
    backup = root / BACKUP_DIRNAME
    if prepared.stale:  # see Note [ownership marker] in backup
        shutil.rmtree(backup)
    created_dirs = dirs_to_create(root, changes)
    manifest = new_manifest(
        scheme,
        patch_file=prepared.source.name,
        patch_sha256=prepared.patch_sha256,
        sglang_version=prepared.version,
        created_dirs=created_dirs,
        changes=changes,
    )
    try:
        write_backup(root, manifest, changes)
    except OSError as exc:
        raise PatchError(
            f"cannot write the backup into {root} ({exc}); nothing was changed. "
            f"Fix: run as a user that may write to {root}."
        ) from exc
    _write_changes(root, changes, created_dirs)
    created = sum(change.original is None for change in changes)
    return Report(
        "applied",
        f"applied scheme {scheme!r} ({prepared.source.name}) to {root}: "
        f"{len(changes) - created} file(s) changed, {created} created; originals saved in "
        f"{backup}. Undo with: sglang-mmpre patch revert",
    )


def check(root: Path, scheme: str = DEFAULT_SCHEME, *, patches_dir: Path | None = None) -> Report:
    """Dry run of ``apply``: exit 0 if it would apply, ALREADY_APPLIED if there is nothing
    to do; raises the same errors ``apply`` would (CONFLICT with every failing hunk)."""
    prepared = _prepare(root, scheme, patches_dir)
    if prepared.already is not None:
        return Report("already-applied", prepared.already, ExitCode.ALREADY_APPLIED)
    files = "\n".join(
        f"  {'create' if c.original is None else 'modify'} {c.rel}" for c in prepared.changes
    )
    stale = "\n(a stale backup would be discarded first)" if prepared.stale else ""
    return Report(
        "would-apply",
        f"scheme {scheme!r} ({prepared.source.name}) applies cleanly to {prepared.root}:\n"
        f"{files}{stale}",
    )


def revert(root: Path, *, force: bool = False) -> Report:
    """Put back, byte for byte, every file the applied scheme touched, delete the files it
    created, and remove the backup. Refuses (FOREIGN_MODIFICATION) when a file changed
    since apply, naming it, unless ``force``. Nothing applied: a no-op."""
    root = check_root(root)
    applied = load_applied(root)
    backup = root / BACKUP_DIRNAME
    if applied is None:
        return Report(
            "nothing-to-revert", f"nothing to revert: sglang-mmpre has not patched {root}"
        )
    scheme = applied.manifest["scheme"]
    if applied.stale:
        shutil.rmtree(backup)
        return Report(
            "nothing-to-revert",
            f"nothing to revert: the files of scheme {scheme!r} already match the originals "
            f"(sglang reinstalled?); removed the stale backup {backup}",
        )
    if applied.foreign and not force:
        raise PatchError(
            f"refusing to revert scheme {scheme!r}: changed since sglang-mmpre patched them: "
            f"{', '.join(applied.foreign)}. Fix: sglang-mmpre patch revert --force restores the "
            "originals anyway, discarding those changes.",
            ExitCode.FOREIGN_MODIFICATION,
        )
    entries = [e for e in applied.manifest["files"] if applied.states[e["path"]] != "original"]
    originals = read_originals(root, entries)  # the whole backup, before writing anything
    target = backup
    try:
        for entry in entries:
            target = root / entry["path"]
            if entry["created"]:
                _remove_created(root, entry["path"])
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write(target, originals[entry["path"]], entry["mode"])
        left = _remove_dirs(root, applied.manifest["created_dirs"])
        shutil.rmtree(backup)
    except OSError as exc:
        raise PatchError(
            f"reverting failed at {target} ({exc}); the backup {backup} is kept. "
            f"Fix: make {root} writable for this user, then run sglang-mmpre patch revert again."
        ) from exc
    note = f"; left non-empty director(ies) {', '.join(left)}" if left else ""
    return Report(
        "reverted",
        f"reverted scheme {scheme!r} in {root}: restored {len(originals)} file(s), removed "
        f"{len(entries) - len(originals)} created file(s){note}",
    )


def status(root: Path) -> Report:
    """Which scheme is applied to ``root`` (from the manifest), whether each file still holds
    what sglang-mmpre wrote, and the sglang version. Exit FOREIGN_MODIFICATION on drift."""
    root = check_root(root)
    try:
        version = sglang_version(root)
        support = (
            "supported"
            if version == SUPPORTED_VERSION
            else f"sglang-mmpre needs {SUPPORTED_VERSION}"
        )
    except PatchError as exc:
        version, support = "unknown", str(exc)
    lines = [f"sglang root: {root}", f"sglang version: {version} ({support})"]
    applied = load_applied(root)
    if applied is None:
        lines.append("applied scheme: none")
        return Report("status", "\n".join(lines))
    manifest = applied.manifest
    if applied.stale:
        lines.append(
            f"applied scheme: none (stale backup of scheme {manifest['scheme']!r}: the files "
            "match the originals again; the next apply or revert removes it)"
        )
        return Report("status", "\n".join(lines))
    lines.append(
        f"applied scheme: {manifest['scheme']} ({manifest['patch_file']}, applied "
        f"{manifest['applied_at']} by sglang-mmpre {manifest['tool_version']})"
    )
    lines += [f"  {state:<8} {rel}" for rel, state in applied.states.items()]
    if applied.foreign:
        lines.append(
            f"changed since apply: {', '.join(applied.foreign)}; "
            "sglang-mmpre patch revert --force restores the originals"
        )
        return Report("status", "\n".join(lines), ExitCode.FOREIGN_MODIFICATION)
    return Report("status", "\n".join(lines))
