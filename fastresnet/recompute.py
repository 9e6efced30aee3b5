"""Recomputation of residual units in backward (`ResNet(checkpoint="unit" | "segment")`): keep a unit's input, not
its inner activations, and run the unit again when its gradient is needed.

A run of consecutive units (a *segment*: one unit in "unit" mode, k units in "segment" mode) becomes one autograd
node (`_RecomputedUnits`). Its forward runs the units without recording a graph and saves only

- the segment input x_l and the batch statistics that came with it (the chain hands them from unit to unit), and
- a *statistics tape*: the (mean, rstd) pair every batch-norm of the segment used, in call order ([C] vectors).

Its backward runs the same units again, with grad enabled, from x_l, and differentiates them. During that replay
every fused BN (`functional.bn_statistics`, which all fused and synchronised layers go through) reads its (mean,
rstd) from the tape instead of computing it, so the recomputation

- computes no batch statistics and communicates nothing (synchronised BN combines statistics across ranks once, in
  the first forward), and never updates running statistics or `num_batches_tracked`: they change once per step;
- reproduces the first forward bitwise: the kernels are deterministic and get the same inputs and statistics.

A unit that runs as one op (`ResidualUnit.one_op`) computes its inner statistics itself, bitwise again from the
same input, so it neither records nor reads the tape; its replay only skips the running-statistics update. The
replay of a segment stops before its last unit when that unit runs as one op: the last unit's output is the
segment's output, which backward does not need, so its gradients come straight from its input
(`ResidualUnit.gradients`: its inner activations recomputed, its last conv and residual add not).

The replay also restores what else the first forward depended on: the autocast state of x's device, and the RNG
state when the segment holds an active dropout (the dropout-shortcut units), so the same elements are dropped.
Plain `nn.BatchNorm2d` modules (post-activation units, BN after a projection) do not go through the tape: during
replay they run with `track_running_stats` off, which recomputes their batch statistics bitwise (same input, same
deterministic kernel) without touching their running buffers.

Gradients: the node returns the gradients of x_l and of every parameter of its units (they are inputs of the
node), so they reach the parameters through the ordinary autograd graph: DistributedDataParallel's hooks fire as
without recomputation, and the values are bitwise those of `checkpoint="none"`.
"""
from __future__ import annotations

import math
import threading
from contextlib import ExitStack, contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

Stats = Optional[Tuple[Tensor, Tensor]]
MODES = ("none", "unit", "segment")
_local = threading.local()  # the tape of the segment this thread is running (None outside recomputed regions)


class StatsTape:
    """The (mean, rstd) pairs the BNs of one segment used, in call order: recorded in the first forward, handed back
    one by one in the replay."""

    def __init__(self, entries: Optional[List[Tuple[Tensor, Tensor]]] = None):
        self.replaying = entries is not None
        self.entries: List[Tuple[Tensor, Tensor]] = [] if entries is None else entries
        self.position = 0

    def pop(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if self.position >= len(self.entries):
            raise RuntimeError("recomputation: the replay ran more batch norms than the first forward (the segment's "
                               "control flow changed between forward and backward)")
        mean, rstd = self.entries[self.position]
        if mean.shape[0] != x.shape[1]:
            raise RuntimeError(f"recomputation: batch norm {self.position} of the replay has {x.shape[1]} channels, "
                               f"the first forward's had {mean.shape[0]}")
        self.position += 1
        return mean, rstd

    def check_consumed(self) -> None:
        if self.position != len(self.entries):
            raise RuntimeError(f"recomputation: the replay ran {self.position} batch norms, the first forward "
                               f"{len(self.entries)}")

    def flat(self) -> List[Tensor]:
        return [t for pair in self.entries for t in pair]


def replayed_statistics(x: Tensor) -> Stats:
    """(mean, rstd) from the tape when this thread replays a segment (called first by `functional.bn_statistics`),
    else None: compute the statistics as usual."""
    tape = getattr(_local, "tape", None)
    return tape.pop(x) if tape is not None and tape.replaying else None


def replaying() -> bool:
    """Whether this thread is replaying a recomputed segment (batch norms read the tape)."""
    tape = getattr(_local, "tape", None)
    return tape is not None and tape.replaying


def in_segment() -> bool:
    """Whether this thread runs a recomputed segment, for the first time (recording) or as a replay."""
    return getattr(_local, "tape", None) is not None


def record_statistics(mean: Tensor, rstd: Tensor) -> None:
    """Append the (mean, rstd) a BN just used to the tape of the segment being run for the first time, if any."""
    tape = getattr(_local, "tape", None)
    if tape is not None and not tape.replaying:
        tape.entries.append((mean, rstd))


@contextmanager
def _tape(tape: StatsTape) -> Iterator[None]:
    previous = getattr(_local, "tape", None)
    _local.tape = tape
    try:
        yield
    finally:
        _local.tape = previous


@contextmanager
def _plain_bn_frozen(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Batch-norm modules with `track_running_stats` off: training uses batch statistics and updates nothing (the
    fused layers ignore the flag: their replay reads the tape)."""
    bns = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


class Segment:
    """Consecutive residual units run as one recomputed region; `chained`: the units run as a statistics chain
    (`ResidualUnit.forward_chained`), else one after another with their plain forward."""

    def __init__(self, units: Sequence[nn.Module], chained: bool):
        self.units, self.chained = list(units), chained
        self.params = [p for u in self.units for p in u.parameters()]
        self.modules = [m for u in self.units for m in u.modules()]

    def __call__(self, x: Tensor, stats: Stats) -> Tuple[Tensor, Stats]:
        for unit in self.units:
            if self.chained:
                x, stats = unit.forward_chained(x, stats)
            else:
                x, stats = unit(x), None
        return x, stats

    def replay(self, x: Tensor, stats: Stats, dout: Tensor) -> Tuple[List[Tensor], List[Tensor], Dict[Tensor, Tensor]]:
        """Run the units again (in the replay context) for the backward of their output given its gradient `dout`:
        returns (roots, their gradients, gradients already computed for some parameters). A chain's last unit that
        runs as one op is not run again: its gradients come straight from its input (`ResidualUnit.gradients`,
        without the last conv, whose output nothing needs)."""
        *inner, final = self.units
        x, stats = Segment(inner, self.chained)(x, stats)
        if not (self.chained and final.one_op() is not None):
            out, _ = Segment([final], self.chained)(x, stats)
            return [out], [dout], {}
        dx, param_grads = final.gradients(x, stats, dout)
        return [x], [dx], param_grads

    def draws_random(self) -> bool:
        """Whether running the units consumes random numbers (an active dropout)."""
        return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in self.modules)


def _autocast_state(device_type: str) -> Tuple[str, bool, torch.dtype, bool]:
    return (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type),
            torch.is_autocast_cache_enabled())


def _rng_state(x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(x.device) if x.is_cuda else None)


class _RecomputedUnits(torch.autograd.Function):
    """(x_l, its statistics, the units' parameters) -> (x_{l+k}, its statistics); see the module docstring."""

    @staticmethod
    def forward(ctx, segment: Segment, x: Tensor, mean: Optional[Tensor], var: Optional[Tensor], *params: Tensor):
        tape = StatsTape()
        ctx.segment, ctx.autocast = segment, _autocast_state(x.device.type)
        ctx.rng = _rng_state(x) if segment.draws_random() else None
        with _tape(tape):
            out, stats = segment(x, None if mean is None else (mean, var))
        ctx.save_for_backward(x, mean, var, *tape.flat())
        if stats is None:
            return out, None, None
        ctx.mark_non_differentiable(*stats)
        return (out,) + tuple(stats)

    @staticmethod
    def backward(ctx, dout: Tensor, *_):
        x, mean, var, *flat = ctx.saved_tensors
        segment: Segment = ctx.segment
        tape = StatsTape(list(zip(flat[0::2], flat[1::2])))
        xr = x.detach().requires_grad_(ctx.needs_input_grad[1])
        device_type, enabled, dtype, cache = ctx.autocast
        with ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache))
            stack.enter_context(_tape(tape))
            stack.enter_context(_plain_bn_frozen(segment.modules))
            if ctx.rng is not None:
                stack.enter_context(torch.random.fork_rng(devices=[x.device] if x.is_cuda else []))
                torch.set_rng_state(ctx.rng[0])
                if ctx.rng[1] is not None:
                    torch.cuda.set_rng_state(ctx.rng[1], x.device)
            roots, root_grads, known = segment.replay(xr, None if mean is None else (mean, var), dout)
        tape.check_consumed()
        wanted = [xr] if xr.requires_grad else []
        known = {id(p): g for p, g in known.items()}
        wanted += [p for p, need in zip(segment.params, ctx.needs_input_grad[4:]) if need and id(p) not in known]
        if roots[0] is xr:  # the last unit's gradients came straight from the segment input: nothing to trace
            grads = iter([root_grads[0]] if xr.requires_grad else [])
        else:
            grads = iter(torch.autograd.grad(roots, wanted, root_grads, allow_unused=True))
        dx = next(grads) if xr.requires_grad else None
        dparams = [None if not need else known[id(p)] if id(p) in known else next(grads)
                   for p, need in zip(segment.params, ctx.needs_input_grad[4:])]
        return (None, dx, None, None, *dparams)


def segment_size(mode: str, units: int, given: Optional[int] = None) -> int:
    """Units per recomputed segment: 1 for "unit"; for "segment" `given`, or ⌈√units⌉ (the √n schedule: about
    √n segment inputs kept, one segment's activations alive at a time in backward)."""
    if mode == "unit":
        return 1
    if mode != "segment":
        raise ValueError(f"checkpoint: expected 'unit' or 'segment' for recomputation, got {mode!r}")
    return given if given is not None else max(1, math.ceil(math.sqrt(units)))


def run_recomputed(units: Sequence[nn.Module], x: Tensor, size: int, chained: bool,
                   stats: Stats = None) -> Tuple[Tensor, Stats]:
    """Run `units` in segments of `size` consecutive units, each recomputed in backward; returns the last unit's
    output and (chained) its batch statistics. Training forward with grad enabled only (otherwise nothing would
    be saved to begin with)."""
    if size < 1:
        raise ValueError(f"size: expected a positive number of units per segment, got {size}")
    for start in range(0, len(units), size):
        segment = Segment(units[start:start + size], chained)
        mean, var = (None, None) if stats is None else stats
        out, mean, var = _RecomputedUnits.apply(segment, x, mean, var, *segment.params)
        x, stats = out, (None if mean is None else (mean, var))
    return x, stats
