"""The public fused layers (`BNReLU2d`, `PreActConv2d`, `ResidualUnit`, functional API, custom ops) with
backend="triton" and backend="torch" against unfused nn.BatchNorm2d + nn.ReLU + nn.Conv2d.

Triton runs on CPU under the interpreter (TRITON_INTERPRET=1, set below when unset and there is no GPU).
"""
import os
from collections import OrderedDict

import torch

from fastresnet.kernels import interpreting  # does not import triton

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
INTERPRET = interpreting()  # as Triton reads TRITON_INTERPRET

import pytest  # noqa: E402
from torch import nn  # noqa: E402

import fastresnet  # noqa: E402
import fastresnet.functional as FF  # noqa: E402
from fastresnet import BNReLU2d, PreActConv2d, reference  # noqa: E402
from fastresnet.models import ResNet  # noqa: E402
from fastresnet.nn import ResidualUnit  # noqa: E402
from fastresnet.ops.bn_ops import conv_out_shape  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
TRITON_OK = INTERPRET or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="triton backend needs a GPU or TRITON_INTERPRET=1")
BACKENDS = [pytest.param("triton", marks=needs_triton), "torch"]
# fp32 fused vs unfused: the same math with different summation orders (and the BN backward in affine form), so
# results agree to a few fp32 ulps of the largest terms; 1e-4 relative covers reductions over up to ~500 values.
TOL = dict(atol=1e-5, rtol=1e-4)


def shifted(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (-2.3 + 0.5 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)


def unfused_preact(fused: PreActConv2d, momentum) -> nn.Sequential:
    c = fused.conv
    seq = nn.Sequential(OrderedDict(
        bn=nn.BatchNorm2d(c.in_channels, momentum=momentum), relu=nn.ReLU(),
        conv=nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, bias=False))).to(DEVICE)
    seq.load_state_dict(fused.state_dict())
    return seq


def randomize_bn(bn: nn.BatchNorm2d, seed: int, shift: float = 0.5) -> None:
    """γ in [0.5, 1.5] and β = shift + [0, 1): with shift > 0, relu(β) ≠ 0 where a padded x would be 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(0.5 + torch.rand(bn.num_features, generator=g))
        bn.bias.copy_(shift + torch.rand(bn.num_features, generator=g))


def run_step(module, x, dy):
    """Forward and backward once; returns (y, dx) and leaves .grad on the parameters."""
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(dy)
    return y.detach(), x.grad


def assert_same_state(fused, unfused, prefix=""):
    for (name, a), (_, b) in zip(fused.state_dict().items(), unfused.state_dict().items()):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{prefix}{name}: {m}")
    for (name, a), (_, b) in zip(fused.named_parameters(), unfused.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL, msg=lambda m: f"{prefix}{name}.grad: {m}")


def assert_same_step(fused, unfused, x, dy, prefix=""):
    """One forward + backward of both modules from zeroed gradients: y, dx, the state dicts (running statistics
    included) and the parameter gradients agree. State and parameters are paired in order (unfused may be a
    Sequential whose names differ)."""
    for m in (fused, unfused):
        m.zero_grad()
    y_f, dx_f = run_step(fused, x, dy)
    y_u, dx_u = run_step(unfused, x, dy)
    torch.testing.assert_close(y_f, y_u, **TOL, msg=lambda m: f"{prefix}y: {m}")
    torch.testing.assert_close(dx_f, dx_u, **TOL, msg=lambda m: f"{prefix}dx: {m}")
    assert_same_state(fused, unfused, prefix)


# ---- layers vs unfused -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout,momentum,conv", [
    ("nchw", 0.1, (3, 1, 1)), ("nhwc", 0.1, (3, 1, 1)), ("nhwc", None, (3, 1, 1)), ("nchw", None, (1, 1, 0)),
    ("nhwc", 0.1, (1, 1, 0)), ("nhwc", 0.1, (3, 2, 1)), ("nchw", None, (3, 2, 1)),
])
def test_preact_conv2d_matches_unfused(backend, layout, momentum, conv):
    k, stride, pad = conv
    torch.manual_seed(0)
    fused = PreActConv2d(5, 6, k, stride, pad, momentum=momentum, backend=backend).to(DEVICE)
    randomize_bn(fused.bn, 1)
    unfused = unfused_preact(fused, momentum)
    c = fused.conv
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    for step in range(2):  # two steps: momentum=None (cumulative average) differs from momentum=1 only then
        x = shifted(2, 5, 7, 5, seed=step).contiguous(memory_format=fmt)
        dy = shifted(*conv_out_shape(x.shape, c.weight.shape, c.stride, c.padding), seed=10 + step) + 2.3
        assert_same_step(fused, unfused, x, dy, f"step {step}: ")
    assert fused.bn.num_batches_tracked.item() == 2
    fused.eval()
    unfused.eval()
    assert_same_step(fused, unfused, shifted(2, 5, 7, 5, seed=5).contiguous(memory_format=fmt), dy, "eval: ")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (2, 33, 1, 1), (1, 24, 5, 3)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_relu2d_matches_unfused(backend, shape, momentum):
    c = shape[1]
    fused = BNReLU2d(c, momentum=momentum, backend=backend).to(DEVICE)
    randomize_bn(fused, 2, shift=-0.5)
    unfused = nn.Sequential(nn.BatchNorm2d(c, momentum=momentum), nn.ReLU()).to(DEVICE)
    unfused[0].load_state_dict(fused.state_dict())
    for step in range(2):
        x = shifted(*shape, seed=step).contiguous(memory_format=torch.channels_last)
        dy = shifted(*shape, seed=10 + step) + 2.3
        assert_same_step(fused, unfused, x, dy, f"step {step}: ")
    fused.eval()
    unfused.eval()
    assert_same_step(fused, unfused, x, dy, "eval: ")


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_applies_to_activation(backend):
    """docs/architecture.md §2: zero padding of the conv pads a = relu(BN(x)), not x. With β > 0 the wrong order gives
    relu(β) ≠ 0 on the border, so the wrong result differs from the right one — check both."""
    fused = PreActConv2d(4, 3, 3, 1, 1, backend=backend).to(DEVICE)
    randomize_bn(fused.bn, 3, shift=1.0)
    x = shifted(2, 4, 5, 5)
    y = fused(x)
    mean, var = reference.batch_stats(x)
    scale, shift = reference.scale_shift(mean, torch.rsqrt(var + fused.bn.eps), fused.bn.weight, fused.bn.bias)
    right = nn.functional.conv2d(reference.bn_relu(x, scale, shift), fused.conv.weight, padding=1)
    wrong = nn.functional.conv2d(reference.bn_relu(nn.functional.pad(x, (1, 1, 1, 1)), scale, shift),
                                 fused.conv.weight)
    torch.testing.assert_close(y, right, **TOL)
    assert (y - wrong).abs().max() > 0.1


# ---- autograd and custom-op checks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(backend, training):
    """float64 gradcheck of the hand-written backward (training: batch statistics, including their dependence on
    x; eval: running statistics as constants), through bn_relu and bn_relu_conv2d with padding and stride.
    The triton kernels also support float64: checked in gradcheck's fast mode (a random projection of the
    Jacobian, two evaluations per input) to keep the interpreter quick."""
    x = shifted(2, 3, 3, 3, dtype=torch.float64).requires_grad_()
    w = (0.5 * torch.randn(2, 3, 3, 3, dtype=torch.float64, device=DEVICE)).requires_grad_()
    gamma = (0.5 + torch.rand(3, dtype=torch.float64, device=DEVICE)).requires_grad_()
    beta = (0.3 * torch.randn(3, dtype=torch.float64, device=DEVICE)).requires_grad_()
    # eval: running statistics, not the batch's (so the BN output is not simply normalised)
    rm = None if training else torch.full((3,), -2.0, dtype=torch.float64, device=DEVICE)
    rv = None if training else torch.full((3,), 0.3, dtype=torch.float64, device=DEVICE)

    def f(x, w, gamma, beta):
        a = FF.bn_relu(x, rm, rv, gamma, beta, training=training, backend=backend)
        y = FF.bn_relu_conv2d(x, w, rm, rv, gamma, beta, training=training, stride=2, padding=1, backend=backend)
        return a, y

    assert torch.autograd.gradcheck(f, (x, w, gamma, beta), eps=1e-6, atol=1e-6, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_custom_ops(backend):
    opcheck = torch.library.opcheck
    x = shifted(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    mean, var = reference.batch_stats(x)
    rstd = torch.rsqrt(var + 1e-5)
    g, b = torch.rand(3, device=DEVICE) + 0.5, torch.randn(3, device=DEVICE)
    w = torch.randn(4, 3, 3, 3, device=DEVICE)
    ops = torch.ops.fastresnet
    opcheck(ops.batch_stats.default, (x, backend))
    opcheck(ops.add_stats.default, (x.requires_grad_(), shifted(2, 3, 4, 4).contiguous(
        memory_format=torch.channels_last).requires_grad_(), backend))
    x = x.detach().requires_grad_()
    opcheck(ops.bn_relu.default, (x, mean, rstd, g.requires_grad_(), b.requires_grad_(), True, backend))
    opcheck(ops.bn_relu_conv.default, (x, w.requires_grad_(), mean, rstd, g, b, [1, 1], [1, 1], True, backend))


def test_bad_inputs_name_the_argument():
    m = PreActConv2d(3, 4, 3, 1, 1, backend="torch")
    with pytest.raises(TypeError, match="x: expected dtype"):
        m(torch.zeros(2, 3, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="x: expected 3 channels"):
        m(torch.zeros(2, 5, 4, 4))
    with pytest.raises(ValueError, match="N·H·W = 1"):
        BNReLU2d(3, backend="torch")(torch.zeros(1, 3, 1, 1))
    with pytest.raises(ValueError, match="bn_weight: expected device meta"):
        FF.bn_relu(torch.zeros(2, 3, 4, 4, device="meta"), None, None, torch.ones(3), None)
    with pytest.raises(ValueError, match="b: expected the shape of a"):
        FF.add_stats(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5))


@needs_triton
def test_bad_inputs_triton_backend():
    from fastresnet.backends import BackendUnsupportedError
    with pytest.raises(BackendUnsupportedError, match="device meta is not supported"):
        FF.bn_relu(torch.zeros(2, 3, 4, 4, device="meta"), None, None, backend="triton")
    with pytest.raises(ValueError, match="x: expected 3 channels"):
        PreActConv2d(3, 4, 3, 1, 1, backend="triton").to(DEVICE)(torch.zeros(2, 5, 4, 4, device=DEVICE))


# ---- memory: bytes saved for backward ------------------------------------------------------------------------------
def saved_bytes(module, x):
    """Bytes of distinct storages autograd saves for backward during module(x) (deduplicated by data_ptr)."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.requires_grad_())
    return sum(storages.values())


class EagerPreActUnit(nn.Module):
    """The same full pre-activation unit from nn.BatchNorm2d / nn.ReLU / nn.Conv2d (identity shortcut)."""

    def __init__(self, channels, bottleneck):
        super().__init__()
        b = channels // 4 if bottleneck else channels
        specs = [(channels, b, 1), (b, b, 3), (b, channels, 1)] if bottleneck else [(channels, b, 3), (b, b, 3)]
        self.layers = nn.Sequential(*[nn.Sequential(nn.BatchNorm2d(i), nn.ReLU(), nn.Conv2d(i, o, k, 1, k // 2,
                                                                                            bias=False))
                                      for i, o, k in specs])

    def forward(self, x):
        return x + self.layers(x)


@needs_triton
@pytest.mark.parametrize("form,channels", [("basic", 16), ("bottleneck", 64)])
def test_saved_memory_vs_eager(form, channels):
    x = shifted(8, channels, 16, 16)
    fused = ResidualUnit(channels, channels, 1, form=form, variant="full_preact", backend="triton").to(DEVICE)
    eager = EagerPreActUnit(channels, form == "bottleneck").to(DEVICE)
    fused_b, eager_b = saved_bytes(fused, x.clone()), saved_bytes(eager, x.clone())
    # eager keeps BN input + ReLU output per layer, fused only the BN input (the unit input x included: its first
    # BN saves it); weights and [C] vectors add ~2-4%, so the ratio is just above 0.5 (observed ≈ 0.52)
    assert fused_b <= 0.55 * eager_b, (fused_b, eager_b)


# ---- convergence -----------------------------------------------------------------------------------------------------
def _digits_batches(steps, batch):
    """scikit-learn's 8×8 digits (real images), 3 channels, normalised: two batches alternating, so that 20 steps
    of a tiny net visibly fit them."""
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn provides the 8×8 digits")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None].expand(-1, 3, -1, -1) / 16.0 - 0.3
    y = torch.tensor(d.target)
    return [(x[i % 2 * batch:(i % 2 + 1) * batch].to(DEVICE), y[i % 2 * batch:(i % 2 + 1) * batch].to(DEVICE))
            for i in range(steps)]


@pytest.mark.slow
@needs_triton
def test_convergence_triton_vs_torch():
    """A tiny pre-act ResNet (one stage of one basic unit, width 8) trained 20 SGD steps from the same init with
    backend="triton" and backend="torch" gives the same losses; fp32 differences in summation order grow through
    training, so the per-step tolerance is 1e-4 relative (observed far smaller)."""
    steps, losses, params = 20, {}, {}
    batches = _digits_batches(steps, 8)
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = ResNet("basic", [1], [8], 10, stem_width=8, backend=backend).to(DEVICE)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses[backend] = []
        for x, y in batches:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[backend].append(loss.item())
        params[backend] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["torch"]), atol=1e-5, rtol=1e-4)
    assert losses["torch"][-1] < losses["torch"][0] - 0.1  # it actually trains (observed 2.25 -> 1.97)
    torch.testing.assert_close(params["triton"], params["torch"], atol=1e-4, rtol=1e-3)


def _available(name):
    reason = fastresnet.available_backends()[name]
    return pytest.param(name, marks=pytest.mark.skipif(
        reason != "ok" or (name.startswith("triton") and not TRITON_OK), reason=f"backend {name}: {reason}"))


@pytest.mark.parametrize("backend", ["torch", _available("ext"), _available("triton"), _available("triton_conv")])
def test_residual_add_under_autocast_promotes_like_eager(backend):
    # Under autocast the conv runs in bf16 while a residual stream may stay fp32: like eager `conv(a) + res`, the
    # sum is fp32 (one rounding, from the fp32 add of the bf16 conv output and the residual).
    m = PreActConv2d(16, 16, 3, 1, 1, backend=backend).to(DEVICE)
    x = shifted(2, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    res = shifted(2, 16, 5, 5, seed=1).contiguous(memory_format=torch.channels_last)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        y, mean, var = m.forward_stats(x, residual=res)
        y_eager = unfused_preact(m, 0.1).to(DEVICE)(x) + res
    assert y.dtype == y_eager.dtype == torch.float32
    # bf16 conv: one bf16 rounding of the activation and of the conv output (2^-8 relative) may differ
    torch.testing.assert_close(y, y_eager, atol=3e-2, rtol=2e-2)
    ref_mean, ref_var = reference.batch_stats(y)
    torch.testing.assert_close(mean, ref_mean, **TOL)
    torch.testing.assert_close(var, ref_var, **TOL)
