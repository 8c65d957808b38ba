"""Where a fast (torchvision) image processor runs: ``SGLANG_MM_PREPROCESSING_DEVICE``.

Note [preprocessing device]
---------------------------
sglang 0.5.5's ``BaseMultimodalProcessor.process_mm_data`` passes ``device="cuda"`` to the
HF processor's ``__call__`` when the model's image processor is a fast one
(``BaseImageProcessorFast``) and ``--disable-fast-image-processor`` is not set
(``device="npu"`` on Ascend, none for Qwen2.5-VL and Qwen3-VL there). It does so whatever
the server's ``--device``: a CPU server with a fast processor fails every image request.
A slow processor gets no device and always runs on the CPU.

``SGLANG_MM_PREPROCESSING_DEVICE`` chooses that device, with the values of the upstream
proposal ``--mm-preprocessing-device {auto,cpu,cuda}`` (SGLang #37537):

======  ================================  ====================================================
value   device given to a fast processor  where the processor runs
======  ================================  ====================================================
auto    ``cpu`` on a ``--device cpu``     CPU server: the processor pool. Otherwise sglang's
        server, else sglang's own choice  own path (the processor on the event loop, on the
                                          GPU), as sglang 0.5.5 does.
cpu     ``cpu``                           the processor pool (each worker on its CPU)
cuda    ``cuda`` (sglang's own choice)    the processor pool, each worker with a CUDA context
                                          of its own. Not yet run on a GPU: see
                                          ``scripts/gpu_check.sh``.
======  ================================  ====================================================

The setting matters only for a fast image processor: with ``--disable-fast-image-processor``
sglang loads the slow one, passes no device, and the pool takes it on any server.

With ``cuda`` the pool *spawns* its workers instead of forking them from its forkserver: on
a GPU machine the forkserver, which imports sglang's processor modules, has initialized
CUDA (``import_processors`` imports ``models/deepseek_v2.py`` through the DeepSeek-VL2
processor, and that module calls ``torch.cuda.get_device_capability()`` at import), and a
process forked from it cannot use CUDA ("Cannot re-initialize CUDA in forked
subprocess"). A spawned worker imports sglang itself: seconds more per start, a
replacement's included (:func:`worker_start_method`).

The worker does not copy sglang's decision. sglang's own ``process_mm_data`` runs as
shipped, decides as above and calls ``processor.__call__(..., device=...)`` (an explicit
attribute call); :func:`run_fast_processor_on` sets ``__call__`` on that one HF processor
object so that, when sglang passed a device, the configured one replaces it. Everything
else (which processors are fast, the resizing, moving features to the CPU, the hash) is
sglang's and transformers' code. The same HF processor called in the tokenizer process
with ``device="cpu"`` gives bitwise the same tensors
(``tests/test_preprocessing_device.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from sglang_mmpre.config import PREPROCESSING_DEVICES

__all__ = [
    "PREPROCESSING_DEVICES",
    "sglang_fast_processor_device",
    "chosen_device",
    "gpu_processor_reason",
    "run_fast_processor_on",
    "worker_start_method",
]



def _hf_processor(mm_processor: Any) -> Any:
    return getattr(mm_processor, "_processor", None)


def sglang_fast_processor_device(mm_processor: Any, server_args: Any) -> Optional[str]:
    """The device sglang 0.5.5's ``process_mm_data`` passes to this model's HF processor
    (``"cuda"``, or ``"npu"`` on Ascend), or None when it passes none (a slow image
    processor, ``--disable-fast-image-processor``, Qwen2.5-VL/Qwen3-VL on Ascend)."""
    from transformers.image_processing_utils_fast import BaseImageProcessorFast

    processor = _hf_processor(mm_processor)
    if not (
        isinstance(getattr(processor, "image_processor", None), BaseImageProcessorFast)
        and not getattr(server_args, "disable_fast_image_processor", False)
    ):
        return None
    from sglang.srt.multimodal.processors import base_processor

    if not getattr(base_processor, "_is_npu", False):
        return "cuda"
    if type(processor).__name__ in {"Qwen2_5_VLProcessor", "Qwen3VLProcessor"}:
        return None
    return "npu"


def chosen_device(mm_processor: Any, server_args: Any, setting: str) -> Optional[str]:
    """The device a fast image processor gets under ``setting`` (a value of
    :data:`PREPROCESSING_DEVICES`; see Note [preprocessing device]), or None when sglang
    passes none (nothing to choose)."""
    if setting not in PREPROCESSING_DEVICES:
        raise ValueError(f"SGLANG_MM_PREPROCESSING_DEVICE={setting!r}: use one of "
                         f"{', '.join(PREPROCESSING_DEVICES)}")
    theirs = sglang_fast_processor_device(mm_processor, server_args)
    if theirs is None:
        return None
    if setting == "auto":
        return "cpu" if str(getattr(server_args, "device", "")) == "cpu" else theirs
    return setting


def gpu_processor_reason(mm_processor: Any, server_args: Any, setting: str) -> Optional[str]:
    """Why the processor pool steps aside for this model's image processor, or None.

    It steps aside only where the fast processor runs on an accelerator and that was not
    asked for explicitly (``auto`` on a GPU server, or an Ascend device): that is sglang's
    own path, kept until the pool's CUDA path has run on a GPU (``scripts/gpu_check.sh``).
    """
    device = chosen_device(mm_processor, server_args, setting)
    if device is None or device == "cpu" or (device == "cuda" and setting == "cuda"):
        return None
    return (f"its fast image processor runs on {device} (SGLANG_MM_PREPROCESSING_DEVICE=cpu "
            "or --disable-fast-image-processor: in the pool on the CPU)")


class _DeviceOverride:
    """The HF processor's bound ``__call__`` with the ``device`` that sglang passes
    replaced by ``device``; calls without a device pass through unchanged."""

    def __init__(self, call: Callable[..., Any], device: str) -> None:
        self.call = call
        self.device = device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = self.device
        return self.call(*args, **kwargs)


def run_fast_processor_on(mm_processor: Any, server_args: Any, setting: str) -> Optional[str]:
    """Make sglang's ``process_mm_data`` run this model's fast image processor on the
    device ``setting`` chooses (Note [preprocessing device]); return that device (None: a
    slow processor, nothing to do). Idempotent. Used in the processor pool's workers, and on
    the tokenizer process's own processor when the pool is on (for jobs it can't take)."""
    device = chosen_device(mm_processor, server_args, setting)
    processor = _hf_processor(mm_processor)
    if device is None or device == sglang_fast_processor_device(mm_processor, server_args):
        return device
    current = processor.__dict__.get("__call__")
    if isinstance(current, _DeviceOverride):
        current.device = device
    else:
        # sglang calls ``processor.__call__(...)`` explicitly: the instance attribute wins.
        processor.__call__ = _DeviceOverride(type(processor).__call__.__get__(processor), device)
    return device


def worker_start_method(setting: str) -> str:
    """The ``multiprocessing`` start method of the pool's workers: ``spawn`` where they may
    use CUDA (``setting == "cuda"``), else ``forkserver``; see Note [preprocessing device]."""
    return "spawn" if setting == "cuda" else "forkserver"
