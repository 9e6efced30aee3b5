#!/usr/bin/env bash
# GPU validation on the device machine (issue "GPU validation"), one stage per device call (each < 10 minutes):
#   bash benchmarks/gpu_session.sh test    # install offline, build the CUDA extension, run the whole suite on the GPU
#   bash benchmarks/gpu_session.sh bench   # the benchmark matrix, memory scaling and kernel benchmarks
# The machine has torch/triton/pytest but no package registry: the install uses what is there (--no-index).
# Logs and result rows go under $OUT (the device tool copies them back); copy the rows into benchmarks/results/
# and run `python -m benchmarks.report --write-readme` here afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder that comes back}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled Triton: the test modules then put their tensors on the GPU

python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { tail -40 "$OUT/install.log"; exit 1; }
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, triton, fastresnet, fastresnet._C as C
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())
print("extension with CUDA:", C.with_cuda, "backends:", fastresnet.available_backends())
PY

case "${1:-test}" in
  test)
    timeout 540 python3 -m pytest -q -rs tests -p no:cacheprovider --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
    ;;
  bench)
    timeout 330 python3 -m benchmarks.bench_models --time-budget 300 --out "$OUT/models.jsonl" 2>&1 | tee "$OUT/models.log"
    timeout 150 python3 -m benchmarks.bench_memory --out "$OUT/memory.jsonl" 2>&1 | tee "$OUT/memory.log"
    FASTRESNET_BENCH_OUT="$OUT/kernels.jsonl" timeout 90 python3 -m pytest -q benchmarks/bench_kernels.py \
      --benchmark-only -p no:cacheprovider 2>&1 | tee "$OUT/kernels.log"
    ;;
  *) echo "usage: $0 test|bench" >&2; exit 2 ;;
esac
