"""fastresnet.reference (the oracle) against PyTorch's own BatchNorm / ReLU / conv autograd, in float64."""
import pytest
import torch
from torch.nn import functional as F

from fastresnet import reference


def _bn_inputs(shape=(3, 5, 7, 3), mean=-2.3, std=0.5, dtype=torch.float64):
    x = (mean + std * torch.randn(shape, dtype=dtype)).requires_grad_()
    c = shape[1]
    gamma = (1 + 0.3 * torch.randn(c, dtype=dtype)).requires_grad_()
    beta = (0.2 * torch.randn(c, dtype=dtype)).requires_grad_()
    return x, gamma, beta


def test_batch_stats_matches_torch_and_survives_large_mean():
    x = 1000.0 + torch.randn(4, 3, 5, 5)  # |μ| ≫ σ: one-pass E[x²]−E[x]² in fp32 would lose the variance entirely
    mean, var = reference.batch_stats(x)
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=0, atol=1e-4)
    # fp32 two-pass: error ~ eps32·|μ|·σ/σ² relative, far below the 1e-2 a one-pass formula would miss by
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_bn_relu_backward_matches_autograd(training):
    x, gamma, beta = _bn_inputs()
    rm, rv = torch.randn(5, dtype=torch.float64) - 2, torch.rand(5, dtype=torch.float64) + 0.5
    eps = 1e-5
    a = F.relu(F.batch_norm(x, rm.clone(), rv.clone(), gamma, beta, training=training, eps=eps))
    dy = torch.randn_like(a)
    gx, gg, gb = torch.autograd.grad(a, (x, gamma, beta), dy)

    if training:
        mean, var = reference.batch_stats(x.detach())
    else:
        mean, var = rm, rv
    rstd = torch.rsqrt(var + eps)
    scale, shift = reference.scale_shift(mean, rstd, gamma.detach(), beta.detach())
    torch.testing.assert_close(reference.bn_relu(x.detach(), scale, shift), a.detach())
    dres = torch.randn_like(dy)
    dx, sum_dz, sum_dz_xhat = reference.bn_relu_backward(dy, x.detach(), scale, shift, mean, rstd, training, dres)
    torch.testing.assert_close(dx, gx + dres)
    torch.testing.assert_close(sum_dz_xhat, gg)
    torch.testing.assert_close(sum_dz, gb)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_update_matches_batchnorm(momentum):
    bn = torch.nn.BatchNorm2d(4, momentum=momentum)
    rm, rv, nbt = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    for _ in range(3):
        x = 3 + 2 * torch.randn(2, 4, 3, 3)
        bn(x)
        mean, var = reference.batch_stats(x)
        reference.update_running_stats(rm, rv, nbt, mean, var, x.numel() // 4, momentum)
    torch.testing.assert_close(rm, bn.running_mean)
    torch.testing.assert_close(rv, bn.running_var)
    assert nbt.item() == bn.num_batches_tracked.item() == 3


def test_bn_relu_conv_pads_the_activation_not_the_input():
    # shift > 0 makes relu(0·s + t) = t ≠ 0: padding x with zeros before the transform would put t at the border.
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    scale, shift = torch.ones(2, dtype=torch.float64), torch.full((2,), 3.0, dtype=torch.float64)
    w = torch.ones(1, 2, 3, 3, dtype=torch.float64)
    y = reference.bn_relu_conv(x, scale, shift, w, (1, 1), (1, 1))
    expect = F.conv2d(F.relu(x + 3.0), w, padding=1)
    torch.testing.assert_close(y, expect)
    wrong = F.conv2d(F.relu(F.pad(x, (1, 1, 1, 1)) + 3.0), w)
    assert not torch.allclose(y, wrong)
