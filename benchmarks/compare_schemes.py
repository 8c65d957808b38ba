"""Side-by-side benchmark of every multimodal-input scheme.

    python -m benchmarks.compare_schemes            # default run (< 10 min on 2 cores)
    python -m benchmarks.compare_schemes --quick    # smoke run (< 1 min)
    python -m benchmarks.compare_schemes --help

The schemes (``--modes``) are described in ``benchmarks/schemes.py``. This module is the
command line and runs the cells; the rest of the benchmark, by where a request is:

- ``benchmarks/harness.py``: the processes, a request's path through them, the measurement
  window of a cell and the messages between the processes;
- ``benchmarks/tokenizer_process.py``: the tokenizer process (requests, the closed loop,
  the event-loop lag ticker);
- ``benchmarks/rank_process.py``: the scheduler-rank processes (receive loop, multimodal
  handling, simulated forward; CPU and collectives by phase);
- ``benchmarks/report.py``: the metrics (what each column means), the JSON, the Markdown
  table, the plots and ``--from-json``.

Default run and its budget (2 CPU cores, 10 minutes)
----------------------------------------------------
TP=4; all seven modes; workloads 448x448, 1120x700, 1920x1080, video16 at concurrency 64,
plus concurrency 1, 16, 100 for 1120x700 (49 cells). A cell issues requests until its
request cap is reached or, once at least ``--min-requests`` (default: twice the
concurrency, within the cap) were issued, ``--cell-seconds`` (3 s) have passed; then it
waits for those in flight. Each cell starts cold: its first C requests are built and sent
back to back. The request cap is ``--requests`` (200), but ``--legacy-max-requests`` (32)
for original / per_request_broadcast / batch_broadcast: on 2 cores with TP=4 those run at
~1-3 req/s for the large workloads, so one closed-loop wave of 64 or 100 requests alone
would take 30-60 s per cell. Where the cap is below the concurrency, the cell measures a
burst of that many requests, all in flight at once ("C eff" = min(C, n)): throughput is
the saturated throughput, but latency is that of an n-request burst, i.e. *lower* than the
steady state of C requests in flight (about C / throughput). The ``n`` column says how
many requests a cell measured; p99 over fewer than 100 requests is their maximum.
``loop_lag_ms_max`` includes the cell's opening burst (up to C requests built and sent
back to back on the loop).

Forward wait: ``--forward-wait auto`` busy-waits when the machine has at least TP + 2
cores, else sleeps: with 4 ranks on 2 cores, four spinning ranks would starve the
tokenizer and the very multimodal work being measured. ``spin`` forces busy-waiting.
Each process uses one torch thread (``torch.set_num_threads(1)``).

Memory: ``--max-recv-bytes`` (512 MiB) caps what rank 0 drains in one iteration (as
upstream's ``max_recv_per_poll`` caps counts) so that the legacy modes' per-iteration
``broadcast_pyobj`` of whole feature tensors (pickled once, copied, then received,
copied and unpickled on every peer) fits in memory; 0 = unlimited, as sglang 0.5.5.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

from benchmarks import _standin

_standin.install()  # before any sglang import (see _standin's docstring)

from benchmarks.harness import SHM_DIR, Cell, RunConfig, free_port, our_segments  # noqa: E402
from benchmarks.rank_process import IDLE_POLL_MS, rank_main  # noqa: E402
from benchmarks.report import (  # noqa: E402
    cell_row,
    machine_info,
    make_plots,
    rewrite_from_json,
    sort_rows,
    write_json,
    write_markdown,
)
from benchmarks.schemes import LEGACY_MODES, MODES, WORKLOADS  # noqa: E402
from benchmarks.tokenizer_process import tokenizer_main  # noqa: E402

__all__ = ["build_cells", "main", "parse_args", "run_group"]

DEFAULT_OUT = _standin.REPO_ROOT / "benchmarks" / "results"


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


def _csv(kind):
    def parse(text: str):
        return [kind(x) for x in text.split(",") if x.strip()]

    return parse


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line; ``--quick`` fills in the options left at their defaults."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare_schemes",
        description="Side-by-side benchmark of the multimodal-input schemes "
        "(see the module docstring for the metrics).",
    )
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run (< 1 min): TP=2, 448x448, C=4, 6 requests per cell, 5 ms "
                   "forward (options given explicitly still apply)")
    p.add_argument("--modes", type=_csv(str), default=list(MODES),
                   help=f"comma list of modes (default: all: {','.join(MODES)})")
    p.add_argument("--workloads", type=_csv(str), default=list(WORKLOADS),
                   help=f"comma list of workloads (default: all: {','.join(WORKLOADS)})")
    p.add_argument("--tp", type=_csv(int), default=[4],
                   help="comma list of TP sizes, e.g. 1,2,4,8 (default: 4)")
    p.add_argument("--concurrency", type=_csv(int), default=[64],
                   help="concurrency for every workload (default: 64)")
    p.add_argument("--sweep-workload", default="1120x700",
                   help="workload that also runs the concurrency sweep (default: 1120x700; "
                   "'none' to skip)")
    p.add_argument("--sweep-concurrency", type=_csv(int), default=[1, 16, 64, 100],
                   help="concurrency values of the sweep (default: 1,16,64,100)")
    p.add_argument("--requests", type=int, default=200,
                   help="most requests one cell issues (default: 200)")
    p.add_argument("--legacy-max-requests", type=int, default=32,
                   help="most requests one cell of a legacy mode (original, "
                   "per_request_broadcast, batch_broadcast) issues (default: 32; 0 = --requests). "
                   "Where it is below the concurrency, the cell measures one burst of that many "
                   "requests (column 'C eff')")
    p.add_argument("--min-requests", type=int, default=None,
                   help="fewest requests one cell issues before --cell-seconds may stop it "
                   "(default: twice the cell's concurrency, within the cell's request cap)")
    p.add_argument("--cell-seconds", type=float, default=3.0,
                   help="stop issuing after this many seconds once --min-requests were "
                   "issued (default: 3)")
    p.add_argument("--forward-ms", type=float, default=20.0,
                   help="simulated forward step per iteration with requests (default: 20)")
    p.add_argument("--forward-wait", choices=("auto", "spin", "sleep"), default="auto",
                   help="busy-wait or sleep during the forward step (default: auto = spin "
                   "when cores >= TP + 2, else sleep)")
    p.add_argument("--max-recv-bytes", type=int, default=512 << 20,
                   help="most ZMQ bytes rank 0 drains per iteration (default: 512 MiB; "
                   "0 = unlimited)")
    p.add_argument("--warmup", type=int, default=2,
                   help="unmeasured requests before the first cell of each mode+workload "
                   "(default: 2)")
    p.add_argument("--lag-interval-ms", type=float, default=5.0,
                   help="period of the event-loop lag ticker (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="image generator seed")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="output directory (default: benchmarks/results)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--from-json", type=Path, default=None, metavar="PATH",
                   help="run nothing: rewrite the Markdown table and the plots of an earlier "
                   "run's JSON next to it, and print the table")
    args = p.parse_args(argv)
    if args.quick:  # overrides only what the command line left at its default
        quick = {"tp": [2], "workloads": ["448x448"], "concurrency": [4],
                 "sweep_workload": "none", "requests": 6, "min_requests": 6,
                 "cell_seconds": 0.5, "forward_ms": 5.0, "warmup": 1}
        for key, value in quick.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    for w in args.workloads + ([] if args.sweep_workload == "none" else [args.sweep_workload]):
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    if any(t < 1 for t in args.tp) or any(c < 1 for c in args.concurrency + args.sweep_concurrency):
        p.error("TP sizes and concurrency values must be >= 1")
    return args


def build_cells(args: argparse.Namespace) -> list[Cell]:
    """Cells grouped by TP; inside a group, modes interleave per (workload, concurrency)."""
    combos: list[tuple[str, int]] = []
    for w in args.workloads:
        for c in args.concurrency:
            combos.append((w, c))
    if args.sweep_workload != "none":
        for c in args.sweep_concurrency:
            if (args.sweep_workload, c) not in combos:
                combos.append((args.sweep_workload, c))
    cells = []
    for tp in args.tp:
        for w, c in combos:
            for mode in args.modes:
                max_req = args.requests
                if mode in LEGACY_MODES and args.legacy_max_requests > 0:
                    max_req = min(max_req, args.legacy_max_requests)
                min_req = args.min_requests
                if min_req is None:
                    min_req = min(2 * c, max_req)
                cells.append(Cell(len(cells), mode, w, tp, c, max_req,
                                  min(min_req, max_req), args.cell_seconds))
    return cells


# --------------------------------------------------------------------------------------
# Coordinator
# --------------------------------------------------------------------------------------


def run_group(tp: int, cells: list[Cell], cfg: RunConfig, pbar, log) -> tuple[list[dict], dict]:
    """Run every cell of one TP size in one set of processes; returns rows and info."""
    spawn = mp.get_context("spawn")
    tmpdir = tempfile.mkdtemp(prefix="sglbench_")
    req_addr = f"ipc://{tmpdir}/req"
    done_addr = f"ipc://{tmpdir}/done"
    results = spawn.Queue()
    port = free_port()
    procs = [
        spawn.Process(target=rank_main, name=f"bench-rank{r}",
                      args=(r, tp, port, req_addr, done_addr, results, cfg))
        for r in range(tp)
    ]
    procs.append(spawn.Process(target=tokenizer_main, name="bench-tokenizer",
                               args=(tp, req_addr, done_addr, results, cells, cfg)))
    by_id = {c.id: c for c in cells}
    tok_stats: dict[int, dict] = {}
    rank_stats: dict[int, list] = {c.id: [] for c in cells}
    rows: list[dict] = []
    info: dict = {"tp": tp, "port": port}
    pids: set[int] = set()
    try:
        for p in procs:
            p.start()
            pids.add(p.pid)
        features = None
        done_cells = 0
        while done_cells < len(cells):
            try:
                msg = results.get(timeout=2.0)
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"benchmark process {dead[0].name} exited with {dead[0].exitcode}")
                continue
            kind = msg[0]
            if kind == "error":
                raise RuntimeError(f"{msg[1]} failed:\n{msg[2]}")
            if kind == "ready":
                features = msg[1]
                info["features"] = features
                continue
            cid = msg[1]
            if kind == "tok":
                tok_stats[cid] = msg[2]
            elif kind == "rank":
                stats = dict(msg[3])
                stats["rank"] = msg[2]
                rank_stats[cid].append(stats)
            if cid in tok_stats and len(rank_stats[cid]) == tp:
                cell = by_id[cid]
                row = cell_row(cell, tok_stats.pop(cid), rank_stats.pop(cid), features)
                rows.append(row)
                done_cells += 1
                pbar.set_postfix_str(f"TP={tp} {cell.workload} C={cell.concurrency} {cell.mode}: "
                                     f"{row['throughput_rps']:.1f} rps")
                pbar.update(1)
        for p in procs:
            p.join(timeout=120)
        codes = {p.name: p.exitcode for p in procs}
        info["exit_codes"] = codes
        if any(code != 0 for code in codes.values()):
            raise RuntimeError(f"benchmark processes did not exit cleanly: {codes}")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        results.close()
        leaked = our_segments(pids)
        info["leaked_segments"] = len(leaked)
        if leaked:
            log(f"warning: {len(leaked)} shared-memory segment(s) left by TP={tp} processes; "
                f"removing: {leaked[:5]}")
        for name in leaked:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except FileNotFoundError:
                pass
        assert not our_segments(pids), "segments remain in /dev/shm after cleanup"
        shutil.rmtree(tmpdir, ignore_errors=True)
    return rows, info


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark (or ``--from-json``) and write its outputs; return the exit status."""
    from tqdm import tqdm

    started = time.perf_counter()
    args = parse_args(argv)
    if args.from_json is not None:
        return rewrite_from_json(args.from_json, args.no_plots)
    machine = machine_info()  # load average before the run (the machine may be shared)
    cores = os.cpu_count() or 1
    forward_wait = args.forward_wait
    if forward_wait == "auto":
        forward_wait = "spin" if cores >= max(args.tp) + 2 else "sleep"
    cfg = RunConfig(
        forward_ms=args.forward_ms,
        forward_wait=forward_wait,
        max_recv_bytes=args.max_recv_bytes,
        warmup=args.warmup,
        lag_interval_ms=args.lag_interval_ms,
        seed=args.seed,
    )
    cells = build_cells(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = args.out / stamp

    def log(text: str) -> None:
        tqdm.write(text, file=sys.stderr)

    rows: list[dict] = []
    groups: list[dict] = []
    with tqdm(total=len(cells), desc="cells", unit="cell", file=sys.stderr,
              dynamic_ncols=True) as pbar:
        for tp in args.tp:
            group_rows, info = run_group(tp, [c for c in cells if c.tp == tp], cfg, pbar, log)
            rows.extend(group_rows)
            groups.append(info)
    rows = sort_rows(rows)
    wall = time.perf_counter() - started
    config = {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "quick": args.quick,
        "modes": args.modes,
        "workloads": args.workloads,
        "tp": args.tp,
        "concurrency": args.concurrency,
        "sweep_workload": args.sweep_workload,
        "sweep_concurrency": args.sweep_concurrency,
        "requests": args.requests,
        "legacy_max_requests": args.legacy_max_requests,
        "min_requests": args.min_requests,
        "cell_seconds": args.cell_seconds,
        **dataclasses.asdict(cfg),
        "forward_wait_requested": args.forward_wait,
        "idle_poll_ms": IDLE_POLL_MS,
        "torch_threads_per_process": 1,
        "groups": groups,
    }
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {"machine": machine, "config": config, "wall_s": round(wall, 1),
              "results": rows}
    json_path = Path(f"{stem}.json")
    write_json(json_path, report)
    md_path = Path(f"{stem}.md")
    table = write_markdown(md_path, stamp, report)
    plots = [] if args.no_plots else make_plots(rows, args, stem)
    print(f"results: {json_path}")
    print(f"table:   {md_path}")
    for p in plots:
        print(f"plot:    {p}")
    print(f"wall time: {wall:.1f} s")
    print()
    print(table)
    return 0


if __name__ == "__main__":
    # Run through the importable module, so that anything referring to this module by name
    # finds the same globals (what the spawned processes unpickle, their targets and the
    # Cell/RunConfig objects, lives in importable modules: rank_process, tokenizer_process,
    # harness).
    from benchmarks import compare_schemes as _module

    sys.exit(_module.main())
