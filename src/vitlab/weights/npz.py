"""Google's Flax `.npz` checkpoints (vision_transformer, AugReg, big_vision) ⇄ vitlab state dicts.

Reading accepts every ViT layout the published files use: the pre-linen VT/AugReg names (sub-modules numbered
MultiHeadDotProductAttention_1 / LayerNorm_2 / MlpBlock_3), big_vision's linen names (numbered 0 / 1 / 0, a
top-level `pos_embedding` without a class-token row, optionally one scanned `encoderblock` whose arrays carry a
leading depth axis), the `opt/target/`, `params/` and `params/img/` prefixes, and bfloat16 arrays, and the
hybrid's ResNet stem (`conv_root`, `block{s}/unit{u}/...`, as in `R50+ViT-B_16.npz`). Writing produces the VT/AugReg
layout, which is what the official repository's `checkpoint.load` reads.

The official code computes with Flax's default (tanh-approximated) GELU and, in the hybrid's stem, its own weight
standardisation, so a model read from `.npz` gets `act="gelu_tanh"` (and `hybrid_numerics="flax"`), and writing a
model that computes otherwise warns that the file will be read that way.
"""

from __future__ import annotations

import math
import os
import re
import warnings
import zipfile
from typing import Any

import numpy as np
import torch

from vitlab.atomic import atomic_writer, open_regular
from vitlab.errors import VitlabError
from vitlab.models.resnet import ResNetConfig
from vitlab.models.vit import ViTConfig
from vitlab.weights.files import describe_keys

PREFIXES = ("", "opt/target/", "params/", "params/img/")
# (attention, MLP, second LayerNorm) sub-module indices inside an encoder block.
_VT_SUBMODULES = (1, 3, 2)
_BV_SUBMODULES = (0, 0, 1)
# What Google's Flax code computes with, as config fields: `nn.gelu` defaults to the tanh approximation.
GOOGLE_NUMERICS = {"act": "gelu_tanh"}
# What the members of an archive may expand to, in all: this many times the archive's size, plus a floor for small
# archives. Weights hardly compress (float32 deflates by about a tenth), so only a zip bomb comes near it.
_EXPANSION, _EXPANSION_FLOOR = 16, 64 << 20


def read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The raw arrays of an `.npz` file, read without pickle, once its members' sizes are known to be sane."""
    with open_regular(path) as handle:  # never a FIFO or device, which would block or never end
        _check_expansion(handle, path)
        try:
            with np.load(handle, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except Exception as error:  # noqa: BLE001 - a malformed archive or .npy header raises anything (TokenError)
            raise VitlabError(f"{path}: not a readable .npz file ({type(error).__name__}: {error})") from None
    stray = sorted(key for key, value in arrays.items() if not isinstance(value, np.ndarray))
    if stray:  # a zip member without the .npy suffix is returned as raw bytes
        raise VitlabError(f"{path}: member(s) that are not .npy arrays: {describe_keys(stray)}")
    return arrays


def _check_expansion(handle: Any, path: str | os.PathLike[str]) -> None:
    """Refuse an archive whose members declare more uncompressed bytes than `_EXPANSION` times its size (plus
    `_EXPANSION_FLOOR`), before any member is decompressed: a zip bomb of a few MB would otherwise be inflated into
    GBs of arrays. zipfile stops a member at its declared size, so the declared sizes bound what is read."""
    size = os.fstat(handle.fileno()).st_size
    try:
        members = zipfile.ZipFile(handle).infolist()
    # NotImplementedError: a member needs a zip version that zipfile does not know
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as error:
        raise VitlabError(f"{path}: not a readable .npz file (not a zip archive: {error})") from None
    bound = _EXPANSION * size + _EXPANSION_FLOOR
    declared = 0
    for member in members:
        declared += member.file_size
        if declared > bound:
            raise VitlabError(f"{path}: member {member.filename!r} declares {member.file_size:,} uncompressed bytes, "
                              f"{declared:,} in all: more than {bound:,} for a {size:,}-byte archive (a zip bomb?)")
    handle.seek(0)


def to_float32(array: np.ndarray, key: str, source: str) -> np.ndarray:
    """float32 copy of an array; bfloat16 (which numpy sees as 2-byte void) is widened bit-exactly."""
    if array.dtype.name == "bfloat16" or (array.dtype.kind == "V" and array.dtype.itemsize == 2):
        bits = np.ascontiguousarray(array).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    if array.dtype.kind != "f":
        raise VitlabError(f"{source}: array {key!r} has dtype {array.dtype}, expected floating point")
    return array.astype(np.float32)


def find_prefix(arrays: dict[str, Any], source: str) -> str:
    """The key prefix (`''`, `opt/target/`, `params/`, `params/img/`) under which the ViT parameters sit."""
    for prefix in PREFIXES:
        if f"{prefix}embedding/kernel" in arrays:
            return prefix
    raise VitlabError(f"{source}: not a ViT checkpoint: no 'embedding/kernel' under any of the prefixes "
                      f"{', '.join(repr(p) for p in PREFIXES)}; keys: {describe_keys(sorted(arrays))}")


class _Reader:
    """Takes arrays by name under the checkpoint's prefix, as float32, remembering which ones were used."""

    def __init__(self, arrays: dict[str, np.ndarray], prefix: str, source: str) -> None:
        self.arrays = arrays
        self.prefix = prefix
        self.source = source
        self.used: set[str] = set()
        self.last: str | None = None  # the array taken most recently, named when a conversion fails
        self._decoded: dict[str, np.ndarray] = {}

    def has(self, name: str) -> bool:
        return self.prefix + name in self.arrays

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.arrays[self.prefix + name].shape)

    def take(self, name: str, index: int | None = None) -> np.ndarray:
        key = self.prefix + name
        if key not in self.arrays:
            raise VitlabError(f"{self.source}: missing array {key!r}")
        if key not in self._decoded:
            self._decoded[key] = to_float32(self.arrays[key], key, self.source)
        self.used.add(key)
        self.last = key
        array = self._decoded[key]
        return array if index is None else array[index]

    def names(self) -> list[str]:
        return [key[len(self.prefix):] for key in self.arrays if key.startswith(self.prefix)]

    def unused(self) -> list[str]:
        return sorted(key for key in self.arrays if key.startswith(self.prefix) and key not in self.used)

    def misfit(self, error: Exception, what: str) -> VitlabError:
        """The error for an array whose rank or shape does not fit the others, naming the array taken last."""
        where = f" at {self.last!r} {tuple(self.arrays[self.last].shape)}" if self.last else ""
        return VitlabError(f"{self.source}: the arrays do not form {what}{where}: {error}")

    def check_all_used(self, family: str) -> None:
        """Refuse arrays that no parameter took: a checkpoint of another shape or variant, not silently ignored."""
        unused = self.unused()
        if unused:
            raise VitlabError(f"{self.source}: {len(unused)} array(s) that no vitlab {family} parameter takes: "
                              f"{describe_keys(unused, {key: self.arrays[key].shape for key in unused})}")


def _is_square(count: int) -> bool:
    return count >= 0 and math.isqrt(count) ** 2 == count


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def conv_from_hwio(kernel: np.ndarray) -> torch.Tensor:
    """A Flax (H, W, in, out) convolution kernel as torch's (out, in, H, W)."""
    if kernel.ndim != 4:
        raise ValueError(f"expected a 4-d HWIO kernel, got shape {kernel.shape}")
    return _tensor(kernel.transpose(3, 2, 0, 1))


def conv_to_hwio(weight: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(weight.detach().to("cpu", torch.float32).numpy().transpose(2, 3, 1, 0))


def vector(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy().copy()


def unit_counts(reader: _Reader, pattern: str, source: str) -> list[int]:
    """Units per ResNet stage from names matching `pattern` (groups: stage, unit; both numbered from 1)."""
    found: dict[int, set[int]] = {}
    for name in reader.names():
        if match := re.match(pattern, name):
            found.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    stages = sorted(found)
    if stages != list(range(1, len(stages) + 1)) or any(found[s] != set(range(1, len(found[s]) + 1)) for s in stages):
        raise VitlabError(f"{source}: ResNet blocks and units are not numbered from 1 without gaps: "
                          f"{ {stage: sorted(units) for stage, units in sorted(found.items())} }")
    return [len(found[stage]) for stage in stages]


# The hybrid's ResNet stem (vision_transformer's models_vit.py / models_resnet.py) beside the ViT arrays:
#   conv_root/kernel, gn_root/{scale,bias}                        → patch_embed.backbone.stem.{conv,norm}
#   block{s}/unit{u}/conv{1,2,3}/kernel, gn{1,2,3}/{scale,bias}   → ...stages.{s-1}.blocks.{u-1}.{conv,norm}{1,2,3}
#   block{s}/unit1/conv_proj/kernel, gn_proj/{scale,bias}         → ...stages.{s-1}.blocks.0.downsample.{conv,norm}
HYBRID_MARKER = "conv_root/kernel"
_BACKBONE = "patch_embed.backbone."


def _hybrid_parts(has_projection: bool) -> list[tuple[str, str, str, str]]:
    """(npz conv, npz norm, vitlab conv, vitlab norm) names inside one residual unit."""
    parts = [(f"conv{i}", f"gn{i}", f"conv{i}", f"norm{i}") for i in (1, 2, 3)]
    return parts + [("conv_proj", "gn_proj", "downsample.conv", "downsample.norm")] if has_projection else parts


def _hybrid_to_state_dict(reader: _Reader, source: str) -> tuple[dict[str, torch.Tensor], tuple[int, ...], int]:
    """The hybrid's ResNet stem as `patch_embed.backbone.*` tensors, its stage depths and its input channels."""
    stem = reader.take(HYBRID_MARKER)
    state = {f"{_BACKBONE}stem.conv.weight": conv_from_hwio(stem),
             f"{_BACKBONE}stem.norm.weight": _tensor(reader.take("gn_root/scale").ravel()),
             f"{_BACKBONE}stem.norm.bias": _tensor(reader.take("gn_root/bias").ravel())}
    layers = tuple(unit_counts(reader, r"block(\d+)/unit(\d+)/", source))
    if not layers:
        raise VitlabError(f"{source}: a hybrid checkpoint ({reader.prefix + HYBRID_MARKER!r}) without ResNet "
                          "stages (block1/unit1/...); stem-only hybrids are not supported")
    for stage, units in enumerate(layers):
        for unit in range(units):
            name, out = f"block{stage + 1}/unit{unit + 1}/", f"{_BACKBONE}stages.{stage}.blocks.{unit}."
            for conv, norm, conv_out, norm_out in _hybrid_parts(reader.has(f"{name}conv_proj/kernel")):
                state[f"{out}{conv_out}.weight"] = conv_from_hwio(reader.take(f"{name}{conv}/kernel"))
                state[f"{out}{norm_out}.weight"] = _tensor(reader.take(f"{name}{norm}/scale").ravel())
                state[f"{out}{norm_out}.bias"] = _tensor(reader.take(f"{name}{norm}/bias").ravel())
    return state, layers, stem.shape[2]


def _hybrid_from_state_dict(state: dict[str, torch.Tensor], layers: tuple[int, ...]) -> dict[str, np.ndarray]:
    out = {HYBRID_MARKER: conv_to_hwio(state[f"{_BACKBONE}stem.conv.weight"]),
           "gn_root/scale": vector(state[f"{_BACKBONE}stem.norm.weight"]),
           "gn_root/bias": vector(state[f"{_BACKBONE}stem.norm.bias"])}
    for stage, units in enumerate(layers):
        for unit in range(units):
            name, src = f"block{stage + 1}/unit{unit + 1}/", f"{_BACKBONE}stages.{stage}.blocks.{unit}."
            for conv, norm, conv_src, norm_src in _hybrid_parts(f"{src}downsample.conv.weight" in state):
                out[f"{name}{conv}/kernel"] = conv_to_hwio(state[f"{src}{conv_src}.weight"])
                out[f"{name}{norm}/scale"] = vector(state[f"{src}{norm_src}.weight"])
                out[f"{name}{norm}/bias"] = vector(state[f"{src}{norm_src}.bias"])
    return out


def to_state_dict(arrays: dict[str, np.ndarray], source: str
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any], tuple[int, int] | None]:
    """Convert a checkpoint's arrays to a vitlab state dict.

    Returns the state dict, the ViTConfig fields the arrays determine, and the square patch grid the position
    embedding was trained at (None when it has none, or its grid is not square).
    """
    reader = _Reader(arrays, find_prefix(arrays, source), source)
    try:
        return _convert(reader, arrays, source)
    except VitlabError:
        raise
    except (ValueError, IndexError, TypeError) as error:  # an array whose shape does not fit the others
        raise reader.misfit(error, "a hybrid ViT" if reader.has(HYBRID_MARKER) else "a ViT") from None


def _convert(reader: _Reader, arrays: dict[str, np.ndarray], source: str
             ) -> tuple[dict[str, torch.Tensor], dict[str, Any], tuple[int, int] | None]:
    if reader.has("MAPHead_0/probe"):
        raise VitlabError(f"{source}: attention-pooling (MAP) heads are not supported (found "
                          f"{reader.prefix + 'MAPHead_0/probe'!r})")

    kernel = reader.take("embedding/kernel")
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1]:
        raise VitlabError(f"{source}: 'embedding/kernel' has shape {kernel.shape}; expected a square "
                          "(P, P, C, D) convolution kernel")
    patch, _, in_chans, dim = kernel.shape
    state: dict[str, torch.Tensor] = {
        "patch_embed.proj.weight": _tensor(kernel.transpose(3, 2, 0, 1)),
        "patch_embed.proj.bias": _tensor(reader.take("embedding/bias").reshape(dim)),
    }
    hybrid_layers = None
    if reader.has(HYBRID_MARKER):  # the embedding then cuts the stem's feature map, not the image
        backbone, hybrid_layers, in_chans = _hybrid_to_state_dict(reader, source)
        state.update(backbone)
    class_token = reader.has("cls")
    if class_token:
        state["cls_token"] = _tensor(reader.take("cls").reshape(1, 1, dim))

    grid = None
    posemb_key = next((key for key in ("Transformer/posembed_input/pos_embedding", "pos_embedding")
                       if reader.has(key)), None)
    if posemb_key is not None:
        posemb = reader.take(posemb_key).reshape(1, -1, dim)
        rows = posemb.shape[1]
        # VT stores a class-token row; big_vision adds the embedding before prepending the class token, so its
        # table has none (old files that do have one are recognisable by a square-plus-one row count).
        has_cls_row = class_token and (posemb_key.startswith("Transformer/")
                                       or (_is_square(rows - 1) and not _is_square(rows)))
        if class_token and not has_cls_row:
            posemb = np.concatenate([np.zeros((1, 1, dim), np.float32), posemb], axis=1)
        state["pos_embed"] = _tensor(posemb)
        grid_rows = posemb.shape[1] - int(class_token)
        if _is_square(grid_rows):
            grid = (math.isqrt(grid_rows),) * 2

    scanned = reader.has("Transformer/encoderblock/LayerNorm_0/scale")
    if scanned:
        depth = reader.shape("Transformer/encoderblock/LayerNorm_0/scale")[0]
        submodules = _BV_SUBMODULES
    else:
        indices = {int(match.group(1)) for name in reader.names()
                   if (match := re.match(r"Transformer/encoderblock_(\d+)/", name))}
        depth = len(indices)
        if indices != set(range(depth)):
            raise VitlabError(f"{source}: encoder blocks are not numbered 0..{depth - 1}: {sorted(indices)}")
        vt_names = reader.has("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel")
        submodules = _VT_SUBMODULES if vt_names else _BV_SUBMODULES
    mha, mlp, ln2 = submodules
    num_heads = head_dim = 0
    qkv_bias = True
    for i in range(depth):
        block, index = (("Transformer/encoderblock/", i) if scanned else (f"Transformer/encoderblock_{i}/", None))
        attn = f"{block}MultiHeadDotProductAttention_{mha}/"
        out = f"blocks.{i}."
        query = reader.take(f"{attn}query/kernel", index)
        if query.ndim != 3:
            raise VitlabError(f"{source}: {reader.prefix}{attn}query/kernel has shape {query.shape}; "
                              "expected (D, heads, head_dim)")
        num_heads, head_dim = query.shape[1], query.shape[2]
        state[out + "norm1.weight"] = _tensor(reader.take(f"{block}LayerNorm_0/scale", index).reshape(dim))
        state[out + "norm1.bias"] = _tensor(reader.take(f"{block}LayerNorm_0/bias", index).reshape(dim))
        state[out + "attn.qkv.weight"] = _tensor(np.concatenate(
            [reader.take(f"{attn}{name}/kernel", index).reshape(dim, -1).T for name in ("query", "key", "value")]))
        qkv_bias = reader.has(f"{attn}query/bias")
        if qkv_bias:
            state[out + "attn.qkv.bias"] = _tensor(np.concatenate(
                [reader.take(f"{attn}{name}/bias", index).reshape(-1) for name in ("query", "key", "value")]))
        state[out + "attn.proj.weight"] = _tensor(reader.take(f"{attn}out/kernel", index).reshape(-1, dim).T)
        state[out + "attn.proj.bias"] = _tensor(reader.take(f"{attn}out/bias", index).reshape(dim))
        state[out + "norm2.weight"] = _tensor(reader.take(f"{block}LayerNorm_{ln2}/scale", index).reshape(dim))
        state[out + "norm2.bias"] = _tensor(reader.take(f"{block}LayerNorm_{ln2}/bias", index).reshape(dim))
        for j in range(2):
            dense = f"{block}MlpBlock_{mlp}/Dense_{j}/"
            state[out + f"mlp.fc{j + 1}.weight"] = _tensor(reader.take(dense + "kernel", index).T)
            state[out + f"mlp.fc{j + 1}.bias"] = _tensor(reader.take(dense + "bias", index).reshape(-1))
    state["norm.weight"] = _tensor(reader.take("Transformer/encoder_norm/scale").reshape(dim))
    state["norm.bias"] = _tensor(reader.take("Transformer/encoder_norm/bias").reshape(dim))

    representation_size = None
    if reader.has("pre_logits/kernel"):
        pre_kernel = reader.take("pre_logits/kernel")
        representation_size = pre_kernel.shape[1]
        state["pre_logits.fc.weight"] = _tensor(pre_kernel.T)
        state["pre_logits.fc.bias"] = _tensor(reader.take("pre_logits/bias").reshape(-1))
    num_classes = 0
    if reader.has("head/kernel"):
        head_kernel = reader.take("head/kernel")
        num_classes = head_kernel.shape[1]
        state["head.weight"] = _tensor(head_kernel.T)
        state["head.bias"] = _tensor(reader.take("head/bias").reshape(-1))

    reader.check_all_used("ViT")
    if depth == 0:
        raise VitlabError(f"{source}: no encoder blocks found under {reader.prefix!r}Transformer/")
    fields: dict[str, Any] = {
        "patch_size": patch, "in_chans": in_chans, "embed_dim": dim, "depth": depth, "num_heads": num_heads,
        "mlp_dim": state["blocks.0.mlp.fc1.weight"].shape[0], "qkv_bias": qkv_bias,
        "pool": "token" if class_token else "gap", "posemb": "learned" if posemb_key else "sincos2d",
        "representation_size": representation_size, "num_classes": num_classes, "hybrid_layers": hybrid_layers,
        **GOOGLE_NUMERICS,
    }
    if hybrid_layers is not None:
        fields["hybrid_numerics"] = "flax"
    if grid is not None:
        stride = patch * (1 if hybrid_layers is None else ResNetConfig(layers=hybrid_layers, stem="same").stride)
        fields["img_size"] = (grid[0] * stride, grid[1] * stride)
    if num_heads * head_dim != dim:
        raise VitlabError(f"{source}: attention has {num_heads} heads of size {head_dim}, which does not "
                          f"match the embedding width {dim}")
    return state, fields, grid


def warn_unless_google_numerics(config: Any) -> None:
    """One warning line when a model written to `.npz` computes otherwise than the official code, which (like
    vitlab) reads the file with the tanh GELU and the Flax weight standardisation."""
    differ = []
    if getattr(config, "act", "gelu_tanh") != "gelu_tanh":
        differ.append(f"act={config.act!r} (the official code and vitlab read .npz with 'gelu_tanh')")
    if getattr(config, "hybrid_layers", None) is not None and config.hybrid_numerics != "flax":
        differ.append(f"hybrid_numerics={config.hybrid_numerics!r} (.npz hybrids are read with 'flax')")
    if differ:
        warnings.warn(f"the .npz file cannot record {' and '.join(differ)}: its logits will differ slightly from "
                      "this model's", stacklevel=3)


def from_state_dict(state: dict[str, torch.Tensor], config: ViTConfig) -> dict[str, np.ndarray]:
    """A vitlab state dict as VT/AugReg-layout arrays (float32, pre-linen names); warns when the model computes
    otherwise than the official code will on them."""
    warn_unless_google_numerics(config)
    def array(key: str) -> np.ndarray:
        return state[key].detach().to("cpu", torch.float32).numpy()

    dim, heads = config.embed_dim, config.num_heads
    head_dim = dim // heads
    mha, mlp, ln2 = _VT_SUBMODULES
    out: dict[str, np.ndarray] = {
        "embedding/kernel": array("patch_embed.proj.weight").transpose(2, 3, 1, 0),
        "embedding/bias": array("patch_embed.proj.bias"),
        "Transformer/encoder_norm/scale": array("norm.weight"),
        "Transformer/encoder_norm/bias": array("norm.bias"),
    }
    if "cls_token" in state:
        out["cls"] = array("cls_token")
    if "pos_embed" in state:
        out["Transformer/posembed_input/pos_embedding"] = array("pos_embed")
    if config.hybrid_layers is not None:
        out.update(_hybrid_from_state_dict(state, config.hybrid_layers))
    for i in range(config.depth):
        block, src = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        attn = f"{block}MultiHeadDotProductAttention_{mha}/"
        out[f"{block}LayerNorm_0/scale"] = array(src + "norm1.weight")
        out[f"{block}LayerNorm_0/bias"] = array(src + "norm1.bias")
        for name, weight in zip(("query", "key", "value"), np.split(array(src + "attn.qkv.weight"), 3), strict=True):
            out[f"{attn}{name}/kernel"] = weight.T.reshape(dim, heads, head_dim)
        if src + "attn.qkv.bias" in state:
            for name, bias in zip(("query", "key", "value"), np.split(array(src + "attn.qkv.bias"), 3), strict=True):
                out[f"{attn}{name}/bias"] = bias.reshape(heads, head_dim)
        out[f"{attn}out/kernel"] = array(src + "attn.proj.weight").T.reshape(heads, head_dim, dim)
        out[f"{attn}out/bias"] = array(src + "attn.proj.bias")
        out[f"{block}LayerNorm_{ln2}/scale"] = array(src + "norm2.weight")
        out[f"{block}LayerNorm_{ln2}/bias"] = array(src + "norm2.bias")
        for j in range(2):
            out[f"{block}MlpBlock_{mlp}/Dense_{j}/kernel"] = array(src + f"mlp.fc{j + 1}.weight").T
            out[f"{block}MlpBlock_{mlp}/Dense_{j}/bias"] = array(src + f"mlp.fc{j + 1}.bias")
    if "pre_logits.fc.weight" in state:
        out["pre_logits/kernel"] = array("pre_logits.fc.weight").T
        out["pre_logits/bias"] = array("pre_logits.fc.bias")
    if "head.weight" in state:
        out["head/kernel"] = array("head.weight").T
        out["head/bias"] = array("head.bias")
    return {key: np.ascontiguousarray(value) for key, value in out.items()}


def write_npz(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> None:
    """Write arrays as an uncompressed `.npz` (what `np.load` and the official loader expect), atomically."""
    with atomic_writer(path) as handle:
        np.savez(handle, **arrays)
