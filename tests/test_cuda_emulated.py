"""The CUDA kernels of csrc/cuda/bn_kernels.cu executed on CPU under the checking emulator (tests/cuda_emu).

The kernels and their launchers (grid and block arithmetic included) of this checkout are compiled by g++ with
AddressSanitizer and UndefinedBehaviorSanitizer around a header that emulates the CUDA execution model: each block's
threads run as fibers, switched at __syncthreads(), in three schedules (in order, reversed, seeded shuffle) whose
outputs must be bitwise equal; every buffer and each block's shared memory is an exact-size heap allocation; a
thread exiting while others wait at a barrier is an error. The results are checked against fastresnet/reference.py
as the CPU kernels are (tests/test_ext_backend.py: same cases, same error bound), and large launch geometries run a
sample of their blocks (the first, the last, the last along each grid axis, seeded random ones).
"""
from __future__ import annotations

import concurrent.futures
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
from test_ext_backend import CASES, _check, _make, _stat_vecs

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"

pytestmark = [
    pytest.mark.emulated,
    # one worker under pytest-xdist: one emulator build, and one session log for test_every_global_kernel_ran
    pytest.mark.xdist_group("cuda_emu"),
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
    # dx's terms cancel (exactly so for M = 2): its error bound scales with them, as in test_ext_backend
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


@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
def test_nan_propagates_through_bn_relu(driver, nhwc):
    """relu(NaN) is NaN in PyTorch (and in the reference)."""
    x = torch.randn(2, 8, 3, 4)
    x[0, 3, 1, 2] = float("nan")
    scale, shift = torch.ones(8), torch.zeros(8)
    res = runner.run(driver, "bn_relu", {"x": _layout(x, nhwc), "scale": scale, "shift": shift},
                     dtype=torch.float32, nhwc=nhwc)
    torch.testing.assert_close(res.out["out"], reference.bn_relu(x, scale, shift), equal_nan=True, atol=0, rtol=0)


# ---- launch geometry of the real shapes, a sample of the blocks ---------------------------------------------------
# (N, C, H, W, NHWC, dtype): CIFAR stages 1–3 at batch 128 (basic and bottleneck widths) and ImageNet widths: the
# stem's 64 channels at 112² with tiles of two base tiles (M = 313,600 > 1024·256, the last tile ragged), 2048
# channels at 7² (2048 partial blocks, scalar elementwise rows of 49), and NCHW tiles of two base tiles (M > 1024·4096).
GEOMETRIES = [(128, 16, 32, 32, True, torch.bfloat16), (128, 128, 16, 16, False, torch.float32),
              (128, 256, 8, 8, True, torch.float16), (25, 64, 112, 112, True, torch.bfloat16),
              (64, 2048, 7, 7, False, torch.float32), (512, 1, 95, 97, False, torch.float32)]
SAMPLE = 6  # blocks per launch of more blocks: first, last, last along x and along y, random ones


def _sampled_channels(res, name, finalize, c, m):
    """{channel: rows of the [M, C] view} that the sampled blocks of partial launch `name` reduced, for the channels
    whose block of launch `finalize` (32 channels each) ran."""
    (launch,) = [l for l in res.launches if l.name == name]
    (fin,) = [l for l in res.launches if l.name == finalize]
    finalized = {b[0] for b in fin.blocks}
    tiles, length = res.tiling
    assert launch.grid[0] == tiles <= 1024 and launch.grid[1] == (-(-c // 32) if launch.block[1] > 1 else c)
    assert launch.blocks[-1] == (launch.grid[0] - 1, launch.grid[1] - 1, 0)  # the last, ragged block ran
    rows = {}
    for tile, group, _ in launch.blocks:
        chans = range(32 * group, min(c, 32 * group + 32)) if launch.block[1] > 1 else [group]
        for ch in (ch for ch in chans if ch // 32 in finalized):
            rows.setdefault(ch, []).append(torch.arange(tile * length, min(m, (tile + 1) * length)))
    assert rows  # the first and the last channel always: both launches run their first and last blocks
    return {ch: torch.cat(r) for ch, r in rows.items()}


def _written(t):
    """The mask of elements a sampled launch wrote (outputs start as 0xFF bytes, NaN)."""
    mask = ~torch.isnan(t)
    assert mask.any()
    return mask


@pytest.mark.parametrize("n,c,h,w,nhwc,dtype", GEOMETRIES)
def test_real_launch_geometry_sampled(driver, n, c, h, w, nhwc, dtype):
    eps32 = torch.finfo(torch.float32).eps
    # every result below is a sum of at most 32 sequential terms per thread, ≤ 8 levels of a block tree, 32 per
    # finalize lane and 5 levels: at most 80 roundings on the way, so |error| ≤ 100·eps·Σ|terms|
    tol = 100 * eps32
    x = _layout(torch.randn(n, c, h, w) * 2 + 3, nhwc).to(dtype)
    m = n * h * w
    xm = x.permute(0, 2, 3, 1).reshape(m, c)  # [M, C]: row j of channel c is element j of its reduction

    res = runner.run(driver, "batch_stats", {"x": x}, dtype=dtype, nhwc=nhwc, sample=SAMPLE, schedules=(0, 2))
    for ch, rows in _sampled_channels(res, "moments_partial_kernel", "moments_finalize_kernel", c, m).items():
        v = xm[rows, ch].double()
        assert abs(res.out["mean"][ch].item() - v.mean().item()) <= tol * v.abs().max().item()
        assert abs(res.out["var"][ch].item() - v.var(unbiased=False).item()) <= tol * (v - v.mean()).square().max().item()

    mean, rstd = torch.full((c,), 3.0), torch.full((c,), 0.5)
    scale, shift = torch.linspace(-1.5, 2.0, c) * rstd, torch.linspace(0.5, -0.5, c)
    res = runner.run(driver, "bn_relu", {"x": x, "scale": scale, "shift": shift}, dtype=dtype, nhwc=nhwc,
                     sample=SAMPLE, schedules=(0, 2))
    out = res.out["out"]
    mask = _written(out)
    assert torch.equal(out[mask], reference.bn_relu(x, scale, shift)[mask])
    assert max(l.grid[0] * l.grid[1] for l in res.launches) <= 4096  # the elementwise grid is capped, rows stride

    dy = _layout(torch.randn(n, c, h, w), nhwc).to(dtype)
    res = runner.run(driver, "bn_relu_backward", {"dy": dy, "dres": None, "x": x, "scale": scale, "shift": shift,
                                                  "mean": mean, "rstd": rstd},
                     dtype=dtype, nhwc=nhwc, sample=SAMPLE, schedules=(0, 2))

    def dz_of(xv, dyv, ch):  # dz with the mask as the kernel computes it, in fp32
        return torch.where(xv.float() * scale[ch] + shift[ch] > 0, dyv.double(), 0.0)

    dym = dy.permute(0, 2, 3, 1).reshape(m, c)
    for ch, rows in _sampled_channels(res, "bwd_partial_kernel", "bwd_finalize_kernel", c, m).items():
        dz = dz_of(xm[rows, ch], dym[rows, ch], ch)
        t1, t2 = dz, dz * (xm[rows, ch].double() - 3.0)
        assert abs(res.out["sum_dz"][ch].item() - t1.sum().item()) <= tol * t1.abs().sum().item()
        assert abs(res.out["sum_dz_xhat"][ch].item() - 0.5 * t2.sum().item()) <= tol * 0.5 * t2.abs().sum().item()
    mask = _written(res.out["dx"])
    ch = torch.arange(c).view(1, -1, 1, 1).expand(x.shape)[mask]
    coef = res.out["coef"].double()
    terms = [coef[0][ch] * dz_of(x[mask], dy[mask], ch), coef[1][ch] * (x[mask].double() - 3.0), coef[2][ch]]
    dx64 = sum(terms)
    err = (res.out["dx"][mask].double() - dx64).abs()
    # one rounding to the storage dtype (subnormals included) after a few fp32 operations on the terms
    fi = torch.finfo(dtype)
    bound = fi.eps * (dx64.abs() + fi.tiny) + 8 * eps32 * sum(t.abs() for t in terms)
    assert (err <= bound).all(), err.max()


# ---- the emulator catches what it is for ----------------------------------------------------------------------------
# Textual edits of the real source: a barrier removed from the reductions' tree (a shared-memory race) and the
# channel bound of the reductions loosened by one (an out-of-bounds read and write for C off the 32-channel groups).
BREAKS = {
    "missing_barrier": ("    __syncthreads();\n    if (idx < half)", "    if (idx < half)", "SCHEDULE MISMATCH"),
    "bound_off_by_one": ("if (c >= g.C) return false;", "if (c > g.C) return false;", "heap-buffer-overflow"),
}


@pytest.mark.slow  # two more emulator builds (about 25 s of CPU each)
def test_broken_copies_fail(driver, tmp_path):
    source = (CSRC / "cuda" / "bn_kernels.cu").read_text()
    sources = {}
    for name, (old, new, _) in BREAKS.items():
        assert source.count(old) == 1, name
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(CSRC / "cuda" / "bn_kernels.h", folder)
        (folder / "bn_kernels.cu").write_text(source.replace(old, new))
        sources[name] = folder / "bn_kernels.cu"
    with concurrent.futures.ThreadPoolExecutor(len(sources)) as pool:
        drivers = dict(zip(sources, pool.map(lambda k: emu_build.build(tmp_path / f"{k}_build", sources[k]), sources)))
    x = _make((3, 33, 5, 5), 0.5, 1.0, "nhwc", torch.float32)
    runner.run(driver, "batch_stats", {"x": x}, dtype=torch.float32, nhwc=True)  # the real kernels pass
    for name, broken in drivers.items():
        with pytest.raises(runner.EmulatorError, match=BREAKS[name][2]):
            runner.run(broken, "batch_stats", {"x": x}, dtype=torch.float32, nhwc=True)


def test_every_global_kernel_ran(emu_log, request):
    """Every __global__ kernel of csrc/ was launched by the emulated tests of this session (run this module whole,
    or `pytest -m emulated`). Under pytest-xdist the module's tests share one worker (the module's xdist group,
    which pytest-xdist marks by appending "@cuda_emu" to the node id)."""
    if "PYTEST_XDIST_WORKER" in os.environ and "@" not in request.node.nodeid:
        pytest.skip("pytest-xdist's groups are not in effect, so this module's tests may have run on several "
                    "workers: run `pytest -m emulated` without -n")
    kernels = set()
    for path in CSRC.rglob("*.cu"):
        kernels |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", path.read_text()))
    assert len(kernels) >= 7
    path, start = emu_log
    with open(path) as f:
        f.seek(start)
        launched = set(f.read().split())
    assert kernels <= launched, f"never launched under the emulator: {sorted(kernels - launched)}"
