"""Tier-B Triton kernels: implicit-GEMM convolution with the BN-ReLU prologue and add+statistics epilogue
(docs/architecture.md §2–3), dgrad with the ReLU-mask / BN-reduction epilogue, and wgrad with the recompute prologue.

Shapes (logical NCHW as in PyTorch; the kernels address memory through strides, so NHWC = channels_last, the fast
layout, and NCHW both work without a copy; the GEMM K loop runs over (kh, kw, C) with C innermost, which is the
contiguous axis of NHWC):
  x   [N, C_in, H, W]        BN input (fp32 / fp16 / bf16; loaded and upcast to fp32 at once)
  w   [C_out, C_in, KH, KW]  conv weight; its dtype is the conv's compute dtype. The kernels read it as a contiguous
                             [C_out, KH, KW, C_in] tensor (`_weight_ohwi`), so weight tiles are contiguous loads
  y   [N, C_out, Ho, Wo]     conv output, in w's dtype; Ho = (H + 2·PAD − KH) // STRIDE + 1
Per-channel vectors (scale, shift, mean, rstd, statistics) are fp32 [C].

GEMM views (M = rows, "N" = columns, K = reduction):
  forward  y[m, co]        = Σ_{kh,kw,ci} a[n, ci, ho·s−p+kh, wo·s−p+kw] · w[co, ci, kh, kw],   m = (n, ho, wo)
  dgrad    da[m, ci]       = Σ_{kh,kw,co} dy[n, co, (h+p−kh)/s, (w+p−kw)/s] · w[co, ci, kh, kw],  m = (n, h, w),
                             terms whose (h+p−kh) is not a multiple of s or falls outside [0, Ho) are zero; for
                             s = 2 one launch per phase (h mod 2, w mod 2) takes only the taps with kh ≡ h + p,
                             kw ≡ w + p (mod 2), so no term of the first kind is computed (`dgrad_phases`)
  wgrad    dw[co, ci,kh,kw]= Σ_{m=(n,ho,wo)} dy[m, co] · a[n, ci, ho·s−p+kh, wo·s−p+kw]
with a = max(x·scale + shift, 0) recomputed from x in every prologue; the conv's zero padding applies to a. Given a
`kernels.stats.BNAffine`, the forward forms scale and shift from the batch statistics in its prologue and its
program (0, 0) keeps them with rstd and makes the running update (`kernels.stats.finalize_bn`).

Reductions are deterministic: every program writes its partial result to its own row of a [tiles, ...] buffer, and
the rows are merged in tile order (in two levels for many rows, `kernels.stats.merge_rows`). The output statistics
use tier A's partial format and merge (`kernels.stats`: [4, tiles, C_out] (count, mean, M2, pivot), each tile
shifted by its first row's value, Chan merge); dgrad's Σdz, Σdz·x̂ partials [2, tiles, C_in] and the dx pass are
tier A's BN-ReLU backward steps 2–3 (`kernels.bn_relu.bn_backward_from_partials`); wgrad's splits are summed in
`kernels.stats.sum_rows`' order by the last programs of each dW tile's groups of splits (per-launch counters,
docs/kernels.md; `FASTRESNET_LAST_PROGRAM_MERGE=0`: by `sum_rows` itself, bitwise the same).
Indices are int32: tensors must have fewer than 2**31 elements (the launchers check).

Loops: forward and dgrad run one K loop over (tap, channel block) — K_ITERS = taps·K_BLOCKS steps, a constexpr, with
KH·KW taps (forward, stride-1 dgrad) or those reaching the launch's phase (stride-2 dgrad: 1, 2, 2, 4 for 3×3) —
which Triton software-pipelines with the launch's num_stages; wgrad loops over ROW_BLOCKS row blocks of its split (a
runtime trip count). The arguments that depend on the batch (row counts, trip counts, the merges' group sizes) are
runtime arguments Triton does not specialise (`do_not_specialize`), so another batch size compiles nothing new where
its tiles are the same.
Tiles, warps and stages per launch: `gemm_tiles` / `wgrad_tiles` (a deterministic rule, see "launchers").

Dot operands: `dot_dtype` is a launcher choice. GPU: the weight dtype (fp16/bf16 tensor cores; fp32 uses TF32 exactly
when cuDNN convs do, `fastresnet.kernels.conv_fp32_precision`). Interpreter (CPU): fp32 for
fp32 and bf16 (the interpreter miscomputes bf16 arithmetic and bf16 `tl.dot`, docs/architecture.md §6), fp16 for fp16.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastresnet.kernels import conv_fp32_precision, interpreting, last_program_merge
from fastresnet.kernels.bn_relu import bn_backward_from_partials, bn_finish, empty_backward, finish_bn_backward
from fastresnet.kernels.stats import (
    BNAffine, _sm_count, bn_scale_shift, chunk_summary, finalize_affine, finalize_bn, finish_counters, finish_stats,
    group_counter, group_size, last_program, memory_format, merge_partials, no_value_stats, release_counter, relu,
    relu_grad, stats_finish, store_partial, sum_rows, top_counter,
)


# ---- device helpers ------------------------------------------------------------------------------------------------
@triton.jit
def _rows(start, M, H, W, BLOCK_M: tl.constexpr):
    """For the flat rows rm = start + [0, BLOCK_M) of an [N·H·W] index: the mask rm < M and (n, h, w) [BLOCK_M]."""
    rm = start + tl.arange(0, BLOCK_M)
    return rm < M, rm // (W * H), (rm // W) % H, rm % W


@triton.jit
def _gemm_tile(M, H, W, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_N] output tile of an implicit GEMM over rows m = (n, h, w) of an [N·H·W]
    index (program axis 0) × N columns (axis 1): (row mask, n, h, w) [BLOCK_M] as `_rows`, the columns and their
    mask [BLOCK_N], and a zero fp32 accumulator."""
    m_ok, nb, h, w = _rows(tl.program_id(0) * BLOCK_M, M, H, W, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return m_ok, nb, h, w, rn, rn < N, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)


@triton.jit
def _k_step(kk, C, KW: tl.constexpr, BLOCK_K: tl.constexpr, K_BLOCKS: tl.constexpr):
    """Step kk of the flattened K loop over (tap, channel block), channel blocks innermost: the tap (kh, kw), the
    channels rk [BLOCK_K] of this step and their mask."""
    tap = kk // K_BLOCKS
    rk = (kk % K_BLOCKS) * BLOCK_K + tl.arange(0, BLOCK_K)
    return tap // KW, tap % KW, tap, rk, rk < C


@triton.jit
def _offsets(nb, h, w, ch, sn, sc, sh, sw):
    """Offsets [BLOCK_M, BLOCK_CH] of positions (nb, h, w) [BLOCK_M] × channels ch [BLOCK_CH], strides sn..sw."""
    return (nb * sn + h * sh + w * sw)[:, None] + ch[None, :] * sc


# ---- kernels -------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M", "GROUPS", "ROWS"])  # batch-dependent: one compile for all
def _conv_fwd_kernel(
    x_ptr,                      # [N, C_in, H, W] BN input, strides sxn, sxc, sxh, sxw
    scale_ptr, shift_ptr,       # [C_in] fp32: a = max(x·scale + shift, 0) (read unless AFFINE)
    bn_mean, bn_var, bn_w, bn_b, bn_consts, bn_rstd, bn_scale, bn_shift, bn_rm, bn_rv, bn_nbt,  # AFFINE: BNAffine
    w_ptr,                      # [C_out, KH, KW, C_in] weight, contiguous: row co is K = (kh, kw, ci)
    res_ptr,                    # [N, C_out, Ho, Wo] residual added in fp32 (read only if HAS_RES), strides as y
    y_ptr,                      # [N, C_out, Ho, Wo] output, strides syn, syc, syh, syw
    part_ptr,                   # [4, tiles_m, C_out] fp32 per-tile partials of the stored y (STATS; kernels.stats)
    count_ptr, mean_ptr, var_ptr,  # FINISH: `kernels.stats.StatsFinish` of the partials
    M, C_in, H, W, C_out, Ho, Wo, GROUPS, ROWS,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_RES: tl.constexpr, STATS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_BLOCKS: tl.constexpr,
    K_ITERS: tl.constexpr, FINISH: tl.constexpr,
    AFFINE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, UPDATE: tl.constexpr,
):
    # rows m = (n, ho, wo) of y × output channels co
    m_ok, nb, ho, wo, rn, n_ok, acc = _gemm_tile(M, Ho, Wo, C_out, BLOCK_M, BLOCK_N)
    w_col = rn * (KH * KW * C_in)                                      # [BLOCK_N] start of weight row co
    for kk in range(K_ITERS):                                         # K_ITERS = KH·KW·K_BLOCKS: one pipelined loop
        kh, kw, tap, rk, k_ok = _k_step(kk, C_in, KW, BLOCK_K, K_BLOCKS)  # rk: input channels ci of this step
        hi = ho * STRIDE - PAD + kh
        wi = wo * STRIDE - PAD + kw
        a_mask = (m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W))[:, None] & k_ok[None, :]
        xv = tl.load(x_ptr + _offsets(nb, hi, wi, rk, sxn, sxc, sxh, sxw), mask=a_mask, other=0.0)
        if AFFINE:  # BN's affine map formed from the batch statistics (program (0, 0) keeps it: finalize_bn)
            _, _, s, t = bn_scale_shift(bn_mean, bn_var, bn_w, bn_b, bn_consts, rk, k_ok, HAS_W, HAS_B)
        else:
            s = tl.load(scale_ptr + rk, mask=k_ok, other=0.0)
            t = tl.load(shift_ptr + rk, mask=k_ok, other=0.0)
        # prologue: BN-apply + ReLU, then zero padding in the activated space (relu(t) != 0 at borders)
        a = tl.where(a_mask, relu(xv.to(tl.float32) * s[None, :] + t[None, :]), 0.0)
        # weight tile [BLOCK_K, BLOCK_N]: ci contiguous
        wv = tl.load(w_ptr + (tap * C_in + rk)[:, None] + w_col[None, :], mask=k_ok[:, None] & n_ok[None, :],
                     other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), wv.to(DOT_DTYPE), acc, input_precision=PRECISION)

    # epilogue: + residual (fp32), one rounded store, per-tile statistics of the stored value
    y_off = _offsets(nb, ho, wo, rn, syn, syc, syh, syw)
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + y_off, mask=mask, other=0.0).to(tl.float32)
    out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + y_off, out, mask=mask)
    if STATS:
        # (count, mean, M2) of the stored y shifted by the pivot K = this tile's first row (row 0 always exists), so
        # the partials are O(std) (kernels/stats.py, Numerics); merged by `kernels.stats.merge_partials`
        v = out.to(tl.float32)
        k = tl.sum(tl.where((tl.arange(0, BLOCK_M) == 0)[:, None], v, 0.0), axis=0)
        count, mean, m2 = chunk_summary(tl.where(mask, v - k[None, :], 0.0), m_ok, mask)
        store_partial(part_ptr, tl.program_id(0), tl.num_programs(0), C_out, rn, count, mean, m2, k)
        if FINISH:  # the column block's partials merged by the last row tiles of its groups (docs/kernels.md)
            finish_stats(part_ptr, count_ptr, mean_ptr, var_ptr, C_out, tl.num_programs(0), tl.program_id(0),
                         tl.program_id(1), tl.num_programs(1), GROUPS, ROWS, rn)
    if AFFINE:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            finalize_bn(bn_mean, bn_var, bn_w, bn_b, bn_consts, bn_rstd, bn_scale, bn_shift, bn_rm, bn_rv, bn_nbt,
                        C_in, HAS_W, HAS_B, UPDATE, BLOCK_K, K_BLOCKS)


@triton.jit(do_not_specialize=["M", "tile0", "tiles", "M_BN", "GROUPS", "ROWS"])
def _conv_dgrad_kernel(
    dy_ptr,                     # [N, C_out, Ho, Wo] output gradient, strides sdn, sdc, sdh, sdw
    w_ptr,                      # [C_out, KH, KW, C_in] weight, contiguous
    x_ptr,                      # [N, C_in, H, W] BN input, strides sxn, sxc, sxh, sxw
    scale_ptr, shift_ptr, mean_ptr, rstd_ptr,   # [C_in] fp32
    dz_ptr,                     # [N, C_in, H, W] out in x's dtype and strides: dz = x·scale + shift ≤ 0 ? 0 : da
    psum_ptr,                   # [2, tiles, C_in] fp32 out: per-tile Σdz ([0]) and Σdz·x̂ ([1]), kernels.bn_relu
    count_ptr, sum_dz_ptr, sum_dz_xhat_ptr, coef_ptr,  # FINISH: `kernels.bn_relu.BNFinish` of psum
    M, C_in, H, W, C_out, Ho, Wo, tile0, tiles, M_BN, GROUPS, ROWS,  # M_BN = N·H·W: the BN's rows, all phases
    sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw,
    STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr,
    PW: tl.constexpr, TAPS_W: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_BLOCKS: tl.constexpr,
    K_ITERS: tl.constexpr, TRAINING: tl.constexpr, FINISH: tl.constexpr,
):
    # da = implicit GEMM of dy with the weight over the rows m = (n, hp, wp) of output phase (PH, PW) of x, i.e. the
    # positions (h, w) = (hp·STRIDE + PH, wp·STRIDE + PW), M = N·⌈(H − PH)/STRIDE⌉·⌈(W − PW)/STRIDE⌉ of them, ×
    # input channels ci; K = (the taps that reach the phase, co). The taps reaching the phase are kh = KH0 + STRIDE·jh
    # (kh ≡ PH + PAD mod STRIDE) and kw likewise, jw < TAPS_W; tap (jh, jw) gathers dy at (hp + DH0 − jh, wp + DW0 −
    # jw), with no per-row division or parity test. Stride 1 is the single phase (0, 0) with every tap.
    KH0 = (PH + PAD) % STRIDE
    KW0 = (PW + PAD) % STRIDE
    DH0 = (PH + PAD - KH0) // STRIDE
    DW0 = (PW + PAD - KW0) // STRIDE
    m_ok, nb, hp, wp, rn, n_ok, acc = _gemm_tile(M, (H - PH + STRIDE - 1) // STRIDE, (W - PW + STRIDE - 1) // STRIDE,
                                                 C_in, BLOCK_M, BLOCK_N)
    for kk in range(K_ITERS):                                 # K_ITERS = TAPS_H·TAPS_W·K_BLOCKS: one pipelined loop
        jh, jw, _, rk, k_ok = _k_step(kk, C_out, TAPS_W, BLOCK_K, K_BLOCKS)  # rk: output channels co of this step
        ho = hp + DH0 - jh
        wo = wp + DW0 - jw
        pos_ok = m_ok & (ho >= 0) & (ho < Ho) & (wo >= 0) & (wo < Wo)
        dyv = tl.load(dy_ptr + _offsets(nb, ho, wo, rk, sdn, sdc, sdh, sdw), mask=pos_ok[:, None] & k_ok[None, :],
                      other=0.0)
        # weight tile [BLOCK_K, BLOCK_N] = w[co, kh, kw, ci]: ci contiguous
        tap = (KH0 + STRIDE * jh) * KW + KW0 + STRIDE * jw
        wv = tl.load(w_ptr + (rk * (KH * KW * C_in) + tap * C_in)[:, None] + rn[None, :],
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(dyv.to(DOT_DTYPE), wv.to(DOT_DTYPE), acc, input_precision=PRECISION)

    # epilogue: ReLU mask recomputed from x, dz stored (at x's offsets), per-tile Σdz and Σdz·x̂
    mask = m_ok[:, None] & n_ok[None, :]
    x_off = _offsets(nb, hp * STRIDE + PH, wp * STRIDE + PW, rn, sxn, sxc, sxh, sxw)
    xv = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + rn, mask=n_ok, other=0.0)
    t = tl.load(shift_ptr + rn, mask=n_ok, other=0.0)
    mu = tl.load(mean_ptr + rn, mask=n_ok, other=0.0)
    r = tl.load(rstd_ptr + rn, mask=n_ok, other=0.0)
    # the sums are taken over the stored (rounded) dz, the values step (2) subtracts them from: the BN backward's
    # cancellation (exact to eps for a 2-value batch) then stays consistent in bf16/fp16, as eager's does
    dz = tl.where(mask, relu_grad(xv * s[None, :] + t[None, :], acc), 0.0).to(dz_ptr.dtype.element_ty)
    tl.store(dz_ptr + x_off, dz, mask=mask)
    dz = dz.to(tl.float32)
    xhat = (xv - mu[None, :]) * r[None, :]
    tile = tile0 + tl.program_id(0)                           # this phase's tiles follow the earlier phases'
    tl.store(psum_ptr + tile * C_in + rn, tl.sum(dz, axis=0), mask=n_ok)
    tl.store(psum_ptr + (tiles + tile) * C_in + rn, tl.sum(dz * xhat, axis=0), mask=n_ok)
    if FINISH:  # the BN backward's step 2 by the last tiles of the column block's groups, over all phase launches
        finish_bn_backward(psum_ptr, count_ptr, scale_ptr, rstd_ptr, sum_dz_ptr, sum_dz_xhat_ptr, coef_ptr, C_in,
                           tiles, M_BN, tile, tl.program_id(1), tl.num_programs(1), GROUPS, ROWS, rn,
                           tl.zeros([BLOCK_N], dtype=tl.float32), TRAINING)


@triton.jit(do_not_specialize=["M", "rows_per_split", "GROUPS", "ROWS", "ROW_BLOCKS"])
def _conv_wgrad_kernel(
    x_ptr,                      # [N, C_in, H, W] BN input, strides sxn, sxc, sxh, sxw
    scale_ptr, shift_ptr,       # [C_in] fp32
    dy_ptr,                     # [N, C_out, Ho, Wo] output gradient, strides sdn, sdc, sdh, sdw
    part_ptr,                   # [SPLITS, C_out, KH, KW, C_in] fp32 out: this split's share of dW
    dw_ptr,                     # FINISH: [C_out, KH, KW, C_in] out, the weight's dtype: dW, the splits' sum
    count_ptr,                  # FINISH: int32 [grid0·grid1·(GROUPS + 1)] launch counters (`finish_counters`)
    M, C_in, H, W, C_out, Ho, Wo, rows_per_split, GROUPS, ROWS,
    sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
    STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, ROW_BLOCKS,
    FINISH: tl.constexpr,
):
    # program (tap·ci-block, co-block, split): dW[co, kh, kw, ci] over rows [split·R, (split+1)·R) of M = N·Ho·Wo,
    # the GEMM's K (split-K: the splits' partials are summed in split order by the tile's last program, FINISH, or
    # by the launcher)
    n_cib = tl.cdiv(C_in, BLOCK_CI)
    tap = tl.program_id(0) // n_cib
    kh = tap // KW
    kw = tap % KW
    rci = (tl.program_id(0) % n_cib) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    rco = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    split = tl.program_id(2)
    ci_ok = rci < C_in
    co_ok = rco < C_out
    s = tl.load(scale_ptr + rci, mask=ci_ok, other=0.0)
    t = tl.load(shift_ptr + rci, mask=ci_ok, other=0.0)

    acc = tl.zeros([BLOCK_CO, BLOCK_CI], dtype=tl.float32)
    m_start = split * rows_per_split                      # rows_per_split is a multiple of BLOCK_M
    m_end = tl.minimum(m_start + rows_per_split, M)
    for i in range(ROW_BLOCKS):                           # ROW_BLOCKS = rows_per_split // BLOCK_M
        m_ok, nb, ho, wo = _rows(m_start + i * BLOCK_M, m_end, Ho, Wo, BLOCK_M)          # output rows (n, ho, wo)
        dyv = tl.load(dy_ptr + _offsets(nb, ho, wo, rco, sdn, sdc, sdh, sdw),
                      mask=m_ok[:, None] & co_ok[None, :], other=0.0)                   # [BLOCK_M, BLOCK_CO]
        hi = ho * STRIDE - PAD + kh
        wi = wo * STRIDE - PAD + kw
        in_x = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)   # rows whose tap reads x, not the padding
        a_mask = in_x[:, None] & ci_ok[None, :]
        xv = tl.load(x_ptr + _offsets(nb, hi, wi, rci, sxn, sxc, sxh, sxw), mask=a_mask, other=0.0)
        # prologue: recompute the activation from x; zero padding in the activated space
        a = tl.where(a_mask, relu(xv.to(tl.float32) * s[None, :] + t[None, :]), 0.0)
        # a padding row adds nothing: its dy is dropped, not multiplied by the padding's 0 (a NaN/Inf dy would give
        # NaN), as PyTorch's CPU conv backward does for most shapes (some of its algorithms multiply the zeros)
        dyv = tl.where(in_x[:, None], dyv, 0.0)
        acc = tl.dot(tl.trans(dyv.to(DOT_DTYPE)), a.to(DOT_DTYPE), acc, input_precision=PRECISION)

    off = rco[:, None] * (KH * KW * C_in) + tap * C_in + rci[None, :]
    ok = co_ok[:, None] & ci_ok[None, :]
    numel = C_out * KH * KW * C_in
    tl.store(part_ptr + split * numel + off, acc, mask=ok)
    if FINISH:
        # `kernels.stats.sum_rows`' order finished in two levels (docs/kernels.md): the last split of each group of
        # ROWS splits of this dW tile sums the group into the group's first split, the last group sums the groups
        splits = tl.num_programs(2)
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        counter = group_counter(count_ptr, split, tile, GROUPS, ROWS)
        if last_program(counter, group_size(split, splits, ROWS)):
            tl.debug_barrier()
            first = (split // ROWS) * ROWS
            total = _sum_splits(part_ptr, off, ok, numel, splits, first, ROWS, 1)
            release_counter(counter)
            if GROUPS == 1:
                tl.store(dw_ptr + off, total.to(dw_ptr.dtype.element_ty), mask=ok)
            else:
                tl.store(part_ptr + first * numel + off, total, mask=ok)
                top = top_counter(count_ptr, tile, tl.num_programs(0) * tl.num_programs(1), GROUPS)
                if last_program(top, GROUPS):
                    tl.debug_barrier()
                    total = _sum_splits(part_ptr, off, ok, numel, splits, 0, GROUPS, ROWS)
                    tl.store(dw_ptr + off, total.to(dw_ptr.dtype.element_ty), mask=ok)
                    release_counter(top)


@triton.jit
def _sum_splits(part_ptr, off, ok, numel, splits, first, ROWS, step):
    """Σ, in order from 0, of the split partials first, first + step, … (ROWS of them, those < splits) of part
    [splits, numel] at offsets off (mask ok), in fp32. Loads bypass L1 (.cg): a finishing program reads what other
    programs wrote (docs/kernels.md)."""
    total = tl.zeros(off.shape, dtype=tl.float32)
    left = tl.zeros(off.shape, dtype=tl.int32) + splits  # a tensor: the interpreter's masks
    for i in range(ROWS):
        row = first + i * step
        total += tl.load(part_ptr + row * numel + off, mask=ok & (left > row), other=0.0, cache_modifier=".cg")
    return total


# ---- launchers -----------------------------------------------------------------------------------------------------
# Tile choice (GPU): a deterministic rule per launch (shape, dtype, direction), no autotuning, so a launch's tiles and
# hence its reduction order are a function of its shape alone (bitwise reproducible). What it keeps within sm_90's
# limits (checked for every launch of the zoo's nets by benchmarks/static_sm90.py):
# - shared memory: the pipelined operand buffers (num_stages copies of one K step's A and B tiles) within
#   _SMEM_BUDGET, leaving room under the 227 KB per block for the dot's operand staging and the epilogue;
# - registers: at most _REGS_PER_THREAD fp32 values of the accumulator plus the prologue's activation tile per
#   thread (more warps for larger tiles), so nothing spills;
# - SMs: tiles shrink (rows to 64, then columns to 32, then rows to 32) until the grid has at least one program per
#   SM where the shape allows; wgrad splits its K (the N·Ho·Wo rows) instead, summed in split order.
_SMEM_BUDGET = 160 * 1024
_REGS_PER_THREAD = 64
_MAX_ROW_BLOCKS = 64       # wgrad: most row blocks one program walks (its serial loop)
_PARTIAL_SHARE = 8         # wgrad: split-K partials at most 1/8 of the bytes read, where tiles down to 32 allow


class Tiles(NamedTuple):
    """Launch configuration of one conv kernel: GEMM tile [block_m, block_n] with K steps of block_k (wgrad:
    [block_n = C_out, block_k = C_in] per program and block_m rows per K step), warps and pipeline stages."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _pow2(n: int, lo: int = 16, hi: int = 128) -> int:
    """Block size for an axis of length n: the next power of two, clamped to [lo, hi] (tl.dot needs >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _warps(fp32_values: int) -> int:
    """4 or 8 warps: enough that fp32_values per tile stay within _REGS_PER_THREAD per thread where 8 can."""
    return 8 if fp32_values > 4 * 32 * _REGS_PER_THREAD else 4


def _stages(stage_bytes: int) -> int:
    """Pipeline depth: as many copies of one K step's operand tiles as fit _SMEM_BUDGET, between 2 and 4."""
    return max(2, min(4, _SMEM_BUDGET // stage_bytes))


def _sms(device: torch.device) -> int:
    return _sm_count(torch.cuda.current_device() if device.index is None else device.index)


def gemm_tiles(m: int, n: int, k_channels: int, a_bytes: int, b_bytes: int, device: torch.device) -> Tiles:
    """Tiles of the forward / dgrad implicit GEMM: m rows × n columns, K = taps × k_channels, operand elements of
    a_bytes (activation / dy) and b_bytes (weight). GPU: the rule above; interpreter: 32-row tiles (fast tests, and
    several tiles even on tiny inputs, so the statistics merges are exercised)."""
    block_n, block_k = _pow2(n), _pow2(k_channels, hi=64)
    if interpreting() or device.type != "cuda":
        return Tiles(32, block_n, block_k, 4, 1)
    block_m, sms = 128, _sms(device)
    while triton.cdiv(m, block_m) * triton.cdiv(n, block_n) < sms:
        if block_m > 64:
            block_m //= 2
        elif block_n > 32:
            block_n //= 2
        elif block_m > 32:  # 32-row tiles (mma.sync dots) where 64×32 ones leave SMs idle
            block_m //= 2
        else:
            break
    # registers: fp32 operands take two 16-bit slots per element, and every stage in flight holds the activation
    # tile in registers (the BN-ReLU prologue runs on it before the dot): at most 3 stages
    return Tiles(block_m, block_n, block_k, _warps(block_m * (block_n + block_k) * max(a_bytes, b_bytes) // 2),
                 min(3, _stages(block_m * block_k * a_bytes + block_k * block_n * b_bytes)))


def wgrad_tiles(m: int, c_out: int, c_in: int, taps: int, dy_bytes: int, x_bytes: int, device: torch.device,
                splits: Optional[int] = None) -> Tuple[Tiles, int, int]:
    """(tiles, rows per split, splits) of wgrad: a [block_n = C_out block, block_k = C_in block] tile of one tap per
    program, its K = the m = N·Ho·Wo rows split into chunks (`wgrad_split`: at least `splits`; default: one program
    per SM, 2 under the interpreter, which exercises the split reduction), walked in steps of block_m rows.

    GPU: C_out blocks of _pow2(C_out) halved down to 32 are the candidates (smaller blocks: more programs per split,
    so fewer splits fill the SMs); the first that fills the SMs with split-K partials (fp32, splits × dW elements,
    written once and read once by the sum) of at most 1/_PARTIAL_SHARE of the bytes wgrad reads (dy and x at the
    output rows) wins, else the one with the fewest splits among those that fill the SMs, else the smallest.
    128-row steps and warps by `_warps` for C_out blocks of 64 or more whose two stages fit _SMEM_BUDGET, else
    64-row steps (4 warps for C_out blocks under 64)."""
    block_co, block_ci = _pow2(c_out), _pow2(c_in, hi=64)
    if interpreting() or device.type != "cuda":
        return (Tiles(32, block_co, block_ci, 4, 1),) + wgrad_split(m, 32, splits or 2)
    sms = _sms(device)
    partial_cap = m * (c_out * dy_bytes + c_in * x_bytes) // _PARTIAL_SHARE
    candidates = []  # (fills the SMs, splits, tiles, rows per split) per C_out block
    while True:
        # 64-row K steps for C_out blocks under 64 (mma.sync tiles: 4 warps, few registers a step; triton 3.6 spills
        # 128-row steps there) and where two stages of 128-row steps would not fit _SMEM_BUDGET (fp32, wide blocks)
        fits = 2 * 128 * (block_co * dy_bytes + block_ci * x_bytes) <= _SMEM_BUDGET
        block_m = 128 if block_co >= 64 and fits else 64
        base = taps * triton.cdiv(c_in, block_ci) * triton.cdiv(c_out, block_co)
        rows, n_splits = wgrad_split(m, block_m, splits or triton.cdiv(sms, base))
        warps = _warps(block_co * block_ci + block_m * (block_co + block_ci)) if block_co >= 64 else 4
        tiles = Tiles(block_m, block_co, block_ci, warps,
                      _stages(block_m * (block_co * dy_bytes + block_ci * x_bytes)))
        fills = base * n_splits >= sms
        if fills and (n_splits == 1 or n_splits * taps * c_in * c_out * 4 <= partial_cap):
            return tiles, rows, n_splits
        candidates.append((fills, n_splits, tiles, rows))
        if block_co <= 32:
            break
        block_co //= 2
    filling = [c for c in candidates if c[0]]
    _, n_splits, tiles, rows = min(filling, key=lambda c: c[1]) if filling else candidates[-1]
    return tiles, rows, n_splits


def wgrad_split(m: int, block_m: int, splits: int) -> Tuple[int, int]:
    """(rows per split, splits) of wgrad's K = m rows: at least `splits` splits where m has that many blocks of
    block_m rows, and at most _MAX_ROW_BLOCKS blocks per split."""
    blocks = triton.cdiv(m, block_m)
    per = max(1, min(_MAX_ROW_BLOCKS, blocks // splits))
    return per * block_m, triton.cdiv(blocks, per)


def dot_config(compute_dtype: torch.dtype, device: torch.device) -> Tuple[tl.dtype, str]:
    """(dot-operand dtype, fp32 input precision) for a conv computing in compute_dtype (see module docstring)."""
    if compute_dtype == torch.float16:
        return tl.float16, "ieee"
    if compute_dtype == torch.bfloat16 and device.type == "cuda" and not interpreting():
        return tl.bfloat16, "ieee"
    tf32 = device.type == "cuda" and not interpreting() and conv_fp32_precision() == "tf32"
    return tl.float32, ("tf32" if tf32 else "ieee")


def _check_numel(**tensors: Tensor) -> None:
    for name, t in tensors.items():
        if t.numel() >= 2 ** 31:
            raise ValueError(f"{name}: the Triton conv kernels use int32 indices; got {t.numel()} elements (< 2**31)")


def _nhwc(x: Tensor) -> bool:
    """Whether x is NHWC-stored (channels_last and not also contiguous): the layout of the outputs made from x."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _weight_ohwi(weight: Tensor) -> Tensor:
    """The weight as a contiguous [C_out, KH, KW, C_in] tensor: rows of K = (kh, kw, ci) with ci contiguous, so
    weight tiles load contiguously (no copy for a channels_last weight, whose storage is already this)."""
    return weight.permute(0, 2, 3, 1).contiguous()


class Phase(NamedTuple):
    """One output phase of a dgrad launch: the input positions (h, w) ≡ (ph, pw) mod stride, rows per image of them
    (⌈(H − ph)/stride⌉·⌈(W − pw)/stride⌉), and how many taps per axis reach them (kh ≡ ph + padding mod stride)."""
    ph: int
    pw: int
    rows: int
    taps_h: int
    taps_w: int


def dgrad_phases(h: int, w: int, k: int, stride: int, padding: int) -> Tuple[Phase, ...]:
    """dgrad's launches for an H×W input, k×k kernel: the stride² output phases (ph, pw) in row-major order, each
    with only the taps that reach it, so a row's K loop skips the (stride² − 1)/stride² of the taps that cannot
    (3×3 stride 2: 1, 2, 2 or 4 taps instead of 9; 1×1 stride 2: one phase with the tap, three with none)."""
    taps = [len(range((p + padding) % stride, k, stride)) for p in range(stride)]
    phases = (Phase(ph, pw, -(-(h - ph) // stride) * -(-(w - pw) // stride), taps[ph], taps[pw])
              for ph in range(stride) for pw in range(stride))
    return tuple(p for p in phases if p.rows)  # an input 1 high or wide has no odd rows or columns


def conv_out_hw(h: int, w: int, k: int, stride: int, pad: int) -> Tuple[int, int]:
    return (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1


def conv_forward(
    x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], weight: Tensor, stride: int, padding: int,
    residual: Optional[Tensor] = None, stats: bool = False, affine: Optional[BNAffine] = None,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """y = conv2d(relu(x·scale + shift), weight, stride, padding) (+ residual), and optionally y's batch statistics.

    x: [N, C_in, H, W] any strides (channels_last is the fast layout); scale/shift: fp32 [C_in];
    weight: [C_out, C_in, k, k], k ∈ {1, 3}; residual: [N, C_out, Ho, Wo] or None. y's dtype is weight's, promoted
    with the residual's (PyTorch's `conv + residual`).
    Returns (y, mean, var): y in x's memory format; mean and biased var fp32 [C_out] of the stored (rounded) y when
    stats=True (merged from per-tile partials in tile order: deterministic), else None.
    affine: a `kernels.stats.BNAffine` instead of (scale, shift) (both None): the prologue forms BN's affine map from
    the batch statistics, and the launch fills affine's rstd, scale and shift and running buffers.
    """
    n, c_in, h, w = x.shape
    c_out, _, k, _ = weight.shape
    ho, wo = conv_out_hw(h, w, k, stride, padding)
    m = n * ho * wo
    fmt = memory_format(_nhwc(x))
    out_dtype = weight.dtype if residual is None else torch.promote_types(weight.dtype, residual.dtype)
    y = torch.empty((n, c_out, ho, wo), dtype=out_dtype, device=x.device, memory_format=fmt)
    _check_numel(x=x, y=y)
    if m == 0:  # no output rows (N = 0): nothing to compute; the statistics of no values
        if affine is not None:
            finalize_affine(affine)
        return (y,) + (no_value_stats(c_out, torch.float32, x.device) if stats else (None, None))
    if residual is not None and residual.stride() != y.stride():
        residual = residual.contiguous(memory_format=fmt)
    dot_dtype, precision = dot_config(weight.dtype, x.device)
    cfg = gemm_tiles(m, c_out, c_in, x.element_size(), weight.element_size(), x.device)
    tiles = triton.cdiv(m, cfg.block_m)
    part = torch.empty((4, tiles, c_out), dtype=torch.float32, device=x.device) if stats else y  # y: unused
    k_blocks = triton.cdiv(c_in, cfg.block_k)
    n_blocks = triton.cdiv(c_out, cfg.block_n)
    fin = stats_finish(tiles, c_out, n_blocks, torch.float32, x.device) if stats else None
    _conv_fwd_kernel[(tiles, n_blocks)](
        x, *((scale, shift) + (scale,) * 11 if affine is None else (affine.scale, affine.shift) + affine.kernel_args()),
        _weight_ohwi(weight), residual if residual is not None else y, y, part,
        *(fin[:3] if fin else (part,) * 3), m, c_in, h, w, c_out, ho, wo, fin.groups if fin else 1,
        fin.rows if fin else 1, *x.stride(), *y.stride(),
        STRIDE=stride, PAD=padding, KH=k, KW=k, HAS_RES=residual is not None, STATS=stats,
        DOT_DTYPE=dot_dtype, PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        K_BLOCKS=k_blocks, K_ITERS=k * k * k_blocks, FINISH=fin is not None, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, AFFINE=affine is not None,
        **(affine.constexprs() if affine is not None else dict(HAS_W=False, HAS_B=False, UPDATE=0)),
    )
    if not stats:
        return y, None, None
    return (y, fin.mean, fin.var) if fin else (y,) + merge_partials(part)


def conv_backward(
    dy: Tensor, x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor,
    stride: int, padding: int, training: bool, need_weight_grad: bool = True, wgrad_splits: Optional[int] = None,
    dres: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """Backward of y = conv2d(relu(x·scale + shift), weight): returns (dx, dweight, Σdz, Σdz·x̂).

    dy: [N, C_out, Ho, Wo] any strides, in the weight dtype; x: [N, C_in, H, W]; scale, shift, mean, rstd: fp32
    [C_in]; dres: None or x's shape (any strides), a gradient added to dx in the dx pass (a residual shortcut's).
    dx has x's dtype and memory format; dweight [C_out, C_in, k, k] in the weight's dtype and memory format
    (channels_last or contiguous; None unless need_weight_grad); Σdz, Σdz·x̂ fp32 [C_in] (dβ and dγ). Semantics of
    `reference.bn_relu_backward` after the conv backward, eval mode included (training=False: dx = scale·dz).
    Three steps: (1) dgrad with the mask/reduction epilogue (dz to a scratch tensor in x's dtype and dx's layout —
    the dtype eager PyTorch's ReLU backward gives it — and per-tile Σdz, Σdz·x̂ partials from the fp32 values), one
    launch per output phase of the stride (`dgrad_phases`);
    (2) tier A's ordered merge of the partials and per-channel affine dx pass (+ dres)
    (`kernels.bn_relu.bn_backward_from_partials`); (3) wgrad, split over its K = N·Ho·Wo rows into at least
    `wgrad_splits` chunks (`wgrad_tiles`), summed in split order.
    """
    n, c_in, h, w = x.shape
    c_out, _, k, _ = weight.shape
    _, _, ho, wo = dy.shape
    if dres is not None and dres.shape != x.shape:
        raise ValueError(f"dres: expected x's shape {tuple(x.shape)}, got {tuple(dres.shape)}")
    if wgrad_splits is not None and wgrad_splits < 1:
        raise ValueError(f"wgrad_splits: expected a positive integer or None, got {wgrad_splits}")
    _check_numel(x=x, dy=dy)
    if x.numel() == 0:  # N = 0: an empty dx, and dW and the BN sums are sums over no rows, 0
        dx, sum_dz, sum_dzx = empty_backward(x, _nhwc(x))
        return dx, torch.zeros_like(weight) if need_weight_grad else None, sum_dz, sum_dzx
    dev = x.device
    dot_dtype, precision = dot_config(weight.dtype, dev)
    w_ohwi = _weight_ohwi(weight)

    # (1) dgrad + epilogue: dz (x's dtype and layout) and per-tile Σdz, Σdz·x̂ over the M = N·H·W input rows;
    # x (and dres) are made dense in that layout first, so that dz, x, dres and dx share strides for step (2)
    nhwc = _nhwc(x)
    x = x.contiguous(memory_format=memory_format(nhwc))
    if dres is not None:
        dres = dres.contiguous(memory_format=memory_format(nhwc))
    # one launch per output phase (ph, pw) of the stride (stride 1: one phase), each over that phase's rows with only
    # the taps that reach it; the partials' tiles are laid out phase after phase, so their order is fixed. A phase
    # no tap reaches (1×1 stride 2: odd rows or columns) has dz = 0 and no partials (they would be zeros)
    dz = torch.empty_like(x)  # x's dtype: half the scratch of fp32 for bf16/fp16
    phases = []
    for p in dgrad_phases(h, w, k, stride, padding):
        if p.taps_h * p.taps_w:
            phases.append(p)
        else:
            dz[:, :, p.ph::stride, p.pw::stride].zero_()
    cfg = gemm_tiles(n * max(p.rows for p in phases), c_in, c_out, dy.element_size(), weight.element_size(), dev)
    grids = [triton.cdiv(n * p.rows, cfg.block_m) for p in phases]
    psum = torch.empty((2, sum(grids), c_in), dtype=torch.float32, device=dev)
    k_blocks = triton.cdiv(c_out, cfg.block_k)
    n_blocks = triton.cdiv(c_in, cfg.block_n)
    # step (2)'s sums finished by the last tile of the last phase launch to finish (or the separate merge)
    fin = bn_finish(psum.shape[1], c_in, n_blocks, torch.float32, dev, training)
    for i, (p, tiles) in enumerate(zip(phases, grids)):
        _conv_dgrad_kernel[(tiles, n_blocks)](
            dy, w_ohwi, x, scale, shift, mean, rstd, dz, psum, *(fin[:4] if fin else (psum,) * 4),
            n * p.rows, c_in, h, w, c_out, ho, wo, sum(grids[:i]), psum.shape[1], n * h * w,
            fin.groups if fin else 1, fin.rows if fin else 1, *dy.stride(), *x.stride(),
            STRIDE=stride, PAD=padding, KH=k, KW=k, PH=p.ph, PW=p.pw, TAPS_W=p.taps_w,
            DOT_DTYPE=dot_dtype, PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            K_BLOCKS=k_blocks, K_ITERS=p.taps_h * p.taps_w * k_blocks, TRAINING=training, FINISH=fin is not None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    # (2) tier A's backward steps 2–3: ordered sums over tiles, then dx = s·dz + k1·(x − μ) + k0 (+ dres), i.e.
    # s·(dz − Σdz/M − x̂·Σdz·x̂/M) (training), or s·dz (eval)
    dx, sum_dz, sum_dzx = bn_backward_from_partials(psum, dz, x, nhwc, scale, shift, mean, rstd, training, dres,
                                                    fin=fin)
    del dz

    # (3) wgrad: per (tap, ci-block, co-block, split) program, then the ordered sum over splits
    dweight = None
    if need_weight_grad:
        cfg, rows, splits = wgrad_tiles(n * ho * wo, c_out, c_in, k * k, dy.element_size(), x.element_size(), dev,
                                        wgrad_splits)
        part = torch.empty((splits, weight.numel()), dtype=torch.float32, device=dev)
        # summed into [C_out, KH, KW, C_in] storage: dW as a channels_last view, made contiguous for a weight
        # that is not channels_last (the layout `torch.empty_like(weight)` gives)
        dweight = torch.empty(weight.shape, dtype=weight.dtype, device=dev, memory_format=torch.channels_last)
        dw_flat = dweight.permute(0, 2, 3, 1).view(1, -1)
        grid = (k * k * triton.cdiv(c_in, cfg.block_k), triton.cdiv(c_out, cfg.block_n), splits)
        finish = last_program_merge()
        counters, groups, group_rows = finish_counters(splits, grid[0] * grid[1], dev) if finish else (part, 1, 1)
        _conv_wgrad_kernel[grid](
            x, scale, shift, dy, part, dw_flat, counters, n * ho * wo, c_in, h, w, c_out, ho, wo, rows, groups,
            group_rows,
            *x.stride(), *dy.stride(), STRIDE=stride, PAD=padding, KH=k, KW=k, DOT_DTYPE=dot_dtype,
            PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_CO=cfg.block_n, BLOCK_CI=cfg.block_k,
            ROW_BLOCKS=rows // cfg.block_m, FINISH=finish, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if not finish:
            sum_rows(part[None], dw_flat)
        if not _nhwc(weight):
            dweight = dweight.contiguous()
    return dx, dweight, sum_dz, sum_dzx
