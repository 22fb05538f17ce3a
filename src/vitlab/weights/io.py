"""One entry point for every weight format: detect it, map it to vitlab's keys, fit it to a model, load it.

Formats: vitlab safetensors (config in the "vitlab_config" metadata; training checkpoints keep the weights
under `model/`), Google `.npz`, timm (`.safetensors`, or `.pth`/`.bin` read tensor-only), and Hugging Face
model directories. Each model family has its own converters (`npz`, `timm` and `hf` for the ViT and its hybrid,
`resnet` for BiT, `mixer` for the MLP-Mixer; the Perceiver has only vitlab files); a file is read into its family's
vitlab layout and loads only into a model of that family.
Position embeddings are resampled to the model's grid: with the official bilinear (align_corners=True) mode for
`.npz`, as the official fine-tuning code does, else with the model's own mode.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitlab.atomic import atomic_writer
from vitlab.errors import VitlabError
from vitlab.models.checks import check_sane_sizes
from vitlab.models.layers import resample_position_embedding
from vitlab.models.mixer import MixerConfig
from vitlab.models.registry import (apply_overrides, build_model, config_from_dict, config_to_dict, family_of,
                                    get_family, model_config)
from vitlab.models.resnet import ResNetConfig
from vitlab.models.vit import ViTConfig
from vitlab.weights import hf, hub, mixer, npz, resnet, timm
from vitlab.weights.card import ModelCard, Preprocessing, card_from_hf, hf_labels, hf_processor_config
from vitlab.weights.checksums import verified_tensor_file
from vitlab.weights.files import describe_keys, load_torch_tensors, read_safetensors, write_safetensors

FORMATS = ("vitlab", "npz", "timm", "hf")
CONFIG_METADATA_KEY = "vitlab_config"
MODEL_PREFIX = "model/"  # training checkpoints: the weights to use; other prefixes hold optimiser/EMA state
RUN_FILES = ("best.safetensors", "last.safetensors")
HF_PROCESSOR_NAME = "preprocessor_config.json"
TIMM_WEIGHTS_NAME = "model.safetensors"  # timm's Hugging Face Hub layout: these two files in one directory
TIMM_CONFIG_NAME = "config.json"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# What `load_model(path, model_name)` takes from the file rather than from the named model.
_FILE_FIELDS_WITH_NAME = ("num_classes", "img_size", "representation_size", "pool", "qkv_bias", "act",
                          "hybrid_numerics")
# How a model computes beyond its parameters; `load_weights` gives the model the file's (see `_apply_numerics`).
_NUMERICS_FIELDS = ("act", "hybrid_numerics", "numerics")
# Head weights: a linear head, and the ResNet's 1×1-convolution head (timm's and BiT's).
_HEAD_WEIGHTS = ("head.weight", "head.fc.weight")


@dataclass
class WeightFile:
    """A checkpoint read into vitlab's key layout, with what the file says about the model it came from."""

    path: Path
    format: str
    state_dict: dict[str, torch.Tensor]
    fields: dict[str, Any]  # config fields the file determines
    config: Any | None  # the complete model config, when the file records or implies one
    grid: tuple[int, int] | None  # patch grid the position embedding was trained at, when known
    resample: str | None = None  # position-embedding resample mode the format prescribes
    family: str = "vit"  # the registry family whose layout `state_dict` is in
    card: ModelCard = field(default_factory=ModelCard)  # class names and preprocessing, where the file has them


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """The file to read for `path`: itself, or a training run directory's best (else last) checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    if path.is_dir() and not (path / hf.CONFIG_NAME).is_file():
        for name in RUN_FILES:
            if (path / name).is_file():
                return path / name
        raise VitlabError(f"{path}: a directory, but neither a Hugging Face model ({hf.CONFIG_NAME}) nor a vitlab "
                          f"run ({' or '.join(RUN_FILES)})")
    return path


def read_weights(path: str | os.PathLike[str]) -> WeightFile:
    """Detect the format of `path` and read it into vitlab's layout (no model needed)."""
    path = resolve_path(path)
    source = str(path)
    if path.is_dir():
        if _is_timm_directory(path):
            return _timm_directory(path)
        state, fields = hf.read_directory(path)
        processor = path / HF_PROCESSOR_NAME
        card = card_from_hf(hf._read_json_object(path / hf.CONFIG_NAME),
                            hf._read_json_object(processor) if processor.is_file() else None,
                            fields["num_classes"], source)
        return WeightFile(path, "hf", state, fields, _complete_config(fields, source), _grid_of(fields), card=card)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        arrays = npz.read_npz(path)
        if resnet.is_bit_npz(arrays):
            return _resnet_file(path, "npz", *resnet.bit_to_state_dict(arrays, source))
        if mixer.is_mixer_npz(arrays):
            return _mixer_file(path, "npz", *mixer.to_state_dict(arrays, source))
        state, fields, grid = npz.to_state_dict(arrays, source)
        return WeightFile(path, "npz", state, fields, _complete_config(fields, source), grid, "official")
    metadata: dict[str, str] = {}
    if suffix == ".safetensors":
        path = verified_tensor_file(path)  # a run's checkpoint: its record's checksum, with resume's fallback
        tensors, metadata = read_safetensors(path)
        if CONFIG_METADATA_KEY in metadata:
            file = _vitlab_file(path, tensors, metadata[CONFIG_METADATA_KEY])
            file.card = ModelCard.from_metadata(metadata, source)
            return file
    elif suffix in TORCH_SUFFIXES:
        tensors = load_torch_tensors(path)
    else:
        raise VitlabError(f"{path}: unknown weight format {suffix or '(no extension)'!r}; expected .safetensors, "
                          f".npz, {', '.join(TORCH_SUFFIXES)} or a Hugging Face model directory")
    keys = set(timm.strip_wrapper_prefix(tensors))
    if hf.looks_like_hf(keys):
        state, file_format = hf.to_state_dict(timm.strip_wrapper_prefix(tensors), source), "hf"
    elif timm.looks_like_timm(keys):
        state, file_format = timm.to_state_dict(tensors, source), "timm"
    elif resnet.looks_like_timm(keys):
        state = timm.strip_wrapper_prefix(tensors)
        numerics = timm.numerics_from_metadata(metadata, ResNetConfig, source)
        return _resnet_file(path, "timm", state,
                            dataclasses.replace(resnet.config_from_state_dict(state, source), **numerics))
    elif mixer.looks_like_timm(keys):
        state = timm.strip_wrapper_prefix(tensors)
        numerics = timm.numerics_from_metadata(metadata, MixerConfig, source)
        return _mixer_file(path, "timm", state,
                           dataclasses.replace(mixer.config_from_state_dict(state, source), **numerics))
    else:
        raise VitlabError(f"{path}: keys match neither timm nor Hugging Face ViT, nor timm's BiT ResNet or "
                          f"MLP-Mixer: {describe_keys(sorted(keys))}")
    fields, grid = _shape_fields(state, source)
    fields.update(timm.numerics_from_metadata(metadata, ViTConfig, source))
    return WeightFile(path, file_format, state, fields, None, grid)


def _is_timm_directory(path: Path) -> bool:
    """timm's Hub layout: a config.json naming an `architecture` (HF's names a `model_type`) and model.safetensors."""
    data = hf._read_json_object(path / TIMM_CONFIG_NAME)
    return "architecture" in data and "model_type" not in data and (path / TIMM_WEIGHTS_NAME).is_file()


def _timm_directory(path: Path) -> WeightFile:
    """A timm Hub directory: the weights as a timm file, the config from `model_args` (as `save_weights` writes
    them; a directory without them needs a model name, as any timm file does) and the card from `label_names` and
    `pretrained_cfg`."""
    source = str(path)
    data = hf._read_json_object(path / TIMM_CONFIG_NAME)
    state = timm.to_state_dict(read_safetensors(path / TIMM_WEIGHTS_NAME)[0], source)
    fields, grid = _shape_fields(state, source)
    config = None
    if isinstance(data.get("model_args"), dict):
        config = timm.config_from_model_args(data["model_args"], source)
        fields = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    cfg = data.get("pretrained_cfg") if isinstance(data.get("pretrained_cfg"), dict) else {}
    preprocessing = None
    if "mean" in cfg:
        preprocessing = Preprocessing.from_dict({**cfg, "crop_mode": cfg.get("crop_mode", "center"),
                                                 "crop_pct": cfg.get("crop_pct") or 1.0}, f"{source}: pretrained_cfg")
    classes = data.get("label_names", cfg.get("label_names"))
    card = ModelCard(tuple(map(str, classes)) if isinstance(classes, list) else None, preprocessing)
    return WeightFile(path, "timm", state, fields, config, grid, card=card)


def _vitlab_file(path: Path, tensors: dict[str, torch.Tensor], config_json: str) -> WeightFile:
    try:
        data = json.loads(config_json)
    except (ValueError, RecursionError) as error:  # not JSON, or nested beyond what the parser recurses into
        detail = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise VitlabError(f"{path}: metadata {CONFIG_METADATA_KEY!r} is not valid JSON ({detail})") from None
    if not isinstance(data, dict):
        raise VitlabError(f"{path}: metadata {CONFIG_METADATA_KEY!r} must be a JSON object, got "
                          f"{type(data).__name__}")
    config = config_from_dict(data, source=str(path))
    if any("/" in key for key in tensors):  # a training checkpoint: model/, optim/, ema/, train/ ...
        tensors = {key[len(MODEL_PREFIX):]: value for key, value in tensors.items() if key.startswith(MODEL_PREFIX)}
        if not tensors:
            raise VitlabError(f"{path}: a vitlab checkpoint with prefixed keys but no {MODEL_PREFIX!r} weights")
    fields = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    return WeightFile(path, "vitlab", tensors, fields, config, getattr(config, "grid_size", None),
                      family=family_of(config))


def _resnet_file(path: Path, file_format: str, state: dict[str, torch.Tensor], config: ResNetConfig) -> WeightFile:
    """A ResNet's weights fix every field but the image size, which only says what size data is prepared at."""
    fields = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)
              if field.name != "img_size"}
    return WeightFile(path, file_format, state, fields, config, None, family="resnet")


def _mixer_file(path: Path, file_format: str, state: dict[str, torch.Tensor], config: MixerConfig) -> WeightFile:
    """A Mixer's weights fix its whole shape, the image size included: the token MLP is as wide as the patch count."""
    fields = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    return WeightFile(path, file_format, state, fields, config, config.grid_size, family="mixer")


def _complete_config(fields: dict[str, Any], source: str) -> ViTConfig | None:
    """A ViTConfig from fields that describe a whole model; None when the image size cannot be told: a learned
    position embedding whose grid is not square, or none at all (sin-cos or no position embedding), whose image size
    a `.npz` has no place for, so it is not guessed."""
    if "img_size" not in fields:
        return None
    try:
        return ViTConfig(**fields)
    except (TypeError, ValueError) as error:  # VitlabError is a ValueError
        raise VitlabError(f"{source}: the weights describe an invalid model ({error})") from None


def _grid_of(fields: dict[str, Any]) -> tuple[int, int] | None:
    size = fields.get("img_size")
    if size is None:
        return None
    height, width = (size, size) if isinstance(size, int) else size
    return (int(height) // fields["patch_size"], int(width) // fields["patch_size"])


def _shape_fields(state: dict[str, torch.Tensor], source: str = "weights"
                  ) -> tuple[dict[str, Any], tuple[int, int] | None]:
    """What a vitlab-layout state dict's shapes say beyond the architecture a model name fixes: classes, pooling,
    biases, pre-logits width and, when its grid is square, the image size (returned with the grid)."""
    for key, ndim in (("head.weight", 2), ("pre_logits.fc.weight", 2), ("pos_embed", 3)):
        if key in state and state[key].ndim != ndim:
            raise VitlabError(f"{source}: {key} has shape {tuple(state[key].shape)}; expected {ndim} dimensions")
    hybrid_layers = resnet.stage_depths(state, "patch_embed.backbone.", source) or None
    stride = state["patch_embed.proj.weight"].shape[2]  # pixels per token: the patch, times a hybrid stem's stride
    if hybrid_layers is not None:
        stride *= ResNetConfig(layers=hybrid_layers, stem="same").stride
    class_token = "cls_token" in state
    fields: dict[str, Any] = {
        "pool": "token" if class_token else "gap", "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "num_classes": state["head.weight"].shape[0] if "head.weight" in state else 0,
        "representation_size": state["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in state else None,
    }
    grid = None
    if "pos_embed" in state:
        rows = state["pos_embed"].shape[1] - int(class_token)
        side = math.isqrt(max(rows, 0))
        if side * side == rows:
            grid = (side, side)
            fields["img_size"] = (side * stride, side * stride)
    return fields, grid


def _fit_position_embedding(state: dict[str, torch.Tensor], model: nn.Module, file: WeightFile) -> None:
    """Resample the file's position embedding to the model's patch grid, keeping the class-token row."""
    wanted = getattr(model, "pos_embed", None)
    source = state.get("pos_embed")
    if wanted is None or source is None or source.ndim != 3 or source.shape[2] != wanted.shape[2]:
        return  # the key check reports it
    if ("cls_token" in state) != (getattr(model, "cls_token", None) is not None):
        return  # a class-token mismatch is reported as a missing/unexpected key, not papered over here
    target_grid = model.config.grid_size
    grid = file.grid
    prefix = model.num_prefix_tokens
    if grid is not None and grid[0] * grid[1] + prefix != source.shape[1]:
        grid = None
    if source.shape[1] == wanted.shape[1] and grid in (None, target_grid):
        return
    try:
        state["pos_embed"] = resample_position_embedding(source, target_grid, prefix, grid,
                                                         file.resample or model.config.posemb_resample)
    except (VitlabError, RuntimeError) as error:  # RuntimeError: the target grid does not fit in memory
        raise VitlabError(f"{file.path}: cannot resample pos_embed {tuple(source.shape)} to the model's "
                          f"{target_grid[0]}x{target_grid[1]} grid: {error}") from None


def _fit_head(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], model: nn.Module,
              reset_head: bool, path: Path) -> set[str]:
    """Drop a head (and pre-logits) that does not fit the model when allowed, zeroing the model's head instead;
    otherwise say why it does not fit. Returns the model keys thus left to their (zero) values."""
    file_pre = state.get("pre_logits.fc.weight")
    dropped = False
    if file_pre is not None and "pre_logits.fc.weight" not in target:
        if not reset_head:
            raise VitlabError(f"{path}: the checkpoint has a pre-logits layer (pre_logits.fc.weight "
                              f"{tuple(file_pre.shape)}, representation_size={file_pre.shape[0]}) that the model "
                              f"lacks; build the model with representation_size={file_pre.shape[0]}, or pass "
                              "reset_head=True to drop it together with the head (the official fine-tuning recipe)")
        for key in [key for key in state if key.startswith(("pre_logits.", "head."))]:
            del state[key]
        dropped = True
    file_key = next((key for key in _HEAD_WEIGHTS if key in state), None)
    model_key = next((key for key in _HEAD_WEIGHTS if key in target), None)
    file_shape = None if file_key is None else tuple(state[file_key].shape)
    model_shape = None if model_key is None else tuple(target[model_key].shape)
    pre_logits = "pre_logits.fc.weight" in state or "pre_logits.fc.weight" in target  # the head reads its output
    if file_shape and model_shape and file_shape[1:] != model_shape[1:] and not pre_logits:
        raise VitlabError(f"{path}: head does not match: the checkpoint's head reads {file_shape[1]} features and "
                          f"the model's {model_shape[1]}, so the weights are of a model of another width")
    if not dropped and file_shape != model_shape:
        if not reset_head:
            def describe(key: str | None, shape: tuple[int, ...] | None) -> str:
                return "no head" if shape is None else f"{key} {shape} ({shape[0]} classes)"

            raise VitlabError(f"{path}: head does not match: checkpoint has {describe(file_key, file_shape)}, "
                              f"model has {describe(model_key, model_shape)}; to train a new zero-initialised head, "
                              "pass reset_head=True (`vitlab finetune` does)")
        for key in [key for key in state if key.startswith("head.")]:
            del state[key]
        dropped = True
    head = getattr(model, "head", None)
    if not dropped or not isinstance(head, nn.Module):
        return set()
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.zero_()
    return {key for key in target if key.startswith("head.")}


def _check_keys(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], strict: bool,
                file: WeightFile, reset: set[str]) -> None:
    missing = [key for key in target if key not in state and key not in reset]
    unexpected = [key for key in state if key not in target]
    mismatched = [key for key in state if key in target and state[key].shape != target[key].shape]
    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing: {describe_keys(missing, {k: target[k].shape for k in missing})}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected: "
                        f"{describe_keys(unexpected, {k: state[k].shape for k in unexpected})}")
    if mismatched:
        shown = ", ".join(f"{key} file {tuple(state[key].shape)} vs model {tuple(target[key].shape)}"
                          for key in mismatched[:5])
        more = f" and {len(mismatched) - 5} more" if len(mismatched) > 5 else ""
        problems.append(f"{len(mismatched)} with different shapes: {shown}{more}")
    if problems:
        raise VitlabError(f"{file.path} ({file.format} weights) does not fit the model: " + "; ".join(problems))


def _fitted_state(model: nn.Module, file: WeightFile, reset_head: bool, strict: bool
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The file's state fitted to the model (position embedding resampled, head dropped if allowed), checked."""
    family = family_of(model.config)
    if family != file.family:
        raise VitlabError(f"{file.path} holds {file.family} weights ({file.format}); the model is a {family} "
                          f"({type(model).__name__})")
    state = dict(file.state_dict)
    target = model.state_dict()
    _fit_position_embedding(state, model, file)
    reset = _fit_head(state, target, model, reset_head, file.path)
    _check_keys(state, target, strict, file, reset)
    return state, target


def _load_into(model: nn.Module, file: WeightFile, reset_head: bool, strict: bool) -> nn.Module:
    state, target = _fitted_state(model, file, reset_head, strict)
    model.load_state_dict({key: value for key, value in state.items() if key in target}, strict=False)
    return model


def load_weights(model: nn.Module, path: str | os.PathLike[str], *, reset_head: bool = False,
                 strict: bool = True) -> nn.Module:
    """Load any supported weight file into `model` (in place; returned for chaining).

    The position embedding is resampled to the model's grid. A head (or pre-logits layer) that does not fit the
    model is refused unless `reset_head`, which drops it and zeroes the model's head, as for fine-tuning.
    `strict=False` tolerates missing and unexpected keys; differing shapes are always an error. The model then
    computes as the weights' source does: the tanh GELU (and, in a hybrid, the Flax weight standardisation) for
    Google's `.npz`, the exact GELU for timm and Hugging Face, the recorded config for vitlab files.
    """
    file = read_weights(path)
    _load_into(model, file, reset_head, strict)
    _apply_numerics(model, file)
    return model


def _apply_numerics(model: nn.Module, file: WeightFile) -> None:
    """Switch the model to the file's activation and weight standardisation where they differ."""
    config = getattr(model, "config", None)
    changes = {name: file.fields[name] for name in _NUMERICS_FIELDS
               if name in file.fields and getattr(config, name, file.fields[name]) != file.fields[name]}
    if changes and hasattr(model, "set_numerics"):
        model.set_numerics(**changes)


def locate(spec: str | os.PathLike[str], model_name: str | None = None, mirror: str | None = None
           ) -> tuple[Path, ModelCard | None]:
    """The local file for `spec` and the catalogue's card when it is a catalogue name.

    A path that exists always wins; otherwise a catalogue name (`vit-s16:augreg-in21k-ft-in1k`, a bare tag with
    `model_name`, timm's or Hugging Face's spelling) is downloaded once into the cache, verified, and its path
    returned. Anything else that exists nowhere is a missing file, or a one-line error naming close matches."""
    path = Path(spec)
    if path.exists() or not hub.looks_like_name(str(spec)):
        return path, None
    entry = hub.resolve_name(str(spec), model_name)
    return hub.download(entry, mirror=mirror), entry.card()


def load_model(path: str | os.PathLike[str], model_name: str | None = None, **overrides: Any) -> nn.Module:
    """Build the model a weight file (or catalogue name, see `locate`) describes and load it.

    vitlab files, Hugging Face directories and `.npz` files carry or imply their config (a `model_name` given
    for them is only checked against it). timm files do not record the head count, so they need `model_name`,
    whose config then takes the file's class count, image size, pooling, qkv biases and pre-logits width.
    `overrides` (e.g. `img_size=384`, `num_classes=10`) change the config before loading; a changed class count
    or pre-logits width starts a new zero head. The model's `card` attribute holds the file's class names and
    preprocessing (for a catalogue name: the catalogue's preprocessing).
    """
    path, catalogue_card = locate(path, model_name)
    file = read_weights(path)
    card = catalogue_card or file.card
    if file.config is not None:
        config = file.config
        if model_name is not None:
            _check_named(config, model_name, file.path, file.family)
            if "img_size" not in file.fields:  # a ResNet's weights do not say what size its data has
                config = dataclasses.replace(config, img_size=model_config(model_name).img_size)
    elif model_name is not None:
        _check_named(None, model_name, file.path, file.family)
        config = apply_overrides(model_config(model_name),
                                 {key: file.fields[key] for key in _FILE_FIELDS_WITH_NAME if key in file.fields})
    elif file.format in ("npz", "hf"):
        if "img_size" not in overrides:
            raise VitlabError(f"{file.path}: the file does not record the image size (its position embedding is "
                              f"{'not a square grid' if file.fields.get('posemb') == 'learned' else 'not stored'}); "
                              "pass img_size=(height, width), or the model's name (`--img-size N` or `--model NAME` "
                              "on the command line)")
        config = ViTConfig(**{**file.fields, "img_size": overrides["img_size"]})
    else:
        raise VitlabError(f"{file.path}: {file.format} weights do not record the number of attention heads; "
                          "pass model_name (`--model NAME` on the command line; see `vitlab models`)")
    config = apply_overrides(config, overrides)
    check_sane_sizes(config, str(file.path))
    reset_head = bool({"num_classes", "representation_size"} & set(overrides))
    model = _load_into(_uninitialised_model(config, file, reset_head), file, reset_head=reset_head, strict=True)
    model.card = card.for_model(model.config.num_classes)
    return model


def _check_named(config: Any, model_name: str, path: Path, family: str) -> None:
    """Refuse a model name of another family or, when the file records its config, another architecture."""
    named = model_config(model_name)
    if family_of(named) != family:
        raise VitlabError(f"{path} holds {family} weights, not a {model_name} ({family_of(named)})")
    if config is None:
        return
    differ = [f"{field} {getattr(config, field, None)} (file) vs {getattr(named, field, None)}"
              for field in get_family(family).architecture_fields
              if getattr(config, field, None) != getattr(named, field, None)]
    if differ:
        raise VitlabError(f"{path} does not hold a {model_name}: {', '.join(differ)}")


def _uninitialised_model(config: Any, file: WeightFile, reset_head: bool) -> nn.Module:
    """The model with allocated but unfilled parameters: a strict load overwrites all of them (a reset head is
    zeroed), so running the initialisers first would only cost time (seconds for ViT-L on a CPU).

    The file is checked against the model's shapes before anything is allocated, so a config that does not
    describe the file's tensors (a corrupt or hostile one, say with a width of 10^11) is refused, not built."""
    check_sane_sizes(config, str(file.path))  # sizes no tensor holds: the image size, a Perceiver's resolution
    blocks = {key.split(".")[1] for key in file.state_dict if key.startswith("blocks.")}
    if blocks and getattr(config, "depth", len(blocks)) != len(blocks):  # before building depth-many blocks
        raise VitlabError(f"{file.path} does not fit the model: its weights hold {len(blocks)} blocks, the model "
                          f"has depth {config.depth}")
    try:
        with torch.device("meta"):
            model = build_model(config)
    except (RuntimeError, OverflowError, TypeError, MemoryError) as error:  # sizes beyond what torch can hold
        detail = " ".join(str(error).split())[:200]
        raise VitlabError(f"{file.path}: the model it describes cannot be built ({detail})") from None
    _fitted_state(model, file, reset_head, strict=True)
    persistent = set(model.state_dict())
    if any(name not in persistent for name, _ in model.named_buffers()):
        return build_model(config)  # non-persistent buffers are computed at construction, not loaded
    return model.to_empty(device="cpu")


def save_weights(model: nn.Module, path: str | os.PathLike[str], format: str = "vitlab") -> Path:
    """Write `model`'s weights atomically; returns the path written.

    `vitlab`: one safetensors file whose metadata holds the config; `timm`: safetensors under timm's keys;
    `npz`: Google's VT/AugReg layout (BiT's for a ResNet, Mixer's for a Mixer); `hf`: a directory
    `transformers.ViTForImageClassification` (or `ViTModel` without a head) opens with `from_pretrained`.
    The model's `card` (class names, preprocessing) goes with it: safetensors metadata, HF's `id2label` and
    `preprocessor_config.json`, timm's `config.json` when `path` is a directory; `.npz` has no place for it.
    """
    if format not in FORMATS:
        raise VitlabError(f"unknown weight format {format!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    config = model.config
    state = {key: value.detach() for key, value in model.state_dict().items()}
    card = model_card(model)
    if format == "vitlab":
        write_safetensors(path, state, {CONFIG_METADATA_KEY: json.dumps(config_to_dict(config)),
                                        **card.to_metadata(config.img_size)})
        return path
    if format == "hf" and family_of(config) == "vit":
        _write_hf(path, state, config, card)
        return path
    if format == "timm" and family_of(config) == "vit" and path.suffix == "":
        _write_timm_directory(path, state, config, card)
        return path
    writer = _WRITERS.get(family_of(config), {}).get(format)
    if writer is None:
        families = [get_family(family).label for family, writers in _WRITERS.items() if format in writers]
        raise VitlabError(f"{format} weights exist only for {', '.join(families)} models, "
                          f"not {type(config).__name__}")
    writer(path, state, config)
    return path


def model_card(model: nn.Module) -> ModelCard:
    """The model's card (`load_model` attaches one), fitted to its head; an empty card for other models."""
    card = getattr(model, "card", None)
    if not isinstance(card, ModelCard):
        return ModelCard()
    return card.for_model(getattr(model.config, "num_classes", 0))


def _write_hf(path: Path, state: dict[str, torch.Tensor], config: Any, card: ModelCard) -> None:
    """A HF directory with the card's labels in config.json and its preprocessing in preprocessor_config.json
    (the default ViT preprocessing, mean = std = 0.5 and bicubic, when the card has none)."""
    id2label = label2id = None
    if card.classes is not None:
        id2label, label2id = hf_labels(card.classes)
    hf.write_directory(path, state, config, id2label, label2id)
    processor = hf_processor_config(card.preprocessing or Preprocessing(), config.img_size)
    with atomic_writer(path / HF_PROCESSOR_NAME) as handle:
        handle.write((json.dumps(processor, indent=2) + "\n").encode())


def _write_timm_directory(path: Path, state: dict[str, torch.Tensor], config: Any, card: ModelCard) -> None:
    """timm's Hub layout: `model.safetensors` and a `config.json` with the architecture and its arguments, the
    class names and the pretrained cfg, which `timm.create_model("local-dir:PATH", pretrained=True)` reads."""
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / TIMM_WEIGHTS_NAME, timm.from_state_dict(state, config), {"format": "pt"})
    preprocessing = card.preprocessing or Preprocessing()
    pretrained_cfg = {"input_size": [config.in_chans, *config.img_size], "fixed_input_size": True,
                      "interpolation": preprocessing.interpolation, "crop_pct": preprocessing.crop_pct,
                      "crop_mode": preprocessing.crop_mode, "mean": list(preprocessing.mean),
                      "std": list(preprocessing.std), "num_classes": config.num_classes,
                      "first_conv": "patch_embed.proj", "classifier": "head"}
    data: dict[str, Any] = {"architecture": "vit_base_patch16_224", "num_classes": config.num_classes,
                            "num_features": config.embed_dim, "global_pool": config.pool.replace("gap", "avg"),
                            "model_args": timm.model_args(config), "pretrained_cfg": pretrained_cfg}
    if card.classes is not None:
        data["label_names"] = list(card.classes)
    with atomic_writer(path / TIMM_CONFIG_NAME) as handle:
        handle.write((json.dumps(data, indent=2) + "\n").encode())


def _write_timm_keys(path: Path, state: dict[str, torch.Tensor], config: Any) -> None:
    """vitlab's ResNet and Mixer keys are timm's."""
    write_safetensors(path, state, timm.metadata(config))


# How each family's weights are written in each foreign format (every family writes vitlab files): a family's
# checkpoint mapping, with its reading counterpart in `read_weights`.
_WRITERS: dict[str, dict[str, Callable[[Path, dict[str, torch.Tensor], Any], None]]] = {
    "vit": {"timm": lambda path, state, config: write_safetensors(path, timm.from_state_dict(state, config),
                                                                 timm.metadata(config)),
            "npz": lambda path, state, config: npz.write_npz(path, npz.from_state_dict(state, config)),
            "hf": hf.write_directory},
    "resnet": {"timm": _write_timm_keys,
               "npz": lambda path, state, config: npz.write_npz(path, resnet.bit_from_state_dict(state, config))},
    "mixer": {"timm": _write_timm_keys,
              "npz": lambda path, state, config: npz.write_npz(path, mixer.from_state_dict(state, config))},
}


def load_pretrained(model: nn.Module, model_name: str, tag: str, cache: Path | None = None) -> nn.Module:
    """Download (once, verified; see `vitlab.weights.hub`) the checkpoint `tag` of `model_name` into `model`.

    The position embedding is resampled to the model's image size with the official mode; a model whose class
    count (or pre-logits layer) differs from the checkpoint's gets a new zero-initialised head. The model's `card`
    is the catalogue's preprocessing.
    """
    entry = hub.get_pretrained(model_name, tag)
    load_weights(model, hub.download(entry, cache), reset_head=True)
    model.card = entry.card()
    return model
