#!/usr/bin/env bash
# The GPU check: what the CPU test suite cannot show, on one CUDA GPU (a few minutes).
#
#   bash scripts/gpu_check.sh [LOG_DIR]
#
# 1. In process (tests/test_cuda_features.py, tests/test_preprocessing_device.py): the hash
#    of a CUDA feature is sglang's gpu_tensor_hash; CUDA features travel inline; with
#    SGLANG_MM_PREPROCESSING_DEVICE=cuda the fast image processor runs on cuda in a pool
#    worker and gives bitwise what the same HF processor gives in process on cuda.
# 2. Real servers (tests/test_gpu_server.py), a tiny Qwen2-VL built in code, TP=1 (and TP=2
#    with two GPUs or more): as-shipped sglang with its default fast image processor on cuda,
#    then the patched server with the processor pool on cuda (2 workers); then both with
#    SGLANG_USE_CUDA_IPC_TRANSPORT=1. Token ids and logprobs equal, bitwise; after a warm-up,
#    200 image requests grow the GPUs' used memory by at most 256 MiB; no file of ours left.
#    Each process's GPU memory (the workers' CUDA contexts) goes to LOG_DIR/gpu_report.json.
# 3. After the servers stopped, no process holds memory on the GPU.
#
# Needs a Python with sglang 0.5.5's GPU stack: torch 2.8.0 (its CUDA 12.8 build, which
# requirements/torch.txt installs), sglang 0.5.5 with its GPU kernels (sgl-kernel,
# flashinfer), transformers 4.57.1, and this project (scripts/setup_env.sh, then
# `.venv/bin/python -m pip install sgl-kernel==<the version sglang 0.5.5 requires>
# flashinfer-python==<likewise>` on a machine with network access). PYTHON names it
# (default: .venv/bin/python). Exit code: 0 when every part ran and passed; 2 when the
# machine lacks what the check needs (nothing ran); else pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
LOG_DIR="${1:-gpu-check-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1

if ! command -v nvidia-smi >/dev/null; then
  echo "gpu_check: nvidia-smi not found: this check needs an NVIDIA GPU and its driver" >&2
  exit 2
fi
if ! "$PYTHON" - <<'PY' 2>&1 | tee "$LOG_DIR/preflight.txt"; then
import importlib.metadata as md
import sys

import torch

problems = []
if not torch.cuda.is_available():
    problems.append("torch sees no CUDA GPU")
for name, want in (("torch", "2.8.0"), ("sglang", "0.5.5"), ("transformers", "4.57.1")):
    try:
        got = md.version(name).split("+")[0]
    except md.PackageNotFoundError:
        got = None
    if got != want:
        problems.append(f"{name} {got or 'missing'}, {want} required")
try:
    import sgl_kernel  # noqa: F401 - the real GPU kernels, not the tests' stand-in
except Exception as e:  # noqa: BLE001 - any import failure means no GPU server
    problems.append(f"sgl_kernel does not import ({type(e).__name__}: {e})")
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        print(f"GPU {i}: {torch.cuda.get_device_name(i)}")
if problems:
    print("gpu_check: cannot run here:\n  - " + "\n  - ".join(problems))
    sys.exit(2)
PY
  exit 2
fi

nvidia-smi > "$LOG_DIR/nvidia-smi-before.txt"
pytest=("$PYTHON" -m pytest -q -p no:cacheprovider --benchmark-disable -rs)
status=0

echo "== 1. in process: CUDA features, the fast processor on cuda in a pool worker"
"${pytest[@]}" tests/test_cuda_features.py tests/test_preprocessing_device.py 2>&1 \
  | tee "$LOG_DIR/in_process.txt" || status=$?

echo "== 2. real servers on the GPU: as shipped against patched"
SGLANG_MMPRE_GPU_REPORT="$LOG_DIR/gpu_report.json" \
  "${pytest[@]}" tests/test_gpu_server.py --basetemp="$LOG_DIR/servers" 2>&1 \
  | tee "$LOG_DIR/servers.txt" || status=$?

echo "== 3. after the servers stopped: nothing left on the GPU"
nvidia-smi > "$LOG_DIR/nvidia-smi-after.txt"
left=$(nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader)
if [ -n "$left" ]; then
  echo "gpu_check: processes still hold GPU memory:"
  echo "$left"
  status=1
fi
[ -f "$LOG_DIR/gpu_report.json" ] && cat "$LOG_DIR/gpu_report.json"
echo "gpu_check: exit $status; logs in $LOG_DIR"
exit "$status"
