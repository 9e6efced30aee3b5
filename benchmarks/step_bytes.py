"""Bytes one training step moves through memory, fused (`triton_conv` with its sm_90 launches) against eager PyTorch,
and the floor time of each at an H200's copy bandwidth; computed on the meta device, nothing runs on a GPU.

    python -m benchmarks.step_bytes --out benchmarks/results/step_bytes_sm90.jsonl

One training step: forward and backward of the whole net (stem, units, head, loss; the optimizer excluded), batch
128, bf16 parameters and activations, 32×32, channels_last. The counting rule, the same for both paths:
- a Triton launch (fused path, recorded as `benchmarks/static_sm90.py` records it: the GPU's tiles, splits and
  phases): every tensor argument once at its full size (read or written at least once; scratch such as partial sums
  and counters included), except the stride-2 dgrad's phase launches, which touch only their phase's share of the
  BN input x and of the dz scratch (M / M_BN of it: a quarter for 2×2 phases);
- an ATen op that computes data (`benchmarks.bench_overhead.is_kernel_op`: what would be a kernel on a GPU; views
  and allocations move nothing): its tensor arguments read once each and its results written once each; `zero_` and
  `fill_` only write their argument, `copy_` reads its source and writes its destination; `convolution_backward` is
  the two kernels cuDNN runs, dgrad (reads dy and the weight, writes dx) and wgrad (reads dy and the input, writes
  dW), so dy is read twice.
Eager's step is the same net made plain (`fastresnet.convert.unconvert`: BatchNorm2d, ReLU, Conv2d modules) traced
through the same rule, so each BN forward reads x and writes y (and its [C] statistics), each ReLU reads and writes
its tensor, each conv forward reads x and the weight and writes y, each BN backward reads dy and x and writes dx,
each ReLU backward reads dy and the forward output and writes dx, each residual add reads two tensors and writes
one, and autograd's gradient sums (a tensor read by two branches) read two and write one. The fused path's ATen ops
(the stem, the head, the loss, and what the fused ops' Python composition runs around the launches) follow the
same rule. Bytes are a lower bound on traffic: a kernel that re-reads a tensor from HBM (tiles that miss L2) moves
more, so the floor — bytes ÷ `static_sm90.HBM_BYTES_PER_S` — is a time no implementation of the step can beat.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from benchmarks import static_sm90 as gate  # noqa: E402

NETS = (("preact_resnet164", 128, 32), ("preact_resnet1001", 128, 32))
DTYPE = "bf16"
# ATen ops that write their first argument without reading it, and the copy that reads only its source
_WRITE_ONLY = ("zero_", "fill_")
_COPY = "copy_"


def _tensors(obj) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def aten_bytes(func, args, kwargs, out) -> int:
    """Bytes ATen op `func` moves by the module's rule (0 for an op that computes nothing)."""
    from benchmarks.bench_overhead import is_kernel_op

    name = func._schema.name.split("::")[-1]
    if not is_kernel_op(name):
        return 0
    if name == "convolution_backward":
        dy, x, w = args[:3]
        dx, _, _ = out
        dgrad = _nbytes(dy) + _nbytes(w) + _nbytes(dx) if dx is not None else 0
        wgrad = _nbytes(dy) + _nbytes(x) + _nbytes(w) if out[1] is not None else 0
        return dgrad + wgrad
    if name in _WRITE_ONLY:
        return _nbytes(args[0])
    if name == _COPY:
        return _nbytes(args[0]) + _nbytes(args[1])
    reads = {id(t): _nbytes(t) for t in _tensors(list(args) + list(kwargs.values()))}
    return sum(reads.values()) + sum(_nbytes(t) for t in _tensors(out))


class _AtenBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Sums `aten_bytes` and counts the computing ATen ops it sees."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.kernels = 0

    def add(self, func, args, kwargs, out) -> None:
        moved = aten_bytes(func, args, kwargs, out)
        self.bytes += moved
        self.kernels += moved > 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.add(func, args, kwargs or {}, out)
        return out


def launch_bytes(launch: dict) -> int:
    """Bytes a recorded Triton launch moves by the module's rule."""
    total = launch["bytes"]
    v = launch["values"]
    if launch["fn"].fn.__name__ == "_conv_dgrad_kernel" and v["STRIDE"] > 1:
        share = 1 - int(v["M"]) / int(v["M_BN"])  # the part of x and dz outside this phase
        total -= round(share * (_nbytes(v["x_ptr"]) + _nbytes(v["dz_ptr"])))
    return total


def fused_step(net: str, batch: int, res: int, dtype: torch.dtype) -> Dict[str, int]:
    """Bytes and kernels of one training step on the fused path (`triton_conv`, the sm_90 launches)."""
    outside, inside = _AtenBytes(), _AtenBytes()
    calls = gate.trace_calls(net, batch, res, dtype, inference=False, rec=gate._RecordOps(outside.add))
    launches = gate.record_launches(calls, inner=inside)
    triton_bytes = sum(launch_bytes(la) for la in launches)
    return dict(bytes=triton_bytes + inside.bytes + outside.bytes, triton_bytes=triton_bytes,
                aten_bytes=inside.bytes + outside.bytes, triton_launches=len(launches),
                aten_kernels=inside.kernels + outside.kernels)


def eager_step(net: str, batch: int, res: int, dtype: torch.dtype) -> Dict[str, int]:
    """Bytes and kernels of one training step of the same net in plain PyTorch modules (what cuDNN/ATen run)."""
    from fastresnet.convert import unconvert

    model = unconvert(gate.meta_model(net, dtype), inplace=True)
    x = gate.meta_input(batch, res, dtype)
    count = _AtenBytes()
    with count:
        model(x).float().sum().backward()
    return dict(bytes=count.bytes, aten_bytes=count.bytes, triton_bytes=0, triton_launches=0,
                aten_kernels=count.kernels)


def build_rows(nets=NETS, progress=print) -> List[dict]:
    """One row per (net, path): bytes, kernels and the floor time of one training step."""
    rows = []
    dtype = gate.DTYPES[DTYPE]
    for net, batch, res in nets:
        for path, step in (("fused", fused_step), ("eager", eager_step)):
            t0 = time.time()
            counts = step(net, batch, res, dtype)
            rows.append(dict(net=net, batch=batch, resolution=res, dtype=DTYPE, layout="NHWC", path=path,
                             provider="triton_conv" if path == "fused" else "eager", **counts,
                             floor_ms=float(f"{counts['bytes'] / gate.HBM_BYTES_PER_S * 1e3:.4g}"),
                             hbm_bytes_per_s=gate.HBM_BYTES_PER_S))
            progress(f"{net} {path}: {counts['bytes'] / 1e9:.3f} GB, floor {rows[-1]['floor_ms']} ms "
                     f"({time.time() - t0:.1f} s)")
    return rows


def main(argv: Optional[List[str]] = None) -> List[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_bytes", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="write the rows to this JSONL file (replaced atomically)")
    args = p.parse_args(argv)
    from fastresnet.kernels import interpreting
    if interpreting():  # the launch recorder replaces compiled kernels' launches, which the interpreter bypasses
        p.error("TRITON_INTERPRET is set: run without it (it records the GPU's launches and runs nothing)")
    rows = build_rows()
    if args.out:
        from benchmarks.common import environment
        meta = dict(environment(torch.device("cpu")), bench="step_bytes", label="current", target="sm_90")
        gate.write_atomic(args.out, rows, meta)
        print(f"wrote {len(rows)} rows to {args.out}")
    return rows


if __name__ == "__main__":
    main()
