"""Memory against depth for each checkpoint mode: bytes saved for backward, peak memory and the step-time cost of
recomputation, eager PyTorch beside fastresnet, on full pre-activation bottleneck CIFAR ResNets of depth 9n+2
(preact_resnet164 → 1001). Runs on CPU and on a GPU.

    python -m benchmarks.bench_memory                                   # GPU if available: depths 164 … 1001
    python -m benchmarks.bench_memory --device cpu --depths 164,578,1001 --batch 8
    python -m benchmarks.bench_memory --plot-from benchmarks/results/memory_cpu_*.jsonl   # PNG from rows only
    python -m benchmarks.bench_memory --cpu-smoke                       # tiny CPU run that checks the harness

Per depth and mode (`eager`: the unconverted twin; `none`, `unit`, `segment`: `ResNet.set_checkpoint` on the fused
net, backend --backend) one row:
- saved_bytes: activation bytes autograd saves for backward in one training forward + loss, exact
  (`fastresnet.memory.measure_saved_bytes`: distinct storages from saved-tensor hooks, the model's own parameters and
  buffers left out; saved_bytes_with_params includes them), and planned_saved_bytes, the planner's prediction
  (`fastresnet.memory.plan`), with its relative error;
- peak memory of two training steps (forward, backward, SGD momentum: `common.TrainStep`) in a fresh process per
  cell: on CPU the peak RSS (VmHWM, reset just before the first step) and its growth over the RSS at that moment;
  on a GPU
  torch.cuda.max_memory_allocated (peak_mem_bytes) and its growth over the bytes allocated before the first step;
  beside them the planner's peak (planned_peak_bytes, and planned_step_bytes = its part above parameters and input);
  on CPU also peak_live_bytes, the most tensor bytes alive during a third step (profiler allocation events, free of
  malloc's caching), against planned_live_bytes (the plan less parameters, input and the existing momentum);
- the step time of every mode, measured in the same process in interleaved rounds (one step of each mode per round,
  the first round discarded): wall-clock median, and on CPU also the process CPU time per step (what the step
  computes; on a shared machine wall time mostly measures the other tenants), with ratios to "none" and to eager.
  On CPU the torch threads are --threads (default 1, the least noisy measure on a shared machine).
- on a GPU, per budget of --budgets-gb, the largest batch that fits, searched in a fresh process capped with
  torch.cuda.set_per_process_memory_fraction, and the planner's prediction.
A plot (PNG) of saved bytes and peak growth against depth per mode is written from the rows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from benchmarks import common
from fastresnet import memory
from fastresnet.checkpoint import save_png
from fastresnet.backends import resolve
from fastresnet.convert import unconvert
from fastresnet.models import cifar_resnet  # the zoo's CIFAR builder, for depths the registry does not name

DEPTHS = (164, 371, 578, 794, 1001)  # 9n+2 for n = 18, 41, 64, 88, 111: evenly spaced from ResNet-164 to -1001
MODES = ("eager", "none", "unit", "segment")


def build(depth: int, backend: Optional[str], device: torch.device, mode: str = "none") -> torch.nn.Module:
    """Full pre-activation bottleneck CIFAR ResNet-depth (the zoo's preact_resnet164/1001 recipe at any 9n+2): fused
    layers on `backend` with checkpoint `mode`, or for mode "eager" its eager twin (`fastresnet.unconvert`); seed 0,
    channels_last."""
    if depth < 11 or (depth - 2) % 9:
        raise ValueError(f"depth: expected 9n+2 with n >= 1, got {depth}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    torch.manual_seed(0)
    with device:
        model = cifar_resnet("bottleneck", depth, 10, "full_preact", **({} if backend is None else {"backend": backend}))
    if mode == "eager":
        model = unconvert(model, inplace=True)
    else:
        model.set_checkpoint(mode)
    return model.to(memory_format=torch.channels_last)


def provider(mode: str, backend: str) -> str:
    """The row's provider: "eager", or "fastresnet:<backend>" with "+unit" / "+segment" for recomputation."""
    if mode == "eager":
        return "eager"
    return f"fastresnet:{backend}" + ("" if mode == "none" else f"+{mode}")


def largest_batch(fits: Callable[[int], bool], start: int, limit: int, granularity: int) -> Tuple[int, int, str]:
    """The largest batch b (a multiple of granularity, ≤ limit) with fits(b), assuming fits is monotone.

    Doubles from `start` until a batch fails or exceeds `limit`, then bisects. Returns (batch, probes, note); batch 0
    if not even `granularity` fits, `limit` (note "≥") if the limit fits."""
    if not 1 <= granularity <= start <= limit:
        raise ValueError(f"granularity, start, limit: expected 1 <= {granularity} <= {start} <= {limit}")
    probes, lo, hi, b = 0, 0, None, start
    while hi is None:
        probes += 1
        if fits(b):
            lo = b
            if b == limit:
                return limit, probes, f"≥ {limit} (the search limit)"
            b = min(2 * b, limit)
        else:
            hi = b
    while hi - lo > granularity:
        mid = (lo + hi) // 2 // granularity * granularity
        if mid <= lo:
            break
        probes += 1
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, probes, f"largest fitting multiple of {granularity}"


# ---- one cell in a fresh process: peak memory (and on a GPU the largest batch under a cap) -------------------------
def _reset_peak_rss() -> str:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS (Linux clear_refs "5"); returns what the
    peak will mean. (ru_maxrss cannot serve: Linux carries a forking parent's high-water mark into the child.)"""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "cpu_peak_rss"
    except OSError:
        return "cpu_peak_rss_since_process_start"


def cell(depth: int, mode: str, backend: str, dtype: str, batch: int, image_size: int, device: torch.device,
         budget_gb: Optional[float], granularity: int) -> Dict[str, object]:
    """Peak memory of two training steps of one (depth, mode) in this (fresh) process; with `budget_gb` (CUDA)
    instead the largest batch that runs two steps under a memory cap of that many GB."""
    model = build(depth, None if mode == "eager" else backend, device, mode)
    if budget_gb is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gb * 1e9 / total), device)

        def fits(b: int) -> bool:
            model.zero_grad(set_to_none=True)
            common.reset_memory(device)
            try:
                step = common.TrainStep(model, b, image_size, 10, dtype, device)
                step.step()
                step.step()
                common.synchronize(device)
                return True
            except Exception as e:
                if common.is_oom(e):
                    return False
                raise
        found, probes, note = largest_batch(fits, granularity, 1 << 16, granularity)
        return {"max_batch": found, "max_batch_probes": probes, "max_batch_note": note}
    step = common.TrainStep(model, batch, image_size, 10, dtype, device)
    common.reset_memory(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
    else:
        kind, before = _reset_peak_rss(), memory.proc_status_bytes("VmRSS")
    step.step()
    step.step()
    common.synchronize(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mem_bytes": peak, "peak_growth_bytes": peak - before, "peak_kind": "cuda_max_memory_allocated"}
    peak = memory.process_peak_rss()
    live = memory.measure_peak_live_bytes(step.step)  # a third step: exact live tensor bytes, no malloc caching
    return {"peak_rss_bytes": peak, "peak_growth_bytes": peak - before, "peak_kind": kind, "peak_live_bytes": live}


def run_cell(args: argparse.Namespace, depth: int, mode: str, budget_gb: Optional[float] = None) -> Dict[str, object]:
    """`cell` in a fresh Python process; a failure becomes {"status", "reason"}."""
    spec = dict(depth=depth, mode=mode, backend=args.backend, dtype=args.dtype, batch=args.batch,
                image_size=args.image_size, device=args.device, budget_gb=budget_gb, granularity=args.granularity,
                threads=args.threads)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_memory", "--cell", json.dumps(spec)],
                          cwd=common.REPO_ROOT, capture_output=True, text=True, timeout=args.cell_timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "oom" if "out of memory" in err else "error", "reason": err[:500]}
    return json.loads(lines[-1])


def _cell_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    torch.set_num_threads(spec.pop("threads"))
    spec["device"] = common.resolve_device(spec["device"])
    print(json.dumps(cell(**spec)), flush=True)


# ---- the sweep ------------------------------------------------------------------------------------------------------
def _saved(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: str) -> Tuple[int, int]:
    amp = common.DTYPES[dtype]
    with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        return memory.measure_saved_bytes(model, x, y)


def _time_modes(models: Dict[str, torch.nn.Module], args, device: torch.device) -> Dict[str, Dict[str, float]]:
    """Interleaved rounds of one step per mode; medians of wall ms and (CPU) process CPU ms, first round dropped."""
    steps = {m: common.TrainStep(model, args.batch, args.image_size, 10, args.dtype, device)
             for m, model in models.items()}
    wall: Dict[str, List[float]] = {m: [] for m in steps}
    cpu: Dict[str, List[float]] = {m: [] for m in steps}
    for _ in range(args.rounds + 1):
        for m, step in steps.items():
            common.synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            step.step()
            common.synchronize(device)
            wall[m].append((time.perf_counter() - t0) * 1e3)
            cpu[m].append((time.process_time() - c0) * 1e3)
    return {m: {"ms_per_step": statistics.median(wall[m][1:]), "cpu_ms_per_step": statistics.median(cpu[m][1:])}
            for m in steps}


def measure_depth(depth: int, args: argparse.Namespace, env: Dict[str, object],
                  device: torch.device) -> List[Dict[str, object]]:
    """The rows of one depth: every mode of args.modes."""
    models = {m: build(depth, None if m == "eager" else args.backend, device, m) for m in args.modes}
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(10, (args.batch,), generator=g).to(device)
    times = _time_modes(models, args, device)
    rows = []
    for m, model in models.items():
        row = dict(env, bench="memory", smoke=args.cpu_smoke, model=f"preact_bottleneck{depth}", depth=depth,
                   provider=provider(m, args.backend), mode=m, backend=None if m == "eager" else args.backend,
                   dtype=args.dtype, batch=args.batch, image_size=args.image_size, channels_last=True,
                   threads=torch.get_num_threads(), status="ok", peak_mem_bytes=None, max_batch=None, **times[m])
        act, everything = _saved(model, x, y, args.dtype)
        pl = memory.plan(model, args.batch, args.image_size, args.dtype)
        row.update(saved_bytes=act, saved_bytes_with_params=everything, planned_saved_bytes=pl.saved_bytes,
                   planned_saved_error=pl.saved_bytes / act - 1, planned_peak_bytes=pl.peak_bytes,
                   planned_step_bytes=pl.peak_bytes - pl.params_bytes - pl.input_bytes,
                   planned_live_bytes=pl.peak_bytes - pl.params_bytes - pl.input_bytes - pl.optimizer_bytes,
                   segment_size=pl.segment_size, segments=pl.breakdown["segments"])
        row.update(run_cell(args, depth, m))
        if row.get("peak_live_bytes"):
            row["planned_live_error"] = row["planned_live_bytes"] / row["peak_live_bytes"] - 1
        if device.type == "cuda":
            for gb in args.budgets_gb:
                found = run_cell(args, depth, m, gb)
                row[f"max_batch_{gb:g}gb"] = found.get("max_batch")
                row[f"planned_max_batch_{gb:g}gb"] = memory.largest_batch(model, int(gb * 1e9), args.image_size,
                                                                          args.dtype)
        rows.append(row)
    by_mode = {r["mode"]: r for r in rows}
    time_key = "cpu_ms_per_step" if device.type == "cpu" else "ms_per_step"
    for r in rows:
        for ref, name in (("eager", "vs_eager"), ("none", "vs_none")):
            base = by_mode.get(ref)
            r[f"saved_{name}"] = r["saved_bytes"] / base["saved_bytes"] if base else None
            r[f"step_time_{name}"] = r[time_key] / base[time_key] if base else None
            growth, base_growth = r.get("peak_growth_bytes"), base.get("peak_growth_bytes") if base else None
            r[f"peak_growth_{name}"] = growth / base_growth if growth and base_growth else None
        r["memory_vs_eager"] = r["peak_growth_vs_eager"]
    return rows


def run(args: argparse.Namespace) -> List[Dict[str, object]]:
    """Run the sweep, appending rows to args.out as each depth finishes; returns all rows."""
    device = common.resolve_device(args.device)
    args.device = str(device)
    torch.set_num_threads(args.threads)
    # the backend that runs: "auto" resolved for the benchmark's activations
    args.backend = resolve(torch.empty(2, 4, 2, 2, device=device), args.backend)
    env = common.environment(device)
    out = Path(args.out or common.default_out("memory", env))
    rows: List[Dict[str, object]] = []
    start = time.perf_counter()
    print(f"bench_memory: depths {args.depths} x {args.modes} ({args.dtype}, batch {args.batch}, "
          f"{args.image_size}², backend {args.backend}) on {env['device']} -> {out}", flush=True)
    for depth in args.depths:
        try:
            new = measure_depth(depth, args, env, device)
        except Exception as e:  # one failing depth must not stop the sweep: it becomes rows
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
            new = [dict(env, bench="memory", smoke=args.cpu_smoke, model=f"preact_bottleneck{depth}", depth=depth,
                        provider=provider(m, args.backend), mode=m, dtype=args.dtype, batch=args.batch,
                        image_size=args.image_size, status="oom" if common.is_oom(e) else "error", reason=reason,
                        peak_mem_bytes=None, max_batch=None) for m in args.modes]
        common.write_rows(out, new)
        rows += new
        for r in new:
            if r["status"] != "ok":
                print(f"[{time.perf_counter() - start:7.1f}s] depth {depth:5d} {r['mode']:8s} {r['status']}: "
                      f"{r['reason']}", flush=True)
                continue
            print(f"[{time.perf_counter() - start:7.1f}s] depth {depth:5d} {r['mode']:8s} saved "
                  f"{r['saved_bytes'] / 2**20:9.1f} MiB ({_ratio(r['saved_vs_eager'])} eager, planned "
                  f"{r['planned_saved_error']:+.2%}) peak growth {_mib(r.get('peak_growth_bytes'))} MiB "
                  f"(planned {r['planned_step_bytes'] / 2**20:.1f}), live {_mib(r.get('peak_live_bytes'))} MiB "
                  f"(planned {r['planned_live_bytes'] / 2**20:.1f}) step {r['ms_per_step']:.0f} ms wall, "
                  f"{r['cpu_ms_per_step']:.0f} ms CPU ({_ratio(r['step_time_vs_none'])} none)", flush=True)
    if not args.no_plot and rows:
        print(f"plot: {plot(rows, Path(args.plot_dir or common.output_dir() / 'plots'))}")
    return rows


def _ratio(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.3f}×"


def _mib(v: Optional[int]) -> str:
    return "–" if v is None else f"{v / 2**20:.1f}"


# ---- the plot ---------------------------------------------------------------------------------------------------------
def plot(rows: List[Dict[str, object]], out_dir: Path) -> List[Path]:
    """memory_depth_<device>_<dtype>.png per device and dtype: against depth, one line per mode, the bytes saved
    for backward, the peak memory growth of the step (CPU: peak RSS; GPU: max_memory_allocated) and, where measured
    (CPU), the peak live tensor bytes. Returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    ok = [r for r in rows if r["status"] == "ok" and r.get("bench") == "memory" and "mode" in r]
    for key in sorted({(r["device"], r["dtype"]) for r in ok}):
        rs = [r for r in ok if (r["device"], r["dtype"]) == key]
        r0 = rs[0]
        panels = [("saved_bytes", "MiB saved for backward")]
        if any(r.get("peak_live_bytes") for r in rs):
            panels.append(("peak_live_bytes", "MiB, peak live tensors (profiler)"))
        panels.append(("peak_growth_bytes", "MiB, peak RSS growth" if r0["device"] == "cpu"
                       else "MiB, max_memory_allocated growth"))
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
        for ax, (field, label) in zip(axes, panels):
            for m in [m for m in MODES if any(r["mode"] == m for r in rs)]:
                pts = sorted((r["depth"], r.get(field)) for r in rs if r["mode"] == m and r.get(field))
                ax.plot([d for d, _ in pts], [v / 2**20 for _, v in pts], "o-", label=m)
            ax.set(xlabel="depth", ylabel=label, yscale="log")
        axes[0].legend(fontsize=8)
        backend = next((r["backend"] for r in rs if r.get("backend")), "")
        fig.suptitle(f"preact bottleneck ResNets, {r0['device']}, {r0['dtype']}, batch {r0['batch']}, "
                     f"{r0['image_size']}², backend {backend}")
        fig.tight_layout()
        slug = "".join(c if c.isalnum() else "-" for c in str(r0["device"]).lower()).strip("-")
        path = out_dir / f"memory_depth_{slug}_{r0['dtype']}.png"
        save_png(fig, str(path), dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--depths", type=_ints, default=list(DEPTHS), help="comma-separated depths 9n+2")
    p.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES), help=f"subset of {','.join(MODES)}")
    p.add_argument("--backend", default="auto", help="fastresnet backend of the fused modes")
    p.add_argument("--dtype", default="fp32", choices=tuple(common.DTYPES))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (one step per mode each), after one warm-up")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on CPU, torch's on GPU)")
    p.add_argument("--budgets-gb", type=lambda s: [float(v) for v in s.split(",")], default=[16.0, 80.0],
                   help="GPU only: memory budgets (GB) for the largest-batch search")
    p.add_argument("--granularity", type=int, default=8, help="resolution of the largest-batch search")
    p.add_argument("--cell-timeout", type=float, default=3600, help="seconds per fresh-process cell")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="JSON Lines file to append to (default: <output folder>/"
                   "memory_<device>_<run id>.jsonl, common.output_dir)")
    p.add_argument("--plot-dir", default=None, help="default: <the output folder>/plots (common.output_dir)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--plot-from", nargs="+", type=Path, default=None, metavar="FILE",
                   help="only write the plot from these rows files")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run: depth 11, batch 2, 8x8")
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: one fresh-process cell
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.device, args.depths, args.batch, args.image_size, args.rounds = "cpu", [11], 2, 8, 1
        args.no_plot = True
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: expected a subset of {MODES}, got {bad}")
    if any((d - 2) % 9 or d < 11 for d in args.depths):
        raise SystemExit(f"--depths: expected values 9n+2 with n >= 1, got {args.depths}")
    if args.batch < 2 or args.image_size < 4 or args.rounds < 1:
        raise SystemExit(f"--batch, --image-size, --rounds: expected >= 2, >= 4, >= 1, got {args.batch}, "
                         f"{args.image_size}, {args.rounds}")
    if args.threads is None:
        args.threads = 1 if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu" \
            else torch.get_num_threads()
    return args


def main(argv=None) -> List[Dict[str, object]]:
    args = parse_args(argv)
    if args.cell is not None:
        _cell_main(args.cell)
        return []
    if args.plot_from is not None:
        print(plot(common.read_rows(args.plot_from), Path(args.plot_dir or common.output_dir() / "plots")))
        return []
    rows = run(args)
    from benchmarks.report import memory_table
    print(memory_table(rows))
    return rows


if __name__ == "__main__":
    main()
