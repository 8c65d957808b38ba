"""Soak: many requests through sglang's real patched TokenizerManager, with the processor
pool at its default size, and four gloo rank processes (TP=4); then shared memory, open
fds, mappings and RSS of every process (the processor workers included) are back to
baseline.

SOAK SIZE: the default (CI) run sends ``SGLANG_MMPRE_SOAK_REQUESTS=300`` requests so that the
suite stays fast. The full soak is 10,000 requests::

    SGLANG_MMPRE_SOAK_REQUESTS=10000 .venv/bin/python -m pytest -q -s tests/test_soak.py

The default configuration: ``SGLANG_MM_PROCESSOR_WORKERS`` unset (the pool's default size,
``config.default_processor_workers``: 2 on a 2-core machine), the processor cache and the
region chunk at their defaults. Every request carries one 224x224 JPEG made in code; its
image is processed by a pool worker (sglang's own Qwen2-VL processor) into the worker's
region. 1 in 5 requests brings an image never sent before (a processor-cache miss), the
others one of ``REPEATED`` images sent again and again (hits, once a worker has seen it).
Each request runs in a request scope, as ``generate_request`` does. The mix: 1 in 10
clients disconnect right after the send (the creator reference goes before any rank
maps), 1 in 25 uses parallel sampling (one tokenized object sent 1 + 3 times), the rest
are plain. Rank 0 receives through ZMQ, every rank gets the batch through sglang's own
``broadcast_pyobj`` and runs the real patched ``Scheduler.handle_generate_request``
(``take_multimodal_inputs``) and reads the feature pages, as a model would. See
``soak_harness.py``.

Baseline: measured after a warm-up of 50 requests (imports, allocator pools and lazy
buffers settle), at a barrier where every rank has handled every earlier request.
Margins, for every process (tokenizer, its processor workers, four ranks):

- segments in the shm directory (count and bytes, the regions apart): exactly 0 at
  baseline and after; every region: the same name after as at baseline, its size within its cache's share, and no
  slot referenced (refcount > 0) at baseline or after; each worker's files (its lock file
  and its regions): the same after as at baseline; the same worker pids (none died);
- segments mapped (lines of /proc/<pid>/maps naming the shm directory, the regions apart):
  exactly 0 after; slot leases held by a rank: exactly 0 after;
- open file descriptors (/proc/<pid>/fd): at most ``FD_MARGIN`` = 0 more than baseline,
  plus one per region chunk the process mapped since (CPython's ``mmap`` keeps a dup of
  the file's descriptor: a worker's own grown chunks; a rank's, every region's);
- private RSS (VmRSS less RssShmem): at most ``RSS_MARGIN`` = 16 MiB more than baseline,
  for the workers too: their processor cache is their region's slots (Note [kept slots]
  in ``slots.py``), not private memory. RssShmem is left out: a process touches more of
  a region's pages as new images take new slots, up to the region's size, which is
  checked by name and size (a worker's region may grow, by whole chunks, by at most its
  share of ``SGLANG_MM_PROCESSOR_CACHE_BYTES``). One leaked copy of a feature per request would be
  1.2 MB x requests (360 MB at 300 requests), far past the margin;
- the processor cache: every image of the main phase counted once, as a hit or a miss;
  every never-seen image a miss, and at most ``REPEATED`` more misses per worker.
"""

from __future__ import annotations

import json
import os

from sglang_mmpre.config import default_processor_workers, load_settings
from sglang_mmpre.transport.segment import segment_names

from soak_harness import run_harness

SOAK_REQUESTS = int(os.environ.get("SGLANG_MMPRE_SOAK_REQUESTS", "300"))
WARMUP = 50
WORLD = 4
FD_MARGIN = 0
RSS_MARGIN = 16 << 20
REPEATED = 8  # images sent again and again (seeds 1..REPEATED)
UNIQUE_EVERY = 5  # 1 request in UNIQUE_EVERY brings an image never sent before


def _plan(n: int) -> list[str]:
    kinds = []
    for i in range(n):
        if i % 25 == 24:
            kinds.append("n3")
        elif i % 10 == 9:
            kinds.append("disconnect")
        else:
            kinds.append("good")
    return kinds


def _unique(i: int) -> bool:
    return i % UNIQUE_EVERY == 2


def _image_seeds(n: int) -> list[int]:
    """The image seed of each request, the warm-up's first."""
    return [REPEATED + 1 + i if _unique(i) else 1 + i % REPEATED for i in range(n)]


def _private_rss(m: dict) -> int:
    return m["rss"] - m["rss_shmem"]


def _mib(n: float) -> float:
    return round(n / 2**20, 1)


def test_soak_tp4_pool_default_every_request_served_and_shm_fds_rss_back_to_baseline(
    tmp_path, shm_dir
):
    plan = _plan(SOAK_REQUESTS)
    result = run_harness(tmp_path, shm_dir, world=WORLD, plan=plan, warmup=WARMUP,
                         region_chunk_bytes=None, processor_workers=None,
                         image_seeds=_image_seeds(WARMUP + SOAK_REQUESTS))
    tok, ranks = result["tokenizer"], result["ranks"]
    sends = sum(4 if k == "n3" else 1 for k in plan) + WARMUP
    base, after = tok["baseline"], tok["after"]
    workers = list(zip(base["workers"], after["workers"]))

    def figures(m: dict) -> dict:
        return {"fds": m["fds"], "rss_mib": _mib(m["rss"]), "rss_shmem_mib": _mib(m["rss_shmem"]),
                "mapped_segments": m["mapped_segments"], "leases": m.get("leases")}

    procs = [("tokenizer", base, after)]
    procs += [(f"worker{i}", b, a) for i, (b, a) in enumerate(workers)]
    procs += [(f"rank{r}", ranks[r]["baseline"], ranks[r]["after"]) for r in range(WORLD)]
    cache = {k: {"hits": sum(w["cache"].get("hits", 0) for w in tok[k]["workers"]),
                 "misses": sum(w["cache"].get("misses", 0) for w in tok[k]["workers"])}
             for k in ("baseline", "after")}
    summary = {
        "requests": SOAK_REQUESTS, "sends": sends, "seconds_main_phase": round(tok["seconds"], 1),
        "processes": {name: {"baseline": figures(b), "after": figures(a)} for name, b, a in procs},
        "worker_files": {f"worker{i}": {"baseline": b["files"], "after": a["files"]}
                         for i, (b, a) in enumerate(workers)},
        "worker_cache_mib": {f"worker{i}": {k: _mib(m["cache"].get("bytes_held", 0))
                                            for k, m in (("baseline", b), ("after", a))}
                             for i, (b, a) in enumerate(workers)},
        "processor_cache": cache,
        "shm": {k: {"segments": tok[k]["shm_count"], "segment_bytes": tok[k]["shm_bytes"],
                    "regions": tok[k]["regions"]} for k in ("baseline", "after")},
    }
    (tmp_path / "soak_summary.json").write_text(json.dumps(summary, indent=1))
    print("\nsoak summary:", json.dumps(summary, indent=1))

    for r, rank in enumerate(ranks):
        bad = {rid: msg for rid, msg in rank["outcomes"].items() if msg != "served"}
        assert bad == {}, f"rank {r} aborted requests: {list(bad.items())[:5]}"
        assert rank["served"] == sends, f"rank {r} served {rank['served']} of {sends}"

    # The pool at its default size, the same workers throughout, the tensors in their regions.
    assert len(workers) == default_processor_workers() >= 2
    assert [b["pid"] for b, _ in workers] == [a["pid"] for _, a in workers]
    assert all(b["regions"] for b, _ in workers), "a worker placed nothing in a region"
    for k in ("baseline", "after"):
        assert (tok[k]["shm_count"], tok[k]["shm_bytes"]) == (0, 0), (k, tok[k])
        live = {name: r["live_slots"] for name, r in tok[k]["regions"].items()}
        assert set(live.values()) == {0}, f"slots still referenced at {k}: {live}"
    assert after["held_bytes"] == 0
    # A region grows only for its processor cache's share (Note [kept slots]), by chunks.
    settings = load_settings()
    chunk = settings.region_chunk_bytes
    keep = min(settings.processor_cache_bytes, settings.shm_cap_bytes) // len(workers)
    assert after["regions"].keys() == base["regions"].keys()
    new_chunks = {}  # region name -> chunks it grew by
    for name, r in after["regions"].items():
        grown = r["bytes"] - base["regions"][name]["bytes"]
        assert 0 <= grown <= (keep + chunk - 1) // chunk * chunk and grown % chunk == 0, (
            name, base["regions"][name]["bytes"], r["bytes"])
        new_chunks[name] = grown // chunk
    # A mapped chunk holds a descriptor (CPython's mmap keeps a dup): a worker's grown
    # chunks, and every rank's mappings of them, are the fds allowed beyond baseline.
    chunk_fds = {f"worker{i}": sum(new_chunks.get(n, 0) for n in a["files"])
                 for i, (_, a) in enumerate(workers)}
    chunk_fds.update({f"rank{r}": sum(new_chunks.values()) for r in range(WORLD)})
    for i, (b, a) in enumerate(workers):
        assert a["files"].keys() == b["files"].keys(), f"worker{i} files {b['files']} -> {a['files']}"

    # Both cache paths ran: each main-phase image counted once, every new image a miss.
    hits = cache["after"]["hits"] - cache["baseline"]["hits"]
    misses = cache["after"]["misses"] - cache["baseline"]["misses"]
    uniques = sum(1 for i in range(WARMUP, WARMUP + SOAK_REQUESTS) if _unique(i))
    assert hits + misses == SOAK_REQUESTS, (hits, misses)
    assert uniques <= misses <= uniques + REPEATED * len(workers), (misses, uniques)
    assert hits > 0

    for name, b, a in procs:
        assert a["mapped_segments"] == 0, f"{name} still maps {a['mapped_segments']}"
        assert a.get("leases", 0) == 0, f"{name} still holds {a['leases']} slot leases"
        assert a["fds"] <= b["fds"] + FD_MARGIN + chunk_fds.get(name, 0), (
            f"{name} fds {b['fds']} -> {a['fds']} ({chunk_fds.get(name, 0)} chunks mapped since)")
        assert _private_rss(a) <= _private_rss(b) + RSS_MARGIN, (
            f"{name} private RSS {_mib(_private_rss(b))} MiB -> {_mib(_private_rss(a))} MiB"
        )
    assert segment_names(str(shm_dir)) == []  # the workers unlinked their regions at shutdown
