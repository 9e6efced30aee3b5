"""Builds the CUDA emulator driver (driver.cpp + cuda_emu.h) around the .cu kernels of a checkout.

The kernel source is used as it is, with one preparation: each `__shared__ T name[..];` declaration becomes a
reference to the block's heap allocation, `T (&name)[..] = ::emu::shared<T[..]>();` (a macro cannot do this), so
AddressSanitizer guards shared memory like every other buffer. Compiled with g++ -fsanitize=address,undefined (no
recovery: the first finding aborts) and -ffp-contract=off (the kernels' arithmetic rounds per operation, as their
_rn intrinsics do).
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess

HERE = pathlib.Path(__file__).resolve().parent
CUDA_DIR = HERE.parents[1] / "csrc" / "cuda"
SOURCE = CUDA_DIR / "bn_kernels.cu"
SHARED = re.compile(r"__shared__\s+([\w:]+)\s+(\w+)((?:\[[^\]]+\])+)\s*;")


def cuda_include_dir() -> pathlib.Path | None:
    """The CUDA toolkit's include directory (for cuda_fp16.h / cuda_bf16.h / cuda_runtime_api.h), or None."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (pathlib.Path(root) / "include" / "cuda_fp16.h").is_file():
            return pathlib.Path(root) / "include"
    return None


def prepare(source_text: str) -> str:
    """The kernel source with its __shared__ declarations turned into emulator allocations."""
    out, count = SHARED.subn(lambda m: f"{m[1]} (&{m[2]}){m[3]} = ::emu::shared<{m[1]}{m[3]}>();", source_text)
    if count != source_text.count("__shared__"):
        raise ValueError("a __shared__ declaration the emulator build cannot rewrite "
                         "(expected `__shared__ T name[..];`)")
    return out


def build(out_dir: pathlib.Path, source: pathlib.Path = SOURCE) -> pathlib.Path:
    """Compiles the driver around `source` (its bn_kernels.h is taken from the same folder) into out_dir/emu_driver."""
    include = cuda_include_dir()
    if include is None:
        raise FileNotFoundError("CUDA toolkit headers (cuda_fp16.h) not found: set CUDA_HOME")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bn_kernels_emu.cu").write_text(prepare(source.read_text()))
    binary = out_dir / "emu_driver"
    cmd = ["g++", "-std=c++17", "-O0", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
           "-fno-sanitize-recover=all", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas", "-Wno-attributes",
           "-I", str(HERE / "include"), "-I", str(out_dir), "-I", str(source.parent), "-I", str(include),
           str(HERE / "driver.cpp"), "-o", str(binary)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"emulator build failed:\n{' '.join(cmd)}\n{proc.stderr[-8000:]}")
    return binary
