"""The scheme comparison runs end to end (``--quick``): every mode, every rank process
exits 0, the JSON has the documented schema, no request failed, and no segment is left.
A check of the harness, not of its timings (nothing here asserts a speed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIELDS = {"mode", "workload", "tp", "concurrency", "throughput_rps", "p50_ms", "p99_ms",
          "sched_cpu_ms_per_req", "tok_cpu_ms_per_req", "bytes_per_req",
          "collectives_per_req", "loop_lag_ms_max"}


def _ours_in_shm() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("sglmmpre_")}
    except FileNotFoundError:
        return set()


def test_quick_run_covers_every_mode_and_leaves_nothing(tmp_path):
    before = _ours_in_shm()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare_schemes", "--quick", "--no-plots",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("*.json")
    data = json.loads(result.read_text())
    assert {"machine", "config", "results"} <= data.keys()
    modes = {r["mode"] for r in data["results"]}
    assert modes == {"original", "per_request_broadcast", "batch_broadcast",
                     "upstream_shm_barrier", "tokenizer_stage", "hash_floor", "floor"}
    for row in data["results"]:
        assert FIELDS <= row.keys()
        assert row.get("errors", 0) == 0, row
    by_mode = {r["mode"]: r for r in data["results"]}
    assert by_mode["tokenizer_stage"]["collectives_per_req"] == 0
    # The transport the scheme names: every measured request in slots of the warm region.
    stage = [r for r in data["results"] if r["mode"] == "tokenizer_stage"]
    assert all(r["transport"] == {"region": r["requests"]} for r in stage), stage
    assert by_mode["per_request_broadcast"]["collectives_per_req"] > 0
    assert list(tmp_path.glob("*.md"))
    assert _ours_in_shm() <= before
