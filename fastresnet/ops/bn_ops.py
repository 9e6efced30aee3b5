"""The fused BN ops as custom ops (`FusedOp`: eager calls skip the custom op's own dispatch). Saved for backward:
the BN input x, mean, rstd (fp32, [C]), γ, β and the conv weight — never the BN or ReLU output, which the backward
recomputes from x.

`training` is an argument of the forward ops only so that setup_context can hand it to the backward: in training
(batch statistics) the BN backward includes the dependence of mean and rstd on x; in eval it does not.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch._functorch.utils import unwrap_dead_wrappers
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fastresnet import reference
from fastresnet.backends import get_backend_impl
from fastresnet.backends.base import layout


def traced() -> bool:
    """Whether the registered ops must run rather than their bodies: under torch.compile, while a
    TorchDispatchMode (FlopCounterMode, a fake-tensor mode, a debug mode, torch.export) watches the dispatcher, while
    compiled autograd is on (it traces a backward through nodes it knows: the registered ops', not the C++ nodes of
    `Backend.units_train` / `layer_train`), or while torch.jit.trace records (a graph of the registered ops, not of
    a backend's kernels)."""
    return (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None or _compiled_autograd()
            or _jit_tracing())


_jit_tracing = torch._C._is_tracing  # what torch.jit.is_tracing reads, without its Python wrapper


def _compiled_autograd() -> bool:
    module = sys.modules.get("torch._dynamo.compiled_autograd")  # not imported: compiled autograd was never enabled
    return module is not None and bool(module.compiled_autograd_enabled)


def _onnx_exporting() -> bool:
    """Whether torch.onnx.export is tracing the call (Dynamo's tracing, torch.compile or a strict torch.export, reads
    this as False)."""
    if torch.compiler.is_dynamo_compiling():
        return False
    module = sys.modules.get("torch.onnx")  # not imported: no export runs (and a call here does not import it)
    return module is not None and module.is_in_onnx_export()


def _profiler_range(qualname: str):
    """A profiler range named like an op while a profiler runs (an eager call that skips the op's own dispatch would
    not show in a trace otherwise), else nothing."""
    return torch.profiler.record_function(qualname) if torch.autograd._profiler_enabled() else contextlib.nullcontext()


class FusedOp:
    """A fused op: the `torch.library` custom op "fastresnet::<name>" (what torch.compile and dispatch modes see, with
    its fake implementation and, if given, its backward formula) and a direct path for eager calls, which runs the
    body — and the backward formula, inside one plain `autograd.Function` — without the custom op's own layers
    (dispatch to a Python kernel, argument defaults, its autograd wrapper): at small sizes those cost more host time
    than the op's kernels. Both paths run the same code on the same values. Statistics outputs (all outputs after
    the first) are not differentiable: their consumer's backward accounts for them."""

    def __init__(self, name: str, body: Callable, fake: Callable, setup: Optional[Callable] = None,
                 backward: Optional[Callable] = None):
        self.op = torch.library.custom_op(f"fastresnet::{name}", body, mutates_args=())
        self.op.register_fake(fake)
        if backward is not None:
            self.op.register_autograd(backward, setup_context=setup)
        self.qualname, self.body, self.setup, self.backward = f"fastresnet::{name}", body, setup, backward
        _FUSED_OPS[getattr(torch.ops.fastresnet, name).default] = self

    def __call__(self, *args):
        if traced():
            return self.traced_call(*args)
        with _profiler_range(self.qualname):
            if self.backward is None:
                return self.body(*args)
            if torch._C._are_functorch_transforms_active():  # torch.func.grad, vmap, ...: functorch's own path
                return _EagerOp.apply(self, *args)
            return _apply_autograd(self, *unwrap_dead_wrappers(args))

    def traced_call(self, *args):
        """The call under a tracer (torch.export, torch.compile, a dispatch mode, torch.jit.trace): the registered op,
        so the graph records "fastresnet::<name>" and never a backend's own kernels; during `torch.onnx.export`
        (either exporter) the op's `decomposition`, which the exporter writes as standard ONNX operators."""
        if _onnx_exporting():
            return self.decomposition(*args)
        return self.op(*args)

    def decomposition(self, *args):
        """The op in standard ATen operators: its body on the "torch" backend (the `fastresnet.reference`
        composition), the function every backend computes, up to rounding."""
        return self.body(*args[:-1], "torch")


_FUSED_OPS: Dict[torch._ops.OpOverload, FusedOp] = {}  # every FusedOp, by its registered op


def decompositions() -> Dict[torch._ops.OpOverload, Callable]:
    """{fastresnet:: op: its `FusedOp.decomposition`}: added to `torch.export.default_decompositions()`, the table
    for `ExportedProgram.run_decompositions` that leaves a program of ATen operators only."""
    return {op: fused.decomposition for op, fused in _FUSED_OPS.items()}


class _EagerOp(torch.autograd.Function):
    """`FusedOp`'s eager path: its body forward, its setup_context and backward formula as they are registered."""

    @staticmethod
    def forward(op: FusedOp, *args):
        return op.body(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        op, args = inputs[0], inputs[1:]
        op.setup(ctx, args, output)
        ctx.formula = op.backward
        if isinstance(output, tuple):
            ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx, *grads):
        return (None,) + tuple(ctx.formula(ctx, *grads))


# autograd.Function.apply without its per-call `inspect.signature` binding of the forward's arguments (the
# forward takes no defaults to bind): what Function.apply runs once the binding is done and no functorch transform
# is active.
_apply_autograd = super(torch.autograd.Function, _EagerOp).apply


def stat_dtype(x: Tensor) -> torch.dtype:
    """The dtype of BN statistics of x: float64 for float64 x, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _stats_fake(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[1], dtype=stat_dtype(x))


def _empty_as(x: Tensor, shape, dtype) -> Tensor:
    """An empty tensor in x's memory format (channels_last or contiguous, what every backend returns)."""
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=layout(x))


def conv_out_shape(x_shape, weight_shape, stride: List[int], padding: List[int]) -> List[int]:
    """[N, C_out, H_out, W_out] of a dilation-1, groups-1 conv."""
    n, _, h, w = x_shape
    kh, kw = weight_shape[2:]
    return [n, weight_shape[0], (h + 2 * padding[0] - kh) // stride[0] + 1, (w + 2 * padding[1] - kw) // stride[1] + 1]


def affine_grads(bn_weight, bn_bias, dgamma, dbeta):
    """(dγ, dβ) in the parameters' dtypes, None for an absent (affine=False) parameter."""
    return (None if bn_weight is None else reference.cast(dgamma, bn_weight.dtype),
            None if bn_bias is None else reference.cast(dbeta, bn_bias.dtype))


# ---- batch statistics ----------------------------------------------------------------------------------------------
def _batch_stats_body(x: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    return get_backend_impl(backend).batch_stats(x)


_batch_stats = FusedOp("batch_stats", _batch_stats_body, lambda x, backend: (_stats_fake(x), _stats_fake(x)))


def batch_stats(x: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """Per-channel (mean, biased var) of x, fp32. Not differentiable: the consuming BN's backward accounts for it."""
    return _batch_stats(x.detach(), backend)


def update_running_stats(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor],
                         mean: Tensor, var: Tensor, count: int, momentum: Optional[float], backend: str) -> None:
    """`reference.update_running_stats` (BatchNorm's running update, in place), bitwise; in eager mode by the
    backend's own `update_running_stats` when it has one and the BN has num_batches_tracked and a numeric momentum."""
    update = get_backend_impl(backend).update_running_stats
    if (update is None or momentum is None or num_batches_tracked is None or traced()
            or torch._C._are_functorch_transforms_active()):
        reference.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)
    else:
        update([running_mean], [running_var], [num_batches_tracked], [count], momentum, [mean], [var])


# ---- residual add with output statistics --------------------------------------------------------------------------
def _add_stats_body(a: Tensor, b: Tensor, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return get_backend_impl(backend).add_stats(a, b)


def _add_stats_fake(a, b, backend):
    y = _empty_as(a, a.shape, torch.promote_types(a.dtype, b.dtype))
    return y, _stats_fake(y), _stats_fake(y)


def _add_stats_setup(ctx, inputs, output):
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)


def _add_stats_bwd(ctx, dy, dmean, dvar):
    # y = a + b. mean/var feed the next BN, whose backward already includes their dependence on y.
    return dy.to(ctx.dtypes[0]), dy.to(ctx.dtypes[1]), None


_add_stats = FusedOp("add_stats", _add_stats_body, _add_stats_fake, _add_stats_setup, _add_stats_bwd)


def add_stats(a: Tensor, b: Tensor, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(a + b, mean, var): the residual add that also emits its output's batch statistics (fp32); the sum has
    the promoted dtype of a and b."""
    return _add_stats(a, b, backend)


# ---- BN + ReLU ----------------------------------------------------------------------------------------------------
def _bn_relu_body(
    x: Tensor, mean: Tensor, rstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    training: bool, backend: str,
) -> Tensor:
    impl = get_backend_impl(backend)
    scale, shift = impl.scale_shift(mean, rstd, bn_weight, bn_bias)
    return impl.bn_relu(x, scale, shift, x.dtype)


def _bn_relu_backward_body(
    dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    training: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    impl = get_backend_impl(backend)
    scale, shift = impl.scale_shift(mean, rstd, bn_weight, bn_bias)
    dx, sum_dz, sum_dz_xhat = impl.bn_relu_backward(dy, x, scale, shift, mean, rstd, training)
    return dx, sum_dz_xhat, sum_dz


_bn_relu_backward = FusedOp(
    "bn_relu_backward", _bn_relu_backward_body,
    lambda dy, x, mean, rstd, bn_weight, bn_bias, training, backend: (
        _empty_as(x, x.shape, x.dtype), _stats_fake(x), _stats_fake(x)))


def _bn_relu_setup(ctx, inputs, output):
    x, mean, rstd, bn_weight, bn_bias, training, backend = inputs
    ctx.save_for_backward(x, mean, rstd, bn_weight, bn_bias)
    ctx.training, ctx.backend = training, backend


def _bn_relu_bwd(ctx, dy):
    x, mean, rstd, bn_weight, bn_bias = ctx.saved_tensors
    dx, dgamma, dbeta = _bn_relu_backward(dy, x, mean, rstd, bn_weight, bn_bias, ctx.training, ctx.backend)
    return (dx, None, None) + affine_grads(bn_weight, bn_bias, dgamma, dbeta) + (None, None)


_bn_relu = FusedOp("bn_relu", _bn_relu_body,
                   lambda x, mean, rstd, bn_weight, bn_bias, training, backend: _empty_as(x, x.shape, x.dtype),
                   _bn_relu_setup, _bn_relu_bwd)


def bn_relu(x, mean, rstd, bn_weight, bn_bias, training: bool, backend: str) -> Tensor:
    """a = relu((x − mean)·rstd·γ + β), with a hand-written backward that saves x, not a."""
    return _bn_relu(x, mean, rstd, bn_weight, bn_bias, training, backend)


# ---- BN + ReLU + conv ---------------------------------------------------------------------------------------------
def _bn_relu_conv_body(
    x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    stride: List[int], padding: List[int], training: bool, backend: str,
) -> Tensor:
    impl = get_backend_impl(backend)
    scale, shift = impl.scale_shift(mean, rstd, bn_weight, bn_bias)
    return impl.bn_relu_conv(x, scale, shift, weight, stride, padding)


def _bn_relu_conv_fake(x, weight, mean, rstd, bn_weight, bn_bias, stride, padding, training, backend):
    return _empty_as(x, conv_out_shape(x.shape, weight.shape, stride, padding), weight.dtype)


def _bn_relu_conv_backward_body(
    dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor], stride: List[int], padding: List[int], training: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = get_backend_impl(backend)
    scale, shift = impl.scale_shift(mean, rstd, bn_weight, bn_bias)
    dx, dweight, sum_dz, sum_dz_xhat = impl.bn_relu_conv_backward(
        dy, x, scale, shift, mean, rstd, weight, stride, padding, training)
    return dx, dweight, sum_dz_xhat, sum_dz


_bn_relu_conv_backward = FusedOp(
    "bn_relu_conv_backward", _bn_relu_conv_backward_body,
    lambda dy, x, weight, mean, rstd, bn_weight, bn_bias, stride, padding, training, backend: (
        _empty_as(x, x.shape, x.dtype), torch.empty_like(weight), _stats_fake(x), _stats_fake(x)))


def _bn_relu_conv_setup(ctx, inputs, output):
    x, weight, mean, rstd, bn_weight, bn_bias, stride, padding, training, backend = inputs
    ctx.save_for_backward(x, weight, mean, rstd, bn_weight, bn_bias)
    ctx.stride, ctx.padding, ctx.training, ctx.backend = stride, padding, training, backend


def _bn_relu_conv_bwd(ctx, dy):
    x, weight, mean, rstd, bn_weight, bn_bias = ctx.saved_tensors
    dx, dweight, dgamma, dbeta = _bn_relu_conv_backward(
        dy.contiguous(memory_format=layout(x)), x, weight, mean, rstd, bn_weight, bn_bias,
        ctx.stride, ctx.padding, ctx.training, ctx.backend)
    return (dx, dweight, None, None) + affine_grads(bn_weight, bn_bias, dgamma, dbeta) + (None,) * 4


_bn_relu_conv = FusedOp("bn_relu_conv", _bn_relu_conv_body, _bn_relu_conv_fake, _bn_relu_conv_setup,
                        _bn_relu_conv_bwd)


def bn_relu_conv(x, weight, mean, rstd, bn_weight, bn_bias, stride, padding, training: bool, backend: str) -> Tensor:
    """y = conv2d(relu(BN(x)), weight), with a hand-written backward that saves x, not the activation."""
    return _bn_relu_conv(x, weight, mean, rstd, bn_weight, bn_bias, list(stride), list(padding), training, backend)
