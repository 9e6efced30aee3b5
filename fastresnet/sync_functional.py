"""Synchronised fused ops: `functional.bn_relu_conv2d` / `functional.bn_relu` in training mode, and plain BN, with
the BN statistics of the global batch split across the ranks of a process group (math in `fastresnet.sync`).

Forward: `functional.bn_statistics(..., process_group=group)` combines the ranks' statistics and updates the running
statistics once. Backward (`SyncBNReLUConvFunction`, `SyncBNReLUFunction`): the fused op's backward runs in its eval
form, which yields dx_const = s·dz and the local sums Σdz, Σdz·x̂; `sync.combine_grad_terms` all-reduces the sums and
adds the batch-statistics terms back. dγ, dβ stay the local sums, since DistributedDataParallel averages parameter
gradients itself. The correction is one extra elementwise pass over x and dz_const per layer (not fused into the conv
kernels); per-device BN (the default) has no such cost.

`SyncBNFunction` is the same scheme without the ReLU and the conv, for plain `nn.BatchNorm2d` modules
(`distributed.SyncBatchNorm2d`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastresnet import functional as FF
from fastresnet import ops, reference
from fastresnet.backends import resolve
from fastresnet.ops import bn_ops
from fastresnet.sync import combine_grad_terms


class _SyncBNFunctionBase(torch.autograd.Function):
    @staticmethod
    def _stats(ctx, x, running_mean, running_var, num_batches_tracked, momentum, eps, backend, stats, group):
        mean, rstd = FF.bn_statistics(x, running_mean, running_var, num_batches_tracked, True, momentum, eps,
                                      backend, stats, process_group=group)
        ctx.group, ctx.backend = group, backend
        return mean, rstd


class SyncBNReLUConvFunction(_SyncBNFunctionBase):
    """conv2d(relu(BN(x)), weight) with BN statistics (and their gradient terms) over the global batch."""

    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                stride, padding, stats, backend, group):
        mean, rstd = _SyncBNFunctionBase._stats(ctx, x, running_mean, running_var, num_batches_tracked, momentum,
                                                eps, backend, stats, group)
        ctx.save_for_backward(x, weight, mean, rstd, bn_weight, bn_bias)
        ctx.stride, ctx.padding = list(stride), list(padding)
        return ops.bn_relu_conv(x, weight, mean, rstd, bn_weight, bn_bias, ctx.stride, ctx.padding, True, backend)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd, bn_weight, bn_bias = ctx.saved_tensors
        dx_const, dweight, sum_dz_xhat, sum_dz = torch.ops.fastresnet.bn_relu_conv_backward(
            dy.contiguous(memory_format=bn_ops.layout(x)), x, weight, mean, rstd, bn_weight, bn_bias,
            ctx.stride, ctx.padding, False, ctx.backend)
        scale, _ = reference.scale_shift(mean, rstd, bn_weight, bn_bias)
        dx = combine_grad_terms(x, dx_const, mean, rstd, scale, sum_dz, sum_dz_xhat, ctx.group)
        dgamma, dbeta = bn_ops.affine_grads(bn_weight, bn_bias, sum_dz_xhat, sum_dz)
        return (dx, dweight, dgamma, dbeta) + (None,) * 10


class SyncBNReLUFunction(_SyncBNFunctionBase):
    """relu(BN(x)) with BN statistics (and their gradient terms) over the global batch."""

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps, stats,
                backend, group):
        mean, rstd = _SyncBNFunctionBase._stats(ctx, x, running_mean, running_var, num_batches_tracked, momentum,
                                                eps, backend, stats, group)
        ctx.save_for_backward(x, mean, rstd, bn_weight, bn_bias)
        return ops.bn_relu(x, mean, rstd, bn_weight, bn_bias, True, backend)

    @staticmethod
    def backward(ctx, dy):
        x, mean, rstd, bn_weight, bn_bias = ctx.saved_tensors
        dx_const, sum_dz_xhat, sum_dz = torch.ops.fastresnet.bn_relu_backward(
            dy, x, mean, rstd, bn_weight, bn_bias, False, ctx.backend)
        scale, _ = reference.scale_shift(mean, rstd, bn_weight, bn_bias)
        dx = combine_grad_terms(x, dx_const, mean, rstd, scale, sum_dz, sum_dz_xhat, ctx.group)
        dgamma, dbeta = bn_ops.affine_grads(bn_weight, bn_bias, sum_dz_xhat, sum_dz)
        return (dx, dgamma, dbeta) + (None,) * 8


class SyncBNFunction(torch.autograd.Function):
    """Plain BN (no ReLU) over the global batch: y = x̂·γ + β, in fp32 (fp64 stays fp64), rounded to x's dtype."""

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps, backend,
                group):
        mean, rstd = FF.bn_statistics(x, running_mean, running_var, num_batches_tracked, True, momentum, eps,
                                      backend, None, process_group=group)
        ctx.save_for_backward(x, mean, rstd, bn_weight, bn_bias)
        ctx.group = group
        scale, shift = reference.scale_shift(mean, rstd, bn_weight, bn_bias)
        return (x.to(mean.dtype) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, mean, rstd, bn_weight, bn_bias = ctx.saved_tensors
        scale, _ = reference.scale_shift(mean, rstd, bn_weight, bn_bias)
        dyf = dy.to(mean.dtype)
        xhat = (x.to(mean.dtype) - mean.view(1, -1, 1, 1)) * rstd.view(1, -1, 1, 1)
        sum_dy, sum_dy_xhat = dyf.sum(dim=(0, 2, 3)), (dyf * xhat).sum(dim=(0, 2, 3))
        dx = combine_grad_terms(x, dyf * scale.view(1, -1, 1, 1), mean, rstd, scale, sum_dy, sum_dy_xhat, ctx.group)
        dgamma, dbeta = bn_ops.affine_grads(bn_weight, bn_bias, sum_dy_xhat, sum_dy)
        return (dx, dgamma, dbeta) + (None,) * 7


def sync_bn_relu_conv2d(x: Tensor, weight: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                        momentum: Optional[float], eps: float, stride, padding, process_group,
                        stats: Optional[Tuple[Tensor, Tensor]] = None, backend: Optional[str] = None) -> Tensor:
    """Training-mode `functional.bn_relu_conv2d` with BN statistics over all ranks of `process_group`.

    Shapes, layouts and dtype rules as `functional.bn_relu_conv2d`; `stats` are this rank's local (mean, var).
    """
    stride, padding = FF.check_conv_input(x, weight, True, stride, padding,
                                          [("bn_weight", bn_weight), ("bn_bias", bn_bias),
                                           ("running_mean", running_mean), ("running_var", running_var)], stats)
    return SyncBNReLUConvFunction.apply(x, FF._conv_weight(weight, x), bn_weight, bn_bias, running_mean, running_var,
                                        num_batches_tracked, momentum, eps, stride, padding, stats,
                                        resolve(x, backend), process_group)


def sync_bn_relu(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                 momentum: Optional[float], eps: float, process_group,
                 stats: Optional[Tuple[Tensor, Tensor]] = None, backend: Optional[str] = None) -> Tensor:
    """Training-mode `functional.bn_relu` with BN statistics over all ranks of `process_group`."""
    FF.check_bn_input(x, x.shape[1] if bn_weight is None else bn_weight.shape[0], True,
                      [("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                       ("running_var", running_var)], stats)
    return SyncBNReLUFunction.apply(x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum,
                                    eps, stats, resolve(x, backend), process_group)
