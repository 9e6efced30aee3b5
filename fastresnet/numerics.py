"""Whole-net numerics judge: a training step of a deep pre-activation net on every backend, judged against float64.

    fastresnet numerics                                     # CPU: every backend this machine runs, both nets
    fastresnet numerics --device cuda --out rows.jsonl      # (or python -m fastresnet.numerics)

Per-op tests cannot see what a deep chain of fused layers does to a training step, so this module runs one: the
loss, every parameter's gradient and every BN's running statistics after one forward + backward of a full
pre-activation net, for each backend × dtype × {chained, unchained} × {NCHW, channels_last}. Each result is judged by
its error against a float64 run of the reference (the "torch" backend in float64), relative to the error that plain
PyTorch ops make in the same dtype on the same input (the "torch" backend: fp32 accumulation, ATen convs):

    error(fused) <= 2 × max(error(plain PyTorch), floor),   floor = 16 units of roundoff of the dtype in force

for the loss, the global gradient (all parameters as one vector), the worst parameter, and the running statistics
(global and worst buffer; a running mean's error in units of its channel's σ, see `_buffer_scales`). The floor is a handful of roundings: below it the ratio of two correct implementations is
noise. The eager twin (`fastresnet.unconvert`, nn.BatchNorm2d → ReLU → Conv2d) is measured too and reported; it is
not the yardstick on CPU, where eager BatchNorm accumulates its statistics in float64 and so is more accurate than
any fp32-accumulating implementation (on a GPU it accumulates in fp32 like the kernels).

ReLU ties. A ReLU input within rounding distance of zero can land on either side of it in two correct
implementations: the mask flips and that element's gradient changes by O(1), which adds about 1/sqrt(numel) of
relative error to every gradient upstream (about 1% at the sizes a CPU test can afford). Whether that happens depends
on the summation order of the convolutions, i.e. on the machine (the BLAS kernel the CPU selects, oneDNN's ISA), so a
judge that ignores it passes on one machine and fails on another. `separate_relu_ties` therefore shifts each BN's β
(in forward order, in a float64 pass) by the smallest amount that puts every ReLU input of the training forward at
least `margin`·|γ| away from zero. A correct fp32 kernel then cannot flip a mask; a wrong one still shows. In bf16 and
fp16 the rounding errors of deep activations exceed any affordable margin, masks do flip, and their errors (tens of
percent for eager PyTorch as well) are compared as aggregates.

fp32 on a GPU: the fused convs follow PyTorch's cuDNN setting (TF32 unless `torch.backends.cudnn.conv.fp32_precision
= "ieee"`; see `fastresnet.kernels.conv_fp32_precision`), and so does the plain-PyTorch yardstick, so fp32 is
judged at the precision in force; the floor uses TF32's roundoff when TF32 is on.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastresnet.backends import available_backends
from fastresnet.nn.layers import BNReLU2d, PreActConv2d
from fastresnet.nn.units import run_per_layer

# unit roundoff of each dtype (half an ulp at 1): 2^-(mantissa bits + 1)
_UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
TF32_ROUNDOFF = 2.0 ** -11  # TF32 keeps fp16's 10 mantissa bits
FLOOR_UNITS = 16
RATIO = 2.0
LAYOUTS = ("nchw", "nhwc")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- the nets -------------------------------------------------------------------------------------------------------
JUDGE_NETS = {"preact_resnet32": ("basic", 32), "preact_bottleneck47": ("bottleneck", 47)}


def judge_net(name: str, seed: int = 0) -> nn.Module:
    """A net of the judge, freshly initialised from `seed`: full pre-activation CIFAR nets with 5 units per stage
    (deep enough for a chain of 15 units to matter), basic (ResNet-32) and bottleneck (ResNet-47)."""
    from fastresnet.models import cifar_resnet
    if name not in JUDGE_NETS:
        raise ValueError(f"name: expected one of {tuple(JUDGE_NETS)}, got {name!r}")
    torch.manual_seed(seed)
    return cifar_resnet(*JUDGE_NETS[name])


def judge_input(device: str = "cpu", batch: int = 2, size: int = 8, mean: float = 3.0, seed: int = 0
                ) -> Tuple[Tensor, Tensor]:
    """(images, labels): batch × 3 × size × size with a non-zero mean (so every BN of the residual stream sees
    one), on device. The default 2 × 8 × 8 leaves 8 values per channel in the last stage: the smallest size at which
    the deepest stage still normalises over more than a pair."""
    g = torch.Generator().manual_seed(seed)
    x = mean + torch.randn(batch, 3, size, size, generator=g)
    return x.to(device), (torch.arange(batch) % 10).to(device)


def _bn_relu_modules(model: nn.Module) -> List[Tuple[nn.Module, nn.BatchNorm2d]]:
    """(module, its BatchNorm2d) of every fused BN → ReLU in forward-definition order."""
    out = []
    for mod in model.modules():
        if isinstance(mod, PreActConv2d):
            out.append((mod, mod.bn))
        elif isinstance(mod, BNReLU2d):
            out.append((mod, mod))
    return out


def tie_free_shift(z: Tensor, scale: Tensor, margin: float) -> Tensor:
    """The per-channel shift c [C] of least |c| such that every ReLU input z [C, M] − c is at least margin·scale
    [C] away from zero (1% spare, so that storing the shifted β in fp32 keeps the margin)."""
    m = 1.01 * margin * scale[:, None]
    # candidates for c: 0 and the edges z ± m of the forbidden intervals; keep the admissible one of least |c|
    cand = torch.cat([torch.zeros_like(z[:, :1]), z - m, z + m], dim=1)
    dist = (z[:, None, :] - cand[:, :, None]).abs().amin(dim=2)
    score = torch.where(dist >= m * (1 - 1e-9), cand.abs(), torch.full_like(cand, float("inf")))
    return cand.gather(1, score.argmin(dim=1, keepdim=True))[:, 0]


@torch.no_grad()
def separate_relu_ties(model: nn.Module, x: Tensor, margin: float = 1e-2) -> float:
    """Shift every fused BN's β in place so that, in a float64 training forward of `model` on x, no ReLU input lies
    closer than margin·|γ| to zero (module docstring: ReLU ties). Works in forward order on a float64 copy, so each
    shift sees the already shifted layers before it. Returns the largest |shift| applied. Running statistics of
    `model` are untouched (the copy takes the updates)."""
    if margin <= 0:
        raise ValueError(f"margin: expected a positive number, got {margin}")
    twin = run_per_layer(copy.deepcopy(model).double().train())  # every fused layer's forward (and hook) runs
    shifts = [0.0]
    handles = []
    for (mod, bn), (_, orig_bn) in zip(_bn_relu_modules(twin), _bn_relu_modules(model)):
        if bn.weight is None or bn.bias is None:
            raise ValueError("model: separate_relu_ties needs affine BatchNorms (a γ and a β to shift)")

        def pre_hook(_mod, args, bn=bn, orig_bn=orig_bn):
            xi = args[0]
            var, mean = torch.var_mean(xi, dim=(0, 2, 3), unbiased=False, keepdim=True)
            z = (xi - mean) * torch.rsqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1)
            z = z.transpose(0, 1).reshape(xi.shape[1], -1) + bn.bias[:, None]        # [C, M] ReLU inputs
            c = tie_free_shift(z, bn.weight.abs(), margin)
            bn.bias.sub_(c)
            orig_bn.bias.sub_(c.to(orig_bn.bias.dtype))
            shifts.append(c.abs().max().item())
        handles.append(mod.register_forward_pre_hook(pre_hook))
    twin(x.double())
    for h in handles:
        h.remove()
    return max(shifts)


# ---- one training step ----------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    """What one training step produced, in float64 for comparison."""
    loss: Tensor
    grads: Dict[str, Tensor]
    buffers: Dict[str, Tensor]       # running_mean / running_var of every BN
    counts: Dict[str, int]           # num_batches_tracked


def _set_backend(model: nn.Module, backend: Optional[str]) -> None:
    for mod in model.modules():
        if hasattr(mod, "backend"):
            mod.backend = backend


def training_step(model: nn.Module, x: Tensor, target: Tensor, backend: Optional[str], dtype: torch.dtype,
                  chained: bool = True, layout: str = "nchw", eager: bool = False) -> StepResult:
    """One forward + backward of a copy of `model` in training mode. float64/float32: the model and input in that
    dtype; float16/bfloat16: fp32 parameters under `torch.autocast` (how low-precision training runs). `eager`:
    run the plain-PyTorch twin (`fastresnet.unconvert`) instead of the fused layers."""
    from fastresnet.convert import unconvert
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    m = unconvert(model) if eager else copy.deepcopy(model)
    amp = dtype in (torch.float16, torch.bfloat16)
    store = torch.float32 if amp else dtype
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    m = m.to(dtype=store, memory_format=fmt).train()
    if not eager:
        _set_backend(m, backend)
        m.chained = chained
    xx = x.to(store).contiguous(memory_format=fmt)
    with torch.autocast(x.device.type, dtype=dtype, enabled=amp):
        out = m(xx)
    loss = F.cross_entropy(out.float(), target)
    loss.backward()
    return StepResult(
        loss.detach().double(),
        {n: p.grad.detach().double() for n, p in m.named_parameters()},
        {n: b.detach().double() for n, b in m.named_buffers() if b.is_floating_point()},
        {n: int(b) for n, b in m.named_buffers() if not b.is_floating_point()})


# ---- errors and the verdict -----------------------------------------------------------------------------------------
def _rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _buffer_scales(ref: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """What each running statistic's error is measured against: a running variance against itself, a running mean
    against the channel's standard deviation sqrt(running_var). BN subtracts the mean and divides by σ, so δμ/σ is
    the error a mean puts into every normalised value; relative to a mean that happens to lie near zero it would
    measure the cancellation in that channel's sum instead (PyTorch's CPU reductions accumulate more precisely than
    fp32 there; GPU kernels, PyTorch's included, do not)."""
    out = {}
    for k, v in ref.items():
        var = k[:-len("running_mean")] + "running_var"
        out[k] = ref[var].clamp_min(0).sqrt() if k.endswith("running_mean") and var in ref else v
    return out


def step_errors(r: StepResult, ref: StepResult) -> Dict[str, object]:
    """Errors of r against the float64 reference: loss, global gradient, worst parameter (relative norms), global
    and worst running statistic (`_buffer_scales`)."""
    if r.counts != ref.counts:
        raise AssertionError(f"num_batches_tracked differs from the reference: {r.counts} vs {ref.counts}")
    keys, bufs = list(ref.grads), list(ref.buffers)
    scale = _buffer_scales(ref.buffers)
    g, g_ref = torch.cat([r.grads[k].flatten() for k in keys]), torch.cat([ref.grads[k].flatten() for k in keys])
    param_errs = {k: _rel(r.grads[k], ref.grads[k]) for k in keys}
    buf_errs = {k: ((r.buffers[k] - ref.buffers[k]).norm() / scale[k].norm().clamp_min(1e-300)).item() for k in bufs}
    delta = torch.cat([(r.buffers[k] - ref.buffers[k]).flatten() for k in bufs])
    worst_p, worst_b = max(param_errs, key=param_errs.get), max(buf_errs, key=buf_errs.get)
    return dict(loss=_rel(r.loss, ref.loss), grad=_rel(g, g_ref), worst_param=param_errs[worst_p],
                worst_param_name=worst_p,
                buffers=(delta.norm() / torch.cat([scale[k].flatten() for k in bufs]).norm()).item(),
                worst_buffer=buf_errs[worst_b], worst_buffer_name=worst_b)


METRICS = ("loss", "grad", "worst_param", "buffers", "worst_buffer")


def floor_for(dtype: torch.dtype, device: torch.device) -> float:
    """FLOOR_UNITS units of roundoff of the precision in force (TF32 for fp32 convs on a GPU when it is on)."""
    from fastresnet.kernels import conv_fp32_precision
    u = _UNIT_ROUNDOFF[dtype]
    if dtype == torch.float32 and device.type == "cuda" and conv_fp32_precision() == "tf32":
        u = TF32_ROUNDOFF
    return FLOOR_UNITS * u


@dataclass
class Row:
    """One judged configuration (a JSON line of `--out`)."""
    net: str
    backend: str
    dtype: str
    chained: bool
    layout: str
    device: str
    errors: Dict[str, object]
    baseline: Dict[str, object]      # plain PyTorch ops ("torch" backend), same dtype, chain and layout
    eager: Dict[str, object]         # the eager twin, same dtype and layout (reported, not judged against)
    floor: float
    failures: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def verdict(errors: Dict[str, object], baseline: Dict[str, object], floor: float) -> List[str]:
    """The metrics where errors exceed RATIO × max(baseline, floor), as readable strings (empty: pass)."""
    bad = []
    for k in METRICS:
        limit = RATIO * max(baseline[k], floor)
        if errors[k] > limit:
            bad.append(f"{k} {errors[k]:.3g} > {limit:.3g} (plain PyTorch {baseline[k]:.3g})")
    return bad


class Judge:
    """The judge of one net on one input (module docstring). Construction separates the ReLU ties of `model` in
    place (unless margin is None) and runs the float64 reference; `row(...)` judges one configuration, reusing the
    plain-PyTorch and eager runs of the same dtype, chain and layout."""

    def __init__(self, model: nn.Module, x: Tensor, target: Tensor, name: str, margin: Optional[float] = 1e-2):
        self.model, self.x, self.target, self.name = model, x, target, name
        self.shift = 0.0 if margin is None else separate_relu_ties(model, x, margin)
        self.ref = training_step(model, x, target, "torch", torch.float64, chained=False)
        self._cache: Dict[tuple, Dict[str, object]] = {}

    def errors(self, backend: Optional[str], dtype: torch.dtype, chained: bool, layout: str,
               eager: bool = False) -> Dict[str, object]:
        """step_errors of one configuration (cached)."""
        key = (backend, dtype, chained, layout, eager)
        if key not in self._cache:
            self._cache[key] = step_errors(training_step(self.model, self.x, self.target, backend, dtype, chained,
                                                         layout, eager), self.ref)
        return self._cache[key]

    def row(self, backend: str, dtype: torch.dtype, chained: bool, layout: str) -> Row:
        """Judge `backend` in one configuration against plain PyTorch ("torch") in the same one."""
        base = self.errors("torch", dtype, chained, layout)
        errs = self.errors(backend, dtype, chained, layout)
        eager = self.errors(None, dtype, True, layout, eager=True)
        floor = floor_for(dtype, self.x.device)
        return Row(self.name, backend, str(dtype).replace("torch.", ""), chained, layout, str(self.x.device), errs,
                   base, eager, floor, [] if backend == "torch" else verdict(errs, base, floor))


def runnable_backends(device: str) -> List[str]:
    """The registered backends that run on `device` here ("torch" first: it is the yardstick)."""
    from fastresnet.backends import get_backend_impl
    probe = torch.empty(2, 2, 2, 2, device=device)
    names = [n for n, status in available_backends().items() if status == "ok"
             and get_backend_impl(n).why_not(probe) is None]
    return ["torch"] + [n for n in names if n != "torch"]


def format_rows(rows: Sequence[Row]) -> str:
    """A plain-text table: each backend's global gradient / worst parameter / running-statistics error next to
    plain PyTorch's and eager's."""
    head = (f"{'net':20s} {'backend':12s} {'dtype':9s} {'chain':5s} {'layout':6s} "
            f"{'grad err':>9s} {'torch':>9s} {'eager':>9s} {'worst p':>9s} {'torch':>9s} {'buffers':>9s} "
            f"{'torch':>9s}  verdict")
    lines = [head, "-" * len(head)]
    for r in rows:
        e, b, g = r.errors, r.baseline, r.eager
        lines.append(f"{r.net:20s} {r.backend:12s} {r.dtype:9s} {str(r.chained):5s} {r.layout:6s} "
                     f"{e['grad']:9.2e} {b['grad']:9.2e} {g['grad']:9.2e} {e['worst_param']:9.2e} "
                     f"{b['worst_param']:9.2e} {e['buffers']:9.2e} {b['buffers']:9.2e}  "
                     + ("yardstick" if r.backend == "torch" else "ok" if r.ok else "FAIL: " + "; ".join(r.failures)))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="fastresnet numerics", description=__doc__.split("\n\n")[0],
                                epilog="Exit status 1 when a configuration fails the judge.")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--backends", default=None, help="comma-separated (default: every backend that runs here)")
    p.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma-separated of " + ",".join(DTYPES))
    p.add_argument("--nets", default=None, help="comma-separated (default: preact_resnet32,preact_bottleneck47)")
    p.add_argument("--out", default=None, help="append the rows as JSON lines to this file")
    a = p.parse_args(argv)
    # every value is checked before the judge runs (minutes): one line naming the argument (fastresnet.cli)
    if a.device not in ("cpu", "cuda") or (a.device == "cuda" and not torch.cuda.is_available()):
        raise ValueError(f"--device: expected cpu or cuda (with a GPU present), got {a.device!r}")
    dtypes = []
    for d in a.dtypes.split(","):
        if d not in DTYPES:
            raise ValueError(f"--dtypes: expected names from {tuple(DTYPES)}, got {d!r}")
        dtypes.append(DTYPES[d])
    runnable = runnable_backends(a.device)
    backends = runnable if a.backends is None else ["torch"] + [b for b in a.backends.split(",") if b != "torch"]
    known = available_backends()
    for b in backends:
        if b not in known:
            raise ValueError(f"--backends: expected names from {tuple(known)}, got {b!r}")
        if b not in runnable:
            why = "" if known[b] == "ok" else f" ({known[b]})"
            raise ValueError(f"--backends: {b!r} does not run on {a.device} tensors here{why}")
    names = list(JUDGE_NETS) if a.nets is None else a.nets.split(",")
    for n in names:
        if n not in JUDGE_NETS:
            raise ValueError(f"--nets: expected names from {tuple(JUDGE_NETS)}, got {n!r}")
    folder = os.path.dirname(os.path.abspath(a.out)) if a.out else None
    if folder is not None and not (os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)):
        raise ValueError(f"--out: cannot append to {a.out}: {folder} is not a folder this process may write into")
    x, target = judge_input(a.device)
    rows: List[Row] = []
    for n in names:
        j = Judge(judge_net(n).to(a.device), x, target, n)
        rows += [j.row(b, d, c, lay) for d in dtypes for lay in LAYOUTS for c in (True, False) for b in backends]
    print(format_rows(rows))
    if a.out:
        from datetime import datetime, timezone
        from fastresnet.info import versions
        dev = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
        env = dict(bench="numerics", device=dev, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   **{k: v for k, v in versions().items() if k in ("torch", "triton", "cuda", "numpy")})
        with open(a.out, "a") as f:   # one write: appended rows of processes writing at once never interleave
            f.write("".join(json.dumps(dict(env, **asdict(r), ok=r.ok)) + "\n" for r in rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    from fastresnet import cli
    sys.exit(cli.run_command("numerics", main, sys.argv[1:]))
