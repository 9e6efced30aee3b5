"""Synchronised batch norm for the fused layers, and process-group helpers for the trainer.

With `--sync-bn` every BN normalises with the statistics of the *global* batch (all ranks of a process group).

Forward (`combine_batch_stats`, called inside `functional.bn_statistics` when a layer has a `process_group`): each
rank computes its per-channel (mean, biased var) over its M_r = N_r·H·W values; one `all_gather` collects
(M_r, mean_r, M2_r = var_r·M_r) from every rank and every rank combines them in rank order with Chan's formula

    M = Σ M_r,  mean = Σ M_r·mean_r / M,  M2 = Σ M2_r + Σ M_r·(mean_r − mean)²,  var = M2 / M,

exact for large |mean| (no Σx² − (Σx)²/M cancellation) and bitwise identical on every rank. The running statistics
are updated once per forward with the global (mean, var) and the global count M (unbiased factor M/(M − 1)).

Backward (`SyncBNReLUConvFunction`, `SyncBNReLUFunction`): the fused op's backward runs in its eval form (the
mean/rstd treated as constants), which yields dx_const = s·dz and the *local* sums Σdz, Σdz·x̂. Those two sums are
all-reduced and the batch-statistics terms are added back with the global count:

    dx = dx_const − s·(Σ_g dz + x̂·Σ_g dz·x̂) / M,   x̂ = (x − mean)·rstd,

the same gradient as one process running the whole global batch (what torch.nn.SyncBatchNorm computes). dγ, dβ
stay the local sums, since DistributedDataParallel averages parameter gradients itself. The correction is one
extra elementwise pass over x and dz_const per layer (not fused into the conv kernels); per-device BN (the default)
has no such cost.

Plain `nn.BatchNorm2d` modules (post-activation units, projection-shortcut BN) become `SyncBatchNorm2d`, the same
scheme without the ReLU and the conv.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastresnet import functional as FF
from fastresnet import ops, reference
from fastresnet.backends import resolve
from fastresnet.ops import bn_ops


def combine_batch_stats(mean: Tensor, var: Tensor, count: int, group) -> Tuple[Tensor, Tensor, Tensor]:
    """Global (mean, biased var, count) of a BN input split across the ranks of `group` (module docstring).

    mean, var: this rank's per-channel statistics [C] (fp32 or fp64) over `count` values per channel. The global
    count comes back as a 0-d tensor on the statistics' device, so no host synchronisation happens.
    """
    world = dist.get_world_size(group)
    local = torch.stack([torch.full_like(mean, float(count)), mean, var * count])   # [3, C]: (M_r, mean_r, M2_r)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local.contiguous(), group=group)
    parts = torch.stack(gathered)                                                  # [world, 3, C], rank order
    counts, means, m2 = parts[:, 0], parts[:, 1], parts[:, 2]
    total = counts.sum(0)
    g_mean = (counts * means).sum(0) / total
    g_m2 = m2.sum(0) + (counts * (means - g_mean).square()).sum(0)
    return g_mean, g_m2 / total, total[0]


def _sync_grad_terms(x: Tensor, dx_const: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor, sum_dz: Tensor,
                     sum_dz_xhat: Tensor, group) -> Tensor:
    """dx = dx_const − s·(Σ_g dz + x̂·Σ_g dz·x̂)/M with the sums and the count M all-reduced over `group`."""
    count = torch.full_like(sum_dz, float(x.numel() // x.shape[1]))
    sums = torch.stack([sum_dz, sum_dz_xhat, count]).contiguous()
    dist.all_reduce(sums, group=group)
    g_dz, g_dz_xhat, m = sums[0], sums[1], sums[2]
    # dx = dx_const + a + b·(x − mean) with a = −s·Σdz/M, b = −s·rstd·Σdz·x̂/M; centred on the mean, because the
    # expanded a' + b·x cancels when |mean| ≫ std
    b = -scale * rstd * g_dz_xhat / m
    a = -scale * g_dz / m
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = dx_const.to(acc) + a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1) * (x.to(acc) - mean.view(1, -1, 1, 1))
    return out.to(x.dtype)


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
        dx = _sync_grad_terms(x, dx_const, mean, rstd, scale, sum_dz, sum_dz_xhat, ctx.group)
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
        dx = _sync_grad_terms(x, dx_const, mean, rstd, scale, sum_dz, sum_dz_xhat, ctx.group)
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
        dx = _sync_grad_terms(x, dyf * scale.view(1, -1, 1, 1), mean, rstd, scale, sum_dy, sum_dy_xhat, ctx.group)
        dgamma, dbeta = bn_ops.affine_grads(bn_weight, bn_bias, sum_dy_xhat, sum_dy)
        return (dx, dgamma, dbeta) + (None,) * 7


class SyncBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose training-mode statistics (and their gradient terms) cover all ranks of
    `process_group`; runs on CPU (gloo) as well as GPU, unlike `torch.nn.SyncBatchNorm`. Same parameters, buffers
    and state-dict keys as BatchNorm2d; eval mode is plain BatchNorm2d."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, process_group) -> "SyncBatchNorm2d":
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  process_group=process_group, device=bn.running_mean.device if bn.running_mean is not None else None)
        new.load_state_dict(bn.state_dict())
        new.train(bn.training)
        return new.to(dtype=bn.weight.dtype if bn.weight is not None else None)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        FF.check_bn_input(x, self.num_features, True, [("bn_weight", self.weight), ("bn_bias", self.bias)])
        return SyncBNFunction.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                    self.num_batches_tracked, self.momentum, self.eps, "torch", self.process_group)


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


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Synchronise every BN in `module` over `process_group` (None = the default group); returns the module.

    Fused `BNReLU2d` / `PreActConv2d` layers get `process_group` set (they keep their fused kernels); other
    `nn.BatchNorm2d` modules are replaced by `SyncBatchNorm2d`. (`torch.nn.SyncBatchNorm.convert_sync_batchnorm`
    would replace a `BNReLU2d` — a BatchNorm2d subclass — dropping its ReLU, and torch's SyncBatchNorm refuses CPU.)
    """
    from fastresnet.nn.layers import BNReLU2d, PreActConv2d

    group = process_group if process_group is not None else dist.group.WORLD
    if isinstance(module, (BNReLU2d, PreActConv2d)):
        module.process_group = group
        return module
    if type(module) is nn.BatchNorm2d:
        return SyncBatchNorm2d.from_batchnorm(module, group)
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module
