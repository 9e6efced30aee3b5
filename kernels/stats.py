"""Per-channel batch statistics of x [N, C, H, W] (docs/architecture.md §2), deterministic, no atomics.

Layout: x is viewed as a matrix [M = N·H·W rows, C channels]. Dense NHWC (channels_last, C innermost: the fast
path, element (m, c) at m·C + c) and dense NCHW (element (m, c) at n·C·HW + c·HW + hw, with m = n·HW + hw) are
supported; any other strides are refused here (the backend copies strided views to dense first).

Algorithm: pass 1 (`_stats_partial_kernel`, grid [T, cdiv(C, BLOCK_C)]) gives every program a tile of
ITERS·BLOCK_M rows × BLOCK_C channels; it reduces each [BLOCK_M, BLOCK_C] chunk two-pass (mean, then centred
squares) and folds the chunks together with Chan's formula, writing a partial (count, mean, M2, K) per channel to a
[4, T, C] buffer. Pass 2 (`_stats_merge_kernel`, host side `merge_partials`) folds the T partials with Chan's formula
in tile order, in two levels for large T (groups of ⌈√T⌉ tiles in parallel, then the groups: `merge_rows`).
Fixed tiling (a function of M, C and the device only) and a fixed merge order make the result bitwise
reproducible. The tier-B conv epilogue (`kernels/conv.py`) writes the same [4, T, C] partials (one per output tile,
via `chunk_summary` / `store_partial`) and merges them with `merge_partials`.
Numerics: the centred M2 avoids one-pass E[x²] − E[x]², which cancels when |mean| ≫ std; and every value is first
shifted by a pivot K (here the channel's value at row 0, the same in every program; the conv epilogue uses its
tile's first row), so chunk means are O(std) rather than O(|mean|). The merge re-centres tile t's mean on tile 0's
pivot (adds K_t − K_0, a difference of two values of the channel, so O(std); exactly 0 when every tile shares K),
so the Chan cross terms (differences of chunk means) keep full precision; mean = K_0 + shifted mean.

BN's affine map from these statistics (`BNAffine`, docs/kernels.md): the kernel that consumes a BN's statistics first
forms rstd, scale and shift in every program (`bn_scale_shift`) and one program stores them and updates the running
statistics (`finalize_bn`); `_bn_affine_kernel` does that alone where no kernel consumes them.

dtype rules: loads are upcast to the accumulation dtype right after loading (float32; float64 for float64 input),
which also avoids the Triton interpreter's bf16 bug (docs/architecture.md §6). Statistics come in that dtype.
"""
from __future__ import annotations

import math
import functools
from functools import lru_cache
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastresnet.kernels import last_program_merge

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT32_LIMIT = 2**31 - 1


# ---- shared device helpers -----------------------------------------------------------------------------------------
@triton.jit
def tile_offsets(rows, cols, C, HW, NHWC: tl.constexpr):
    """Element offsets [BLOCK_M, BLOCK_C] of rows (indices into N·H·W) × cols (channels) of a dense tensor."""
    if NHWC:
        return rows[:, None] * C + cols[None, :]
    else:
        n = rows // HW
        hw = rows - n * HW
        return (n * C * HW + hw)[:, None] + cols[None, :] * HW


@triton.jit
def tile_indices(pid_m, pid_c, it, ITERS, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """Row indices [BLOCK_M] of chunk `it` of row-tile pid_m (ITERS chunks per tile) and channels [BLOCK_C] of
    channel-block pid_c; int64 when the tensor has more than 2^31 − 1 elements."""
    rows = tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if INT64:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
        pid_m = pid_m.to(tl.int64)
    return (pid_m * ITERS + it) * BLOCK_M + rows, cols


@triton.jit
def relu(v):
    """max(v, 0) with PyTorch's `torch.relu` semantics: NaN stays NaN (`tl.maximum` would return 0), −0 stays −0."""
    return tl.where(v < 0, 0.0, v)


@triton.jit
def relu_grad(v, g):
    """The gradient g passed back through relu(v), as PyTorch's threshold_backward(g, relu(v), 0): 0 where v ≤ 0, g
    elsewhere — a NaN v passes g, where a mask v > 0 would drop it."""
    return tl.where(v <= 0, 0.0, g)


@triton.jit
def chunk_summary(v, rmask, mask):
    """(count, mean, M2) per column [BLOCK_C] of a chunk v [BLOCK_M, BLOCK_C] (already shifted by its pivot and zero
    where ~mask; rmask [BLOCK_M]: the valid rows), two-pass: mean, then centred squares; in v's dtype."""
    n = tl.sum(rmask.to(v.dtype), axis=0)
    mean = tl.sum(v, axis=0) / tl.maximum(n, 1.0)
    d = tl.where(mask, v - mean[None, :], 0.0)
    return n, mean, tl.sum(d * d, axis=0)


@triton.jit
def store_partial(part_ptr, tile, T, C, cols, count, mean, m2, k):
    """Write tile `tile`'s partial for channels cols [BLOCK_C] into the [4, T, C] buffer: (count, mean, M2) of the
    values shifted by the pivot k, and k (all [BLOCK_C] or scalars)."""
    cmask = cols < C
    base = part_ptr + tile * C + cols
    tl.store(base, count, mask=cmask)
    tl.store(base + T * C, mean, mask=cmask)
    tl.store(base + 2 * T * C, m2, mask=cmask)
    tl.store(base + 3 * T * C, k, mask=cmask)


@triton.jit
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s pairwise combination of (count, mean, M2) summaries; empty summaries (count 0) are neutral."""
    n = n_a + n_b
    w_b = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b


# running-statistics updates of `finalize_bn` (`BNAffine.update`)
RUN_NONE = tl.constexpr(0)        # none (no buffers, or a recomputation's replay)
RUN_MOMENTUM = tl.constexpr(1)    # running = (1 − m)·running + m·batch
RUN_CUMULATIVE = tl.constexpr(2)  # momentum=None: m = 1/num_batches_tracked
RUN_COUNT = tl.constexpr(3)       # an empty batch: num_batches_tracked += 1 only


@triton.jit
def reciprocal_rn(v):
    """1/v correctly rounded (fp32: `div_rn`, where `/` may be approximate on a GPU; fp64 division is IEEE)."""
    if v.dtype == tl.float32:
        return tl.math.div_rn(tl.zeros_like(v) + 1.0, v)
    else:
        return 1.0 / v


@triton.jit
def rsqrt_rn(v):
    """1/√v with both steps correctly rounded (IEEE square root, then IEEE division): `torch.rsqrt`'s CPU bits."""
    if v.dtype == tl.float32:
        return reciprocal_rn(tl.sqrt_rn(v))
    else:
        return reciprocal_rn(tl.sqrt(v))  # fp64 sqrt is IEEE


@triton.jit
def bn_scale_shift(mean_ptr, var_ptr, w_ptr, b_ptr, consts_ptr, cols, cmask, HAS_W: tl.constexpr,
                   HAS_B: tl.constexpr):
    """BN's affine map for the channels cols from the batch statistics (`BNAffine`): (mean, rstd, scale, shift)
    [len(cols)] in the statistics' dtype, rstd = 1/√(var + eps), scale = γ·rstd, shift = β − mean·scale with
    `reference.scale_shift`'s operations in its order (γ = 1, β = 0 without HAS_W / HAS_B)."""
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    return affine_map(mean, tl.load(var_ptr + cols, mask=cmask, other=1.0), w_ptr, b_ptr, consts_ptr, cols, cmask,
                      HAS_W, HAS_B)


@triton.jit
def affine_map(mean, var, w_ptr, b_ptr, consts_ptr, cols, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """`bn_scale_shift` of batch statistics (mean, var) [len(cols)] held in registers."""
    rstd = rsqrt_rn(var + tl.load(consts_ptr))
    s = rstd
    if HAS_W:
        s = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(rstd.dtype) * rstd
    if HAS_B:
        t = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(rstd.dtype) - mean * s
    else:
        t = -(mean * s)
    return mean, rstd, s, t


@triton.jit
def finalize_bn(mean_ptr, var_ptr, w_ptr, b_ptr, consts_ptr, rstd_ptr, scale_ptr, shift_ptr, rm_ptr, rv_ptr, nbt_ptr,
                C, HAS_W: tl.constexpr, HAS_B: tl.constexpr, UPDATE: tl.constexpr, BLOCK: tl.constexpr,
                BLOCKS: tl.constexpr):
    """Run by one program of the launch that first consumes a BN's statistics (`BNAffine`): stores rstd, scale and
    shift of all C channels (BLOCKS blocks of BLOCK) for the backward, and updates the running statistics as
    `reference.update_running_stats` (UPDATE: `RUN_*`): num_batches_tracked += 1; running = (1 − m)·running +
    m·batch with the unbiased var·M/(M − 1) — momentum m (the multiply, then ATen's add with alpha, a fused
    multiply-add), or m = 1/num_batches_tracked (the cumulative average, each operation rounded); an empty batch
    only counts. consts: [eps, 1 − m, m, M/(M − 1)] in the statistics' dtype."""
    if UPDATE == RUN_CUMULATIVE:
        factor = reciprocal_rn((tl.load(nbt_ptr) + 1).to(rm_ptr.dtype.element_ty))  # 1/num_batches_tracked
    for cb in range(BLOCKS):
        cols = cb * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < C
        mean, rstd, s, t = bn_scale_shift(mean_ptr, var_ptr, w_ptr, b_ptr, consts_ptr, cols, cmask, HAS_W, HAS_B)
        tl.store(rstd_ptr + cols, rstd, mask=cmask)
        tl.store(scale_ptr + cols, s, mask=cmask)
        tl.store(shift_ptr + cols, t, mask=cmask)
        if UPDATE == RUN_MOMENTUM or UPDATE == RUN_CUMULATIVE:
            unbiased = tl.load(var_ptr + cols, mask=cmask, other=0.0) * tl.load(consts_ptr + 3)
            rm = tl.load(rm_ptr + cols, mask=cmask, other=0.0)
            rv = tl.load(rv_ptr + cols, mask=cmask, other=0.0)
            if UPDATE == RUN_MOMENTUM:
                keep = tl.load(consts_ptr + 1)
                momentum = tl.load(consts_ptr + 2)
                rm = tl.fma(mean, momentum, rm * keep)
                rv = tl.fma(unbiased, momentum, rv * keep)
            else:
                keep = 1.0 - factor
                rm = rm * keep + mean * factor
                rv = rv * keep + unbiased * factor
            tl.store(rm_ptr + cols, rm, mask=cmask)
            tl.store(rv_ptr + cols, rv, mask=cmask)
    if UPDATE != RUN_NONE:
        tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)


# ---- kernels -------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M", "T", "ITERS", "GROUPS", "ROWS"])  # batch-dependent: one compile for all
def _stats_partial_kernel(
    x_ptr,     # [N, C, H, W] dense NHWC/NCHW, fp16/bf16/fp32/fp64: the input (ADD: first addend a)
    b_ptr,     # ADD only: [N, C, H, W], same layout as x: second addend
    y_ptr,     # ADD only: [N, C, H, W], same layout as x, x's dtype: y = x + b, rounded once
    part_ptr,  # [4, T, C] ACC: per-tile (count, mean, M2) of x − K (ADD: of the rounded y − K), and K
    count_ptr, mean_ptr, var_ptr,  # FINISH only: `StatsFinish` (counters, [C], [C])
    M, C, HW, T, ITERS, GROUPS, ROWS,
    ACC: tl.constexpr, ADD: tl.constexpr, NHWC: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, FINISH: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    count, mean, m2, k = tile_partial(x_ptr, b_ptr, y_ptr, pid_t, pid_c, M, C, HW, ITERS, ACC, ADD, NHWC, INT64,
                                      BLOCK_M, BLOCK_C)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    store_partial(part_ptr, pid_t, T, C, cols, count, mean, m2, k)
    if FINISH:  # the channel block's partials merged by the last programs of its groups (docs/kernels.md)
        finish_stats(part_ptr, count_ptr, mean_ptr, var_ptr, C, T, pid_t, pid_c, tl.num_programs(1), GROUPS, ROWS,
                     cols)


@triton.jit
def tile_partial(x_ptr, b_ptr, y_ptr, pid_t, pid_c, M, C, HW, ITERS, ACC: tl.constexpr, ADD: tl.constexpr,
                 NHWC: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row tile pid_t's partial (count, mean, M2 of x − K, K) [BLOCK_C] of channel block pid_c (ADD: of the rounded
    y = x + b, which it stores): ITERS chunks of BLOCK_M rows, each reduced two-pass, folded with Chan's formula."""
    # shift K [1, BLOCK_C]: the value at row 0 of each channel (of the rounded y = a + b when ADD)
    _, cols = tile_indices(pid_t, pid_c, 0, ITERS, BLOCK_M, BLOCK_C, INT64)
    offs0 = tile_offsets(tl.zeros([1], dtype=tl.int32), cols, C, HW, NHWC)
    k = tl.load(x_ptr + offs0, mask=(cols < C)[None, :], other=0.0).to(ACC)
    if ADD:
        k = k + tl.load(b_ptr + offs0, mask=(cols < C)[None, :], other=0.0).to(ACC)
        k = k.to(y_ptr.dtype.element_ty).to(ACC)
    count = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for it in range(ITERS):
        rows, cols = tile_indices(pid_t, pid_c, it, ITERS, BLOCK_M, BLOCK_C, INT64)
        rmask = rows < M
        mask = rmask[:, None] & (cols < C)[None, :]
        offs = tile_offsets(rows, cols, C, HW, NHWC)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        if ADD:
            # y = a + b in ACC, one rounding at the store; the statistics are those of the stored (rounded) y.
            v = v + tl.load(b_ptr + offs, mask=mask, other=0.0).to(ACC)
            y = v.to(y_ptr.dtype.element_ty)
            tl.store(y_ptr + offs, y, mask=mask)
            v = y.to(ACC)
        # this chunk's (count, mean, centred M2); masked lanes contribute nothing
        n_b, mean_b, m2_b = chunk_summary(tl.where(mask, v - k, 0.0), rmask, mask)
        count, mean, m2 = chan_merge(count, mean, m2, n_b, mean_b, m2_b)
    return count, mean, m2, tl.sum(k, axis=0)


@triton.jit
def merge_tiles(part_ptr, C, T, cols, first, ROWS, step):
    """Chan merge, in row order, of the partial rows first, first + step, … (ROWS of them, those < T) of part
    [4, T, C] (`store_partial`'s format) for the channels cols, each row's mean re-centred on row `first`'s pivot
    K_0 (K_t − K_0 = 0 when all rows share the pivot): (count, mean, M2, K_0) [len(cols)]. Loads bypass L1 (.cg): a
    finishing program reads what other programs wrote (docs/kernels.md)."""
    cmask = cols < C
    k0 = tl.load(part_ptr + (3 * T + first) * C + cols, mask=cmask, other=0.0, cache_modifier=".cg")
    count = tl.zeros_like(k0)
    mean = tl.zeros_like(k0)
    m2 = tl.zeros_like(k0)
    left = tl.zeros_like(cols) + T  # a vector: the interpreter's masks
    for i in range(ROWS):
        row = first + i * step
        ok = cmask & (left > row)  # past the last row: count 0, a neutral summary
        base = part_ptr + row * C + cols
        n_b = tl.load(base, mask=ok, other=0.0, cache_modifier=".cg")
        mean_b = (tl.load(base + T * C, mask=ok, other=0.0, cache_modifier=".cg")
                  + (tl.load(base + 3 * T * C, mask=ok, other=0.0, cache_modifier=".cg") - k0))
        m2_b = tl.load(base + 2 * T * C, mask=ok, other=0.0, cache_modifier=".cg")
        count, mean, m2 = chan_merge(count, mean, m2, n_b, mean_b, m2_b)
    return count, mean, m2, k0


@triton.jit
def store_stats(mean_ptr, var_ptr, C, cols, count, mean, m2, k0):
    """The final (mean, biased variance) of a merged summary shifted by the pivot k0."""
    cmask = cols < C
    tl.store(mean_ptr + cols, k0 + mean, mask=cmask)
    tl.store(var_ptr + cols, m2 / tl.maximum(count, 1.0), mask=cmask)


@triton.jit
def last_program(counter, contributors):
    """Whether this program is the last of `contributors` programs to arrive at `counter` (an int32 that is zero
    before the first arrives; the last one must `release_counter` it). The barrier orders every thread's stores
    before the arrival, the acq_rel atomic publishes them and, for the last program, acquires the others' (memory
    ordering: docs/kernels.md, "Merges finished by the last program")."""
    tl.debug_barrier()
    return tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == contributors - 1


@triton.jit
def release_counter(counter):
    """Leave a launch counter at zero for the next launch (or CUDA-graph replay) on the stream."""
    tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


@triton.jit
def group_counter(count_ptr, row, block, GROUPS, ROWS):
    """The level-1 counter of partial row `row` of column block `block`: one per group of ROWS consecutive rows,
    [blocks, GROUPS] at count_ptr (docs/kernels.md, "Merges finished by the last program")."""
    return count_ptr + block * GROUPS + row // ROWS


@triton.jit
def group_size(row, T, ROWS):
    """The rows of `row`'s group of ROWS consecutive rows among T: ROWS, fewer for the last group."""
    return tl.minimum(ROWS, T - (row // ROWS) * ROWS)


@triton.jit
def top_counter(count_ptr, block, blocks, GROUPS):
    """The level-2 counter of column block `block`, after the [blocks, GROUPS] level-1 counters."""
    return count_ptr + blocks * GROUPS + block


@triton.jit
def finish_stats(part_ptr, count_ptr, mean_ptr, var_ptr, C, T, row, block, blocks, GROUPS, ROWS, cols):
    """`merge_partials` finished inside the launch, for the channels cols of column block `block` by the program that
    wrote partial row `row` (the same merges in the same order: the same bits). Level 1: the last program of each
    group of ROWS rows merges its group and stores the result over the group's first row; level 2: the last group
    merges the GROUPS group results (rows 0, ROWS, 2·ROWS, …) into (mean, var). One group: its last program merges
    the rows into (mean, var) directly. Counters: `group_counter`, `top_counter`, left at zero."""
    counter = group_counter(count_ptr, row, block, GROUPS, ROWS)
    if last_program(counter, group_size(row, T, ROWS)):
        tl.debug_barrier()
        first = (row // ROWS) * ROWS
        count, mean, m2, k = merge_tiles(part_ptr, C, T, cols, first, ROWS, 1)
        release_counter(counter)
        if GROUPS == 1:
            store_stats(mean_ptr, var_ptr, C, cols, count, mean, m2, k)
        else:
            store_partial(part_ptr, first, T, C, cols, count, mean, m2, k)
            top = top_counter(count_ptr, block, blocks, GROUPS)
            if last_program(top, GROUPS):
                tl.debug_barrier()
                count, mean, m2, k0 = merge_tiles(part_ptr, C, T, cols, 0, GROUPS, ROWS)
                store_stats(mean_ptr, var_ptr, C, cols, count, mean, m2, k0)
                release_counter(top)


@triton.jit
def merge_stats(part_ptr, C, T, cols, GROUPS, ROWS):
    """(mean, biased var) [len(cols)] of the T partial rows of part [4, T, C], `finish_stats`' merges in its order
    (the same bits) held in registers: every program of a launch that calls it gets the same values."""
    if GROUPS > 1:
        k0 = tl.load(part_ptr + 3 * T * C + cols, mask=cols < C, other=0.0, cache_modifier=".cg")
        count = tl.zeros_like(k0)
        mean = tl.zeros_like(k0)
        m2 = tl.zeros_like(k0)
        for g in range(GROUPS):  # `merge_tiles` over the group results, in registers
            n_b, mean_b, m2_b, k_b = merge_tiles(part_ptr, C, T, cols, g * ROWS, ROWS, 1)
            count, mean, m2 = chan_merge(count, mean, m2, n_b, mean_b + (k_b - k0), m2_b)
    else:
        count, mean, m2, k0 = merge_tiles(part_ptr, C, T, cols, 0, T, 1)
    return k0 + mean, m2 / tl.maximum(count, 1.0)


@triton.jit
def grid_barrier(arrive_ptr, programs):
    """Wait until `programs` programs have arrived at the int32 counter arrive_ptr (zero before the launch;
    `grid_depart` zeroes it again). They must all be resident at once (a cooperative launch); never called by the
    interpreter with more than one program. Memory ordering (docs/kernels.md): the block barrier puts every thread's
    stores before the arrival, the acq_rel atomic releases them, the acquire read of the spin that sees all arrivals
    takes the others' released stores, the second block barrier puts them before every thread's loads (which bypass
    L1)."""
    tl.debug_barrier()
    tl.atomic_add(arrive_ptr, 1, sem="acq_rel", scope="gpu")
    while tl.atomic_add(arrive_ptr, 0, sem="acquire", scope="gpu") < programs:
        pass
    tl.debug_barrier()


@triton.jit
def grid_depart(sync_ptr, programs, ARRIVALS: tl.constexpr):
    """After phase 2 of a launch of `programs` programs with `grid_barrier`s on the counters sync_ptr[1 … ARRIVALS]:
    counts the program out on sync_ptr[0] and returns whether it is the last — then every program has finished and
    left its spin, their stores are acquired (acq_rel), and it zeroes all the counters for the next launch or
    CUDA-graph replay on the stream."""
    tl.debug_barrier()
    last = tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu") == programs - 1
    if last:
        for i in range(ARRIVALS):
            tl.atomic_xchg(sync_ptr + 1 + i, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit(do_not_specialize=["T", "ROWS"])
def _stats_merge_kernel(
    part_ptr,  # [4, T, C] ACC: per-tile (count, mean, M2) of x − K_t, and the tile's pivot K_t
    out_ptr,   # FINAL: [C] ACC mean; else [4, G, C] ACC: one partial per group of ROWS tiles, part's format
    var_ptr,   # FINAL: [C] ACC biased variance M2 / count; else unused
    C, T, ROWS,
    FINAL: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # program (channel block, group g): tiles [g·ROWS, min((g+1)·ROWS, T)) folded in tile order (deterministic)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    count, mean, m2, k0 = merge_tiles(part_ptr, C, T, cols, tl.program_id(1) * ROWS, ROWS, 1)
    if FINAL:
        store_stats(out_ptr, var_ptr, C, cols, count, mean, m2, k0)
    else:
        store_partial(out_ptr, tl.program_id(1), tl.num_programs(1), C, cols, count, mean, m2, k0)


@triton.jit
def _bn_affine_kernel(
    mean_ptr, var_ptr, w_ptr, b_ptr, consts_ptr, rstd_ptr, scale_ptr, shift_ptr, rm_ptr, rv_ptr, nbt_ptr,  # BNAffine
    C, HAS_W: tl.constexpr, HAS_B: tl.constexpr, UPDATE: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr,
):
    # one program: `finalize_bn` where no kernel consumes the statistics (an empty batch, a replay's last BN)
    finalize_bn(mean_ptr, var_ptr, w_ptr, b_ptr, consts_ptr, rstd_ptr, scale_ptr, shift_ptr, rm_ptr, rv_ptr, nbt_ptr,
                C, HAS_W, HAS_B, UPDATE, BLOCK, BLOCKS)


@triton.jit(do_not_specialize=["S", "ROWS"])
def sum_groups_kernel(
    part_ptr,  # [P, S, L] partial sums (fp32 or fp64), contiguous
    out_ptr,   # [P, G, L] out: out[p, g] = Σ part[p, s] over s = g·ROWS, g·ROWS + 1, … < min((g+1)·ROWS, S)
    S, L, ROWS,
    BLOCK: tl.constexpr,
):
    # summed in row order in part's dtype, one rounding to out's dtype at the store: deterministic
    rl = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rl < L
    first = tl.program_id(1) * ROWS
    plane = tl.program_id(2) * S
    acc = tl.zeros([BLOCK], dtype=part_ptr.dtype.element_ty)
    left = tl.full([BLOCK], S, tl.int32) - first  # rows from `first` on (a vector: the interpreter's masks)
    for i in range(ROWS):
        acc += tl.load(part_ptr + (plane + first + i) * L + rl, mask=ok & (left > i), other=0.0)
    tl.store(out_ptr + (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * L + rl,
             acc.to(out_ptr.dtype.element_ty), mask=ok)


# ---- host side -----------------------------------------------------------------------------------------------------
def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype: float64 for float64 storage, float32 otherwise (as fastresnet.reference)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


def check_tensor(t: Tensor, name: str, like: Optional[Tensor] = None) -> bool:
    """Validate a 4-D dense NCHW or NHWC float tensor; `like`: it must match like's shape, device and layout.
    Returns True for NHWC (channels_last) storage, False for NCHW."""
    if not isinstance(t, Tensor) or t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor [N, C, H, W], got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}")
    nhwc = not t.is_contiguous()
    if nhwc and not t.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"{name}: expected dense NCHW or channels_last storage, got strides {t.stride()} "
                         "(call .contiguous() first)")
    if like is not None:
        if t.shape != like.shape or t.device != like.device:
            raise ValueError(f"{name}: expected shape {tuple(like.shape)} on {like.device}, got "
                             f"{tuple(t.shape)} on {t.device}")
        fmt = torch.contiguous_format if like.is_contiguous() else torch.channels_last
        if not t.is_contiguous(memory_format=fmt):
            raise ValueError(f"{name}: expected the memory format of x ({fmt}), got strides {t.stride()}")
    return nhwc


def memory_format(nhwc: bool) -> torch.memory_format:
    return torch.channels_last if nhwc else torch.contiguous_format


def check_channel_vector(v: Tensor, name: str, x: Tensor) -> None:
    if not isinstance(v, Tensor) or v.dim() != 1 or v.shape[0] != x.shape[1] or v.device != x.device:
        raise ValueError(f"{name}: expected a [C={x.shape[1]}] vector on {x.device}, got "
                         f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}"
                         f"{f' on {v.device}' if isinstance(v, Tensor) else ''}")
    if not v.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {v.dtype}")


@lru_cache(maxsize=None)
def _sm_count(device_index: Optional[int]) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sms(x: Tensor) -> int:
    """x's GPU's SM count; 1 off the GPU (the interpreter: a few large tiles keep it fast)."""
    return _sm_count(torch.cuda.current_device() if x.device.index is None else x.device.index) if x.is_cuda else 1


def channel_block(c: int) -> int:
    """BLOCK_C, the channels one program of the per-channel passes covers (the next power of two of c, at most 64)."""
    return min(triton.next_power_of_2(c), 64)


def tile_config(x: Tensor, block_m: Optional[int] = None, tiles: Optional[int] = None) -> dict:
    """Tile sizes for an [M = N·H·W, C] pass over x: BLOCK_C channels × BLOCK_M rows per chunk, ITERS chunks per
    row-tile, T row-tiles. Depends only on (shape, device), so reductions are reproducible. `block_m`/`tiles`
    override the defaults (tuning, and tests that force many partials).

    Default BLOCK_M: 4,096 elements a chunk (at most M rows, at least 16), halved (down to 16 rows) while the chunks ×
    channel blocks are fewer than the SMs, so the one-chunk-per-program elementwise passes and the partial pass keep
    every SM busy on small M (CIFAR stage 3 at batch 128: M = 8,192, C = 64 gives 256 programs of 32 rows, not 128
    of 64). Only up to one program per SM: each halving doubles the partials, 16 B per channel per tile against
    2·BLOCK_M B of bf16 input. A halving leaves fewer than 2·SMs chunks × channel blocks, under the 4·SMs of the
    default `tiles`: ITERS stays 1 and T at most `tiles`, so the merges walk no more rows than before."""
    n, c, h, w = x.shape
    m = n * h * w
    block_c = channel_block(c)
    c_blocks = triton.cdiv(c, block_c)
    sms = _device_sms(x)
    if block_m is None:
        block_m = max(16, min(4096 // block_c, triton.next_power_of_2(m)))
        while block_m > 16 and triton.cdiv(m, block_m) * c_blocks < sms:
            block_m //= 2
    chunks = triton.cdiv(m, block_m)
    if tiles is None:
        tiles = max(1, 4 * sms // c_blocks)  # enough programs to fill the GPU (4 per SM)
    iters = triton.cdiv(chunks, min(tiles, chunks))
    return dict(M=m, C=c, HW=h * w, BLOCK_M=block_m, BLOCK_C=block_c, ITERS=iters, T=triton.cdiv(chunks, iters),
                INT64=x.numel() > _INT32_LIMIT, NUM_WARPS=4 if block_m * block_c <= 2048 else 8)


# registers a program of the statistics pass may use: without a bound, ptxas (triton 3.6) holds the 16-bit 32×64
# tile with the two-level finish in 72 registers and spills; the bound changes the allocation, not the arithmetic
STATS_MAXNREG = 128


def launch_stats(x: Tensor, b: Optional[Tensor], y: Optional[Tensor], nhwc: bool, block_m: Optional[int] = None,
                 tiles: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Run both passes over x (or over y = x + b when b and y are given); returns (mean, biased var) in ACC."""
    if x.numel() == 0:
        return no_value_stats(x.shape[1], acc_dtype(x.dtype if y is None else y.dtype), x.device)
    cfg = tile_config(x, block_m, tiles)
    c, t = cfg["C"], cfg["T"]
    part = torch.empty((4, t, c), dtype=acc_dtype(x.dtype if y is None else y.dtype), device=x.device)
    add = b is not None
    c_blocks = triton.cdiv(c, cfg["BLOCK_C"])
    fin = stats_finish(t, c, c_blocks, part.dtype, x.device)
    _stats_partial_kernel[(t, c_blocks)](
        x, b if add else x, y if add else x, part, *(fin[:3] if fin else (part,) * 3), cfg["M"], c, cfg["HW"], t,
        cfg["ITERS"], fin.groups if fin else 1, fin.rows if fin else 1, ACC=tl_dtype(part.dtype), ADD=add,
        NHWC=nhwc, INT64=cfg["INT64"], BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], FINISH=fin is not None,
        num_warps=cfg["NUM_WARPS"], maxnreg=STATS_MAXNREG)
    return (fin.mean, fin.var) if fin else merge_partials(part)


_COUNTERS: Dict[torch.device, Tensor] = {}


def launch_counters(n: int, device: torch.device) -> Tensor:
    """At least n int32 counters on device, all zero: the per-launch counters of kernels whose last program finishes
    a reduction (docs/kernels.md). Zeroed once when (re)allocated; each such launch leaves its counters at zero
    again, so consecutive launches on one stream — and CUDA-graph replays — share them. Launches running
    concurrently on several streams of one device would race on them: the kernels are launched on one stream."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def no_value_stats(c: int, dtype: torch.dtype, device: torch.device) -> Tuple[Tensor, Tensor]:
    """(mean, biased var) [C] of a channel without values (N·H·W = 0): NaN, the 0/0 of `torch.mean` of an empty
    tensor (`fastresnet.reference.batch_stats`)."""
    return (torch.full((c,), float("nan"), dtype=dtype, device=device),
            torch.full((c,), float("nan"), dtype=dtype, device=device))


def merge_rows(t: int) -> int:
    """Rows one program of a merge walks for t partial rows: all of them when t <= 4, else ⌈√t⌉ — a two-level
    merge (groups of ⌈√t⌉ rows in parallel, then the ⌈t / ⌈√t⌉⌉ group results), so no program walks more than
    ⌈√t⌉ rows (32 for the 1,024 row tiles of a CIFAR stage-1 conv at batch 128). A function of t only: the merge
    order, hence the result, is reproducible bit for bit."""
    return t if t <= 4 else math.isqrt(t - 1) + 1


def merge_partials(part: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean, biased var) [C] in part's dtype (fp32/fp64) from per-tile partials part [4, T, C] = (count, mean of
    x − K_t, M2, K_t), merged in tile order in groups of `merge_rows(T)` tiles, then the groups in order
    (deterministic). Written by `_stats_partial_kernel` and by the tier-B conv epilogue (`kernels.conv`)."""
    _, t, c = part.shape
    mean = torch.empty(c, dtype=part.dtype, device=part.device)
    var = torch.empty(c, dtype=part.dtype, device=part.device)
    block_c = channel_block(c)
    rows = merge_rows(t)
    if rows < t:
        groups = triton.cdiv(t, rows)
        level1 = torch.empty((4, groups, c), dtype=part.dtype, device=part.device)
        _stats_merge_kernel[(triton.cdiv(c, block_c), groups)](part, level1, level1, c, t, rows, FINAL=False,
                                                               BLOCK_C=block_c)
        part, t = level1, groups
    _stats_merge_kernel[(triton.cdiv(c, block_c), 1)](part, mean, var, c, t, t, FINAL=True, BLOCK_C=block_c)
    return mean, var


class StatsFinish(NamedTuple):
    """What a statistics launch whose last programs merge the partials needs (`finish_stats`): the counters
    (`finish_counters`), the outputs, the merge shape (`merge_rows`)."""
    counters: Tensor
    mean: Tensor
    var: Tensor
    groups: int
    rows: int


def finish_counters(t: int, blocks: int, device: torch.device) -> Tuple[Tensor, int, int]:
    """(counters, groups, rows) of a launch whose last programs finish a reduction over t partial rows per column
    block in two levels (docs/kernels.md): `merge_rows(t)` rows per group, groups = ⌈t / rows⌉, the counters
    [blocks, groups] of level 1 and [blocks] of level 2."""
    rows = merge_rows(t)
    groups = triton.cdiv(t, rows)
    return launch_counters(blocks * (groups + 1), device), groups, rows


def stats_finish(t: int, c: int, channel_blocks: int, dtype: torch.dtype,
                 device: torch.device) -> Optional[StatsFinish]:
    """A `StatsFinish` for partials [4, t, c] of dtype written by t programs per channel block, or None where the
    separate merge runs instead (FASTRESNET_LAST_PROGRAM_MERGE=0)."""
    if not last_program_merge():
        return None
    counters, groups, rows = finish_counters(t, channel_blocks, device)
    new = functools.partial(torch.empty, dtype=dtype, device=device)
    return StatsFinish(counters, new(c), new(c), groups, rows)


class BNAffine(NamedTuple):
    """A BN whose affine map the kernel that first consumes its statistics forms itself (`bn_scale_shift` in every
    program, `finalize_bn` in one): the inputs — batch statistics, γ, β (None: 1, 0), the constants [eps, 1 − m, m,
    M/(M − 1)] — and the outputs that kernel fills for the backward: rstd, scale, shift [C]; and the running
    buffers it updates (`update`: a `RUN_*` value; buffers None with RUN_NONE)."""
    mean: Tensor
    var: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    consts: Tensor
    rstd: Tensor
    scale: Tensor
    shift: Tensor
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    update: int
    from_input: bool = False  # mean and var are outputs: the consuming kernel computes its input's batch statistics

    def kernel_args(self) -> tuple:
        """The 11 pointer arguments of `finalize_bn` / `bn_scale_shift` (absent tensors: mean, never read)."""
        m = self.mean
        return (m, self.var, m if self.weight is None else self.weight, m if self.bias is None else self.bias,
                self.consts, self.rstd, self.scale, self.shift, m if self.running_mean is None else self.running_mean,
                m if self.running_var is None else self.running_var,
                m if self.num_batches_tracked is None else self.num_batches_tracked)

    def constexprs(self) -> dict:
        return dict(HAS_W=self.weight is not None, HAS_B=self.bias is not None, UPDATE=self.update)

    @property
    def updates_running(self) -> bool:
        """Whether the kernels make the running update (else the caller makes it)."""
        return self.update != RUN_NONE.value

    def finalize(self) -> "BNAffine":
        """`finalize_affine(self)`: the affine map and running update in a launch of their own."""
        return finalize_affine(self)


_CONSTS: Dict[tuple, Tensor] = {}


def _bn_consts(eps: float, momentum: Optional[float], count: int, dtype: torch.dtype,
               device: torch.device) -> Tensor:
    """[eps, 1 − m, m, M/(M − 1)] in dtype (each a Python float rounded to dtype, as ATen rounds a scalar operand),
    made once per value and kept: a CUDA-graph capture finds the ones its warm-up step made (a copy from the host
    cannot be captured)."""
    key = (eps, momentum, count, dtype, device)
    t = _CONSTS.get(key)
    if t is None:
        m = 0.0 if momentum is None else momentum
        t = torch.tensor([eps, 1 - m, m, count / (count - 1) if count > 1 else 0.0], dtype=dtype, device=device)
        if not t.is_meta:  # a meta tensor posing as a CUDA one (benchmarks/static_sm90.py) is not kept
            _CONSTS[key] = t
    return t


def bn_affine(mean: Tensor, var: Tensor, eps: float, weight: Optional[Tensor], bias: Optional[Tensor],
              running: Optional[tuple] = None, from_input: bool = False) -> Optional[BNAffine]:
    """A `BNAffine` of a BN with batch statistics (mean, var) [C] (fp32, or fp64 for fp64 input), eps, γ, β, and
    `running` = (running_mean, running_var, num_batches_tracked, M = N·H·W, momentum) to update, or None; None where
    the kernels cannot take this BN (statistics of another dtype or not dense): the caller then runs the reference
    composition. Running buffers the kernels cannot update (not dense in the statistics' dtype — a bf16 or fp16
    model's —, no num_batches_tracked) are left to the caller: `updates_running` is then False. from_input: mean and
    var are empty, filled by the BN-ReLU forward given the spec (`kernels.bn_relu.stats_bn_relu_forward`)."""
    dtype = mean.dtype
    if (dtype not in (torch.float32, torch.float64) or var.dtype != dtype or mean.dim() != 1
            or var.shape != mean.shape or not (mean.is_contiguous() and var.is_contiguous())):
        return None
    if any(v is not None and (v.shape != mean.shape or not v.is_contiguous() or not v.is_floating_point())
           for v in (weight, bias)):
        return None
    update, rm, rv, nbt, count, momentum = RUN_NONE.value, None, None, None, 2, None
    if running is not None:
        rm, rv, nbt, count, momentum = running
        if (nbt is None or nbt.dtype != torch.int64 or nbt.numel() != 1 or rm.dtype != dtype or rv.dtype != dtype
                or rm.shape != mean.shape or rv.shape != mean.shape or not (rm.is_contiguous() and rv.is_contiguous())
                or not isinstance(count, int)):
            rm, rv, nbt, count, momentum = None, None, None, 2, None  # the caller's reference update
        else:
            update = (RUN_COUNT if count == 0 else RUN_CUMULATIVE if momentum is None else RUN_MOMENTUM).value
    out = functools.partial(torch.empty_like, mean)
    return BNAffine(mean, var, weight, bias, _bn_consts(float(eps), momentum, count, dtype, mean.device), out(), out(),
                    out(), rm, rv, nbt, update, from_input)


def finalize_affine(affine: BNAffine) -> BNAffine:
    """`finalize_bn` in a launch of its own, for statistics no kernel consumes (an empty batch, a recomputation's last
    BN): fills affine's rstd, scale and shift and makes its running update."""
    c = affine.mean.shape[0]
    block = min(1024, triton.next_power_of_2(max(c, 1)))
    _bn_affine_kernel[(1,)](*affine.kernel_args(), c, BLOCK=block, BLOCKS=triton.cdiv(c, block),
                            **affine.constexprs())
    return affine


def sum_groups(part: Tensor, rows: int, out: Optional[Tensor] = None) -> Tensor:
    """out[P, G, L] (G = ⌈S / rows⌉; a new tensor in part's dtype if None, else any float dtype, contiguous): the sums
    of part[P, S, L] (fp32/fp64, contiguous) over groups of `rows` consecutive rows, each in row order."""
    p, s, length = part.shape
    groups = triton.cdiv(s, rows)
    if out is None:
        out = torch.empty((p, groups, length), dtype=part.dtype, device=part.device)
    block = min(256, triton.next_power_of_2(length))
    sum_groups_kernel[(triton.cdiv(length, block), groups, p)](part, out, s, length, rows, BLOCK=block)
    return out


def sum_rows(part: Tensor, out: Tensor) -> Tensor:
    """out[P, L] (any float dtype, contiguous) = part[P, S, L].sum(1) (fp32/fp64, contiguous), summed in row order
    in groups of `merge_rows(S)` rows, then the group sums in order (deterministic)."""
    rows = merge_rows(part.shape[1])
    if rows < part.shape[1]:
        part = sum_groups(part, rows)
    sum_groups(part, part.shape[1], out[:, None])
    return out


def batch_stats(x: Tensor, *, block_m: Optional[int] = None, tiles: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance) of x [N, C, H, W] (dense NCHW or channels_last; fp16/bf16/fp32/fp64),
    returned as [C] float32 (float64 for float64 x). Semantics of `fastresnet.reference.batch_stats`."""
    nhwc = check_tensor(x, "x")
    return launch_stats(x, None, None, nhwc, block_m, tiles)
