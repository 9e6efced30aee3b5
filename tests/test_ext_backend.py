"""The C++/CUDA extension fastresnet._C (csrc/) against the reference ops (`fastresnet.reference`).

CPU tests run the real C++ kernels through the dispatcher (torch.ops.fastresnet_ext.*); they skip with the reason
if the extension is not built. CUDA kernel tests are marked `gpu`. test_nvcc_compiles compiles every .cu file in
csrc/ for sm_80 and sm_90 with nvcc (no GPU needed), so CI catches CUDA compile errors.

Tolerances: an extension result is compared with the float64 reference of the same input and must be within 2× the
error the float32/bf16 reference itself makes plus a few units of the dtype's last place (summation order differs:
tiles + Chan merges vs ATen's reduction tree, and a rounded output may land one ulp apart).
"""
from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest
import torch

import fastresnet
from fastresnet import reference
from fastresnet.backends import get_backend_impl
from fastresnet.backends.ext_backend import ExtBackend

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"
_REASON = ExtBackend().unavailable_reason()
needs_ext = pytest.mark.skipif(_REASON is not None, reason=f"extension not built: {_REASON}")
ops = torch.ops.fastresnet_ext if _REASON is None else None

# (shape, mean, std): non-zero mean, large mean (|mean| ≫ std, where one-pass statistics cancel), N·H·W = 2, odd
# spatial sizes, C = 3 / 24 / 33.
CASES = [
    ((4, 3, 7, 7), -2.3, 0.5),
    ((2, 24, 5, 3), 1000.0, 0.5),
    ((1, 33, 1, 2), 0.7, 2.0),
    ((3, 33, 5, 5), 0.0, 1.0),
]
# NCHW, channels_last, and a strided (non-dense) view.
LAYOUTS = ["nchw", "nhwc", "strided"]
STATS_DTYPES = [torch.float32, torch.bfloat16, torch.float64]


# every primitive test runs over CASES × LAYOUTS (a test's own parametrize of `layout` takes precedence)
@pytest.fixture(params=CASES, ids=[f"case{i}" for i in range(len(CASES))])
def case(request):
    return request.param


@pytest.fixture(params=LAYOUTS)
def layout(request):
    return request.param


def _make(shape, mean, std, layout, dtype=torch.float32, device="cpu"):
    if layout == "strided":  # every other column of a wider tensor: neither NCHW- nor NHWC-dense
        n, c, h, w = shape
        x = (torch.randn(n, c, h, 2 * w, device=device) * std + mean)[..., ::2]
    else:
        x = torch.randn(shape, device=device) * std + mean
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
    return x.to(dtype)


def _ulp(dtype):
    return torch.finfo(dtype).eps


def _check(name, ours, ref_lowp, ref64, ulps=4, magnitude=None):
    """|ours − ref64| ≤ 2·|ref_lowp − ref64| + ulps·eps·(1 + magnitude), elementwise maxima (see module docstring).

    magnitude: the size of the terms that are summed (default max |ref64|); larger than the result where they cancel.
    """
    ours64, lowp64 = ours.double(), ref_lowp.double()
    err = (ours64 - ref64).abs().max().item()
    ref_err = (lowp64 - ref64).abs().max().item()
    magnitude = ref64.abs().max().item() if magnitude is None else magnitude
    bound = 2 * ref_err + ulps * _ulp(ours.dtype) * (1 + magnitude)
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (reference's own error {ref_err:.3g})"


def _stat_vecs(x):
    """Per-channel (mean, rstd, scale, shift) in x's statistics dtype, with a non-trivial gamma/beta."""
    mean, var = reference.batch_stats(x)
    rstd = torch.rsqrt(var + 1e-5)
    c = x.shape[1]
    gamma = torch.linspace(-1.5, 2.0, c, dtype=mean.dtype)
    beta = torch.linspace(0.5, -0.5, c, dtype=mean.dtype)
    scale, shift = reference.scale_shift(mean, rstd, gamma, beta)
    return mean, rstd, scale, shift


def _layout_of(t):
    return "nhwc" if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() else "nchw"


# ---- primitives vs reference (CPU kernels) -------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("dtype", STATS_DTYPES)
def test_batch_stats(case, layout, dtype):
    x = _make(*case, layout, dtype)
    mean, var = ops.batch_stats(x)
    ref_mean, ref_var = reference.batch_stats(x)
    assert mean.dtype == ref_mean.dtype and var.dtype == ref_var.dtype
    m64, v64 = reference.batch_stats(x.double())
    _check("mean", mean, ref_mean, m64)
    _check("var", var, ref_var, v64)


@needs_ext
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16), (torch.float32, torch.bfloat16),
                                             (torch.float64, torch.float64)])
def test_bn_relu(case, layout, dtype, out_dtype):
    x = _make(*case, layout, dtype)
    _, _, scale, shift = _stat_vecs(x)
    a = ops.bn_relu(x, scale, shift, out_dtype)
    ref = reference.bn_relu(x, scale, shift, out_dtype)
    assert a.dtype == out_dtype and a.shape == x.shape
    assert _layout_of(a) == ("nhwc" if layout == "nhwc" else "nchw")
    _check("a", a, ref, reference.bn_relu(x.double(), scale.double(), shift.double()))


@needs_ext
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_dres", [False, True])
@pytest.mark.parametrize("dtype,dy_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                            (torch.float32, torch.bfloat16), (torch.float16, torch.float32),
                                            (torch.float64, torch.float64)])
def test_bn_relu_backward(case, layout, training, with_dres, dtype, dy_dtype):
    x = _make(*case, layout, dtype)
    dy = torch.randn(x.shape).to(dy_dtype)
    dres = torch.randn(x.shape).to(dy_dtype) if with_dres else None
    mean, rstd, scale, shift = _stat_vecs(x)
    dx, sum_dz, sum_dz_xhat = ops.bn_relu_backward(dy, x, scale, shift, mean, rstd, training, dres)
    ref = reference.bn_relu_backward(dy, x, scale, shift, mean, rstd, training, dres)
    r64 = reference.bn_relu_backward(dy.double(), x.double(), scale.double(), shift.double(), mean.double(),
                                     rstd.double(), training, None if dres is None else dres.double())
    assert dx.dtype == x.dtype and sum_dz.dtype == ref[1].dtype
    # dx = s·(dz − Σdz/M − x̂·Σdz·x̂/M) (+ dres): its three terms cancel (exactly so for M = 2), so its error scales
    # with them: |s|·(|dz| + |Σdz|/M + |x̂|·|Σdz·x̂|/M) + |dres|.
    m = x.numel() // x.shape[1]
    xhat = ((x.double() - mean.double().view(1, -1, 1, 1)) * rstd.double().view(1, -1, 1, 1)).abs().max()
    terms = scale.abs().max() * (dy.abs().max().double() + r64[1].abs().max() / m + xhat * r64[2].abs().max() / m)
    _check("dx", dx, ref[0], r64[0], magnitude=terms.item() + (0 if dres is None else dres.abs().max().item()))
    _check("sum_dz", sum_dz, ref[1], r64[1])
    _check("sum_dz_xhat", sum_dz_xhat, ref[2], r64[2])


@needs_ext
@pytest.mark.parametrize("dtype", STATS_DTYPES)
def test_add_stats(case, layout, dtype):
    a = _make(*case, layout, dtype)
    b = _make(case[0], 0.1, 1.0, "nchw", dtype)  # b may have another layout than a: y follows a
    y, mean, var = ops.add_stats(a, b)
    ref_y, ref_mean, ref_var = reference.add_stats(a, b)
    assert _layout_of(y) == ("nhwc" if layout == "nhwc" else "nchw")
    torch.testing.assert_close(y, ref_y, atol=0, rtol=0)  # the same fp32 add rounded once: bitwise equal
    m64, v64 = reference.batch_stats(ref_y.double())  # statistics of the rounded y
    _check("mean", mean, ref_mean, m64)
    _check("var", var, ref_var, v64)


# ---- the layer: backend="ext" (C++ CPU kernels) vs backend="torch" --------------------------------------------------
@needs_ext
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cin,cout,k,stride,hw", [(3, 24, 3, 1, (7, 5)), (33, 24, 1, 2, (5, 3)), (24, 33, 3, 2, (8, 8))])
def test_preact_conv_matches_torch_backend(channels_last, cin, cout, k, stride, hw):
    layers = {b: fastresnet.PreActConv2d(cin, cout, k, stride, k // 2, backend=b) for b in ("ext", "torch")}
    layers["torch"].load_state_dict(layers["ext"].state_dict())
    x = torch.randn(3, cin, *hw) * 0.5 - 2.3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    outs = {}
    for name, layer in layers.items():
        xi = x.clone().requires_grad_()
        for _ in range(2):  # two training steps: the running statistics are updated twice
            y = layer(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        layer.eval()
        y_eval = layer(x)
        outs[name] = (y, xi.grad, layer.conv.weight.grad, layer.bn.weight.grad, layer.bn.bias.grad,
                      layer.bn.running_mean, layer.bn.running_var, layer.bn.num_batches_tracked, y_eval)
    names = ["y", "dx", "dW", "dgamma", "dbeta", "running_mean", "running_var", "num_batches_tracked", "y_eval"]
    for name, got, want in zip(names, outs["ext"], outs["torch"]):
        # fp32, sums over ≤ 3·8·8 = 192 elements in a different order: a few ulps of the largest term
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
    if channels_last:
        assert outs["ext"][1].is_contiguous(memory_format=torch.channels_last)


@needs_ext
def test_deterministic_across_thread_counts():
    """Bitwise equal results run to run and for 1 or 2 threads: tiles depend on the shape only."""
    x = torch.randn(8, 24, 40, 40) * 3 + 5  # M = 12800 > one tile, so partials are merged
    xs = [x, x.contiguous(memory_format=torch.channels_last)]
    dy = torch.randn_like(x)
    mean, rstd, scale, shift = _stat_vecs(x)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, max(2, threads), max(2, threads)):
            torch.set_num_threads(n)
            runs.append([t for xi in xs for t in (*ops.batch_stats(xi), *ops.add_stats(xi, dy)[1:],
                                                  *ops.bn_relu_backward(dy, xi, scale, shift, mean, rstd, True),
                                                  *ops.bn_relu_backward(dy, xi, scale, shift, mean, rstd, False, dy))])
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for got, want in zip(run, runs[0]):
            assert torch.equal(got, want)


# ---- errors and backend behaviour ----------------------------------------------------------------------------------
@needs_ext
def test_errors_name_the_argument():
    x = torch.randn(2, 4, 3, 3)
    mean, rstd, scale, shift = _stat_vecs(x)
    with pytest.raises(RuntimeError, match="scale: expected shape \\[4\\]"):
        ops.bn_relu(x, scale[:3], shift, torch.float32)
    with pytest.raises(RuntimeError, match="shift: expected dtype Float"):
        ops.bn_relu(x, scale, shift.double(), torch.float32)
    with pytest.raises(RuntimeError, match="x: expected a 4-D tensor"):
        ops.batch_stats(x[0])
    with pytest.raises(RuntimeError, match="x: expected dtype float16, bfloat16, float32 or float64"):
        ops.batch_stats(x.to(torch.int32))
    with pytest.raises(RuntimeError, match="dy: expected the shape of x"):
        ops.bn_relu_backward(x[:1], x, scale, shift, mean, rstd, True, None)
    with pytest.raises(RuntimeError, match="b: expected the shape of a"):
        ops.add_stats(x, x[:1])


@needs_ext
def test_add_stats_promotes_mixed_dtypes():
    # a bf16 conv output plus an fp32 shortcut (autocast): summed in fp32, rounded once to the promoted dtype
    a, b = torch.randn(2, 4, 3, 3).bfloat16(), torch.randn(2, 4, 3, 3) * 3 + 1
    for got, want in zip(ops.add_stats(a, b), reference.add_stats(a, b)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # fp32 statistics: summation order only


@needs_ext
def test_backend_reports_unsupported_device():
    backend = get_backend_impl("ext")
    assert backend.why_not(torch.empty(2, 3, 4, 4)) is None
    assert "CPU or CUDA" in backend.why_not(torch.empty(2, 3, 4, 4, device="meta"))


# ---- CUDA kernels: compile with nvcc (no GPU needed) and run on a GPU ------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: cannot compile the CUDA kernels")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.rglob("*.cu")))
def test_nvcc_compiles(source, arch, tmp_path):
    path = next(CSRC.rglob(source))
    cmd = ["nvcc", "-std=c++17", "-O1", "-c", str(path), "-o", str(tmp_path / f"{path.stem}_sm{arch}.o"),
           "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-Werror", "all-warnings"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"


def test_cu_files_include_only_cuda_headers():
    """docs/architecture.md §6: .cu files must not include torch headers (they do not compile on CPU-only torch)."""
    for path in CSRC.rglob("*.cu"):
        includes = [ln for ln in path.read_text().splitlines() if ln.startswith("#include")]
        assert not [i for i in includes if "torch" in i or "ATen" in i or "c10" in i], (path, includes)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernels_match_reference(layout, dtype):
    if get_backend_impl("ext").why_not(torch.empty(1, device="cuda")) is not None:
        pytest.skip(get_backend_impl("ext").why_not(torch.empty(1, device="cuda")))
    for case in CASES:
        x = _make(*case, layout, dtype, device="cuda")
        mean, var = ops.batch_stats(x)
        m64, v64 = reference.batch_stats(x.double())
        rm, rv = reference.batch_stats(x)
        _check("mean", mean, rm, m64)
        _check("var", var, rv, v64)
        mean, rstd, scale, shift = (t.cuda() for t in _stat_vecs(x.cpu()))
        _check("a", ops.bn_relu(x, scale, shift, dtype), reference.bn_relu(x, scale, shift),
               reference.bn_relu(x.double(), scale.double(), shift.double()))
        dy = torch.randn(x.shape, device="cuda").to(dtype)
        got = ops.bn_relu_backward(dy, x, scale, shift, mean, rstd, True, dy)
        ref = reference.bn_relu_backward(dy, x, scale, shift, mean, rstd, True, dy)
        r64 = reference.bn_relu_backward(dy.double(), x.double(), scale.double(), shift.double(), mean.double(),
                                         rstd.double(), True, dy.double())
        for name, g, r, r6 in zip(("dx", "sum_dz", "sum_dz_xhat"), got, ref, r64):
            _check(name, g, r, r6)
        y, ym, yv = ops.add_stats(x, dy)
        torch.testing.assert_close(y, reference.add_stats(x, dy)[0], atol=0, rtol=0)  # same add, rounded once
        assert torch.equal(ops.batch_stats(x)[1], ops.batch_stats(x)[1])  # deterministic: no atomics


def test_the_former_name_cuda_is_refused_with_the_new_one(monkeypatch):
    import fastresnet
    from fastresnet.backends import get_backend, get_backend_impl
    with pytest.raises(ValueError, match="'cuda' is now named 'ext'"):
        fastresnet.set_backend("cuda")
    with pytest.raises(ValueError, match="'cuda' is now named 'ext'"):
        get_backend_impl("cuda")
    monkeypatch.setenv("FASTRESNET_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTRESNET_BACKEND: .*'cuda' is now named 'ext'"):
        get_backend()
