"""The processor cache of one processor worker: an image's processor outputs, keyed by
the sha256 of its bytes as received.

A repeated image (a chat client re-sending earlier turns, an agent's screenshots) costs
sglang 0.5.5 a decode, a resize and the image processor's normalization every time. In a
processor worker (``pool_worker.py``), :class:`ProcessorCache` keeps each image's own
outputs (its ``pixel_values`` rows and its ``image_grid_thw`` row), so a repeat skips all
three. Everything per request still runs in sglang's and transformers' own code:
tokenizing the text, expanding the image tokens from ``image_grid_thw``, the items'
offsets, the MRoPE positions and the item hash (``materialize.py``).

How a job goes through it (Note [processor cache]):

1. :meth:`ProcessorCache.prepare` (in the worker, off the TokenizerManager's event loop)
   keys every image item: sha256 over a fingerprint of everything else that shapes the
   output (the image processor's whole configuration, sglang's resize bounds, the model
   type, the modality) and the media bytes as received (the bytes, a file's bytes, a
   data URL's or base64 string's decoded payload). Items it can't key (a URL sglang
   fetches itself, an in-process PIL image, a precomputed dict) go through uncached. A
   cached item is replaced by a 1x1 placeholder image whose ``info`` carries the key
   (Pillow copies ``info`` through ``convert`` and ``resize``, which sglang applies).
2. sglang's processor runs unchanged, except that the image processor's ``preprocess``
   (in this worker's processor object only, see :meth:`ProcessorCache.install`) is
   :meth:`ProcessorCache._preprocess`: the images sglang loaded go through the real
   ``preprocess`` in one call, the placeholders take their cached outputs, and the
   outputs are concatenated in the request's order. That equals the one batched call bit
   for bit, because the Qwen2-VL image processor handles each image on its own
   (``tests/test_processor_cache.py`` checks it).
3. The cached rows are not copies of their own: they are the region slot the request
   that made them was sent in (``slots.py``, Note [kept slots]). An entry is that slot
   and the per-image values (each image's rows in it, its ``image_grid_thw`` row, its
   size). A hit maps its rows copy-on-write (:meth:`RegionSlots.kept_view`); when every
   image of the request is in one entry, in order (the same image again, a chat turn
   re-sending the same images), that view of the whole slot is the feature, and
   ``place`` takes the slot again: no copy and no hash, the item hash and ``pad_value``
   are the slot's. Otherwise the rows are concatenated, hashed and copied as on a miss.
4. Every hit is checked: the image's size (read from its header, no decode) must be the
   cached one, and the cached rows must be ``t*h*w`` of the cached grid (so the tokens
   sglang expands match the features). A failed check, or a call the cache can't serve
   (other keyword arguments, videos, an unexpected image list), raises
   :class:`CacheBypass`; the worker runs the job again without the cache and counts it.

The bytes live in the worker's region, in slots no request references, least recently
used first, within ``SGLANG_MM_PROCESSOR_CACHE_BYTES`` (split across the workers, at most
half of a worker's share of the cap; 0 turns the cache off); when the region is full the
cache shrinks before a request takes a segment. A slot a request or a rank holds is never
freed, and the cache holds no reference of its own, so a worker killed loses its cache
and nothing else. The pool sends the jobs whose first image is the same to the same
worker (Note [routing by key] in ``pool.py``). A key is a full sha256 computed here from
the bytes; nothing a request sends can name another request's entry.
"""

from __future__ import annotations

import functools
import hashlib
import os
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["ProcessorCache", "CacheBypass", "CacheStats", "fingerprint", "media_bytes",
           "LOG_INTERVAL_S"]

logger = logging.getLogger(__name__)

#: Seconds between two metric lines in the server log (written after a job, when due).
LOG_INTERVAL_S = float(os.environ.get("SGLANG_MM_PROCESSOR_CACHE_LOG_S", "60"))

_KEY_INFO = "sglang_mmpre_processor_cache_key"
_FILE_SUFFIXES = ("png", "jpg", "jpeg", "webp", "gif")


class CacheBypass(Exception):
    """This job can't be served from the cache: run it again without it."""


def media_bytes(item: Any) -> Optional[bytes]:
    """The bytes sglang 0.5.5's ``load_image`` decodes for ``item``, or None when it
    fetches them (a URL) or gets no bytes (a PIL image, a precomputed dict). The cases
    are tried in ``load_image``'s order."""
    import pybase64
    from sglang.srt.utils.common import ImageData

    if isinstance(item, ImageData):
        item = item.url
    if isinstance(item, bytes):
        return item
    if not isinstance(item, str) or item.startswith(("http://", "https://")):
        return None
    try:
        if item.lower().endswith(_FILE_SUFFIXES):
            with open(item, "rb") as f:
                return f.read()
        if item.startswith("data:"):
            item = item.split(",")[1]
        return pybase64.b64decode(item, validate=True)
    except Exception:  # noqa: BLE001 - sglang's own load then reports the error
        return None


@dataclass(frozen=True)
class _Part:
    """One image of an entry: its key (None: not keyed), size, rows and grid row."""

    key: Optional[bytes]
    size: Optional[tuple[int, int]]
    first_row: int
    rows: int
    grid: torch.Tensor  # its image_grid_thw row, shape (1, 3)


@dataclass(frozen=True)
class _Entry:
    """The rows of the images of one request, as they lie in the region slot it was sent
    in (``dtype`` and ``shape``: the feature's; ``call``: the preprocess keyword
    arguments it was made with)."""

    slot: Any
    dtype: torch.dtype
    shape: tuple[int, ...]
    parts: tuple[_Part, ...]
    call: str

    def rows_of(self, part: _Part) -> tuple[int, int]:
        """Byte offset and length of ``part``'s rows in the slot."""
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        return part.first_row * row, part.rows * row


@dataclass
class CacheStats:
    """Counters of one worker's cache (logged at an interval)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0  # entries whose slot's space was reused
    bypasses: int = 0  # jobs run again without the cache (a failed check)
    mismatches: int = 0  # entries of an equal key but another image size, not used
    entries: int = 0
    bytes_held: int = 0  # bytes of the slots entries name (referenced by requests or not)


@dataclass
class _Job:
    keys: list[Optional[bytes]]  # per image item of the job, in order (None: uncached)
    sizes: list[Optional[tuple[int, int]]]
    hits: dict[int, tuple[_Entry, int]] = field(default_factory=dict)  # item -> part
    views: dict[int, torch.Tensor] = field(default_factory=dict)  # item -> its rows
    whole: Optional[torch.Tensor] = None  # the one entry's whole slot, all items hit


class ProcessorCache:
    """The cache of one worker; see the module docstring and Note [processor cache].

    ``side`` is the worker's ``TokenizerSide``: the cache keeps its entries in the slots
    of ``side.region`` (no region, no cache)."""

    def __init__(self, capacity_bytes: int, fingerprint: bytes, side: Any = None) -> None:
        self.capacity = capacity_bytes
        self.fingerprint = fingerprint
        self.stats = CacheStats()
        self._side = side
        self._region: Any = None
        self._by_images: dict[tuple[bytes, ...], _Entry] = {}  # every image of an entry
        self._by_image: dict[bytes, tuple[_Entry, int]] = {}  # one image: entry, part
        self._pending: dict[int, tuple[Any, tuple[_Part, ...], str]] = {}  # id(feature)
        self._lock = threading.Lock()
        self._job: Optional[_Job] = None
        self._inner: Any = None
        self._last_log = time.monotonic()

    # -- set-up ------------------------------------------------------------------------
    @classmethod
    def install(cls, mm_processor: Any, capacity_bytes: int,
                side: Any) -> Optional["ProcessorCache"]:
        """A cache wrapped around ``mm_processor``'s image processor (once per processor
        object), or None when the capacity is 0, ``side`` has no region, or
        :func:`fingerprint` finds no key. Its capacity is at most half of ``side``'s cap.

        The image processor's class is replaced by a subclass of the same name whose
        ``preprocess`` is the cache's (``isinstance``, which sglang checks to pick the
        fast processor's device, still holds; nothing is added to its configuration)."""
        fp = fingerprint(mm_processor)
        capacity_bytes = min(capacity_bytes, side.settings.shm_cap_bytes // 2)
        if capacity_bytes <= 0 or fp is None or side.region is None:
            return None
        image_processor = mm_processor._processor.image_processor
        base = type(image_processor)
        if getattr(base, "_sglang_mmpre_cached", False):
            raise RuntimeError("this processor has a processor cache already")
        cache = cls(capacity_bytes, fp, side)
        cache._inner = functools.partial(base.preprocess, image_processor)
        cache._attach(side.region)

        def preprocess(self: Any, images: Any, *args: Any, **kwargs: Any) -> Any:
            return cache._preprocess(images, *args, **kwargs)

        image_processor.__class__ = type(base.__name__, (base,), {
            "preprocess": preprocess, "_sglang_mmpre_cached": True,
            "__module__": base.__module__, "__qualname__": base.__qualname__})
        return cache

    def _attach(self, region: Any) -> None:
        """Keep entries in ``region`` (a new one replaced a region deleted from outside:
        the old one's entries are forgotten)."""
        if region is self._region:
            return
        with self._lock:
            self._by_images.clear()
            self._by_image.clear()
        self._region = region
        if region is not None:
            region.keep_bytes = self.capacity
            region.observer = self

    def key(self, data: bytes) -> bytes:
        """The full sha256 of this worker's fingerprint and ``data``."""
        h = hashlib.sha256(self.fingerprint)
        h.update(data)
        return h.digest()

    # -- one job -----------------------------------------------------------------------
    def prepare(self, job: dict) -> dict:
        """The job to run: ``job`` with each cached image replaced by a placeholder that
        names its key (``job`` itself is left as it was, for :class:`CacheBypass`). The
        hits' rows are mapped (and their slots pinned) until the job is finished."""
        from PIL import Image

        self._attach(self._side.region)
        items = job.get("image_data")
        request = job.get("request_obj")
        if self._region is None or not isinstance(items, list) or not items \
                or getattr(request, "video_data", None):
            self._job = None
            return job
        keys: list[Optional[bytes]] = []
        sizes: list[Optional[tuple[int, int]]] = []
        for item in items:
            data = media_bytes(item)
            key = size = None
            if data is not None:
                try:
                    size = Image.open(BytesIO(data)).size  # the header only
                    key = self.key(data)
                except Exception:  # noqa: BLE001 - sglang's own load reports it
                    pass
            keys.append(key)
            sizes.append(size)
        state = self._job = _Job(keys, sizes)
        with self._lock:
            whole = self._by_images.get(tuple(keys)) if all(keys) else None
            found = {i: self._by_image.get(k) for i, k in enumerate(keys) if k is not None}
        if whole is not None and all(p.size == size for p, size in zip(whole.parts, sizes)):
            view = self._region.kept_view(whole.slot, 0, whole.slot.nbytes, whole.dtype,
                                          whole.shape)
            if view is not None:
                state.whole = view
                state.hits = {i: (whole, i) for i in range(len(keys))}
        for i, hit in found.items() if state.whole is None else ():
            if hit is None:
                continue
            entry, j = hit
            if entry.parts[j].size != sizes[i]:
                with self._lock:
                    self.stats.mismatches += 1  # processed as a miss, which replaces it
                continue
            start, nbytes = entry.rows_of(entry.parts[j])
            view = self._region.kept_view(entry.slot, start, nbytes, entry.dtype,
                                          (entry.parts[j].rows, *entry.shape[1:]))
            if view is not None:
                state.hits[i], state.views[i] = hit, view
        if not state.hits:
            return job
        replaced = list(items)
        for i in state.hits:
            placeholder = Image.new("RGB", (1, 1))
            placeholder.info[_KEY_INFO] = keys[i]
            replaced[i] = placeholder
        return dict(job, image_data=replaced)

    def finish(self, outcome: str) -> None:
        """Count the job by its ``outcome`` ("served" through the cache, "bypassed":
        :class:`CacheBypass`, "failed": the processor raised) and log when due."""
        job, self._job = self._job, None
        with self._lock:
            if job is not None and outcome == "served":
                self.stats.hits += len(job.hits)
                self.stats.misses += sum(1 for k in job.keys if k is not None) - len(job.hits)
            elif job is not None and outcome == "bypassed":
                self.stats.bypasses += 1
            now = time.monotonic()
            due = now - self._last_log >= LOG_INTERVAL_S
            if due:
                self._last_log = now
        if due:
            self.log()

    def log(self) -> None:
        s = self.snapshot()
        logger.info("processor cache: %d hits, %d misses, %d evictions, %d bypasses, "
                    "%d mismatches, %d entries, %.1f MiB held of %.1f MiB", s.hits, s.misses,
                    s.evictions, s.bypasses, s.mismatches, s.entries, s.bytes_held / 2**20,
                    self.capacity / 2**20)

    def snapshot(self) -> CacheStats:
        with self._lock:
            entries = {id(e): e for e in self._by_images.values()}
            entries.update((id(e), e) for e, _ in self._by_image.values())
            slots = {id(e.slot): e.slot.nbytes for e in entries.values()}
            return CacheStats(**dict(vars(self.stats), entries=len(entries),
                                     bytes_held=sum(slots.values())))

    # -- the image processor's preprocess --------------------------------------------------
    def _preprocess(self, images: Any, *args: Any, **kwargs: Any) -> Any:
        job = self._job
        if job is None or args or kwargs.get("videos") is not None \
                or not isinstance(images, list) or len(images) > len(job.keys):
            if job is not None and job.hits:
                raise CacheBypass("a call the cache can't serve")
            return self._inner(images, *args, **kwargs)
        call = repr(sorted(kwargs.items()))
        for i, (entry, j) in job.hits.items():
            if i >= len(images) or getattr(images[i], "info", {}).get(_KEY_INFO) != job.keys[i]:
                raise CacheBypass("a placeholder is not where its item was")
            if entry.call != call or not _consistent(entry.parts[j]):
                self._forget(entry)
                raise CacheBypass("a cached entry fails its checks")
        misses = [i for i in range(len(images)) if i not in job.hits]
        out = self._inner([images[i] for i in misses], *args, **kwargs) if misses else None
        fresh = _per_image(out, len(misses)) if out is not None else []
        if fresh is None:  # outputs this cache does not split
            if job.hits:
                raise CacheBypass("outputs the cache can't split per image")
            return out
        rows, grids = [], []
        for i in range(len(images)):
            if i in job.hits:
                entry, j = job.hits[i]
                rows.append(job.views.get(i))
                grids.append(entry.parts[j].grid)
            else:
                rows.append(fresh[misses.index(i)][0])
                grids.append(fresh[misses.index(i)][1])
        if job.whole is not None:
            pixel_values = job.whole
        elif not job.hits:
            pixel_values = out["pixel_values"]
        else:
            if len({(r.dtype, r.shape[1:]) for r in rows}) != 1:
                raise CacheBypass("cached rows unlike the new ones")
            pixel_values = torch.cat(rows, dim=0)
        grid = torch.cat(grids, dim=0)
        if job.whole is None and any(k is not None for k in job.keys):
            parts, first = [], 0
            for i, (r, g) in enumerate(zip(rows, grids)):
                parts.append(_Part(job.keys[i], job.sizes[i], first, r.shape[0], g))
                first += r.shape[0]
            self._expect(pixel_values, tuple(parts), call)
        if out is not None and not job.hits:
            return out
        from transformers.image_processing_utils import BatchFeature

        return BatchFeature(data={"pixel_values": pixel_values, "image_grid_thw": grid})

    def _expect(self, feature: torch.Tensor, parts: tuple[_Part, ...], call: str) -> None:
        """Make an entry of ``feature`` once ``place`` tells where it went."""
        key = id(feature)

        def forget(ref: "weakref.ref", key: int = key) -> None:
            if self._pending.get(key, (None,))[0] is ref:
                self._pending.pop(key, None)

        self._pending[key] = (weakref.ref(feature, forget), parts, call)

    # -- what the region tells (slots.SlotObserver) ------------------------------------------
    def placed(self, leaf: Any, slot: Any) -> None:
        pending = self._pending.pop(id(leaf), None)
        if pending is None or pending[0]() is not leaf or slot.nbytes != leaf.nbytes:
            return
        _, parts, call = pending
        entry = _Entry(slot, leaf.dtype, tuple(leaf.shape), parts, call)
        keys = tuple(p.key for p in parts)
        with self._lock:
            if all(keys):
                self._by_images[keys] = entry
            for j, part in enumerate(parts):
                if part.key is not None:
                    self._by_image[part.key] = (entry, j)

    def reclaimed(self, slot: Any) -> None:
        with self._lock:
            gone = self._remove(lambda e: e.slot is slot)
            self.stats.evictions += gone

    def _forget(self, entry: _Entry) -> None:
        """Drop ``entry`` (it failed a hit's check)."""
        with self._lock:
            self._remove(lambda e: e is entry)

    def _remove(self, match: Any) -> int:
        """Remove the entries ``match`` selects (under self._lock); how many."""
        gone = {id(e) for e in self._by_images.values() if match(e)}
        gone.update(id(e) for e, _ in self._by_image.values() if match(e))
        for k in [k for k, e in self._by_images.items() if id(e) in gone]:
            del self._by_images[k]
        for k in [k for k, (e, _) in self._by_image.items() if id(e) in gone]:
            del self._by_image[k]
        return len(gone)


def _per_image(out: Any, n: int) -> Optional[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each image's (``pixel_values`` rows, ``image_grid_thw`` row) of one preprocess call
    over ``n`` images, or None if its outputs are not those two CPU tensors."""
    if not hasattr(out, "keys") or set(out.keys()) != {"pixel_values", "image_grid_thw"}:
        return None
    pixels, grid = out["pixel_values"], out["image_grid_thw"]
    if not all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in (pixels, grid)) \
            or grid.shape != (n, 3):
        return None
    rows = [int(np.prod([int(x) for x in g])) for g in grid]
    if sum(rows) != pixels.shape[0]:
        return None
    split, start = [], 0
    for j, r in enumerate(rows):
        split.append((pixels[start:start + r], grid[j:j + 1].clone()))
        start += r
    return split


def fingerprint(mm_processor: Any) -> Optional[bytes]:
    """sha256 over everything besides the bytes that shapes an image's outputs in
    ``mm_processor``, or None if this cache does not serve it: only sglang's Qwen-VL
    processor, whose outputs it splits per image (``pixel_values`` rows,
    ``image_grid_thw``)."""
    from sglang.srt.multimodal.processors import qwen_vl

    image_processor = getattr(getattr(mm_processor, "_processor", None), "image_processor", None)
    if image_processor is None or not isinstance(mm_processor, qwen_vl.QwenVLImageProcessor) \
            or getattr(image_processor, "merge_size", None) is None:
        return None
    return hashlib.sha256(repr((
        "sglang_mmpre processor cache 1", "image",
        type(mm_processor).__name__, getattr(mm_processor.hf_config, "model_type", None),
        type(image_processor).__name__, image_processor.to_json_string(),
        qwen_vl.MIN_PIXELS, qwen_vl.MAX_PIXELS, qwen_vl.IMAGE_FACTOR,
    )).encode()).digest()


def _consistent(part: _Part) -> bool:
    """The cached rows are the ``t*h*w`` patches of the cached grid: the number of image
    tokens sglang expands from the grid matches the features."""
    return part.grid.shape == (1, 3) and int(np.prod([int(x) for x in part.grid[0]])) == part.rows
