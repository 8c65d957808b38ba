"""The main job's load: conversations through ``/v1/chat/completions``, one workload per regime.

A *regime* says which images a run sends (every image is a deterministic
``tiny_models.make_image(width, height, seed)`` JPEG, drawn from the run's ``seed``; the
same seed gives every scheme the same requests):

- ``unique``: one single-turn conversation per request, each with an image no earlier run
  on that server has seen (the caller gives every cell and round its own seed), so sglang's
  vision encoder runs for every request;
- ``repeated``: single-turn conversations that re-send a fixed set of ``REPEATED_K`` images
  in turn (an agent loop or a chat that re-sends its image). From the second use on, the
  vision encoder is skipped: the radix cache holds the prompt up to the end of the image
  (the image comes before the text, and its tokens' pad values derive from its hash), and
  sglang's ``MultiModalCache`` holds its embedding (``SGLANG_VLM_CACHE_SIZE_MB``, default
  100 MB; one image of the tiny model is about 128 KB of embedding). The tokenizer still
  processes every image and the ranks still receive it;
- ``multi_turn``: ``MULTI_TURN_TURNS``-turn conversations; every turn re-sends the whole
  conversation so far (the earlier images and the model's earlier answers) and a new image
  comes every ``NEW_IMAGE_EVERY`` turns. Time to first token is reported per turn.

Every request is streamed (``"stream": true``) with ``ignore_eos`` and greedy sampling, so it
writes exactly ``output_len`` tokens; TTFT is the time to the first chunk with text, E2E
the time to ``[DONE]``. ``concurrency`` conversations are in flight at once (a new one
starts when one ends), so at most ``concurrency`` requests are. Images are encoded before
the clock starts. A request that fails is counted in ``errors`` with its first message.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

from benchmarks.report import percentile
from tiny_models import image_data_url, make_image

__all__ = ["REGIMES", "REPEATED_K", "MULTI_TURN_TURNS", "NEW_IMAGE_EVERY", "Conversation",
           "conversations", "run_load"]

REGIMES = ("unique", "repeated", "multi_turn")
REPEATED_K = 4
MULTI_TURN_TURNS = 4
NEW_IMAGE_EVERY = 2


@dataclass(frozen=True)
class Conversation:
    """The user turns of one conversation: per turn, the seeds of the images it adds (in
    order) and its text. Turn ``t`` sends turns ``0..t`` with the answers between them."""

    turns: tuple[tuple[tuple[int, ...], str], ...]


def _text(i: int, turn: int, input_len: int) -> str:
    # The served model's vocabulary merges every byte pair: about two characters a token.
    base = f"Conversation {i}, question {turn}: what is in the picture? "
    return (base * (1 + 2 * input_len // len(base)))[: 2 * input_len]


def conversations(regime: str, requests: int, seed: int, input_len: int) -> list[Conversation]:
    """The conversations of one run, about ``requests`` requests in all.

    Image seeds are ``seed * 1000 + k``: a run's seed gives it images of its own (``k`` stays
    below 1000). ``multi_turn`` rounds ``requests`` up to whole conversations.
    """
    base = seed * 1000
    if regime == "unique":
        return [Conversation(((( base + i,), _text(i, 0, input_len)),)) for i in range(requests)]
    if regime == "repeated":
        return [Conversation((((base + i % REPEATED_K,), _text(i, 0, input_len)),))
                for i in range(requests)]
    if regime == "multi_turn":
        n = -(-requests // MULTI_TURN_TURNS)
        out, k = [], 0
        for i in range(n):
            turns = []
            for t in range(MULTI_TURN_TURNS):
                new = ()
                if t % NEW_IMAGE_EVERY == 0:
                    new, k = (base + k,), k + 1
                turns.append((new, _text(i, t, input_len)))
            out.append(Conversation(tuple(turns)))
        return out
    raise ValueError(f"unknown regime {regime!r}; one of {REGIMES}")


@dataclass
class _Stats:
    ttft_s: dict[int, list[float]] = field(default_factory=dict)  # turn -> TTFTs
    e2e_s: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: Optional[str] = None


async def _request(session, url: str, messages: list, output_len: int,
                   stats: _Stats, turn: int) -> Optional[str]:
    """One streamed chat completion; returns its text, or None if it failed."""
    body = {"model": "default", "messages": messages, "max_tokens": output_len,
            "temperature": 0, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    ttft, text = None, []
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:500]}")
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(str(chunk["error"])[:500])
                delta = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
                if delta:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(delta)
    except Exception as e:  # noqa: BLE001 - counted and reported, the run goes on
        stats.errors += 1
        stats.first_error = stats.first_error or f"{type(e).__name__}: {e}"
        return None
    stats.e2e_s.append(time.perf_counter() - t0)
    stats.ttft_s.setdefault(turn, []).append(ttft if ttft is not None else stats.e2e_s[-1])
    return "".join(text)


async def _converse(session, url: str, conv: Conversation, urls: dict[int, str],
                    output_len: int, stats: _Stats) -> None:
    messages: list = []
    for turn, (seeds, text) in enumerate(conv.turns):
        content = [{"type": "image_url", "image_url": {"url": urls[s]}} for s in seeds]
        messages.append({"role": "user", "content": content + [{"type": "text", "text": text}]})
        answer = await _request(session, url, messages, output_len, stats, turn)
        if answer is None:
            return
        messages.append({"role": "assistant", "content": answer})


async def _run(url: str, convs: list[Conversation], urls: dict[int, str], concurrency: int,
               output_len: int) -> dict:
    import aiohttp

    stats = _Stats()
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def one(conv: Conversation) -> None:
            async with sem:
                await _converse(session, url, conv, urls, output_len, stats)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for c in convs))
        duration = time.perf_counter() - t0
    ttfts = [x for v in stats.ttft_s.values() for x in v]
    ms = lambda v: None if v is None or math.isnan(v) else round(1000 * v, 1)  # noqa: E731
    return {
        "duration": duration,
        "completed": len(stats.e2e_s),
        "errors": stats.errors,
        "first_error": stats.first_error,
        "request_throughput": len(stats.e2e_s) / duration,
        "median_ttft_ms": ms(statistics.median(ttfts)) if ttfts else None,
        "p99_ttft_ms": ms(percentile(ttfts, 99)),
        "median_e2e_latency_ms": ms(statistics.median(stats.e2e_s)) if stats.e2e_s else None,
        "p99_e2e_latency_ms": ms(percentile(stats.e2e_s, 99)),
        "median_ttft_ms_by_turn": [ms(statistics.median(stats.ttft_s[t]))
                                   for t in sorted(stats.ttft_s)],
    }


def run_load(url: str, regime: str, requests: int, seed: int, width: int, height: int,
             concurrency: int, input_len: int, output_len: int) -> dict:
    """Drive the server at ``url`` with one run of ``regime``; returns its figures
    (``duration`` s, ``completed``, ``errors``, ``request_throughput`` req/s, TTFT and E2E
    p50/p99 ms, and ``median_ttft_ms_by_turn``)."""
    convs = conversations(regime, requests, seed, input_len)
    seeds = sorted({s for c in convs for seeds, _ in c.turns for s in seeds})
    urls = {s: image_data_url(make_image(width, height, seed=s)) for s in seeds}
    result = asyncio.run(_run(url, convs, urls, concurrency, output_len))
    result["images"] = len(urls)
    return result
