"""Drop-in conversion of existing PyTorch models to fused fastresnet layers, and back.

`convert(model)` finds BatchNorm2d → ReLU → Conv2d chains and replaces each with one `PreActConv2d`; a
BatchNorm2d → ReLU whose activation has other readers (e.g. a pre-activated projection shortcut and the residual
branch) becomes one `BNReLU2d`. Chains are found with torch.fx: each module that holds a BatchNorm2d (directly or in
nn.Sequential children) is traced with every non-Sequential child as a leaf, so chains in forward code
(`self.conv(F.relu(self.bn(x)))`, `torch.relu`, `x.relu()`, `nn.ReLU` modules) and in Sequentials are both found.

What changes in a converted module (its "owner"):
- the conv's slot holds the `PreActConv2d`, whose `.bn` and `.conv` are the original BatchNorm2d and Conv2d objects
  (so with `inplace=True` an optimizer built before conversion still holds the right Parameters); the BN's slot holds
  None (nn.Identity inside an nn.Sequential), a Sequential ReLU slot nn.Identity;
- a BN fused alone is replaced in its own slot by a `BNReLU2d` (a BatchNorm2d subclass, same keys) sharing its tensors;
- a non-Sequential owner gets a subclass of its class whose `forward` is the rewritten FX code, so its other methods
  and attributes stay; `unconvert` restores the original class;
- state-dict hooks on the owner translate keys, so `state_dict()` has exactly the original keys in the original order
  and `load_state_dict` accepts them: `fused.load_state_dict(original.state_dict())` and the reverse both work.
  `named_parameters()` shows the fused layout (`conv1.bn.weight` for `bn1.weight`).

Why BN → ReLU alone is fused too: `BNReLU2d` is one kernel (read x, write a) instead of two (BN writes z, ReLU reads z
and writes a), half the memory traffic of that step, with the same saved tensors and the same state-dict keys.

Also recognised: timm's `BatchNormAct2d` (BN, a no-op `drop`, an `nn.ReLU` `act`; same state-dict keys as a
BatchNorm2d) as BN → ReLU, and `nn.Identity` modules between BN, ReLU and conv (timm resnet's `drop_block`, `aa`).

Branches: the rewritten forward is one trace of the original; `_Guards` records what that trace assumed besides
tensor values (plain attributes read, isinstance tests of the arguments, arguments not None) and while any of it
differs, a call runs the original forward with the original modules put back for that call (torchvision's
`_DenseLayer` taking a Tensor instead of a list, timm's `grad_checkpointing`). docs/convert.md lists what is not seen.

FLOP counters: FlopCounterMode counts the fused ops like the eager layers (fastresnet/ops/flops.py); for fvcore or
ptflops, which cannot see inside the fused ops, count `unconvert(model)` (same arithmetic).

Inputs that are not eager Python modules:
- an `fx.GraphModule` (`torch.fx.symbolic_trace` output) is converted from its graph: the chains are found under its
  bare `nn.Module` containers as in any module, and its graph is replaced by the fused one and recompiled (no guards:
  a graph has no Python branches). `copy.deepcopy` keeps the conversion (fx rebuilds the copy from the new graph);
  `unconvert` puts the original graph back.
- a TorchScript module (`torch.jit.script` / `torch.jit.trace` output, or such a submodule) is left unchanged: its
  forward is compiled TorchScript, not Python code torch.fx can rewrite. It is listed in `report.untraced` and a
  `UserWarning` names it. Convert the eager module instead; the converted model can then be traced
  (`torch.jit.trace`) but not scripted (the fused layers' Python code is not TorchScript).

Chains that cannot be proved equivalent are left alone and listed in the report with the reason. Limitations: only
`forward` is rewritten (other methods that call a fused BN see None); whole-module pickling (`torch.save(model)`) of a
converted non-Sequential owner is unsupported (save the state dict); a forward that branches on `self.training` or
that torch.fx cannot trace is left alone and reported.
"""
from __future__ import annotations

import builtins
import contextlib
import copy
import functools
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from fastresnet.backends import BACKEND_NAMES
from fastresnet.nn.layers import BNReLU2d, PreActConv2d

__all__ = ["BatchNormReLU2d", "ConversionReport", "ConversionResult", "FusedChain", "SkippedChain", "convert", "unconvert"]

_RELU_FUNCTIONS = {F.relu: "F.relu", torch.relu: "torch.relu", torch.relu_: "torch.relu_", F.relu_: "F.relu_"}
_RELU_METHODS = ("relu", "relu_")
# nn.Module's own bookkeeping in an instance __dict__ (training, _parameters, hook dicts, ...): not configuration
_MODULE_STATE = frozenset(nn.Module().__dict__)
_NO_DEFAULT = object()
SCRIPTED_REASON = ("a TorchScript module (torch.jit.script / torch.jit.trace): its forward is compiled TorchScript, "
                   "not Python code torch.fx can rewrite; convert the eager module, then trace the result")
_RECORD = "_fastresnet_conversion"          # the attribute of a converted owner holding its `_Conversion`
_FX_PRESERVED = "_user_preserved_attributes"   # fx.GraphModule.meta key: attributes its deepcopy sets again


# ---- report ---------------------------------------------------------------------------------------------------------
@dataclass
class FusedChain:
    """One replaced chain; paths are relative to the converted model ("" = the model itself)."""
    module: str                 # the owner whose forward holds the chain
    bn: str                     # the BatchNorm2d's path
    relu: str                   # how the ReLU was written: "nn.ReLU layer1.relu", "F.relu", "x.relu()", ...
    conv: Optional[str]         # the Conv2d's path (None for a BN → ReLU fused alone)
    replacement: str            # "PreActConv2d" or "BNReLU2d"


@dataclass
class SkippedChain:
    """A BatchNorm2d left alone, and why."""
    module: str
    bn: str
    reason: str


@dataclass
class ConversionReport:
    """What `convert` did: fused chains, BNs it left alone (with reasons), modules it could not trace."""
    fused: List[FusedChain] = field(default_factory=list)
    skipped: List[SkippedChain] = field(default_factory=list)
    untraced: Dict[str, str] = field(default_factory=dict)   # owner path -> why torch.fx could not rewrite it

    @property
    def num_preact(self) -> int:
        return sum(c.replacement == "PreActConv2d" for c in self.fused)

    @property
    def num_bn_relu(self) -> int:
        return sum(c.replacement == "BNReLU2d" for c in self.fused)

    def __str__(self) -> str:
        if not (self.fused or self.skipped or self.untraced):
            return "convert: no BatchNorm2d → ReLU (→ Conv2d) chain found; the model is unchanged"
        lines = [f"convert: {self.num_preact} PreActConv2d, {self.num_bn_relu} BNReLU2d, "
                 f"{len(self.skipped)} BatchNorm2d left alone, {len(self.untraced)} module(s) not traceable"]
        lines += [f"  fused  {c.bn} → {c.relu}" + (f" → {c.conv}" if c.conv else "") + f"  => {c.replacement}"
                  for c in self.fused]
        lines += [f"  kept   {s.bn}: {s.reason}" for s in self.skipped]
        lines += [f"  untraced {p or '<model>'}: {r}" for p, r in self.untraced.items()]
        return "\n".join(lines)


class ConversionResult(NamedTuple):
    """`model, report = convert(...)`, or `.model` / `.report`."""
    model: nn.Module
    report: ConversionReport


# ---- bookkeeping on a converted owner ------------------------------------------------------------------------------
class _KeyMap:
    """State-dict hooks of an owner: fused local keys <-> the original local keys (and module metadata paths)."""

    def __init__(self):
        self.fused_to_plain: Dict[str, str] = {}
        self.plain_to_fused: Dict[str, str] = {}
        self.module_paths: Dict[str, Optional[str]] = {}   # fused module path -> original path (None: drop)

    def add(self, fused_prefix: str, plain_prefix: str, local_keys) -> None:
        for k in local_keys:
            self.fused_to_plain[f"{fused_prefix}.{k}"] = f"{plain_prefix}.{k}"
            self.plain_to_fused[f"{plain_prefix}.{k}"] = f"{fused_prefix}.{k}"
        self.module_paths[fused_prefix] = plain_prefix

    def save(self, module, state_dict, prefix, local_metadata) -> None:
        """state_dict post-hook: rename this owner's fused keys in place, keeping the order."""
        items = list(state_dict.items())
        state_dict.clear()
        for k, v in items:
            if k.startswith(prefix):
                k = prefix + self.fused_to_plain.get(k[len(prefix):], k[len(prefix):])
            state_dict[k] = v
        meta = getattr(state_dict, "_metadata", None)
        if meta is not None:
            entries = list(meta.items())
            meta.clear()
            for k, v in entries:
                local = k[len(prefix):] if k.startswith(prefix) else None
                if local is not None and local in self.module_paths:
                    if self.module_paths[local] is None:
                        continue
                    k = prefix + self.module_paths[local]
                meta[k] = v

    def load(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
             error_msgs) -> None:
        """load_state_dict pre-hook: original keys -> fused keys before this owner's children load."""
        for k in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] in self.plain_to_fused]:
            state_dict[prefix + self.plain_to_fused[k[len(prefix):]]] = state_dict.pop(k)


@dataclass
class _Conversion:
    """Stored on a converted owner as `_fastresnet_conversion`: the slots it changed, as (path, original module,
    fused module) in the order changed, so `unconvert` (for good) and a guarded forward's fallback (for one call)
    can put the original modules back."""
    original_class: type
    slots: List[Tuple[str, Optional[nn.Module], Optional[nn.Module]]] = field(default_factory=list)
    original_graph: Optional[fx.Graph] = None     # an fx.GraphModule owner's graph before the rewrite
    keymap: _KeyMap = field(default_factory=_KeyMap)
    handles: list = field(default_factory=list)

    def change(self, owner: nn.Module, path: str, fused: Optional[nn.Module]) -> None:
        """Put `fused` in owner's slot `path`, remembering what was there."""
        self.slots.append((path, owner.get_submodule(path), fused))
        _set(owner, path, fused)

    def restore(self, owner: nn.Module) -> None:
        """The original modules back in their slots, holding the fused layers' current tensors."""
        for path, original, fused in reversed(self.slots):
            if isinstance(fused, BNReLU2d):   # shares tensors with original; re-point in case they were replaced
                original._parameters.update(fused._parameters)
                original._buffers.update(fused._buffers)
                original.train(fused.training)
            _set(owner, path, original)

    def refuse(self, owner: nn.Module) -> None:
        """The fused modules back in their slots (after `restore`)."""
        for path, original, fused in self.slots:
            _set(owner, path, fused)


@dataclass(frozen=True)
class _Guards:
    """What the trace of an owner's forward took for granted besides tensor values; the rewritten forward runs only
    while all of it holds, else the original forward runs with the original modules (`_guarded`).

    - attrs: plain attributes of the owner its forward read (configuration such as `grad_checkpointing`,
      `drop_rate`, `memory_efficient`) with their values then: scalars and tuples compared by value, other objects
      by identity;
    - params: forward's arguments (position, name, default); the trace stood a tensor proxy in for each, so any
      `arg is None` test was answered "not None": an argument that is None (or left at a None default) falls back;
    - types: isinstance(argument, cls) tests made by forward's code, with the answers the trace got (False for a
      Tensor class: a proxy is not a Tensor), e.g. torchvision's `_DenseLayer` taking a Tensor or a list.
    """
    attrs: Tuple[Tuple[str, Any, bool], ...]      # (name, value, compared by value)
    params: Tuple[Tuple[int, str, Any], ...]
    types: Tuple[Tuple[int, type, bool], ...]

    def hold(self, owner: nn.Module, args: tuple, kwargs: dict) -> bool:
        for name, value, by_value in self.attrs:
            now = getattr(owner, name)
            if not (now is value or (by_value and type(now) is type(value) and now == value)):
                return False
        values = [args[i] if i < len(args) else kwargs.get(name, default) for i, name, default in self.params]
        if any(v is None for v in values):
            return False
        return all(isinstance(values[i], cls) == answer for i, cls, answer in self.types)


def _guarded(fused_forward, guards: _Guards):
    """The forward of a rewritten owner: the fused code while `guards` hold, else (another branch of the original
    code) the original forward with the original modules in their slots for this one call."""

    def forward(self, *args, **kwargs):
        if guards.hold(self, args, kwargs):
            return fused_forward(self, *args, **kwargs)
        record: _Conversion = self._fastresnet_conversion
        record.restore(self)
        try:
            return record.original_class.forward(self, *args, **kwargs)
        finally:
            record.refuse(self)

    return forward


# ---- module-tree helpers -------------------------------------------------------------------------------------------
def _split(path: str) -> Tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


def _set(owner: nn.Module, path: str, module: Optional[nn.Module]) -> None:
    """Put module (or None) in the existing slot `path` of owner, keeping the slot's position."""
    parent, name = _split(path)
    owner.get_submodule(parent)._modules[name] = module


def _vacancy(owner: nn.Module, path: str) -> Optional[nn.Module]:
    """What fills a slot whose work moved into a fused layer: nn.Identity inside a Sequential, else None (a later
    call of the old attribute fails loudly instead of silently skipping BN)."""
    return nn.Identity() if isinstance(owner.get_submodule(_split(path)[0]), nn.Sequential) else None


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _bn_relu_from(bn: nn.BatchNorm2d, backend: Optional[str]) -> BNReLU2d:
    """A BNReLU2d sharing bn's Parameter and buffer objects (built on the meta device, then re-pointed)."""
    new = BNReLU2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, backend=backend,
                   device="meta")
    new._parameters.update(bn._parameters)
    new._buffers.update(bn._buffers)
    return new.train(bn.training)


class BatchNormReLU2d(nn.BatchNorm2d):
    """Eager PyTorch BatchNorm2d followed by ReLU (two ATen ops, the BN output kept for ReLU's backward): what
    `unconvert` turns a native `BNReLU2d` into, with the same state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


def _bn_from(layer: BNReLU2d, cls: type) -> nn.BatchNorm2d:
    """The inverse of `_bn_relu_from`: a `cls` (a BatchNorm2d class, e.g. BatchNormReLU2d) sharing layer's tensors."""
    bn = cls(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats, device="meta")
    bn._parameters.update(layer._parameters)
    bn._buffers.update(layer._buffers)
    return bn.train(layer.training)


def _float_tensors(m: nn.Module) -> List[torch.Tensor]:
    return [t for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)) if t.is_floating_point()]


def _conv_problem(conv: nn.Module) -> Optional[str]:
    if type(conv) is not nn.Conv2d:
        return f"next layer is {type(conv).__name__}, not nn.Conv2d"
    if conv.bias is not None:
        return "conv has a bias (PreActConv2d convs are bias-free)"
    if conv.groups != 1:
        return f"conv groups={conv.groups} (only 1 is supported)"
    if tuple(conv.dilation) != (1, 1):
        return f"conv dilation={conv.dilation} (only 1 is supported)"
    if isinstance(conv.padding, str):
        return f"conv padding={conv.padding!r} (string padding is unsupported; give explicit ints)"
    if conv.padding_mode != "zeros":
        return f"conv padding_mode={conv.padding_mode!r} (only 'zeros' is supported)"
    return None


# ---- tracing ---------------------------------------------------------------------------------------------------------
class _ChildTracer(fx.Tracer):
    """Every module except the root and nn.Sequential containers is a leaf: the graph shows the owner's own code."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not isinstance(m, nn.Sequential)


def _is_container(m: nn.Module) -> bool:
    """Whether m only holds modules for its owner's code: an nn.Sequential (inlined by the tracer) or a bare
    nn.Module, which has no forward to call (the submodule tree of an fx.GraphModule is made of those)."""
    return isinstance(m, nn.Sequential) or type(m) is nn.Module


def _leaves(owner: nn.Module, prefix: str = ""):
    """(path, module) of the tracer's leaves under owner: children, looking inside containers (`_is_container`)."""
    for name, child in owner._modules.items():
        if child is None:
            continue
        if _is_container(child):
            yield from _leaves(child, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", child


def _by_value(value: Any) -> bool:
    """Whether a guard compares this attribute value by value (scalars, tuples of them) rather than by identity."""
    if isinstance(value, tuple):
        return all(_by_value(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


@contextlib.contextmanager
def _recording(owner: nn.Module) -> Iterator[Tuple[Dict[str, Any], List[Tuple[fx.Node, type, bool]]]]:
    """While owner's forward is traced, record what the trace decides outside the graph: the owner's plain
    attributes read (`attrs`, name -> value) and isinstance tests on traced values made by code outside torch
    (`checks`, (node, cls, answer)). The owner's class is swapped for a recording subclass and `builtins.isinstance`
    for a recording wrapper for the duration of the trace only."""
    attrs: Dict[str, Any] = {}
    checks: List[Tuple[fx.Node, type, bool]] = []
    cls, real_isinstance = type(owner), builtins.isinstance

    def __getattribute__(self, name):
        value = super(recorder, self).__getattribute__(name)
        if name not in _MODULE_STATE and name in object.__getattribute__(self, "__dict__"):
            attrs.setdefault(name, value)
        return value

    def recording_isinstance(obj, classes):
        answer = real_isinstance(obj, classes)
        if issubclass(type(obj), fx.Proxy) and \
                not sys._getframe(1).f_globals.get("__name__", "").startswith("torch."):
            checks.append((obj.node, classes, answer))
        return answer

    recorder = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__module__": cls.__module__})
    owner.__class__, builtins.isinstance = recorder, recording_isinstance
    try:
        yield attrs, checks
    finally:
        owner.__class__, builtins.isinstance = cls, real_isinstance


def _guards(graph: fx.Graph, attrs: Dict[str, Any], checks) -> _Guards:
    """The `_Guards` of a traced forward, or _Untraceable when the trace rests on something no guard can check."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if any(n.target.startswith("*") for n in placeholders):
        raise _Untraceable("forward takes *args / **kwargs (its arguments cannot be guarded)")
    position = {n: i for i, n in enumerate(placeholders)}
    types = []
    for node, classes, answer in checks:
        if node not in position:
            raise _Untraceable(f"forward tests the type of an intermediate value (isinstance(..., {classes})), "
                               "which the trace answers once for all inputs")
        types.append((position[node], classes, answer))
    params = tuple((i, n.target, n.args[0] if n.args else _NO_DEFAULT) for i, n in enumerate(placeholders))
    return _Guards(tuple((k, v, _by_value(v)) for k, v in attrs.items()), params, tuple(dict.fromkeys(types)))


def _trace(owner: nn.Module) -> Tuple[fx.Graph, _Guards]:
    """The owner's forward graph, checked to be the same in train and eval mode (else it branches on the mode), and
    the guards under which it stands for the original forward."""
    modes = {m: m.training for m in owner.modules()}
    try:
        codes, graphs = [], []
        with _recording(owner) as (attrs, checks):
            for training in (True, False):
                owner.train(training)
                graph = _ChildTracer().trace(owner)
                graphs.append(graph)
                codes.append(graph.python_code("self").src)
    finally:
        for m, training in modes.items():
            m.training = training
    if codes[0] != codes[1]:
        raise _Untraceable("forward differs between train and eval mode (it branches on self.training)")
    # both traces recorded; keep the checks made on the first trace's nodes (the second repeats them)
    return graphs[0], _guards(graphs[0], attrs, [c for c in checks if c[0].graph is graphs[0]])


class _Untraceable(Exception):
    pass


def _relu_kind(node: fx.Node, owner: nn.Module, full) -> Optional[str]:
    """How node applies a ReLU to its first argument, or None if it is not a plain ReLU."""
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS and len(node.args) == 1:
        if set(node.kwargs) <= {"inplace"}:
            return _RELU_FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in _RELU_METHODS and len(node.args) == 1 and not node.kwargs:
        return f"x.{node.target}()"
    if node.op == "call_module" and type(owner.get_submodule(node.target)) is nn.ReLU and len(node.args) == 1:
        return f"nn.ReLU {full(node.target)}"
    return None


def _describe(node: fx.Node, owner: nn.Module) -> str:
    if node.op == "call_module":
        return f"{type(owner.get_submodule(node.target)).__name__} {node.target}"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)}()"
    return "the module output" if node.op == "output" else node.op


def _timm_bn_act() -> Optional[type]:
    """timm's BatchNormAct2d class if timm is loaded (a model holding one has imported it), else None: timm is
    never imported here."""
    return getattr(sys.modules.get("timm.layers.norm_act"), "BatchNormAct2d", None)


def _bn_kind(m: nn.Module) -> Optional[str]:
    """"bn" for a plain nn.BatchNorm2d, "bn_act" for timm's BatchNormAct2d (BN, then its `drop`, then its `act`,
    same state-dict keys as a BatchNorm2d) or a subclass that keeps its forward, else None."""
    if type(m) is nn.BatchNorm2d:
        return "bn"
    bn_act = _timm_bn_act()
    if bn_act is not None and isinstance(m, bn_act) and type(m).forward is bn_act.forward:
        return "bn_act"
    return None


def _bn_act_problem(m: nn.Module) -> Optional[str]:
    """Why a BatchNormAct2d is not BN → ReLU (its drop must be a no-op, its act an nn.ReLU), or None."""
    name = type(m).__name__
    if type(m.drop) is not nn.Identity:
        return f"{name}.drop is {type(m.drop).__name__}, not nn.Identity"
    if type(m.act) is not nn.ReLU:
        return f"{name}.act is {type(m.act).__name__}, not nn.ReLU"
    if _has_hooks(m.drop) or _has_hooks(m.act):
        return f"{name}.drop or .act has hooks, which a fused layer would bypass"
    return None


def _through_noops(node: fx.Node, owner: nn.Module) -> Tuple[fx.Node, List[fx.Node]]:
    """Follow node's single reader through no-op modules (nn.Identity without hooks, called with one argument, e.g.
    timm's drop_block / aa slots when unused): (the last node reached, the no-op nodes passed)."""
    passed = []
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_module" or len(user.args) != 1 or user.kwargs:
            break
        m = owner.get_submodule(user.target)
        if type(m) is not nn.Identity or _has_hooks(m):
            break
        passed.append(user)
        node = user
    return node, passed


def _conv_after(relu: fx.Node, owner: nn.Module, bn: nn.Module, calls, registrations):
    """(conv node, conv module, no-op nodes between) if relu's output goes only to a Conv2d that can take the fused
    BN-ReLU, else (None, None, reason) — BN → ReLU is then fused alone."""
    last, noops = _through_noops(relu, owner)
    users = list(last.users)
    if len(users) != 1:
        return None, None, f"ReLU output has {len(users)} users"
    conv_node = users[0]
    if conv_node.op != "call_module":
        return None, None, "ReLU output does not go to a Conv2d module"
    conv = owner.get_submodule(conv_node.target)
    why = _conv_problem(conv)
    if why is None and (len(conv_node.args) != 1 or conv_node.kwargs):
        why = "conv called with extra arguments"
    elif why is None and (calls[conv_node.target] > 1 or registrations[id(conv)] > 1):
        why = "conv module is shared (called or registered more than once)"
    elif why is None and _has_hooks(conv):
        why = "conv has hooks, which a fused layer would bypass"
    elif why is None and {(t.dtype, t.device) for t in _float_tensors(bn)} - {(conv.weight.dtype, conv.weight.device)}:
        why = "BN and conv tensors differ in dtype or device"
    return (None, None, why) if why is not None else (conv_node, conv, noops)


# ---- the rewrite of one owner -------------------------------------------------------------------------------------
def _rewrite(owner: nn.Module, graph: fx.Graph, guards: _Guards, path: str, backend: Optional[str],
             report: ConversionReport, registrations: Dict[int, int]) -> None:
    """Fuse the chains of owner's traced forward `graph`, mutating owner (see the module docstring)."""
    calls: Dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    record = _Conversion(type(owner))
    full = (lambda p: f"{path}.{p}" if path else p)
    graph_changed = False

    for node in list(graph.nodes):
        kind = _bn_kind(owner.get_submodule(node.target)) if node.op == "call_module" else None
        if kind is None:
            continue
        bn_path, bn = node.target, owner.get_submodule(node.target)

        def skip(reason: str) -> None:
            report.skipped.append(SkippedChain(path, full(bn_path), reason))

        if len(node.args) != 1 or node.kwargs:
            skip(f"{type(bn).__name__} called with extra arguments"); continue
        if calls[bn_path] > 1 or registrations[id(bn)] > 1:
            skip(f"{type(bn).__name__} module is shared (called or registered more than once)"); continue
        if _has_hooks(bn):
            skip(f"{type(bn).__name__} has forward/backward hooks, which a fused layer would bypass"); continue
        relu_slot = relu_mod = None
        noops: List[fx.Node] = []
        if kind == "bn_act":
            why = _bn_act_problem(bn)
            if why is not None:
                skip(why); continue
            relu, how = node, f"{type(bn).__name__}.act (nn.ReLU)"
        else:
            last, noops = _through_noops(node, owner)
            users = list(last.users)
            if len(users) != 1:
                skip(f"BN output has {len(users)} users (the fused layer does not expose it)"); continue
            relu = users[0]
            how = _relu_kind(relu, owner, full)
            if how is None:
                skip(f"BN output goes to {_describe(relu, owner)}, not a ReLU"); continue
            relu_mod = owner.get_submodule(relu.target) if relu.op == "call_module" else None
            if relu_mod is not None and isinstance(owner.get_submodule(_split(relu.target)[0]), nn.Sequential):
                relu_slot = relu.target
            if relu_mod is not None and (_has_hooks(relu_mod) or (relu_slot and calls[relu.target] > 1)):
                skip("the ReLU module has hooks or is a Sequential slot called more than once"); continue

        conv_node, conv, noops_or_why = _conv_after(relu, owner, bn, calls, registrations)
        if conv is not None and conv.training != bn.training:
            skip(f"train/eval mismatch: BN training={bn.training}, conv training={conv.training}"); continue
        if conv is not None:
            fused = PreActConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                 bn.eps, bn.momentum, bn.affine, bn.track_running_stats, backend=backend,
                                 device="meta")
            fused.bn, fused.conv = bn, conv
            fused.train(conv.training)
            conv_path = conv_node.target
            record.change(owner, conv_path, fused)
            record.change(owner, bn_path, _vacancy(owner, bn_path))
            if relu_slot is not None:
                record.change(owner, relu_slot, nn.Identity())
            record.keymap.add(f"{conv_path}.bn", bn_path, bn.state_dict().keys())
            record.keymap.add(f"{conv_path}.conv", conv_path, conv.state_dict().keys())
            for sub, _ in bn.named_modules():   # a BatchNormAct2d's drop / act: module metadata only, no tensors
                if sub:
                    record.keymap.module_paths[f"{conv_path}.bn.{sub}"] = f"{bn_path}.{sub}"
            record.keymap.module_paths[conv_path] = None
            conv_node.args = (node.args[0],)
            for n in reversed(noops_or_why):
                graph.erase_node(n)
            if relu is not node:
                graph.erase_node(relu)
            for n in reversed(noops):
                graph.erase_node(n)
            graph.erase_node(node)
            graph_changed = True
            report.fused.append(FusedChain(path, full(bn_path), how, full(conv_path), "PreActConv2d"))
        else:
            record.change(owner, bn_path, _bn_relu_from(bn, backend))
            if relu_slot is not None:
                record.change(owner, relu_slot, nn.Identity())
            if relu is not node:   # a BatchNormAct2d keeps its call: the forward code need not change
                relu.replace_all_uses_with(node)
                graph.erase_node(relu)
                for n in reversed(noops):
                    graph.erase_node(n)
                graph_changed = True
            report.fused.append(FusedChain(path, full(bn_path), f"{how} ({noops_or_why}: BN → ReLU fused alone)", None,
                                           "BNReLU2d"))

    if not record.slots:
        return
    graph.lint()
    if graph_changed and isinstance(owner, fx.GraphModule):
        # its forward is generated from its graph: the new graph, recompiled; kept by deepcopy (fx copies the graph,
        # the state-dict hooks and the attributes listed in meta)
        record.original_graph = owner.graph
        owner.graph = graph
        owner.recompile()
        owner.meta.setdefault(_FX_PRESERVED, {})[_RECORD] = record
    elif graph_changed and not isinstance(owner, nn.Sequential):
        # a Sequential's own forward already runs the new slots; any other owner gets the new code, guarded
        code = fx.GraphModule(owner, graph, class_name=type(owner).__name__)
        cls = type(owner)
        owner.__class__ = type(cls.__name__, (cls,), {"forward": _guarded(type(code).forward, guards),
                                                      "__module__": cls.__module__, "__doc__": cls.__doc__})
    if record.keymap.fused_to_plain:
        # partials, not bound methods: torch tags public-API hooks with an attribute
        record.handles = [owner.register_state_dict_post_hook(functools.partial(_KeyMap.save, record.keymap)),
                          owner.register_load_state_dict_pre_hook(functools.partial(_KeyMap.load, record.keymap))]
    setattr(owner, _RECORD, record)


def _eligible(m: nn.Module) -> bool:
    """Worth tracing: has its own forward, is user code, a Sequential or an fx.GraphModule (its generated forward
    retraces to its own graph), and holds a BatchNorm2d (or timm BatchNormAct2d) leaf."""
    if type(m).forward is nn.Module.forward or hasattr(m, _RECORD):
        return False
    if not isinstance(m, (nn.Sequential, fx.GraphModule)) and type(m).__module__.startswith("torch."):
        return False
    bn_act = _timm_bn_act()
    return any(type(leaf) is nn.BatchNorm2d or (bn_act is not None and isinstance(leaf, bn_act))
               for _, leaf in _leaves(m))


def _walk(m: nn.Module, path: str, backend, report: ConversionReport, registrations, covered: bool) -> None:
    if isinstance(m, torch.jit.ScriptModule):      # torch.jit.script / torch.jit.trace output, submodules included
        report.untraced[path] = SCRIPTED_REASON
        return
    traced = covered
    if not covered and _eligible(m):
        try:
            graph, guards = _trace(m)
        except _Untraceable as e:
            report.untraced[path] = str(e)
        except Exception as e:  # noqa: BLE001  torch.fx raises many types; the module stays as it is
            report.untraced[path] = f"torch.fx cannot trace forward: {type(e).__name__}: {str(e).splitlines()[0]}"
        else:
            _rewrite(m, graph, guards, path, backend, report, registrations)
            traced = True
    for name, child in list(m._modules.items()):
        if child is None or isinstance(child, (PreActConv2d, BNReLU2d)):
            continue
        child_path = f"{path}.{name}" if path else name
        # Sequentials inlined into a traced owner's graph were rewritten with it.
        _walk(child, child_path, backend, report, registrations, traced and isinstance(child, nn.Sequential))


def convert(model: nn.Module, backend: Optional[str] = None, inplace: bool = False) -> ConversionResult:
    """Replace BatchNorm2d → ReLU → Conv2d chains of `model` by fused `PreActConv2d`s (and BatchNorm2d → ReLU whose
    activation has other readers by `BNReLU2d`); see the module docstring for what changes and what is kept.

    Args:
        model: any nn.Module (NCHW or channels_last inputs, any float dtype the fused layers accept).
        backend: pinned backend of the new layers ("auto", "torch", "triton", ...); None follows
            `fastresnet.set_backend` / FASTRESNET_BACKEND at call time.
        inplace: modify `model` itself (its Parameter objects stay the same, so existing optimizers keep
            working); False converts a deep copy.

    Returns:
        `ConversionResult(model, report)`: unpack it or use `.model` / `.report`; `print(report)` lists every fused
        chain, every BatchNorm2d left alone with the reason, and modules torch.fx could not trace.

    An `fx.GraphModule` is converted from its graph; a TorchScript module (or submodule) is left unchanged with a
    `UserWarning` and its reason in the report (module docstring).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if backend is not None and backend not in BACKEND_NAMES:
        raise ValueError(f"backend: expected None or one of {BACKEND_NAMES}, got {backend!r}")
    if not inplace:
        model = copy.deepcopy(model)
    registrations: Dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        registrations[id(m)] = registrations.get(id(m), 0) + 1
    report = ConversionReport()
    _walk(model, "", backend, report, registrations, False)
    scripted = [p or "<model>" for p, why in report.untraced.items() if why == SCRIPTED_REASON]
    if scripted:
        warnings.warn(f"convert: left {', '.join(scripted)} unchanged: {SCRIPTED_REASON}", stacklevel=2)
    return ConversionResult(model, report)


def unconvert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The inverse of `convert`: plain BatchNorm2d / ReLU / Conv2d modules and the original classes and forwards,
    holding the converted model's current parameters and running statistics (shared when inplace=True)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    for owner in [m for m in model.modules() if hasattr(m, _RECORD)]:
        record: _Conversion = owner.__dict__.pop(_RECORD)
        for handle in record.handles:
            handle.remove()
        record.restore(owner)
        if record.original_graph is not None:
            owner.meta[_FX_PRESERVED].pop(_RECORD)
            owner.graph = record.original_graph
            owner.recompile()
        else:
            owner.__class__ = record.original_class
    _unfuse_native(model)
    return model


def _unfuse_native(module: nn.Module) -> None:
    """Fused layers built natively (the model zoo's) → eager PyTorch with the same state-dict keys:
    PreActConv2d → Sequential(bn=BatchNorm2d, relu=ReLU, conv=Conv2d) and BNReLU2d → BatchNormReLU2d; a model that
    chains batch statistics between fused layers (`chained`, fastresnet.models.ResNet) runs layer by layer."""
    for name, child in list(module.named_children()):
        if isinstance(child, PreActConv2d):
            setattr(module, name, nn.Sequential(OrderedDict(bn=child.bn, relu=nn.ReLU(), conv=child.conv)))
        elif isinstance(child, BNReLU2d):
            setattr(module, name, _bn_from(child, BatchNormReLU2d))
        else:
            _unfuse_native(child)
    if getattr(module, "chained", False):
        module.chained = False
