#!/usr/bin/env bash
# The C++ CPU kernels under AddressSanitizer: builds vidgen_kernels._C with -fsanitize=address
# (and debug information) into a temporary copy of the package, then runs the tests of the `cpu`
# backend against that copy with libasan preloaded. Every read or write past a heap block (each
# torch CPU tensor's storage is one, with ASan's red zones around it), a use after free, and a
# stack overflow of the kernels stops the run with ASan's report (file and line). Python and
# torch are not instrumented: only this package's compiled code is checked.
#
# Usage: bash csrc/check_cpu_asan.sh [pytest -k expression]   (default: "cpu and not triton":
#   the cases with "cpu" in their id, the `cpu` backend's and the reference / oracle cases
#   beside them; not the Triton interpreter's, which run none of this code)
# Environment: PYTHON (default: <repo>/.venv/bin/python), CXX (default: g++),
#   ASAN_TESTS (default: the kernel families' test files), KEEP=1 keeps the temporary folder.
# Takes ~3 min to build and ~3 min to test on 2 cores. Not part of CI (its time budget); run it
# after changing a C++ kernel.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
PY=${PYTHON:-$root/.venv/bin/python}
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # (cd below)
CXX=${CXX:-g++}
KEXPR=${1:-cpu and not triton}
TESTS=${ASAN_TESTS:-"test_adaln.py test_rope.py test_rope3d_attention.py test_temporal_attention.py test_moe.py test_nn_adaln.py test_nn_temporal_attention.py"}
# (CXX may be a command line, e.g. "ccache g++": split here on purpose)
# shellcheck disable=SC2086
libasan="$($CXX -print-file-name=libasan.so)"
[ -f "$libasan" ] || { echo "check_cpu_asan: $CXX has no libasan.so ($libasan)" >&2; exit 2; }
work="$(mktemp -d)"
[ "${KEEP:-}" = 1 ] || trap 'rm -rf "$work"' EXIT
cd "$root"
echo "check_cpu_asan: building with -fsanitize=address into $work"
CXX="$CXX" VIDGEN_KERNELS_BUILD_CUDA=0 VIDGEN_KERNELS_DEBUG=1 \
  VIDGEN_KERNELS_CPU_FLAGS="-march=native -fsanitize=address -fno-omit-frame-pointer" \
  LDFLAGS="${LDFLAGS:-} -fsanitize=address" \
  "$PY" setup.py -q build_ext --build-temp "$work/build" --build-lib "$work/lib" > "$work/build.log" 2>&1 \
  || { tail -30 "$work/build.log"; echo "check_cpu_asan: build failed" >&2; exit 1; }
so="$(ls "$work/lib/vidgen_kernels/"_C*.so)"
grep -q __asan_report_load "$so" || { echo "check_cpu_asan: $so is not instrumented" >&2; exit 1; }
mkdir -p "$work/pkg"
cp -r vidgen_kernels vidgen "$work/pkg/"
rm -f "$work/pkg/vidgen_kernels/"_C*.so "$work/pkg/vidgen_kernels/_C.cpu_features"
cp "$work/lib/vidgen_kernels/"_C* "$work/pkg/vidgen_kernels/"
paths=()
for t in $TESTS; do paths+=("$root/tests/$t"); done
# from outside the checkout, so that `import vidgen_kernels` finds the instrumented copy
cd "$work"
# (the report goes to a file: pytest captures the stderr of a test that dies)
# (libstdc++ preloaded too: ASan's __cxa_throw interceptor needs it there at start-up, else the
# first C++ exception, a TORCH_CHECK of a bad-input test, aborts with "CHECK failed")
# shellcheck disable=SC2086
libstdcxx="$($CXX -print-file-name=libstdc++.so.6)"
[ -f "$libstdcxx" ] || { echo "check_cpu_asan: $CXX has no libstdc++.so.6 ($libstdcxx)" >&2; exit 2; }
export LD_PRELOAD="$libasan $libstdcxx" \
  ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:detect_odr_violation=0:log_path=$work/asan"
export PYTHONPATH="$work/pkg"
"$PY" -c "
import vidgen_kernels as vk
assert vk.__file__.startswith('$work/pkg/'), vk.__file__
assert vk._ext.C is not None, vk._ext.IMPORT_ERROR
print('check_cpu_asan: instrumented extension loaded from', vk._ext.C.__file__)"
echo "check_cpu_asan: pytest -k '$KEXPR' on ${TESTS}"
rc=0
"$PY" -m pytest "${paths[@]}" -q -p no:cacheprovider -x -k "$KEXPR" || rc=$?
if ls "$work"/asan* > /dev/null 2>&1; then
  cat "$work"/asan*
  echo "check_cpu_asan: AddressSanitizer stopped the run (report above)" >&2
  exit 1
fi
exit $rc
