"""Training configuration and the one registry of named recipes.

A recipe is a `TrainConfig` plus the command that runs it and the result it is expected to reach, as big_vision's
configs do; every field can be overridden on the command line (`--lr 3e-4`, `--set ema_decay=0.999`). The study
families (`study-vit`, ...) and the fine-tuning defaults (`finetune`) are recipes too.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from vitlab.data import AugmentConfig
from vitlab.errors import VitlabError


@dataclass(frozen=True)
class TrainAugment:
    """The training-time augmentation: one nested group of `TrainConfig`.

    Run records and `--set` name its fields flat (`crop_padding=2`), as earlier versions did; `--set` also takes
    them dotted (`augment.crop_padding=2`), and `config.crop_padding` reads `config.augment.crop_padding`.
    """

    crop_padding: int = 0
    hflip: bool = False
    randaugment_ops: int = 0
    randaugment_magnitude: int = 9
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    # the batched transform's random-resized crop, off by default; per-sample folder transforms always crop
    random_resized_crop: bool = False
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        for name in ("scale", "ratio"):  # lists from JSON records, whole numbers from the command line
            object.__setattr__(self, name, tuple(float(value) for value in getattr(self, name)))
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise VitlabError(f"scale must be two area shares with 0 < min <= max <= 1, got {list(self.scale)}")
        if not 0.0 < self.ratio[0] <= self.ratio[1] or not all(map(math.isfinite, self.ratio)):
            raise VitlabError(f"ratio must be two finite aspects with 0 < min <= max, got {list(self.ratio)}")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if not math.isfinite(getattr(self, name)):
                raise VitlabError(f"{name} must be finite, got {getattr(self, name)}")
        for name in ("crop_padding", "randaugment_ops", "mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise VitlabError(f"{name} must not be negative, got {getattr(self, name)}")

    def to_data(self) -> AugmentConfig:
        """The data package's transform settings: the one place the two are converted."""
        return AugmentConfig(crop_padding=self.crop_padding, hflip=self.hflip, randaugment_ops=self.randaugment_ops,
                             randaugment_magnitude=self.randaugment_magnitude, mixup_alpha=self.mixup_alpha,
                             cutmix_alpha=self.cutmix_alpha, scale=self.scale, ratio=self.ratio,
                             random_resized_crop=self.random_resized_crop)


AUGMENT_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainAugment))


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    model: str = "vit-mini-p4-28"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    dataset: str = "fashion-mnist"
    subset: int | None = None
    img_size: int | None = None
    val_fraction: float = 0.1  # an image folder without val/ or test/: the share of each class held out; 0: none
    # schedule
    epochs: float = 10.0
    batch_size: int = 256
    accum_steps: int = 1
    optimizer: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    ema_decay: float | None = None
    augment: TrainAugment = TrainAugment()
    # fine-tuning
    init_from: str | None = None
    new_head: bool = True
    # running
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: str = "auto"
    compile: bool = False
    grad_checkpointing: bool = False  # recompute block activations in backward: fits bigger models in memory
    fsdp: bool = False  # shard parameters, gradients and optimizer state across processes (FSDP2)
    threads: int | None = None  # None or 0: torch's own choice
    workers: int | None = None  # image-folder decoding processes; None: from the cores (`data.default_workers`)
    eval_every_epochs: float = 1.0
    checkpoint_every_steps: int = 500
    eval_batch_size: int = 1000
    out: str = "runs/train"
    progress: bool = True
    skip_bad_images: bool = False

    def __post_init__(self) -> None:
        choices = {"optimizer": ("adamw", "sgd"), "schedule": ("cosine", "linear"),
                   "amp": ("auto", "bf16", "fp32", "none"), "device": None}
        for name, allowed in choices.items():
            if allowed and getattr(self, name) not in allowed:
                raise VitlabError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            numbers = value if isinstance(value, (tuple, list)) else [value]
            if any(isinstance(number, float) and not math.isfinite(number) for number in numbers):
                raise VitlabError(f"{item.name} must be finite, got {value}")
        positive = ("epochs", "batch_size", "accum_steps", "lr", "eval_batch_size", "checkpoint_every_steps",
                    "eval_every_epochs", "img_size", "subset")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise VitlabError(f"{name} must be positive, got {getattr(self, name)}")
        non_negative = ("min_lr", "weight_decay", "warmup_steps", "warmup_epochs", "grad_clip", "label_smoothing",
                        "threads", "workers")
        for name in non_negative:
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise VitlabError(f"{name} must not be negative, got {getattr(self, name)}")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise VitlabError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise VitlabError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.batch_size % self.accum_steps:
            raise VitlabError(f"batch_size {self.batch_size} is not divisible by accum_steps {self.accum_steps}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise VitlabError(f"ema_decay must be in (0, 1), got {self.ema_decay}")

    def __getattr__(self, name: str) -> Any:
        """The augmentation's flat names, as earlier versions had them: `config.hflip` is `config.augment.hflip`."""
        if name in AUGMENT_FIELDS:
            return getattr(self.augment, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


@dataclass(frozen=True)
class Recipe:
    """A named training configuration, the command that runs it and the result it reaches (one line, no date).

    A recipe with `sets` is layered over another run's settings (fine-tuning a checkpoint takes its data and model
    from the checkpoint's run) and changes only those fields; one without is the whole configuration.
    """

    config: TrainConfig
    command: str
    expected: str
    description: str
    sets: tuple[str, ...] = ()

    def over(self, base: TrainConfig) -> TrainConfig:
        """`base` with this recipe's fields; the recipe's own config when it is not a layered one."""
        if not self.sets:
            return self.config
        return override(base, {name: getattr(self.config, name) for name in self.sets})


# The demo's ViT: vit-mini-p7-28 narrowed to width 96, which costs less per step than width 128 for the same
# accuracy per epoch, so the demo's ten minutes buy more epochs.
FMNIST_VIT_SHAPE: dict[str, Any] = {"pool": "gap", "posemb": "sincos2d", "embed_dim": 96, "num_heads": 3,
                                    "mlp_dim": 192}

FMNIST_VIT = TrainConfig(model="vit-mini-p7-28", model_overrides=FMNIST_VIT_SHAPE, img_size=21, epochs=33,
                         batch_size=256, lr=2e-3, weight_decay=0.05, warmup_epochs=0.3, label_smoothing=0.1,
                         augment=TrainAugment(hflip=True), out="runs/fmnist-vit")

# What every study run shares, whatever the family. The study's budget replaces batch_size, epochs,
# eval_every_epochs and warmup_steps for each run; the values here are those of its largest data-size run.
STUDY_BASE = TrainConfig(augment=TrainAugment(hflip=True), grad_clip=1.0, schedule="cosine",
                         checkpoint_every_steps=250, batch_size=128, epochs=8.0, eval_every_epochs=2.0,
                         warmup_steps=187)


def _study_family(family: str, model: str, expected: str, description: str, **fields: Any) -> Recipe:
    return Recipe(dataclasses.replace(STUDY_BASE, model=model, out=f"runs/study-{family}", **fields),
                  command=f"vitlab train --recipe study-{family} --out runs/study-{family}", expected=expected,
                  description=f"the {family} family of `vitlab study`: {description}")


RECIPES: dict[str, Recipe] = {
    "fmnist-vit": Recipe(
        FMNIST_VIT,
        command="vitlab train --recipe fmnist-vit --out runs/fmnist-vit",
        expected="≈ 90.0% Fashion-MNIST top-1 (89.7-90.4 over seeds) in ≈ 9 min on 2 CPU cores",
        description="a small pure ViT (7-px patches, width 96, depth 6, GAP, 2D sin-cos positions) from scratch "
                    "at 21 px, a 3x3 patch grid, which is cheaper per epoch than 28 px for the same accuracy per "
                    "epoch; whole images, so it suits staying at 21 px"),
    # Objects fill Fashion-MNIST's frames: only crops that show them enlarged prepare the model for 28 px.
    "fmnist-vit-rrc": Recipe(
        dataclasses.replace(FMNIST_VIT, augment=dataclasses.replace(FMNIST_VIT.augment, random_resized_crop=True,
                                                                    scale=(0.35, 1.0)), out="runs/fmnist-vit-rrc"),
        command="vitlab train --recipe fmnist-vit-rrc --out runs/fmnist-vit-rrc",
        expected="≈ 89.3% Fashion-MNIST top-1 at 21 px, ≈ 90.2% after fmnist-finetune at 28 px",
        description="the demo's pre-training: fmnist-vit on random-resized crops (area 0.35-1, FixRes), which show "
                    "objects at the larger scale a higher resolution gives them, so fine-tuning at 28 px improves "
                    "the model instead of costing it"),
    # Given time, random 2-px shifts lift the demo's plateau; over the demo's 33 epochs they cost accuracy.
    "fmnist-vit-long": Recipe(
        dataclasses.replace(FMNIST_VIT, img_size=28, epochs=100, augment=TrainAugment(crop_padding=2, hflip=True),
                            out="runs/fmnist-vit-long"),
        command="vitlab train --recipe fmnist-vit-long --out runs/fmnist-vit-long",
        expected="≈ 92.1% Fashion-MNIST top-1 in ≈ 32 min on 1 CPU core under bf16 autocast",
        description="the demo's ViT at 28 px (4x4 patch grid) with random shifts of up to 2 px and hflip, for "
                    "100 epochs"),
    # 4-px patches see 49 tokens instead of 16: each epoch costs more at width 64, but learns more.
    "fmnist-vit-p4": Recipe(
        dataclasses.replace(FMNIST_VIT, model="vit-mini-p4-28", img_size=28, epochs=60,
                            augment=TrainAugment(crop_padding=2, hflip=True),
                            model_overrides={**FMNIST_VIT_SHAPE, "embed_dim": 64, "num_heads": 4, "mlp_dim": 128},
                            out="runs/fmnist-vit-p4"),
        command="vitlab train --recipe fmnist-vit-p4 --out runs/fmnist-vit-p4",
        expected="≈ 92.5% Fashion-MNIST top-1 in ≈ 23 min on 2 CPU cores under bf16 autocast",
        description="a pure ViT with 4-px patches (7x7 grid), width 64, depth 6, MLP 128, GAP, 2D sin-cos "
                    "positions, random 2-px shifts and hflip, for 60 epochs: the shape of "
                    "s-chh/PyTorch-Scratch-Vision-Transformer-ViT"),
    "fmnist-finetune": Recipe(
        dataclasses.replace(FMNIST_VIT, img_size=28, epochs=3, batch_size=128, lr=1e-3, weight_decay=0.0,
                            warmup_epochs=0.1, new_head=False, out="runs/fmnist-finetune"),
        command="vitlab finetune --recipe fmnist-finetune --from runs/fmnist-vit-rrc --out runs/fmnist-finetune",
        expected="≈ 90.2% Fashion-MNIST top-1 at 28 px after 3 epochs from the fmnist-vit-rrc model (≈ 89.3%)",
        description="the paper's higher-resolution fine-tuning step: the native 28 px, a 4x4 patch grid, on whole "
                    "images; from a model pre-trained without crops the change of scale costs points instead"),
    # The paper's fine-tuning (App. B.1.1), layered over the source run's own settings: SGD momentum 0.9, no weight
    # decay, clip 1, cosine; a new zero head.
    "finetune": Recipe(
        TrainConfig(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, grad_clip=1.0, schedule="cosine",
                    warmup_epochs=0.1, epochs=1.0, new_head=True, ema_decay=None),
        command="vitlab finetune --recipe finetune --from runs/fmnist-vit (what vitlab finetune does by default)",
        expected="≈ 81.9% Fashion-MNIST top-1 in the resolution study's 28 → 42 px arm, from 87.5% at 28 px",
        description="the paper's fine-tuning settings over the source run's own: SGD momentum 0.9, no weight "
                    "decay, clip 1, cosine, a tenth of an epoch of warm-up, one epoch, no EMA, mixup or CutMix",
        sets=("optimizer", "lr", "momentum", "weight_decay", "grad_clip", "schedule", "warmup_epochs", "epochs",
              "new_head", "ema_decay", "mixup_alpha", "cutmix_alpha")),
    "paper-pretrain-i21k": Recipe(
        TrainConfig(model="vit-b16", model_overrides={"representation_size": 768, "dropout": 0.1},
                    dataset="imagenet21k", img_size=224, epochs=90, batch_size=4096, lr=1e-3, min_lr=1e-5,
                    weight_decay=0.03, schedule="linear", warmup_steps=10_000, grad_clip=1.0,
                    augment=TrainAugment(hflip=True), out="runs/i21k-b16"),
        command="torchrun --nproc_per_node=8 -m vitlab train --recipe paper-pretrain-i21k --dataset PATH/imagenet21k",
        expected="≈ 84% ImageNet top-1 after fine-tuning at 384 px (paper Table 5)",
        description="the paper's ImageNet-21k pre-training of ViT-B/16 (§4.1, VT issue #2)"),
    "paper-finetune": Recipe(
        TrainConfig(model="vit-b16", dataset="imagenet", img_size=384, epochs=8, batch_size=512, optimizer="sgd",
                    lr=0.03, min_lr=0.0, weight_decay=0.0, warmup_steps=500, grad_clip=1.0,
                    augment=TrainAugment(hflip=True), out="runs/finetune-b16"),
        command="vitlab finetune --recipe paper-finetune --from runs/i21k-b16 --dataset PATH/imagenet",
        expected="≈ 84% ImageNet top-1 at 384 px from an i21k ViT-B/16 in 20k steps (VT README)",
        description="the paper's fine-tuning: SGD momentum 0.9, no weight decay, clip 1, cosine, 384 px"),
    "bv-s16-i1k": Recipe(
        TrainConfig(model="vit-s16", model_overrides={"pool": "gap", "posemb": "sincos2d",
                                                      "representation_size": 384},
                    dataset="imagenet", img_size=224, epochs=90, batch_size=1024, lr=1e-3, weight_decay=0.1,
                    warmup_steps=10_000, grad_clip=1.0,
                    augment=TrainAugment(hflip=True, randaugment_ops=2, randaugment_magnitude=10, mixup_alpha=0.2),
                    out="runs/bv-s16"),
        command="torchrun --nproc_per_node=8 -m vitlab train --recipe bv-s16-i1k --dataset PATH/imagenet",
        expected="≈ 76.5% ImageNet top-1 after 90 epochs (big_vision README)",
        description="big_vision's 'better plain ViT baselines' ViT-S/16 on ImageNet-1k"),
    # Each study family: its 28×28 grayscale model and the optimiser its own literature trains it with.
    "study-vit": _study_family(
        "vit", "vit-mini-p7-28", "≈ 88.0% Fashion-MNIST top-1 in the data-size study's 8 epochs on 60,000 images",
        "the fmnist-vit recipe's ViT at width 128, about the size of the other families, with AdamW as the paper "
        "pre-trains", model_overrides={"pool": "gap", "posemb": "sincos2d"}, optimizer="adamw", lr=2e-3,
        weight_decay=0.05),
    # AdamW, not BiT's upstream SGD (made for 90 ImageNet epochs): in the study's few hundred steps on small sets SGD
    # falls far behind, so the study would measure the optimiser.
    "study-resnet": _study_family(
        "resnet", "resnet-bit-mini-28",
        "≈ 92.7% Fashion-MNIST top-1 in the data-size study's 8 epochs on 60,000 images",
        "a small BiT ResNet with AdamW", optimizer="adamw", lr=1e-3, weight_decay=0.05),
    "study-mixer": _study_family(
        "mixer", "mixer-mini-p4-28", "≈ 89.5% Fashion-MNIST top-1 in the data-size study's 8 epochs on 60,000 images",
        "a small MLP-Mixer with AdamW and weight decay, as its paper trains it", optimizer="adamw", lr=1e-3,
        weight_decay=0.05),
    "study-perceiver": _study_family(
        "perceiver", "perceiver-mini-28",
        "≈ 87.7% Fashion-MNIST top-1 in the data-size study's 8 epochs on 60,000 images",
        "a small Perceiver with AdamW and weight decay, as its paper trains it", optimizer="adamw", lr=5e-4,
        weight_decay=0.05),
}

# The study's model families, each a recipe above.
FAMILY_RECIPES: dict[str, Recipe] = {family: RECIPES[f"study-{family}"]
                                     for family in ("vit", "resnet", "mixer", "perceiver")}
FINETUNE = RECIPES["finetune"]


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise VitlabError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def recipe_config(name: str) -> TrainConfig:
    return get_recipe(name).config


def _option_types() -> dict[str, str]:
    """Every option `override` and `config_from_json` take, flat, with its declared type."""
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig) if f.name != "augment"}
    types.update({f.name: str(f.type) for f in dataclasses.fields(TrainAugment)})
    return types


def _assemble(config: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """`config` with flat `values`; the augmentation's names go into its nested group."""
    augment = {name: value for name, value in values.items() if name in AUGMENT_FIELDS}
    rest = {name: value for name, value in values.items() if name not in AUGMENT_FIELDS}
    if augment:
        rest["augment"] = dataclasses.replace(config.augment, **augment)
    return dataclasses.replace(config, **rest)


def override(config: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """Replace fields by name, converting strings from the command line to each field's declared type.

    The augmentation's fields are named flat (`crop_padding`) or dotted (`augment.crop_padding`)."""
    types = _option_types()
    values = {name.removeprefix("augment.") if name.removeprefix("augment.") in AUGMENT_FIELDS else name: value
              for name, value in values.items()}
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise VitlabError(f"unknown training option(s) {', '.join(unknown)}; valid: {', '.join(sorted(types))}")
    return _assemble(config, {name: _convert(name, value, types[name]) for name, value in values.items()})


def _convert(name: str, value: Any, annotation: str) -> Any:
    """`value` (JSON text or a bare string) as a value of `annotation`, such as 'int | None' or 'tuple[float,
    float]'."""
    if not isinstance(value, str):
        return value
    options = [part.strip() for part in annotation.split("|")]
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    if "str" in options and parsed is not None:
        return value  # a name or path, even one that reads as a number
    if isinstance(parsed, float) and not math.isfinite(parsed):
        raise VitlabError(f"{name} must be a finite number, got {value!r}")
    if "int" in options and isinstance(parsed, float) and parsed.is_integer():
        parsed = int(parsed)
    if not _json_type_ok(parsed, annotation):
        expected = " or ".join(_describe(option) for option in options)
        raise VitlabError(f"{name} must be {expected}, got {value!r}")
    if "float" in options and isinstance(parsed, int) and not isinstance(parsed, bool):
        return float(parsed)
    return tuple(parsed) if isinstance(parsed, list) else parsed


def _describe(option: str) -> str:
    if option.startswith("tuple"):
        return f"a list of {option.count(',') + 1} numbers"
    return {"int": "a whole number", "float": "a number", "bool": "true or false", "None": "null"}.get(
        option, "a JSON object" if option.startswith("dict") else option)


def config_to_json(config: TrainConfig) -> dict[str, Any]:
    """The config as run records hold it: flat, the augmentation's fields in its place, tuples as lists."""
    flat: dict[str, Any] = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if item.name == "augment":
            flat.update({name: list(part) if isinstance(part, tuple) else part
                         for name, part in dataclasses.asdict(value).items()})
        else:
            flat[item.name] = list(value) if isinstance(value, tuple) else copy.deepcopy(value)
    return flat


def config_from_json(data: dict[str, Any], source: str) -> TrainConfig:
    if not isinstance(data, dict):
        raise VitlabError(f"{source}: the training config must be a JSON object, got {type(data).__name__}")
    fields = _option_types()
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise VitlabError(f"{source}: unknown training config field(s) {', '.join(unknown)}")
    wrong = [f"{name}={value!r} (expected {fields[name]})" for name, value in data.items()
             if not _json_type_ok(value, fields[name])]
    if wrong:
        raise VitlabError(f"{source}: training config field(s) of the wrong type: {'; '.join(wrong)}"[:600])
    if "betas" in data:
        data = {**data, "betas": tuple(data["betas"])}
    try:
        return _assemble(TrainConfig(), data)
    except TypeError as error:
        raise VitlabError(f"{source}: invalid training config: {error}") from None


def _json_type_ok(value: Any, annotation: str) -> bool:
    """Whether a value read from JSON fits a TrainConfig annotation such as 'int | None' or 'tuple[float, float]'."""
    def number(item: Any) -> bool:
        return isinstance(item, (int, float)) and not isinstance(item, bool)

    for option in (part.strip() for part in annotation.split("|")):
        if ((option == "None" and value is None) or (option == "bool" and isinstance(value, bool))
                or (option == "int" and isinstance(value, int) and not isinstance(value, bool))
                or (option == "float" and number(value)) or (option == "str" and isinstance(value, str))
                or (option.startswith("dict") and isinstance(value, dict))
                or (option.startswith("tuple") and isinstance(value, list) and len(value) == option.count(",") + 1
                    and all(number(item) for item in value))):
            return True
    return False
