"""fastresnet: fused BN → ReLU → conv kernels for the pre-activation ResNets of He et al. (ECCV 2016)."""
from fastresnet import _startup

_startup.install()   # before the imports below (torch: seconds): a command's Ctrl-C there is one line too
from fastresnet import functional
from fastresnet.backends import available_backends, get_backend, set_backend
from fastresnet.convert import convert, unconvert
from fastresnet.models import create_model, list_models
from fastresnet.nn import BNReLU2d, PreActConv2d

__version__ = "0.1.0"

__all__ = [
    "BNReLU2d", "PreActConv2d", "available_backends", "convert", "create_model", "functional", "get_backend",
    "list_models", "set_backend", "unconvert",
]
