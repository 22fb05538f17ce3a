"""vitlab: Vision Transformers (Dosovitskiy et al., 2021) to build, train, load, analyse and compare."""

from vitlab.errors import VitlabError
from vitlab.models import create_model, list_models

__version__ = "0.1.0"

__all__ = ["VitlabError", "create_model", "list_models", "load_weights", "save_weights", "__version__"]


def __getattr__(name: str):
    # The weight converters import numpy/safetensors machinery; load them only when asked for.
    if name in ("load_weights", "save_weights"):
        from vitlab import weights

        return getattr(weights, name)
    raise AttributeError(f"module 'vitlab' has no attribute {name!r}")
