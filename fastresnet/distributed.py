"""Synchronised batch norm for a whole model (what the trainer's `--sync-bn` applies).

`convert_sync_batchnorm(model, group)` makes every BN of a model normalise with the statistics of the *global* batch
(all ranks of `group`), in forward and backward, as one process running the whole batch would. The fused layers
(`BNReLU2d`, `PreActConv2d`) keep their fused kernels and switch to the synchronised fused ops of
`fastresnet.sync_functional`; plain `nn.BatchNorm2d` modules (post-activation units, projection-shortcut BN) become
`SyncBatchNorm2d`, the same scheme without the ReLU and the conv. The statistics math (Chan's combination of the
ranks' statistics, the all-reduced gradient terms) is in `fastresnet.sync`.

`combine_batch_stats`, `sync_bn_relu` and `sync_bn_relu_conv2d` are importable from here as well.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import Tensor, nn

from fastresnet import functional as FF
from fastresnet.nn.layers import BNReLU2d, PreActConv2d
from fastresnet.sync import combine_batch_stats
from fastresnet.sync_functional import SyncBNFunction, sync_bn_relu, sync_bn_relu_conv2d

__all__ = ["SyncBatchNorm2d", "combine_batch_stats", "convert_sync_batchnorm", "sync_bn_relu", "sync_bn_relu_conv2d"]


class SyncBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose training-mode statistics (and their gradient terms) cover all ranks of
    `process_group`; runs on CPU (gloo) as well as GPU, unlike `torch.nn.SyncBatchNorm`. Same parameters, buffers
    and state-dict keys as BatchNorm2d; eval mode is plain BatchNorm2d."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, process_group) -> "SyncBatchNorm2d":
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  process_group=process_group, device=bn.running_mean.device if bn.running_mean is not None else None)
        new.load_state_dict(bn.state_dict())
        new.train(bn.training)
        return new.to(dtype=bn.weight.dtype if bn.weight is not None else None)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        FF.check_bn_input(x, self.num_features, True, [("bn_weight", self.weight), ("bn_bias", self.bias)])
        return SyncBNFunction.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                    self.num_batches_tracked, self.momentum, self.eps, "torch", self.process_group)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Synchronise every BN in `module` over `process_group` (None = the default group); returns the module.

    Fused `BNReLU2d` / `PreActConv2d` layers get `process_group` set (they keep their fused kernels); other
    `nn.BatchNorm2d` modules are replaced by `SyncBatchNorm2d`. (`torch.nn.SyncBatchNorm.convert_sync_batchnorm`
    would replace a `BNReLU2d` — a BatchNorm2d subclass — dropping its ReLU, and torch's SyncBatchNorm refuses CPU.)
    """
    group = process_group if process_group is not None else dist.group.WORLD
    if isinstance(module, (BNReLU2d, PreActConv2d)):
        module.process_group = group
        return module
    if type(module) is nn.BatchNorm2d:
        return SyncBatchNorm2d.from_batchnorm(module, group)
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module
