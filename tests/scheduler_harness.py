"""A scheduler object that runs sglang's *real* (patched) ``Scheduler`` methods.

Building a full ``Scheduler`` loads a model on a GPU. The methods under test
(``recv_requests``, ``handle_generate_request``, ...) need only a handful of attributes,
so :class:`SchedulerUnderTest` borrows the real functions from
``sglang.srt.managers.scheduler.Scheduler`` and supplies those attributes; the queue
stand-in records what the real code enqueues.
"""

from __future__ import annotations

import dataclasses
import pickle
import types
from typing import Any

__all__ = ["SchedulerUnderTest", "DistributedCallCounter", "schedule_one"]


class DistributedCallCounter:
    """Counts every call into ``torch.distributed``'s collective and group API."""

    NAMES = ("broadcast", "broadcast_object_list", "all_reduce", "barrier", "all_gather",
             "all_gather_object", "gather", "scatter", "send", "recv", "get_world_size",
             "get_rank", "is_initialized")

    def __init__(self, monkeypatch) -> None:
        import torch.distributed as dist

        self.calls: list[str] = []
        for name in self.NAMES:
            real = getattr(dist, name)

            def wrapper(*args, __real=real, __name=name, **kwargs):
                self.calls.append(__name)
                return __real(*args, **kwargs)

            monkeypatch.setattr(dist, name, wrapper)


class _NoRpc:
    """``recv_from_rpc`` with nothing waiting (what ``recv_requests`` sees without RPCs)."""

    def recv_pyobj(self, flags: int = 0) -> Any:
        import zmq

        raise zmq.Again()


def _ensure_global_server_args() -> None:
    """A real Scheduler sets sglang's global ServerArgs; give Req a default one if unset."""
    from sglang.srt import server_args as sa

    try:
        sa.get_global_server_args()
        return
    except ValueError:
        pass
    args = object.__new__(sa.ServerArgs)  # defaults only: no model to inspect here
    for f in dataclasses.fields(sa.ServerArgs):
        if f.default is not dataclasses.MISSING:
            setattr(args, f.name, f.default)
        elif f.default_factory is not dataclasses.MISSING:
            setattr(args, f.name, f.default_factory())
    sa.set_global_server_args_for_scheduler(args)


class SchedulerUnderTest:
    """Just enough of a Scheduler for ``recv_requests`` (TP only, no DP-attention or PP)
    and ``handle_generate_request`` / ``handle_embedding_request``.

    ``recv_requests`` needs ``recv_from_tokenizer`` (the entry rank's ZMQ PULL socket) and,
    with ``tp_size > 1``, ``cpu_group`` (a gloo group for sglang's ``broadcast_pyobj``).
    """

    def __init__(self, tp_size: int = 1, pp_size: int = 1, max_req_input_len: int = 100_000,
                 cpu_group: Any = None, is_entry_rank: bool = True, tp_rank: int = 0,
                 recv_from_tokenizer: Any = None) -> None:
        import sglang.srt.managers.schedule_batch as schedule_batch
        from sglang.srt.disaggregation.utils import DisaggregationMode
        from sglang.srt.managers.mm_utils import MultiModalityDataPaddingPatternMultimodalTokens
        from sglang.srt.managers.scheduler import Scheduler

        _ensure_global_server_args()
        # Req.set_finish_with_abort asks the (absent) TP group for this rank's index.
        schedule_batch.get_tensor_model_parallel_rank = lambda: tp_rank
        cls = type(self)
        for name in ("recv_requests", "handle_generate_request", "handle_embedding_request",
                     "handle_batch_generate_request", "init_req_max_new_tokens",
                     "_process_and_broadcast_mm_inputs"):
            setattr(cls, name, getattr(Scheduler, name))
        self.server_args = types.SimpleNamespace(
            enable_dp_attention=False, disaggregation_bootstrap_port=8998,
            allow_auto_truncate=False,
        )
        self.tp_size, self.pp_size, self.attn_tp_size = tp_size, pp_size, tp_size
        self.cpu_group, self.is_entry_rank = cpu_group, is_entry_rank
        # What recv_requests reads (pp_rank 0, TP group = every rank, no DP-attention).
        self.recv_skipper = self.input_blocker = None
        self.pp_rank, self.attn_tp_rank, self.enable_trace = 0, tp_rank, False
        self.tp_group = types.SimpleNamespace(rank=tp_rank, ranks=list(range(tp_size)))
        self.tp_cpu_group = cpu_group
        self.recv_from_tokenizer, self.recv_from_rpc = recv_from_tokenizer, _NoRpc()
        self.sessions: dict = {}
        self.model_config = types.SimpleNamespace(hf_eos_token_id=None, vocab_size=300)
        self.disaggregation_mode = DisaggregationMode.NULL
        self.enable_metrics = False
        self.metrics_collector = None
        self.tokenizer = None
        self.grammar_backend = None
        self.grammar_queue: list = []
        self.max_req_input_len = max_req_input_len
        self.max_req_len = max_req_input_len + 1
        pattern = MultiModalityDataPaddingPatternMultimodalTokens()
        self.pad_input_ids_func = pattern.pad_input_tokens
        self.queued: list = []

    def _add_request_to_queue(self, req, is_retracted: bool = False) -> None:
        self.queued.append(req)


def schedule_one(monkeypatch: Any, sent: bytes, **attrs: Any) -> Any:
    """The ``Req`` the patched ``Scheduler.handle_generate_request`` of one rank builds from
    ``sent`` (a request as the tokenizer pickled it), after checking that it made no
    ``torch.distributed`` call and did not finish the request. ``attrs`` override the
    scheduler's attributes (``pad_input_ids_func``). The ``Req`` views the features'
    slots until it is dropped (``gc.collect``, then ``region_cache.flush``)."""
    counter = DistributedCallCounter(monkeypatch)
    scheduler = SchedulerUnderTest(tp_size=1)
    for name, value in attrs.items():
        setattr(scheduler, name, value)
    scheduler.handle_generate_request(pickle.loads(sent))
    assert counter.calls == []
    (built,) = scheduler.queued
    assert built.to_finish is None
    return built
