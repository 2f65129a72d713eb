#!/usr/bin/env bash
# Create the project environment in $VENV (default .venv) and install the package into it.
#  - torch: an already importable torch (e.g. a CUDA machine's system torch) is reused through
#    --system-site-packages; otherwise torch==2.13.0 is installed from pip's index, with the
#    extra pip arguments in $TORCH_PIP_ARGS (on Linux, PyPI's torch is the CUDA build, several
#    GB: TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" takes the CPU wheel).
#  - triton, pytest, pytest-benchmark, numpy, safetensors, ninja, then
#    `pip install --no-build-isolation --no-deps -e .` (so the dependencies come from this list)
#    (builds vidgen_kernels._C: C++ CPU kernels, plus CUDA kernels when torch has CUDA and nvcc).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
py_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; }
if [ -x "$VENV/bin/python" ] && ! py_ok "$VENV/bin/python"; then
  echo "bootstrap: $VENV has $("$VENV/bin/python" -V 2>&1); vidgen-kernels needs Python >= 3.10:" \
       "remove it (make clean) and rerun with PYTHON=<a python3.10+>" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  if ! py_ok "$PY"; then
    echo "bootstrap: vidgen-kernels needs Python >= 3.10; $PY is $("$PY" -V 2>&1 || echo missing)" \
         "(choose one with PYTHON=..., e.g. make demo PYTHON=python3.11)" >&2
    exit 1
  fi
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "bootstrap: reusing the installed torch ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
P="$VENV/bin/python"
pipi() { "$P" -m pip install --disable-pip-version-check -q "$@"; }
if ! "$P" -c "import torch" 2>/dev/null; then
  # Pinned: an unpinned torch would pull the newest CUDA build and its GBs of dependencies.
  # Where the machine has the 2.13.0 CPU wheel locally (this team's machines and CI), pip takes it.
  # shellcheck disable=SC2086  (TORCH_PIP_ARGS: several words)
  pipi ${TORCH_PIP_ARGS:-} "torch==2.13.0"
fi
TORCH_VER=$("$P" -c "import torch; print(torch.__version__.split('+')[0])")
# pin torch so that nothing below upgrades it
echo "torch==$TORCH_VER" > "$VENV/torch-constraint.txt"
# diffusers: optional for users (tests/test_integrations_diffusers.py and its benchmark skip
# without it); under CI (CI=true) every package here is required: a missing one fails the run, so
# that the diffusers tests cannot pass by skipping
for pkg in triton pytest pytest-benchmark numpy safetensors ninja matplotlib diffusers; do
  mod=${pkg//-/_}; [ "$pkg" = pytest-benchmark ] && mod=pytest_benchmark
  "$P" -c "import $mod" 2>/dev/null || pipi -c "$VENV/torch-constraint.txt" "$pkg" || {
    if [ "${CI:-}" = true ]; then echo "bootstrap: could not install $pkg (required under CI)" >&2; exit 1; fi
    echo "bootstrap: could not install $pkg (continuing without it)"
  }
done
pipi -c "$VENV/torch-constraint.txt" --no-build-isolation --no-deps -e .
"$P" -m vidgen_kernels
