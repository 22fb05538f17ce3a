"""Image folders (torchvision's `ImageFolder` layout) decoded once into memory, with bad files named or skipped."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from vitlab.data.datasets import ImageTensors
from vitlab.errors import VitlabError

READ_ERRORS = (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError)
# Raster formats Pillow decodes itself. Anything else is refused unopened: Pillow picks a decoder by content, not
# by extension, and its EPS/PS decoder runs Ghostscript (an interpreter, with a history of exploits) on the file,
# so a PostScript file named cat.png would otherwise be handed to `gs`.
FORMATS = ("PNG", "JPEG", "BMP", "DIB", "GIF", "TIFF", "WEBP", "PPM", "TGA", "ICO", "JPEG2000")


def read_image(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """Decode an image in one of `FORMATS` (EXIF rotation applied, any mode converted), resize the shorter side and
    centre-crop to `size` (height, width); returns uint8 (C, H, W). Pillow's decompression-bomb limit stays on:
    an image of more than twice `Image.MAX_IMAGE_PIXELS` is refused (between once and twice, Pillow's warning is
    not repeated on stderr: the image is decoded, then scaled down)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image_file = Image.open(path, formats=FORMATS)
        with image_file as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
                image = Image.fromarray((np.asarray(image, dtype=np.float64) / max(np.asarray(image).max(), 1)
                                         * 255).astype(np.uint8))
            if image.mode in ("RGBA", "LA", "P", "PA") and mode == "RGB":
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, image)
            image = ImageOps.fit(image.convert(mode), (size[1], size[0]), Image.Resampling.BICUBIC)
            array = np.array(image, dtype=np.uint8)
    except READ_ERRORS as error:
        raise VitlabError(f"{path}: cannot read image ({type(error).__name__}: {error})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def load_image_folder(root: Path, img_size: int, skip_bad_images: bool = False, mode: str = "RGB"
                      ) -> ImageTensors:
    """Every image under root/<class>/ decoded to `img_size`; a bad file stops with its name unless skipped."""
    if not root.is_dir():
        raise VitlabError(f"{root}: image folder not found")
    try:
        classes, class_to_index = find_classes(str(root))
    except FileNotFoundError as error:
        raise VitlabError(f"{root}: {error}") from None
    if len(classes) < 2:
        raise VitlabError(f"{root}: an image folder needs at least two class sub-folders, found {len(classes)}")
    images, labels, skipped = [], [], 0
    for name in classes:
        for path in sorted((root / name).rglob("*")):
            if not path.is_file() or not path.name.lower().endswith(IMG_EXTENSIONS):
                continue
            try:
                images.append(read_image(path, mode, (img_size, img_size)))
            except VitlabError:
                if not skip_bad_images:
                    raise
                skipped += 1
                continue
            labels.append(class_to_index[name])
    if skipped:
        print(f"{root}: skipped {skipped} unreadable image(s)", file=sys.stderr)
    if not images:
        raise VitlabError(f"{root}: no readable images found")
    return ImageTensors(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64), tuple(classes),
                        str(root))
