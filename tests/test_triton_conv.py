"""Tier-B Triton implicit-GEMM BN-ReLU-conv (kernels/conv.py, backend "triton_conv") against the reference.

Runs on CPU under the Triton interpreter (TRITON_INTERPRET=1; skipped otherwise), so shapes are tiny: N·H·W ≤ ~300,
C ≤ 64. The interpreter's tile size is 32 rows, so every case spans several tiles (partial statistics merged, split
wgrad reduced) and the odd sizes leave a partial last tile.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from fastresnet import functional as FF
from fastresnet import reference
from fastresnet.backends import BackendUnsupportedError, get_backend_impl
from fastresnet.kernels import conv_fp32_precision, interpreting
from fastresnet.models import create_model
from fastresnet.nn import PreActConv2d

pytestmark = pytest.mark.skipif(
    not interpreting() and not torch.cuda.is_available(),
    reason="Triton kernels need a CUDA GPU or the interpreter (TRITON_INTERPRET=1)")

DEV = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
# fp32 at the precision in force (fastresnet.kernels.conv_fp32_precision). IEEE fp32 (CPU, or a GPU with TF32 off):
# the kernels and the reference (oneDNN/cuDNN conv) sum the K ≤ 576 products and the N·H·W reductions in different
# orders; values are O(10), so rounding differences stay below ~1e-5 relative, 1e-4 absolute. TF32 (a GPU's default
# for convs): both round every product's inputs to 10 mantissa bits (2^-11 relative), independently, so sums of up
# to 576 O(1) products differ by ~1e-3.
TOL32 = (dict(atol=5e-3, rtol=5e-3) if DEV == "cuda" and conv_fp32_precision() == "tf32"
         else dict(atol=1e-4, rtol=1e-4))

# (N, C_in, H, W, C_out, k, stride): channel counts 3, 16, 24, 32, 64, 72, 80; odd N·H·W (2·7·5 = 70, 3·9·9 = 243,
# 1·5·7 = 35 …). 80 input / 72 output channels span two 64-channel K blocks (the second one partial) in forward and
# dgrad, so the flattened (tap, channel block) K loop takes more than one step per tap. Stride 2 (dgrad by output
# phase): odd, even and mixed H, W (phases of unequal sizes), 1×1 (three phases without a tap) and an input one
# row high (no odd-row phases).
CASES = [
    (2, 16, 7, 5, 16, 3, 1),
    (3, 3, 9, 9, 16, 3, 2),
    (1, 24, 7, 9, 64, 3, 2),
    (2, 64, 5, 5, 16, 1, 1),
    (3, 16, 7, 7, 24, 1, 2),
    (1, 64, 5, 7, 64, 3, 1),
    (2, 80, 5, 3, 72, 3, 1),
    (2, 16, 8, 6, 32, 3, 2),
    (2, 32, 6, 5, 16, 1, 2),
    (1, 80, 7, 6, 72, 3, 2),
    (3, 16, 1, 5, 16, 3, 2),
]


def _inputs(n, c_in, h, w, c_out, k, stride, channels_last, dtype=torch.float32):
    """BN input with a large non-zero mean (exposes statistics bugs), its batch BN folded to (scale, shift)."""
    x = (-2.3 + 0.5 * torch.randn(n, c_in, h, w, device=DEV)).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gamma = torch.rand(c_in, device=DEV) + 0.5
    beta = torch.randn(c_in, device=DEV)
    mean, var = reference.batch_stats(x)
    rstd = torch.rsqrt(var + 1e-5)
    scale, shift = reference.scale_shift(mean, rstd, gamma, beta)
    weight = (torch.randn(c_out, c_in, k, k, device=DEV) / (k * (c_in ** 0.5))).to(dtype)
    return x, mean, rstd, scale, shift, weight


def _ref_backward(dy, x, scale, shift, mean, rstd, weight, stride, pad, training):
    a = reference.bn_relu(x, scale, shift, weight.dtype)
    da, dw, _ = torch.ops.aten.convolution_backward(
        dy, a, weight, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1, [True, True, False])
    dx, sum_dz, sum_dzx = reference.bn_relu_backward(da, x, scale, shift, mean, rstd, training)
    return dx, dw, sum_dz, sum_dzx


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [True, False])
def test_forward_and_output_stats(case, channels_last):
    from fastresnet.kernels.conv import conv_forward
    n, c_in, h, w, c_out, k, s = case
    x, mean, rstd, scale, shift, weight = _inputs(*case, channels_last)
    y_ref = reference.bn_relu_conv(x, scale, shift, weight, (s, s), (k // 2, k // 2))
    residual = torch.randn_like(y_ref) - 3.0
    y, m, v = conv_forward(x, scale, shift, weight, s, k // 2, residual=residual, stats=True)
    torch.testing.assert_close(y, y_ref + residual, **TOL32)
    m_ref, v_ref = reference.batch_stats(y_ref + residual)
    torch.testing.assert_close(m, m_ref, **TOL32)
    torch.testing.assert_close(v, v_ref, **TOL32)
    # the output keeps x's memory format (what the ops' fake implementations promise)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("big_mean", [1e4, -3e4])
def test_output_stats_accurate_for_large_mean(big_mean):
    """|mean| ≫ std with a trend across rows, so the 3 tiles' means differ: every tile is shifted by its first row
    (kernels/stats.py pivots) before the Chan merge, so nothing of size |mean| enters the cross terms."""
    from fastresnet.kernels.conv import conv_forward
    x, _, _, scale, shift, weight = _inputs(*CASES[0], True)
    res = big_mean + torch.randn(2, 16, 7, 5, device=DEV) + torch.linspace(-1, 1, 35, device=DEV).view(1, 1, 7, 5)
    y, m, v = conv_forward(x, scale, shift, weight, 1, 1, residual=res, stats=True)
    m64, v64 = reference.batch_stats(y.double())          # statistics of the stored fp32 y
    # mean: the final K_0 + shifted mean rounds once at |mean|: within 2 fp32 ulps of it (eps·|mean|);
    # var: partials of size O(std) keep it to a few fp32 ulps relative (unshifted tiles are off by ~1e-4 here)
    assert (m.double() - m64).abs().max() <= 2 * torch.finfo(torch.float32).eps * abs(big_mean)
    assert ((v.double() - v64).abs() / v64).max() <= 1e-5


def test_zero_padding_is_in_activated_space():
    # shift > 0 with x = 0 everywhere: a = relu(shift) > 0 inside, but the padded border must contribute 0
    from fastresnet.kernels.conv import conv_forward
    x = torch.zeros(1, 16, 5, 5, device=DEV).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.ones(16, device=DEV), torch.full((16,), 2.0, device=DEV)
    weight = torch.ones(16, 16, 3, 3, device=DEV)
    y, _, _ = conv_forward(x, scale, shift, weight, 1, 1)
    assert y[0, 0, 2, 2].item() == 2.0 * 16 * 9     # interior: 9 taps
    assert y[0, 0, 0, 0].item() == 2.0 * 16 * 4     # corner: 4 real taps, 5 padded zeros


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [True, False])
def test_backward_kernels(case, channels_last):
    from fastresnet.kernels.conv import conv_backward
    n, c_in, h, w, c_out, k, s = case
    x, mean, rstd, scale, shift, weight = _inputs(*case, channels_last)
    ho = (h + 2 * (k // 2) - k) // s + 1
    wo = (w + 2 * (k // 2) - k) // s + 1
    dy = torch.randn(n, c_out, ho, wo, device=DEV)
    if channels_last:
        dy = dy.contiguous(memory_format=torch.channels_last)
    got = conv_backward(dy, x, scale, shift, mean, rstd, weight, s, k // 2, True)
    ref = _ref_backward(dy, x, scale, shift, mean, rstd, weight, s, k // 2, True)
    for name, g, r in zip(("dx", "dweight", "sum_dz", "sum_dz_xhat"), got, ref):
        torch.testing.assert_close(g, r, **TOL32, msg=lambda m: f"{name}: {m}")
    assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("weight_channels_last", [True, False])
def test_dres_added_to_dx_and_weight_grad_layout(weight_channels_last):
    """dres is added to dx in the BN backward's dx pass: fp32 dx + dres rounded once, the same single fp32 addition
    as adding it afterwards, so bitwise equal; through the backend too. dW keeps the weight's memory format."""
    from fastresnet.kernels.conv import conv_backward
    x, mean, rstd, scale, shift, weight = _inputs(*CASES[2], True)
    if weight_channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(1, 64, 4, 5, device=DEV).contiguous(memory_format=torch.channels_last)
    dres = torch.randn_like(x).contiguous()  # NCHW: the launcher brings it to x's layout
    plain = conv_backward(dy, x, scale, shift, mean, rstd, weight, 2, 1, True)
    fused = conv_backward(dy, x, scale, shift, mean, rstd, weight, 2, 1, True, dres=dres)
    assert torch.equal(fused[0], plain[0] + dres)
    for a, b in zip(fused[1:], plain[1:]):
        assert torch.equal(a, b)
    assert fused[1].stride() == torch.empty_like(weight).stride()
    be = get_backend_impl("triton_conv")
    got = be.bn_relu_conv_backward(dy, x, scale, shift, mean, rstd, weight, (2, 2), (1, 1), True, False, dres)
    assert got[1] is None and torch.equal(got[0], fused[0])
    with pytest.raises(ValueError, match="dres"):
        conv_backward(dy, x, scale, shift, mean, rstd, weight, 2, 1, True, dres=dres[:, :3])


@pytest.mark.parametrize("h, w, k", [(7, 9, 3), (8, 6, 3), (7, 6, 1), (1, 5, 3), (5, 5, 1)])
def test_stride2_dgrad_phases_take_only_reaching_taps(h, w, k):
    """dgrad's phase launches: every input position is in exactly one phase, and a phase's taps are exactly those
    (kh, kw) with h + pad − kh and w + pad − kw even (the only ones that reach it) — counted by brute force."""
    from fastresnet.kernels.conv import dgrad_phases
    pad = k // 2
    phases = dgrad_phases(h, w, k, 2, pad)
    assert sum(p.rows for p in phases) == h * w
    for p in phases:
        assert p.rows == len(range(p.ph, h, 2)) * len(range(p.pw, w, 2))
        reach = [(kh, kw) for kh in range(k) for kw in range(k) if (p.ph + pad - kh) % 2 == (p.pw + pad - kw) % 2 == 0]
        assert p.taps_h * p.taps_w == len(reach)
    # every tap reaches one phase of four: k² taps in all (9 for 3×3, where each row used to evaluate all 9)
    if h > 1 and w > 1:
        assert sum(p.taps_h * p.taps_w for p in phases) == k * k
    assert dgrad_phases(h, w, k, 1, pad) == ((0, 0, h * w, k, k),)


def test_stride2_dgrad_bitwise_deterministic():
    from fastresnet.kernels.conv import conv_backward
    x, mean, rstd, scale, shift, weight = _inputs(*CASES[9], True)
    dy = torch.randn(1, 72, 4, 3, device=DEV).contiguous(memory_format=torch.channels_last)
    b1 = conv_backward(dy, x, scale, shift, mean, rstd, weight, 2, 1, True, need_weight_grad=False)
    b2 = conv_backward(dy, x, scale, shift, mean, rstd, weight, 2, 1, True, need_weight_grad=False)
    for a, b in zip(b1, b2):
        assert (a is None and b is None) or torch.equal(a, b)


def test_gpu_tile_rule(monkeypatch):
    """The GPU launch rule (host-side Python, checked here without a GPU; benchmarks/static_sm90.py compiles the
    launches): stage 3 of a CIFAR net at batch 128 (8×8, M = 8,192 rows) gets at least one program per SM in every
    direction, the fp32 wgrad tiles that used to need 288 KB of shared memory take 64-row steps, and wgrad's serial
    loop stays bounded at every zoo size."""
    from fastresnet.kernels import conv as K
    monkeypatch.setattr(K, "interpreting", lambda: False)
    monkeypatch.setattr(K, "_sms", lambda device: 132)
    gpu = torch.device("cuda", 0)
    for c_in, c_out, k in ((64, 64, 3), (64, 256, 1), (256, 64, 1)):
        for el in (2, 4):
            fwd = K.gemm_tiles(8192, c_out, c_in, el, el, gpu)
            dgrad = K.gemm_tiles(8192, c_in, c_out, el, el, gpu)
            for t, n in ((fwd, c_out), (dgrad, c_in)):
                assert -(-8192 // t.block_m) * -(-n // t.block_n) >= 132, (c_in, c_out, t)
            w, rows, splits = K.wgrad_tiles(8192, c_out, c_in, k * k, el, el, gpu)
            assert k * k * -(-c_in // w.block_k) * -(-c_out // w.block_n) * splits >= 132, (c_in, c_out, w)
    w, _, _ = K.wgrad_tiles(64 * 28 * 28, 512, 128, 1, 4, 4, gpu)       # fp32, 128-wide C_out blocks
    assert w.block_m == 64 and w.num_stages * w.block_m * (w.block_n + w.block_k) * 4 <= K._SMEM_BUDGET
    for m in (8192, 128 * 32 * 32, 64 * 56 * 56):
        w, rows, splits = K.wgrad_tiles(m, 64, 64, 9, 2, 2, gpu)
        assert rows // w.block_m <= K._MAX_ROW_BLOCKS and rows * splits >= m > rows * (splits - 1)
    assert K.gemm_tiles(8192, 64, 64, 2, 2, gpu) == K.gemm_tiles(8192, 64, 64, 2, 2, gpu)  # a pure function


def test_backward_eval_mode_and_no_weight_grad():
    from fastresnet.kernels.conv import conv_backward
    case = CASES[0]
    x, mean, rstd, scale, shift, weight = _inputs(*case, True)
    dy = torch.randn(2, 16, 7, 5, device=DEV).contiguous(memory_format=torch.channels_last)
    dx, dw, sdz, sdzx = conv_backward(dy, x, scale, shift, mean, rstd, weight, 1, 1, False, need_weight_grad=False)
    dx_ref, _, sdz_ref, sdzx_ref = _ref_backward(dy, x, scale, shift, mean, rstd, weight, 1, 1, False)
    assert dw is None
    torch.testing.assert_close(dx, dx_ref, **TOL32)
    torch.testing.assert_close(sdz, sdz_ref, **TOL32)
    torch.testing.assert_close(sdzx, sdzx_ref, **TOL32)


def test_bitwise_deterministic_and_split_invariant():
    from fastresnet.kernels.conv import conv_backward, conv_forward
    x, mean, rstd, scale, shift, weight = _inputs(3, 16, 7, 7, 24, 3, 1, True)
    res = torch.randn(3, 24, 7, 7, device=DEV).contiguous(memory_format=torch.channels_last)
    f1 = conv_forward(x, scale, shift, weight, 1, 1, residual=res, stats=True)
    f2 = conv_forward(x, scale, shift, weight, 1, 1, residual=res, stats=True)
    dy = torch.randn_like(f1[0])
    b1 = conv_backward(dy, x, scale, shift, mean, rstd, weight, 1, 1, True, wgrad_splits=3)
    b2 = conv_backward(dy, x, scale, shift, mean, rstd, weight, 1, 1, True, wgrad_splits=3)
    for a, b in zip(f1 + b1, f2 + b2):
        assert torch.equal(a, b)
    # a different split count only reorders fp32 sums over N·H·W = 147 rows
    b3 = conv_backward(dy, x, scale, shift, mean, rstd, weight, 1, 1, True, wgrad_splits=1)
    torch.testing.assert_close(b3[1], b1[1], **TOL32)


def test_fp16_within_twice_torch_fp16_error():
    # fp16 operands, fp32 accumulation; judged against the error the fp16 reference makes vs an fp32 one
    from fastresnet.kernels.conv import conv_backward, conv_forward
    x, mean, rstd, scale, shift, weight = _inputs(2, 16, 7, 5, 16, 3, 2, True, torch.float16)
    y, _, _ = conv_forward(x, scale, shift, weight, 2, 1)
    y_ref16 = reference.bn_relu_conv(x, scale, shift, weight, (2, 2), (1, 1))
    y_ref32 = reference.bn_relu_conv(x.float(), scale, shift, weight.float(), (2, 2), (1, 1))
    assert y.dtype == torch.float16
    err, err_ref = (y.float() - y_ref32).abs().max(), (y_ref16.float() - y_ref32).abs().max()
    assert err <= 2 * err_ref + 1e-3, (err, err_ref)
    dy = torch.randn_like(y)
    dx, dw, _, _ = conv_backward(dy, x, scale, shift, mean, rstd, weight, 2, 1, True)
    dx32, dw32, _, _ = _ref_backward(dy.float(), x.float(), scale, shift, mean, rstd, weight.float(), 2, 1, True)
    dx16, dw16, _, _ = _ref_backward(dy, x, scale, shift, mean, rstd, weight, 2, 1, True)
    for g, r16, r32 in ((dx, dx16, dx32), (dw, dw16, dw32)):
        assert g.dtype == torch.float16
        assert (g.float() - r32).abs().max() <= 2 * (r16.float() - r32).abs().max() + 1e-3


@pytest.mark.parametrize("channels_last", [True, False])
def test_preact_conv_module_matches_torch_backend(channels_last):
    """PreActConv2d through the custom ops: output, dx, dγ, dβ, dW and running statistics."""
    torch.manual_seed(1)
    ref = PreActConv2d(24, 16, 3, 2, 1, backend="torch").to(DEV)
    fused = copy.deepcopy(ref)
    fused.backend = "triton_conv"
    x0 = -2.3 + 0.5 * torch.randn(3, 24, 7, 5, device=DEV)
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    outs = []
    for mod in (ref, fused):
        x = x0.clone().requires_grad_(True)
        y = mod(x)
        y.backward(torch.cos(torch.arange(y.numel(), device=DEV, dtype=y.dtype)).view_as(y))
        outs.append((y, x.grad, mod.bn.weight.grad, mod.bn.bias.grad, mod.conv.weight.grad, mod.bn.running_mean,
                     mod.bn.running_var))
    for name, a, b in zip(("y", "dx", "dgamma", "dbeta", "dW", "running_mean", "running_var"), *outs):
        torch.testing.assert_close(b, a, **TOL32, msg=lambda m: f"{name}: {m}")


def test_support_checks():
    be = get_backend_impl("triton_conv")
    assert be.why_not(torch.zeros(1, 3, 4, 4, dtype=torch.float64, device=DEV)) is not None
    w5 = torch.zeros(8, 8, 5, 5)
    assert "5×5" in be.conv_why_not(w5, (1, 1), (2, 2))
    assert "stride" in be.conv_why_not(torch.zeros(8, 8, 3, 3), (3, 3), (1, 1))
    assert "padding" in be.conv_why_not(torch.zeros(8, 8, 3, 3), (1, 1), (0, 0))
    if DEV == "cpu":
        assert not be.auto_ok(torch.zeros(1, 8, 4, 4))     # "auto" never picks the interpreter
        x = torch.randn(2, 8, 6, 6)
        with pytest.raises(BackendUnsupportedError, match="5×5"):
            FF.bn_relu_conv2d(x, torch.randn(8, 8, 5, 5), None, None, stride=1, padding=2, backend="triton_conv")


@pytest.mark.slow
def test_preact_resnet20_training_step_matches_torch():
    """One training step of preact_resnet20 (batch 2, 8×8): loss, every gradient and every buffer."""
    torch.manual_seed(0)
    model = create_model("preact_resnet20", num_classes=10).to(DEV)
    x = torch.randn(2, 3, 8, 8, device=DEV).contiguous(memory_format=torch.channels_last)
    target = torch.tensor([1, 7], device=DEV)
    results = []
    for name in ("torch", "triton_conv"):
        m = copy.deepcopy(model)
        for mod in m.modules():
            if hasattr(mod, "backend"):
                mod.backend = name
        loss = F.cross_entropy(m(x), target)
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in m.named_parameters()}, dict(m.named_buffers())))
    (loss_ref, g_ref, b_ref), (loss, g, b) = results
    # fp32 through 19 convs and 19 BNs: reordered sums compound, so 1e-4 relative on gradients (measured ~3e-6)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], **TOL32, msg=lambda m: f"grad {k}: {m}")
    for k in b_ref:
        torch.testing.assert_close(b[k], b_ref[k], **TOL32, msg=lambda m: f"buffer {k}: {m}")


@pytest.mark.parametrize("backend", ["torch", "triton_conv"])
def test_unit_chain_op_stats_residual_and_grads(backend):
    """Basic pre-act unit as a chain: conv1's epilogue statistics feed BN2; conv2 adds the shortcut and returns the
    statistics of x_{l+1}. Compared with the unfused PyTorch unit (BatchNorm2d, ReLU, conv2d autograd)."""
    torch.manual_seed(2)
    c = 16
    bn1, bn2 = torch.nn.BatchNorm2d(c).to(DEV), torch.nn.BatchNorm2d(c).to(DEV)
    for bn in (bn1, bn2):
        torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
        torch.nn.init.normal_(bn.bias)
    w1 = (torch.randn(c, c, 3, 3, device=DEV) / 12).requires_grad_(True)
    w2 = (torch.randn(c, c, 3, 3, device=DEV) / 12).requires_grad_(True)
    x0 = (-2.3 + 0.5 * torch.randn(2, c, 7, 5, device=DEV)).contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x0)

    fbn1, fbn2 = copy.deepcopy(bn1), copy.deepcopy(bn2)
    x = x0.clone().requires_grad_(True)
    h, m1, v1 = FF.bn_relu_conv2d(x, w1, fbn1.running_mean, fbn1.running_var, fbn1.weight, fbn1.bias,
                                  fbn1.num_batches_tracked, padding=1, backend=backend, return_stats=True)
    out, m2, v2 = FF.bn_relu_conv2d(h, w2, fbn2.running_mean, fbn2.running_var, fbn2.weight, fbn2.bias,
                                    fbn2.num_batches_tracked, padding=1, stats=(m1, v1), residual=x,
                                    backend=backend, return_stats=True)
    out.backward(dy)
    got = [out, m2, v2, x.grad, w1.grad, w2.grad, fbn1.weight.grad, fbn2.bias.grad, fbn2.running_var]

    w1.grad = w2.grad = None
    xr = x0.clone().requires_grad_(True)
    hr = F.conv2d(torch.relu(bn1(xr)), w1, padding=1)
    out_r = F.conv2d(torch.relu(bn2(hr)), w2, padding=1) + xr
    out_r.backward(dy)
    m_r, v_r = reference.batch_stats(out_r.detach())
    want = [out_r, m_r, v_r, xr.grad, w1.grad, w2.grad, bn1.weight.grad, bn2.bias.grad, bn2.running_var]
    names = ["out", "mean", "var", "dx", "dW1", "dW2", "dgamma1", "dbeta2", "running_var2"]
    for name, g, r in zip(names, got, want):
        torch.testing.assert_close(g, r, **TOL32, msg=lambda m: f"{name}: {m}")


def test_unit_chain_op_is_traceable():
    """The custom op has a fake implementation: opcheck (schema, fake tensor, autograd registration)."""
    from fastresnet.ops.unit_ops import _bn_relu_conv_stats
    x, mean, rstd, scale, shift, weight = _inputs(2, 16, 5, 5, 16, 3, 1, True)
    res = torch.randn(2, 16, 5, 5, device=DEV).contiguous(memory_format=torch.channels_last)
    gamma = torch.ones(16, device=DEV, requires_grad=True)
    torch.library.opcheck(_bn_relu_conv_stats.op,
                          (x, weight, mean, rstd, gamma, None, res, [1, 1], [1, 1], True, "triton_conv"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("splits", [1, 5])  # 5 splits of the 5 row blocks: sum_rows' two levels (groups of 3)
def test_last_program_finish_equals_separate_merge_bitwise(monkeypatch, splits):
    # wgrad's split-K sum finished by each tile's last program (the default) against the separate ordered-sum launch
    # (FASTRESNET_LAST_PROGRAM_MERGE=0): the same order of the same fp32 sums, so the same bits; the counters are
    # left at zero for the next launch
    # (and the forward's statistics merge of its 5 row tiles, two levels, finished by each column block's last tile)
    from fastresnet.kernels import stats as kstats
    from fastresnet.kernels.conv import conv_backward, conv_forward
    x, mean, rstd, scale, shift, weight = _inputs(3, 8, 7, 7, 16, 3, 1, True)
    dy = torch.randn(3, 16, 7, 7, device=DEV).contiguous(memory_format=torch.channels_last)
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("FASTRESNET_LAST_PROGRAM_MERGE", flag)
        out[flag] = (conv_backward(dy, x, scale, shift, mean, rstd, weight, 1, 1, True, wgrad_splits=splits)
                     + conv_forward(x, scale, shift, weight, 1, 1, residual=dy, stats=True))
    for a, b in zip(out["1"], out["0"]):
        assert torch.equal(a, b)
    assert not kstats.launch_counters(1, x.device).any()


@pytest.mark.parametrize("training", [True, False])
def test_two_level_finish_over_phase_launches_equals_separate_merge(monkeypatch, training):
    # a 3×3 stride-2 dgrad of an 18×18 input (four phase launches of 6 row tiles: 24 tiles of BN-backward partials
    # in groups of merge_rows(24) = 5 that span phase launches, the last group of 4) and wgrad's 162 rows in 6 splits
    # (groups of 3) finished in two levels inside the launches: bitwise the separate merges, the counters left at
    # zero, and close to the float64 composition
    from fastresnet.kernels import stats as kstats
    from fastresnet.kernels.conv import conv_backward, gemm_tiles, wgrad_tiles
    x, mean, rstd, scale, shift, weight = _inputs(2, 8, 18, 18, 8, 3, 2, True)
    dy = torch.randn(2, 8, 9, 9, device=DEV).contiguous(memory_format=torch.channels_last)
    assert gemm_tiles(2 * 81, 8, 8, 4, 4, x.device).block_m == 32  # 6 tiles per phase
    assert wgrad_tiles(162, 8, 8, 9, 4, 4, x.device, 6)[2] == 6
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("FASTRESNET_LAST_PROGRAM_MERGE", flag)
        out[flag] = conv_backward(dy, x, scale, shift, mean, rstd, weight, 2, 1, training, wgrad_splits=6)
    for a, b in zip(out["1"], out["0"]):
        assert torch.equal(a, b)
    assert not kstats.launch_counters(1, x.device).any()
    ref = _ref_backward(*(t.double() for t in (dy, x, scale, shift, mean, rstd, weight)), 2, 1, training)
    for got, want in zip(out["1"], ref):
        torch.testing.assert_close(got.double(), want, **TOL32)


def test_last_program_merge_switch_rejects_bad_values(monkeypatch):
    from fastresnet.kernels import last_program_merge
    monkeypatch.setenv("FASTRESNET_LAST_PROGRAM_MERGE", "maybe")
    with pytest.raises(ValueError, match="FASTRESNET_LAST_PROGRAM_MERGE"):
        last_program_merge()
