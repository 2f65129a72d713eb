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
# shellcheck source=csrc/cpu_variant.sh
. "$(dirname "${BASH_SOURCE[0]}")/cpu_variant.sh"
TESTS=${ASAN_TESTS:-}
variant_init check_cpu_asan
KEXPR=${1:-cpu and not triton}
# (CXX may be a command line, e.g. "ccache g++": split here on purpose)
# shellcheck disable=SC2086
libasan="$($CXX -print-file-name=libasan.so)"
[ -f "$libasan" ] || { echo "check_cpu_asan: $CXX has no libasan.so ($libasan)" >&2; exit 2; }
export VIDGEN_KERNELS_DEBUG=1 LDFLAGS="${LDFLAGS:-} -fsanitize=address"
variant_build -march=native -fsanitize=address -fno-omit-frame-pointer
unset LDFLAGS VIDGEN_KERNELS_DEBUG
grep -q __asan_report_load "$so" || { echo "check_cpu_asan: $so is not instrumented" >&2; exit 1; }
# (the report goes to a file: pytest captures the stderr of a test that dies)
# (libstdc++ preloaded too: ASan's __cxa_throw interceptor needs it there at start-up, else the
# first C++ exception, a TORCH_CHECK of a bad-input test, aborts with "CHECK failed")
# shellcheck disable=SC2086
libstdcxx="$($CXX -print-file-name=libstdc++.so.6)"
[ -f "$libstdcxx" ] || { echo "check_cpu_asan: $CXX has no libstdc++.so.6 ($libstdcxx)" >&2; exit 2; }
export LD_PRELOAD="$libasan $libstdcxx" \
  ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:detect_odr_violation=0:log_path=$work/asan"
rc=0
variant_pytest "$KEXPR" || rc=$?
if ls "$work"/asan* > /dev/null 2>&1; then
  cat "$work"/asan*
  echo "check_cpu_asan: AddressSanitizer stopped the run (report above)" >&2
  exit 1
fi
exit $rc
