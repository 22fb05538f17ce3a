"""BiT ResNet-v2 weights: Google's `.npz` layout and timm state dicts ⇄ vitlab.

vitlab's ResNet uses timm's module names, so a timm `resnetv2_*_bit` state dict is already in vitlab's layout
and only its config has to be read from the shapes. BiT's `.npz` files (google-research/big_transfer, e.g.
`BiT-M-R50x1.npz`) hold everything under `resnet/`; kernels are HWIO and become OIHW, and `s`, `u` count from 1:
    root_block/standardized_conv2d/kernel                    → stem.conv.weight
    block{s}/unit{u:02d}/{a,b,c}/standardized_conv2d/kernel  → stages.{s-1}.blocks.{u-1}.conv{1,2,3}.weight
    block{s}/unit{u:02d}/{a,b,c}/group_norm/{gamma,beta}     → stages.{s-1}.blocks.{u-1}.norm{1,2,3}.{weight,bias}
    block{s}/unit01/a/proj/standardized_conv2d/kernel        → stages.{s-1}.blocks.0.downsample.conv.weight
    group_norm/{gamma,beta}                                  → norm.{weight,bias}
    head/conv2d/{kernel,bias}                                → head.fc.{weight,bias}

The hybrid ViT's ResNet stem has its own names inside the ViT `.npz` files; `vitlab.weights.npz` maps those.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from vitlab.errors import VitlabError
from vitlab.models.resnet import ResNetConfig
from vitlab.weights.npz import _Reader, _tensor, conv_from_hwio, conv_to_hwio, unit_counts, vector

BIT_PREFIX = "resnet/"
BIT_MARKER = "root_block/standardized_conv2d/kernel"
_BIT_CONV = "standardized_conv2d/kernel"


# ------------------------------------------------------------------------------------------------ shapes
def stage_depths(state: dict[str, Any], prefix: str = "", source: str = "weights") -> tuple[int, ...]:
    """Blocks per stage of the ResNet whose `stages.i.blocks.j.` keys sit under `prefix`; () when there are none."""
    found: dict[int, set[int]] = {}
    for key in state:
        match = re.match(re.escape(prefix) + r"stages\.(\d+)\.blocks\.(\d+)\.", key)
        if match:
            found.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if sorted(found) != list(range(len(found))) or any(blocks != set(range(len(blocks))) for blocks in found.values()):
        raise VitlabError(f"{source}: ResNet stages and blocks are not numbered from 0 without gaps: "
                          f"{ {stage: sorted(blocks) for stage, blocks in sorted(found.items())} }")
    return tuple(len(found[stage]) for stage in range(len(found)))


def looks_like_timm(keys: set[str]) -> bool:
    return "stem.conv.weight" in keys and any(key.startswith("stages.") for key in keys)


def config_from_state_dict(state: dict[str, torch.Tensor], source: str) -> ResNetConfig:
    """The ResNetConfig a vitlab/timm ResNet state dict describes (its image size is not recorded: 224)."""
    batch_norm = sorted(key for key in state if key.endswith(("running_mean", "running_var")))
    if batch_norm:
        raise VitlabError(f"{source}: key {batch_norm[0]!r} belongs to a BatchNorm ResNet; vitlab's ResNet is BiT's, "
                          "with GroupNorm and weight-standardised convolutions (timm's resnetv2_*_bit)")
    stem = state["stem.conv.weight"]
    if stem.ndim != 4 or stem.shape[2] not in (3, 7):
        raise VitlabError(f"{source}: stem.conv.weight has shape {tuple(stem.shape)}; expected a 7×7 (BiT) or 3×3 "
                          "(small stem) kernel")
    preact = "norm.weight" in state  # pre-activation ResNets end with a GroupNorm, post-activation ones do not
    head = state.get("head.fc.weight")
    try:
        return ResNetConfig(in_chans=stem.shape[1], num_classes=0 if head is None else head.shape[0],
                            layers=stage_depths(state, source=source), width=stem.shape[0],
                            stem="small" if stem.shape[2] == 3 else "fixed" if preact else "same", preact=preact)
    except VitlabError as error:
        raise VitlabError(f"{source}: the weights describe an invalid ResNet ({error})") from None


# ------------------------------------------------------------------------------------------------ BiT .npz
def is_bit_npz(arrays: dict[str, Any]) -> bool:
    return BIT_PREFIX + BIT_MARKER in arrays


def bit_to_state_dict(arrays: dict[str, np.ndarray], source: str) -> tuple[dict[str, torch.Tensor], ResNetConfig]:
    """A BiT checkpoint's arrays as a vitlab ResNet state dict, and the config they describe."""
    reader = _Reader(arrays, BIT_PREFIX, source)
    try:
        state = {"stem.conv.weight": conv_from_hwio(reader.take(BIT_MARKER))}
        for stage, units in enumerate(unit_counts(reader, r"block(\d+)/unit(\d+)/", source)):
            for unit in range(units):
                name, out = f"block{stage + 1}/unit{unit + 1:02d}/", f"stages.{stage}.blocks.{unit}."
                for index, part in enumerate("abc", start=1):
                    state[f"{out}conv{index}.weight"] = conv_from_hwio(reader.take(f"{name}{part}/{_BIT_CONV}"))
                    state[f"{out}norm{index}.weight"] = _tensor(reader.take(f"{name}{part}/group_norm/gamma").ravel())
                    state[f"{out}norm{index}.bias"] = _tensor(reader.take(f"{name}{part}/group_norm/beta").ravel())
                if reader.has(f"{name}a/proj/{_BIT_CONV}"):
                    state[f"{out}downsample.conv.weight"] = conv_from_hwio(reader.take(f"{name}a/proj/{_BIT_CONV}"))
        state["norm.weight"] = _tensor(reader.take("group_norm/gamma").ravel())
        state["norm.bias"] = _tensor(reader.take("group_norm/beta").ravel())
        if reader.has("head/conv2d/kernel"):
            state["head.fc.weight"] = conv_from_hwio(reader.take("head/conv2d/kernel"))
            state["head.fc.bias"] = _tensor(reader.take("head/conv2d/bias").ravel())
    except VitlabError:
        raise
    except (ValueError, IndexError, TypeError) as error:  # an array whose rank or shape does not fit
        raise reader.misfit(error, "a BiT ResNet") from None
    reader.check_all_used("ResNet")
    return state, config_from_state_dict(state, source)


def bit_from_state_dict(state: dict[str, torch.Tensor], config: ResNetConfig) -> dict[str, np.ndarray]:
    """A vitlab pre-activation ResNet state dict in BiT's `.npz` layout."""
    if not config.preact:
        raise VitlabError("BiT's .npz layout holds pre-activation ResNets; this one has preact=False")
    out = {BIT_PREFIX + BIT_MARKER: conv_to_hwio(state["stem.conv.weight"])}
    for stage, units in enumerate(config.layers):
        for unit in range(units):
            name, src = f"{BIT_PREFIX}block{stage + 1}/unit{unit + 1:02d}/", f"stages.{stage}.blocks.{unit}."
            for index, part in enumerate("abc", start=1):
                out[f"{name}{part}/{_BIT_CONV}"] = conv_to_hwio(state[f"{src}conv{index}.weight"])
                out[f"{name}{part}/group_norm/gamma"] = vector(state[f"{src}norm{index}.weight"])
                out[f"{name}{part}/group_norm/beta"] = vector(state[f"{src}norm{index}.bias"])
            if f"{src}downsample.conv.weight" in state:
                out[f"{name}a/proj/{_BIT_CONV}"] = conv_to_hwio(state[f"{src}downsample.conv.weight"])
    out[f"{BIT_PREFIX}group_norm/gamma"] = vector(state["norm.weight"])
    out[f"{BIT_PREFIX}group_norm/beta"] = vector(state["norm.bias"])
    if "head.fc.weight" in state:
        out[f"{BIT_PREFIX}head/conv2d/kernel"] = conv_to_hwio(state["head.fc.weight"])
        out[f"{BIT_PREFIX}head/conv2d/bias"] = vector(state["head.fc.bias"])
    return out
