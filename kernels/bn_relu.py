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

from fastresnet.kernels import grid_barrier as grid_barrier_on, interpreting, last_program_merge
from fastresnet.kernels.stats import (
    FLOAT_DTYPES, BNAffine, acc_dtype, affine_map, bn_scale_shift, check_channel_vector, channel_block, check_tensor,
    finalize_affine, finalize_bn, finish_counters, grid_barrier, grid_depart, group_counter, group_size, last_program,
    launch_counters, launch_stats, memory_format, merge_rows, merge_stats, no_value_stats, release_counter, relu,
    relu_grad, store_partial, sum_groups, tile_config, tile_indices, tile_offsets, tile_partial, tl_dtype,
    top_counter, _device_sms,
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
    sum_dz, sum_dz_xhat = bwd_tile_partial(dy_ptr, x_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, pid_t, pid_c, M,
                                           C, HW, ITERS, ACC, NHWC, INT64, BLOCK_M, BLOCK_C)
    tl.store(part_ptr + pid_t * C + cols, sum_dz, mask=cmask)
    tl.store(part_ptr + (T + pid_t) * C + cols, sum_dz_xhat, mask=cmask)
    if FINISH:  # step 2 run by the last programs of the channel block's groups (docs/kernels.md)
        finish_bn_backward(part_ptr, count_ptr, scale_ptr, rstd_ptr, sum_dz_ptr, sum_dz_xhat_ptr, coef_ptr, C, T, M,
                           pid_t, pid_c, tl.num_programs(1), GROUPS, ROWS, cols, tl.zeros([BLOCK_C], dtype=ACC),
                           TRAINING)


@triton.jit
def bwd_tile_partial(dy_ptr, x_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, pid_t, pid_c, M, C, HW, ITERS,
                     ACC: tl.constexpr, NHWC: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """Step 1 of the backward (module docstring) for row tile pid_t (ITERS chunks) of channel block pid_c: its
    partial (Σdz, Σdz·x̂) [BLOCK_C]."""
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
    return sum_dz, sum_dz_xhat


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
def sum_grouped_partials(part_ptr, C, T, cols, GROUPS, ROWS, zero):
    """(Σdz, Σdz·x̂) [len(cols)] of all T partial rows of part [2, T, C] in `bn_backward_from_partials`' order (groups
    of ROWS rows, each in row order, then the group sums in order: the same bits), held in registers: every program
    of a launch that calls it gets the same values."""
    sum_dz = zero
    sum_dz_xhat = zero
    for g in range(GROUPS):
        group_dz, group_dz_xhat = sum_partials(part_ptr, C, T, cols, g * ROWS, ROWS, 1, zero)
        sum_dz += group_dz
        sum_dz_xhat += group_dz_xhat
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
        k1, k0 = dx_coefficients(sum_dz, sum_dz_xhat, scale_ptr, rstd_ptr, C, M, cols)
        tl.store(coef_ptr + cols, k1, mask=cmask)
        tl.store(coef_ptr + C + cols, k0, mask=cmask)


@triton.jit
def dx_coefficients(sum_dz, sum_dz_xhat, scale_ptr, rstd_ptr, C, M, cols):
    """Training's dx coefficients (k1, k0) [len(cols)] from the sums (module docstring, step 2)."""
    cmask = cols < C
    s = tl.load(scale_ptr + cols, mask=cmask, other=0.0).to(sum_dz.dtype)
    r = tl.load(rstd_ptr + cols, mask=cmask, other=0.0).to(sum_dz.dtype)
    m = M.to(sum_dz.dtype)
    return -s * r * sum_dz_xhat / m, -s * sum_dz / m


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
    if TRAINING:
        k1 = tl.load(coef_ptr + cols, mask=cols < C, other=0.0)
        k0 = tl.load(coef_ptr + C + cols, mask=cols < C, other=0.0)
    else:  # unused
        k1 = tl.zeros([BLOCK_C], dtype=ACC)
        k0 = k1
    dx_tile(dy_ptr, x_ptr, dres_ptr, dx_ptr, scale_ptr, shift_ptr, mean_ptr, k1, k0, rows, cols, M, C, HW, ACC,
            TRAINING, HAS_RES, NHWC)


@triton.jit
def dx_tile(dy_ptr, x_ptr, dres_ptr, dx_ptr, scale_ptr, shift_ptr, mean_ptr, k1, k0, rows, cols, M, C, HW,
            ACC: tl.constexpr, TRAINING: tl.constexpr, HAS_RES: tl.constexpr, NHWC: tl.constexpr):
    """Step 3 of the backward (module docstring) for the rows × cols of a tile; k1, k0 [len(cols)]: the training
    coefficients (unused in eval)."""
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
        dx += k1[None, :] * (x - mu) + k0[None, :]
    if HAS_RES:
        dx += tl.load(dres_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "P", "ITERS", "GROUPS", "ROWS"])  # batch-dependent: one compile for all
def _stats_bn_relu_fwd_kernel(
    x_ptr,      # [N, C, H, W] dense NHWC/NCHW, any float dtype: BN input
    a_ptr,      # [N, C, H, W] same layout, out dtype: activation
    part_ptr,   # [4, P, C] ACC: per-program statistics partials (`kernels.stats.store_partial`'s format)
    # BNAffine (its mean and var are outputs here)
    bn_mean, bn_var, bn_w, bn_b, bn_consts, bn_rstd, bn_scale, bn_shift, bn_rm, bn_rv, bn_nbt,
    sync_ptr,   # [1 + C_BLOCKS] int32, zero: the depart counter, then one arrive counter per channel block
    M, C, HW, P, ITERS, GROUPS, ROWS,
    ACC: tl.constexpr, NHWC: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    C_BLOCKS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, UPDATE: tl.constexpr, PHASE: tl.constexpr,
):
    # grid [P, C_BLOCKS]: program (p, cb) owns row tile p (ITERS chunks of BLOCK_M rows) of channel block cb; the P
    # programs of a channel block meet at its barrier. PHASE 0: both phases with the barrier between them; 1 / 2:
    # phase 1 / phase 2 alone (two launches, no barrier).
    pid = tl.program_id(0)
    cb = tl.program_id(1)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    if PHASE != 2:  # phase 1: the statistics partial of the program's tile (`_stats_partial_kernel`'s arithmetic)
        count, mean, m2, k = tile_partial(x_ptr, x_ptr, x_ptr, pid, cb, M, C, HW, ITERS, ACC, False, NHWC, INT64,
                                          BLOCK_M, BLOCK_C)
        store_partial(part_ptr, pid, P, C, cols, count, mean, m2, k)
    if PHASE == 0:
        grid_barrier(sync_ptr + 1 + cb, P)
    if PHASE != 1:  # phase 2: every program merges all P partials in one order, then normalizes its tile
        mean, var = merge_stats(part_ptr, C, P, cols, GROUPS, ROWS)
        if pid == 0:
            tl.store(bn_mean + cols, mean, mask=cmask)
            tl.store(bn_var + cols, var, mask=cmask)
        _, _, s, t = affine_map(mean, var, bn_w, bn_b, bn_consts, cols, cmask, HAS_W, HAS_B)
        s = s.to(ACC)[None, :]
        t = t.to(ACC)[None, :]
        for it in range(ITERS):
            rows, cols_i = tile_indices(pid, cb, it, ITERS, BLOCK_M, BLOCK_C, INT64)
            mask = (rows < M)[:, None] & cmask[None, :]
            offs = tile_offsets(rows, cols_i, C, HW, NHWC)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            tl.store(a_ptr + offs, relu(x * s + t).to(a_ptr.dtype.element_ty), mask=mask)
        # the last program to finish keeps rstd, scale, shift and makes the running update from the statistics the
        # channel blocks' programs 0 stored
        if grid_depart(sync_ptr, P * C_BLOCKS, C_BLOCKS):
            tl.debug_barrier()
            finalize_bn(bn_mean, bn_var, bn_w, bn_b, bn_consts, bn_rstd, bn_scale, bn_shift, bn_rm, bn_rv, bn_nbt, C,
                        HAS_W, HAS_B, UPDATE, BLOCK_C, C_BLOCKS)


@triton.jit(do_not_specialize=["M", "P", "ITERS", "GROUPS", "ROWS"])  # batch-dependent: one compile for all
def _bn_relu_bwd_fused_kernel(
    dy_ptr, x_ptr, dres_ptr, dx_ptr,  # as `_bn_relu_bwd_dx_kernel`
    scale_ptr, shift_ptr, mean_ptr, rstd_ptr,  # [C] each: s, t, μ, rstd
    part_ptr,   # [2, P, C] ACC: per-program (Σdz, Σdz·x̂)
    sum_dz_ptr, sum_dz_xhat_ptr,  # [C] ACC out
    sync_ptr,   # [1 + C_BLOCKS] int32, zero: the depart counter, then one arrive counter per channel block
    M, C, HW, P, ITERS, GROUPS, ROWS,
    ACC: tl.constexpr, TRAINING: tl.constexpr, HAS_RES: tl.constexpr, NHWC: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, C_BLOCKS: tl.constexpr, PHASE: tl.constexpr,
):
    # grid and PHASE as `_stats_bn_relu_fwd_kernel`'s
    pid = tl.program_id(0)
    cb = tl.program_id(1)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    if PHASE != 2:  # phase 1: step 1's partial of the program's tile
        sum_dz, sum_dz_xhat = bwd_tile_partial(dy_ptr, x_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, pid, cb, M, C,
                                               HW, ITERS, ACC, NHWC, INT64, BLOCK_M, BLOCK_C)
        tl.store(part_ptr + pid * C + cols, sum_dz, mask=cols < C)
        tl.store(part_ptr + (P + pid) * C + cols, sum_dz_xhat, mask=cols < C)
    if PHASE == 0:
        grid_barrier(sync_ptr + 1 + cb, P)
    if PHASE != 1:  # phase 2: every program sums all P partials in one order (step 2), then dx of its tile
        sum_dz, sum_dz_xhat = sum_grouped_partials(part_ptr, C, P, cols, GROUPS, ROWS, tl.zeros([BLOCK_C], dtype=ACC))
        if pid == 0:
            tl.store(sum_dz_ptr + cols, sum_dz, mask=cols < C)
            tl.store(sum_dz_xhat_ptr + cols, sum_dz_xhat, mask=cols < C)
        k1, k0 = dx_coefficients(sum_dz, sum_dz_xhat, scale_ptr, rstd_ptr, C, M, cols)
        for it in range(ITERS):
            rows, cols_i = tile_indices(pid, cb, it, ITERS, BLOCK_M, BLOCK_C, INT64)
            dx_tile(dy_ptr, x_ptr, dres_ptr, dx_ptr, scale_ptr, shift_ptr, mean_ptr, k1, k0, rows, cols_i, M, C, HW,
                    ACC, TRAINING, HAS_RES, NHWC)
        grid_depart(sync_ptr, P * C_BLOCKS, C_BLOCKS)


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
    if affine is not None and affine.from_input:
        return stats_bn_relu_forward(x, affine, out_dtype)
    nhwc = check_tensor(x, "x")
    if affine is None:
        check_channel_vector(scale, "scale", x)
        check_channel_vector(shift, "shift", x)
    else:
        check_channel_vector(affine.mean, "affine.mean", x)
    a = _activation(x, nhwc, out_dtype)
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
        BLOCK_C=cfg["BLOCK_C"], AFFINE=affine is not None,
        C_BLOCKS=triton.cdiv(cfg["C"], cfg["BLOCK_C"]) if affine is not None else 1,
        num_warps=cfg["NUM_WARPS"], **flags)
    return a


def _out_dtype(x: Tensor, out_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The activation's dtype: out_dtype (checked), default x.dtype."""
    out_dtype = out_dtype or x.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected float16, bfloat16, float32 or float64, got {out_dtype}")
    return out_dtype


def _activation(x: Tensor, nhwc: bool, out_dtype: Optional[torch.dtype]) -> Tensor:
    """An empty activation of x's shape and layout in out_dtype (default x.dtype)."""
    return torch.empty(x.shape, dtype=_out_dtype(x, out_dtype), device=x.device, memory_format=memory_format(nhwc))


# the most programs per channel block of a launch with a grid barrier, and the most chunks one of them walks
BARRIER_MAX_PROGRAMS = 64


def persistent_config(x: Tensor, block_m: Optional[int] = None, programs: Optional[int] = None) -> Optional[dict]:
    """`tile_config` of a launch with a grid barrier (grid [P, channel blocks], program (p, cb) owning row tile p of
    channel block cb; T = P), or None where the separate launches run on a GPU: more channel blocks than SMs (one
    program per channel block could not be resident at once), or more than 64 chunks a program would walk. On a GPU
    P ≤ SMs ÷ channel blocks, so that all programs are resident at once, and P ≤ `BARRIER_MAX_PROGRAMS` = 64, so that
    every program's merge of all P partial rows stays a short serial walk (the last-program merges' bound; the same
    bound for its ITERS chunks); `programs` (default that cap) is capped there. Under the interpreter P = 1 by
    default."""
    sms = _device_sms(x)
    c_blocks = triton.cdiv(x.shape[1], channel_block(x.shape[1]))
    if x.is_cuda and c_blocks > sms:
        return None
    cap = min(sms // c_blocks if x.is_cuda else 1, BARRIER_MAX_PROGRAMS)
    cfg = tile_config(x, block_m, cap if programs is None else min(programs, cap) if x.is_cuda else programs)
    return None if x.is_cuda and cfg["ITERS"] > BARRIER_MAX_PROGRAMS else cfg


def launch_persistent(kernel, cfg: dict, *args, **meta) -> None:
    """Launch a kernel with grid barriers (`kernels.stats.grid_barrier`; a `PHASE` constexpr) over cfg's T programs
    per channel block: on a GPU one cooperative launch (the driver refuses a grid whose programs cannot all be
    resident, where a spin would never end); under the interpreter, which runs programs one after another, one
    launch where T = 1 (the barrier passes at once), else phase 1 and phase 2 as two launches (the same arithmetic,
    no spin)."""
    grid = (cfg["T"], triton.cdiv(cfg["C"], cfg["BLOCK_C"]))
    if not interpreting():
        kernel[grid](*args, PHASE=0, launch_cooperative_grid=True, **meta)
        return
    for phase in ((0,) if cfg["T"] == 1 else (1, 2)):
        kernel[grid](*args, PHASE=phase, **meta)


def stats_bn_relu_forward(x: Tensor, affine: BNAffine, out_dtype: Optional[torch.dtype] = None, *,
                          block_m: Optional[int] = None, programs: Optional[int] = None) -> Tensor:
    """`kernels.stats.batch_stats` of x and `bn_relu_forward` with them in one launch (`_stats_bn_relu_fwd_kernel`):
    returns a = relu(BN(x)) in out_dtype (default x.dtype) and x's layout, and fills affine's mean and var (x's batch
    statistics, bitwise `batch_stats(x, tiles=P)`'s), rstd, scale and shift, and makes its running update.
    affine: a `BNAffine` with `from_input`, mean and var [C] in x's statistics dtype. block_m, programs: BLOCK_M and
    P (tests; default `persistent_config`'s). Where `persistent_config` refuses x, the statistics pass and the
    BN-ReLU forward run as two launches (and two copies into affine's mean and var)."""
    nhwc = check_tensor(x, "x")
    check_channel_vector(affine.mean, "affine.mean", x)
    if affine.mean.dtype != acc_dtype(x.dtype):
        raise TypeError(f"affine.mean: expected {acc_dtype(x.dtype)} statistics of a {x.dtype} x, got "
                        f"{affine.mean.dtype}")
    out_dtype = _out_dtype(x, out_dtype)
    if x.numel() == 0:
        mean, var = no_value_stats(x.shape[1], affine.mean.dtype, x.device)
        affine.mean.copy_(mean)
        affine.var.copy_(var)
        finalize_affine(affine)
        return _activation(x, nhwc, out_dtype)
    cfg = persistent_config(x, block_m, programs)
    if cfg is None:
        mean, var = launch_stats(x, None, None, nhwc, block_m)
        affine.mean.copy_(mean)
        affine.var.copy_(var)
        return bn_relu_forward(x, None, None, out_dtype, affine._replace(from_input=False))
    a = _activation(x, nhwc, out_dtype)
    p, c = cfg["T"], cfg["C"]
    c_blocks = triton.cdiv(c, cfg["BLOCK_C"])
    rows = merge_rows(p)
    part = torch.empty((4, p, c), dtype=affine.mean.dtype, device=x.device)
    # 16-bit x: 4 warps, with which the kernel compiles for sm_90 without spills (benchmarks/static_sm90.py)
    launch_persistent(
        _stats_bn_relu_fwd_kernel, cfg, x, a, part, *affine.kernel_args(), launch_counters(1 + c_blocks, x.device),
        cfg["M"], c, cfg["HW"], p, cfg["ITERS"], triton.cdiv(p, rows), rows, ACC=tl_dtype(part.dtype), NHWC=nhwc,
        INT64=cfg["INT64"], BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], C_BLOCKS=c_blocks,
        num_warps=4 if x.element_size() < 4 else cfg["NUM_WARPS"], **affine.constexprs())
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
    cfg = persistent_config(x, block_m, tiles) if grid_barrier_on() else None
    if cfg is not None:
        return _bn_relu_backward_fused(dy, x, nhwc, scale, shift, mean, rstd, training, dres, cfg)
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


def _bn_relu_backward_fused(dy: Tensor, x: Tensor, nhwc: bool, scale: Tensor, shift: Tensor, mean: Tensor,
                            rstd: Tensor, training: bool, dres: Optional[Tensor],
                            cfg: dict) -> Tuple[Tensor, Tensor, Tensor]:
    """`bn_relu_backward` in one launch with a grid barrier (`_bn_relu_bwd_fused_kernel`) over cfg's P programs per
    channel block (`persistent_config`): the same sums and dx as the separate launches with T = P tiles."""
    p, c = cfg["T"], cfg["C"]
    c_blocks = triton.cdiv(c, cfg["BLOCK_C"])
    rows = merge_rows(p)
    part = torch.empty((2, p, c), dtype=acc_dtype(x.dtype), device=x.device)
    sum_dz = torch.empty(c, dtype=part.dtype, device=x.device)
    sum_dz_xhat = torch.empty(c, dtype=part.dtype, device=x.device)
    dx = torch.empty_like(x, memory_format=memory_format(nhwc))
    launch_persistent(
        _bn_relu_bwd_fused_kernel, cfg, dy, x, x if dres is None else dres, dx, scale, shift, mean, rstd, part, sum_dz,
        sum_dz_xhat, launch_counters(1 + c_blocks, x.device), cfg["M"], c, cfg["HW"], p, cfg["ITERS"],
        triton.cdiv(p, rows), rows, ACC=tl_dtype(part.dtype), TRAINING=training, HAS_RES=dres is not None, NHWC=nhwc,
        INT64=cfg["INT64"], BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], C_BLOCKS=c_blocks,
        num_warps=cfg["NUM_WARPS"])
    return dx, sum_dz, sum_dz_xhat


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
