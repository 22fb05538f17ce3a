"""vitlab: Vision Transformers (Dosovitskiy et al., 2021) to build, train, load, analyse and compare."""

from vitlab.errors import VitlabError

__version__ = "0.1.0"

__all__ = ["VitlabError", "create_model", "list_models", "load_weights", "save_weights", "__version__"]


def __getattr__(name: str):
    # The models import torch and the weight converters numpy/safetensors machinery: load them only when asked
    # for, so `python -m vitlab` reaches its command line (and its Ctrl-C handling) before any heavy import.
    if name in ("create_model", "list_models"):
        from vitlab import models

        return getattr(models, name)
    if name in ("load_weights", "save_weights"):
        from vitlab import weights

        return getattr(weights, name)
    raise AttributeError(f"module 'vitlab' has no attribute {name!r}")
