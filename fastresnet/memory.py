"""Training-memory planner: the peak memory of a training step of a full pre-activation ResNet at a batch size,
precision and checkpoint mode, and the largest batch that fits a budget (docs/memory.md).

The plan walks the network's layers with their shapes (no tensor is allocated) and adds up

- parameters, their gradients and the optimizer state (`optimizer_states` parameter-sized buffers: 1 for SGD with
  momentum, 2 for Adam, 0 for plain SGD);
- the activations saved for backward at the end of the forward, storage by storage as autograd keeps them: a fused
  layer keeps its BN input and the fp32 per-channel (mean, rstd); eager BatchNorm2d → ReLU → Conv2d keeps the BN
  input, the ReLU output and (mean, invstd); checkpoint "unit"/"segment" keeps each segment's input, the statistics
  that came with it and its statistics tape (`fastresnet.recompute`); under bf16 autocast the bf16 weight copies the
  convs save count too (they are new tensors). Parameters and buffers saved for backward cost nothing extra and are
  not counted here;
- the largest transient: a walk through the backward in reverse layer order, where saved activations are released
  as each layer's backward finishes, parameter gradients appear, a recomputed segment first brings back its inner
  activations, and each layer's backward needs a working set (the incoming gradient, the outgoing one and the
  recomputed activation: an estimate of what the kernels allocate, not a measurement). The optimizer step needs
  the gradients and one parameter-sized temporary (weight decay).

peak = parameters + optimizer state + input batch + max over the backward walk and the optimizer step. The saved
bytes are exact for the layer types above (checked against `measure_saved_bytes` in tests and in every
`benchmarks/bench_memory.py` row); the peak is a model of the allocator-free live bytes, so a caching allocator (its
rounding, cuDNN workspaces) or CPU malloc adds on top of it.

Supported: `fastresnet.models.ResNet` with full pre-activation units and additive merges (the zoo's preact_* nets, any
shortcut), fused or as their eager twin (`fastresnet.unconvert`); other networks raise ValueError.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastresnet import recompute
from fastresnet.nn.layers import BNReLU2d, PreActConv2d
from fastresnet.nn.shortcuts import Projection, ZeroPadShortcut

DTYPES = {"fp32": (4, 4), "bf16": (2, 4)}  # activation bytes, parameter bytes (bf16: autocast over fp32 parameters)
STAT_BYTES = 4  # BN statistics are fp32 in every precision here
Shape = Tuple[int, int, int, int]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass
class Layer:
    """One step of the walk: what its forward saves, the gradients its backward produces, its backward working set,
    and the unit it belongs to (None for the stem and head)."""
    saved: int
    grads: int
    work: int
    unit: Optional[int] = None
    # the part of `saved` that is the unit input x_l (kept anyway in recomputation) and the per-channel statistics
    input_bytes: int = 0
    stat_bytes: int = 0
    one_op: bool = False  # part of a unit that runs as one op: its statistics never enter a recomputation tape


@dataclass
class MemoryPlan:
    """Predicted bytes of one training step (module docstring). `saved_bytes`: activations saved for backward at
    the end of the forward; `transient_bytes`: the most the step holds on top of parameters, optimizer state, input
    and saved activations (gradients included); `peak_bytes`: the whole."""
    batch: int
    image_size: int
    dtype: str
    checkpoint: str
    segment_size: Optional[int]
    eager: bool
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    input_bytes: int
    saved_bytes: int
    transient_bytes: int
    peak_bytes: int
    breakdown: Dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


class _Walker:
    """Shape walk of one training forward, producing `Layer` records."""

    def __init__(self, act: int, param: int, autocast: bool):
        self.act, self.param, self.autocast = act, param, autocast
        self.layers: List[Layer] = []

    def _weight_copy(self, w: Tensor) -> int:
        return w.numel() * self.act if self.autocast else 0  # autocast saves the low-precision weight copy

    def _grads(self, module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters()) * self.param

    def conv(self, conv: nn.Conv2d, shape: Shape, saves_input: bool = True) -> Shape:
        n, _, h, w = shape
        kh, kw = conv.kernel_size
        (sh, sw), (ph, pw) = conv.stride, conv.padding
        out = (n, conv.out_channels, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)
        return out, _numel(shape) * self.act * saves_input + self._weight_copy(conv.weight), _numel(out) * self.act

    def preact_conv(self, layer: nn.Module, shape: Shape, unit: Optional[int], eager: bool,
                    one_op: bool = False) -> Shape:
        """A fused `PreActConv2d` (saves its input and (mean, rstd)) or its eager Sequential(bn, relu, conv)
        (also the ReLU output, which the conv saves too)."""
        conv = layer.conv
        stats = 2 * shape[1] * STAT_BYTES
        out, w_copy, out_bytes = self.conv(conv, shape, saves_input=False)
        x_bytes = _numel(shape) * self.act
        saved = x_bytes + stats + w_copy + (x_bytes if eager else 0)
        self.layers.append(Layer(saved, self._grads(layer), out_bytes + 3 * x_bytes, unit, x_bytes, stats, one_op))
        return out

    def bn_relu(self, shape: Shape, module: nn.Module, unit: Optional[int], eager: bool,
                one_op: bool = False) -> int:
        """A fused `BNReLU2d` (saves x, (mean, rstd)) or eager BN → ReLU (also the output); returns the bytes of the
        activation it produces."""
        x_bytes, stats = _numel(shape) * self.act, 2 * shape[1] * STAT_BYTES
        saved = x_bytes + stats + (x_bytes if eager else 0)
        self.layers.append(Layer(saved, self._grads(module), 3 * x_bytes, unit, x_bytes, stats, one_op))
        return x_bytes

    def unit(self, u: nn.Module, shape: Shape, index: int, eager: bool) -> Shape:
        one_op = not eager and u.one_op() is not None  # `ResidualUnit.one_op`: the unit saves x, not activations
        if u.share_preact:
            a_bytes = self.bn_relu(shape, u.preact, index, eager, one_op)
            # conv1 and a projection shortcut both read the activation a: eager, the ReLU saved it; per-layer fused,
            # conv1 saves it (the projection saves the same storage); one op, it is recomputed from x
            y, w_copy, out_bytes = self.conv(u.conv1, shape, saves_input=False)
            saved = (0 if eager or one_op else a_bytes) + w_copy
            self.layers.append(Layer(saved, self._grads(u.conv1), out_bytes + 2 * a_bytes, index, one_op=one_op))
            self.shortcut(u.shortcut, shape, index)
            first = 2
        else:
            self.shortcut(u.shortcut, shape, index)
            y, first = shape, 1
        for i in range(first, u.num_layers + 1):
            y = self.preact_conv(getattr(u, f"conv{i}"), y, index, eager, one_op)
        return y

    def shortcut(self, sc: nn.Module, shape: Shape, index: int) -> None:
        if isinstance(sc, Projection):
            out, w_copy, out_bytes = self.conv(sc[0], shape, saves_input=False)  # its input a is saved by conv1
            saved = w_copy + (out_bytes + 2 * out[1] * STAT_BYTES if len(sc) > 1 else 0)  # BN: input, mean, invstd
            self.layers.append(Layer(saved, self._grads(sc), 2 * out_bytes, index))
        elif not isinstance(sc, (nn.Identity, ZeroPadShortcut)):
            raise ValueError(f"model: the planner knows identity, zero-pad and projection shortcuts, got "
                             f"{type(sc).__name__}")

    def stem(self, stem: nn.Sequential, shape: Shape) -> Shape:
        conv = stem[0]
        out, w_copy, out_bytes = self.conv(conv, shape, saves_input=False)
        img = _numel(shape) * self.act  # the image itself (fp32), or its bf16 copy under autocast
        pool_saved = 0
        for m in list(stem)[1:]:
            if isinstance(m, nn.MaxPool2d):  # saves its input and int64 indices of its output
                n, c, h, w = out
                k, s, p = m.kernel_size, m.stride, m.padding
                pooled = (n, c, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
                pool_saved = out_bytes + _numel(pooled) * 8
                out, out_bytes = pooled, _numel(pooled) * self.act
            elif not isinstance(m, nn.Identity):
                raise ValueError(f"model: the planner knows full pre-activation stems, got {type(m).__name__}")
        self.layers.append(Layer(img + w_copy + pool_saved, self._grads(stem), 3 * out_bytes))
        return out

    def head(self, model: nn.Module, shape: Shape, eager: bool, num_classes: int) -> None:
        self.bn_relu(shape, model.head_act, None, eager)
        n, c = shape[0], shape[1]
        # the pool is a mean (saves nothing); the FC saves its input (and its weight copy under autocast); the loss
        # saves fp32 log-probabilities and the int64 targets
        saved = n * c * self.act + self._weight_copy(model.fc.weight) + n * num_classes * 4 + n * 8
        self.layers.append(Layer(saved, self._grads(model.fc), 3 * n * c * self.act))


def _check_model(model: nn.Module) -> bool:
    """Whether `model` is a supported net (module docstring); returns True for an eager twin."""
    units = getattr(model, "units", None)
    if units is None or getattr(model, "variant", None) != "full_preact" or not units \
            or not all(u.variant == "full_preact" and u.merge_kind == "add" for u in units):
        raise ValueError("model: the planner supports fastresnet ResNets of full pre-activation units with additive "
                         f"merges (the zoo's preact_* nets), got {type(model).__name__}")
    fused = any(isinstance(m, (PreActConv2d, BNReLU2d)) for m in model.modules())
    return not fused


def _segments(n_units: int, checkpoint: str, segment_size: Optional[int]) -> List[List[int]]:
    if checkpoint == "none":
        return []
    size = recompute.segment_size(checkpoint, n_units, segment_size)
    return [list(range(s, min(s + size, n_units))) for s in range(0, n_units, size)]


def plan(model: nn.Module, batch: int, image_size: int = 32, dtype: str = "fp32", checkpoint: Optional[str] = None,
         segment_size: Optional[int] = None, optimizer_states: int = 1) -> MemoryPlan:
    """Predicted memory of one training step of `model` (forward, backward, optimizer step) at `batch` images of
    `image_size`² (module docstring). `checkpoint`/`segment_size`: default the model's own (`ResNet.set_checkpoint`).
    `dtype`: "fp32", or "bf16" (autocast over fp32 parameters). `optimizer_states`: parameter-sized optimizer
    buffers (1: SGD with momentum)."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected a positive int, got {batch!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size: expected a positive int, got {image_size!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
    if optimizer_states < 0:
        raise ValueError(f"optimizer_states: expected >= 0, got {optimizer_states}")
    eager = _check_model(model)
    checkpoint = model.checkpoint if checkpoint is None else checkpoint
    segment_size = model.segment_size if segment_size is None and checkpoint == model.checkpoint else segment_size
    if checkpoint not in recompute.MODES:
        raise ValueError(f"checkpoint: expected one of {recompute.MODES}, got {checkpoint!r}")
    if eager and checkpoint != "none":
        raise ValueError("checkpoint: the planner models recomputation for fused nets only (an eager twin "
                         "recomputes its BatchNorm statistics too); use checkpoint='none'")
    act, param = DTYPES[dtype]
    walker = _Walker(act, param, dtype != "fp32")
    shape: Shape = (batch, 3, image_size, image_size)
    shape = walker.stem(model.stem, shape)
    for i, u in enumerate(model.units):
        shape = walker.unit(u, shape, i, eager)
    walker.head(model, shape, eager, model.fc.out_features)
    layers = walker.layers
    segments = _segments(len(model.units), checkpoint, segment_size)
    kept = _kept_bytes(layers, segments)

    params = sum(p.numel() for p in model.parameters()) * param
    input_bytes = batch * 3 * image_size * image_size * 4 + batch * 8
    saved = sum(lay.saved for lay in layers if lay.unit is None or not segments) + sum(kept.values())
    backward_peak = _backward_walk(layers, segments, kept, saved)
    optimizer_peak = 2 * params  # the gradients and one parameter-sized temporary (weight decay)
    step_peak = max(backward_peak, optimizer_peak, saved)
    optimizer = optimizer_states * params
    return MemoryPlan(batch, image_size, dtype, checkpoint, segment_size if checkpoint == "segment" else None,
                      eager, params, params, optimizer, input_bytes, saved, step_peak - saved,
                      params + optimizer + input_bytes + step_peak,
                      {"backward_peak": backward_peak, "optimizer_step_peak": optimizer_peak,
                       "segments": len(segments)})


def _kept_bytes(layers: List[Layer], segments: List[List[int]]) -> Dict[int, int]:
    """Per recomputed segment (keyed by its index): what it keeps, x_l, the statistics of x_l it was handed and its
    statistics tape (the per-layer units' (mean, rstd); a one-op unit records none). Handed: (mean, var), or the
    var only when the first BN is per-layer (its tape entry holds the mean's storage); the first unit gets none."""
    kept = {}
    for s, units in enumerate(segments):
        mine = [lay for lay in layers if lay.unit in units]
        first_input = next(lay.input_bytes for lay in mine if lay.input_bytes)
        vector = mine[0].stat_bytes // 2  # one [C] statistics vector of x_l
        handed = 0 if units[0] == 0 else vector * (2 if mine[0].one_op else 1)
        kept[s] = first_input + handed + sum(lay.stat_bytes for lay in mine if not lay.one_op)
    return kept


def _backward_walk(layers: List[Layer], segments: List[List[int]], kept: Dict[int, int], saved: int) -> int:
    """The most bytes live during backward (beyond parameters, optimizer state and input): saved activations not
    yet released + gradients produced so far + the current layer's working set. Entering a recomputed segment
    (from its last layer), the replay brings back what "none" saves for its layers less what the segment kept (x_l
    and the statistics are the same storages); each layer's backward then releases its share."""
    seg_of = {u: s for s, units in enumerate(segments) for u in units}
    live, grads, peak, entered = saved, 0, saved, set()
    for lay in reversed(layers):
        s = seg_of.get(lay.unit)
        if s is not None and s not in entered:
            entered.add(s)
            live += sum(x.saved for x in layers if seg_of.get(x.unit) == s) - kept[s]
        peak = max(peak, live + grads + lay.work)
        live -= lay.saved
        grads += lay.grads
    return peak


def largest_batch(model: nn.Module, budget_bytes: int, image_size: int = 32, dtype: str = "fp32",
                  checkpoint: Optional[str] = None, segment_size: Optional[int] = None, optimizer_states: int = 1,
                  limit: int = 1 << 20) -> int:
    """The largest batch whose planned peak fits `budget_bytes` (0 if not even batch 1 fits; at most `limit`). The
    planned peak grows with the batch, so doubling then bisection finds it."""
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes: expected a positive number of bytes, got {budget_bytes}")

    def fits(b: int) -> bool:
        return plan(model, b, image_size, dtype, checkpoint, segment_size, optimizer_states).peak_bytes <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def measure_saved_bytes(model: nn.Module, x: Tensor, target: Tensor,
                        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> Tuple[int, int]:
    """(activation bytes, all bytes) autograd saves for backward during `loss_fn(model(x), target)`: distinct
    storages packed by `torch.autograd.graph.saved_tensors_hooks`; activation bytes leave out the model's own
    parameters and buffers (they exist whether saved or not). Runs the forward once (in the model's current mode,
    under the caller's autocast) and the backward, so running statistics advance as in a training step."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages: Dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(x), target)
    loss.backward()
    return sum(v for k, v in storages.items() if k not in own), sum(storages.values())


def proc_status_bytes(field: str) -> int:
    """A memory line of Linux's /proc/self/status ("VmRSS": resident now, "VmHWM": its high-water mark), in
    bytes."""
    with open("/proc/self/status") as f:
        line = next((ln for ln in f if ln.startswith(field + ":")), None)
    if line is None:
        raise ValueError(f"field: /proc/self/status has no {field!r} line")
    return int(line.split()[1]) * 1024  # kB


def process_peak_rss() -> int:
    """The peak resident memory of this process so far (VmHWM), the CPU's counterpart of
    torch.cuda.max_memory_allocated (it includes the interpreter, libraries and allocator caches)."""
    return proc_status_bytes("VmHWM")


def measure_peak_live_bytes(fn: Callable[[], object]) -> int:
    """The most bytes of tensor memory allocated during `fn()` and alive at once (CPU or CUDA), from the profiler's
    allocation events ("Total Allocated" of its memory records, counted from the start of profiling: memory that
    existed before is not included). On CPU this is the counterpart of torch.cuda.max_memory_allocated, free of
    malloc's caching; the profiler slows `fn` down."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    records = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not records:
        raise RuntimeError("fn: the profiler recorded no allocation")
    # the running total may carry bytes of an earlier profiling session of this process: measure from fn's start
    baseline = records[0]["Total Allocated"] - records[0]["Bytes"]
    return max(r["Total Allocated"] for r in records) - baseline

