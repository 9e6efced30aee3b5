"""Memory errors and shared-memory races in fastresnet's own GPU kernels, under NVIDIA's compute-sanitizer.

    python -m benchmarks.sanitize_kernels --out rows.jsonl --log-dir logs/   # memcheck, racecheck, plain pass
    python -m benchmarks.sanitize_kernels --calls                            # only the calls the tools run

The calls (`run_calls`), on small tensors: every `__global__` kernel of csrc/cuda/bn_kernels.cu through the
extension's public ops (`torch.ops.fastresnet_ext`: batch_stats, add_stats, bn_relu with the input's dtype and with
an autocast output dtype, bn_relu_backward in training and eval, with and without dres and with an fp32 gradient
for half-precision x, bn_affine, scale_shift) for fp32, fp64, fp16 and bf16, NHWC and NCHW, at shapes that take the
16-byte-vector and the scalar paths, one tile, several tiles, and more base tiles than the kernels' tile limit; then
one BN-ReLU-conv forward + backward of the `triton_conv` backend with its own conv kernels
(FASTRESNET_TRITON_CONV=always), bf16 under autocast, with a residual and its output statistics.

On a machine with CUDA, within --budget seconds, each step a child process with a time limit:
1. the calls under `compute-sanitizer --tool memcheck`, then `--tool racecheck` (`SANITIZER_FLAGS`), with
   PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor its own cudaMalloc, so memcheck checks an access against that
   tensor's bounds rather than those of a cached block. Triton kernels are cubins loaded at run time and appear
   under their Python function names (`_conv_fwd_kernel`, ...); the first child's Triton compiles fill the cache
   the later ones read;
2. each tool's report parsed (`parse_report`): errors per kernel name, racecheck warnings and CUDA API errors apart;
3. the calls plainly under torch.profiler (`--calls --profile`, PLAIN_RESERVE seconds kept for it): the kernels they
   launch, by name, so the table says which of fastresnet's kernels ran, and names any `__global__` of
   bn_kernels.cu that no call launched.
One row per tool (bench "sanitize"): status "ok" (the calls all ran, no error in any kernel), "errors", "incomplete"
(the child did not finish its calls: timeout or crash) or "unavailable" (no compute-sanitizer); a table prints last.

Without CUDA the calls run on CPU tensors (the extension's C++ kernels, the Triton interpreter) to check this
driver, and the rows say "skipped: no CUDA".
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from benchmarks import common

CU_SOURCE = common.REPO_ROOT / "csrc" / "cuda" / "bn_kernels.cu"
TOOLS = ("memcheck", "racecheck")
ERROR_EXIT = 86  # the sanitizer's exit status when it reported an error (--error-exitcode)
# --print-limit: errors printed per tool before it stops printing (it still counts them in its summary)
SANITIZER_FLAGS = ("--error-exitcode", str(ERROR_EXIT), "--print-limit", "200")
TOOL_FLAGS = {"memcheck": ("--leak-check", "no"), "racecheck": ("--racecheck-report", "analysis")}
DONE = "sanitize_kernels: all calls done"  # the last line of a child that ran every call
LAUNCHED = "launched: "  # with --profile, the line after it: JSON {kernel name: launches}
PLAIN_RESERVE = 10.0  # seconds of the budget kept for the plain pass, which runs last
# (N, C, H, W): C 5 and H·W 35 take the scalar path, C 40 and H·W 576 the 16-byte vectors (in NHWC two channel
# blocks of 32); N·H·W 105 is one tile, 4608 several, 360000 more base tiles than the limit of 1024 (longer tiles)
SHAPES = ((3, 5, 5, 7), (8, 40, 24, 24), (1, 1, 600, 600))
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---- the calls -------------------------------------------------------------------------------------------------------
def cuda_kernel_names(source: Path = CU_SOURCE) -> List[str]:
    """The `__global__` kernels defined in the CUDA source, in file order."""
    pattern = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(")
    return pattern.findall(source.read_text())


def triton_kernel_names() -> List[str]:
    """The Triton kernels (`@triton.jit` functions named *_kernel) of fastresnet.kernels."""
    from triton.runtime.jit import KernelInterface  # compiled or interpreted (TRITON_INTERPRET=1) kernels alike
    from fastresnet.kernels import add_stats, bn_relu, conv, stats
    return sorted({name for mod in (add_stats, bn_relu, conv, stats) for name, v in vars(mod).items()
                   if isinstance(v, KernelInterface) and name.endswith("_kernel")})


def _extension_calls(device: torch.device) -> int:
    """Every op of the extension over SHAPES x DTYPES x (NHWC, NCHW); returns the number of op calls."""
    from fastresnet import _C  # noqa: F401  (loads torch.ops.fastresnet_ext)
    ops = torch.ops.fastresnet_ext
    calls = 0
    for shape in SHAPES:
        for dtype in DTYPES:
            stat = torch.float64 if dtype == torch.float64 else torch.float32
            for fmt in (torch.channels_last, torch.contiguous_format):
                x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)
                b = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)
                gamma, beta = torch.randn(shape[1], device=device, dtype=stat), torch.randn(shape[1], device=device,
                                                                                            dtype=stat)
                mean, var = ops.batch_stats(x)
                rstd, scale, shift = ops.bn_affine(mean, var, 1e-5, gamma, beta)
                ops.scale_shift(mean, rstd, gamma, None)
                ops.bn_relu(x, scale, shift, dtype)
                ops.add_stats(x, b)
                calls += 5
                grads = [torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)]
                if dtype == torch.float32:
                    ops.bn_relu(x, scale, shift, torch.bfloat16)  # autocast: fp32 x, bf16 activation
                    calls += 1
                if dtype in (torch.float16, torch.bfloat16):  # autocast: the gradient of a low-precision x in fp32
                    grads.append(grads[0].float().contiguous(memory_format=fmt))
                for dy in grads:
                    for training in (True, False):
                        for dres in (None, torch.randn_like(dy)):
                            ops.bn_relu_backward(dy, x, scale, shift, mean, rstd, training, dres)
                            calls += 1
    return calls


def _triton_conv_call(device: torch.device) -> None:
    """One 3x3 BN-ReLU-conv of the triton_conv backend's own kernels, bf16 under autocast, with a residual and its
    output statistics, forward and backward."""
    from fastresnet.backends import get_backend_impl
    from fastresnet.functional import bn_relu_conv2d
    impl = get_backend_impl("triton_conv")
    why = impl.unavailable_reason()
    if why is not None:
        raise RuntimeError(f"triton_conv: {why}")
    impl.select = "always"  # its own conv kernels, not the tier-A path a timing might pick
    torch.manual_seed(0)
    x = torch.randn(4, 16, 8, 8, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(16, 16, 3, 3, device=device) * 0.1).requires_grad_()
    gamma = torch.rand(16, device=device).add_(0.5).requires_grad_()
    beta = torch.randn(16, device=device).requires_grad_()
    residual = torch.randn(4, 16, 8, 8, device=device).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y, mean, var = bn_relu_conv2d(x, w, torch.zeros(16, device=device), torch.ones(16, device=device), gamma,
                                      beta, training=True, padding=1, backend="triton_conv", residual=residual,
                                      return_stats=True)
    (y.float() * torch.randn_like(y, dtype=torch.float32)).sum().backward()
    for t in (y, mean, var, x.grad, w.grad, gamma.grad, beta.grad):
        if t is None or not bool(torch.isfinite(t.float()).all()):
            raise RuntimeError("triton_conv: a forward output or gradient is missing or not finite")


def run_calls(device: torch.device) -> int:
    """All the calls (module docstring), synchronised; returns the number of extension op calls."""
    calls = _extension_calls(device)
    _triton_conv_call(device)
    common.synchronize(device)
    return calls


# ---- the sanitizer's report ------------------------------------------------------------------------------------------
_PREFIX = "========= "
# a report entry starts at an unindented line after the prefix; these are not entries
_NOT_ENTRY = ("COMPUTE-SANITIZER", "ERROR SUMMARY", "RACECHECK SUMMARY", "LEAK SUMMARY", "Target application",
              "This can also")
_DEVICE_FRAME = re.compile(r"\bat (?:0x[0-9a-f]+ in \S+:\d+:)?(?P<name>.+?)(?:\+0x[0-9a-f]+)?(?: in \S+)?$")
_ACCESS_AT = re.compile(r"access at .+?\+0x[0-9a-f]+")
_API_CALL = re.compile(r"on CUDA API call to (\w+)")


def kernel_label(signature: str) -> str:
    """A kernel's bare name from a demangled signature as the profiler or the sanitizer prints it:
    "void fastresnet_cuda::(anonymous namespace)::bn_relu_kernel<float, float, 4>(float const*, ...)" ->
    "bn_relu_kernel"."""
    s = signature.replace("(anonymous namespace)::", "").strip().removeprefix("void ")
    return re.split(r"[<(]", s, maxsplit=1)[0].rsplit("::", 1)[-1].strip()


def parse_report(text: str) -> Dict[str, object]:
    """A compute-sanitizer log (memcheck or racecheck) -> {"errors": {kernel label: entries}, "warnings": {kernel
    label: entries} (racecheck's "Warning" hazards), "api_errors": {API call: entries}, "summary": the tool's own
    summary line or None, "first": {kernel label: its first entry's headline}}. An entry is one reported error or
    hazard, an unindented line after the "=========" prefix; its kernel is the device frame in its headline
    (racecheck: "... access at <kernel>+0x...") or else the first one below it ("at <kernel>+0x... in file:line")."""
    found = {"Error": Counter(), "Warning": Counter()}
    api: Counter = Counter()
    first: Dict[str, str] = {}
    summary = None
    headline: Optional[str] = None

    def count(frame: str) -> None:
        match = _DEVICE_FRAME.search(frame)
        name = kernel_label(match.group("name")) if match else "?"
        found["Warning" if headline.startswith("Warning") else "Error"][name] += 1
        first.setdefault(name, f"{headline} [{frame}]")

    for raw in text.splitlines():
        if not raw.startswith(_PREFIX):
            continue
        body = raw[len(_PREFIX):]
        if body.startswith(("ERROR SUMMARY", "RACECHECK SUMMARY")):
            summary = body.strip()
        if body and not body[0].isspace():  # a new entry, or a line that is none
            headline = None
            call = _API_CALL.search(body)
            if body.startswith(_NOT_ENTRY):
                continue
            if call:
                api[call.group(1)] += 1
                continue
            headline = body.strip()
            in_headline = _ACCESS_AT.search(headline)
            if in_headline:
                count(in_headline.group(0))
                headline = None
        elif headline is not None and body.strip().startswith(("at ", "Write Thread", "Read Thread")):
            count(body.strip())
            headline = None
    return {"errors": dict(found["Error"]), "warnings": dict(found["Warning"]), "api_errors": dict(api),
            "summary": summary, "first": first}


# ---- running the tools -----------------------------------------------------------------------------------------------
def sanitizer_path() -> Optional[str]:
    """compute-sanitizer on PATH, else under the CUDA toolkit torch was built against, else None."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    from torch.utils import cpp_extension
    for root in (cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "compute-sanitizer")):
            return os.path.join(root, "bin", "compute-sanitizer")
    return None


def _run_child(cmd: List[str], log: Path, timeout: float) -> Tuple[Optional[int], float, str]:
    """(exit status or None on timeout, seconds, output) of cmd in its own process group, output also to log."""
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=common.REPO_ROOT, env=env,
                                start_new_session=True)
        try:
            rc: Optional[int] = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, time.perf_counter() - t0, log.read_text(errors="replace")


def profiled_calls(device: torch.device) -> Tuple[int, Dict[str, int]]:
    """`run_calls` under torch.profiler: (its result, kernel name -> launches from the CUDA kernel events)."""
    from torch.autograd import DeviceType
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        calls = run_calls(device)
    return calls, dict(Counter(kernel_label(e.name) for e in prof.events()
                               if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))))


def sanitize(args: argparse.Namespace) -> List[Dict[str, object]]:
    """The module docstring's steps (on CPU: the calls alone); returns the rows (also appended to args.out)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = common.environment(device)
    base = dict(env, bench="sanitize", smoke=device.type != "cuda")
    cu_names, triton_names = cuda_kernel_names(), triton_kernel_names()
    rows: List[Dict[str, object]] = []
    start = time.perf_counter()
    if device.type != "cuda" and args.sanitizer is None:
        calls = run_calls(device)
        rows = [dict(base, tool=tool, status="skipped", reason=f"no CUDA: the {calls} extension calls and the "
                     "triton_conv call ran on CPU tensors to check this driver; no sanitizer ran", errors={},
                     api_errors={}, launched={}, seconds=round(time.perf_counter() - start, 2)) for tool in TOOLS]
    else:
        exe = args.sanitizer or sanitizer_path()
        for i, tool in enumerate(TOOLS):
            row = dict(base, tool=tool, errors={}, api_errors={})
            if exe is None:
                rows.append(dict(row, status="unavailable", reason="compute-sanitizer not found (PATH, CUDA_HOME)"))
                continue
            left = args.budget - PLAIN_RESERVE - (time.perf_counter() - start)
            cmd = [exe, "--tool", tool, *SANITIZER_FLAGS, *TOOL_FLAGS[tool], sys.executable, "-m",
                   "benchmarks.sanitize_kernels", "--calls"]
            rc, seconds, text = _run_child(cmd, Path(args.log_dir) / f"sanitize_{tool}.log", left / (len(TOOLS) - i))
            parsed = parse_report(text)
            errors = parsed["errors"]
            status = ("incomplete" if DONE not in text or rc not in (0, ERROR_EXIT)
                      else "errors" if errors else "ok")
            reason = {"ok": None, "errors": f"{sum(errors.values())} error(s) in {len(errors)} kernel(s)",
                      "incomplete": "timed out" if rc is None else f"exit {rc} before the last call"}[status]
            rows.append(dict(row, status=status, reason=reason, exit=rc, seconds=round(seconds, 2), errors=errors,
                             warnings=parsed["warnings"], api_errors=parsed["api_errors"],
                             first_error=parsed["first"], summary=parsed["summary"],
                             command=" ".join(cmd[:cmd.index(sys.executable)])))
        rc, _, text = _run_child([sys.executable, "-m", "benchmarks.sanitize_kernels", "--calls", "--profile"],
                                 Path(args.log_dir) / "sanitize_plain.log",
                                 args.budget - (time.perf_counter() - start) - 0.5)
        found = [line[len(LAUNCHED):] for line in text.splitlines() if line.startswith(LAUNCHED)]
        launched = json.loads(found[-1]) if found else {}
        plain_error = None if found else ("timed out" if rc is None else f"exit {rc}")
        for row in rows:
            row.update(launched={k: v for k, v in launched.items() if k in cu_names or k in triton_names},
                       not_launched=None if plain_error else [n for n in cu_names if n not in launched],
                       plain_error=plain_error)
    common.write_rows(Path(args.out), rows)
    return rows


def table(rows: List[Dict[str, object]]) -> str:
    """Plain text: per tool its status; per kernel that ran or erred, launches and errors under each tool."""
    lines = [f"sanitize {r['tool']:9s} {r['status']:11s} {r.get('seconds', 0):6.1f}s  {r.get('reason') or ''}"
             .rstrip() for r in rows]
    kernels = sorted({k for r in rows for k in list(r.get("launched", {})) + list(r.get("errors", {}))})
    if kernels:
        tools = [r["tool"] for r in rows]
        lines.append(f"  {'kernel':60s} {'launches':>8s} " + " ".join(f"{t:>9s}" for t in tools))
        for k in kernels:
            launches = max(r.get("launched", {}).get(k, 0) for r in rows)
            lines.append(f"  {k[:60]:60s} {launches:8d} " + " ".join(
                f"{r.get('errors', {}).get(k, 0):9d}" for r in rows))
    if rows and rows[0].get("not_launched"):
        lines.append(f"  not launched by the calls: {', '.join(rows[0]['not_launched'])}")
    if rows and rows[0].get("plain_error"):
        lines.append(f"  the plain pass failed: {rows[0]['plain_error']}")
    for r in rows:
        for k, headline in (r.get("first_error") or {}).items():
            lines.append(f"  {r['tool']} {k}: {headline}")
        if r.get("api_errors"):
            lines.append(f"  {r['tool']} CUDA API errors: {r['api_errors']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sanitize_kernels", description=__doc__.splitlines()[0])
    p.add_argument("--calls", action="store_true", help="only run the calls (what each sanitizer tool runs)")
    p.add_argument("--profile", action="store_true", help="with --calls: run them under torch.profiler and print "
                   "the kernels they launched")
    p.add_argument("--out", default="sanitize.jsonl", help="JSON Lines file to append the rows to")
    p.add_argument("--log-dir", default=".", help="folder for the sanitizer logs (sanitize_<tool>.log)")
    p.add_argument("--budget", type=float, default=38.0, help="seconds for both tools and the plain pass")
    p.add_argument("--sanitizer", default=None, help="the compute-sanitizer to run (default: on PATH or under "
                   "CUDA_HOME); given, the tools run even without CUDA")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error(f"--budget: expected seconds > 0, got {args.budget}")
    if args.calls:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        calls, launched = profiled_calls(device) if args.profile else (run_calls(device), None)
        print(f"{calls} extension calls and one triton_conv call on {device}")
        print(DONE, flush=True)
        if launched is not None:
            print(LAUNCHED + json.dumps(launched), flush=True)
        return 0
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    rows = sanitize(args)
    print(table(rows))
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
