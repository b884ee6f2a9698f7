#!/usr/bin/env bash
# The one command for the GPU machine (H100/H200, torch 2.11+cu130, no network): build the
# extension, probe the CUDA backend's plan families (scripts/gpu_probe.py: a family that hangs,
# crashes or computes wrongly is switched off, LORA_OPS_CUDA_*=0, for every later phase, and the
# tests requiring it are deselected, so that one hung kernel cannot stall the whole check), run
# the CUDA kernels' C++ test, the whole test suite (CUDA tests included),
# compute-sanitizer memcheck on a fast subset of the CUDA tests, the GPU benchmark suite,
# memcheck on the C++ test, and the CUDA backend's kernel times per call (torch.profiler), in
# that order (what matters most first); results and a summary under $OUT.
# The standalone library's cmake build (for cppcuda) runs in the background next to the build
# phase, each with half the cores: the builds overlap instead of taking turns.
# Every phase runs under `timeout` with what is left of an overall deadline (~9 minutes, for a
# 15-minute device lease that includes the machine's start), less a reserve for the phases after
# it, so the script always ends, and says which phases passed, failed or ran out of time. Before the
# GPU session, run scripts/check_gpu_image_versions.sh on the machine without a GPU: it builds
# and tests the tree against this machine's torch 2.11 and Triton 3.6, at no device time. A phase
# that ran out of time can be run alone in a second call on the still-warm machine (it keeps
# the build): PHASES="probe sanitize" or PHASES="probe bench" with GPU_CHECK_TOTAL_S=560 (the
# probe again, so that a plan family it switched off stays off).
#
#   bash scripts/gpu_check.sh                                    # all phases
#   LORA_OPS_COMMIT=<sha> bash scripts/gpu_check.sh              # the copied tree has no .git
#   PHASES="build bench" BENCH_ARGS="--suite full" GPU_CHECK_TOTAL_S=560 bash scripts/gpu_check.sh
#   PHASES="plans" bash scripts/gpu_check.sh     # without cluster plans / tensor-core tiles / adapter-in-GEMM, to compare
#   PHASES="race" bash scripts/gpu_check.sh      # racecheck + synccheck on test_cuda_kernels --smoke (after cppcuda built it)
#
# CUTLASS (the Hopper adapter-in-GEMM kernel) is header-only and not on the GPU machine's image:
# carry this machine's copy with the device tool, carry=[".venv/lib/python3.11/site-packages/
# cutlass_library/source/include"] (27 MB); LORA_OPS_CUTLASS_DIR defaults to it when present.
# Without it the build has a stub for that kernel and the forward keeps its other plans.
#
# Settings (environment): PHASES (default "build probe cppcuda test sanitize bench cppsan profile"; also "plans", "race"), GPU_CHECK_TOTAL_S (540),
# PYTHON (python3), TORCH_CUDA_ARCH_LIST (9.0a), MAX_JOBS (nproc), PYTEST_WORKERS (8),
# SANITIZER_SELECT (pytest -k expression for memcheck), BENCH_ARGS (extra `lora-ops bench` options),
# BENCH_TRITON_AUTOTUNE (0: the bench's Triton GEMMs take their default configurations).
#
# Files under $OUT (the device tool returns at most 8): log.txt (everything), summary.md,
# env.txt, pytest-junit.xml, kernels.md, and the benchmark's <date>_<device>_<commit>_gpu.{json,md,png},
# named as benchmarks/results/ keeps them.
set -u -o pipefail

SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."
export OUT=${OUT:-$PWD/gpu_check_out}
export GPU_CHECK_START=${GPU_CHECK_START:-$(date +%s)}
export GPU_CHECK_TOTAL_S=${GPU_CHECK_TOTAL_S:-540}
export PHASES=${PHASES:-"build probe cppcuda test sanitize bench cppsan profile"}
export PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# lora_ops is built in place here, not installed: the scripts run as files (scripts/gpu_probe.py,
# benchmarks/profile_kernels.py) have their own folder, not this one, first on sys.path.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Memcheck sees an out-of-bounds access only past the edge of an allocation: without the caching
# allocator every tensor is its own allocation. CUDA graphs need that allocator: no graph tests.
# The CUDA backend's tests (ids "cuda-cuda"), less the slow ones: large sizes, opcheck, PEFT
# models, torch.compile. The multi-adapter ops go first (their out-of-range index test included).
export SANITIZER_SELECT=${SANITIZER_SELECT:-"cuda-cuda and not graph and not compile and not at_size and not opcheck and not peft"}
export BENCH_ARGS=${BENCH_ARGS:-}
export PYTEST_WORKERS=${PYTEST_WORKERS:-8}   # test processes sharing the GPU (pytest-xdist): Triton and inductor compile on the CPU, 16 cores
if [[ -z "${LORA_OPS_CUTLASS_DIR:-}" ]]; then
  for dir in "$PWD"/.venv/lib/python3*/site-packages/cutlass_library/source/include; do
    [[ -f "$dir/cutlass/cutlass.h" ]] && export LORA_OPS_CUTLASS_DIR=$dir
  done
fi
export WORK=${WORK:-$(mktemp -d)}   # per-phase outputs the summary greps (not sent back)

left() { echo $(( GPU_CHECK_START + GPU_CHECK_TOTAL_S - $(date +%s) )); }

commit_id() {
  if [[ -n "${LORA_OPS_COMMIT:-}" ]]; then echo "$LORA_OPS_COMMIT"
  else git rev-parse HEAD 2>/dev/null || echo unknown; fi
}

phase_env() {
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $LORA_OPS_COMMIT"
    echo "host: $(uname -a)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv || true
    nvidia-smi || true
    command -v nvcc && nvcc --version | tail -2
    command -v compute-sanitizer && compute-sanitizer --version | tail -1
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], sys.executable); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None); print('triton', triton.__version__)"
    "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|peft|transformers|pytest|pytest-benchmark|pytest-timeout|ninja|matplotlib|numpy|setuptools) " || true
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS PHASES=$PHASES"
  } > "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
}

phase_build() {
  # In place, so `import lora_ops` from the repository root finds lora_ops/_C*.so; ninja keeps
  # build/ between calls on a warm machine, so a rebuild compiles only what changed.
  "$PY" setup.py build_ext --inplace || return 1
  "$PY" - <<'EOF'
import lora_ops
info = lora_ops.build_info()
print("build_info:", info)
print("available_backends:", lora_ops.available_backends())
print("cuda_paths:", lora_ops.cuda_paths(0))  # which fast paths this build runs on this GPU
if not info.get("compiled") or not info.get("with_cuda"):
    raise SystemExit("build: lora_ops._C did not load with its CUDA kernels")
if not info.get("cuda_adapter_gemm"):
    print("build: no CUTLASS headers (LORA_OPS_CUTLASS_DIR): the adapter-in-GEMM plan is a stub")
EOF
}

# The standalone library's build (cmake), started in the background next to the build phase:
# the two builds share the CPU cores instead of taking turns (each spends ~1 min of nvcc on the
# CUTLASS files alone). Its exit status lands in $WORK/cppcuda_build.rc.
cppcuda_build() {
  {
    cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DLORA_OPS_WITH_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES="${TORCH_CUDA_ARCH_LIST//./}" -DPython3_EXECUTABLE="$(command -v "$PY")" \
      -DLORA_OPS_CUTLASS_DIR="${LORA_OPS_CUTLASS_DIR:-}" &&
      cmake --build build-gpu -j "$MAX_JOBS"
  } > "$WORK/cppcuda.txt" 2>&1
  echo $? > "$WORK/cppcuda_build.rc"
}

# compute-sanitizer's path; where there is none, says so into the phase's file ($1) and fails.
sanitizer_path() {
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  if [[ ! -x "$sanitizer" ]]; then echo "compute-sanitizer not found" | tee "$1" >&2; return 3; fi
  echo "$sanitizer"
}

# The standalone library's test binary, once its build (started next to the build phase, or
# here: an incremental build on a warm machine) has finished.
cppcuda_binary() {
  local bin=build-gpu/test_cuda_kernels
  [[ -f "$WORK/cppcuda_build.rc" ]] || [[ -f "$WORK/cppcuda_build.started" ]] || cppcuda_build
  while [[ ! -f "$WORK/cppcuda_build.rc" ]]; do sleep 2; done
  [[ "$(cat "$WORK/cppcuda_build.rc")" == 0 ]] || { tail -40 "$WORK/cppcuda.txt" >&2; return 1; }
  [[ -x "$bin" ]] || bin=$(find build-gpu -name test_cuda_kernels -type f -perm -u+x | head -1)
  echo "$bin"
}

phase_probe() {
  # Which plan families work (one child process for all of them unless one hangs or crashes);
  # the exports and the pytest deselection for the failed ones land in $WORK for the main script.
  "$PY" scripts/gpu_probe.py --budget $(( ${PHASE_LIMIT:-100} - 5 )) --env-out "$WORK/probe.env" \
    --deselect-out "$WORK/probe.k" 2>&1 | tee "$WORK/probe.txt"
}

phase_cppcuda() {
  # The CUDA kernels on their own, through the standalone library: tests/cpp/test_cuda_kernels
  # checks every entry point against fp64 host loops (poisoned outputs, repeat and graph replay).
  local bin
  bin=$(cppcuda_binary) || return 1
  "$bin" 2>&1 | tail -25 | tee -a "$WORK/cppcuda.txt"
  return "${PIPESTATUS[0]}"
}

phase_cppsan() {
  # The same test under compute-sanitizer memcheck (the pytest memcheck of phase sanitize
  # reaches the kernels through torch; this one through the C entry points, graph replay too).
  local sanitizer bin
  bin=$(cppcuda_binary) || return 1
  sanitizer=$(sanitizer_path "$WORK/cppsan.txt") || return 3
  "$sanitizer" --tool memcheck --error-exitcode 99 --print-limit 20 "$bin" 2>&1 | tail -15 | tee "$WORK/cppsan.txt"
  return "${PIPESTATUS[0]}"
}

phase_race() {
  # compute-sanitizer's racecheck and synccheck (shared-memory hazards, barrier misuse, the
  # cluster kernels' DSMEM exchange) on one case per kernel family (test_cuda_kernels --smoke,
  # cluster plans required): tens of times slower than a plain run, so not on the whole suite.
  local sanitizer tool st rc=0 bin
  bin=$(cppcuda_binary) || return 1
  sanitizer=$(sanitizer_path "$WORK/race.txt") || return 3
  {
    for tool in racecheck synccheck; do
      echo "--- $tool"
      "$sanitizer" --tool "$tool" --error-exitcode 99 --print-limit 20 "$bin" --smoke 2>&1 |
        tail -12
      st=${PIPESTATUS[0]}
      (( st == 0 )) || rc=$st
    done
    exit "$rc"  # the group is a subshell of the pipeline: its status is the pipeline's first
  } 2>&1 | tee "$WORK/race.txt"
  return "${PIPESTATUS[0]}"
}

phase_test() {
  # pytest-timeout and pytest-xdist are on the GPU machine's image; use them where present.
  # -v: a line per test as it ends, so a phase stopped by its time limit still says what failed.
  # The Triton GEMMs run their default configurations (tests/conftest.py) and each tuned one
  # once (test_every_tuned_configuration_matches_reference), not a tuning run per shape.
  local extra=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=120)
  (( PYTEST_WORKERS > 1 )) && "$PY" -c "import xdist" 2>/dev/null && extra+=(-n "$PYTEST_WORKERS")
  [[ -n "${PROBE_DESELECT:-}" ]] && extra+=(-k "$PROBE_DESELECT")
  "$PY" -m pytest tests -v -rfEs -p no:cacheprovider --durations=15 ${extra[@]+"${extra[@]}"} \
    --junitxml="$OUT/pytest-junit.xml" 2>&1 | tee "$WORK/test.txt"
}

phase_sanitize() {
  local sanitizer
  sanitizer=$(sanitizer_path "$WORK/sanitize.txt") || return 3
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 99 \
    --report-api-errors no --print-limit 20 --target-processes all \
    "$PY" -m pytest tests/test_multi_lora_ops.py tests -q -rfEs -x -p no:cacheprovider -m cuda \
    -k "$SANITIZER_SELECT${PROBE_DESELECT:+ and $PROBE_DESELECT}" \
    2>&1 | tee "$WORK/sanitize.txt"
}

phase_profile() {
  # Kernel by kernel, where the CUDA backend's lora_linear spends its time next to the base GEMM
  # (csrc/cuda/NOTES.md, "what to measure first", item 4).
  "$PY" benchmarks/profile_kernels.py --reps 10 --out "$OUT/kernels.md"
}

phase_bench() {
  # The engine checkpoints its JSON after every job and starts no job past its budget; if
  # `timeout` still has to stop it, the summary is rebuilt from the last checkpoint. The budget
  # leaves the phase's last 30 s for the job in flight and the report.
  local budget=$(( ${PHASE_LIMIT:-$(left)} - 30 ))
  (( budget < 10 )) && budget=10
  # The Triton GEMMs on their default configurations: tuned, each one's first shape would compile
  # every configuration (~10 per kernel; the compile check takes ~1.2 s of CPU per kernel
  # configuration here), in the main thread, again for each integer specialisation (M = 1, M a
  # multiple of 16, ...), and each new shape would time them: minutes of the phase before the
  # suite's later T1/T2 rows. The summary says which (BENCH_TRITON_AUTOTUNE=1 tunes).
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
  LORA_OPS_TRITON_AUTOTUNE=${BENCH_TRITON_AUTOTUNE:-0} "$PY" -m lora_ops.bench --suite gpu \
    --time-budget "$budget" --warmup-ms 10 --rep-ms 40 --out-dir "$OUT" $BENCH_ARGS
}

phase_plans() {
  # The forward's multi-launch plans (what GPUs without thread block clusters run) timed on this
  # GPU, to set against the cluster plans' rows of the bench phase: decode and mid-size M, bf16.
  mkdir -p "$OUT/noclusters"
  LORA_OPS_CUDA_CLUSTERS=0 "$PY" -m lora_ops.bench --ops lora_linear --backends cuda --peers "" \
    --dtype bf16 --mode fwd --shape M=1,K=4096,N=4096,r=16 --shape M=16,K=4096,N=4096,r=16 \
    --shape M=1024,K=4096,N=4096,r=16 --time-budget 60 --warmup-ms 10 --rep-ms 40 \
    --out-dir "$OUT/noclusters"
  # The adapter products on SIMT tiles (what fp32 runs) instead of tensor cores, at the sizes
  # where they are compute bound, against the bench phase's rows of the same shapes.
  mkdir -p "$OUT/nomma"
  LORA_OPS_CUDA_MMA=0 "$PY" -m lora_ops.bench --ops lora_linear --backends cuda --peers "" \
    --dtype bf16 --mode both --shape M=1024,K=4096,N=4096,r=16 \
    --shape M=4096,K=4096,N=4096,r=16 --shape M=4096,K=4096,N=4096,r=64 --time-budget 60 \
    --warmup-ms 10 --rep-ms 40 --out-dir "$OUT/nomma"
  # Hopper: the cluster adapter kernel + cuBLAS (beta = 1 onto y_init) where the adapter-in-GEMM
  # plan would run, against the bench phase's rows of the same shapes (T1's large-M rows).
  mkdir -p "$OUT/noadaptergemm"
  LORA_OPS_CUDA_ADAPTER_GEMM=0 "$PY" -m lora_ops.bench --ops lora_linear --backends cuda --peers "" \
    --dtype bf16 --mode fwd --shape M=4096,K=4096,N=4096,r=16 --shape M=4096,K=4096,N=4096,r=64 \
    --shape M=16384,K=4096,N=14336,r=16 --time-budget 45 --warmup-ms 10 --rep-ms 40 \
    --out-dir "$OUT/noadaptergemm"
}

# A phase runs as this script in a child process, so that `timeout` can stop it and all it started.
if [[ "${1:-}" == __phase ]]; then
  "phase_$2"
  exit $?
fi
if [[ "${1:-}" == __run ]]; then
  "$2"
  exit $?
fi

mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
TEE_PID=$!
export LORA_OPS_COMMIT=$(commit_id)
declare -A STATUS TAKEN
ORDER=()

# run_phase NAME CAP_S RESERVE_S: run phase NAME under min(CAP_S, time left - RESERVE_S), the
# reserve being what the later phases need at least.
run_phase() {
  local name=$1 cap=$2 reserve=$3 limit t0 rc
  ORDER+=("$name")
  limit=$(( $(left) - reserve ))
  (( limit > cap )) && limit=$cap
  if (( limit < 20 )); then
    STATUS[$name]="skipped: no time left"; TAKEN[$name]=0
    echo "=== $name: skipped, no time left"; return 0
  fi
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  t0=$(date +%s)
  PHASE_LIMIT=$limit timeout --kill-after=15 "$limit" bash "$SELF" __phase "$name"; rc=$?
  TAKEN[$name]=$(( $(date +%s) - t0 ))
  case $rc in
    0) STATUS[$name]="ok" ;;
    124|137) STATUS[$name]="timed out after ${limit}s" ;;
    *) STATUS[$name]="failed (exit $rc)" ;;
  esac
  echo "=== $name: ${STATUS[$name]} in ${TAKEN[$name]}s"
}

wanted() { [[ " $PHASES " == *" $1 "* ]]; }

echo "=== gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $LORA_OPS_COMMIT, phases: $PHASES, budget ${GPU_CHECK_TOTAL_S}s"
[[ "$LORA_OPS_COMMIT" == unknown ]] && echo "no .git here: pass LORA_OPS_COMMIT=<sha> to name the commit"
run_phase env 30 0
if wanted cppcuda && wanted build; then
  touch "$WORK/cppcuda_build.started"
  MAX_JOBS=$(( (MAX_JOBS + 1) / 2 )) bash "$SELF" __run cppcuda_build &
fi
if wanted build; then
  (( MAX_JOBS > 1 )) && wanted cppcuda && export MAX_JOBS=$(( (MAX_JOBS + 1) / 2 ))
  run_phase build 240 280
  [[ "${STATUS[build]}" == ok ]] || echo "build did not succeed: what follows runs without the compiled backends"
fi
if wanted probe; then
  run_phase probe 100 250
  # The failed families' switches for every later phase (children inherit them), and the tests
  # that require those families left out of pytest.
  [[ -s "$WORK/probe.env" ]] && source "$WORK/probe.env" && cat "$WORK/probe.env"
  export PROBE_DESELECT=$(cat "$WORK/probe.k" 2>/dev/null)
fi
# run_phase NAME CAP RESERVE: the reserves keep >= 150 s for bench (T1/T2's rows come first in
# its suite) and a little for the memcheck of the C++ test, whatever the phases before it take.
wanted cppcuda && run_phase cppcuda 90 330
wanted test && run_phase test 150 260
wanted sanitize && run_phase sanitize 100 210
if wanted bench; then
  run_phase bench 360 60
  bench_json=$(ls -t "$OUT"/*.json 2>/dev/null | head -1)
  if [[ -n "$bench_json" && "${STATUS[bench]}" != ok ]]; then
    "$PY" -m lora_ops.bench --from-json "$bench_json" --summary "${bench_json%.json}.md" \
      --plot "${bench_json%.json}.png" || true
  fi
fi
wanted cppsan && run_phase cppsan 150 10
wanted profile && run_phase profile 45 0
wanted plans && run_phase plans 150 0
wanted race && run_phase race 200 0
rm -f "$OUT"/*.tmp

# pytest's last line; where the phase was stopped before it, the per-test lines counted (-v)
pytest_result() {
  local last
  last=$(grep -E "[0-9]+ (passed|failed|errors?|skipped).* in [0-9.]+s|no tests ran" "$1" 2>/dev/null | tail -1)
  if [[ -n "$last" ]]; then echo "$last"; return; fi
  echo "stopped before its end; per-test lines: $(grep -cE " PASSED( |$)" "$1" 2>/dev/null) passed," \
    "$(grep -cE " (FAILED|ERROR)( |$)" "$1" 2>/dev/null) failed or errors, $(grep -cE " SKIPPED( |$)" "$1" 2>/dev/null) skipped"
}
# The tests that failed, from -v's per-test lines (also where the phase was stopped).
pytest_failures() { grep -oE "(FAILED|ERROR) tests/[^ ]+|tests/[^ ]+ (FAILED|ERROR)" "$1" 2>/dev/null | sort -u | head -30; }
{
  echo "# lora_ops GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $LORA_OPS_COMMIT"
  echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo unknown)"
  echo "- $(grep -E '^torch ' "$OUT/env.txt" | head -1); $(grep -E '^triton ' "$OUT/env.txt" | head -1)"
  echo "- wall time: $(( $(date +%s) - GPU_CHECK_START ))s of a ${GPU_CHECK_TOTAL_S}s budget"
  echo
  echo "| phase | status | seconds |"
  echo "|---|---|---|"
  for name in "${ORDER[@]}"; do echo "| $name | ${STATUS[$name]} | ${TAKEN[$name]} |"; done
  echo
  if wanted probe; then
    grep -E "^probe " "$WORK/probe.txt" 2>/dev/null | sed 's/^/- /'
    [[ -s "$WORK/probe.env" ]] && echo "- switched off for the later phases: $(tr '\n' ' ' < "$WORK/probe.env")"
    [[ -n "${PROBE_DESELECT:-}" ]] && echo "- pytest deselection: -k \"$PROBE_DESELECT\""
  fi
  if wanted test; then
    echo "- pytest, whole suite: $(pytest_result "$WORK/test.txt")"
    pytest_failures "$WORK/test.txt" | sed 's/^/  - /'
  fi
  wanted cppcuda && echo "- test_cuda_kernels: $(grep -E '^test_cuda_kernels: ' "$WORK/cppcuda.txt" 2>/dev/null | tail -1)"
  wanted cppsan && echo "- memcheck on test_cuda_kernels: $(grep -E 'ERROR SUMMARY|not found' "$WORK/cppsan.txt" 2>/dev/null | tail -1)"
  wanted race && echo "- racecheck / synccheck on test_cuda_kernels --smoke: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|cases, .* failed|not found' "$WORK/race.txt" 2>/dev/null | tr '\n' ';')"
  if wanted sanitize; then
    echo "- memcheck on pytest -m cuda -k \"$SANITIZER_SELECT\": $(pytest_result "$WORK/sanitize.txt"); $(grep -E 'ERROR SUMMARY|not found' "$WORK/sanitize.txt" 2>/dev/null | tail -1)"
    grep -q "Device not supported" "$WORK/sanitize.txt" 2>/dev/null && echo "- compute-sanitizer refused this device (seen before on gVisor machines)"
  fi
  echo
  bench_md=$(ls -t "$OUT"/*.json 2>/dev/null | head -1)
  bench_md=${bench_md%.json}.md
  if [[ -f "$bench_md" ]]; then cat "$bench_md"; else echo "(no benchmark results)"; fi
  [[ -f "$OUT/kernels.md" ]] && { echo; cat "$OUT/kernels.md"; }
} > "$OUT/summary.md"
echo "=== gpu_check done in $(( $(date +%s) - GPU_CHECK_START ))s; summary in $OUT/summary.md"
overall=0
for name in "${ORDER[@]}"; do
  printf '%-9s %s\n' "$name" "${STATUS[$name]}"
  [[ "${STATUS[$name]}" == ok ]] || overall=1
done
exec >&- 2>&-
wait "$TEE_PID"
exit $overall
