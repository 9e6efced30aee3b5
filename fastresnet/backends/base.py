"""The backend contract: the primitive ops every backend implements, and the conv-level ops built from them."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastresnet import reference


def layout(x: Tensor) -> torch.memory_format:
    """channels_last if x is stored NHWC (and not also NCHW-contiguous), else contiguous_format: the memory format
    every backend returns its outputs in."""
    nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


class BackendUnsupportedError(RuntimeError):
    """A backend named explicitly cannot run a call (device, dtype, missing build)."""


class Backend:
    """Primitive ops, with the semantics of the same-named functions in `fastresnet.reference`.

    Subclasses implement the four primitives (`batch_stats`, `bn_relu`, `bn_relu_backward`, `add_stats`). The
    conv-level ops default to "tier A": the primitives around cuDNN/ATen convolution; a backend that owns the conv
    (tier B) overrides them.
    """

    name = "base"

    def unavailable_reason(self) -> Optional[str]:
        """None if this backend can run on this machine at all, else why not (missing build, no GPU, ...)."""
        return None

    def why_not(self, x: Tensor) -> Optional[str]:
        """None if this backend supports an op on x, else the reason (used by "auto" and explicit requests)."""
        return self.unavailable_reason()

    def auto_ok(self, x: Tensor) -> bool:
        """Whether "auto" may pick this backend for x (stricter than why_not: e.g. never the Triton interpreter)."""
        return self.why_not(x) is None

    # -- primitives ------------------------------------------------------------------------------------------------
    def batch_stats(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def bn_relu(self, x: Tensor, scale: Tensor, shift: Tensor, out_dtype: torch.dtype) -> Tensor:
        raise NotImplementedError

    def bn_relu_backward(
        self, dy: Tensor, x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, rstd: Tensor, training: bool,
        dres: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def add_stats(self, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    # -- BN's affine map and running statistics (the reference's ATen composition unless a backend has its own) --
    def scale_shift(self, mean: Tensor, rstd: Tensor, bn_weight: Optional[Tensor],
                    bn_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """`reference.scale_shift`: BN folded into one affine map (scale = γ·rstd, shift = β − mean·scale), bitwise."""
        return reference.scale_shift(mean, rstd, bn_weight, bn_bias)

    # update_running_stats(running_means, running_vars, num_batches_tracked, counts, momentum, means, vars): the
    # backend's own `reference.update_running_stats_many` (bitwise) for BNs that all have num_batches_tracked and one
    # numeric momentum, or None (`fastresnet.ops.update_running_stats` then runs the reference).
    update_running_stats = None

    # bn_affine(mean, var, eps, bn_weight, bn_bias, running) -> an affine spec, or None: a backend whose forward kernels
    # form BN's affine map themselves from the batch statistics (mean, var) and make the running update (running:
    # (running_mean, running_var, num_batches_tracked, N·H·W, momentum) or None) returns a spec (the Triton backends:
    # `kernels.stats.BNAffine`, whose rstd, scale and shift the first kernel given it fills; `spec.updates_running`:
    # whether that kernel makes the running update, else the caller does); bn_relu, bn_relu_conv and
    # bn_relu_conv_stats then take it as `affine=` in place of (scale, shift), which are None. None (the attribute, or
    # the result for a BN it cannot take): the caller computes rstd, scale, shift and the running update itself.
    bn_affine = None

    # stats_in_bn_relu: whether bn_relu, given a spec made by `bn_affine(..., from_input=True)` (mean and var empty),
    # computes x's batch statistics into the spec's mean and var in the same launch as the activation (tier A with a
    # grid barrier: `kernels.bn_relu.stats_bn_relu_forward`); a unit's composition then leaves out the statistics pass
    # of a conv output that only its next BN reads.
    stats_in_bn_relu = False

    # -- whole units ------------------------------------------------------------------------------------------------
    # unit_plan / units_train: a full pre-activation unit's training call as one autograd node of the backend's own,
    # bitwise the composition of this class's ops in `fastresnet.ops.unit_ops`, or None (that composition runs) —
    # unit_plan takes a unit's arguments except x and its statistics (see ExtBackend.unit_plan) and returns an opaque
    # plan; units_train(x, mean, var, plans) runs planned units one after another and returns (x_out, its mean, its
    # var).
    unit_plan = None
    units_train = None

    # -- single fused layers in training ------------------------------------------------------------------------------
    # layer_plan(weight, bn_weight, bn_bias, eps, stride, padding, running_mean, running_var, num_batches_tracked,
    # momentum) -> an opaque plan of one BN → ReLU (→ conv, weight None: no conv) layer with affine BN and numeric
    # momentum; layer_train(x, mean, var, plan, weight_dtype) -> its output in training, one autograd node of the
    # backend's own, bitwise the layer's ops (mean/var: x's batch statistics, or None to compute them; weight_dtype:
    # the conv's autocast dtype, or None). None: the ops run.
    layer_plan = None
    layer_train = None

    # -- conv level (tier A by default) ----------------------------------------------------------------------------
    def bn_relu_conv(self, x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], weight: Tensor, stride,
                     padding, affine=None) -> Tensor:
        """y = conv2d(relu(x·scale + shift), weight); the activation is a temporary, never saved. affine: a
        `bn_affine` spec in place of (scale, shift)."""
        a = (self.bn_relu(x, scale, shift, weight.dtype) if affine is None else
             self.bn_relu(x, scale, shift, weight.dtype, affine=affine))
        return torch.nn.functional.conv2d(a, weight, None, stride, padding)

    def bn_relu_conv_stats(
        self, x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], weight: Tensor, stride, padding,
        residual: Optional[Tensor] = None, affine=None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """(y, mean, var): y = bn_relu_conv(...) (+ residual) and y's batch statistics for the next BN.

        Tier A: the conv, then the fused add + statistics kernel (a statistics pass when there is no residual), so
        y is read once more; a tier-B backend computes them in the conv epilogue instead. Without a residual y is in
        the conv's dtype (weight.dtype); with one, the sum is in the promoted dtype (as `add_stats`).
        """
        y = self.bn_relu_conv(x, scale, shift, weight, stride, padding, affine)
        if residual is None:
            return (y,) + tuple(self.batch_stats(y))
        return self.add_stats(y, residual)

    def bn_relu_conv_backward(
        self, dy: Tensor, x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor,
        stride, padding, training: bool, need_weight_grad: bool = True, dres: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
        """Returns (dx, dweight, Σdz, Σdz·x̂): the activation is recomputed from x for wgrad, the ReLU mask from x.
        dres (x's shape): a shortcut gradient added to dx inside the BN backward, before dx is rounded.

        bf16 on CPU runs the conv backward in fp32 (results rounded back to bf16): ATen's CPU bf16 weight gradient
        leaves the taps that only ever meet padding uninitialised for some channels_last shapes (PyTorch 2.13, e.g.
        a 3×3 stride-2 conv on inputs of width 1 returns values up to 1e38 there), and CPU bf16 is no speed target.
        """
        a = self.bn_relu(x, scale, shift, weight.dtype)
        w = weight
        if dy.device.type == "cpu" and weight.dtype == torch.bfloat16:
            dy, a, w = dy.float(), a.float(), weight.float()
        da, dweight, _ = torch.ops.aten.convolution_backward(
            dy, a, w, None, list(stride), list(padding), [1, 1], False, [0, 0], 1,
            [True, need_weight_grad, False],
        )
        del a
        if dweight is not None:
            dweight = reference.cast(dweight, weight.dtype)
        dx, sum_dz, sum_dz_xhat = self.bn_relu_backward(da, x, scale, shift, mean, rstd, training, dres)
        return dx, dweight, sum_dz, sum_dz_xhat


class UnavailableBackend(Backend):
    """Stands in for a backend whose module could not be imported; every call is refused with the reason."""

    def __init__(self, name: str, reason: str):
        self.name, self._reason = name, reason

    def unavailable_reason(self) -> Optional[str]:
        return self._reason
