"""The main job: every scheme on sglang 0.5.5's real server, driven by ``bench_serving``.

For each scheme a real TP=2 server starts on CPU (``tests/support/real_server.py``: a tiny
random Qwen2-VL, the CPU flags, patched copies of sglang first on the path):

- ``as_shipped``: sglang 0.5.5 as released (per-request ``broadcast_object_list``);
- ``revert``: ``patches/solution_1_revert.patch`` (every rank runs ``from_dict``, as 0.5.4);
- ``batch_broadcast``: ``patches/improved_batch_broadcast.patch``;
- ``optimized``: ``patches/optimized_implementation.patch`` (this project).

Not run by default: ``optimized_segments``, the same patch with the warm region off
(``SGLANG_MM_SHM_REGION_CHUNK_BYTES=0``: one fresh segment per request), to compare the two
transports side by side (``--schemes optimized,optimized_segments``); and
``optimized_w0``, ``optimized_w1``, ``optimized_w2``, the same patch with
``SGLANG_MM_PROCESSOR_WORKERS`` = 0, 1, 2 (the processor on the event loop, or in a pool
of that many worker processes), to compare pool sizes.

One server runs at a time (each holds about 3 GB). Every round starts each scheme's
server in turn, in an order rotated each round, warms it up with requests of every
workload's shape, drives it once per workload and concurrency, and stops it: so the
machine's drift hits every scheme alike, and a start-up's cost is never measured. A run is
one ``python -m sglang.bench_serving --backend sglang --dataset-name image`` with a fixed
seed (the same image sizes and prompt lengths for every scheme; the prompt tokens vary, as
bench_serving draws them in the order of the tokenizer's ``get_vocab()``, which differs
between processes). Around each run the CPU
time (utime + stime, ``/proc/<pid>/stat``) of every server process is read.

Every server samples the event-loop lag of its TokenizerManager
(``tests/support/loop_lag.py``, switched on by ``SGLANG_MMPRE_TEST_LOOP_LAG_LOG``, a fresh
directory per server): every ~5 ms, how late a 5 ms ``asyncio.sleep`` woke up, i.e. how
long the loop was busy with something else, such as the multimodal processor. The samples
taken while a run's ``bench_serving`` load ran (its reported duration, up to the end of
the process) are kept for that run.

A scheme whose server crashes is recorded under ``failures`` (with its log's tail), the
rest of its round is skipped, and the run goes on. Per scheme, workload and concurrency
the JSON row holds the median over rounds of the
throughput and latency percentiles that bench_serving reports, and the CPU milliseconds
per request of each process (tokenizer, mm_processors: the processor pool's workers
together, scheduler_TP0, scheduler_TP1, detokenizer), summed
over the rounds and divided by the requests served; ``loop_lag_p99_ms`` and
``loop_lag_max_ms``, the p99 and the maximum of the loop-lag samples of all its runs; and
``processor_workers``, the processor-pool size of the server's TokenizerManager
(``sglang_mmpre.config.load_settings`` on the server's environment for the ``optimized*``
variants; 0 for the other schemes, and with ``SGLANG_MM_PREMATERIALIZE=0``, where the
processor runs on the event loop as in sglang 0.5.5).

Workloads are named WIDTHxHEIGHT. bench_serving's ``--image-resolution`` is HEIGHTxWIDTH
(``parse_image_resolution`` in sglang 0.5.5), so 1120x700 is passed as ``700x1120``.

Usage: ``python -m benchmarks.server_comparison [--rounds N] [--schemes a,b] ...``
(``--help``); ``bash scripts/run_benchmark.sh`` runs it with the defaults. Outputs:
``benchmarks/results/server-<timestamp>.json``, ``.md`` and ``_throughput.png`` /
``_cpu.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from benchmarks import _standin

_standin.install()

from benchmarks.report import machine_info, percentile, write_json  # noqa: E402
from loop_lag import collect_lags  # noqa: E402
from real_server import SCHEMES, RealServer, ServerConfig, client_env  # noqa: E402
from served_model import make_served_qwen2vl  # noqa: E402
from server_cases import generate, image, post  # noqa: E402
from sglang_mmpre.config import load_settings  # noqa: E402
from sglang_mmpre.transport import liveness  # noqa: E402

__all__ = ["main", "Workload"]

DEFAULT_OUT = _standin.REPO_ROOT / "benchmarks" / "results"
PROCESSES = ("tokenizer", "mm_processors", "scheduler_TP0", "scheduler_TP1", "detokenizer")
VARIANTS = {s: ServerConfig(s) for s in SCHEMES} | {
    "optimized_segments": ServerConfig(
        "optimized", env=(("SGLANG_MM_SHM_REGION_CHUNK_BYTES", "0"),)
    ),
} | {
    f"optimized_w{n}": ServerConfig("optimized", env=(("SGLANG_MM_PROCESSOR_WORKERS", str(n)),))
    for n in (0, 1, 2)
}
LOOP_LAG_ENV = "SGLANG_MMPRE_TEST_LOOP_LAG_LOG"


@dataclass(frozen=True)
class Workload:
    """Images of ``width`` x ``height`` pixels, one per request, ``prompts`` per run."""

    width: int
    height: int
    prompts: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def bench_resolution(self) -> str:
        return f"{self.height}x{self.width}"  # bench_serving reads HEIGHTxWIDTH


WORKLOADS = {"448x448": Workload(448, 448, 48), "1120x700": Workload(1120, 700, 32)}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", default=",".join(SCHEMES),
                   help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="comma-separated, from: " + ", ".join(WORKLOADS))
    p.add_argument("--concurrency", default="4,16", help="comma-separated max concurrencies")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repeats (default 2)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--prompts-scale", type=float, default=1.0,
                   help="multiplies each workload's prompts per run")
    p.add_argument("--input-len", type=int, default=32, help="text tokens per prompt")
    p.add_argument("--output-len", type=int, default=16, help="output tokens per request")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--workdir", type=Path, default=None,
                   help="model, patched sglang copies and server logs (default: a temp dir)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    args.schemes = [s for s in args.schemes.split(",") if s]
    args.workloads = [WORKLOADS[w] for w in args.workloads.split(",") if w]
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    unknown = set(args.schemes) - set(VARIANTS)
    if unknown:
        p.error(f"unknown schemes {sorted(unknown)}")
    return args


def bench_serving(server: RealServer, model_dir: Path, w: Workload, concurrency: int,
                  args: argparse.Namespace, out: Path) -> dict:
    """One ``python -m sglang.bench_serving`` run; returns its result line."""
    prompts = max(concurrency, round(w.prompts * args.prompts_scale))
    cmd = [
        sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang",
        "--base-url", server.url, "--model", str(model_dir),
        "--dataset-name", "image", "--image-resolution", w.bench_resolution,
        "--image-count", "1", "--num-prompts", str(prompts),
        "--max-concurrency", str(concurrency),
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--random-range-ratio", "1.0", "--seed", "1", "--warmup-requests", "0",
        "--disable-tqdm", "--output-file", str(out),
    ]
    for attempt in range(3):
        out.unlink(missing_ok=True)
        done = subprocess.run(cmd, env=client_env(), capture_output=True, text=True, timeout=900)
        if done.returncode == 0 and out.is_file():
            return json.loads(out.read_text().splitlines()[-1])
        # bench_serving draws prompt tokens from the whole vocabulary, in the order of
        # get_vocab(), which differs from process to process: now and then a prompt holds
        # <|image_pad|> and the processor, building the dataset, wants a second image. The
        # server never saw it; a new process draws other prompts.
        if "IndexError" not in done.stderr or server.proc.poll() is not None:
            break
    raise RuntimeError(f"bench_serving failed ({done.returncode}):\n{done.stdout[-3000:]}"
                       f"\n{done.stderr[-3000:]}")


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


def warm_up(server: RealServer, workloads: list[Workload]) -> None:
    """Requests of every workload's shape, so no measured run pays first-request costs."""
    for w in workloads:
        for seed in range(3):
            generate(server.url, {
                "text": "Warm-up " + "<|vision_start|><|image_pad|><|vision_end|>",
                "image_data": image(1000 + seed, w.width, w.height),
                "sampling_params": {"temperature": 0, "max_new_tokens": 4},
                "return_logprob": True, "top_logprobs_num": 1,
            })
    post(server.url, "/flush_cache", {})


def summarize(scheme: str, w: Workload, tp: int, concurrency: int, runs: list[dict],
              workers: int) -> dict:
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    lags = [x for r in runs for x in r["loop_lag_ms"]]
    served = sum(r["completed"] for r in runs)
    cpu = {p: round(1000 * sum(r["cpu_s"].get(p, 0.0) for r in runs) / served, 2)
           for p in sorted({p for r in runs for p in r["cpu_s"]})}
    return {
        "scheme": scheme, "workload": w.name, "tp": tp, "concurrency": concurrency,
        "throughput_rps": round(med("request_throughput"), 3),
        "ttft_p50_ms": round(med("median_ttft_ms"), 1),
        "ttft_p99_ms": round(med("p99_ttft_ms"), 1),
        "e2e_p50_ms": round(med("median_e2e_latency_ms"), 1),
        "e2e_p99_ms": round(med("p99_e2e_latency_ms"), 1),
        "cpu_ms_per_req": cpu,
        "loop_lag_p99_ms": _ms(percentile(lags, 99)),
        "loop_lag_max_ms": _ms(max(lags, default=None)),
        "loop_lag_samples": len(lags),
        "processor_workers": workers,
        "requests": served,
        "rounds_run": len(runs),
        "rounds": [{k: r[k] for k in ("request_throughput", "median_e2e_latency_ms", "cpu_s")}
                   | {"loop_lag_p99_ms": _ms(percentile(r["loop_lag_ms"], 99))}
                   for r in runs],
    }


def markdown(report: dict) -> str:
    cols = ["scheme", "workload", "C", "req/s", "TTFT p50", "TTFT p99", "E2E p50", "E2E p99"]
    cols += [f"CPU ms/req {p}" for p in PROCESSES]
    cols += ["loop lag p99 ms", "loop lag max ms", "proc workers"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report["results"]:
        cells = [r["scheme"], r["workload"], str(r["concurrency"]), f"{r['throughput_rps']:.2f}",
                 f"{r['ttft_p50_ms']:.0f}", f"{r['ttft_p99_ms']:.0f}",
                 f"{r['e2e_p50_ms']:.0f}", f"{r['e2e_p99_ms']:.0f}"]
        cpu = r["cpu_ms_per_req"]
        cells += [f"{cpu[p]:.1f}" if p in cpu else "–" for p in PROCESSES]
        cells += ["n/a" if r[k] is None else f"{r[k]:.1f}"
                  for k in ("loop_lag_p99_ms", "loop_lag_max_ms")]
        cells.append(str(r["processor_workers"]))
        lines.append("| " + " | ".join(cells) + " |")
    m = report["machine"]
    head = (f"Real sglang {m['sglang']} server, TP={report['config']['tp']}, CPU "
            f"({m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB); load average "
            f"{m['load_average_1_5_15']} at start. Medians over {report['config']['rounds']} "
            "interleaved rounds; CPU ms per request summed over the rounds; loop lag: p99 of the "
            "TokenizerManager's event-loop lag over all rounds' runs; proc workers: its "
            "processor-pool size (0: the processor runs on the event loop).\n\n")
    for f in report.get("failures", []):
        lines.append(f"\n**{f['scheme']} crashed its server** in round {f['round']} at "
                     f"{f['workload']} C={f['concurrency']}; that round's remaining runs of "
                     "it are missing (server log tail in the JSON).")
    return head + "\n".join(lines) + "\n"


def plots(report: dict, stem: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    groups = list(dict.fromkeys((r["workload"], r["concurrency"]) for r in rows))
    paths = []
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(schemes)
    for i, s in enumerate(schemes):
        vals = [next((r["throughput_rps"] for r in rows if r["scheme"] == s
                      and (r["workload"], r["concurrency"]) == g), 0) for g in groups]
        ax.bar([x + i * width for x in range(len(groups))], vals, width, label=s)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))])
    ax.set_xticklabels([f"{w}\nC={c}" for w, c in groups])
    ax.set_ylabel("requests / s")
    ax.set_title("Real sglang server (TP=2, CPU): throughput by scheme")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{stem}_throughput.png", dpi=110)
    plt.close(fig)
    paths.append(f"{stem}_throughput.png")

    w_big, c_big = groups[-1]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = [0.0] * len(schemes)
    for p in PROCESSES:
        vals = [next((r["cpu_ms_per_req"].get(p, 0) for r in rows if r["scheme"] == s
                      and r["workload"] == w_big and r["concurrency"] == c_big), 0)
                for s in schemes]
        ax.bar(schemes, vals, bottom=bottom, label=p)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("CPU ms per request")
    ax.set_title(f"CPU per request by process ({w_big}, C={c_big})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{stem}_cpu.png", dpi=110)
    plt.close(fig)
    paths.append(f"{stem}_cpu.png")
    return paths


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sglang_mmpre_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(text: str) -> None:
        print(f"[{time.monotonic() - t0:6.0f} s] {text}", flush=True)

    machine = machine_info()
    model_dir = make_served_qwen2vl(work / "served_qwen2vl")
    runs: dict[tuple, list[dict]] = {}
    workers: dict[str, int] = {}
    failures: list[dict] = []
    cells = [(w, c) for w in args.workloads for c in args.concurrency]
    total, k = args.rounds * len(cells) * len(args.schemes), 0
    for rnd in range(args.rounds):
        order = args.schemes[rnd % len(args.schemes):] + args.schemes[:rnd % len(args.schemes)]
        for s in order:
            log(f"round {rnd + 1}: starting {s} (TP={args.tp})")
            server_dir = work / f"{s}-{rnd}"
            server_dir.mkdir(parents=True, exist_ok=True)
            lag_dir = Path(tempfile.mkdtemp(prefix="loop_lag-", dir=server_dir))
            config = VARIANTS[s]
            config = replace(config, tp=args.tp, env=config.env + ((LOOP_LAG_ENV, str(lag_dir)),))
            server = RealServer(config, model_dir, server_dir)
            server.start()
            try:
                workers[s] = processor_workers(server)
                warm_up(server, args.workloads)
                for w, c in cells:
                    before = server.cpu_seconds()
                    started = time.time()
                    try:
                        result = bench_serving(server, model_dir, w, c, args, work / "bench.jsonl")
                    except RuntimeError as e:
                        if server.proc.poll() is None:
                            raise
                        # The scheme crashed its server: record it, go on with the others.
                        failures.append({"scheme": s, "round": rnd + 1, "workload": w.name,
                                         "concurrency": c, "server_log_tail": server.log_tail(40),
                                         "error": str(e)[-2000:]})
                        log(f"round {rnd + 1}: {s} crashed its server at {w.name} C={c}; "
                            f"the rest of its round is skipped (log: {server.log_path})")
                        k += len(cells) - cells.index((w, c))
                        break
                    ended = time.time()
                    # bench_serving starts up for seconds before its load: keep its load only.
                    started = max(started, ended - float(result.get("duration", 0.0)) - 0.5)
                    after = server.cpu_seconds()
                    result["cpu_s"] = _by_process(after, before)
                    result["loop_lag_ms"] = collect_lags(lag_dir, started, ended)
                    runs.setdefault((s, w.name, c), []).append(result)
                    k += 1
                    log(f"[{k}/{total}] round {rnd + 1} {s:18s} {w.name:9s} C={c:<3d} "
                        f"{result['request_throughput']:6.2f} req/s  "
                        f"E2E p50 {result['median_e2e_latency_ms']:7.0f} ms  loop lag p99 "
                        f"{percentile(result['loop_lag_ms'], 99):6.1f} ms")
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
                   "workloads": [asdict(w) for w in args.workloads],
                   "concurrency": args.concurrency, "input_len": args.input_len,
                   "output_len": args.output_len, "elapsed_s": round(time.monotonic() - t0)},
        "results": [summarize(s, w, args.tp, c, runs[(s, w.name, c)], workers[s])
                    for w in args.workloads for c in args.concurrency for s in args.schemes
                    if (s, w.name, c) in runs],
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
