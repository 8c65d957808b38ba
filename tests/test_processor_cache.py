"""The processor cache (``tokenizer_side/processor_cache.py``) on sglang 0.5.5's real
Qwen2-VL processor and real, patched TokenizerManager.

The cache serves a repeated image from the outputs of its first processing; what a
request gets must be what sglang's unpatched path gives (``MultimodalInputs.from_dict``
of its raw dict), hit or miss, and only equal bytes under an equal configuration may hit.
"""

from __future__ import annotations

import asyncio
import base64
import gc

import pytest
import torch

from sglang_mmpre.scheduler_side import region_cache
from sglang_mmpre.tokenizer_side import pool_worker
from sglang_mmpre.tokenizer_side.processor_cache import ProcessorCache, fingerprint

from test_materialize_equivalence import assert_equal_inputs
from test_patched_request_path import _jpeg, model_dir  # noqa: F401 - fixture
from test_processor_pool import pooled  # noqa: F401 - fixture
from test_region_request_path import _Socket
from scheduler_harness import schedule_one


def _legacy_inputs(model_dir, monkeypatch, text, images):
    """What sglang 0.5.5's unpatched path builds on a scheduler rank for this request."""
    from sglang.srt.managers.schedule_batch import MultimodalInputs
    from tiny_models import close_tokenizer_manager, make_tokenizer_manager, tokenize_one

    monkeypatch.setenv("SGLANG_MM_PREMATERIALIZE", "0")
    tm = make_tokenizer_manager(model_dir)
    try:
        req = asyncio.run(tokenize_one(tm, text, image_data=list(images)))
    finally:
        close_tokenizer_manager(tm)
        monkeypatch.delenv("SGLANG_MM_PREMATERIALIZE")
    return list(req.input_ids), MultimodalInputs.from_dict(req.mm_inputs)


class _InWorker:
    """sglang's processor of this process run as a pool worker runs it
    (``pool_worker._process``: the cache's prepare, sglang's processor on its own event
    loop, off the caller's loop), without the pipe, so that the test can read the
    cache's counters."""

    def __init__(self, mm_processor, capacity: int, side) -> None:
        self.local = mm_processor
        self.cache = ProcessorCache.install(mm_processor, capacity, side) if capacity else None

    async def process_mm_data_async(self, **job):
        def run():
            loop = asyncio.new_event_loop()
            try:
                return pool_worker._process(loop, self.local, self.cache, job)
            finally:
                loop.close()

        return await asyncio.to_thread(run)


@pytest.fixture
def worker_side(model_dir, shm_dir, monkeypatch):
    """A patched TokenizerManager (no pool) whose processor runs as a worker runs it,
    with a cache of 1 GiB; ``make(capacity)`` builds another."""
    from tiny_models import close_tokenizer_manager, make_tokenizer_manager

    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("SGLANG_MM_PROCESSOR_WORKERS", "0")
    monkeypatch.setenv("SGLANG_MM_SHM_REGION_CHUNK_BYTES", str(64 << 20))
    made = []

    def make(capacity: int = 1 << 30):
        tm = make_tokenizer_manager(model_dir)
        made.append(tm)
        from sglang.srt.managers.async_mm_data_processor import AsyncMMDataProcessor

        worker = _InWorker(tm.mm_data_processor.mm_processor, capacity, tm.mmpre)
        tm.mm_data_processor = AsyncMMDataProcessor(  # as TokenizerSide.processor_pool does
            worker, max_concurrent_calls=tm.server_args.mm_max_concurrent_calls,
            timeout_s=tm.server_args.mm_per_request_timeout)
        return tm

    yield make
    for tm in made:
        close_tokenizer_manager(tm)


def _scheduled(tm, monkeypatch, text, images):
    """Input ids and the ``MultimodalInputs`` a patched scheduler rank builds from the
    request ``tm`` sends (the request scope closed, as after ``generate_request``)."""
    from tiny_models import tokenize_one

    socket = _Socket()

    async def go():
        with tm.mmpre.request_scope():
            req = await tokenize_one(tm, text, image_data=list(images))
            tm.mmpre.send(socket, req)
            return list(req.input_ids)

    input_ids = asyncio.run(go())
    built = schedule_one(monkeypatch, socket.sent[0])
    inputs = built.multimodal_inputs
    del built
    return input_ids, inputs


def _placements(monkeypatch) -> list:
    """The placements of request features, in order, from now on."""
    from sglang_mmpre.tokenizer_side.slots import RegionSlots

    placed, place = [], RegionSlots.place

    def spy(self, value):
        result = place(self, value)
        placed.append(result)
        return result

    monkeypatch.setattr(RegionSlots, "place", spy)
    return placed


def _release(*inputs) -> None:
    del inputs
    gc.collect()
    region_cache.flush()


def test_same_image_in_two_prompts_hits_and_equals_sglangs_from_dict(
    worker_side, model_dir, monkeypatch
):
    image = _jpeg(seed=21)
    texts = ["Describe: <|vision_start|><|image_pad|><|vision_end|>",
             "What is in <|vision_start|><|image_pad|><|vision_end|> this picture, briefly?"]
    legacy = [_legacy_inputs(model_dir, monkeypatch, t, [image]) for t in texts]
    tm = worker_side()
    cache = tm.mm_data_processor.mm_processor.cache
    got = [_scheduled(tm, monkeypatch, t, [image]) for t in texts]
    assert (cache.stats.misses, cache.stats.hits, cache.stats.bypasses) == (1, 1, 0)
    for (ids, inputs), (legacy_ids, legacy_inputs) in zip(got, legacy):
        assert ids == legacy_ids
        assert_equal_inputs(inputs, legacy_inputs)
    assert len(got[0][0]) != len(got[1][0])
    _release(got)


def test_repeated_images_among_new_ones_hit_per_image_and_equal_sglangs_from_dict(
    worker_side, model_dir, monkeypatch
):
    """A chat's second turn: its first image again, plus a new one, in a data URL and as
    a base64 string (one item, two encodings of the same bytes: one key). Its third turn
    sends both again (as bytes): they are one entry, whose slot the request gets again,
    with nothing copied."""
    a, b = _jpeg(seed=31), _jpeg(w=640, h=480, seed=32)
    as_url = "data:image/jpeg;base64," + base64.b64encode(a).decode()
    turn2 = [as_url, b]
    text2 = "One <|vision_start|><|image_pad|><|vision_end|> two " \
            "<|vision_start|><|image_pad|><|vision_end|>"
    legacy = _legacy_inputs(model_dir, monkeypatch, text2, turn2)
    tm = worker_side()
    cache = tm.mm_data_processor.mm_processor.cache
    placed = _placements(monkeypatch)
    first = _scheduled(tm, monkeypatch, None, [base64.b64encode(a).decode()])
    ids, inputs = _scheduled(tm, monkeypatch, text2, turn2)
    assert (cache.stats.misses, cache.stats.hits, cache.stats.bypasses) == (2, 1, 0)
    again = _scheduled(tm, monkeypatch, text2, [a, b])  # both images, in one entry
    assert (cache.stats.misses, cache.stats.hits, cache.stats.bypasses) == (2, 3, 0)
    assert placed[2].slot is placed[1].slot and placed[2].written == 0
    for got_ids, got in ((ids, inputs), again):
        assert got_ids == legacy[0]
        assert_equal_inputs(got, legacy[1])
    _release(first, inputs, again)


def test_different_images_and_cache_off_equal_sglangs_from_dict(
    worker_side, model_dir, monkeypatch
):
    images = [_jpeg(seed=41), _jpeg(seed=42)]
    legacy = [_legacy_inputs(model_dir, monkeypatch, None, [im]) for im in images]
    on, off = worker_side(), worker_side(capacity=0)
    assert off.mm_data_processor.mm_processor.cache is None
    got_on = [_scheduled(on, monkeypatch, None, [im]) for im in images]
    got_off = [_scheduled(off, monkeypatch, None, [im]) for im in images]
    stats = on.mm_data_processor.mm_processor.cache.stats
    assert (stats.misses, stats.hits) == (2, 0)
    for got in (got_on, got_off):
        for (ids, inputs), (legacy_ids, legacy_inputs) in zip(got, legacy):
            assert ids == legacy_ids
            assert_equal_inputs(inputs, legacy_inputs)
    _release(got_on, got_off)


def _only_entry(cache):
    (entry,) = {id(e): e for e in cache._by_images.values()}.values()
    return entry


def _replace_part(cache, **changes) -> None:
    """Change the one entry's one image (as a key collision or a corrupted entry would)."""
    import dataclasses

    entry = _only_entry(cache)
    changed = dataclasses.replace(entry, parts=(dataclasses.replace(entry.parts[0], **changes),))
    cache._by_images = {k: changed for k in cache._by_images}
    cache._by_image = {k: (changed, j) for k, (_, j) in cache._by_image.items()}


def test_stale_or_inconsistent_entry_is_not_used_and_the_request_equals_sglangs(
    worker_side, model_dir, monkeypatch
):
    """An entry under the request's key whose image size differs (what a key collision
    would look like) is not used (a mismatch); one whose rows don't make its grid's
    patches fails the hit's check, and the job runs again without the cache (a bypass).
    Either way the request is what sglang builds."""
    image = _jpeg(w=640, h=480, seed=81)
    legacy = _legacy_inputs(model_dir, monkeypatch, None, [image])
    tm = worker_side()
    cache = tm.mm_data_processor.mm_processor.cache
    first = _scheduled(tm, monkeypatch, None, [image])
    size = _only_entry(cache).parts[0].size
    _replace_part(cache, size=(size[0] + 28, size[1]))
    second = _scheduled(tm, monkeypatch, None, [image])
    assert (cache.stats.misses, cache.stats.hits, cache.stats.mismatches) == (2, 0, 1)
    grid = _only_entry(cache).parts[0].grid
    _replace_part(cache, grid=grid + torch.tensor([[0, 2, 0]], dtype=grid.dtype))
    third = _scheduled(tm, monkeypatch, None, [image])
    assert (cache.stats.hits, cache.stats.bypasses) == (0, 1)
    assert cache.snapshot().entries == 0, "the inconsistent entry was not dropped"
    rest = [_scheduled(tm, monkeypatch, None, [image]) for _ in range(2)]
    assert (cache.stats.misses, cache.stats.hits, cache.stats.bypasses) == (3, 1, 1)
    for ids, inputs in (first, second, third, *rest):
        assert ids == legacy[0]
        assert_equal_inputs(inputs, legacy[1])
    _release(first, second, third, rest)


def test_a_hit_of_every_image_is_its_slot_again_and_a_write_to_it_stays_in_that_request(
    worker_side, model_dir, monkeypatch
):
    """Note [kept slots]: the cached rows are the slot the first request was sent in. A
    request whose images are all one entry's gets that slot again, with nothing copied and
    nothing hashed; when sglang's code writes into such a feature (simulated here, between
    the processor and the placement), that request is built from what it wrote, and the
    slot, hence the next hit, still holds the processor's rows."""
    from sglang_mmpre.tokenizer_side import slots as slots_module
    from sglang_mmpre.tokenizer_side.slots import RegionSlots, _copy_and_hash, _hash_rest

    image = _jpeg(w=640, h=480, seed=82)
    legacy = _legacy_inputs(model_dir, monkeypatch, None, [image])
    tm = worker_side()
    cache = tm.mm_data_processor.mm_processor.cache
    passes, write = [], []
    place = RegionSlots.place

    def writing(self, value):
        if write:
            value.add_(1.0)  # as sglang's code would write into its feature
        return place(self, value)

    monkeypatch.setattr(RegionSlots, "place", writing)
    placed = _placements(monkeypatch)
    monkeypatch.setattr(slots_module, "_hash_rest", lambda *a: passes.append(1) or _hash_rest(*a))
    monkeypatch.setattr(slots_module, "_copy_and_hash",
                        lambda *a: passes.append(1) or _copy_and_hash(*a))
    got = [_scheduled(tm, monkeypatch, None, [image])]
    _release()
    passes.clear()
    got.append(_scheduled(tm, monkeypatch, None, [image]))
    assert (cache.stats.misses, cache.stats.hits) == (1, 1)
    assert placed[1].slot is placed[0].slot and placed[1].written == 0 and passes == []
    write.append(True)
    ids, written = _scheduled(tm, monkeypatch, None, [image])
    write.clear()
    assert placed[2].slot is not placed[0].slot and placed[2].written > 0
    assert torch.equal(written.mm_items[0].feature, legacy[1].mm_items[0].feature + 1.0)
    got.append(_scheduled(tm, monkeypatch, None, [image]))
    assert placed[3].slot is placed[0].slot and cache.stats.hits == 3
    for ids, inputs in got:
        assert ids == legacy[0]
        assert_equal_inputs(inputs, legacy[1])
    _release(got, written)


def test_key_covers_the_image_processors_configuration(model_dir, shm_dir, monkeypatch):
    """The same bytes under another ``min_pixels``/``max_pixels`` (which change the
    grid) get another key; the same configuration the same key."""
    from tiny_models import close_tokenizer_manager, make_tokenizer_manager

    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("SGLANG_MM_PROCESSOR_WORKERS", "0")
    tm = make_tokenizer_manager(model_dir)
    try:
        processor = tm.mm_data_processor.mm_processor
        data = _jpeg(seed=51)
        base = ProcessorCache(1 << 20, fingerprint(processor))
        same = ProcessorCache(1 << 20, fingerprint(processor))
        processor._processor.image_processor.max_pixels = 256 * 28 * 28
        fewer = ProcessorCache(1 << 20, fingerprint(processor))
        processor._processor.image_processor.min_pixels = 8 * 28 * 28
        other = ProcessorCache(1 << 20, fingerprint(processor))
        assert base.key(data) == same.key(data)
        assert len({base.key(data), fewer.key(data), other.key(data)}) == 3
        assert base.key(data) != base.key(data + b"\0")
        assert len(base.key(data)) == 32
    finally:
        close_tokenizer_manager(tm)


@pytest.mark.parametrize("use_fast", [False, True])
def test_image_processor_per_image_calls_concatenated_equal_one_batched_call(model_dir, use_fast):
    """What the hit path relies on: Qwen2-VL's image processor treats each image on its
    own, so its outputs for images taken one at a time, concatenated, are its output for
    the batch, bit for bit."""
    from sglang.srt.multimodal.processors.qwen_vl import resize_image
    from tiny_models import make_image
    from transformers import AutoImageProcessor

    ip = AutoImageProcessor.from_pretrained(str(model_dir), use_fast=use_fast)
    images = [resize_image(make_image(w, h, seed=i))
              for i, (w, h) in enumerate([(1120, 700), (640, 480), (333, 517)])]
    batched = ip(images=images, return_tensors="pt")
    single = [ip(images=[im], return_tensors="pt") for im in images]
    for name in ("pixel_values", "image_grid_thw"):
        assert torch.equal(torch.cat([s[name] for s in single]), batched[name]), name


def test_cache_keeps_unreferenced_slots_within_its_bytes_least_recently_used_first(
    worker_side, model_dir, monkeypatch
):
    """Room for one and a half 320x240 entries: images 62, 63, 62 (a hit, which makes 62
    the most recently used), 64 (63 goes, the least recently used), 62 (a hit), 63 (a
    miss again). Every request is what sglang builds."""
    tm = worker_side()
    cache = tm.mm_data_processor.mm_processor.cache
    images = {seed: _jpeg(w=320, h=240, seed=seed) for seed in (62, 63, 64)}
    legacy = {seed: _legacy_inputs(model_dir, monkeypatch, None, [im])
              for seed, im in images.items()}

    def check(seed: int) -> None:  # the ranks' views go before the next request
        ids, inputs = _scheduled(tm, monkeypatch, None, [images[seed]])
        assert ids == legacy[seed][0]
        assert_equal_inputs(inputs, legacy[seed][1])
        _release(inputs)

    check(62)
    tm.mmpre.region.keep_bytes = cache.snapshot().bytes_held * 3 // 2
    for seed in (63, 62, 64, 62, 63):
        check(seed)
    stats = cache.snapshot()
    assert (stats.misses, stats.hits) == (4, 2)
    assert stats.evictions >= 1


def test_pooled_worker_with_cache_equals_sglangs_from_dict_for_a_repeated_image(
    pooled, model_dir, monkeypatch
):
    """The same through a real pool worker (the cache is on by default)."""
    image = _jpeg(seed=71)
    texts = [None, "Again: <|vision_start|><|image_pad|><|vision_end|> in short"]
    legacy = [_legacy_inputs(model_dir, monkeypatch, t, [image]) for t in texts]
    got = [_scheduled(pooled, monkeypatch, t, [image]) for t in texts]
    for (ids, inputs), (legacy_ids, legacy_inputs) in zip(got, legacy):
        assert ids == legacy_ids
        assert_equal_inputs(inputs, legacy_inputs)
    _release(got)


def test_media_bytes_are_what_sglangs_load_image_decodes(tmp_path):
    """The key's bytes for each form sglang 0.5.5's ``load_image`` accepts; a URL (sglang
    fetches it) and a PIL image have none and go through uncached."""
    from PIL import Image
    from sglang.srt.utils.common import ImageData

    from sglang_mmpre.tokenizer_side.processor_cache import media_bytes

    data = _jpeg(w=64, h=48, seed=91)
    b64 = base64.b64encode(data).decode()
    path = tmp_path / "picture.jpg"
    path.write_bytes(data)
    for item in (data, b64, "data:image/jpeg;base64," + b64, str(path),
                 ImageData(url="data:image/png;base64," + b64)):
        assert media_bytes(item) == data
    assert media_bytes("http://127.0.0.1:1/picture.jpg") is None
    assert media_bytes(Image.new("RGB", (4, 4))) is None
    assert media_bytes("not base64!") is None


@pytest.fixture
def pooled_two(model_dir, shm_dir, monkeypatch):
    """A patched TokenizerManager with a pool of two workers (each with its cache); no
    file of ours is left after."""
    import os

    from test_processor_pool import BOOT_DIR
    from tiny_models import close_tokenizer_manager, make_tokenizer_manager

    monkeypatch.setenv("SGLANG_MM_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("SGLANG_MM_PROCESSOR_WORKERS", "2")
    monkeypatch.setenv("SGLANG_MM_SHM_REGION_CHUNK_BYTES", str(16 << 20))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(BOOT_DIR), os.environ["PYTHONPATH"]]))
    tm = make_tokenizer_manager(model_dir)
    try:
        assert len(tm.mmpre.pool._workers) == 2
        yield tm
    finally:
        close_tokenizer_manager(tm)
    assert os.listdir(shm_dir) == [], "files left after the pool shut down"


def _served_by(tm, images) -> int:
    """Tokenize one request of ``images`` (its scope closed, nothing sent); the pid of the
    worker whose region holds its tensors."""
    from sglang_mmpre.transport.liveness import OWNED_NAME_RE
    from tiny_models import tokenize_one

    req = asyncio.run(tokenize_one(tm, image_data=list(images)))
    pid = int(OWNED_NAME_RE.match(req.materialized_mm_inputs.segment.name).group(2))
    tm.mmpre.release_unsent(req)
    return pid


def _worker_of(pool, image) -> int:
    """The index of the worker that jobs of ``image`` (bytes, a URL) are routed to."""
    from sglang_mmpre.tokenizer_side.pool import routing_key

    with pool._lock:
        return pool._route(routing_key({"image_data": [image]})).index


def test_same_image_goes_to_one_worker_and_misses_once_in_total(pooled_two):
    """Note [routing by key]: with two workers, each of two images (routed to different
    workers) sent four times, three in a row then interleaved, is processed once in all
    and hits three times on the worker that processed it; neither worker keeps the
    other's image. (From one shared queue, the workers took turns: each image missed in
    both, and both held both.)"""
    pool = pooled_two.mmpre.pool
    a = _jpeg(448, 448, seed=101)
    seeds = iter(range(102, 200))
    b = next(im for im in (_jpeg(448, 448, seed=s) for s in seeds)
             if _worker_of(pool, im) != _worker_of(pool, a))
    pids = [w.process.pid for w in pool._workers]
    served = {id(a): set(), id(b): set()}
    for image in (a,) * 3 + (b,) * 3 + (a, b):
        served[id(image)].add(_served_by(pooled_two, [image]))
    assert served[id(a)] == {pids[_worker_of(pool, a)]}
    assert served[id(b)] == {pids[_worker_of(pool, b)]}
    stats = pool.cache_stats()
    assert [(s.misses, s.hits, s.entries) for s in stats] == [(1, 3, 1), (1, 3, 1)]


def test_killed_worker_holding_a_cached_image_loses_only_its_cache(
    pooled_two, model_dir, monkeypatch, shm_dir
):
    """``kill -9`` of the worker whose cache holds an image: the next request of that
    image is served by its replacement (a miss), equal to what sglang's unpatched path
    builds; the dead worker's files go, and no slot stays referenced."""
    import os
    import signal

    from test_processor_pool import _region_refcounts, _wait_gone

    image = _jpeg(640, 480, seed=111)
    legacy = _legacy_inputs(model_dir, monkeypatch, None, [image])
    pool = pooled_two.mmpre.pool
    index = _worker_of(pool, image)
    got = [_scheduled(pooled_two, monkeypatch, None, [image]) for _ in range(2)]
    stats = pool.cache_stats()[index]
    assert (stats.misses, stats.hits, stats.entries) == (1, 1, 1)
    for earlier_ids, earlier in got:
        assert earlier_ids == legacy[0]
        assert_equal_inputs(earlier, legacy[1])
    del got, earlier  # the ranks' views of the victim's slot
    _release()
    victim = pool._workers[index].process.pid
    os.kill(victim, signal.SIGKILL)
    pool._workers[index].process.join(30)  # the forkserver reported it dead: the pool
    # finds it dead before sending the job (a worker dying after that check fails its job)
    ids, inputs = _scheduled(pooled_two, monkeypatch, None, [image])
    replacement = pool._workers[index].process.pid
    assert replacement != victim
    stats = pool.cache_stats()[index]
    assert (stats.misses, stats.hits) == (1, 0), "the replacement's cache was not empty"
    assert ids == legacy[0]
    assert_equal_inputs(inputs, legacy[1])
    del inputs
    _release()
    assert _wait_gone(shm_dir, f"sglmmpre_{victim}_") == []
    regions = [n for n in os.listdir(shm_dir) if n.startswith(f"sglmmpre_{replacement}_")
               and not n.endswith(".lock")]
    assert regions, "the replacement made no region"
    for name in regions:
        assert set(_region_refcounts(shm_dir, name)) == {0}, "a slot stays referenced"


def test_job_routed_to_a_busy_worker_is_taken_by_the_idle_one_and_equals_sglangs(
    pooled_two, model_dir, monkeypatch
):
    """Note [routing by key]: while the worker an image is routed to is stuck on a URL
    that never finishes, the image's job is taken by the other, idle worker (after
    ``STEAL_AFTER_S``), and what the request gets is what sglang's unpatched path builds."""
    from sglang_mmpre.transport.liveness import OWNED_NAME_RE
    from server_cases import stalling_image_url
    from tiny_models import tokenize_one

    pool = pooled_two.mmpre.pool
    pids = [w.process.pid for w in pool._workers]
    socket = _Socket()

    async def scenario(url, hit, image):
        stalled = asyncio.ensure_future(tokenize_one(pooled_two, image_data=[url]))
        assert await asyncio.to_thread(hit.wait, 60), "the worker never fetched the URL"
        with pooled_two.mmpre.request_scope():
            req = await tokenize_one(pooled_two, image_data=[image])
            pooled_two.mmpre.send(socket, req)
        stalled.cancel()
        return list(req.input_ids), req.materialized_mm_inputs.segment.name

    with stalling_image_url(trickle=True) as (url, hit):
        busy = _worker_of(pool, url)
        seeds = iter(range(120, 300))
        image = next(im for im in (_jpeg(448, 448, seed=s) for s in seeds)
                     if _worker_of(pool, im) == busy)
        ids, region = asyncio.run(scenario(url, hit, image))
    assert int(OWNED_NAME_RE.match(region).group(2)) == pids[1 - busy], \
        "the job waited for the busy worker"
    legacy = _legacy_inputs(model_dir, monkeypatch, None, [image])
    built = schedule_one(monkeypatch, socket.sent[0])
    assert ids == legacy[0]
    assert_equal_inputs(built.multimodal_inputs, legacy[1])
    del built
    _release()


def test_routing_key_is_the_same_for_the_same_payload_and_none_without_media():
    """What routes a job: equal payloads (bytes, base64 alone or in a data URL) route
    alike; a payload of another length routes by it, whatever its sampled ends (the
    length is in the key); a job with no media item has none (it goes to the least
    loaded worker)."""
    from sglang.srt.utils.common import ImageData

    from sglang_mmpre.tokenizer_side.pool import ROUTE_SAMPLE_BYTES, routing_key

    data = _jpeg(w=64, h=48, seed=92)
    b64 = base64.b64encode(data).decode()
    key = routing_key({"image_data": [b64]})
    assert len(key) == 32
    assert routing_key({"image_data": ["data:image/jpeg;base64," + b64]}) == key
    assert routing_key({"image_data": [ImageData(url=b64)]}) == key
    assert routing_key({"image_data": b64}) == key
    assert routing_key({"image_data": [data]}) != key  # not decoded: cheap on the loop
    assert routing_key({"image_data": [b64, "other"]}) == key  # the first item routes
    long = b"x" * (3 * ROUTE_SAMPLE_BYTES)
    assert routing_key({"image_data": [long]}) != routing_key({"image_data": [long + b"x"]})
    assert routing_key({"image_data": [], "audio_data": ["http://h/a.wav"]}) is not None
    assert routing_key({"image_data": None, "audio_data": None}) is None


def test_worker_that_cannot_restart_leaves_the_routing_and_its_job_is_served_by_another(
    pooled_two, monkeypatch
):
    """Note [routing by key]: a worker found dead whose replacement can't start gives its
    job to the worker still serving, which then gets every job."""
    import os
    import signal

    from test_processor_pool import _wait_dead

    pool = pooled_two.mmpre.pool
    image = _jpeg(448, 448, seed=131)
    index = _worker_of(pool, image)
    dead, other = pool._workers[index], pool._workers[1 - index]
    monkeypatch.setattr(dead, "start", lambda: False)  # its replacement can't start
    victim = dead.process.pid
    os.kill(victim, signal.SIGKILL)
    _wait_dead(victim)
    assert _served_by(pooled_two, [image]) == other.process.pid
    assert not dead.serving and pool.failed is None
    assert _worker_of(pool, image) == other.index
    assert _served_by(pooled_two, [image]) == other.process.pid
    stats = pool.cache_stats()[other.index]
    assert (stats.misses, stats.hits) == (1, 1)
