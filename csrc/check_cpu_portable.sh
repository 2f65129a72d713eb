#!/usr/bin/env bash
# The C++ CPU kernels as an Arm or macOS machine builds them, checked on an x86-64 Linux machine
# (no Arm machine or Mac has built the package yet; these are the two parts of such a build that
# can go wrong here):
# 1. The portable branches, run: builds vidgen_kernels._C for x86-64's baseline (-march=x86-64:
#    SSE2, no AVX / FMA / F16C / AVX-512) into a temporary copy of the package, checks that the
#    library uses no AVX register, and runs the `cpu` backend's tests against it. That build
#    takes every `#else` of the kernels' __AVX__ / __F16C__ / __FMA__ / __AVX2__ / __AVX512F__
#    branches: the generic-vector and scalar code an Arm build compiles (on Arm only the SSE2
#    streaming stores and the x86 prefetch differ: memcpy and __builtin_prefetch there).
# 2. The Arm compile: every C++ CPU source (the kernels and their bindings) compiled with zig's
#    clang for aarch64 Linux and for arm64 macOS (an Apple M1 target, OpenMP as setup.py passes
#    it to Apple's clang) against this torch's headers, -Wall -Werror on this package's own code.
#    Compile only: there is no Arm libtorch here to link against, and nothing Arm runs.
#
# Usage: bash csrc/check_cpu_portable.sh [pytest -k expression]  (default: "cpu and not triton")
# Environment: PYTHON (default: <repo>/.venv/bin/python), CXX (default: g++), ZIG (a zig binary;
#   default: the ziglang wheel, pip-installed once into ~/.cache/vidgen-kernels/, ~100 MB),
#   PORTABLE_TESTS (default: the kernel families' test files), KEEP=1 keeps the temporary folder.
# Takes ~1 min to build, ~1 min to test and ~1.5 min to cross-compile on 2 cores (CI runs it).
set -euo pipefail
# shellcheck source=csrc/cpu_variant.sh
. "$(dirname "${BASH_SOURCE[0]}")/cpu_variant.sh"
TESTS=${PORTABLE_TESTS:-}
variant_init check_cpu_portable
KEXPR=${1:-cpu and not triton}
ZIG_VERSION=0.17.1

case "$(uname -m)" in
  x86_64|amd64) ;;
  *) echo "check_cpu_portable: needs an x86-64 host (this is $(uname -m))" >&2; exit 2 ;;
esac

# 1. the baseline build and its tests
variant_build -march=x86-64 -mtune=generic
if command -v objdump > /dev/null; then
  wide=$(objdump -d --no-show-raw-insn "$so" | grep -cE '%[yz]mm' || true)
  [ "$wide" = 0 ] || { echo "check_cpu_portable: $so uses AVX registers ($wide instructions)" >&2; exit 1; }
  echo "check_cpu_portable: no AVX instruction in $so"
else
  echo "check_cpu_portable: objdump not found, the no-AVX check of the library is skipped"
fi
feats="$(grep -v '^#' "$work/pkg/vidgen_kernels/_C.cpu_features" | tr -d '[:space:]')"
[ -z "$feats" ] || { echo "check_cpu_portable: the baseline build records CPU features: $feats" >&2; exit 1; }
variant_pytest "$KEXPR"

# 2. the Arm compile
if [ -z "${ZIG:-}" ]; then
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/vidgen-kernels/ziglang-$ZIG_VERSION"
  if [ ! -x "$cache/ziglang/zig" ]; then
    echo "check_cpu_portable: installing ziglang==$ZIG_VERSION into $cache"
    "$PY" -m pip install -q --no-deps --target "$cache" "ziglang==$ZIG_VERSION"
  fi
  ZIG="$cache/ziglang/zig"
fi
tinc="$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")"
pinc="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
# omp.h: torch's macOS wheels ship their own; here the host compiler's stands in for both targets
omp="$($CXX -print-file-name=include/omp.h)"
[ -f "$omp" ] || { echo "check_cpu_portable: $CXX has no omp.h ($omp)" >&2; exit 2; }
mkdir -p "$work/omp" && cp "$omp" "$work/omp/"
sources=("$root"/csrc/*_cpu.cpp "$root/csrc/bindings.cpp")
fail=0
for target in "aarch64-linux-gnu" "aarch64-macos -mcpu=apple_m1"; do
  echo "check_cpu_portable: $ZIG c++ -target $target (${#sources[@]} sources)"
  pids=()
  for src in "${sources[@]}"; do
    # shellcheck disable=SC2086
    "$ZIG" c++ -target $target -std=c++20 -O2 -Wall -Werror -Xpreprocessor -fopenmp \
      -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -isystem "$tinc" \
      -isystem "$tinc/torch/csrc/api/include" -isystem "$pinc" -isystem "$work/omp" \
      -c "$src" -o "$work/$(basename "$src").${target%% *}.o" > "$work/$(basename "$src").log" 2>&1 &
    pids+=($!)
    if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}" || fail=1; pids=("${pids[@]:1}"); fi
  done
  for p in "${pids[@]}"; do wait "$p" || fail=1; done
  if [ $fail != 0 ]; then
    cat "$work"/*.log
    echo "check_cpu_portable: the ${target%% *} compile failed" >&2
    exit 1
  fi
done
echo "check_cpu_portable: passed"
