"""`BNReLU2d` and `PreActConv2d`: drop-in fused replacements for BatchNorm2d → ReLU (→ Conv2d).

State-dict mapping (both directions, no conversion needed):

| fused                      | unfused equivalent                                                    |
|----------------------------|-----------------------------------------------------------------------|
| `BNReLU2d` (a BatchNorm2d) | `BatchNorm2d`: weight, bias, running_mean, running_var, num_batches_tracked |
| `PreActConv2d.bn.*`        | `nn.Sequential(OrderedDict(bn=BatchNorm2d, relu=ReLU, conv=Conv2d))` `bn.*` |
| `PreActConv2d.conv.weight` | the same Sequential's `conv.weight`                                   |

So `PreActConv2d(...).load_state_dict(seq.state_dict())` works for such a Sequential, and vice versa.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from fastresnet import functional as FF, recompute
from fastresnet.backends import get_backend, get_backend_impl, resolve
from fastresnet.nn.cache import PlanCache, cached
from fastresnet.ops.bn_ops import stat_dtype, traced
from fastresnet.sync_functional import sync_bn_relu, sync_bn_relu_conv2d


def _train_natively(layer: nn.Module, x: Tensor, stats: Optional[Tuple[Tensor, Tensor]], bn: nn.BatchNorm2d,
                    conv: Optional[nn.Conv2d]) -> Optional[Tensor]:
    """The training forward of `layer` (bn → ReLU, → conv if given) as one call into its backend's own node
    (`Backend.layer_train`: for the "ext" backend a C++ autograd node, bitwise the ops' results), or None where
    the ops must run: torch.compile or a dispatch mode, a functorch transform, a recomputed segment, a BN that is not
    affine or averages cumulatively (momentum None), a weight that is not a registered parameter, statistics in
    another dtype than the layer's, a backend without it. Under autocast the conv weight is cast to the autocast
    dtype per call, as the ops cast it. The input checks and the plan are cached per input shape, dtype, device and default backend
    (`nn.cache.cached`), so a repeated call checks nothing again."""
    if traced() or torch._C._are_functorch_transforms_active() or recompute.in_segment() or not isinstance(x, Tensor):
        return None
    weight_dtype = None if conv is None else FF.autocast_dtype(x)  # under autocast the conv runs in its dtype
    native = cached(layer, (x.shape, x.dtype, x.device, get_backend()), lambda: _layer_plan(layer, x, bn, conv))
    if native is None:
        return None
    train, plan = native
    if stats is None:
        return train(x, None, None, plan, weight_dtype)
    FF.check_stats(x, stats, bn.num_features)
    acc = stat_dtype(x)  # what the ops would cast the statistics to
    if stats[0].dtype != acc or stats[1].dtype != acc:
        return None
    return train(x, stats[0], stats[1], plan, weight_dtype)


def _registered(module: nn.Module, *names: str) -> bool:
    """Whether each attribute is the module's registered parameter or buffer (or None): what the plan's cache watches.
    A tensor kept as a plain attribute (a hook-based weight_norm recomputes one before every call) is not."""
    tables = (module._parameters, module._buffers)
    return all(getattr(module, n) is None or any(t.get(n) is getattr(module, n) for t in tables) for n in names)


def _layer_plan(layer: nn.Module, x: Tensor, bn: nn.BatchNorm2d, conv: Optional[nn.Conv2d]):
    """(the modules the plan reads, (layer_train, plan) or None): the input checked as the ops check it."""
    modules: List[nn.Module] = [layer] if conv is None else [layer, bn, conv]
    impl = get_backend_impl(resolve(x, layer.backend))
    running = bn.running_mean is not None
    if (impl.layer_plan is None or bn.weight is None or bn.bias is None
            or (running and (bn.momentum is None or bn.num_batches_tracked is None))
            or not _registered(bn, "weight", "bias", "running_mean", "running_var", "num_batches_tracked")
            or not (conv is None or _registered(conv, "weight"))):
        return modules, None
    params = [("bn_weight", bn.weight), ("bn_bias", bn.bias), ("running_mean", bn.running_mean),
              ("running_var", bn.running_var)]
    if conv is None:
        FF.check_bn_input(x, bn.num_features, True, params)
        stride = padding = (1, 1)
    else:
        stride, padding = FF.check_conv_input(x, conv.weight, True, conv.stride, conv.padding, params)
    plan = impl.layer_plan(None if conv is None else conv.weight, bn.weight, bn.bias, bn.eps, list(stride),
                           list(padding), bn.running_mean, bn.running_var, bn.num_batches_tracked,
                           float(bn.momentum) if running else 0.0)
    return modules, (impl.layer_train, plan)


def refuse_scripting(module: nn.Module):
    """`__prepare_scriptable__` of fastresnet's modules: `torch.jit.script` cannot compile them (their forwards pick
    kernels, plans and backends in Python), so it stops here, naming the ways that work instead."""
    raise RuntimeError(
        f"torch.jit.script cannot compile {type(module).__name__}: fastresnet's modules choose their kernels in Python "
        "(backends, custom ops, cached plans). Instead use torch.export.export(model.eval(), (x,)) or "
        "torch.jit.trace(model.eval(), x) (both keep the fused ops), torch.onnx.export(model.eval(), (x,)) for ONNX, "
        "or, for a model made by fastresnet.convert, torch.jit.script(fastresnet.unconvert(model)) (its plain-PyTorch "
        "twin); see docs/deploy.md")


class BNReLU2d(PlanCache, nn.BatchNorm2d):
    """relu(BatchNorm2d(x)) in one fused op that saves x, not its output, for backward.

    A subclass of `nn.BatchNorm2d` (same arguments, parameters and buffers), so BatchNorm2d checkpoints load as they
    are. `backend`: None follows `fastresnet.set_backend` / `FASTRESNET_BACKEND`.
    """

    __prepare_scriptable__ = refuse_scripting

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.backend = backend
        self.process_group = None  # set by fastresnet.distributed.convert_sync_batchnorm: synchronised BN

    def forward(self, x: Tensor, stats: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        if self.process_group is not None and self.training:
            return sync_bn_relu(x, self.running_mean, self.running_var, self.weight, self.bias,
                                self.num_batches_tracked, self.momentum, self.eps, self.process_group, stats,
                                self.backend)
        if self.training:
            y = _train_natively(self, x, stats, self, None)
            if y is not None:
                return y
        return FF.bn_relu(x, self.running_mean, self.running_var, self.weight, self.bias, self.num_batches_tracked,
                          self.training, self.momentum, self.eps, stats, self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.backend is None else f", backend={self.backend!r}")


class PreActConv2d(PlanCache):
    """BN → ReLU → conv as one fused op (`functional.bn_relu_conv2d`): stores only the BN input for backward.

    Holds a real `nn.BatchNorm2d` (`bn`) and `nn.Conv2d` (`conv`, bias-free, groups 1, dilation 1) as parameter
    containers, so its state dict has the keys of `Sequential(bn=BatchNorm2d, relu=ReLU, conv=Conv2d)`. The BN
    normalises as `bn.training` says (batch statistics, or its running statistics in eval mode), so freezing every
    `nn.BatchNorm2d` of a model (`m.eval()`) freezes the BN inside this layer too.
    """

    __prepare_scriptable__ = refuse_scripting

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False, device=device,
                              dtype=dtype)
        if self.conv.padding_mode != "zeros" or isinstance(self.conv.padding, str):
            raise ValueError(f"padding: expected explicit zero padding (int or pair), got {padding!r}")
        self.backend = backend
        self.process_group = None  # set by fastresnet.distributed.convert_sync_batchnorm: synchronised BN

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: Tensor, stats: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        bn = self.bn
        if self.process_group is not None and bn.training:
            return sync_bn_relu_conv2d(x, self.conv.weight, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                       bn.num_batches_tracked, bn.momentum, bn.eps, self.conv.stride,
                                       self.conv.padding, self.process_group, stats, self.backend)
        if bn.training:
            y = _train_natively(self, x, stats, bn, self.conv)
            if y is not None:
                return y
        return FF.bn_relu_conv2d(x, self.conv.weight, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                 bn.num_batches_tracked, bn.training, bn.momentum, bn.eps,
                                 self.conv.stride, self.conv.padding, stats, self.backend)

    def forward_stats(self, x: Tensor, stats: Optional[Tuple[Tensor, Tensor]] = None,
                      residual: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """(y, mean, var): the forward (+ residual, added before the single rounding of y) that also returns y's
        per-channel batch statistics (fp32, biased), for the next BN's `stats=` (docs/architecture.md §3 chaining).
        With a process group (synchronised BN) the layer runs its synchronised forward and the statistics come
        from the add + statistics op: local statistics, which the next synchronised BN combines across ranks."""
        bn = self.bn
        if self.process_group is not None and bn.training:
            y = self.forward(x, stats)
            return FF.add_stats(y, residual, self.backend) if residual is not None else \
                (y,) + FF.batch_stats(y, self.backend)
        return FF.bn_relu_conv2d(x, self.conv.weight, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                 bn.num_batches_tracked, bn.training, bn.momentum, bn.eps, self.conv.stride,
                                 self.conv.padding, stats, self.backend, residual=residual, return_stats=True)

    def extra_repr(self) -> str:
        c = self.conv
        s = f"{c.in_channels}, {c.out_channels}, kernel_size={c.kernel_size}, stride={c.stride}, padding={c.padding}"
        return s + ("" if self.backend is None else f", backend={self.backend!r}")
