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
3. A request of one cached image gets the cached tensor itself as its feature: the slot
   that holds it is found again by its remembered sha256, with no pass over its bytes
   (Note [remembered digests] in ``hashing.py``); the item hash and ``pad_value`` are
   those of the first request. Several images are concatenated, hashed and copied as on
   a miss.
4. Every hit is checked: the image's size (read from its header, no decode) must be the
   cached one, and the cached rows must be ``t*h*w`` of the cached grid (so the tokens
   sglang expands match the features). A failed check, or a call the cache can't serve
   (other keyword arguments, videos, an unexpected image list), raises
   :class:`CacheBypass`; the worker runs the job again without the cache and counts it.

The cache is private memory of its worker, an LRU bounded by
``SGLANG_MM_PROCESSOR_CACHE_BYTES`` (split across the workers; 0 turns it off). The pool
sends the jobs whose first image is the same to the same worker (Note [routing by key] in
``pool.py``): such an image is processed once and kept by one worker. A worker killed
loses its cache and nothing else. A key is a full sha256 computed here from the
bytes; nothing a request sends can name another request's entry.
"""

from __future__ import annotations

import functools
import hashlib
import os
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Optional

import numpy as np
import torch

from sglang_mmpre.tokenizer_side.hashing import pin_immutable

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


@dataclass
class _Entry:
    """One image's outputs: per-image values (one row each, e.g. ``image_grid_thw``) and
    per-patch values (``t*h*w`` rows, e.g. ``pixel_values``), in the output's key order."""

    names: tuple[str, ...]
    per_image: dict[str, Any]
    per_row: dict[str, Any]
    size: tuple[int, int]
    call: str  # the preprocess keyword arguments it was made with
    nbytes: int
    versions: tuple[int, ...] = ()  # the per-patch tensors' ``_version`` when stored


@dataclass
class CacheStats:
    """Counters of one worker's cache (logged at an interval)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bypasses: int = 0  # jobs run again without the cache (a failed check)
    mismatches: int = 0  # entries of an equal key but another image size, not used
    entries: int = 0
    bytes_held: int = 0


@dataclass
class _Job:
    keys: list[Optional[bytes]]  # per image item of the job, in order (None: uncached)
    sizes: list[Optional[tuple[int, int]]]
    hits: dict[int, _Entry] = field(default_factory=dict)  # item index -> its entry


def _nbytes(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    return int(getattr(v, "nbytes", 0))


def _cat(parts: list) -> Any:
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts, dim=0)
    return np.concatenate(parts, axis=0)


def _own(v: Any) -> Any:
    """A copy that shares no storage with a request's tensor (nothing a request does to
    its tensors reaches the cache; a hit of one image hands out the cached tensor itself,
    which ``materialize`` only reads)."""
    return v.clone() if isinstance(v, torch.Tensor) else np.array(v, copy=True)


def _rows(v: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a per-patch output. All of a tensor's rows (one image) are
    kept as a view, not copied: a fresh 18 MB copy per miss cost more than the cache saved
    on unique images. The miss's request shares that storage, so an in-place write to it
    (which bumps the shared ``_version``) makes the entry fail its check (``_consistent``)."""
    if isinstance(v, torch.Tensor) and start == 0 and stop == v.shape[0]:
        return v[start:stop]
    return _own(v[start:stop])


class ProcessorCache:
    """The cache of one worker; see the module docstring and Note [processor cache]."""

    def __init__(self, capacity_bytes: int, fingerprint: bytes) -> None:
        self.capacity = capacity_bytes
        self.fingerprint = fingerprint
        self.stats = CacheStats()
        self._entries: "OrderedDict[bytes, _Entry]" = OrderedDict()
        self._lock = threading.Lock()
        self._job: Optional[_Job] = None
        self._inner: Any = None
        self._last_log = time.monotonic()

    # -- set-up ------------------------------------------------------------------------
    @classmethod
    def install(cls, mm_processor: Any, capacity_bytes: int) -> Optional["ProcessorCache"]:
        """A cache wrapped around ``mm_processor``'s image processor (once per processor
        object), or None when the capacity is 0 or :func:`fingerprint` finds no key.

        The image processor's class is replaced by a subclass of the same name whose
        ``preprocess`` is the cache's (``isinstance``, which sglang checks to pick the
        fast processor's device, still holds; nothing is added to its configuration)."""
        fp = fingerprint(mm_processor)
        if capacity_bytes <= 0 or fp is None:
            return None
        image_processor = mm_processor._processor.image_processor
        base = type(image_processor)
        if getattr(base, "_sglang_mmpre_cached", False):
            raise RuntimeError("this processor has a processor cache already")
        cache = cls(capacity_bytes, fp)
        cache._inner = functools.partial(base.preprocess, image_processor)

        def preprocess(self: Any, images: Any, *args: Any, **kwargs: Any) -> Any:
            return cache._preprocess(images, *args, **kwargs)

        image_processor.__class__ = type(base.__name__, (base,), {
            "preprocess": preprocess, "_sglang_mmpre_cached": True,
            "__module__": base.__module__, "__qualname__": base.__qualname__})
        return cache

    def key(self, data: bytes) -> bytes:
        """The full sha256 of this worker's fingerprint and ``data``."""
        h = hashlib.sha256(self.fingerprint)
        h.update(data)
        return h.digest()

    # -- one job -----------------------------------------------------------------------
    def prepare(self, job: dict) -> dict:
        """The job to run: ``job`` with each cached image replaced by a placeholder that
        names its key (``job`` itself is left as it was, for :class:`CacheBypass`)."""
        from PIL import Image

        items = job.get("image_data")
        request = job.get("request_obj")
        if not isinstance(items, list) or not items or getattr(request, "video_data", None):
            self._job = None
            return job
        keys: list[Optional[bytes]] = []
        sizes: list[Optional[tuple[int, int]]] = []
        replaced = list(items)
        state = _Job(keys, sizes)
        for i, item in enumerate(items):
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
            with self._lock:
                entry = self._entries.get(key) if key is not None else None
                if entry is not None:
                    self._entries.move_to_end(key)
            if entry is not None and entry.size != size:
                with self._lock:
                    self.stats.mismatches += 1  # processed as a miss, which replaces it
            elif entry is not None:
                placeholder = Image.new("RGB", (1, 1))
                placeholder.info[_KEY_INFO] = key
                replaced[i] = placeholder
                state.hits[i] = entry
        self._job = state
        return dict(job, image_data=replaced) if state.hits else job

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
            return CacheStats(**vars(self.stats))

    # -- the image processor's preprocess --------------------------------------------------
    def _preprocess(self, images: Any, *args: Any, **kwargs: Any) -> Any:
        job = self._job
        if job is None or args or kwargs.get("videos") is not None \
                or not isinstance(images, list) or len(images) > len(job.keys):
            if job is not None and job.hits:
                raise CacheBypass("a call the cache can't serve")
            return self._inner(images, *args, **kwargs)
        call = repr(sorted(kwargs.items()))
        misses = [i for i in range(len(images)) if i not in job.hits]
        for i in job.hits:
            if i >= len(images) or getattr(images[i], "info", {}).get(_KEY_INFO) != job.keys[i]:
                raise CacheBypass("a placeholder is not where its item was")
        out = self._inner([images[i] for i in misses], *args, **kwargs) if misses else None
        if not job.hits:
            self._store(out, misses, job, call)
            return out
        from transformers.image_processing_utils import BatchFeature

        cached = job.hits
        for i, entry in cached.items():
            if entry.call != call or not _consistent(entry):
                self._drop(job.keys[i], entry)
                raise CacheBypass("a cached entry fails its checks")
        fresh = self._split(out, len(misses)) if misses else {}
        if fresh is None:
            raise CacheBypass("outputs the cache can't split per image")
        for j, i in enumerate(misses):
            self._put(job.keys[i], job.sizes[i], fresh[j], call)
        names = next(iter(cached.values())).names
        parts = [cached[i] if i in cached else fresh[misses.index(i)]
                 for i in range(len(images))]
        data = {}
        for name in names:
            data[name] = _cat([(p.per_image if name in p.per_image else p.per_row)[name]
                               for p in parts])
        return BatchFeature(data=data)

    def _store(self, out: Any, indices: list[int], job: _Job, call: str) -> None:
        if not any(job.keys[i] is not None for i in indices):
            return
        split = self._split(out, len(indices))
        if split is None:
            return
        for j, i in enumerate(indices):
            self._put(job.keys[i], job.sizes[i], split[j], call)

    @staticmethod
    def _split(out: Any, n: int) -> Optional[list[_Entry]]:
        """``out`` (one preprocess call over ``n`` images) cut into per-image entries, or
        None if its values are not per image or per patch row."""
        grid = out.get("image_grid_thw") if hasattr(out, "get") else None
        if grid is None or len(grid) != n:
            return None
        rows = [int(np.prod([int(x) for x in g])) for g in grid]
        total = sum(rows)
        names = tuple(out.keys())
        entries = []
        start = 0
        for j in range(n):
            per_image, per_row = {}, {}
            for name in names:
                v = out[name]
                if not hasattr(v, "shape") or not len(v.shape) \
                        or (isinstance(v, torch.Tensor) and v.device.type != "cpu"):
                    return None  # (features made on a GPU are not kept)
                if name == "image_grid_thw" or (v.shape[0] == n and n != total):
                    per_image[name] = _own(v[j:j + 1])
                elif v.shape[0] == total:
                    per_row[name] = _rows(v, start, start + rows[j])
                else:
                    return None
            start += rows[j]
            nbytes = sum(_nbytes(v) for v in (*per_image.values(), *per_row.values()))
            entries.append(_Entry(names, per_image, per_row, (0, 0), "", nbytes))
        return entries

    def _put(self, key: Optional[bytes], size: Optional[tuple[int, int]], entry: _Entry,
             call: str) -> None:
        if key is None or size is None or entry.nbytes > self.capacity:
            return
        entry.size, entry.call = size, call
        for v in entry.per_row.values():
            if isinstance(v, torch.Tensor):
                pin_immutable(v)  # Note [remembered digests]: a hit's slot needs no rehash
        entry.versions = _versions(entry)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.stats.bytes_held -= old.nbytes
            while self._entries and self.stats.bytes_held + entry.nbytes > self.capacity:
                _, gone = self._entries.popitem(last=False)
                self.stats.bytes_held -= gone.nbytes
                self.stats.evictions += 1
            self._entries[key] = entry
            self.stats.bytes_held += entry.nbytes
            self.stats.entries = len(self._entries)

    def _drop(self, key: Optional[bytes], entry: _Entry) -> None:
        """Forget ``entry`` (it failed a hit's check) if ``key`` still names it."""
        with self._lock:
            if key is not None and self._entries.get(key) is entry:
                del self._entries[key]
                self.stats.bytes_held -= entry.nbytes
                self.stats.entries = len(self._entries)


def _versions(entry: _Entry) -> tuple[int, ...]:
    return tuple(v._version for v in entry.per_row.values() if isinstance(v, torch.Tensor))


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


def _consistent(entry: _Entry) -> bool:
    """The cached rows are the ``t*h*w`` patches of the cached grid: the number of image
    tokens sglang expands from the grid matches the features."""
    grid = entry.per_image.get("image_grid_thw")
    if grid is None or len(grid) != 1:
        return False
    rows = int(np.prod([int(x) for x in grid[0]]))
    return all(v.shape[0] == rows for v in entry.per_row.values()) \
        and _versions(entry) == entry.versions
