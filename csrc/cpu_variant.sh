# Sourced by check_cpu_asan.sh and check_cpu_portable.sh: build vidgen_kernels._C with other
# code-generation flags into a temporary copy of the package, and run the C++ CPU kernels' tests
# against that copy (from outside the checkout, so that `import vidgen_kernels` finds it).
#   variant_init NAME         sets root, PY, CXX, TESTS, work (removed at exit unless KEEP=1)
#   variant_build FLAGS...    builds with VIDGEN_KERNELS_CPU_FLAGS="FLAGS" (LDFLAGS as set) into
#                             $work/pkg; sets so (the built library)
#   variant_pytest KEXPR      checks that the copy is the one imported, runs pytest -k KEXPR on
#                             $TESTS (the environment as the caller set it); returns its status
# Environment: PYTHON (default: <repo>/.venv/bin/python), CXX (default: g++), TESTS (the test
#   files under tests/; default: the kernel families'), KEEP=1 keeps the temporary folder.

variant_init() {
  variant_name=$1
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  PY=${PYTHON:-$root/.venv/bin/python}
  case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # (cd later)
  CXX=${CXX:-g++}
  TESTS=${TESTS:-"test_adaln.py test_rope.py test_rope3d_attention.py test_temporal_attention.py test_moe.py test_nn_adaln.py test_nn_temporal_attention.py"}
  work="$(mktemp -d)"
  [ "${KEEP:-}" = 1 ] || trap 'rm -rf "$work"' EXIT
}

variant_build() {
  echo "$variant_name: building with VIDGEN_KERNELS_CPU_FLAGS=\"$*\" into $work"
  (cd "$root" && CXX="$CXX" VIDGEN_KERNELS_BUILD_CUDA=0 VIDGEN_KERNELS_CPU_FLAGS="$*" \
    "$PY" setup.py -q build_ext --build-temp "$work/build" --build-lib "$work/lib") \
    > "$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log"; echo "$variant_name: build failed" >&2; exit 1; }
  so="$(ls "$work/lib/vidgen_kernels/"_C*.so)"
  mkdir -p "$work/pkg"
  cp -r "$root/vidgen_kernels" "$root/vidgen" "$work/pkg/"
  rm -f "$work/pkg/vidgen_kernels/"_C*.so "$work/pkg/vidgen_kernels/_C.cpu_features"
  cp "$work/lib/vidgen_kernels/"_C* "$work/pkg/vidgen_kernels/"
}

variant_pytest() {
  local paths=() t
  for t in $TESTS; do paths+=("$root/tests/$t"); done
  (cd "$work" && PYTHONPATH="$work/pkg" "$PY" -c "
import vidgen_kernels as vk
assert vk.__file__.startswith('$work/pkg/'), vk.__file__
assert vk._ext.C is not None, vk._ext.IMPORT_ERROR
print('$variant_name: extension loaded from', vk._ext.C.__file__)") || return 1
  echo "$variant_name: pytest -k '$1' on $TESTS"
  (cd "$work" && PYTHONPATH="$work/pkg" "$PY" -m pytest "${paths[@]}" -q -p no:cacheprovider -x -k "$1")
}
