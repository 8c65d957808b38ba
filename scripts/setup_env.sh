#!/usr/bin/env bash
# Creates (or reuses) .venv with the torch stack sglang 0.5.5 pins, sglang 0.5.5 itself
# (--no-deps), the modules its code imports on a CPU machine, the test tools and this
# project (editable). Every install runs under requirements/constraints.txt, so no
# dependency can pull a different torch. Re-running is cheap: a stamp of the requirement
# files skips the installs when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${SGLANG_MMPRE_VENV:-.venv}"
stamp="$VENV/.sglang_mmpre_stamp"
want=$(cat requirements/*.txt pyproject.toml | sha256sum | cut -d' ' -f1)

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
"${pip[@]}" -c requirements/constraints.txt -r requirements/torch.txt
"${pip[@]}" --no-deps "sglang==0.5.5"
"${pip[@]}" -c requirements/constraints.txt -r requirements/sglang-runtime.txt -r requirements/test.txt
"${pip[@]}" --no-deps -e .
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for name, want in (("torch", "2.8.0"), ("torchvision", "0.23.0"), ("sglang", "0.5.5"), ("transformers", "4.57.1")):
    got = md.version(name).split("+")[0]
    if got != want:
        raise SystemExit(f"{name} {got} installed, {want} required: a dependency escaped requirements/constraints.txt")
PY
echo "$want" > "$stamp"
