"""Backend registry and selection (docs/architecture.md §1).

A backend implements the primitive ops of `fastresnet.reference` (see `Backend`). Selection, in order of precedence:
the `backend=` argument of a layer or functional call, `fastresnet.set_backend(...)`, the `FASTRESNET_BACKEND`
environment variable, and finally "auto". "auto" takes, for each call, the first backend in `AUTO_ORDER` that is
available and supports the tensor (device, dtype); the "torch" reference supports everything. An explicitly named
backend that cannot run the call raises `BackendUnsupportedError` naming the reason: never a silent fallback.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Dict, List, Optional

from torch import Tensor

from fastresnet.backends.base import Backend, BackendUnsupportedError, UnavailableBackend
from fastresnet.backends.torch_backend import TorchBackend

_FACTORIES: Dict[str, Callable[[], Backend]] = {}
_INSTANCES: Dict[str, Backend] = {}
# Preference of "auto", fastest first; backends that are unavailable or do not support a call are skipped.
AUTO_ORDER: List[str] = []
_current: Optional[str] = None

BACKEND_NAMES = ("auto",)


# backends that had another name: the unknown-backend errors name the new one
RENAMED = {"cuda": "ext"}


def _renamed(name: str) -> str:
    return f" ('{name}' is now named '{RENAMED[name]}')" if name in RENAMED else ""


def register_backend(name: str, factory: Callable[[], Backend], auto_rank: Optional[int] = None) -> None:
    """Register a backend factory (called lazily, once). auto_rank places it in "auto"'s preference (0 = first)."""
    global BACKEND_NAMES
    _FACTORIES[name] = factory
    if auto_rank is not None:
        AUTO_ORDER.insert(min(auto_rank, len(AUTO_ORDER)), name)
    BACKEND_NAMES = ("auto",) + tuple(_FACTORIES)


def get_backend_impl(name: str) -> Backend:
    """The backend object registered under name (instantiated on first use)."""
    if name not in _FACTORIES:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {BACKEND_NAMES}{_renamed(name)}")
    if name not in _INSTANCES:
        try:
            _INSTANCES[name] = _FACTORIES[name]()
        except ImportError as e:  # optional dependency or build missing: the backend reports it, nothing raises
            _INSTANCES[name] = UnavailableBackend(name, f"cannot import: {e}")
    return _INSTANCES[name]


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend ("auto", "torch", "triton", "ext", ...). None restores the env default."""
    global _current
    if name is not None and name != "auto" and name not in _FACTORIES:
        raise ValueError(f"set_backend: unknown backend {name!r}; expected one of {BACKEND_NAMES}{_renamed(name)}")
    _current = name


def get_backend() -> str:
    """The default backend name now in force (set_backend, else FASTRESNET_BACKEND, else "auto")."""
    if _current is not None:
        return _current
    name = os.environ.get("FASTRESNET_BACKEND", "auto")
    if name != "auto" and name not in _FACTORIES:
        raise ValueError(f"FASTRESNET_BACKEND: unknown backend {name!r}; expected one of {BACKEND_NAMES}{_renamed(name)}")
    return name


def available_backends() -> Dict[str, str]:
    """Every registered backend with "ok" or the reason it is unavailable on this machine."""
    out = {}
    for name in _FACTORIES:
        reason = get_backend_impl(name).unavailable_reason()
        out[name] = "ok" if reason is None else reason
    return out


def resolve(x: Tensor, requested: Optional[str] = None) -> str:
    """The concrete backend name that runs an op on x, for the requested name (None = the default in force)."""
    name = requested or get_backend()
    if name == "auto":
        for candidate in AUTO_ORDER:
            if get_backend_impl(candidate).auto_ok(x):
                return candidate
        return "torch"
    why = get_backend_impl(name).why_not(x)
    if why is not None:
        raise BackendUnsupportedError(f"backend {name!r} cannot run this call: {why}")
    return name


def _lazy(module: str, cls: str) -> Callable[[], Backend]:
    """A factory importing module.cls on first use, so optional dependencies (triton, the extension) load late."""
    return lambda: getattr(importlib.import_module(module), cls)()


register_backend("torch", TorchBackend)
# "auto" preference: Triton tier B (CUDA tensors; it times its own conv against the tier-A path per layer shape and
# keeps the faster, docs/architecture.md §3), then the extension (CUDA tensors, and CPU tensors: its C++ kernels), then
# Triton tier A, then "torch".
register_backend("triton", _lazy("fastresnet.backends.triton_backend", "TritonBackend"), auto_rank=0)
register_backend("ext", _lazy("fastresnet.backends.ext_backend", "ExtBackend"), auto_rank=0)
register_backend("triton_conv", _lazy("fastresnet.backends.triton_conv_backend", "TritonConvBackend"), auto_rank=0)


def _create_registered() -> None:
    """Create every registered backend now, at import, before anything can be traced.

    Creating a backend imports its module (`_lazy`), which torch.compile's Dynamo does not trace: done inside a
    compiled forward (the first fused call of a fresh process, backend "auto" or a named one) it is a graph break at
    each call site. Created here, `resolve` only reads `_INSTANCES` when traced. A backend whose creation raises here
    (e.g. a bad FASTRESNET_TRITON_CONV value) is left uncreated, so the error is raised at its first use, as it was.
    """
    for name in _FACTORIES:
        try:
            get_backend_impl(name)
        except Exception:  # noqa: BLE001 - deferred on purpose: get_backend_impl raises it again at first use
            pass


_create_registered()
