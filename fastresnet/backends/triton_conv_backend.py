"""Backend "triton_conv" (tier B, docs/architecture.md §3): BN-ReLU-conv forward and backward as Triton implicit-GEMM
kernels that own the conv (`fastresnet.kernels.conv`): the BN-ReLU activation is recomputed in the conv's prologue
(forward and wgrad) and never stored; dgrad's epilogue recomputes the ReLU mask and reduces Σdz, Σdz·x̂.

The primitives (`batch_stats`, `bn_relu`, `bn_relu_backward`, `add_stats`) are tier A's Triton kernels, inherited
from `TritonBackend`.

Conv geometry the own kernels run: square 1×1 or 3×3 kernels, equal strides 1 or 2, padding k//2, groups 1,
dilation 1; x fp32/fp16/bf16 (fp64 is refused: no fp64 `tl.dot`), weight fp32/fp16/bf16 (its dtype is the compute
dtype). Any memory layout works (strided addressing); channels_last is the fast one, NCHW is read in place (no
conversion copy) with uncoalesced channel loads.

Which conv runs (`select`, from `FASTRESNET_TRITON_CONV`, default "measure"):
- CPU tensors under the Triton interpreter (tests): always the own kernels; an unsupported geometry raises
  `BackendUnsupportedError` naming it.
- CUDA, "always": the own kernels; an unsupported geometry raises.
- CUDA, "measure": per layer shape, the faster of the own kernels and the tier-A path (cuDNN conv around the
  primitives), timed once (forward + backward) and cached by (shapes, strides, dtypes, layout, device) in
  `self.choices` ("own" or "tier_a"); unsupported geometries take the tier-A path (recorded as "tier_a"). During
  CUDA-graph capture an unmeasured shape runs the own kernels without timing.
"""
from __future__ import annotations

import os
import statistics
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from fastresnet.backends.base import Backend, BackendUnsupportedError
from fastresnet.backends.triton_backend import TritonBackend, dtype_names

_SELECT = ("measure", "always")


class TritonConvBackend(TritonBackend):
    """Tier B: own implicit-GEMM conv kernels with fused BN-ReLU prologue / reduction epilogues (module docstring).
    Availability, support checks and "auto" eligibility are tier A's (`TritonBackend`), minus fp64 x."""

    name = "triton_conv"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)  # no fp64 `tl.dot`
    stats_in_bn_relu = False  # the conv epilogue makes its output's statistics

    def __init__(self, select: Optional[str] = None):
        self.select = select or os.environ.get("FASTRESNET_TRITON_CONV", "measure")
        if self.select not in _SELECT:
            raise ValueError(f"FASTRESNET_TRITON_CONV / select: expected one of {_SELECT}, got {self.select!r}")
        self.choices: Dict[tuple, str] = {}

    # -- capability ------------------------------------------------------------------------------------------------
    @classmethod
    def conv_why_not(cls, weight: Tensor, stride, padding) -> Optional[str]:
        """None if the own kernels run this conv geometry, else the reason."""
        c_out, c_in, kh, kw = weight.shape
        if kh != kw or kh not in (1, 3):
            return f"kernel size {kh}×{kw} is not supported (1×1 or 3×3)"
        if stride[0] != stride[1] or stride[0] not in (1, 2):
            return f"stride {tuple(stride)} is not supported (1 or 2, equal in both dimensions)"
        if tuple(padding) != (kh // 2, kh // 2):
            return f"padding {tuple(padding)} is not supported (kernel_size // 2 = {kh // 2})"
        if weight.dtype not in cls.dtypes:
            return f"weight dtype {weight.dtype} is not supported ({dtype_names(cls.dtypes)})"
        return None

    # -- conv level ------------------------------------------------------------------------------------------------
    def _key(self, x: Tensor, weight: Tensor, stride, padding) -> tuple:
        return (tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last), tuple(weight.shape),
                weight.dtype, tuple(stride), tuple(padding), str(x.device))

    def uses_own_conv(self, x: Tensor, weight: Tensor, stride, padding) -> bool:
        """Whether this call runs the own kernels (True) or the tier-A path (False); see the module docstring."""
        reason = self.conv_why_not(weight, stride, padding)
        if not x.is_cuda or self.select == "always":
            if reason is not None:
                raise BackendUnsupportedError(f"backend 'triton_conv' cannot run this conv: {reason}")
            return True
        key = self._key(x, weight, stride, padding)
        if reason is not None:
            self.choices[key] = "tier_a"
        elif key not in self.choices:
            if torch.cuda.is_current_stream_capturing():
                return True
            self.choices[key] = self._measure(x, weight, stride, padding)
        return self.choices[key] == "own"

    def _measure(self, x: Tensor, weight: Tensor, stride, padding, reps: int = 5) -> str:
        """Time forward + backward of both conv paths on this shape (median of CUDA-event timings after warm-up)."""
        from fastresnet.kernels import conv as K
        c = x.shape[1]
        scale = torch.ones(c, device=x.device)
        shift = torch.zeros(c, device=x.device)
        mean, rstd = torch.zeros(c, device=x.device), torch.ones(c, device=x.device)
        s, p = int(stride[0]), int(padding[0])

        def own():
            y, _, _ = K.conv_forward(x, scale, shift, weight, s, p)
            K.conv_backward(y, x, scale, shift, mean, rstd, weight, s, p, True)

        def tier_a():
            y = Backend.bn_relu_conv(self, x, scale, shift, weight, stride, padding)
            Backend.bn_relu_conv_backward(self, y, x, scale, shift, mean, rstd, weight, stride, padding, True)

        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources
        try:
            own()  # first call compiles: a kernel this GPU cannot run (e.g. shared memory) leaves tier A in charge
        except (OutOfResources, CompilationError) as e:
            warnings.warn(f"triton_conv: own conv kernels cannot run {self._key(x, weight, stride, padding)} on "
                          f"this GPU ({type(e).__name__}: {e}); using the tier-A path for this shape")
            return "tier_a"
        times = {}
        for name, fn in (("own", own), ("tier_a", tier_a)):
            fn()
            fn()
            samples = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            times[name] = statistics.median(samples)
        return min(times, key=times.get)

    def bn_relu_conv(self, x, scale, shift, weight, stride, padding, affine=None):
        if not self.uses_own_conv(x, weight, stride, padding):
            return super().bn_relu_conv(x, scale, shift, weight, stride, padding, affine)
        from fastresnet.kernels.conv import conv_forward
        y, _, _ = conv_forward(x, scale, shift, weight, int(stride[0]), int(padding[0]), affine=affine)
        return y

    def bn_relu_conv_stats(
        self, x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, stride, padding,
        residual: Optional[Tensor] = None, affine=None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """(y, mean, var): `bn_relu_conv` plus the per-channel batch statistics (fp32, biased var) of the stored y,
        from the conv epilogue (own kernels) or the tier-A conv + add/statistics kernels."""
        if not self.uses_own_conv(x, weight, stride, padding):
            return super().bn_relu_conv_stats(x, scale, shift, weight, stride, padding, residual, affine)
        from fastresnet.kernels.conv import conv_forward
        return conv_forward(x, scale, shift, weight, int(stride[0]), int(padding[0]), residual, stats=True,
                            affine=affine)

    def bn_relu_conv_backward(self, dy, x, scale, shift, mean, rstd, weight, stride, padding, training,
                              need_weight_grad=True, dres: Optional[Tensor] = None):
        """(dx, dweight, Σdz, Σdz·x̂) as the base class; dres (x's shape, or None) is added to dx inside the BN
        backward's dx pass (a residual shortcut's gradient, no separate add)."""
        if not self.uses_own_conv(x, weight, stride, padding):
            return super().bn_relu_conv_backward(dy, x, scale, shift, mean, rstd, weight, stride, padding,
                                                 training, need_weight_grad, dres)
        from fastresnet.kernels.conv import conv_backward
        return conv_backward(dy, x, scale, shift, mean, rstd, weight, int(stride[0]), int(padding[0]), training,
                             need_weight_grad, dres=dres)
