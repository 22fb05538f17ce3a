"""Hugging Face `transformers` ViT (`ViTModel`, `ViTForImageClassification`) ⇄ vitlab.

Reading accepts both key generations: the 4.x names every Hub checkpoint is stored with
(`vit.encoder.layer.{i}.attention.attention.query`, `intermediate.dense`, ...) and the 5.x runtime names
(`vit.layers.{i}.attention.q_proj`, `mlp.fc1`, ...), with or without the `vit.` prefix (bare `ViTModel`
checkpoints have none). Writing uses the 4.x names, which 4.x reads directly and 5.x converts on load.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from vitlab.atomic import atomic_writer
from vitlab.errors import VitlabError
from vitlab.models.vit import ViTConfig
from vitlab.weights.files import describe_keys, load_torch_tensors, read_safetensors, write_safetensors

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# HF key (after the optional `vit.` prefix) → vitlab key; `{i}` is the block index.
_RENAMES: list[tuple[str, str]] = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"layers\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"(?:encoder\.layer\.(\d+)\.attention\.output\.dense|layers\.(\d+)\.attention\.o_proj)\.(weight|bias)",
     r"blocks.\1\2.attn.proj.\3"),
    (r"(?:encoder\.layer\.(\d+)\.intermediate\.dense|layers\.(\d+)\.mlp\.fc1)\.(weight|bias)",
     r"blocks.\1\2.mlp.fc1.\3"),
    (r"(?:encoder\.layer\.(\d+)\.output\.dense|layers\.(\d+)\.mlp\.fc2)\.(weight|bias)",
     r"blocks.\1\2.mlp.fc2.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"pooler\.dense\.(weight|bias)", r"pre_logits.fc.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
]
_QKV = {"query": 0, "q": 0, "key": 1, "k": 1, "value": 2, "v": 2}
# HF `hidden_act` names ⇄ vitlab's `act`: "gelu_pytorch_tanh" (and the older "gelu_new", the same formula) is the
# tanh approximation Google's Flax code uses; "gelu" is the exact one.
_HIDDEN_ACT = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def looks_like_hf(keys: set[str]) -> bool:
    return any(key.removeprefix("vit.").startswith("embeddings.patch_embeddings.") for key in keys)


def to_state_dict(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """HF ViT weights (4.x or 5.x names) in vitlab's layout; q, k and v are fused into one qkv projection."""
    out: dict[str, torch.Tensor] = {}
    split: dict[str, dict[int, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        name = key.removeprefix("vit.")
        for pattern, replacement in _RENAMES:
            if re.fullmatch(pattern, name):
                target = re.sub(pattern, replacement, name)
                break
        else:
            unknown.append(key)
            continue
        match = re.fullmatch(r"blocks\.(\d+)\.attn\.(query|key|value|q|k|v)\.(weight|bias)", target)
        if match:
            split.setdefault(f"blocks.{match.group(1)}.attn.qkv.{match.group(3)}", {})[_QKV[match.group(2)]] = value
        else:
            out[target] = value
    if unknown:
        raise VitlabError(f"{source}: {len(unknown)} key(s) that are not part of a HF ViT: "
                          f"{describe_keys(sorted(unknown))}")
    for target, parts in split.items():
        if sorted(parts) != [0, 1, 2]:
            raise VitlabError(f"{source}: {target} needs query, key and value; found only "
                              f"{', '.join(('query', 'key', 'value')[i] for i in sorted(parts))}")
        try:
            out[target] = torch.cat([parts[0], parts[1], parts[2]])
        except RuntimeError as error:
            raise VitlabError(f"{source}: query, key and value of {target} do not fit together: "
                              f"{', '.join(str(tuple(parts[i].shape)) for i in range(3))} ({error})") from None
    if "head.weight" in out:  # ViTForImageClassification classifies the class token; a pooler is unused
        out.pop("pre_logits.fc.weight", None)
        out.pop("pre_logits.fc.bias", None)
    return out


def from_state_dict(state: dict[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """A vitlab state dict under HF 4.x names (`vit.` prefixed for a classifier, bare for a backbone)."""
    _check_expressible(config)
    prefix = "vit." if config.num_classes > 0 else ""
    out = {
        f"{prefix}embeddings.cls_token": state["cls_token"],
        f"{prefix}embeddings.position_embeddings": state["pos_embed"],
        f"{prefix}embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        f"{prefix}embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        f"{prefix}layernorm.weight": state["norm.weight"],
        f"{prefix}layernorm.bias": state["norm.bias"],
    }
    for i in range(config.depth):
        src, dst = f"blocks.{i}.", f"{prefix}encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}layernorm_before.{kind}"] = state[f"{src}norm1.{kind}"]
            out[f"{dst}layernorm_after.{kind}"] = state[f"{src}norm2.{kind}"]
            if f"{src}attn.qkv.{kind}" in state:
                for name, part in zip(("query", "key", "value"), state[f"{src}attn.qkv.{kind}"].chunk(3), strict=True):
                    out[f"{dst}attention.attention.{name}.{kind}"] = part
            out[f"{dst}attention.output.dense.{kind}"] = state[f"{src}attn.proj.{kind}"]
            out[f"{dst}intermediate.dense.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}output.dense.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
    if config.representation_size:
        out["pooler.dense.weight"] = state["pre_logits.fc.weight"]
        out["pooler.dense.bias"] = state["pre_logits.fc.bias"]
    if config.num_classes > 0:
        out["classifier.weight"] = state["head.weight"]
        out["classifier.bias"] = state["head.bias"]
    return out


def _check_expressible(config: ViTConfig) -> None:
    if config.hybrid_layers is not None:
        raise VitlabError("HF ViT has no ResNet stem; a hybrid model cannot be written as HF")
    if config.pool != "token":
        raise VitlabError("HF ViT classifies the class token; a model with pool='gap' cannot be written as HF")
    if config.posemb != "learned":
        raise VitlabError(f"HF ViT learns its position embedding; posemb={config.posemb!r} cannot be written as HF")
    if config.representation_size and config.num_classes > 0:
        raise VitlabError("HF ViTForImageClassification has no pre-logits layer; a model with both "
                          f"representation_size={config.representation_size} and a head cannot be written as "
                          "HF (save it with num_classes=0 to get a ViTModel whose pooler is the pre-logits)")


def config_to_hf(config: ViTConfig) -> dict[str, Any]:
    """A `config.json` for the model: `ViTForImageClassification` with a head, else `ViTModel`."""
    _check_expressible(config)
    height, width = config.img_size
    labels = {str(i): f"LABEL_{i}" for i in range(config.num_classes)}
    data: dict[str, Any] = {
        "architectures": ["ViTForImageClassification" if config.num_classes > 0 else "ViTModel"],
        "model_type": "vit",
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_dim,
        "hidden_act": _HF_ACT[config.act],
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attn_dropout,
        "initializer_range": 0.02,
        "layer_norm_eps": config.layer_norm_eps,
        "image_size": height if height == width else [height, width],
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "qkv_bias": config.qkv_bias,
        "encoder_stride": config.patch_size,
    }
    if labels:
        data["id2label"] = labels
        data["label2id"] = {name: int(i) for i, name in labels.items()}
    if config.representation_size:
        data["pooler_output_size"] = config.representation_size
        data["pooler_act"] = "tanh"
    return data


def config_fields(data: dict[str, Any], source: str) -> dict[str, Any]:
    """ViTConfig fields from a HF `config.json` (classes and pre-logits come from the weights instead)."""
    if data.get("model_type", "vit") != "vit":
        raise VitlabError(f"{source}: model_type {data.get('model_type')!r} is not a HF ViT")
    hidden_act = data.get("hidden_act", "gelu")
    if not isinstance(hidden_act, str) or hidden_act not in _HIDDEN_ACT:
        raise VitlabError(f"{source}: hidden_act {hidden_act!r} is not supported; vitlab's ViT computes "
                          f"{', '.join(repr(name) for name in _HIDDEN_ACT)}")
    if data.get("pooler_act", "tanh") != "tanh":
        raise VitlabError(f"{source}: pooler_act {data.get('pooler_act')!r}; vitlab's pre-logits use tanh")
    patch = data.get("patch_size", 16)
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise VitlabError(f"{source}: non-square patch_size {patch} is not supported")
        patch = patch[0]
    try:
        return {
            "img_size": data.get("image_size", 224),
            "patch_size": int(patch),
            "in_chans": int(data.get("num_channels", 3)),
            "embed_dim": int(data.get("hidden_size", 768)),
            "depth": int(data.get("num_hidden_layers", 12)),
            "num_heads": int(data.get("num_attention_heads", 12)),
            "mlp_dim": int(data.get("intermediate_size", 3072)),
            "qkv_bias": bool(data.get("qkv_bias", True)),
            "layer_norm_eps": float(data.get("layer_norm_eps", 1e-12)),  # HF's default, not Flax's 1e-6
            "dropout": float(data.get("hidden_dropout_prob", 0.0)),
            "attn_dropout": float(data.get("attention_probs_dropout_prob", 0.0)),
            "pool": "token",
            "posemb": "learned",
            "act": _HIDDEN_ACT[hidden_act],
        }
    except (TypeError, ValueError) as error:
        raise VitlabError(f"{source}: invalid value in HF config ({error})") from None


def read_directory(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights (vitlab layout) and config fields of a HF model directory (safetensors, sharded or not, or .bin)."""
    config_path = directory / CONFIG_NAME
    hf_config = _read_json_object(config_path)
    state: dict[str, torch.Tensor] = {}
    index = directory / f"{WEIGHTS_NAME}.index.json"
    if (directory / WEIGHTS_NAME).is_file():
        state = read_safetensors(directory / WEIGHTS_NAME)[0]
    elif index.is_file():
        weight_map = _read_json_object(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise VitlabError(f"{index}: 'weight_map' must map tensor names to shard file names")
        for shard in sorted(set(weight_map.values())):
            shard_path = (directory / shard).resolve()
            if shard_path.parent != directory.resolve():
                raise VitlabError(f"{index}: shard {shard!r} lies outside {directory}")
            state.update(read_safetensors(shard_path)[0])
    elif (directory / "pytorch_model.bin").is_file():
        state = load_torch_tensors(directory / "pytorch_model.bin")
    else:
        raise VitlabError(f"{directory}: has {CONFIG_NAME} but no {WEIGHTS_NAME}, {WEIGHTS_NAME}.index.json or "
                          "pytorch_model.bin")
    source = str(directory)
    vitlab_state = to_state_dict(state, source)
    fields = config_fields(hf_config, str(config_path))
    for key in ("head.weight", "pre_logits.fc.weight"):
        if key in vitlab_state and vitlab_state[key].ndim != 2:
            raise VitlabError(f"{source}: {key} has shape {tuple(vitlab_state[key].shape)}; expected 2 dimensions")
    fields["num_classes"] = vitlab_state["head.weight"].shape[0] if "head.weight" in vitlab_state else 0
    fields["representation_size"] = (vitlab_state["pre_logits.fc.weight"].shape[0]
                                     if "pre_logits.fc.weight" in vitlab_state else None)
    return vitlab_state, fields


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, or nested beyond reason
        raise VitlabError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise VitlabError(f"{path}: expected a JSON object")
    return data


def write_directory(directory: str | os.PathLike[str], state: dict[str, torch.Tensor], config: ViTConfig,
                    id2label: dict[str, str] | None = None, label2id: dict[str, int] | None = None) -> None:
    """Write `config.json` (with the given labels, else LABEL_i) and `model.safetensors` that
    `from_pretrained(directory)` opens."""
    directory = Path(directory)
    hf_state = from_state_dict(state, config)
    hf_config = config_to_hf(config)
    if id2label is not None and config.num_classes > 0:
        hf_config["id2label"], hf_config["label2id"] = id2label, label2id
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / WEIGHTS_NAME, hf_state, metadata={"format": "pt"})
    with atomic_writer(directory / CONFIG_NAME) as handle:
        handle.write((json.dumps(hf_config, indent=2) + "\n").encode())
