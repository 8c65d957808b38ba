"""The seed's two alternative schemes, on copies of the installed sglang 0.5.5 (never on it).

* ``revert`` (``patches/solution_1_revert.patch``): sglang 0.5.4's behaviour, every TP rank
  runs ``MultimodalInputs.from_dict`` itself and no collective is made for multimodal inputs.
* ``batch_broadcast`` (``patches/improved_batch_broadcast.patch``): the entry rank
  materializes all multimodal requests of one receive batch and sends them to the other
  ranks in ONE ``broadcast_object_list``; the handlers pop them from a bounded cache.

Each patch must apply with this project's installer and with ``git apply``, revert byte for
byte, exclude the other schemes, and compile. The behaviour tests run sglang's *real* patched
``Scheduler`` methods (through ``scheduler_harness.SchedulerUnderTest``) in gloo rank
processes whose ``PYTHONPATH`` points at a copy patched with the scheme under test, not at
the conftest's copy (patched with ``optimized``). This file is also the rank processes'
entry point (``python test_alternative_patches.py rank '<json>'``).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PATCHES = REPO / "patches"
SCHED = "srt/managers/scheduler.py"
ALTERNATIVES = ("revert", "batch_broadcast")
RANK_TIMEOUT_S = 240


def installed_sglang() -> Path:
    """The installed (pristine) sglang package, found through its dist-info and not through
    sys.path, which the conftest points at a patched copy."""
    return Path(importlib.metadata.distribution("sglang").locate_file("sglang")).resolve()


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """``<tmp>/sglang`` holding pristine copies of srt/managers/ and version.py."""
    root = tmp_path / "sglang"
    no_cache = shutil.ignore_patterns("__pycache__")
    shutil.copytree(installed_sglang() / "srt/managers", root / "srt/managers", ignore=no_cache)
    shutil.copy2(installed_sglang() / "version.py", root / "version.py")
    return root


def _patched_text(tmp_path: Path, scheme: str) -> str:
    from sglang_mmpre.patching import installer

    root = tmp_path / f"{scheme}_sglang"
    (root / "srt/managers").mkdir(parents=True)
    shutil.copy2(installed_sglang() / SCHED, root / SCHED)
    shutil.copy2(installed_sglang() / "version.py", root / "version.py")
    installer.apply(root, scheme)
    return (root / SCHED).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- the patches


@pytest.mark.parametrize("scheme", ALTERNATIVES)
def test_installer_applies_to_pristine_copy_and_reverts_byte_for_byte(root, scheme):
    from sglang_mmpre.patching import installer
    from sglang_mmpre.patching.unified_diff import ExitCode

    source = installer.patch_path(scheme)
    assert source.read_bytes() == (PATCHES / installer.SCHEMES[scheme]).read_bytes()
    before = snapshot(root)

    report = installer.apply(root, scheme)

    assert report.outcome == "applied", report.message
    changed = {rel for rel in before if (root / rel).read_bytes() != before[rel][0]}
    assert changed == {SCHED}  # thin: scheduler.py only
    assert f'sglang-mmpre scheme "{scheme}"' in (root / SCHED).read_text(encoding="utf-8")
    assert installer.check(root, scheme).exit_code == ExitCode.ALREADY_APPLIED
    assert installer.revert(root).outcome == "reverted"
    assert snapshot(root) == before


@pytest.mark.parametrize("scheme", ALTERNATIVES)
def test_git_apply_in_a_checkout_layout_gives_the_same_bytes(tmp_path, scheme):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    from sglang_mmpre.patching import installer

    repo = tmp_path / "checkout"
    (repo / "python/sglang/srt/managers").mkdir(parents=True)
    shutil.copy2(installed_sglang() / SCHED, repo / "python/sglang" / SCHED)
    git = ["git", "-C", str(repo), "-c", "core.autocrlf=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    patch = str(PATCHES / installer.SCHEMES[scheme])

    subprocess.run([*git, "apply", "--check", patch], check=True, capture_output=True)
    subprocess.run([*git, "apply", patch], check=True, capture_output=True)

    got = (repo / "python/sglang" / SCHED).read_text(encoding="utf-8")
    assert got == _patched_text(tmp_path, scheme)
    subprocess.run([*git, "apply", "--reverse", "--check", patch], check=True)


@pytest.mark.parametrize("scheme", ALTERNATIVES)
def test_schemes_exclude_each_other(root, scheme, capsys):
    from sglang_mmpre.patching import cli
    from sglang_mmpre.patching.unified_diff import ExitCode

    def run(*args: str) -> int:
        return cli.main(["patch", *args, "--sglang-root", str(root)])

    before = snapshot(root)
    assert run("apply", "--scheme", "optimized") == 0
    with_optimized = snapshot(root)
    capsys.readouterr()

    assert run("apply", "--scheme", scheme) == ExitCode.OTHER_SCHEME == 6
    assert "schemes exclude each other" in capsys.readouterr().err
    assert snapshot(root) == with_optimized

    assert run("revert") == 0 and snapshot(root) == before
    assert run("apply", "--scheme", scheme) == 0
    other = next(s for s in ALTERNATIVES if s != scheme)
    assert run("apply", "--scheme", "optimized") == ExitCode.OTHER_SCHEME
    assert run("apply", "--scheme", other) == ExitCode.OTHER_SCHEME
    assert run("revert") == 0 and snapshot(root) == before


def _calls_in(tree: ast.Module, method: str) -> set[str]:
    """Dotted names of everything ``Scheduler.<method>`` calls."""
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Scheduler"]
    (fn,) = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == method]
    return {ast.unparse(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}


@pytest.mark.parametrize("scheme", ALTERNATIVES)
def test_patched_scheduler_compiles_and_drops_the_per_request_broadcast(tmp_path, scheme):
    source = _patched_text(tmp_path, scheme)
    compile(source, f"<{scheme}>/{SCHED}", "exec")
    tree = ast.parse(source)
    for handler in ("handle_generate_request", "handle_embedding_request"):
        calls = _calls_in(tree, handler)
        assert "self._process_and_broadcast_mm_inputs" not in calls
        if scheme == "revert":
            assert "MultimodalInputs.from_dict" in calls
        else:
            assert "self._take_mm_inputs" in calls
    if scheme == "batch_broadcast":
        assert "self._batch_broadcast_mm_inputs" in _calls_in(tree, "process_input_requests")
        assert _calls_in(tree, "_batch_broadcast_mm_inputs") >= {
            "MultimodalInputs.from_dict", "torch.distributed.broadcast_object_list"}


# ----------------------------------------------------------------------------- behaviour


@pytest.fixture(scope="module")
def patched_sites(tmp_path_factory):
    """scheme -> a site dir holding a full copy of the installed sglang patched with it.
    ``__pycache__`` is copied too (copy2 keeps mtimes, so it stays valid and the rank
    processes import faster); the patched scheduler.py gets recompiled."""
    from sglang_mmpre.patching import installer

    made: dict[str, Path] = {}

    def get(scheme: str) -> Path:
        if scheme not in made:
            site = tmp_path_factory.mktemp(f"site_{scheme}")
            shutil.copytree(installed_sglang(), site / "sglang")
            shutil.rmtree(site / "sglang" / installer.BACKUP_DIRNAME, ignore_errors=True)
            assert installer.apply(site / "sglang", scheme).outcome == "applied"
            made[scheme] = site
        return made[scheme]

    return get


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path: Path, site: Path, scheme: str, world: int, members: list[int]) -> list:
    """Start ``world`` gloo processes running this file's ``_rank_main``; the TP group is
    ``members`` (global ranks). Returns each rank's JSON result."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Only the copy patched with ``scheme``: never the conftest's (optimized) copy.
    env["PYTHONPATH"] = os.pathsep.join(map(str, [site, HERE / "support", HERE, REPO]))
    env.setdefault("OMP_NUM_THREADS", "1")
    port = free_port()
    procs = []
    for rank in range(world):
        spec = {"scheme": scheme, "site": str(site), "rank": rank, "world": world,
                "members": members, "port": port, "out": str(tmp_path / f"rank{rank}.json")}
        log = open(tmp_path / f"rank{rank}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "rank",
                                       json.dumps(spec)], env=env, cwd=tmp_path, stdout=log,
                                      stderr=subprocess.STDOUT))
        log.close()
    try:
        codes = [p.wait(timeout=RANK_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = "\n".join(
        f"--- rank {r} (exit {p.returncode})\n"
        + (tmp_path / f"rank{r}.log").read_text(errors="replace")[-4000:]
        for r, p in enumerate(procs)
    )
    assert codes == [0] * world, logs
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def _mm_rids(batch: dict) -> list[str]:
    return [r["rid"] for r in batch["reqs"] if r["mm"] is not None]


def test_revert_every_rank_materializes_with_no_collective(tmp_path, patched_sites):
    results = run_ranks(tmp_path, patched_sites("revert"), "revert", world=2, members=[0, 1])

    for rank, res in enumerate(results):
        assert res["sglang_root"] == str(patched_sites("revert") / "sglang")
        for name, batch in res["batches"].items():
            assert batch["dist_calls"] == {}, (rank, name)  # no torch.distributed call at all
            n_mm = batch["n_mm_requests"]
            assert batch["from_dict_calls"] == n_mm, (rank, name)  # every rank materializes
            assert len(_mm_rids(batch)) == n_mm and batch["matches_local_from_dict"]
            assert all(r["aborted"] is None for r in batch["reqs"])
    # Same requests, same MultimodalInputs (hash, pad_value, feature bytes) on every rank.
    assert results[1]["batches"] == results[0]["batches"]
    assert results[0]["batches"]["three"]["n_mm_requests"] == 3


def test_batch_broadcast_sends_one_collective_per_batch_and_ranks_agree(
    tmp_path, patched_sites
):
    # Global rank 0 is a bystander outside the TP group (think another PP stage), so the
    # entry rank is global rank 1: the broadcast must name the group's first global rank.
    results = run_ranks(tmp_path, patched_sites("batch_broadcast"), "batch_broadcast",
                        world=3, members=[1, 2])
    assert results[0] == {"bystander": True}
    entry, other = results[1], results[2]

    for res, is_entry in ((entry, True), (other, False)):
        batches = res["batches"]
        for name in ("three", "mixed", "evict"):
            calls = batches[name]["dist_calls"]
            assert calls.get("broadcast_object_list") == 1, (name, calls)
            assert set(calls) <= {"broadcast_object_list", "is_initialized", "get_world_size"}
            assert batches[name]["cache_left"] == 0 and batches[name]["matches_local_from_dict"]
        assert batches["text_only"]["dist_calls"].get("broadcast_object_list") is None
        # Only the entry rank materializes (plus the local fallback for the evicted entry).
        assert batches["three"]["from_dict_calls"] == (3 if is_entry else 0)
        assert batches["mixed"]["from_dict_calls"] == (3 if is_entry else 0)  # bad one incl.
        assert batches["evict"]["from_dict_calls"] == (3 if is_entry else 1)
        assert batches["text_only"]["from_dict_calls"] == 0
        assert len(_mm_rids(batches["three"])) == 3
        # from_dict raised on the entry rank for "bad": every rank aborts that request only.
        aborted = {r["rid"]: r["aborted"] for r in batches["mixed"]["reqs"]}
        assert aborted.pop("bad").startswith("Invalid multimodal inputs: KeyError")
        assert set(aborted.values()) == {None}
        assert sorted(_mm_rids(batches["mixed"])) == ["emb", "good"]
        # One rank alone (tp_size == 1, no group): local from_dict, no collective.
        assert res["single_rank"]["dist_calls"].get("broadcast_object_list") is None
        assert res["single_rank"]["from_dict_calls"] == 1
        assert res["single_rank"]["matches_local_from_dict"]
        # A failing broadcast is logged and re-raised, never swallowed.
        assert res["broadcast_failure"] == {"raised": "RuntimeError: simulated gloo failure",
                                            "queued": 0, "logged": True}
    # Every rank holds equal MultimodalInputs (hash, pad_value, feature bytes, fields).
    for r in entry["batches"]["three"]["reqs"]:
        (item,) = r["mm"]["mm_items"]
        assert None not in (item["hash"], item["pad_value"]) and item["feature"][0] == "tensor"
    assert entry["batches"].keys() == other["batches"].keys()
    for name, batch in entry["batches"].items():
        assert batch["reqs"] == other["batches"][name]["reqs"], name


# ----------------------------------------------------------------------------- rank processes


def _fingerprint(obj):
    """A JSON-able digest of a MultimodalInputs (or anything in it): tensors by dtype, shape
    and sha256 of their bytes, dataclasses field by field."""
    import dataclasses
    import enum

    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return ["tensor", str(obj.dtype), list(obj.shape), hashlib.sha256(raw).hexdigest()]
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        digest = hashlib.sha256(arr.tobytes()).hexdigest()
        return ["ndarray", str(arr.dtype), list(arr.shape), digest]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _fingerprint(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _fingerprint(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_fingerprint(x) for x in obj]
    if isinstance(obj, enum.Enum):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def _run_scheduler_rank(spec: dict, group) -> dict:
    import collections
    import logging
    import types

    import torch.distributed as dist

    import sglang
    from sglang.srt.managers.io_struct import (
        BatchTokenizedGenerateReqInput,
        TokenizedEmbeddingReqInput,
        TokenizedGenerateReqInput,
    )
    from sglang.srt.managers.schedule_batch import MultimodalInputs
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang.utils import TypeBasedDispatcher

    from mm_fixtures import image_mm_dict
    from scheduler_harness import DistributedCallCounter, SchedulerUnderTest

    sglang_root = str(Path(sglang.__file__).resolve().parent)
    assert sglang_root == str(Path(spec["site"]).resolve() / "sglang"), sglang_root
    scheme = spec["scheme"]
    members = spec["members"]
    group_rank = members.index(spec["rank"])

    class RankScheduler(SchedulerUnderTest):
        """SchedulerUnderTest plus the real process_input_requests and its helpers."""

    for name in ("process_input_requests", "_batch_broadcast_mm_inputs", "_take_mm_inputs"):
        if hasattr(Scheduler, name):
            setattr(RankScheduler, name, getattr(Scheduler, name))

    def make(tp_size: int, cpu_group, is_entry_rank: bool) -> RankScheduler:
        s = RankScheduler(tp_size=tp_size, cpu_group=cpu_group, is_entry_rank=is_entry_rank,
                          tp_rank=group_rank)
        # What the patched Scheduler.__init__ sets (batch_broadcast; unused under revert).
        s.mm_inputs_cache, s.mm_inputs_cache_max_size = collections.OrderedDict(), 1000
        s._request_dispatcher = TypeBasedDispatcher([
            (TokenizedGenerateReqInput, s.handle_generate_request),
            (TokenizedEmbeddingReqInput, s.handle_embedding_request),
            (BatchTokenizedGenerateReqInput, s.handle_batch_generate_request),
        ])
        s.sent = []
        s.send_to_tokenizer = types.SimpleNamespace(
            send_output=lambda output, recv_req: s.sent.append(output))
        s.recv_from_rpc, s.chunked_req, s.offload_tags = None, None, set()
        s.running_batch = types.SimpleNamespace(is_empty=lambda: True)
        return s

    def params() -> SamplingParams:
        p = SamplingParams(max_new_tokens=4)
        p.normalize(None)
        return p

    def ids_for(mm: dict | None) -> list[int]:
        if mm is None or "mm_items" not in mm:
            return [1, 2, 3, 4]
        n = mm["mm_items"][0].offsets[0][1]
        return [1, 2, 259] + [261] * (n - 3) + [260, 5]

    def gen(rid: str, mm: dict | None):
        return TokenizedGenerateReqInput("text", ids_for(mm), mm, params(), False, -1, 0, None,
                                         False, rid=rid)

    def emb(rid: str, mm: dict):
        return TokenizedEmbeddingReqInput("text", ids_for(mm), mm, [], params(), rid=rid)

    # Every rank builds the same batches, as broadcast_pyobj in recv_requests would give them.
    # name -> (builder, {rid: (w, h, seed)} for the reference from_dict)
    sizes = {"r0": (448, 448, 0), "r1": (1120, 700, 1), "r2": (224, 672, 2),
             "good": (448, 448, 3), "emb": (224, 224, 4), "e0": (224, 224, 5),
             "e1": (448, 224, 6), "solo": (224, 224, 7)}

    def image(rid: str) -> dict:
        return image_mm_dict(*sizes[rid])

    batches = {
        "three": lambda: [gen(r, image(r)) for r in ("r0", "r1", "r2")],
        "mixed": lambda: [
            BatchTokenizedGenerateReqInput(batch=[gen("good", image("good"))]
                                           + ([gen("bad", {"im_token_id": 261})]
                                              if scheme == "batch_broadcast" else [])),
            gen("text", None),
            emb("emb", image("emb")),
        ],
        "text_only": lambda: [gen("t0", None), gen("t1", None)],
        "evict": lambda: [gen("e0", image("e0")), gen("e1", image("e1"))],
    }

    real_from_dict = MultimodalInputs.from_dict
    from_dict_calls = []

    def counting_from_dict(obj):
        from_dict_calls.append(1)
        return real_from_dict(obj)

    class Patcher:  # the slice of pytest's monkeypatch that DistributedCallCounter uses
        def __init__(self):
            self.undo = []

        def setattr(self, target, name, value):
            self.undo.append((target, name, getattr(target, name)))
            setattr(target, name, value)

        def restore(self):
            for target, name, value in reversed(self.undo):
                setattr(target, name, value)
            self.undo.clear()

    def drive(scheduler: RankScheduler, reqs: list) -> dict:
        n_mm = sum(
            (getattr(r, "mm_inputs", None) or getattr(r, "image_inputs", None)) is not None
            for req in reqs for r in (req.batch if hasattr(req, "batch") else [req])
        )
        from_dict_calls.clear()
        patcher = Patcher()
        counter = DistributedCallCounter(patcher)
        MultimodalInputs.from_dict = staticmethod(counting_from_dict)
        try:
            scheduler.process_input_requests(reqs)
        finally:
            MultimodalInputs.from_dict = staticmethod(real_from_dict)
            patcher.restore()
        built, matches = [], True
        for req in scheduler.queued:
            aborted = req.to_finish.message if req.to_finish is not None else None
            mm = None if req.multimodal_inputs is None else _fingerprint(req.multimodal_inputs)
            if mm is not None:
                matches &= mm == _fingerprint(real_from_dict(image(req.rid)))
            built.append({"rid": req.rid, "aborted": aborted, "mm": mm,
                          "input_ids": hashlib.sha256(
                              json.dumps(req.origin_input_ids).encode()).hexdigest()})
        scheduler.queued.clear()
        return {"dist_calls": dict(collections.Counter(counter.calls)),
                "from_dict_calls": len(from_dict_calls), "n_mm_requests": n_mm,
                "reqs": built, "matches_local_from_dict": matches,
                "cache_left": len(scheduler.mm_inputs_cache)}

    result = {"sglang_root": sglang_root, "batches": {}}
    tp = make(len(members), group, is_entry_rank=group_rank == 0)
    for name, build in batches.items():
        if name == "evict":
            tp.mm_inputs_cache_max_size = 1  # "e0" is evicted before its handler runs
        result["batches"][name] = drive(tp, build())
    if scheme != "batch_broadcast":
        return result

    result["single_rank"] = drive(make(1, None, True), [gen("solo", image("solo"))])

    # A broadcast that fails (simulated before any byte moves, on both ranks alike, so the
    # group stays in step) must propagate out of process_input_requests, logged.
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("sglang.srt.managers.scheduler").addHandler(handler)

    def failing_broadcast(*args, **kwargs):
        raise RuntimeError("simulated gloo failure")

    real_broadcast = dist.broadcast_object_list
    dist.broadcast_object_list = failing_broadcast
    failing = make(len(members), group, is_entry_rank=group_rank == 0)
    try:
        failing.process_input_requests([gen("r0", image("r0"))])
        raised = None
    except RuntimeError as exc:
        raised = f"{type(exc).__name__}: {exc}"
    finally:
        dist.broadcast_object_list = real_broadcast
    result["broadcast_failure"] = {
        "raised": raised, "queued": len(failing.queued),
        "logged": any("batch broadcast" in r.getMessage() and r.exc_info for r in records),
    }
    return result


def _rank_main(spec: dict) -> None:
    from datetime import timedelta

    import gpu_module_standin

    gpu_module_standin.install()
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec['port']}",
                            rank=spec["rank"], world_size=spec["world"],
                            timeout=timedelta(seconds=RANK_TIMEOUT_S))
    group = dist.new_group(spec["members"], backend="gloo")  # like sglang's TP cpu_group
    try:
        if spec["rank"] in spec["members"]:
            result = _run_scheduler_rank(spec, group)
        else:
            result = {"bystander": True}
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # do not wait in the barrier: the peers fail fast on the closed socket
    dist.barrier()
    Path(spec["out"]).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__" and sys.argv[1:2] == ["rank"]:
    _rank_main(json.loads(sys.argv[2]))
