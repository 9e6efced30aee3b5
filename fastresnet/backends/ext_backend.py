"""The "ext" backend: the tier-A primitives as compiled kernels of the extension `fastresnet._C` (csrc/).

CUDA tensors run the CUDA kernels (csrc/cuda/bn_kernels.cu: NHWC and NCHW, fp32/bf16/fp16/fp64 storage, fp32
statistics), CPU tensors the C++ CPU kernels (csrc/bn_cpu.cpp: NHWC and NCHW, any float dtype, fp32 math). Both
compute statistics from deterministic per-tile (count, mean, M2) partials merged with Chan's formula in a fixed
order, so results are bitwise reproducible. Layouts: channels_last inputs compute and return NHWC, everything else
NCHW (a strided view is first copied to a dense tensor). The conv itself is ATen's (tier A, from `Backend`).

If the extension was not built (FASTRESNET_SKIP_EXT, a failed compile, a pure-Python install) or was built without
CUDA, the backend stays importable and `unavailable_reason()` / `why_not(x)` say why; "auto" then skips it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastresnet.backends.base import Backend

try:
    from fastresnet import _C
except ImportError as e:  # not built, or built against another torch: the backend reports it, nothing raises
    _C = None
    _IMPORT_ERROR: Optional[str] = (
        f"the C++/CUDA extension fastresnet._C is not built or does not load ({e}); build it with "
        "`pip install --no-build-isolation -e .` (and without FASTRESNET_SKIP_EXT)")
else:
    _IMPORT_ERROR = None

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Whether "auto" picks the C++ CPU kernels for CPU tensors: yes. The rows behind it: each op of the C++ kernels against
# the reference in benchmarks/results/kernels_cpu.jsonl, and a whole training step in models_cpu.jsonl
# (docs/benchmarks.md).
CPU_AUTO = True


class ExtBackend(Backend):
    """Compiled kernels of `fastresnet._C`, called through `torch.ops.fastresnet_ext.*` (the dispatcher picks the
    CPU or CUDA kernel from the tensors' device)."""

    name = "ext"
    def unavailable_reason(self) -> Optional[str]:
        return _IMPORT_ERROR

    def why_not(self, x: Tensor) -> Optional[str]:
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        if x.device.type == "cuda" and not _C.with_cuda:
            return ("fastresnet._C was built without CUDA (torch without CUDA, nvcc missing or "
                    "FASTRESNET_SKIP_CUDA=1): it runs only CPU tensors")
        if x.device.type not in ("cpu", "cuda"):
            return f"x: expected a CPU or CUDA tensor, got device {x.device}"
        if x.dtype not in _DTYPES:
            return f"x: expected dtype float32, float64, bfloat16 or float16, got {x.dtype}"
        return None

    def auto_ok(self, x: Tensor) -> bool:
        """CUDA tensors whenever the CUDA kernels are built; CPU tensors too (CPU_AUTO), because the C++ CPU kernels
        beat the reference ops op by op (the rows cited above CPU_AUTO)."""
        return self.why_not(x) is None and (x.device.type == "cuda" or CPU_AUTO)

    def batch_stats(self, x):
        mean, var = torch.ops.fastresnet_ext.batch_stats(x)
        return mean, var

    def bn_relu(self, x, scale, shift, out_dtype):
        return torch.ops.fastresnet_ext.bn_relu(x, scale, shift, out_dtype)

    def bn_relu_backward(self, dy, x, scale, shift, mean, rstd, training, dres=None):
        dx, sum_dz, sum_dz_xhat = torch.ops.fastresnet_ext.bn_relu_backward(
            dy, x, scale, shift, mean, rstd, training, dres)
        return dx, sum_dz, sum_dz_xhat

    def add_stats(self, a, b):
        y, mean, var = torch.ops.fastresnet_ext.add_stats(a, b)
        return y, mean, var

    def scale_shift(self, mean, rstd, bn_weight, bn_bias):
        scale, shift = torch.ops.fastresnet_ext.scale_shift(mean, rstd, bn_weight, bn_bias)
        return scale, shift

    def update_running_stats(self, running_means, running_vars, num_batches_tracked, counts, momentum, means, vars):
        """In one C++ call (csrc/unit.cpp's RunningUpdates, which the units' nodes use too)."""
        _C.update_running_stats(running_means, running_vars, num_batches_tracked, counts, momentum, means, vars)

    def unit_plan(self, weights, bn_weights, bn_biases, eps, strides, paddings, shortcut, shortcut_stride,
                  running_means, running_vars, num_batches_tracked, counts, momentum):
        """A `_C.UnitPlan`: one unit's arguments of `unit_ops.preact_unit` except x and its statistics, with its BNs'
        running buffers (and the N·H·W `counts` of their inputs; all empty: no update), held in C++."""
        return _C.UnitPlan(weights, bn_weights, bn_biases, eps, strides, paddings, shortcut, shortcut_stride,
                           running_means, running_vars, num_batches_tracked, counts, momentum)

    def units_train(self, x, mean, var, plans):
        """Planned units as C++ autograd nodes (csrc/unit.cpp): each forward, its running-buffer updates and a backward
        that runs without Python; one call for all of them. Returns [x_out, its mean, its var]."""
        return _C.preact_units_train(x, mean, var, plans)

    def layer_plan(self, weight, bn_weight, bn_bias, eps, stride, padding, running_mean, running_var,
                   num_batches_tracked, momentum):
        """A `_C.LayerPlan`: one fused layer's weights, configuration and running buffers, held in C++."""
        return _C.LayerPlan(weight, bn_weight, bn_bias, eps, stride, padding, running_mean, running_var,
                            num_batches_tracked, momentum)

    def layer_train(self, x, mean, var, plan, weight_dtype):
        """A planned layer in training as one C++ autograd node (csrc/unit.cpp), its running buffers updated."""
        return _C.preact_layer_train(x, mean, var, plan, weight_dtype)
