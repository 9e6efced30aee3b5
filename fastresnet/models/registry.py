"""Model registry: `@register_model` builders, `create_model(name, ...)`, `list_models()`."""
from __future__ import annotations

import fnmatch
from typing import Callable, Dict, List, Optional

from torch import nn

_MODELS: Dict[str, Callable[..., nn.Module]] = {}
_DEFAULT_CLASSES: Dict[str, int] = {}


def register_model(name: str, default_num_classes: int) -> Callable:
    """Decorator registering `fn(num_classes=..., **kw) -> nn.Module` under `name`."""
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = fn
        _DEFAULT_CLASSES[name] = default_num_classes
        return fn
    return wrap


def list_models(pattern: Optional[str] = None) -> List[str]:
    """Registered model names, sorted; `pattern` is a shell-style filter such as "preact_resnet*"."""
    names = sorted(_MODELS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatch(n, pattern)]


def default_num_classes(name: str) -> int:
    """10 for the CIFAR nets, 1000 for the ImageNet nets."""
    return _DEFAULT_CLASSES[name]


def create_model(name: str, num_classes: Optional[int] = None, **kwargs) -> nn.Module:
    """Build a registered model. num_classes defaults to 10 for CIFAR nets and 1000 for ImageNet nets; other
    keyword arguments go to the builder (e.g. `backend=`, `stride_on=`, `shortcut=`, `gate_bias=`)."""
    if name not in _MODELS:
        close = [n for n in _MODELS if name.split("_")[0] in n][:8]
        raise ValueError(f"name: unknown model {name!r}" + (f"; similar: {close}" if close else "")
                         + "; see fastresnet.list_models()")
    return _MODELS[name](num_classes=_DEFAULT_CLASSES[name] if num_classes is None else num_classes, **kwargs)
