#!/usr/bin/env bash
# Compile checks of the CUDA sources, runnable without a GPU and without a CUDA build of torch:
#   * every csrc/*.cu with nvcc for sm_80 and sm_90a (-c, the flags setup.py uses), and a guard
#     that no .cu includes a torch / ATen / c10 header (they must build with nvcc alone);
#   * csrc/cuda_bindings.cpp with the C++ compiler, -fsyntax-only, against the installed torch's
#     headers (a CPU torch is fine) + Python + CUDA include dirs, and a guard that it includes
#     no ATen/cuda or c10/cuda header.
# Exits non-zero on any failure; prints each command's target.
#
# Environment:
#   CUDA_HOME           where to look for bin/nvcc and include/ when nvcc is not on PATH
#   PYTHON              Python whose torch provides the headers (default: <repo>/.venv/bin/python
#                       if present, else python3)
#   CXX                 C++ compiler for the binding check (default: g++, else c++)
#   CHECK_CUDA_ARCHS    space-separated arch list (default: "80 90a"); "90a" means
#                       -gencode arch=compute_90a,code=sm_90a
#   CHECK_CUDA_WERROR=1 treat compiler warnings as failures
#   CHECK_CUDA_JOBS     parallel nvcc jobs (default: number of CPUs, at most 4)
set -u -o pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root" || exit 2

fail=0
note() { printf '%s\n' "$*"; }
err() { printf 'ERROR: %s\n' "$*" >&2; fail=1; }

# ---- tools
nvcc_bin="$(command -v nvcc || true)"
if [[ -z "$nvcc_bin" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
  nvcc_bin="$CUDA_HOME/bin/nvcc"
fi
if [[ -z "$nvcc_bin" && -x /usr/local/cuda/bin/nvcc ]]; then
  nvcc_bin=/usr/local/cuda/bin/nvcc
fi
if [[ -z "$nvcc_bin" ]]; then
  echo "ERROR: nvcc not found on PATH, under \$CUDA_HOME/bin or /usr/local/cuda/bin" >&2
  exit 2
fi
# CUDA include dir: next to nvcc (bin/../include), else $CUDA_HOME/include, else the
# targets/<arch>/include layout of some toolkits.
cuda_root="$(cd "$(dirname "$(readlink -f "$nvcc_bin")")/.." && pwd)"
cuda_inc=""
for d in "$cuda_root/include" "${CUDA_HOME:-/nonexistent}/include" /usr/local/cuda/include \
         "$cuda_root"/targets/*/include; do
  if [[ -f "$d/cuda_runtime_api.h" ]]; then cuda_inc="$d"; break; fi
done
if [[ -z "$cuda_inc" ]]; then
  echo "ERROR: cuda_runtime_api.h not found (looked next to $nvcc_bin and under \$CUDA_HOME)" >&2
  exit 2
fi

py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py="$(command -v python3 || true)"; fi
fi
if [[ -z "$py" ]]; then echo "ERROR: no Python found (set PYTHON)" >&2; exit 2; fi

cxx="${CXX:-}"
if [[ -z "$cxx" ]]; then cxx="$(command -v g++ || command -v c++ || true)"; fi
if [[ -z "$cxx" ]]; then echo "ERROR: no C++ compiler found (set CXX)" >&2; exit 2; fi

archs="${CHECK_CUDA_ARCHS:-80 90a}"
jobs="${CHECK_CUDA_JOBS:-$(nproc 2>/dev/null || echo 1)}"
(( jobs > 4 )) && jobs=4
(( jobs < 1 )) && jobs=1
werror=()
[[ "${CHECK_CUDA_WERROR:-0}" == 1 ]] && werror=(-Werror all-warnings)

note "nvcc:   $nvcc_bin ($("$nvcc_bin" --version | grep -o 'release [0-9.]*' | head -1))"
note "cuda:   $cuda_inc"
note "python: $py"
note "c++:    $cxx"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# ---- header guards
shopt -s nullglob
cu_files=(csrc/*.cu)
if (( ${#cu_files[@]} == 0 )); then err "no csrc/*.cu files"; fi
for f in "${cu_files[@]}"; do
  if grep -nHE '^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"](torch|ATen|c10)/' "$f"; then
    err "$f includes a torch/ATen/c10 header (the .cu files must compile with nvcc alone)"
  fi
done
if [[ -f csrc/cuda_bindings.cpp ]] &&
   grep -nHE '^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"](ATen|c10)/cuda/' csrc/cuda_bindings.cpp; then
  err "csrc/cuda_bindings.cpp includes an ATen/cuda or c10/cuda header (must build against a CPU torch)"
fi

# ---- nvcc: every .cu for every arch (in parallel, logs kept apart)
nvcc_flags=(-std=c++17 -O3 -lineinfo -Xcompiler -Wall "${werror[@]}")
names=()
logs=()
running=0
for f in "${cu_files[@]}"; do
  for a in $archs; do
    base="$(basename "$f" .cu)"
    log="$tmp/$base.sm_$a.log"
    note "nvcc  $f  -> sm_$a"
    (
      "$nvcc_bin" "${nvcc_flags[@]}" -gencode "arch=compute_$a,code=sm_$a" -I csrc \
        -c "$f" -o "$tmp/$base.sm_$a.o" >"$log" 2>&1
      echo $? >"$log.rc"
    ) &
    names+=("nvcc $f sm_$a")
    logs+=("$log")
    running=$((running + 1))
    if (( running >= jobs )); then wait -n 2>/dev/null || true; running=$((running - 1)); fi
  done
done
wait
for i in "${!names[@]}"; do
  status="$(cat "${logs[$i]}.rc" 2>/dev/null || echo 255)"
  if [[ "$status" == 0 ]]; then
    if [[ -s "${logs[$i]}" ]]; then
      note "OK (with output)  ${names[$i]}"
      sed 's/^/    /' "${logs[$i]}"
    else
      note "OK    ${names[$i]}"
    fi
  else
    err "${names[$i]} failed (exit $status):"
    sed 's/^/    /' "${logs[$i]}" >&2
  fi
done

# ---- the binding against the installed torch's headers (CPU torch is fine)
if [[ -f csrc/cuda_bindings.cpp ]]; then
  if ! incs="$("$py" - <<'EOF'
import sysconfig
from torch.utils.cpp_extension import include_paths
print("\n".join(include_paths() + [sysconfig.get_paths()["include"]]))
EOF
  )"; then
    err "could not get torch include paths from $py"
  else
    inc_flags=()
    while IFS= read -r d; do [[ -n "$d" ]] && inc_flags+=(-isystem "$d"); done <<<"$incs"
    cxx_werror=()
    [[ "${CHECK_CUDA_WERROR:-0}" == 1 ]] && cxx_werror=(-Werror)
    log="$tmp/cuda_bindings.log"
    # the standard torch's BuildExtension passes (C++20 from torch 2.13, whose successors'
    # headers refuse C++17)
    cxx_std=$("$py" -c 'import torch; v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]); print("c++20" if v >= (2, 13) else "c++17")' 2>/dev/null || echo c++17)
    if "$cxx" -std="$cxx_std" -fsyntax-only -Wall -Wextra "${cxx_werror[@]}" "${inc_flags[@]}" \
         -isystem "$cuda_inc" -I csrc -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
         -DVIDGEN_WITH_CUDA csrc/cuda_bindings.cpp >"$log" 2>&1; then
      if [[ -s "$log" ]]; then
        note "OK (with output)  $cxx -std=$cxx_std -fsyntax-only csrc/cuda_bindings.cpp"
        sed 's/^/    /' "$log"
      else
        note "OK    $cxx -std=$cxx_std -fsyntax-only csrc/cuda_bindings.cpp"
      fi
    else
      err "$cxx -fsyntax-only csrc/cuda_bindings.cpp failed:"
      sed 's/^/    /' "$log" >&2
    fi
  fi
else
  err "csrc/cuda_bindings.cpp missing"
fi

if (( fail )); then
  echo "check_cuda_compile: FAILED" >&2
  exit 1
fi
echo "check_cuda_compile: all CUDA compile checks passed"
