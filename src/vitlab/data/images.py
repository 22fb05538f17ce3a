"""Opening image files safely: regular files only, an allow-list of formats, and the size bounded from the header
before a single pixel is decoded (a small PNG can declare 1 × 150,000,000 pixels)."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vitlab.atomic import open_regular as open_regular_file
from vitlab.errors import VitlabError

READ_ERRORS = (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError)
# Raster formats Pillow decodes itself. Anything else is refused unopened: Pillow picks a decoder by content, not
# by extension, and its EPS/PS decoder runs Ghostscript (an interpreter, with a history of exploits) on the file,
# so a PostScript file named cat.png would otherwise be handed to `gs`.
FORMATS = ("PNG", "JPEG", "BMP", "DIB", "GIF", "TIFF", "WEBP", "PPM", "TGA", "ICO", "JPEG2000")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own warning threshold (a quarter gigabyte of 24-bit pixels)
DEFAULT_MAX_SIDE = 32_768


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on an image's declared size, checked from its header before decoding. Pillow's decompression-bomb
    error (at twice `PIL.Image.MAX_IMAGE_PIXELS`) stays on above them."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = DEFAULT_MAX_SIDE

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VitlabError(f"{name} must be a positive integer, got {value!r}")


def open_regular(path: str | Path) -> BinaryIO:
    """`vitlab.atomic.open_regular` with an image reader's error: a FIFO, device or directory named like an image
    is refused at once instead of hanging or reading forever."""
    try:
        return open_regular_file(path)
    except (VitlabError, IsADirectoryError):
        raise VitlabError(f"{path}: cannot read image (not a regular file)") from None
    except OSError as error:
        raise VitlabError(f"{path}: cannot read image ({error.strerror or error})") from None


def _check_size(image: Image.Image, where: str | Path, limits: ImageLimits) -> None:
    width, height = image.size
    if width > limits.max_side or height > limits.max_side or width * height > limits.max_pixels:
        raise VitlabError(f"{where}: cannot read image ({width}×{height} pixels is over the bound "
                          f"max_pixels={limits.max_pixels}, max_side={limits.max_side}; raise them to read it)")


def check_image(path: str | Path, limits: ImageLimits | None = None) -> None:
    """Refuse a file that is not a regular file, not in `FORMATS`, over `limits` or structurally broken (Pillow's
    `verify`), without decoding its pixels."""
    with open_regular(path) as handle:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image_file = Image.open(handle, formats=FORMATS)
            with image_file as image:
                _check_size(image, path, limits or ImageLimits())
                image.verify()
        except READ_ERRORS as error:
            raise VitlabError(f"{path}: cannot read image ({type(error).__name__}: {error})") from None


def decode_image(source: BinaryIO | bytes, where: str | Path, mode: str = "RGB",
                 limits: ImageLimits | None = None) -> Image.Image:
    """Decode an image in one of `FORMATS` to a loaded Pillow image in `mode` ("RGB" or "L"): EXIF rotation
    applied, transparency composited on white, 16/32-bit grey scaled to 8 bits. Bad input → one-line VitlabError
    naming `where`."""
    limits = limits or ImageLimits()
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image_file = Image.open(stream, formats=FORMATS)
        with image_file as image:
            _check_size(image, where, limits)
            ImageOps.exif_transpose(image, in_place=True)  # a copy of every image otherwise
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
                image = Image.fromarray((np.asarray(image, dtype=np.float64) / max(np.asarray(image).max(), 1)
                                         * 255).astype(np.uint8))
            if image.mode in ("RGBA", "LA", "P", "PA") and mode == "RGB":
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, image)
            if image.mode != mode:  # `convert` to the same mode would copy
                image = image.convert(mode)
            image.load()
    except READ_ERRORS as error:
        raise VitlabError(f"{where}: cannot read image ({type(error).__name__}: {error})") from None
    return image


def load_image(path: str | Path, mode: str = "RGB", limits: ImageLimits | None = None) -> Image.Image:
    """`decode_image` of a file, opened with `open_regular`."""
    with open_regular(path) as handle:
        return decode_image(handle, path, mode, limits)


def read_image(path: Path, mode: str, size: tuple[int, int], limits: ImageLimits | None = None) -> np.ndarray:
    """`load_image`, then the shorter side resized and centre-cropped to `size` (height, width); returns uint8
    (C, H, W)."""
    return fit_image(load_image(path, mode, limits), size)


def fit_image(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The shorter side resized and centre-cropped to `size` (height, width), as uint8 (C, H, W)."""
    image = ImageOps.fit(image, (size[1], size[0]), Image.Resampling.BICUBIC)
    array = np.array(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
