"""Soak: many requests through a tokenizer process and four gloo rank processes (TP=4),
then shared memory, open fds, mappings and RSS of every process are back to baseline.

SOAK SIZE: the default (CI) run sends ``SGLANG_MMPRE_SOAK_REQUESTS=300`` requests so that the
suite stays fast. The full soak is 10,000 requests::

    SGLANG_MMPRE_SOAK_REQUESTS=10000 .venv/bin/python -m pytest -q -s tests/test_soak.py

Every request carries one 224x224 Qwen2-VL image (1.2 MB of features, the same tensor
reused, so after the first request its slot is reused rather than copied) and runs in a
request scope, as ``generate_request`` does. The tokenizer takes slots of a 64 MiB warm
region. The mix: 1 in 10 clients
disconnect right after the send (the creator reference goes before any rank maps), 1 in 25
uses parallel sampling (one tokenized object sent 1 + 3 times), the rest are plain. Rank 0
receives through ZMQ, every rank gets the batch through sglang's own ``broadcast_pyobj``
and runs the real patched ``Scheduler.handle_generate_request`` (``take_multimodal_inputs``)
and reads the feature pages, as a model would. See ``soak_harness.py``.

Baseline: measured after a warm-up of 50 requests (imports, allocator pools and lazy
buffers settle), at a barrier where every rank has handled every earlier request.
Margins, for every process (tokenizer and four ranks):

- segments in the shm directory (count and bytes, the region apart): exactly 0 at baseline
  and after; the region: the same size after as at baseline, and no slot referenced after;
- segments mapped (lines of /proc/<pid>/maps naming the shm directory, the region apart):
  exactly 0 after; slot leases held by a rank: exactly 0 after;
- open file descriptors (/proc/<pid>/fd): at most ``FD_MARGIN`` = 0 more than baseline;
- RSS: at most ``RSS_MARGIN`` = 16 MiB more than baseline (the 10,000-request run through
  the region grew by at most 2.3 MiB per process). One leaked mapping per request would be
  1.2 MB x requests (360 MB at 300 requests), far past it.
"""

from __future__ import annotations

import json
import os

from sglang_mmpre.transport.segment import segment_names

from soak_harness import run_harness

SOAK_REQUESTS = int(os.environ.get("SGLANG_MMPRE_SOAK_REQUESTS", "300"))
WARMUP = 50
WORLD = 4
FD_MARGIN = 0
RSS_MARGIN = 16 << 20


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


def test_soak_tp4_every_request_served_and_shm_fds_rss_back_to_baseline(tmp_path, shm_dir):
    plan = _plan(SOAK_REQUESTS)
    result = run_harness(tmp_path, shm_dir, world=WORLD, plan=plan, warmup=WARMUP)
    tok, ranks = result["tokenizer"], result["ranks"]
    sends = sum(4 if k == "n3" else 1 for k in plan) + WARMUP

    summary = {"requests": SOAK_REQUESTS, "sends": sends, "seconds_main_phase": tok["seconds"],
               "processes": {}}
    for name, proc in [("tokenizer", tok)] + [(f"rank{r}", ranks[r]) for r in range(WORLD)]:
        summary["processes"][name] = {
            k: {"fds": proc[k]["fds"], "rss_mib": round(proc[k]["rss"] / 2**20, 1),
                "mapped_segments": proc[k]["mapped_segments"], "leases": proc[k].get("leases")}
            for k in ("baseline", "after")
        }
    summary["shm"] = {k: {"count": tok[k]["shm_count"], "bytes": tok[k]["shm_bytes"],
                          "region_bytes": tok[k]["region_bytes"], "live_slots": tok[k]["live_slots"]}
                      for k in ("baseline", "after")}
    (tmp_path / "soak_summary.json").write_text(json.dumps(summary, indent=1))
    print("\nsoak summary:", json.dumps(summary, indent=1))

    for r, rank in enumerate(ranks):
        bad = {rid: msg for rid, msg in rank["outcomes"].items() if msg != "served"}
        assert bad == {}, f"rank {r} aborted requests: {list(bad.items())[:5]}"
        assert rank["served"] == sends, f"rank {r} served {rank['served']} of {sends}"
    for k in ("baseline", "after"):
        assert (tok[k]["shm_count"], tok[k]["shm_bytes"]) == (0, 0), (k, tok[k])
    assert tok["after"]["held_bytes"] == 0
    assert tok["after"]["live_slots"] == 0
    assert tok["after"]["region_bytes"] == tok["baseline"]["region_bytes"] > 0
    assert segment_names(str(shm_dir)) == []  # the tokenizer unlinked its region at shutdown
    for name, proc in [("tokenizer", tok)] + [(f"rank{r}", ranks[r]) for r in range(WORLD)]:
        base, after = proc["baseline"], proc["after"]
        assert after["mapped_segments"] == 0, f"{name} still maps {after['mapped_segments']}"
        assert after.get("leases", 0) == 0, f"{name} still holds {after['leases']} slot leases"
        assert after["fds"] <= base["fds"] + FD_MARGIN, f"{name} fds {base['fds']} -> {after['fds']}"
        assert after["rss"] <= base["rss"] + RSS_MARGIN, (
            f"{name} RSS {base['rss'] >> 20} MiB -> {after['rss'] >> 20} MiB"
        )
