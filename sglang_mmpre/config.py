"""Runtime settings, read from ``SGLANG_*`` environment variables (sglang's convention).

====================================  ==========  ===========================================
variable                              default     meaning
====================================  ==========  ===========================================
``SGLANG_MM_PREMATERIALIZE``          ``1``       ``0`` turns the tokenizer-stage path off:
                                                  requests carry the raw dict again and every
                                                  scheduler rank runs ``from_dict`` locally
                                                  (sglang 0.5.4 behaviour).
``SGLANG_MM_SHM_CAP_BYTES``           half of     bytes of shared memory one TokenizerManager
                                      the shm dir process may hold at once (its region plus
                                                  its segments); past it requests travel
                                                  inline.
``SGLANG_MM_SHM_REGION_CHUNK_BYTES``  256 MiB     the warm region's start-up size and growth
                                                  step (``transport/region.py``), rounded up
                                                  to a page; ``0``, or more than the cap: no
                                                  region, one segment per request.
``SGLANG_MM_SHM_DEDUP``               ``1``       ``0``: copy every item even when its content
                                                  is already in a live slot (measurements).
``SGLANG_MM_SHM_DIR``                 /dev/shm    where the region and segments live (tmpfs).
``SGLANG_MM_MATERIALIZE_THREADS``     2           worker threads that hash and copy off the
                                                  loop.
``SGLANG_MM_PROCESSOR_WORKERS``       half the    worker processes per TokenizerManager
                                      usable      process that run the model's multimodal
                                      cores, 2-8  processor and materialize its output
                                                  (``tokenizer_side/pool.py``); ``0``: the
                                                  processor runs on the event loop, as in
                                                  sglang 0.5.5.
``SGLANG_MM_PROCESSOR_CACHE_BYTES``   1 GiB       bytes of image processor outputs each
                                                  TokenizerManager process keeps for
                                                  repeated images, split across its processor
                                                  workers, in their regions' unreferenced
                                                  slots (at most half a worker's share of the
                                                  cap; ``tokenizer_side/
                                                  processor_cache.py``); ``0`` turns it off.
``SGLANG_MM_PREPROCESSING_DEVICE``    ``auto``    where a fast (torchvision) image processor
                                                  runs: ``cpu``, ``cuda`` or ``auto`` (``cpu``
                                                  on a ``--device cpu`` server, else sglang's
                                                  own choice). Note [preprocessing device] in
                                                  ``tokenizer_side/preprocessing_device.py``.
====================================  ==========  ===========================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

__all__ = [
    "Settings",
    "load_settings",
    "consumers_per_send",
    "scheduler_consumers_per_send",
    "shm_unusable_reason",
    "shm_dir",
    "DEFAULT_REGION_CHUNK_BYTES",
    "DEFAULT_PROCESSOR_CACHE_BYTES",
    "PREPROCESSING_DEVICES",
    "default_processor_workers",
]

_TRUE = {"1", "true", "yes", "on"}
DEFAULT_REGION_CHUNK_BYTES = 256 << 20
#: ``SGLANG_MM_PROCESSOR_CACHE_BYTES`` by default: per TokenizerManager process, split
#: across its processor workers (``tokenizer_side/processor_cache.py``).
DEFAULT_PROCESSOR_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class Settings:
    """Settings of one process; see the module docstring for the variables. Built by hand
    (tests), it has no region unless ``region_chunk_bytes`` is given."""

    enabled: bool
    shm_dir: str
    shm_cap_bytes: int
    threads: int
    region_chunk_bytes: int = 0
    dedup: bool = True
    processor_workers: int = 0
    processor_cache_bytes: int = 0
    preprocessing_device: str = "auto"


def _default_cap(shm_dir: str) -> int:
    try:
        st = os.statvfs(shm_dir)
    except OSError:
        return 0
    return (st.f_blocks * st.f_frsize) // 2


def default_processor_workers() -> int:
    """Half the cores this process may run on, at least 2 and at most 8.

    One worker handles the images of a burst one after another. On 2 cores, two workers
    served 1.26x as many 1120x700 requests as one at concurrency 16 (a run whose images hit
    sglang's embedding cache), and as many where the ranks' forward was the bottleneck
    (benchmarks/results/README.md, "The processor pool")."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(2, min(8, cores // 2))


def shm_dir(environ: Optional[dict[str, str]] = None) -> str:
    """The directory segments live in (``SGLANG_MM_SHM_DIR``, default ``/dev/shm``)."""
    env = os.environ if environ is None else environ
    return env.get("SGLANG_MM_SHM_DIR", "/dev/shm")


def load_settings(environ: Optional[dict[str, str]] = None) -> Settings:
    """Read the settings from ``environ`` (default: ``os.environ``)."""
    env = os.environ if environ is None else environ
    directory = shm_dir(env)
    cap = env.get("SGLANG_MM_SHM_CAP_BYTES")
    return Settings(
        enabled=env.get("SGLANG_MM_PREMATERIALIZE", "1").strip().lower() in _TRUE,
        shm_dir=directory,
        shm_cap_bytes=int(cap) if cap is not None else _default_cap(directory),
        threads=max(1, int(env.get("SGLANG_MM_MATERIALIZE_THREADS", "2"))),
        region_chunk_bytes=max(0, int(env.get("SGLANG_MM_SHM_REGION_CHUNK_BYTES",
                                              str(DEFAULT_REGION_CHUNK_BYTES)))),
        dedup=env.get("SGLANG_MM_SHM_DEDUP", "1").strip().lower() in _TRUE,
        processor_workers=max(0, int(env.get("SGLANG_MM_PROCESSOR_WORKERS",
                                             str(default_processor_workers())))),
        processor_cache_bytes=max(0, int(env.get("SGLANG_MM_PROCESSOR_CACHE_BYTES",
                                                 str(DEFAULT_PROCESSOR_CACHE_BYTES)))),
        preprocessing_device=_preprocessing_device(env),
    )


#: The values of ``SGLANG_MM_PREPROCESSING_DEVICE``.
PREPROCESSING_DEVICES = ("auto", "cpu", "cuda")


def _preprocessing_device(env: Any) -> str:
    value = env.get("SGLANG_MM_PREPROCESSING_DEVICE", "auto").strip().lower()
    if value not in PREPROCESSING_DEVICES:
        raise ValueError(f"SGLANG_MM_PREPROCESSING_DEVICE={value!r}: use auto, cpu or cuda")
    return value


def consumers_per_send(server_args: Any) -> int:
    """How many scheduler ranks map a segment each time its request is sent.

    A request reaches the first pipeline stage's entry rank, which ``broadcast_pyobj``s it
    to its group; every later pipeline stage receives it too (``point_to_point_pyobj``) and
    broadcasts it to its own group. Every rank of the group calls ``handle_generate_request``.

    - TP (and DP without DP-attention: the controller picks one replica of ``tp_size``
      ranks): ``tp_size`` ranks per stage.
    - DP-attention: requests are broadcast in the attention-TP group of one DP rank only,
      of ``tp_size // dp_size`` ranks.
    - PP: times ``pp_size`` stages.
    """
    tp = int(server_args.tp_size)
    if getattr(server_args, "enable_dp_attention", False):
        tp = tp // max(1, int(server_args.dp_size))
    return max(1, tp) * max(1, int(getattr(server_args, "pp_size", 1) or 1))


def scheduler_consumers_per_send(scheduler: Any) -> int:
    """The same count as seen by a running ``Scheduler`` from its own group sizes."""
    if scheduler.server_args.enable_dp_attention:
        group = scheduler.attn_tp_size
    else:
        group = scheduler.tp_size
    return max(1, int(group)) * max(1, int(scheduler.pp_size))


def shm_unusable_reason(server_args: Any) -> Optional[str]:
    """Why shared memory can't reach every rank, judged as sglang 0.5.5's
    ``_determine_tensor_transport_mode`` judges it (a ``dist_init_addr`` means ranks may
    be on other nodes), or ``None`` when it can."""
    if getattr(server_args, "dist_init_addr", None) or int(
        getattr(server_args, "nnodes", 1) or 1
    ) > 1:
        return (
            "scheduler ranks may run on other nodes (--dist-init-addr / --nnodes > 1), "
            "where this node's shared memory is not visible"
        )
    return None
