"""Every way sglang 0.5.5 creates, copies, retries, splits or drops a request keeps the
segment lifetime protocol: no early unlink, no leak, no double unlink.

The requests go through the real patched ``TokenizerManager.generate_request`` (tiny
Qwen2-VL model, TP=2 so two consumers per send). ``FakeServer`` replaces its ZMQ socket to
the scheduler: it keeps the pickles that leave, replays each through two
``SchedulerUnderTest`` ranks (the real patched ``handle_generate_request``), and answers
the way the detokenizer does, through the manager's own ``_handle_batch_output`` /
``_handle_abort_req``. Each test ends with the shm directory empty, the manager holding no
bytes, and no rank having met a missing or already-consumed segment.

The manager here takes a segment per request (``SGLANG_MM_SHM_REGION_CHUNK_BYTES=0``, as
when the region is full); the warm region's slots on the same paths are in
``test_region_request_path.py``.
"""

from __future__ import annotations

import asyncio
import pickle
import types

import pytest

from sglang_mmpre.transport.segment import segment_names

from mm_requests import segment_refcount
from scheduler_harness import SchedulerUnderTest

TP = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_models import make_tiny_qwen2vl

    return make_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2vl"))


@pytest.fixture(scope="module")
def jpegs():
    from tiny_models import image_to_jpeg_bytes, make_image

    return [image_to_jpeg_bytes(make_image(448, 448, seed)) for seed in range(4)]


class FakeServer:
    """The scheduler ranks and the detokenizer, as seen by one TokenizerManager."""

    def __init__(self, tm, shm_dir, max_req_input_len: int = 100_000) -> None:
        self.tm = tm
        self.shm_dir = shm_dir
        self.sent: list[bytes] = []
        self.consumed = 0
        self.rank_messages: list[str] = []
        self.aborts_sent: list[str] = []
        self._new = asyncio.Event()
        self.real_socket = tm.send_to_scheduler
        tm.send_to_scheduler = self
        self.ranks = [SchedulerUnderTest(tp_size=TP, tp_rank=r, max_req_input_len=max_req_input_len)
                      for r in range(TP)]

    # the socket --------------------------------------------------------------------------
    def send_pyobj(self, obj) -> None:
        from sglang.srt.managers.io_struct import AbortReq

        if isinstance(obj, AbortReq):
            self.aborts_sent.append(obj.rid)
            return
        self.sent.append(pickle.dumps(obj))
        self._new.set()

    async def wait_sent(self, n: int, handler: asyncio.Future) -> None:
        """Wait (on the loop, no polling) until ``n`` requests have been sent in all, or
        fail if the ``generate_request`` handler ends first."""
        while len(self.sent) < n:
            if handler.done():
                handler.result()  # re-raises the handler's error
                raise AssertionError(f"handler ended after {len(self.sent)} of {n} sends")
            self._new.clear()
            waiter = asyncio.ensure_future(self._new.wait())
            await asyncio.wait({waiter, handler}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    def segments_sent(self) -> list[str]:
        names = []
        for blob in self.sent:
            obj = pickle.loads(blob)
            for req in getattr(obj, "batch", None) or [obj]:
                m = req.materialized_mm_inputs
                names.append(m.segment.name if m is not None and m.segment else None)
        return names

    # the ranks ---------------------------------------------------------------------------
    def consume(self, count: int | None = None) -> list:
        """Every rank handles the next ``count`` sent pickles; returns rank 0's Reqs."""
        from sglang.srt.managers.io_struct import BatchTokenizedGenerateReqInput

        end = len(self.sent) if count is None else self.consumed + count
        first_rank = []
        for blob in self.sent[self.consumed:end]:
            for r, rank in enumerate(self.ranks):
                before = len(rank.queued)
                obj = pickle.loads(blob)
                if isinstance(obj, BatchTokenizedGenerateReqInput):
                    rank.handle_batch_generate_request(obj)
                else:
                    rank.handle_generate_request(obj)
                new = rank.queued[before:]
                self.rank_messages += [q.to_finish.message for q in new if q.to_finish]
                if r == 0:
                    first_rank += new
        self.consumed = end
        return first_rank

    # the detokenizer ---------------------------------------------------------------------
    def respond(self, reqs, finished: bool = True) -> None:
        """Send each Req's output back as a ``BatchStrOutput`` (the Req's abort, if any)."""
        from sglang.srt.managers.io_struct import BatchStrOutput

        if not reqs:
            return
        n = len(reqs)
        reasons = [
            (r.to_finish.to_json() if r.to_finish is not None else {"type": "length", "length": 1})
            if finished else None
            for r in reqs
        ]
        self.tm._handle_batch_output(BatchStrOutput(
            rids=[r.rid for r in reqs], finished_reasons=reasons, output_strs=["ok"] * n,
            output_ids=[[7]] * n, prompt_tokens=[len(r.origin_input_ids) for r in reqs],
            completion_tokens=[1] * n, cached_tokens=[0] * n,
            input_token_logprobs_val=[], input_token_logprobs_idx=[],
            output_token_logprobs_val=[], output_token_logprobs_idx=[],
            input_top_logprobs_val=[], input_top_logprobs_idx=[],
            output_top_logprobs_val=[], output_top_logprobs_idx=[],
            input_token_ids_logprobs_val=[], input_token_ids_logprobs_idx=[],
            output_token_ids_logprobs_val=[], output_token_ids_logprobs_idx=[],
            output_token_entropy_val=[], output_hidden_states=[],
            placeholder_tokens_idx=[None] * n, placeholder_tokens_val=[None] * n,
            retraction_counts=[0] * n, spec_verify_ct=[0] * n, spec_accepted_tokens=[0] * n,
            queue_time=[None] * n, forward_entry_time=[None] * n, prefill_delay=[None] * n,
            prefill_latency=[None] * n,
        ))

    def assert_clean(self) -> None:
        assert segment_names(str(self.shm_dir)) == [], "a segment leaked"
        assert self.tm.mmpre.held_bytes == 0
        bad = [m for m in self.rank_messages if m.startswith("Invalid multimodal inputs")]
        assert bad == [], f"ranks met missing or consumed segments: {bad}"
        assert self.consumed == len(self.sent), "test left requests unconsumed"


@pytest.fixture
def tm(model_dir, shm_dir, monkeypatch):
    from tiny_models import close_tokenizer_manager, make_tokenizer_manager

    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("SGLANG_MM_SHM_REGION_CHUNK_BYTES", "0")  # segments: see the docstring
    manager = make_tokenizer_manager(model_dir)
    manager.mmpre.consumers = TP  # what ServerArgs(tp_size=2) gives on a GPU server
    yield manager
    server = manager.send_to_scheduler
    if isinstance(server, FakeServer):
        manager.send_to_scheduler = server.real_socket
    close_tokenizer_manager(manager)


def _gen(jpeg, **kw):
    from sglang.srt.managers.io_struct import GenerateReqInput
    from tiny_models import IMAGE_PLACEHOLDER

    kw.setdefault("sampling_params", {"max_new_tokens": 4})
    return GenerateReqInput(text="Describe: " + IMAGE_PLACEHOLDER, image_data=[jpeg], **kw)


async def _collect(agen) -> list:
    return [out async for out in agen]


def _names(shm_dir) -> list[str]:
    return segment_names(str(shm_dir))


# --- one request ---------------------------------------------------------------------------

def test_single_request_segment_lives_until_scope_ends_and_is_unlinked_once(tm, shm_dir, jpegs):
    server = FakeServer(tm, shm_dir)

    async def main():
        task = asyncio.ensure_future(_collect(tm.generate_request(_gen(jpegs[0]))))
        await server.wait_sent(1, task)
        (name,) = _names(shm_dir)
        reqs = server.consume()
        assert reqs[0].to_finish is None and reqs[0].multimodal_inputs is not None
        assert segment_refcount(shm_dir / name) == 1  # only the creator reference is left
        server.respond(reqs)
        (out,) = await task
        assert out["meta_info"]["finish_reason"]["type"] == "length"

    asyncio.run(main())
    server.assert_clean()


def test_client_gone_before_ranks_map_keeps_segment_for_them(tm, shm_dir, jpegs):
    """The handler task is cancelled (client went away) while the request is queued."""
    server = FakeServer(tm, shm_dir)

    async def main():
        task = asyncio.ensure_future(_collect(tm.generate_request(_gen(jpegs[0]))))
        await server.wait_sent(1, task)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        (name,) = _names(shm_dir)
        assert segment_refcount(shm_dir / name) == TP  # creator released, ranks pending
        reqs = server.consume()
        assert reqs[0].to_finish is None

    asyncio.run(main())
    server.assert_clean()


def test_client_disconnect_while_running_aborts_and_leaks_nothing(tm, shm_dir, jpegs):
    """_wait_one_response type 3: a partial output, then request.is_disconnected()."""
    server = FakeServer(tm, shm_dir)

    async def disconnected():
        return True

    http_request = types.SimpleNamespace(headers={}, is_disconnected=disconnected)

    async def main():
        task = asyncio.ensure_future(_collect(tm.generate_request(_gen(jpegs[0]), http_request)))
        await server.wait_sent(1, task)
        reqs = server.consume()
        server.respond(reqs, finished=False)
        with pytest.raises(ValueError, match="disconnected"):
            await task
        assert server.aborts_sent == [reqs[0].rid]

    asyncio.run(main())
    server.assert_clean()


def test_client_disconnect_while_queued_aborts_and_ranks_still_map(tm, shm_dir, jpegs,
                                                                   monkeypatch):
    """_wait_one_response type 1: no output yet when the 4 s wait times out (made
    immediate here) and the client is gone; the ranks get the request afterwards."""
    import sglang.srt.managers.tokenizer_manager as tm_module

    class ImpatientAsyncio:
        def __getattr__(self, name):
            return getattr(asyncio, name)

        @staticmethod
        async def wait_for(aw, timeout=None):
            task = asyncio.ensure_future(aw)
            await asyncio.sleep(0)
            if not task.done():
                task.cancel()
                raise asyncio.TimeoutError
            return task.result()

    monkeypatch.setattr(tm_module, "asyncio", ImpatientAsyncio())
    server = FakeServer(tm, shm_dir)

    async def disconnected():
        return True

    http_request = types.SimpleNamespace(headers={}, is_disconnected=disconnected)

    async def main():
        with pytest.raises(ValueError, match="disconnected"):
            await _collect(tm.generate_request(_gen(jpegs[0]), http_request))
        assert len(server.aborts_sent) == 1
        (name,) = _names(shm_dir)
        assert segment_refcount(shm_dir / name) == TP
        assert server.consume()[0].to_finish is None

    asyncio.run(main())
    server.assert_clean()


def test_abort_while_waiting_in_queue_releases_everything(tm, shm_dir, jpegs):
    from sglang.srt.managers.io_struct import AbortReq

    server = FakeServer(tm, shm_dir)

    async def main():
        obj = _gen(jpegs[1])
        task = asyncio.ensure_future(_collect(tm.generate_request(obj)))
        await server.wait_sent(1, task)
        tm.abort_request(obj.rid)
        assert server.aborts_sent == [obj.rid]
        server.consume()  # the generate request reaches the ranks before the abort
        tm._handle_abort_req(AbortReq(rid=obj.rid, abort_message="Abort in waiting queue"))
        (out,) = await task
        assert out["meta_info"]["finish_reason"]["type"] == "abort"

    asyncio.run(main())
    server.assert_clean()


# --- copies and splits ----------------------------------------------------------------------

def test_parallel_sampling_sends_one_segment_four_times_unlinked_after_the_last(
    tm, shm_dir, jpegs
):
    server = FakeServer(tm, shm_dir)

    async def main():
        obj = _gen(jpegs[2], sampling_params={"n": 3, "max_new_tokens": 4})
        task = asyncio.ensure_future(_collect(tm.generate_request(obj)))
        await server.wait_sent(1, task)  # the prefix-caching copy (max_new_tokens=0)
        (name,) = _names(shm_dir)
        server.respond(server.consume())
        await server.wait_sent(4, task)  # then n copies of the same tokenized object
        assert server.segments_sent() == [name] * 4
        assert _names(shm_dir) == [name], "unlinked while copies were still to be mapped"
        server.respond(server.consume(2))
        assert _names(shm_dir) == [name]
        server.respond(server.consume())
        (outs,) = await task
        assert len(outs) == 3

    asyncio.run(main())
    server.assert_clean()


def test_parallel_sampling_client_gone_between_copies_leaks_nothing(tm, shm_dir, jpegs):
    server = FakeServer(tm, shm_dir)

    async def main():
        obj = _gen(jpegs[2], sampling_params={"n": 3, "max_new_tokens": 4})
        task = asyncio.ensure_future(_collect(tm.generate_request(obj)))
        await server.wait_sent(1, task)
        server.respond(server.consume())
        await server.wait_sent(4, task)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(_names(shm_dir)) == 1  # three copies still to be mapped
        server.consume()

    asyncio.run(main())
    server.assert_clean()


def test_batch_of_requests_each_with_its_own_segment(tm, shm_dir, jpegs):
    from sglang.srt.managers.io_struct import GenerateReqInput
    from tiny_models import IMAGE_PLACEHOLDER

    server = FakeServer(tm, shm_dir)

    async def main():
        obj = GenerateReqInput(text=["A: " + IMAGE_PLACEHOLDER, "B: " + IMAGE_PLACEHOLDER],
                               image_data=[[jpegs[0]], [jpegs[1]]],
                               sampling_params={"max_new_tokens": 4})
        task = asyncio.ensure_future(_collect(tm.generate_request(obj)))
        await server.wait_sent(2, task)
        names = server.segments_sent()
        assert len(set(names)) == 2 and None not in names
        server.respond(server.consume())
        (outs,) = await task
        assert len(outs) == 2

    asyncio.run(main())
    server.assert_clean()


def test_batched_send_of_tokenized_requests_counts_every_segment(tm, shm_dir, jpegs):
    """``_send_batch_request`` (one BatchTokenizedGenerateReqInput for many requests)."""
    server = FakeServer(tm, shm_dir)

    async def main():
        from sglang.srt.managers.io_struct import GenerateReqInput
        from tiny_models import IMAGE_PLACEHOLDER

        obj = GenerateReqInput(text=["A: " + IMAGE_PLACEHOLDER, "B: " + IMAGE_PLACEHOLDER],
                               image_data=[[jpegs[0]], [jpegs[1]]],
                               sampling_params={"max_new_tokens": 4})
        obj.normalize_batch_and_arguments()
        with tm.mmpre.request_scope():
            tokenized = [await tm._tokenize_one_request(obj[i]) for i in range(2)]
            tm._send_batch_request(obj, tokenized)
            assert len(_names(shm_dir)) == 2
        assert len(_names(shm_dir)) == 2  # creator references gone, ranks pending
        reqs = server.consume()
        assert [r.to_finish for r in reqs] == [None, None]
        for rid in obj.rid:
            tm.rid_to_state.pop(rid, None)

    asyncio.run(main())
    server.assert_clean()


def test_failed_tokenization_in_parallel_sampling_batch_releases_the_siblings(
    tm, shm_dir, jpegs, monkeypatch
):
    """asyncio.gather raises on the first failure and leaves the other tokenizations
    running; they may finish after the scope closed and must release their own segments."""
    from sglang.srt.managers.io_struct import GenerateReqInput
    from tiny_models import IMAGE_PLACEHOLDER

    server = FakeServer(tm, shm_dir)
    real = tm._tokenize_one_request
    calls = {"started": 0, "finished": 0, "results": []}

    async def main():
        all_done = asyncio.Event()

        async def recording(obj):
            calls["started"] += 1
            try:
                result = await real(obj)
                calls["results"].append(result)
                return result
            finally:
                calls["finished"] += 1
                if calls["finished"] == calls["started"]:
                    all_done.set()

        monkeypatch.setattr(tm, "_tokenize_one_request", recording)
        obj = GenerateReqInput(
            text=["A: " + IMAGE_PLACEHOLDER, "B: " + IMAGE_PLACEHOLDER],
            image_data=[[jpegs[0]], [jpegs[1]]],
            sampling_params=[{"n": 2, "max_new_tokens": 4}, {"n": 2, "max_new_tokens": 10**7}],
        )
        with pytest.raises(ValueError, match="maximum context length"):
            await _collect(tm.generate_request(obj))
        await all_done.wait()  # the orphaned sibling, if it was still running
        assert calls["started"] == 2
        (sibling,) = calls["results"]
        assert sibling.materialized_mm_inputs.segment is not None  # a segment was made

    asyncio.run(main())
    assert server.sent == []
    server.assert_clean()


# --- rejected requests ----------------------------------------------------------------------

def test_rejected_for_length_by_tokenizer_before_any_segment_exists(tm, shm_dir, jpegs):
    server = FakeServer(tm, shm_dir)

    async def main():
        with pytest.raises(ValueError, match="maximum context length"):
            await _collect(tm.generate_request(
                _gen(jpegs[0], sampling_params={"max_new_tokens": 10**7})))

    asyncio.run(main())
    assert server.sent == []
    assert _names(shm_dir) == []
    server.assert_clean()


def test_rejected_for_length_by_scheduler_after_mapping_aborts_and_leaks_nothing(
    tm, shm_dir, jpegs
):
    server = FakeServer(tm, shm_dir, max_req_input_len=50)

    async def main():
        task = asyncio.ensure_future(_collect(tm.generate_request(_gen(jpegs[0]))))
        await server.wait_sent(1, task)
        reqs = server.consume()
        assert "too long" in reqs[0].to_finish.message
        server.respond(reqs)
        with pytest.raises(ValueError, match="too long"):
            await task

    asyncio.run(main())
    server.assert_clean()


# --- sessions ------------------------------------------------------------------------------

def _with_sessions(server) -> None:
    from sglang.srt.managers.session_controller import Session

    for rank in server.ranks:
        rank.sessions["s1"] = Session(capacity_of_str_len=1 << 20, session_id="s1")
        rank.tokenizer = types.SimpleNamespace(vocab_size=320, bos_token_id=None)


@pytest.mark.parametrize("session, fragment", [
    ({"id": "unknown-session"}, "does not exist"),
    ({"id": "s1", "rid": "unknown-rid"}, "Invalid request session id"),
])
def test_session_early_return_after_taking_mm_inputs_leaks_nothing(
    session, fragment, tm, shm_dir, jpegs
):
    server = FakeServer(tm, shm_dir)
    _with_sessions(server)

    async def main():
        task = asyncio.ensure_future(_collect(tm.generate_request(
            _gen(jpegs[3], session_params=session))))
        await server.wait_sent(1, task)
        reqs = server.consume()
        assert fragment in reqs[0].to_finish.message
        server.respond(reqs)
        with pytest.raises(ValueError, match=fragment):
            await task

    asyncio.run(main())
    server.assert_clean()


def test_session_requests_append_and_are_served(tm, shm_dir, jpegs):
    from sglang.srt.managers.schedule_batch import FINISH_LENGTH

    server = FakeServer(tm, shm_dir)
    _with_sessions(server)

    async def main():
        first = _gen(jpegs[0], session_params={"id": "s1"}, rid="turn1")
        task = asyncio.ensure_future(_collect(tm.generate_request(first)))
        await server.wait_sent(1, task)
        reqs = server.consume()
        assert reqs[0].to_finish is None and reqs[0].multimodal_inputs is not None
        for rank in server.ranks:  # the first turn finishes on every rank
            rank.sessions["s1"].req_nodes["turn1"].req.finished_reason = FINISH_LENGTH(1)
        server.respond(reqs)
        await task
        second = _gen(jpegs[1], session_params={"id": "s1", "rid": "turn1"}, rid="turn2")
        task = asyncio.ensure_future(_collect(tm.generate_request(second)))
        await server.wait_sent(2, task)
        reqs = server.consume()
        assert reqs[0].to_finish is None
        assert len(reqs[0].multimodal_inputs.mm_items) == 2  # both turns' images
        server.respond(reqs)
        await task

    asyncio.run(main())
    server.assert_clean()
