"""FLOP formulas of the fused custom ops for `torch.utils.flop_counter.FlopCounterMode` (what MFU estimates use).

FlopCounterMode sees a custom op as one opaque call, not the convolution it runs inside, so without these formulas a
fused network counts only its unfused convs and matmuls. The formulas follow the counter's own convention for
`aten.convolution`: 2 FLOPs (multiply + add) per weight tap per output element, nothing for bias, BatchNorm, ReLU,
residual adds or statistics. So a fused network counts what its eager twin counts:

- `fastresnet::bn_relu_conv`, `fastresnet::bn_relu_conv_stats` (forward): the conv, 2·N·C_out·C_in·kh·kw·H_out·W_out;
- `fastresnet::bn_relu_conv_backward`: input gradient (a transposed conv of dy) + weight gradient (a conv of the
  recomputed activation with dy), each the forward's count — the counter's `aten.convolution_backward` with both
  gradients; the activation recompute is elementwise and uncounted, like the BN and ReLU backward;
- `fastresnet::preact_unit` and `fastresnet::preact_unit_backward` (a whole residual unit, `unit_ops`): the sums of
  the above over the unit's convs and its projection shortcut;
- `bn_relu`, `bn_relu_backward`, `batch_stats`, `add_stats`: elementwise, uncounted (no formula), as the counter
  counts nothing for `aten.native_batch_norm`, `aten.relu` or `aten.add`.

The formulas are registered when `fastresnet.ops` is imported (importing `fastresnet` does).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.flop_counter import register_flop_formula

import fastresnet.ops.bn_ops  # noqa: F401  defines the ops registered below
from fastresnet.ops.unit_ops import layer_shapes


def conv_flops(x_shape: Sequence[int], w_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """FLOPs of a groups-1 conv2d of an [N, C_in, H, W] input with a [C_out, C_in, kh, kw] weight giving
    [N, C_out, H_out, W_out]: 2·N·C_out·C_in·kh·kw·H_out·W_out (multiply-adds counted as 2)."""
    c_out, c_in, kh, kw = w_shape
    return 2 * x_shape[0] * c_out * c_in * kh * kw * out_shape[2] * out_shape[3]


@register_flop_formula(torch.ops.fastresnet.bn_relu_conv)
def _bn_relu_conv_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flops(x_shape, w_shape, out_shape)


@register_flop_formula(torch.ops.fastresnet.bn_relu_conv_stats)
def _bn_relu_conv_stats_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flops(x_shape, w_shape, out_shape[0])   # outputs (y, mean, var)


@register_flop_formula(torch.ops.fastresnet.bn_relu_conv_backward)
def _bn_relu_conv_backward_flop(dy_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * conv_flops(x_shape, w_shape, dy_shape)   # input gradient + weight gradient


def unit_conv_flops(x_shape: Sequence[int], w_shapes: Sequence[Sequence[int]], strides: Sequence[int],
                    paddings: Sequence[int], shortcut_stride: int) -> int:
    """Forward FLOPs of a `preact_unit`: its k convs (flattened (h, w) strides/paddings per conv) and, when
    `w_shapes` holds one weight more, the 1×1 projection of the unit input."""
    k = len(strides) // 2
    outs = layer_shapes(x_shape, w_shapes, strides, paddings)
    total = sum(conv_flops(s, w, o) for s, w, o in zip([list(x_shape)] + outs, w_shapes, outs))
    if len(w_shapes) > k:  # the projection: 1×1, stride shortcut_stride, on the unit input
        projected = layer_shapes(x_shape, w_shapes[k:], [shortcut_stride] * 2, [0, 0])[0]
        total += conv_flops(x_shape, w_shapes[k], projected)
    return total


@register_flop_formula(torch.ops.fastresnet.preact_unit)
def _preact_unit_flop(x_shape, mean_shape, var_shape, w_shapes, bn_weights, bn_biases, eps, strides, paddings,
                      shortcut, shortcut_stride, *args, out_shape=None, **kwargs) -> int:
    return unit_conv_flops(x_shape, w_shapes, strides, paddings, shortcut_stride)


@register_flop_formula(torch.ops.fastresnet.preact_unit_backward)
def _preact_unit_backward_flop(dout_shape, x_shape, y_shapes, w_shapes, mean_shapes, rstd_shapes, bn_weights,
                               bn_biases, strides, paddings, shortcut, shortcut_stride, *args, out_shape=None,
                               **kwargs) -> int:
    return 2 * unit_conv_flops(x_shape, w_shapes, strides, paddings, shortcut_stride)  # input + weight gradients
