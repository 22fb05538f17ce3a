"""vitlab's per-sample transforms against timm's `create_transform` on real photos (scikit-image's bundled ones):
the evaluation transform gives the same tensor, and the training geometry (random-resized crop, flip) the same
pixels for the same crop box."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vitlab.data import AugmentConfig, Preprocessing, SampleEvalTransform, SampleTrainTransform, normalize_batch

timm_data = pytest.importorskip("timm.data")
skimage_data = pytest.importorskip("skimage.data")

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(getattr(skimage_data, name)()) for name in ("astronaut", "chelsea", "coffee")]


def vitlab_output(transform: SampleEvalTransform | SampleTrainTransform, image: Image.Image,
                  preprocessing: Preprocessing) -> torch.Tensor:
    return normalize_batch(transform(image)[None], preprocessing)[0]


@pytest.mark.parametrize("size,crop_pct,interpolation,stats", [
    (224, 0.875, "bicubic", IMAGENET), (224, 0.9, "bilinear", ((0.5,) * 3, (0.5,) * 3)),
    (160, 1.0, "bicubic", ((0.5,) * 3, (0.5,) * 3)), (97, 0.95, "bilinear", IMAGENET)])
def test_eval_transform_equals_timms(photos: list[Image.Image], size: int, crop_pct: float, interpolation: str,
                                     stats: tuple[tuple[float, ...], tuple[float, ...]]) -> None:
    preprocessing = Preprocessing(size, stats[0], stats[1], interpolation, crop_pct)
    ours = SampleEvalTransform(preprocessing)
    theirs = timm_data.create_transform(size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                                        mean=stats[0], std=stats[1])
    for photo in photos:
        expected = theirs(photo)
        got = vitlab_output(ours, photo, preprocessing)
        assert got.shape == expected.shape == (3, size, size)
        assert torch.equal(got, expected)


def test_eval_transform_differs_when_a_setting_differs(photos: list[Image.Image]) -> None:
    """The comparison above can fail: another crop_pct or filter gives other pixels."""
    preprocessing = Preprocessing(224, *IMAGENET, "bicubic", 0.875)
    theirs = timm_data.create_transform(224, crop_pct=0.9, interpolation="bicubic", mean=IMAGENET[0], std=IMAGENET[1])
    assert not torch.equal(vitlab_output(SampleEvalTransform(preprocessing), photos[0], preprocessing),
                           theirs(photos[0]))


@pytest.mark.parametrize("box", [(20, 35, 300, 260), (0, 0, 512, 512), (100, 7, 81, 403)])
@pytest.mark.parametrize("interpolation,flip", [("bilinear", False), ("bicubic", True)])
def test_train_geometry_equals_timms_for_the_same_crop_box(photos: list[Image.Image], monkeypatch: pytest.MonkeyPatch,
                                                           box: tuple[int, int, int, int], interpolation: str,
                                                           flip: bool) -> None:
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision.transforms import v2

    preprocessing = Preprocessing(128, *IMAGENET, interpolation)
    ours = SampleTrainTransform(preprocessing, AugmentConfig(hflip=flip))
    theirs = timm_data.create_transform(128, is_training=True, hflip=1.0 if flip else 0.0, color_jitter=None,
                                        interpolation=interpolation, mean=IMAGENET[0], std=IMAGENET[1])
    crop = next(t for t in theirs.transforms if isinstance(t, RandomResizedCropAndInterpolation))
    # timm's defaults are vitlab's defaults
    assert tuple(crop.scale) == tuple(ours.crop.scale) == (0.08, 1.0)
    assert tuple(crop.ratio) == pytest.approx(tuple(ours.crop.ratio)) and tuple(crop.ratio) == (3 / 4, 4 / 3)
    top, left, height, width = box
    monkeypatch.setattr(RandomResizedCropAndInterpolation, "get_params", staticmethod(lambda *args: box))
    monkeypatch.setattr(v2.RandomResizedCrop, "make_params",
                        lambda self, inputs: dict(top=top, left=left, height=height, width=width))
    if flip:
        ours.flip.p = 1.0
    for photo in photos:
        expected = theirs(photo)
        got = vitlab_output(ours, photo, preprocessing)
        assert got.shape == expected.shape == (3, 128, 128)
        assert torch.equal(got, expected)


def test_train_crops_vary_and_follow_the_seed(photos: list[Image.Image]) -> None:
    preprocessing = Preprocessing(64)
    transform = SampleTrainTransform(preprocessing, AugmentConfig(hflip=True, randaugment_ops=2))
    torch.manual_seed(3)
    first = transform(photos[1])
    torch.manual_seed(3)
    assert torch.equal(transform(photos[1]), first)
    assert not torch.equal(transform(photos[1]), first)
    assert first.dtype == torch.uint8 and first.shape == (3, 64, 64)
