"""``python -m sglang_mmpre``: the ``sglang-mmpre`` command line."""

from __future__ import annotations

import sys

from sglang_mmpre.patching.cli import main

if __name__ == "__main__":
    sys.exit(main())
