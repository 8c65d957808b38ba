"""Per-request figures of the real (patched) request path, 1120x700 JPEG by default.

Prints: the pickled TokenizedGenerateReqInput size with and without the tokenizer-stage
path; tokenizer-side materialization time against sglang's own ``from_dict`` on the same
processor output; and the scheduler-side time per request (the patched
``handle_generate_request`` on one rank, and sglang's legacy local ``from_dict``).

usage: python -m benchmarks.request_path [--width 1120 --height 700 --repeat 20]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1120)
    ap.add_argument("--height", type=int, default=700)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args(argv)
    sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "support")]
    import conftest  # noqa: F401  (stand-in + a patched copy of sglang first on sys.path)
    from sglang.srt.managers.schedule_batch import MultimodalInputs
    from scheduler_harness import SchedulerUnderTest
    from tiny_models import (close_tokenizer_manager, image_to_jpeg_bytes, make_image,
                             make_tiny_qwen2vl, make_tokenizer_manager, tokenize_one)

    from sglang_mmpre.tokenizer_side.materialize import materialize

    work = Path(tempfile.mkdtemp(prefix="sglang_mmpre_reqpath_"))
    model = make_tiny_qwen2vl(work / "model")
    jpeg = image_to_jpeg_bytes(make_image(args.width, args.height))

    os.environ["SGLANG_MM_PREMATERIALIZE"] = "0"
    tm = make_tokenizer_manager(model)
    legacy = asyncio.run(tokenize_one(tm, image_data=[jpeg]))
    close_tokenizer_manager(tm)
    os.environ["SGLANG_MM_PREMATERIALIZE"] = "1"
    tm = make_tokenizer_manager(model)
    patched = asyncio.run(tokenize_one(tm, image_data=[jpeg]))

    print(f"image {args.width}x{args.height}, feature {tuple(legacy.mm_inputs['mm_items'][0].feature.shape)}")
    print(f"pickled request, sglang 0.5.5:        {len(pickle.dumps(legacy)):>12,} bytes")
    print(f"pickled request, tokenizer-stage:     {len(pickle.dumps(patched)):>12,} bytes")
    bare = copy.copy(patched)
    bare.materialized_mm_inputs = None
    print(f"  of which multimodal descriptors:    {len(pickle.dumps(patched)) - len(pickle.dumps(bare)):>12,} bytes")

    raw = legacy.mm_inputs

    def fresh():
        d = dict(raw)
        d["mm_items"] = [copy.copy(it) for it in raw["mm_items"]]
        for it in d["mm_items"]:
            it.hash = None
        return d

    print(f"sglang from_dict:                     {_median_ms(lambda: MultimodalInputs.from_dict(fresh()), args.repeat):>10.2f} ms")
    print(f"tokenizer-side materialize (hash):    {_median_ms(lambda: materialize(fresh()), args.repeat):>10.2f} ms")
    print(f"tokenizer-side build (hash + shm):    "
          f"{_median_ms(lambda: tm.mmpre.build(fresh()).writer.abandon(), args.repeat):>10.2f} ms")

    def handle_patched():
        req = asyncio.run(tokenize_one(tm, image_data=[jpeg]))
        blob = []
        tm.mmpre.send(type("S", (), {"send_pyobj": lambda s, o: blob.append(pickle.dumps(o))})(), req)
        received = pickle.loads(blob[0])
        sched = SchedulerUnderTest()
        t = time.perf_counter()
        sched.handle_generate_request(received)
        return (time.perf_counter() - t) * 1e3

    def handle_legacy():
        received = pickle.loads(pickle.dumps(legacy))
        for it in received.mm_inputs["mm_items"]:
            it.hash = None
        sched = SchedulerUnderTest()
        t = time.perf_counter()
        sched.handle_generate_request(received)
        return (time.perf_counter() - t) * 1e3

    patched_ms = statistics.median(handle_patched() for _ in range(args.repeat))
    legacy_ms = statistics.median(handle_legacy() for _ in range(args.repeat))
    print(f"scheduler handle_generate_request, tokenizer-stage: {patched_ms:8.2f} ms / request / rank")
    print(f"scheduler handle_generate_request, legacy from_dict: {legacy_ms:7.2f} ms / request / rank")
    close_tokenizer_manager(tm)


if __name__ == "__main__":
    main()
