"""Requests that real-server tests send, and what of the answers they compare (test-only).

Each ``case_*`` sends one request shape to a server at ``url`` and returns what must be equal
between sglang as shipped and patched: output token ids and logprobs (top-2 as well), and
the prompt length. Images are deterministic (:func:`tiny_models.make_image`).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import requests

from collective_counter import read_counts
from tiny_models import IMAGE_PLACEHOLDER, image_data_url, make_image

__all__ = [
    "FORGE_PREFIX",
    "MAX_NEW",
    "SEQUENTIAL_CASES",
    "CORRUPT_IMAGE",
    "image",
    "post",
    "gen_body",
    "generate",
    "case_one_image",
    "concurrent_same_image",
    "corrupt_image_answer",
    "collective_deltas",
    "in_request_handling",
    "stalling_image_url",
]

FORGE_PREFIX = "forge-"
MAX_NEW = 6


def image(seed: int, width: int = 1120, height: int = 700) -> str:
    return image_data_url(make_image(width, height, seed=seed))


def post(url: str, path: str, body: dict, timeout: float = 300) -> requests.Response:
    return requests.post(url + path, json=body, timeout=timeout)


def gen_body(n_images: int, seed: int, **extra: Any) -> dict:
    body = {
        "text": "Describe: " + IMAGE_PLACEHOLDER * n_images,
        "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW},
        "return_logprob": True,
        "top_logprobs_num": 2,
    }
    if n_images:
        images = [image(seed + i) for i in range(n_images)]
        body["image_data"] = images[0] if n_images == 1 else images
    body.update(extra)
    return body


def outputs(result: Any) -> Any:
    """Token ids and logprobs of a /generate answer (one result or a list of them)."""
    if isinstance(result, list):
        return [outputs(r) for r in result]
    meta = result["meta_info"]
    return {
        "ids": [t[1] for t in meta["output_token_logprobs"]],
        "logprobs": [t[0] for t in meta["output_token_logprobs"]],
        "top": meta["output_top_logprobs"],
        "prompt_tokens": meta["prompt_tokens"],
    }


def generate(url: str, body: dict) -> Any:
    r = post(url, "/generate", body)
    assert r.status_code == 200, r.text
    return outputs(r.json())


def case_one_image(url: str) -> Any:
    return generate(url, gen_body(1, seed=1))


def case_two_images(url: str) -> Any:
    return generate(url, gen_body(2, seed=2))


def case_chat_data_url(url: str) -> Any:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image(4, 448, 448)}},
            {"type": "text", "text": "What is in the picture?"},
        ]}],
        "temperature": 0,
        "max_tokens": MAX_NEW,
        "logprobs": True,
        "top_logprobs": 2,
    }
    r = post(url, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    return [(t["token"], t["logprob"], [(x["token"], x["logprob"]) for x in t["top_logprobs"]])
            for t in content]


def case_parallel_n3(url: str) -> Any:
    body = gen_body(1, seed=5)
    body["sampling_params"]["n"] = 3
    return generate(url, body)


def case_batch_two_prompts(url: str) -> Any:
    body = gen_body(0, seed=0)
    body["text"] = ["First: " + IMAGE_PLACEHOLDER, "Second: " + IMAGE_PLACEHOLDER]
    body["image_data"] = [[image(6, 448, 448)], [image(7, 640, 480)]]
    return generate(url, body)


def case_repeated_image_other_text(url: str) -> Any:
    """The image of ``case_one_image`` again, in another prompt (a processor cache hit
    when the same worker serves both)."""
    body = gen_body(1, seed=1)
    body["text"] = "Once more, in short: " + IMAGE_PLACEHOLDER + " what is it?"
    return generate(url, body)


def case_chat_four_turns_resending_images(url: str) -> Any:
    """A 4-turn chat through /v1/chat/completions that re-sends every earlier image, as
    chat clients do; each turn's answer goes into the next turn's history."""
    messages: list = []
    answers = []
    for turn in range(4):
        messages.append({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image(20 + turn, 448, 448)}},
            {"type": "text", "text": f"Turn {turn}: and this one?"},
        ]})
        body = {"model": "default", "messages": messages, "temperature": 0,
                "max_tokens": MAX_NEW, "logprobs": True, "top_logprobs": 2}
        r = post(url, "/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        answers.append([(t["token"], t["logprob"]) for t in choice["logprobs"]["content"]])
        messages.append({"role": "assistant", "content": choice["message"]["content"]})
    return answers


SEQUENTIAL_CASES: dict[str, Callable[[str], Any]] = {
    "one_1120x700_image": case_one_image,
    "two_images_one_prompt": case_two_images,
    "chat_completions_data_url": case_chat_data_url,
    "parallel_sampling_n3": case_parallel_n3,
    "batch_of_two_prompts": case_batch_two_prompts,
    "repeated_image_other_text": case_repeated_image_other_text,
    "chat_four_turns_resending_images": case_chat_four_turns_resending_images,
}


def concurrent_same_image(url: str) -> list:
    body = gen_body(1, seed=8)
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda _: generate(url, body), range(2)))


CORRUPT_IMAGE = "data:image/jpeg;base64,AAAA"


def corrupt_image_answer(url: str) -> tuple[int, str]:
    body = gen_body(0, seed=0)
    body["text"] = "Describe: " + IMAGE_PLACEHOLDER
    body["image_data"] = CORRUPT_IMAGE
    r = post(url, "/generate", body)
    return r.status_code, r.text


def collective_deltas(server: Any, log_dir: str, n: int = 3) -> dict[str, dict]:
    """Per scheduler rank: collectives made while serving ``n`` image, then ``n`` text requests."""

    def settled() -> dict:
        time.sleep(1.0)  # the counter files are rewritten every 0.2 s
        return read_counts(log_dir)

    before = settled()
    for i in range(n):
        generate(server.url, gen_body(1, seed=20 + i))
    mid = settled()
    for i in range(n):
        generate(server.url, gen_body(0, seed=0, text=f"Text only {i}: " + "word " * 250))
    after = settled()
    return {
        role: {"image": dict(mid[role] - before.get(role, {})), "text": dict(after[role] - mid[role])}
        for role in after if role.startswith("scheduler")
    }


def in_request_handling(counts: dict) -> int:
    """Collectives made under a request handler (keys: see ``collective_counter``)."""
    return sum(v for k, v in counts.items() if k.startswith("handle_"))


@contextlib.contextmanager
def stalling_image_url(trickle: bool = False):
    """``(url, hit)``: an image URL whose HTTP server accepts and never answers, so that
    the processor that fetches it is busy until it is killed (sglang's ``load_image``
    waits up to ``REQUEST_TIMEOUT`` seconds); ``hit`` is set on each connection.

    ``trickle``: answer with headers, then one byte of body every 0.5 s, so that no read
    waits long enough for ``REQUEST_TIMEOUT`` (a socket read timeout): the fetch never
    ends, whatever that variable was when a worker's forkserver started."""
    listener = socket.create_server(("127.0.0.1", 0))
    hit, conns, done = threading.Event(), [], threading.Event()

    def answer_slowly(conn: socket.socket) -> None:
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
                         b"Content-Length: 100000000\r\n\r\n")
            while not done.wait(0.5):
                conn.sendall(b"\xff")
        except OSError:
            return

    def accept() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conns.append(conn)
            if trickle:
                threading.Thread(target=answer_slowly, args=(conn,), daemon=True).start()
            hit.set()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/image.jpg", hit
    finally:
        done.set()
        listener.close()
        for conn in conns:
            conn.close()
        thread.join(5)
