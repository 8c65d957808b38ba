"""``sglang-mmpre patch {apply,check,revert,status}``: the command line of the patch tooling.

Messages go to stdout, refusals to stderr; the exit code is ``ExitCode`` (see
``unified_diff``): 0 done or nothing to do, 1 error, 2 usage, 3 wrong sglang version,
4 conflict, 5 files changed since apply, 6 another scheme applied, 7 (``check`` only)
already applied.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sglang_mmpre.patching import installer
from sglang_mmpre.patching.unified_diff import ExitCode, PatchError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``sglang-mmpre`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="sglang-mmpre", description="Tokenizer-stage multimodal materialization for sglang."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    patch = commands.add_parser(
        "patch",
        help="apply, check, revert or inspect the sglang 0.5.5 source patches",
        description="Edit an installed sglang 0.5.5 with one of the patch schemes; "
        f"originals are kept in <sglang root>/{installer.BACKUP_DIRNAME}/.",
    )
    patch.add_argument("action", choices=["apply", "check", "revert", "status"])
    patch.add_argument(
        "--scheme",
        choices=list(installer.SCHEMES),
        default=installer.DEFAULT_SCHEME,
        help="apply/check: which patch (default: %(default)s)",
    )
    patch.add_argument(
        "--sglang-root",
        type=Path,
        metavar="DIR",
        help="the sglang package directory to patch (holds srt/ and version.py); "
        "default: the installed sglang",
    )
    patch.add_argument(
        "--force",
        action="store_true",
        help="revert: restore the originals even over files changed since apply",
    )
    patch.add_argument(
        "--patches-dir",
        type=Path,
        metavar="DIR",
        help="take the .patch files from DIR instead of the ones shipped with sglang-mmpre",
    )
    return parser


def _run(args: argparse.Namespace) -> installer.Report:
    if args.force and args.action != "revert":
        raise PatchError("--force only applies to `sglang-mmpre patch revert`")
    root = args.sglang_root
    if root is None:
        root = installer.locate_sglang()
        if args.action in ("apply", "check"):  # the distribution's metadata must agree too
            installer.require_supported_version(root, installer.installed_version())
    if args.action == "apply":
        return installer.apply(root, args.scheme, patches_dir=args.patches_dir)
    if args.action == "check":
        return installer.check(root, args.scheme, patches_dir=args.patches_dir)
    if args.action == "revert":
        return installer.revert(root, force=args.force)
    return installer.status(root)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (argparse's usage errors give 2)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return exc.code if isinstance(exc.code, int) else 2
    try:
        report = _run(args)
    except PatchError as exc:
        print(f"sglang-mmpre: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # unforeseen I/O trouble (permissions, full disk): no traceback
        print(f"sglang-mmpre: error: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    print(report.message)
    return report.exit_code
