"""The patch tooling on copies of real sglang 0.5.5 files in tmp dirs (never the installed sglang).

Each test builds a root like ``site-packages/sglang`` holding a few real files, writes small
real unified diffs (``difflib`` or ``git diff``) as the scheme patches, and drives
``installer`` / ``cli`` against it.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_mmpre.patching import cli, installer
from sglang_mmpre.patching.installer import BACKUP_DIRNAME
from sglang_mmpre.patching.unified_diff import (
    ExitCode,
    PatchError,
    apply_file_patch,
    is_applied,
    parse_patch,
)

REPO = Path(__file__).resolve().parents[1]
SCHED = "srt/managers/scheduler.py"
IO = "srt/managers/io_struct.py"
TM = "srt/managers/tokenizer_manager.py"
COPIED = (SCHED, IO, TM, "version.py")


def pristine(rel: str) -> Path:
    """The installed sglang 0.5.5 file (via its dist-info, not sys.path, which conftest
    points at a patched copy)."""
    return Path(importlib.metadata.distribution("sglang").locate_file(f"sglang/{rel}"))


def insert_after(text: str, anchor: str, added: str) -> str:
    """``text`` with ``added`` lines inserted after the one line that starts with ``anchor``."""
    lines = text.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if line.startswith(anchor)]
    if len(hits) != 1:
        raise ValueError(f"anchor {anchor!r} found {len(hits)} times")
    lines.insert(hits[0] + 1, added)
    return "".join(lines)


def udiff(rel: str, old: str | None, new: str, context: int = 3) -> str:
    """A ``git diff``-style unified diff of one file (``old=None``: the file is created)."""
    before = [] if old is None else old.splitlines(keepends=True)
    fromfile = "/dev/null" if old is None else f"a/python/sglang/{rel}"
    return "".join(
        difflib.unified_diff(
            before, new.splitlines(keepends=True), fromfile, f"b/python/sglang/{rel}", n=context
        )
    )


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` with its bytes and mode."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def text_of(root: Path, rel: str) -> str:
    return (root / rel).read_text(encoding="utf-8")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A fake ``site-packages/sglang`` with four real sglang 0.5.5 files."""
    root = tmp_path / "site" / "sglang"
    for rel in COPIED:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(pristine(rel), root / rel)
    return root


# Edits used by the scheme patches below.
SCHED_TOP = ("class Scheduler(", "    # sglang_mmpre: scheduler side hook\n")
SCHED_LOW = ("    def handle_generate_request(", "        # sglang_mmpre: resolve descriptors\n")
IO_EDIT = ("class TokenizedGenerateReqInput(BaseReq):", "    # sglang_mmpre: carrier field\n")
TM_EDIT = ("class TokenizerManager(", "    # sglang_mmpre: materialize here\n")
SCHED_BB = ("    def event_loop_normal(self):", "        # batch broadcast variant\n")


def edited(rel: str, *edits: tuple[str, str]) -> str:
    text = pristine(rel).read_text(encoding="utf-8")
    for anchor, added in edits:
        text = insert_after(text, anchor, added)
    return text


def original(rel: str) -> str:
    return pristine(rel).read_text(encoding="utf-8")


@pytest.fixture
def patches(tmp_path: Path) -> Path:
    """A patches dir with all three schemes: optimized touches scheduler (two hunks) and
    io_struct; revert touches tokenizer_manager; batch_broadcast touches scheduler."""
    d = tmp_path / "patches"
    d.mkdir()
    optimized = udiff(SCHED, original(SCHED), edited(SCHED, SCHED_TOP, SCHED_LOW)) + udiff(
        IO, original(IO), edited(IO, IO_EDIT)
    )
    (d / "optimized_implementation.patch").write_text(optimized, encoding="utf-8")
    (d / "solution_1_revert.patch").write_text(
        udiff(TM, original(TM), edited(TM, TM_EDIT)), encoding="utf-8"
    )
    (d / "improved_batch_broadcast.patch").write_text(
        udiff(SCHED, original(SCHED), edited(SCHED, SCHED_BB)), encoding="utf-8"
    )
    return d


# ----------------------------------------------------------------------------- unified_diff


def test_git_diff_parses_and_reproduces_the_edited_files(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    (repo / "python/sglang/srt/managers").mkdir(parents=True)
    shutil.copy2(pristine(IO), repo / "python/sglang" / IO)
    git = ["git", "-C", str(repo), "-c", "core.autocrlf=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    new_io = edited(IO, IO_EDIT)
    (repo / "python/sglang" / IO).write_text(new_io, encoding="utf-8")
    created = "def hook():\n    return 1\n"
    (repo / "python/sglang/srt/mmpre_probe.py").write_text(created, encoding="utf-8")
    subprocess.run([*git, "add", "-N", "python/sglang/srt/mmpre_probe.py"], check=True)
    diff = subprocess.run([*git, "diff"], check=True, capture_output=True, text=True).stdout

    io_patch, new_patch = parse_patch(diff)

    assert (io_patch.old_path, io_patch.new_path) == (
        f"a/python/sglang/{IO}",
        f"b/python/sglang/{IO}",
    )
    assert apply_file_patch(io_patch, original(IO)).text == new_io
    assert new_patch.is_creation and new_patch.new_mode == 0o644
    assert new_patch.new_path == "b/python/sglang/srt/mmpre_probe.py"
    assert apply_file_patch(new_patch, None).text == created


def test_hunk_found_by_search_when_lines_shifted() -> None:
    (fp,) = parse_patch(udiff(SCHED, original(SCHED), edited(SCHED, SCHED_LOW)))
    shifted = "# one\n# two\n# three\n" + original(SCHED)

    result = apply_file_patch(fp, shifted)

    assert result.ok, result.failures
    assert result.text == "# one\n# two\n# three\n" + edited(SCHED, SCHED_LOW)


def test_ambiguous_or_missing_context_is_refused_not_guessed() -> None:
    text = original(IO)
    lines = text.splitlines(keepends=True)
    first_pass = lines.index("    pass\n")
    lines[first_pass] = "    pass  # changed\n"
    (fp,) = parse_patch(udiff(IO, text, "".join(lines), context=0))

    at_stated_line = apply_file_patch(fp, text)
    moved = apply_file_patch(fp, "# shifted\n" + text)  # the lone "    pass" is everywhere
    gone = apply_file_patch(fp, text.replace("    pass\n", "    ...\n"))

    assert at_stated_line.ok
    assert not moved.ok and "ambiguous" in str(moved.failures[0])
    assert not gone.ok and "not found" in str(gone.failures[0])


def test_reverse_detection_recognises_an_applied_patch() -> None:
    (fp,) = parse_patch(udiff(SCHED, original(SCHED), edited(SCHED, SCHED_TOP, SCHED_LOW)))

    assert is_applied(fp, edited(SCHED, SCHED_TOP, SCHED_LOW))
    assert not is_applied(fp, original(SCHED))
    assert not apply_file_patch(fp, edited(SCHED, SCHED_TOP, SCHED_LOW)).ok


def test_no_newline_at_end_of_file_marker_is_honoured() -> None:
    diff = (
        "--- a/python/sglang/x.py\n+++ b/python/sglang/x.py\n@@ -1,2 +1,2 @@\n"
        " a = 1\n-b = 2\n\\ No newline at end of file\n+b = 3\n\\ No newline at end of file\n"
    )
    (fp,) = parse_patch(diff)

    assert apply_file_patch(fp, "a = 1\nb = 2").text == "a = 1\nb = 3"
    assert not apply_file_patch(fp, "a = 1\nb = 2\n").ok
    assert is_applied(fp, "a = 1\nb = 3")


# ----------------------------------------------------------------------------- installer


def test_apply_writes_patched_files_and_a_manifest_of_hashes(root: Path, patches: Path) -> None:
    report = installer.apply(root, "optimized", patches_dir=patches)

    assert report.outcome == "applied" and report.exit_code == 0
    assert text_of(root, SCHED) == edited(SCHED, SCHED_TOP, SCHED_LOW)
    assert text_of(root, IO) == edited(IO, IO_EDIT)
    assert text_of(root, TM) == original(TM)
    backup = root / BACKUP_DIRNAME
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["scheme"] == "optimized" and manifest["tool_version"] == "0.1.0"
    for entry in manifest["files"]:
        pristine_bytes = pristine(entry["path"]).read_bytes()
        assert entry["created"] is False
        assert entry["original_sha256"] == hashlib.sha256(pristine_bytes).hexdigest()
        patched_bytes = (root / entry["path"]).read_bytes()
        assert entry["patched_sha256"] == hashlib.sha256(patched_bytes).hexdigest()
        assert (backup / "files" / entry["path"]).read_bytes() == pristine_bytes
    assert sorted(e["path"] for e in manifest["files"]) == sorted([SCHED, IO])


def test_apply_is_idempotent(root: Path, patches: Path) -> None:
    installer.apply(root, "optimized", patches_dir=patches)
    after_first = snapshot(root)

    report = installer.apply(root, "optimized", patches_dir=patches)

    assert report.outcome == "already-applied" and report.exit_code == 0
    assert "already applied" in report.message
    assert snapshot(root) == after_first


def test_conflict_leaves_no_file_modified(root: Path, patches: Path) -> None:
    # Drift the tree under both scheduler hunks and under tokenizer_manager, not io_struct.
    for anchor in (SCHED_TOP[0], SCHED_LOW[0]):
        (root / SCHED).write_text(insert_after(text_of(root, SCHED), anchor, "    x = 1\n"))
    mixed = (patches / "optimized_implementation.patch").read_text() + udiff(
        TM, original(TM), edited(TM, TM_EDIT)
    )
    (patches / "optimized_implementation.patch").write_text(mixed)
    (root / TM).write_text(insert_after(text_of(root, TM), TM_EDIT[0], "    y = 2\n"))
    before = snapshot(root)

    with pytest.raises(PatchError) as err:
        installer.apply(root, "optimized", patches_dir=patches)

    assert err.value.exit_code == ExitCode.CONFLICT
    message = str(err.value)
    assert f"{SCHED}: hunk #1" in message and f"{SCHED}: hunk #2" in message
    assert f"{TM}: hunk #1" in message and IO not in message
    assert "nothing was changed" in message and "pip install" in message
    assert snapshot(root) == before  # no file, backup or temp file written


def test_refuses_non_055_version_with_fix_in_message(root: Path, patches: Path) -> None:
    (root / "version.py").write_text('__version__ = "0.5.6"\n')
    before = snapshot(root)

    for operation in (installer.apply, installer.check):
        with pytest.raises(PatchError) as err:
            operation(root, "optimized", patches_dir=patches)
        assert err.value.exit_code == ExitCode.WRONG_VERSION
        assert "0.5.6" in str(err.value) and "pip install sglang==0.5.5" in str(err.value)
    assert snapshot(root) == before


def test_schemes_exclude_each_other(root: Path, patches: Path) -> None:
    installer.apply(root, "optimized", patches_dir=patches)
    applied = snapshot(root)

    for scheme in ("batch_broadcast", "revert"):
        for operation in (installer.apply, installer.check):
            with pytest.raises(PatchError) as err:
                operation(root, scheme, patches_dir=patches)
            assert err.value.exit_code == ExitCode.OTHER_SCHEME
            assert "sglang-mmpre patch revert" in str(err.value)
    assert snapshot(root) == applied
    installer.revert(root)
    assert installer.apply(root, "batch_broadcast", patches_dir=patches).outcome == "applied"


def test_changed_patch_revision_must_be_reverted_first(root: Path, patches: Path) -> None:
    installer.apply(root, "optimized", patches_dir=patches)
    (patches / "optimized_implementation.patch").write_text(
        udiff(SCHED, original(SCHED), edited(SCHED, SCHED_TOP))
    )

    with pytest.raises(PatchError) as err:
        installer.apply(root, "optimized", patches_dir=patches)

    assert err.value.exit_code == ExitCode.OTHER_SCHEME
    assert "another revision" in str(err.value)


def test_revert_restores_files_byte_for_byte(root: Path, patches: Path) -> None:
    os.chmod(root / SCHED, 0o640)
    before = snapshot(root)
    installer.apply(root, "optimized", patches_dir=patches)
    assert stat.S_IMODE((root / SCHED).stat().st_mode) == 0o640  # mode kept while patched

    report = installer.revert(root)

    assert report.outcome == "reverted" and report.exit_code == 0
    assert snapshot(root) == before  # bytes, modes, and no backup dir left
    for rel in COPIED:
        assert (root / rel).read_bytes() == pristine(rel).read_bytes()


def test_revert_refuses_foreign_modification(root: Path, patches: Path) -> None:
    installer.apply(root, "optimized", patches_dir=patches)
    with open(root / IO, "a", encoding="utf-8") as handle:
        handle.write("# someone else's edit\n")
    touched = snapshot(root)

    with pytest.raises(PatchError) as err:
        installer.revert(root)

    assert err.value.exit_code == ExitCode.FOREIGN_MODIFICATION
    assert IO in str(err.value) and SCHED not in str(err.value)
    assert "--force" in str(err.value)
    assert snapshot(root) == touched
    installer.revert(root, force=True)
    for rel in COPIED:
        assert (root / rel).read_bytes() == pristine(rel).read_bytes()
    assert not (root / BACKUP_DIRNAME).exists()


def test_created_file_removed_on_revert(root: Path, patches: Path) -> None:
    before = snapshot(root)
    created = '"""sglang_mmpre glue."""\n\nVALUE = 1\n'
    (patches / "optimized_implementation.patch").write_text(
        udiff("srt/mmpre/glue.py", None, created) + udiff(IO, original(IO), edited(IO, IO_EDIT))
    )
    installer.apply(root, "optimized", patches_dir=patches)
    assert text_of(root, "srt/mmpre/glue.py") == created
    manifest = json.loads((root / BACKUP_DIRNAME / "manifest.json").read_text())
    assert manifest["created_dirs"] == ["srt/mmpre"]
    pycache = root / "srt/mmpre/__pycache__"
    pycache.mkdir()
    (pycache / "glue.cpython-311.pyc").write_bytes(b"compiled")  # as an import would leave

    installer.revert(root)

    assert not (root / "srt/mmpre").exists()
    assert snapshot(root) == before


def test_revert_without_backup_is_a_noop(root: Path) -> None:
    before = snapshot(root)

    report = installer.revert(root)

    assert report.outcome == "nothing-to-revert" and report.exit_code == 0
    assert snapshot(root) == before


def test_check_distinguishes_would_apply_already_applied_and_conflict(
    root: Path, patches: Path
) -> None:
    before = snapshot(root)
    would = installer.check(root, "optimized", patches_dir=patches)
    assert (would.outcome, would.exit_code) == ("would-apply", ExitCode.OK)
    assert snapshot(root) == before  # a dry run writes nothing

    installer.apply(root, "optimized", patches_dir=patches)
    done = installer.check(root, "optimized", patches_dir=patches)
    assert (done.outcome, done.exit_code) == ("already-applied", ExitCode.ALREADY_APPLIED)

    installer.revert(root)
    (root / TM).write_text(insert_after(text_of(root, TM), TM_EDIT[0], "    z = 3\n"))
    with pytest.raises(PatchError) as err:
        installer.check(root, "revert", patches_dir=patches)
    assert err.value.exit_code == ExitCode.CONFLICT and TM in str(err.value)


def test_changes_made_without_the_tool_count_as_applied_but_not_revertible(
    root: Path, patches: Path
) -> None:
    (root / TM).write_text(edited(TM, TM_EDIT))  # e.g. `git apply` by hand

    checked = installer.check(root, "revert", patches_dir=patches)
    applied = installer.apply(root, "revert", patches_dir=patches)

    assert checked.exit_code == ExitCode.ALREADY_APPLIED
    assert applied.outcome == "already-applied" and "cannot undo" in applied.message
    assert not (root / BACKUP_DIRNAME).exists()


def test_status_reports_scheme_files_and_drift(root: Path, patches: Path) -> None:
    assert "applied scheme: none" in installer.status(root).message
    installer.apply(root, "optimized", patches_dir=patches)
    clean = installer.status(root)
    assert clean.exit_code == 0 and "applied scheme: optimized" in clean.message
    assert f"patched  {SCHED}" in clean.message and "0.5.5 (supported)" in clean.message

    (root / SCHED).write_text("# replaced\n")
    drifted = installer.status(root)

    assert drifted.exit_code == ExitCode.FOREIGN_MODIFICATION
    assert f"modified {SCHED}" in drifted.message


def test_stale_backup_after_reinstall_is_discarded(root: Path, patches: Path) -> None:
    installer.apply(root, "batch_broadcast", patches_dir=patches)
    shutil.copy2(pristine(SCHED), root / SCHED)  # what `pip install --force-reinstall` does

    assert "stale backup" in installer.status(root).message
    report = installer.apply(root, "optimized", patches_dir=patches)

    assert report.outcome == "applied"
    manifest = json.loads((root / BACKUP_DIRNAME / "manifest.json").read_text())
    assert manifest["scheme"] == "optimized"
    assert text_of(root, SCHED) == edited(SCHED, SCHED_TOP, SCHED_LOW)


def test_failed_write_puts_every_file_back(
    root: Path, patches: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(root)
    real_write = installer._atomic_write
    calls = []

    def failing_second_write(path: Path, data: bytes, mode: int) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_write(path, data, mode)

    monkeypatch.setattr(installer, "_atomic_write", failing_second_write)

    with pytest.raises(PatchError) as err:
        installer.apply(root, "optimized", patches_dir=patches)

    assert "put back" in str(err.value) and len(calls) >= 3  # 2 writes + the undo
    assert snapshot(root) == before


def test_interrupted_revert_keeps_the_backup_and_can_be_rerun(
    root: Path, patches: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(root)
    installer.apply(root, "optimized", patches_dir=patches)
    real_write = installer._atomic_write
    calls = []

    def failing_second_write(path: Path, data: bytes, mode: int) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(13, "Permission denied")
        real_write(path, data, mode)

    monkeypatch.setattr(installer, "_atomic_write", failing_second_write)
    with pytest.raises(PatchError, match="run sglang-mmpre patch revert again"):
        installer.revert(root)
    assert (root / BACKUP_DIRNAME / "manifest.json").is_file()
    monkeypatch.setattr(installer, "_atomic_write", real_write)

    assert installer.revert(root).outcome == "reverted"
    assert snapshot(root) == before


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("b/setup.py", "not under python/sglang/"),
        ("b/python/sglang/../../evil.py", "unsafe path"),
        (f"b/python/sglang/{BACKUP_DIRNAME}/x.py", f"own {BACKUP_DIRNAME}"),
    ],
)
def test_refuses_paths_outside_the_sglang_tree(
    root: Path, patches: Path, path: str, reason: str
) -> None:
    diff = f"--- /dev/null\n+++ {path}\n@@ -0,0 +1 @@\n+x = 1\n"
    (patches / "optimized_implementation.patch").write_text(diff)
    before = snapshot(root)

    with pytest.raises(PatchError, match=reason):
        installer.apply(root, "optimized", patches_dir=patches)

    assert snapshot(root) == before


def test_patch_path_lookup_and_refusals(
    tmp_path: Path, patches: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert installer.patch_path("revert", patches) == patches / "solution_1_revert.patch"
    with pytest.raises(PatchError, match="batch_broadcast"):
        installer.patch_path("nonsense")
    with pytest.raises(PatchError, match="reinstall sglang-mmpre"):
        installer.patch_path("revert", tmp_path / "empty")
    monkeypatch.setattr(installer, "_REPO_PATCHES_DIR", patches)  # the source-checkout fallback
    assert installer.patch_path("batch_broadcast") == patches / "improved_batch_broadcast.patch"


def test_locate_sglang_does_not_import_sglang() -> None:
    code = (
        "import sys\n"
        "from sglang_mmpre.patching.installer import installed_version, locate_sglang\n"
        "root = locate_sglang()\n"
        "print((root / 'srt').is_dir(), 'sglang' in sys.modules, installed_version())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )

    assert out.stdout.split() == ["True", "False", "0.5.5"]


# ----------------------------------------------------------------------------- CLI


def test_cli_exit_codes(root: Path, patches: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(*args: str) -> int:
        return cli.main(["patch", *args, "--sglang-root", str(root), "--patches-dir", str(patches)])

    assert run("status") == 0
    assert run("check") == 0
    assert run("apply") == 0
    assert run("apply") == 0  # nothing to do
    assert run("check") == ExitCode.ALREADY_APPLIED
    assert run("apply", "--scheme", "batch_broadcast") == ExitCode.OTHER_SCHEME
    assert "sglang-mmpre patch revert" in capsys.readouterr().err
    (root / IO).write_text("# foreign\n")
    assert run("revert") == ExitCode.FOREIGN_MODIFICATION
    assert run("status") == ExitCode.FOREIGN_MODIFICATION
    assert run("revert", "--force") == 0
    assert run("revert") == 0  # nothing to do
    assert run("apply", "--force") == ExitCode.ERROR
    assert run("apply", "--scheme", "nonsense") == 2
    (root / SCHED).write_text("# nothing the patch expects\n")
    capsys.readouterr()
    assert run("apply") == ExitCode.CONFLICT
    assert SCHED in capsys.readouterr().err
    (root / "version.py").write_text('__version__ = "0.4.0"\n')
    assert run("check") == ExitCode.WRONG_VERSION
    assert "pip install sglang==0.5.5" in capsys.readouterr().err


def test_python_m_sglang_mmpre_runs_the_cli(root: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sglang_mmpre", "patch", "status", "--sglang-root", str(root)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )

    assert out.returncode == 0, out.stderr
    assert "applied scheme: none" in out.stdout


# ----------------------------------------------------------------------------- the repository


@pytest.mark.parametrize("scheme", sorted(installer.SCHEMES))
def test_repository_patch_applies_to_pristine_sglang_and_reverts(
    tmp_path: Path, scheme: str
) -> None:
    source = REPO / "patches" / installer.SCHEMES[scheme]
    if not source.is_file():
        pytest.skip(f"{source.name} is not written yet")
    root = tmp_path / "sglang"
    targets = {"version.py"}
    for fp in parse_patch(source.read_text(encoding="utf-8")):
        if not fp.is_creation:
            targets.add(fp.path.split("python/sglang/", 1)[1])
    for rel in targets:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(pristine(rel), root / rel)
    (root / "srt").mkdir(exist_ok=True)
    before = snapshot(root)

    assert installer.apply(root, scheme).outcome == "applied"
    installer.revert(root)

    assert snapshot(root) == before


def test_pyproject_lists_every_subpackage() -> None:
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(config["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "sglang_mmpre").rglob("__init__.py")
    }

    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert config["tool"]["setuptools"]["package-dir"]["sglang_mmpre._patches"] == "patches"
