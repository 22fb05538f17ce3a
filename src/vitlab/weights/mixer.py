"""MLP-Mixer weights: Google's `.npz` checkpoints (`gs://mixer_models/...`, vision_transformer's `models_mixer.py`)
and timm state dicts ⇄ vitlab.

vitlab's Mixer uses timm's module names, so a timm `mixer_*` state dict is already in vitlab's layout and only its
config has to be read from the shapes. The Flax names map one to one onto those modules:
    stem/{kernel,bias}                                  (P, P, C, D) HWIO  → stem.proj (D, C, P, P)
    MixerBlock_i/LayerNorm_0/{scale,bias}                                  → blocks.i.norm1
    MixerBlock_i/token_mixing/Dense_{0,1}/{kernel,bias}  (in, out)         → blocks.i.mlp_tokens.fc{1,2} (out, in)
    MixerBlock_i/LayerNorm_1/{scale,bias}                                  → blocks.i.norm2
    MixerBlock_i/channel_mixing/Dense_{0,1}/{kernel,bias}                  → blocks.i.mlp_channels.fc{1,2}
    pre_head_layer_norm/{scale,bias}                                       → norm
    head/{kernel,bias}  (absent when the model was built without classes) → head
The same key prefixes as the ViT files are accepted (`opt/target/`, `params/`, ...), and bfloat16 arrays.

Flax's `nn.gelu` is the tanh approximation, so a Mixer read from `.npz` gets `act="gelu_tanh"` and computes as the
official code; one read from timm keeps timm's exact GELU.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np
import torch

from vitlab.errors import VitlabError
from vitlab.models.mixer import MixerConfig
from vitlab.weights.files import describe_keys
from vitlab.weights.npz import GOOGLE_NUMERICS, PREFIXES, _Reader, _tensor, warn_unless_google_numerics

MARKER = "MixerBlock_0/token_mixing/Dense_0/kernel"
_DENSE = (("token_mixing", "mlp_tokens"), ("channel_mixing", "mlp_channels"))


def find_prefix(arrays: dict[str, Any]) -> str | None:
    """The key prefix under which a Mixer's arrays sit, or None when the arrays are not a Mixer's."""
    return next((prefix for prefix in PREFIXES if f"{prefix}{MARKER}" in arrays), None)


def is_mixer_npz(arrays: dict[str, Any]) -> bool:
    return find_prefix(arrays) is not None


def looks_like_timm(keys: set[str]) -> bool:
    """timm's (and vitlab's) Mixer state-dict keys."""
    return {"stem.proj.weight", "blocks.0.mlp_tokens.fc1.weight"} <= keys


def config_from_state_dict(state: dict[str, torch.Tensor], source: str) -> MixerConfig:
    """The MixerConfig a vitlab-layout state dict describes. Every field but the regularisation follows from the
    shapes; the image size from the token MLP's input width (the patch count), taken as a square grid, as every
    published Mixer is."""
    try:
        stem = state["stem.proj.weight"]
        tokens, channels = state["blocks.0.mlp_tokens.fc1.weight"], state["blocks.0.mlp_channels.fc1.weight"]
        head = state.get("head.weight")
        if stem.ndim != 4 or stem.shape[2] != stem.shape[3] or tokens.ndim != 2 or channels.ndim != 2:
            raise VitlabError("stem.proj.weight must be (D, C, P, P) and the MLP weights matrices")
        depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise VitlabError(f"the token MLP mixes {tokens.shape[1]} patches, which is not a square grid")
        patch = stem.shape[2]
        return MixerConfig(img_size=(side * patch, side * patch), patch_size=patch, in_chans=stem.shape[1],
                           num_classes=0 if head is None else head.shape[0], embed_dim=stem.shape[0], depth=depth,
                           tokens_mlp_dim=tokens.shape[0], channels_mlp_dim=channels.shape[0])
    except KeyError as error:
        raise VitlabError(f"{source}: not an MLP-Mixer state dict: no {error.args[0]!r}") from None
    except VitlabError as error:
        raise VitlabError(f"{source}: the weights describe an invalid MLP-Mixer ({error})") from None


def to_state_dict(arrays: dict[str, np.ndarray], source: str) -> tuple[dict[str, torch.Tensor], MixerConfig]:
    """Convert a Mixer checkpoint's arrays to a vitlab state dict and the MixerConfig they describe."""
    prefix = find_prefix(arrays)
    if prefix is None:
        raise VitlabError(f"{source}: not an MLP-Mixer checkpoint: no {MARKER!r} under any of the prefixes "
                          f"{', '.join(repr(p) for p in PREFIXES)}; keys: {describe_keys(sorted(arrays))}")
    reader = _Reader(arrays, prefix, source)
    try:
        return _convert(reader, arrays, source)
    except VitlabError:
        raise
    except (ValueError, IndexError, TypeError) as error:  # an array whose shape does not fit the others
        raise reader.misfit(error, "an MLP-Mixer") from None


def _convert(reader: _Reader, arrays: dict[str, np.ndarray], source: str
             ) -> tuple[dict[str, torch.Tensor], MixerConfig]:
    kernel = reader.take("stem/kernel")
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1]:
        raise VitlabError(f"{source}: 'stem/kernel' has shape {kernel.shape}; expected a square (P, P, C, D) "
                          "convolution kernel")
    dim = kernel.shape[3]
    state: dict[str, torch.Tensor] = {
        "stem.proj.weight": _tensor(kernel.transpose(3, 2, 0, 1)),
        "stem.proj.bias": _tensor(reader.take("stem/bias").reshape(dim)),
    }
    indices = {int(match.group(1)) for name in reader.names() if (match := re.match(r"MixerBlock_(\d+)/", name))}
    depth = len(indices)
    if indices != set(range(depth)):
        raise VitlabError(f"{source}: Mixer blocks are not numbered 0..{depth - 1}: {sorted(indices)}")
    for i in range(depth):
        block, out = f"MixerBlock_{i}/", f"blocks.{i}."
        for j, norm in enumerate(("norm1", "norm2")):
            state[f"{out}{norm}.weight"] = _tensor(reader.take(f"{block}LayerNorm_{j}/scale").reshape(dim))
            state[f"{out}{norm}.bias"] = _tensor(reader.take(f"{block}LayerNorm_{j}/bias").reshape(dim))
        for flax_name, name in _DENSE:
            for j in range(2):
                dense = f"{block}{flax_name}/Dense_{j}/"
                state[f"{out}{name}.fc{j + 1}.weight"] = _tensor(reader.take(dense + "kernel").T)
                state[f"{out}{name}.fc{j + 1}.bias"] = _tensor(reader.take(dense + "bias").reshape(-1))
    state["norm.weight"] = _tensor(reader.take("pre_head_layer_norm/scale").reshape(dim))
    state["norm.bias"] = _tensor(reader.take("pre_head_layer_norm/bias").reshape(dim))
    if reader.has("head/kernel"):
        state["head.weight"] = _tensor(reader.take("head/kernel").T)
        state["head.bias"] = _tensor(reader.take("head/bias").reshape(-1))

    reader.check_all_used("MLP-Mixer")
    return state, dataclasses.replace(config_from_state_dict(state, source), **GOOGLE_NUMERICS)


def from_state_dict(state: dict[str, torch.Tensor], config: MixerConfig) -> dict[str, np.ndarray]:
    """A vitlab Mixer state dict as arrays under the official Flax names (float32); warns when the model computes
    otherwise than the official code will on them."""
    warn_unless_google_numerics(config)
    def array(key: str) -> np.ndarray:
        return state[key].detach().to("cpu", torch.float32).numpy()

    out: dict[str, np.ndarray] = {
        "stem/kernel": array("stem.proj.weight").transpose(2, 3, 1, 0),
        "stem/bias": array("stem.proj.bias"),
        "pre_head_layer_norm/scale": array("norm.weight"),
        "pre_head_layer_norm/bias": array("norm.bias"),
    }
    for i in range(config.depth):
        block, src = f"MixerBlock_{i}/", f"blocks.{i}."
        for j, norm in enumerate(("norm1", "norm2")):
            out[f"{block}LayerNorm_{j}/scale"] = array(f"{src}{norm}.weight")
            out[f"{block}LayerNorm_{j}/bias"] = array(f"{src}{norm}.bias")
        for flax_name, name in _DENSE:
            for j in range(2):
                out[f"{block}{flax_name}/Dense_{j}/kernel"] = array(f"{src}{name}.fc{j + 1}.weight").T
                out[f"{block}{flax_name}/Dense_{j}/bias"] = array(f"{src}{name}.fc{j + 1}.bias")
    if "head.weight" in state:
        out["head/kernel"] = array("head.weight").T
        out["head/bias"] = array("head.bias")
    return {key: np.ascontiguousarray(value) for key, value in out.items()}
