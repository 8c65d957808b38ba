"""One processor worker process: sglang's processor, then this project's materialization.

Started by ``pool.ProcessorPool`` from a forkserver that imported this module (so sglang,
torch, transformers and sglang's processor modules are loaded once, and a replacement
starts in about a second), or spawned where it may use CUDA (Note [preprocessing device]
in ``preprocessing_device.py``); see Note [processor pool] in ``pool.py``. The pipe to the
parent carries, one at a time::

    parent -> worker   ("job", credit, job)  credit: segment bytes the parent released
                                             since the last job; job: the keyword
                                             arguments of process_mm_data_async
                       ("drop",)             the parent could not unpickle the last
                                             reply: release its slots or segment
    worker -> parent   ("ready", creator stem) once, then per job one of
                       ("ok", ({"input_ids": ...} or {}, MaterializedMultimodalInputs),
                        stats)
                       ("error", the exception the processor raised, stats)
                       stats: its processor cache's counters (CacheStats), or None

The creator reference of an "ok" reply passes to the parent with the parent's next
message (or EOF), unless that message is "drop".

The worker exits when the parent closes its end (shutdown, or the parent died), after
unlinking its region. It ignores SIGINT and SIGTERM: a stop signal sent to the whole
process group (Ctrl-C, ``systemctl stop``) must not fail the requests the parent is still
draining; the parent closes the pipe once they are done.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import signal
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Optional

from sglang.srt.managers.multimodal_processor import get_mm_processor, import_processors
from sglang.srt.server_args import set_global_server_args_for_tokenizer
from sglang.srt.utils.hf_transformers_utils import get_processor

from sglang_mmpre.tokenizer_side.manager import TokenizerSide
from sglang_mmpre.tokenizer_side.processor_cache import CacheBypass, ProcessorCache
from sglang_mmpre.tokenizer_side.preprocessing_device import run_fast_processor_on
from sglang_mmpre.transport import liveness

__all__ = ["main"]

logger = logging.getLogger(__name__)

import_processors("sglang.srt.multimodal.processors")  # once per forkserver (or spawned worker)


#: A worker's log lines (``index`` filled in; the main job sums each worker's cache counts).
LOG_FORMAT = ("[%(asctime)s] sglang_mmpre processor worker {index} (pid %(process)d): "
              "%(message)s")


def _load_processor(server_args: Any) -> Any:
    """The HF processor, loaded as ``TokenizerManager.__init__`` loads it."""
    kwargs = dict(tokenizer_mode=server_args.tokenizer_mode,
                  trust_remote_code=server_args.trust_remote_code,
                  revision=server_args.revision)
    try:
        return get_processor(server_args.tokenizer_path,
                             use_fast=not server_args.disable_fast_image_processor, **kwargs)
    except ValueError as e:
        if "does not have a slow version" not in str(e):
            raise
        return get_processor(server_args.tokenizer_path, use_fast=True, **kwargs)


def _build(spec: Any) -> tuple[Any, Any]:
    """sglang's multimodal processor object and this worker's ``TokenizerSide``."""
    set_global_server_args_for_tokenizer(spec.server_args)
    mm_processor = get_mm_processor(spec.hf_config, spec.server_args,
                                    _load_processor(spec.server_args), spec.transport_mode)
    # A fast image processor runs where SGLANG_MM_PREPROCESSING_DEVICE says, through
    # sglang's own process_mm_data (Note [preprocessing device]).
    run_fast_processor_on(mm_processor, spec.server_args, spec.settings.preprocessing_device)
    # sglang's LLaVA processor sends each image to its own process pool (fork, one process
    # per core; a daemonic worker may not start them): here it runs in the worker itself.
    if isinstance(getattr(mm_processor, "cpu_executor", None), ProcessPoolExecutor):
        mm_processor.cpu_executor.shutdown(wait=False)
        mm_processor.cpu_executor = ThreadPoolExecutor(max_workers=1)
    # No sweep here: a dead sibling's region may still serve requests (pool.py).
    side = TokenizerSide(spec.server_args, spec.settings, sweep=False)
    return mm_processor, side


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any unpicklable exception
        return RuntimeError(f"{type(error).__name__}: {error}")


def _process(loop: Any, mm_processor: Any, cache: Optional[ProcessorCache], job: dict) -> dict:
    """sglang's processor on ``job``, through the processor cache when there is one."""
    if cache is None:
        return loop.run_until_complete(mm_processor.process_mm_data_async(**job))
    outcome = "failed"
    try:
        mm_dict = loop.run_until_complete(
            mm_processor.process_mm_data_async(**cache.prepare(job)))
        outcome = "served"
        return mm_dict
    except CacheBypass as e:
        outcome = "bypassed"
        logger.warning("processor cache bypassed for one request (%s): processing it "
                       "without the cache", e)
    finally:
        cache.finish(outcome)
    return loop.run_until_complete(mm_processor.process_mm_data_async(**job))


def _serve(conn: Any, mm_processor: Any, side: Any) -> None:
    loop = asyncio.new_event_loop()
    pending = None  # the creator reference of the last reply, until the parent's next word
    cache = ProcessorCache.install(mm_processor, side.settings.processor_cache_bytes, side)
    if cache is not None:
        logger.info("processor cache of %.0f MiB", cache.capacity / 2**20)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            if pending is not None:
                side.hand_over(pending)
            return
        if pending is not None:
            # "drop": the parent could not read the reply; else it took the reference.
            (side.release if message[0] == "drop" else side.hand_over)(pending)
            pending = None
        if message[0] != "job":
            continue
        _, credit, job = message
        side.credit(credit)
        try:
            mm_dict = _process(loop, mm_processor, cache, job)
            # what _tokenize_one_request reads of the dict (LLaVA's has no input_ids)
            passed = {k: mm_dict[k] for k in ("input_ids",) if k in mm_dict}
            materialized = side.build(mm_dict)
        except Exception as e:  # noqa: BLE001 - the processor's error goes to the request
            conn.send(("error", _portable(e), cache and cache.snapshot()))
            continue
        writer = materialized.writer
        try:
            conn.send(("ok", (passed, materialized), cache and cache.snapshot()))
        except BaseException:
            if writer is not None:
                side.release(writer)  # the parent never got it
            raise
        pending = writer


def main(conn: Any, spec: Any, index: int) -> None:
    """Entry point of worker ``index`` (``multiprocessing`` target). It is named
    ``sglang::mm_processor_<index>``, as sglang names its own processes."""
    try:
        import setproctitle

        setproctitle.setproctitle(f"sglang::mm_processor_{index}")
    except ImportError:  # pragma: no cover - sglang depends on it
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The workers share the server's stderr: each line names its worker.
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT.format(index=index),
                        force=True)  # the imports may have configured the root logger
    try:
        mm_processor, side = _build(spec)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which goes on without
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    try:
        conn.send(("ready", liveness.creator_stem(spec.settings.shm_dir)))
        _serve(conn, mm_processor, side)
    finally:
        side.shutdown()
