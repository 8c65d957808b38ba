"""Apply, check, revert and inspect the sglang 0.5.5 source patches on an sglang package root.

The root is the directory holding ``srt/`` and ``version.py`` (``.../site-packages/sglang``);
a patch path ``python/sglang/X`` maps to ``<root>/X``. Three schemes exist (``SCHEMES``) and
at most one is applied at a time.

# Note [ownership marker]
What sglang-mmpre wrote is told apart from everything else by the backup directory
``<root>/.sglang_mmpre_backup/``: ``manifest.json`` (scheme, tool version, sha256 of the
patch, and per file its path, mode, sha256 of the original and of the patched bytes, and
whether the patch created it) plus ``files/<path>``, the original bytes of every file the
patch changed. The directory is built under a temporary name and renamed into place, so
if it exists it is complete. A file whose bytes hash to the recorded patched sha256 is ours;
any other bytes are a foreign modification, which ``revert`` refuses to overwrite unless
forced. Files that hash to the original sha256 are simply not patched (an interrupted apply,
or a ``pip install --force-reinstall``); when *all* files are back to the originals the
backup is stale and is discarded rather than "reverted".

``apply`` and ``check`` refuse anything but sglang 0.5.5; ``revert`` and ``status`` work on
any version, since they only put back bytes whose hashes they can verify.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from sglang_mmpre.patching.unified_diff import (
    ApplyResult,
    ExitCode,
    FilePatch,
    PatchError,
    apply_file_patch,
    parse_patch,
)

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

SUPPORTED_VERSION = "0.5.5"
SCHEMES = {
    "optimized": "optimized_implementation.patch",
    "revert": "solution_1_revert.patch",
    "batch_broadcast": "improved_batch_broadcast.patch",
}
DEFAULT_SCHEME = "optimized"
BACKUP_DIRNAME = ".sglang_mmpre_backup"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
TOOL_NAME = "sglang-mmpre"
REPO_PREFIX = "python/sglang/"
REINSTALL_FIX = f"pip install --force-reinstall --no-deps sglang=={SUPPORTED_VERSION}"
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


# ----------------------------------------------------------------------------- locating


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


# ----------------------------------------------------------------------------- helpers


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _check_root(root: Path) -> Path:
    root = Path(root).resolve()
    if not (root / "srt").is_dir():
        raise PatchError(
            f"{root} is not an sglang package directory (no srt/ inside). Fix: pass "
            "--sglang-root the directory that holds srt/ and version.py, "
            "e.g. .../site-packages/sglang."
        )
    return root


def _safe_rel(rel: str, origin: str) -> str:
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or any(p in ("..", ".") for p in parts):
        raise PatchError(f"{origin}: refusing unsafe path {rel!r}")
    if parts[0] == BACKUP_DIRNAME:
        raise PatchError(f"{origin}: refusing to touch sglang-mmpre's own {BACKUP_DIRNAME}/")
    return rel


def _target_rel(patch: FilePatch) -> str:
    """``a/python/sglang/srt/x.py`` -> ``srt/x.py``."""
    if patch.is_deletion:
        raise PatchError(f"{patch.path}: the patch deletes a file, which sglang-mmpre never does")
    path = patch.path
    if path.startswith(("a/", "b/")):
        path = path[2:]
    if not path.startswith(REPO_PREFIX):
        raise PatchError(f"{patch.path}: not under {REPO_PREFIX}; sglang-mmpre patches sglang only")
    return _safe_rel(path[len(REPO_PREFIX) :], patch.path)


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


def _missing_dirs(root: Path, rel: str) -> list[str]:
    """Parent directories of ``rel`` that do not exist yet, outermost first."""
    missing = []
    for parent in reversed(PurePosixPath(rel).parents):
        if str(parent) != "." and not (root / parent).is_dir():
            missing.append(str(parent))
    return missing


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Change:
    rel: str
    original: bytes | None  # None: the patch creates the file
    patched: bytes
    mode: int


def _apply_all(patches: list[FilePatch], text: str | None) -> ApplyResult:
    for patch in patches:
        result = apply_file_patch(patch, text)
        if not result.ok:
            return result
        text = result.text
    return ApplyResult(text)


def _plan(root: Path, patches: list[FilePatch], label: str) -> list[_Change]:
    """New contents for every file, computed in memory. Empty when every file already holds
    the patch's changes; raises CONFLICT listing every hunk that fits neither way."""
    by_file: dict[str, list[FilePatch]] = {}
    for patch in patches:
        by_file.setdefault(_target_rel(patch), []).append(patch)
    changes: list[_Change] = []
    done: list[str] = []
    problems: list[str] = []
    for rel, file_patches in by_file.items():
        original = _read(root / rel)
        text = None if original is None else original.decode("utf-8", "surrogateescape")
        forward = _apply_all(file_patches, text)
        if forward.ok and forward.text is not None:
            if original is None:
                mode = (file_patches[0].new_mode or 0o644) & 0o777
            else:
                mode = stat.S_IMODE((root / rel).stat().st_mode)
            patched = forward.text.encode("utf-8", "surrogateescape")
            changes.append(_Change(rel, original, patched, mode))
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


# ----------------------------------------------------------------------------- the backup


@dataclass(frozen=True)
class _Applied:
    """A loaded manifest and the state of each file it lists: ``patched`` (ours),
    ``original`` (as before the patch), ``modified`` or ``missing`` (foreign)."""

    manifest: dict
    states: dict[str, str]

    @property
    def stale(self) -> bool:
        return all(state == "original" for state in self.states.values())

    @property
    def foreign(self) -> list[str]:
        return [rel for rel, state in self.states.items() if state in ("modified", "missing")]


def _load_applied(root: Path) -> _Applied | None:
    """Read and check ``<root>/.sglang_mmpre_backup``; None when there is none."""
    backup = root / BACKUP_DIRNAME
    if not backup.exists():
        return None
    fix = (
        f"Fix: look inside {backup}; if sglang's files are in doubt, {REINSTALL_FIX}; "
        f"then remove it (rm -r {backup})."
    )
    try:
        manifest = json.loads((backup / MANIFEST_NAME).read_text(encoding="utf-8"))
        if manifest["tool"] != TOOL_NAME or manifest["format"] != MANIFEST_FORMAT:
            raise ValueError(f"tool {manifest['tool']!r}, format {manifest['format']!r}")
        states = {}
        for entry in manifest["files"]:
            rel = _safe_rel(entry["path"], str(backup / MANIFEST_NAME))
            data = _read(root / rel)
            if data is None:
                states[rel] = "original" if entry["created"] else "missing"
            elif _sha256(data) == entry["patched_sha256"]:
                states[rel] = "patched"
            elif _sha256(data) == entry["original_sha256"]:
                states[rel] = "original"
            else:
                states[rel] = "modified"
        if not isinstance(manifest["scheme"], str) or not isinstance(
            manifest["created_dirs"], list
        ):
            raise ValueError("malformed manifest")
        for rel in manifest["created_dirs"]:
            _safe_rel(rel, str(backup / MANIFEST_NAME))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PatchError(
            f"{backup} is not a backup this sglang-mmpre can read ({exc}). {fix}"
        ) from exc
    return _Applied(manifest, states)


def _write_backup(root: Path, manifest: dict, changes: list[_Change]) -> None:
    """Save the originals and the manifest under a temporary name, then rename into place,
    so that the backup directory either is complete or does not exist."""
    staging = Path(tempfile.mkdtemp(prefix=f"{BACKUP_DIRNAME}.tmp-", dir=root))
    try:
        for change in changes:
            if change.original is not None:
                dest = staging / "files" / change.rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(change.original)
        text = json.dumps(manifest, indent=2) + "\n"
        (staging / MANIFEST_NAME).write_text(text, encoding="utf-8")
        os.replace(staging, root / BACKUP_DIRNAME)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
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


def _write_changes(root: Path, changes: list[_Change], created_dirs: list[str]) -> None:
    """Write every change atomically; on failure put back what was written and drop the
    backup, so that the tree is as it was."""
    written: list[_Change] = []
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
    changes: tuple[_Change, ...]
    already: str | None  # why there is nothing to do, when there is nothing to do
    stale: bool  # a stale backup is in the way and apply must discard it


def _prepare(root: Path, scheme: str, patches_dir: Path | None) -> _Prepared:
    """Everything apply and check share: gate, load, compare with the backup, plan."""
    root = _check_root(root)
    version = require_supported_version(root)
    source = patch_path(scheme, patches_dir)
    raw = source.read_bytes()
    digest = _sha256(raw)
    applied = _load_applied(root)
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
    changes = tuple(_plan(root, patches, source.name))
    already = None
    if not changes:
        already = (
            f"the changes of scheme {scheme!r} are already in {root}, but sglang-mmpre did not "
            "make them: there is no backup, so `sglang-mmpre patch revert` cannot undo them; "
            f"nothing to do ({REINSTALL_FIX} gives pristine files)"
        )
    return _Prepared(root, version, source, digest, changes, already, applied is not None)


def _tool_version() -> str:
    from sglang_mmpre import __version__

    return __version__


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
    if prepared.stale:  # see Note [ownership marker]
        shutil.rmtree(backup)
    created_dirs: list[str] = []
    for change in changes:
        if change.original is None:
            created_dirs += [d for d in _missing_dirs(root, change.rel) if d not in created_dirs]
    manifest = {
        "tool": TOOL_NAME,
        "format": MANIFEST_FORMAT,
        "tool_version": _tool_version(),
        "scheme": scheme,
        "patch_file": prepared.source.name,
        "patch_sha256": prepared.patch_sha256,
        "sglang_version": prepared.version,
        "applied_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "created_dirs": created_dirs,
        "files": [
            {
                "path": change.rel,
                "created": change.original is None,
                "mode": change.mode,
                "original_sha256": None if change.original is None else _sha256(change.original),
                "patched_sha256": _sha256(change.patched),
            }
            for change in changes
        ],
    }
    try:
        _write_backup(root, manifest, changes)
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
    root = _check_root(root)
    applied = _load_applied(root)
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
    originals: dict[str, bytes] = {}
    for entry in entries:  # verify the whole backup before writing anything
        if entry["created"]:
            continue
        data = _read(backup / "files" / entry["path"])
        if data is None or _sha256(data) != entry["original_sha256"]:
            raise PatchError(
                f"the backup of {entry['path']} in {backup} is missing or damaged; nothing was "
                f"changed. Fix: {REINSTALL_FIX}, then rm -r {backup}"
            )
        originals[entry["path"]] = data
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
    root = _check_root(root)
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
    applied = _load_applied(root)
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
