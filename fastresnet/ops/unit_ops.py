"""Custom ops of a residual unit (docs/architecture.md §3): a BN-ReLU-conv (+ residual) that also returns the batch
statistics of its output, so the next BN reads them instead of re-reading the tensor, and a whole full pre-activation
unit as one autograd node (`preact_unit`, below).

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
from fastresnet.backends.base import layout
from fastresnet.ops.bn_ops import (FusedOp, affine_grads, _bn_relu_conv_backward, _empty_as, _stats_fake,
                                   conv_out_shape, traced)


def _bn_relu_conv_stats_body(
    x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    residual: Optional[Tensor], stride: List[int], padding: List[int], training: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    impl = get_backend_impl(backend)
    scale, shift = impl.scale_shift(mean, rstd, bn_weight, bn_bias)
    return impl.bn_relu_conv_stats(x, scale, shift, weight, stride, padding, residual)


def _bn_relu_conv_stats_fake(x, weight, mean, rstd, bn_weight, bn_bias, residual, stride, padding, training, backend):
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
    x, weight, mean, rstd, bn_weight, bn_bias = ctx.saved_tensors
    dx, dweight, dgamma, dbeta = _bn_relu_conv_backward(
        dy.contiguous(memory_format=layout(x)), x, weight, mean, rstd, bn_weight, bn_bias,
        ctx.stride, ctx.padding, ctx.training, ctx.backend)
    dres = None if ctx.res_dtype is None else dy.to(ctx.res_dtype)
    return (dx, dweight, None, None) + affine_grads(bn_weight, bn_bias, dgamma, dbeta) + (dres,) + (None,) * 4


_bn_relu_conv_stats = FusedOp("bn_relu_conv_stats", _bn_relu_conv_stats_body, _bn_relu_conv_stats_fake, _setup,
                              _backward)


def bn_relu_conv_stats(x, weight, mean, rstd, bn_weight, bn_bias, residual, stride, padding, training: bool,
                       backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(conv2d(relu(BN(x)), weight) + residual, mean, var of that output); see the module docstring."""
    return _bn_relu_conv_stats(x, weight, mean, rstd, bn_weight, bn_bias, residual, list(stride), list(padding),
                               training, backend)


# ---- a whole pre-activation residual unit ------------------------------------------------------------------------
# How the shortcut h is formed, and from what:
#   "identity"          h = x                      (x_{l+1} = x + F(x))
#   "zero_pad"          h = option A of x          (stride-s subsampling, zero channels appended)
#   "shared_identity"   h = a = relu(BN_1(x))      (the unit's first BN → ReLU feeds both paths)
#   "shared_projection" h = conv1×1_s(a)           (a pre-activated projection shortcut, no BN after it)
SHORTCUTS = ("identity", "zero_pad", "shared_identity", "shared_projection")


def _pair(flat: List[int], i: int) -> List[int]:
    return flat[2 * i:2 * i + 2]


def layer_shapes(x_shape, weight_shapes, strides: List[int], paddings: List[int]) -> List[List[int]]:
    """The output shape of each of a unit's k convs (k = len(strides) // 2, flattened (h, w) pairs), in order."""
    shapes, shape = [], list(x_shape)
    for i in range(len(strides) // 2):
        shape = conv_out_shape(shape, weight_shapes[i], _pair(strides, i), _pair(paddings, i))
        shapes.append(shape)
    return shapes


def _zero_pad(x: Tensor, stride: int, out_channels: int) -> Tensor:
    if stride > 1:
        x = x[:, :, ::stride, ::stride]
    return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, out_channels - x.shape[1]))


def _zero_pad_backward(dh: Tensor, x: Tensor, stride: int) -> Tensor:
    dx = torch.zeros_like(x, memory_format=layout(x))
    dx[:, :, ::stride, ::stride] = dh[:, :x.shape[1]]
    return dx


def _plain_conv(a: Tensor, weight: Tensor, stride, padding) -> Tensor:
    """conv2d of a (cast to the weight's dtype, as autocast does) with weight: an `nn.Conv2d` on the activation."""
    return torch.nn.functional.conv2d(a.to(weight.dtype), weight, None, stride, padding)


def _plain_conv_backward(dy: Tensor, a: Tensor, weight: Tensor, stride, padding) -> Tuple[Tensor, Tensor]:
    """(da, dweight) of `_plain_conv`: what autograd computes for an `nn.Conv2d` on a."""
    da, dweight, _ = torch.ops.aten.convolution_backward(
        dy, a.to(weight.dtype), weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1,
        [True, True, False])
    return da.to(a.dtype), dweight


def _unit_forward(x: Tensor, x_mean: Tensor, x_var: Tensor, weights: List[Tensor], bn_weights: List[Optional[Tensor]],
                  bn_biases: List[Optional[Tensor]], eps: List[float], strides: List[int], paddings: List[int],
                  shortcut: str, shortcut_stride: int, backend: str, through_last: bool = True) -> List[Tensor]:
    """[x_{l+1}, its mean, its var, y_1 … y_{k−1}, rstd_1 … rstd_k, mean_2, var_2, …, mean_k, var_k]; without
    `through_last` the last conv (and the shortcut add) is not run and the first three are left out: what a
    recomputation needs for the backward alone."""
    impl = get_backend_impl(backend)
    k = len(bn_weights)
    ys: List[Tensor] = []
    rstds: List[Tensor] = []
    stats: List[Tensor] = []

    def affine(i: int, mean: Tensor, var: Tensor) -> Tuple[Tensor, Tensor]:
        rstds.append(torch.rsqrt(var + eps[i]))
        return impl.scale_shift(mean, rstds[-1], bn_weights[i], bn_biases[i])

    y, mean, var, first = x, x_mean, x_var, 0
    if shortcut.startswith("shared"):  # one activation feeds conv1 and the shortcut: plain convs on it
        a = impl.bn_relu(x, *affine(0, mean, var), x.dtype)
        h = a if shortcut == "shared_identity" else _plain_conv(a, weights[k], shortcut_stride, 0)
        y = _plain_conv(a, weights[0], _pair(strides, 0), _pair(paddings, 0))
        if k == 1:
            return ([*impl.add_stats(y, h)] if through_last else []) + rstds
        mean, var = impl.batch_stats(y)
        ys, stats, first = [y], [mean, var], 1
    else:
        h = x if shortcut == "identity" else _zero_pad(x, shortcut_stride, weights[k - 1].shape[0])
    for i in range(first, k):
        last = i == k - 1
        scale, shift = affine(i, mean, var)
        if last and not through_last:
            return ys + rstds + stats
        y, mean, var = impl.bn_relu_conv_stats(y, scale, shift, weights[i], _pair(strides, i), _pair(paddings, i),
                                               h if last else None)
        if not last:
            ys.append(y)
            stats += [mean, var]
    return [y, mean, var] + ys + rstds + stats


def _unit_backward(dout: Tensor, x: Tensor, ys: List[Tensor], weights: List[Tensor], means: List[Tensor],
                   rstds: List[Tensor], bn_weights: List[Optional[Tensor]], bn_biases: List[Optional[Tensor]],
                   strides: List[int], paddings: List[int], shortcut: str, shortcut_stride: int, backend: str
                   ) -> List[Tensor]:
    """[dx, dW_1 … dW_k (dW_shortcut), Σdz·x̂ per BN (dγ), Σdz per BN (dβ)]: the layers in reverse; the shortcut
    gradient joins dx inside the BN backward kernel (a shared activation: the gradient of that activation)."""
    impl = get_backend_impl(backend)
    k = len(means)
    dweights: List[Optional[Tensor]] = [None] * len(weights)  # every entry is filled below
    dgammas: List[Optional[Tensor]] = [None] * k
    dbetas: List[Optional[Tensor]] = [None] * k
    inputs = [x] + ys
    dy = dout
    for i in reversed(range(k)):
        xi = inputs[i]
        scale, shift = impl.scale_shift(means[i], rstds[i], bn_weights[i], bn_biases[i])
        stride, padding = _pair(strides, i), _pair(paddings, i)
        dy = dy.contiguous(memory_format=layout(xi))
        if i == 0 and shortcut.startswith("shared"):
            a = impl.bn_relu(x, scale, shift, x.dtype)
            da, dweights[0] = _plain_conv_backward(dy, a, weights[0], stride, padding)
            if shortcut == "shared_identity":
                dh = dout.to(a.dtype)
            else:
                dh, dweights[k] = _plain_conv_backward(dout.to(weights[k].dtype), a, weights[k],
                                                       [shortcut_stride] * 2, [0, 0])
            dy, dbetas[0], dgammas[0] = impl.bn_relu_backward(da + dh, x, scale, shift, means[0], rstds[0], True)
        else:
            dres = None
            if i == 0:
                dres = (dout.to(x.dtype).contiguous(memory_format=layout(x)) if shortcut == "identity" else
                        _zero_pad_backward(dout.to(x.dtype), x, shortcut_stride))
            dy, dweights[i], dbetas[i], dgammas[i] = impl.bn_relu_conv_backward(
                dy, xi, scale, shift, means[i], rstds[i], weights[i], stride, padding, True, True, dres)
    return [dy] + dweights + dgammas + dbetas


def _preact_unit_body(
    x: Tensor, x_mean: Tensor, x_var: Tensor, weights: List[Tensor], bn_weights: List[Optional[Tensor]],
    bn_biases: List[Optional[Tensor]], eps: List[float], strides: List[int], paddings: List[int], shortcut: str,
    shortcut_stride: int, backend: str,
) -> List[Tensor]:
    return _unit_forward(x, x_mean, x_var, weights, bn_weights, bn_biases, eps, strides, paddings, shortcut,
                         shortcut_stride, backend)


def _preact_unit_fake(x, x_mean, x_var, weights, bn_weights, bn_biases, eps, strides, paddings, shortcut, shortcut_stride, backend):
    k = len(bn_weights)
    shapes = layer_shapes(x.shape, [w.shape for w in weights], strides, paddings)
    ys = [_empty_as(x, shape, w.dtype) for shape, w in zip(shapes, weights)]
    h_dtype = weights[k].dtype if shortcut == "shared_projection" else x.dtype
    out = _empty_as(x, shapes[-1], torch.promote_types(weights[k - 1].dtype, h_dtype))
    inner = ys[:-1]
    return ([out, _stats_fake(out), _stats_fake(out)] + inner + [_stats_fake(t) for t in [x] + inner]
            + [_stats_fake(t) for t in inner for _ in range(2)])


_preact_unit_op = FusedOp("preact_unit", _preact_unit_body, _preact_unit_fake)


def _preact_unit_backward_body(
    dout: Tensor, x: Tensor, ys: List[Tensor], weights: List[Tensor], means: List[Tensor], rstds: List[Tensor],
    bn_weights: List[Optional[Tensor]], bn_biases: List[Optional[Tensor]], strides: List[int], paddings: List[int],
    shortcut: str, shortcut_stride: int, backend: str,
) -> List[Tensor]:
    return _unit_backward(dout, x, ys, weights, means, rstds, bn_weights, bn_biases, strides, paddings, shortcut,
                          shortcut_stride, backend)


def _preact_unit_backward_fake(dout, x, ys, weights, means, rstds, bn_weights, bn_biases, strides, paddings, shortcut, shortcut_stride,
      backend):
    sums = [_stats_fake(t) for _ in range(2) for t in [x] + ys]  # Σdz·x̂ and Σdz: distinct tensors, no aliases
    return [_empty_as(x, x.shape, x.dtype)] + [torch.empty_like(w) for w in weights] + sums


_preact_unit_backward_op = FusedOp("preact_unit_backward", _preact_unit_backward_body, _preact_unit_backward_fake)


class _PreactUnit(torch.autograd.Function):
    """The unit as one autograd node around the two ops above. Eager calls their Python bodies directly (a custom
    op's own dispatch costs more host time than the unit's kernels at small sizes); under torch.compile or a
    dispatch mode (`traced`) the registered ops run, opaque, with their fake implementations and FLOP formulas."""

    @staticmethod
    def forward(ctx, config: tuple, x: Tensor, x_mean: Tensor, x_var: Tensor, *params: Optional[Tensor]):
        eps, strides, paddings, shortcut, shortcut_stride, backend = config
        k = len(eps)
        weights, bn_weights, bn_biases = list(params[:-2 * k]), list(params[-2 * k:-k]), list(params[-k:])
        args = (x, x_mean, x_var, weights, bn_weights, bn_biases, eps, strides, paddings, shortcut, shortcut_stride,
                backend)
        res = _preact_unit_op(*args)
        ys, rstds, stats = res[3:2 + k], res[2 + k:2 + 2 * k], res[2 + 2 * k:]
        ctx.save_for_backward(x, *ys, *weights, x_mean, *stats[0::2], *rstds, *bn_weights, *bn_biases)
        ctx.config, ctx.num_weights = config, len(weights)
        outs = (res[0], res[1], res[2], *stats)
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    def backward(ctx, dout: Tensor, *_):
        _, strides, paddings, shortcut, shortcut_stride, backend = ctx.config
        k, n = len(ctx.config[0]), ctx.num_weights
        saved = ctx.saved_tensors
        x, ys, weights = saved[0], list(saved[1:k]), list(saved[k:k + n])
        means, rstds, gammas, betas = (list(saved[k + n + j * k:2 * k + n + j * k]) for j in range(4))
        args = (dout, x, ys, weights, means, rstds, gammas, betas, strides, paddings, shortcut, shortcut_stride,
                backend)
        grads = _preact_unit_backward_op(*args)
        dx, dweights, dgammas, dbetas = grads[0], grads[1:1 + n], grads[1 + n:1 + n + k], grads[1 + n + k:]
        affine = [affine_grads(g, b, dg, db) for g, b, dg, db in zip(gammas, betas, dgammas, dbetas)]
        return (None, dx, None, None, *dweights, *(a[0] for a in affine), *(a[1] for a in affine))


def preact_unit(x: Tensor, x_mean: Tensor, x_var: Tensor, weights: List[Tensor], bn_weights: List[Optional[Tensor]],
                bn_biases: List[Optional[Tensor]], eps: List[float], strides: List[int], paddings: List[int],
                shortcut: str, shortcut_stride: int, backend: str, running: Optional[List[Optional[tuple]]] = None,
                plan=None) -> Tuple[Tensor, Tensor, Tensor]:
    """A full pre-activation residual unit in training as one autograd node (docs/architecture.md §3):
    x_{l+1} = h + W_k(relu(BN_k(… W_1(relu(BN_1(x)))))), with batch statistics (x_mean, x_var for BN_1; the others
    from the conv epilogues) and the shortcut h of kind `shortcut` (`SHORTCUTS`; `weights[k]` is the projection).

    strides/paddings: flattened (h, w) pairs per layer. running: per BN its (running_mean, running_var,
    num_batches_tracked, N·H·W of its input, momentum), or None for a BN without buffers; they are updated with the
    batch statistics (`reference.update_running_stats_many`). None: no update (a recomputation's replay). Returns
    (x_{l+1}, its mean, its var). Saved for backward: x, the inner BN inputs y_1 … y_{k−1} and the statistics.

    A backend with a native unit (`Backend.unit_plan`: the "ext" backend's C++ autograd node, whose backward runs
    without Python) takes the whole call in eager mode when `native_plan` allows; otherwise, and under
    torch.compile or a dispatch mode, `_PreactUnit` runs (bitwise the same). `plan`: the caller's `native_plan` of
    these arguments, if it keeps one.
    """
    if not traced():
        if plan is None:
            plan = native_plan(backend, weights, bn_weights, bn_biases, eps, strides, paddings, shortcut,
                               shortcut_stride, running)
        if plan is not None:
            return tuple(get_backend_impl(backend).units_train(x, x_mean, x_var, [plan]))
    config = (tuple(eps), tuple(strides), tuple(paddings), shortcut, shortcut_stride, backend)
    out, out_mean, out_var, *stats = _PreactUnit.apply(config, x, x_mean, x_var, *weights, *bn_weights, *bn_biases)
    if running:
        reference.update_running_stats_many([  # entries (rm, rv, nbt, mean, var, count, momentum)
            (*r[:3], mean, var, *r[3:]) for r, mean, var in zip(running, [x_mean] + stats[0::2], [x_var] + stats[1::2])
            if r is not None])
    return out, out_mean, out_var


def native_plan(backend: str, weights: List[Tensor], bn_weights: List[Optional[Tensor]],
                bn_biases: List[Optional[Tensor]], eps: List[float], strides: List[int], paddings: List[int],
                shortcut: str, shortcut_stride: int, running: Optional[List[Optional[tuple]]]):
    """The backend's plan of a unit (`Backend.unit_plan`: `preact_unit`'s arguments except x and its statistics),
    or None when the backend has no native unit or it cannot take this one: it needs every BN affine and running
    buffers for every BN (or no update) with num_batches_tracked, one numeric momentum and one dtype per kind of
    buffer (one multi-tensor update). Its `units_train` runs plans in eager mode only (see `traced`)."""
    impl = get_backend_impl(backend)
    if impl.unit_plan is None or any(w is None for w in bn_weights) or any(b is None for b in bn_biases):
        return None
    if running:
        rm, rv, _, _, momentum = running[0] if running[0] is not None else (None,) * 5
        if momentum is None or not all(r is not None and r[2] is not None and r[4] == momentum
                                       and r[0].dtype == rm.dtype and r[1].dtype == rv.dtype for r in running):
            return None
    rms, rvs, nbts, counts, momenta = map(list, zip(*running)) if running else ([],) * 5
    return impl.unit_plan(weights, bn_weights, bn_biases, eps, strides, paddings, shortcut, shortcut_stride, rms,
                          rvs, nbts, counts, momenta[0] if momenta else 0.0)


def preact_unit_gradients(x: Tensor, x_mean: Tensor, x_var: Tensor, weights: List[Tensor],
                          bn_weights: List[Optional[Tensor]], bn_biases: List[Optional[Tensor]], eps: List[float],
                          strides: List[int], paddings: List[int], shortcut: str, shortcut_stride: int, backend: str,
                          dout: Tensor) -> Tuple[Tensor, List[Tensor], List[Optional[Tensor]], List[Optional[Tensor]]]:
    """(dx, dweights, dγs, dβs) of `preact_unit` given the gradient dout of x_{l+1}, from the unit input alone:
    recomputes what the forward saves (without the last conv, whose output backward does not need), then runs the
    backward; bitwise what the autograd node computes. Runs without recording a graph (a recomputation's replay)."""
    with torch.no_grad():
        k = len(bn_weights)
        res = _unit_forward(x, x_mean, x_var, weights, bn_weights, bn_biases, eps, strides, paddings, shortcut,
                            shortcut_stride, backend, through_last=False)
        ys, rstds, stats = res[:k - 1], res[k - 1:2 * k - 1], res[2 * k - 1:]
        grads = _unit_backward(dout, x, ys, weights, [x_mean] + stats[0::2], rstds, bn_weights, bn_biases, strides,
                               paddings, shortcut, shortcut_stride, backend)
    n = len(weights)
    affine = [affine_grads(g, b, dg, db) for g, b, dg, db in zip(bn_weights, bn_biases, grads[1 + n:1 + n + k],
                                                                   grads[1 + n + k:])]
    return grads[0], grads[1:1 + n], [a[0] for a in affine], [a[1] for a in affine]
