"""Training-step benchmark of whole models: eager PyTorch vs torch.compile vs each backend (docs/architecture.md §5).

    python -m benchmarks.bench_models                      # the full matrix on the GPU (see --help)
    python -m benchmarks.bench_models --cpu-smoke          # a tiny run on CPU that checks the harness

Providers, all measured in one process and run, on the same architecture and initial weights:

| provider                | model                                                        | step runs as       |
|-------------------------|--------------------------------------------------------------|--------------------|
| `eager`                 | `unconvert(create_model(name))`: BatchNorm2d/ReLU/Conv2d      | eager              |
| `eager+graph`           | the same                                                     | one CUDA graph     |
| `compile`               | the same under `torch.compile()`                             | Inductor           |
| `compile-max-autotune`  | the same under `torch.compile(mode="max-autotune")`          | Inductor (+graphs) |
| `fastresnet:<b>`        | `create_model(name, backend=b)` (fused layers)               | eager              |
| `fastresnet:<b>+graph`  | the same                                                     | one CUDA graph     |
| `fastresnet:<b>/python-node` | the same, the backend's own C++ autograd nodes off (`WithoutNativeNodes`) | eager |
| `fastresnet:<b>/python-node+graph` | the same                                             | one CUDA graph     |

`fastresnet.convert.unconvert` turns the zoo's fused layers into the same architecture in plain modules sharing
the same parameters (PreActConv2d -> Sequential(BatchNorm2d, ReLU, Conv2d), BNReLU2d -> BatchNorm2d + ReLU, no
statistics chaining): only ATen ops (cuDNN BN and conv) run, the honest "eager PyTorch" baseline.
Every provider uses channels_last and cudnn.benchmark. A step is forward, cross-entropy, backward and SGD (see
`common.TrainStep`); "bf16" is autocast with fp32 parameters. Measured per cell: ms/step = median of per-step CUDA
event timings after warm-up (time.perf_counter on CPU), images/s, peak memory (torch.cuda.max_memory_allocated since
the cell began: weights, gradients, optimizer state, activations, workspaces; None on CPU), achieved TFLOP/s =
2 × MACs × 3 × batch / step time (MACs per image from `fastresnet.profile`: conv + FC only; backward counted as
2× forward), warm-up seconds (compilation and graph capture included), and speedup / memory ratio to `eager`
of the same run.
Unavailable providers get a row with status "unavailable" and the reason; failures give "error" or "oom" rows —
the harness never stops on one cell.

Order: every non-compile cell first, then the compile cells, so a --time-budget cuts compilation (minutes per
model) before it cuts the fused backends.
"""
from __future__ import annotations

import argparse
import fnmatch
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from benchmarks import common
from fastresnet import create_model
from fastresnet.backends import BACKEND_NAMES, get_backend_impl
from fastresnet.convert import unconvert
from fastresnet.kernels import conv_fp32_precision
from fastresnet.models.registry import default_num_classes
from fastresnet.nn.units import run_per_layer
from fastresnet.profile import default_input_size, profile

MODELS = ("preact_resnet110", "preact_resnet164", "preact_resnet1001", "preact_resnet50", "preact_resnet200")
# torch.compile costs about a minute per model and dtype (several with max-autotune): by default only
# preact_resnet110 is compiled, to keep the full matrix within ~8 minutes on an H100 (README gives the follow-up
# command for the other models).
COMPILE_MODELS = ("preact_resnet110",)


@dataclass(frozen=True)
class Provider:
    name: str
    backend: Optional[str] = None       # fastresnet backend; None: the eager twin
    graph: bool = False                 # capture the whole step as one CUDA graph
    compile_mode: Optional[str] = None  # torch.compile mode ("default", "max-autotune"); None: no compile
    per_layer: bool = False             # every fused layer its own module call (`nn.units.run_per_layer`): the path
                                        # of converted models, which have no residual units of fastresnet's
    native: bool = True                 # False: the backend's own autograd nodes off (`WithoutNativeNodes`)


NATIVE_HOOKS = ("unit_plan", "layer_plan")  # the Backend attributes through which a backend runs its own nodes


def native_backends() -> List[str]:
    """The backends with autograd nodes of their own (`Backend.unit_plan` / `layer_plan` set): "ext"."""
    return [b for b in BACKEND_NAMES if b != "auto"
            and any(getattr(type(get_backend_impl(b)), h, None) is not None for h in NATIVE_HOOKS)]


class WithoutNativeNodes(torch.nn.Module):
    """Runs `model` with backend `backend`'s own autograd nodes switched off: during each forward its `unit_plan`
    and `layer_plan` are None (what `Backend` has for a backend without such nodes), so each residual unit runs the
    Python node (`ops.unit_ops._PreactUnit`, composed from the backend's primitives) and each single fused layer the
    ops, one call per unit and layer; the backward runs the nodes the forward recorded. The
    Python path of the same kernels, to set against the backend's C++ one."""

    def __init__(self, model: torch.nn.Module, backend: str):
        super().__init__()
        self.model, self.backend = model, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = type(get_backend_impl(self.backend))
        saved = {h: cls.__dict__[h] for h in NATIVE_HOOKS if h in cls.__dict__}
        for h in saved:
            setattr(cls, h, None)
        try:
            return self.model(x)
        finally:
            for h, v in saved.items():
                setattr(cls, h, v)


def fused_providers(backends: List[str], graph: bool) -> List[Provider]:
    """fastresnet:<b> for each backend, then fastresnet:<b>/python-node for those with nodes of their own; with
    graph, each "+graph"."""
    tail = "+graph" if graph else ""
    return ([Provider(f"fastresnet:{b}{tail}", b, graph) for b in backends]
            + [Provider(f"fastresnet:{b}/python-node{tail}", b, graph, native=False)
               for b in native_backends() if b in backends])


def all_providers() -> List[Provider]:
    """Every provider, in run order (eager first: it is the reference of the ratios)."""
    backends = [b for b in BACKEND_NAMES if b != "auto"]
    return ([Provider("eager")] + fused_providers(backends, False)
            + [Provider("eager+graph", graph=True)] + fused_providers(backends, True)
            + [Provider("compile", compile_mode="default"),
               Provider("compile-max-autotune", compile_mode="max-autotune")])


def select(names: List[str], patterns: str, what: str) -> List[str]:
    """The names matching any comma-separated shell pattern, in `names` order; an unmatched pattern is an error."""
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    for p in pats:
        if not any(fnmatch.fnmatch(n, p) for n in names):
            raise ValueError(f"--{what}: {p!r} matches none of {names}")
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in pats)]


def build_model(name: str, provider: Provider, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """The provider's model with seed-0 weights: eager twin or fused, on device, channels_last, maybe compiled."""
    torch.manual_seed(0)
    with device:  # built and initialised on the device: fast for the 64M-parameter ImageNet nets
        model = create_model(name) if provider.backend is None else create_model(name, backend=provider.backend)
    if provider.backend is None:
        model = unconvert(model, inplace=True)
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if provider.per_layer:
        run_per_layer(model)
    if not provider.native:
        model = WithoutNativeNodes(model, provider.backend)
    if provider.compile_mode is not None:
        model = torch.compile(model, mode=provider.compile_mode)
    return model


def graph_skip(provider: Provider, device: torch.device) -> Optional[Tuple[str, str]]:
    """("unavailable", why) for a CUDA-graph provider on a device without CUDA graphs, else None."""
    if provider.graph and device.type != "cuda":
        return "unavailable", f"CUDA graphs need a CUDA device (this run: {device.type})"
    return None


def skip_reason(provider: Provider, model: str, dtype: str, device: torch.device,
                compile_models: List[str]) -> Optional[Tuple[str, str]]:
    """(status, reason) if this cell should not run, else None."""
    if graph_skip(provider, device) is not None:
        return graph_skip(provider, device)
    if provider.compile_mode is not None and model not in compile_models:
        return "skipped", ("compile not requested for this model (--compile-models); compiling takes about a "
                           "minute per model and dtype")
    if provider.backend is not None:
        probe = torch.empty(2, 4, 2, 2, device=device, dtype=common.DTYPES[dtype] or torch.float32)
        return common.backend_skip(provider.backend, probe)
    return None


def measure(model_name: str, provider: Provider, dtype: str, batch: int, image_size: int, device: torch.device,
            args: argparse.Namespace) -> Dict[str, object]:
    """Run one cell and return its measured fields (status "ok", "oom" or "error")."""
    common.reset_memory(device)
    model = step = None
    try:
        model = build_model(model_name, provider, device, args.channels_last)
        step = common.TrainStep(model, batch, image_size, default_num_classes(model_name), dtype, device,
                                args.channels_last)
        t0 = time.perf_counter()
        if provider.graph:
            step.capture(args.warmup)
            step.step()
        else:
            for _ in range(max(args.warmup, 1)):
                step.step()
        common.synchronize(device)
        first_s = time.perf_counter() - t0
        estimate = common.quantile(common.time_calls(step.step, 2, device), 0.5)
        iters = common.iterations_for(estimate, args.cell_seconds, args.min_iters, args.max_iters)
        times = common.time_calls(step.step, iters, device)
        peak = common.peak_memory(device)
    except Exception as e:  # one failing cell must not stop the matrix: it becomes a row
        status = "oom" if common.is_oom(e) else "error"
        return {"status": status, "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]}
    finally:
        model = step = None  # free this cell's memory before the next one
        common.reset_memory(device)
        if provider.compile_mode is not None:
            torch._dynamo.reset()
    ms = common.quantile(times, 0.5)
    return {"status": "ok", "reason": None if device.type == "cuda" else common.CPU_PEAK_REASON,
            "warmup_s": round(first_s, 3), "iters": iters, "ms_per_step": ms,
            "ms_p20": common.quantile(times, 0.2), "ms_p80": common.quantile(times, 0.8),
            "images_per_s": batch / ms * 1e3, "peak_mem_bytes": peak}


def run(args: argparse.Namespace) -> List[Dict[str, object]]:
    """Run the selected matrix, appending rows to args.out as each cell finishes; returns all rows."""
    device = common.resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    env = common.environment(device)
    out = args.out or common.default_out("models", env)
    providers = [p for p in all_providers() if p.name in select([q.name for q in all_providers()],
                                                                 args.providers, "providers")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in common.DTYPES:
            raise ValueError(f"--dtypes: expected a subset of {tuple(common.DTYPES)}, got {d!r}")
    compile_models = models if args.compile_models == "all" else [m.strip() for m in args.compile_models.split(",")]
    sizes, macs = {}, {}
    for m in models:  # validates names before anything runs
        sizes[m] = args.image_size or default_input_size(m)[1]
        macs[m] = profile(m, input_size=(3, sizes[m], sizes[m])).macs

    start = time.perf_counter()
    eager_ref: Dict[Tuple[str, str], Dict[str, object]] = {}
    rows: List[Dict[str, object]] = []
    cells = [(m, d, p) for compiled in (False, True) for m in models for d in dtypes for p in providers
             if (p.compile_mode is not None) == compiled]
    print(f"bench_models: {len(cells)} cells on {env['device']} -> {out}", flush=True)
    for model_name, dtype, provider in cells:
        row = dict(env, bench="models", smoke=args.cpu_smoke, model=model_name, provider=provider.name,
                   backend=provider.backend, cuda_graph=provider.graph, compile_mode=provider.compile_mode,
                   dtype=dtype, batch=args.batch, image_size=sizes[model_name], channels_last=args.channels_last,
                   cudnn_benchmark=torch.backends.cudnn.benchmark, tf32_conv=conv_fp32_precision() == "tf32",
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, macs_per_image=macs[model_name],
                   warmup=args.warmup)
        skip = skip_reason(provider, model_name, dtype, device, compile_models)
        if skip is None and args.time_budget is not None and time.perf_counter() - start > args.time_budget:
            skip = "skipped", f"time budget spent (--time-budget {args.time_budget:g} s) before this cell"
        if skip is not None:
            row.update(status=skip[0], reason=skip[1])
        else:
            row.update(measure(model_name, provider, dtype, args.batch, sizes[model_name], device, args))
        if row["status"] == "ok":
            row["tflops"] = 6 * macs[model_name] * args.batch / (row["ms_per_step"] * 1e-3) / 1e12
            if provider.name == "eager":
                eager_ref[(model_name, dtype)] = row
            ref = eager_ref.get((model_name, dtype))
            row["speedup_vs_eager"] = ref["ms_per_step"] / row["ms_per_step"] if ref else None
            row["memory_vs_eager"] = (row["peak_mem_bytes"] / ref["peak_mem_bytes"]
                                      if ref and ref["peak_mem_bytes"] and row["peak_mem_bytes"] else None)
        common.write_rows(out, [row])
        rows.append(row)
        took = time.perf_counter() - start
        if row["status"] == "ok":
            print(f"[{took:6.1f}s] {model_name:18s} {dtype:4s} {provider.name:28s} {row['ms_per_step']:9.2f} ms "
                  f"{row['images_per_s']:9.0f} img/s  x{row['speedup_vs_eager'] or float('nan'):.2f}", flush=True)
        else:
            print(f"[{took:6.1f}s] {model_name:18s} {dtype:4s} {provider.name:28s} {row['status']}: {row['reason']}",
                  flush=True)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names")
    p.add_argument("--providers", default=None, help="comma-separated shell patterns over provider names, e.g. "
                   "'eager,fastresnet:*' (default: all; --cpu-smoke: eager,eager+graph,fastresnet:*)")
    p.add_argument("--dtypes", default=None, help="subset of fp32,bf16; bf16 = autocast (default: both; "
                   "--cpu-smoke: fp32, since CPU bf16 is slow)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=None, help="default: 32 for CIFAR nets, 224 for ImageNet nets")
    p.add_argument("--compile-models", default=",".join(COMPILE_MODELS),
                   help="models the compile providers run on ('all' for every model)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (graph providers: before capture)")
    p.add_argument("--min-iters", type=int, default=5, help="timed steps, at least")
    p.add_argument("--max-iters", type=int, default=30, help="timed steps, at most")
    p.add_argument("--cell-seconds", type=float, default=0.5,
                   help="timed steps per cell: as many as fit in this many seconds, within [min-iters, max-iters]")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; cells that would start later are recorded as skipped")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="JSON Lines file to append to (default: $FASTRESNET_BENCH_DIR or "
                   "./benchmark-results/, models_<device>_<run id>.jsonl)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny CPU run that checks the harness: preact_resnet20, batch 4, 16x16, 2 warm-up + 3 timed "
                   "steps, eager / eager+graph / fastresnet backends, fp32 (add bf16 with --dtypes fp32,bf16)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.device, args.models, args.batch, args.image_size = "cpu", "preact_resnet20", 4, 16
        args.warmup, args.min_iters, args.max_iters, args.cell_seconds = 2, 3, 3, 0.0
        args.dtypes = args.dtypes or "fp32"
        args.providers = args.providers or "eager,eager+graph,fastresnet:*"
    args.dtypes, args.providers = args.dtypes or "fp32,bf16", args.providers or "*"
    for name in ("batch", "warmup", "min_iters", "max_iters"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            raise SystemExit(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    if args.min_iters > args.max_iters:
        raise SystemExit(f"--min-iters ({args.min_iters}) must not exceed --max-iters ({args.max_iters})")
    return args


def main(argv=None) -> List[Dict[str, object]]:
    rows = run(parse_args(argv))
    from benchmarks.report import models_table
    print(models_table(rows))
    return rows


if __name__ == "__main__":
    main()
