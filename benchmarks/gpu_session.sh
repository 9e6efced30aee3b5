#!/usr/bin/env bash
# Check and measure everything on a GPU machine in one run of under 9 minutes (about 530 s of stage budgets).
#
#   OUT=/some/folder bash benchmarks/gpu_session.sh            # on a CUDA machine
#   OUT=/tmp/dry bash benchmarks/gpu_session.sh --dry-run      # on a CPU machine: every stage in its CPU smoke form
#
# The machine needs torch (CUDA), triton, pytest, hypothesis, numpy; no package registry is used (offline install,
# the CUDA extension built for sm_90 only, FASTRESNET_CUDA_ARCH overrides). Each stage has its own time budget and
# writes its log and rows under $OUT as soon as it finishes, so a stage that overruns loses only itself; a summary
# table comes last. Afterwards: copy $OUT/*.jsonl into benchmarks/results/ and run
# `python -m benchmarks.report --write-readme`.
#
# Stages (budget in seconds):
#   install   120  pip install -e . offline, extension for sm_90
#   env        15  python -m fastresnet.info
#   ceilings   20  1 GiB device copy, 8192² bf16 matmul (inside conv_shapes and models rows too)
#   tests     150  GPU-marked tests, the kernel and op tests on CUDA tensors, the whole-net judge's tests
#   numerics   60  the whole-net judge table (python -m fastresnet.numerics --device cuda)
#   conv       45  per-shape conv timings, tier B vs tier A vs cuDNN, with floors (preact_resnet164/1001, bf16)
#   overhead   15  host cost of a training step on tiny CUDA tensors (launch-bound), kernels per step, vs eager
#   models     85  training step of preact_resnet110/164/1001, bf16, batch 128, channels_last: eager, eager + CUDA
#                  graph, torch.compile (164 only: compiling 1001 layers takes minutes), and fastresnet's fastest
#                  backend ± graph: triton_conv, which times its own conv against tier A per layer shape
#   memory     20  peak memory per checkpoint mode, preact_resnet164
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder that comes back}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

# stage NAME BUDGET CMD...: run CMD with a time limit, log to $OUT/NAME.log, record status and seconds
stage() {
  local name=$1 budget=$2
  shift 2
  local t0=$(date +%s)
  timeout "$budget" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local status=ok
  [ $rc -eq 124 ] && status="timed out"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="exit $rc"
  printf '%-9s %-10s %4ss  (log: %s.log)\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$name" | tee -a "$SUMMARY"
}

if [ $DRY -eq 1 ]; then
  export TRITON_INTERPRET=1 FASTRESNET_HYPOTHESIS_EXAMPLES=3
  DEVICE=cpu SMOKE=--cpu-smoke
else
  unset TRITON_INTERPRET  # compiled Triton: the test modules put their tensors on the GPU
  DEVICE=cuda SMOKE=
  # setup.py turns a failed extension build into a warning: fail the stage instead (the tests would only skip)
  stage install 120 bash -c 'FASTRESNET_CUDA_ARCH=90 python3 -m pip install --no-index --no-deps --no-build-isolation \
    -e . && python3 -c "import fastresnet._C as C; assert C.with_cuda, \"fastresnet._C built without CUDA\""'
fi

stage env 15 python3 -m fastresnet.info
if [ $DRY -eq 1 ]; then
  TESTS=(tests/test_numerics_judge.py -k "cuda and float32 and preact_resnet32")
else
  TESTS=(-m gpu tests tests/test_numerics_judge.py tests/test_properties.py tests/test_triton_conv.py
         tests/test_triton_kernels.py tests/test_cuda_ext.py tests/test_functional.py)
fi
stage tests 150 python3 -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/tests.xml" "${TESTS[@]}"
if [ $DRY -eq 1 ]; then
  stage numerics 60 python3 -m fastresnet.numerics --device cpu --backends cuda --dtypes float32 \
    --nets preact_resnet32 --out "$OUT/numerics.jsonl"
else
  stage numerics 60 python3 -m fastresnet.numerics --device cuda --out "$OUT/numerics.jsonl"
fi
stage conv 45 python3 -m benchmarks.bench_conv_shapes $SMOKE --out "$OUT/conv_shapes.jsonl"
if [ $DRY -eq 1 ]; then
  stage overhead 15 python3 -m benchmarks.bench_overhead --smoke --device cpu --out "$OUT/overhead.jsonl"
else
  stage overhead 15 python3 -m benchmarks.bench_overhead --models preact_resnet110 --reps 7 --out "$OUT/overhead.jsonl"
fi
if [ $DRY -eq 1 ]; then
  stage models 85 python3 -m benchmarks.bench_models --cpu-smoke --out "$OUT/models.jsonl"
else
  stage models 85 python3 -m benchmarks.bench_models --models preact_resnet110,preact_resnet164,preact_resnet1001 \
    --dtypes bf16 --batch 128 --compile-models preact_resnet164 --time-budget 70 \
    --providers "eager,eager+graph,compile,fastresnet:triton_conv,fastresnet:triton_conv+graph" \
    --out "$OUT/models.jsonl"
fi
stage memory 20 python3 -m benchmarks.bench_memory $SMOKE --depths 164 --no-plot --out "$OUT/memory.jsonl"

python3 - "$OUT" <<'PY' | tee -a "$SUMMARY"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def rows(name):
    p = out / name
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []
num = rows("numerics.jsonl")
if num:
    bad = [r for r in num if not r["ok"]]
    print(f"numerics: {len(num)} rows, {len(bad)} failing" + "".join(
        f"\n  FAIL {r['net']} {r['backend']} {r['dtype']} chained={r['chained']} {r['layout']}: {r['failures']}"
        for r in bad))
for r in rows("models.jsonl"):
    if r.get("status") == "ok":
        print(f"models: {r['model']:18s} {r['provider']:24s} {r['ms_per_step']:8.2f} ms/step  "
              f"{(r.get('peak_mem_bytes') or 0) / 2**30:6.2f} GiB  x{r.get('speedup_vs_eager') or 0:.2f} eager")
    else:
        print(f"models: {r['model']:18s} {r['provider']:24s} {r.get('status')}: {(r.get('reason') or '')[:80]}")
shapes = [r for r in rows("conv_shapes.jsonl") if r.get("status") == "ok"]
for r in shapes:
    print(f"conv: {r['model']} x{r['x_shape']} w{r['w_shape']} s{r['stride']} {r['provider']:6s} "
          f"{r['ms']:.4f} ms, floor {r['floor_ms']:.4f} ms")
PY
echo "total $(( $(date +%s) - START ))s" | tee -a "$SUMMARY"
