"""Published ViT checkpoints by name: where they live, what they expect, and a verified download cache.

The catalogue lists Google's own `.npz` releases (gs://vit_models): the original ImageNet-21k models of the ViT
paper and the AugReg models of "How to train your ViT?" (Steiner et al., 2021). Google publishes no checksums
for these files, so their entries carry `sha256=None`: the first download's digest is recorded next to the
cached file, and an entry that does name a digest refuses (and deletes) any download that does not match it.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vitlab.atomic import atomic_writer
from vitlab.errors import VitlabError
from vitlab.weights.card import ModelCard, Preprocessing

_CHUNK = 1 << 20
_NO_PUBLISHED_CHECKSUM = "no checksum is published for this file; the first download's sha256 is recorded"
_BUCKET = "https://storage.googleapis.com/vit_models"
IMAGENET21K_CLASSES = 21843


@dataclass(frozen=True)
class Pretrained:
    """One published checkpoint: its file, and the input and head it was trained with."""

    model_name: str
    tag: str
    url: str
    img_size: int
    num_classes: int
    representation_size: int | None = None
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # VT and big_vision feed (x - 127.5) / 127.5
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    sha256: str | None = None
    checksum_note: str = _NO_PUBLISHED_CHECKSUM
    description: str = ""
    # Eval preprocessing as timm's pretrained cfgs give it: bicubic, crop_pct 0.9 at 224 px and 1.0 at 384 px.
    interpolation: str = "bicubic"
    crop_pct: float | None = None  # None: from img_size, as above
    pretraining: str = "ImageNet-21k"
    top1: float | None = None  # published ImageNet-1k top-1 (%) of this very checkpoint, where one is published
    top1_source: str = ""

    @property
    def name(self) -> str:
        """The catalogue name, `MODEL:TAG`."""
        return f"{self.model_name}:{self.tag}"

    def card(self) -> ModelCard:
        """What the checkpoint expects: the catalogue's preprocessing (Google's files carry none of it)."""
        crop_pct = self.crop_pct if self.crop_pct is not None else (0.9 if self.img_size < 384 else 1.0)
        return ModelCard(preprocessing=Preprocessing(self.mean, self.std, self.interpolation, crop_pct))


CATALOGUE: dict[tuple[str, str], Pretrained] = {}


def _add(entry: Pretrained) -> None:
    CATALOGUE[(entry.model_name, entry.tag)] = entry


# Original release (Dosovitskiy et al.): i21k pre-training keeps its pre-logits layer (width = embed dim);
# the ImageNet fine-tunes were made at 384 px, plus 224-px ones for B/16 and L/16.
# Published top-1 of the 384-px fine-tunes: the ViT paper's Table 5, ImageNet-21k row.
_ORIG_TOP1_384 = {"vit-b16": 83.97, "vit-b32": 81.28, "vit-l16": 85.15, "vit-l32": 80.99}
for _name, _file, _width in (("vit-b16", "ViT-B_16", 768), ("vit-b32", "ViT-B_32", 768),
                             ("vit-l16", "ViT-L_16", 1024), ("vit-l32", "ViT-L_32", 1024),
                             ("vit-h14", "ViT-H_14", 1280)):
    _add(Pretrained(_name, "orig-in21k", f"{_BUCKET}/imagenet21k/{_file}.npz", 224, IMAGENET21K_CLASSES, _width,
                    description="ImageNet-21k pre-training, original ViT paper"))
    if _name != "vit-h14":
        _add(Pretrained(_name, "orig-in21k-ft-in1k-384", f"{_BUCKET}/imagenet21k+imagenet2012/{_file}.npz", 384,
                        1000, description="ImageNet-21k, fine-tuned on ImageNet-1k at 384 px, original ViT paper",
                        top1=_ORIG_TOP1_384[_name], top1_source="ViT paper, Table 5"))
for _name, _file in (("vit-b16", "ViT-B_16"), ("vit-l16", "ViT-L_16")):
    _add(Pretrained(_name, "orig-in21k-ft-in1k", f"{_BUCKET}/imagenet21k+imagenet2012/{_file}-224.npz", 224, 1000,
                    description="ImageNet-21k, fine-tuned on ImageNet-1k at 224 px, original ViT paper"))

# AugReg: the recommended checkpoint per size (the pre-training run, then its ImageNet-1k fine-tune).
_AUGREG_I21K = {
    "vit-ti16": ("Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0", "0.03"),
    "vit-s32": ("S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0", "0.03"),
    "vit-s16": ("S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0", "0.03"),
    "vit-b32": ("B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0", "0.03"),
    "vit-b16": ("B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0", "0.01"),
    "vit-b8": ("B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0", "0.01"),
    "vit-l16": ("L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1", "0.01"),
}
# The vision_transformer README's ImageNet top-1 of its recommended AugReg checkpoints (the runs above) at 384 px.
_AUGREG_TOP1_384 = {"vit-ti16": 78.22, "vit-s16": 83.73, "vit-b16": 85.49, "vit-l16": 85.59}
_AUGREG_384_RUN = {"vit-b32": "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0"}  # a different run
for _name, (_run, _lr) in _AUGREG_I21K.items():
    _add(Pretrained(_name, "augreg-in21k", f"{_BUCKET}/augreg/{_run}.npz", 224, IMAGENET21K_CLASSES,
                    description="AugReg ImageNet-21k pre-training, 300 epochs"))
    _add(Pretrained(_name, "augreg-in21k-ft-in1k",
                    f"{_BUCKET}/augreg/{_run}--imagenet2012-steps_20k-lr_{_lr}-res_224.npz", 224, 1000,
                    description="AugReg ImageNet-21k, fine-tuned on ImageNet-1k at 224 px"))
    if _name != "vit-b8":
        _add(Pretrained(_name, "augreg-in21k-ft-in1k-384",
                        f"{_BUCKET}/augreg/{_AUGREG_384_RUN.get(_name, _run)}--imagenet2012-steps_20k-lr_{_lr}"
                        "-res_384.npz", 384, 1000,
                        description="AugReg ImageNet-21k, fine-tuned on ImageNet-1k at 384 px",
                        top1=_AUGREG_TOP1_384.get(_name),
                        top1_source="vision_transformer README, AugReg recommended checkpoints"
                        if _name in _AUGREG_TOP1_384 else ""))
for _name, _run in (("vit-s16", "S_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0"),
                    ("vit-b32", "B_32-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.1-sd_0.1"),
                    ("vit-b16", "B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1")):
    for _res in (224, 384):
        _add(Pretrained(_name, "augreg-in1k" + ("-384" if _res == 384 else ""),
                        f"{_BUCKET}/augreg/{_run}--imagenet2012-steps_20k-lr_0.01-res_{_res}.npz", _res, 1000,
                        description=f"AugReg ImageNet-1k only, 300 epochs, fine-tuned at {_res} px",
                        pretraining="ImageNet-1k"))


def list_pretrained(model_name: str | None = None) -> list[Pretrained]:
    """Catalogue entries, all or for one model, sorted by model and tag."""
    return [CATALOGUE[key] for key in sorted(CATALOGUE) if model_name in (None, key[0])]


def get_pretrained(model_name: str, tag: str) -> Pretrained:
    """The catalogue entry for (model, tag); an unknown tag is an error that lists the model's tags."""
    entry = CATALOGUE.get((model_name, tag))
    if entry is not None:
        return entry
    tags = [entry.tag for entry in list_pretrained(model_name)]
    if tags:
        raise VitlabError(f"no checkpoint {tag!r} for {model_name}; known tags: {', '.join(tags)}")
    models = sorted({name for name, _ in CATALOGUE})
    raise VitlabError(f"no published checkpoints for {model_name!r}; models with checkpoints: {', '.join(models)}")


_TIMM_SIZES = {"tiny": "ti", "small": "s", "base": "b", "large": "l", "huge": "h"}
_TIMM_NAME = re.compile(r"vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)\.(\w+)")
_HF_NAME = re.compile(r"google/vit-(base|large|huge)-patch(\d+)-(\d+)(-in21k)?")
_WEIGHT_SUFFIXES = (".safetensors", ".npz", ".pth", ".pt", ".bin", ".ckpt")


def _translate(spec: str, model_name: str | None) -> tuple[str, str] | None:
    """(model, tag) that a catalogue name spells: `MODEL:TAG`, a bare TAG with `model_name`, timm's
    `vit_small_patch16_224.augreg_in21k_ft_in1k` or Hugging Face's `google/vit-base-patch16-224[-in21k]`."""
    if ":" in spec:
        model, tag = spec.split(":", 1)
        return model, tag
    match = _TIMM_NAME.fullmatch(spec)
    if match:
        size, patch, res, tag = match.groups()
        tag = tag.replace("_", "-")
        if int(res) == 384:
            tag += "-384"
        return f"vit-{_TIMM_SIZES[size]}{patch}", tag
    match = _HF_NAME.fullmatch(spec)
    if match:
        size, patch, res, in21k = match.groups()
        tag = "orig-in21k" if in21k else "orig-in21k-ft-in1k" + ("-384" if int(res) == 384 else "")
        return f"vit-{_TIMM_SIZES[size]}{patch}", tag
    if model_name is not None and any(tag == spec for _, tag in CATALOGUE):
        return model_name, spec
    return None


def looks_like_name(spec: str) -> bool:
    """Whether `spec` is meant as a catalogue name rather than a path: no weight-file suffix, and either a
    catalogue spelling or no directory separator."""
    if spec.lower().endswith(_WEIGHT_SUFFIXES):
        return False
    return _translate(spec, None) is not None or (os.sep not in spec and "/" not in spec and spec not in ("", ".."))


def resolve_name(spec: str, model_name: str | None = None) -> Pretrained:
    """The catalogue entry a name spells (see `_translate`); an unknown one is an error naming close matches."""
    key = _translate(spec, model_name)
    if key is not None and key in CATALOGUE:
        return CATALOGUE[key]
    names = [entry.name for entry in list_pretrained()]
    wanted = f"{key[0]}:{key[1]}" if key is not None else (f"{model_name}:{spec}" if model_name else spec)
    close = difflib.get_close_matches(wanted, names, n=5, cutoff=0.5)
    if key is not None and not close:
        close = [entry.name for entry in list_pretrained(key[0])][:8]
    hint = f"; close matches: {', '.join(close)}" if close else "; `vitlab models --pretrained` lists the names"
    if key is None and ":" not in spec and model_name is None:
        hint += " (a bare tag needs --model)"
    raise VitlabError(f"{spec!r} is neither a file nor a known checkpoint name{hint}")


def cache_dir() -> Path:
    """Where downloads are kept: `$VITLAB_CACHE`, else `~/.cache/vitlab`."""
    return Path(os.environ.get("VITLAB_CACHE") or Path.home() / ".cache" / "vitlab")


def cache_path(entry: Pretrained, cache: Path) -> Path:
    """The cache file for an entry; its name is built from the catalogue, never trusted from the URL alone."""
    basename = os.path.basename(urllib.parse.unquote(urllib.parse.urlparse(entry.url).path))
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", basename).lstrip(".") or "checkpoint"
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", f"{entry.model_name}--{entry.tag}--{safe}")
    path = cache / name
    if path.resolve().parent != cache.resolve():
        raise VitlabError(f"refusing cache file name {name!r} for {entry.url}: it would leave {cache}")
    return path


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _record(path: Path, digest: str) -> None:
    with atomic_writer(path.with_name(path.name + ".sha256")) as handle:
        handle.write(f"{digest}  {path.name}\n".encode())


def _recorded(path: Path) -> str | None:
    record = path.with_name(path.name + ".sha256")
    if not record.is_file():
        return None
    fields = record.read_bytes().decode("ascii", errors="replace").split()
    return fields[0] if fields else None


def mirror_url(entry: Pretrained, mirror: str | os.PathLike[str] | None = None) -> str:
    """The entry's URL with Google's bucket replaced by `mirror` (or `$VITLAB_MIRROR`): a URL prefix such as
    `https://host/vit_models` or `file:///data/vit_models`, or a local directory, under which the files keep
    their paths (`augreg/S_16-...npz`)."""
    mirror = mirror if mirror is not None else os.environ.get("VITLAB_MIRROR") or None
    if mirror is None or not entry.url.startswith(_BUCKET + "/"):
        return entry.url
    base = str(mirror)
    if "://" not in base:
        base = Path(base).resolve().as_uri()
    return base.rstrip("/") + entry.url[len(_BUCKET):]


def download(entry: Pretrained, cache: Path | None = None, mirror: str | os.PathLike[str] | None = None,
             progress: bool = True) -> Path:
    """The entry's file in the cache, downloaded (atomically, verified, with a progress bar on stderr) only if
    not there already; `mirror` replaces Google's bucket (see `mirror_url`)."""
    url = mirror_url(entry, mirror)
    cache = Path(cache) if cache is not None else cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache_path(entry, cache)
    recorded = _recorded(path)
    # The catalogue's digest when it has one, else the one recorded at the first download (trust on first use).
    expected = entry.sha256 or recorded
    if path.is_file():
        actual = _sha256_of(path)  # every time: a cached file can be corrupted or replaced after its download
        if expected is None or actual == expected:
            if recorded != actual:
                _record(path, actual)
            return path
        path.unlink()  # corrupted, tampered with, or cached under an older checksum: fetch it again
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_writer(path) as handle, \
                tqdm(total=int(response.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                     unit_divisor=1024, desc=entry.name, file=sys.stderr, disable=not progress) as bar:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                handle.write(chunk)
                bar.update(len(chunk))
            if expected is not None and digest.hexdigest() != expected:
                source = ("the catalogue's" if entry.sha256
                          else f"the one recorded at the first download ({path}.sha256)")
                raise VitlabError(f"{url}: sha256 {digest.hexdigest()} does not match {source} {expected}; "
                                  "the download was deleted")
    except (urllib.error.URLError, OSError) as error:
        raise VitlabError(f"could not download {url}: {getattr(error, 'reason', error)}") from None
    _record(path, digest.hexdigest())
    return path
