"""Plain-PyTorch reference of every fused op (docs/architecture.md §2): the oracle all backends are tested against.

Tensors are logical NCHW (any memory format). Per channel c, over M = N·H·W elements:
mean, var = batch mean and biased variance of x; rstd = 1/sqrt(var + eps); scale = gamma·rstd;
shift = beta − mean·scale; x̂ = (x − mean)·rstd.

All arithmetic runs in float32 (float64 stays float64); outputs are rounded once to the storage dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


def _acc(x: Tensor) -> Tensor:
    """The accumulation dtype for x: float64 stays float64, everything else computes in float32."""
    return x if x.dtype == torch.float64 else x.float()


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype; t itself when it already is (skips a dispatcher call on the per-layer host path)."""
    return t if t.dtype == dtype else t.to(dtype)


def _per_channel(v: Tensor) -> Tensor:
    """[C] -> [1, C, 1, 1] for broadcasting against NCHW."""
    return v.view(1, -1, 1, 1)


def batch_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of x [N, C, H, W], in float32 (float64 for float64 x).

    Two-pass (mean first, then centred squares): exact for large |mean| / std, which one-pass E[x²]−E[x]² is not.
    """
    xf = _acc(x)
    mean = xf.mean(dim=(0, 2, 3))
    var = (xf - _per_channel(mean)).square().mean(dim=(0, 2, 3))
    return mean, var


def scale_shift(
    mean: Tensor, rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """Fold BN into a per-channel affine map: scale = gamma·rstd, shift = beta − mean·scale (gamma=1, beta=0 if None)."""
    scale = rstd if weight is None else cast(weight, rstd.dtype) * rstd
    shift = -mean * scale if bias is None else cast(bias, rstd.dtype) - mean * scale
    return scale, shift


def bn_relu(x: Tensor, scale: Tensor, shift: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """a = max(x·scale + shift, 0), computed in fp32 and rounded once to out_dtype (default x.dtype)."""
    a = torch.relu(_acc(x) * _per_channel(scale) + _per_channel(shift))
    return a.to(out_dtype or x.dtype)


def bn_relu_backward(
    dy: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    mean: Tensor,
    rstd: Tensor,
    training: bool,
    dres: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of a = relu(BN(x)) given dy = dL/da. Returns (dx, Σdz, Σdz·x̂); dγ = Σdz·x̂, dβ = Σdz.

    dz = 0 where x·scale + shift ≤ 0, else dy: PyTorch's ReLU backward (threshold_backward), under which a NaN
    pre-activation passes dy. Training (batch statistics): dx = scale·(dz − Σdz/M − x̂·Σdz·x̂/M).
    Eval (running statistics, constants): dx = scale·dz. dres, if given, is added to dx (the shortcut gradient).
    """
    xf, dyf = _acc(x), _acc(dy)
    s, t = _per_channel(scale), _per_channel(shift)
    dz = torch.where(xf * s + t <= 0, torch.zeros_like(dyf), dyf)
    xhat = (xf - _per_channel(mean)) * _per_channel(rstd)
    sum_dz = dz.sum(dim=(0, 2, 3))
    sum_dz_xhat = (dz * xhat).sum(dim=(0, 2, 3))
    if training:
        m = x.numel() // x.shape[1]
        dx = s * (dz - _per_channel(sum_dz) / m - xhat * _per_channel(sum_dz_xhat) / m)
    else:
        dx = s * dz
    if dres is not None:
        dx = dx + _acc(dres)
    return dx.to(x.dtype), sum_dz, sum_dz_xhat


def add_stats(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """y = a + b (added in fp32, rounded once to PyTorch's promoted dtype of a and b, as eager `a + b` under
    autocast) and the per-channel batch statistics of y (of the rounded y)."""
    y = (_acc(a) + _acc(b)).to(torch.promote_types(a.dtype, b.dtype))
    mean, var = batch_stats(y)
    return y, mean, var


def bn_relu_conv(
    x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, stride, padding, residual: Optional[Tensor] = None
) -> Tensor:
    """y = conv2d(relu(x·scale + shift), weight) (+ residual). Zero padding applies to the activation, not to x."""
    a = bn_relu(x, scale, shift, out_dtype=weight.dtype)
    y = torch.nn.functional.conv2d(a, weight, None, stride, padding)
    return y if residual is None else (_acc(y) + _acc(residual)).to(y.dtype)


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: Optional[float],
) -> None:
    """PyTorch's BatchNorm running-statistics update, in place and without a host synchronisation.

    num_batches_tracked += 1; factor = momentum, or 1/num_batches_tracked when momentum is None (cumulative
    average); running = (1 − factor)·running + factor·batch, with the unbiased variance var·M/(M − 1), in that
    form rather than as a lerp, whose running + factor·(batch − running) turns an infinite running value into NaN
    where BatchNorm2d keeps it. An empty batch (M = 0) only counts: nn.BatchNorm2d leaves the running statistics as
    they are.
    """
    update_running_stats_many([(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)])


def update_running_stats_many(
    entries: Sequence[Tuple[Tensor, Tensor, Optional[Tensor], Tensor, Tensor, int, Optional[float]]],
) -> None:
    """`update_running_stats` for several BNs at once, each entry its arguments in order: BNs sharing a momentum
    and a buffer dtype update with one multi-tensor op per step (four for a whole residual unit, whatever its depth),
    the same arithmetic as one BN at a time."""
    with torch.no_grad():
        nbts = [e[2] for e in entries if e[2] is not None]
        if nbts:
            torch._foreach_add_(nbts, 1)
        groups = {}
        for rm, rv, nbt, mean, var, count, momentum in entries:
            if isinstance(count, int) and count == 0:  # a 0-d tensor count (synchronised BN's) is not read here
                continue
            if momentum is None:
                if nbt is None:
                    raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
                factor = 1.0 / nbt.to(rm.dtype)
                rm.mul_(1 - factor).add_(cast(mean, rm.dtype) * factor)
                rv.mul_(1 - factor).add_(cast(var * (count / (count - 1)), rv.dtype) * factor)
            else:
                groups.setdefault((momentum, rm.dtype, rv.dtype), []).append((rm, rv, mean, var, count))
        for (momentum, mean_dtype, var_dtype), group in groups.items():
            rms, rvs, means, variances, counts = zip(*group)
            unbiased = torch._foreach_mul(list(variances), [c / (c - 1) for c in counts])
            # running means and variances together: (1 − m)·running, then + m·batch (PyTorch's BatchNorm form; a lerp
            # would turn an infinite running value into NaN)
            running = list(rms) + list(rvs)
            batch = [cast(m, mean_dtype) for m in means] + [cast(u, var_dtype) for u in unbiased]
            torch._foreach_mul_(running, 1 - momentum)
            torch._foreach_add_(running, batch, alpha=momentum)
