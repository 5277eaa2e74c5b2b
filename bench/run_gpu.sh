#!/usr/bin/env bash
# The one command a GPU session runs on the device machine (bench/RESULTS.md shows the tool call):
#
#   PRUNEKIT_COMMIT=<sha> bench/run_gpu.sh [stage ...]
#   (default: env build selftest tests sanitize linear decode prune model table; correctness first)
#
# Stages run in the order given:
#   env     nvidia-smi, versions, device properties
#   build   PRUNEKIT_CUDA=ON editable install into $PYTHON for this GPU's architecture only; CUTLASS from a
#           carried .whl/nvidia_cutlass*.whl (or an installed cutlass_library, or CUTLASS_DIR). Any stage
#           that needs prunekit builds first when its CUDA module does not load (a fresh machine).
#   selftest  prunekit selftest --device cuda --strict --json $OUT/selftest.json: every kernel vs its reference
#   tests   PRUNEKIT_REQUIRE_CUDA=1 pytest -m gpu (a missing CUDA build fails instead of skipping)
#   sanitize  compute-sanitizer memcheck on one mma.sp decode call and one sm90 call (bench/sanitize_calls.py)
#   suite   the whole test suite with PRUNEKIT_REQUIRE_CUDA=1 (slow; not in the default list)
#   linear  bench/bench_linear.py $LINEAR_ARGS (decode sizes and the split-K sweep first; every kernel
#           registered with the dispatcher is a provider)      decode bench/bench_decode.py $DECODE_ARGS
#   prune   bench/bench_prune.py $PRUNE_ARGS        model  bench/bench_model.py $MODEL_ARGS
#   table   bench/results_table.py over $OUT/bench_*.json -> $OUT/results.md (printed last); each rendered
#           bench's .md (the same tables) is then removed, so the files stay within the device's 8
#
# Files under $OUT (the device tool brings back 8 at most): run.log (everything printed, sanitizer output
# included), results.md, selftest.json, bench_{linear,decode,prune,model}.json: 7. Without $OUT (not on the device machine) they go to bench/results.
# Time: the device allows 600 s per command, so stages share DEADLINE_S (default 570 s) and each is cut
# at its own limit; benches rewrite their JSON after every case, so a cut stage keeps what it finished.
# Budget (s): build 200 (measured: see bench/RESULTS.md), selftest 90, tests 150, sanitize 75, linear 120,
# decode 90, then prune/model with what is left.
set -uo pipefail
cd "$(dirname "$0")/.."

ALL_STAGES=(env build selftest tests sanitize suite linear decode prune model table)
DEFAULT_STAGES=(env build selftest tests sanitize linear decode prune model table)
usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; }

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=("${DEFAULT_STAGES[@]}")
for s in "${stages[@]}"; do
  case " ${ALL_STAGES[*]} " in
    *" $s "*) ;;
    *) if [ "$s" = -h ] || [ "$s" = --help ]; then usage; exit 0; fi
       echo "run_gpu.sh: unknown stage '$s' (stages: ${ALL_STAGES[*]})" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-bench/results}
mkdir -p "$OUT"
LOG=$OUT/run.log
PY=${PYTHON:-python3}
DEADLINE_S=${DEADLINE_S:-570}
LINEAR_ARGS=${LINEAR_ARGS:---shapes 11008x4096 4096x11008 4096x4096 --M 1 16 64 256 4096 --modes graph --splits 1 2 4 8 16}
PRUNE_ARGS=${PRUNE_ARGS:---shapes 4096x4096,4096x11008 --patterns 0.5,2:4}
DECODE_ARGS=${DECODE_ARGS:---layers 32 --prompt 32 --new-tokens 128}
MODEL_ARGS=${MODEL_ARGS:---blocks 8 --samples 128 --seq-len 2048 --offload both}
export PYTHONUNBUFFERED=1
START=$SECONDS
declare -A STATUS

stage_timeout() {  # the stage's own limit, or what is left of the deadline (minus 20 s for the table)
  local own=$1 left=$((DEADLINE_S - (SECONDS - START) - 20))
  [ "$left" -lt "$own" ] && own=$left
  echo "$own"
}

run_limited() {  # run_limited NAME SECONDS cmd...: timeout with a status line
  local name=$1 limit=$2; shift 2
  if [ "$limit" -lt 30 ]; then echo "== $name: skipped, ${limit}s left of DEADLINE_S=$DEADLINE_S"; return 124; fi
  echo "== $name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "== $name: cut at ${limit}s"
  return $rc
}

install_carried_wheels() {  # wheels carried in .whl/ (device machines have no internet)
  shopt -s nullglob
  local wheels=(.whl/*.whl)
  shopt -u nullglob
  [ ${#wheels[@]} -eq 0 ] && return 0
  echo "== carried wheels: ${wheels[*]##*/}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}

find_cutlass() {  # CUTLASS_DIR from the nvidia-cutlass package (cutlass_library/source/include), if any
  if [ -n "${CUTLASS_DIR:-}" ]; then echo "== CUTLASS_DIR=$CUTLASS_DIR (given)"; return; fi
  local dir
  dir=$("$PY" - <<'EOF'
import importlib.util, os
spec = importlib.util.find_spec("cutlass_library")
if spec and spec.origin:
    source = os.path.join(os.path.dirname(spec.origin), "source")
    if os.path.isdir(os.path.join(source, "include", "cutlass")):
        print(source)
EOF
)
  if [ -n "$dir" ]; then
    export CUTLASS_DIR=$dir
    echo "== CUTLASS_DIR=$CUTLASS_DIR (from cutlass_library)"
  else
    echo "== no CUTLASS (no .whl/nvidia_cutlass*.whl carried, no cutlass_library, CUTLASS_DIR unset):" \
         "building without it; CMake says so if a kernel needs it"
  fi
}

cuda_module_loads() {
  "$PY" -c "import prunekit, sys; sys.exit(0 if prunekit.backends()['cuda']['available'] else 1)" 2>/dev/null
}

stage_env() {
  command -v nvidia-smi >/dev/null && nvidia-smi
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
else:
    print("torch sees no CUDA device")
EOF
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  echo "commit: ${PRUNEKIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
}

stage_build() {
  find_cutlass
  local arch=${CUDA_ARCHS:-$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}' + ('a' if a == 9 else ''))" 2>/dev/null)}
  local define=()
  [ -n "$arch" ] && define=(--config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES="$arch")
  echo "== build for CUDA architectures: ${arch:-CMake default}"
  run_limited build "$(stage_timeout 200)" \
    env PRUNEKIT_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps -q -e . "${define[@]}" || return 1
  "$PY" -c "import prunekit, json; print(json.dumps(prunekit.backends(), indent=1))"
  cuda_module_loads || { echo "== build: the CUDA module does not load (backends above say why)"; return 1; }
}

ensure_built() {
  [ -n "${STATUS[build]:-}" ] && return 0
  cuda_module_loads && return 0
  echo "== prunekit's CUDA module does not load here: building first"
  run_stage build
}

stage_selftest() {
  run_limited selftest "$(stage_timeout 90)" "$PY" -m prunekit.selftest --device cuda --strict --json "$OUT/selftest.json"
}

stage_tests() {
  run_limited tests "$(stage_timeout 150)" \
    env PRUNEKIT_REQUIRE_CUDA=1 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
}

stage_sanitize() {
  local cs
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
  if [ -z "$cs" ]; then echo "== sanitize: compute-sanitizer not found"; return 1; fi
  run_limited sanitize "$(stage_timeout 75)" \
    "$cs" --tool memcheck --error-exitcode 3 --print-limit 20 "$PY" bench/sanitize_calls.py
}

stage_suite() {
  run_limited suite "$(stage_timeout 420)" env PRUNEKIT_REQUIRE_CUDA=1 "$PY" -m pytest -q -p no:cacheprovider tests
}

stage_linear() {
  # shellcheck disable=SC2086  # the *_ARGS are word lists on purpose
  run_limited linear "$(stage_timeout 120)" "$PY" bench/bench_linear.py --out "$OUT" $LINEAR_ARGS
}

stage_decode() {
  # shellcheck disable=SC2086
  run_limited decode "$(stage_timeout 90)" "$PY" bench/bench_decode.py --out "$OUT" $DECODE_ARGS
}

stage_prune() {
  # shellcheck disable=SC2086
  run_limited prune "$(stage_timeout 150)" "$PY" bench/bench_prune.py --out "$OUT" $PRUNE_ARGS
}

stage_model() {
  # shellcheck disable=SC2086
  run_limited model "$(stage_timeout 240)" "$PY" bench/bench_model.py --out "$OUT" $MODEL_ARGS
}

stage_table() {
  shopt -s nullglob
  local files=("$OUT"/bench_*.json)
  shopt -u nullglob
  if [ ${#files[@]} -eq 0 ]; then echo "== table: no $OUT/bench_*.json to render"; return 1; fi
  "$PY" bench/results_table.py "${files[@]}" -o "$OUT/results.md" || return 1
  local f
  for f in "${files[@]}"; do rm -f "${f%.json}.md"; done  # their tables are in results.md now
}

run_stage() {
  local name=$1 t0=$SECONDS rc
  echo
  echo "===== $name ($((SECONDS - START))s elapsed) ====="
  case $name in
    selftest|tests|sanitize|suite|linear|decode|prune|model) ensure_built || { STATUS[$name]="not run: build failed"; return 1; } ;;
  esac
  "stage_$name"
  rc=$?
  if [ $rc -eq 0 ]; then STATUS[$name]="ok ($((SECONDS - t0))s)"; else STATUS[$name]="FAILED rc=$rc ($((SECONDS - t0))s)"; fi
  echo "== $name: ${STATUS[$name]}"
  return $rc
}

main() {
  echo "run_gpu.sh ${stages[*]} | $(date -u '+%Y-%m-%d %H:%M UTC') | OUT=$OUT | DEADLINE_S=$DEADLINE_S"
  install_carried_wheels
  local failed=0
  for s in "${stages[@]}"; do
    run_stage "$s" || failed=1
  done
  echo
  echo "===== summary ($((SECONDS - START))s) ====="
  for s in "${stages[@]}"; do echo "$s: ${STATUS[$s]:-not run}"; done
  [ -f "$OUT/results.md" ] && { echo; cat "$OUT/results.md"; }
  return $failed
}

main 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
