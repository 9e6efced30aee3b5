"""timm and torchvision for the conversion tests, imported offline (models are built with random weights only).

Test-only workaround: the torchvision wheel pip resolves for a CPU-only torch can be a CUDA build whose compiled
ops do not load beside it; its import then fails registering fake kernels for `torchvision::nms` ("operator
torchvision::nms does not exist"). The model classes these tests use need none of those ops, so in that case (and
only then) the two operator schemas the import looks up are declared, without kernels, and the import is retried.
A torchvision that imports on its own is used as it is.
"""
import sys
from types import ModuleType

import torch

_SHIM = []   # the torch.library.Library holding the declared schemas must stay alive


def import_torchvision() -> ModuleType:
    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]   # the failed import left some submodules half-registered
        lib = torch.library.Library("torchvision", "DEF")
        # the schemas of torchvision's csrc/ops/nms.cpp and its quantized CPU kernel registration
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _SHIM.append(lib)
        import torchvision
    return torchvision


def import_timm() -> ModuleType:
    import_torchvision()   # timm imports torchvision
    import timm
    return timm
