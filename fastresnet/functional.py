"""Functional fused layers: input checks, backend resolution, BN statistics and running-statistics updates, then
the custom ops of `fastresnet.ops`.

Autocast: under `torch.autocast` the conv weight is cast to the autocast dtype and the activation is written in it;
the BN input x keeps its own dtype (the residual stream may stay fp32) and statistics are always fp32.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from fastresnet import ops, recompute, reference
from fastresnet.backends import resolve
from fastresnet.ops.bn_ops import conv_out_shape, stat_dtype
from fastresnet.sync import combine_batch_stats

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
IntPair = Union[int, Sequence[int]]


def _pair(v: IntPair, name: str) -> Tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or not all(isinstance(i, int) and i >= 0 for i in pair):
        raise ValueError(f"{name}: expected a non-negative int or a pair of them, got {v!r}")
    return pair


def _check_channel_vector(name: str, t: Tensor, x: Tensor, num_features: int) -> None:
    if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != num_features:
        raise ValueError(f"{name}: expected a 1-D tensor of {num_features} elements (one per channel), got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (the device of x), got {t.device}")


def check_bn_input(
    x: Tensor, num_features: int, training: bool, channel_params: Sequence[Tuple[str, Optional[Tensor]]] = (),
    stats: Optional[Tuple[Tensor, Tensor]] = None,
) -> None:
    """Validate the BN input x [N, C, H, W], the per-channel tensors [C] (γ, β, running buffers) and precomputed
    `stats` (mean, var), with errors that name the argument."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D tensor [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x: expected dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[1] != num_features:
        raise ValueError(f"x: expected {num_features} channels (dim 1), got {x.shape[1]} (shape {tuple(x.shape)})")
    if training and x.numel() // max(num_features, 1) == 1:
        raise ValueError(
            f"x: batch-norm training needs more than one value per channel, got shape {tuple(x.shape)} "
            "(N·H·W = 1); use a larger batch or eval mode")
    given = dict(channel_params)
    if (given.get("running_mean") is None) != (given.get("running_var") is None):
        raise ValueError("running_mean, running_var: expected both (running statistics) or neither")
    for name, t in channel_params:
        if t is not None:
            _check_channel_vector(name, t, x, num_features)
    if stats is not None:
        check_stats(x, stats, num_features)


def check_stats(x: Tensor, stats: Tuple[Tensor, Tensor], num_features: int) -> None:
    """Validate precomputed batch statistics (mean, var) of x: two 1-D tensors of num_features on x's device."""
    if not isinstance(stats, (tuple, list)) or len(stats) != 2:
        raise ValueError(f"stats: expected a (mean, var) pair, got {type(stats).__name__}")
    for name, t in zip(("stats[0] (mean)", "stats[1] (var)"), stats):
        _check_channel_vector(name, t, x, num_features)


def check_conv_input(
    x: Tensor, weight: Tensor, training: bool, stride: IntPair, padding: IntPair,
    params: Sequence[Tuple[str, Optional[Tensor]]] = (), stats: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Validate a pre-activation conv's x [N, C_in, H, W], weight [C_out, C_in, kh, kw], stride and padding (and the
    BN's per-channel tensors `params` and `stats`, as `check_bn_input`); returns (stride, padding) as pairs."""
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"weight: expected a 4-D conv weight [C_out, C_in, kh, kw], got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    check_bn_input(x, weight.shape[1], training, params, stats)
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight: expected a floating dtype, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight: expected device {x.device} (the device of x), got {weight.device}")
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    if min(stride) < 1:
        raise ValueError(f"stride: expected values >= 1, got {stride}")
    for d in (2, 3):
        if x.shape[d] + 2 * padding[d - 2] < weight.shape[d]:
            raise ValueError(f"x: spatial size {tuple(x.shape[2:])} with padding {padding} is smaller than the "
                             f"kernel {tuple(weight.shape[2:])}")
    return stride, padding


def bn_statistics(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    backend: str,
    stats: Optional[Tuple[Tensor, Tensor]] = None,
    process_group=None,
) -> Tuple[Tensor, Tensor]:
    """(mean, rstd) for BN of x, fp32. Training (or no running buffers): this batch's statistics — taken from
    `stats` if a producer (e.g. `add_stats`) already computed them — and the running buffers updated once.
    Eval: the running statistics. `process_group` (training only): the batch is split across its ranks and the
    statistics are those of the global batch (`fastresnet.sync.combine_batch_stats`); this synchronises the
    forward only — use the layers' `process_group` (or `fastresnet.sync_functional`) for the matching backward.
    Inside a recomputed unit's replay (`fastresnet.recompute`) the first forward's (mean, rstd) come back instead:
    nothing is computed, communicated or updated again."""
    replayed = recompute.replayed_statistics(x)
    if replayed is not None:
        return replayed
    use_batch = training or running_mean is None
    if use_batch:
        mean, var = stats if stats is not None else ops.batch_stats(x, backend)
        count = x.numel() // x.shape[1]
        if process_group is not None and training:
            mean, var, count = combine_batch_stats(mean, var, count, process_group)
        if training and running_mean is not None:
            ops.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum,
                                     backend)
    else:
        mean, var = running_mean, running_var
    acc = stat_dtype(x)
    mean, rstd = mean.to(acc), torch.rsqrt(var.to(acc) + eps)
    recompute.record_statistics(mean, rstd)
    return mean, rstd


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The conv's compute dtype under autocast for x's device; None when autocast is off there."""
    device = x.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _conv_weight(weight: Tensor, x: Tensor) -> Tensor:
    """The weight in the conv's compute dtype: the autocast dtype when autocast is on for x's device."""
    dtype = autocast_dtype(x)
    return weight if dtype is None else weight.to(dtype)


def bn_relu(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    bn_weight: Optional[Tensor] = None,
    bn_bias: Optional[Tensor] = None,
    num_batches_tracked: Optional[Tensor] = None,
    training: bool = True,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    stats: Optional[Tuple[Tensor, Tensor]] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """relu(batch_norm(x)) with PyTorch's BatchNorm2d semantics; saves x (not the output) for backward.

    x: [N, C, H, W], any float dtype, NCHW or channels_last. Returns the activation in x's dtype and layout.
    """
    channels = bn_weight.shape[0] if isinstance(bn_weight, Tensor) and bn_weight.dim() == 1 else x.shape[1]
    check_bn_input(x, channels, training,
                   [("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)], stats)
    name = resolve(x, backend)
    mean, rstd = bn_statistics(x, running_mean, running_var, num_batches_tracked, training, momentum, eps, name,
                               stats)
    return ops.bn_relu(x, mean, rstd, bn_weight, bn_bias, training or running_mean is None, name)


def bn_relu_conv2d(
    x: Tensor,
    weight: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    bn_weight: Optional[Tensor] = None,
    bn_bias: Optional[Tensor] = None,
    num_batches_tracked: Optional[Tensor] = None,
    training: bool = True,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    stride: IntPair = 1,
    padding: IntPair = 0,
    stats: Optional[Tuple[Tensor, Tensor]] = None,
    backend: Optional[str] = None,
    residual: Optional[Tensor] = None,
    return_stats: bool = False,
):
    """conv2d(relu(batch_norm(x)), weight) (+ residual): pre-activation conv, one autograd node, activation never
    stored.

    x: [N, C_in, H, W]; weight: [C_out, C_in, kh, kw] (groups 1, dilation 1, no bias); zero padding applies to the
    activation. BN uses PyTorch's BatchNorm2d semantics (batch statistics and one running update in training,
    running statistics in eval). `stats`: this batch's (mean, biased var) of x if already known.
    residual: [N, C_out, H_out, W_out], added before the single rounding of y (y then has the promoted dtype of the
    conv and the residual); it receives dy as its gradient.
    return_stats: return (y, mean, var) with y's per-channel batch statistics (fp32, biased var), for the next BN's
    `stats=` (docs/architecture.md §3): tier B ("triton_conv") computes them (+ the residual add) in the conv epilogue,
    tier A with its add + statistics kernel.
    """
    stride, padding = check_conv_input(x, weight, training, stride, padding,
                                       [("bn_weight", bn_weight), ("bn_bias", bn_bias),
                                        ("running_mean", running_mean), ("running_var", running_var)], stats)
    if residual is not None:
        out_shape = conv_out_shape(x.shape, weight.shape, list(stride), list(padding))
        if tuple(residual.shape) != tuple(out_shape) or residual.device != x.device:
            raise ValueError(f"residual: expected shape {tuple(out_shape)} on {x.device}, got "
                             f"{tuple(residual.shape)} on {residual.device}")
    name = resolve(x, backend)
    mean, rstd = bn_statistics(x, running_mean, running_var, num_batches_tracked, training, momentum, eps, name,
                               stats)
    args = (x, _conv_weight(weight, x), mean, rstd, bn_weight, bn_bias)
    use_batch = training or running_mean is None
    if residual is None and not return_stats:
        return ops.bn_relu_conv(*args, stride, padding, use_batch, name)
    y, y_mean, y_var = ops.bn_relu_conv_stats(*args, residual, stride, padding, use_batch, name)
    return (y, y_mean, y_var) if return_stats else y


def batch_stats(x: Tensor, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Per-channel (mean, biased var) of x [N, C, H, W] in fp32 (deterministic); not differentiable."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x: expected a 4-D tensor [N, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    return ops.batch_stats(x, resolve(x, backend))


def add_stats(a: Tensor, b: Tensor, backend: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(a + b, mean, var): a residual add that also returns the per-channel batch statistics of its output (fp32),
    so the next BN need not read the tensor again. The sum has the promoted dtype of a and b (as eager `a + b`).
    Gradients flow to a and b; mean/var are not differentiable."""
    if a.shape != b.shape:
        raise ValueError(f"b: expected the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"b: expected device {a.device} (the device of a), got {b.device}")
    if a.dim() != 4:
        raise ValueError(f"a: expected a 4-D tensor [N, C, H, W], got shape {tuple(a.shape)}")
    return ops.add_stats(a, b, resolve(a, backend))


class BNConv(NamedTuple):
    """One BN → ReLU → conv layer of a residual unit (`preact_unit`): the conv weight [C_out, C_in, kh, kw], the BN's
    affine parameters and running buffers (None where absent), its momentum and eps, and the conv's (stride,
    padding) pairs."""
    weight: Tensor
    bn_weight: Optional[Tensor]
    bn_bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    momentum: Optional[float]
    eps: float
    stride: Tuple[int, int]
    padding: Tuple[int, int]


def _check_unit(x: Tensor, layers: Sequence[BNConv], shortcut: str, shortcut_weight: Optional[Tensor],
                shortcut_stride: int, stats) -> List[int]:
    """Validate `preact_unit`'s arguments; returns N·H·W of every BN's input (its statistics' sample count)."""
    if shortcut not in ops.unit_ops.SHORTCUTS:
        raise ValueError(f"shortcut: expected one of {ops.unit_ops.SHORTCUTS}, got {shortcut!r}")
    if len(layers) == 0:
        raise ValueError("layers: expected at least one BNConv layer")
    if isinstance(shortcut_stride, bool) or not isinstance(shortcut_stride, int) or shortcut_stride < 1:
        raise ValueError(f"shortcut_stride: expected a positive int, got {shortcut_stride!r}")
    shape, counts = x.shape, []
    for i, layer in enumerate(layers):
        if not isinstance(layer, BNConv):
            raise TypeError(f"layers[{i}]: expected a BNConv, got {type(layer).__name__}")
        params = [("bn_weight", layer.bn_weight), ("bn_bias", layer.bn_bias), ("running_mean", layer.running_mean),
                  ("running_var", layer.running_var)]
        if i == 0:
            check_conv_input(x, layer.weight, True, layer.stride, layer.padding, params, stats)
        elif not isinstance(layer.weight, Tensor) or layer.weight.dim() != 4 or layer.weight.shape[1] != shape[1]:
            raise ValueError(f"layers[{i}].weight: expected a 4-D conv weight with {shape[1]} input channels (the "
                             f"output channels of layers[{i - 1}]), got "
                             f"{tuple(layer.weight.shape) if isinstance(layer.weight, Tensor) else layer.weight!r}")
        else:
            for name, t in params:
                if t is not None:
                    _check_channel_vector(f"layers[{i}].{name}", t, x, shape[1])
            if shape[0] * shape[2] * shape[3] == 1:
                raise ValueError(
                    f"x: batch-norm training needs more than one value per channel, but layers[{i}]'s input has "
                    f"shape {tuple(shape)} (N·H·W = 1) for x of shape {tuple(x.shape)}; use a larger batch or eval "
                    "mode")
        counts.append(shape[0] * shape[2] * shape[3])
        shape = conv_out_shape(shape, layer.weight.shape, list(layer.stride), list(layer.padding))
    out_channels, in_channels = shape[1], x.shape[1]
    if shortcut == "shared_projection":
        want = (out_channels, in_channels, 1, 1)
        if not isinstance(shortcut_weight, Tensor) or tuple(shortcut_weight.shape) != want:
            raise ValueError(f"shortcut_weight: expected a projection weight of shape {want}, got "
                             f"{tuple(shortcut_weight.shape) if isinstance(shortcut_weight, Tensor) else None}")
    elif shortcut_weight is not None:
        raise ValueError(f"shortcut_weight: only the 'shared_projection' shortcut has a weight, got shortcut="
                         f"{shortcut!r}")
    if shortcut == "zero_pad" and out_channels < in_channels:
        raise ValueError(f"shortcut: zero_pad cannot reduce width ({in_channels} -> {out_channels})")
    if shortcut in ("identity", "shared_identity") and out_channels != in_channels:
        raise ValueError(f"shortcut: {shortcut!r} needs as many output channels as input channels, got "
                         f"{in_channels} -> {out_channels}")
    stride = shortcut_stride if shortcut in ("zero_pad", "shared_projection") else 1
    expected = [(d - 1) // stride + 1 for d in x.shape[2:]]
    if list(shape[2:]) != expected:
        raise ValueError(f"shortcut_stride: the shortcut gives spatial size {tuple(expected)}, the residual branch "
                         f"{tuple(shape[2:])}")
    return counts


def preact_unit(
    x: Tensor,
    layers: Sequence[BNConv],
    shortcut: str = "identity",
    shortcut_weight: Optional[Tensor] = None,
    shortcut_stride: int = 1,
    stats: Optional[Tuple[Tensor, Tensor]] = None,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Training forward of a full pre-activation residual unit as one autograd node: x_{l+1} = h(x) + F(x) with
    F = conv_k ∘ relu ∘ BN_k ∘ … ∘ conv_1 ∘ relu ∘ BN_1 (`layers`, batch statistics, each running buffer updated
    once) and the shortcut h: "identity", "zero_pad" (option A, `shortcut_stride`), "shared_identity" (h =
    relu(BN_1(x))) or "shared_projection" (h = conv1×1(relu(BN_1(x)), shortcut_weight, stride shortcut_stride)).

    `stats`: x's batch (mean, biased var) if known (the previous unit returns them). Returns (x_{l+1}, its mean, its
    var) for the next unit's `stats`. Saves x and the inner BN inputs; the backward runs the layers in reverse and
    adds the shortcut gradient inside the kernel that writes dx (docs/architecture.md §3). A caller that runs the
    same layers again and again (a module) keeps a `PreparedUnit` instead.
    """
    return PreparedUnit(layers, shortcut, shortcut_weight, shortcut_stride)(x, stats, backend)


def preact_unit_gradients(
    x: Tensor,
    dout: Tensor,
    layers: Sequence[BNConv],
    shortcut: str = "identity",
    shortcut_weight: Optional[Tensor] = None,
    shortcut_stride: int = 1,
    stats: Optional[Tuple[Tensor, Tensor]] = None,
    backend: Optional[str] = None,
) -> Tuple[Tensor, List[Tuple[Tensor, Tensor]]]:
    """The gradients `preact_unit(x, layers, ...)` gives for the gradient dout of its output, computed from x alone
    without recording a graph and without running the last conv (its output is not needed): (dx, [(parameter,
    gradient)] for every conv weight, the projection and every present γ, β), gradients in the parameters' dtypes.
    Running buffers are untouched. Bitwise what backward through `preact_unit` computes; the recomputation
    (`fastresnet.recompute`) uses it for the last unit of a segment."""
    return PreparedUnit(layers, shortcut, shortcut_weight, shortcut_stride).gradients(x, dout, stats, backend)


class PreparedUnit:
    """`preact_unit` and `preact_unit_gradients` for one fixed unit (layers, shortcut): the per-layer argument lists
    are built once and the argument checks run once per input signature (x's shape, dtype and device) instead of on
    every call — the host work a module repeats every training step (`fastresnet.nn.ResidualUnit` keeps one).

    The layers' tensors are held by reference, so in-place updates (optimizer steps, `load_state_dict`) are seen;
    a caller that replaces a parameter or buffer object, or changes a layer's hyper-parameters, makes a new one.
    """

    def __init__(self, layers: Sequence[BNConv], shortcut: str = "identity", shortcut_weight: Optional[Tensor] = None,
                 shortcut_stride: int = 1):
        self.layers, self.shortcut = tuple(layers), shortcut
        self.shortcut_weight, self.shortcut_stride = shortcut_weight, shortcut_stride
        self._signature = None  # (shape, dtype, device) of the last x that passed the checks
        # what the last call ran: (backend name, its `unit_ops.native_plan`) when the backend's native unit with a
        # plan kept here, else None (`fastresnet.nn.units.UnitChain` hands such plans over in one call)
        self.last_plan = None

    def _check(self, x: Tensor, stats: Optional[Tuple[Tensor, Tensor]]) -> None:
        """`_check_unit`, then the argument lists for inputs of x's signature."""
        self._signature = None
        layers = self.layers
        counts = _check_unit(x, layers, self.shortcut, self.shortcut_weight, self.shortcut_stride, stats)
        self._weights = [layer.weight for layer in layers] + ([] if self.shortcut_weight is None
                                                               else [self.shortcut_weight])
        self._lists = ([layer.bn_weight for layer in layers], [layer.bn_bias for layer in layers],
                       [layer.eps for layer in layers], [s for layer in layers for s in layer.stride],
                       [p for layer in layers for p in layer.padding], self.shortcut, self.shortcut_stride)
        self._running = [None if layer.running_mean is None else
                         (layer.running_mean, layer.running_var, layer.num_batches_tracked, count, layer.momentum)
                         for layer, count in zip(layers, counts)]
        self._plans = {}  # (backend name, replaying) -> native_plan of the held weights, for inputs like x
        self._signature = (x.shape, x.dtype, x.device)

    def args(self, x: Tensor, stats: Optional[Tuple[Tensor, Tensor]], backend: Optional[str]) -> tuple:
        """Check the arguments and return those of `ops.preact_unit` and `ops.unit_ops.preact_unit_gradients`: x's
        statistics (computed if not given), the weights in the autocast dtype, the layers' vectors, flattened
        pairs, the resolved backend."""
        if not isinstance(x, Tensor) or (x.shape, x.dtype, x.device) != self._signature:
            self._check(x, stats)
        elif stats is not None:
            check_stats(x, stats, x.shape[1])
        name = resolve(x, backend)
        mean, var = stats if stats is not None else ops.batch_stats(x, name)
        dtype = autocast_dtype(x)
        weights = self._weights if dtype is None else [w.to(dtype) for w in self._weights]
        return (x, mean, var, weights, *self._lists, name)

    def __call__(self, x: Tensor, stats: Optional[Tuple[Tensor, Tensor]] = None, backend: Optional[str] = None
                 ) -> Tuple[Tensor, Tensor, Tensor]:
        """`preact_unit(x, *this unit, stats=stats, backend=backend)`."""
        args = self.args(x, stats, backend)
        running = None if recompute.replaying() else self._running  # a recomputed unit's replay leaves them alone
        plan = None
        if args[3] is self._weights and not ops.unit_ops.traced():  # no autocast copies of the weights: keep a plan
            key = (args[-1], running is None)
            if key not in self._plans:
                self._plans[key] = ops.unit_ops.native_plan(args[-1], *args[3:-1], running)
            plan = self._plans[key]
        self.last_plan = None if plan is None else (args[-1], plan)
        return ops.preact_unit(*args, running=running, plan=plan)

    def gradients(self, x: Tensor, dout: Tensor, stats: Optional[Tuple[Tensor, Tensor]] = None,
                  backend: Optional[str] = None) -> Tuple[Tensor, List[Tuple[Tensor, Tensor]]]:
        """`preact_unit_gradients(x, dout, *this unit, stats=stats, backend=backend)`."""
        dx, dweights, dgammas, dbetas = ops.unit_ops.preact_unit_gradients(*self.args(x, stats, backend), dout)
        pairs = [(p, reference.cast(g, p.dtype)) for p, g in zip(self._weights, dweights)]
        for layer, dg, db in zip(self.layers, dgammas, dbetas):
            pairs += [(t, g) for t, g in ((layer.bn_weight, dg), (layer.bn_bias, db)) if t is not None]
        return dx, pairs
