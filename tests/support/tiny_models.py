"""Tiny on-disk models and deterministic inputs for CPU-only tests (never shipped).

This module lets a test build sglang 0.5.5's *real* ``TokenizerManager`` for a tiny
Qwen2-VL model on a CPU-only machine with no Hugging Face hub access, and produce the
multimodal inputs (images, video frames, audio) that requests carry.

Typical use::

    import gpu_module_standin; gpu_module_standin.install()   # before importing sglang
    from tiny_models import make_tiny_qwen2vl, make_tokenizer_manager, tokenize_one, ...

    model_dir = make_tiny_qwen2vl(tmp_path / "qwen2vl")
    tm = make_tokenizer_manager(model_dir)
    try:
        jpeg = image_to_jpeg_bytes(make_image(1120, 700))
        tokenized = asyncio.run(tokenize_one(tm, image_data=[jpeg]))
    finally:
        close_tokenizer_manager(tm)

CPU notes (verified against sglang 0.5.5, transformers 4.57, torch 2.8 CPU build):

* ``gpu_module_standin.install()`` must run before anything imports sglang; this module
  calls it itself before its lazy sglang imports, so importing this module first is enough.
* ``ServerArgs(model_path=..., device="cpu", disable_fast_image_processor=True)`` needs no
  environment variables on CPU. ``__post_init__`` only logs that the CPU lacks Intel AMX
  (falls back to the torch_native attention backend) and sets a few ``SGLANG_*`` variables
  in ``os.environ``; ``TokenizerManager`` sets ``TOKENIZERS_PARALLELISM=false``.
* ``disable_fast_image_processor=True`` is required: with the fast image processor sglang
  passes ``device="cuda"`` to the HF processor. It also makes ``AutoProcessor`` load the
  *slow* ``Qwen2Tokenizer`` (from ``vocab.json``/``merges.txt``), which is why the model
  directory carries both slow and fast tokenizer files.
* The ``TokenizerManager`` can be built outside any event loop (its asyncio primitives bind
  lazily and ``_tokenize_one_request`` never calls ``auto_create_handle_loop``), so one
  instance may be used from several successive ``asyncio.run`` calls. Building it inside a
  running loop works too.
* Video cannot go through the ``TokenizerManager`` on CPU: sglang's Qwen-VL path decodes
  video with ``decord`` (stubbed here) and calls ``Tensor.pin_memory()``, which needs a CUDA
  driver. :func:`qwen2vl_video_features` runs the HF Qwen2-VL video processor directly
  instead.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import pickle
import sys
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

__all__ = [
    "IMAGE_PLACEHOLDER",
    "VIDEO_PLACEHOLDER",
    "SPECIAL_TOKEN_IDS",
    "IMAGE_TOKEN_ID",
    "VIDEO_TOKEN_ID",
    "VISION_START_TOKEN_ID",
    "VISION_END_TOKEN_ID",
    "make_tiny_qwen2vl",
    "make_tokenizer_manager",
    "close_tokenizer_manager",
    "make_image",
    "image_to_jpeg_bytes",
    "image_data_url",
    "make_video_frames",
    "make_audio",
    "tokenize_one",
    "qwen2vl_expected_grid_thw",
    "qwen2vl_video_features",
    "whisper_audio_features",
]

# --------------------------------------------------------------------------------------
# Tiny Qwen2-VL vocabulary: 256 byte tokens (ids 0..255) followed by the special tokens.
# --------------------------------------------------------------------------------------

_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Token string -> id in the tiny vocabulary (byte tokens occupy 0..255).
SPECIAL_TOKEN_IDS: dict[str, int] = {tok: 256 + i for i, tok in enumerate(_SPECIAL_TOKENS)}

VISION_START_TOKEN_ID: int = SPECIAL_TOKEN_IDS["<|vision_start|>"]
VISION_END_TOKEN_ID: int = SPECIAL_TOKEN_IDS["<|vision_end|>"]
IMAGE_TOKEN_ID: int = SPECIAL_TOKEN_IDS["<|image_pad|>"]
VIDEO_TOKEN_ID: int = SPECIAL_TOKEN_IDS["<|video_pad|>"]

#: The per-image placeholder sglang's ``QwenVLImageProcessor`` looks for in prompt text
#: (``mm_tokens.image_token`` in ``sglang/srt/multimodal/processors/qwen_vl.py``).
IMAGE_PLACEHOLDER: str = "<|vision_start|><|image_pad|><|vision_end|>"
#: The Qwen2-VL per-video placeholder (HF processor side).
VIDEO_PLACEHOLDER: str = "<|vision_start|><|video_pad|><|vision_end|>"

# Qwen2-VL's published chat template (tokenizer side), so chat-style callers work too.
_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Flat (legacy-style) Qwen2-VL config; transformers' Qwen2VLConfig accepts it and sglang
# reads the vision token ids, ``rope_scaling`` (mrope) and ``vision_config`` from it.
_VISION_CONFIG: dict[str, Any] = {
    "depth": 1,
    "embed_dim": 32,
    "hidden_size": 64,
    "hidden_act": "quick_gelu",
    "mlp_ratio": 2,
    "num_heads": 2,
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}

#: The text model's dimensions, shared by the tiny Qwen2-VL and the tiny LLaVA.
_TINY_TEXT_DIMS: dict[str, int] = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}

_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    **_TINY_TEXT_DIMS,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": True,
    "use_cache": True,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 1,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "bos_token_id": SPECIAL_TOKEN_IDS["<|endoftext|>"],
    "eos_token_id": SPECIAL_TOKEN_IDS["<|im_end|>"],
    "pad_token_id": SPECIAL_TOKEN_IDS["<|endoftext|>"],
    "vision_start_token_id": VISION_START_TOKEN_ID,
    "vision_end_token_id": VISION_END_TOKEN_ID,
    "vision_token_id": IMAGE_TOKEN_ID,
    "image_token_id": IMAGE_TOKEN_ID,
    "video_token_id": VIDEO_TOKEN_ID,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "vision_config": _VISION_CONFIG,
}


def _install_standin() -> None:
    """Install the GPU-module stand-in (idempotent) before any lazy sglang import."""
    support_dir = str(Path(__file__).resolve().parent)
    if support_dir not in sys.path:
        sys.path.insert(0, support_dir)
    import gpu_module_standin

    gpu_module_standin.install()


# --------------------------------------------------------------------------------------
# Model directory
# --------------------------------------------------------------------------------------


def _new_config_text(dest: Path, config: dict) -> Optional[str]:
    """The ``config.json`` text to write last into ``dest`` (created), or None when ``dest``
    already holds exactly that config (a complete directory: nothing to rewrite)."""
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    path = dest / "config.json"
    if path.is_file() and path.read_text() == text:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    return text


def make_tiny_qwen2vl(dest: Path) -> Path:
    """Write a tiny, weightless Qwen2-VL model directory at ``dest`` and return it.

    The directory holds a flat ``config.json`` (vision token ids, mrope ``rope_scaling``,
    tiny ``vision_config``), a byte-level BPE tokenizer (256 byte tokens, no merges, plus
    the Qwen special tokens with the ids in :data:`SPECIAL_TOKEN_IDS`) saved in both slow
    (``vocab.json``/``merges.txt``) and fast (``tokenizer.json``) form, and a
    ``Qwen2VLProcessor`` with default ``Qwen2VLImageProcessor``/``Qwen2VLVideoProcessor``
    settings and Qwen2-VL's chat template. There are no weights: it is only good for the
    tokenizer/processor side of sglang.

    Idempotent: if ``dest/config.json`` already matches, nothing is rewritten.
    ``config.json`` is written last so its presence marks a complete directory.
    Takes milliseconds once ``transformers`` is imported.
    """
    dest = Path(dest)
    config_text = _new_config_text(dest, _CONFIG)
    if config_text is None:
        return dest

    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    byte_to_char = bytes_to_unicode()
    tokenizer = save_qwen2vl_tokenizer_and_processor(
        dest, {byte_to_char[b]: b for b in range(256)}, []
    )
    got = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in _SPECIAL_TOKENS}
    if got != SPECIAL_TOKEN_IDS:  # pragma: no cover - guards a transformers change
        raise RuntimeError(f"tiny tokenizer special ids {got} != {SPECIAL_TOKEN_IDS}")
    (dest / "config.json").write_text(config_text)
    return dest


def _byte_bpe_tokenizer(dest: Path, vocab: dict[str, int], merges: list[str],
                        specials: list[str]) -> Any:
    """A fast byte-level BPE tokenizer from ``vocab`` and ``merges`` (also written to
    ``dest`` as ``vocab.json``/``merges.txt``), then ``specials``; ``<|endoftext|>`` ends
    and pads."""
    from transformers import Qwen2TokenizerFast

    vocab_path, merges_path = dest / "vocab.json", dest / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    tokenizer = Qwen2TokenizerFast(
        vocab_file=str(vocab_path),
        merges_file=str(merges_path),
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer


def save_qwen2vl_tokenizer_and_processor(
    dest: Path, vocab: dict[str, int], merges: list[str], patch_size: int = 14
) -> Any:
    """Write a byte-level BPE tokenizer (``vocab``, ``merges``, then Qwen's special tokens)
    and a ``Qwen2VLProcessor`` (defaults but ``patch_size``, which must match the vision
    tower's) with the chat template at ``dest``; return the tokenizer. Both slow
    (``vocab.json``/``merges.txt``) and fast forms are written."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = _byte_bpe_tokenizer(dest, vocab, merges, list(_SPECIAL_TOKENS[1:]))
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=patch_size),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(patch_size=patch_size),
        chat_template=_CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(dest))
    return tokenizer


# --------------------------------------------------------------------------------------
# TokenizerManager
# --------------------------------------------------------------------------------------

# TokenizerManager -> PortArgs, so close_tokenizer_manager can remove the ipc files.
_PORT_ARGS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def make_tokenizer_manager(model_dir: Path, **server_arg_overrides: Any) -> TokenizerManager:
    """Build sglang's real ``TokenizerManager`` for ``model_dir`` on CPU.

    Defaults passed to ``ServerArgs``: ``model_path``/``tokenizer_path`` = ``model_dir``,
    ``device="cpu"``, ``disable_fast_image_processor=True``, ``skip_server_warmup=True``,
    ``trust_remote_code=False``; any keyword overrides them. Ports come from
    ``PortArgs.init_new`` (fresh ``ipc:///tmp/...`` names), and the manager binds its ZMQ
    PULL (from detokenizer) and PUSH (to scheduler) sockets on them; nothing listens on
    the other end, which is fine for tokenization.

    May be called with or without a running event loop; the returned manager can be used
    across successive ``asyncio.run`` calls (see the module docstring). Release it with
    :func:`close_tokenizer_manager`.
    """
    _install_standin()
    from sglang.srt.managers.tokenizer_manager import TokenizerManager
    from sglang.srt.server_args import PortArgs, ServerArgs

    kwargs: dict[str, Any] = {
        "model_path": str(model_dir),
        "tokenizer_path": str(model_dir),
        "device": "cpu",
        "disable_fast_image_processor": True,
        "skip_server_warmup": True,
        "trust_remote_code": False,
    }
    kwargs.update(server_arg_overrides)
    server_args = ServerArgs(**kwargs)
    port_args = PortArgs.init_new(server_args)
    try:
        tm = TokenizerManager(server_args, port_args)
    except BaseException:
        _unlink_ipc_files(port_args)
        raise
    _PORT_ARGS[tm] = port_args
    return tm


def _unlink_ipc_files(port_args: Any) -> None:
    """Remove the ``ipc://`` files ``PortArgs.init_new`` left in the temp dir."""
    for value in vars(port_args).values():
        if isinstance(value, str) and value.startswith("ipc://"):
            try:
                os.unlink(value[len("ipc://") :])
            except OSError:
                pass


def close_tokenizer_manager(tm: TokenizerManager) -> None:
    """Best-effort release of what :func:`make_tokenizer_manager` created.

    Closes the manager's ZMQ sockets (linger 0) and terminates their context, shuts down
    the multimodal processor's thread/process pools, and removes the ipc socket files.
    Safe to call twice. ``TokenizerManager`` itself has no close method. Also shuts down
    its ``TokenizerSide`` (worker threads; unlinks its shared-memory region).
    """
    mmpre = getattr(tm, "mmpre", None)
    if mmpre is not None:
        mmpre.shutdown()
    contexts = []
    for name in ("recv_from_detokenizer", "send_to_scheduler"):
        sock = getattr(tm, name, None)
        sock = getattr(sock, "sender", sock)  # multi-tokenizer SenderWrapper
        if sock is None or not hasattr(sock, "close"):
            continue
        ctx = getattr(sock, "context", None)
        if ctx is not None and ctx not in contexts:
            contexts.append(ctx)
        try:
            sock.close(linger=0)
        except Exception:
            pass
    for ctx in contexts:
        try:
            ctx.term()
        except Exception:
            pass

    mm_data_processor = getattr(tm, "mm_data_processor", None)
    if mm_data_processor is not None:
        mm_data_processor.shutdown()
    mm_processor = getattr(tm, "mm_processor", None)
    for pool_name in ("io_executor", "cpu_executor"):
        pool = getattr(mm_processor, pool_name, None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    port_args = _PORT_ARGS.pop(tm, None)
    if port_args is not None:
        _unlink_ipc_files(port_args)


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image: smooth gradients and blobs plus mild noise.

    Varied enough to look like a photo to the processors, yet compressible (a 1120x700
    JPEG at quality 90 is ~190 KB, against ~1 MB for uniform noise).
    """
    rng = np.random.default_rng(seed)
    yy = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    xx = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    phase = rng.uniform(0, 2 * np.pi, size=3).astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(2 * np.pi * (xx * (1 + c) + yy * (2 - c)) + phase[c])
            for c in range(3)
        ],
        axis=-1,
    )
    coarse = rng.uniform(-60, 60, size=(max(2, height // 32), max(2, width // 32), 3))
    coarse_img = Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8))
    blobs = np.asarray(coarse_img.resize((width, height), Image.BILINEAR), np.float32) - 128
    noise = rng.normal(0, 6, size=(height, width, 3)).astype(np.float32)
    pixels = np.clip(base + blobs + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def image_to_jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    """Encode ``img`` as JPEG bytes (sglang's ``load_image`` accepts raw bytes)."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def image_data_url(img: Image.Image, quality: int = 90) -> str:
    """``data:image/jpeg;base64,...`` for ``img``.

    sglang 0.5.5's ``load_image`` accepts a ``PIL.Image``, raw ``bytes``, an http(s) URL,
    a file path ending in png/jpg/jpeg/webp/gif, a ``data:`` URL, or a bare base64 string.
    Bytes are the simplest; this is for tests that want the HTTP-API-style form.
    """
    payload = base64.b64encode(image_to_jpeg_bytes(img, quality)).decode("ascii")
    return f"data:image/jpeg;base64,{payload}"


def make_video_frames(
    n_frames: int = 16, width: int = 448, height: int = 448, seed: int = 0
) -> np.ndarray:
    """``n_frames`` deterministic RGB frames as a ``(T, H, W, 3)`` uint8 array.

    The content pans across a larger :func:`make_image` canvas, so consecutive frames
    differ but are correlated like real video.
    """
    shift = 4
    canvas = np.asarray(make_image(width + shift * n_frames, height, seed=seed))
    frames = [canvas[:, t * shift : t * shift + width] for t in range(n_frames)]
    return np.ascontiguousarray(np.stack(frames))


def make_audio(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """Deterministic mono float32 audio in ``[-1, 1]``: a few tones plus light noise."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n, dtype=np.float32) / sr
    freqs = rng.uniform(110.0, 1760.0, size=3)
    wave = sum(np.sin(2 * np.pi * f * t) for f in freqs) / 3.0
    wave = 0.5 * wave + 0.02 * rng.standard_normal(n)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------
# Requests and features
# --------------------------------------------------------------------------------------


async def tokenize_one(
    tm: TokenizerManager, text: str | None = None, **req_kwargs: Any
) -> TokenizedGenerateReqInput:
    """Build a ``GenerateReqInput`` and run ``tm._tokenize_one_request`` on it.

    ``req_kwargs`` go to ``GenerateReqInput`` (``image_data``, ``sampling_params``,
    ``rid``, ...). If ``text`` is None it becomes ``"Describe: "`` followed by one
    :data:`IMAGE_PLACEHOLDER` per item of ``image_data`` (a single non-list item counts
    as one). The request is normalized with ``normalize_batch_and_arguments()`` first,
    as ``TokenizerManager.generate_request`` does (it fills ``sampling_params``/``rid``).
    Must be awaited inside an event loop.
    """
    _install_standin()
    from sglang.srt.managers.io_struct import GenerateReqInput

    if text is None and req_kwargs.get("input_ids") is None:
        image_data = req_kwargs.get("image_data")
        if image_data is None:
            n_images = 0
        elif isinstance(image_data, list):
            n_images = len(image_data)
        else:
            n_images = 1
        text = "Describe: " + IMAGE_PLACEHOLDER * n_images
    obj = GenerateReqInput(text=text, **req_kwargs)
    obj.normalize_batch_and_arguments()
    return await tm._tokenize_one_request(obj)


class RecordingSocket:
    """Stands in for the TokenizerManager's socket to the scheduler: keeps each pickled send."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send_pyobj(self, obj: Any) -> None:
        self.sent.append(pickle.dumps(obj))


def tokenize_and_send(tm: TokenizerManager, text: str | None = None,
                      **req_kwargs: Any) -> tuple[TokenizedGenerateReqInput, bytes]:
    """:func:`tokenize_one` inside ``tm``'s request scope, then ``tm.mmpre.send``, as
    ``generate_request`` does; returns the request and the bytes the scheduler receives.
    The scope has closed when it returns (only the ranks' references are left)."""
    socket = RecordingSocket()

    async def run() -> TokenizedGenerateReqInput:
        with tm.mmpre.request_scope():
            req = await tokenize_one(tm, text, **req_kwargs)
            tm.mmpre.send(socket, req)
            return req

    req = asyncio.run(run())
    return req, socket.sent[0]


def qwen2vl_expected_grid_thw(width: int, height: int) -> tuple[int, int, int]:
    """The ``image_grid_thw`` Qwen2-VL produces for a ``width`` x ``height`` image.

    Uses the HF processor's defaults (patch 14, merge 2, 56*56..28*28*1280 pixels) that the
    tiny model ships with; ``prod(grid)`` is the number of rows of ``pixel_values`` and
    ``prod(grid) // 4`` the number of ``<|image_pad|>`` tokens.
    """
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    h, w = smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    return (1, h // 14, w // 14)


def qwen2vl_video_features(
    processor: Any | None, frames: np.ndarray | Sequence[Image.Image]
) -> dict[str, torch.Tensor]:
    """Run the HF Qwen2-VL *video* processor directly on ``frames``.

    Video is not fed through the ``TokenizerManager``: on CPU sglang's Qwen-VL video path
    needs ``decord`` and ``Tensor.pin_memory()`` (CUDA). ``processor`` may be a
    ``Qwen2VLProcessor`` (e.g. ``tm.processor``), a ``Qwen2VLVideoProcessor``, or None for
    a default ``Qwen2VLVideoProcessor``. Returns ``{"pixel_values_videos": (N, 1176) float32,
    "video_grid_thw": (1, 3) int64}`` for one video.
    """
    if processor is None:
        from transformers import Qwen2VLVideoProcessor

        processor = Qwen2VLVideoProcessor()
    video_processor = getattr(processor, "video_processor", processor)
    out = video_processor(videos=[frames], return_tensors="pt")
    return {
        "pixel_values_videos": out["pixel_values_videos"],
        "video_grid_thw": out["video_grid_thw"],
    }


def whisper_audio_features(audio: np.ndarray, sr: int = 16000) -> dict[str, torch.Tensor]:
    """Log-mel features from a default ``WhisperFeatureExtractor`` (built from its class).

    Returns ``{"input_features": (1, 80, 3000) float32, "attention_mask": (1, 3000)}``:
    Whisper pads/truncates to 30 s, so the shape is fixed for any clip length.
    """
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor()
    out = extractor(
        np.asarray(audio, dtype=np.float32),
        sampling_rate=sr,
        return_tensors="pt",
        return_attention_mask=True,
    )
    return {"input_features": out["input_features"], "attention_mask": out["attention_mask"]}


# --------------------------------------------------------------------------------------
# Tiny LLaVA (sglang's LlavaImageProcessor path)
# --------------------------------------------------------------------------------------

#: The LLaVA image token of the tiny LLaVA vocabulary (byte tokens occupy 0..255).
LLAVA_IMAGE_TOKEN: str = "<image>"
LLAVA_SPECIAL_TOKEN_IDS: dict[str, int] = {"<|endoftext|>": 256, LLAVA_IMAGE_TOKEN: 257}

# Flat LLaVA-1.5-style config: sglang reads a ``Llava*ForCausalLM`` config's text fields
# from its top level (``get_hf_text_config``) and ``image_aspect_ratio`` for its processor.
_LLAVA_CONFIG: dict[str, Any] = {
    "architectures": ["LlavaLlamaForCausalLM"],
    "model_type": "llava",
    **_TINY_TEXT_DIMS,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "torch_dtype": "float16",
    "bos_token_id": LLAVA_SPECIAL_TOKEN_IDS["<|endoftext|>"],
    "eos_token_id": LLAVA_SPECIAL_TOKEN_IDS["<|endoftext|>"],
    "pad_token_id": LLAVA_SPECIAL_TOKEN_IDS["<|endoftext|>"],
    "image_token_index": LLAVA_SPECIAL_TOKEN_IDS[LLAVA_IMAGE_TOKEN],
    "image_aspect_ratio": "pad",
    "mm_vision_tower": "tiny-clip",
    "mm_hidden_size": 32,
    "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 224,
        "patch_size": 14,
    },
    "text_config": {
        "model_type": "llama",
        **_TINY_TEXT_DIMS,
    },
}


def make_tiny_llava(dest: Path) -> Path:
    """Write a tiny, weightless LLaVA-1.5-style model directory at ``dest`` and return it.

    ``config.json`` names ``LlavaLlamaForCausalLM`` (so sglang 0.5.5 picks its
    ``LlavaImageProcessor``, with ``image_aspect_ratio="pad"``) and carries the text
    fields at its top level as LLaVA-1.5 checkpoints do; the processor is a
    ``LlavaProcessor`` with a default ``CLIPImageProcessor`` (224x224 crops) and a
    byte-level BPE tokenizer (256 byte tokens, then :data:`LLAVA_SPECIAL_TOKEN_IDS`).
    No weights: it is only good for the tokenizer/processor side of sglang.

    Idempotent like :func:`make_tiny_qwen2vl`; ``config.json`` is written last.
    """
    from transformers import CLIPImageProcessor, LlavaProcessor
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    dest = Path(dest)
    config_text = _new_config_text(dest, _LLAVA_CONFIG)
    if config_text is None:
        return dest
    byte_to_char = bytes_to_unicode()
    tokenizer = _byte_bpe_tokenizer(dest, {byte_to_char[b]: b for b in range(256)}, [],
                                    [LLAVA_IMAGE_TOKEN])
    got = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in LLAVA_SPECIAL_TOKEN_IDS}
    if got != LLAVA_SPECIAL_TOKEN_IDS:  # pragma: no cover - guards a transformers change
        raise RuntimeError(f"tiny LLaVA tokenizer special ids {got} != {LLAVA_SPECIAL_TOKEN_IDS}")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token=LLAVA_IMAGE_TOKEN,
    )
    processor.save_pretrained(str(dest))
    (dest / "config.json").write_text(config_text)
    return dest


__all__ += ["LLAVA_IMAGE_TOKEN", "LLAVA_SPECIAL_TOKEN_IDS", "make_tiny_llava"]
