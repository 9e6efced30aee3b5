"""Calls the launchers of csrc/cuda/bn_kernels.cu under the emulator (driver.cpp), with torch tensors in and out.

Tensors are logical NCHW; `nhwc` picks the memory order the kernels see (the bytes are written in that order). The
driver runs the launcher once per schedule (in order, reversed, seeded shuffle) and fails unless their outputs are
bitwise equal; sanitizer findings, barrier divergence and launch errors fail the call too (EmulatorError with the
driver's report).
"""
from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import tempfile

import torch

DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
SCHEDULES = (0, 1, 2)  # in order, reversed, shuffled


class EmulatorError(AssertionError):
    """The emulated run failed: a sanitizer report, barrier divergence, schedules that disagree, a launcher error."""


@dataclasses.dataclass
class Launch:
    name: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    blocks: list[tuple[int, int, int]]  # the blocks that ran


@dataclasses.dataclass
class Result:
    out: dict[str, torch.Tensor]
    launches: list[Launch]
    tiling: tuple[int, int] | None  # (tiles per channel, elements of a channel per tile)


def _to_bytes(t: torch.Tensor, nhwc: bool) -> bytes:
    if t.dim() == 4:
        t = t.permute(0, 2, 3, 1) if nhwc else t
    t = t.contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the same bits as int16
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...], nhwc: bool) -> torch.Tensor:
    t = torch.frombuffer(bytearray(data), dtype=dtype)
    if len(shape) == 4:
        n, c, h, w = shape
        return t.view(n, h, w, c).permute(0, 3, 1, 2) if nhwc else t.view(shape)
    return t.view(shape)


def run(driver: pathlib.Path, op: str, inputs: dict[str, torch.Tensor | None], *, dtype: torch.dtype,
        gdtype: torch.dtype | None = None, nhwc: bool = False, training: bool = True, eps: float = 1e-5,
        misalign: bool = False, sample: int = 0, seed: int = 0, schedules=SCHEDULES) -> Result:
    """Runs launcher `op` (batch_stats, add_stats, bn_relu, bn_relu_backward, bn_affine) on `inputs` (driver.cpp's
    buffer names; None: a null pointer) with x's dtype `dtype` and `gdtype` the dtype of out / dy / dres."""
    ref = next(t for t in inputs.values() if t is not None)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    job = [f"op {op}", f"dtype {DTYPES[dtype]}", f"misalign {int(misalign)}", f"sample {sample}", f"seed {seed}",
           "schedules " + " ".join(map(str, schedules)), f"training {int(training)}", f"eps {eps!r}"]
    if gdtype is not None:
        job.append(f"gdtype {DTYPES[gdtype]}")
    if ref.dim() == 4:
        n, c, h, w = ref.shape
        job.append(f"geom {n} {c} {h * w} {int(nhwc)}")
        shape4 = tuple(ref.shape)
        shapes = {"mean": (c,), "var": (c,), "sum_dz": (c,), "sum_dz_xhat": (c,), "coef": (3, c)}
        dtypes = {"y": dtype, "dx": dtype, "out": gdtype or dtype}
    else:
        job.append(f"C {ref.numel()}")
        shape4, shapes, dtypes = None, {}, {}
    with tempfile.TemporaryDirectory(prefix="emu_") as tmp:
        d = pathlib.Path(tmp)
        (d / "job.txt").write_text("\n".join(job) + "\n")
        for name, t in inputs.items():
            if t is not None:
                (d / f"{name}.bin").write_bytes(_to_bytes(t, nhwc))
        proc = subprocess.run([str(driver), str(d)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise EmulatorError(f"emulated {op} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        out = {}
        for f in d.glob("*.out"):
            shape = shapes.get(f.stem, shape4 if f.stem in dtypes else (ref.numel(),))
            out[f.stem] = _from_bytes(f.read_bytes(), dtypes.get(f.stem, acc), shape, nhwc)
        launches = []
        for line in (d / "launches.txt").read_text().splitlines():
            name, *nums = line.split()
            launches.append(Launch(name, tuple(map(int, nums[:3])), tuple(map(int, nums[3:6])),
                                   [tuple(map(int, b.split(","))) for b in nums[6:]]))
        tiling_file = d / "tiling.txt"
        tiling = tuple(map(int, tiling_file.read_text().split())) if tiling_file.exists() else None
    return Result(out, launches, tiling)
