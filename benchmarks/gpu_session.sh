#!/usr/bin/env bash
# Check and measure everything on a GPU machine in one run that ends by its own deadline (GPU_RUN_SECONDS, 390 s),
# so that with the machine's cold start and the transfers the whole call stays under 9 minutes.
#
#   OUT=/some/folder bash benchmarks/gpu_session.sh            # on a CUDA machine
#   OUT=/tmp/dry bash benchmarks/gpu_session.sh --dry-run      # on a CPU machine: every stage in its CPU smoke form
#   GPU_STAGES=overhead,models OUT=... bash benchmarks/gpu_session.sh   # only these stages (a rerun)
#
# The machine needs torch (CUDA), triton, pytest, hypothesis, numpy, compute-sanitizer; no package registry is used
# (offline install, the CUDA kernels built for sm_90 only; FASTRESNET_CUDA_ARCH overrides).
#
# What comes back: $OUT holds exactly three files, rewritten after every stage (a run killed from outside still
# returns what it finished) and once more at the end, also when a stage fails, times out or the script is stopped:
#   summary.txt   every stage's status, seconds and budget; the sanitizer result by kernel name, the numerics
#                 table, the host-path table (overhead), the model step table (models), the conv timings
#   rows.jsonl    every row of every stage, tagged with "stage"
#   logs.tar.gz   every stage's log (install.log included), the sanitizer logs, the pytest junit XML files
# `python -m benchmarks.gpu_outputs` packs them and checks the limits on what the GPU machine returns (at most 8
# files of at most 16 MiB, two folders deep, names of letters, digits, '.', '_', '-'); the run fails if $OUT breaks
# them. Afterwards: `python -m benchmarks.gpu_outputs split $OUT/rows.jsonl benchmarks/results` and
# `python -m benchmarks.report --write-readme`.
#
# Stage budgets, in seconds. A stage's time limit is its budget plus whatever the stages before it left unused,
# and never more than leaves every later stage its own budget before the deadline (less PACK_RESERVE for the last
# pack). The call is sized as: machine start 60-120 s (device README: "a minute or more") + transfers about 20 s +
# this script's 390 s = at most 530 s, under 540.
#   install   60  pip install -e . offline, the extension for sm_90. Measured on the 2-core CPU build machine
#                 (torch 2.13 CPU, g++ 12, nvcc 13.0, machine shared and loaded): nvcc of csrc/cuda/bn_kernels.cu
#                 alone takes 6.7 s CPU for sm_90 and 11.1 s for sm_80 + sm_90; the C++ sources, each one compile
#                 of the torch headers, 137 s CPU for the three CPU ones (ops.cpp, the slowest, 55 s alone);
#                 bn_cuda.cpp (torch's CUDA headers) cannot compile there, count it as another ops.cpp. With 16
#                 jobs the five compiles run side by side, so the build takes about its slowest file, ~55 s of one
#                 core here; the GPU machine's cores are taken to be no slower. pip's own work, the link and the
#                 import check add about 5 s: 60 s. Without the extension no later stage measures anything, so the
#                 install may run on to 150 s (MIN_LIMIT); what it overruns comes out of the last stages' shares.
#   env        8  python -m fastresnet.info, nvidia-smi, nvcc and compute-sanitizer versions, the host CPU
#   sanitize  40  benchmarks.sanitize_kernels: the calls plainly (Triton compiles), then under memcheck, racecheck
#   tests     45  half: the kernel and op test files on CUDA tensors; half: every gpu-marked test (xdist, 8 workers)
#   numerics  30  the whole-net judge table (python -m fastresnet.numerics --device cuda)
#   conv      15  per-shape conv timings, tier B vs tier A vs cuDNN (preact_resnet164/1001, bf16)
#   overhead  92  the host paths: preact_resnet110, then 1001, batch 8 at 32x32, bf16, in interleaved rounds:
#                 eager, ext (C++ nodes), ext/python-node, triton, triton_conv, each also as one CUDA graph;
#                 ms/step, then kernels per BN-ReLU-conv layer from one profiled step per provider while 25 s of
#                 the stage remain (a profiled 1000-layer step takes seconds to read back: 1001 may go unprofiled)
#   models    80  training step at batch 128, bf16: the same providers and compile (preact_resnet110), with peak
#                 memory; cells that would start in the stage's last 15 s are recorded as skipped
#   memory    10  peak memory per checkpoint mode, preact_resnet164, with what time is left
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder that comes back}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-session.XXXXXX")
export PYTHONUNBUFFERED=1
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
START=$(date +%s)
ORDER=()
for s in install env sanitize tests numerics conv overhead models memory; do
  [[ ",${GPU_STAGES:-$s}," == *",$s,"* ]] && ORDER+=("$s")
done
declare -A BUDGET=([install]=60 [env]=8 [sanitize]=40 [tests]=45 [numerics]=30 [conv]=15 [overhead]=92
                   [models]=80 [memory]=10)
declare -A MIN_LIMIT=([install]=150)
# the dry run's CPU smoke stages cost about what the GPU stages do, but on a shared CPU machine that runs them
# several times slower when loaded: its limits (and deadline) are the GPU ones times GPU_BUDGET_SCALE, 3 by default
SCALE=${GPU_BUDGET_SCALE:-$((DRY == 1 ? 3 : 1))}
for s in "${!BUDGET[@]}"; do BUDGET[$s]=$((BUDGET[$s] * SCALE)); done
for s in "${!MIN_LIMIT[@]}"; do MIN_LIMIT[$s]=$((MIN_LIMIT[$s] * SCALE)); done
DEADLINE=$((START + ${GPU_RUN_SECONDS:-$((390 * SCALE))}))
PACK_RESERVE=10
FAILED=0

finish() {
  trap - EXIT INT TERM
  python3 -m benchmarks.gpu_outputs pack --tables "$WORK" "$OUT" || FAILED=1
  echo "total $(( $(date +%s) - START ))s"
  cat "$OUT/summary.txt" 2>/dev/null
  rm -rf "$WORK"
  exit $FAILED
}
trap finish EXIT
trap 'FAILED=1; exit' INT TERM

# stage NAME CMD...: run CMD with the stage's time limit (also in $STAGE_SECONDS), log to NAME.log, record the
# status and seconds in stages.tsv, then pack $OUT
stage() {
  local name=$1 later=0 seen=0 s
  shift
  [[ " ${ORDER[*]} " == *" $name "* ]] || return 0
  for s in "${ORDER[@]}"; do
    [ $seen -eq 1 ] && later=$((later + BUDGET[$s]))
    [ "$s" = "$name" ] && seen=1
  done
  local limit=$((DEADLINE - PACK_RESERVE - $(date +%s) - later)) floor=${MIN_LIMIT[$name]:-0} t0 rc status
  [ $limit -lt $floor ] && limit=$floor
  t0=$(date +%s)
  if [ $limit -lt 1 ]; then
    status="no time"
  else
    STAGE_SECONDS=$limit timeout --kill-after=5 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    status=ok
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="timed out"
    [ $rc -ne 0 ] && [ "$status" = ok ] && status="exit $rc"
  fi
  [ "$status" = ok ] || FAILED=1
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$limit" >>"$WORK/stages.tsv"
  printf '%-9s %-10s %4ss of %ss\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$limit"
  python3 -m benchmarks.gpu_outputs pack "$WORK" "$OUT" >/dev/null || FAILED=1
}
export WORK

if [ $DRY -eq 1 ]; then
  export TRITON_INTERPRET=1 FASTRESNET_HYPOTHESIS_EXAMPLES=3
  stage install python3 -c "import fastresnet._C, fastresnet.kernels; print('extension and kernels import')"
  stage env python3 -m fastresnet.info
  stage sanitize python3 -m benchmarks.sanitize_kernels --out "$WORK/sanitize.jsonl" --log-dir "$WORK"
  stage tests bash -c 'python3 -m pytest -q -rs -p no:cacheprovider --junitxml="$WORK/tests_ops.xml" \
      tests/test_gpu_session.py -k "reports or cover or split or check"; a=$?
    python3 -m pytest -q -rs -p no:cacheprovider --junitxml="$WORK/tests_gpu.xml" -m gpu tests/test_ext_backend.py
    b=$?; [ $b -eq 5 ] && b=0; exit $((a | b))'
  stage numerics python3 -m fastresnet.numerics --device cpu --backends cuda --dtypes float32 \
    --nets preact_resnet32 --out "$WORK/numerics.jsonl"
  stage conv python3 -m benchmarks.bench_conv_shapes --cpu-smoke --out "$WORK/conv.jsonl"
  stage overhead python3 -m benchmarks.bench_overhead --smoke --device cpu --out "$WORK/overhead.jsonl"
  stage models python3 -m benchmarks.bench_models --cpu-smoke \
    --providers "eager,eager+graph,fastresnet:ext/python-node+graph" --out "$WORK/models.jsonl"
  stage memory python3 -m benchmarks.bench_memory --cpu-smoke --depths 11 --modes eager,none --no-plot \
    --out "$WORK/memory.jsonl"
  exit
fi

unset TRITON_INTERPRET  # compiled Triton: the test modules put their tensors on the GPU
# setup.py turns a failed extension build into a warning: fail the stage instead (the tests would only skip)
stage install bash -c 'FASTRESNET_CUDA_ARCH=90 MAX_JOBS=16 python3 -m pip install --no-index --no-deps \
    --no-build-isolation -e . && python3 -c "import fastresnet._C as C, fastresnet.kernels
assert C.with_cuda, \"fastresnet._C built without CUDA\"; print(\"extension with CUDA for sm_\" + C.cuda_archs)"'
stage env bash -c 'python3 -m fastresnet.info && { nvidia-smi; nvcc --version; compute-sanitizer --version
  grep -m1 "model name" /proc/cpuinfo; nproc; free -g; true; }'
stage sanitize bash -c 'python3 -m benchmarks.sanitize_kernels --out "$WORK/sanitize.jsonl" --log-dir "$WORK" \
  --budget $((STAGE_SECONDS - 3))'
XDIST=()
python3 -c "import xdist" 2>/dev/null && XDIST=(-n 8)
export XDIST_ARGS="${XDIST[*]}"
stage tests bash -c 'half=$((STAGE_SECONDS / 2))
  timeout "$half" python3 -m pytest -q -rs -p no:cacheprovider $XDIST_ARGS --junitxml="$WORK/tests_ops.xml" \
    tests/test_grid_barrier.py tests/test_ext_backend.py tests/test_triton_conv.py tests/test_triton_kernels.py \
    tests/test_functional.py tests/test_numerics_judge.py tests/test_properties.py; a=$?
  FASTRESNET_GRID_BARRIER=0 timeout 120 python3 -m pytest -q -rs -p no:cacheprovider \
    --junitxml="$WORK/tests_no_barrier.xml" tests/test_triton_kernels.py -k "backward"; c=$?
  timeout $((STAGE_SECONDS - half - 124)) python3 -m pytest -q -rs -p no:cacheprovider $XDIST_ARGS \
    --junitxml="$WORK/tests_gpu.xml" -m gpu tests; b=$?
  exit $((a | b | c))'
stage numerics python3 -m fastresnet.numerics --device cuda --out "$WORK/numerics.jsonl"
stage conv python3 -m benchmarks.bench_conv_shapes --out "$WORK/conv.jsonl"
export PROVIDERS="eager*,fastresnet:ext*,fastresnet:triton*"
stage overhead bash -c 'python3 -m benchmarks.bench_overhead --models preact_resnet110,preact_resnet1001 --batch 8 \
  --image-size 32 --dtype bf16 --warmup 2 --reps 5 --providers "$PROVIDERS" --time-budget $((STAGE_SECONDS - 25)) \
  --out "$WORK/overhead.jsonl"'
stage models bash -c 'python3 -m benchmarks.bench_models --models preact_resnet110,preact_resnet1001 --dtypes bf16 \
  --batch 128 --compile-models preact_resnet110 --providers "$PROVIDERS,compile" \
  --time-budget $((STAGE_SECONDS - 15)) --out "$WORK/models.jsonl"'

stage memory python3 -m benchmarks.bench_memory --depths 164 --no-plot --out "$WORK/memory.jsonl"
