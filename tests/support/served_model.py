"""A tiny Qwen2-VL with random weights that a real sglang 0.5.5 server can load and run on CPU.

``tiny_models.make_tiny_qwen2vl`` writes a weightless model for the tokenizer side only;
this one is a whole checkpoint (about 14 MB), built in code because the hub is out of reach:

- the text model: hidden 64, 2 layers, 4 heads and 2 KV heads, mrope sections [2, 3, 3];
- the vision tower: depth 1, embed dim 32, ``in_chans`` set (sglang's ``qwen2_vl.py`` reads
  it); random bf16 weights (seeded, so every build is the same), ``safetensors``;
- a byte-level BPE vocabulary with *every* byte pair merged (256 + 65,536 tokens, then
  Qwen's special tokens). ``bench_serving`` draws random prompt tokens from the whole
  vocabulary; with a vocabulary of a few hundred tokens those prompts contain special
  tokens, and the server then reports an error inside a 200 stream.

A random model writes the same tokens for any image, so tests compare logprobs, which do
depend on the image (two 448x448 images differ by about 0.01).

``patch_size`` (default 14, as Qwen2-VL) sets the vision tower's patch and the image
processor's together. The benchmark's GPU-proxy shape takes 56: a 1120x700 image then
gives 240 patches of 18,816 values (18.1 MB of float32 features, against 4,000 patches of
1,176 values, 18.8 MB, at 14) and 60 tokens for the language model instead of 1,000. The
tokenizer side and the transport move about the same bytes; the vision tower's attention
and the language model's prefill, which on CPU dominate a rank's work, shrink, as they
would on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny_models import (
    _CONFIG,
    _SPECIAL_TOKENS,
    _VISION_CONFIG,
    save_qwen2vl_tokenizer_and_processor,
)

__all__ = ["make_served_qwen2vl", "BUILD_VERSION"]

#: Bumped whenever the checkpoint changes; a directory with another stamp is rebuilt.
BUILD_VERSION = "served-qwen2vl-1"
_SEED = 1234


def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    chars = [bytes_to_unicode()[b] for b in range(256)]
    vocab = {c: i for i, c in enumerate(chars)}
    merges = []
    for a in chars:
        for b in chars:
            vocab[a + b] = len(vocab)
            merges.append(f"{a} {b}")
    return vocab, merges


def make_served_qwen2vl(dest: Path, patch_size: int = 14) -> Path:
    """Write the checkpoint, tokenizer and processor at ``dest`` (idempotent) and return it.

    A file ``BUILD`` holding :data:`BUILD_VERSION` is written last and marks a complete
    directory; a complete directory is returned as it is. Takes about 10 s on 2 cores.
    """
    dest = Path(dest)
    stamp = dest / "BUILD"
    build = BUILD_VERSION if patch_size == 14 else f"{BUILD_VERSION}-patch{patch_size}"
    if stamp.is_file() and stamp.read_text() == build:
        return dest
    dest.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer = save_qwen2vl_tokenizer_and_processor(dest, *_vocab_and_merges(),
                                                     patch_size=patch_size)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in _SPECIAL_TOKENS}

    config = dict(_CONFIG)
    config.update(
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        max_window_layers=2,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|image_pad|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_config=dict(_VISION_CONFIG, in_chans=_VISION_CONFIG["in_channels"],
                           patch_size=patch_size),
    )
    torch.manual_seed(_SEED)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**config)).to(torch.bfloat16)
    model.save_pretrained(str(dest), safe_serialization=True)
    # save_pretrained writes transformers' nested config; sglang reads the flat one.
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    stamp.write_text(build)
    return dest
