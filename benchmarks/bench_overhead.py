"""Host cost of a training step per provider, on tensors so small that compute is negligible: what Python, the
dispatcher, autograd and the optimizer cost per layer, and how many kernels one step launches.

    python -m benchmarks.bench_overhead                                  # preact_resnet110 and 1001, GPU if present
    python -m benchmarks.bench_overhead --device cpu --out benchmarks/results/overhead_cpu.jsonl
    python -m benchmarks.bench_overhead --smoke --device cpu              # tiny run that checks the harness (CI)

Providers, all measured in one process on the same architecture and seed-0 weights (`bench_models.build_model`):
`eager` (`unconvert(create_model(name))`: BatchNorm2d / ReLU / Conv2d; always measured, the reference of the
ratios), `fastresnet:<b>` for every backend, "auto" included (on CPU, backends that "auto" would not pick — the
Triton ones, whose interpreter measures Python rather than a kernel — only with --triton), `fastresnet:auto/per-layer`
("auto" with every fused layer its own module call, `nn.units.run_per_layer`: the path of a converted timm or
torchvision model, whose blocks are not fastresnet's residual units), `fastresnet:<b>/python-node` for a backend with
autograd nodes of its own ("ext": its C++ path switched off, `bench_models.WithoutNativeNodes`, so every unit is a
Python node), each of these but "auto" also captured as one CUDA graph (`eager+graph`, `fastresnet:<b>+graph`,
...; "unavailable" rows on CPU), and `compile` (`torch.compile` of the eager twin, with --compile; otherwise a
"skipped" row).

One step is `common.TrainStep`: zero_grad, forward, cross-entropy, backward, SGD (momentum 0.9, weight decay), fp32
or bf16 autocast (--dtype), channels_last, default batch 2 at 4x4 (--batch, --image-size), torch.set_num_threads(--threads, default 1). After
--warmup steps of every provider, --reps rounds each time one step of every provider, in an order rotated by one
each round, so that machine noise hits every provider alike. Per provider: the median, min and max step time
(perf_counter on CPU, CUDA events with a synchronisation after every step on a GPU), the median process CPU time,
and host_cost_vs_eager = median / eager's median of the same run.

Then one more step of each provider runs under torch.profiler, for
- kernels per step. On a GPU: the device kernel events (memcpy / memset counted apart, as device_copies_per_step). On
  CPU: the ops that would be kernels on a GPU, counted over the profiler's op tree from the top by this rule
  (`cpu_kernels`): an ATen op that computes data (`is_kernel_op`) counts once, and nothing below it counts; an op that
  only makes a view or changes metadata — every overload returns views of its inputs or no tensor (view, reshape, t,
  transpose, permute, expand, as_strided, detach, and contiguous / to / reshape when they do not copy, result_type,
  item, ...) — or allocates or restrides in place (NON_KERNEL_OPS: empty*, resize_, set_, as_strided_, ...) counts
  nothing itself but counts through the ops it calls (`to` that copies: its one `_to_copy`); so do Python-level ranges
  (custom ops, autograd nodes, the optimizer); an op of the C++ extension (`fastresnet_ext::`) and a Triton launch count
  once each. Counting the outermost computing op, not the leaves, leaves out how the CPU implements an op
  (native_batch_norm zero-fills its statistics buffers, every CPU `mul_` by a Python scalar copies the scalar into a
  tensor: not kernels on a GPU). One ATen op is one kernel: a lower bound where a GPU library launches several
  (convolution_backward: input and weight gradients, two cuDNN kernels; cross_entropy: two), the same for every
  provider. torch.compile on CPU runs Inductor's C++ kernels, which the profiler does not see: its CPU kernel count is
  not reported.
  kernels_optimizer: those under the optimizer step (on CPU SGD loops over the parameters, 3+ ops each; on a GPU
  it uses multi-tensor kernels; a graph replay has no Python caller to attribute kernels to, so a "+graph" row takes
  them from its eagerly launched twin); kernels_forward_backward: the rest; kernels_per_conv_layer =
  kernels_forward_backward / bn_relu_conv_layers, the convolutions whose input is a ReLU of a BatchNorm output (`bn_relu_conv_layers`).
- triton_launches: Triton kernel launches in the step (triton.knobs.runtime.launch_enter_hook for compiled kernels;
  under TRITON_INTERPRET=1, which calls no launch hook, the interpreter's grid executor is wrapped while profiling).
- host_vs_conv: the profiled step's wall time split into conv_self_ms (self CPU time of the ATen convolution ops,
  forward and backward: on CPU the conv compute itself), optimizer_ms and other_ms (Python, dispatcher, autograd, BN
  and ReLU work, the loss); the profiler's own overhead inflates other_ms. On a GPU also device_busy_ms, the summed
  kernel time of the step.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import re
import time
from collections import Counter
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch.autograd import DeviceType

from benchmarks import common
from benchmarks.bench_models import Provider, build_model, fused_providers, graph_skip, select
from fastresnet.backends import BACKEND_NAMES, resolve
from fastresnet.convert import BatchNormReLU2d
from fastresnet.models.registry import default_num_classes

MODELS = ("preact_resnet110", "preact_resnet1001")
SMOKE_MODEL = "preact_resnet20"
STEP_NAME = "bench_overhead::step"
OPTIMIZER_PREFIX = "Optimizer.step#"  # the profiler range torch.optim puts around every optimizer step
TRITON_PREFIX = "triton::"            # the profiler range this benchmark puts around an interpreted Triton launch
# ATen ops that write no data a kernel computes: allocation and in-place metadata changes (views that return a new
# tensor are recognised from their schema by `is_kernel_op`)
NON_KERNEL_OPS = frozenset({
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_", "resize_as_", "set_",
    "as_strided_", "squeeze_", "unsqueeze_", "transpose_", "t_", "detach_", "swapdims_", "swapaxes_",
})
CONV_OP = re.compile(r"^aten::\w*conv(?!ert)")  # conv2d, convolution, _convolution, mkldnn_/cudnn_convolution, ...


def all_providers() -> List[Provider]:
    """eager, every backend (auto first) and its python-node variant, "auto" with one op per layer, then the same
    captured as CUDA graphs ("auto" left out), compile: the run order within a round."""
    backends = [b for b in BACKEND_NAMES if b != "auto"]
    return ([Provider("eager"), Provider("fastresnet:auto", "auto")] + fused_providers(backends, False)
            + [Provider("fastresnet:auto/per-layer", "auto", per_layer=True), Provider("eager+graph", graph=True)]
            + fused_providers(backends, True) + [Provider("compile", compile_mode="default")])


def skip_reason(provider: Provider, device: torch.device, args: argparse.Namespace) -> Optional[Tuple[str, str]]:
    """(status, reason) if the provider is not measured in this run, else None."""
    if graph_skip(provider, device) is not None:
        return graph_skip(provider, device)
    if provider.compile_mode is not None:
        return None if args.compile else ("skipped", "torch.compile not requested (--compile): compiling a "
                                          "1000-layer net takes minutes")
    if provider.backend in (None, "auto"):
        return None
    probe = torch.empty(2, 4, 2, 2, device=device)
    skip = common.backend_skip(provider.backend, probe)
    if skip is not None and skip[0] == "skipped" and args.triton:
        return None  # --triton: measure what "auto" would not pick on CPU (the Triton interpreter) anyway
    if skip is not None and skip[0] == "skipped":
        return "skipped", skip[1] + "; --triton measures it anyway"
    return skip


# ---- the structure: BN-ReLU-conv layers ------------------------------------------------------------------------------
def bn_relu_conv_layers(eager: torch.nn.Module, image_size: int) -> int:
    """How many Conv2d of the eager twin take a ReLU of a BatchNorm output as input (a pre-activation shared by a
    projection shortcut counts for both of its convs), from one eval-mode forward of a [1, 3, s, s] input."""
    activations, bn_outputs, count = {}, {}, [0]

    def after_bn(module, inputs, out):
        (activations if isinstance(module, BatchNormReLU2d) else bn_outputs)[id(out)] = out

    def after_relu(module, inputs, out):
        if id(inputs[0]) in bn_outputs:
            activations[id(out)] = out

    def before_conv(module, inputs):
        count[0] += id(inputs[0]) in activations

    hooks = []
    for m in eager.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            hooks.append(m.register_forward_hook(after_bn))
        elif isinstance(m, torch.nn.ReLU):
            hooks.append(m.register_forward_hook(after_relu))
        elif isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_pre_hook(before_conv))
    was_training = eager.training
    try:
        device = next(eager.parameters()).device
        with torch.no_grad():
            eager.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        eager.train(was_training)
        for h in hooks:
            h.remove()
    return count[0]


# ---- counting kernels ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def is_kernel_op(name: str) -> bool:
    """Whether ATen op `name` (no namespace, no overload) computes data, i.e. would launch a kernel on a GPU: not in
    NON_KERNEL_OPS and, for some overload, writing an argument (in-place and out= ops, `_foreach_*_` included) or
    returning a tensor that is not a view of an input."""
    if name in NON_KERNEL_OPS:
        return False
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return True  # unknown to this torch: count it rather than hide it
    for overload in packet.overloads():
        schema = getattr(packet, overload)._schema
        if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
            return True
        for ret in schema.returns:
            if "Tensor" in str(ret.type) and (ret.alias_info is None or ret.alias_info.is_write):
                return True
    return False


def cpu_kernels(events) -> Counter:
    """The kernels of the profiler events `events` (CPU ops, each with what runs below it) by the module docstring's
    CPU rule, per op name."""
    tally: Counter = Counter()

    def visit(evt) -> None:
        name = evt.name
        if (name.startswith(TRITON_PREFIX)
                or name.startswith("fastresnet_ext::")
                or (name.startswith("aten::") and is_kernel_op(name[len("aten::"):]))):
            tally[name] += 1
        else:
            for child in evt.cpu_children:
                visit(child)

    for e in events:
        visit(e)
    return tally


def _descendants(evt) -> Iterator:
    yield evt
    for child in evt.cpu_children:
        yield from _descendants(child)


@contextlib.contextmanager
def count_triton_launches() -> Iterator[Optional[List[int]]]:
    """Yields [n]: n counts the Triton kernel launches inside the block (None without triton).

    Compiled kernels: triton.knobs.runtime.launch_enter_hook (a hook chain in triton 3.9, a plain attribute in
    earlier releases that have triton.knobs). The interpreter (TRITON_INTERPRET=1) calls no launch hook: its GridExecutor is wrapped instead,
    each launch also becoming a `triton::<kernel>` profiler range, so the ATen ops the interpreter runs inside it
    (host copies of the arguments) are not mistaken for kernels."""
    try:
        from triton import knobs
        from triton.runtime import interpreter
    except ImportError:
        yield None
        return
    launches = [0]

    def on_launch(metadata) -> None:
        launches[0] += 1

    executor_call = interpreter.GridExecutor.__call__

    def interpreted(self, *args, **kwargs):
        launches[0] += 1
        with torch.profiler.record_function(TRITON_PREFIX + self.fn.__name__):
            return executor_call(self, *args, **kwargs)

    hooks = knobs.runtime.launch_enter_hook
    chained = hasattr(hooks, "add")
    if chained:
        hooks.add(on_launch)
    else:
        knobs.runtime.launch_enter_hook = on_launch
    interpreter.GridExecutor.__call__ = interpreted
    try:
        yield launches
    finally:
        interpreter.GridExecutor.__call__ = executor_call
        if chained:
            hooks.remove(on_launch)
        else:
            knobs.runtime.launch_enter_hook = hooks


def _device_kind(evt) -> str:
    """"kernel", "gpu_memcpy", "gpu_memset" or "gpu_user_annotation" for a device-side profiler event."""
    if evt.activity_type:
        return evt.activity_type
    if evt.is_user_annotation:
        return "gpu_user_annotation"
    if evt.name.startswith(("Memcpy", "Memset")):
        return "gpu_memcpy" if evt.name.startswith("Memcpy") else "gpu_memset"
    return "kernel"


def profile_step(step: common.TrainStep, device: torch.device, provider: Provider) -> Dict[str, object]:
    """One profiled training step: kernels per step (total, optimizer, by op) and the host time breakdown."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with count_triton_launches() as launches, torch.profiler.profile(activities=activities) as prof:
        with torch.profiler.record_function(STEP_NAME):
            step.step()
            common.synchronize(device)
    events = prof.events()
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    step_evt = next(e for e in cpu if e.name == STEP_NAME)
    optimizer = [d for e in cpu if e.name.startswith(OPTIMIZER_PREFIX) for d in _descendants(e)]
    conv_us = sum(e.self_cpu_time_total for e in cpu if CONV_OP.match(e.name))
    step_us = step_evt.cpu_time_total
    opt_us = sum(e.cpu_time_total for e in cpu if e.name.startswith(OPTIMIZER_PREFIX))
    out: Dict[str, object] = {
        "profiled_step_ms": step_us / 1e3, "conv_self_ms": conv_us / 1e3, "optimizer_ms": opt_us / 1e3,
        "other_ms": (step_us - conv_us - opt_us) / 1e3, "conv_share": conv_us / step_us if step_us else None,
        "triton_launches": None if launches is None else launches[0],
        "kernels_per_step": None, "kernels_optimizer": None, "kernels_by_op": None,
    }
    if device.type == "cuda":
        device_events = [e for e in events if e.device_type == DeviceType.CUDA]
        kernels = [e for e in device_events if _device_kind(e) == "kernel"]
        if not kernels:
            out["kernel_count_note"] = "the profiler recorded no CUDA kernels (CUPTI unavailable?): not counted"
            return out
        optimizer_ids = {e.id for e in optimizer}
        out.update(kernels_per_step=len(kernels),
                   kernels_optimizer=sum(e.linked_correlation_id in optimizer_ids for e in kernels),
                   device_copies_per_step=sum(_device_kind(e) in ("gpu_memcpy", "gpu_memset") for e in device_events),
                   device_busy_ms=sum(e.time_range.elapsed_us() for e in kernels) / 1e3,
                   kernels_by_op=dict(Counter(e.name[:80] for e in kernels).most_common(15)),
                   kernel_count_note="CUDA kernel events of the profiler")
        return out
    if provider.compile_mode is not None:
        out["kernel_count_note"] = ("not counted: Inductor's CPU kernels are C++ functions the profiler does not "
                                    "see")
        return out
    tally = cpu_kernels([e for e in cpu if e.cpu_parent is None])
    out.update(kernels_per_step=sum(tally.values()),
               kernels_optimizer=sum(cpu_kernels([e for e in cpu if e.name.startswith(OPTIMIZER_PREFIX)]).values()),
               kernels_by_op=dict(tally.most_common()),
               kernel_count_note=("CPU ops that would be kernels (bench_overhead rule); Triton launches "
                                  + ("counted" if launches is not None else "not counted: triton.knobs or "
                                     "triton.runtime.interpreter not importable")))
    return out


# ---- the run ---------------------------------------------------------------------------------------------------------
def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]


def base_row(model_name: str, provider: Provider, args: argparse.Namespace, env: Dict[str, object]
             ) -> Dict[str, object]:
    """A row's fields before measuring: the run's environment and configuration, the provider, status "ok"."""
    return dict(env, bench="overhead", smoke=args.smoke, model=model_name, dtype=args.dtype, batch=args.batch,
                image_size=args.image_size, channels_last=True, threads=torch.get_num_threads(), warmup=args.warmup,
                reps=args.reps, provider=provider.name, backend=provider.backend, cuda_graph=provider.graph,
                compile_mode=provider.compile_mode, status="ok", reason=None)


def _over_budget(args: argparse.Namespace, start: float) -> bool:
    return args.time_budget is not None and time.perf_counter() - start > args.time_budget


def measure_model(model_name: str, providers: List[Provider], args: argparse.Namespace, env: Dict[str, object],
                  device: torch.device, start: float) -> List[Dict[str, object]]:
    """The rows of one model: every provider, timed in interleaved rounds, then profiled while the run's
    --time-budget (counted from `start`) lasts."""
    rows = {p.name: base_row(model_name, p, args, env) for p in providers}
    steps: Dict[str, common.TrainStep] = {}
    for p in providers:
        skip = skip_reason(p, device, args)
        if skip is not None:
            rows[p.name].update(status=skip[0], reason=skip[1])
            continue
        try:
            model = build_model(model_name, p, device, channels_last=True)
            steps[p.name] = common.TrainStep(model, args.batch, args.image_size, default_num_classes(model_name),
                                             args.dtype, device)
            if p.graph:
                steps[p.name].capture(args.warmup)
        except Exception as e:  # one failing provider must not stop the others: it becomes a row
            rows[p.name].update(status="error", reason=_reason(e))
        if p.backend == "auto":
            rows[p.name]["resolved_backend"] = resolve(torch.empty(2, 4, 2, 2, device=device), "auto")
    layers = bn_relu_conv_layers(steps["eager"].model, args.image_size) if "eager" in steps else None

    def run_once(name: str) -> Optional[Tuple[float, float]]:
        """(wall ms, process CPU ms) of one step, or None (and an error row) if it raised."""
        try:
            c0 = time.process_time()
            ms = common.time_calls(steps[name].step, 1, device)[0]
            return ms, (time.process_time() - c0) * 1e3
        except Exception as e:
            rows[name].update(status="oom" if common.is_oom(e) else "error", reason=_reason(e))
            del steps[name]
            return None

    warm_s = {name: 0.0 for name in steps}
    for _ in range(args.warmup):
        for name in list(steps):
            t = run_once(name)
            warm_s[name] += t[0] / 1e3 if t else 0.0
    wall: Dict[str, List[float]] = {name: [] for name in steps}
    cpu: Dict[str, List[float]] = {name: [] for name in steps}
    for rep in range(args.reps):
        order = list(steps)
        shift = rep % max(len(order), 1)
        for name in order[shift:] + order[:shift]:
            t = run_once(name)
            if t is not None:
                wall[name].append(t[0])
                cpu[name].append(t[1])
    for p in providers:
        if p.name not in steps:
            continue
        row = rows[p.name]
        row.update(warmup_s=round(warm_s[p.name], 3), ms_per_step=common.quantile(wall[p.name], 0.5),
                   ms_min=min(wall[p.name]), ms_max=max(wall[p.name]),
                   cpu_ms_per_step=common.quantile(cpu[p.name], 0.5), bn_relu_conv_layers=layers)
        if _over_budget(args, start):
            row.update(kernels_per_step=None, kernels_optimizer=None, kernel_count_note=(
                f"not profiled: time budget spent (--time-budget {args.time_budget:g} s)"))
            continue
        try:
            row.update(profile_step(steps[p.name], device, p))
        except Exception as e:
            row.update(status="error", reason="profiling: " + _reason(e))
    for p in providers:
        row = rows[p.name]
        if row["status"] != "ok" or row["kernels_per_step"] is None:
            continue
        if p.graph:  # a replay's kernels have no Python caller: the optimizer's are those of the eager twin's step
            twin = rows.get(p.name[:-len("+graph")], {})
            row["kernels_optimizer"] = twin.get("kernels_optimizer") if twin.get("status") == "ok" else None
            row["kernel_count_note"] += (f"; one graph replay, its optimizer kernels those of the same step launched "
                                         f"eagerly ({twin.get('provider')})")
        if row["kernels_optimizer"] is not None:
            row["kernels_forward_backward"] = row["kernels_per_step"] - row["kernels_optimizer"]
            row["kernels_per_conv_layer"] = row["kernels_forward_backward"] / layers if layers else None
    eager = rows["eager"] if rows["eager"]["status"] == "ok" else None
    for row in rows.values():
        if row["status"] == "ok":
            row["host_cost_vs_eager"] = row["ms_per_step"] / eager["ms_per_step"] if eager else None
            row["cpu_cost_vs_eager"] = row["cpu_ms_per_step"] / eager["cpu_ms_per_step"] if eager else None
    steps.clear()
    if args.compile:
        torch._dynamo.reset()
    return list(rows.values())


def run(args: argparse.Namespace) -> List[Dict[str, object]]:
    """Measure every model, appending its rows to args.out as it finishes; returns all rows."""
    device = common.resolve_device(args.device)
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    env = common.environment(device)
    out = args.out or common.default_out("overhead", env)
    names = [p.name for p in all_providers()]
    chosen = set(select(names, args.providers, "providers")) | {"eager"}
    providers = [p for p in all_providers() if p.name in chosen]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        default_num_classes(m)  # validates the name before anything runs
    print(f"bench_overhead: {models} x {[p.name for p in providers]} on {env['device']}, batch {args.batch}, "
          f"{args.image_size}², {args.threads} thread(s), {args.warmup} warm-up + {args.reps} rounds -> {out}",
          flush=True)
    rows: List[Dict[str, object]] = []
    start = time.perf_counter()
    for m in models:
        if _over_budget(args, start):
            new = [dict(base_row(m, p, args, env), status="skipped",
                        reason=f"time budget spent (--time-budget {args.time_budget:g} s) before this model")
                   for p in providers]
        else:
            new = measure_model(m, providers, args, env, device, start)
        common.write_rows(out, new)
        rows += new
        for r in new:
            took = f"[{time.perf_counter() - start:7.1f}s] {m:18s} {r['provider']:24s}"
            if r["status"] != "ok":
                print(f"{took} {r['status']}: {r['reason']}", flush=True)
                continue
            kernels = "–" if r["kernels_per_step"] is None else f"{r['kernels_per_step']:6d}"
            conv = "" if r.get("conv_share") is None else f"  conv {r['conv_share']:.0%} of the profiled step"
            print(f"{took} {r['ms_per_step']:9.2f} ms ({r['host_cost_vs_eager'] or float('nan'):.2f}x eager)  "
                  f"kernels/step {kernels}{conv}", flush=True)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names")
    p.add_argument("--providers", default="*", help="comma-separated shell patterns over "
                   f"{[q.name for q in all_providers()]}; eager always runs (the reference of the ratios)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--image-size", type=int, default=4)
    p.add_argument("--dtype", default="fp32", choices=tuple(common.DTYPES), help="bf16: autocast, fp32 parameters")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of every provider")
    p.add_argument("--reps", type=int, default=21, help="timed rounds, one step of every provider each")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the eager twin")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; past them a model is recorded as "
                   "skipped and a provider is not profiled (its timing rows stay)")
    p.add_argument("--triton", action="store_true", help="on CPU also time the backends 'auto' would not pick "
                   "there (the Triton backends, under TRITON_INTERPRET=1: a measure of the interpreter)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="JSON Lines file to append to (default: $FASTRESNET_BENCH_DIR or "
                   "./benchmark-results/, overhead_<device>_<run id>.jsonl)")
    p.add_argument("--smoke", action="store_true", help=f"tiny run that checks the harness: {SMOKE_MODEL}, 1 "
                   "warm-up step, 3 rounds")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.warmup, args.reps = SMOKE_MODEL, 1, 3
    for name, least in (("batch", 1), ("image_size", 1), ("threads", 1), ("warmup", 0), ("reps", 1)):
        if getattr(args, name) < least:
            raise SystemExit(f"--{name.replace('_', '-')}: expected an int >= {least}, got {getattr(args, name)}")
    return args


def main(argv=None) -> List[Dict[str, object]]:
    rows = run(parse_args(argv))
    from benchmarks.report import overhead_table
    print(overhead_table(rows))
    return rows


if __name__ == "__main__":
    main()
