"""Residual units of every form and activation placement in the paper (docs/paper.md §1–3).

A unit computes x_{l+1} = after( merge(h(x_l), F(x_l)) ). F is a chain of weight layers W1 … Wk (k = 1 for the
1-layer-skip unit, 2 for basic, 3 for bottleneck). Inside F, every layer after the first is preceded by BN → ReLU,
so those layers are fused `PreActConv2d`s in all five variants; the variants differ only in what comes before W1,
after Wk, and after the addition (Fig. 4):

| variant            | Fig. | before W1 | after Wk  | after the addition |
|--------------------|------|-----------|-----------|--------------------|
| `original`         | 4(a) | –         | BN        | ReLU               |
| `bn_after_add`     | 4(b) | –         | –         | BN → ReLU          |
| `relu_before_add`  | 4(c) | –         | BN → ReLU | –                  |
| `relu_only_preact` | 4(d) | ReLU      | BN        | –                  |
| `full_preact`      | 4(e) | BN → ReLU | –         | –                  |

`share_preact` (full pre-activation only): the unit's first BN → ReLU runs once, before the split, and feeds both
F and the shortcut — the paper's first unit after conv1 and its pre-activated projection shortcuts (§1.2–1.3).
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fastresnet import functional as FF, ops, recompute
from fastresnet.backends import get_backend, get_backend_impl
from fastresnet.nn.cache import PlanCache, cached as cached_value
from fastresnet.nn.layers import BNReLU2d, PreActConv2d
from fastresnet.nn.shortcuts import ExclusiveGate, Projection, ShortcutDropout, ZeroPadShortcut

# variant -> (before W1, after Wk, after the addition)
VARIANTS = {
    "original": (None, "bn", "relu"),
    "bn_after_add": (None, None, "bn_relu"),
    "relu_before_add": (None, "bn_relu", None),
    "relu_only_preact": ("relu", "bn", None),
    "full_preact": ("bn_relu", None, None),
}
FORMS = ("single", "basic", "bottleneck")
SHORTCUTS = ("identity", "A", "B", "conv")
MERGES = ("add", "scale", "exclusive_gate", "shortcut_gate", "dropout")


def _layer_specs(form: str, in_ch: int, out_ch: int, stride: int, stride_on: str) -> List[Tuple[int, int, int, int]]:
    """(in, out, kernel, stride) of W1 … Wk."""
    if form == "single":
        return [(in_ch, out_ch, 3, stride)]
    if form == "basic":
        return [(in_ch, out_ch, 3, stride), (out_ch, out_ch, 3, 1)]
    if form == "bottleneck":
        if out_ch % 4:
            raise ValueError(f"out_channels: a bottleneck unit needs a multiple of 4, got {out_ch}")
        b = out_ch // 4
        s1, s3 = (stride, 1) if stride_on == "1x1" else (1, stride)
        return [(in_ch, b, 1, s1), (b, b, 3, s3), (b, out_ch, 1, 1)]
    raise ValueError(f"form: expected one of {FORMS}, got {form!r}")


def _activation(kind: Optional[str], channels: int, backend: Optional[str]) -> Optional[nn.Module]:
    if kind is None:
        return None
    return {"relu": lambda: nn.ReLU(inplace=False), "bn": lambda: nn.BatchNorm2d(channels),
            "bn_relu": lambda: BNReLU2d(channels, backend=backend)}[kind]()


def _bn_conv(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> FF.BNConv:
    return FF.BNConv(conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                     bn.momentum, bn.eps, conv.stride, conv.padding)


class ResidualUnit(PlanCache):
    """One residual unit; see the module docstring for the variants.

    Args:
        form: "single" (one 3×3), "basic" (two 3×3) or "bottleneck" (1×1, 3×3, 1×1 with width out/4).
        variant: activation placement, a key of `VARIANTS`.
        shortcut: "identity" (needs in == out and stride 1), "A" (zero-pad), "B" (1×1 projection when the shape
            changes, identity otherwise) or "conv" (1×1 conv in every unit, Table 1).
        shortcut_bn: BN after projection/conv shortcuts.
        share_preact: full_preact only — pre-activate once before the split (see module docstring).
        stride_on: bottleneck stride on the first "1x1" (MSRA/[PA]) or on the "3x3" (fb.resnet.torch / timm).
        merge: "add" or a Table 1 variant: "scale" (shortcut_scale·h + residual_scale·F), "exclusive_gate",
            "shortcut_gate" (gate_bias = initial b_g), "dropout" (dropout_p on h).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *, form: str = "basic",
                 variant: str = "full_preact", shortcut: str = "B", shortcut_bn: bool = False,
                 share_preact: bool = False, stride_on: str = "1x1", merge: str = "add",
                 shortcut_scale: float = 0.5, residual_scale: float = 1.0, gate_bias: float = -6.0,
                 dropout_p: float = 0.5, backend: Optional[str] = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {tuple(VARIANTS)}, got {variant!r}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut: expected one of {SHORTCUTS}, got {shortcut!r}")
        if merge not in MERGES:
            raise ValueError(f"merge: expected one of {MERGES}, got {merge!r}")
        if stride_on not in ("1x1", "3x3"):
            raise ValueError(f"stride_on: expected '1x1' or '3x3', got {stride_on!r}")
        before, after_last, after_add = VARIANTS[variant]
        if share_preact and before != "bn_relu":
            raise ValueError("share_preact: only the full_preact variant has a pre-activation to share")
        self.form, self.variant, self.merge_kind, self.backend = form, variant, merge, backend
        specs = _layer_specs(form, in_channels, out_channels, stride, stride_on)

        # before W1
        self.preact = _activation(before, in_channels, backend) if (share_preact or before == "relu") else None
        self.share_preact = share_preact
        # W1 … Wk
        cin, cout, k, s = specs[0]
        fuse_first = before == "bn_relu" and not share_preact
        self.conv1 = (PreActConv2d(cin, cout, k, s, k // 2, backend=backend) if fuse_first
                      else nn.Conv2d(cin, cout, k, s, k // 2, bias=False))
        for i, (cin, cout, k, s) in enumerate(specs[1:], start=2):
            self.add_module(f"conv{i}", PreActConv2d(cin, cout, k, s, k // 2, backend=backend))
        self.num_layers = len(specs)
        self.post = _activation(after_last, out_channels, backend)
        # shortcut
        changes_shape = stride != 1 or in_channels != out_channels
        if shortcut == "conv" or (shortcut == "B" and changes_shape):
            self.shortcut = Projection(in_channels, out_channels, stride, shortcut_bn)
        elif shortcut == "A" and changes_shape:
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
        elif changes_shape:
            raise ValueError(f"shortcut: identity needs in == out and stride 1, got {in_channels} -> "
                             f"{out_channels}, stride {stride}; use 'A' or 'B'")
        else:
            self.shortcut = nn.Identity()
        # merge
        self.shortcut_scale, self.residual_scale = shortcut_scale, residual_scale
        self.gate = (ExclusiveGate(in_channels, out_channels, stride, gate_bias, merge == "exclusive_gate")
                     if merge.endswith("gate") else None)
        self.shortcut_dropout = ShortcutDropout(dropout_p) if merge == "dropout" else None
        self.after = _activation(after_add, out_channels, backend)
        # training forward as one op where the form allows (`one_op`); False: the per-layer modules, one op each
        self.fuse_unit = True

    def residual(self, x: Tensor) -> Tensor:
        """F(x) for the (already pre-activated, if shared) input x."""
        y = self.conv1(x)
        for i in range(2, self.num_layers + 1):
            y = getattr(self, f"conv{i}")(y)
        return y if self.post is None else self.post(y)

    def forward(self, x: Tensor) -> Tensor:
        unit = self.prepared() if self.training else None
        if unit is not None:
            return unit(x, backend=self.backend)[0]
        if self.preact is not None:
            a = self.preact(x)
            branch_in, shortcut_in = a, (a if self.share_preact else x)
        else:
            branch_in = shortcut_in = x
        f = self.residual(branch_in)
        h = self.shortcut(shortcut_in)
        if self.merge_kind == "add":
            out = h + f
        elif self.merge_kind == "scale":
            out = self.shortcut_scale * h + self.residual_scale * f
        elif self.gate is not None:
            out = self.gate(x, h, f)
        else:
            out = self.shortcut_dropout(h) + f
        return out if self.after is None else self.after(out)

    @property
    def chainable(self) -> bool:
        """Whether `forward_chained` applies: full pre-activation units with a plain addition."""
        return self.variant == "full_preact" and self.merge_kind == "add"

    def one_op(self) -> Optional[Tuple[List[FF.BNConv], str, Optional[Tensor], int]]:
        """(layers, shortcut kind, shortcut weight, shortcut stride) of `functional.preact_unit` when a training
        forward of this unit runs as one op, else None (the per-layer modules run). One op: full pre-activation with
        a plain addition, an identity, option-A or shared pre-activated projection (no BN after it) shortcut, no
        synchronised BN, every BN normalising with batch statistics (none frozen in eval mode), and `fuse_unit`
        on."""
        if not (self.fuse_unit and self.chainable):
            return None
        convs = [getattr(self, f"conv{i}") for i in range(2 if self.share_preact else 1, self.num_layers + 1)]
        fused = convs + ([self.preact] if self.share_preact else [])  # a converted-back unit holds eager modules
        if not all(isinstance(m, (PreActConv2d, BNReLU2d)) and m.process_group is None for m in fused):
            return None
        sc, weight, stride = self.shortcut, None, 1
        if self.share_preact:
            if isinstance(sc, Projection) and len(sc) == 1:
                kind, weight, stride = "shared_projection", sc[0].weight, sc[0].stride[0]
            elif isinstance(sc, nn.Identity):
                kind = "shared_identity"
            else:
                return None
            layers = [_bn_conv(self.preact, self.conv1)]
        elif isinstance(sc, (nn.Identity, ZeroPadShortcut)):
            kind, stride = ("identity", 1) if isinstance(sc, nn.Identity) else ("zero_pad", sc.stride)
            layers = []
        else:
            return None
        bns = [m if isinstance(m, BNReLU2d) else m.bn for m in fused]
        if not all(bn.training or bn.running_mean is None for bn in bns):  # a frozen BN uses its running statistics
            return None
        return layers + [_bn_conv(c.bn, c.conv) for c in convs], kind, weight, stride

    def prepared(self) -> Optional[FF.PreparedUnit]:
        """`one_op()` as a `functional.PreparedUnit` (its checks and argument lists reused across calls), or None.
        Cached (`nn.cache.cached`): rebuilt only when one of the objects `one_op` read — a parameter, buffer or
        submodule of this unit, a training flag, a BN's momentum or eps, a conv's stride or padding, the backend — was
        replaced since, so a training step pays about a microsecond here instead of re-reading and re-checking every
        layer."""
        return cached_value(self, None, self._prepare)

    def _prepare(self):
        spec = self.one_op()
        return list(self.modules()), None if spec is None else FF.PreparedUnit(*spec)

    def gradients(self, x: Tensor, stats: Optional[Tuple[Tensor, Tensor]], dout: Tensor
                  ) -> Tuple[Tensor, Dict[Tensor, Tensor]]:
        """(dx, {parameter: gradient}) of a one-op training forward from x (and its statistics) for the gradient
        dout of its output, without a graph and without the last conv (`functional.preact_unit_gradients`): the
        recomputation's backward of a segment's last unit. Needs `one_op()`."""
        dx, pairs = self.prepared().gradients(x, dout, stats, self.backend)
        return dx, dict(pairs)

    def forward_chained(self, x: Tensor, stats: Optional[Tuple[Tensor, Tensor]] = None
                        ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """Training forward of a full pre-activation unit as a chain of fused kernels (docs/architecture.md §3).

        `stats`: the batch statistics of x if its producer computed them. Each conv returns its output's statistics
        for the next BN, and the last conv adds the shortcut and returns the statistics of x_{l+1}, so no kernel
        reads a tensor only to compute statistics. Returns (x_{l+1}, its (mean, var)); same values as `forward`.
        The whole unit is one op (`functional.preact_unit`) where `one_op` allows, else one op per layer.
        """
        unit = self.prepared()
        if unit is not None:
            out, mean, var = unit(x, stats, self.backend)
            return out, (mean, var)
        if self.share_preact:  # conv1 is a plain conv on the shared activation: its output statistics are unknown
            a = self.preact(x, stats)
            h = self.shortcut(a)
            y, y_stats, fused = self.conv1(a), None, range(2, self.num_layers + 1)
        else:
            h = self.shortcut(x)
            y, y_stats, fused = x, stats, range(1, self.num_layers + 1)
        if not fused:  # a shared single-conv unit: only the addition is left
            out, mean, var = FF.add_stats(y, h, self.backend)
            return out, (mean, var)
        for i in fused:
            conv = getattr(self, f"conv{i}")
            y, mean, var = conv.forward_stats(y, y_stats, residual=h if i == fused[-1] else None)
            y_stats = (mean, var)
        return y, y_stats

    def extra_repr(self) -> str:
        return f"form={self.form!r}, variant={self.variant!r}, merge={self.merge_kind!r}"


class UnitChain:
    """Runs residual units one after another in training (`ResidualUnit.forward_chained`, each unit's output
    statistics handed to the next) and takes the host work per unit away where it can: after a pass in which every
    unit ran its backend's native unit with a kept plan (`functional.PreparedUnit.last_plan`), a pass with an input
    of the same shape, dtype and device, the same default backend and autocast state, and unchanged units
    (`ResidualUnit.prepared` returns the same objects) hands all of them to the backend in one call
    (`Backend.units_train`): the same autograd nodes and results, without a Python call per unit."""

    def __init__(self):
        self._cached = None  # (input key, the units' PreparedUnits, backend name, plans)

    def __getstate__(self):
        return {"_cached": None}  # references into the model and C++ plans: rebuilt on first use

    def clear(self) -> None:
        """Drop the cache (its owner converts or reloads its tensors: `ResidualUnit._apply`)."""
        self._cached = None

    def __call__(self, units: Sequence["ResidualUnit"], x: Tensor, stats: Optional[Tuple[Tensor, Tensor]] = None
                 ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        prepared = [u.prepared() for u in units]
        device = x.device
        key = (x.shape, x.dtype, device, stats is None, get_backend(),
               device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type))
        cached = self._cached
        if (cached is not None and cached[0] == key and all(map(operator.is_, prepared, cached[1]))
                and not ops.unit_ops.traced() and not recompute.replaying()):
            name, plans = cached[2], cached[3]
            if stats is None:
                stats = ops.batch_stats(x, name)
            else:
                FF.check_stats(x, stats, x.shape[1])
            out, mean, var = get_backend_impl(name).units_train(x, stats[0], stats[1], plans)
            return out, (mean, var)
        self._cached = None
        for unit in units:
            x, stats = unit.forward_chained(x, stats)
        done = [p.last_plan if p is not None else None for p in prepared]
        if units and all(d is not None and d[0] == done[0][0] for d in done):
            self._cached = (key, prepared, done[0][0], [d[1] for d in done])
        return x, stats


def run_per_layer(model: nn.Module) -> nn.Module:
    """Make `model` run each fused layer as its own module call in training (every `ResidualUnit.fuse_unit` off, a
    ResNet's statistics chain off): the same values, one op per layer, so hooks on `PreActConv2d`/`BNReLU2d` see
    every layer (shape surveys, ReLU-tie checks). Returns `model`."""
    for m in model.modules():
        if isinstance(m, ResidualUnit):
            m.fuse_unit = False
        if hasattr(m, "chained"):
            m.chained = False
    return model
