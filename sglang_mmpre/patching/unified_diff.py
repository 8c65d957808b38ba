"""Parse unified diffs and apply them strictly (no fuzz), forwards or in reverse.

Reads what ``git diff`` and ``diff -u`` write: optional ``diff --git`` / ``index`` /
``new file mode`` headers, then ``--- old`` / ``+++ new`` and ``@@ -l,s +l,s @@`` hunks.
Paths are kept as written (``a/python/sglang/...``); mapping them onto a directory is the
caller's business (see ``plan``).

Applying is all-or-nothing per file and exact, like ``patch --fuzz=0``: a hunk's context
and removed lines must match the file byte for byte (line endings included), first at the
line the hunk states (shifted by the drift of the hunks before it), otherwise at exactly one
other place after the previous hunk. No match, or more than one, is a failure that names
the hunk. Nothing here touches the file system.

This module also defines the one error class of the patch tooling, ``PatchError``, and its
exit codes, so that the parser, the installer and the CLI share them.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, replace
from enum import IntEnum

from sglang_mmpre.errors import MmpreError

__all__ = [
    "ApplyResult",
    "ExitCode",
    "FilePatch",
    "Hunk",
    "HunkFailure",
    "PatchError",
    "apply_file_patch",
    "is_applied",
    "parse_patch",
]


class ExitCode(IntEnum):
    """Process exit codes of ``sglang-mmpre patch``. 2 stays argparse's usage error."""

    OK = 0  # done, or nothing to do
    ERROR = 1  # anything else: unreadable patch, missing patch file, damaged backup, I/O
    WRONG_VERSION = 3  # the target is not sglang 0.5.5
    CONFLICT = 4  # the patch does not apply to the files as they are
    FOREIGN_MODIFICATION = 5  # files changed by someone else since sglang-mmpre patched them
    OTHER_SCHEME = 6  # a different scheme (or patch revision) is applied
    ALREADY_APPLIED = 7  # ``check`` only: the scheme's changes are already in place


class PatchError(MmpreError):
    """Any refusal or failure of the patch tooling; ``exit_code`` says which kind.

    The message is meant for the user and names the fix where there is one.
    """

    def __init__(self, message: str, exit_code: int = ExitCode.ERROR) -> None:
        super().__init__(message)
        self.exit_code = int(exit_code)


@dataclass(frozen=True)
class Hunk:
    """One ``@@`` block. ``lines`` holds ``(op, text)`` with op in ``" -+"``; text keeps its
    line ending, and lacks it where the diff said ``\\ No newline at end of file``."""

    old_start: int
    old_count: int
    new_start: int
    new_count: int
    lines: tuple[tuple[str, str], ...]

    @property
    def header(self) -> str:
        return f"@@ -{self.old_start},{self.old_count} +{self.new_start},{self.new_count} @@"

    @property
    def old_lines(self) -> list[str]:
        return [text for op, text in self.lines if op != "+"]

    @property
    def new_lines(self) -> list[str]:
        return [text for op, text in self.lines if op != "-"]

    def reversed(self) -> Hunk:
        """The hunk that undoes this one."""
        swap = {"+": "-", "-": "+", " ": " "}
        return Hunk(
            self.new_start,
            self.new_count,
            self.old_start,
            self.old_count,
            tuple((swap[op], text) for op, text in self.lines),
        )


@dataclass(frozen=True)
class FilePatch:
    """The hunks for one file. ``old_path is None``: the patch creates the file
    (``--- /dev/null``); ``new_path is None``: it deletes it."""

    old_path: str | None
    new_path: str | None
    hunks: tuple[Hunk, ...]
    new_mode: int | None = None  # from a git ``new file mode`` line

    @property
    def is_creation(self) -> bool:
        return self.old_path is None

    @property
    def is_deletion(self) -> bool:
        return self.new_path is None

    @property
    def path(self) -> str:
        """The path the patch is about: the new one, or the old one for a deletion."""
        path = self.new_path if self.new_path is not None else self.old_path
        if path is None:
            raise PatchError("a file patch with /dev/null on both sides names no file")
        return path

    def reversed(self) -> FilePatch:
        """The file patch that undoes this one (its hunks stay in file order)."""
        return replace(
            self,
            old_path=self.new_path,
            new_path=self.old_path,
            hunks=tuple(hunk.reversed() for hunk in self.hunks),
        )


@dataclass(frozen=True)
class HunkFailure:
    """Why hunk number ``index`` (1-based; 0 for the file as a whole) did not apply."""

    index: int
    header: str
    reason: str

    def __str__(self) -> str:
        if self.index == 0:
            return self.reason
        return f"hunk #{self.index} {self.header}: {self.reason}"


@dataclass(frozen=True)
class ApplyResult:
    """``text`` is the patched content (None when the patch deletes the file or failed)."""

    text: str | None
    failures: tuple[HunkFailure, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.failures


_HUNK_HEADER = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_UNSUPPORTED = ("GIT binary patch", "Binary files ", "rename from ", "copy from ")


def _split_lines(text: str) -> list[str]:
    """Split on ``\\n`` only (not ``str.splitlines``' \\r, \\x0c, ...), keeping the endings."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _parse_path(raw: str) -> str | None:
    raw = raw.rstrip("\r\n").split("\t", 1)[0]
    if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:  # git C-style quoting
        try:
            raw = ast.literal_eval("b" + raw).decode("utf-8")
        except (ValueError, SyntaxError, UnicodeDecodeError) as exc:
            raise PatchError(f"cannot read quoted path {raw}: {exc}") from exc
    return None if raw == "/dev/null" else raw


def _drop_final_newline(body: list[tuple[str, str]], lineno: int) -> None:
    if not body:
        raise PatchError(f"line {lineno}: '\\ No newline at end of file' follows no line")
    op, text = body[-1]
    body[-1] = (op, text[:-1] if text.endswith("\n") else text)


def _parse_hunk(lines: list[str], i: int) -> tuple[Hunk, int]:
    match = _HUNK_HEADER.match(lines[i])
    if match is None:
        raise PatchError(f"line {i + 1}: malformed hunk header {lines[i].rstrip()!r}")
    old_start, new_start = int(match[1]), int(match[3])
    old_count = int(match[2]) if match[2] is not None else 1
    new_count = int(match[4]) if match[4] is not None else 1
    old_left, new_left = old_count, new_count
    body: list[tuple[str, str]] = []
    i += 1
    while old_left > 0 or new_left > 0:
        if i >= len(lines):
            raise PatchError(f"hunk @@ -{old_start} +{new_start} @@ ends early (truncated diff?)")
        raw = lines[i]
        if raw.startswith("\\"):
            _drop_final_newline(body, i + 1)
            i += 1
            continue
        # An empty line is a context line whose leading space an editor stripped.
        op, text = (" ", raw) if raw in ("\n", "\r\n") else (raw[:1], raw[1:])
        if op not in " -+":
            raise PatchError(f"line {i + 1}: unexpected line inside a hunk: {raw.rstrip()!r}")
        if op != "+":
            old_left -= 1  # context or removed: a line of the old file
        if op != "-":
            new_left -= 1  # context or added: a line of the new file
        if old_left < 0 or new_left < 0:
            raise PatchError(f"line {i + 1}: hunk is longer than its header says")
        body.append((op, text))
        i += 1
    while i < len(lines) and lines[i].startswith("\\"):
        _drop_final_newline(body, i + 1)
        i += 1
    return Hunk(old_start, old_count, new_start, new_count, tuple(body)), i


def parse_patch(text: str) -> list[FilePatch]:
    """Parse a unified diff into one ``FilePatch`` per ``---``/``+++`` pair, in order.

    Raises ``PatchError`` for malformed hunks, binary patches, renames and copies, and for
    text that holds no file patch at all.
    """
    lines = _split_lines(text)
    patches: list[FilePatch] = []
    new_mode: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("diff "):
            new_mode = None
        elif line.startswith("new file mode "):
            new_mode = int(line.split()[-1], 8) & 0o7777
        elif line.startswith(_UNSUPPORTED):
            raise PatchError(f"line {i + 1}: unsupported patch content: {line.rstrip()!r}")
        elif line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            old_path, new_path = _parse_path(line[4:]), _parse_path(lines[i + 1][4:])
            i += 2
            hunks: list[Hunk] = []
            while i < len(lines) and lines[i].startswith("@@"):
                hunk, i = _parse_hunk(lines, i)
                hunks.append(hunk)
            if not hunks:
                raise PatchError(f"no hunks for {new_path or old_path}")
            patches.append(FilePatch(old_path, new_path, tuple(hunks), new_mode))
            new_mode = None
            continue
        i += 1
    if not patches:
        raise PatchError("no '--- / +++' file patches found: not a unified diff")
    return patches


def _matches(lines: list[str], block: list[str], pos: int) -> bool:
    return lines[pos : pos + len(block)] == block


def _locate(lines: list[str], block: list[str], stated: int, lo: int) -> tuple[int | None, str]:
    """Where ``block`` sits: at ``stated`` if it matches there, else at its only match at or
    after ``lo``. Returns ``(None, reason)`` when there is none or more than one."""
    if not block:  # pure insertion (diff -U0): only the stated point means anything
        if lo <= stated <= len(lines):
            return stated, ""
        return None, f"insertion point line {stated} is out of range"
    if stated >= lo and _matches(lines, block, stated):
        return stated, ""
    found = [
        pos
        for pos in range(lo, len(lines) - len(block) + 1)
        if lines[pos] == block[0] and _matches(lines, block, pos)
    ]
    if len(found) == 1:
        return found[0], ""
    if not found:
        return None, "context and removed lines not found"
    where = ", ".join(str(pos + 1) for pos in found[:5])
    return None, f"ambiguous: the lines match at {len(found)} places (lines {where})"


def apply_file_patch(patch: FilePatch, original: str | None) -> ApplyResult:
    """Apply ``patch`` to ``original`` (None: the file does not exist).

    Every hunk is tried, so a failed result lists every hunk that does not apply.
    """
    if patch.is_creation and original is not None:
        return ApplyResult(None, (HunkFailure(0, "", "the file to be created already exists"),))
    if not patch.is_creation and original is None:
        return ApplyResult(None, (HunkFailure(0, "", "the file to be patched does not exist"),))
    lines = _split_lines(original or "")
    out: list[str] = []
    failures: list[HunkFailure] = []
    cursor = drift = 0
    for index, hunk in enumerate(patch.hunks, start=1):
        # "-5,0" inserts after line 5; "-5,3" replaces from line 5 on (1-based).
        stated = hunk.old_start if hunk.old_count == 0 else hunk.old_start - 1
        block = hunk.old_lines
        pos, reason = _locate(lines, block, stated + drift, cursor)
        if pos is None:
            failures.append(HunkFailure(index, hunk.header, reason))
            continue
        out.extend(lines[cursor:pos])
        out.extend(hunk.new_lines)
        cursor = pos + len(block)
        drift = pos - stated
    if failures:
        return ApplyResult(None, tuple(failures))
    out.extend(lines[cursor:])
    if patch.is_deletion:
        if out:
            return ApplyResult(None, (HunkFailure(0, "", "file is not empty after deletion"),))
        return ApplyResult(None)
    return ApplyResult("".join(out))


def is_applied(patch: FilePatch, current: str | None) -> bool:
    """True when ``current`` already holds the patch's result: the reversed patch applies."""
    return apply_file_patch(patch.reversed(), current).ok
