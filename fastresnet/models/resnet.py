"""CIFAR and ImageNet ResNets of [1] and [PA], every Table 1 / Table 2 / Table 3 variant (docs/paper.md §1–4).

Defaults follow the paper where docs/paper.md §8 lists an uncertainty, each overridable by keyword:
- `shortcut`: basic CIFAR nets use option "A" (zero-pad, [1]'s CIFAR choice, "same as [1]"); bottleneck and
  ImageNet nets use "B" (projection when the shape changes).
- `shortcut_bn`: BN after projections in post-activation nets ([1]'s ImageNet models, fb.resnet.torch), none in
  full pre-activation nets (the official resnet-1k-layers code: "no BN on the projection").
- `stride_on`: the bottleneck stride sits on the first 1×1 ("1x1", the MSRA/[1] convention of the official code);
  "3x3" gives fb.resnet.torch / timm.
- `preact_shortcut`: in full pre-activation nets the first unit after the stem and every projection shortcut take the
  pre-activated input (the paper's appendix); option-A shortcuts of later stages take the raw x_l by default (a pure
  identity path), or the pre-activated one with `preact_shortcut=True` (fb.resnet.torch's 'both_preact').
Init: He normal, fan-out (std = sqrt(2 / (k·k·C_out))), BN γ=1, β=0, FC bias 0 (docs/paper.md §5.3).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from fastresnet import recompute
from fastresnet.models.registry import register_model
from fastresnet.nn.layers import BNReLU2d, refuse_scripting
from fastresnet.nn.units import VARIANTS, ResidualUnit, UnitChain

# variant -> (stem ends with, head begins with), from the modification procedure of Fig. 5: the pre-activation
# moved into the first unit and an extra activation after the last addition.
_STEM_HEAD = {
    "original": ("bn_relu", None),
    "bn_after_add": ("bn_relu", None),
    "relu_before_add": ("bn_relu", None),
    "relu_only_preact": ("bn", "relu"),
    "full_preact": (None, "bn_relu"),
}


def _norm_act(kind: Optional[str], channels: int, backend: Optional[str]) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "bn_relu":
        return BNReLU2d(channels, backend=backend)
    return nn.BatchNorm2d(channels) if kind == "bn" else nn.ReLU()


class ResNet(nn.Module):
    """A residual network: stem → stages of `ResidualUnit`s → (head activation) → global average pool → FC.

    Args:
        form: "single" | "basic" | "bottleneck" units.
        units: units per stage; widths: unit output width per stage (bottleneck width = width / 4).
        stem: "cifar" (3×3 conv, 16 filters) or "imagenet" (7×7/2 conv, 64 filters, 3×3/2 max pool).
        stem_width: filters of the stem conv.
        variant: activation placement (`fastresnet.nn.VARIANTS`).
        checkpoint: what training keeps for backward (`set_checkpoint`): "none" (every fused layer's input),
            "unit" (each unit's input x_l only) or "segment" (every `segment_size`-th x_l only).
        segment_size: units per recomputed segment in "segment" mode; None: ⌈√(number of units)⌉.
        unit_kw: passed to every unit (shortcut, shortcut_bn, stride_on, merge and its parameters, backend).
    """

    __prepare_scriptable__ = refuse_scripting

    def __init__(self, form: str, units: Sequence[int], widths: Sequence[int], num_classes: int, *,
                 stem: str = "cifar", stem_width: int = 16, variant: str = "full_preact",
                 preact_shortcut: bool = False, backend: Optional[str] = None, checkpoint: str = "none",
                 segment_size: Optional[int] = None, **unit_kw):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {tuple(VARIANTS)}, got {variant!r}")
        stem_end, head_start = _STEM_HEAD[variant]
        if stem == "cifar":
            layers = [nn.Conv2d(3, stem_width, 3, 1, 1, bias=False), _norm_act(stem_end, stem_width, backend)]
        elif stem == "imagenet":
            layers = [nn.Conv2d(3, stem_width, 7, 2, 3, bias=False), _norm_act(stem_end, stem_width, backend),
                      nn.MaxPool2d(3, 2, 1)]
        else:
            raise ValueError(f"stem: expected 'cifar' or 'imagenet', got {stem!r}")
        self.stem = nn.Sequential(*layers)
        self.form, self.variant = form, variant
        stages: List[nn.Module] = []
        in_ch = stem_width
        for i, (n, width) in enumerate(zip(units, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                changes = stride != 1 or in_ch != width
                projects = unit_kw.get("shortcut", "B") in ("B", "conv") and changes
                share = variant == "full_preact" and ((i == 0 and j == 0) or projects
                                                       or (changes and preact_shortcut))
                blocks.append(ResidualUnit(in_ch, width, stride, form=form, variant=variant, share_preact=share,
                                           backend=backend, **unit_kw))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head_act = _norm_act(head_start, in_ch, backend)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_features = in_ch
        self.chained = variant == "full_preact" and all(
            u.chainable for u in self.modules() if isinstance(u, ResidualUnit))
        self.unit_chain = UnitChain()  # runs the units in a chained training forward (and keeps its host-work cache)
        self.set_checkpoint(checkpoint, segment_size)
        self.reset_parameters()

    @property
    def units(self) -> List[ResidualUnit]:
        """The residual units in forward order, across stages."""
        return [u for stage in self.stages for u in stage]

    def set_checkpoint(self, mode: str, segment_size: Optional[int] = None) -> None:
        """Choose what a training forward keeps for backward (`fastresnet.recompute`; memory: docs/memory.md).

        "none": every fused layer keeps its BN input. "unit": each unit keeps only its input x_l (and that input's
        batch statistics) and is recomputed in backward. "segment": runs of `segment_size` units (default
        ⌈√units⌉) keep only their first input and are recomputed together. Results (outputs, gradients, running
        statistics) are bitwise those of "none" where the kernels are deterministic; the price is one more forward
        of the recomputed units."""
        if mode not in recompute.MODES:
            raise ValueError(f"checkpoint: expected one of {recompute.MODES}, got {mode!r}")
        if segment_size is not None and (isinstance(segment_size, bool) or not isinstance(segment_size, int)
                                         or segment_size < 1):
            raise ValueError(f"segment_size: expected a positive int or None, got {segment_size!r}")
        if segment_size is not None and mode != "segment":
            raise ValueError(f"segment_size: only applies to checkpoint='segment', got checkpoint={mode!r}")
        self.checkpoint, self.segment_size = mode, segment_size

    def reset_parameters(self) -> None:
        """He normal (fan-out) convs, BN γ=1 β=0, FC bias 0 (FC weight keeps PyTorch's default); gate biases keep
        their b_g initial value."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """[N, 3, H, W] -> [N, num_features, H', W'] (after the head activation, before pooling).

        Training a full pre-activation net runs the units as one chain (`ResidualUnit.forward_chained`, through
        `nn.units.UnitChain`): each fused conv hands its output's batch statistics to the next BN, so none is computed
        by re-reading a tensor. With
        `checkpoint` "unit" or "segment" the units run in recomputed segments (`fastresnet.recompute`).
        """
        x = self.stem(x)
        if self.training and self.checkpoint != "none" and torch.is_grad_enabled():
            units = self.units
            size = recompute.segment_size(self.checkpoint, len(units), self.segment_size)
            x, stats = recompute.run_recomputed(units, x, size, self.chained)
            return self.head_act(x, stats) if self.chained else self.head_act(x)
        if not (self.training and self.chained):
            return self.head_act(self.stages(x))
        x, stats = self.unit_chain(self.units, x)
        return self.head_act(x, stats)

    def _apply(self, fn, recurse=True):
        self.unit_chain.clear()  # holds the units' tensors, as each unit's own cache (ResidualUnit._apply) does
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.unit_chain.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ---- CIFAR --------------------------------------------------------------------------------------------------------
def cifar_resnet(form: str, depth: int, num_classes: int = 10, variant: str = "full_preact", **kw) -> ResNet:
    """A CIFAR ResNet of any depth: 6n+2 ("basic"), 9n+2 ("bottleneck") or 3n+2 ("single"), with the zoo's
    defaults (module docstring); keyword arguments as `ResNet` / `ResidualUnit`."""
    per_layer = {"single": 3, "basic": 6, "bottleneck": 9}[form]
    if (depth - 2) % per_layer:
        raise ValueError(f"depth: a CIFAR {form} ResNet has depth {per_layer}n+2, got {depth}")
    n = (depth - 2) // per_layer
    widths = [64, 128, 256] if form == "bottleneck" else [16, 32, 64]
    if form == "bottleneck":
        kw.setdefault("shortcut", "B")
    else:
        kw.setdefault("shortcut", "A")
    kw.setdefault("shortcut_bn", variant != "full_preact")
    return ResNet(form, [n] * 3, widths, num_classes, stem="cifar", stem_width=16, variant=variant, **kw)


def _register_cifar(name: str, form: str, depth: int, variant: str, **fixed):
    def build(num_classes: int = 10, **kw) -> ResNet:
        return cifar_resnet(form, depth, num_classes, variant, **{**fixed, **kw})
    build.__name__ = name
    build.__doc__ = f"CIFAR {form} ResNet-{depth}, {variant} units" + (f", {fixed}" if fixed else "")
    register_model(name, 10)(build)


for _d in (20, 32, 44, 56, 110, 1202):
    _register_cifar(f"resnet{_d}", "basic", _d, "original")
    _register_cifar(f"preact_resnet{_d}", "basic", _d, "full_preact")
for _d in (164, 1001):
    _register_cifar(f"resnet{_d}", "bottleneck", _d, "original")
    _register_cifar(f"preact_resnet{_d}", "bottleneck", _d, "full_preact")
# 1-layer-skip ResNet-110 (Table 3): 108 single-conv units
_register_cifar("resnet110_1layer", "single", 110, "original")
_register_cifar("preact_resnet110_1layer", "single", 110, "full_preact")
# Table 2 / Fig. 4 (b)-(d); (a) is resnet110/164 and (e) preact_resnet110/164
for _d, _form in ((110, "basic"), (164, "bottleneck")):
    for _v in ("bn_after_add", "relu_before_add", "relu_only_preact"):
        _register_cifar(f"resnet{_d}_{_v}", _form, _d, _v)
# Table 1 on ResNet-110 with original units; gate_bias, shortcut_scale, residual_scale, dropout_p are keywords
_register_cifar("resnet110_scale_shortcut", "basic", 110, "original", merge="scale", shortcut_scale=0.5,
                residual_scale=1.0)
_register_cifar("resnet110_scale_both", "basic", 110, "original", merge="scale", shortcut_scale=0.5,
                residual_scale=0.5)
_register_cifar("resnet110_exclusive_gating", "basic", 110, "original", merge="exclusive_gate", gate_bias=-6.0)
_register_cifar("resnet110_shortcut_gating", "basic", 110, "original", merge="shortcut_gate", gate_bias=-6.0)
_register_cifar("resnet110_conv_shortcut", "basic", 110, "original", shortcut="conv")
_register_cifar("resnet110_dropout_shortcut", "basic", 110, "original", merge="dropout", dropout_p=0.5)


# ---- ImageNet -----------------------------------------------------------------------------------------------------
_IMAGENET = {
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
    152: ("bottleneck", [3, 8, 36, 3]),
    200: ("bottleneck", [3, 24, 36, 3]),
}


def _register_imagenet(name: str, depth: int, variant: str):
    form, units = _IMAGENET[depth]
    widths = [256, 512, 1024, 2048] if form == "bottleneck" else [64, 128, 256, 512]

    def build(num_classes: int = 1000, **kw) -> ResNet:
        kw.setdefault("shortcut", "B")
        kw.setdefault("shortcut_bn", variant != "full_preact")
        return ResNet(form, units, widths, num_classes, stem="imagenet", stem_width=64, variant=variant, **kw)
    build.__name__ = name
    build.__doc__ = f"ImageNet ResNet-{depth} ({form}), {variant} units"
    register_model(name, 1000)(build)


for _d in _IMAGENET:
    _register_imagenet(f"resnet{_d}", _d, "original")
    _register_imagenet(f"preact_resnet{_d}", _d, "full_preact")
