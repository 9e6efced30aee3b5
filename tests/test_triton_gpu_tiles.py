"""The tier-B Triton conv kernels with the tiles a GPU picks, run under the interpreter against float64.

Under the interpreter `gemm_tiles` / `wgrad_tiles` return the interpreter's own 32-row tiles, so the GPU's branches
(128/64-row tiles, several channel blocks per tap, many wgrad splits, halved blocks) would first run on a GPU. Here
the GPU rule is posed from the test: the choosers run as on a CUDA device (`interpreting` false, the device a GPU)
with an SM count scaled so that a small batch takes exactly the tiles of batch 128 (ImageNet: 64) on 132 SMs. Every
distinct (kernel, tile shape, several K blocks or not, wgrad split and row-block loop or not, kernel size, stride —
the dgrad phases) class over the zoo's conv shapes, for the 2-byte (bf16/fp16) and 4-byte (fp32) element rules, has
one representative, run in fp32 (fp32 dots: the interpreter cannot run bf16 dots or TF32) against float64, with the
tiles that ran recorded from the launches. The bf16 and TF32 dot paths are the GPU script's to check.
"""
from __future__ import annotations

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
    """The (fwd, dgrad, wgrad) tile classes the GPU rule gives `shape` with el-byte operands on `sms` SMs."""
    (n, ci, h, w), (co, _, k, _), st, pd = shape
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(K, "interpreting", lambda: False)
        mp.setattr(K, "_sms", lambda device: sms)
        ho, wo = K.conv_out_hw(h, w, k, st, pd)
        f = K.gemm_tiles(n * ho * wo, co, ci, el, el, GPU)
        rows = max(p.rows for p in K.dgrad_phases(h, w, k, st, pd) if p.taps_h * p.taps_w)
        d = K.gemm_tiles(n * rows, ci, co, el, el, GPU)
        wt, wrows, splits = K.wgrad_tiles(n * ho * wo, co, ci, k * k, el, el, GPU)
    return (("fwd", f.block_m, f.block_n, f.block_k, ci > f.block_k, k, st),
            ("dgrad", d.block_m, d.block_n, d.block_k, co > d.block_k, k, st),
            ("wgrad", wt.block_m, wt.block_n, wt.block_k, splits > 1, wrows // wt.block_m > 1, k))


# (zoo shape, operand bytes, small problem, SM count): for each (shape, rule) of ZOO_SHAPES that brings classes not
# seen before it, the cheapest problem found (same kernel size, stride and padding; batch, channels and spatial size
# halved) whose classes on that many SMs are the shape's classes on 132 SMs — checked live by the test, so a changed
# tile rule fails here instead of silently testing other tiles.
REPS = [
    (ZOO_SHAPES[0], 2, ((128, 4, 4, 4), (4, 4, 3, 3), 1, 1), 10),
    (ZOO_SHAPES[1], 2, ((128, 4, 8, 8), (32, 4, 3, 3), 2, 1), 10),
    (ZOO_SHAPES[2], 2, ((128, 32, 4, 4), (32, 32, 3, 3), 1, 1), 10),
    (ZOO_SHAPES[3], 2, ((16, 32, 16, 16), (64, 32, 3, 3), 2, 1), 19),
    (ZOO_SHAPES[4], 2, ((16, 64, 8, 8), (64, 64, 3, 3), 1, 1), 19),
    (ZOO_SHAPES[5], 2, ((32, 4, 4, 4), (64, 4, 1, 1), 1, 0), 2),
    (ZOO_SHAPES[6], 2, ((16, 64, 4, 4), (4, 64, 1, 1), 1, 0), 2),
    (ZOO_SHAPES[7], 2, ((4, 32, 16, 16), (128, 32, 1, 1), 1, 0), 5),
    (ZOO_SHAPES[7], 4, ((2, 32, 16, 16), (128, 32, 1, 1), 1, 0), 3),
    (ZOO_SHAPES[8], 2, ((32, 128, 4, 4), (32, 128, 1, 1), 1, 0), 3),
    (ZOO_SHAPES[9], 2, ((8, 64, 8, 8), (256, 64, 1, 1), 1, 0), 9),
    (ZOO_SHAPES[10], 2, ((8, 256, 8, 8), (64, 256, 1, 1), 1, 0), 9),
    (ZOO_SHAPES[11], 2, ((2, 64, 36, 36), (64, 64, 3, 3), 1, 1), 19),
    (ZOO_SHAPES[12], 2, ((1, 64, 56, 56), (128, 64, 1, 1), 1, 0), 2),
    (ZOO_SHAPES[12], 4, ((2, 64, 28, 28), (128, 64, 1, 1), 1, 0), 2),
    (ZOO_SHAPES[13], 2, ((1, 128, 56, 56), (64, 128, 1, 1), 1, 0), 3),
    (ZOO_SHAPES[14], 2, ((33, 128, 12, 12), (128, 128, 3, 3), 1, 1), 37),
    (ZOO_SHAPES[15], 2, ((4, 128, 28, 28), (128, 128, 1, 1), 1, 0), 3),
    (ZOO_SHAPES[17], 2, ((57, 128, 12, 12), (128, 128, 3, 3), 1, 1), 1),
    (ZOO_SHAPES[20], 2, ((4, 128, 7, 7), (128, 128, 3, 3), 1, 1), 3),
    (ZOO_SHAPES[20], 4, ((2, 128, 7, 7), (128, 128, 3, 3), 1, 1), 2),
    (ZOO_SHAPES[21], 2, ((8, 128, 7, 7), (256, 128, 1, 1), 1, 0), 5),
    (ZOO_SHAPES[22], 2, ((8, 256, 7, 7), (128, 256, 1, 1), 1, 0), 5),
    (ZOO_SHAPES[23], 2, ((16, 32, 18, 18), (32, 32, 3, 3), 2, 1), 10),
    (ZOO_SHAPES[24], 2, ((16, 64, 14, 14), (64, 64, 3, 3), 2, 1), 19),
]


def _record(monkeypatch, log):
    """Wraps the three conv kernels so every launch appends its class (as gpu_classes spells it) to log."""
    def wrap(name, kernel, key):
        class Recorder:
            def __getitem__(self, grid):
                launch = kernel[grid]

                def run(*args, **kw):
                    log.append(key(grid, kw))
                    return launch(*args, **kw)
                return run
        monkeypatch.setattr(K, name, Recorder())
    gemm = lambda tag: lambda g, kw: (tag, kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["K_BLOCKS"] > 1,  # noqa
                                      kw["KH"], kw["STRIDE"])
    wrap("_conv_fwd_kernel", K._conv_fwd_kernel, gemm("fwd"))
    wrap("_conv_dgrad_kernel", K._conv_dgrad_kernel, gemm("dgrad"))
    wrap("_conv_wgrad_kernel", K._conv_wgrad_kernel,
         lambda g, kw: ("wgrad", kw["BLOCK_M"], kw["BLOCK_CO"], kw["BLOCK_CI"], g[2] > 1, kw["ROW_BLOCKS"] > 1, kw["KH"]))


def pose_gpu_rule(monkeypatch, el: int, sms: int):
    """The tile choosers answer as on a `sms`-SM GPU for el-byte operands (the data stays fp32 on the CPU)."""
    gemm, wgrad = K.gemm_tiles, K.wgrad_tiles
    monkeypatch.setattr(K, "interpreting", lambda: False)
    monkeypatch.setattr(K, "_sms", lambda device: sms)
    monkeypatch.setattr(K, "gemm_tiles", lambda m, n, k, a, b, device: gemm(m, n, k, el, el, GPU))
    monkeypatch.setattr(K, "wgrad_tiles", lambda m, co, ci, taps, a, b, device, splits=None:
                        wgrad(m, co, ci, taps, el, el, GPU, splits))


def run_and_errors(shape):
    """Forward (with statistics) and backward of `shape` in fp32 (NHWC) through the tier-B kernels; the max error of
    each kernel's outputs against float64, relative to the outputs' largest magnitude."""
    (n, ci, h, w), (co, _, k, _), st, pd = shape
    x = (torch.randn(n, ci, h, w) + 0.5).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(co, ci, k, k) / (ci * k * k) ** 0.5).contiguous(memory_format=torch.channels_last)
    mean, rstd = x.mean((0, 2, 3)), torch.rand(ci) + 0.5
    scale, shift = reference.scale_shift(mean, rstd, torch.rand(ci) + 0.5, torch.randn(ci) * 0.1)
    y, ym, yv = K.conv_forward(x, scale, shift, weight, st, pd, stats=True)
    dy = torch.randn_like(y)
    dx, dw, sdz, sdzx = K.conv_backward(dy, x, scale, shift, mean, rstd, weight, st, pd, True)

    d = lambda t: t.double()  # noqa: E731
    a64 = reference.bn_relu(d(x), d(scale), d(shift)).requires_grad_()
    w64 = d(weight).requires_grad_()
    y64 = F.conv2d(a64, w64, None, st, pd)
    y64.backward(d(dy))
    m64, v64 = reference.batch_stats(y64.detach())
    dx64, sdz64, sdzx64 = reference.bn_relu_backward(a64.grad, d(x), d(scale), d(shift), d(mean), d(rstd), True)
    rel = lambda got, want: ((d(got) - want).abs().max() / want.abs().max()).item()  # noqa: E731
    return {"fwd": max(rel(y, y64.detach()), rel(ym, m64), rel(yv, v64)),
            "dgrad": max(rel(dx, dx64), rel(sdz, sdz64), rel(sdzx, sdzx64)), "wgrad": rel(dw, w64.grad)}


# fp32 products summed over K ≤ 4608 (and the statistics over M rows) in tile order: a relative error of a few
# 1e-7 against float64 (both the GPU's and the interpreter's tiles measure 1e-7–4e-7); 2e-6 leaves room, and a
# wrong tile (a lost K block, a split summed twice, a missed row) is off by O(1e-2) or more
TOL = 2e-6


def _params():
    """REPS as pytest params; problems of more than 1e8 multiply-adds (the two 128→128 3×3 convs at 12×12 of 33 and
    57 images, whose wgrad walks 128-row blocks of 128×64 and 128×128 tiles over several splits, and the 64→64 3×3
    stride-2 conv of 16 images at 14×14; a minute or more each under the interpreter) are `slow`."""
    for shape, el, problem, sms in REPS:
        (n, ci, h, w), (co, _, k, _), _, _ = problem
        slow = n * ci * h * w * co * k * k > 1e8
        yield pytest.param(shape, el, problem, sms, marks=[pytest.mark.slow] if slow else [],
                           id=f"{shape[0][1]}to{shape[1][0]}-k{shape[1][2]}-s{shape[2]}-{shape[0][2]}px-{el}B")


@pytest.mark.parametrize("shape,el,problem,sms", list(_params()))
def test_gpu_tile_class(monkeypatch, shape, el, problem, sms):
    target = gpu_classes(shape, el, GPU_SMS)
    assert gpu_classes(problem, el, sms) == target, "the tile rule changed: derive a new small problem"
    log = []
    _record(monkeypatch, log)
    pose_gpu_rule(monkeypatch, el, sms)
    errors = run_and_errors(problem)
    assert set(log) == set(target), (log, target)  # the GPU's tiles ran (every dgrad phase alike)
    for kernel, err in errors.items():
        assert err <= TOL, (kernel, err)


def test_classes_counted():
    """The classes the GPU rule produces over ZOO_SHAPES: each has a representative, and their count."""
    classes = {c for el in RULE_BYTES for s in ZOO_SHAPES for c in gpu_classes(s, el, GPU_SMS)}
    assert classes == {c for shape, el, _, _ in REPS for c in gpu_classes(shape, el, GPU_SMS)}
    assert len(classes) == 57


@pytest.mark.slow  # walks every zoo model's layers (about 2 minutes on the meta device)
def test_zoo_classes_are_covered():
    from benchmarks.bench_conv_shapes import conv_shapes
    from fastresnet.models.registry import default_num_classes, list_models
    covered = {c for el in RULE_BYTES for s in ZOO_SHAPES for c in gpu_classes(s, el, GPU_SMS)}
    for name in list_models():
        imagenet = default_num_classes(name) == 1000
        for s in conv_shapes(name, 64 if imagenet else 128, 224 if imagenet else 32):
            for el in RULE_BYTES:
                assert set(gpu_classes(s, el, GPU_SMS)) <= covered, (name, s, el)
