"""The statistics math of synchronised batch norm: BN over the *global* batch split across the ranks of a process group.

Forward (`combine_batch_stats`, called inside `functional.bn_statistics` when it is given a `process_group`): each
rank computes its per-channel (mean, biased var) over its M_r = N_r·H·W values; one `all_gather` collects
(M_r, mean_r, M2_r = var_r·M_r) from every rank and every rank combines them in rank order with Chan's formula

    M = Σ M_r,  mean = Σ M_r·mean_r / M,  M2 = Σ M2_r + Σ M_r·(mean_r − mean)²,  var = M2 / M,

exact for large |mean| (no Σx² − (Σx)²/M cancellation) and bitwise identical on every rank. The running statistics
are updated once per forward with the global (mean, var) and the global count M (unbiased factor M/(M − 1)).

Backward (`combine_grad_terms`): a BN backward run in its eval form (the mean/rstd treated as constants) yields
dx_const = s·dz and the *local* sums Σdz, Σdz·x̂. Those two sums are all-reduced and the batch-statistics terms are
added back with the global count:

    dx = dx_const − s·(Σ_g dz + x̂·Σ_g dz·x̂) / M,   x̂ = (x − mean)·rstd,

the same gradient as one process running the whole global batch (what torch.nn.SyncBatchNorm computes).

The synchronised fused ops built on these are in `fastresnet.sync_functional`; `fastresnet.distributed` converts a
model to use them.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist
from torch import Tensor


def combine_batch_stats(mean: Tensor, var: Tensor, count: int, group) -> Tuple[Tensor, Tensor, Tensor]:
    """Global (mean, biased var, count) of a BN input split across the ranks of `group` (module docstring).

    mean, var: this rank's per-channel statistics [C] (fp32 or fp64) over `count` values per channel. The global
    count comes back as a 0-d tensor on the statistics' device, so no host synchronisation happens.
    """
    world = dist.get_world_size(group)
    if count == 0:  # an empty local batch is a neutral summary (its own mean and var are NaN, 0/0)
        mean, var = torch.zeros_like(mean), torch.zeros_like(var)
    local = torch.stack([torch.full_like(mean, float(count)), mean, var * count])   # [3, C]: (M_r, mean_r, M2_r)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local.contiguous(), group=group)
    parts = torch.stack(gathered)                                                  # [world, 3, C], rank order
    counts, means, m2 = parts[:, 0], parts[:, 1], parts[:, 2]
    total = counts.sum(0)
    g_mean = (counts * means).sum(0) / total
    g_m2 = m2.sum(0) + (counts * (means - g_mean).square()).sum(0)
    return g_mean, g_m2 / total, total[0]


def combine_grad_terms(x: Tensor, dx_const: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor, sum_dz: Tensor,
                       sum_dz_xhat: Tensor, group) -> Tensor:
    """dx = dx_const − s·(Σ_g dz + x̂·Σ_g dz·x̂)/M with the sums and the count M all-reduced over `group`.

    x, dx_const: [N, C, H, W] (dx_const in x's dtype or the accumulation dtype); mean, rstd, scale (s = γ·rstd),
    sum_dz, sum_dz_xhat: [C], fp32 (fp64 for fp64 x). Returns dx in x's dtype.
    """
    count = torch.full_like(sum_dz, float(x.numel() // x.shape[1]))
    sums = torch.stack([sum_dz, sum_dz_xhat, count]).contiguous()
    dist.all_reduce(sums, group=group)
    g_dz, g_dz_xhat, m = sums[0], sums[1], sums[2]
    # dx = dx_const + a + b·(x − mean) with a = −s·Σdz/M, b = −s·rstd·Σdz·x̂/M; centred on the mean, because the
    # expanded a' + b·x cancels when |mean| ≫ std
    b = -scale * rstd * g_dz_xhat / m
    a = -scale * g_dz / m
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = dx_const.to(acc) + a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1) * (x.to(acc) - mean.view(1, -1, 1, 1))
    return out.to(x.dtype)
