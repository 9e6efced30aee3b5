"""`torch.library` custom ops (namespace `fastresnet`) with fake implementations and hand-written backward passes.

Each op takes the concrete backend name as its last argument, so a traced graph records which kernels it runs.
Statistics (mean, rstd) enter the BN ops as constants: in training they are this batch's statistics, and the
backward formula already contains their dependence on x (docs/architecture.md §2), so no gradient flows through them.
"""
from fastresnet.ops.bn_ops import add_stats, batch_stats, bn_relu, bn_relu_conv, decompositions, update_running_stats
from fastresnet.ops import unit_ops
from fastresnet.ops.unit_ops import bn_relu_conv_stats, preact_unit
from fastresnet.ops import flops  # noqa: F401  registers their FLOP formulas for FlopCounterMode (flops.py)

__all__ = ["add_stats", "batch_stats", "bn_relu", "bn_relu_conv", "bn_relu_conv_stats", "decompositions",
           "preact_unit", "unit_ops", "update_running_stats"]
