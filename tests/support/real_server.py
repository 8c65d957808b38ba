"""Start and stop a real ``python -m sglang.launch_server`` (sglang 0.5.5) on this CPU machine.

Used by the real-server tests and by the main benchmark (test-only support, never shipped).

- **Schemes.** ``as_shipped`` runs the installed sglang 0.5.5 untouched. ``optimized``,
  ``revert`` and ``batch_broadcast`` run a copy of it, patched by this project's installer
  and placed first on the server's ``PYTHONPATH`` (:func:`sglang_site`): patched and
  unpatched servers coexist in one venv, and the installed sglang is never modified.
- **Process.** Each server runs in its own process group on a port the OS picked. It is
  ready when it answers ``GET /get_model_info``; it is stopped by its pid (SIGTERM, then
  SIGKILL to the group after a grace period), and its exit code is checked. On SIGTERM
  sglang 0.5.5 drains its requests, logs "Gracefully exiting", and then kills its own
  process tree, itself included (``kill_process_tree(os.getpid(), include_parent=True)``
  in ``TokenizerManager.sigterm_watchdog``): so a clean stop is exit code ``-9`` *after*
  that log line. With ``--tokenizer-worker-num > 1`` uvicorn's parent process exits ``0``
  after its workers drained. Stopped before its first request, where sglang's handler is
  not installed yet, uvicorn shuts it down: exit ``-15``. Anything else is a failure.
- **Import stand-ins.** ``server_boot/sitecustomize.py`` (on the server's ``PYTHONPATH``)
  loads ``gpu_module_standin`` in every process sglang spawns.
- **Nodes.** ``ServerConfig(node=Node(rank, dist_init_addr))`` starts one node of a
  two-node server (``--nnodes 2 --node-rank R --dist-init-addr``): :func:`start_nodes`
  starts both, each with the TP ranks sglang gives its rank, and :func:`stop_nodes` stops
  them. Each node runs in its own mount namespace with its own tmpfs at ``/dev/shm``
  (another machine's, as far as shared memory goes); the tokenizer, the detokenizer and
  the HTTP API run on node 0 only (node 1 answers ``/health`` and nothing else). To stop
  node 1, stop node 0: sglang 0.5.5 has no other way for it. Its scheduler's next
  broadcast from rank 0 then fails ("Connection closed by peer"), the scheduler sends
  its launcher SIGQUIT ("Received sigquit from a child process"), and the launcher kills
  its tree, itself included: exit ``-9``.
- **Leftovers.** sglang and multiprocessing leave a ``psm_*`` file and a few ``sem.mp-*``
  files in ``/dev/shm`` after a TP>1 server stops (the ``psm_*`` file is unlinked only in a
  ``__del__``; the server kills its own tree before multiprocessing cleans up). Once every
  process of the server is gone, :meth:`RealServer.stop` removes the files with those
  names that appeared in ``/dev/shm`` while it ran and that no live process maps; never one
  of ours: our segments live in the server's own ``SGLANG_MM_SHM_DIR`` and must be gone by
  themselves.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import requests

__all__ = [
    "SCHEMES",
    "ServerConfig",
    "RealServer",
    "Node",
    "start_nodes",
    "stop_nodes",
    "kill_nodes",
    "private_shm_unavailable_reason",
    "ServerFailed",
    "sglang_site",
    "segment_files",
    "mapped_shm_files",
    "client_env",
]

SUPPORT_DIR = Path(__file__).resolve().parent
REPO_ROOT = SUPPORT_DIR.parent.parent
BOOT_DIR = SUPPORT_DIR / "server_boot"

SCHEMES = ("as_shipped", "revert", "batch_broadcast", "optimized")

#: Flags every CPU server gets (see the README, "Reproducing the real-server run on CPU").
CPU_FLAGS = (
    "--device", "cpu",
    "--attention-backend", "torch_native",
    "--disable-cuda-graph",
    "--disable-fast-image-processor",
    "--skip-server-warmup",
    "--grammar-backend", "none",
    "--sleep-on-idle",
    # Room for 16 concurrent 1120x700 requests (about 1,060 tokens each) and their outputs:
    # sglang 0.5.5 crashes in the MRoPE forward when it retracts a Qwen2-VL request under KV
    # pressure (docs/reliability.md). The tiny model's KV cache takes 256 B per token at most.
    "--max-total-tokens", "65536",
    "--host", "127.0.0.1",
)

#: Environment every CPU server gets, and why (and ``SGLANG_CPU_OMP_THREADS_BIND``: see
#: :func:`omp_threads_bind`).
CPU_ENV = {
    # The CUDA torch wheel ships libnccl, which loads without a GPU; pynccl then fails
    # with "Expected a cuda device". Naming a missing file keeps pynccl off.
    "SGLANG_NCCL_SO_PATH": "/nonexistent/libnccl.so",
    # Without it the first request compiles for about 30 s.
    "TORCH_COMPILE_DISABLE": "1",
    # Else every server process starts a pool of inductor compile workers (about 330 MB
    # each, several per process) that nothing uses once compilation is off.
    "TORCHINDUCTOR_COMPILE_THREADS": "1",
    "SGL_DISABLE_TP_MEMORY_INBALANCE_CHECK": "1",
    "PYTHONUNBUFFERED": "1",
}

#: Flags of a GPU server (``ServerConfig(device="cuda")``, ``scripts/gpu_check.sh``): sglang's
#: defaults (the fast image processor on cuda included) but for what the tiny served model
#: needs: head size 16 (text) and 16 (vision), which the Triton and SDPA kernels take; no
#: CUDA graphs (the check runs a few hundred requests, capture would cost more than it
#: saves); a small static memory fraction, as the model is 14 MB.
GPU_FLAGS = (
    "--attention-backend", "triton",
    "--mm-attention-backend", "sdpa",
    "--disable-cuda-graph",
    "--skip-server-warmup",
    "--mem-fraction-static", "0.3",
    "--max-total-tokens", "65536",
    "--host", "127.0.0.1",
)

READY_TIMEOUT_S = 240.0
_DRAINED = "Gracefully exiting... Remaining number of requests 0."
_UVICORN_DONE = "Application shutdown complete."
_PEER_NODE_GONE = "Received sigquit from a child process"
STOP_GRACE_S = 60.0


class ServerFailed(RuntimeError):
    """The server did not start, died, or did not stop cleanly; the message has its log."""


def sglang_site(scheme: str, root: Path) -> Optional[Path]:
    """A directory holding sglang patched with ``scheme`` (None for ``as_shipped``).

    Copies the installed sglang 0.5.5 once per scheme under ``root`` and applies the scheme
    with this project's installer; reused if already there.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; one of {SCHEMES}")
    if scheme == "as_shipped":
        return None
    site = Path(root) / f"site-{scheme}"
    done = site / ".applied"
    if done.is_file():
        return site
    import importlib.util

    from sglang_mmpre.patching import installer

    spec = importlib.util.find_spec("sglang")
    installed = Path(list(spec.submodule_search_locations)[0])
    # The running process may itself use a patched copy: find the installed one.
    for entry in sys.path:
        candidate = Path(entry) / "sglang" / "version.py"
        if "site-packages" in entry and candidate.is_file():
            installed = candidate.parent
            break
    shutil.rmtree(site, ignore_errors=True)
    shutil.copytree(installed, site / "sglang", ignore=shutil.ignore_patterns("__pycache__"))
    installer.apply(site / "sglang", scheme)
    done.write_text(scheme)
    return site


def segment_files(shm_dir: Path, with_locks: bool = False, with_regions: bool = False) -> list[str]:
    """Names of this project's per-request segments in ``shm_dir``; with ``with_regions``,
    its warm regions too (each tokenizer process keeps one while it lives), and with
    ``with_locks`` its creators' lock files. Regions are told apart by their header."""
    from sglang_mmpre.transport.region import REGION_MAGIC

    try:
        names = sorted(n for n in os.listdir(shm_dir) if n.startswith("sglmmpre_"))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.endswith(".lock"):
            keep = with_locks
        else:
            try:
                with open(os.path.join(shm_dir, name), "rb") as f:
                    is_region = f.read(len(REGION_MAGIC)) == REGION_MAGIC
            except FileNotFoundError:
                continue
            keep = with_regions or not is_region
        if keep:
            out.append(name)
    return out


_SGLANG_SHM_PREFIXES = ("psm_", "sem.mp-")


def _sglang_shm_files() -> list[str]:
    """``/dev/shm`` files with the names sglang's and multiprocessing's leftovers have."""
    try:
        return [n for n in os.listdir("/dev/shm") if n.startswith(_SGLANG_SHM_PREFIXES)]
    except FileNotFoundError:
        return []


def mapped_shm_files() -> set[str]:
    """Names of ``/dev/shm`` files that some live process maps."""
    names = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                for line in f:
                    path = line.rstrip("\n").split(maxsplit=5)[-1]
                    if path.startswith("/dev/shm/"):
                        names.add(path[len("/dev/shm/"):].removesuffix(" (deleted)"))
        except OSError:
            continue
    return names


def omp_threads_bind(tp: int) -> str:
    """``SGLANG_CPU_OMP_THREADS_BIND`` for ``tp`` ranks: the usable cores in ``tp`` groups.

    Without it sglang asserts that tp <= the number of NUMA nodes (one here); with it, the
    number of ``|``-separated groups must equal tp (``"0|1"`` for TP=2 on 2 cores).
    """
    cores = sorted(os.sched_getaffinity(0))
    if tp >= len(cores):
        groups = [[cores[i % len(cores)]] for i in range(tp)]
    else:
        groups = [cores[i * len(cores) // tp:(i + 1) * len(cores) // tp] for i in range(tp)]
    return "|".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)


def client_env() -> dict[str, str]:
    """Environment for a client such as ``python -m sglang.bench_serving``: the installed
    sglang (clients need no patch) with the stand-in loaded, as in the servers."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(BOOT_DIR), PYTHONUNBUFFERED="1")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Node:
    """One node of a two-node server: its ``--node-rank`` and the head node's
    ``--dist-init-addr`` (``host:port``, over loopback here)."""

    rank: int
    dist_init_addr: str
    nnodes: int = 2


def private_shm_unavailable_reason() -> Optional[str]:
    """Why a process can't get its own mount namespace with a tmpfs at ``/dev/shm`` here
    (``unshare -m`` needs CAP_SYS_ADMIN), or None if it can."""
    if shutil.which("unshare") is None:
        return "no unshare(1) on this machine"
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
        capture_output=True, text=True,
    )
    if probe.returncode != 0:
        return f"unshare -m with a tmpfs at /dev/shm failed: {probe.stderr.strip()}"
    return None


@dataclass(frozen=True)
class ServerConfig:
    """What to start: a scheme, a TP size, extra flags and environment."""

    scheme: str = "optimized"
    tp: int = 2
    extra_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    #: ``cpu``: the CPU flags, environment and import stand-ins (README, "Reproducing the
    #: real-server run on CPU"); ``cuda``: a GPU server with sglang's real GPU modules.
    device: str = "cpu"
    #: Keep sglang's default fast image processor (on a CPU server: without
    #: ``--disable-fast-image-processor``).
    fast_image_processor: bool = False
    #: Our files in ``/dev/shm`` with ``SGLANG_MM_SHM_DIR`` unset, as a user runs it
    #: (other servers may share the directory: see :meth:`RealServer.own_files`).
    default_shm_dir: bool = False
    #: One node of a multi-node server (module docstring, "Nodes"): it runs in its own
    #: mount namespace with a tmpfs of its own at ``/dev/shm``, ``SGLANG_MM_SHM_DIR`` unset.
    node: Optional[Node] = None


#: Size of a node's own ``/dev/shm`` (a tmpfs: pages are taken only when written).
NODE_SHM_SIZE = "4g"


@dataclass
class RealServer:
    """One real sglang server; see the module docstring. Not reusable after :meth:`stop`."""

    config: ServerConfig
    model_dir: Path
    workdir: Path
    #: Our segments' directory (``SGLANG_MM_SHM_DIR``); a private one by default.
    shm_dir: Optional[Path] = None
    port: int = 0
    proc: Optional[subprocess.Popen] = None
    log_path: Optional[Path] = None
    _shm_before: frozenset[str] = frozenset()
    _own_shm_dir: bool = False
    _pids_seen: frozenset[int] = frozenset()
    #: A node's mount namespace (``/proc/<pid>/ns/mnt``), to check that it is gone.
    _mount_ns: Optional[str] = None
    #: Seconds from the launch to the first HTTP answer.
    ready_after_s: Optional[float] = None
    _launched_at: float = 0.0

    # -- start -----------------------------------------------------------------------
    def start(self) -> "RealServer":
        self.launch()
        self.wait_ready()
        return self

    def launch(self) -> "RealServer":
        """Start the launcher process; :meth:`wait_ready` waits for its HTTP answer."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        node = self.config.node  # a node's shm_dir is its own /dev/shm (set below)
        if node is None and self.config.default_shm_dir:
            self.shm_dir = Path("/dev/shm")
        elif node is None and self.shm_dir is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            import tempfile

            self.shm_dir = Path(tempfile.mkdtemp(prefix="sglang_mmpre_server_", dir=base))
            self._own_shm_dir = True
        site = sglang_site(self.config.scheme, self.workdir.parent)
        boot = [str(BOOT_DIR)] if self.config.device == "cpu" else []
        path = boot + ([str(site)] if site else []) + [str(REPO_ROOT)]
        # The scheme's own settings only (the test session pins the pool size for
        # in-process tests: tests/conftest.py).
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "SGLANG_MM_PROCESSOR_WORKERS")}
        if self.config.device == "cpu":
            env.update(CPU_ENV, SGLANG_CPU_OMP_THREADS_BIND=omp_threads_bind(self.config.tp))
        else:
            env.update(PYTHONUNBUFFERED="1")
        env.update(PYTHONPATH=os.pathsep.join(path), SGLANG_MM_SHM_DIR=str(self.shm_dir))
        if self.config.default_shm_dir or node is not None:
            del env["SGLANG_MM_SHM_DIR"]
        env.update(dict(self.config.env))
        self.port = _free_port()
        self._shm_before = frozenset(_sglang_shm_files())
        args = [
            sys.executable, "-m", "sglang.launch_server",
            "--model-path", str(self.model_dir),
            "--port", str(self.port),
            *self._flags(),
        ]
        if self.config.tp > 1:
            args += ["--tp", str(self.config.tp), "--disable-custom-all-reduce"]
        args += list(self.config.extra_args)
        if node is not None:
            args += ["--nnodes", str(node.nnodes), "--node-rank", str(node.rank),
                     "--dist-init-addr", node.dist_init_addr]
            # unshare(1) execs sh, which mounts the tmpfs and execs the launcher: the
            # launcher keeps the pid, so it leads the process group as without a node.
            args = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                    f"mount -t tmpfs -o size={NODE_SHM_SIZE} tmpfs /dev/shm && exec \"$@\"",
                    "node", *args]
        rank = f"-node{node.rank}" if node is not None else ""
        self.log_path = self.workdir / f"server-{self.config.scheme}{rank}-{self.port}.log"
        self._launched_at = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args, env=env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        if node is not None:
            # The node's /dev/shm, seen from here, while its launcher lives.
            self.shm_dir = Path(f"/proc/{self.proc.pid}/root/dev/shm")
            self._mount_ns = self._own_mount_ns()
        return self

    def _flags(self) -> tuple[str, ...]:
        if self.config.device not in ("cpu", "cuda"):
            raise ValueError(f"device {self.config.device!r}: cpu or cuda")
        flags = CPU_FLAGS if self.config.device == "cpu" else GPU_FLAGS
        if self.config.fast_image_processor:
            flags = tuple(f for f in flags if f != "--disable-fast-image-processor")
        return flags

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except (OSError, AttributeError):
            return ""
        return "\n".join(lines[-n:])

    def wait_ready(self) -> None:
        """Wait for the server's HTTP answer (``/get_model_info``; ``/health`` on a node of
        rank >= 1, which serves nothing else); kill it and raise if it dies or is late."""
        node = self.config.node
        probe = "/health" if node is not None and node.rank > 0 else "/get_model_info"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.kill()  # its children may outlive it
                raise ServerFailed(f"server exited with {rc} during start-up:\n{self.log_tail()}")
            try:
                if requests.get(self.url + probe, timeout=2).status_code == 200:
                    self.ready_after_s = time.monotonic() - self._launched_at
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.kill()
        raise ServerFailed(f"server not ready after {READY_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def _own_mount_ns(self) -> str:
        """The launcher's mount namespace, once it is not the one it was started in (the
        wrapper has not run ``unshare`` yet right after the fork)."""
        ours = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                ns = os.readlink(f"/proc/{self.proc.pid}/ns/mnt")
            except OSError:
                break
            if ns != ours:
                return ns
            time.sleep(0.05)
        self.kill()
        raise ServerFailed(f"the node did not get its own mount namespace:\n{self.log_tail()}")

    def mount_namespace_members(self) -> list[int]:
        """Pids of live processes in this node's mount namespace (none once it stopped)."""
        if self._mount_ns is None:
            return []
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.readlink(f"/proc/{entry}/ns/mnt") == self._mount_ns:
                        out.append(int(entry))
                except OSError:
                    continue
        return out

    # -- processes -------------------------------------------------------------------
    def processes(self) -> dict[int, str]:
        """``pid -> role`` for every live process of the server's group.

        Roles: ``tokenizer`` (the launcher, which runs the TokenizerManager),
        ``tokenizer_worker_N``, ``scheduler_TP<r>``, ``detokenizer``; sglang names its
        children with ``setproctitle``.
        """
        if self.proc is None:
            return {}
        out = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2 :].split()
            if int(fields[2]) != self.proc.pid or fields[0] == b"Z":  # pgrp, state
                continue
            pid = int(entry)
            if pid == self.proc.pid:
                node = self.config.node
                out[pid] = "tokenizer" if node is None or node.rank == 0 else "launcher"
            elif cmdline.startswith("sglang::"):
                out[pid] = cmdline[len("sglang::") :].split()[0]
        self._pids_seen |= frozenset(out)
        return out

    def own_files(self, with_locks: bool = False, with_regions: bool = False) -> list[str]:
        """:func:`segment_files` of ``shm_dir`` made by a process of this server (the
        creator's pid is in the name; processes are noted whenever :meth:`processes` runs,
        so call it while the server lives): in a shared ``/dev/shm``, other servers'
        files are not this one's."""
        from sglang_mmpre.transport.liveness import LOCK_NAME_RE, OWNED_NAME_RE

        if self.proc is not None and self.proc.poll() is None:
            self.processes()
        pids = self._pids_seen | ({self.proc.pid} if self.proc is not None else set())
        out = []
        for name in segment_files(self.shm_dir, with_locks, with_regions):
            match = OWNED_NAME_RE.match(name) or LOCK_NAME_RE.match(name)
            if match and int(match.group(2)) in pids:
                out.append(name)
        return out

    def cpu_seconds(self) -> dict[str, float]:
        """``role -> utime + stime`` in seconds, from ``/proc/<pid>/stat``."""
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        for pid, role in self.processes().items():
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2 :].split()
            out[role] = (int(fields[11]) + int(fields[12])) / tick
        return out

    # -- stop ------------------------------------------------------------------------
    def stop(self) -> int:
        """SIGTERM the launcher, wait, check its exit code, remove sglang's own leftovers
        (a node of rank >= 1 gets no signal: it stops once node 0 stopped).

        Raises :class:`ServerFailed` if it does not exit by itself within the grace period,
        or exits other than sglang 0.5.5's clean stop (see the module docstring).
        """
        if self.proc is None or self.proc.poll() is not None:
            return self._finish(expect_clean=True)
        node = self.config.node
        if node is not None and node.rank > 0:
            # It stops once node 0 is gone (module docstring, "Nodes").
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.kill()
                raise ServerFailed(f"node {node.rank} still ran {STOP_GRACE_S:.0f} s after "
                                   f"node 0 stopped:\n{self.log_tail()}")
            return self._finish(expect_clean=True)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ServerFailed(f"server ignored SIGTERM for {STOP_GRACE_S:.0f} s:\n{self.log_tail()}")
        return self._finish(expect_clean=True)

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash), and reap the launcher."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._finish(expect_clean=False)

    def _finish(self, expect_clean: bool) -> int:
        rc = self.proc.returncode
        self._reap_group()
        node = self.config.node
        if node is None:  # a node's leftovers went with its own /dev/shm
            mapped = mapped_shm_files()
            for name in sorted(set(_sglang_shm_files()) - self._shm_before - mapped):
                try:
                    os.unlink(os.path.join("/dev/shm", name))
                except FileNotFoundError:
                    pass
        if self._own_shm_dir and not os.listdir(self.shm_dir):
            os.rmdir(self.shm_dir)  # a non-empty one stays for the test to report
        log = self.log_tail(400)
        if node is not None and node.rank > 0:
            if expect_clean and not (rc == -signal.SIGKILL and _PEER_NODE_GONE in log):
                raise ServerFailed(f"node {node.rank} exited with {rc}, not after node 0 "
                                   f"stopped:\n{self.log_tail()}")
            return rc
        drained = rc in (0, -signal.SIGKILL) and _DRAINED in log
        # Before its first request sglang has not installed its SIGTERM handler yet, and
        # uvicorn's own shuts the server down (exit -15).
        early = rc == -signal.SIGTERM and _UVICORN_DONE in log and "POST /" not in log
        if expect_clean and not (drained or early):
            raise ServerFailed(f"server exited with {rc}, not after a drain:\n{self.log_tail()}")
        return rc

    def _reap_group(self) -> None:
        """Wait until no process of the group is left (children exit after the launcher)."""
        deadline = time.monotonic() + STOP_GRACE_S
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.processes():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            raise ServerFailed(f"server processes outlived the launcher:\n{self.log_tail()}")
        # A node's namespace (and its /dev/shm) goes with its last process, in the group
        # or not.
        while self.mount_namespace_members() and time.monotonic() < deadline:
            time.sleep(0.2)
        stray = self.mount_namespace_members()
        if stray:
            for pid in stray:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise ServerFailed(f"processes {stray} outlived the node, in its mount namespace")


def start_nodes(scheme: str, model_dir: Path, workdir: Path, env: tuple[tuple[str, str], ...] = (),
                nnodes: int = 2) -> list[RealServer]:
    """The nodes of one TP=``nnodes`` server (one rank each), node 0 first, all ready;
    if one fails, all are killed."""
    addr = f"127.0.0.1:{_free_port()}"
    nodes = [RealServer(ServerConfig(scheme, tp=nnodes, env=env, node=Node(rank, addr, nnodes)),
                        model_dir, workdir / f"node{rank}")
             for rank in range(nnodes)]
    try:
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_ready()
    except BaseException:
        kill_nodes(nodes)
        raise
    return nodes


def stop_nodes(nodes: list[RealServer]) -> None:
    """SIGTERM node 0 (a graceful stop: it drains), then let the others stop by themselves
    (module docstring, "Nodes"); each one's exit is checked, and every node is killed if a
    check fails."""
    try:
        for node in nodes:
            node.stop()
    except BaseException:
        kill_nodes(nodes)
        raise


def kill_nodes(nodes: list[RealServer]) -> None:
    """SIGKILL every launched node's process group and what is left in its mount
    namespace (:meth:`RealServer.kill`), whatever state it is in."""
    for node in nodes:
        if node.proc is not None and (node.proc.poll() is None or node.processes()
                                      or node.mount_namespace_members()):
            try:
                node.kill()
            except ServerFailed:
                pass  # what outlived it was killed; the failure that led here is raised
