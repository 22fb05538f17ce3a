"""BiT ResNet-v2 (Kolesnikov et al., 2020) and the ResNet stem of the ViT hybrid (Dosovitskiy et al., 2021, §3.1).

Both replace BatchNorm with GroupNorm(32) and every convolution with a weight-standardised one, so they train with
any batch size. BiT uses pre-activation bottlenecks (norm → ReLU → conv); the hybrid's stem uses post-activation
ones (conv → norm → ReLU) with TensorFlow "SAME" padding, as the Flax original. Module names follow timm
(`stem.conv`, `stages.i.blocks.j.conv1`, `head.fc`, ...) so timm's `resnetv2_*` and `vit_*_r50_*` state dicts
load with no renaming; Google's `.npz` layouts are mapped in `vitlab.weights.resnet`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitlab.errors import VitlabError
from vitlab.models import checks
from vitlab.models.family import Family
from vitlab.models.layers import DropPath

STEMS = ("fixed", "same", "small")
NUM_GROUPS = 32  # GroupNorm groups everywhere, as BiT
# How weight standardisation and GroupNorm compute. `timm`: (w - mean) / sqrt(var + 1e-8), GroupNorm eps 1e-5, as
# timm's StdConv2d/StdConv2dSame and GroupNormAct (BiT-PyTorch uses eps 1e-10). `flax`: (w - mean) / (std + 1e-5),
# GroupNorm eps 1e-6, as vision_transformer's models_resnet.py (`weight_standardize`) and Flax's nn.GroupNorm, which
# the hybrid's `.npz` files were trained and evaluated with.
NUMERICS = ("timm", "flax")
GN_EPS = {"timm": 1e-5, "flax": 1e-6}
WS_EPS = {"timm": 1e-8, "flax": 1e-5}


@dataclass(frozen=True)
class ResNetConfig:
    """Everything that defines a ResNet's shape; the registry names concrete sizes.

    `width` is the stem's channel count; stage i's bottleneck is `width·2^i` wide and outputs 4× that (BiT's
    R50x1 has width 64). `stem`: `fixed` is BiT's 7×7/2 conv then a 3×3/2 max pool over a one-pixel zero pad;
    `same` is the ViT hybrid's, with TensorFlow SAME padding in every convolution and pool; `small` is a 3×3/1 conv
    without pooling, so 28–32 px inputs keep a useful feature map. `preact=False` gives the hybrid's
    post-activation blocks. `img_size` is the size data is prepared at; a ResNet runs at any size. `numerics` says
    how weight standardisation and GroupNorm compute (`NUMERICS`): as timm, or as Google's Flax hybrid stem.
    """

    img_size: tuple[int, int] = (224, 224)
    in_chans: int = 3
    num_classes: int = 1000
    layers: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    stem: str = "fixed"
    preact: bool = True
    drop_path: float = 0.0
    numerics: str = "timm"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", checks.block_counts("layers", self.layers))
        object.__setattr__(self, "img_size", checks.image_size(self.img_size))
        for name in ("in_chans", "width"):
            checks.require_positive_int(name, getattr(self, name))
        checks.require_class_count(self.num_classes)
        checks.require_probability("drop_path", self.drop_path)
        if self.width % NUM_GROUPS:
            raise VitlabError(f"width must be a multiple of {NUM_GROUPS} (GroupNorm's groups), got {self.width}")
        checks.require_choice("stem", self.stem, STEMS)
        checks.require_bool("preact", self.preact)
        checks.require_choice("numerics", self.numerics, NUMERICS)

    @property
    def stride(self) -> int:
        """Input pixels per output feature: the stem's 4 (1 for `small`), then 2 per stage after the first."""
        return (1 if self.stem == "small" else 4) * 2 ** (len(self.layers) - 1)

    @property
    def num_features(self) -> int:
        return 4 * self.width * 2 ** (len(self.layers) - 1)


def same_padding(x: torch.Tensor, kernel_size: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow's SAME padding: the output has ceil(size / stride) positions, extra padding at the end."""
    pads = []
    for size in reversed(x.shape[-2:]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class StdConv2d(nn.Conv2d):
    """A bias-free convolution whose kernel is standardised per output channel (zero mean, unit variance) at
    every call, which is what lets GroupNorm replace BatchNorm without losing accuracy (BiT §3.3).

    `numerics` (`NUMERICS`, set by `ResNet.set_numerics`) picks timm's formula or the official Flax one."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int, stride: int = 1, same: bool = False) -> None:
        super().__init__(in_chans, out_chans, kernel_size, stride=stride,
                         padding=0 if same else (kernel_size - 1) // 2, bias=False)
        self.same = same
        self.numerics = "timm"  # set by ResNet.set_numerics

    def standardized_weight(self) -> torch.Tensor:
        flat = self.weight.reshape(self.out_channels, -1)
        if self.numerics == "flax":  # models_resnet.weight_standardize: w -= mean(w); w /= std(w) + eps
            centred = flat - flat.mean(dim=1, keepdim=True)
            std = centred.std(dim=1, correction=0, keepdim=True)
            return (centred / (std + WS_EPS["flax"])).reshape_as(self.weight)
        # Normalising the kernel as a (1, out, in·k·k) batch standardises each output channel in one fused op,
        # with the arithmetic timm uses, so logits agree with timm's to float rounding on the same weights.
        return F.batch_norm(flat[None], None, None, training=True, eps=WS_EPS["timm"]).reshape_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.standardized_weight()
        if self.same:
            x = same_padding(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, weight, None, self.stride, self.padding)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm(32), optionally followed by ReLU (one module, as timm, so the weights keep timm's names)."""

    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(NUM_GROUPS, channels, eps=GN_EPS["timm"])
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.relu(x) if self.act else x


class Downsample(nn.Module):
    """The projection shortcut: a strided 1×1 conv (followed by a norm in post-activation blocks)."""

    def __init__(self, in_chans: int, out_chans: int, stride: int, preact: bool, same: bool) -> None:
        super().__init__()
        self.conv = StdConv2d(in_chans, out_chans, 1, stride=stride, same=same)
        self.norm = nn.Identity() if preact else GroupNormAct(out_chans, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class PreActBottleneck(nn.Module):
    """BiT's unit: x + conv3(gn3(conv2(gn2(conv1(gn1(x)))))), each gn with ReLU; the stride sits on the 3×3 conv and
    the projection shortcut takes the pre-activated input."""

    def __init__(self, in_chans: int, out_chans: int, stride: int, drop_path: float, same: bool = False) -> None:
        super().__init__()
        mid = out_chans // 4
        needs_projection = stride != 1 or in_chans != out_chans
        self.downsample = Downsample(in_chans, out_chans, stride, True, same) if needs_projection else None
        self.norm1 = GroupNormAct(in_chans)
        self.conv1 = StdConv2d(in_chans, mid, 1, same=same)
        self.norm2 = GroupNormAct(mid)
        self.conv2 = StdConv2d(mid, mid, 3, stride=stride, same=same)
        self.norm3 = GroupNormAct(mid)
        self.conv3 = StdConv2d(mid, out_chans, 1, same=same)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.norm1(x)
        shortcut = x if self.downsample is None else self.downsample(preact)
        x = self.conv1(preact)
        x = self.conv2(self.norm2(x))
        x = self.conv3(self.norm3(x))
        return self.drop_path(x) + shortcut


class Bottleneck(nn.Module):
    """The hybrid's post-activation unit: relu(shortcut + gn3(conv3(relu(gn2(conv2(relu(gn1(conv1(x))))))))).

    gn3's scale starts at zero, so each unit starts as its shortcut (the Flax original's initialisation)."""

    def __init__(self, in_chans: int, out_chans: int, stride: int, drop_path: float, same: bool = True) -> None:
        super().__init__()
        mid = out_chans // 4
        needs_projection = stride != 1 or in_chans != out_chans
        self.downsample = Downsample(in_chans, out_chans, stride, False, same) if needs_projection else None
        self.conv1 = StdConv2d(in_chans, mid, 1, same=same)
        self.norm1 = GroupNormAct(mid)
        self.conv2 = StdConv2d(mid, mid, 3, stride=stride, same=same)
        self.norm2 = GroupNormAct(mid)
        self.conv3 = StdConv2d(mid, out_chans, 1, same=same)
        self.norm3 = GroupNormAct(out_chans, act=False)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(self.drop_path(x) + shortcut)


class Stem(nn.Module):
    """The root block: `fixed` (BiT), `same` (the hybrid: conv, GN+ReLU, SAME max pool) or `small` (3×3/1)."""

    def __init__(self, in_chans: int, width: int, kind: str, preact: bool) -> None:
        super().__init__()
        self.kind = kind
        if kind == "small":
            self.conv = StdConv2d(in_chans, width, 3)
        else:
            self.conv = StdConv2d(in_chans, width, 7, stride=2, same=kind == "same")
        self.norm = None if preact else GroupNormAct(width)  # pre-activation blocks normalise their own input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.kind == "fixed":
            return F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, 2)
        if self.kind == "same":
            return F.max_pool2d(same_padding(x, 3, 2, value=-math.inf), 3, 2)
        return x


class ResNetStage(nn.Module):
    """Blocks at one resolution; the first one changes width and (after stage 0) halves the resolution."""

    def __init__(self, in_chans: int, out_chans: int, depth: int, stride: int, drop_rates: list[float],
                 preact: bool, same: bool) -> None:
        super().__init__()
        self.grad_checkpointing = False
        block = PreActBottleneck if preact else Bottleneck
        self.blocks = nn.Sequential(*(
            block(in_chans if i == 0 else out_chans, out_chans, stride if i == 0 else 1, drop_rates[i], same=same)
            for i in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class ClassifierHead(nn.Module):
    """Global average pool, then a 1×1 convolution (timm's and BiT's `head.fc`, so their kernels load as they are)."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(num_features, num_classes, 1) if num_classes > 0 else nn.Identity()
        if num_classes > 0:  # BiT fine-tunes from a zero head
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3), keepdim=True)
        return (x if pre_logits else self.fc(x)).flatten(1)


class ResNet(nn.Module):
    """BiT ResNet-v2 with timm's uniform API: forward_features, forward_head, forward, reset_classifier."""

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        same = config.stem == "same"
        self.stem = Stem(config.in_chans, config.width, config.stem, config.preact)
        total = sum(config.layers)
        rates = [config.drop_path * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.Sequential()
        in_chans = config.width
        for index, depth in enumerate(config.layers):
            out_chans = 4 * config.width * 2 ** index
            first = sum(config.layers[:index])
            self.stages.add_module(str(index), ResNetStage(
                in_chans, out_chans, depth, 1 if index == 0 else 2, rates[first:first + depth], config.preact, same))
            in_chans = out_chans
        self.num_features = in_chans
        self.norm = GroupNormAct(in_chans) if config.preact else nn.Identity()  # pre-activation needs a last norm
        self.head = ClassifierHead(in_chans, config.num_classes)
        self.set_numerics(config.numerics)
        self.init_weights()

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @torch.no_grad()
    def init_weights(self) -> None:
        """He-normal kernels (their scale is moot after standardisation), unit GroupNorms, zero head; the
        post-activation units' last GroupNorm scale starts at zero, as in the Flax hybrid."""
        for module in self.modules():
            if isinstance(module, StdConv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.norm3.weight)

    def set_numerics(self, numerics: str | None = None) -> None:
        """Compute weight standardisation and GroupNorm as timm or as the official Flax code (`NUMERICS`), in place;
        the parameters stay as they are."""
        if numerics is None:
            return
        self.config = dataclasses.replace(self.config, numerics=numerics)
        for module in self.modules():
            if isinstance(module, StdConv2d):
                module.numerics = numerics
            elif isinstance(module, GroupNormAct):
                module.eps = GN_EPS[numerics]

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a zero-initialised one, as BiT does before fine-tuning."""
        reference = self.stem.conv.weight
        self.head = ClassifierHead(self.num_features, num_classes).to(reference.device, reference.dtype)
        self.config = dataclasses.replace(self.config, num_classes=num_classes)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass: less memory, more time."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image → normalised feature map (B, num_features, H/stride, W/stride)."""
        if x.ndim != 4 or x.shape[1] != self.config.in_chans:
            raise VitlabError(f"expected input (B, {self.config.in_chans}, H, W), got {tuple(x.shape)}")
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map → logits; `pre_logits=True` stops at the pooled features (what few-shot probes use)."""
        return self.head(features, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


FAMILY = Family("resnet", "ResNet", ResNetConfig, ResNet, architecture_fields=("layers", "width", "stem", "preact"))
