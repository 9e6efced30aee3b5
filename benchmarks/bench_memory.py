"""Memory against depth: peak training memory at a fixed batch, and the largest batch that fits, for eager PyTorch
vs each fastresnet backend on full pre-activation bottleneck CIFAR ResNets of depth 9n+2 (preact_resnet164 → 1001).

    python -m benchmarks.bench_memory                      # GPU: depths 164 … 1001, fp32, batch 128
    python -m benchmarks.bench_memory --cpu-smoke          # tiny CPU run that checks the harness

Rows name the nets `preact_bottleneck<depth>`: depths 164 and 1001 are the zoo's preact_resnet164 / preact_resnet1001.
Peak memory = torch.cuda.max_memory_allocated over two training steps (forward, backward, SGD: `common.TrainStep`)
of a freshly reset allocator: weights, gradients, momentum, activations kept for backward, workspaces. Largest batch:
doubling from --batch until a step runs out of memory, then bisection to a multiple of --granularity; a batch
"fits" when two steps run without an out-of-memory error in this process (the caching allocator's fragmentation
included). On CPU neither exists: one step runs to check the path, memory fields are None, and the rows say why.
Unavailable backends are rows with the reason; the harness never stops on one cell.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from benchmarks import common
from fastresnet.backends import BACKEND_NAMES
from fastresnet.convert import unconvert
from fastresnet.models import cifar_resnet  # the zoo's CIFAR builder, for depths the registry does not name

DEPTHS = (164, 371, 578, 794, 1001)  # 9n+2 for n = 18, 41, 64, 88, 111: evenly spaced from ResNet-164 to -1001


def build(depth: int, backend: Optional[str], device: torch.device) -> torch.nn.Module:
    """Full pre-activation bottleneck CIFAR ResNet-depth (the zoo's preact_resnet164/1001 recipe at any 9n+2), with
    fused layers on `backend`, or its eager twin (`fastresnet.convert.unconvert`) for backend None; seed 0,
    channels_last."""
    if depth < 11 or (depth - 2) % 9:
        raise ValueError(f"depth: expected 9n+2 with n >= 1, got {depth}")
    torch.manual_seed(0)
    with device:
        model = cifar_resnet("bottleneck", depth, 10, "full_preact", **({} if backend is None else {"backend": backend}))
    model = unconvert(model, inplace=True) if backend is None else model
    return model.to(memory_format=torch.channels_last)


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


def _steps(model: torch.nn.Module, batch: int, image_size: int, dtype: str, device: torch.device, n: int) -> None:
    step = common.TrainStep(model, batch, image_size, 10, dtype, device)
    for _ in range(n):
        step.step()
    common.synchronize(device)


def measure(depth: int, backend: Optional[str], dtype: str, device: torch.device, args) -> Dict[str, object]:
    """Peak memory at args.batch and (if depth is in args.max_batch_depths, GPU only) the largest batch."""
    common.reset_memory(device)
    model = None
    try:
        model = build(depth, backend, device)
        common.reset_memory(device)
        _steps(model, args.batch, args.image_size, dtype, device, 1 if device.type == "cpu" else 2)
        out: Dict[str, object] = {"status": "ok", "peak_mem_bytes": common.peak_memory(device)}
        if device.type == "cpu":
            out["reason"] = common.CPU_PEAK_REASON + "; one training step ran to check the path"
            out["max_batch_note"] = "largest batch not searched on CPU (the search needs CUDA out-of-memory errors)"
        elif depth in args.max_batch_depths:
            def fits(b: int) -> bool:
                model.zero_grad(set_to_none=True)  # a failed probe may have left gradients behind
                common.reset_memory(device)
                try:
                    _steps(model, b, args.image_size, dtype, device, 2)
                    return True
                except Exception as e:
                    if common.is_oom(e):
                        return False
                    raise
            t0 = time.perf_counter()
            out["max_batch"], out["max_batch_probes"], out["max_batch_note"] = largest_batch(
                fits, args.batch, args.max_batch_limit, args.granularity)
            out["max_batch_search_s"] = round(time.perf_counter() - t0, 2)
        return out
    except Exception as e:  # one failing cell must not stop the sweep: it becomes a row
        return {"status": "oom" if common.is_oom(e) else "error",
                "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]}
    finally:
        model = None  # free this cell's memory before the next one
        common.reset_memory(device)


def run(args: argparse.Namespace) -> List[Dict[str, object]]:
    """Run the sweep, appending rows to args.out as each cell finishes; returns all rows."""
    device = common.resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    env = common.environment(device)
    out = args.out or common.default_out("memory", env)
    backends = [b for b in BACKEND_NAMES if b != "auto"]
    providers = [("eager", None)] + [(f"fastresnet:{b}", b) for b in backends if args.backends == "*"
                                     or b in args.backends.split(",")]
    rows: List[Dict[str, object]] = []
    start = time.perf_counter()
    print(f"bench_memory: depths {args.depths} x {[p for p, _ in providers]} x {args.dtypes} on {env['device']} "
          f"-> {out}", flush=True)
    for dtype in args.dtypes:
        for depth in args.depths:
            eager_peak = None
            for name, backend in providers:
                row = dict(env, bench="memory", smoke=args.cpu_smoke, model=f"preact_bottleneck{depth}", depth=depth,
                           provider=name, backend=backend, dtype=dtype, batch=args.batch, image_size=args.image_size,
                           channels_last=True, cudnn_benchmark=True, peak_mem_bytes=None, max_batch=None)
                skip = None
                if backend is not None:
                    probe = torch.empty(2, 4, 2, 2, device=device, dtype=common.DTYPES[dtype] or torch.float32)
                    skip = common.backend_skip(backend, probe)
                if skip is not None:
                    row.update(status=skip[0], reason=skip[1])
                else:
                    row.update(measure(depth, backend, dtype, device, args))
                if name == "eager":
                    eager_peak = row["peak_mem_bytes"]
                row["memory_vs_eager"] = (row["peak_mem_bytes"] / eager_peak
                                          if eager_peak and row["peak_mem_bytes"] else None)
                common.write_rows(out, [row])
                rows.append(row)
                peak = row["peak_mem_bytes"]
                print(f"[{time.perf_counter() - start:6.1f}s] depth {depth:5d} {dtype:4s} {name:22s} "
                      f"{row['status']:11s}"
                      f" peak {'–' if peak is None else f'{peak / 2**30:.2f} GiB'}"
                      f" max batch {row.get('max_batch') or '–'} {row.get('reason') or ''}", flush=True)
    return rows


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--depths", type=_ints, default=list(DEPTHS), help="comma-separated depths 9n+2")
    p.add_argument("--max-batch-depths", type=_ints, default=[DEPTHS[0], DEPTHS[-1]],
                   help="depths at which the largest batch is searched (about 10 training steps of growing size)")
    p.add_argument("--backends", default="*", help="fastresnet backends beside eager: '*' or a comma list")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp32"], help="subset of fp32,bf16")
    p.add_argument("--batch", type=int, default=128, help="batch of the peak-memory measurement; search start")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--max-batch-limit", type=int, default=8192)
    p.add_argument("--granularity", type=int, default=8, help="resolution of the largest-batch search")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="JSON Lines file to append to (default: benchmarks/results/"
                   "memory_<device>_<run id>.jsonl)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny CPU run: depths 11 and 20, batch 2, 8x8, one step per cell")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.device, args.depths, args.batch, args.image_size = "cpu", [11, 20], 2, 8
        args.max_batch_depths = []
    for d in args.dtypes:
        if d not in common.DTYPES:
            raise SystemExit(f"--dtypes: expected a subset of {tuple(common.DTYPES)}, got {d!r}")
    if args.max_batch_depths and not 1 <= args.granularity <= args.batch <= args.max_batch_limit:
        raise SystemExit(f"--granularity, --batch, --max-batch-limit: expected 1 <= {args.granularity} <= "
                         f"{args.batch} <= {args.max_batch_limit}")
    known = [b for b in BACKEND_NAMES if b != "auto"]
    if args.backends != "*" and not set(args.backends.split(",")) <= set(known):
        raise SystemExit(f"--backends: expected '*' or a comma list of {known}, got {args.backends!r}")
    return args


def main(argv=None) -> List[Dict[str, object]]:
    rows = run(parse_args(argv))
    from benchmarks.report import memory_table
    print(memory_table(rows))
    return rows


if __name__ == "__main__":
    main()
