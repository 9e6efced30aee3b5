"""The model zoo: every network and ablation of the paper behind one registry."""
from fastresnet.models import resnet  # noqa: F401  (registers the models)
from fastresnet.models.registry import create_model, list_models, register_model
from fastresnet.models.resnet import ResNet, cifar_resnet

__all__ = ["ResNet", "cifar_resnet", "create_model", "list_models", "register_model"]
