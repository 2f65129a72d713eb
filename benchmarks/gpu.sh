#!/usr/bin/env bash
# The GPU record: on a machine with a CUDA GPU, build the CUDA extension, run the test suite on
# CUDA, the demo and the benchmark suite, and write everything into one folder
#   benchmarks/results/<gpu>-<UTC date>/   (or --out DIR)
# holding env.txt (GPU, driver, versions), build.log, tests.log + tests-*.xml, demo/ + demo.log,
# bench-<family>.json + bench.log, bench.json (the families merged), SUMMARY.md
# (benchmarks/summarize.py tables), REPORT.md + PNG plots (benchmarks/report.py) and stages.txt
# (what each stage and each benchmark family did, how long it took, whether the budget cut it
# off). Commit that folder.
#
# Usage: bash benchmarks/gpu.sh [options] [STAGE ...]
#   STAGE: build, test, bench, demo (default: all four, in that order). Stages can also be run by
#          separate calls into the same --out folder.
#   --out DIR         the results folder
#   --budget SECONDS  wall-clock budget of the whole run (e.g. a lent machine's per-command
#                     limit; default: none). Each stage runs under `timeout` with a share of what
#                     is left (30 s are kept for the summary and the pack); a stage that runs out
#                     is stopped with SIGINT, so pytest still writes its junit XML / benchmark
#                     JSON of what ran (the case the stop lands in is left out; should a JSON
#                     still be missing, stages.txt says "no JSON written"). Tests: the
#                     CUDA-marked tests only (the rest are CPU tests CI already runs;
#                     --all-tests adds them after; without --budget the whole suite runs).
#                     Benchmarks: one pytest run per op family, CUDA cases only, most
#                     wanted first (RoPE-3D attention, temporal attention, MoE, the Triton tile
#                     variants, DiT block, diffusers, AdaLN, RoPE), torch.compile contenders
#                     last (the compiled diffusers models, the slowest to compile, after the
#                     rest); each family gets its weighted share of what is left of the stage
#                     (time a family does not use goes to the next), so one slow family cannot
#                     starve the rest; a family whose share is under 5 s is skipped. Time left
#                     after the last family goes to a second pass over the families cut off or
#                     skipped: it runs the cases their bench-<family>.json lacks (--deselect) into
#                     bench-<family>.rest.json, merged into bench.json with the rest.
#   --all-tests       the test stage also runs the tests not marked cuda (the default without
#                     --budget: the full suite, CUDA-marked tests first)
#   --pack FILE       at the end (also after a failed or cut-off stage) tar + gzip the folder
#                     into FILE (one file: the device tool returns at most 8).
#   --wheels DIR      first pip-install the wheels in DIR (no index, no deps) into a temporary
#                     target on PYTHONPATH: packages the GPU image lacks (diffusers).
#   --quick           the benchmarks' smoke mode (one small shape per op)
#   --python PY       the Python that has CUDA torch (default: python3)
#   --allow-cpu       run without a GPU (rehearses the script; CUDA cases skip, bench runs CPU)
#   --dry-run         print the plan (stages, caps, commands) and exit
#   -h, --help        print this text and exit
# Environment: GPU_SH_TEST_PATHS replaces the test stage's paths (default: tests); GPU_SH_COMMIT
# names the commit in env.txt where the checkout has no .git (the device tool's copy);
# GPU_SH_BENCH_PLAN replaces the benchmark plan ('NAME WEIGHT FILE K-EXPR' families, ';'
# between them; for rehearsals). Installs nothing from the network.
# Exit status (every stage runs and is logged whatever the ones before did; the folder is packed):
#   0  complete: every stage ran to its end, every benchmark family too (a family cut off at its
#      share and completed by the second pass counts as complete)
#   1  something failed: a stage or a benchmark family exited non-zero (not the budget's stop),
#      a run the budget stopped had failed tests before the stop (its junit XML; a failure
#      outranks a cut), or merging / summarizing the benchmarks failed; or no CUDA GPU without
#      --allow-cpu
#   2  bad arguments
#   3  partial record, nothing failed: the budget stopped a stage at its cap (a run still alive
#      20 s after the SIGINT is killed: stopped all the same), or a benchmark family stayed cut
#      off at its share or skipped for lack of time (what ran is recorded)
#
# With the device tool (one H100 or H200, 15 min of device time per session including the
# machine's start, 10 min per command, at most 8 files back from $OUT), from the repo root of
# this machine, in this order (every run() copies this working tree to the device, and the second
# call appends to the folder R/ the first wrote, so R/ must be here before the second call):
#   1. python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 importlib_metadata
#      (pure-Python wheels, 6.4 MB; .whl/ is git-ignored, so it travels only as carried)
#   2. the performance record (build ~1.5-2 min, then the benchmark families):
#      run(command="GPU_SH_COMMIT=<git rev-parse --short HEAD> bash benchmarks/gpu.sh --budget 540
#                   --wheels .whl --out benchmarks/results/R --pack $OUT/gpu-record.tgz build bench",
#          carry=[".whl"], timeout_s=600)
#      with R = <gpu>-<UTC date>, e.g. NVIDIA-H100-80GB-HBM3-2026-12-06
#   3. here: mkdir -p benchmarks/results && tar xzf <files_at>/gpu-record.tgz -C benchmarks/results
#   4. at once, while the machine is still warm (it keeps the build), with what is left (3+ min):
#      run(command="GPU_SH_COMMIT=... bash benchmarks/gpu.sh --budget <left - 30> --wheels .whl
#                   --out benchmarks/results/R --pack $OUT/gpu-tests.tgz test demo",
#          carry=[".whl"], timeout_s=<left>)
#      (adds tests.log, tests-cuda.xml, demo/ to R/; stages.txt and env.txt keep both calls)
#   5. here: tar xzf <files_at>/gpu-tests.tgz -C benchmarks/results (R/ now holds both calls),
#      then commit benchmarks/results/R/.
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.." || exit 2
# the header above, from line 2 to the first line not starting with '#', without the '# '
usage() { awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$SELF"; }

PY=python3
OUT=""
QUICK=""
BUDGET=0
PACK=""
WHEELS=""
ALLOW_CPU=0
ALL_TESTS=0
DRY=0
STAGES=()
need_value() { [ $# -ge 2 ] || { echo "gpu.sh: $1 needs a value (see --help)" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) need_value "$@"; OUT="$2"; shift 2 ;;
    --quick) QUICK="--quick"; shift ;;
    --python) need_value "$@"; PY="$2"; shift 2 ;;
    --budget) need_value "$@"; BUDGET="$2"; shift 2 ;;
    --pack) need_value "$@"; PACK="$2"; shift 2 ;;
    --wheels) need_value "$@"; WHEELS="$2"; shift 2 ;;
    --allow-cpu) ALLOW_CPU=1; shift ;;
    --all-tests) ALL_TESTS=1; shift ;;
    --dry-run) DRY=1; shift ;;
    build|test|bench|demo) STAGES+=("$1"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build test bench demo)
case "$BUDGET" in ''|*[!0-9]*) echo "gpu.sh: --budget takes whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac
START=$(date +%s)
BUDGET_TEXT="budget ${BUDGET}s"; [ "$BUDGET" -gt 0 ] || BUDGET_TEXT="no budget"
RESERVE=30
# Share of what is left that each stage may use when it starts (the last stage gets the rest).
declare -A WEIGHT=([build]=3 [test]=3 [bench]=5 [demo]=2)
SPENT=0  # --dry-run: seconds the stages before this one are assumed to use (their caps)
# Benchmark families, most wanted first: "name weight file -k-expression". The weight is the
# family's share of the stage's time (an H100 estimate of its timed work + start-up, 2026-12-06).
BENCH_PLAN=(
  "rope3d_attention 9 test_bench_rope3d_attention.py not torch.compile"
  "temporal_attention 3 test_bench_temporal_attention.py not torch.compile"
  "moe 5 test_bench_moe.py not torch.compile"
  "tiles 4 test_bench_tiles.py not torch.compile"
  "block 7 test_bench_block.py not torch.compile"
  "diffusers 7 test_bench_diffusers.py not torch.compile"
  "adaln 3 test_bench_adaln.py not torch.compile"
  "rope 1 test_bench_rope.py not torch.compile"
  "compile 5 . torch.compile and not diffusers"
  "compile-diffusers 2 test_bench_diffusers.py torch.compile"
)
[ -n "${GPU_SH_BENCH_PLAN:-}" ] && IFS=';' read -r -a BENCH_PLAN <<< "$GPU_SH_BENCH_PLAN"
TEST_SELECTIONS=("cuda")

if [ -n "$WHEELS" ] && [ "$DRY" = 0 ]; then
  site=$(mktemp -d /tmp/gpu-sh-site.XXXXXX)
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
      "$WHEELS"/*.whl; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu.sh: installing the wheels of $WHEELS failed (continuing without them)" >&2
  fi
fi

HAS_CUDA=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || HAS_CUDA=0
if [ "$HAS_CUDA" = 0 ] && [ "$ALLOW_CPU" = 0 ] && [ "$DRY" = 0 ]; then
  echo "gpu.sh: $PY sees no CUDA GPU (torch.cuda.is_available() is False); nothing to record" >&2
  exit 1
fi
if [ "$HAS_CUDA" = 1 ]; then
  GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
  BENCH_DEVICE=cuda
else
  GPU="cpu-rehearsal"; ARCH=""; BENCH_DEVICE=cpu
fi
if [ -z "$OUT" ]; then
  slug=$(echo "$GPU" | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/^-//; s/-$//')
  OUT="benchmarks/results/${slug}-$(date -u +%Y-%m-%d)"
fi
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n $(( $(nproc) > 16 ? 8 : ($(nproc) + 1) / 2 ))"

# seconds left for stage $1 (0 = no budget): its weighted share of what is left before the
# reserve, the last stage taking all of it
cap_for() {
  [ "$BUDGET" -gt 0 ] || { echo 0; return; }
  local left=$(( START + BUDGET - RESERVE - SPENT - $(date +%s) )) total=0 s seen=0
  for s in "${STAGES[@]}"; do
    [ "$s" = "$1" ] && seen=1
    [ "$seen" = 1 ] && total=$(( total + WEIGHT[$s] ))
  done
  local cap=$(( left * WEIGHT[$1] / (total > 0 ? total : 1) ))
  [ "$1" = build ] && cap=$(( left * 2 / 5 < 240 ? left * 2 / 5 : 240 ))  # the others need the extension
  [ "$1" = "${STAGES[-1]}" ] && cap=$left
  echo $(( cap > 1 ? cap : 1 ))
}
# run "$@" until $DEADLINE (unix seconds; 0 = none); SIGINT first so pytest writes its reports
capped() {
  if [ "$DEADLINE" -gt 0 ]; then
    local left=$(( DEADLINE - $(date +%s) ))
    [ "$left" -ge 5 ] || return 124
    local r=0
    timeout -s INT -k 20 "$left" "$@" || r=$?
    # 137: still running 20 s after the SIGINT and killed: stopped by the budget all the same
    [ "$r" = 137 ] && [ "$(date +%s)" -ge "$DEADLINE" ] && r=124
    return $r
  else
    "$@"
  fi
}

# the full suite unless a budget asks for the CUDA-marked tests only
{ [ "$ALL_TESTS" = 1 ] || [ "$BUDGET" -eq 0 ]; } && TEST_SELECTIONS+=("not cuda")
# the deadline of bench family $1 (weight $2): its weighted share of what is left of the stage
# (until $STAGE_DEADLINE) among it and the families after it in FAMILIES (this pass's list)
family_deadline() {
  [ "$STAGE_DEADLINE" -gt 0 ] || { echo 0; return; }
  local left=$(( STAGE_DEADLINE - $(date +%s) )) total=0 seen=0 f n w rest
  for f in "${FAMILIES[@]}"; do
    read -r n w rest <<< "$f"
    [ "$n" = "$1" ] && seen=1
    [ "$seen" = 1 ] && total=$(( total + w ))
  done
  echo $(( $(date +%s) + left * $2 / (total > 0 ? total : 1) ))
}
# a deadline (unix seconds) for a message: "until HH:MM:SS UTC", or "no budget" for 0
until_text() {
  [ "$1" -gt 0 ] || { echo "no budget"; return; }
  echo "until $(date -u -d "@$1" +%H:%M:%S 2>/dev/null || echo "+$(( $1 - $(date +%s) )) s") UTC"
}
has_stage() { local s; for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

if [ "$DRY" = 1 ]; then
  echo "gpu.sh plan: out=$OUT gpu=$GPU arch=${ARCH:-none} $BUDGET_TEXT stages=${STAGES[*]}"
  for s in "${STAGES[@]}"; do
    c=$(cap_for "$s"); SPENT=$(( SPENT + c ))
    if [ "$c" -gt 0 ]; then echo "  $s: cap $c s if the stages before use their whole caps"
    else echo "  $s: no cap (no budget)"; fi
  done
  if has_stage test; then
    for sel in "${TEST_SELECTIONS[@]}"; do
      echo "  tests: pytest ${GPU_SH_TEST_PATHS:-tests} -m '$sel' $XDIST"
    done
  fi
  if has_stage bench; then
    for f in "${BENCH_PLAN[@]}"; do
      read -r name w file kexpr <<< "$f"
      echo "  bench $name (weight $w): pytest benchmarks/${file#.} -k '$kexpr' --bench-device $BENCH_DEVICE $QUICK"
    done
  fi
  [ -n "$PACK" ] && echo "  pack: $PACK"
  exit 0
fi

mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) gpu.sh ${STAGES[*]} ($BUDGET_TEXT)" >> "$OUT/stages.txt"
log_stage() { echo "$1: $2 in $3 s" | tee -a "$OUT/stages.txt"; }

{
  echo "# gpu.sh ${STAGES[*]}"
  echo "gpu: $GPU"
  echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  if [ -n "${GPU_SH_COMMIT:-}" ]; then
    echo "git: $GPU_SH_COMMIT (given by GPU_SH_COMMIT)"
  else
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
  fi
  echo "$BUDGET_TEXT, stages: ${STAGES[*]}, xdist: ${XDIST:-none}"
  "$PY" - <<'EOF'
import platform, torch
print("python:", platform.python_version())
print("torch:", torch.__version__, "cuda", torch.version.cuda)
for mod in ("triton", "diffusers", "pytest_benchmark"):
    try:
        print(f"{mod}:", __import__(mod).__version__)
    except Exception as e:
        print(f"{mod}: not importable: {e}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
          f"sm_{p.major}{p.minor}")
EOF
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit --format=csv 2>/dev/null || true
} > "$OUT/env.new" 2>&1
cat "$OUT/env.new" >> "$OUT/env.txt" && rm -f "$OUT/env.new"  # a second call appends
cat "$OUT/env.txt"

# shellcheck disable=SC2329  # the EXIT trap calls it
pack() {
  [ -n "$PACK" ] || return 0
  mkdir -p "$(dirname "$PACK")"
  tar czf "$PACK" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "gpu.sh: packed $OUT into $PACK"
}
JUNIT_TMP=$(mktemp -d)  # the benchmark families' junit XML (not part of the record)
trap 'pack; rm -rf "$JUNIT_TMP"' EXIT
# failures + errors recorded in junit XML $1 (0 if unreadable): a run stopped by the budget
# (rc 124) may have failed tests before the stop, and a failure outranks a cut
junit_failed() {
  "$PY" - "$1" <<'EOF' 2>/dev/null || echo 0
import sys
import xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:
    print(0)
    raise SystemExit
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
print(sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites))
EOF
}

# one pytest run of bench family $name (file $file, -k $kexpr) until $fam_deadline into JSON $1;
# further arguments go to pytest. Logs one stages.txt line under $2 and sets FATE[$name].
run_family() {
  local json=$1 label=$2 t1 r=0 what
  shift 2
  t1=$(date +%s)
  echo "gpu.sh: $label ($(until_text "$fam_deadline"))" | tee -a "$OUT/bench.log"
  DEADLINE=$fam_deadline
  capped "$PY" -m pytest "benchmarks/${file#.}" -q -p no:cacheprovider -p no:xdist $QUICK -k "$kexpr" \
    --bench-device "$BENCH_DEVICE" --benchmark-json="$json" --junitxml="$JUNIT_TMP/$name.xml" "$@" \
    >> "$OUT/bench.log" 2>&1 || r=$?
  DEADLINE=$STAGE_DEADLINE
  [ "$r" = 5 ] && r=0  # nothing collected / everything deselected
  local nfail
  if [ "$r" = 124 ]; then
    nfail=$(junit_failed "$JUNIT_TMP/$name.xml")
    [ "$nfail" -gt 0 ] && r="124+$nfail"
  fi
  tail -1 "$OUT/bench.log"
  case "$r" in
    0) FATE[$name]="ok"; what=ok ;;
    124) FATE[$name]="cut"; what="CUT OFF at its share ($(( fam_deadline - t1 )) s)"
         # the suite's conftest drops the case the stop landed in, so a JSON is written; should
         # one still be missing, say so
         [ -s "$json" ] || what+=", no JSON written" ;;
    124+*) FATE[$name]="failed"; what="FAILED (${r#124+} failed before the budget's stop at its share)" ;;
    *) FATE[$name]="failed"; what="FAILED (rc $r)" ;;
  esac
  log_stage "$label" "$what" $(( $(date +%s) - t1 ))
}
# "no time left" if the stage has under 5 s left, else "its share, N s, is under 5 s", for a family
# skipped with deadline $1
skip_reason() {
  local now; now=$(date +%s)
  if [ $(( STAGE_DEADLINE - now )) -lt 5 ]; then echo "no time left"
  else echo "its share, $(( $1 - now )) s, is under 5 s"; fi
}
# the fullnames (pytest node ids) of the cases in pytest-benchmark JSON $1, one a line
recorded_cases() {
  "$PY" - "$1" <<'EOF' 2>/dev/null
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    print(b["fullname"])
EOF
}

bad=0 partial=0  # any stage or family failed; any cut off or skipped by the budget
for stage in "${STAGES[@]}"; do
  cap=$(cap_for "$stage")
  DEADLINE=0; [ "$cap" -gt 0 ] && DEADLINE=$(( $(date +%s) + cap ))
  t0=$(date +%s)
  if [ "$cap" -gt 0 ]; then echo "gpu.sh: stage $stage (cap $cap s) ..."; else echo "gpu.sh: stage $stage ..."; fi
  rc=0
  what=""
  case "$stage" in
    build)
      # in place (the checkout is what the tests and benchmarks import); this GPU's arch only
      # unless TORCH_CUDA_ARCH_LIST is set; nvcc compiles its archs in parallel threads
      if [ "$HAS_CUDA" = 1 ]; then
        VIDGEN_KERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}" \
          NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:---threads 4}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
          capped "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || rc=$?
      else
        VIDGEN_KERNELS_BUILD_CUDA=0 capped "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || rc=$?
      fi
      if [ "$rc" = 0 ]; then
        "$PY" -c "import vidgen_kernels as vk; print(vk.extension_status())" | tee -a "$OUT/build.log"
      else
        echo "gpu.sh: build FAILED (rc $rc; tail of $OUT/build.log):"; tail -30 "$OUT/build.log"
      fi ;;
    test)
      # -v: one line per test as it ends, so a run the budget cuts off still shows what passed
      : > "$OUT/tests.log"
      for sel in "${TEST_SELECTIONS[@]}"; do
        name=${sel// /-}
        r=0
        # shellcheck disable=SC2086  # the paths and the xdist options are words
        capped "$PY" -m pytest ${GPU_SH_TEST_PATHS:-tests} -v -rs -p no:cacheprovider $XDIST -m "$sel" \
          --junitxml="$OUT/tests-$name.xml" >> "$OUT/tests.log" 2>&1 || r=$?
        # pytest: 5 = nothing collected (no test of that selection)
        [ "$r" = 5 ] && r=0
        cut=0; [ "$r" = 124 ] && cut=1
        # tests that failed before the budget's stop: a failure, not only a cut
        [ "$cut" = 1 ] && [ "$(junit_failed "$OUT/tests-$name.xml")" -gt 0 ] && r=1
        # the worst outcome wins: a failure over a cut over ok
        if [ "$r" = 124 ]; then [ "$rc" = 0 ] && rc=124; elif [ "$r" != 0 ]; then rc=$r; fi
        tail -2 "$OUT/tests.log"
        [ "$cut" = 1 ] && break
      done ;;
    bench)
      : > "$OUT/bench.log"
      rm -f "$OUT"/bench-*.json  # an earlier call's families would be merged with this one's
      STAGE_DEADLINE=$DEADLINE
      declare -A FATE=()  # family -> ok, cut, failed or skipped: the outcome of its last run
      # first pass: every family, each with its share of what is left
      FAMILIES=("${BENCH_PLAN[@]}")
      for f in "${FAMILIES[@]}"; do
        read -r name w file kexpr <<< "$f"
        fam_deadline=$(family_deadline "$name" "$w")
        if [ "$fam_deadline" -gt 0 ] && [ $(( fam_deadline - $(date +%s) )) -lt 5 ]; then
          FATE[$name]="skipped"; echo "bench/$name: skipped ($(skip_reason "$fam_deadline"))" | tee -a "$OUT/stages.txt"
          continue
        fi
        run_family "$OUT/bench-$name.json" "bench/$name"
      done
      # second pass, with the time the first left (families that ended before their share): the
      # families cut off or skipped, the cases their first JSON lacks
      FAMILIES=()
      for f in "${BENCH_PLAN[@]}"; do
        read -r name w file kexpr <<< "$f"
        case "${FATE[$name]:-}" in cut|skipped) FAMILIES+=("$f") ;; esac
      done
      if [ ${#FAMILIES[@]} -gt 0 ] && [ $(( STAGE_DEADLINE - $(date +%s) )) -ge 5 ]; then
        for f in "${FAMILIES[@]}"; do
          read -r name w file kexpr <<< "$f"
          fam_deadline=$(family_deadline "$name" "$w")
          if [ $(( fam_deadline - $(date +%s) )) -lt 5 ]; then
            echo "bench/$name, second pass: skipped ($(skip_reason "$fam_deadline"))" | tee -a "$OUT/stages.txt"
            continue
          fi
          json="$OUT/bench-$name.json" deselect=() label="bench/$name, second pass"
          if [ -s "$json" ]; then
            while read -r case_id; do deselect+=(--deselect "$case_id"); done < <(recorded_cases "$json")
            json="$OUT/bench-$name.rest.json"
            label+=" (without the $(( ${#deselect[@]} / 2 )) cases recorded)"
          fi
          run_family "$json" "$label" ${deselect[@]+"${deselect[@]}"}
        done
      fi
      n_ok=0 n_cut=0 n_failed=0 n_skipped=0
      for f in "${BENCH_PLAN[@]}"; do
        read -r name _ <<< "$f"
        case "${FATE[$name]:-}" in
          ok) n_ok=$(( n_ok + 1 )) ;; cut) n_cut=$(( n_cut + 1 )) ;;
          failed) n_failed=$(( n_failed + 1 )) ;; *) n_skipped=$(( n_skipped + 1 )) ;;
        esac
      done
      what="$n_ok ok, $n_cut cut off, $n_failed failed, $n_skipped skipped"
      [ "$n_failed" -gt 0 ] && rc=1
      [ "$n_failed" = 0 ] && [ $(( n_cut + n_skipped )) -gt 0 ] && rc=124
      if ls "$OUT"/bench-*.json > /dev/null 2>&1; then
        post=""
        "$PY" benchmarks/merge_json.py "$OUT"/bench-*.json --out "$OUT/bench.json" || post+=" merge_json"
        "$PY" benchmarks/summarize.py "$OUT/bench.json" --out "$OUT/SUMMARY.md" > /dev/null || post+=" summarize"
        "$PY" benchmarks/report.py "$OUT/bench.json" --out "$OUT" || post+=" report"
        [ -n "$post" ] && { rc=1; what+=";$post FAILED"; }
      fi ;;
    demo)
      demo_dev=cpu; [ "$HAS_CUDA" = 1 ] && demo_dev=cuda
      tiny=""; [ -n "$QUICK" ] && tiny="--tiny"
      capped "$PY" -m vidgen demo --device "$demo_dev" $tiny --out "$OUT/demo" > "$OUT/demo.log" 2>&1 || rc=$?
      tail -3 "$OUT/demo.log" ;;
  esac
  if [ -z "$what" ]; then
    what=ok; [ "$rc" = 124 ] && what="CUT OFF by the budget"; [ "$rc" != 0 ] && [ "$rc" != 124 ] && what="FAILED (rc $rc)"
  fi
  log_stage "$stage" "$what" $(( $(date +%s) - t0 ))
  case "$rc" in 0) ;; 124) partial=1 ;; *) bad=1 ;; esac
done
# see the header: 1 = something failed, 3 = a partial record (the budget cut something off)
status=0; [ "$partial" = 1 ] && status=3; [ "$bad" = 1 ] && status=1
echo "gpu.sh: results in $OUT (exit $status)"
exit $status
