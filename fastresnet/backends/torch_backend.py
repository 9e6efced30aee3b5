"""The "torch" backend: the plain-PyTorch reference ops, run on any device and dtype (the universal fallback)."""
from __future__ import annotations

from fastresnet import reference
from fastresnet.backends.base import Backend


class TorchBackend(Backend):
    """Reference implementations (`fastresnet.reference`); unfused, so it stores nothing extra but is not fast."""

    name = "torch"

    def batch_stats(self, x):
        return reference.batch_stats(x)

    def bn_relu(self, x, scale, shift, out_dtype):
        return reference.bn_relu(x, scale, shift, out_dtype)

    def bn_relu_backward(self, dy, x, scale, shift, mean, rstd, training, dres=None):
        return reference.bn_relu_backward(dy, x, scale, shift, mean, rstd, training, dres)

    def add_stats(self, a, b):
        return reference.add_stats(a, b)
