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
from fastresnet.ops.bn_ops import (FusedOp, affine_grads, _bn_relu_conv_backward, _empty_as, _profiler_range,
                                   _stats_fake, conv_out_shape, stat_dtype, traced)


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
                  shortcut: str, shortcut_stride: int, backend: str, through_last: bool = True,
                  running: Optional[List[Optional[tuple]]] = None,
                  affines: Optional[List[Tuple[Tensor, Tensor, bool]]] = None) -> List[Tensor]:
    """[x_{l+1}, its mean, its var, y_1 … y_{k−1}, rstd_1 … rstd_k, mean_2, var_2, …, mean_k, var_k]; without
    `through_last` the last conv (and the shortcut add) is not run and the first three are left out: what a
    recomputation needs for the backward alone.

    On a backend with `Backend.bn_affine` the kernel that consumes a BN's statistics forms its rstd and affine map
    itself and makes the running update of its `running` entry (`preact_unit`'s format; None: no update, the op
    then mutates nothing); on one with `Backend.stats_in_bn_relu` the statistics of a conv output that only the next
    BN reads are made in that BN-ReLU's launch. affines: None, or a list to which each BN's (scale, shift, whether
    its running statistics were updated) is appended."""
    impl = get_backend_impl(backend)
    k = len(bn_weights)
    ys: List[Tensor] = []
    rstds: List[Tensor] = []
    stats: List[Tensor] = []
    pending = impl.bn_affine is not None and impl.stats_in_bn_relu  # inner statistics left to the next BN-ReLU

    def affine(i: int, x: Tensor, mean: Optional[Tensor],
               var: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor], dict]:
        """(scale, shift, {}) of BN i on x, or (None, None, {"affine": spec}) for its consumer to form them; mean and
        var None: x's statistics are not made yet — the consumer makes them where it can, else a statistics pass."""
        r = running[i] if running else None
        spec = None
        if mean is None:
            mean, var = (torch.empty(x.shape[1], dtype=stat_dtype(x), device=x.device) for _ in range(2))
            spec = impl.bn_affine(mean, var, eps[i], bn_weights[i], bn_biases[i], r, from_input=True)
            if spec is None:
                mean, var = impl.batch_stats(x)
        if spec is None and impl.bn_affine is not None:
            spec = impl.bn_affine(mean, var, eps[i], bn_weights[i], bn_biases[i], r)
        if i > 0:
            stats.extend((mean, var))
        if spec is None:
            rstds.append(torch.rsqrt(var + eps[i]))
            scale, shift = impl.scale_shift(mean, rstds[-1], bn_weights[i], bn_biases[i])
            if affines is not None:
                affines.append((scale, shift, False))
            return scale, shift, {}
        rstds.append(spec.rstd)
        if affines is not None:
            affines.append((spec.scale, spec.shift, spec.updates_running))
        return None, None, {"affine": spec}

    y, mean, var, first = x, x_mean, x_var, 0
    if shortcut.startswith("shared"):  # one activation feeds conv1 and the shortcut: plain convs on it
        scale, shift, kw = affine(0, x, mean, var)
        a = impl.bn_relu(x, scale, shift, x.dtype, **kw)
        h = a if shortcut == "shared_identity" else _plain_conv(a, weights[k], shortcut_stride, 0)
        y = _plain_conv(a, weights[0], _pair(strides, 0), _pair(paddings, 0))
        if k == 1:
            return ([*impl.add_stats(y, h)] if through_last else []) + rstds
        mean, var = (None, None) if pending else impl.batch_stats(y)
        ys, first = [y], 1
    else:
        h = x if shortcut == "identity" else _zero_pad(x, shortcut_stride, weights[k - 1].shape[0])
    for i in range(first, k):
        last = i == k - 1
        if last and not through_last:
            if mean is None:  # no kernel consumes these statistics here
                mean, var = impl.batch_stats(y)
            scale, shift, kw = affine(i, y, mean, var)
            if kw:  # no kernel consumes these statistics here: the affine map in a launch of its own
                kw["affine"].finalize()
            return ys + rstds + stats
        scale, shift, kw = affine(i, y, mean, var)
        stride, padding = _pair(strides, i), _pair(paddings, i)
        if last or not pending:
            y, mean, var = impl.bn_relu_conv_stats(y, scale, shift, weights[i], stride, padding, h if last else None,
                                                   **kw)
        else:
            y, mean, var = impl.bn_relu_conv(y, scale, shift, weights[i], stride, padding, **kw), None, None
        if not last:
            ys.append(y)
    return [y, mean, var] + ys + rstds + stats


def _unit_backward(dout: Tensor, x: Tensor, ys: List[Tensor], weights: List[Tensor], means: List[Tensor],
                   rstds: List[Tensor], bn_weights: List[Optional[Tensor]], bn_biases: List[Optional[Tensor]],
                   strides: List[int], paddings: List[int], shortcut: str, shortcut_stride: int, backend: str,
                   affines: Optional[List[Tuple[Tensor, Tensor, bool]]] = None) -> List[Tensor]:
    """[dx, dW_1 … dW_k (dW_shortcut), Σdz·x̂ per BN (dγ), Σdz per BN (dβ)]: the layers in reverse; the shortcut
    gradient joins dx inside the BN backward kernel (a shared activation: the gradient of that activation).
    affines: the forward's (scale, shift, _) per BN (`_unit_forward`), or None / empty to compute them again."""
    impl = get_backend_impl(backend)
    k = len(means)
    dweights: List[Optional[Tensor]] = [None] * len(weights)  # every entry is filled below
    dgammas: List[Optional[Tensor]] = [None] * k
    dbetas: List[Optional[Tensor]] = [None] * k
    inputs = [x] + ys
    dy = dout
    for i in reversed(range(k)):
        xi = inputs[i]
        scale, shift = (affines[i][:2] if affines else
                        impl.scale_shift(means[i], rstds[i], bn_weights[i], bn_biases[i]))
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


def _running_in_kernels(backend: str) -> bool:
    """Whether a unit's kernels make its BNs' running updates (`Backend.bn_affine`): eager calls outside tracing and
    functorch transforms (the registered ops mutate nothing)."""
    return (get_backend_impl(backend).bn_affine is not None and not traced()
            and not torch._C._are_functorch_transforms_active())


class _PreactUnit(torch.autograd.Function):
    """The unit as one autograd node around the two ops above. Eager calls their Python bodies directly (a custom
    op's own dispatch costs more host time than the unit's kernels at small sizes); under torch.compile or a
    dispatch mode (`traced`) the registered ops run, opaque, with their fake implementations and FLOP formulas.
    Where `_running_in_kernels`, the caller passes `running` and a list `pending`: the kernels make the running
    updates they can, `pending` receives the entries left for the caller, and each BN's scale and shift are saved
    for the backward; otherwise both are None and the caller updates the running statistics after the op.
    Gradients are not materialised: the statistics outputs get none, and no zeros are made for them."""

    @staticmethod
    def forward(ctx, config: tuple, running: Optional[List[Optional[tuple]]], pending: list, x: Tensor,
                x_mean: Tensor, x_var: Tensor, *params: Optional[Tensor]):
        eps, strides, paddings, shortcut, shortcut_stride, backend = config
        k = len(eps)
        weights, bn_weights, bn_biases = list(params[:-2 * k]), list(params[-2 * k:-k]), list(params[-k:])
        args = (x, x_mean, x_var, weights, bn_weights, bn_biases, eps, strides, paddings, shortcut, shortcut_stride,
                backend)
        affines = None if pending is None else []  # the caller's `_running_in_kernels`: the body, running handed on
        if affines is None:
            res = _preact_unit_op(*args)
        else:
            with _profiler_range(_preact_unit_op.qualname):
                res = _unit_forward(*args, running=running, affines=affines)
        ys, rstds, stats = res[3:2 + k], res[2 + k:2 + 2 * k], res[2 + 2 * k:]
        if running and affines is not None:
            pending.extend((*r[:3], mean, var, *r[3:]) for r, mean, var, (_, _, done) in
                           zip(running, [x_mean] + stats[0::2], [x_var] + stats[1::2], affines)
                           if r is not None and not done)
        scales_shifts = [t for a in affines for t in a[:2]] if affines is not None else []
        ctx.save_for_backward(x, *ys, *weights, x_mean, *stats[0::2], *rstds, *bn_weights, *bn_biases,
                              *scales_shifts)
        ctx.config, ctx.num_weights = config, len(weights)
        ctx.set_materialize_grads(False)
        outs = (res[0], res[1], res[2], *stats)
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    def backward(ctx, dout: Optional[Tensor], *_):
        _, strides, paddings, shortcut, shortcut_stride, backend = ctx.config
        k, n = len(ctx.config[0]), ctx.num_weights
        if dout is None:  # the unit's output reaches no loss: no gradient for any input
            return (None,) * (6 + n + 2 * k)
        saved = ctx.saved_tensors
        x, ys, weights = saved[0], list(saved[1:k]), list(saved[k:k + n])
        means, rstds, gammas, betas = (list(saved[k + n + j * k:2 * k + n + j * k]) for j in range(4))
        args = (dout, x, ys, weights, means, rstds, gammas, betas, strides, paddings, shortcut, shortcut_stride,
                backend)
        saved_affine = saved[5 * k + n:]
        if saved_affine and not traced():
            with _profiler_range(_preact_unit_backward_op.qualname):
                grads = _unit_backward(*args, affines=list(zip(saved_affine[0::2], saved_affine[1::2])))
        else:
            grads = _preact_unit_backward_op(*args)
        dx, dweights, dgammas, dbetas = grads[0], grads[1:1 + n], grads[1 + n:1 + n + k], grads[1 + n + k:]
        affine = [affine_grads(g, b, dg, db) for g, b, dg, db in zip(gammas, betas, dgammas, dbetas)]
        return (None, None, None, dx, None, None, *dweights, *(a[0] for a in affine), *(a[1] for a in affine))


def preact_unit(x: Tensor, x_mean: Tensor, x_var: Tensor, weights: List[Tensor], bn_weights: List[Optional[Tensor]],
                bn_biases: List[Optional[Tensor]], eps: List[float], strides: List[int], paddings: List[int],
                shortcut: str, shortcut_stride: int, backend: str, running: Optional[List[Optional[tuple]]] = None,
                plan=None) -> Tuple[Tensor, Tensor, Tensor]:
    """A full pre-activation residual unit in training as one autograd node (docs/architecture.md §3):
    x_{l+1} = h + W_k(relu(BN_k(… W_1(relu(BN_1(x)))))), with batch statistics (x_mean, x_var for BN_1; the others
    from the conv epilogues) and the shortcut h of kind `shortcut` (`SHORTCUTS`; `weights[k]` is the projection).

    strides/paddings: flattened (h, w) pairs per layer. running: per BN its (running_mean, running_var,
    num_batches_tracked, N·H·W of its input, momentum), or None for a BN without buffers; they are updated with the
    batch statistics (`reference.update_running_stats_many`, or by the kernels on a backend with
    `Backend.bn_affine`). None: no update (a recomputation's replay). Returns (x_{l+1}, its mean, its var). Saved for
    backward: x, the inner BN inputs y_1 … y_{k−1} and the statistics.

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
    pending: List[tuple] = []  # entries (rm, rv, nbt, mean, var, count, momentum) left to update here
    if _running_in_kernels(backend):
        out, out_mean, out_var, *_ = _PreactUnit.apply(config, running, pending, x, x_mean, x_var, *weights,
                                                       *bn_weights, *bn_biases)
    else:  # the running update after the op, from its statistics outputs
        out, out_mean, out_var, *stats = _PreactUnit.apply(config, None, None, x, x_mean, x_var, *weights,
                                                           *bn_weights, *bn_biases)
        if running:
            pending = [(*r[:3], mean, var, *r[3:]) for r, mean, var in
                       zip(running, [x_mean] + stats[0::2], [x_var] + stats[1::2]) if r is not None]
    if pending:
        reference.update_running_stats_many(pending)
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
        affines: List[Tuple[Tensor, Tensor, bool]] = []
        res = _unit_forward(x, x_mean, x_var, weights, bn_weights, bn_biases, eps, strides, paddings, shortcut,
                            shortcut_stride, backend, through_last=False, affines=affines)
        ys, rstds, stats = res[:k - 1], res[k - 1:2 * k - 1], res[2 * k - 1:]
        grads = _unit_backward(dout, x, ys, weights, [x_mean] + stats[0::2], rstds, bn_weights, bn_biases, strides,
                               paddings, shortcut, shortcut_stride, backend, affines)
    n = len(weights)
    affine = [affine_grads(g, b, dg, db) for g, b, dg, db in zip(bn_weights, bn_biases, grads[1 + n:1 + n + k],
                                                                   grads[1 + n + k:])]
    return grads[0], grads[1:1 + n], [a[0] for a in affine], [a[1] for a in affine]
