#!/usr/bin/env bash
# The GPU box's software on this CPU machine: a venv with the Python, torch and triton the lent
# GPU machine has (Python 3.12, torch 2.11.0+cu130, triton 3.6.0: see /work/.library/device), the
# package built
# there (with its CUDA kernels: a CUDA torch + nvcc compile them against real CUDA torch headers,
# which the CPU wheel cannot), and the whole test suite run on it (CPU and Triton-interpreter
# cases; the CUDA ones skip). What it catches before a GPU session spends its minutes on it:
# API differences between that torch / triton and the development ones (torch 2.13, triton 3.9),
# with the diffusers the GPU record carries as a wheel (0.42.1),
# a CUDA binding that does not compile, and a Triton kernel that Triton 3.6 cannot compile for
# sm_90 / sm_80 (ahead of time, no GPU needed).
#
# Usage: bash .ci/check_gpu_torch.sh [pytest args]   (default: tests -q)
# Environment: PYTHON (the venv's Python; default: python3.12 where there is one, else python3),
#   VENV (default /tmp/venv-gpu-torch; reused when it exists), TORCH_VER (2.11.0),
#   TRITON_VER (3.6.0), WORK (default /tmp/vidgen-gpu-torch: a clone of this checkout's HEAD),
#   MAX_JOBS (2), AOT_ARGS (the Triton compile check's options; default --quick --arch 90 80).
# Cost: ~4.7 GB of wheels (torch's CUDA build and its nvidia-* dependencies; ~1 min to install
# from the local index), ~2 min to build, ~10 min for the suite on 2 cores. Not part of CI (its
# time and disk budget); run it after changing code that touches torch APIs, before a GPU session.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV=${VENV:-/tmp/venv-gpu-torch}
WORK=${WORK:-/tmp/vidgen-gpu-torch}
TORCH_VER=${TORCH_VER:-2.11.0}
TRITON_VER=${TRITON_VER:-3.6.0}
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  BASE_PY=${PYTHON:-}
  if [ -z "$BASE_PY" ]; then
    if python3.12 -c "" 2>/dev/null; then BASE_PY=python3.12; else
      BASE_PY=python3
      echo "check_gpu_torch: no python3.12 (PYTHON=... names one); the venv gets $(python3 --version)"
    fi
  fi
  "$BASE_PY" -m venv "$VENV"
  "$PY" -m pip install -q "torch==$TORCH_VER" "triton==$TRITON_VER" "diffusers==0.42.1" matplotlib numpy pytest pytest-benchmark \
    safetensors ninja setuptools wheel
fi
"$PY" -c "import sys, torch, triton; print('check_gpu_torch: Python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
rm -rf "$WORK"
git clone -q "$root" "$WORK"
cd "$WORK"
echo "check_gpu_torch: commit $(git rev-parse --short HEAD) in $WORK"
MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c "import vidgen_kernels as vk; print('check_gpu_torch:', vk.extension_status())"
if [ $# -eq 0 ]; then set -- tests -q; fi
rc=0
TRITON_INTERPRET=1 "$PY" -m pytest -p no:cacheprovider "$@" || rc=$?
# the Triton kernels compiled by that Triton for the GPU box's sm_90 (and sm_80), no GPU needed:
# a kernel this Triton cannot lower fails here, not in the GPU session (~1.5 min; the full check
# of every dtype and size: AOT_ARGS="--arch 90 80", ~5 min)
env -u TRITON_INTERPRET "$PY" -m vidgen_kernels.triton_kernels.aot_check ${AOT_ARGS:---quick --arch 90 80} || rc=$?
exit $rc
