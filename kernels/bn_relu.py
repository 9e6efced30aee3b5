"""Fused BN-apply + ReLU, forward and hand-written backward (docs/architecture.md §2), on x viewed as [M = N·H·W, C].

Per channel c: scale s, shift t (BN folded: s = γ·rstd, t = β − μ·s), batch mean μ and rstd.

Forward (`_bn_relu_fwd_kernel`, grid [cdiv(M, BLOCK_M), cdiv(C, BLOCK_C)]): a = relu(x·s + t) in fp32 (fp64 for
fp64 x; NaN propagates as in `torch.relu`), one rounding to out_dtype at the store. Given a `kernels.stats.BNAffine`
instead of (s, t), every program forms s and t from the batch statistics and program (0, 0) keeps them with rstd
and makes the running update (`kernels.stats.finalize_bn`).

Backward, given dy = dL/da, in three launches (2–3 are `bn_backward_from_partials`, shared with the tier-B conv):
1. `_bn_relu_bwd_partial_kernel` (grid [T, cdiv(C, BLOCK_C)]): dz = 0 where x·s + t ≤ 0, else dy (`relu_grad`: a NaN
   x·s + t passes dy, as PyTorch's ReLU backward; the mask is recomputed from x, never stored), per-tile partial
   sums Σdz and Σdz·x̂ (x̂ = (x − μ)·rstd) into a [2, T, C] buffer;
2. `_bn_relu_bwd_merge_kernel`: sums the T partials in tile order (deterministic, no atomics; for large T in two
   levels, groups of ⌈√T⌉ tiles summed in parallel first: `kernels.stats.sum_groups`) and folds the
   training-mode BN backward into per-channel coefficients k1 = −s·rstd·Σdz·x̂/M, k0 = −s·Σdz/M;
3. `_bn_relu_bwd_dx_kernel` (elementwise): dx = s·dz + k1·(x − μ) + k0 (+ dres), i.e. s·(dz − Σdz/M − x̂·Σdz·x̂/M);
   eval mode (running statistics are constants): dx = s·dz (+ dres). The affine form is kept in (x − μ) rather than
   expanded to A·dz + B·x + C, which would cancel when |μ| ≫ σ.

Layouts: dense NHWC (channels_last; the fast path, C innermost) or dense NCHW; dy and dres must share x's layout
(the backend copies strided views and mismatched layouts to x's layout first). dtypes: x, dy, dres any of
fp16/bf16/fp32/fp64 (each upcast on load; docs/architecture.md §6), scale/shift/mean/rstd [C] floating, dx in
x's dtype, sums in fp32 (fp64 for fp64 x).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastresnet.kernels import last_program_merge
from fastresnet.kernels.stats import (
    FLOAT_DTYPES, BNAffine, acc_dtype, bn_scale_shift, check_channel_vector, check_tensor, finalize_affine,
    finalize_bn, finish_counters, group_counter, group_size, last_program, memory_format, merge_rows, release_counter,
    relu, relu_grad, sum_groups, tile_config, tile_indices, tile_offsets, tl_dtype, top_counter,
)


@triton.jit
def _bn_relu_fwd_kernel(
    x_ptr,      # [N, C, H, W] dense NHWC/NCHW, any float dtype: BN input
    a_ptr,      # [N, C, H, W] same layout, out dtype: activation
    scale_ptr,  # [C]: s (read unless AFFINE)
    shift_ptr,  # [C]: t (read unless AFFINE)
    bn_mean, bn_var, bn_w, bn_b, bn_consts, bn_rstd, bn_scale, bn_shift, bn_rm, bn_rv, bn_nbt,  # AFFINE: BNAffine
    M, C, HW,
    ACC: tl.constexpr, NHWC: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    AFFINE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, UPDATE: tl.constexpr, C_BLOCKS: tl.constexpr,
):
    rows, cols = tile_indices(tl.program_id(0), tl.program_id(1), 0, 1, BLOCK_M, BLOCK_C, INT64)
    cmask = cols < C
    mask = (rows < M)[:, None] & cmask[None, :]
    offs = tile_offsets(rows, cols, C, HW, NHWC)
    if AFFINE:  # BN's affine map from the batch statistics, in every program; program (0, 0) keeps it (finalize_bn)
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            finalize_bn(bn_mean, bn_var, bn_w, bn_b, bn_consts, bn_rstd, bn_scale, bn_shift, bn_rm, bn_rv, bn_nbt, C,
                        HAS_W, HAS_B, UPDATE, BLOCK_C, C_BLOCKS)
        _, _, s, t = bn_scale_shift(bn_mean, bn_var, bn_w, bn_b, bn_consts, cols, cmask, HAS_W, HAS_B)
        s = s.to(ACC)
        t = t.to(ACC)
    else:
        s = tl.load(scale_ptr + cols, mask=cmask, other=0.0).to(ACC)
        t = tl.load(shift_ptr + cols, mask=cmask, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    a = relu(x * s[None, :] + t[None, :])
    tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "T", "ITERS", "GROUPS", "ROWS"])  # batch-dependent: one compile for all
def _bn_relu_bwd_partial_kernel(
    dy_ptr,     # [N, C, H, W] layout of x, any float dtype: dL/da
    x_ptr,      # [N, C, H, W] dense NHWC/NCHW: BN input
    scale_ptr, shift_ptr, mean_ptr, rstd_ptr,  # [C] each: s, t, μ, rstd
    part_ptr,   # [2, T, C] ACC out: per-tile (Σdz, Σdz·x̂)
    count_ptr, sum_dz_ptr, sum_dz_xhat_ptr, coef_ptr,  # FINISH only: `BNFinish` (counters and step 2's outputs)
    M, C, HW, T, ITERS, GROUPS, ROWS,
    ACC: tl.constexpr, NHWC: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    TRAINING: tl.constexpr, FINISH: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    s = tl.load(scale_ptr + cols, mask=cmask, other=0.0).to(ACC)
    t = tl.load(shift_ptr + cols, mask=cmask, other=0.0).to(ACC)
    mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(ACC)
    r = tl.load(rstd_ptr + cols, mask=cmask, other=0.0).to(ACC)
    sum_dz = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dz_xhat = tl.zeros([BLOCK_C], dtype=ACC)
    for it in range(ITERS):
        rows, cols_i = tile_indices(pid_t, pid_c, it, ITERS, BLOCK_M, BLOCK_C, INT64)
        mask = (rows < M)[:, None] & cmask[None, :]
        offs = tile_offsets(rows, cols_i, C, HW, NHWC)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        dz = relu_grad(x * s[None, :] + t[None, :], dy)  # dy is 0 where ~mask
        sum_dz += tl.sum(dz, axis=0)
        sum_dz_xhat += tl.sum(dz * ((x - mu[None, :]) * r[None, :]), axis=0)
    tl.store(part_ptr + pid_t * C + cols, sum_dz, mask=cmask)
    tl.store(part_ptr + (T + pid_t) * C + cols, sum_dz_xhat, mask=cmask)
    if FINISH:  # step 2 run by the last programs of the channel block's groups (docs/kernels.md)
        finish_bn_backward(part_ptr, count_ptr, scale_ptr, rstd_ptr, sum_dz_ptr, sum_dz_xhat_ptr, coef_ptr, C, T, M,
                           pid_t, pid_c, tl.num_programs(1), GROUPS, ROWS, cols, tl.zeros([BLOCK_C], dtype=ACC),
                           TRAINING)


@triton.jit
def sum_partials(part_ptr, C, T, cols, first, ROWS, step, zero):
    """(Σdz, Σdz·x̂) [len(cols)] of the partial rows first, first + step, … (ROWS of them, those < T) of part
    [2, T, C], each summed in row order onto zero (a zero vector of the sums' dtype and length). Loads bypass L1
    (.cg): a finishing program reads what other programs wrote (docs/kernels.md)."""
    cmask = cols < C
    left = tl.zeros_like(cols) + T  # a vector: the interpreter's masks
    sum_dz = zero
    sum_dz_xhat = zero
    for i in range(ROWS):
        row = first + i * step
        ok = cmask & (left > row)
        sum_dz += tl.load(part_ptr + row * C + cols, mask=ok, other=0.0, cache_modifier=".cg")
        sum_dz_xhat += tl.load(part_ptr + (T + row) * C + cols, mask=ok, other=0.0, cache_modifier=".cg")
    return sum_dz, sum_dz_xhat


@triton.jit
def finish_bn_backward(part_ptr, count_ptr, scale_ptr, rstd_ptr, sum_dz_ptr, sum_dz_xhat_ptr, coef_ptr, C, T, M,
                       row, block, blocks, GROUPS, ROWS, cols, zero, TRAINING: tl.constexpr):
    """Step 2 finished inside the launch, for the channels cols of column block `block` by the program that wrote
    partial row `row` of part [2, T, C]: `bn_backward_from_partials`' sums in its order (groups of ROWS rows, each
    in row order, then the group sums in order: the same bits). Level 1: the last program of each group sums it and
    stores the sums over the group's first row; level 2: the last group sums the GROUPS group sums and runs
    `store_bn_backward`. One group: its last program does both. Counters: `kernels.stats.group_counter` and
    `top_counter`, left at zero (docs/kernels.md)."""
    counter = group_counter(count_ptr, row, block, GROUPS, ROWS)
    if last_program(counter, group_size(row, T, ROWS)):
        tl.debug_barrier()
        first = (row // ROWS) * ROWS
        sum_dz, sum_dz_xhat = sum_partials(part_ptr, C, T, cols, first, ROWS, 1, zero)
        release_counter(counter)
        if GROUPS == 1:
            store_bn_backward(sum_dz, sum_dz_xhat, scale_ptr, rstd_ptr, sum_dz_ptr, sum_dz_xhat_ptr, coef_ptr, C, M,
                              cols, TRAINING)
        else:
            cmask = cols < C
            tl.store(part_ptr + first * C + cols, sum_dz, mask=cmask)
            tl.store(part_ptr + (T + first) * C + cols, sum_dz_xhat, mask=cmask)
            top = top_counter(count_ptr, block, blocks, GROUPS)
            if last_program(top, GROUPS):
                tl.debug_barrier()
                sum_dz, sum_dz_xhat = sum_partials(part_ptr, C, T, cols, 0, GROUPS, ROWS, zero)
                store_bn_backward(sum_dz, sum_dz_xhat, scale_ptr, rstd_ptr, sum_dz_ptr, sum_dz_xhat_ptr, coef_ptr,
                                  C, M, cols, TRAINING)
                release_counter(top)


@triton.jit
def store_bn_backward(sum_dz, sum_dz_xhat, scale_ptr, rstd_ptr, sum_dz_ptr, sum_dz_xhat_ptr, coef_ptr, C, M, cols,
                      TRAINING: tl.constexpr):
    """Store Σdz, Σdz·x̂ and, in training, the dx coefficients (k1, k0) (module docstring, step 2)."""
    cmask = cols < C
    tl.store(sum_dz_ptr + cols, sum_dz, mask=cmask)
    tl.store(sum_dz_xhat_ptr + cols, sum_dz_xhat, mask=cmask)
    if TRAINING:
        s = tl.load(scale_ptr + cols, mask=cmask, other=0.0).to(sum_dz.dtype)
        r = tl.load(rstd_ptr + cols, mask=cmask, other=0.0).to(sum_dz.dtype)
        m = M.to(sum_dz.dtype)
        tl.store(coef_ptr + cols, -s * r * sum_dz_xhat / m, mask=cmask)
        tl.store(coef_ptr + C + cols, -s * sum_dz / m, mask=cmask)


@triton.jit(do_not_specialize=["T", "M"])
def _bn_relu_bwd_merge_kernel(
    part_ptr,   # [2, T, C] ACC: per-tile (Σdz, Σdz·x̂)
    scale_ptr, rstd_ptr,  # [C]: s, rstd
    sum_dz_ptr, sum_dz_xhat_ptr,  # [C] ACC out: Σdz, Σdz·x̂
    coef_ptr,   # [2, C] ACC out: (k1, k0) of dx = s·dz + k1·(x − μ) + k0 (zero in eval)
    C, T, M,    # M = N·H·W, divided in ACC (a host 1/M would arrive as an fp32 scalar and cost fp64 accuracy)
    ACC: tl.constexpr, TRAINING: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    sum_dz, sum_dz_xhat = sum_partials(part_ptr, C, T, cols, 0, T, 1, tl.zeros([BLOCK_C], dtype=ACC))
    store_bn_backward(sum_dz, sum_dz_xhat, scale_ptr, rstd_ptr, sum_dz_ptr, sum_dz_xhat_ptr, coef_ptr, C, M, cols,
                      TRAINING)


@triton.jit
def _bn_relu_bwd_dx_kernel(
    dy_ptr,     # [N, C, H, W] layout of x: dL/da
    x_ptr,      # [N, C, H, W] dense NHWC/NCHW: BN input
    dres_ptr,   # HAS_RES only: [N, C, H, W] layout of x: shortcut gradient added to dx
    dx_ptr,     # [N, C, H, W] layout and dtype of x, out
    scale_ptr, shift_ptr, mean_ptr,  # [C]: s, t, μ
    coef_ptr,   # TRAINING only: [2, C] ACC: (k1, k0)
    M, C, HW,
    ACC: tl.constexpr, TRAINING: tl.constexpr, HAS_RES: tl.constexpr, NHWC: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows, cols = tile_indices(tl.program_id(0), tl.program_id(1), 0, 1, BLOCK_M, BLOCK_C, INT64)
    cmask = cols < C
    mask = (rows < M)[:, None] & cmask[None, :]
    offs = tile_offsets(rows, cols, C, HW, NHWC)
    s = tl.load(scale_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    t = tl.load(shift_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    dx = s * relu_grad(x * s + t, dy)  # s·dz: an infinite s makes the 0 of a dropped gradient NaN, as in PyTorch
    if TRAINING:
        mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        k1 = tl.load(coef_ptr + cols, mask=cmask, other=0.0)[None, :]
        k0 = tl.load(coef_ptr + C + cols, mask=cmask, other=0.0)[None, :]
        dx += k1 * (x - mu) + k0
    if HAS_RES:
        dx += tl.load(dres_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_shift_kernel(
    mean_ptr, rstd_ptr,  # [C] ACC: μ, rstd
    w_ptr, b_ptr,        # [C] any float dtype: γ (HAS_W), β (HAS_B)
    scale_ptr, shift_ptr,  # [C] ACC out: s = γ·rstd, t = β − μ·s
    C, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr,
):
    # `reference.scale_shift`'s operations in its order, each rounded to ACC (the launcher turns off FMA contraction)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < C
    s = tl.load(rstd_ptr + cols, mask=ok, other=0.0)
    if HAS_W:
        s = tl.load(w_ptr + cols, mask=ok, other=0.0).to(s.dtype) * s
    ms = tl.load(mean_ptr + cols, mask=ok, other=0.0) * s
    if HAS_B:
        t = tl.load(b_ptr + cols, mask=ok, other=0.0).to(s.dtype) - ms
    else:
        t = -ms
    tl.store(scale_ptr + cols, s, mask=ok)
    tl.store(shift_ptr + cols, t, mask=ok)


def _elementwise_grid(cfg: dict) -> Tuple[int, int]:
    return triton.cdiv(cfg["M"], cfg["BLOCK_M"]), triton.cdiv(cfg["C"], cfg["BLOCK_C"])


def bn_relu_forward(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                    out_dtype: Optional[torch.dtype] = None, affine: Optional[BNAffine] = None) -> Tensor:
    """a = max(x·scale + shift, 0) [N, C, H, W] in out_dtype (default x.dtype) and x's layout (dense NCHW or
    channels_last); scale, shift [C]. Semantics of `fastresnet.reference.bn_relu`. affine: a `kernels.stats.BNAffine`
    instead of (scale, shift) (both None): the kernel forms the affine map from the batch statistics and fills
    affine's rstd, scale and shift and running buffers."""
    nhwc = check_tensor(x, "x")
    if affine is None:
        check_channel_vector(scale, "scale", x)
        check_channel_vector(shift, "shift", x)
    else:
        check_channel_vector(affine.mean, "affine.mean", x)
    out_dtype = out_dtype or x.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected float16, bfloat16, float32 or float64, got {out_dtype}")
    a = torch.empty(x.shape, dtype=out_dtype, device=x.device, memory_format=memory_format(nhwc))
    if x.numel() == 0:
        if affine is not None:
            finalize_affine(affine)
        return a
    cfg = tile_config(x)
    bn = affine.kernel_args() if affine is not None else (scale,) * 11
    flags = affine.constexprs() if affine is not None else dict(HAS_W=False, HAS_B=False, UPDATE=0)
    _bn_relu_fwd_kernel[_elementwise_grid(cfg)](
        x, a, scale if affine is None else affine.scale, shift if affine is None else affine.shift, *bn, cfg["M"],
        cfg["C"], cfg["HW"], ACC=tl_dtype(acc_dtype(x.dtype)), NHWC=nhwc, INT64=cfg["INT64"], BLOCK_M=cfg["BLOCK_M"],
        BLOCK_C=cfg["BLOCK_C"], AFFINE=affine is not None, C_BLOCKS=triton.cdiv(cfg["C"], cfg["BLOCK_C"]) if affine is not None else 1,
        num_warps=cfg["NUM_WARPS"], **flags)
    return a


def bn_relu_backward(
    dy: Tensor, x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, rstd: Tensor, training: bool,
    dres: Optional[Tensor] = None, *, block_m: Optional[int] = None, tiles: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of a = relu(BN(x)): returns (dx, Σdz, Σdz·x̂), dx [N, C, H, W] in x's dtype and layout, the sums
    [C] in fp32 (fp64 for fp64 x); dγ = Σdz·x̂, dβ = Σdz. dy, dres: x's shape and layout. Semantics of
    `fastresnet.reference.bn_relu_backward`."""
    nhwc = check_tensor(x, "x")
    check_tensor(dy, "dy", like=x)
    if dres is not None:
        check_tensor(dres, "dres", like=x)
    for name, v in (("scale", scale), ("shift", shift), ("mean", mean), ("rstd", rstd)):
        check_channel_vector(v, name, x)
    if x.numel() == 0:
        return empty_backward(x, nhwc)
    cfg = tile_config(x, block_m, tiles)
    c, t = cfg["C"], cfg["T"]
    part = torch.empty((2, t, c), dtype=acc_dtype(x.dtype), device=x.device)
    c_blocks = triton.cdiv(c, cfg["BLOCK_C"])
    fin = bn_finish(t, c, c_blocks, part.dtype, x.device, training)
    _bn_relu_bwd_partial_kernel[(t, c_blocks)](
        dy, x, scale, shift, mean, rstd, part, *(fin[:4] if fin else (part,) * 4), cfg["M"], c, cfg["HW"], t,
        cfg["ITERS"], fin.groups if fin else 1, fin.rows if fin else 1, ACC=tl_dtype(part.dtype), NHWC=nhwc,
        INT64=cfg["INT64"], BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], TRAINING=training,
        FINISH=fin is not None, num_warps=cfg["NUM_WARPS"])
    return bn_backward_from_partials(part, dy, x, nhwc, scale, shift, mean, rstd, training, dres, cfg, fin)


class BNFinish(NamedTuple):
    """What a BN-backward partial launch whose last programs run step 2 needs (`finish_bn_backward`): the counters
    (`kernels.stats.finish_counters`), step 2's outputs, the merge shape."""
    counters: Tensor
    sum_dz: Tensor
    sum_dz_xhat: Tensor
    coef: Tensor
    groups: int
    rows: int


def bn_finish(t: int, c: int, channel_blocks: int, dtype: torch.dtype, device: torch.device,
              training: bool) -> Optional[BNFinish]:
    """A `BNFinish` for partials [2, t, c] of dtype from t programs per channel block, or None where the separate
    merge runs (FASTRESNET_LAST_PROGRAM_MERGE=0)."""
    if not last_program_merge():
        return None
    counters, groups, rows = finish_counters(t, channel_blocks, device)
    new = functools.partial(torch.empty, dtype=dtype, device=device)
    return BNFinish(counters, new(c), new(c), new((2, c)) if training else new(0), groups, rows)


def empty_backward(x: Tensor, nhwc: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """`bn_relu_backward`'s (dx, Σdz, Σdz·x̂) for an x without elements (N·H·W = 0): an empty dx and sums over no
    values, 0."""
    dx = torch.empty_like(x, memory_format=memory_format(nhwc))
    zeros = torch.zeros(x.shape[1], dtype=acc_dtype(x.dtype), device=x.device)
    return dx, zeros, zeros.clone()


def bn_backward_from_partials(
    part: Tensor, dy: Tensor, x: Tensor, nhwc: bool, scale: Tensor, shift: Tensor, mean: Tensor, rstd: Tensor,
    training: bool, dres: Optional[Tensor] = None, cfg: Optional[dict] = None, fin: Optional[BNFinish] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Steps 2–3 of the backward (module docstring) from per-tile partials part [2, T, C] (Σdz, Σdz·x̂; fp32, fp64
    for fp64 x; any T): returns (dx, Σdz, Σdz·x̂) as `bn_relu_backward`. x: dense NHWC (nhwc=True) or NCHW; dy, dres:
    x's shape and layout (dy may already be masked, dz: the mask is recomputed from x either way). Also used by the
    tier-B conv dgrad (`kernels.conv`), whose epilogue writes dz and these partials. cfg: `tile_config(x)` if None.
    fin: the `BNFinish` whose outputs the partials' launch already wrote (step 2 done), or None."""
    cfg = cfg or tile_config(x)
    c, t = part.shape[2], part.shape[1]
    dx = torch.empty_like(x, memory_format=memory_format(nhwc))
    common = dict(ACC=tl_dtype(part.dtype), BLOCK_C=cfg["BLOCK_C"])
    if fin is not None:
        sum_dz, sum_dz_xhat, coef = fin.sum_dz, fin.sum_dz_xhat, fin.coef if training else part
    else:
        # separate [C] outputs (the custom ops forbid outputs that alias each other)
        sum_dz = torch.empty(c, dtype=part.dtype, device=x.device)
        sum_dz_xhat = torch.empty(c, dtype=part.dtype, device=x.device)
        coef = torch.empty((2, c), dtype=part.dtype, device=x.device) if training else part  # unused in eval
        rows = merge_rows(t)
        if rows < t:  # first level: groups of `rows` tiles summed in parallel, each in tile order
            part = sum_groups(part, rows)
            t = part.shape[1]
        _bn_relu_bwd_merge_kernel[(triton.cdiv(c, cfg["BLOCK_C"]),)](
            part, scale, rstd, sum_dz, sum_dz_xhat, coef, c, t, cfg["M"], TRAINING=training, **common)
    _bn_relu_bwd_dx_kernel[_elementwise_grid(cfg)](
        dy, x, x if dres is None else dres, dx, scale, shift, mean, coef, cfg["M"], c, cfg["HW"],
        TRAINING=training, HAS_RES=dres is not None, NHWC=nhwc, INT64=cfg["INT64"], BLOCK_M=cfg["BLOCK_M"],
        num_warps=cfg["NUM_WARPS"], **common)
    return dx, sum_dz, sum_dz_xhat


def scale_shift(mean: Tensor, rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """BN folded into one affine map in one launch: (scale, shift) [C] in rstd's dtype, scale = γ·rstd, shift =
    β − mean·scale (γ = 1, β = 0 where None), bitwise `fastresnet.reference.scale_shift` (the same roundings, no
    fused multiply-add). mean, rstd: [C] fp32 (fp64), same dtype and device; weight, bias: [C] floating or None."""
    if mean.dim() != 1 or rstd.shape != mean.shape or rstd.dtype != mean.dtype or rstd.device != mean.device:
        raise ValueError(f"mean, rstd: expected two [C] vectors of one dtype and device, got {tuple(mean.shape)} "
                         f"{mean.dtype} on {mean.device} and {tuple(rstd.shape)} {rstd.dtype} on {rstd.device}")
    if rstd.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"rstd: expected float32 or float64 statistics, got {rstd.dtype}")
    for name, v in (("weight", weight), ("bias", bias)):
        if v is not None:
            check_channel_vector(v, name, rstd.new_empty(1, rstd.shape[0], 1, 1))
    c = rstd.shape[0]
    scale, shift = torch.empty_like(rstd), torch.empty_like(rstd)
    if c:
        block = min(1024, triton.next_power_of_2(c))
        _scale_shift_kernel[(triton.cdiv(c, block),)](
            mean, rstd, rstd if weight is None else weight, rstd if bias is None else bias, scale, shift, c,
            HAS_W=weight is not None, HAS_B=bias is not None, BLOCK=block, enable_fp_fusion=False)
    return scale, shift
