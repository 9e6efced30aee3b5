"""Property-based tests (hypothesis) of every fused op of the functional API against a float64 run of the
reference, on every backend: random N, C, H, W (N·H·W = 2 and odd sizes included, channel counts off the block
sizes), kernel 1/3, stride 1/2, NCHW / channels_last / strided views, residual on/off, precomputed statistics on/off,
training/eval, inputs with large means, fp32/fp16/bf16; and with one NaN, +Inf or −Inf planted in x, γ, β, a running
statistic or the output gradient, the non-finite values of every output, gradient and running statistic where plain
PyTorch ops put them (`test_*_nonfinite`).

Judge: every output, gradient and running statistic of a fused backend has a relative error against the float64 run
at most 2× the error of plain PyTorch ops (the "torch" backend) in the same dtype, or 2× a floor of 16 units of
roundoff of the dtype (a single rounding costs ≤ 1; the Triton interpreter's fp32 → bf16 cast truncates instead of
rounding to nearest, which doubles that), times the condition number κ of the case: 1 + max |μ|/σ over the channels
of x (centring a large-mean input cancels), and for a mean output also ‖mean|v|‖/‖mean v‖ of its tensor v (a mean
near zero cancels). Plain PyTorch's error is the largest over the input and PERTURBED copies
of it, each input tensor multiplied by 1 + u·U(−1, 1): where an output cancels (dx of a 2-value batch is zero up to
eps; a mean near zero; dγ at a large mean), one implementation's rounding can be lucky by 10×, and the bar must be
what rounding can do, not what it did once. ReLU ties are moved out of rounding reach first
(`fastresnet.numerics.tie_free_shift` on β): a mask flipped by rounding is not an error of either implementation.

Examples: FASTRESNET_HYPOTHESIS_EXAMPLES per test (default 25, derandomised: the same examples on every machine);
`FASTRESNET_HYPOTHESIS_EXAMPLES=500 FASTRESNET_HYPOTHESIS_RANDOM=1 pytest tests/test_properties.py` is the long run.
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastresnet.functional as FF
from fastresnet.backends import get_backend_impl
from fastresnet.kernels import interpreting
from fastresnet.numerics import tie_free_shift
from fastresnet.ops.bn_ops import conv_out_shape

DEV = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
SETTINGS = settings(
    max_examples=int(os.environ.get("FASTRESNET_HYPOTHESIS_EXAMPLES", "25")), deadline=None, database=None,
    derandomize="FASTRESNET_HYPOTHESIS_RANDOM" not in os.environ,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
FLOOR_UNITS = 16
PERTURBED = 3
EPS, MOMENTUM = 1e-5, 0.1


def _backends():
    triton_ok = DEV == "cuda" or interpreting()
    skip = pytest.mark.skipif(not triton_ok, reason="Triton needs a CUDA GPU or TRITON_INTERPRET=1")
    return ["ext", pytest.param("triton", marks=skip), pytest.param("triton_conv", marks=skip)]


# ---- inputs -------------------------------------------------------------------------------------------------------
@st.composite
def shapes(draw, training):
    """(N, C, H, W): odd sizes, C off the block sizes, and in training N·H·W = 2 (the smallest BN batch)."""
    c = draw(st.sampled_from([1, 3, 5, 8, 13, 16, 17, 24, 33]))
    if training and draw(st.integers(0, 4)) == 0:
        n, h, w = draw(st.sampled_from([(2, 1, 1), (1, 2, 1), (1, 1, 2)]))
    else:
        n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    assume(not training or n * h * w >= 2)
    return n, c, h, w


def _tensor(shape, layout, dtype, gen, mean=0.0, scale=1.0):
    """A tensor of the given logical shape in NCHW, channels_last or a strided view (every 2nd column of a wider
    tensor, channel slice 1:C+1), values mean + scale·N(0, 1) rounded to dtype."""
    n, c, h, w = shape
    if layout == "strided":
        base = mean + scale * torch.randn(n, c + 2, h, 2 * w, generator=gen, dtype=torch.float64)
        return base.to(dtype).to(DEV)[:, 1:c + 1, :, ::2]
    t = (mean + scale * torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)).to(dtype).to(DEV)
    return t.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else t


@st.composite
def bn_cases(draw, conv: bool):
    """A random BN(+conv) call: tensors and flags, with its ReLU inputs kept 1e-3·|γ| away from zero."""
    training = draw(st.booleans())
    n, c, h, w = draw(shapes(training))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16]))
    layout = draw(st.sampled_from(["nchw", "nhwc", "strided"]))
    mean = draw(st.sampled_from([0.0, 3.0, -40.0, 1e3]))
    scale = draw(st.sampled_from([1.0, 1e-2, 10.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    x = _tensor((n, c, h, w), layout, dtype, gen, mean, scale)
    case = dict(x=x, training=training, dtype=dtype, layout=layout,
                gamma=(0.5 + torch.rand(c, generator=gen, dtype=torch.float64)),
                beta=torch.randn(c, generator=gen, dtype=torch.float64),
                running_mean=mean + scale * torch.randn(c, generator=gen, dtype=torch.float64),
                running_var=scale ** 2 * (0.5 + torch.rand(c, generator=gen, dtype=torch.float64)),
                precomputed_stats=training and draw(st.booleans()))
    if conv:
        k, s = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 2]))
        c_out = draw(st.sampled_from([1, 4, 16, 17, 40]))
        case.update(k=k, stride=s, weight=torch.randn(c_out, c, k, k, generator=gen, dtype=torch.float64)
                    / (k * c ** 0.5), residual=draw(st.booleans()), return_stats=draw(st.booleans()))
    # move the ReLU inputs z = γ·(x − μ)/σ + β out of rounding reach of zero (statistics of the batch in training,
    # running statistics in eval)
    xd = x.double().cpu()
    if training:
        var, mu = torch.var_mean(xd, dim=(0, 2, 3), unbiased=False)
    else:
        var, mu = case["running_var"], case["running_mean"]
    z = ((xd - mu.view(1, -1, 1, 1)) * torch.rsqrt(var + EPS).view(1, -1, 1, 1)
         * case["gamma"].view(1, -1, 1, 1)).transpose(0, 1).reshape(c, -1) + case["beta"][:, None]
    case["beta"] = case["beta"] - tie_free_shift(z, case["gamma"], 1e-3)
    case["dy_seed"] = draw(st.integers(0, 2 ** 31 - 1))
    return case


# ---- running one call ---------------------------------------------------------------------------------------------
def _perturbed(case, seed):
    """case with every input tensor multiplied by 1 + u·U(−1, 1), u the unit roundoff of its dtype."""
    g = torch.Generator().manual_seed(seed)
    out = dict(case)
    for k, v in case.items():
        if torch.is_tensor(v) and v.is_floating_point():
            u = UNIT_ROUNDOFF.get(v.dtype, UNIT_ROUNDOFF[torch.float32])
            r = torch.rand(v.shape, generator=g, dtype=torch.float64).to(v.device) * 2 - 1
            out[k] = (v.double() * (1 + u * r)).to(v.dtype)
    return out


def _run(case, backend, dtype, op):
    """Run op ("bn_relu" or "bn_relu_conv2d") on case's tensors converted to dtype (the input x keeps its layout);
    returns {name: float64 tensor} of outputs, gradients and running statistics."""
    x = case["x"].to(dtype).requires_grad_()
    params = {k: case[k].to(dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEV)
              for k in ("gamma", "beta", "running_mean", "running_var")}
    gamma, beta = params["gamma"].requires_grad_(), params["beta"].requires_grad_()
    nbt = torch.zeros((), dtype=torch.long, device=DEV)
    stats = None
    if case["precomputed_stats"]:
        var, mean = torch.var_mean(case["x"].double(), dim=(0, 2, 3), unbiased=False)
        stats = (mean.to(params["gamma"].dtype), var.to(params["gamma"].dtype))
    common = dict(running_mean=params["running_mean"], running_var=params["running_var"], bn_weight=gamma,
                  bn_bias=beta, num_batches_tracked=nbt, training=case["training"], momentum=MOMENTUM, eps=EPS,
                  stats=stats, backend=backend)
    leaves = {"x": x, "gamma": gamma, "beta": beta}
    if op == "bn_relu":
        outs = {"y": FF.bn_relu(x, **common)}
    else:
        weight = case["weight"].to(dtype=dtype, device=DEV).requires_grad_()
        leaves["weight"] = weight
        k = case["k"]
        residual = None
        if case["residual"]:
            shape = conv_out_shape(x.shape, weight.shape, [case["stride"]] * 2, [k // 2] * 2)
            g = torch.Generator().manual_seed(case["dy_seed"] + 1)
            residual = (torch.randn(shape, generator=g, dtype=torch.float64) - 2.0).to(dtype).to(DEV)
            residual.requires_grad_()
            leaves["residual"] = residual
        res = FF.bn_relu_conv2d(x, weight, stride=case["stride"], padding=k // 2, residual=residual,
                                return_stats=case["return_stats"], **common)
        outs = {"y": res[0], "y_mean": res[1], "y_var": res[2]} if case["return_stats"] else {"y": res}
    g = torch.Generator().manual_seed(case["dy_seed"])
    dy = torch.randn(outs["y"].shape, generator=g, dtype=torch.float64).to(outs["y"].dtype).to(DEV)
    if case.get("dy_plant") is not None:  # (index, value): a non-finite output gradient
        _plant_dy(dy, case, *case["dy_plant"])
    grads = torch.autograd.grad(outs["y"], list(leaves.values()), dy)
    result = {k: v.detach().double() for k, v in outs.items()}
    result.update({f"d{k}": gr.double() for k, gr in zip(leaves, grads)})
    if case["training"]:
        result.update(running_mean=params["running_mean"].double(), running_var=params["running_var"].double())
    return result


def _centring_condition(x):
    """1 + max over channels of |μ|/σ: how much centring x amplifies its rounding."""
    var, mu = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    return 1.0 + (mu.abs() / var.sqrt().clamp_min(1e-30)).max().item()


def _sum_condition(v):
    """‖mean |v|‖ / ‖mean v‖ over channels: the condition number of the per-channel mean of v."""
    v = v.double()
    return (v.abs().mean(dim=(0, 2, 3)).norm() / v.mean(dim=(0, 2, 3)).norm().clamp_min(1e-300)).item()


def _dx_condition(case, ref):
    """‖s·dz‖ / ‖dx‖ of the float64 reference: the training BN backward dx = s·dz − s·(Σdz + x̂·Σdz·x̂)/M cancels
    (to eps for a 2-value batch, where x̂ = ±1), and its rounding is that of the terms, not of the result. s·dz is
    rebuilt from dx, dβ = Σdz and dγ = Σdz·x̂."""
    x = case["x"].double().cpu()
    var, mu = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    rstd = torch.rsqrt(var + EPS)
    xhat = (x - mu.view(1, -1, 1, 1)) * rstd.view(1, -1, 1, 1)
    m = x.numel() // x.shape[1]
    s = (case["gamma"] * rstd).view(1, -1, 1, 1)
    db, dg = ref["dbeta"].cpu().view(1, -1, 1, 1), ref["dgamma"].cpu().view(1, -1, 1, 1)
    dx = ref["dx"].cpu()
    s_dz = dx + s * (db + xhat * dg) / m
    return max(1.0, (s_dz.norm() / dx.norm().clamp_min(1e-300)).item())




def _rel(a, b):
    return ((a - b).norm() / b.norm()).item() if b.norm() > 0 else (a - b).norm().item()


def _judge(case, backend, op):
    dtype = case["dtype"]
    why = get_backend_impl(backend).why_not(case["x"])
    if why is not None:
        pytest.skip(f"{backend}: {why}")
    ref = _run(case, "torch", torch.float64, op)
    fused = _run(case, backend, dtype, op)
    bases = [_run(c, "torch", dtype, op) for c in [case] + [_perturbed(case, i) for i in range(PERTURBED)]]
    kappa = _centring_condition(case["x"])
    floor = {k: FLOOR_UNITS * UNIT_ROUNDOFF[dtype] * kappa for k in ref}
    if "y_mean" in ref:
        floor["y_mean"] *= _sum_condition(ref["y"])
    if case["training"]:
        floor["dx"] *= _dx_condition(case, ref)
    base_err = {k: max(_rel(b[k], ref[k]) for b in bases) for k in ref}
    bad = {k: (_rel(fused[k], ref[k]), base_err[k], floor[k]) for k in ref
           if _rel(fused[k], ref[k]) > 2 * max(base_err[k], floor[k])}
    info = {k: v for k, v in case.items() if not torch.is_tensor(v)}
    assert not bad, f"{backend} {op} {tuple(case['x'].shape)} {info}: (fused, plain PyTorch, floor) errors {bad}"


@pytest.mark.parametrize("backend", _backends())
@SETTINGS
@given(case=bn_cases(conv=False))
def test_bn_relu(backend, case):
    _judge(case, backend, "bn_relu")


@pytest.mark.parametrize("backend", _backends())
@SETTINGS
@given(case=bn_cases(conv=True))
def test_bn_relu_conv2d(backend, case):
    _judge(case, backend, "bn_relu_conv2d")


@st.composite
def add_cases(draw):
    n, c, h, w = draw(shapes(training=False))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    layout = draw(st.sampled_from(["nchw", "nhwc"]))  # add_stats takes dense tensors of one layout
    da, db = draw(st.sampled_from([(torch.float32, torch.float32), (torch.float16, torch.float32),
                                   (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]))
    mean = draw(st.sampled_from([0.0, 5.0, -1e3]))
    return _tensor((n, c, h, w), layout, da, gen, mean), _tensor((n, c, h, w), layout, db, gen, 1.0)


@pytest.mark.parametrize("backend", _backends())
@SETTINGS
@given(ab=add_cases())
def test_add_stats_and_batch_stats(backend, ab):
    a, b = ab
    why = get_backend_impl(backend).why_not(a)
    if why is not None:
        pytest.skip(f"{backend}: {why}")
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    names = ("y", "mean", "var", "batch_mean", "batch_var")

    def run(a, b, backend):
        return dict(zip(names, [t.double() for t in FF.add_stats(a, b, backend) + FF.batch_stats(a, backend)]))
    ref = run(a.double(), b.double(), "torch")
    fused = run(a, b, backend)
    inputs = [(a, b)] + [(_perturbed({"a": a}, 2 * i)["a"], _perturbed({"b": b}, 2 * i + 1)["b"])
                         for i in range(PERTURBED)]
    bases = [run(pa, pb, "torch") for pa, pb in inputs]
    cond = {"y": 1.0, "mean": _sum_condition(ref["y"]), "var": _centring_condition(ref["y"]),
            "batch_mean": _sum_condition(a), "batch_var": _centring_condition(a)}
    for k in names:
        e_f, e_b = _rel(fused[k], ref[k]), max(_rel(base[k], ref[k]) for base in bases)
        # statistics of y are those of the rounded y (so carry its roundoff); a's statistics are fp32 sums
        u = UNIT_ROUNDOFF[out_dtype] if k in ("y", "mean", "var") else UNIT_ROUNDOFF[torch.float32]
        limit = 2 * max(e_b, FLOOR_UNITS * u * cond[k])
        assert e_f <= limit, (k, e_f, e_b, limit, tuple(a.shape), a.dtype, b.dtype)


# ---- NaN and ±Inf -------------------------------------------------------------------------------------------------
@st.composite
def nonfinite_cases(draw, conv: bool):
    """A `bn_cases` call with one NaN, +Inf or −Inf planted in x, γ, β, a running statistic or the output gradient."""
    case = draw(bn_cases(conv))
    target = draw(st.sampled_from(["x", "gamma", "beta", "running_mean", "running_var", "dy"]))
    value = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    index = draw(st.integers(0, 2 ** 20))
    if target == "dy":
        case["dy_plant"] = (index, value)
    else:
        t = case[target]  # drawn for this example only: planted in place, x keeps its layout (a strided view too)
        t[tuple(int(i) for i in torch.unravel_index(torch.tensor(index % t.numel()), t.shape))] = value
    case["plant"] = (target, value)
    return case


def _plant_dy(dy, case, index, value):
    """Set one element of dy [N, C, Ho, Wo] to value, for a conv at an output position whose taps all read x, not
    the padding: PyTorch's conv weight gradient multiplies the padding's zeros by dy (NaN) for some shapes and
    algorithms and skips them for others, so a non-finite dy there has no one PyTorch answer. Nothing is planted
    where no such position exists."""
    n, c, ho, wo = dy.shape
    ok = torch.ones(ho, wo, dtype=torch.bool)
    if "k" in case:
        s, p, k = case["stride"], case["k"] // 2, case["k"]
        for d, size, length in ((0, case["x"].shape[2], ho), (1, case["x"].shape[3], wo)):
            first = torch.arange(length) * s - p
            inside = (first >= 0) & (first + k - 1 < size)
            ok &= inside.view(-1, 1) if d == 0 else inside.view(1, -1)
    places = ok.nonzero()
    if len(places):
        h, w = places[index % len(places)].tolist()
        dy[index % n, (index // n) % c, h, w] = value


def _judge_nonfinite(case, backend, op):
    """NaN, +Inf and −Inf land where plain PyTorch ops (the "torch" backend) put them, in the same dtype, for every
    output, gradient and running statistic. The mean of values holding ±Inf is ±Inf or NaN by summation order
    (PyTorch's two-pass CPU mean gives ±Inf, its CUDA Welford NaN; the kernels shift by a pivot, NaN when the pivot is
    infinite): for an infinite plant only the finiteness of a mean (y's, the running one) is compared. So for dx in
    training with γ = ±Inf: the kernels' s·dz + B·(x − μ) + C adds infinities of both signs (NaN) where PyTorch's
    s·(dz − Σdz/M − x̂·Σdz·x̂/M) is ±Inf."""
    why = get_backend_impl(backend).why_not(case["x"])
    if why is not None:
        pytest.skip(f"{backend}: {why}")
    fused, plain = _run(case, backend, case["dtype"], op), _run(case, "torch", case["dtype"], op)
    for k, want in plain.items():
        got = fused[k]
        target, value = case["plant"]
        if math.isinf(value) and (k in ("running_mean", "y_mean")
                                  or (k == "dx" and target == "gamma" and case["training"])):
            assert torch.equal(got.isfinite(), want.isfinite()), k
            continue
        for cls in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(cls(got), cls(want)), (k, cls.__name__, case["plant"], tuple(case["x"].shape))


NONFINITE_SETTINGS = settings(SETTINGS, max_examples=max(1, SETTINGS.max_examples // 2))


@pytest.mark.parametrize("backend", _backends())
@NONFINITE_SETTINGS
@given(case=nonfinite_cases(conv=False))
def test_bn_relu_nonfinite(backend, case):
    _judge_nonfinite(case, backend, "bn_relu")


@pytest.mark.parametrize("backend", _backends())
@NONFINITE_SETTINGS
@given(case=nonfinite_cases(conv=True))
def test_bn_relu_conv2d_nonfinite(backend, case):
    _judge_nonfinite(case, backend, "bn_relu_conv2d")
