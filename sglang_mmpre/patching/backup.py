"""The backup directory ``<sglang root>/.sglang_mmpre_backup/``: the originals of the files
a scheme changed, and the manifest that tells sglang-mmpre's files from foreign ones.

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

``apply`` writes the backup (``new_manifest``, ``write_backup``) before it changes any file;
``apply``, ``check``, ``revert`` and ``status`` read it (``load_applied``); ``revert`` takes
the originals from it (``read_originals``) and removes it last. Nothing here writes into
sglang's own files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from sglang_mmpre.patching.sglang_root import REINSTALL_FIX, read_if_exists
from sglang_mmpre.patching.unified_diff import PatchError

if TYPE_CHECKING:
    from sglang_mmpre.patching.plan import FileChange

__all__ = [
    "BACKUP_DIRNAME",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "TOOL_NAME",
    "Applied",
    "load_applied",
    "new_manifest",
    "read_originals",
    "safe_rel",
    "sha256",
    "write_backup",
]

BACKUP_DIRNAME = ".sglang_mmpre_backup"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
TOOL_NAME = "sglang-mmpre"


def sha256(data: bytes) -> str:
    """The hex sha256 of ``data``, as the manifest records it."""
    return hashlib.sha256(data).hexdigest()


def safe_rel(rel: str, origin: str) -> str:
    """``rel`` if it is a relative path inside the sglang root and outside the backup
    directory; raises, naming ``origin`` (where the path came from), otherwise."""
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or any(p in ("..", ".") for p in parts):
        raise PatchError(f"{origin}: refusing unsafe path {rel!r}")
    if parts[0] == BACKUP_DIRNAME:
        raise PatchError(f"{origin}: refusing to touch sglang-mmpre's own {BACKUP_DIRNAME}/")
    return rel


@dataclass(frozen=True)
class Applied:
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


def load_applied(root: Path) -> Applied | None:
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
            rel = safe_rel(entry["path"], str(backup / MANIFEST_NAME))
            data = read_if_exists(root / rel)
            if data is None:
                states[rel] = "original" if entry["created"] else "missing"
            elif sha256(data) == entry["patched_sha256"]:
                states[rel] = "patched"
            elif sha256(data) == entry["original_sha256"]:
                states[rel] = "original"
            else:
                states[rel] = "modified"
        if not isinstance(manifest["scheme"], str) or not isinstance(
            manifest["created_dirs"], list
        ):
            raise ValueError("malformed manifest")
        for rel in manifest["created_dirs"]:
            safe_rel(rel, str(backup / MANIFEST_NAME))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PatchError(
            f"{backup} is not a backup this sglang-mmpre can read ({exc}). {fix}"
        ) from exc
    return Applied(manifest, states)


def _tool_version() -> str:
    from sglang_mmpre import __version__

    return __version__


def new_manifest(
    scheme: str,
    patch_file: str,
    patch_sha256: str,
    sglang_version: str,
    created_dirs: list[str],
    changes: list[FileChange],
) -> dict:
    """The manifest of applying ``scheme`` (from ``patch_file``, whose sha256 is
    ``patch_sha256``) to an sglang ``sglang_version`` tree: ``changes`` and the directories
    the apply creates, outermost first. Stamped with this tool's version and the time now."""
    return {
        "tool": TOOL_NAME,
        "format": MANIFEST_FORMAT,
        "tool_version": _tool_version(),
        "scheme": scheme,
        "patch_file": patch_file,
        "patch_sha256": patch_sha256,
        "sglang_version": sglang_version,
        "applied_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "created_dirs": created_dirs,
        "files": [
            {
                "path": change.rel,
                "created": change.original is None,
                "mode": change.mode,
                "original_sha256": None if change.original is None else sha256(change.original),
                "patched_sha256": sha256(change.patched),
            }
            for change in changes
        ],
    }


def write_backup(root: Path, manifest: dict, changes: list[FileChange]) -> None:
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


def read_originals(root: Path, entries: list[dict]) -> dict[str, bytes]:
    """The original bytes of every manifest entry in ``entries`` that the patch did not
    create, by path, each checked against its recorded sha256: all of them are read before
    ``revert`` writes anything. Raises, naming the fix, when one is missing or damaged."""
    backup = root / BACKUP_DIRNAME
    originals: dict[str, bytes] = {}
    for entry in entries:
        if entry["created"]:
            continue
        data = read_if_exists(backup / "files" / entry["path"])
        if data is None or sha256(data) != entry["original_sha256"]:
            raise PatchError(
                f"the backup of {entry['path']} in {backup} is missing or damaged; nothing was "
                f"changed. Fix: {REINSTALL_FIX}, then rm -r {backup}"
            )
        originals[entry["path"]] = data
    return originals
