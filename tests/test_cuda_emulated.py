"""The CUDA kernels of csrc/cuda/bn_kernels.cu executed on CPU under the checking emulator (tests/cuda_emu).

The kernels and their launchers (grid and block arithmetic included) of this checkout are compiled by g++ with
AddressSanitizer and UndefinedBehaviorSanitizer around a header that emulates the CUDA execution model: each block's
threads run as fibers, switched at __syncthreads(), in three schedules (in order, reversed, seeded shuffle) whose
outputs must be bitwise equal; every buffer and each block's shared memory is an exact-size heap allocation; a
thread exiting while others wait at a barrier is an error. The results are checked against fastresnet/reference.py
as the CPU kernels are (tests/test_cuda_ext.py: same cases, same error bound), and large launch geometries run a
sample of their blocks (the first, the last, the last along each grid axis, seeded random ones).
"""
from __future__ import annotations

import itertools
import os
import pathlib
import re
import shutil
import subprocess

import pytest
import torch

from cuda_emu import build as emu_build
from cuda_emu import runner
from fastresnet import reference
from test_cuda_ext import CASES, _check, _make, _stat_vecs

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"

pytestmark = [
    pytest.mark.emulated,
    pytest.mark.skipif(shutil.which("g++") is None or emu_build.cuda_include_dir() is None,
                       reason="the CUDA emulator needs g++ and the CUDA toolkit headers (cuda_fp16.h)"),
]


@pytest.fixture(scope="session")
def emu_log(tmp_path_factory):
    """FASTRESNET_EMU_LOG for the drivers of this session (a file of the session unless the caller set one), and the
    offset where this session's lines start."""
    path = os.environ.get("FASTRESNET_EMU_LOG") or str(tmp_path_factory.mktemp("emu_log") / "kernels.log")
    os.environ["FASTRESNET_EMU_LOG"] = path
    start = os.path.getsize(path) if os.path.exists(path) else 0
    return pathlib.Path(path), start


@pytest.fixture(scope="session")
def driver(tmp_path_factory, emu_log):
    return emu_build.build(tmp_path_factory.mktemp("emu_build"))


def _layout(t, nhwc):
    return t.contiguous(memory_format=torch.channels_last) if nhwc else t


def _cases(dtypes):
    """Every dtype in both layouts, the shapes of CASES taken in turn (odd sizes, C = 3 / 24 / 33 off the 32-channel
    and vector widths, N·H·W = 2, a mean of 1000 with std 0.5)."""
    combos = list(itertools.product(dtypes, (False, True)))
    return [pytest.param(d, nhwc, CASES[i % len(CASES)], id=f"{d}-{'nhwc' if nhwc else 'nchw'}-case{i % len(CASES)}")
            for i, (d, nhwc) in enumerate(combos)]


FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---- the launchers against the reference ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,nhwc,case", _cases(FLOATS))
def test_batch_stats(driver, dtype, nhwc, case):
    x = _make(*case, "nhwc" if nhwc else "nchw", dtype)
    res = runner.run(driver, "batch_stats", {"x": x}, dtype=dtype, nhwc=nhwc)
    ref_mean, ref_var = reference.batch_stats(x)
    m64, v64 = reference.batch_stats(x.double())
    _check("mean", res.out["mean"], ref_mean, m64)
    _check("var", res.out["var"], ref_var, v64)


@pytest.mark.parametrize("dtype,nhwc,case", _cases((torch.float32, torch.bfloat16, torch.float16)))
def test_add_stats(driver, dtype, nhwc, case):
    a = _make(*case, "nhwc" if nhwc else "nchw", dtype)
    b = _layout(_make(case[0], 0.1, 1.0, "nchw", dtype), nhwc)
    res = runner.run(driver, "add_stats", {"a": a, "b": b}, dtype=dtype, nhwc=nhwc)
    ref_y, ref_mean, ref_var = reference.add_stats(a, b)
    assert torch.equal(res.out["y"], ref_y)  # the same add in fp32, rounded once
    m64, v64 = reference.batch_stats(ref_y.double())
    _check("mean", res.out["mean"], ref_mean, m64)
    _check("var", res.out["var"], ref_var, v64)


BN_RELU_TYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                 (torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.float64, torch.float64)]


@pytest.mark.parametrize("types,nhwc,case", _cases(BN_RELU_TYPES))
@pytest.mark.parametrize("misalign", [False, True], ids=["aligned", "misaligned"])
def test_bn_relu(driver, types, nhwc, case, misalign):
    """Aligned pointers take the 16-byte vector kernels where a row holds whole vectors; misaligned ones the scalar
    kernels: both give the reference's bits (one fp32 multiply-add, one rounding)."""
    dtype, out_dtype = types
    x = _make(*case, "nhwc" if nhwc else "nchw", dtype)
    _, _, scale, shift = _stat_vecs(x)
    res = runner.run(driver, "bn_relu", {"x": x, "scale": scale, "shift": shift}, dtype=dtype, gdtype=out_dtype,
                     nhwc=nhwc, misalign=misalign)
    torch.testing.assert_close(res.out["out"], reference.bn_relu(x, scale, shift, out_dtype), atol=0, rtol=0)


BACKWARD_TYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                  (torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)]


@pytest.mark.parametrize("types,nhwc,case", _cases(BACKWARD_TYPES))
def test_bn_relu_backward(driver, types, nhwc, case):
    dtype, dy_dtype = types
    x = _make(*case, "nhwc" if nhwc else "nchw", dtype)
    training, with_dres = hash((dtype, dy_dtype, nhwc)) % 2 == 0, nhwc  # both of each over the table
    dy = _layout(torch.randn(x.shape).to(dy_dtype), nhwc)
    dres = _layout(torch.randn(x.shape).to(dy_dtype), nhwc) if with_dres else None
    mean, rstd, scale, shift = _stat_vecs(x)
    res = runner.run(driver, "bn_relu_backward",
                     {"dy": dy, "dres": dres, "x": x, "scale": scale, "shift": shift, "mean": mean, "rstd": rstd},
                     dtype=dtype, gdtype=dy_dtype, nhwc=nhwc, training=training)
    ref = reference.bn_relu_backward(dy, x, scale, shift, mean, rstd, training, dres)
    r64 = reference.bn_relu_backward(dy.double(), x.double(), scale.double(), shift.double(), mean.double(),
                                     rstd.double(), training, None if dres is None else dres.double())
    # dx's terms cancel (exactly so for M = 2): its error bound scales with them, as in test_cuda_ext
    m = x.numel() // x.shape[1]
    xhat = ((x.double() - mean.double().view(1, -1, 1, 1)) * rstd.double().view(1, -1, 1, 1)).abs().max()
    terms = scale.abs().max() * (dy.abs().max().double() + r64[1].abs().max() / m + xhat * r64[2].abs().max() / m)
    _check("dx", res.out["dx"], ref[0], r64[0], magnitude=terms.item() + (0 if dres is None else dres.abs().max().item()))
    _check("sum_dz", res.out["sum_dz"], ref[1], r64[1])
    _check("sum_dz_xhat", res.out["sum_dz_xhat"], ref[2], r64[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("from_var", [True, False], ids=["bn_affine", "scale_shift"])
def test_bn_affine(driver, dtype, from_var):
    c = 300  # two blocks of 256 threads, the second ragged
    mean = torch.randn(c, dtype=dtype) * 3
    var = torch.rand(c, dtype=dtype) * 2
    gamma, beta = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    rstd = torch.rsqrt(var + 1e-5)
    inputs = {"mean": mean, "gamma": gamma, "beta": beta, **({"var": var} if from_var else {"rstd": rstd})}
    res = runner.run(driver, "bn_affine", inputs, dtype=dtype, eps=1e-5)
    scale, shift = reference.scale_shift(mean, rstd, gamma, beta)
    if from_var:
        # the emulator's rsqrt is the correctly rounded 1/sqrt; ATen's CPU rsqrt and CUDA's rsqrtf are within 2 ulp
        torch.testing.assert_close(res.out["rstd"], rstd, rtol=2 * torch.finfo(dtype).eps, atol=0)
        scale, shift = reference.scale_shift(mean, res.out["rstd"], gamma, beta)
    torch.testing.assert_close(res.out["scale"], scale, atol=0, rtol=0)  # one rounding per operation, as ATen
    torch.testing.assert_close(res.out["shift"], shift, atol=0, rtol=0)


# ---- bitwise promises: a fixed reduction order --------------------------------------------------------------------
@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
def test_reductions_bitwise_reproducible(driver, nhwc):
    """Several tiles per channel (M = 4800: NCHW 2, NHWC 19) merged in a fixed order: the same bits for every schedule of every block
    (the driver compares in-order, reversed and shuffled runs), for other shuffle seeds, and for misaligned pointers
    (the reductions read scalars either way)."""
    x = _layout(torch.randn(3, 10, 40, 40) * 3 + 5, nhwc)
    dy = _layout(torch.randn(x.shape), nhwc)
    mean, rstd, scale, shift = _stat_vecs(x)
    inputs = {"dy": dy, "dres": None, "x": x, "scale": scale, "shift": shift, "mean": mean, "rstd": rstd}
    runs = [runner.run(driver, "bn_relu_backward", inputs, dtype=torch.float32, nhwc=nhwc, seed=seed, misalign=mis)
            for seed, mis in ((0, False), (1, False), (2, True))]
    assert runs[0].tiling[0] > 1
    for r in runs[1:]:
        for name in ("sum_dz", "sum_dz_xhat", "dx"):
            assert torch.equal(r.out[name], runs[0].out[name]), name
    stats = [runner.run(driver, "batch_stats", {"x": x}, dtype=torch.float32, nhwc=nhwc, seed=s) for s in (3, 4)]
    assert all(torch.equal(stats[0].out[k], stats[1].out[k]) for k in ("mean", "var"))


# ---- NaN ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
def test_nan_reaches_the_statistics(driver, nhwc):
    x = torch.randn(2, 33, 3, 5)
    x[1, 7, 2, 4] = float("nan")
    res = runner.run(driver, "batch_stats", {"x": _layout(x, nhwc)}, dtype=torch.float32, nhwc=nhwc)
    ref_mean, ref_var = reference.batch_stats(x)
    torch.testing.assert_close(res.out["mean"], ref_mean, equal_nan=True, rtol=1e-5, atol=1e-6)  # fp32 order only
    torch.testing.assert_close(res.out["var"], ref_var, equal_nan=True, rtol=1e-5, atol=1e-6)


@pytest.mark.xfail(reason="NaN propagation fixed on another branch", strict=True)
@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
def test_nan_propagates_through_bn_relu(driver, nhwc):
    """relu(NaN) is NaN in PyTorch (and in the reference)."""
    x = torch.randn(2, 8, 3, 4)
    x[0, 3, 1, 2] = float("nan")
    scale, shift = torch.ones(8), torch.zeros(8)
    res = runner.run(driver, "bn_relu", {"x": _layout(x, nhwc), "scale": scale, "shift": shift},
                     dtype=torch.float32, nhwc=nhwc)
    torch.testing.assert_close(res.out["out"], reference.bn_relu(x, scale, shift), equal_nan=True, atol=0, rtol=0)
