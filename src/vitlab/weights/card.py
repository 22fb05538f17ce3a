"""What it takes to use a checkpoint besides its weights: the class names and the input preprocessing.

A `ModelCard` is attached to every model `load_model` builds (`model.card`) and written back by `save_weights`:
as safetensors metadata in vitlab files ("classes", "preprocessing"), as `id2label` and `preprocessor_config.json`
in Hugging Face directories, as `label_names` and `pretrained_cfg` in timm's `config.json`. Files without one get
`ModelCard()`, whose empty fields leave every command to its defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from vitlab.errors import VitlabError

CLASSES_KEY = "classes"  # the safetensors metadata keys; training already writes "classes"
PREPROCESSING_KEY = "preprocessing"
INTERPOLATIONS = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
                  "bicubic": InterpolationMode.BICUBIC, "lanczos": InterpolationMode.LANCZOS}
# PIL's resampling codes, which Hugging Face image processors store as "resample".
PIL_CODES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}
CROP_MODES = ("center", "squash")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input (the model's config gives the size).

    `center` (timm's eval transform): resize the shorter side to size / crop_pct, then centre-crop to size.
    `squash` (Hugging Face's ViTImageProcessor): resize both sides to size / crop_pct, then centre-crop.
    Then scale to [0, 1] and normalise with mean and std per channel.
    """

    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise VitlabError(f"preprocessing interpolation {self.interpolation!r}; expected one of "
                              f"{', '.join(INTERPOLATIONS)}")
        if self.crop_mode not in CROP_MODES:
            raise VitlabError(f"preprocessing crop_mode {self.crop_mode!r}; expected one of {', '.join(CROP_MODES)}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise VitlabError(f"preprocessing crop_pct must be in (0, 1], got {self.crop_pct}")
        if len(self.mean) != len(self.std) or not all(value > 0 for value in self.std):
            raise VitlabError(f"preprocessing mean {list(self.mean)} and std {list(self.std)}: one positive std "
                              "per mean")

    def to_dict(self, img_size: Sequence[int]) -> dict[str, Any]:
        """The JSON form, with the model's input size (height, width)."""
        return {"img_size": list(img_size), "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "crop_pct": self.crop_pct, "crop_mode": self.crop_mode}

    @classmethod
    def from_dict(cls, data: Any, source: str) -> Preprocessing:
        """The inverse of `to_dict` (its img_size is the model config's business and is not kept)."""
        if not isinstance(data, dict):
            raise VitlabError(f"{source}: preprocessing must be a JSON object, got {type(data).__name__}")
        try:
            return cls(mean=tuple(float(value) for value in data.get("mean", cls.mean)),
                       std=tuple(float(value) for value in data.get("std", cls.std)),
                       interpolation=str(data.get("interpolation", cls.interpolation)),
                       crop_pct=float(data.get("crop_pct", cls.crop_pct)),
                       crop_mode=str(data.get("crop_mode", cls.crop_mode)))
        except (TypeError, ValueError) as error:
            raise VitlabError(f"{source}: invalid preprocessing ({error})") from None
        except VitlabError as error:
            raise VitlabError(f"{source}: {error}") from None

    def transform(self, img_size: Sequence[int]) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image → normalised float (C, H, W) tensor, as timm's (center) or HF's (squash) eval transform."""
        height, width = img_size
        scaled = (math.floor(height / self.crop_pct), math.floor(width / self.crop_pct))
        mode = INTERPOLATIONS[self.interpolation]
        mean, std = list(self.mean), list(self.std)

        def apply(image: Image.Image) -> torch.Tensor:
            if self.crop_mode == "squash" or scaled[0] != scaled[1]:
                image = F.resize(image, list(scaled), interpolation=mode)
            else:
                image = F.resize(image, [scaled[0]], interpolation=mode)  # the shorter side
            image = F.center_crop(image, [height, width])
            return F.normalize(F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True), mean, std)

        return apply


@dataclass(frozen=True)
class ModelCard:
    """Class names and preprocessing of a checkpoint; None where the file does not say."""

    classes: tuple[str, ...] | None = None
    preprocessing: Preprocessing | None = None

    def class_names(self, num_classes: int) -> list[str]:
        """The names when there is one per output, else the indices as strings."""
        if self.classes is not None and len(self.classes) == num_classes:
            return list(self.classes)
        return [str(index) for index in range(num_classes)]

    def for_model(self, num_classes: int) -> ModelCard:
        """The card with class names dropped when they no longer fit the head (a new head was started)."""
        if self.classes is not None and len(self.classes) != num_classes:
            return dataclasses.replace(self, classes=None)
        return self

    def to_metadata(self, img_size: Sequence[int]) -> dict[str, str]:
        """Safetensors metadata entries for what the card knows."""
        metadata = {}
        if self.classes is not None:
            metadata[CLASSES_KEY] = json.dumps(list(self.classes))
        if self.preprocessing is not None:
            metadata[PREPROCESSING_KEY] = json.dumps(self.preprocessing.to_dict(img_size))
        return metadata

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: str) -> ModelCard:
        """The card in a vitlab file's metadata (training checkpoints record only the classes)."""
        classes = preprocessing = None
        if CLASSES_KEY in metadata:
            classes = _classes(_json(metadata[CLASSES_KEY], f"{source}: metadata {CLASSES_KEY!r}"),
                               f"{source}: metadata {CLASSES_KEY!r}")
        if PREPROCESSING_KEY in metadata:
            preprocessing = Preprocessing.from_dict(
                _json(metadata[PREPROCESSING_KEY], f"{source}: metadata {PREPROCESSING_KEY!r}"),
                f"{source}: metadata {PREPROCESSING_KEY!r}")
        return cls(classes, preprocessing)


def _json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise VitlabError(f"{source}: not valid JSON ({error})") from None


def _classes(data: Any, source: str) -> tuple[str, ...] | None:
    if data is None:
        return None
    if not isinstance(data, list) or not all(isinstance(name, (str, int)) for name in data):
        raise VitlabError(f"{source}: class names must be a JSON list of strings")
    return tuple(str(name) for name in data)


def hf_labels(classes: Sequence[str]) -> tuple[dict[str, str], dict[str, int]]:
    """`id2label` and `label2id` for a Hugging Face config."""
    return {str(index): name for index, name in enumerate(classes)}, {name: index for index, name in enumerate(classes)}


def hf_processor_config(preprocessing: Preprocessing, img_size: Sequence[int]) -> dict[str, Any]:
    """A `preprocessor_config.json` for transformers' ViTImageProcessor.

    ViTImageProcessor resizes both sides and does not crop, which is `squash` at crop_pct 1; a centre-cropping card
    is written as the closest it can express (resize to the input size)."""
    height, width = img_size
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": height, "width": width},
            "resample": PIL_CODES[preprocessing.interpolation], "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(preprocessing.mean), "image_std": list(preprocessing.std)}


def card_from_hf(config: dict[str, Any], processor: dict[str, Any] | None, num_classes: int, source: str
                 ) -> ModelCard:
    """The card of a Hugging Face directory: its labels unless they are the LABEL_i placeholders, and its
    ViTImageProcessor settings (squash to the size, no crop)."""
    classes = None
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and len(id2label) == num_classes:
        try:
            names = tuple(str(id2label.get(str(index), id2label.get(index))) for index in range(num_classes))
        except TypeError:
            names = ()
        if names and names != tuple(f"LABEL_{index}" for index in range(num_classes)) and "None" not in names:
            classes = names
    preprocessing = None
    if processor is not None:
        codes = {code: name for name, code in PIL_CODES.items()}
        try:
            preprocessing = Preprocessing(mean=tuple(float(v) for v in processor.get("image_mean", (0.5,) * 3)),
                                          std=tuple(float(v) for v in processor.get("image_std", (0.5,) * 3)),
                                          interpolation=codes.get(int(processor.get("resample", 2)), "bilinear"),
                                          crop_pct=1.0, crop_mode="squash")
        except (TypeError, ValueError) as error:
            raise VitlabError(f"{source}: invalid preprocessor config ({error})") from None
    return ModelCard(classes, preprocessing)
