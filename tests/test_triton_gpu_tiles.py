"""The tier-B Triton conv kernels with the tiles a GPU picks, run under the interpreter against float64.

Under the interpreter `gemm_tiles` / `wgrad_tiles` return the interpreter's own 32-row tiles, so the GPU's branches
(128/64-row tiles, several channel blocks per tap, many wgrad splits, halved blocks) would first run on a GPU. Here
the GPU rule is posed from the test: the choosers run as on a CUDA device (`interpreting` false, the device a GPU)
with an SM count scaled so that a small problem takes exactly the tiles of batch 128 (ImageNet: 64) on 132 SMs. Every
distinct (kernel, tile shape, several K blocks or not, wgrad split and row-block loop or not, kernel size, stride —
the dgrad phases) class over the zoo's conv shapes, for the 2-byte (bf16/fp16) and 4-byte (fp32) element rules, has
one representative: a small problem that gives that kernel that class, run through that kernel alone in fp32 (fp32
dots: the interpreter cannot run bf16 dots or TF32) against float64, with the tiles that ran recorded from the
launches. The bf16 and TF32 dot paths are the GPU script's to check.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastresnet import reference
from fastresnet.kernels import conv as K
from fastresnet.kernels import interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="runs the Triton kernels under TRITON_INTERPRET=1")

GPU = torch.device("cuda", 0)
GPU_SMS = 132  # H100 / H200 SXM
# The distinct (x shape, weight shape, stride, padding) of preact_resnet110 and preact_resnet1001 at batch 128 and
# preact_resnet101 at batch 64 (benchmarks.bench_conv_shapes.conv_shapes): their classes are those of the whole zoo
# (test_zoo_classes_are_covered); then the stride-2 3×3 convs of preact_resnet164 with stride_on="3x3".
ZOO_SHAPES = [
    ((128, 16, 32, 32), (16, 16, 3, 3), 1, 1), ((128, 16, 32, 32), (32, 16, 3, 3), 2, 1),
    ((128, 32, 16, 16), (32, 32, 3, 3), 1, 1), ((128, 32, 16, 16), (64, 32, 3, 3), 2, 1),
    ((128, 64, 8, 8), (64, 64, 3, 3), 1, 1), ((128, 16, 32, 32), (64, 16, 1, 1), 1, 0),
    ((128, 64, 32, 32), (16, 64, 1, 1), 1, 0), ((128, 32, 16, 16), (128, 32, 1, 1), 1, 0),
    ((128, 128, 16, 16), (32, 128, 1, 1), 1, 0), ((128, 64, 8, 8), (256, 64, 1, 1), 1, 0),
    ((128, 256, 8, 8), (64, 256, 1, 1), 1, 0), ((64, 64, 56, 56), (64, 64, 3, 3), 1, 1),
    ((64, 64, 56, 56), (256, 64, 1, 1), 1, 0), ((64, 256, 56, 56), (64, 256, 1, 1), 1, 0),
    ((64, 128, 28, 28), (128, 128, 3, 3), 1, 1), ((64, 128, 28, 28), (512, 128, 1, 1), 1, 0),
    ((64, 512, 28, 28), (128, 512, 1, 1), 1, 0), ((64, 256, 14, 14), (256, 256, 3, 3), 1, 1),
    ((64, 256, 14, 14), (1024, 256, 1, 1), 1, 0), ((64, 1024, 14, 14), (256, 1024, 1, 1), 1, 0),
    ((64, 512, 7, 7), (512, 512, 3, 3), 1, 1), ((64, 512, 7, 7), (2048, 512, 1, 1), 1, 0),
    ((64, 2048, 7, 7), (512, 2048, 1, 1), 1, 0),
    ((128, 32, 32, 32), (32, 32, 3, 3), 2, 1), ((128, 64, 16, 16), (64, 64, 3, 3), 2, 1),
]
RULE_BYTES = (2, 4)  # bf16 / fp16 operands, fp32 operands


def gpu_classes(shape, el: int, sms: int):
    """{kernel: tile class} the GPU rule gives `shape` with el-byte operands on `sms` SMs, for fwd, dgrad and wgrad."""
    (n, ci, h, w), (co, _, k, _), st, pd = shape
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(K, "interpreting", lambda: False)
        mp.setattr(K, "_sms", lambda device: sms)
        ho, wo = K.conv_out_hw(h, w, k, st, pd)
        f = K.gemm_tiles(n * ho * wo, co, ci, el, el, GPU)
        rows = max(p.rows for p in K.dgrad_phases(h, w, k, st, pd) if p.taps_h * p.taps_w)
        d = K.gemm_tiles(n * rows, ci, co, el, el, GPU)
        wt, wrows, splits = K.wgrad_tiles(n * ho * wo, co, ci, k * k, el, el, GPU)
    return {"fwd": ("fwd", f.block_m, f.block_n, f.block_k, ci > f.block_k, k, st),
            "dgrad": ("dgrad", d.block_m, d.block_n, d.block_k, co > d.block_k, k, st),
            "wgrad": ("wgrad", wt.block_m, wt.block_n, wt.block_k, splits > 1, wrows // wt.block_m > 1, k)}


@functools.lru_cache(maxsize=None)
def zoo_classes():
    """{(kernel, class): (zoo shape, operand bytes)} over ZOO_SHAPES × RULE_BYTES on GPU_SMS (the first shape of
    each)."""
    found = {}
    for el in RULE_BYTES:
        for shape in ZOO_SHAPES:
            for kernel, cls in gpu_classes(shape, el, GPU_SMS).items():
                found.setdefault((kernel, cls), (shape, el))
    return found


# (kernel, zoo shape, operand bytes, small problem, SM count): one row per (kernel, class) of zoo_classes. Each kernel
# runs alone, so a problem needs only its own kernel's class. Each problem is the one of fewest interpreter loop
# steps (per program: its K-loop steps, each weighted 1 + the step's multiply-adds / 2**21, plus 2; wgrad's counted
# with those of a dgrad on the same problem) among those that give the class on some SM count of 1–132: batch
# 1–128, square size 2–28, channels of 4–256 whose block sizes can give the class, the class's kernel size with a
# (stride, padding) of ZOO_SHAPES (the class's stride; wgrad's class has none). The test checks live that each
# problem's class is the zoo shape's, so a changed tile rule fails here instead of silently testing other tiles.
REPS = [
    ("fwd", ZOO_SHAPES[0], 2, ((1, 4, 2, 2), (4, 4, 3, 3), 1, 1), 1),
    ("dgrad", ZOO_SHAPES[0], 2, ((1, 4, 2, 2), (4, 4, 3, 3), 1, 1), 1),
    ("wgrad", ZOO_SHAPES[0], 2, ((64, 4, 3, 3), (4, 4, 3, 3), 2, 1), 10),
    ("fwd", ZOO_SHAPES[1], 2, ((1, 4, 2, 2), (20, 4, 3, 3), 2, 1), 1),
    ("dgrad", ZOO_SHAPES[1], 2, ((1, 4, 2, 2), (20, 4, 3, 3), 2, 1), 1),
    ("wgrad", ZOO_SHAPES[1], 2, ((64, 4, 3, 3), (20, 4, 3, 3), 2, 1), 10),
    ("fwd", ZOO_SHAPES[2], 2, ((1, 20, 2, 2), (20, 20, 3, 3), 1, 1), 1),
    ("dgrad", ZOO_SHAPES[2], 2, ((1, 20, 2, 2), (20, 20, 3, 3), 1, 1), 1),
    ("wgrad", ZOO_SHAPES[2], 2, ((64, 20, 3, 3), (20, 20, 3, 3), 2, 1), 10),
    ("fwd", ZOO_SHAPES[3], 2, ((1, 20, 2, 2), (36, 20, 3, 3), 2, 1), 2),
    ("dgrad", ZOO_SHAPES[3], 2, ((1, 20, 2, 2), (36, 20, 3, 3), 2, 1), 2),
    ("fwd", ZOO_SHAPES[4], 2, ((1, 36, 2, 2), (36, 36, 3, 3), 1, 1), 2),
    ("dgrad", ZOO_SHAPES[4], 2, ((1, 36, 2, 2), (36, 36, 3, 3), 1, 1), 2),
    ("wgrad", ZOO_SHAPES[4], 2, ((64, 36, 3, 3), (20, 36, 3, 3), 2, 1), 10),
    ("fwd", ZOO_SHAPES[5], 2, ((1, 4, 2, 2), (36, 4, 1, 1), 1, 0), 1),
    ("dgrad", ZOO_SHAPES[5], 2, ((1, 4, 2, 2), (36, 4, 1, 1), 1, 0), 1),
    ("wgrad", ZOO_SHAPES[5], 2, ((2, 4, 14, 14), (36, 4, 1, 1), 1, 0), 2),
    ("fwd", ZOO_SHAPES[6], 2, ((1, 36, 2, 2), (4, 36, 1, 1), 1, 0), 1),
    ("dgrad", ZOO_SHAPES[6], 2, ((1, 36, 2, 2), (4, 36, 1, 1), 1, 0), 1),
    ("wgrad", ZOO_SHAPES[6], 2, ((1, 36, 14, 14), (4, 36, 1, 1), 1, 0), 2),
    ("fwd", ZOO_SHAPES[7], 2, ((1, 20, 2, 2), (68, 20, 1, 1), 1, 0), 1),
    ("dgrad", ZOO_SHAPES[7], 2, ((1, 20, 2, 2), (68, 20, 1, 1), 1, 0), 1),
    ("wgrad", ZOO_SHAPES[7], 2, ((1, 20, 14, 14), (20, 20, 1, 1), 1, 0), 2),
    ("fwd", ZOO_SHAPES[8], 2, ((1, 68, 2, 2), (20, 68, 1, 1), 1, 0), 1),
    ("dgrad", ZOO_SHAPES[8], 2, ((1, 68, 2, 2), (20, 68, 1, 1), 1, 0), 1),
    ("wgrad", ZOO_SHAPES[8], 2, ((1, 36, 14, 14), (20, 36, 1, 1), 1, 0), 2),
    ("fwd", ZOO_SHAPES[9], 2, ((2, 36, 6, 6), (68, 36, 1, 1), 1, 0), 2),
    ("dgrad", ZOO_SHAPES[9], 2, ((1, 36, 2, 2), (68, 36, 1, 1), 1, 0), 2),
    ("fwd", ZOO_SHAPES[10], 2, ((1, 68, 2, 2), (36, 68, 1, 1), 1, 0), 2),
    ("dgrad", ZOO_SHAPES[10], 2, ((2, 68, 6, 6), (36, 68, 1, 1), 1, 0), 2),
    ("fwd", ZOO_SHAPES[11], 2, ((1, 36, 2, 2), (36, 36, 3, 3), 1, 1), 1),
    ("dgrad", ZOO_SHAPES[11], 2, ((1, 36, 2, 2), (36, 36, 3, 3), 1, 1), 1),
    ("wgrad", ZOO_SHAPES[11], 2, ((10, 36, 12, 12), (36, 36, 3, 3), 1, 1), 19),
    ("fwd", ZOO_SHAPES[12], 2, ((1, 36, 2, 2), (68, 36, 1, 1), 1, 0), 1),
    ("dgrad", ZOO_SHAPES[12], 2, ((1, 36, 2, 2), (68, 36, 1, 1), 1, 0), 1),
    ("wgrad", ZOO_SHAPES[12], 2, ((3, 36, 16, 16), (68, 36, 1, 1), 1, 0), 2),
    ("fwd", ZOO_SHAPES[13], 2, ((1, 68, 2, 2), (36, 68, 1, 1), 1, 0), 1),
    ("dgrad", ZOO_SHAPES[13], 2, ((1, 68, 2, 2), (36, 68, 1, 1), 1, 0), 1),
    ("wgrad", ZOO_SHAPES[13], 2, ((5, 36, 12, 12), (36, 36, 1, 1), 1, 0), 2),
    ("fwd", ZOO_SHAPES[14], 2, ((1, 68, 2, 2), (68, 68, 3, 3), 1, 1), 1),
    ("dgrad", ZOO_SHAPES[14], 2, ((1, 68, 2, 2), (68, 68, 3, 3), 1, 1), 1),
    ("fwd", ZOO_SHAPES[15], 2, ((1, 68, 2, 2), (68, 68, 1, 1), 1, 0), 1),
    ("dgrad", ZOO_SHAPES[15], 2, ((1, 68, 2, 2), (68, 68, 1, 1), 1, 0), 1),
    ("wgrad", ZOO_SHAPES[17], 2, ((12, 36, 24, 24), (68, 36, 3, 3), 1, 1), 10),
    ("fwd", ZOO_SHAPES[20], 2, ((2, 68, 6, 6), (68, 68, 3, 3), 1, 1), 2),
    ("dgrad", ZOO_SHAPES[20], 2, ((2, 68, 6, 6), (68, 68, 3, 3), 1, 1), 2),
    ("wgrad", ZOO_SHAPES[20], 2, ((16, 36, 5, 5), (68, 36, 3, 3), 2, 1), 1),
    ("dgrad", ZOO_SHAPES[21], 2, ((2, 68, 6, 6), (68, 68, 1, 1), 1, 0), 2),
    ("wgrad", ZOO_SHAPES[21], 2, ((1, 36, 12, 12), (36, 36, 1, 1), 1, 0), 1),
    ("fwd", ZOO_SHAPES[22], 2, ((2, 68, 6, 6), (68, 68, 1, 1), 1, 0), 2),
    ("fwd", ZOO_SHAPES[23], 2, ((1, 20, 2, 2), (20, 20, 3, 3), 2, 1), 1),
    ("dgrad", ZOO_SHAPES[23], 2, ((1, 20, 2, 2), (20, 20, 3, 3), 2, 1), 1),
    ("fwd", ZOO_SHAPES[24], 2, ((1, 36, 2, 2), (36, 36, 3, 3), 2, 1), 2),
    ("dgrad", ZOO_SHAPES[24], 2, ((1, 36, 2, 2), (36, 36, 3, 3), 2, 1), 2),
    ("wgrad", ZOO_SHAPES[7], 4, ((2, 20, 14, 14), (36, 20, 1, 1), 1, 0), 2),
    ("wgrad", ZOO_SHAPES[12], 4, ((6, 36, 8, 8), (68, 36, 1, 1), 1, 0), 2),
    ("wgrad", ZOO_SHAPES[20], 4, ((2, 36, 6, 6), (68, 36, 3, 3), 1, 1), 1),
]


def _record(monkeypatch, log, only: str):
    """Wraps the three conv kernels so every launch appends its class (as gpu_classes spells it) to log; only the
    `only` kernel's launches run (a wgrad's is preceded by conv_backward's dgrad, which it does not read: wgrad
    forms the activation from x and takes dy)."""
    def wrap(name, kernel, key):
        class Recorder:
            def __getitem__(self, grid):
                launch = kernel[grid]

                def run(*args, **kw):
                    log.append(key(grid, kw))
                    return launch(*args, **kw) if log[-1][0] == only else None
                return run
        monkeypatch.setattr(K, name, Recorder())
    gemm = lambda tag: lambda g, kw: (tag, kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["K_BLOCKS"] > 1,  # noqa
                                      kw["KH"], kw["STRIDE"])
    wrap("_conv_fwd_kernel", K._conv_fwd_kernel, gemm("fwd"))
    wrap("_conv_dgrad_kernel", K._conv_dgrad_kernel, gemm("dgrad"))
    wrap("_conv_wgrad_kernel", K._conv_wgrad_kernel, lambda g, kw: (
        "wgrad", kw["BLOCK_M"], kw["BLOCK_CO"], kw["BLOCK_CI"], g[2] > 1, kw["ROW_BLOCKS"] > 1, kw["KH"]))


def pose_gpu_rule(monkeypatch, el: int, sms: int):
    """The tile choosers answer as on a `sms`-SM GPU for el-byte operands (the data stays fp32 on the CPU)."""
    gemm, wgrad = K.gemm_tiles, K.wgrad_tiles
    monkeypatch.setattr(K, "interpreting", lambda: False)
    monkeypatch.setattr(K, "_sms", lambda device: sms)
    monkeypatch.setattr(K, "gemm_tiles", lambda m, n, k, a, b, device: gemm(m, n, k, el, el, GPU))
    monkeypatch.setattr(K, "wgrad_tiles", lambda m, co, ci, taps, a, b, device, splits=None:
                        wgrad(m, co, ci, taps, el, el, GPU, splits))


def run_and_errors(kernel: str, shape):
    """Runs `kernel` on `shape` in fp32 (NHWC) through its tier-B entry point — fwd: `conv_forward` with the
    statistics; dgrad: `conv_backward` without the weight gradient; wgrad: `conv_backward`, its dgrad launches
    skipped by `_record` — and returns the max error of each output against float64, relative to the output's
    largest magnitude (the forward's statistics: to y's, and its square for the variance, which one row makes 0)."""
    (n, ci, h, w), (co, _, k, _), st, pd = shape
    x = (torch.randn(n, ci, h, w) + 0.5).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(co, ci, k, k) / (ci * k * k) ** 0.5).contiguous(memory_format=torch.channels_last)
    mean, rstd = x.mean((0, 2, 3)), torch.rand(ci) + 0.5
    scale, shift = reference.scale_shift(mean, rstd, torch.rand(ci) + 0.5, torch.randn(ci) * 0.1)
    d = lambda t: t.double()  # noqa: E731
    a64 = reference.bn_relu(d(x), d(scale), d(shift)).requires_grad_()
    w64 = d(weight).requires_grad_()
    y64 = F.conv2d(a64, w64, None, st, pd)
    rel = lambda got, want, size: ((d(got) - want).abs().max() / size).item()  # noqa: E731
    if kernel == "fwd":
        y, ym, yv = K.conv_forward(x, scale, shift, weight, st, pd, stats=True)
        m64, v64 = reference.batch_stats(y64.detach())
        y_max = y64.detach().abs().max()  # the statistics are sums of y and y²: their rounding scales with y's size
        return {"y": rel(y, y64.detach(), y_max), "mean": rel(ym, m64, y_max), "var": rel(yv, v64, y_max ** 2)}
    dy = torch.randn(y64.shape).contiguous(memory_format=torch.channels_last)
    # a skipped dgrad leaves dz and its partials unwritten, and the dx pass after it computes on them: numpy's
    # warnings about that memory are silenced (wgrad is judged by dw alone)
    with np.errstate(invalid="ignore", over="ignore") if kernel == "wgrad" else contextlib.nullcontext():
        dx, dw, sdz, sdzx = K.conv_backward(dy, x, scale, shift, mean, rstd, weight, st, pd, True,
                                            need_weight_grad=kernel == "wgrad")
    y64.backward(d(dy))
    if kernel == "wgrad":
        return {"dw": rel(dw, w64.grad, w64.grad.abs().max())}
    dx64, sdz64, sdzx64 = reference.bn_relu_backward(a64.grad, d(x), d(scale), d(shift), d(mean), d(rstd), True)
    return {name: rel(got, want, want.abs().max())
            for name, got, want in (("dx", dx, dx64), ("sum_dz", sdz, sdz64), ("sum_dzx", sdzx, sdzx64))}


# fp32 products summed over K ≤ 4608 (and the statistics over M rows) in tile order: a relative error of a few
# 1e-7 against float64 (both the GPU's and the interpreter's tiles measure 1e-7–4e-7); 2e-6 leaves room, and a
# wrong tile (a lost K block, a split summed twice, a missed row) is off by O(1e-2) or more
TOL = 2e-6


def _params():
    for kernel, shape, el, problem, sms in REPS:
        yield pytest.param(kernel, shape, el, problem, sms,
                           id=f"{kernel}-{shape[0][1]}to{shape[1][0]}-k{shape[1][2]}-s{shape[2]}-{shape[0][2]}px-{el}B")


@pytest.mark.parametrize("kernel,shape,el,problem,sms", list(_params()))
def test_gpu_tile_class(monkeypatch, kernel, shape, el, problem, sms):
    target = gpu_classes(shape, el, GPU_SMS)[kernel]
    assert gpu_classes(problem, el, sms)[kernel] == target, "the tile rule changed: derive a new small problem"
    log = []
    _record(monkeypatch, log, kernel)
    pose_gpu_rule(monkeypatch, el, sms)
    errors = run_and_errors(kernel, problem)
    assert {c for c in log if c[0] == kernel} == {target}, (log, target)  # the GPU's tiles ran (every dgrad phase)
    for output, err in errors.items():
        assert err <= TOL, (output, err)


def test_classes_counted():
    """Each (kernel, class) the GPU rule produces over ZOO_SHAPES has exactly one representative; their count."""
    reps = [(kernel, gpu_classes(shape, el, GPU_SMS)[kernel]) for kernel, shape, el, _, _ in REPS]
    assert sorted(reps) == sorted(zoo_classes())
    assert len(reps) == 57


@pytest.mark.slow  # walks the first two units of each stage of every zoo model on the meta device
def test_zoo_classes_are_covered():
    from benchmarks.bench_conv_shapes import conv_shapes
    from fastresnet.models.registry import default_num_classes, list_models
    covered = {cls for _, cls in zoo_classes()}
    for name in list_models():
        imagenet = default_num_classes(name) == 1000
        for s in conv_shapes(name, 64 if imagenet else 128, 224 if imagenet else 32):
            for el in RULE_BYTES:
                assert set(gpu_classes(s, el, GPU_SMS).values()) <= covered, (name, s, el)

