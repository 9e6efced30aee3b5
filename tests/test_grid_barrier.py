"""Tier A's launches with a grid barrier (`kernels.bn_relu.stats_bn_relu_forward`, the fused BN backward) against the
separate launches they replace (FASTRESNET_GRID_BARRIER=0), with the same partition: bitwise equal, NaN/Inf and
N = 0 included; closeness to float64; running statistics as nn.BatchNorm2d's; the barrier's counters zero after.

Under the interpreter a launch with P > 1 programs runs its two phases as two launches (a spin cannot end there);
on a GPU the same tests run the cooperative launch with the barrier.
"""
import os

import torch

from fastresnet.kernels import interpreting  # does not import triton

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

import pytest  # noqa: E402

if not interpreting() and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is not 1 and there is no CUDA GPU: the Triton kernels cannot run",
                allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

from fastresnet.backends import get_backend_impl  # noqa: E402
from fastresnet.kernels import bn_relu as kbn  # noqa: E402
from fastresnet.kernels import stats as kstats  # noqa: E402

DEVICE = "cpu" if interpreting() else "cuda"
BLOCK_M = 16  # small chunks: several row tiles on small shapes


def make(shape, seed=0, nhwc=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (1.5 + 2.0 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)
    return x.contiguous(memory_format=torch.channels_last) if nhwc else x


def running(c, dtype=torch.float32):
    return (torch.zeros(c, dtype=dtype, device=DEVICE), torch.ones(c, dtype=dtype, device=DEVICE),
            torch.zeros((), dtype=torch.int64, device=DEVICE))


def fused(x, programs, momentum=0.1, affine=True):
    """stats_bn_relu_forward: (a, spec, running buffers)."""
    c = x.shape[1]
    dtype = kstats.acc_dtype(x.dtype)
    w = torch.linspace(0.5, 1.5, c, dtype=torch.float32, device=DEVICE) if affine else None
    b = torch.linspace(-0.3, 0.4, c, dtype=torch.float32, device=DEVICE) if affine else None
    buffers = running(c, dtype)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    spec = kstats.bn_affine(torch.empty(c, dtype=dtype, device=DEVICE), torch.empty(c, dtype=dtype, device=DEVICE),
                            1e-5, w, b, buffers + (count, momentum), from_input=True)
    a = kbn.stats_bn_relu_forward(x, spec, block_m=BLOCK_M, programs=programs)
    return a, spec, buffers, (w, b)


def separate(x, programs, wb, momentum=0.1):
    """batch_stats then bn_relu_forward, with the partition of `fused` (T = P row tiles of BLOCK_M-row chunks)."""
    c = x.shape[1]
    buffers = running(c, kstats.acc_dtype(x.dtype))
    tiles = kbn.persistent_config(x, BLOCK_M, programs)["T"] if x.numel() and programs else None
    mean, var = kstats.batch_stats(x, block_m=BLOCK_M, tiles=tiles)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    spec = kstats.bn_affine(mean, var, 1e-5, *wb, buffers + (count, momentum))
    a = kbn.bn_relu_forward(x, None, None, affine=spec)
    return a, spec, buffers


def same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # bitwise, NaN where NaN


def counters_zero():
    assert int(kstats.launch_counters(1, torch.device(DEVICE)).abs().sum()) == 0


# (N, C, H, W), programs: one program (the barrier launch), 3 (one merge level), 7 (two levels: groups of 3)
CASES = [((2, 5, 4, 3), 1), ((2, 5, 4, 6), 3), ((4, 70, 5, 5), 7)]


@pytest.mark.parametrize("shape,programs", CASES)
@pytest.mark.parametrize("nhwc", [True, False], ids=["nhwc", "nchw"])
def test_forward_equals_separate_launches(shape, programs, nhwc):
    x = make(shape, nhwc=nhwc)
    assert kbn.persistent_config(x, BLOCK_M, programs)["T"] == programs  # the partition the case means
    a, spec, buffers, wb = fused(x, programs)
    a_ref, ref, ref_buffers = separate(x, programs, wb)
    same(a, a_ref)
    for name in ("mean", "var", "rstd", "scale", "shift"):
        same(getattr(spec, name), getattr(ref, name))
    for got, want in zip(buffers, ref_buffers):
        same(got, want)
    assert int(buffers[2]) == 1
    counters_zero()


def test_barrier_launch_equals_split_launches(monkeypatch):
    # P = 1: the one launch through the barrier and the two phase launches give the same bits
    x = make((2, 70, 4, 3))  # two channel blocks
    a, spec, _, _ = fused(x, 1)

    def split(kernel, cfg, *args, **meta):
        for phase in (1, 2):
            kernel[(cfg["T"], -(-cfg["C"] // cfg["BLOCK_C"]))](*args, PHASE=phase, **meta)

    monkeypatch.setattr(kbn, "launch_persistent", split)
    a2, spec2, _, _ = fused(x, 1)
    same(a, a2)
    same(spec.mean, spec2.mean)
    same(spec.var, spec2.var)


def test_forward_close_to_float64_and_batchnorm():
    x = make((3, 6, 5, 4), seed=1)
    a, spec, buffers, (w, b) = fused(x, 3, momentum=0.1)
    bn = torch.nn.BatchNorm2d(6, momentum=0.1).double().to(DEVICE)
    with torch.no_grad():
        bn.weight.copy_(w)
        bn.bias.copy_(b)
    want = torch.relu(bn(x.double()))
    xd = x.double()
    # fp32 statistics and activation of a float64 reference: a few fp32 ulps of |x| ~ 5 (summation and rounding)
    torch.testing.assert_close(spec.mean.double(), xd.mean((0, 2, 3)), rtol=0, atol=1e-5)
    torch.testing.assert_close(spec.var.double(), xd.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buffers[0].double(), bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(buffers[1].double(), bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(buffers[2]) == int(bn.num_batches_tracked) == 1


def test_forward_cumulative_momentum_and_float64():
    x = make((2, 3, 4, 4), seed=2, dtype=torch.float64)
    a, spec, buffers, wb = fused(x, 3, momentum=None)
    a_ref, ref, ref_buffers = separate(x, 3, wb, momentum=None)
    same(a, a_ref)
    for got, want in zip(buffers, ref_buffers):
        same(got, want)


def test_forward_nan_inf_and_empty_batch():
    x = make((2, 4, 4, 3), seed=3)
    x[0, 1, 2, 1] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    x[0, 3, 1, 1] = -float("inf")
    a, spec, buffers, wb = fused(x, 3)
    a_ref, ref, ref_buffers = separate(x, 3, wb)
    same(a, a_ref)
    same(spec.mean, ref.mean)
    same(spec.var, ref.var)
    assert torch.isnan(spec.mean[1]) and torch.isnan(a[:, 1]).all()
    for got, want in zip(buffers, ref_buffers):
        same(got, want)
    empty = make((0, 4, 3, 3))
    a, spec, buffers, wb = fused(empty, 3)
    a_ref, ref, ref_buffers = separate(empty, 3, wb)
    assert a.shape == empty.shape and torch.isnan(spec.mean).all() and torch.isnan(spec.var).all()
    for got, want in zip(buffers, ref_buffers):
        same(got, want)
    assert int(buffers[2]) == 1  # an empty batch only counts


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,programs", CASES[1:])
def test_backward_equals_separate_launches(shape, programs, training, monkeypatch):
    x = make(shape, seed=4)
    dy = make(shape, seed=5)
    dres = make(shape, seed=6)
    x[0, 1, 0, 0] = 50.0  # far above the channel's mean: the ReLU passes the NaN gradient there
    dy[0, 1, 0, 0] = float("nan")
    _, spec, _, _ = fused(x, programs)
    args = (dy, x, spec.scale, spec.shift, spec.mean, spec.rstd, training, dres)
    got = kbn.bn_relu_backward(*args, block_m=BLOCK_M, tiles=programs)
    counters_zero()
    monkeypatch.setenv("FASTRESNET_GRID_BARRIER", "0")
    want = kbn.bn_relu_backward(*args, block_m=BLOCK_M, tiles=programs)
    for g, w in zip(got, want):
        same(g, w)
    assert torch.isnan(got[1][1]) and torch.isfinite(got[1][0])


def test_switch(monkeypatch):
    backend = get_backend_impl("triton")
    assert backend.stats_in_bn_relu and not get_backend_impl("triton_conv").stats_in_bn_relu
    monkeypatch.setenv("FASTRESNET_GRID_BARRIER", "0")
    assert not backend.stats_in_bn_relu
    monkeypatch.setenv("FASTRESNET_GRID_BARRIER", "maybe")
    with pytest.raises(ValueError, match="FASTRESNET_GRID_BARRIER"):
        backend.stats_in_bn_relu


def test_separate_launches_where_no_barrier_launch_fits(monkeypatch):
    # `persistent_config` refuses (on a GPU: more channel blocks than SMs, or too long a walk): the forward runs the
    # statistics pass and the BN-ReLU forward (the default tiling), the backward its separate launches
    x = make((2, 5, 4, 6), seed=7)
    a_ref, ref, ref_buffers = separate(x, None, fused(x, 1)[3])
    monkeypatch.setattr(kbn, "persistent_config", lambda *args: None)
    a, spec, buffers, _ = fused(x, None)
    same(a, a_ref)
    same(spec.mean, ref.mean)
    same(spec.var, ref.var)
    for got, want in zip(buffers, ref_buffers):
        same(got, want)
    dy = make((2, 5, 4, 6), seed=8)
    args = (dy, x, spec.scale, spec.shift, spec.mean, spec.rstd, True)
    got = kbn.bn_relu_backward(*args)
    monkeypatch.setenv("FASTRESNET_GRID_BARRIER", "0")
    for g, w in zip(got, kbn.bn_relu_backward(*args)):
        same(g, w)
