"""The model's multimodal processor in worker processes: the event loop only awaits.

sglang 0.5.5 runs the processor (``process_mm_data_async``: loading and resizing images,
the HF processor's ``__call__``, MRoPE positions) on the TokenizerManager's event loop,
the loop that also serves HTTP, returns outputs and handles aborts. :class:`ProcessorPool`
runs it in ``SGLANG_MM_PROCESSOR_WORKERS`` worker processes of each TokenizerManager
process (``pool_worker.py``), and materializes its output there.

Note [processor pool]
---------------------
- A worker is forked from a forkserver (it shares no thread or lock with its parent) that
  has imported ``pool_worker`` and with it sglang's processor modules. It builds sglang's own
  processor objects (``get_processor``, ``get_mm_processor``) and a ``TokenizerSide`` of
  its own, with a warm region that it alone writes; the cap is shared out evenly.
- A job is what sglang's ``AsyncMMDataProcessor`` hands its processor: the request object
  and its image, video and audio data as the client sent them (URLs, base64, bytes). The
  worker runs the processor and then ``TokenizerSide.build``: the tensors go into its
  region's slots (else a segment; inline only past the cap). The reply is the processor's
  ``input_ids`` (if it made them) and the ``MaterializedMultimodalInputs``, whose tensors
  are descriptors: no feature tensor is pickled. sglang's LLaVA processor, which sends
  each image to a process pool of its own, uses a thread of the worker instead.
- The parent takes the reply's creator reference (:class:`PooledHold`: slots through its
  own mapping of the worker's slot table, a segment through ``SegmentWriter.adopt``), and
  the request scope releases it as any other (Note [creator reference] in ``manager.py``).
  Segment bytes released are credited back to the worker's share of the cap with its next
  job.
- Each worker has one job at a time, sent and awaited by a thread of its own in the
  parent: the loop awaits a future and never touches a pipe. Each has its own queue, and
  a job goes to the worker its routing key names (Note [routing by key]).
- A worker's reply carries its processor cache's counters (``processor_cache.CacheStats``,
  or None with the cache off): :meth:`ProcessorPool.cache_stats` gives the last ones of
  each worker.
- An exception the processor raises comes back and is raised again, so the client gets
  what unpatched sglang gives it. A job that can't be pickled runs in the parent, as
  today (nothing was sent; the credit stays). A reply that can't be unpickled fails its
  job with :class:`ProcessorReplyUnreadable`, and the worker is told to drop the reply's
  references (``pool_worker.py``).
- A worker that dies fails its one job with :class:`ProcessorWorkerDied`; its thread
  starts a replacement. Queued jobs wait for it; nothing else fails (a worker found dead
  when a job is taken, having died while idle, fails none). A job still running at its
  deadline (sglang's ``--mm-per-request-timeout``, else :data:`JOB_TIMEOUT_S`) fails with
  :class:`ProcessorWorkerHung`, and its worker is killed and replaced the same way. A dead
  worker's files go by Note [one ledger per worker].
- The pool is built when the TokenizerManager is, and waits for every worker's first
  start (seconds; it overlaps the scheduler's model loading). A worker that can't start
  leaves the others; with none, every job runs in the parent, as today.

Note [routing by key]
---------------------
Each worker keeps its own processor cache (``processor_cache.py``). Were jobs taken from
one shared queue, a repeated image would miss once in each worker, and each would keep a
copy of it. So :meth:`ProcessorPool.submit` routes a job by :func:`routing_key`: a hash of
the job's first media item as the client sent it (the base64 string, the bytes, the URL:
the first and last ``ROUTE_SAMPLE_BYTES`` of it and its length, so the loop never hashes
megabytes), mapped to one of the workers still serving. The same image goes to the same
worker, and so does a chat that re-sends its first image with every turn. A job with no
such item goes to the worker with the fewest jobs queued or running.

The key only chooses a worker; the cache keys items by the full sha256 of their bytes
in the worker. A routing collision or a job run elsewhere costs a cache miss, never a
wrong result. A worker whose process is dead stays in the mapping: its jobs wait in its
queue for its replacement (about a second from the forkserver), as with one queue. A job
that has waited ``STEAL_AFTER_S`` in the queue of a busy, hung or restarting worker is
taken by an idle worker (a miss there, once), so no job waits behind a long one while
another worker has nothing to do. A worker that can no longer start leaves the mapping,
and its queued jobs are routed again among the others (to the parent, with none left).

Note [pool shutdown]
--------------------
sglang 0.5.5 stops on SIGTERM by draining: ``sigterm_watchdog`` waits until
``rid_to_state`` is empty, then SIGKILLs its whole process tree (``kill_process_tree``),
these workers and their forkserver included, so no ``finally`` or ``atexit`` runs in
them. The patched watchdog calls ``TokenizerSide.shutdown``, and with it
:meth:`ProcessorPool.shutdown`, right before that kill. A request enters
``rid_to_state`` only when it is sent to the scheduler, so one whose processor job still
runs in a worker (a slow image download) is not counted: the drain can end with workers
busy. Shutdown therefore

1. hands the queued jobs back to the parent (as when no worker can start);
2. closes the pipe of every idle worker: it unlinks its region and its lock file, exits;
3. kills every busy worker at once. Its request is lost in any case: the event loop is
   blocked in shutdown, and sglang kills the tree right after;
4. starts no replacement, and once every worker is gone removes every file they left
   (``_reap(force=True)``), a region whose slots a rank still leases included: the ranks
   are killed next.

Any other path to ``kill_process_tree`` (a scheduler dies and signals the launcher, an
exception in a TokenizerManager task) kills the workers without this: their files stay
until the next server's start-up sweep (``transport/liveness.py``).

A worker's region (reused shared memory; byte layout in ``transport/region.py``)
-----------------------------------------------------------------------------------
==================  ========================================================================
allocates           the worker (its ``RegionSlots``), growing within its share of the cap
writes              the worker: payload and table entries, before its reply
reads               the scheduler ranks (``scheduler_side/region_cache.py``)
releases            the parent: the creator reference, when the request scope ends; each
                    rank: its consumer reference, when its last view of the slot is freed
stale reference     refused by generation (Note [slot isolation] in ``region_cache.py``)
worker dies         its lock is free; its region and segments stay until the parent holds
                    no reference on them and every slot's refcount is 0 (ranks included),
                    then the parent retires the region and sweeps the worker's files
                    (Note [one ledger per worker])
parent dies         the worker reads EOF, unlinks its region and exits
server stops        :meth:`ProcessorPool.shutdown` (Note [pool shutdown])
whole server dies   the next start-up sweep (every worker has its own creator lock)
==================  ========================================================================
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import inspect
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any, Awaitable, Callable, Optional

from sglang_mmpre.config import Settings
from sglang_mmpre.errors import MmpreError
from sglang_mmpre.transport import liveness
from sglang_mmpre.transport.carrier import MaterializedMultimodalInputs
from sglang_mmpre.transport.descriptors import RegionDescriptor, SegmentDescriptor

__all__ = [
    "ProcessorPool",
    "ProcessorWorkerDied",
    "ProcessorWorkerHung",
    "ProcessorReplyUnreadable",
    "PooledHold",
    "PooledProcessor",
    "PooledResult",
    "WorkerSpec",
    "pool_unsupported_reason",
    "routing_key",
]

logger = logging.getLogger(__name__)

#: Seconds a worker may take to build its processor and region before the pool gives up.
START_TIMEOUT_S = 300.0
#: Seconds a worker has to exit after its pipe is closed, before it is killed.
STOP_TIMEOUT_S = 5.0
#: Seconds one job may run in a worker when sglang's ``--mm-per-request-timeout`` is unset
#: (sglang 0.5.5's default is 10 s, and then that is the deadline).
JOB_TIMEOUT_S = 300.0
#: Seconds between checks whether a dead worker's files are still needed.
REAP_INTERVAL_S = 1.0
#: Seconds a job waits in its worker's queue before an idle worker takes it (Note [routing
#: by key]): about one miss of a large image, so a hit is not given up for less.
STEAL_AFTER_S = 0.25
#: Bytes from each end of a media item that its routing key covers.
ROUTE_SAMPLE_BYTES = 1 << 14


class ProcessorWorkerDied(MmpreError, ValueError):
    """The worker process running this request's multimodal processor died.

    A ``ValueError``, as sglang's HTTP server answers those with status 400 and the message
    (any other exception gives a bare 500). Only the request that worker was processing
    fails; the pool starts a replacement. Retrying the request is safe.
    """


class ProcessorWorkerHung(ProcessorWorkerDied):
    """The worker ran this request's processor past the job deadline (sglang's
    ``--mm-per-request-timeout``, else :data:`JOB_TIMEOUT_S`): it was killed, and the pool
    starts a replacement. Only this request fails."""


class ProcessorReplyUnreadable(MmpreError, ValueError):
    """The worker's reply for this request could not be unpickled in the tokenizer
    process; the worker released the reply's tensors. Only this request fails."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build sglang's processor and its ``TokenizerSide``."""

    server_args: Any
    hf_config: Any
    transport_mode: Any
    settings: Settings  # the worker's own: its share of the cap, no pool of its own


class PooledResult(dict):
    """What the pool returns to sglang in place of the processor's dict: its
    ``input_ids``, if it had them (``_tokenize_one_request`` reads them), and the
    materialized inputs that ``TokenizerSide.materialize_request`` puts on the request."""

    def __init__(self, passed: dict, materialized: MaterializedMultimodalInputs) -> None:
        super().__init__(passed)
        self.materialized = materialized


def pool_unsupported_reason(mm_processor: Any, server_args: Any,
                            preprocessing_device: str = "auto") -> Optional[str]:
    """Why requests for this model keep today's path (the processor on the loop), or None.

    - a fast image processor that runs on an accelerator without
      ``SGLANG_MM_PREPROCESSING_DEVICE=cuda`` (``preprocessing_device.gpu_processor_reason``;
      on ``cpu``, and on a CPU server, the workers run it on the CPU); or features stay on
      the device (``--keep-mm-feature-on-device``, ``SGLANG_USE_CUDA_IPC_TRANSPORT``);
    - the processor has no ``process_mm_data_async`` coroutine.
    """
    from sglang.srt.utils import get_bool_env_var

    from sglang_mmpre.tokenizer_side.preprocessing_device import gpu_processor_reason

    reason = gpu_processor_reason(mm_processor, server_args, preprocessing_device)
    if reason is not None:
        return reason
    if getattr(server_args, "keep_mm_feature_on_device", False) or get_bool_env_var(
        "SGLANG_USE_CUDA_IPC_TRANSPORT"
    ):
        return "multimodal features stay on the GPU"
    if not inspect.iscoroutinefunction(getattr(mm_processor, "process_mm_data_async", None)):
        return f"{type(mm_processor).__name__} has no process_mm_data_async coroutine"
    return None


def _sample(item: Any) -> Optional[tuple[int, Any, Any]]:
    """A media item as the client sent it: its length, its first and its last
    ``ROUTE_SAMPLE_BYTES`` (slices; the whole item is never copied). For the bytes, or a
    string: base64 (a data URL's payload, so that it routes as the same base64 alone
    does), a URL, a path, an ``ImageData``'s URL. None for anything else."""
    item = getattr(item, "url", item)  # sglang's ImageData
    start = 0
    if isinstance(item, str):
        if item.startswith("data:"):
            start = item.find(",") + 1
    elif not isinstance(item, (bytes, bytearray)):
        return None
    n = ROUTE_SAMPLE_BYTES
    return len(item) - start, item[start:start + n], item[max(start, len(item) - n):]


def routing_key(job: dict) -> Optional[bytes]:
    """The key that picks the worker for ``job`` (Note [routing by key]): sha256 over the
    length, the first and the last ``ROUTE_SAMPLE_BYTES`` of its first image item (else
    video, else audio) as sent, or None when it has none."""
    request = job.get("request_obj")
    for items in (job.get("image_data"), getattr(request, "video_data", None),
                  job.get("audio_data")):
        if items is None:
            continue
        first = items[0] if isinstance(items, (list, tuple)) and items else items
        sample = _sample(first)
        if sample is None:
            continue
        length, head, tail = sample
        h = hashlib.sha256(b"s" if isinstance(head, str) else b"b")
        h.update(length.to_bytes(8, "big"))
        for part in (head, tail):
            h.update(part.encode("utf-8", "surrogatepass") if isinstance(part, str) else part)
        return h.digest()
    return None


class PooledHold:
    """The parent's creator reference on one reply's slots or segment (``inner``).

    It has the interface of ``SegmentWriter`` (``add_consumers``, ``release``), so the
    request scope and ``TokenizerSide.send`` treat it as any other. ``payload_nbytes`` is
    0: the bytes count against the worker's share of the cap, not the parent's.
    """

    payload_nbytes = 0

    def __init__(self, inner: Any, on_release: Callable[[], None]) -> None:
        self._inner = inner
        self._on_release = on_release
        self.written_nbytes = getattr(inner, "written_nbytes", 0)

    @property
    def released(self) -> bool:
        return self._inner.released

    def add_consumers(self, n: int) -> None:
        self._inner.add_consumers(n)

    def release(self) -> None:
        if self._inner.released:
            return
        try:
            self._inner.release()
        finally:
            self._on_release()


class _WorkerRegion:
    """The parent's handle on one worker region: its slot table, for the refcounts of the
    slots whose creator reference the parent holds (``SlotHold`` calls :meth:`adjust`)."""

    def __init__(self, shm_dir: str, name: str) -> None:
        from sglang_mmpre.scheduler_side.region_cache import open_region

        self.attached = open_region(shm_dir, name)
        self.name = name
        self.path = os.path.join(shm_dir, name)
        self.closed = False

    def adjust(self, refs: list, delta: int) -> None:
        if self.closed:
            return  # retired at shutdown: the region is gone with its references
        with self.attached.table.locked():
            for ref in refs:
                self.attached.table.add(ref.index, delta)

    def unreferenced(self) -> bool:
        """Whether no slot of its table has a reference left (no creator, no rank)."""
        return self.attached.table.referenced() == 0

    def retire(self) -> None:
        """No request names it any more: mark it retired, unlink it, close the handle."""
        from sglang_mmpre.transport.region import retire

        self.closed = True
        retire(self.attached.fd)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.attached.close()


class _Ledger:
    """Note [one ledger per worker]: everything of one worker's files that the parent
    holds, under its creator stem. A dead worker's files (its regions, its segments and
    its lock file) are removed only when (1) the parent holds no creator reference on any
    of them (``holds``: a slot reply's or an adopted segment's), (2) every slot of its
    regions has refcount 0 (ranks too: a request sent and then aborted may still be
    queued at the scheduler), and (3) no segment of it is left (a segment is unlinked by
    whoever drops its last reference). The pool checks that when a hold is released and
    every ``REAP_INTERVAL_S`` (ranks release without telling it), and only once the
    worker's creator lock is free (``transport/liveness.py``)."""

    def __init__(self, stem: str) -> None:
        self.stem = stem
        self.holds = 0
        self.regions: dict[str, _WorkerRegion] = {}
        self.gone = False


class _Worker:
    """The parent's side of one worker process (used by its thread only)."""

    def __init__(self, pool: "ProcessorPool", index: int) -> None:
        self.pool = pool
        self.index = index
        self.process: Any = None
        self.conn: Any = None
        self.credit = 0  # segment bytes released since the last job (under pool._lock)
        self.stem: Optional[str] = None  # its creator stem (liveness), once it is ready
        # Under pool._lock: the jobs routed here, (future, job, queued at), oldest first;
        # whether it runs one; whether its thread may still start it (Note [routing by key]).
        self.queue: "collections.deque[tuple]" = collections.deque()
        self.busy = False  # set by _take; shutdown kills a busy one (Note [pool shutdown])
        self.serving = True
        self.cache_stats: Any = None  # its processor cache's counters at its last reply

    def start(self) -> bool:
        """Spawn the worker and wait until it is ready; False if it could not start."""
        from sglang_mmpre.tokenizer_side.pool_worker import main
        from sglang_mmpre.tokenizer_side.preprocessing_device import worker_start_method

        method = worker_start_method(self.pool.spec.settings.preprocessing_device)
        ctx = multiprocessing.get_context(method)  # spawn: Note [preprocessing device]
        if method == "forkserver":
            ctx.set_forkserver_preload([main.__module__])
        parent, child = ctx.Pipe()
        with self.pool._lock:
            self.cache_stats = None  # a new process: an empty cache
        self.process = ctx.Process(target=main, args=(child, self.pool.spec, self.index),
                                   name=f"sglang_mmpre-processor-{self.index}", daemon=True)
        try:
            self.process.start()
        except Exception as e:  # noqa: BLE001 - e.g. this process is daemonic
            logger.error("sglang_mmpre: cannot start processor worker %d: %s", self.index, e)
            parent.close()
            child.close()
            self.process = None
            return False
        child.close()
        self.conn = parent
        try:
            if not parent.poll(START_TIMEOUT_S):
                raise EOFError("no answer")
            status, detail = parent.recv()
        except (EOFError, OSError) as e:
            status, detail = "failed", f"it exited ({self._exit()}) or did not answer: {e}"
        if status != "ready":
            self.stop()
            logger.error("sglang_mmpre: processor worker %d could not start: %s",
                         self.index, detail)
            return False
        self.stem = detail
        logger.info("sglang_mmpre: processor worker %d ready (pid %d)", self.index,
                    self.process.pid)
        return True

    def _exit(self) -> str:
        self.process.join(1.0)
        code = self.process.exitcode
        if code is None:
            return "still running"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def run(self, job: tuple) -> Any:
        """Send one job and return the reply.

        Raises :class:`_RunInParent` if the job can't be pickled (nothing was sent, the
        credit stays), :class:`ProcessorWorkerDied` if the worker died,
        :class:`ProcessorWorkerHung` past the job deadline (the caller kills it), and
        :class:`ProcessorReplyUnreadable` if the reply can't be unpickled here (the worker
        is told to drop the reply's references).
        """
        with self.pool._lock:
            credit, self.credit = self.credit, 0
        try:
            message = ForkingPickler.dumps(("job", credit, job))
        except Exception as e:  # noqa: BLE001 - e.g. a lambda among the job's arguments
            with self.pool._lock:
                self.credit += credit
            raise _RunInParent(e) from None
        try:
            self.conn.send_bytes(message)
        except (OSError, EOFError):
            pass  # died; recv below says so
        try:
            if not self.conn.poll(self.pool.job_timeout_s):
                raise ProcessorWorkerHung(
                    f"the multimodal processor worker (pid {self.process.pid}) did not finish "
                    f"this request within {self.pool.job_timeout_s:g} s "
                    "(--mm-per-request-timeout); it was killed and a new one is starting. "
                    "Look for an image or video URL that does not answer, or raise "
                    "--mm-per-request-timeout."
                )
            reply = self.conn.recv_bytes()
        except (OSError, EOFError):
            raise self._died() from None
        try:
            return ForkingPickler.loads(reply)
        except Exception as e:  # noqa: BLE001 - whatever unpickling raised
            try:
                self.conn.send_bytes(ForkingPickler.dumps(("drop",)))
            except (OSError, EOFError):
                pass  # died: its files go with it (Note [one ledger per worker])
            raise ProcessorReplyUnreadable(
                f"the reply of the multimodal processor worker (pid {self.process.pid}) for "
                f"this request could not be read ({type(e).__name__}: {e}); its tensors were "
                "released. Set SGLANG_MM_PROCESSOR_WORKERS=0 to run the processor in the "
                "tokenizer process as sglang does."
            ) from None

    def _died(self) -> "ProcessorWorkerDied":
        return ProcessorWorkerDied(
            f"the multimodal processor worker (pid {self.process.pid}) running this request "
            f"died ({self._exit()}); a new one is starting. Retry the request. If it "
            "happens again, look for the OOM killer in the kernel log, or set "
            "SGLANG_MM_PROCESSOR_WORKERS=0 to run the processor in the tokenizer "
            "process as sglang does."
        )

    def kill(self) -> None:
        """SIGKILL the worker process if it runs (from any thread: its own thread then
        reads EOF and handles it as a death)."""
        process = self.process
        if process is not None and process.is_alive():
            process.kill()

    def stop(self, kill: bool = False) -> None:
        """Close the pipe (the worker exits and unlinks its region), kill it if it lingers
        (``kill``: at once)."""
        if kill and self.process is not None and self.process.is_alive():
            self.process.kill()
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.process is not None:
            self.process.join(STOP_TIMEOUT_S)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()


class ProcessorPool:
    """``size`` processor workers for one TokenizerManager process; see the module
    docstring. The constructor returns once every worker has started (or failed to)."""

    def __init__(self, spec: WorkerSpec, size: int) -> None:
        self.spec = spec
        self.size = size
        timeout = getattr(spec.server_args, "mm_per_request_timeout", None)
        #: Seconds a job may run in a worker before it is killed (ProcessorWorkerHung).
        self.job_timeout_s = float(timeout) if timeout and timeout > 0 else JOB_TIMEOUT_S
        self._lock = threading.Lock()
        self._queued = threading.Condition(self._lock)  # a job was queued, or closing
        self._ledgers: dict[str, _Ledger] = {}  # by worker stem (under self._lock)
        self._workers = [_Worker(self, i) for i in range(size)]
        self.failed: Optional[str] = None  # set when no worker could start
        self._closed = False
        self._started = threading.Semaphore(0)  # one release per thread's first start
        self._threads = [
            threading.Thread(target=self._serve, args=(w,), daemon=True,
                             name=f"sglang_mmpre-pool-{w.index}")
            for w in self._workers
        ]
        for t in self._threads:
            t.start()
        # Wait for the first start of every worker (it overlaps the scheduler's model
        # loading), so that no early request spends sglang's per-request timeout on it.
        for _ in self._threads:
            self._started.acquire()

    # -- the parent's threads, one per worker -----------------------------------------
    def _serve(self, worker: _Worker) -> None:
        carried = None  # a job taken when the worker turned out dead: for its replacement
        first = True
        while True:
            if self._closed and not first:  # no replacement during shutdown
                self._hand_back(carried)
                return
            started = worker.start()
            if first:
                first = False
                self._started.release()
            if not started:
                self._give_up(worker, carried)
                return
            while True:
                if carried is None:
                    carried = self._take(worker)
                    if carried is _IDLE:
                        carried = None
                        self._reap()
                        continue
                item, carried = carried, None
                if item is None:
                    worker.stop()
                    self._worker_gone(worker)
                    return
                if not worker.process.is_alive():  # it died while idle: this job never ran
                    logger.error("sglang_mmpre: processor worker %d (pid %d) died while idle "
                                 "(%s); starting a new one", worker.index, worker.process.pid,
                                 worker._exit())
                    carried = item
                    worker.stop()
                    self._worker_gone(worker)
                    break
                future, job = item
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    reply = worker.run(job)
                except ProcessorWorkerDied as e:  # died, or hung and killed here
                    if self._closed:  # killed by shutdown (Note [pool shutdown])
                        e = ProcessorWorkerDied("the server is shutting down: this request's "
                                                "multimodal processing was stopped")
                    logger.error("sglang_mmpre: %s", e)
                    future.set_exception(e)
                    worker.stop(kill=isinstance(e, ProcessorWorkerHung))
                    self._worker_gone(worker)
                    break  # start a replacement (none once shut down)
                except BaseException as e:  # noqa: BLE001 - _RunInParent, unreadable reply
                    future.set_exception(e)
                    continue
                self._settle(worker, future, reply)

    def _take(self, worker: _Worker) -> Any:
        """The next job for ``worker``: its own oldest, else one that waited
        ``STEAL_AFTER_S`` in another's queue (Note [routing by key]); None once the pool
        closed and its own queue is empty; ``_IDLE`` after ``REAP_INTERVAL_S`` without."""
        deadline = time.monotonic() + REAP_INTERVAL_S
        with self._queued:
            worker.busy = False
            while True:
                if worker.queue:
                    worker.busy = True
                    return worker.queue.popleft()[:2]
                if self._closed:
                    return None
                now = time.monotonic()
                waited = [w for w in self._workers if w.queue]
                if waited:
                    oldest = min(waited, key=lambda w: w.queue[0][2])
                    due = oldest.queue[0][2] + STEAL_AFTER_S
                    if due <= now:
                        worker.busy = True
                        return oldest.queue.popleft()[:2]
                else:
                    due = deadline
                if now >= deadline:
                    return _IDLE
                self._queued.wait(min(due, deadline) - now)

    def _route(self, key: Optional[bytes]) -> Optional[_Worker]:
        """The worker a job of routing key ``key`` goes to, or None when no worker is left
        (under self._lock)."""
        live = [w for w in self._workers if w.serving]
        if not live:
            return None
        if key is None:
            return min(live, key=lambda w: len(w.queue) + w.busy)
        return live[int.from_bytes(key[:8], "big") % len(live)]

    def _give_up(self, worker: _Worker, carried: Optional[tuple]) -> None:
        """``worker`` will not start again: its queued jobs (and one it carried) are routed
        again among the workers still serving; with none left (or while closing), they go
        back to the parent, and with none left every later job runs there too."""
        with self._queued:
            worker.serving = False
            orphans = [(*carried, time.monotonic())] if carried is not None else []
            orphans.extend(worker.queue)
            worker.queue.clear()
            failed = not self._closed and not any(w.serving for w in self._workers)
            if failed:
                self.failed = "no processor worker could start (see the log above)"
            elif not self._closed:
                for entry in orphans:
                    self._route(routing_key(entry[1])).queue.append(entry)
                orphans = []
                self._queued.notify_all()
        if failed:
            logger.error("sglang_mmpre: %s; the processor runs in the tokenizer process, as "
                         "in sglang.", self.failed)
        for future, job, _ in orphans:  # back to the parent
            self._hand_back((future, job))

    @staticmethod
    def _hand_back(item: Optional[tuple]) -> None:
        """Run a job that no worker will take in the parent (unless it was cancelled)."""
        if item is not None and item[0].set_running_or_notify_cancel():
            item[0].set_exception(_RunInParent(None))

    def _settle(self, worker: _Worker, future: Future, reply: tuple) -> None:
        status, payload, cache_stats = reply
        with self._lock:
            worker.cache_stats = cache_stats
        if status == "error":
            future.set_exception(payload)
            return
        passed, materialized = payload
        try:
            materialized.writer = self._hold(worker, materialized)
        except BaseException as e:  # noqa: BLE001 - the reply's files are gone already
            future.set_exception(e)
            return
        future.set_result(PooledResult(passed, materialized))

    def _hold(self, worker: _Worker, materialized: MaterializedMultimodalInputs) -> Any:
        """The parent's creator reference on a reply's slots or segment (or None), counted
        in the worker's ledger (Note [one ledger per worker])."""
        from sglang_mmpre.tokenizer_side.slots import SlotHold
        from sglang_mmpre.transport.segment import SegmentWriter

        where = materialized.segment
        if not isinstance(where, (RegionDescriptor, SegmentDescriptor)):
            return None
        with self._lock:
            ledger = self._ledger(worker.stem)
            region = None
            if isinstance(where, RegionDescriptor):
                region = ledger.regions.get(where.name)
                if region is None:
                    region = _WorkerRegion(self.spec.settings.shm_dir, where.name)
                    ledger.regions[where.name] = region
            ledger.holds += 1
        try:
            if region is not None:
                inner = SlotHold(region, list(where.slots), 0)
                return PooledHold(inner, lambda: self._released(ledger))
            writer = SegmentWriter.adopt(self.spec.settings.shm_dir, where)
        except BaseException:
            self._released(ledger)
            raise

        def released() -> None:
            self._credit(worker, where.payload_nbytes)
            self._released(ledger)

        return PooledHold(writer, released)

    def _ledger(self, stem: str) -> _Ledger:
        """The ledger of ``stem`` (under self._lock)."""
        ledger = self._ledgers.get(stem)
        if ledger is None:
            ledger = self._ledgers[stem] = _Ledger(stem)
        return ledger

    def _credit(self, worker: _Worker, nbytes: int) -> None:
        with self._lock:
            worker.credit += nbytes

    def _released(self, ledger: _Ledger) -> None:
        with self._lock:
            ledger.holds -= 1
        if ledger.gone:
            self._reap()

    def _worker_gone(self, worker: _Worker) -> None:
        """A stopped worker: its files go once nothing needs them (Note [one ledger per
        worker]); a worker that died before it was ready left only what the start-up
        sweep of the next server removes."""
        if worker.stem is None:
            return
        with self._lock:
            self._ledger(worker.stem).gone = True
        self._reap()

    def _reap(self, force: bool = False) -> None:
        """Remove the files of every dead worker that nothing needs any more (``force``:
        at shutdown, every request has drained)."""
        shm_dir = self.spec.settings.shm_dir
        with self._lock:
            # Its lock, not ``join``, says it is dead: with the forkserver gone, ``join``
            # answers at once for a worker that is still exiting.
            done = [ledger for ledger in self._ledgers.values() if ledger.gone
                    and not liveness.creator_alive(shm_dir, ledger.stem)
                    and (force or (ledger.holds == 0 and self._unused(ledger)))]
            for ledger in done:
                del self._ledgers[ledger.stem]
        for ledger in done:
            try:
                for region in ledger.regions.values():
                    if not region.closed:
                        region.retire()
                liveness.sweep(shm_dir, only=ledger.stem)
            except OSError:
                logger.exception("sglang_mmpre: removing the files of %s failed", ledger.stem)

    def _unused(self, ledger: _Ledger) -> bool:
        """No slot of its regions referenced, and no segment of it left (under self._lock).

        A region that no reply named (the worker died before its first) is opened here,
        to be checked and retired as the others."""
        from sglang_mmpre.errors import MultimodalTransportError

        shm_dir = self.spec.settings.shm_dir
        prefix = ledger.stem + "_"
        try:
            names = [n for n in os.listdir(shm_dir) if n.startswith(prefix)]
        except OSError:
            names = []
        segments = False
        for name in names:
            if name in ledger.regions:
                continue
            try:
                ledger.regions[name] = _WorkerRegion(shm_dir, name)
            except MultimodalTransportError:  # a segment (or gone meanwhile)
                segments = segments or os.path.exists(os.path.join(shm_dir, name))
        return not segments and all(r.unreferenced() for r in ledger.regions.values())

    # -- the event loop's side ----------------------------------------------------------
    def submit(self, job: dict) -> Future:
        """Queue one processor call with the worker its routing key names (Note [routing
        by key]); the future gives a :class:`PooledResult`, raises what the processor
        raised, :class:`ProcessorWorkerDied`, or ``_RunInParent``."""
        future: Future = Future()
        key = routing_key(job)
        with self._queued:  # _give_up hands queued jobs back once failed is set
            worker = self._route(key) if self.failed is None and not self._closed else None
            if worker is not None:
                worker.queue.append((future, job, time.monotonic()))
                self._queued.notify_all()
                return future
        future.set_exception(_RunInParent(None))
        return future

    def cache_stats(self) -> list:
        """Each worker's processor cache counters (``processor_cache.CacheStats``) as its
        last reply gave them; None for a worker with no reply yet, or the cache off. A
        replacement starts from zero (its cache is empty)."""
        with self._lock:
            return [w.cache_stats for w in self._workers]

    def shutdown(self) -> None:
        """Stop every worker and remove every file of theirs: Note [pool shutdown]."""
        with self._queued:  # submit() queues nothing once closed
            if self._closed:
                return
            self._closed = True
            queued = [entry for w in self._workers for entry in w.queue]
            for w in self._workers:
                w.queue.clear()
            self._queued.notify_all()
        for future, job, _ in queued:
            self._hand_back((future, job))
        for worker in self._workers:
            if worker.busy:
                worker.kill()
        for worker, t in zip(self._workers, self._threads):
            t.join(STOP_TIMEOUT_S + 2.0)
            if t.is_alive():  # it took a job after the check above
                worker.kill()
                t.join(STOP_TIMEOUT_S + 2.0)
        with self._lock:
            for ledger in self._ledgers.values():
                ledger.gone = True
        self._reap(force=True)


_IDLE = object()  # _take: no job for REAP_INTERVAL_S


class _RunInParent(Exception):
    """Internal: the pool can't take this job (``cause``); it runs in the parent."""

    def __init__(self, cause: Optional[BaseException]) -> None:
        super().__init__(repr(cause))
        self.cause = cause



class PooledProcessor:
    """What sglang's ``AsyncMMDataProcessor`` calls when the pool is on.

    ``local`` is sglang's processor in this process: jobs the pool can't take run there,
    as today. ``await_held`` is ``TokenizerSide.await_held`` (the request scope takes the
    reply's creator reference).
    """

    def __init__(self, pool: ProcessorPool, local: Any,
                 await_held: Callable[[Any], Awaitable[Any]]) -> None:
        self.pool = pool
        self.local = local
        self._await_held = await_held

    async def process_mm_data_async(self, **job: Any) -> Any:
        future = self.pool.submit(job)
        try:
            return await self._await_held(asyncio.wrap_future(future))
        except _RunInParent:
            return await self.local.process_mm_data_async(**job)
        except asyncio.CancelledError:
            future.cancel()  # still queued: never runs (running: the scope releases it)
            raise
