"""Per-module caches of what a training call needs (a residual unit's prepared arguments, a fused layer's C++ plan),
kept in the module's `__dict__` and valid while nothing they were built from was replaced.

Validity is checked by identity: every parameter, buffer and child of the watched modules and their `WATCHED_ATTRS`,
as found when the entry was built, must still be the same objects (one C-level pass), and the module's own
`_modules` table must be the one the entry was built in (a DataParallel replica copies `__dict__` with new tables).
In-place updates (optimizer steps, `.data` assignments) need nothing; conversions (`.to`, `.double`, ...) and
state-dict loads drop the entry first (`PlanCache`), since in swap mode
(`torch.__future__.set_swap_module_params_on_conversion`) they replace the tensor inside a parameter object and refuse
tensors held elsewhere. Nothing is cached for a module whose weights a parametrization computes on every access.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Hashable, List, Optional, Tuple

from torch import nn
from torch.nn.utils import parametrize

# The plain attributes of a watched module that the cached builds read (with every parameter, buffer and child).
WATCHED_ATTRS = ("training", "fuse_unit", "variant", "merge_kind", "share_preact", "num_layers", "process_group",
                 "momentum", "eps", "stride", "padding", "backend")
SLOT = "_plan_cache"  # the __dict__ key of the entry: (_modules table, key, watch, value)

Watch = Tuple[tuple, tuple, tuple]


def _watch(modules: List[nn.Module]) -> Watch:
    """(mappings, keys, objects): every parameter, buffer and child of `modules` and their `WATCHED_ATTRS`, as
    found now."""
    found = [(table, key, obj) for m in modules
             for table in (m._parameters, m._buffers, m._modules) for key, obj in table.items()]
    found += [(m.__dict__, key, m.__dict__[key]) for m in modules for key in WATCHED_ATTRS if key in m.__dict__]
    return tuple(zip(*found))


def _unchanged(watched: Watch) -> bool:
    """Whether every entry `_watch` found is still the same object."""
    tables, keys, objects = watched
    return all(map(operator.is_, map(dict.get, tables, keys), objects))


def cached(module: nn.Module, key: Hashable, build: Callable[[], Tuple[List[nn.Module], Any]]) -> Any:
    """The value cached in `module` for `key`, or build()'s: build returns (the modules the value was made from,
    value), and the value is kept unless one of those modules is parametrized."""
    state = module.__dict__
    entry: Optional[tuple] = state.get(SLOT)
    if entry is not None and entry[0] is state["_modules"] and entry[1] == key and _unchanged(entry[2]):
        return entry[3]
    modules, value = build()
    if not any(parametrize.is_parametrized(m) for m in modules):
        state[SLOT] = (state["_modules"], key, _watch(modules), value)
    return value


class PlanCache(nn.Module):
    """Base of the modules that keep a `cached` entry: it holds references into the module (and C++ plans), so it is
    not pickled or deep-copied, and conversions and state-dict loads drop it first (module docstring)."""

    def __getstate__(self):
        state = super().__getstate__()
        state.pop(SLOT, None)
        return state

    def _apply(self, fn, recurse=True):
        self.__dict__.pop(SLOT, None)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop(SLOT, None)
        super()._load_from_state_dict(*args, **kwargs)
