"""Model family: ViT (and, as they land, its siblings) behind one registry."""

from vitlab.models.registry import (build_model, config_from_dict, config_to_dict, create_model, get_spec,
                                    list_models, model_config)
from vitlab.models.resnet import ResNet, ResNetConfig
from vitlab.models.vit import ViTConfig, VisionTransformer

__all__ = ["ResNet", "ResNetConfig", "ViTConfig", "VisionTransformer", "build_model", "config_from_dict",
           "config_to_dict", "create_model", "get_spec", "list_models", "model_config"]
