"""The results of the scheme comparison: the metrics of a cell, and the JSON, the Markdown
table and the plots they are written to (also ``--from-json``, which rewrites the table and
the plots of an earlier run).

Metrics (one row per mode, workload, TP, concurrency)
----------------------------------------------------
throughput_rps           measured requests / wall time from the first send to the last
                         completion report (tokenizer clock).
p50_ms, p99_ms           per request: start of its tokenizer-side handling (fresh dict,
                         mode work, pickling, send) -> its completion report arriving.
sched_cpu_ms_per_req     sum over ranks of process CPU time (``time.process_time``: all
                         threads, user+sys) in the window, minus the CPU spent inside the
                         simulated forward step (wait + its all_reduce), / requests.
                         Includes receiving/unpickling on rank 0, ``broadcast_pyobj``,
                         the mode's multimodal handling and idle-loop overhead.
sched_mm_cpu_ms_per_req  the part of it spent in the mode's multimodal handling only:
                         building the inputs, dropping them after the iteration, and
                         (tokenizer_stage) the releaser thread returning slots.
tok_cpu_ms_per_req       tokenizer process CPU time (all threads) in the window /
                         requests: building requests, mode work, pickling, ZMQ, the
                         event loop itself (floor is the baseline of this overhead).
bytes_per_req            bytes pickled into ZMQ frames by the tokenizer (requests only)
                         + payload bytes rank 0 broadcasts through gloo for
                         ``broadcast_pyobj`` + for the multimodal collectives
                         (``broadcast_object_list``), counted once at the source (not
                         times the receivers), / requests. Split in zmq_/req_bcast_/
                         mm_bcast_bytes_per_req. Shared-memory traffic is not in it; it
                         is shm_bytes_per_req (bytes written into segments).
transport                ``tokenizer_stage`` only: how the measured requests travelled,
                         ``{"region": n, "segment": n, "inline": n}`` (``schemes.transport_of``).
collectives_per_req      collective calls issued by one rank for multimodal handling
                         (``broadcast_object_list``, ``barrier``, ``all_reduce`` of the
                         failure flags), / requests. Not included, reported apart:
                         req_bcast_per_req (``broadcast_pyobj`` calls, one per loop
                         iteration in every mode) and fwd_allreduce_per_req (the
                         simulated forward's all_reduce).
loop_lag_ms_max, _p99    lag of a 5 ms ticker coroutine on the tokenizer's event loop
                         (actual sleep - requested) during the window. A loop blocked for
                         long stretches yields few ticks, so there p99 approaches max.

Outputs: ``<out>/<timestamp>.json``, ``<timestamp>.md`` (the table, also printed last on
stdout), ``<timestamp>_throughput_vs_concurrency.png`` (the sweep workload, first TP) and
``<timestamp>_sched_cpu_vs_feature_size.png`` (main concurrency, first TP).
``--from-json PATH`` runs nothing: it rewrites ``PATH``'s ``.md`` and plots next to it
(whatever ``--out`` says) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
from pathlib import Path
from typing import Any, Optional

from benchmarks.harness import SHM_DIR, Cell
from benchmarks.schemes import MODES, WORKLOADS

__all__ = [
    "cell_row",
    "machine_info",
    "make_plots",
    "markdown_table",
    "percentile",
    "rewrite_from_json",
    "sort_rows",
    "write_json",
    "write_markdown",
]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(k, len(ordered)) - 1]


def machine_info() -> dict:
    """The ``machine`` block of the JSON: CPU, cores, memory, ``/dev/shm`` size, package
    versions and the load average now (the machine may be shared)."""
    from importlib import metadata

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass

    def version(dist: str) -> Optional[str]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    try:
        st = os.statvfs(SHM_DIR)
        shm_gib = round(st.f_blocks * st.f_frsize / 2**30, 1)
    except OSError:
        shm_gib = None
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": mem_gib,
        "dev_shm_gib": shm_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "sglang": version("sglang"),
        "transformers": version("transformers"),
        "pyzmq": version("pyzmq"),
        "gpu": None,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def cell_row(cell: Cell, tok: dict, ranks: list[dict], features: dict) -> dict:
    """The result row of ``cell`` (the metrics above) from the tokenizer's stats ``tok``, the
    stats of every rank (each with its ``rank``) and the workloads' feature info."""
    n = max(1, tok["n"])
    lat_ms = [x * 1000 for x in tok["latencies_s"]]
    lags_ms = [x * 1000 for x in tok["lags_s"]]
    sched_cpu = sum(r["cpu_s"] - r["cpu_by_phase_s"].get("fwd", 0.0) for r in ranks)
    sched_mm_cpu = sum(r["cpu_by_phase_s"].get("mm", 0.0) for r in ranks)
    r0 = next(r for r in ranks if r["rank"] == 0)
    calls0 = r0["calls"]
    mm_coll = sum(calls0.get(f"mm:{op}", 0) for op in ("broadcast_object_list", "barrier", "all_reduce"))
    req_bcast_bytes = r0["bcast_bytes"].get("req_bcast", 0)
    mm_bcast_bytes = r0["bcast_bytes"].get("mm", 0)
    return {
        "mode": cell.mode,
        "workload": cell.workload,
        "tp": cell.tp,
        "concurrency": cell.concurrency,
        "requests": tok["n"],
        "effective_concurrency": min(cell.concurrency, tok["n"]),
        "errors": tok["errors"],
        "rank_errors": sum(r["errors"] for r in ranks),
        "first_error": tok["first_error"],
        "feature_mb": round(features[cell.workload]["feature_bytes"] / 1e6, 2),
        "throughput_rps": tok["n"] / tok["wall_s"] if tok["wall_s"] > 0 else float("nan"),
        "p50_ms": percentile(lat_ms, 50),
        "p99_ms": percentile(lat_ms, 99),
        "sched_cpu_ms_per_req": sched_cpu * 1000 / n,
        "sched_mm_cpu_ms_per_req": sched_mm_cpu * 1000 / n,
        "tok_cpu_ms_per_req": tok["cpu_s"] * 1000 / n,
        "bytes_per_req": (tok["zmq_bytes"] + req_bcast_bytes + mm_bcast_bytes) / n,
        "zmq_bytes_per_req": tok["zmq_bytes"] / n,
        "req_bcast_bytes_per_req": req_bcast_bytes / n,
        "mm_bcast_bytes_per_req": mm_bcast_bytes / n,
        "shm_bytes_per_req": tok["shm_bytes"] / n,
        "transport": tok.get("transport", {}),
        "collectives_per_req": mm_coll / n,
        "req_bcast_per_req": calls0.get("req_bcast:broadcast_pyobj", 0) / n,
        "fwd_allreduce_per_req": calls0.get("fwd:all_reduce", 0) / n,
        "loop_lag_ms_max": max(lags_ms) if lags_ms else float("nan"),
        "loop_lag_ms_p99": percentile(lags_ms, 99),
        "wall_s": tok["wall_s"],
        "rank_iterations": r0["iterations"],
        "rank_work_iterations": r0["work_iterations"],
    }


_TABLE_COLUMNS = [
    ("mode", "mode", "{}"),
    ("workload", "workload", "{}"),
    ("tp", "TP", "{}"),
    ("concurrency", "C", "{}"),
    ("requests", "n", "{}"),
    ("effective_concurrency", "C eff", "{}"),
    ("throughput_rps", "req/s", "{:.1f}"),
    ("p50_ms", "p50 ms", "{:.0f}"),
    ("p99_ms", "p99 ms", "{:.0f}"),
    ("sched_cpu_ms_per_req", "sched CPU ms/req", "{:.1f}"),
    ("tok_cpu_ms_per_req", "tok CPU ms/req", "{:.1f}"),
    ("bytes_per_req", "MB/req", "{:.2f}"),
    ("collectives_per_req", "mm coll/req", "{:.2f}"),
    ("loop_lag_ms_p99", "lag p99 ms", "{:.1f}"),
    ("loop_lag_ms_max", "lag max ms", "{:.1f}"),
    ("errors", "err", "{}"),
]


def _fmt(key: str, fmt: str, value: Any) -> str:
    if key == "bytes_per_req":
        value = value / 1e6
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return fmt.format(value)


def markdown_table(rows: list[dict]) -> str:
    """The result table in Markdown, one line per row, in the order given."""
    head = "| " + " | ".join(title for _, title, _ in _TABLE_COLUMNS) + " |"
    sep = "|" + "|".join("---" if i < 2 else "---:" for i in range(len(_TABLE_COLUMNS))) + "|"
    lines = [head, sep]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(k, f, row[k]) for k, _, f in _TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def sort_rows(rows: list[dict]) -> list[dict]:
    """Rows by TP, then workload and mode in the order of ``WORKLOADS`` and ``MODES``."""
    wl = {w: i for i, w in enumerate(WORKLOADS)}
    md = {m: i for i, m in enumerate(MODES)}
    return sorted(rows, key=lambda r: (r["tp"], wl[r["workload"]], r["concurrency"], md[r["mode"]]))


def make_plots(rows: list[dict], args: argparse.Namespace, stem: Path) -> list[str]:
    """Write the plots that ``rows`` have data for to ``<stem>_*.png`` (``args`` gives
    ``tp``, ``concurrency`` and ``sweep_workload``); return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(MODES)}
    tp = args.tp[0]
    sweep = [r for r in rows if r["tp"] == tp and r["workload"] == args.sweep_workload]
    if len({r["concurrency"] for r in sweep}) > 1:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode in MODES:
            pts = sorted((r["concurrency"], r["throughput_rps"], r["effective_concurrency"])
                         for r in sweep if r["mode"] == mode)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode,
                    color=colors[mode])
            burst = [p for p in pts if p[2] < p[0]]
            if burst:  # cells that measured a burst of fewer requests than C
                ax.plot([p[0] for p in burst], [p[1] for p in burst], linestyle="none",
                        marker="o", markersize=9, markerfacecolor="white",
                        markeredgecolor=colors[mode])
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel("throughput (req/s)")
        ax.set_yscale("log")
        ax.set_title(f"Throughput vs concurrency, TP={tp}, {args.sweep_workload}\n"
                     "(hollow: a burst of fewer requests than C, see 'C eff')", fontsize=10)
        written.append(_save(fig, ax, Path(f"{stem}_throughput_vs_concurrency.png")))
    conc = args.concurrency[0]
    sized = [r for r in rows if r["tp"] == tp and r["concurrency"] == conc]
    if len({r["workload"] for r in sized}) > 1:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode in MODES:
            pts = sorted((r["feature_mb"], r["sched_cpu_ms_per_req"], r["workload"])
                         for r in sized if r["mode"] == mode)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode,
                        color=colors[mode])
        for mb, label in sorted({(r["feature_mb"], r["workload"]) for r in sized}):
            ax.annotate(label, (mb, 0), xytext=(0, 4), textcoords="offset points",
                        fontsize=7, ha="center", xycoords=("data", "axes fraction"))
        ax.set_xlabel("feature size per request (MB)")
        ax.set_ylabel("scheduler CPU per request, all ranks (ms)")
        ax.set_yscale("log")
        ax.set_title(f"Scheduler CPU vs feature size, TP={tp}, C={conc}")
        written.append(_save(fig, ax, Path(f"{stem}_sched_cpu_vs_feature_size.png")))
    return written


def _save(fig: Any, ax: Any, path: Path) -> str:
    """Finish a plot of ``make_plots`` (grid, legend), write it to ``path`` and close it;
    return the path."""
    import matplotlib.pyplot as plt

    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_json(json_path: Path, report: dict) -> None:
    """Write ``report`` as JSON, with NaN and infinities as ``null``."""
    json_path.write_text(json.dumps(_json_safe(report), indent=2) + "\n")


def write_markdown(md_path: Path, stamp: str, report: dict) -> str:
    """Write the Markdown file of ``report`` (a title, the machine and run in one line, the
    table); return the table."""
    table = markdown_table(report["results"])
    cfg = report["config"]
    md_path.write_text(
        f"# compare_schemes {stamp}\n\n"
        f"{report['machine']['cpu_model']}, {report['machine']['cores']} cores "
        f"(load average at start {report['machine'].get('load_average_1_5_15')}); "
        f"forward {cfg['forward_ms']:g} ms ({cfg['forward_wait']}); "
        # The pointer is part of the output format; compare_schemes's docstring leads here.
        f"wall {report['wall_s']:.0f} s. Metrics: see benchmarks/report.py.\n\n"
        + table + "\n"
    )
    return table


def rewrite_from_json(path: Path, no_plots: bool) -> int:
    """``--from-json``: rewrite the Markdown file and the plots of the run saved in ``path``
    next to it, print the plots' paths and the table; return the exit status."""
    report = json.loads(path.read_text())
    cfg = report["config"]
    nan = float("nan")
    report["results"] = [{k: (nan if v is None else v) for k, v in r.items()}
                         for r in report["results"]]
    stem = path.with_suffix("")
    table = write_markdown(Path(f"{stem}.md"), stem.name, report)
    plot_args = argparse.Namespace(tp=cfg["tp"], concurrency=cfg["concurrency"],
                                   sweep_workload=cfg["sweep_workload"])
    for p in ([] if no_plots else make_plots(report["results"], plot_args, stem)):
        print(f"plot:    {p}")
    print()
    print(table)
    return 0
