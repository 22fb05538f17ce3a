"""Weights in and out of vitlab: Google .npz, timm, Hugging Face and vitlab's own safetensors.

`load_weights(model, path)` fills a model from any of them, `load_model(path)` builds the model a file (or a
catalogue name such as `vit-s16:augreg-in21k-ft-in1k`) describes, `save_weights(model, path, format)` writes any of
them, and `vitlab.weights.hub` downloads published checkpoints. A loaded model's `card` (`ModelCard`) holds its
class names and preprocessing, and every save writes it back where the format has room.
"""

from vitlab.weights.card import ModelCard, Preprocessing
from vitlab.weights.io import FORMATS, load_model, load_pretrained, load_weights, read_weights, save_weights

__all__ = ["FORMATS", "ModelCard", "Preprocessing", "load_model", "load_pretrained", "load_weights", "read_weights",
           "save_weights"]
