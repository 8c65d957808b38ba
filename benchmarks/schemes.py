"""The seven multimodal-input schemes compared by ``compare_schemes`` and
``test_bench_scheduler_side``: inputs, tokenizer-side work and scheduler-side work.

=========================  ===========================================================
mode                       what happens to one request's multimodal inputs
=========================  ===========================================================
``original``               sglang 0.5.4: the raw processor dict travels (pickled); every
                           scheduler rank runs ``MultimodalInputs.from_dict`` (which hashes
                           the feature) on the copy it received.
``per_request_broadcast``  sglang 0.5.5 as shipped (PR #11910): sglang's real, unbound
                           ``Scheduler._process_and_broadcast_mm_inputs`` per request: the
                           entry rank runs ``from_dict`` and ``broadcast_object_list``s it.
``batch_broadcast``        the seed's first fix: per receive batch, the entry rank runs
                           ``from_dict`` for every multimodal request, one
                           ``broadcast_object_list({rid: inputs})``, every rank keeps a
                           FIFO-bounded (1000) ``rid -> inputs`` cache popped on use
                           (local ``from_dict`` if missing); skipped when TP == 1.
``upstream_shm_barrier``   the design upstream SGLang adopted later (PR #14354 precomputed
                           hash, ``ShmPointerMMData`` transport): the tokenizer sets the item
                           hash (sglang's own ``set_pad_value``, synchronously, as upstream
                           does) and puts each feature tensor in its own POSIX shm segment
                           (``multiprocessing.shared_memory``); ranks map the segment when
                           they unpickle the request; per receive batch the ranks run a
                           ``barrier`` then copy each feature out, an ``all_reduce`` of
                           failure flags, the entry rank unlinks, then every rank runs the
                           (now hash-free) ``from_dict`` locally.
``tokenizer_stage``        this project: ``TokenizerSide.materialize_request`` (materialize
                           into slots of the process's warm ``sglmmpre_*`` region, hashing
                           while copying, in worker threads; a segment when it is full) and
                           ``TokenizerSide.send``; ``take_multimodal_inputs`` on each rank.
                           The side is built by :func:`tokenizer_side`, as in a
                           TokenizerManager that runs the processor itself (no processor
                           pool), which allocates its own region; :func:`transport_of` says
                           how each request travelled, and the harness reports it.
``hash_floor``             ``floor`` plus a sha256 over each request's feature bytes in a
                           worker thread of the tokenizer, nothing else: the limit of any
                           design that keeps sglang's hash.
``floor``                  the request carries a 1 KiB placeholder instead; ranks do no
                           multimodal work. The lower bound of every metric.
=========================  ===========================================================

The upstream pointer class is re-implemented here after the shape of upstream's
``ShmPointerMMData`` (sglang is 0.5.5 here, which has none); everything else calls the
real code of sglang 0.5.5 and of ``sglang_mmpre``.
"""

from __future__ import annotations

import mmap
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from types import SimpleNamespace
from typing import Any, Optional

from benchmarks import _standin

_standin.install()  # before any sglang import (see _standin's docstring)

import _posixshmem  # noqa: E402  (CPython's POSIX shm binding, used by shared_memory)
import torch  # noqa: E402

__all__ = [
    "MODES",
    "LEGACY_MODES",
    "WORKLOADS",
    "Features",
    "compute_features",
    "fresh_mm_dict",
    "make_request",
    "PLACEHOLDER",
    "UPSTREAM_PREFIX",
    "UpstreamShmPointer",
    "upstream_prepare",
    "upstream_unlink",
    "BatchBroadcastCache",
    "RankContext",
    "tokenizer_side",
    "transport_of",
]

MODES = (
    "original",
    "per_request_broadcast",
    "batch_broadcast",
    "upstream_shm_barrier",
    "tokenizer_stage",
    "hash_floor",
    "floor",
)
LEGACY_MODES = ("original", "per_request_broadcast", "batch_broadcast")

#: name -> (kind, width, height, n_frames)
WORKLOADS: dict[str, tuple[str, int, int, int]] = {
    "448x448": ("image", 448, 448, 1),
    "1120x700": ("image", 1120, 700, 1),
    "1920x1080": ("image", 1920, 1080, 1),
    "video16": ("video", 448, 448, 16),
}

def tokenizer_side(tp: int) -> Any:
    """The ``tokenizer_stage`` mode's ``TokenizerSide`` for ``tp`` ranks on one node.

    Built as a TokenizerManager process that runs the multimodal processor itself
    (``processor_workers=0``: the harness has no processor to put in a pool), so it
    allocates its own warm region as such a process does; its other settings come from
    the environment. Call ``shutdown()`` when done.
    """
    from dataclasses import replace

    from sglang_mmpre.config import load_settings
    from sglang_mmpre.tokenizer_side.manager import TokenizerSide

    return TokenizerSide(
        SimpleNamespace(tp_size=tp, pp_size=1, dp_size=1, enable_dp_attention=False,
                        dist_init_addr=None, nnodes=1),
        replace(load_settings(), processor_workers=0),
    )


def transport_of(materialized: Any) -> str:
    """How a request's ``MaterializedMultimodalInputs`` travels to the ranks: ``"region"``
    (slots of a warm region), ``"segment"`` (a segment of its own) or ``"inline"``
    (pickled with the request), read from the descriptor the ranks receive."""
    from sglang_mmpre.transport.descriptors import RegionDescriptor, SegmentDescriptor

    if isinstance(materialized.segment, RegionDescriptor):
        return "region"
    if isinstance(materialized.segment, SegmentDescriptor):
        return "segment"
    if materialized.segment is None:
        return "inline"
    raise TypeError(f"unknown transport {type(materialized.segment).__name__}")


#: The floor mode's stand-in for a descriptor (~1 KiB of bytes).
PLACEHOLDER = b"\x5a" * 1024

# Vision token ids of the tiny Qwen2-VL vocabulary (tests/support/tiny_models.py).
_TEXT_TOKENS = 16


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


@dataclass
class Features:
    """One workload's processor output, computed once and reused by every request."""

    name: str
    modality: str  # "image" | "video"
    feature: torch.Tensor  # pixel_values / pixel_values_videos, (N, 1176) float32
    grid_key: str  # "image_grid_thw" | "video_grid_thw"
    grid: torch.Tensor
    token_id: int
    input_ids: list
    offsets: list

    @property
    def nbytes(self) -> int:
        return self.feature.numel() * self.feature.element_size()


def compute_features(name: str, seed: int = 0) -> Features:
    """Run the real HF Qwen2-VL processor (slow, CPU, default args) on generated media."""
    import tiny_models
    from transformers import Qwen2VLImageProcessor

    kind, width, height, n_frames = WORKLOADS[name]
    if kind == "image":
        out = Qwen2VLImageProcessor()(
            images=[tiny_models.make_image(width, height, seed=seed)], return_tensors="pt"
        )
        feature, grid, grid_key = out["pixel_values"], out["image_grid_thw"], "image_grid_thw"
        token_id = tiny_models.IMAGE_TOKEN_ID
    else:
        frames = tiny_models.make_video_frames(n_frames, width, height, seed=seed)
        out = tiny_models.qwen2vl_video_features(None, frames)
        feature, grid, grid_key = out["pixel_values_videos"], out["video_grid_thw"], "video_grid_thw"
        token_id = tiny_models.VIDEO_TOKEN_ID
    n_pad = int(grid.prod()) // 4  # 2x2 spatial merge
    start = _TEXT_TOKENS // 2
    ids = list(range(1, start)) + [tiny_models.VISION_START_TOKEN_ID]
    ids += [token_id] * n_pad + [tiny_models.VISION_END_TOKEN_ID]
    ids += list(range(1, _TEXT_TOKENS // 2))
    return Features(
        name=name,
        modality=kind,
        feature=feature.contiguous(),
        grid_key=grid_key,
        grid=grid,
        token_id=token_id,
        input_ids=ids,
        offsets=[(start + 1, start + n_pad)],
    )


def fresh_mm_dict(f: Features) -> dict:
    """A new processor-output dict as sglang's Qwen2-VL processor returns it.

    ``from_dict`` and ``materialize`` mutate the items (``hash``, ``pad_value``), so every
    request gets new item objects; the feature tensor's content is shared (nobody writes
    it). ``hash`` stays None, so every scheme pays its real hashing cost.
    """
    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

    modality = Modality.IMAGE if f.modality == "image" else Modality.VIDEO
    item = MultimodalDataItem(
        modality=modality,
        feature=f.feature,
        offsets=list(f.offsets),
        model_specific_data={f.grid_key: f.grid.clone()},
    )
    length = len(f.input_ids)
    out = {
        "mm_items": [item],
        "mrope_positions": torch.arange(3 * length).view(3, length),
        "mrope_position_delta": torch.tensor([[0]]),
    }
    out["im_token_id" if f.modality == "image" else "video_token_id"] = f.token_id
    return out


def make_request(rid: str, f: Features, mm_inputs: Optional[dict]) -> Any:
    """sglang 0.5.5's own ``TokenizedGenerateReqInput`` for ``rid``."""
    from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
    from sglang.srt.sampling.sampling_params import SamplingParams

    return TokenizedGenerateReqInput(
        rid=rid,
        input_text="",
        input_ids=list(f.input_ids),
        mm_inputs=mm_inputs,
        sampling_params=SamplingParams(max_new_tokens=1),
        return_logprob=False,
        logprob_start_len=-1,
        top_logprobs_num=0,
        token_ids_logprob=None,
        stream=False,
    )


# --------------------------------------------------------------------------------------
# upstream_shm_barrier
# --------------------------------------------------------------------------------------

#: Segment names of the upstream mode: ``sglbenchup_<creator pid>_<random hex>``.
UPSTREAM_PREFIX = "sglbenchup_"


class UpstreamShmPointer:
    """One feature tensor in its own POSIX shm segment, after upstream's ``ShmPointerMMData``.

    - creation (tokenizer, per tensor): ``SharedMemory(create=True)`` and a copy in;
    - pickling: name, shape, dtype only;
    - unpickling (every rank): open and map the segment, zero-copy view; an open failure
      is deferred to :meth:`materialize` (as upstream);
    - :meth:`materialize` (every rank, after the barrier): clone to owned memory, close;
    - :func:`upstream_unlink` (entry rank, after the failure-flag all_reduce).

    Python 3.11's ``SharedMemory`` registers each segment with the resource tracker, which
    would unlink it when the tokenizer exits; the creator unregisters it because ownership
    passes to the scheduler's entry rank, and receivers open untracked (as upstream's later
    ``_UntrackedPosixSharedMemory`` does).
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype
        nbytes = tensor.numel() * tensor.element_size()
        name = f"{UPSTREAM_PREFIX}{os.getpid()}_{secrets.token_hex(8)}"
        shm = shared_memory.SharedMemory(name=name, create=True, size=max(1, nbytes))
        resource_tracker.unregister(shm._name, "shared_memory")
        try:
            if nbytes:
                dst = torch.frombuffer(shm.buf, dtype=torch.uint8, count=nbytes)
                dst.copy_(tensor.view(torch.uint8).reshape(-1))
                del dst
        except BaseException:
            shm.close()
            upstream_unlink(name)
            raise
        shm.close()
        self.shm_name = name
        self.nbytes = nbytes
        self.tensor: Optional[torch.Tensor] = None
        self._mmap: Optional[mmap.mmap] = None
        self._error: Optional[str] = None

    def __getstate__(self):
        return {"shm_name": self.shm_name, "shape": self.shape, "dtype": self.dtype}

    def __setstate__(self, state) -> None:
        self.shm_name = state["shm_name"]
        self.shape = state["shape"]
        self.dtype = state["dtype"]
        self.tensor = None
        self._mmap = None
        self._error = None
        element = torch.empty((), dtype=self.dtype).element_size()
        self.nbytes = element
        for dim in self.shape:
            self.nbytes *= dim
        try:
            fd = _posixshmem.shm_open("/" + self.shm_name, os.O_RDWR, mode=0o600)
            try:
                self._mmap = mmap.mmap(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            if self.nbytes:
                raw = torch.frombuffer(self._mmap, dtype=torch.uint8, count=self.nbytes)
                self.tensor = raw.view(self.dtype).view(self.shape)
            else:
                self.tensor = torch.empty(self.shape, dtype=self.dtype)
        except Exception as e:  # deferred, as upstream does
            self._error = f"{type(e).__name__}: {e}"

    def materialize(self) -> torch.Tensor:
        """Copy the feature to owned memory and drop the mapping."""
        try:
            if self._error is not None:
                raise RuntimeError(f"shm feature {self.shm_name}: {self._error}")
            return self.tensor.clone()
        finally:
            self.close()

    def close(self) -> None:
        self.tensor = None
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None


def upstream_unlink(name: str) -> None:
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass


def upstream_prepare(mm_dict: dict) -> tuple[dict, int]:
    """Tokenizer side of ``upstream_shm_barrier``; returns the dict and the shm bytes.

    Runs synchronously on the caller's thread, as upstream does on the tokenizer event
    loop: sglang's own ``set_pad_value`` (``hash_feature``) then one segment per feature.
    """
    shm_bytes = 0
    for item in mm_dict["mm_items"]:
        if item.is_valid():
            item.set_pad_value()
        if isinstance(item.feature, torch.Tensor):
            item.feature = UpstreamShmPointer(item.feature)
            shm_bytes += item.feature.nbytes
    return mm_dict, shm_bytes


def upstream_finalize(ctx: "RankContext", reqs: list) -> dict:
    """Scheduler side of ``upstream_shm_barrier`` for one receive batch.

    Returns ``{rid: (MultimodalInputs or None, error or None)}`` for the requests with
    multimodal inputs. The segments were mapped when the request was unpickled.
    """
    import torch.distributed as dist
    from sglang.srt.managers.schedule_batch import MultimodalInputs

    mm_reqs = [r for r in reqs if getattr(r, "mm_inputs", None) is not None]
    if not mm_reqs:
        return {}
    names = [
        [item.feature.shm_name for item in r.mm_inputs["mm_items"]
         if isinstance(item.feature, UpstreamShmPointer)]
        for r in mm_reqs
    ]
    if ctx.world > 1:
        # The broadcast source returns before its peers have unpickled (mapped): wait
        # for all of them before anyone may unlink.
        dist.barrier(group=ctx.group)
    flags = torch.zeros(len(mm_reqs), dtype=torch.int32)
    errors: dict[int, str] = {}
    for i, r in enumerate(mm_reqs):
        for item in r.mm_inputs["mm_items"]:
            if isinstance(item.feature, UpstreamShmPointer):
                try:
                    item.feature = item.feature.materialize()
                except Exception as e:
                    flags[i] = 1
                    errors[i] = str(e)
    if ctx.world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=ctx.group)
    if ctx.rank == 0:
        for seg_names in names:
            for name in seg_names:
                upstream_unlink(name)
    out = {}
    for i, r in enumerate(mm_reqs):
        if int(flags[i]):
            out[r.rid] = (None, errors.get(i, "a peer rank failed to map the feature"))
            continue
        try:
            out[r.rid] = (MultimodalInputs.from_dict(r.mm_inputs), None)
        except Exception as e:
            out[r.rid] = (None, f"from_dict failed: {e}")
    return out


# --------------------------------------------------------------------------------------
# batch_broadcast (the seed's improved_batch_broadcast.patch, re-implemented)
# --------------------------------------------------------------------------------------


class BatchBroadcastCache:
    """Per receive batch: entry rank ``from_dict``s every multimodal request, one
    ``broadcast_object_list``; each rank caches ``rid -> MultimodalInputs`` (FIFO, bounded)
    and pops on use, falling back to a local ``from_dict`` on a miss.

    Error handling follows ``patches/improved_batch_broadcast.patch``: a ``from_dict``
    failure on the entry rank travels as its message (every rank aborts that request), and
    a failed collective is raised (the group's collective sequence can't be trusted).
    """

    def __init__(self, capacity: int = 1000) -> None:
        self.capacity = capacity
        self._cache: "OrderedDict[str, Any]" = OrderedDict()

    def clear(self) -> None:
        self._cache.clear()

    def prefetch(self, ctx: "RankContext", reqs: list) -> None:
        import torch.distributed as dist
        from sglang.srt.managers.schedule_batch import MultimodalInputs

        mm_reqs = [r for r in reqs if getattr(r, "mm_inputs", None) is not None]
        if ctx.world == 1 or not mm_reqs:
            return  # single rank: take() materializes locally
        if ctx.rank == 0:
            payload = {}
            for r in mm_reqs:
                try:
                    payload[r.rid] = MultimodalInputs.from_dict(r.mm_inputs)
                except Exception as e:
                    payload[r.rid] = f"Invalid multimodal inputs: {type(e).__name__}: {e}"
            obj = [payload]
        else:
            obj = [None]
        dist.broadcast_object_list(obj, src=0, group=ctx.group)
        for rid, inputs in obj[0].items():
            self._cache.pop(rid, None)
            self._cache[rid] = inputs
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)

    def take(self, req: Any) -> Any:
        """The request's inputs (popped), or a local ``from_dict`` on a miss; raises
        ``ValueError`` with the entry rank's message where its ``from_dict`` failed."""
        from sglang.srt.managers.schedule_batch import MultimodalInputs

        if req.rid in self._cache:
            inputs = self._cache.pop(req.rid)
            if isinstance(inputs, str):
                raise ValueError(inputs)
            return inputs
        return MultimodalInputs.from_dict(req.mm_inputs)


# --------------------------------------------------------------------------------------
# Scheduler side: one receive batch on one rank
# --------------------------------------------------------------------------------------


@dataclass
class RankContext:
    """What a simulated scheduler rank knows: its rank, group size and gloo group."""

    rank: int
    world: int
    group: Any = None  # the gloo ("cpu") group; None when world == 1
    cache: Optional[BatchBroadcastCache] = None

    def __post_init__(self) -> None:
        if self.cache is None:
            self.cache = BatchBroadcastCache()
        # What Scheduler._process_and_broadcast_mm_inputs reads from ``self``.
        self.sglang_self = SimpleNamespace(cpu_group=self.group, is_entry_rank=self.rank == 0)
        # What take_multimodal_inputs reads from the scheduler.
        self.scheduler_like = SimpleNamespace(
            server_args=SimpleNamespace(enable_dp_attention=False),
            tp_size=self.world,
            pp_size=1,
            attn_tp_size=self.world,
        )


def entry_rank_check(mode: str, batch: list) -> None:
    """What the entry rank does with a receive batch before ``broadcast_pyobj``, per mode:
    ``tokenizer_stage`` checks each request's segment once (``vouch_for_segments``, as the
    patched ``recv_requests`` does); the other modes do nothing there."""
    if mode == "tokenizer_stage":
        from sglang_mmpre.scheduler_side.hooks import vouch_for_segments

        vouch_for_segments(batch)


def handle_batch(mode: str, ctx: RankContext, reqs: list) -> list[tuple[str, Any, Optional[str]]]:
    """The multimodal handling of one receive batch on one rank, per ``mode``.

    Returns ``[(rid, MultimodalInputs or None, error or None)]`` in request order (the
    caller keeps the inputs alive until the end of the iteration, as a Req would).
    """
    from sglang.srt.managers.schedule_batch import MultimodalInputs

    out = []
    if mode in ("floor", "hash_floor"):
        return [(r.rid, None, None) for r in reqs]
    if mode == "original":
        for r in reqs:
            try:
                out.append((r.rid, MultimodalInputs.from_dict(r.mm_inputs), None))
            except Exception as e:
                out.append((r.rid, None, f"from_dict failed: {e}"))
        return out
    if mode == "per_request_broadcast":
        from sglang.srt.managers.scheduler import Scheduler

        for r in reqs:
            # sglang 0.5.5's real method, called unbound on an object with the two
            # attributes it reads; every rank calls it for every request, in order.
            inputs = Scheduler._process_and_broadcast_mm_inputs(ctx.sglang_self, r.mm_inputs)
            out.append((r.rid, inputs, None))
        return out
    if mode == "batch_broadcast":
        ctx.cache.prefetch(ctx, reqs)
        for r in reqs:
            try:
                out.append((r.rid, ctx.cache.take(r), None))
            except Exception as e:
                out.append((r.rid, None, str(e)))
        return out
    if mode == "upstream_shm_barrier":
        done = upstream_finalize(ctx, reqs)
        return [(r.rid, *done.get(r.rid, (None, None))) for r in reqs]
    if mode == "tokenizer_stage":
        from sglang_mmpre.scheduler_side.hooks import take_multimodal_inputs

        for r in reqs:
            inputs, err = take_multimodal_inputs(ctx.scheduler_like, r)
            out.append((r.rid, inputs, err))
        return out
    raise ValueError(f"unknown mode {mode!r}")


def wait_forward(ms: float, how: str) -> None:
    """The simulated forward step's wait: ``spin`` (busy-wait) or ``sleep``."""
    if ms <= 0:
        return
    end = time.perf_counter() + ms / 1000.0
    if how == "sleep":
        time.sleep(ms / 1000.0)
        return
    while time.perf_counter() < end:
        pass
