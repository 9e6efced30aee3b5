"""Residual add with output statistics: y = a + b (added in fp32/fp64, rounded once to a's dtype) and the
per-channel (mean, biased variance) of the stored y, in one read of a and b (docs/architecture.md §3: the statistics of
x_{l+1} come for free with the add, so the next BN never re-reads it).

Runs `kernels.stats._stats_partial_kernel` with ADD=True (each program adds, stores y, and reduces its tile of the
rounded y to a (count, mean, M2) partial), then the deterministic Chan merge of `kernels.stats`.
Layouts and dtypes: as `kernels.stats` (a, b dense NCHW or channels_last, same shape and layout; b may have another
float dtype, it is upcast on load).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastresnet.kernels.stats import check_tensor, launch_stats, memory_format


def add_stats(a: Tensor, b: Tensor, *, block_m: Optional[int] = None,
              tiles: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, mean, var): y = a + b [N, C, H, W] in the promoted dtype of a and b and a's layout; mean, var [C]
    float32 (float64 for a float64 y). Semantics of `fastresnet.reference.add_stats`."""
    nhwc = check_tensor(a, "a")
    check_tensor(b, "b", like=a)
    y = torch.empty_like(a, dtype=torch.promote_types(a.dtype, b.dtype), memory_format=memory_format(nhwc))
    mean, var = launch_stats(a, b, y, nhwc, block_m, tiles)
    return y, mean, var
