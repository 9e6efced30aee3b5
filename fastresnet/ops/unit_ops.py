"""Custom op chaining fused convs in a residual unit (docs/architecture.md §3): BN-ReLU-conv (+ residual) that also
returns the batch statistics of its output, so the next BN reads them instead of re-reading the tensor.

`fastresnet::bn_relu_conv_stats(x, weight, mean, rstd, γ, β, residual, stride, padding, training, backend)
 -> (y, y_mean, y_var)`: y = conv2d(relu(BN(x)), weight) (+ residual, added in fp32, rounded once to the
promoted dtype); y_mean, y_var fp32 [C_out] biased statistics of the stored y. Tier B ("triton_conv") produces the
statistics in the conv epilogue; tier-A backends run the conv, then their fused add + statistics kernel (see
`Backend.bn_relu_conv_stats`). Saved for backward: x, weight, mean, rstd, γ, β — never the activation.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from fastresnet import reference
from fastresnet.backends import get_backend_impl
from fastresnet.ops.bn_ops import affine_grads, _bn_relu_conv_backward, _empty_as, _stats_fake, conv_out_shape


@torch.library.custom_op("fastresnet::bn_relu_conv_stats", mutates_args=())
def _bn_relu_conv_stats(
    x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    residual: Optional[Tensor], stride: List[int], padding: List[int], training: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    scale, shift = reference.scale_shift(mean, rstd, bn_weight, bn_bias)
    return get_backend_impl(backend).bn_relu_conv_stats(x, scale, shift, weight, stride, padding, residual)


@_bn_relu_conv_stats.register_fake
def _(x, weight, mean, rstd, bn_weight, bn_bias, residual, stride, padding, training, backend):
    dtype = weight.dtype if residual is None else torch.promote_types(weight.dtype, residual.dtype)
    y = _empty_as(x, conv_out_shape(x.shape, weight.shape, stride, padding), dtype)
    return y, _stats_fake(y), _stats_fake(y)


def _setup(ctx, inputs, output):
    x, weight, mean, rstd, bn_weight, bn_bias, residual, stride, padding, training, backend = inputs
    ctx.save_for_backward(x, weight, mean, rstd, bn_weight, bn_bias)
    ctx.res_dtype = None if residual is None else residual.dtype
    ctx.stride, ctx.padding, ctx.training, ctx.backend = stride, padding, training, backend


def _backward(ctx, dy, dmean, dvar):
    # the statistics feed the next BN, whose backward already contains their dependence on y: dmean/dvar unused
    from fastresnet.ops.bn_ops import layout
    x, weight, mean, rstd, bn_weight, bn_bias = ctx.saved_tensors
    dx, dweight, dgamma, dbeta = _bn_relu_conv_backward(
        dy.contiguous(memory_format=layout(x)), x, weight, mean, rstd, bn_weight, bn_bias,
        ctx.stride, ctx.padding, ctx.training, ctx.backend)
    dres = None if ctx.res_dtype is None else dy.to(ctx.res_dtype)
    return (dx, dweight, None, None) + affine_grads(bn_weight, bn_bias, dgamma, dbeta) + (dres,) + (None,) * 4


_bn_relu_conv_stats.register_autograd(_backward, setup_context=_setup)


def bn_relu_conv_stats(x, weight, mean, rstd, bn_weight, bn_bias, residual, stride, padding, training: bool,
                       backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(conv2d(relu(BN(x)), weight) + residual, mean, var of that output); see the module docstring."""
    return _bn_relu_conv_stats(x, weight, mean, rstd, bn_weight, bn_bias, residual, list(stride), list(padding),
                               training, backend)
