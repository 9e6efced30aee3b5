"""Triton tier-A kernels (`fastresnet.kernels`, backend "triton") against `fastresnet.reference`.

Runs on CPU under the Triton interpreter (TRITON_INTERPRET=1, set below before triton is imported when the
variable is unset and there is no GPU) or on a CUDA GPU with compiled kernels. Low-precision results are judged
against a float64 reference, allowing at most 2× the error plain PyTorch (the reference ops) makes in the same
dtype plus a small absolute slack. Note: the Triton 3.9 interpreter rounds fp32 → bf16 by truncation (the GPU
rounds to nearest even), i.e. up to 1 bf16 ulp instead of 0.5 — still within the 2× allowance.
"""
import os

import torch

from fastresnet.kernels import interpreting  # does not import triton

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
INTERPRET = interpreting()  # as Triton reads TRITON_INTERPRET

import pytest  # noqa: E402

if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is not 1 and there is no CUDA GPU: the Triton kernels cannot run",
                allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

from fastresnet import reference  # noqa: E402
from fastresnet.backends import BackendUnsupportedError, get_backend_impl, resolve  # noqa: E402
from fastresnet.kernels import stats as kstats  # noqa: E402
from fastresnet.kernels.add_stats import add_stats  # noqa: E402
from fastresnet.kernels.bn_relu import bn_relu_backward, bn_relu_forward  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
BACKEND = get_backend_impl("triton")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Slack on top of 2× torch's error, per dtype, relative to the output magnitude: fp32/fp64 results of the same
# formula differ only by summation order (a few ulps); fp16 2e-3 ≈ 2 ulps; bf16 1.6e-2 ≈ 2 ulps, needed under the
# interpreter, whose truncating fp32 → bf16 store errs by up to 1 ulp (measured max 1.6e-2 vs torch's 4.9e-3).
ATOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (N, C, H, W): odd spatial sizes, C not a multiple of the block (3, 24, 33), N·H·W = 2
SHAPES = [(2, 3, 7, 7), (1, 24, 5, 3), (2, 33, 1, 1), (3, 16, 4, 5)]
LAYOUTS = ["nchw", "nhwc", "strided"]


def make(shape, dtype, layout="nchw", kind="shifted", seed=0):
    """A test tensor: "shifted" = −2.3 + 0.5·randn (non-zero mean), "large" = 1000 + randn (|μ| ≫ σ).
    layout "strided" gives a non-dense view (every other column of a wider tensor)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    full = (n, c, h, 2 * w) if layout == "strided" else shape
    base = torch.randn(full, generator=g, dtype=torch.float64)
    base = (-2.3 + 0.5 * base) if kind == "shifted" else (1000.0 + base)
    t = base.to(dtype).to(DEVICE)
    if layout == "nhwc":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        t = t[..., ::2]
        assert not t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last)
    return t


def channel_vec(c, seed, lo=0.5, hi=1.5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(c, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_exact(fused, torch_out, exact, dtype, scale=1.0, name=""):
    """fused error ≤ 2 × torch's error + ATOL (relative to the output's magnitude `scale`)."""
    e_fused, e_torch = err(fused, exact), err(torch_out, exact)
    assert e_fused <= 2 * e_torch + ATOL[dtype] * scale, f"{name}: fused err {e_fused:.3g}, torch err {e_torch:.3g}"


def check_stats(mean, var, rmean, rvar, mean64, var64):
    """Statistics are computed in the accumulation dtype from the stored values whatever the storage dtype, so
    they are judged at that precision: 2× torch's error plus ATOL[acc] relative to the magnitude (|μ| up to 1000).
    The variance bound is relative to var itself: one-pass E[x²] − E[x]² in fp32 misses it by ~|μ|²·1e-7 ≈ 0.1
    (10% of var ≈ 1) when μ ≈ 1000, which this would catch."""
    acc = mean.dtype
    assert_close_to_exact(mean, rmean, mean64, acc, scale=max(1.0, mean64.abs().max().item()), name="mean")
    assert_close_to_exact(var, rvar, var64, acc, scale=max(1.0, var64.max().item()), name="var")


# ---- batch statistics ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["shifted", "large"])
def test_batch_stats(shape, layout, dtype, kind):
    x = make(shape, dtype, layout, kind)
    mean, var = BACKEND.batch_stats(x)
    assert mean.dtype == var.dtype == kstats.acc_dtype(dtype) and mean.shape == (shape[1],)
    mean64, var64 = reference.batch_stats(x.double())  # exact statistics of the stored values
    rmean, rvar = reference.batch_stats(x)
    check_stats(mean, var, rmean, rvar, mean64, var64)


def test_batch_stats_large_mean_beats_one_pass():
    """The large-mean case is a real trap: one-pass fp32 statistics miss the variance by far more than the kernel."""
    x = make((2, 8, 8, 8), torch.float32, "nhwc", "large")
    _, var = BACKEND.batch_stats(x)
    _, var64 = reference.batch_stats(x.double())
    one_pass = (x.square().mean(dim=(0, 2, 3)) - x.mean(dim=(0, 2, 3)).square())
    assert err(one_pass, var64) > 100 * err(var, var64)
    assert err(var, var64) < 1e-4


# ---- BN + ReLU forward ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_relu_forward(shape, layout, dtype):
    x = make(shape, dtype, layout)
    c = shape[1]
    acc = kstats.acc_dtype(dtype)
    scale, shift = channel_vec(c, 1, dtype=acc), channel_vec(c, 2, -1.0, 3.0, dtype=acc)
    a = BACKEND.bn_relu(x, scale, shift, dtype)
    assert a.dtype == dtype and a.shape == x.shape
    expect_cl = layout == "nhwc" and not x.is_contiguous()
    assert a.is_contiguous(memory_format=torch.channels_last if expect_cl else torch.contiguous_format)
    exact = reference.bn_relu(x.double(), scale.double(), shift.double())
    assert_close_to_exact(a, reference.bn_relu(x, scale, shift), exact, dtype, scale=exact.abs().max().item())


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_bn_relu_forward_out_dtype(out_dtype):
    """Autocast case: fp32 BN input, activation written in the conv's low-precision dtype."""
    x = make((2, 24, 5, 3), torch.float32, "nhwc")
    scale, shift = channel_vec(24, 1), channel_vec(24, 2, -1.0, 3.0)
    a = bn_relu_forward(x, scale, shift, out_dtype)
    assert a.dtype == out_dtype
    exact = reference.bn_relu(x.double(), scale.double(), shift.double())
    assert_close_to_exact(a, reference.bn_relu(x, scale, shift, out_dtype), exact, out_dtype,
                          scale=exact.abs().max().item())


# ---- BN + ReLU backward --------------------------------------------------------------------------------------------
def _bwd_case(shape, dtype, layout, kind="shifted", dres=False):
    x = make(shape, dtype, layout, kind)
    c = shape[1]
    mean64, var64 = reference.batch_stats(x.double())
    acc = kstats.acc_dtype(dtype)
    mean, rstd = mean64.to(acc), torch.rsqrt(var64 + 1e-5).to(acc)
    gamma, beta = channel_vec(c, 3, dtype=acc), channel_vec(c, 4, -0.5, 0.5, dtype=acc)
    scale, shift = reference.scale_shift(mean, rstd, gamma, beta)
    dy = make(shape, dtype, "nchw", seed=5) + 2.3  # zero-mean upstream gradient, NCHW even when x is not
    r = make(shape, dtype, layout, seed=6) if dres else None
    return dy, x, scale, shift, mean, rstd, r


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training,dres", [(True, False), (True, True), (False, True)])
def test_bn_relu_backward(shape, layout, dtype, training, dres):
    args = _bwd_case(shape, dtype, layout, dres=dres)
    dy, x, scale, shift, mean, rstd, r = args
    out = BACKEND.bn_relu_backward(dy, x, scale, shift, mean, rstd, training, r)
    ref = reference.bn_relu_backward(dy, x, scale, shift, mean, rstd, training, r)
    exact = reference.bn_relu_backward(*(None if t is None else t.double() for t in args[:6]), training,
                                       None if r is None else r.double())
    assert out[0].dtype == dtype and out[0].shape == x.shape
    assert out[1].dtype == out[2].dtype == kstats.acc_dtype(dtype)
    m = x.numel() // shape[1]
    for name, o, t, e, mag in zip(("dx", "sum_dz", "sum_dz_xhat"), out, ref, exact, (1.0, m ** 0.5, m ** 0.5)):
        assert_close_to_exact(o, t, e, dtype, scale=mag * max(1.0, e.abs().max().item()), name=name)


def test_bn_relu_backward_large_mean():
    """|μ| ≫ σ: dx must not lose the (x − μ) term to cancellation."""
    args = _bwd_case((2, 24, 4, 4), torch.float32, "nhwc", kind="large")
    out = BACKEND.bn_relu_backward(*args[:6], True)
    exact = reference.bn_relu_backward(*(t.double() for t in args[:6]), True)
    # fp32 x near 1000 is exact to 6e-5, x̂ to ~6e-5·rstd ≈ 6e-5: errors of order 1e-4 relative to dx ~ 1
    for name, o, e in zip(("dx", "sum_dz", "sum_dz_xhat"), out, exact):
        assert err(o, e) <= 1e-3 * max(1.0, e.abs().max().item()), name


# ---- residual add with statistics ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_stats(shape, layout, dtype):
    a, b = make(shape, dtype, layout), make(shape, dtype, "nchw", "large", seed=7)
    y, mean, var = BACKEND.add_stats(a, b)
    assert y.dtype == dtype and y.shape == a.shape
    ry, _, _ = reference.add_stats(a, b)
    assert_close_to_exact(y, ry, a.double() + b.double(), dtype, scale=1000.0, name="y")
    # statistics are those of the stored (rounded) y
    mean64, var64 = reference.batch_stats(y.double())
    rmean, rvar = reference.batch_stats(y)
    check_stats(mean, var, rmean, rvar, mean64, var64)


# ---- many tiles, int64 offsets, determinism ------------------------------------------------------------------------
def _multi_tile_calls(x, block_m, tiles):
    """Every reduction with a forced tiling (ITERS > 1 chunks per tile, T > 1 partials, ragged last tile)."""
    c = x.shape[1]
    mean64, var64 = reference.batch_stats(x.double())
    mean, rstd = mean64.float(), torch.rsqrt(var64 + 1e-5).float()
    scale, shift = reference.scale_shift(mean, rstd, channel_vec(c, 3), channel_vec(c, 4, -0.5, 0.5))
    dy = torch.empty_like(x).copy_(make(tuple(x.shape), torch.float32, "nchw", seed=5) + 2.3)  # x's layout
    return (kstats.batch_stats(x, block_m=block_m, tiles=tiles),
            bn_relu_backward(dy, x, scale, shift, mean, rstd, True, block_m=block_m, tiles=tiles),
            add_stats(x, dy, block_m=block_m, tiles=tiles),
            (dy, scale, shift, mean, rstd))


def _check_multi_tile(x, block_m, tiles):
    """The reductions of `_multi_tile_calls` against the reference."""
    (mean, var), bwd, (y, ymean, yvar), (dy, scale, shift, rmean, rstd) = _multi_tile_calls(x, block_m, tiles)
    mean64, var64 = reference.batch_stats(x.double())
    check_stats(mean, var, *reference.batch_stats(x), mean64, var64)
    exact = reference.bn_relu_backward(dy.double(), x.double(), scale.double(), shift.double(), rmean.double(),
                                       rstd.double(), True)
    for name, o, e in zip(("dx", "sum_dz", "sum_dz_xhat"), bwd, exact):
        assert err(o, e) <= 1e-3 * max(1.0, e.abs().max().item()), name
    check_stats(ymean, yvar, *reference.batch_stats(y), *reference.batch_stats(y.double()))


@pytest.mark.parametrize("block_m,tiles", [(16, 3), (16, 100), (32, 1)])
def test_multi_tile_matches_reference(block_m, tiles):
    _check_multi_tile(make((2, 24, 7, 7), torch.float32, "nhwc", "large"), block_m, tiles)  # M = 98: ragged


def test_gpu_row_blocks(monkeypatch):
    """The GPU rule of `tile_config` (132 SMs, shapes only: meta tensors): every BN-ReLU / statistics pass of a CIFAR
    net at batch 128 has at least one program per SM and at most 4·SMs partials (the merges' bound); stage 3
    (M = 8,192 × 64 channels) gets 32-row chunks, one per program; larger passes keep 4,096-element chunks.
    Then the kernels run with that rule on a small tensor (16-row chunks, more partials than the interpreter's
    default) and match the reference."""
    monkeypatch.setattr(kstats, "_device_sms", lambda x: 132)
    for c, hw in ((16, 32), (64, 32), (32, 16), (128, 16), (64, 8), (256, 8)):
        cfg = kstats.tile_config(torch.empty(128, c, hw, hw, device="meta"))
        programs = cfg["T"] * -(-c // cfg["BLOCK_C"])
        assert programs >= 132 and cfg["T"] <= 4 * 132, (c, hw, cfg)
    stage3 = kstats.tile_config(torch.empty(128, 64, 8, 8, device="meta"))
    assert (stage3["BLOCK_M"], stage3["ITERS"], stage3["T"]) == (32, 1, 256), stage3
    assert kstats.tile_config(torch.empty(64, 256, 56, 56, device="meta"))["BLOCK_M"] == 4096 // 64
    x = make((2, 24, 7, 7), torch.float32, "nhwc", "large")  # M = 98: 16-row chunks by the rule, ragged
    assert kstats.tile_config(x)["BLOCK_M"] == 16 and kstats.tile_config(x)["T"] == 7
    _check_multi_tile(x, None, None)


def test_deterministic_bitwise():
    x = make((2, 24, 7, 7), torch.float32, "nhwc", "shifted")
    first, second = _multi_tile_calls(x, 16, 3), _multi_tile_calls(x, 16, 3)
    for t1, t2 in zip(torch.utils._pytree.tree_leaves(first[:3]), torch.utils._pytree.tree_leaves(second[:3])):
        assert torch.equal(t1, t2)


def test_int64_offsets_path(monkeypatch):
    """Tensors over 2^31 elements switch the kernels to int64 offsets; force that path on a small tensor."""
    x = make((2, 24, 7, 7), torch.float32, "nchw", "shifted")
    ref32 = _multi_tile_calls(x, 16, 3)
    monkeypatch.setattr(kstats, "_INT32_LIMIT", 0)
    assert kstats.tile_config(x)["INT64"]
    ref64 = _multi_tile_calls(x, 16, 3)
    for t1, t2 in zip(torch.utils._pytree.tree_leaves(ref32[:3]), torch.utils._pytree.tree_leaves(ref64[:3])):
        assert torch.equal(t1, t2)
    a = bn_relu_forward(x, ref64[3][1], ref64[3][2])
    assert torch.equal(a, reference.bn_relu(x, ref64[3][1], ref64[3][2]))


# ---- backend contract and bad inputs -------------------------------------------------------------------------------
def test_backend_availability_and_auto():
    assert BACKEND.unavailable_reason() is None
    x = make((2, 3, 4, 4), torch.float32)
    assert BACKEND.why_not(x) is None
    assert "dtype" in BACKEND.why_not(torch.zeros(2, 3, 4, 4, dtype=torch.int32, device=DEVICE))
    if INTERPRET:
        assert not BACKEND.auto_ok(x)  # auto never picks the interpreter
        assert resolve(x, "auto") != "triton"
    with pytest.raises(BackendUnsupportedError, match="dtype"):
        resolve(torch.zeros(2, 3, 4, 4, dtype=torch.int64, device=DEVICE), "triton")


def test_backend_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = BACKEND.why_not(torch.zeros(2, 3, 4, 4))
    assert reason is not None and "TRITON_INTERPRET" in reason


def test_launchers_reject_bad_inputs():
    x = make((2, 3, 4, 4), torch.float32)
    s = channel_vec(3, 1)
    with pytest.raises(TypeError, match="x: expected dtype"):
        kstats.batch_stats(x.to(torch.int32))
    with pytest.raises(ValueError, match="x: expected dense"):
        kstats.batch_stats(make((2, 3, 4, 4), torch.float32, "strided"))
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        bn_relu_forward(x[0], s, s)
    with pytest.raises(ValueError, match="shift: expected a \\[C=3\\]"):
        bn_relu_forward(x, s, channel_vec(4, 1))
    with pytest.raises(ValueError, match="dy: expected the memory format of x"):
        bn_relu_backward(x.contiguous(memory_format=torch.channels_last), x, s, s, s, s, True)
    with pytest.raises(ValueError, match="b: expected shape"):
        add_stats(x, x[:1])
    with pytest.raises(TypeError, match="out_dtype"):
        bn_relu_forward(x, s, s, torch.int8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_scale_shift_bitwise_reference(dtype, affine):
    # the backend's one-launch BN affine map: the reference's roundings exactly (no FMA), for every affine form
    c = 37
    mean = torch.randn(c, dtype=dtype, device=DEVICE) * 100
    rstd = torch.rand(c, dtype=dtype, device=DEVICE) + 0.1
    w = torch.randn(c, dtype=torch.bfloat16, device=DEVICE) if affine in ("both", "weight") else None
    b = torch.randn(c, dtype=torch.float16, device=DEVICE) if affine in ("both", "bias") else None
    got, want = BACKEND.scale_shift(mean, rstd, w, b), reference.scale_shift(mean, rstd, w, b)
    for g, e in zip(got, want):
        assert g.dtype == e.dtype and torch.equal(g, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("n", [2, 0], ids=["batch", "empty"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_affine_and_running_update_in_kernel_match_reference(dtype, momentum, n, affine):
    # BN's affine map formed by the consuming kernel (every program) and kept, with the running update, by one program
    # (`kernels.stats.BNAffine`), against rsqrt + `reference.scale_shift` + `reference.update_running_stats`; 70
    # channels: two channel blocks. An empty batch (n = 0) runs the launch of its own and only counts.
    c, eps = 70, 1e-5
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(n, c, 1, 3, generator=gen, dtype=dtype) * 2).to(DEVICE)
    mean = torch.randn(c, generator=gen, dtype=dtype).to(DEVICE)
    var = (torch.rand(c, generator=gen, dtype=dtype) + 0.5).to(DEVICE)
    w = (torch.randn(c, generator=gen, dtype=dtype) if affine else None)
    b = (torch.randn(c, generator=gen, dtype=dtype) if affine else None)
    w, b = (None if t is None else t.to(DEVICE) for t in (w, b))
    buffers = [torch.randn(c, generator=gen, dtype=dtype).to(DEVICE), (torch.rand(c, generator=gen, dtype=dtype)
                                                                        + 0.5).to(DEVICE),
               torch.tensor(3, device=DEVICE)]
    ref_buffers = [t.clone() for t in buffers]
    spec = BACKEND.bn_affine(mean, var, eps, w, b, (*buffers, n * 3, momentum))
    a = BACKEND.bn_relu(x, None, None, x.dtype, affine=spec)
    rstd = torch.rsqrt(var + eps)
    scale, shift = reference.scale_shift(mean, rstd, w, b)
    reference.update_running_stats(*ref_buffers, mean, var, n * 3, momentum)
    want = [reference.bn_relu(x, scale, shift), rstd, scale, shift] + ref_buffers
    got = [a, spec.rstd, spec.scale, spec.shift] + buffers
    for name, g, e in zip(["a", "rstd", "scale", "shift", "running_mean", "running_var", "nbt"], got, want):
        if INTERPRET:  # the interpreter rounds every operation, as the reference's ATen ops do: the same bits
            assert torch.equal(g, e), name
        else:  # a GPU's rsqrt is approximate and the compiler may contract μ·scale into the shift: a few ulps of
            # values of magnitude up to about 10 (a = x·s + t can cancel, hence the absolute part)
            eps_d = torch.finfo(dtype).eps
            torch.testing.assert_close(g, e, rtol=8 * eps_d, atol=80 * eps_d, msg=name)


def test_affine_leaves_running_buffers_of_another_dtype_to_the_caller():
    # a bf16 model's running buffers: the kernel forms the affine map and leaves the buffers (and the counter) alone
    mean, var = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    buffers = [torch.zeros(4, dtype=torch.bfloat16, device=DEVICE), torch.ones(4, dtype=torch.bfloat16, device=DEVICE),
               torch.tensor(0, device=DEVICE)]
    spec = BACKEND.bn_affine(mean, var, 1e-5, None, None, (*buffers, 8, 0.1))
    assert not spec.updates_running
    BACKEND.bn_relu(torch.randn(2, 4, 2, 2, device=DEVICE), None, None, torch.float32, affine=spec)
    assert torch.equal(spec.scale, torch.rsqrt(var + 1e-5)) and torch.equal(spec.shift, -(mean * spec.scale))
    assert torch.equal(buffers[0], torch.zeros_like(buffers[0])) and int(buffers[2]) == 0


def test_scale_shift_rejects_bad_inputs():
    from fastresnet.kernels.bn_relu import scale_shift
    mean = torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError, match="mean, rstd"):
        scale_shift(mean, torch.ones(5, device=DEVICE), None, None)
    with pytest.raises(ValueError, match="weight"):
        scale_shift(mean, torch.ones(4, device=DEVICE), torch.ones(3, device=DEVICE), None)
    with pytest.raises(TypeError, match="rstd"):
        scale_shift(mean.half(), torch.ones(4, device=DEVICE).half(), None, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stats_last_program_finish_equals_separate_merge_bitwise(monkeypatch, dtype):
    # the statistics merge and the BN backward's sums finished inside the partial launches (default) against the
    # separate merge launches (FASTRESNET_LAST_PROGRAM_MERGE=0), one level (3 tiles) and two (8 tiles: the last
    # programs of groups of 3, 3 and 2, then the last group): the same merges in the same order; the counters are
    # zero afterwards
    x = (3.0 + torch.randn(3, 5, 6, 7, device=DEVICE, dtype=dtype)).contiguous(memory_format=torch.channels_last)
    mean = torch.linspace(0.5, 1.5, 5, device=DEVICE, dtype=dtype)  # also scale, -shift and rstd: a mask that bites
    monkeypatch.setenv("FASTRESNET_GRID_BARRIER", "0")  # the BN backward's partial pass, not its barrier launch
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("FASTRESNET_LAST_PROGRAM_MERGE", flag)
        out[flag] = (kstats.batch_stats(x, block_m=16, tiles=3) + kstats.batch_stats(x, block_m=16, tiles=9)
                     + add_stats(x, x, block_m=16, tiles=9)
                     + bn_relu_backward(x - 3.0, x, mean, -mean, mean, mean, True, block_m=16, tiles=9))
    assert all(torch.equal(a, b) for a, b in zip(out["1"], out["0"]))
    assert not kstats.launch_counters(1, x.device).any()
    # the two-level finish against float64: the ≈ 126 fp32 Chan merges of O(1) values stay within a few ulp·√M
    var, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out["1"][2].double(), mean64, **tol)
    torch.testing.assert_close(out["1"][3].double(), var, **tol)


# ---- the interpreter as the suite runs it (tests/triton_interpreter.py) ---------------------------------------------
if INTERPRET:
    import triton  # noqa: E402
    import triton.language as tl  # noqa: E402

    @triton.jit
    def _add_one_kernel(out_ptr, base):
        tl.store(out_ptr + tl.program_id(0), base + 1)


@pytest.mark.skipif(not INTERPRET, reason="a setting of the Triton interpreter")
def test_interpreter_checks_int32_overflow_here():
    import triton_interpreter
    assert triton_interpreter.overflow_checks_on()  # this module is one of conftest's OVERFLOW_CHECKED
    out = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    _add_one_kernel[(2,)](out, 2**31 - 2)
    assert out.tolist() == [2**31 - 1] * 2
    with pytest.raises(Exception, match="int32 overflow"):
        _add_one_kernel[(1,)](out, 2**31 - 1)
    try:  # the setting whole-net tests run under: the same add wraps around unchecked
        triton_interpreter.overflow_checks(False)
        _add_one_kernel[(1,)](out, 2**31 - 1)
    finally:
        triton_interpreter.overflow_checks(True)
    assert out[0].item() == -2**31


@pytest.mark.skipif(not INTERPRET, reason="a setting of the Triton interpreter")
def test_interpreter_language_patch_skip_changes_nothing(monkeypatch):
    # a statistics launch calls @triton.jit helpers (the Chan merge, the last-program finish, tl.sum) many times;
    # with the skip the interpreter walks triton.language's members for the launch and for each language module a
    # helper adds (tl.sum's triton.language.core), not on every helper call
    from triton.runtime import interpreter
    import triton_interpreter
    assert triton_interpreter.skip_repeated_language_patches()
    skip, patch = interpreter._patch_lang, interpreter._patch_lang.__wrapped__
    x = make((2, 24, 7, 7), torch.float32, "nhwc", "shifted")
    walks, walk = [], interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda *a: walks.append(1) or walk(*a))
    out = {}
    for name, patch_lang in (("skip", skip), ("every call", patch)):
        walks.clear()
        monkeypatch.setattr(interpreter, "_patch_lang", patch_lang)
        out[name] = kstats.batch_stats(x, block_m=16, tiles=3), len(walks)
    monkeypatch.setattr(interpreter, "_patch_lang", skip)
    assert all(torch.equal(a, b) for a, b in zip(out["skip"][0], out["every call"][0]))
    assert out["skip"][1] * 5 < out["every call"][1], (out["skip"][1], out["every call"][1])
    assert tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.tensor.__add__)  # restored after the launch
