"""Fused pre-activation layers and the residual units of the paper."""
from fastresnet.nn.layers import BNReLU2d, PreActConv2d
from fastresnet.nn.shortcuts import ExclusiveGate, Projection, ShortcutDropout, ZeroPadShortcut
from fastresnet.nn.units import VARIANTS, ResidualUnit

__all__ = [
    "BNReLU2d", "PreActConv2d", "ResidualUnit", "VARIANTS",
    "ZeroPadShortcut", "Projection", "ExclusiveGate", "ShortcutDropout",
]
