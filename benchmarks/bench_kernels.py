"""Micro benchmarks of each fused primitive, per backend, against the "torch" reference (docs/architecture.md §5).

    pytest benchmarks/bench_kernels.py --benchmark-only          # GPU: CIFAR and ImageNet shapes
    FASTRESNET_BENCH_DEVICE=cpu pytest benchmarks/bench_kernels.py --benchmark-only   # tiny, labelled cpu

Ops are the backend methods themselves (`fastresnet.backends.base.Backend`), so the numbers are the kernels', not
the custom-op or autograd wrappers': batch_stats, bn_relu, bn_relu_backward (training), add_stats, bn_relu_conv
(forward) and bn_relu_conv_backward (dgrad + wgrad). Each is timed with pytest-benchmark's pedantic mode: a round
is `INNER` back-to-back calls with one device synchronisation after the last (see `SyncEvery`), so a per-call time
is launch-to-completion of the round / INNER.

Reported next to the time: GB/s = the fewest bytes the op must move / time — batch_stats reads x; bn_relu reads x
and writes a; bn_relu_backward and add_stats read two tensors and write one (a two-pass kernel moves more: the
figure is an effective bandwidth against that floor) — and TFLOP/s = 2·MACs / time for the conv ops (backward:
dgrad + wgrad, 4·MACs). Both as a share of the device's ceilings measured in the same run: a large device-to-device
copy (GB/s = 2·bytes / time) and a large bf16 matmul (TFLOP/s). Rows (JSON Lines) go to $FASTRESNET_BENCH_OUT or
<$FASTRESNET_BENCH_DIR or ./benchmark-results>/kernels_<device>_<run id>.jsonl at the end; on CPU they are smoke.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest
import torch

from benchmarks import common
from fastresnet import reference
from fastresnet.backends import BACKEND_NAMES, get_backend_impl

DEVICE = common.resolve_device(os.environ.get("FASTRESNET_BENCH_DEVICE"))
ON_GPU = DEVICE.type == "cuda"
BACKENDS = ["torch"] + [b for b in BACKEND_NAMES if b not in ("auto", "torch")]  # the reference first
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# BN inputs [N, C, H, W]: preact_resnet164's widest CIFAR tensor, and an ImageNet stage-1 tensor (both larger than
# an H100's 50 MB L2 once read and written, so the GB/s are DRAM figures).
BN_SHAPES = [(128, 64, 32, 32), (128, 256, 56, 56)] if ON_GPU else [(4, 16, 8, 8)]
# (x shape, weight shape, stride, padding): CIFAR bottleneck 3×3 and 1×1, ImageNet stage-1 3×3
CONV_SHAPES = ([((128, 16, 32, 32), (16, 16, 3, 3), 1, 1), ((128, 64, 32, 32), (16, 64, 1, 1), 1, 0),
                ((128, 64, 56, 56), (64, 64, 3, 3), 1, 1)] if ON_GPU else [((4, 8, 8, 8), (8, 8, 3, 3), 1, 1)])
INNER, ROUNDS = (20, 20) if ON_GPU else (1, 3)
ROWS: List[Dict[str, object]] = []
ENV = common.environment(DEVICE)  # one run: one date and run id for every row


class SyncEvery:
    """Calls fn; every n-th call also waits for the device. With pedantic(iterations=n) each timed round is n
    calls from the first launch to the completion of the last kernel (the counter starts at 0 and pedantic runs
    whole rounds, so the synchronisation always closes a round)."""

    def __init__(self, fn: Callable[[], object], n: int):
        self.fn, self.n, self.calls = fn, n, 0

    def __call__(self) -> None:
        self.fn()
        self.calls += 1
        if self.calls % self.n == 0:
            common.synchronize(DEVICE)


@pytest.fixture(scope="module")
def ceilings() -> Dict[str, object]:
    """The device's measured ceilings, once per run: 1 GiB copy and 8192² bf16 matmul on a GPU (64 MiB, 256² on
    CPU)."""
    return common.ceilings(DEVICE)


@pytest.fixture(scope="module", autouse=True)
def _write_rows():
    """After the module: ratios to the torch reference, then the rows to the results file."""
    yield
    if not ROWS:
        return
    ref = {(r["op"], r["dtype"], str(r["shape"])): r["us"] for r in ROWS if r["backend"] == "torch" and r.get("us")}
    for r in ROWS:
        base = ref.get((r["op"], r["dtype"], str(r["shape"])))
        r["speedup_vs_torch"] = base / r["us"] if base and r.get("us") else None
    out = os.environ.get("FASTRESNET_BENCH_OUT") or common.default_out("kernels", ROWS[0])
    common.write_rows(Path(out), ROWS)
    ROWS.clear()


def _bn_inputs(shape, dtype: torch.dtype):
    """x with a non-zero mean (as post-ReLU and residual tensors have), its stats and a near-identity affine."""
    x = (-2.3 + 0.5 * torch.randn(shape, device=DEVICE)).to(dtype).contiguous(memory_format=torch.channels_last)
    mean, var = reference.batch_stats(x)
    rstd = torch.rsqrt(var + 1e-5)
    gamma = 1 + 0.1 * torch.randn(shape[1], device=DEVICE)
    beta = 0.1 * torch.randn(shape[1], device=DEVICE)
    scale, shift = reference.scale_shift(mean, rstd, gamma, beta)
    return x, mean, rstd, scale, shift


def _case(op: str, backend: str, dtype: torch.dtype, spec) -> Tuple[Callable[[], object], float, float]:
    """(call, bytes floor, flops) of one op on one backend."""
    impl = get_backend_impl(backend)
    if op in ("bn_relu_conv", "bn_relu_conv_backward"):
        x_shape, w_shape, stride, padding = spec
        x, mean, rstd, scale, shift = _bn_inputs(x_shape, dtype)
        w = (torch.randn(w_shape, device=DEVICE) * 0.1).to(dtype).contiguous(memory_format=torch.channels_last)
        st, pd = [stride, stride], [padding, padding]
        y = reference.bn_relu_conv(x, scale, shift, w, st, pd)
        macs = y.numel() * w_shape[1] * w_shape[2] * w_shape[3]
        if op == "bn_relu_conv":
            return (lambda: impl.bn_relu_conv(x, scale, shift, w, st, pd),
                    (x.numel() + y.numel() + w.numel()) * x.element_size(), 2.0 * macs)
        dy = torch.randn_like(y)
        return (lambda: impl.bn_relu_conv_backward(dy, x, scale, shift, mean, rstd, w, st, pd, True),
                (2 * x.numel() + y.numel() + 2 * w.numel()) * x.element_size(), 4.0 * macs)
    x, mean, rstd, scale, shift = _bn_inputs(spec, dtype)
    nbytes = x.numel() * x.element_size()
    if op == "batch_stats":
        return (lambda: impl.batch_stats(x)), nbytes, 0.0
    if op == "bn_relu":
        return (lambda: impl.bn_relu(x, scale, shift, dtype)), 2 * nbytes, 0.0
    if op == "bn_relu_backward":
        dy = torch.randn_like(x)
        return (lambda: impl.bn_relu_backward(dy, x, scale, shift, mean, rstd, True)), 3 * nbytes, 0.0
    if op == "add_stats":
        b = torch.randn_like(x)
        return (lambda: impl.add_stats(x, b)), 3 * nbytes, 0.0
    raise ValueError(f"op: unknown op {op!r}")


BN_OPS = ("batch_stats", "bn_relu", "bn_relu_backward", "add_stats")
CONV_OPS = ("bn_relu_conv", "bn_relu_conv_backward")
CASES = [(op, s) for op in BN_OPS for s in BN_SHAPES] + [(op, s) for op in CONV_OPS for s in CONV_SHAPES]


def _case_id(case) -> str:
    op, spec = case
    shape = spec if op in BN_OPS else spec[0] + spec[1]
    return f"{op}-" + "x".join(str(v) for v in shape)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_kernel(benchmark, ceilings, case, backend, dtype):
    op, spec = case
    shape = list(spec) if op in BN_OPS else [list(spec[0]), list(spec[1]), spec[2], spec[3]]
    row = dict(ENV, bench="kernels", smoke=not ON_GPU, op=op, backend=backend, dtype=dtype,
               shape=shape, **ceilings)
    probe = torch.empty(2, 4, 2, 2, device=DEVICE, dtype=DTYPES[dtype])
    skip = common.backend_skip(backend, probe)
    if skip is not None:
        ROWS.append(dict(row, status=skip[0], reason=skip[1]))
        pytest.skip(f"{backend}: {skip[1]}")
    torch.manual_seed(0)
    fn, nbytes, flops = _case(op, backend, DTYPES[dtype], spec)
    benchmark.group = f"{_case_id(case)} {dtype}"
    benchmark.pedantic(SyncEvery(fn, INNER), rounds=ROUNDS, iterations=INNER, warmup_rounds=1)
    if not benchmark.stats:  # --benchmark-disable: the op ran once, nothing was timed
        return
    sec = benchmark.stats.stats.median
    row.update(status="ok", reason=None, us=sec * 1e6, bytes=nbytes, gbps=nbytes / sec / 1e9,
               tflops=flops / sec / 1e12 if flops else None)
    row["pct_of_copy"] = 100 * row["gbps"] / row["ceiling_copy_gbps"]
    row["pct_of_matmul"] = 100 * row["tflops"] / row["ceiling_matmul_tflops"] if flops else None
    benchmark.extra_info.update({k: row[k] for k in ("gbps", "pct_of_copy", "tflops", "pct_of_matmul")})
    ROWS.append(row)
