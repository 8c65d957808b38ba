"""A Python child process driven line by line over stdin/stdout (never shipped).

The child runs ``PRELUDE`` + its code with the patched sglang on its path (``PYTHONPATH``
is set by ``conftest``); ``shm_dir`` is its first argument. Tests use it to stop a process
at an exact point (it prints a word, then blocks reading stdin) and then kill it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Sequence

__all__ = ["PRELUDE", "Child"]

PRELUDE = """
import base64, os, pickle, sys, types
import gpu_module_standin; gpu_module_standin.install()
shm_dir = sys.argv[1]
os.environ["SGLANG_MM_SHM_DIR"] = shm_dir
"""


class Child:
    """A child process speaking lines on stdin/stdout; :meth:`close` always reaps it.

    ``wrapper`` runs it through another command (e.g. ``unshare --pid --fork``); ``pid``
    is then the wrapper's.
    """

    def __init__(self, code: str, *args: str, wrapper: Sequence[str] = ()) -> None:
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-c", PRELUDE + code, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.pid = self.proc.pid

    def expect(self, word: str) -> str:
        """Read lines until one starts with ``word``; return the rest of it."""
        while True:
            line = self.proc.stdout.readline()
            assert line, f"child {self.pid} exited ({self.proc.wait()}) before saying {word}"
            if line.startswith(word):
                return line[len(word):].strip()

    def say(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill9(self) -> None:
        """SIGKILL it and check that this is how it ended."""
        os.kill(self.pid, signal.SIGKILL)
        assert self.proc.wait() == -signal.SIGKILL

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
