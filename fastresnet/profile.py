"""Model profiler: parameters in the paper's two conventions (docs/paper.md §1.5) and multiply-accumulates per image
(§6).

`fastresnet profile` (or `python -m fastresnet.profile`) prints every registered model beside the paper's numbers,
in natural order (resnet110 before resnet1001).
MACs count conv and FC layers (FC weights only; BN, ReLU, adds and pooling excluded; option-A shortcuts are free),
measured by a shape-only forward on the meta device, so no arithmetic runs.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fastresnet import cli
from fastresnet.models import create_model, list_models
from fastresnet.models.registry import default_num_classes
from fastresnet.nn.layers import PreActConv2d

# name -> (paper params, paper MACs) as docs/paper.md §1.5 / §6 states them (M = 1e6); None where it gives none.
PAPER: Dict[str, Tuple[Optional[str], Optional[str]]] = {
    "resnet20": ("0.27M", "40.6M"), "resnet32": ("0.46M", "68.9M"), "resnet44": ("0.66M", "97.2M"),
    "resnet56": ("0.85M", "125.5M"), "resnet110": ("1.7M", "252.9M"), "preact_resnet110": ("1.7M", "252.9M"),
    "resnet1202": ("19.4M", "2.83G"), "preact_resnet164": ("1.7M", "244.5M"), "preact_resnet1001": ("10.2M", "1.488G"),
    "resnet110_1layer": (None, "252.9M"), "preact_resnet200": ("64.67M", "14.8G"),
}


@dataclass
class Profile:
    name: str
    params_weights: int   # conv + FC (+ gate) weights and biases, no BN
    params_with_bn: int   # the above plus BN γ and β
    macs: int             # multiply-accumulates per image


def count_params(model: nn.Module) -> Tuple[int, int]:
    """(weights-only, with BN γ/β): parameters of BatchNorm modules are the BN share."""
    bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for p in m.parameters(recurse=False))
    total = sum(p.numel() for p in model.parameters())
    return total - bn, total


def count_macs(model: nn.Module, input_size: Tuple[int, int, int] = (3, 32, 32)) -> int:
    """Conv + FC multiply-accumulates for one image, from a forward of one image on the model's device (shape-only
    if the model lives on the meta device, as `profile` builds it)."""
    macs = 0

    def conv_hook(module, inputs, output):
        nonlocal macs
        conv = module.conv if isinstance(module, PreActConv2d) else module
        k = conv.weight.shape[1] * conv.weight.shape[2] * conv.weight.shape[3]
        macs += output[0].numel() * k

    def linear_hook(module, inputs, output):
        nonlocal macs
        macs += output[0].numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, PreActConv2d)):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()  # batch-norm of a single image needs running statistics
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_size), device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return macs


def default_input_size(name: str) -> Tuple[int, int, int]:
    """3×224×224 for the ImageNet nets, 3×32×32 for the CIFAR nets."""
    return (3, 224, 224) if default_num_classes(name) == 1000 else (3, 32, 32)


def profile(name: str, num_classes: Optional[int] = None, input_size=None, **kw) -> Profile:
    """Profile a registered model (built on the meta device: no memory for weights)."""
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, **kw)
    w, wb = count_params(model)
    return Profile(name, w, wb, count_macs(model, input_size or default_input_size(name)))


def _fmt(n: int) -> str:
    return f"{n / 1e9:.3f}G" if n >= 1e9 else f"{n / 1e6:.2f}M"


def natural_key(name: str) -> List[Union[str, int]]:
    """Sort key that compares digit runs as numbers: resnet20 < resnet110 < resnet1001 < resnet1202."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the table; the exit code follows `fastresnet.cli.run_command`."""
    p = argparse.ArgumentParser(prog="fastresnet profile", description=__doc__.splitlines()[0], epilog=cli.EPILOG)
    p.add_argument("--models", default="*", help="shell-style filter on model names (default: all)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the model's, 10 for "
                   "CIFAR nets, 1000 for ImageNet nets)")
    args = p.parse_args(argv)
    if args.num_classes is not None and args.num_classes < 1:
        raise ValueError(f"--num-classes: expected a positive integer, got {args.num_classes}")
    names = sorted(list_models(args.models), key=natural_key)
    if not names:
        raise ValueError(f"--models: no model matches {args.models!r}; `fastresnet profile` lists them all")
    print(f"{'model':30s} {'params (weights)':>17s} {'params (+BN)':>13s} {'paper':>7s} {'MACs/image':>11s} "
          f"{'paper':>7s}", flush=True)
    for name in names:
        pr = profile(name, args.num_classes)
        paper_p, paper_m = PAPER.get(name, (None, None))
        print(f"{name:30s} {pr.params_weights:17,d} {pr.params_with_bn:13,d} {paper_p or '-':>7s} "
              f"{_fmt(pr.macs):>11s} {paper_m or '-':>7s}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_command("profile", main, sys.argv[1:]))
