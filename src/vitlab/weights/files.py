"""Reading and writing weight files safely: safetensors with metadata, tensor-only torch.load.

Writes go through `vitlab.atomic`, so a crash never leaves a half-written file under the final name. Pickle-based
files are only ever opened with `torch.load(weights_only=True)`, which refuses anything but tensors and plain
containers, so a malicious `.pth` cannot run code.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import safetensors
import safetensors.torch
import torch

from vitlab.atomic import atomic_writer, open_regular, regular_file
from vitlab.errors import VitlabError

# Keys under which training scripts commonly nest a state dict inside a `.pth`/`.bin` file.
_NESTED_STATE_KEYS = ("state_dict", "model", "model_state_dict", "module", "state_dict_ema")


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors (moved to CPU, made contiguous) as one safetensors file, atomically."""
    cpu = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    data = safetensors.torch.save(cpu, metadata=metadata)
    with atomic_writer(path) as handle:
        handle.write(data)


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors file on CPU, and its string metadata (empty when it has none)."""
    regular_file(path)  # safetensors maps the file by name; a FIFO would block it forever
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as reader:
            metadata = dict(reader.metadata() or {})
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors raises its own error type for a corrupt header
        raise VitlabError(f"{path}: not a readable safetensors file ({error})") from None
    return tensors, metadata


def load_torch_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict in a `.pth`/`.bin` file, read with `weights_only=True` and nothing else.

    A file whose pickle names any callable other than tensor rebuilders is refused, never executed.
    """
    handle = open_regular(path)  # never a FIFO or device, which would block or never end
    try:
        with handle, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the unpickler warns about pickle protocols before refusing a file
            loaded = torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a malformed file raises anything (IndexError, OSError, ...)
        raise VitlabError(f"{path}: refused to load: not a plain tensor file that torch.load(weights_only=True) "
                          f"accepts ({_load_failure(error)})") from None
    return _find_state_dict(loaded, path)


def _load_failure(error: Exception) -> str:
    """The reason in torch.load's error, without its advice to retry with weights_only=False: for a file that
    needs more than tensors, that advice is to let it run code."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        reason = next((line for line in lines if line.startswith(("Unsupported", "Trying to unpickle"))), None)
        return f"not a tensor-only pickle: {reason}" if reason else "not a tensor-only pickle"
    return lines[0].split(". ")[0] if lines else type(error).__name__


def _find_state_dict(obj: object, path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        tensors = {key: value for key, value in obj.items() if isinstance(value, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return dict(tensors)
        for key in _NESTED_STATE_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _find_state_dict(obj[key], path)
        if tensors:
            return dict(tensors)
    raise VitlabError(f"{path}: no state dict of tensors found (top level is {type(obj).__name__}"
                      + (f" with keys {', '.join(map(str, list(obj)[:8]))}" if isinstance(obj, Mapping) else "")
                      + ")")


def describe_keys(keys: list[str], shapes: Mapping[str, tuple[int, ...]] | None = None, limit: int = 5) -> str:
    """'a (1, 2), b (3,) and 4 more': a few names (with shapes when given) and a count, for error messages."""
    shown = [f"{key} {tuple(shapes[key])}" if shapes and key in shapes else key for key in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more
