"""The model behind `vitlab serve`: uploads checked and decoded as `vitlab predict` decodes files, then answered.

Checks run on the image header before any pixel is decoded, so a hostile upload (a decompression bomb, a format
outside the folders' allow-list, a truncated file) costs a header parse and becomes an `ImageProblem` with the HTTP
status to answer, never a crash.
"""

from __future__ import annotations

import base64
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vitlab.data import EvalTransform
from vitlab.data.folder import FORMATS
from vitlab.data.images import decode_image, fit_image
from vitlab.data.transforms import MEAN, STD
from vitlab.errors import VitlabError
from vitlab.models import ATTENTION, capabilities
from vitlab.precision import resolve_amp

PRECISIONS = ("auto", "fp32", "bf16")
MAX_PIXELS = 50_000_000  # width × height read from the header; larger images are refused before decoding
OVERLAY_SIDE = 224  # shorter side of the rollout overlay PNG, whatever the model's input size


class ImageProblem(Exception):
    """An upload the server refuses: `status` is the HTTP code, the message names the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def serving_precision(choice: str, device: torch.device) -> str:
    """The precision `vitlab predict` would use (`vitlab.precision.resolve_amp`): "bf16" or "fp32"."""
    if choice not in PRECISIONS:
        raise VitlabError(f"--precision must be one of {', '.join(PRECISIONS)}, got {choice!r}")
    return "bf16" if resolve_amp(choice, device) else "fp32"


def check_image(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[str, int, int]:
    """(format, width, height) read from the header of an upload in one of the folders' `FORMATS`."""
    if not data:
        raise ImageProblem(422, "empty body: send an image file (multipart field `file` or the raw bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                width, height, image_format = image.width, image.height, str(image.format)
    except Image.DecompressionBombError as error:
        raise ImageProblem(413, f"decompression bomb refused: {error}") from None
    except UnidentifiedImageError:
        raise ImageProblem(415, f"not an image in an accepted format ({', '.join(FORMATS)})") from None
    except Exception as error:  # any failure of a header parser (READ_ERRORS or other) is the upload's
        raise ImageProblem(422, f"unreadable image header ({type(error).__name__}: {error})") from None
    if width * height > max_pixels:
        raise ImageProblem(413, f"image of {width}x{height} = {width * height:,} pixels is over the limit of "
                                f"{max_pixels:,} pixels")
    return image_format, width, height


def decode_upload(data: bytes, mode: str) -> Image.Image:
    """The upload decoded as `vitlab predict` decodes a file (`vitlab.data.images`); undecodable pixels → 422."""
    try:
        return decode_image(data, "upload", mode)
    except VitlabError as error:
        reason = str(error).partition("cannot read image ")[2] or str(error)
        raise ImageProblem(422, f"cannot decode the image {reason}") from None
    except Exception as error:  # a decoder failure outside `read_image`'s list is still the upload's
        raise ImageProblem(422, f"cannot decode the image ({type(error).__name__}: {error})") from None


def overlay_png(data: bytes, heatmap: torch.Tensor, model_size: tuple[int, int], side: int = OVERLAY_SIDE) -> str:
    """The model's centre crop of the upload with the rollout heatmap blended over it, as a PNG data URL."""
    from matplotlib import colormaps

    scale = side / min(model_size)
    size = (round(model_size[0] * scale), round(model_size[1] * scale))
    crop = fit_image(decode_upload(data, "RGB"), size).transpose(1, 2, 0).astype(np.float32) / 255.0
    heat = heatmap.double()
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-12)
    heat = torch.nn.functional.interpolate(heat[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    colours = colormaps["inferno"](heat.numpy())[..., :3]
    blended = (0.45 * crop + 0.55 * colours) * 255.0
    buffer = io.BytesIO()
    Image.fromarray(blended.round().clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class Answer:
    """One image's result from a batch: its class probabilities and, when asked for, its rollout heatmap (gh, gw)
    and the rollout through the first l layers for every l (L, gh, gw)."""

    probabilities: torch.Tensor
    rollout: torch.Tensor | None = None
    layers: torch.Tensor | None = None


class ServedModel:
    """A checkpoint loaded and fed as `vitlab predict` does (`vitlab.eval.predictor`): its card's class names and
    preprocessing where it has them."""

    def __init__(self, checkpoint: str, model_name: str | None = None, device: str = "auto",
                 precision: str = "auto") -> None:
        from vitlab.eval.predictor import card_of, load_for_use
        from vitlab.train.run_dir import checkpoint_train_config
        from vitlab.models.registry import config_to_dict

        self.model, self.device = load_for_use(checkpoint, model_name, device)
        config = self.model.config
        if config.in_chans not in (1, 3):
            raise VitlabError(f"{checkpoint}: cannot serve a model with {config.in_chans} input channels; "
                              "only 1 (gray) or 3 (RGB)")
        card = card_of(self.model)
        self.classes = card.class_names(config.num_classes)
        self.size: tuple[int, int] = tuple(config.img_size)  # type: ignore[assignment]
        self.mode = "L" if config.in_chans == 1 else "RGB"
        # The checkpoint's own resize, crop and normalisation when its card has them, else predict's default.
        self.transform = (card.preprocessing.transform(self.size) if card.preprocessing is not None
                          else self._default_transform)
        self.precision = serving_precision(precision, self.device)
        train_config = checkpoint_train_config(Path(checkpoint))
        self.name = model_name or (train_config.model if train_config else Path(checkpoint).stem)
        # Rollout needs a token model with `forward(return_attention=True)`; a Perceiver attends to pixels instead.
        self.has_rollout = ATTENTION in capabilities(self.model)
        self.card: dict[str, Any] = {
            "name": self.name, "checkpoint": str(checkpoint), "architecture": type(self.model).__name__,
            "parameters": sum(p.numel() for p in self.model.parameters()), "classes": self.classes,
            "num_classes": len(self.classes), "image_size": list(self.size), "in_chans": config.in_chans,
            "device": str(self.device), "precision": self.precision,
            "attention": ["rollout"] if self.has_rollout else [], "config": config_to_dict(config)}
        self.preprocessing: dict[str, Any] = (
            {"mode": self.mode, "exif_transpose": True, **card.preprocessing.to_dict(self.size)}
            if card.preprocessing is not None else
            {"mode": self.mode, "exif_transpose": True,
             "resize": f"shorter side to {min(self.size)} px (bicubic), centre crop {self.size[0]}x{self.size[1]}",
             "normalize": {"mean": MEAN, "std": STD, "scale": "x / 255"}})

    def _default_transform(self, image: Image.Image) -> torch.Tensor:
        """Predict's input for a checkpoint without preprocessing: fitted, centre-cropped, mean = std = 0.5."""
        return EvalTransform(self.size)(torch.from_numpy(fit_image(image, self.size))[None])[0]

    def prepare(self, data: bytes) -> torch.Tensor:
        """An upload as the model's normalised (C, H, W) input."""
        return self.transform(decode_upload(data, self.mode))

    def run(self, images: torch.Tensor, rollout: list[bool], layers: list[bool] | None = None) -> list[Answer]:
        """One forward pass for a (B, C, H, W) batch of `prepare`d inputs; rollout maps only for the images that ask
        for one (and per-layer maps only where `layers` asks: L rollouts of 1..L layers cost O(L²) products)."""
        inputs = images.to(self.device)
        with torch.inference_mode():
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                logits = self.model(inputs)
            probabilities = logits.float().softmax(-1).cpu()
        answers = [Answer(row) for row in probabilities]
        wanted = [index for index, flag in enumerate(rollout) if flag]
        if wanted:
            from vitlab.analysis.attention import attention_maps, patch_grid, rollout_matrix, rollout_readout

            # attention_rollout's composition, with the maps kept for the per-layer rollouts.
            grid, prefix = patch_grid(self.model, inputs), self.model.num_prefix_tokens
            with torch.inference_mode():
                attentions = attention_maps(self.model, inputs[wanted])

            def through(depth: int) -> torch.Tensor:
                return rollout_readout(rollout_matrix(attentions[:depth], "mean", 0.0, prefix), grid,
                                       prefix).float().cpu()

            final = through(len(attentions))
            per_layer = (torch.stack([through(depth) for depth in range(1, len(attentions) + 1)], dim=1)
                         if layers and any(layers[index] for index in wanted) else None)
            for position, index in enumerate(wanted):
                answers[index] = Answer(probabilities[index], final[position],
                                        per_layer[position] if per_layer is not None and layers[index] else None)
        return answers
