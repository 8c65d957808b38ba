"""What the patched TokenizerManager calls: :class:`TokenizerSide`.

Four call sites in ``tokenizer_manager.py``:

1. ``__init__``: ``self.mmpre = TokenizerSide(server_args)`` (sweeps dead segments, then
   allocates this process's warm region: ``tokenizer_side/slots.py``, unless a processor
   pool will do the materializing);
2. ``__init__``, for a multimodal model: ``self.mm_data_processor =
   self.mmpre.processor_pool(...)`` starts the pool of processor worker processes
   (``tokenizer_side/pool.py``) when the model's processor can run in one;
3. ``_tokenize_one_request``: ``return await self.mmpre.materialize_request(obj)`` on the
   tokenized object, after sglang's processor and validation have run;
4. every ``send_to_scheduler.send_pyobj`` of a tokenized request goes through
   ``self.mmpre.send(socket, obj)``, and ``generate_request`` runs inside
   ``with self.mmpre.request_scope():``.

Note [creator reference]: a segment's creator holds one reference from creation until the
request can't be sent again. Parallel sampling sends one tokenized object 1 + n times, so
that is not "after the first send": it is when ``generate_request`` leaves its scope
(finished, aborted, failed or disconnected). Without a scope, a segment is released right
after its single send. A materialization still running when its scope closes (the task
was cancelled) releases its segment itself, so no path leaves one behind. A request whose
tensors are in slots of the region holds them the same way (``SlotHold``, which has the
segment writer's interface); when the region is full, a segment is made, and past the cap
the tensors travel inline.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Iterator, Optional

from sglang_mmpre.config import Settings, consumers_per_send, load_settings, shm_unusable_reason
from sglang_mmpre.errors import SegmentAllocationError
from sglang_mmpre.tokenizer_side.materialize import materialize, materialize_into_region, pack, plan
from sglang_mmpre.tokenizer_side.pool import (
    PooledProcessor,
    PooledResult,
    ProcessorPool,
    WorkerSpec,
    pool_unsupported_reason,
)
from sglang_mmpre.tokenizer_side.slots import RegionFull, RegionSlots
from sglang_mmpre.transport.carrier import MaterializedMultimodalInputs, raw_mm_field
from sglang_mmpre.transport import liveness
from sglang_mmpre.transport.segment import SegmentWriter

__all__ = ["TokenizerSide", "RequestScope"]

logger = logging.getLogger(__name__)

#: Entries of the region's slot table: the most slots in use at once (each request takes
#: one per item plus one for its other tensors); past it, requests take segments.
SLOT_COUNT = 4096

_current_scope: contextvars.ContextVar[Optional["RequestScope"]] = contextvars.ContextVar(
    "sglang_mmpre_request_scope", default=None
)


class RequestScope:
    """The segments created for one ``generate_request`` call; see Note [creator reference]."""

    def __init__(self, side: "TokenizerSide") -> None:
        self._side = side
        self._lock = threading.Lock()
        self._writers: list[SegmentWriter] = []
        self.closed = False

    def adopt(self, writer: SegmentWriter) -> None:
        """Hold ``writer``'s creator reference until :meth:`close` (or drop it now if closed)."""
        with self._lock:
            if not self.closed:
                self._writers.append(writer)
                return
        self._side.release(writer)

    def close(self) -> None:
        """Release every segment, even if one release raises; then raise the first error."""
        with self._lock:
            self.closed = True
            writers, self._writers = self._writers, []
        first: Optional[BaseException] = None
        for writer in writers:
            try:
                self._side.release(writer)
            except BaseException as e:  # noqa: BLE001 - re-raised below, once all are released
                if first is None:
                    first = e
                else:
                    logger.exception("sglang_mmpre: releasing segment %s failed", writer.name)
        if first is not None:
            raise first


class TokenizerSide:
    """Per-TokenizerManager-process state: settings, worker threads, held bytes.

    One exists in every TokenizerManager process (each ``--tokenizer-worker-num`` worker
    builds its own), and one in each of its processor pool workers (``sweep=False``: a
    dead sibling's region may still serve requests).
    """

    def __init__(self, server_args: Any, settings: Optional[Settings] = None, *,
                 sweep: bool = True) -> None:
        self.settings = settings or load_settings()
        self.consumers = consumers_per_send(server_args)
        self._no_shm_reason = shm_unusable_reason(server_args)
        self._pool: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()
        self._held_bytes = 0
        self._region_bytes = 0
        self._warned: set[str] = set()
        self.region: Optional[RegionSlots] = None
        self.pool: Optional[ProcessorPool] = None
        if self.settings.enabled:
            if sweep:
                liveness.sweep(self.settings.shm_dir)
            if self._no_shm_reason is None and self.settings.processor_workers == 0:
                self._start_region()

    def processor_pool(self, data_processor: Any, hf_config: Any, server_args: Any,
                       transport_mode: Any) -> Any:
        """sglang's ``AsyncMMDataProcessor`` (same concurrency cap and timeout) over a
        :class:`ProcessorPool`, or ``data_processor`` itself when the pool is off
        (``SGLANG_MM_PROCESSOR_WORKERS=0``), shared memory can't reach every rank
        (``--nnodes > 1``: no region anywhere, every tensor inline), or this model's
        processor can't run in one (``pool_unsupported_reason``); then this process
        allocates its own region."""
        workers = self.settings.processor_workers
        if not self.settings.enabled or workers <= 0:
            return data_processor
        if self._no_shm_reason is not None:
            # Inline transport: a worker's reply would carry every tensor through its pipe.
            logger.info("sglang_mmpre: no processor pool: %s.", self._no_shm_reason)
            return data_processor
        reason = pool_unsupported_reason(data_processor.mm_processor, server_args,
                                         self.settings.preprocessing_device)
        if reason is not None:
            logger.info("sglang_mmpre: no processor pool for this model: %s.", reason)
            self._start_region()
            return data_processor
        from sglang.srt.managers.async_mm_data_processor import AsyncMMDataProcessor

        from sglang_mmpre.tokenizer_side.preprocessing_device import run_fast_processor_on

        # A job the pool can't take runs here, on the workers' device.
        run_fast_processor_on(data_processor.mm_processor, server_args,
                              self.settings.preprocessing_device)
        own = replace(self.settings, processor_workers=0,
                      shm_cap_bytes=self.settings.shm_cap_bytes // workers,
                      processor_cache_bytes=self.settings.processor_cache_bytes // workers)
        self.pool = ProcessorPool(WorkerSpec(server_args, hf_config, transport_mode, own),
                                  workers)
        logger.info("sglang_mmpre: multimodal processor pool of %d worker process(es)", workers)
        return AsyncMMDataProcessor(
            PooledProcessor(self.pool, data_processor.mm_processor, self.await_held),
            max_concurrent_calls=server_args.mm_max_concurrent_calls,
            timeout_s=server_args.mm_per_request_timeout,
        )

    def _start_region(self) -> None:
        """Allocate and fault in the first chunk of this process's region (if configured,
        and only where every rank can open it: ``shm_unusable_reason``)."""
        chunk = self.settings.region_chunk_bytes
        if chunk <= 0 or self._no_shm_reason is not None:
            return
        chunk = (chunk + 4095) // 4096 * 4096
        if chunk > self.settings.shm_cap_bytes:
            self.warn_once("region", f"no warm shared-memory region: its chunk ({chunk} bytes) is "
                           f"above the cap ({self.settings.shm_cap_bytes} bytes); every request "
                           "takes a segment. Lower SGLANG_MM_SHM_REGION_CHUNK_BYTES.")
            return
        t0 = time.perf_counter()
        try:
            self.region = RegionSlots(self.settings.shm_dir, chunk, SLOT_COUNT,
                                      self._reserve_region, self.settings.dedup)
        except SegmentAllocationError as e:
            self.warn_once("region", f"no warm shared-memory region: {e} Requests take segments.")
            return
        self._region_bytes += chunk  # a lost region (see _live_region) stays counted
        atexit.register(self.region.close)
        logger.info("sglang_mmpre: shared-memory region %s: %d MiB faulted in, %.0f ms",
                    self.region.name, chunk >> 20, (time.perf_counter() - t0) * 1000)

    def _live_region(self) -> Optional[RegionSlots]:
        """The region, or a new one if something deleted its file from outside.

        Requests already sent into the lost region are decided by the entry rank (refused
        on every rank if it can't attach it). The lost region stays mapped here and counted
        against the cap: its in-flight slots are still released into it, and ranks that
        attached it keep serving them.
        """
        region = self.region
        if region is None or not region.file.vanished():
            return region
        with self._lock:
            lost = self.region is region
            if lost:
                self.region = None
        if lost:
            self.warn_once("region_lost", f"shared-memory region {region.name} was deleted from "
                           "outside (systemd RemoveIPC=yes, a cleanup job, rm): starting a new "
                           "one. Keep cleanup jobs away from sglmmpre_* files, or give this "
                           "server its own SGLANG_MM_SHM_DIR.")
            self._start_region()
        return self.region

    def _reserve_region(self, nbytes: int) -> bool:
        """Count ``nbytes`` more (or fewer) of region against the cap; False if over it."""
        with self._lock:
            if nbytes > 0 and self._held_bytes + self._region_bytes + nbytes > self.settings.shm_cap_bytes:
                return False
            self._region_bytes += nbytes
            return True

    # -- materialization -------------------------------------------------------------
    @property
    def held_bytes(self) -> int:
        """Payload bytes of segments whose creator reference this process still holds."""
        return self._held_bytes

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self.settings.threads, thread_name_prefix="sglang_mmpre"
            )
        return self._pool

    def warn_once(self, cause: str, message: str) -> None:
        if cause not in self._warned:
            self._warned.add(cause)
            logger.warning("sglang_mmpre: %s", message)

    def build(self, mm_dict: dict) -> MaterializedMultimodalInputs:
        """Materialize ``mm_dict`` into region slots, else a segment, else inline. Thread-safe.

        Where shared memory can't reach every rank (``--nnodes > 1``), always inline: the
        entry rank would vouch for a file its peers on other nodes can't open."""
        if self._no_shm_reason is not None:
            self.warn_once("remote", f"multimodal tensors travel inline: {self._no_shm_reason}.")
            return MaterializedMultimodalInputs(materialize(mm_dict))
        region = self._live_region()
        if region is not None:
            try:
                return materialize_into_region(mm_dict, region, self.consumers)
            except RegionFull:
                self.warn_once("full", "the shared-memory region is full (at the cap, or no slot "
                               "fits); requests take a segment each meanwhile. Raise "
                               "SGLANG_MM_SHM_CAP_BYTES if this persists.")
        inputs = materialize(mm_dict)
        layout = plan(inputs)
        if not layout.leaves:  # e.g. CUDA-resident features: nothing for shared memory
            return MaterializedMultimodalInputs(inputs)
        need = layout.payload_nbytes
        with self._lock:
            over_cap = self._held_bytes + self._region_bytes + need > self.settings.shm_cap_bytes
            if not over_cap:
                self._held_bytes += need
        if over_cap:
            self.warn_once(
                "cap",
                f"shared-memory cap of {self.settings.shm_cap_bytes} bytes reached; requests "
                "past it travel inline (pickled) until segments are released. Raise "
                "SGLANG_MM_SHM_CAP_BYTES (and /dev/shm, docker --shm-size) if this persists.",
            )
            return MaterializedMultimodalInputs(inputs)
        try:
            return pack(inputs, layout, self.settings.shm_dir, self.consumers)
        except SegmentAllocationError as e:
            self._uncount(need)
            self.warn_once("alloc", f"{e} Falling back to inline transport.")
            return MaterializedMultimodalInputs(inputs)
        except BaseException:
            self._uncount(need)
            raise

    def _uncount(self, nbytes: int) -> None:
        with self._lock:
            self._held_bytes -= nbytes

    # -- in a pool worker (pool_worker.py) ---------------------------------------------
    def credit(self, nbytes: int) -> None:
        """Segment bytes whose creator reference the pool's parent has released."""
        if nbytes:
            self._uncount(nbytes)

    @staticmethod
    def hand_over(writer: Any) -> None:
        """Leave ``writer``'s creator reference to the pool's parent, which took it over
        (slots need nothing: their references live in the region's table)."""
        if isinstance(writer, SegmentWriter):
            writer.hand_over()

    def release(self, writer: SegmentWriter) -> None:
        """Drop a segment's creator reference (idempotent); its bytes leave the cap even if
        that raises."""
        if writer.released:
            return
        try:
            writer.release()
        finally:
            self._uncount(writer.payload_nbytes)

    async def materialize_request(self, tokenized_obj: Any) -> Any:
        """Replace the raw multimodal dict of ``tokenized_obj`` by materialized inputs.

        Runs in a worker thread; the event loop only awaits. Returns ``tokenized_obj``.
        A processor pool's result is materialized already (and held by the scope).
        """
        field = raw_mm_field(tokenized_obj)
        raw = getattr(tokenized_obj, field) if field else None
        if isinstance(raw, PooledResult):
            materialized = raw.materialized
        elif not self.settings.enabled or not isinstance(raw, dict):
            return tokenized_obj
        else:
            loop = asyncio.get_running_loop()
            materialized = await self.await_held(
                loop.run_in_executor(self._executor(), self.build, raw))
        setattr(tokenized_obj, field, None)
        tokenized_obj.materialized_mm_inputs = materialized
        return tokenized_obj

    async def await_held(self, future: "asyncio.Future") -> Any:
        """Await ``future`` (materialized inputs, or a :class:`PooledResult`) and hand the
        creator reference in its result to the request scope; see Note [creator reference].

        The reference is taken on the loop once the result is there, even if the awaiting
        task was cancelled meanwhile (then the closed scope, or this, releases it).
        """
        scope = _current_scope.get()
        awaiting_cancelled = False

        def _adopt_or_release(fut) -> None:
            if fut.cancelled() or fut.exception() is not None:
                return
            result = fut.result()
            writer = (result.materialized if isinstance(result, PooledResult) else result).writer
            if writer is None:
                return
            if scope is not None:
                scope.adopt(writer)
            elif awaiting_cancelled:
                self.release(writer)

        future.add_done_callback(_adopt_or_release)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            awaiting_cancelled = True
            raise

    # -- sending ---------------------------------------------------------------------
    @staticmethod
    def _writers_of(obj: Any) -> Iterator[SegmentWriter]:
        reqs = getattr(obj, "batch", None)
        for req in reqs if isinstance(reqs, list) else [obj]:
            m = getattr(req, "materialized_mm_inputs", None)
            if m is not None and m.writer is not None:
                yield m.writer

    def send(self, socket: Any, obj: Any) -> None:
        """``socket.send_pyobj(obj)``, counting each segment's consumers first."""
        writers = list(self._writers_of(obj))
        counted: list[SegmentWriter] = []
        try:
            for writer in writers:
                writer.add_consumers(self.consumers)
                counted.append(writer)
            socket.send_pyobj(obj)
        except BaseException:
            for writer in counted:
                writer.add_consumers(-self.consumers)
            raise
        if _current_scope.get() is None:
            for writer in writers:
                self.release(writer)

    def release_unsent(self, tokenized_obj: Any) -> None:
        """Drop the creator reference of a request that will not be sent (no scope)."""
        for writer in self._writers_of(tokenized_obj):
            self.release(writer)

    @contextlib.contextmanager
    def request_scope(self) -> Iterator[RequestScope]:
        """Hold the creator references of segments made inside; see Note [creator reference]."""
        scope = RequestScope(self)
        previous = _current_scope.get()
        _current_scope.set(scope)
        try:
            yield scope
        finally:
            # set(), not reset(): an async generator may be closed from another context.
            _current_scope.set(previous)
            scope.close()

    def shutdown(self) -> None:
        """Stop the worker threads, unlink the region (ranks keep their mappings), and
        remove this process's lock file if no file of ours is left. The patched
        ``sigterm_watchdog`` calls it once every request has drained, right before sglang
        kills its own process tree (where no ``atexit`` runs)."""
        if self.pool is not None:
            self.pool.shutdown()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        if self.region is not None:
            self.region.close()
        liveness.release_held()
