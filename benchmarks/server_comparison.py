"""The main job: schemes on sglang 0.5.5's real server, under named regimes of image traffic.

For each scheme a real TP=2 server starts on CPU (``tests/support/real_server.py``: a tiny
random Qwen2-VL, the CPU flags, patched copies of sglang first on the path):

- ``as_shipped``: sglang 0.5.5 as released (per-request ``broadcast_object_list``);
- ``revert``: ``patches/solution_1_revert.patch`` (every rank runs ``from_dict``, as 0.5.4);
- ``batch_broadcast``: ``patches/improved_batch_broadcast.patch``;
- ``optimized``: ``patches/optimized_implementation.patch`` (this project).

Also available (``--schemes``): ``optimized_segments``, the same patch with the warm region
off (``SGLANG_MM_SHM_REGION_CHUNK_BYTES=0``); ``optimized_w0``, ``optimized_w1``,
``optimized_w2``, the same patch with ``SGLANG_MM_PROCESSOR_WORKERS`` = 0, 1, 2;
``optimized_nocache``, the same patch with the processor cache off
(``SGLANG_MM_PROCESSOR_CACHE_BYTES=0``).

Models (``--models``): ``tiny`` is the served tiny Qwen2-VL (patch 14: a 1120x700 image is
4,000 patches and 1,000 tokens; on CPU its vision tower and prefill dominate the ranks'
work); ``gpu_proxy`` is the same model with patch 56 and the image processor configured to
match (``served_model.py``), served in float32 (see ``MODELS``): about the same pixel bytes
per image (18.1 MB), 240 patches, 60 tokens, so the ranks' forward costs little CPU, as it
would on a GPU, and the CPU that the multimodal path costs shows. It stands for the CPU side of a GPU server; it is not a
model of a GPU's forward time, and its attention over 240 patches is not a real model's.

Regimes (``--regimes``, ``benchmarks/chat_load.py``): ``unique`` (every image new),
``repeated`` (a fixed set of 4 images re-sent: sglang's embedding cache skips the vision
encoder) and ``multi_turn`` (4-turn conversations re-sending their earlier images, a new
image every 2 turns; TTFT per turn). All go through ``/v1/chat/completions``, streamed.

**Fresh images.** Every run (one regime, workload and concurrency, in one round) has a seed
of its own, the same for every scheme: no earlier run on that server has sent its images
(a server's ``MultiModalCache`` keeps vision-encoder outputs by image hash, and
``/flush_cache`` does not clear it). ``--same-images`` sends the images of one seed in every
run instead, the old behaviour, to show what the cache does.

One server runs at a time (each holds about 3 GB). Every round starts each scheme's server
in turn (per model), in an order rotated each round, warms it up (a single-turn and a
two-image conversation per workload, images no run uses), drives it once per regime,
workload and concurrency (each run after a ``/flush_cache``: no run finds an earlier run's
prefixes in the radix cache), and stops it: so the machine's drift hits
every scheme alike, and a start-up's cost is never measured. Around each run the CPU time
(utime + stime, ``/proc/<pid>/stat``) of every server process is read, and each rank's CPU
inside ``ModelRunner.forward`` (``tests/support/forward_cpu.py``).

Every server samples the event-loop lag of its TokenizerManager
(``tests/support/loop_lag.py``): every ~5 ms, how late a 5 ms ``asyncio.sleep`` woke up,
i.e. how long the loop was busy with something else, such as the multimodal processor.
The samples taken while a run's load ran are kept for that run.

A scheme whose server crashes is recorded under ``failures`` (with its log's tail), the
rest of its round is skipped, and the run goes on. Per model, regime, workload, concurrency
and scheme the JSON row holds the median over rounds of the throughput and latency
percentiles; the CPU milliseconds per request of each process (tokenizer, mm_processors:
the processor pool's workers together, scheduler_TP0, scheduler_TP1, detokenizer) and of
each rank inside the forward (``forward_cpu_ms_per_req``) and outside it
(``outside_forward_ms_per_req``: scheduler CPU minus forward CPU), summed over the rounds
and divided by the requests served; ``loop_lag_p99_ms`` and ``loop_lag_max_ms``;
``processor_workers``, the processor-pool size of the server's TokenizerManager
(``sglang_mmpre.config.load_settings`` on the server's environment for the ``optimized*``
variants; 0 for the other schemes, and with ``SGLANG_MM_PREMATERIALIZE=0``);
``processor_cache``, the processor cache's hits, misses, evictions and bypasses summed
over the workers and rounds (read from the workers' log lines; all 0 where there is no
cache); for ``multi_turn``, ``ttft_p50_ms_by_turn``.

Workloads are named WIDTHxHEIGHT.

Default grid: ``as_shipped`` and ``optimized``; 1120x700, C=16, 2 rounds; the tiny model
under ``unique`` and ``repeated``, the GPU proxy under all three.

Usage: ``python -m benchmarks.server_comparison [--rounds N] [--schemes a,b] ...``
(``--help``); ``bash scripts/run_benchmark.sh`` runs it with the defaults. Outputs:
``benchmarks/results/server-<timestamp>.json``, ``.md`` and ``_throughput.png`` /
``_cpu.png``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from benchmarks import _standin

_standin.install()

from benchmarks.chat_load import MULTI_TURN_TURNS, REGIMES, run_load  # noqa: E402
from benchmarks.report import machine_info, percentile, write_json  # noqa: E402
from forward_cpu import ENV as FORWARD_CPU_ENV  # noqa: E402
from forward_cpu import forward_cpu_between  # noqa: E402
from loop_lag import collect_lags  # noqa: E402
from real_server import SCHEMES, RealServer, ServerConfig  # noqa: E402
from served_model import make_served_qwen2vl  # noqa: E402
from server_cases import post  # noqa: E402
from sglang_mmpre.config import load_settings  # noqa: E402
from sglang_mmpre.transport import liveness  # noqa: E402

__all__ = ["main", "Workload", "run_seeds"]

DEFAULT_OUT = _standin.REPO_ROOT / "benchmarks" / "results"
PROCESSES = ("tokenizer", "mm_processors", "scheduler_TP0", "scheduler_TP1", "detokenizer")
RANKS = ("scheduler_TP0", "scheduler_TP1")
VARIANTS = {s: ServerConfig(s) for s in SCHEMES} | {
    "optimized_segments": ServerConfig(
        "optimized", env=(("SGLANG_MM_SHM_REGION_CHUNK_BYTES", "0"),)
    ),
    "optimized_nocache": ServerConfig(
        "optimized", env=(("SGLANG_MM_PROCESSOR_CACHE_BYTES", "0"),)
    ),
} | {
    f"optimized_w{n}": ServerConfig("optimized", env=(("SGLANG_MM_PROCESSOR_WORKERS", str(n)),))
    for n in (0, 1, 2)
}
@dataclass(frozen=True)
class Model:
    """A served model: the vision patch size (``served_model.make_served_qwen2vl``) and the
    server flags it runs with."""

    patch_size: int
    server_args: tuple[str, ...] = ()


MODELS = {
    "tiny": Model(14),
    # float32: without AVX512-BF16, a bf16 patch embedding alone costs ~200 ms of CPU per
    # 1120x700 image and rank, 14 ms in float32 (the pixels are float32 either way).
    "gpu_proxy": Model(56, ("--dtype", "float32")),
}
LOOP_LAG_ENV = "SGLANG_MMPRE_TEST_LOOP_LAG_LOG"


@dataclass(frozen=True)
class Workload:
    """Images of ``width`` x ``height`` pixels, ``requests`` requests per run."""

    width: int
    height: int
    requests: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"


WORKLOADS = {"448x448": Workload(448, 448, 48), "1120x700": Workload(1120, 700, 32)}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", default="as_shipped,optimized",
                   help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--models", default="tiny:unique+repeated,gpu_proxy",
                   help="comma-separated, from: " + ", ".join(MODELS) + "; MODEL:R1+R2 runs "
                   "only regimes R1 and R2 with that model (default: tiny:unique+repeated,"
                   "gpu_proxy)")
    p.add_argument("--regimes", default=",".join(REGIMES),
                   help="comma-separated, from: " + ", ".join(REGIMES))
    p.add_argument("--workloads", default="1120x700",
                   help="comma-separated, from: " + ", ".join(WORKLOADS))
    p.add_argument("--concurrency", default="16", help="comma-separated max concurrencies")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repeats (default 2)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--requests-scale", type=float, default=1.0,
                   help="multiplies each workload's requests per run")
    p.add_argument("--input-len", type=int, default=32, help="text tokens per user turn")
    p.add_argument("--output-len", type=int, default=16, help="output tokens per request")
    p.add_argument("--same-images", action="store_true",
                   help="send the images of one seed in every run (shows the embedding cache)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--workdir", type=Path, default=None,
                   help="models, patched sglang copies and server logs (default: a temp dir)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    args.schemes = [s for s in args.schemes.split(",") if s]
    args.regimes = [r for r in args.regimes.split(",") if r]
    only = {m: [r for r in rs.split("+") if r]
            for m, _, rs in (e.partition(":") for e in args.models.split(",") if e)}
    # model -> its regimes, in the order of --regimes
    args.models = {m: [r for r in args.regimes if not rs or r in rs] for m, rs in only.items()}
    args.workloads = [WORKLOADS[w] for w in args.workloads.split(",") if w]
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    chosen_regimes = set(args.regimes) | {r for rs in only.values() for r in rs}
    for name, chosen, known in (("schemes", args.schemes, VARIANTS), ("models", args.models, MODELS),
                                ("regimes", chosen_regimes, REGIMES)):
        unknown = set(chosen) - set(known)
        if unknown:
            p.error(f"unknown {name} {sorted(unknown)}")
    return args


def run_seeds(args: argparse.Namespace) -> dict[tuple, int]:
    """The seed of every run, by ``(round, model, regime, workload name, concurrency)``:
    a function of the round and the cell only (every scheme gets the same images), and a
    different one for every run of the job, so no server sees a run's images in an earlier
    run; 1 for every run with ``same_images``. Seed 0 is the warm-up's."""
    keys = [(rnd, m, r, w.name, c) for rnd in range(args.rounds)
            for m, regimes in args.models.items() for r in regimes
            for w in args.workloads for c in args.concurrency]
    return {key: 1 if args.same_images else 1 + i for i, key in enumerate(keys)}


def _by_process(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """CPU seconds per process between two readings; the processor pool's workers
    (``mm_processor_<i>``) summed as ``mm_processors``."""
    out: dict[str, float] = {}
    for role, t in after.items():
        key = "mm_processors" if role.startswith("mm_processor_") else role
        out[key] = out.get(key, 0.0) + t - before.get(role, 0.0)
    return out


def processor_workers(server: RealServer) -> int:
    """Processor-pool size of the server's TokenizerManager; 0 where the processor runs on
    the event loop (every scheme but ``optimized``, or ours switched off)."""
    if server.config.scheme != "optimized":
        return 0
    with open(f"/proc/{server.proc.pid}/environ", "rb") as f:  # what the server was given
        env = dict(item.decode(errors="replace").partition("=")[::2]
                   for item in f.read().split(b"\0") if item)
    settings = load_settings(env)
    return settings.processor_workers if settings.enabled else 0


def _ms(value: Optional[float]) -> Optional[float]:
    """Milliseconds for the JSON: None for no value (``percentile`` of none is NaN)."""
    return None if value is None or math.isnan(value) else round(value, 2)


def warm_up(server: RealServer, workloads: list[Workload], args: argparse.Namespace) -> None:
    """Two single-turn requests and one conversation (two images) per workload, with
    images no run sends (seed 0), so no measured run pays first-request costs."""
    for w in workloads:
        for regime, n in (("unique", 2), ("multi_turn", 1)):
            done = run_load(server.url, regime, n, 0, w.width, w.height, 2, args.input_len, 4)
            if done["errors"]:
                raise RuntimeError(f"warm-up failed: {done['first_error']}")


def summarize(key: tuple, runs: list[dict], workers: int, tp: int) -> dict:
    model, regime, workload, concurrency, scheme = key
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    lags = [x for r in runs for x in r["loop_lag_ms"]]
    served = sum(r["completed"] for r in runs)
    per_req = lambda total: round(1000 * total / served, 2) if served else None  # noqa: E731
    cpu = {p: per_req(sum(r["cpu_s"].get(p, 0.0) for r in runs))
           for p in sorted({p for r in runs for p in r["cpu_s"]})}
    fwd = {p: per_req(sum(r["forward_cpu_s"].get(p, 0.0) for r in runs)) for p in RANKS}
    outside = {p: round(cpu[p] - fwd[p], 2) for p in RANKS
               if cpu.get(p) is not None and fwd[p] is not None}
    turns = [r["median_ttft_ms_by_turn"] for r in runs]
    row = {
        "scheme": scheme, "model": model, "regime": regime, "workload": workload, "tp": tp,
        "concurrency": concurrency,
        "throughput_rps": round(med("request_throughput"), 3),
        "ttft_p50_ms": med("median_ttft_ms"),
        "ttft_p99_ms": med("p99_ttft_ms"),
        "e2e_p50_ms": med("median_e2e_latency_ms"),
        "e2e_p99_ms": med("p99_e2e_latency_ms"),
        "cpu_ms_per_req": cpu,
        "forward_cpu_ms_per_req": fwd,
        "outside_forward_ms_per_req": outside,
        "loop_lag_p99_ms": _ms(percentile(lags, 99)),
        "loop_lag_max_ms": _ms(max(lags, default=None)),
        "loop_lag_samples": len(lags),
        "processor_workers": workers,
        "processor_cache": {k: sum(r["processor_cache"][k] for r in runs)
                            for k in _CACHE_COUNTS},
        "requests": served,
        "errors": sum(r["errors"] for r in runs),
        "rounds_run": len(runs),
        "rounds": [{k: r[k] for k in ("seed", "images", "request_throughput",
                                      "median_e2e_latency_ms", "cpu_s", "forward_cpu_s",
                                      "processor_cache")}
                   | {"loop_lag_p99_ms": _ms(percentile(r["loop_lag_ms"], 99))}
                   for r in runs],
    }
    if regime == "multi_turn":
        row["ttft_p50_ms_by_turn"] = [round(statistics.median(t[i] for t in turns), 1)
                                      for i in range(min(map(len, turns)))]
    return row


def summary(report: dict, base: str = "as_shipped", ours: str = "optimized") -> str:
    """One line per model, regime, workload and concurrency: ``ours`` against ``base``
    (req/s, TTFT p50, and per request the CPU of the tokenizer with its processor
    workers, of the ranks inside the forward, and of the ranks outside it)."""
    rows = {(r["model"], r["regime"], r["workload"], r["concurrency"], r["scheme"]): r
            for r in report["results"]}
    lines = [f"| model | regime | C | req/s {base} | req/s {ours} | x | TTFT p50 ms | "
             "tokenizer + workers CPU ms/req | ranks' forward CPU ms/req | "
             "ranks' CPU outside forward ms/req |", "|---|---|---:|---:|---:|---:|---|---|---|---|"]
    pair = lambda f: " / ".join(f(rows[k[:4] + (x,)]) for x in (base, ours))  # noqa: E731
    for k in dict.fromkeys(k[:4] for k in rows):
        if k + (base,) not in rows or k + (ours,) not in rows:
            continue
        a, b = rows[k + (base,)], rows[k + (ours,)]
        tok = lambda r: f"{sum(r['cpu_ms_per_req'].get(p) or 0 for p in ('tokenizer', 'mm_processors')):.0f}"  # noqa: E731
        fwd = lambda r: f"{sum(r['forward_cpu_ms_per_req'].get(p) or 0 for p in RANKS):.0f}"  # noqa: E731
        out = lambda r: f"{sum(r['outside_forward_ms_per_req'].get(p) or 0 for p in RANKS):.0f}"  # noqa: E731
        ttft = lambda r: "–" if r["ttft_p50_ms"] is None else f"{r['ttft_p50_ms']:.0f}"  # noqa: E731
        lines.append(f"| {k[0]} | {k[1]} | {k[3]} | {a['throughput_rps']:.2f} | "
                     f"{b['throughput_rps']:.2f} | **{b['throughput_rps'] / a['throughput_rps']:.2f}** | "
                     f"{pair(ttft)} | {pair(tok)} | {pair(fwd)} | {pair(out)} |")
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    """One table per model, regime and workload; ``x as_shipped`` compares req/s within it."""
    m = report["machine"]
    out = [f"Real sglang {m['sglang']} server, TP={report['config']['tp']}, CPU "
           f"({m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB); load average "
           f"{m['load_average_1_5_15']} at start, {m.get('load_average_end')} at the end; "
           f"{report['config']['elapsed_s']} s in all. Medians over "
           f"{report['config']['rounds']} interleaved rounds; CPU ms per request summed over "
           "the rounds (TPn fwd: inside ModelRunner.forward; TPn outside: the rank's CPU "
           "minus that); loop lag: the TokenizerManager's event loop, over all rounds' runs; "
           "workers: its processor-pool size (0: the processor runs on the event loop)."]
    if {"as_shipped", "optimized"} <= set(report["config"]["schemes"]):
        out += ["\n### Summary: optimized against as_shipped (pairs read as_shipped / "
                "optimized; CPU summed over the two ranks)\n", summary(report)]
    cols = ["scheme", "C", "req/s", "x as_shipped", "TTFT p50", "E2E p50", "E2E p99",
            "tokenizer", "mm_processors", "TP0", "TP1", "TP0 fwd", "TP1 fwd",
            "TP0 outside", "TP1 outside", "loop lag p99", "loop lag max", "workers", "errors"]
    groups = dict.fromkeys((r["model"], r["regime"], r["workload"]) for r in report["results"])
    for model, regime, workload in groups:
        rows = [r for r in report["results"]
                if (r["model"], r["regime"], r["workload"]) == (model, regime, workload)]
        turns = regime == "multi_turn"
        out.append(f"\n### {model}, {regime}, {workload}\n")
        out.append("| " + " | ".join(cols + (["TTFT p50 by turn"] if turns else [])) + " |")
        out.append("|" + "---|" * (len(cols) + turns))
        for r in rows:
            base = next((b["throughput_rps"] for b in rows if b["scheme"] == "as_shipped"
                         and b["concurrency"] == r["concurrency"]), None)
            num = lambda v, f="{:.1f}": "–" if v is None else f.format(v)  # noqa: E731
            cpu, fwd, outside = (r["cpu_ms_per_req"], r["forward_cpu_ms_per_req"],
                                 r["outside_forward_ms_per_req"])
            cells = [r["scheme"], str(r["concurrency"]), f"{r['throughput_rps']:.2f}",
                     num(r["throughput_rps"] / base if base else None, "{:.2f}"),
                     num(r["ttft_p50_ms"], "{:.0f}"), num(r["e2e_p50_ms"], "{:.0f}"),
                     num(r["e2e_p99_ms"], "{:.0f}")]
            cells += [num(cpu.get(p)) for p in ("tokenizer", "mm_processors") + RANKS]
            cells += [num(fwd.get(p)) for p in RANKS] + [num(outside.get(p)) for p in RANKS]
            cells += [num(r["loop_lag_p99_ms"]), num(r["loop_lag_max_ms"], "{:.0f}"),
                      str(r["processor_workers"]), str(r["errors"])]
            if turns:
                cells.append(" / ".join(num(t, "{:.0f}") for t in r["ttft_p50_ms_by_turn"]))
            out.append("| " + " | ".join(cells) + " |")
    for f in report.get("failures", []):
        out.append(f"\n**{f['scheme']} crashed its server** ({f['model']}) in round "
                   f"{f['round']} at {f['regime']} {f['workload']} C={f['concurrency']}; that "
                   "round's remaining runs of it are missing (server log tail in the JSON).")
    return "\n".join(out) + "\n"


def plots(report: dict, stem: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    groups = list(dict.fromkeys((r["model"], r["regime"], r["workload"], r["concurrency"])
                                for r in rows))
    paths = []
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 4.5))
    width = 0.8 / len(schemes)
    for i, s in enumerate(schemes):
        vals = [next((r["throughput_rps"] for r in rows if r["scheme"] == s and
                      (r["model"], r["regime"], r["workload"], r["concurrency"]) == g), 0)
                for g in groups]
        ax.bar([x + i * width for x in range(len(groups))], vals, width, label=s)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))])
    ax.set_xticklabels([f"{m}\n{r}\n{w} C={c}" for m, r, w, c in groups], fontsize=8)
    ax.set_ylabel("requests / s")
    ax.set_title("Real sglang server (TP=2, CPU): throughput by scheme")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{stem}_throughput.png", dpi=110)
    plt.close(fig)
    paths.append(f"{stem}_throughput.png")

    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 4.5))
    labels, parts = [], {}
    for g in groups:
        for s in schemes:
            r = next((r for r in rows if r["scheme"] == s and
                      (r["model"], r["regime"], r["workload"], r["concurrency"]) == g), None)
            if r is None:
                continue
            labels.append(f"{s}\n{g[0]} {g[1]}")
            cpu, fwd = r["cpu_ms_per_req"], r["forward_cpu_ms_per_req"]
            parts.setdefault("ranks: forward", []).append(sum(fwd.get(p) or 0 for p in RANKS))
            parts.setdefault("ranks: outside forward", []).append(
                sum(r["outside_forward_ms_per_req"].get(p, 0) for p in RANKS))
            for p in ("tokenizer", "mm_processors", "detokenizer"):
                parts.setdefault(p, []).append(cpu.get(p) or 0)
    bottom = [0.0] * len(labels)
    for name, vals in parts.items():
        ax.bar(range(len(labels)), vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=6)
    ax.set_ylabel("CPU ms per request")
    ax.set_title("CPU per request by process")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{stem}_cpu.png", dpi=110)
    plt.close(fig)
    paths.append(f"{stem}_cpu.png")
    return paths


def _rank_split(result: dict) -> str:
    """``fwd+outside`` CPU ms per request of each rank in one run, for the progress line."""
    n = max(1, result["completed"])
    parts = []
    for p in RANKS:
        fwd = result["forward_cpu_s"].get(p, 0.0)
        parts.append(f"{1000 * fwd / n:.0f}+{1000 * (result['cpu_s'].get(p, 0.0) - fwd) / n:.0f}")
    return " ".join(parts)


def _measure(server: RealServer, lag_dir: Path, fwd_dir: Path, regime: str, w: Workload,
             c: int, seed: int, args: argparse.Namespace) -> dict:
    """One run of one regime on ``server``, with the CPU of its processes around it. The
    radix cache is flushed first, so a run finds no prefix of an earlier run's requests
    (sglang's ``MultiModalCache`` of vision-encoder outputs stays: ``/flush_cache`` does not
    clear it)."""
    r = post(server.url, "/flush_cache", {})
    if r.status_code != 200:
        raise RuntimeError(f"/flush_cache answered {r.status_code}: {r.text[:200]}")
    roles = server.processes()
    before = server.cpu_seconds()
    log_from = server.log_path.stat().st_size
    requests = max(c, round(w.requests * args.requests_scale))
    if regime == "multi_turn":  # ``c`` conversations in flight
        requests = max(requests, c * MULTI_TURN_TURNS)
    result = run_load(server.url, regime, requests, seed, w.width, w.height, c,
                      args.input_len, args.output_len)
    ended = time.time()
    started = ended - result["duration"]
    after = server.cpu_seconds()
    result["seed"] = seed
    result["cpu_s"] = _by_process(after, before)
    result["forward_cpu_s"] = {roles[pid]: s for pid, s in
                               forward_cpu_between(fwd_dir, started, ended).items()
                               if pid in roles}
    result["loop_lag_ms"] = collect_lags(lag_dir, started, ended)
    result["processor_cache"] = processor_cache_counts(server.log_path, log_from)
    return result


_CACHE_LINE = re.compile(rb"processor worker \d+ \(pid (\d+)\): processor cache: (\d+) hits, "
                         rb"(\d+) misses, "
                         rb"(\d+) evictions, (\d+) bypasses")
_CACHE_COUNTS = ("hits", "misses", "evictions", "bypasses")


def processor_cache_counts(log: Path, start: int) -> dict[str, int]:
    """The processor workers' cache counts in the server log written after byte ``start``
    (each worker's line is cumulative and logged after every job: the benchmark sets
    ``SGLANG_MM_PROCESSOR_CACHE_LOG_S=0``)."""
    data = log.read_bytes()
    def last(text: bytes) -> dict[bytes, tuple[int, ...]]:
        return {m[1]: tuple(map(int, m.groups()[1:])) for m in _CACHE_LINE.finditer(text)}
    before, after = last(data[:start]), last(data)
    zero = (0,) * len(_CACHE_COUNTS)
    return {name: sum(a[i] - before.get(pid, zero)[i] for pid, a in after.items())
            for i, name in enumerate(_CACHE_COUNTS)}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sglang_mmpre_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(text: str) -> None:
        print(f"[{time.monotonic() - t0:6.0f} s] {text}", flush=True)

    machine = machine_info()
    model_dirs = {m: make_served_qwen2vl(work / f"served_qwen2vl_{m}", MODELS[m].patch_size)
                  for m in args.models}
    runs: dict[tuple, list[dict]] = {}
    workers: dict[str, int] = {}
    failures: list[dict] = []
    seeds = run_seeds(args)
    total, k = len(seeds) * len(args.schemes), 0
    for rnd in range(args.rounds):
        order = args.schemes[rnd % len(args.schemes):] + args.schemes[:rnd % len(args.schemes)]
        for model, regimes in args.models.items():
            # the runs of one server, in order
            cells = [(r, w, c) for r in regimes for w in args.workloads for c in args.concurrency]
            for s in order:
                log(f"round {rnd + 1}: starting {s} with {model} (TP={args.tp})")
                server_dir = work / f"{s}-{model}-{rnd}"
                server_dir.mkdir(parents=True, exist_ok=True)
                lag_dir = Path(tempfile.mkdtemp(prefix="loop_lag-", dir=server_dir))
                fwd_dir = Path(tempfile.mkdtemp(prefix="forward_cpu-", dir=server_dir))
                config = VARIANTS[s]
                config = replace(config, tp=args.tp, env=config.env + (
                    (LOOP_LAG_ENV, str(lag_dir)), (FORWARD_CPU_ENV, str(fwd_dir)),
                    ("SGLANG_MM_PROCESSOR_CACHE_LOG_S", "0")),
                    extra_args=config.extra_args + MODELS[model].server_args)
                server = RealServer(config, model_dirs[model], server_dir)
                server.start()
                try:
                    workers[s] = processor_workers(server)
                    warm_up(server, args.workloads, args)
                    for i, (regime, w, c) in enumerate(cells):
                        seed = seeds[(rnd, model, regime, w.name, c)]
                        try:
                            result = _measure(server, lag_dir, fwd_dir, regime, w, c, seed, args)
                            if result["completed"] == 0 and server.proc.poll() is not None:
                                raise RuntimeError(result["first_error"])
                        except Exception as e:
                            if server.proc.poll() is None:
                                raise
                            # The scheme crashed its server: record it, go on with the others.
                            failures.append({"scheme": s, "model": model, "round": rnd + 1,
                                             "regime": regime, "workload": w.name,
                                             "concurrency": c,
                                             "server_log_tail": server.log_tail(40),
                                             "error": str(e)[-2000:]})
                            log(f"round {rnd + 1}: {s} crashed its server at {regime} "
                                f"{w.name} C={c}; the rest of its round is skipped "
                                f"(log: {server.log_path})")
                            k += len(cells) - i
                            break
                        runs.setdefault((model, regime, w.name, c, s), []).append(result)
                        k += 1
                        turns = result["median_ttft_ms_by_turn"]
                        log(f"[{k}/{total}] round {rnd + 1} {s:12s} {model:9s} {regime:10s} "
                            f"{w.name} C={c:<3d} {result['request_throughput']:6.2f} req/s  "
                            f"E2E p50 {result['median_e2e_latency_ms'] or 0:7.0f} ms  "
                            f"loop lag p99 {percentile(result['loop_lag_ms'], 99):6.1f} ms  "
                            f"ranks' CPU ms/req {_rank_split(result)}  "
                            f"cache hits/misses {result['processor_cache']['hits']}/"
                            f"{result['processor_cache']['misses']}"
                            + (f"  TTFT by turn {turns}" if regime == "multi_turn" else "")
                            + (f"  ERRORS {result['errors']}: {result['first_error']}"
                               if result["errors"] else ""))
                except BaseException:
                    server.kill()
                    raise
                if server.proc.poll() is None:
                    server.stop()
                else:
                    server.kill()  # reap what the crash left
                    # and remove its files, as the next start-up's sweep on its directory would
                    liveness.sweep(str(server.shm_dir))
                    if not any(server.shm_dir.iterdir()):
                        server.shm_dir.rmdir()
    report = {
        "machine": machine,
        "config": {"tp": args.tp, "rounds": args.rounds, "schemes": args.schemes,
                   "models": {m: asdict(MODELS[m]) | {"regimes": rs} for m, rs in args.models.items()},
                   "regimes": args.regimes, "same_images": args.same_images,
                   "workloads": [asdict(w) for w in args.workloads],
                   "concurrency": args.concurrency, "requests_scale": args.requests_scale,
                   "input_len": args.input_len, "output_len": args.output_len,
                   "elapsed_s": round(time.monotonic() - t0)},
        "results": [summarize(key, runs[key], workers[key[-1]], args.tp)
                    for key in ((m, r, w.name, c, s) for m, rs in args.models.items() for r in rs
                                for w in args.workloads for c in args.concurrency
                                for s in args.schemes)
                    if key in runs],
        "failures": failures,
    }
    report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = args.out / f"server-{stamp}"
    write_json(stem.with_suffix(".json"), report)
    table = markdown(report)
    stem.with_suffix(".md").write_text(table)
    if not args.no_plots:
        plots(report, stem)
    print(table)
    log(f"wrote {stem}.json, .md and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
