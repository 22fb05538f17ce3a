"""vitlab: Vision Transformers (Dosovitskiy et al., 2021) to build, train, load, analyse and compare."""

import importlib

from vitlab.errors import VitlabError

try:
    from vitlab.factory import create_model
    from vitlab.models import list_models
except KeyboardInterrupt:
    # Ctrl-C while `python -m vitlab` (argv[0] is "-m" until its __main__ runs) or the `vitlab` script imports
    # torch: the command line's one line and exit 130, as its main() gives later; a program importing vitlab
    # handles its own interrupts.
    import os
    import sys

    if sys.argv[:1] != ["-m"] and os.path.basename(sys.argv[0]) != "vitlab":
        raise
    print("vitlab: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

__version__ = "0.1.0"

__all__ = ["VitlabError", "create_model", "list_models", "load_weights", "save_weights", "__version__"]


def __getattr__(name: str):
    # Sub-packages load on first use (`vitlab.weights` after a bare `import vitlab`): the weight converters, the
    # trainer and the plots import machinery that building a model does not need.
    if name in ("load_weights", "save_weights"):
        return getattr(importlib.import_module("vitlab.weights"), name)
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"vitlab.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"vitlab.{name}":
                raise
    raise AttributeError(f"module 'vitlab' has no attribute {name!r}")
