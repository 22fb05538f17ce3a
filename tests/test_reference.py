"""vitlab against Google's own Flax code on files in the official `.npz` layout (issue 18).

The reference models below are small Flax modules built as google-research/vision_transformer's
`models_vit.py`, `models_resnet.py` and `models_mixer.py` build theirs: the same module tree and parameter names,
Flax's default (tanh) `nn.gelu`, LayerNorm and GroupNorm with Flax's default epsilons, the hybrid stem's weight
standardisation `(w - mean) / (std + 1e-5)`, and the official loader's steps (`recover_tree`, `convert_pre_linen`,
and the `scipy.ndimage.zoom(order=1)` resampling of the position embedding for another resolution). Random
parameters are written as the published files are laid out and loaded by vitlab as shipped; its logits and
pre-logits must agree with the reference's to 1e-5 of the largest reference logit.

`python tests/test_reference.py` prints the table in docs/numerics.md: the same comparison with vitlab computing
as timm does (exact GELU, timm's weight standardisation), then as shipped.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
jax = pytest.importorskip("jax")
fnn = pytest.importorskip("flax.linen")
checkpoints = pytest.importorskip("flax.training.checkpoints")
scipy_ndimage = pytest.importorskip("scipy.ndimage")

import jax.numpy as jnp  # noqa: E402

from vitlab.weights import load_model  # noqa: E402

TOLERANCE = 1e-5


# ------------------------------------------------------------------------------------------- reference models
class MlpBlock(fnn.Module):
    """Dense → Flax's default GELU (the tanh approximation) → Dense back to the input width."""

    mlp_dim: int

    @fnn.compact
    def __call__(self, x: Any) -> Any:
        hidden = fnn.gelu(fnn.Dense(self.mlp_dim)(x))
        return fnn.Dense(x.shape[-1])(hidden)


class Encoder1DBlock(fnn.Module):
    mlp_dim: int
    num_heads: int

    @fnn.compact
    def __call__(self, x: Any) -> Any:
        y = fnn.LayerNorm()(x)
        x = x + fnn.MultiHeadDotProductAttention(num_heads=self.num_heads, deterministic=True)(y, y)
        return x + MlpBlock(self.mlp_dim)(fnn.LayerNorm()(x))


class AddPositionEmbs(fnn.Module):
    @fnn.compact
    def __call__(self, x: Any) -> Any:
        return x + self.param("pos_embedding", fnn.initializers.normal(0.02), (1, *x.shape[1:]))


class Encoder(fnn.Module):
    num_layers: int
    mlp_dim: int
    num_heads: int

    @fnn.compact
    def __call__(self, x: Any) -> Any:
        x = AddPositionEmbs(name="posembed_input")(x)
        for index in range(self.num_layers):
            x = Encoder1DBlock(self.mlp_dim, self.num_heads, name=f"encoderblock_{index}")(x)
        return fnn.LayerNorm(name="encoder_norm")(x)


class StdConv(fnn.Conv):
    """The hybrid stem's convolution: its kernel standardised per output channel, eps added to the std."""

    def param(self, name: str, *args: Any, **kwargs: Any) -> Any:
        value = super().param(name, *args, **kwargs)
        if name == "kernel":
            value = value - jnp.mean(value, axis=(0, 1, 2))
            value = value / (jnp.std(value, axis=(0, 1, 2)) + 1e-5)
        return value


class ResidualUnit(fnn.Module):
    """The post-activation bottleneck; the stride sits on the 3×3 convolution."""

    features: int
    strides: tuple[int, int] = (1, 1)

    @fnn.compact
    def __call__(self, x: Any) -> Any:
        residual = x
        if x.shape[-1] != 4 * self.features or self.strides != (1, 1):
            residual = StdConv(4 * self.features, (1, 1), self.strides, use_bias=False, name="conv_proj")(x)
            residual = fnn.GroupNorm(name="gn_proj")(residual)
        y = fnn.relu(fnn.GroupNorm(name="gn1")(StdConv(self.features, (1, 1), use_bias=False, name="conv1")(x)))
        y = StdConv(self.features, (3, 3), self.strides, use_bias=False, name="conv2")(y)
        y = fnn.relu(fnn.GroupNorm(name="gn2")(y))
        y = fnn.GroupNorm(name="gn3")(StdConv(4 * self.features, (1, 1), use_bias=False, name="conv3")(y))
        return fnn.relu(residual + y)


class ResNetStage(fnn.Module):
    block_size: int
    nout: int
    first_stride: tuple[int, int]

    @fnn.compact
    def __call__(self, x: Any) -> Any:
        for unit in range(self.block_size):
            x = ResidualUnit(self.nout, self.first_stride if unit == 0 else (1, 1), name=f"unit{unit + 1}")(x)
        return x


class VisionTransformer(fnn.Module):
    num_classes: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    resnet_layers: tuple[int, ...] | None = None
    representation_size: int | None = None
    classifier: str = "token"

    @fnn.compact
    def __call__(self, x: Any) -> Any:
        if self.resnet_layers is not None:
            x = StdConv(64, (7, 7), (2, 2), use_bias=False, name="conv_root")(x)
            x = fnn.relu(fnn.GroupNorm(name="gn_root")(x))
            x = fnn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
            for stage, units in enumerate(self.resnet_layers):
                x = ResNetStage(units, 64 * 2 ** stage, (1, 1) if stage == 0 else (2, 2), name=f"block{stage + 1}")(x)
        patch = (self.patch_size, self.patch_size)
        x = fnn.Conv(self.hidden_size, patch, strides=patch, padding="VALID", name="embedding")(x)
        batch, height, width, channels = x.shape
        x = jnp.reshape(x, (batch, height * width, channels))
        if self.classifier == "token":
            cls = self.param("cls", fnn.initializers.zeros, (1, 1, channels))
            x = jnp.concatenate([jnp.tile(cls, (batch, 1, 1)), x], axis=1)
        x = Encoder(self.num_layers, self.mlp_dim, self.num_heads, name="Transformer")(x)
        x = x[:, 0] if self.classifier == "token" else jnp.mean(x, axis=1)
        if self.representation_size is not None:
            x = jnp.tanh(fnn.Dense(self.representation_size, name="pre_logits")(x))
        if self.num_classes:
            x = fnn.Dense(self.num_classes, name="head")(x)
        return x


class MixerBlock(fnn.Module):
    tokens_mlp_dim: int
    channels_mlp_dim: int

    @fnn.compact
    def __call__(self, x: Any) -> Any:
        y = jnp.swapaxes(fnn.LayerNorm()(x), 1, 2)
        x = x + jnp.swapaxes(MlpBlock(self.tokens_mlp_dim, name="token_mixing")(y), 1, 2)
        return x + MlpBlock(self.channels_mlp_dim, name="channel_mixing")(fnn.LayerNorm()(x))


class MlpMixer(fnn.Module):
    num_classes: int
    patch_size: int
    num_blocks: int
    hidden_dim: int
    tokens_mlp_dim: int
    channels_mlp_dim: int

    @fnn.compact
    def __call__(self, x: Any) -> Any:
        patch = (self.patch_size, self.patch_size)
        x = fnn.Conv(self.hidden_dim, patch, strides=patch, name="stem")(x)
        x = jnp.reshape(x, (x.shape[0], -1, x.shape[-1]))
        for _ in range(self.num_blocks):
            x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim)(x)
        x = jnp.mean(fnn.LayerNorm(name="pre_head_layer_norm")(x), axis=1)
        if self.num_classes:
            x = fnn.Dense(self.num_classes, name="head")(x)
        return x


# ------------------------------------------------------------------------------------------- the official files
def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if hasattr(value, "items"):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recover_tree(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The nested parameter tree of a flat `/`-joined `.npz`, as the official `checkpoint.recover_tree`."""
    tree: dict[str, Any] = {}
    for key, value in arrays.items():
        node = tree
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def to_pre_linen(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The published ViT files' pre-linen names: encoder sub-modules numbered across types (1, 2, 3), not per type."""
    renames = (("/MultiHeadDotProductAttention_0/", "/MultiHeadDotProductAttention_1/"),
               ("/LayerNorm_1/", "/LayerNorm_2/"), ("/MlpBlock_0/", "/MlpBlock_3/"))
    out = {}
    for key, value in arrays.items():
        if key.startswith("Transformer/encoderblock_"):
            for old, new in renames:
                key = key.replace(old, new)
        out[key] = value
    return out


def random_parameters(shapes: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Random arrays of the reference model's parameter shapes: kernels N(0, 1/fan_in) (Flax's LeCun scale),
    norm scales around 1, and biases, class token and position embedding random rather than zero or tiny."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, struct in shapes.items():
        shape = tuple(struct.shape)
        if key.endswith("kernel"):
            attention_input = any(f"/{name}/kernel" in f"/{key}" for name in ("query", "key", "value"))
            fan_in = shape[0] if attention_input else int(np.prod(shape[:-1]))
            value = rng.normal(0.0, fan_in ** -0.5, shape)
        elif key.endswith("scale"):
            value = 1.0 + rng.normal(0.0, 0.2, shape)
        else:
            value = rng.normal(0.0, 0.5 if key in ("cls", "Transformer/posembed_input/pos_embedding") else 0.2, shape)
        out[key] = value.astype(np.float32)
    return out


def official_resample(params: dict[str, Any], grid: int, classifier: str) -> dict[str, Any]:
    """`checkpoint.load_pretrained`'s position-embedding resampling to a grid×grid table."""
    posemb = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
    prefix = 1 if classifier == "token" else 0
    tokens, table = posemb[:, :prefix], posemb[0, prefix:]
    old = int(np.sqrt(len(table)))
    table = scipy_ndimage.zoom(table.reshape(old, old, -1), (grid / old, grid / old, 1), order=1)
    resized = np.concatenate([tokens, table.reshape(1, grid * grid, -1)], axis=1)
    params = {**params, "Transformer": {**params["Transformer"], "posembed_input": {"pos_embedding": resized}}}
    return params


@dataclasses.dataclass(frozen=True)
class Case:
    """One architecture shape at reduced depth; `size` is the file's resolution, `load_size` the one loaded at."""

    name: str
    module: Any
    size: int = 224
    load_size: int | None = None
    flat_layout: bool = False  # Mixer files carry linen names already

    @property
    def classifier(self) -> str:
        return getattr(self.module, "classifier", "token")


def vit(**kwargs: Any) -> VisionTransformer:
    return VisionTransformer(**{"num_classes": 10, "num_layers": 1, **kwargs})


B16 = {"patch_size": 16, "hidden_size": 768, "num_heads": 12, "mlp_dim": 3072}
TINY = {"patch_size": 16, "hidden_size": 64, "num_heads": 4, "mlp_dim": 256}
R50 = {"resnet_layers": (1, 1, 1), "patch_size": 1}  # the R50 stem's three stages (stride 16), one unit each
CASES = [
    # every listed architecture's widths and patch size, one block deep
    Case("ViT-Ti/16", vit(patch_size=16, hidden_size=192, num_heads=3, mlp_dim=768)),
    Case("ViT-S/16", vit(patch_size=16, hidden_size=384, num_heads=6, mlp_dim=1536)),
    Case("ViT-B/16", vit(**B16)),
    Case("ViT-B/32", vit(**{**B16, "patch_size": 32})),
    Case("R50+ViT-B/16", vit(**{**B16, **R50}), size=64),
    Case("Mixer-B/16", MlpMixer(num_classes=10, patch_size=16, num_blocks=1, hidden_dim=768, tokens_mlp_dim=384,
                                channels_mlp_dim=3072), flat_layout=True),
    # each head and resolution variant on a narrow ViT, two blocks deep
    Case("pre-logits", vit(**{**TINY, "num_layers": 2}, representation_size=48)),
    Case("GAP", vit(**{**TINY, "num_layers": 2}, classifier="gap")),
    Case("224→384", vit(**{**TINY, "num_layers": 2}), load_size=384),
    Case("GAP 224→384", vit(**{**TINY, "num_layers": 2}, classifier="gap"), load_size=384),
    Case("R50+ViT 64→96", vit(**{**TINY, **R50}), size=64, load_size=96),
]

# Full depth, for docs/numerics.md only (slower than a test should be).
DOC_CASES = [
    Case("ViT-B/16, 12 blocks", vit(**{**B16, "num_layers": 12})),
    Case("R50+ViT-B/16, stem (3, 4, 9), 12 blocks", vit(**{**B16, "num_layers": 12, "resnet_layers": (3, 4, 9),
                                                          "patch_size": 1}), size=64),
    Case("Mixer-B/16, 12 blocks", MlpMixer(num_classes=10, patch_size=16, num_blocks=12, hidden_dim=768,
                                           tokens_mlp_dim=384, channels_mlp_dim=3072), flat_layout=True),
]


def write_official_file(case: Case, path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Random parameters of the case's reference model, written in the published files' layout."""
    shapes = jax.eval_shape(case.module.init, jax.random.PRNGKey(seed), jnp.zeros((1, case.size, case.size, 3)))
    arrays = random_parameters(flatten(shapes["params"]), seed)
    if not case.flat_layout:
        arrays = to_pre_linen(arrays)
    np.savez(path, **arrays)
    return arrays


def official_outputs(case: Case, path: Path, images: np.ndarray, dtype: type = np.float32
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Logits and pre-logits as the official code computes them from the file (in float64 with `dtype`, which needs
    jax's x64 mode: the exact values that both float32 implementations round)."""
    images = images.astype(dtype)
    with np.load(path, allow_pickle=False) as data:
        params = checkpoints.convert_pre_linen(recover_tree({key: data[key].astype(dtype) for key in data.files}))
    params = jax.tree_util.tree_map(jnp.asarray, dict(params))
    if case.load_size is not None:
        stride = case.module.patch_size * (16 if getattr(case.module, "resnet_layers", None) else 1)
        params = official_resample(params, case.load_size // stride, case.classifier)
    # Without classes the model returns its pre-logits; the head is the same Dense on them.
    body = {key: value for key, value in params.items() if key != "head"}
    pre_logits = jax.jit(case.module.clone(num_classes=0).apply)({"params": body}, jnp.asarray(images))
    logits = fnn.Dense(case.module.num_classes).apply({"params": params["head"]}, pre_logits)
    return np.asarray(logits, np.float64), np.asarray(pre_logits, np.float64)


def vitlab_outputs(path: Path, images: np.ndarray, size: int | None, **overrides: Any) -> tuple[np.ndarray, ...]:
    if size is not None:
        overrides["img_size"] = size
    model = load_model(path, **overrides).eval()
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        features = model.forward_features(x)
        return (model.forward_head(features).double().numpy(),
                model.forward_head(features, pre_logits=True).double().numpy())


def relative(got: np.ndarray, expected: np.ndarray) -> float:
    """max |difference| / max |official value|."""
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def compare(case: Case, directory: Path, as_timm: bool = False, **overrides: Any) -> tuple[float, float]:
    """Relative differences of logits and pre-logits, vitlab as shipped (or computing as timm, or with other config
    `overrides`) against the official code, on images in [-1, 1] as the official preprocessing gives."""
    path = directory / "official.npz"
    write_official_file(case, path)
    size = case.load_size or case.size
    images = np.random.default_rng(1).uniform(-1.0, 1.0, (2, size, size, 3)).astype(np.float32)
    expected_logits, expected_pre = official_outputs(case, path, images)
    if as_timm:
        overrides["act"] = "gelu"
        if getattr(case.module, "resnet_layers", None):
            overrides["hybrid_numerics"] = "timm"
    logits, pre = vitlab_outputs(path, images, case.load_size, **overrides)
    return relative(logits, expected_logits), relative(pre, expected_pre)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_logits_and_pre_logits_match_the_official_code(case: Case, tmp_path: Path) -> None:
    logits, pre_logits = compare(case, tmp_path)
    assert logits < TOLERANCE and pre_logits < TOLERANCE, (logits, pre_logits)


def test_the_comparison_sees_the_exact_gelu(tmp_path: Path) -> None:
    """The tolerance is tight enough to fail vitlab computing as timm does (exact GELU) on the same file."""
    logits, pre_logits = compare(CASES[0], tmp_path, as_timm=True)
    assert logits > 2 * TOLERANCE and pre_logits > 2 * TOLERANCE, (logits, pre_logits)


def main() -> None:
    """Print the table of docs/numerics.md."""
    import tempfile

    jax.config.update("jax_enable_x64", True)  # for the float64 reference; float32 arrays stay float32
    print("| case | logits, as timm | pre-logits, as timm | logits, as shipped | pre-logits, as shipped |")
    print("|---|---|---|---|---|")
    for case in CASES + DOC_CASES:
        with tempfile.TemporaryDirectory() as directory:
            before = compare(case, Path(directory), as_timm=True)
            after = compare(case, Path(directory))
        print(f"| {case.name} | {before[0]:.1e} | {before[1]:.1e} | {after[0]:.1e} | {after[1]:.1e} |", flush=True)
    print("\n| hybrid case | logits, tanh GELU with timm's standardisation | pre-logits, the same | logits, vitlab vs "
          "official in float64 | logits, official float32 vs float64 |")
    print("|---|---|---|---|---|")
    for case in CASES + DOC_CASES:
        if getattr(case.module, "resnet_layers", None):
            with tempfile.TemporaryDirectory() as directory:
                partial = compare(case, Path(directory), hybrid_numerics="timm")
                path = Path(directory) / "official.npz"
                size = case.load_size or case.size
                images = np.random.default_rng(1).uniform(-1.0, 1.0, (2, size, size, 3)).astype(np.float32)
                exact = official_outputs(case, path, images, np.float64)[0]
                official = official_outputs(case, path, images)[0]
                ours = vitlab_outputs(path, images, case.load_size)[0]
            print(f"| {case.name} | {partial[0]:.1e} | {partial[1]:.1e} | {relative(ours, exact):.1e} | "
                  f"{relative(official, exact):.1e} |", flush=True)


if __name__ == "__main__":
    main()
