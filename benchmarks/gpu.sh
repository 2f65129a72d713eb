#!/usr/bin/env bash
# The GPU record: on a machine with a CUDA GPU, build the CUDA extension, run the test suite on
# CUDA and the benchmark suite, and write everything into one folder
#   benchmarks/results/<gpu>-<UTC date>/   (or --out DIR)
# holding env.txt (GPU, driver, versions), build.log, tests.log + tests.xml, bench.json, bench.log
# SUMMARY.md (benchmarks/summarize.py tables) and REPORT.md + PNG plots (benchmarks/report.py).
# Commit that folder.
#
# Usage: bash benchmarks/gpu.sh [--out DIR] [--quick] [--python PY] [STAGE ...]
#   STAGE: build, test, bench (default: all three, in that order). Stages can be run by separate
#   calls into the same --out folder (e.g. on a machine that limits each command's time).
#   --quick: the benchmarks' smoke mode (one small shape per op).
# Uses the Python that has CUDA torch (default: python3); installs nothing from the network.
# Exit status: non-zero if a stage failed (the others still run and are logged).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=python3
OUT=""
QUICK=""
STAGES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --quick) QUICK="--quick"; shift ;;
    --python) PY="$2"; shift 2 ;;
    build|test|bench) STAGES+=("$1"); shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build test bench)

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu.sh: $PY sees no CUDA GPU (torch.cuda.is_available() is False); nothing to record" >&2
  exit 1
fi
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
if [ -z "$OUT" ]; then
  slug=$(echo "$GPU" | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/^-//; s/-$//')
  OUT="benchmarks/results/${slug}-$(date -u +%Y-%m-%d)"
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

{
  echo "gpu: $GPU"
  echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
  "$PY" - <<'EOF'
import platform, torch
print("python:", platform.python_version())
print("torch:", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton:", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
      f"sm_{p.major}{p.minor}")
EOF
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit --format=csv 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

for stage in "${STAGES[@]}"; do
  case "$stage" in
    build)
      # in place (the checkout is what the tests and benchmarks import); sm_80 + sm_90 + PTX
      echo "gpu.sh: building the extension with CUDA ..."
      if VIDGEN_KERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}" \
          MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
        "$PY" -c "import vidgen_kernels as vk; print(vk.extension_status())" | tee -a "$OUT/build.log"
      else
        echo "gpu.sh: build FAILED (tail of $OUT/build.log):"; tail -30 "$OUT/build.log"; status=1
      fi ;;
    test)
      echo "gpu.sh: test suite ..."
      "$PY" -m pytest tests -q -rs -p no:cacheprovider --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1 \
        || status=1
      tail -3 "$OUT/tests.log" ;;
    bench)
      echo "gpu.sh: benchmarks ${QUICK:-(full)} ..."
      "$PY" -m pytest benchmarks -q -p no:cacheprovider $QUICK --bench-device all \
        --benchmark-json="$OUT/bench.json" > "$OUT/bench.log" 2>&1 || status=1
      tail -3 "$OUT/bench.log"
      if [ -s "$OUT/bench.json" ]; then
        "$PY" benchmarks/summarize.py "$OUT/bench.json" --out "$OUT/SUMMARY.md" > /dev/null || status=1
        "$PY" benchmarks/report.py "$OUT/bench.json" --out "$OUT" || status=1
      fi ;;
  esac
done
echo "gpu.sh: results in $OUT (exit $status)"
exit $status
