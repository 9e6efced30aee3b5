"""Shared benchmark machinery (docs/architecture.md §5): environment metadata, timing, result rows, and the training
step that every provider times.

Rows are flat dicts written as JSON Lines; every row carries the environment of `environment()` (device name or
"cpu", host CPU model and count, torch / CUDA / cuDNN / triton versions, date, git revision), so a results file is self-describing.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import fastresnet
from fastresnet.backends import get_backend_impl

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"   # the committed rows the README cites; runs never write here
OUTPUT_DIR_ENV = "FASTRESNET_BENCH_DIR"
# dtype name in rows -> autocast dtype (None: plain fp32, no autocast). Parameters stay fp32 in both.
DTYPES: Dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16}
CPU_PEAK_REASON = "CPU: no peak-memory statistic (torch.cuda.max_memory_allocated is CUDA-only); reported as None"


# ---- environment ---------------------------------------------------------------------------------------------------
def git_revision() -> str:
    """`git rev-parse HEAD` of the repository holding this file, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _package_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The host CPU's model name (/proc/cpuinfo), else platform.processor(), else "unknown": host-bound timings
    depend on it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_name(device: torch.device) -> str:
    """The GPU's name (e.g. "NVIDIA H100 80GB HBM3"), or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def environment(device: torch.device) -> Dict[str, object]:
    """Metadata every row carries: what ran where, when, from which revision."""
    now = datetime.now(timezone.utc)
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _package_version("triton"),
        "python": platform.python_version(),
        "fastresnet": fastresnet.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "git_rev": git_revision(),
        "date": now.isoformat(timespec="seconds"),
        "run_id": now.strftime("%Y%m%dT%H%M%SZ"),
    }


def resolve_device(name: Optional[str]) -> torch.device:
    """"cuda" if available when name is None, else the named device (which must exist)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {name!r} requested but torch.cuda.is_available() is False")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device: expected 'cpu' or 'cuda[:i]', got {name!r}")
    return device


# ---- result rows ---------------------------------------------------------------------------------------------------
def output_dir() -> Path:
    """The folder benchmark runs write to unless given --out: $FASTRESNET_BENCH_DIR, else benchmark-results/ in the
    current folder — a place the user chooses, not the checkout's committed benchmarks/results/."""
    return Path(os.environ.get(OUTPUT_DIR_ENV) or "benchmark-results")


def default_out(bench: str, env: Dict[str, object]) -> Path:
    """<output_dir()>/<bench>_<device slug>_<run id>.jsonl."""
    slug = "".join(c if c.isalnum() else "-" for c in str(env["device"]).lower()).strip("-")
    return output_dir() / f"{bench}_{slug}_{env['run_id']}.jsonl"


def write_rows(path: Path, rows: Iterable[Dict[str, object]]) -> None:
    """Append rows to a JSON Lines file (created with its folders if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_rows(paths: Iterable[Path]) -> List[Dict[str, object]]:
    """All rows of the given JSON Lines files, in file order."""
    rows = []
    for p in paths:
        with Path(p).open() as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


# ---- timing and memory ---------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], iters: int, device: torch.device) -> List[float]:
    """Milliseconds of each of `iters` back-to-back calls of fn: CUDA events around each call on a GPU (the GPU
    timeline, host launch gaps included), time.perf_counter on CPU."""
    if iters < 1:
        raise ValueError(f"iters: expected >= 1, got {iters}")
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def quantile(values: List[float], q: float) -> float:
    """The q-quantile (0 ≤ q ≤ 1) of values by linear interpolation; q = 0.5 is the median."""
    return float(torch.tensor(values, dtype=torch.float64).quantile(q))


def copy_gbps(n_bytes: int, device: torch.device) -> float:
    """Device-to-device copy bandwidth: 2·n_bytes (read + write) / median time of 10 copies."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = quantile(time_calls(lambda: dst.copy_(src), 10, device), 0.5)
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def matmul_tflops(k: int, device: torch.device) -> float:
    """bf16 [k, k] @ [k, k] throughput: 2·k³ / median time of 10 products."""
    a = torch.randn(k, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, k, device=device, dtype=torch.bfloat16)
    a @ b
    ms = quantile(time_calls(lambda: a @ b, 10, device), 0.5)
    return 2 * k**3 / (ms * 1e-3) / 1e12


def ceilings(device: torch.device) -> Dict[str, object]:
    """The device's measured ceilings, as row fields: a 1 GiB copy and an 8192² bf16 matmul on a GPU (64 MiB and
    256² on CPU, where they only exercise the code)."""
    gpu = device.type == "cuda"
    return {"ceiling_copy_gbps": copy_gbps(2**30 if gpu else 2**26, device),
            "ceiling_matmul_tflops": matmul_tflops(8192 if gpu else 256, device), "ceiling_matmul_dtype": "bf16"}


def iterations_for(step_ms: float, seconds: float, min_iters: int, max_iters: int) -> int:
    """How many timed steps fit in `seconds` at step_ms each, clamped to [min_iters, max_iters]."""
    return max(min_iters, min(max_iters, int(seconds * 1e3 / max(step_ms, 1e-3))))


def is_oom(exc: BaseException) -> bool:
    """Whether exc is an out-of-memory failure (the caching allocator's, or a cuDNN / cuBLAS workspace one)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "ALLOC_FAILED" in msg)


def reset_memory(device: torch.device) -> None:
    """Free what the previous measurement left and zero the peak counter."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> Optional[int]:
    """Peak bytes allocated since `reset_memory` (torch.cuda.max_memory_allocated); None on CPU (no such counter)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


# ---- backends ------------------------------------------------------------------------------------------------------
def backend_skip(name: str, probe: torch.Tensor) -> Optional[Tuple[str, str]]:
    """None if fastresnet backend `name` should be measured on tensors like `probe`, else (status, reason):
    ("unavailable", why) when it cannot run them; on CPU also ("skipped", why) when "auto" would not pick it for
    them (`auto_ok` False: the Triton interpreter, whose timing measures Python rather than a kernel, or a CPU path
    its backend does not recommend)."""
    impl = get_backend_impl(name)
    why = impl.unavailable_reason() or impl.why_not(probe)
    if why is not None:
        return "unavailable", why
    if probe.device.type == "cpu" and not impl.auto_ok(probe):
        return "skipped", ("'auto' does not pick this backend for CPU tensors (auto_ok is False), so CPU runs "
                           "do not measure it")
    return None


# ---- models --------------------------------------------------------------------------------------------------------
class TrainStep:
    """One training step on a fixed random batch: forward, cross-entropy, backward, SGD (lr 0.1, momentum 0.9,
    weight decay 1e-4: the paper's recipe). What every provider times.

    model: the network (any module; a torch.compile'd wrapper is fine), already on `device` and, if
    `channels_last`, in channels_last. batch, image_size: the input is [batch, 3, image_size, image_size] fp32,
    channels_last if `channels_last`. dtype: a key of DTYPES; "bf16" runs forward under
    torch.autocast(bfloat16) with fp32 parameters, "fp32" runs plain fp32. `step()` runs one step; after
    `capture()` (CUDA only) it replays the whole step as one CUDA graph.
    """

    def __init__(self, model: nn.Module, batch: int, image_size: int, num_classes: int, dtype: str,
                 device: torch.device, channels_last: bool = True):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
        if batch < 1 or image_size < 1:
            raise ValueError(f"batch, image_size: expected positive ints, got {batch}, {image_size}")
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model, self.device, self.amp_dtype = model, device, DTYPES[dtype]
        self.x = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=fmt)
        self.y = torch.randint(num_classes, (batch,), device=device)
        self.opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    def _forward_backward_update(self) -> torch.Tensor:
        # cache_enabled=False: autocast's weight-cast cache must not outlive a CUDA graph capture.
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None, cache_enabled=False):
            loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return loss

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        self.opt.zero_grad(set_to_none=True)
        self._forward_backward_update()

    def capture(self, warmup: int) -> None:
        """Run `warmup` eager steps on a side stream (lazy state: momentum buffers, cuDNN plans), then capture one
        whole step (forward, backward, optimizer) into a CUDA graph that `step()` replays."""
        if self.device.type != "cuda":
            raise RuntimeError(f"capture: CUDA graphs need a CUDA device, got {self.device}")
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 1)):
                self.step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.opt.zero_grad(set_to_none=True)  # grads are then allocated inside the graph's pool and rewritten
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._forward_backward_update()
        self.graph = graph
