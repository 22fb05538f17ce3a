"""Weights in and out of vitlab: Google .npz, timm, Hugging Face and vitlab's own safetensors.

`load_weights(model, path)` fills a model from any of them, `load_model(path)` builds the model a file describes,
`save_weights(model, path, format)` writes any of them, and `vitlab.weights.hub` downloads published checkpoints.
"""

from vitlab.weights.io import FORMATS, load_model, load_weights, read_weights, save_weights

__all__ = ["FORMATS", "load_model", "load_weights", "read_weights", "save_weights"]
