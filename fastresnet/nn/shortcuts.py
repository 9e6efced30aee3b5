"""Shortcut paths h(x) and the Table 1 ways of merging h(x) with the residual branch F(x) (docs/paper.md §1.1, §2)."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class ZeroPadShortcut(nn.Module):
    """Option A of [1]: identity with stride-s subsampling and zero channels appended for the extra width.

    Parameter-free. The zero channels go after the copied ones (fb.resnet.torch's Concat(Identity, MulConstant(0));
    docs/paper.md §1.1), which differs from padding on both sides only in channel order.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"out_channels: option A cannot reduce width ({in_channels} -> {out_channels})")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class Projection(nn.Sequential):
    """Option B/C of [1]: a 1×1 conv (stride s), optionally followed by BN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, bn: bool):
        layers = [nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)]
        if bn:
            layers.append(nn.BatchNorm2d(out_channels))
        super().__init__(*layers)


class ExclusiveGate(nn.Module):
    """Table 1 gating, g(x) = sigmoid(conv1×1(x) + b_g) from the unit input (docs/paper.md §2).

    exclusive=True: out = (1 − g)·h(x) + g·F(x); exclusive=False (shortcut-only): out = (1 − g)·h(x) + F(x).
    The gate bias starts at `bias_init` (the paper searched 0 … −10; −6 was best).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, bias_init: float, exclusive: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, stride, bias=True)
        self.bias_init, self.exclusive = bias_init, exclusive
        nn.init.constant_(self.conv.bias, bias_init)

    def forward(self, x: Tensor, shortcut: Tensor, residual: Tensor) -> Tensor:
        g = torch.sigmoid(self.conv(x))
        return (1 - g) * shortcut + (g * residual if self.exclusive else residual)

    def extra_repr(self) -> str:
        return f"bias_init={self.bias_init}, exclusive={self.exclusive}"


class ShortcutDropout(nn.Dropout):
    """Table 1 "dropout shortcut": dropout (ratio 0.5) on the output of the shortcut (PyTorch's inverted dropout)."""
