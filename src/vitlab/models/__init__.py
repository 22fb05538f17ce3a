"""Model families (ViT, its hybrid, BiT ResNet, MLP-Mixer, Perceiver) behind one registry.

`build_model(model_config(name, ...))` builds a registered model; `vitlab.create_model` adds published weights
and int8 quantisation on top. This layer imports nothing of vitlab's above the ground floor.
"""

from vitlab.models.family import ATTENTION, CROSS_ATTENTION, Family
from vitlab.models.registry import (build_model, capabilities, config_from_dict, config_to_dict, get_family, get_spec,
                                    list_families, list_models, model_config)
from vitlab.models.resnet import ResNet, ResNetConfig
from vitlab.models.vit import ViTConfig, VisionTransformer

__all__ = ["ATTENTION", "CROSS_ATTENTION", "Family", "ResNet", "ResNetConfig", "ViTConfig", "VisionTransformer",
           "build_model", "capabilities", "config_from_dict", "config_to_dict", "get_family", "get_spec",
           "list_families", "list_models", "model_config"]
