"""`fastresnet info`: what this machine gives the package — for a user checking an install and for bug reports.

Versions (fastresnet, Python, torch, CUDA, cuDNN, Triton, numpy), devices, for each backend and device (cpu, cuda)
what the backend runs there and whether "auto" picks it, or why it cannot run there, how the extension
`fastresnet._C` was built (C++ CPU kernels; CUDA kernels and their architectures, or why they are missing), the
Triton cache folder, the precision of fp32 convs on a GPU (TF32 or IEEE), and the environment variables that change
what the package does. `--json` prints the same as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata
from typing import Dict, List, Optional, Sequence, Tuple

import numpy
import torch

import fastresnet
from fastresnet import cli
from fastresnet.backends import get_backend_impl, resolve

# environment variables that change what the package does (docs/architecture.md §1, §6)
ENV_VARS = ("FASTRESNET_BACKEND", "FASTRESNET_TRITON_CONV", "TRITON_INTERPRET", "TRITON_CACHE_DIR",
            "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")


# what each backend runs on a device where its own check (`Backend.why_not`) accepts a tensor
RUNS = {
    "torch": {"cpu": "PyTorch reference ops (unfused)", "cuda": "PyTorch reference ops (unfused)"},
    "ext": {"cpu": "C++ CPU kernels", "cuda": "CUDA kernels"},
    "triton": {"cpu": "Triton kernels in the Triton interpreter (slow: for tests)", "cuda": "Triton kernels"},
    "triton_conv": {"cpu": "Triton implicit-GEMM convs in the Triton interpreter (slow: for tests)",
                    "cuda": "Triton implicit-GEMM convs"},
}
DEVICES = ("cpu", "cuda")


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def versions() -> Dict[str, Optional[str]]:
    """Versions of the package and what it runs on; None where a component is absent (no CUDA in torch, ...)."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"fastresnet": fastresnet.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": None if cudnn is None else str(cudnn), "triton": _version("triton"),
            "numpy": numpy.__version__, "platform": platform.platform()}


def devices() -> List[str]:
    """The CPU, then every CUDA device with its compute capability and memory (or why there is none)."""
    out = [f"cpu: {os.cpu_count()} logical cores, torch uses {torch.get_num_threads()} threads"]
    if not torch.cuda.is_available():
        return out + [f"cuda: none ({_no_cuda_device()})"]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(f"cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    return out + [f"torch's CUDA kernels are built for {', '.join(torch.cuda.get_arch_list())}"]


def _no_cuda_device() -> str:
    return "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"


def backends_by_device() -> Dict[str, Dict[str, str]]:
    """For each registered backend and each device type of DEVICES: what it runs there (RUNS), marked when "auto"
    picks it, or "unavailable: " and the reason, as the backend's own check gives it for a float32 tensor there."""
    probes = {"cpu": torch.empty(2, 2, 1, 1)}
    if torch.cuda.is_available():
        probes["cuda"] = torch.empty(2, 2, 1, 1, device="cuda")
    out: Dict[str, Dict[str, str]] = {}
    for name in fastresnet.available_backends():
        impl = get_backend_impl(name)
        out[name] = {}
        for device in DEVICES:
            if device not in probes:
                out[name][device] = f"unavailable: {_no_cuda_device()}"
                continue
            why = impl.why_not(probes[device])
            if why is not None:
                out[name][device] = f"unavailable: {why}"
                continue
            picked = resolve(probes[device], "auto") == name
            out[name][device] = RUNS.get(name, {}).get(device, "runs") + (" (auto picks it)" if picked else "")
    return out


def extension() -> str:
    """How fastresnet._C was built: CPU kernels always; CUDA kernels with their architectures, or why absent."""
    try:
        from fastresnet import _C
    except ImportError as e:
        return (f"not loaded ({e}); the 'ext' backend is off. Build it with `pip install --no-build-isolation -e .`")
    if not _C.with_cuda:
        return f"C++ CPU kernels; no CUDA kernels ({_why_no_cuda()}); {_C.__file__}"
    archs = ", ".join(f"sm_{a}" for a in _C.cuda_archs.split("_") if a)
    return f"C++ CPU kernels and CUDA kernels for {archs}; {_C.__file__}"


def _why_no_cuda() -> str:
    """Why a build has no CUDA kernels, by the rules of setup.py."""
    if torch.version.cuda is None:
        return "torch has no CUDA"
    return "built with FASTRESNET_SKIP_CUDA=1 or without nvcc; rebuild on a machine with the CUDA toolkit"


def triton_cache() -> str:
    """The folder where Triton keeps compiled kernels (TRITON_CACHE_DIR overrides it)."""
    try:
        import triton
    except ImportError as e:
        return f"no Triton ({e})"
    return str(triton.knobs.cache.dir)


def report() -> Dict[str, object]:
    """Everything `fastresnet info` prints, as plain data."""
    from fastresnet.kernels import conv_fp32_precision
    return {"versions": versions(), "devices": devices(), "default_backend": fastresnet.get_backend(),
            "backends": fastresnet.available_backends(), "backends_by_device": backends_by_device(),
            "extension": extension(), "triton_cache": triton_cache(),
            "fp32_conv_precision": conv_fp32_precision(),
            "environment": {k: os.environ[k] for k in ENV_VARS if k in os.environ}}


def format_report(r: Dict[str, object]) -> str:
    """The human-readable form: one `name  value` line per item, indented lists."""
    v = r["versions"]
    rows: List[Tuple[str, str]] = [(k, str(v[k]) if v[k] is not None else "none") for k in
                                   ("fastresnet", "python", "torch", "cuda", "cudnn", "triton", "numpy", "platform")]
    rows += [("devices", "")] + [("", d) for d in r["devices"]]
    rows += [("backends", f"default {r['default_backend']!r}")]
    for name, per_device in r["backends_by_device"].items():
        rows += [("", f"{name if i == 0 else '':12s} {device + ':':6s}{what}")
                 for i, (device, what) in enumerate(per_device.items())]
    rows += [("extension", str(r["extension"])), ("triton cache", str(r["triton_cache"]))]
    rows += [("fp32 convs", f"{r['fp32_conv_precision']} on a GPU (PyTorch's cuDNN setting, which the Triton convs "
                            "follow; docs/architecture.md §6)")]
    rows += [("environment", "")] + [("", f"{k}={r['environment'].get(k, '(unset)')}") for k in ENV_VARS]
    return "\n".join(f"{k:13s}{val}".rstrip() for k, val in rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the report; the exit code follows `fastresnet.cli.run_command`."""
    p = argparse.ArgumentParser(prog="fastresnet info", description=__doc__.splitlines()[0], epilog=cli.EPILOG)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    r = report()
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_command("info", main, sys.argv[1:]))
