"""The "triton" backend (tier A, docs/architecture.md §3): the primitives run as Triton kernels (`fastresnet.kernels`);
the conv-level ops are the base class's tier A (the primitives around ATen/cuDNN convolution).

Runs on CUDA tensors, and on CPU tensors only under the Triton interpreter (`TRITON_INTERPRET=1`, for tests; it is
slow, so "auto" never picks it). dtypes: float16, bfloat16, float32, float64 (statistics in fp32, fp64 for fp64).
Layouts: dense NCHW and channels_last run in place; any other strided view is first copied to a dense tensor of
its own `fastresnet.backends.base.layout` (a `.contiguous()` copy, named `_dense` below), and outputs always come in
that layout — the layout the ops' fake implementations promise.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastresnet.backends.base import Backend, layout
from fastresnet.kernels import grid_barrier, interpreting

try:
    import triton  # noqa: F401  (capability flag only; the kernels import lazily)
    _TRITON_ERROR: Optional[str] = None
except ImportError as e:  # pragma: no cover - triton is a dependency on Linux
    _TRITON_ERROR = f"triton is not importable: {e}"


def dtype_names(dtypes) -> str:
    """The dtypes as named in support messages: (torch.float16, torch.bfloat16) -> 'float16, bfloat16'."""
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _dense(t: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """t in the dense memory format of `like` (no copy when it already is; a `.contiguous()` copy otherwise)."""
    return None if t is None else t.contiguous(memory_format=layout(like))


class TritonBackend(Backend):
    """Fused Triton kernels for batch statistics, BN-ReLU forward/backward and the residual add with statistics."""

    name = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # of x, for `why_not`

    def unavailable_reason(self) -> Optional[str]:
        if _TRITON_ERROR is not None:
            return _TRITON_ERROR
        if not (torch.cuda.is_available() or interpreting()):
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU in the Triton interpreter)"
        return None

    def why_not(self, x: Tensor) -> Optional[str]:
        reason = self.unavailable_reason()
        if reason is not None:
            return reason
        if x.dtype not in self.dtypes:
            return f"dtype {x.dtype} is not supported ({dtype_names(self.dtypes)})"
        if x.device.type == "cpu" and not interpreting():
            return "CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1)"
        if x.device.type not in ("cpu", "cuda"):
            return f"device {x.device} is not supported (cuda, or cpu under TRITON_INTERPRET=1)"
        return None

    def auto_ok(self, x: Tensor) -> bool:
        # "auto" never picks the interpreter: CUDA tensors with compiled kernels only
        return x.is_cuda and not interpreting() and self.why_not(x) is None

    # -- primitives ----------------------------------------------------------------------------------------------
    def batch_stats(self, x):
        from fastresnet.kernels.stats import batch_stats
        return batch_stats(_dense(x, x))

    def bn_relu(self, x, scale, shift, out_dtype, affine=None):
        from fastresnet.kernels.bn_relu import bn_relu_forward
        return bn_relu_forward(_dense(x, x), scale, shift, out_dtype, affine)

    def bn_relu_backward(self, dy, x, scale, shift, mean, rstd, training, dres=None):
        from fastresnet.kernels.bn_relu import bn_relu_backward
        return bn_relu_backward(_dense(dy, x), _dense(x, x), scale, shift, mean, rstd, training, _dense(dres, x))

    def add_stats(self, a, b):
        from fastresnet.kernels.add_stats import add_stats
        return add_stats(_dense(a, a), _dense(b, a))

    def scale_shift(self, mean, rstd, bn_weight, bn_bias):
        """BN's affine map in one Triton launch (`kernels.bn_relu.scale_shift`), bitwise the reference's 3–4 ATen
        ops."""
        from fastresnet.kernels.bn_relu import scale_shift
        return scale_shift(mean, rstd, bn_weight, bn_bias)

    def bn_affine(self, mean, var, eps, bn_weight, bn_bias, running=None, from_input=False):
        """`kernels.stats.bn_affine`: BN's rstd, affine map and running update made by the kernel that consumes the
        statistics (its prologue and one program's `finalize_bn`), no launch of their own."""
        from fastresnet.kernels.stats import bn_affine
        return bn_affine(mean, var, eps, bn_weight, bn_bias, running, from_input)

    @property
    def stats_in_bn_relu(self) -> bool:
        """The statistics pass and the BN-ReLU forward in one launch with a grid barrier, unless
        FASTRESNET_GRID_BARRIER=0 (`fastresnet.kernels.grid_barrier`)."""
        return grid_barrier()
