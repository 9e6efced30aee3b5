"""NaN, ±Inf and empty batches (N = 0) on every backend, forward and backward, against plain PyTorch
(nn.functional.batch_norm + relu + conv2d, and nn.BatchNorm2d for the running-statistics bookkeeping).

A non-finite value planted in x, in the output gradient, in a running statistic or in γ/β must reach exactly the
outputs, gradients and running statistics it reaches in PyTorch (same NaN and ±Inf positions), and every finite value
must agree as in the clean case. The backward of ReLU is PyTorch's threshold_backward: a NaN pre-activation passes the
gradient on. Shapes are tiny: the Triton backends run in the interpreter here.
"""
import pytest
import torch
import torch.nn.functional as F

import fastresnet
import fastresnet.functional as FF
from fastresnet.backends import get_backend_impl
from fastresnet.kernels import interpreting
from fastresnet.models import create_model

DEV = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
NAN, INF = float("nan"), float("inf")
EPS, MOMENTUM = 1e-5, 0.1
N, C, C_OUT, H, W = 2, 3, 4, 4, 4


def _needs(backend):
    x = torch.empty(1, 1, 1, 1, device=DEV)
    reason = get_backend_impl(backend).why_not(x)
    return pytest.param(backend, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


BACKENDS = [_needs(b) for b in ("torch", "ext", "triton", "triton_conv")]
# fp32 with sums over at most N·H·W·C·9 = 288 terms in another order than PyTorch's: a few ulps of the largest term
RTOL, ATOL = 1e-4, 1e-5

# where one non-finite value goes: (tensor, index or channel, value, x at that index or None); the dy index is
# interior, away from the conv's padding (whose zeros PyTorch's conv backends may or may not multiply by the
# gradient), with x there set to make the ReLU pass the gradient (3.0) or drop it (-3.0: a NaN gradient gives 0)
PLANTS = {
    "x_nan": ("x", (0, 1, 2, 1), NAN, None),
    "x_posinf": ("x", (1, 2, 0, 3), INF, None),
    "x_neginf": ("x", (0, 0, 3, 3), -INF, None),
    "dy_nan": ("dy", (1, 1, 1, 2), NAN, 3.0),
    "dy_nan_dropped": ("dy", (0, 2, 1, 1), NAN, -3.0),
    "dy_inf": ("dy", (0, 2, 2, 1), INF, 3.0),
    "running_mean_nan": ("running_mean", 1, NAN, None),
    "running_mean_inf": ("running_mean", 2, INF, None),
    "running_var_nan": ("running_var", 0, NAN, None),
    "weight_nan": ("weight", 2, NAN, None),
    "weight_inf": ("weight", 1, INF, None),
    "bias_nan": ("bias", 0, NAN, None),
    "bias_posinf": ("bias", 1, INF, None),
    "bias_neginf": ("bias", 2, -INF, None),
}

# the conv op's own concerns (the activation recomputed in the forward and wgrad prologues, the ReLU mask in the dgrad
# epilogue, the conv's sums over a non-finite channel) with fewer cases: the Triton interpreter is slow
CONV_PLANTS = ("x_nan", "x_posinf", "dy_nan", "dy_nan_dropped", "running_var_nan", "weight_inf", "bias_posinf")


def _case(plant, conv):
    gen = torch.Generator().manual_seed(0)
    t = {
        "x": torch.randn(N, C, H, W, generator=gen),
        "dy": torch.randn(N, C_OUT if conv else C, H, W, generator=gen),
        "running_mean": 0.1 * torch.randn(C, generator=gen),
        "running_var": 0.5 + torch.rand(C, generator=gen),
        "weight": 0.5 + torch.rand(C, generator=gen),
        "bias": 0.2 * torch.randn(C, generator=gen),
        "conv": 0.3 * torch.randn(C_OUT, C, 3, 3, generator=gen),
    }
    if plant is not None:
        name, index, value, x_there = PLANTS[plant]
        t[name][index] = value
        if x_there is not None:
            t["x"][index] = x_there
    return {k: v.to(DEV) for k, v in t.items()}


def _run(case, training, conv, backend=None):
    """Forward and backward of BN → ReLU (→ conv 3×3, padding 1) on copies of case's tensors: plain PyTorch
    (F.batch_norm, relu, conv2d, autograd) when backend is None, else the fused op on that backend. Returns the
    output, the gradients and the running buffers (updated in place in training)."""
    x = case["x"].clone().requires_grad_()
    w, b = case["weight"].clone().requires_grad_(), case["bias"].clone().requires_grad_()
    k = case["conv"].clone().requires_grad_()
    rm, rv = case["running_mean"].clone(), case["running_var"].clone()
    nbt = torch.zeros((), dtype=torch.long, device=DEV)
    if backend is None:
        y = torch.relu(F.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS))
        y = F.conv2d(y, k, None, 1, 1) if conv else y
    elif conv:
        y = FF.bn_relu_conv2d(x, k, rm, rv, w, b, nbt, training, MOMENTUM, EPS, padding=1, backend=backend)
    else:
        y = FF.bn_relu(x, rm, rv, w, b, nbt, training, MOMENTUM, EPS, backend=backend)
    y.backward(case["dy"])
    out = {"y": y.detach(), "dx": x.grad, "dgamma": w.grad, "dbeta": b.grad, "running_mean": rm, "running_var": rv}
    if conv:
        out["dW"] = k.grad
    return out


def _compare(got, want, plant, training):
    for name, g in got.items():
        w = want[name]
        # the mean of a batch holding ±Inf is ±Inf or NaN by summation order (PyTorch's two-pass CPU mean gives
        # ±Inf, its CUDA Welford NaN); with γ = ±Inf the training dx = s·dz + B·(x − μ) + C of the kernels adds
        # infinities of both signs (NaN) where PyTorch's s·(dz − Σdz/M − x̂·Σdz·x̂/M) is ±Inf: non-finite in the
        # same places, the rest equal
        if training and ((name == "running_mean" and plant in ("x_posinf", "x_neginf"))
                         or (name == "dx" and plant == "weight_inf")):
            assert torch.equal(g.isfinite(), w.isfinite()), f"{plant}, {name}"
            g, w = g[w.isfinite()], w[w.isfinite()]
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL, equal_nan=True, msg=lambda m: f"{plant}, {name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("conv", [False, True], ids=["bn_relu", "bn_relu_conv2d"])
def test_nonfinite_like_pytorch(backend, training, conv):
    """Every plant of PLANTS (CONV_PLANTS for the conv), forward and backward, outputs, gradients and running
    statistics as PyTorch's."""
    for plant in CONV_PLANTS if conv else PLANTS:
        case = _case(plant, conv)
        want = _run(case, training, conv)
        # the plant reaches something in PyTorch (the case is not vacuous) except where PyTorch drops it: β = −Inf
        # (relu gives 0) and a NaN gradient where the ReLU is off, which the conv's dgrad spreads to active pixels
        dropped = plant == "bias_neginf" or (plant == "dy_nan_dropped" and not conv)
        assert all(v.isfinite().all() for v in want.values()) == dropped, plant
        _compare(_run(case, training, conv, backend), want, plant, training)


@pytest.mark.parametrize("plant", [p for p in PLANTS if not p.startswith("dy")])
def test_cuda_backend_eval_bitwise_with_nonfinite(plant):
    """The C++ CPU kernels' eval forward and dx are the reference composition's bits (same operations, each rounded
    once, built with -ffp-contract=off) with non-finite values too: the activation and dx of the "ext" backend equal
    the "torch" backend's."""
    if DEV != "cpu" or get_backend_impl("ext").why_not(torch.empty(1, 1, 1, 1)) is not None:
        pytest.skip("needs the C++ CPU kernels (the CUDA kernels may contract a·b + c into an FMA)")
    case = _case(plant, conv=False)
    got, want = (_run(case, False, False, b) for b in ("ext", "torch"))
    for name in ("y", "dx"):
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, equal_nan=True, msg=name)


def _net_with_a_nan_pixel(backend):
    """(eval logits, training loss) of preact_resnet20 (seed 0) on a batch of 2 with one NaN pixel in sample 0."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)).to(DEV)
    x[0, 1, 2, 2] = NAN
    torch.manual_seed(0)
    model = create_model("preact_resnet20", num_classes=10, backend=backend).to(DEV)
    logits = model.eval()(x)
    return logits, F.cross_entropy(model.train()(x), torch.tensor([1, 2], device=DEV))


@pytest.fixture(scope="module")
def torch_net_with_a_nan_pixel():
    return _net_with_a_nan_pixel("torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_preact_resnet20_with_a_nan_pixel(backend, torch_net_with_a_nan_pixel):
    """One NaN pixel in sample 0: in eval its logits are all NaN and sample 1's are untouched (per-sample running
    statistics), in training the batch statistics spread it to the whole batch and the loss is NaN, as in PyTorch
    (the "torch" backend is the plain-PyTorch composition)."""
    logits, loss = _net_with_a_nan_pixel(backend)
    assert logits[0].isnan().all() and logits[1].isfinite().all() and loss.isnan()
    torch.testing.assert_close(logits, torch_net_with_a_nan_pixel[0], rtol=RTOL, atol=ATOL, equal_nan=True)


# ---- empty batches --------------------------------------------------------------------------------------------------
def _copy_into(fused_bn, fused_conv, plain):
    """Load a plain Sequential(BatchNorm2d, ReLU[, Conv2d]) into a fused layer's BN (and conv)."""
    fused_bn.load_state_dict(plain[0].state_dict())
    if fused_conv is not None:
        fused_conv.weight.data.copy_(plain[2].weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_layers_like_batchnorm(backend, momentum):
    """N = 0 through PreActConv2d and BNReLU2d, training and eval, forward and backward, as BatchNorm2d + ReLU
    (+ Conv2d): an empty output, gradients of zero for the parameters, and in training num_batches_tracked + 1 with
    the running statistics unchanged (momentum or cumulative average)."""
    torch.manual_seed(0)
    plain_conv = torch.nn.Sequential(torch.nn.BatchNorm2d(C, momentum=momentum), torch.nn.ReLU(),
                                     torch.nn.Conv2d(C, C_OUT, 3, 1, 1, bias=False)).to(DEV)
    plain_bn = torch.nn.Sequential(torch.nn.BatchNorm2d(C, momentum=momentum), torch.nn.ReLU()).to(DEV)
    for p in (plain_conv, plain_bn):
        p[0].running_mean.uniform_(-1, 1)
        p[0].running_var.uniform_(0.5, 2)
        p[0].weight.data.uniform_(0.5, 1.5)
    conv_layer = fastresnet.PreActConv2d(C, C_OUT, 3, 1, 1, momentum=momentum, backend=backend).to(DEV)
    _copy_into(conv_layer.bn, conv_layer.conv, plain_conv)
    bn_layer = fastresnet.BNReLU2d(C, momentum=momentum, backend=backend).to(DEV)
    _copy_into(bn_layer, None, plain_bn)
    for fused, plain in ((conv_layer, plain_conv), (bn_layer, plain_bn)):
        for training in (True, True, False):  # two training steps: the second one takes a cached plan
            fused.train(training)
            plain.train(training)
            outs = []
            for m in (fused, plain):
                x = torch.randn(0, C, H, W, device=DEV, requires_grad=True)
                y = m(x)
                y.backward(torch.ones_like(y))
                outs.append((y, x.grad, *(p.grad for p in m.parameters()), *m.buffers()))
                m.zero_grad()
            assert outs[0][0].shape == outs[1][0].shape and outs[0][1].shape == (0, C, H, W)
            for got, want in zip(outs[0], outs[1]):
                torch.testing.assert_close(got, want, rtol=0, atol=0)  # no values computed: exact


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_functional_ops(backend):
    """N = 0 through every fused op of the functional API: empty outputs, batch statistics of no values NaN (the
    0/0 of `torch.mean` of an empty tensor) and gradients of zero, in eval and training."""
    x = torch.randn(0, C, H, W, device=DEV, requires_grad=True)
    k = torch.randn(C_OUT, C, 3, 3, device=DEV, requires_grad=True)
    g, b = torch.ones(C, device=DEV, requires_grad=True), torch.zeros(C, device=DEV, requires_grad=True)
    rm, rv = torch.zeros(C, device=DEV), torch.ones(C, device=DEV)
    nan_c = torch.full((C,), NAN, device=DEV)
    for stats in (FF.batch_stats(x.detach(), backend), FF.add_stats(x, x, backend)[1:]):
        for s in stats:
            torch.testing.assert_close(s, nan_c, equal_nan=True)
    for training in (False, True):
        y, mean, var = FF.bn_relu_conv2d(x, k, rm, rv, g, b, None, training, padding=1, backend=backend,
                                         residual=torch.zeros(0, C_OUT, H, W, device=DEV), return_stats=True)
        assert y.shape == (0, C_OUT, H, W) and mean.isnan().all() and var.isnan().all()
        a = FF.bn_relu(x, rm, rv, g, b, None, training, backend=backend)
        (y.sum() + a.sum()).backward()
        for grad in (k.grad, g.grad, b.grad):
            assert torch.equal(grad, torch.zeros_like(grad))
        assert x.grad.shape == x.shape
        assert torch.equal(rm, torch.zeros(C, device=DEV)) and torch.equal(rv, torch.ones(C, device=DEV))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_preact_resnet20(backend):
    """N = 0 through a whole net in training (the residual units as one op, and for "ext" the C++ unit chain from
    the second step on) and eval: empty logits, zero gradients, every BN counts the batch and keeps its running
    statistics."""
    torch.manual_seed(0)
    model = create_model("preact_resnet20", num_classes=10, backend=backend).to(DEV)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    for step, training in enumerate((True, True, False)):
        model.train(training)
        out = model(torch.randn(0, 3, 8, 8, device=DEV))
        assert out.shape == (0, 10)
        if training:
            out.sum().backward()
            for p in model.parameters():
                assert torch.equal(p.grad, torch.zeros_like(p)), p.shape
    for name, value in model.named_buffers():
        want = buffers[name] + 2 if name.endswith("num_batches_tracked") else buffers[name]
        assert torch.equal(value, want), name


def test_one_value_per_channel_is_refused_with_its_reason():
    """N·H·W = 1 in training is refused, as BatchNorm2d refuses it; N·H·W = 0 is not."""
    with pytest.raises(ValueError, match=r"x: batch-norm training needs more than one value per channel.*N·H·W = 1"):
        FF.bn_relu(torch.zeros(1, C, 1, 1), None, None)
    assert FF.bn_relu(torch.zeros(0, C, 1, 1), None, None).shape == (0, C, 1, 1)
