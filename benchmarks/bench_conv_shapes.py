"""Per-layer conv timings: every distinct BN-ReLU-conv shape of a zoo net, tier B vs tier A vs cuDNN, each next to
its floor (docs/architecture.md §5).

    python -m benchmarks.bench_conv_shapes                                  # GPU: preact_resnet164 and 1001, bf16
    python -m benchmarks.bench_conv_shapes --models preact_resnet164 --batch 128 --dtype bf16 --out rows.jsonl
    python -m benchmarks.bench_conv_shapes --cpu-smoke                      # a tiny CPU run that checks the harness

For each distinct (x shape, weight shape, stride) of the net's fused convs at the given batch (found by running one
unchained training forward with hooks), one forward + backward (dgrad, BN-ReLU backward, wgrad) of:
- `tier_b`: the Triton implicit-GEMM kernels (`fastresnet.kernels.conv`: BN-ReLU prologue, fused epilogues);
- `tier_a`: fastresnet's elementwise kernels around cuDNN (`Backend.bn_relu_conv` and its backward on the "triton"
  backend);
- `cudnn`: eager PyTorch, relu(x·scale + shift) then F.conv2d, backward by autograd (the activation is stored).
ms = median of CUDA-event timings after warm-up. Floors, from the device ceilings measured in the same run: bytes
(forward reads x and W and writes y; backward reads dy, x, W and writes dx and dW) ÷ copy GB/s, and FLOPs (2·MACs
forward, 4·MACs backward) ÷ bf16 matmul TFLOP/s; `floor_ms` is the larger, the time no kernel can beat.
Rows: one per (shape, provider), JSON Lines.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from benchmarks import common
from fastresnet import create_model
from fastresnet.backends import get_backend_impl
from fastresnet.backends.base import Backend
from fastresnet.nn.layers import PreActConv2d
from fastresnet.nn.units import run_per_layer

MODELS = ("preact_resnet164", "preact_resnet1001")
PROVIDERS = ("tier_b", "tier_a", "cudnn")
Shape = Tuple[Tuple[int, ...], Tuple[int, ...], int, int]   # (x shape, weight shape, stride, padding)


def conv_shapes(model_name: str, batch: int, image_size: int) -> List[Shape]:
    """The distinct (x shape, weight shape, stride, padding) of the fused convs of one training forward, in order of
    first use (found on the meta device: no memory, no compute)."""
    with torch.device("meta"):
        model = create_model(model_name, backend="torch").train()
    # a stage's units after its second are built as the second (stride 1, as many channels in as out) and get the
    # shape it outputs, which is its input's: the first two units of each stage make all the stage's shapes
    for stage in model.stages:
        del stage[2:]
    model = run_per_layer(model)  # layer by layer, so every PreActConv2d's forward (and hook) runs
    seen: Dict[Shape, None] = {}

    def hook(mod, args):
        c = mod.conv
        seen[(tuple(args[0].shape), tuple(c.weight.shape), c.stride[0], c.padding[0])] = None
    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, PreActConv2d)]
    with torch.no_grad():
        model(torch.empty(batch, 3, image_size, image_size, device="meta"))
    for h in handles:
        h.remove()
    return list(seen)


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device):
    x_shape, w_shape, stride, padding = shape
    fmt = torch.channels_last
    x = (1.0 + torch.randn(x_shape, device=device)).to(dtype).contiguous(memory_format=fmt)
    c = x_shape[1]
    mean, rstd = torch.full((c,), 1.0, device=device), torch.ones(c, device=device)
    scale, shift = torch.ones(c, device=device), torch.full((c,), -1.0, device=device)
    w = (torch.randn(w_shape, device=device) / (w_shape[1] * w_shape[2] ** 2) ** 0.5).to(dtype)
    return x, w.contiguous(memory_format=fmt), mean, rstd, scale, shift, [stride] * 2, [padding] * 2


def provider_step(provider: str, shape: Shape, dtype: torch.dtype, device: torch.device):
    """A zero-argument callable: one forward + backward of the shape on the provider."""
    x, w, mean, rstd, scale, shift, st, pd = _inputs(shape, dtype, device)
    y = F.conv2d(torch.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(dtype), w, None, st, pd)
    dy = torch.randn_like(y)
    if provider == "tier_b":
        from fastresnet.kernels import conv as K

        def step():
            K.conv_forward(x, scale, shift, w, st[0], pd[0])
            K.conv_backward(dy, x, scale, shift, mean, rstd, w, st[0], pd[0], True)
        return step
    if provider == "tier_a":
        impl = get_backend_impl("triton")

        def step():
            Backend.bn_relu_conv(impl, x, scale, shift, w, st, pd)
            Backend.bn_relu_conv_backward(impl, dy, x, scale, shift, mean, rstd, w, st, pd, True)
        return step
    if provider == "cudnn":
        xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()

        def step():
            a = torch.relu(xg * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(dtype)
            out = F.conv2d(a, wg, None, st, pd)
            torch.autograd.grad(out, (xg, wg), dy)
        return step
    raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")


def floors(shape: Shape, dtype: torch.dtype, ceil: Dict[str, object]) -> Dict[str, float]:
    """Bytes, FLOPs and the floor time of one forward + backward of the shape."""
    x_shape, w_shape, stride, padding = shape
    n, c, h, w = x_shape
    ho, wo = (h + 2 * padding - w_shape[2]) // stride + 1, (w + 2 * padding - w_shape[3]) // stride + 1
    x_el, y_el, w_el = n * c * h * w, n * w_shape[0] * ho * wo, w_shape[0] * c * w_shape[2] * w_shape[3]
    size = torch.empty((), dtype=dtype).element_size()
    nbytes = size * ((x_el + w_el + y_el) + (y_el + x_el + w_el + x_el + w_el))
    macs = y_el * c * w_shape[2] * w_shape[3]
    flops = 6.0 * macs
    bytes_ms = nbytes / (ceil["ceiling_copy_gbps"] * 1e9) * 1e3
    flops_ms = flops / (ceil["ceiling_matmul_tflops"] * 1e12) * 1e3
    return dict(bytes=nbytes, flops=flops, bytes_floor_ms=bytes_ms, flops_floor_ms=flops_ms,
                floor_ms=max(bytes_ms, flops_ms))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_conv_shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--iters", type=int, default=20, help="timed calls per cell (median reported)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="JSON Lines file to append to (default: $FASTRESNET_BENCH_DIR or "
                                               "./benchmark-results)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run (batch 2, 8×8, 1 call) that checks the "
                                                            "harness; the Triton providers get 'skipped' rows there")
    a = p.parse_args(argv)
    if a.batch < 1 or a.image_size < 1 or a.iters < 1:
        p.error("--batch, --image-size, --iters: expected positive integers")
    device = common.resolve_device("cpu" if a.cpu_smoke else a.device)
    if a.cpu_smoke:
        a.batch, a.image_size, a.iters, a.models = 2, 8, 1, "preact_resnet164"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    env = common.environment(device)
    ceil = common.ceilings(device)
    out = Path(a.out) if a.out else common.default_out("conv_shapes", env)
    probe = torch.empty(2, 4, 2, 2, device=device, dtype=dtype)
    for model_name in a.models.split(","):
        for shape in conv_shapes(model_name, a.batch, a.image_size):
            base = dict(env, **ceil, bench="conv_shapes", smoke=a.cpu_smoke, model=model_name, dtype=a.dtype,
                        batch=a.batch, x_shape=list(shape[0]), w_shape=list(shape[1]), stride=shape[2],
                        padding=shape[3], **floors(shape, dtype, ceil))
            rows = []
            for provider in PROVIDERS:
                skip = None if provider == "cudnn" else common.backend_skip(
                    "triton_conv" if provider == "tier_b" else "triton", probe)
                if skip is not None:
                    rows.append(dict(base, provider=provider, status=skip[0], reason=skip[1]))
                    continue
                try:
                    fn = provider_step(provider, shape, dtype, device)
                    fn()
                    ms = common.quantile(common.time_calls(fn, a.iters, device), 0.5)
                except Exception as e:  # noqa: BLE001 — one failing cell is a row, the run goes on
                    rows.append(dict(base, provider=provider, status="oom" if common.is_oom(e) else "error",
                                     reason=f"{type(e).__name__}: {e}"[:300]))
                    continue
                rows.append(dict(base, provider=provider, status="ok", reason=None, ms=ms,
                                 pct_of_floor=100 * base["floor_ms"] / ms))
            common.write_rows(out, rows)
            print(f"{model_name} x{list(shape[0])} w{list(shape[1])} s{shape[2]}: floor {base['floor_ms']:.4f} ms  "
                  + "  ".join(f"{r['provider']} {r['ms']:.4f}" if r["status"] == "ok" else
                              f"{r['provider']} {r['status']}" for r in rows), flush=True)
    print(f"rows -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
