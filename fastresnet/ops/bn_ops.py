"""The fused BN ops as custom ops. Saved for backward: the BN input x, mean, rstd (fp32, [C]), γ, β and the conv
weight — never the BN or ReLU output, which the backward recomputes from x.

`training` is an argument of the forward ops only so that setup_context can hand it to the backward: in training
(batch statistics) the BN backward includes the dependence of mean and rstd on x; in eval it does not.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from fastresnet import reference
from fastresnet.backends import get_backend_impl
from fastresnet.backends.base import layout


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _stats_fake(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[1], dtype=_stat_dtype(x))


def _empty_as(x: Tensor, shape, dtype) -> Tensor:
    """An empty tensor in x's memory format (channels_last or contiguous, what every backend returns)."""
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=layout(x))


def conv_out_shape(x_shape, weight_shape, stride: List[int], padding: List[int]) -> List[int]:
    """[N, C_out, H_out, W_out] of a dilation-1, groups-1 conv."""
    n, _, h, w = x_shape
    kh, kw = weight_shape[2:]
    return [n, weight_shape[0], (h + 2 * padding[0] - kh) // stride[0] + 1, (w + 2 * padding[1] - kw) // stride[1] + 1]


def affine_grads(bn_weight, bn_bias, dgamma, dbeta):
    """(dγ, dβ) in the parameters' dtypes, None for an absent (affine=False) parameter."""
    return (None if bn_weight is None else reference.cast(dgamma, bn_weight.dtype),
            None if bn_bias is None else reference.cast(dbeta, bn_bias.dtype))


# ---- batch statistics ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastresnet::batch_stats", mutates_args=())
def _batch_stats(x: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    return get_backend_impl(backend).batch_stats(x)


@_batch_stats.register_fake
def _(x, backend):
    return _stats_fake(x), _stats_fake(x)


def batch_stats(x: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """Per-channel (mean, biased var) of x, fp32. Not differentiable: the consuming BN's backward accounts for it."""
    return _batch_stats(x.detach(), backend)


# ---- residual add with output statistics --------------------------------------------------------------------------
@torch.library.custom_op("fastresnet::add_stats", mutates_args=())
def _add_stats(a: Tensor, b: Tensor, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return get_backend_impl(backend).add_stats(a, b)


@_add_stats.register_fake
def _(a, b, backend):
    y = _empty_as(a, a.shape, torch.promote_types(a.dtype, b.dtype))
    return y, _stats_fake(y), _stats_fake(y)


def _add_stats_setup(ctx, inputs, output):
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)


def _add_stats_bwd(ctx, dy, dmean, dvar):
    # y = a + b. mean/var feed the next BN, whose backward already includes their dependence on y.
    return dy.to(ctx.dtypes[0]), dy.to(ctx.dtypes[1]), None


_add_stats.register_autograd(_add_stats_bwd, setup_context=_add_stats_setup)


def add_stats(a: Tensor, b: Tensor, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(a + b, mean, var): the residual add that also emits its output's batch statistics (fp32); the sum has
    the promoted dtype of a and b."""
    return _add_stats(a, b, backend)


# ---- BN + ReLU ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastresnet::bn_relu", mutates_args=())
def _bn_relu(
    x: Tensor, mean: Tensor, rstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    training: bool, backend: str,
) -> Tensor:
    scale, shift = reference.scale_shift(mean, rstd, bn_weight, bn_bias)
    return get_backend_impl(backend).bn_relu(x, scale, shift, x.dtype)


@_bn_relu.register_fake
def _(x, mean, rstd, bn_weight, bn_bias, training, backend):
    return _empty_as(x, x.shape, x.dtype)


@torch.library.custom_op("fastresnet::bn_relu_backward", mutates_args=())
def _bn_relu_backward(
    dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    training: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    scale, shift = reference.scale_shift(mean, rstd, bn_weight, bn_bias)
    dx, sum_dz, sum_dz_xhat = get_backend_impl(backend).bn_relu_backward(dy, x, scale, shift, mean, rstd, training)
    return dx, sum_dz_xhat, sum_dz


@_bn_relu_backward.register_fake
def _(dy, x, mean, rstd, bn_weight, bn_bias, training, backend):
    return _empty_as(x, x.shape, x.dtype), _stats_fake(x), _stats_fake(x)


def _bn_relu_setup(ctx, inputs, output):
    x, mean, rstd, bn_weight, bn_bias, training, backend = inputs
    ctx.save_for_backward(x, mean, rstd, bn_weight, bn_bias)
    ctx.training, ctx.backend = training, backend


def _bn_relu_bwd(ctx, dy):
    x, mean, rstd, bn_weight, bn_bias = ctx.saved_tensors
    dx, dgamma, dbeta = _bn_relu_backward(dy, x, mean, rstd, bn_weight, bn_bias, ctx.training, ctx.backend)
    return (dx, None, None) + affine_grads(bn_weight, bn_bias, dgamma, dbeta) + (None, None)


_bn_relu.register_autograd(_bn_relu_bwd, setup_context=_bn_relu_setup)


def bn_relu(x, mean, rstd, bn_weight, bn_bias, training: bool, backend: str) -> Tensor:
    """a = relu((x − mean)·rstd·γ + β), with a hand-written backward that saves x, not a."""
    return _bn_relu(x, mean, rstd, bn_weight, bn_bias, training, backend)


# ---- BN + ReLU + conv ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastresnet::bn_relu_conv", mutates_args=())
def _bn_relu_conv(
    x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    stride: List[int], padding: List[int], training: bool, backend: str,
) -> Tensor:
    scale, shift = reference.scale_shift(mean, rstd, bn_weight, bn_bias)
    return get_backend_impl(backend).bn_relu_conv(x, scale, shift, weight, stride, padding)


@_bn_relu_conv.register_fake
def _(x, weight, mean, rstd, bn_weight, bn_bias, stride, padding, training, backend):
    return _empty_as(x, conv_out_shape(x.shape, weight.shape, stride, padding), weight.dtype)


@torch.library.custom_op("fastresnet::bn_relu_conv_backward", mutates_args=())
def _bn_relu_conv_backward(
    dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor], stride: List[int], padding: List[int], training: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    scale, shift = reference.scale_shift(mean, rstd, bn_weight, bn_bias)
    dx, dweight, sum_dz, sum_dz_xhat = get_backend_impl(backend).bn_relu_conv_backward(
        dy, x, scale, shift, mean, rstd, weight, stride, padding, training)
    return dx, dweight, sum_dz_xhat, sum_dz


@_bn_relu_conv_backward.register_fake
def _(dy, x, weight, mean, rstd, bn_weight, bn_bias, stride, padding, training, backend):
    return _empty_as(x, x.shape, x.dtype), torch.empty_like(weight), _stats_fake(x), _stats_fake(x)


def _bn_relu_conv_setup(ctx, inputs, output):
    x, weight, mean, rstd, bn_weight, bn_bias, stride, padding, training, backend = inputs
    ctx.save_for_backward(x, weight, mean, rstd, bn_weight, bn_bias)
    ctx.stride, ctx.padding, ctx.training, ctx.backend = stride, padding, training, backend


def _bn_relu_conv_bwd(ctx, dy):
    x, weight, mean, rstd, bn_weight, bn_bias = ctx.saved_tensors
    dx, dweight, dgamma, dbeta = _bn_relu_conv_backward(
        dy.contiguous(memory_format=layout(x)), x, weight, mean, rstd, bn_weight, bn_bias,
        ctx.stride, ctx.padding, ctx.training, ctx.backend)
    return (dx, dweight, None, None) + affine_grads(bn_weight, bn_bias, dgamma, dbeta) + (None,) * 4


_bn_relu_conv.register_autograd(_bn_relu_conv_bwd, setup_context=_bn_relu_conv_setup)


def bn_relu_conv(x, weight, mean, rstd, bn_weight, bn_bias, stride, padding, training: bool, backend: str) -> Tensor:
    """y = conv2d(relu(BN(x)), weight), with a hand-written backward that saves x, not the activation."""
    return _bn_relu_conv(x, weight, mean, rstd, bn_weight, bn_bias, list(stride), list(padding), training, backend)
