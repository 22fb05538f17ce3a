"""Fuzz vitlab's weight and run-file loaders with mutated bytes of valid small files (hypothesis).

    python benchmarks/fuzz_loaders.py                 # 2,000 inputs per loader
    python benchmarks/fuzz_loaders.py --examples 200 --loader npz

Each loader starts from valid files of a tiny ViT (a few KB each) and tries inputs made by 1-4 byte-level
mutations: bit flips, byte overwrites, insertions, deletions, truncation, a number rewritten as another (the
shapes and offsets in headers are ASCII digits), a splice of another part of the file. Half of the mutations
aim at the file's structure (the safetensors JSON header, each .npy header and the zip directory of an .npz,
the pickle of a .pth) rather than its tensor data, which only changes values. Two loaders mutate structure
instead of bytes: `npz-arrays` (missing, renamed, extra, reshaped and re-typed arrays) and `pth-entries` (the
same for a timm state dict, plus non-tensor values).

The `image` loader does the same for `vitlab.data.folder.read_image`, which `vitlab predict`, `vitlab analyze`
and image-folder data sets decode with.

The contract: every input either loads or is refused with a `VitlabError` (one line on the CLI, exit 2).
Anything else escaping is a failure; the counts are printed per loader. tests/test_hostile_inputs.py runs the
same loaders with 60 inputs each.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import functools
import io
import json
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from vitlab.errors import VitlabError
from vitlab.models.vit import ViTConfig, VisionTransformer

TINY = ViTConfig(img_size=(8, 8), patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1, num_heads=2,
                 mlp_dim=16)
# The registered model whose config, with these overrides, is TINY (timm files need a model name).
TIMM_NAME, TIMM_OVERRIDES = "vit-mini-p4-28", {"embed_dim": 8, "depth": 1, "num_heads": 2, "mlp_dim": 16}


def tiny_model(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(TINY).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model


# ---------------------------------------------------------------------------------------------------- seeds
@dataclass
class Seed:
    """A valid file, and the byte ranges that hold its structure (where mutations are aimed half the time)."""

    name: str
    data: bytes
    hotspots: list[tuple[int, int]] = field(default_factory=list)


def _safetensors_hotspots(data: bytes) -> list[tuple[int, int]]:
    header = int.from_bytes(data[:8], "little")
    return [(0, min(len(data), 8 + header))]


def _zip_hotspots(data: bytes, member_magic: bytes, span: int) -> list[tuple[int, int]]:
    spots = [(m.start(), min(len(data), m.start() + span)) for m in re.finditer(re.escape(member_magic), data)]
    directory = data.find(b"PK\x01\x02")
    if directory >= 0:
        spots.append((directory, len(data)))
    return spots or [(0, len(data))]


def _run_record(directory: Path) -> None:
    """A real run checkpoint pair (last.safetensors + last.json) of the tiny model, as the trainer writes it."""
    from vitlab.models.registry import config_to_dict
    from vitlab.train import checkpoint as ckpt
    from vitlab.train.config import TrainConfig, config_to_json

    model = tiny_model()
    tensors = {f"model/{key}": value for key, value in model.state_dict().items()}
    tensors["rng/torch"] = torch.get_rng_state()
    config = TrainConfig(model="vit-mini-p4-28", dataset="digits", img_size=8, out=str(directory))
    state = {"train_config": config_to_json(config), "model_config": config_to_dict(TINY),
             "classes": ["a", "b", "c"], "total_steps": 10, "steps_per_epoch": 5, "step": 5, "best_top1": 0.5,
             "elapsed_s": 1.0, "optimizer_groups": [], "scheduler": {}}
    metadata = {"vitlab_config": json.dumps(config_to_dict(TINY)), "format": "vitlab-train",
                "classes": json.dumps(["a", "b", "c"])}
    ckpt.save_checkpoint(directory, "last", tensors, state, metadata)


@functools.lru_cache(maxsize=None)
def seeds() -> dict[str, list[Seed]]:
    """The valid files each loader's inputs are made from (built once per process, in a temporary folder)."""
    from vitlab.weights import save_weights
    from vitlab.weights.hf import CONFIG_NAME

    root = Path(tempfile.mkdtemp(prefix="vitlab-fuzz-seeds-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    model = tiny_model()
    found: dict[str, list[Seed]] = {}

    save_weights(model, root / "m.safetensors")
    _run_record(root / "run")
    found["vitlab-safetensors"] = [
        Seed(name, data, _safetensors_hotspots(data))
        for name, data in (("weights", (root / "m.safetensors").read_bytes()),
                           ("run-checkpoint", (root / "run" / "last.safetensors").read_bytes()))]

    save_weights(model, root / "m.npz", "npz")
    data = (root / "m.npz").read_bytes()
    found["npz"] = [Seed("npz", data, _zip_hotspots(data, b"\x93NUMPY", 128))]

    state = model.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    zipped = buffer.getvalue()
    buffer = io.BytesIO()
    torch.save({"state_dict": state, "epoch": 3}, buffer, _use_new_zipfile_serialization=False)
    legacy = buffer.getvalue()
    found["timm-pth"] = [Seed("zip", zipped, _zip_hotspots(zipped, b"data.pkl", 1200)),
                         Seed("legacy", legacy, [(0, min(len(legacy), 1500))])]

    save_weights(model, root / "hf", "hf")
    found["hf-config"] = [Seed("config.json", (root / "hf" / CONFIG_NAME).read_bytes())]
    found["run-json"] = [Seed("last.json", (root / "run" / "last.json").read_bytes())]
    found["image"] = _image_seeds()
    for loader in found.values():
        for seed in loader:
            seed.hotspots = seed.hotspots or [(0, len(seed.data))]
    found["_root"] = [Seed(str(root), b"")]
    return found


def _image_seeds() -> list[Seed]:
    """Small images in the formats vitlab reads (EXIF orientation, palette, alpha and 16-bit among them)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (10, 14, 3), dtype=np.uint8))
    exif = rgb.getexif()
    exif[0x0112] = 6  # rotated 90 degrees
    images = [("png", rgb, "PNG", {}), ("jpeg-exif", rgb, "JPEG", {"exif": exif.tobytes()}),
              ("tiff", rgb.convert("CMYK"), "TIFF", {}), ("gif", rgb.convert("P"), "GIF", {}),
              ("webp", rgb.convert("RGBA"), "WEBP", {}), ("bmp", rgb.convert("L"), "BMP", {}),
              ("png16", Image.fromarray(rng.integers(0, 65535, (10, 14)).astype(np.uint16)), "PNG", {}),
              ("ppm", rgb, "PPM", {})]
    found = []
    for name, image, format_name, options in images:
        buffer = io.BytesIO()
        image.save(buffer, format_name, **options)
        data = buffer.getvalue()
        found.append(Seed(name, data, [(0, min(len(data), 256))]))
    return found


# ---------------------------------------------------------------------------------------------------- mutations
MUTATIONS = ("flip", "byte", "insert", "delete", "truncate", "number", "splice")


@st.composite
def mutated(draw: st.DrawFn, loader: str) -> bytes:
    """A valid file of `loader`, then 1-4 byte-level mutations (half of them aimed at its structure)."""
    seed = draw(st.sampled_from(seeds()[loader]))
    data = bytearray(seed.data)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(MUTATIONS))
        if draw(st.booleans()):
            low, high = draw(st.sampled_from(seed.hotspots))
            low, high = min(low, len(data) - 1), min(max(high, low + 1), len(data))
        else:
            low, high = 0, len(data)
        at = draw(st.integers(low, max(low, high - 1)))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[at] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, ord('"'), ord("}"), ord(","), ord("-"),
                                             ord("9"), draw(st.integers(0, 255))]))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del data[at:]
        elif kind == "number":
            digits = [m.span() for m in re.finditer(rb"\d+", bytes(data[low:high]))]
            if digits:
                start, end = draw(st.sampled_from(digits))
                number = draw(st.sampled_from(["0", "1", "-1", "2", "3", "7", "65", "4294967297", "99999999999",
                                               "18446744073709551615", "1e308", "nan"]))
                data[low + start:low + end] = number.encode()
        else:  # splice: copy another stretch of the file over this one
            source = draw(st.integers(0, len(data) - 1))
            length = draw(st.integers(1, 64))
            data[at:at + length] = data[source:source + length]
    return bytes(data)


_NUMPY_DTYPES = ("float16", "float64", "int32", "int8", "uint8", "bool", "complex64", "<U3", "V2", "V4")


@st.composite
def npz_arrays(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """The tiny model's .npz arrays with 1-4 structural edits: dropped, renamed, extra, reshaped, re-typed."""
    from vitlab.weights import npz

    arrays = dict(npz.from_state_dict(tiny_model().state_dict(), TINY))
    for _ in range(draw(st.integers(1, 4))):
        keys = sorted(arrays)
        kind = draw(st.sampled_from(("drop", "rename", "extra", "reshape", "retype", "scalar", "empty")))
        key = draw(st.sampled_from(keys)) if keys else "embedding/kernel"
        if kind == "drop" and keys:
            del arrays[key]
        elif kind == "rename" and keys:
            arrays[draw(st.sampled_from(["cls", "pos_embedding", "Transformer/encoderblock_7/LayerNorm_0/scale",
                                         "Transformer/encoderblock/LayerNorm_0/scale", "params/" + key,
                                         "opt/target/embedding/kernel", "../evil", key + "x", "head/kernel",
                                         "pre_logits/kernel", "MAPHead_0/probe", "conv_root/kernel"]))] = \
                arrays.pop(key)
        elif kind == "extra":
            arrays[draw(st.sampled_from(["head/bias", "cls", "extra", "Transformer/encoderblock_1/x",
                                         "Transformer/posembed_input/pos_embedding"]))] = np.zeros(
                draw(st.lists(st.integers(0, 5), max_size=4)), np.float32)
        elif kind == "reshape" and key in arrays:
            array = arrays[key]
            shape = draw(st.sampled_from([(-1,), (1, -1), (array.size, 1), (1, 1, -1), (-1, 1, 1, 1)]))
            arrays[key] = array.reshape(shape) if array.size else array
            if draw(st.booleans()):
                arrays[key] = np.resize(arrays[key], draw(st.lists(st.integers(0, 9), min_size=1, max_size=4)))
        elif kind == "retype" and key in arrays:
            dtype = draw(st.sampled_from(_NUMPY_DTYPES))
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    arrays[key] = arrays[key].astype(dtype)
            except (TypeError, ValueError):
                arrays[key] = np.zeros(arrays[key].shape, dtype)
        elif kind == "scalar" and key in arrays:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arrays[key] = np.float32(draw(st.floats(allow_nan=True)))
        elif kind == "empty" and key in arrays:
            arrays[key] = np.zeros((0,) * max(arrays[key].ndim, 1), np.float32)
    return arrays


@st.composite
def pth_entries(draw: st.DrawFn) -> object:
    """The tiny model's state dict with 1-4 edits: dropped/renamed/extra keys, reshaped/re-typed tensors,
    non-tensor values (numbers, strings, lists, nested dicts, None), possibly nested under a training key."""
    state: dict = dict(tiny_model().state_dict())
    for _ in range(draw(st.integers(1, 4))):
        keys = sorted(state)
        kind = draw(st.sampled_from(("drop", "rename", "extra", "reshape", "retype", "value")))
        key = draw(st.sampled_from(keys)) if keys else "patch_embed.proj.weight"
        if kind == "drop" and keys:
            del state[key]
        elif kind == "rename" and keys:
            state[draw(st.sampled_from(["module." + key, "vit.embeddings.patch_embeddings.projection.weight",
                                        "fc_norm.weight", "blocks.9.norm1.weight", "reg_token", "../x",
                                        key.replace("blocks.0", "blocks.1"), "cls_token", "pos_embed"]))] = \
                state.pop(key)
        elif kind == "extra":
            state[draw(st.sampled_from(["head.weight", "pre_logits.fc.weight", "dist_token", "blocks.0.x"]))] = \
                torch.zeros(draw(st.lists(st.integers(0, 5), max_size=4)))
        elif kind == "reshape" and key in state:
            tensor = state[key]
            if isinstance(tensor, torch.Tensor):
                state[key] = tensor.reshape(draw(st.sampled_from([(-1,), (1, -1), (-1, 1), (1, 1, -1)])))
        elif kind == "retype" and key in state and isinstance(state[key], torch.Tensor):
            dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool,
                                          torch.uint8, torch.complex64]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # complex to real
                state[key] = state[key].to(dtype)
        elif kind == "value":
            state[key] = draw(st.one_of(st.none(), st.integers(), st.text(max_size=5), st.floats(),
                                        st.lists(st.integers(), max_size=3),
                                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
    wrapper = draw(st.sampled_from([None, "state_dict", "model", "module", "state_dict_ema"]))
    return state if wrapper is None else {wrapper: state, "epoch": 1}


# ---------------------------------------------------------------------------------------------------- loaders
def _load_vitlab(path: Path) -> None:
    from vitlab.weights import load_model, load_weights

    load_model(path)
    load_weights(VisionTransformer(TINY), path)


def _load_npz(path: Path) -> None:
    from vitlab.weights import load_model, load_weights

    try:
        load_model(path)
    except VitlabError:
        pass
    load_weights(VisionTransformer(TINY), path)


def _load_timm(path: Path) -> None:
    from vitlab.weights import load_model, load_weights

    try:
        load_model(path, TIMM_NAME, **TIMM_OVERRIDES)
    except VitlabError:
        pass
    load_weights(VisionTransformer(TINY), path)


def _load_hf(path: Path) -> None:
    from vitlab.weights import load_model

    load_model(path)


def _load_run(path: Path) -> None:
    from vitlab.train import checkpoint as ckpt
    from vitlab.train.run_dir import checkpoint_train_config

    try:
        checkpoint_train_config(path)
    except VitlabError:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt.load_checkpoint(path, "last")


def _load_image(path: Path) -> None:
    from vitlab.data.folder import read_image

    for mode in ("RGB", "L"):
        array = read_image(path, mode, (8, 8))
        assert array.shape == ((3 if mode == "RGB" else 1), 8, 8) and array.dtype == np.uint8, array.shape


def _write_file(name: str) -> Callable[[bytes, Path], Path]:
    def write(data: bytes, directory: Path) -> Path:
        path = directory / name
        path.write_bytes(data)
        return path
    return write


def _write_hf_config(data: bytes, directory: Path) -> Path:
    target = directory / "hf"
    if not target.exists():
        shutil.copytree(Path(seeds()["_root"][0].name) / "hf", target)
    (target / "config.json").write_bytes(data)
    return target


def _write_run_json(data: bytes, directory: Path) -> Path:
    target = directory / "run"
    if not target.exists():
        target.mkdir()
        shutil.copy(Path(seeds()["_root"][0].name) / "run" / "last.safetensors", target / "last.safetensors")
    (target / "last.json").write_bytes(data)
    return target


def _write_npz_arrays(arrays: dict[str, np.ndarray], directory: Path) -> Path:
    path = directory / "edited.npz"
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def _write_pth(obj: object, directory: Path) -> Path:
    path = directory / "edited.pth"
    torch.save(obj, path)
    return path


@dataclass(frozen=True)
class Loader:
    strategy: Callable[[], st.SearchStrategy]
    write: Callable[[object, Path], Path]
    load: Callable[[Path], None]


LOADERS: dict[str, Loader] = {
    "vitlab-safetensors": Loader(lambda: mutated("vitlab-safetensors"), _write_file("m.safetensors"), _load_vitlab),
    "npz": Loader(lambda: mutated("npz"), _write_file("m.npz"), _load_npz),
    "timm-pth": Loader(lambda: mutated("timm-pth"), _write_file("m.pth"), _load_timm),
    "hf-config": Loader(lambda: mutated("hf-config"), _write_hf_config, _load_hf),
    "run-json": Loader(lambda: mutated("run-json"), _write_run_json, _load_run),
    "image": Loader(lambda: mutated("image"), _write_file("image.png"), _load_image),
    "npz-arrays": Loader(npz_arrays, _write_npz_arrays, _load_npz),
    "pth-entries": Loader(pth_entries, _write_pth, _load_timm),
}


def try_input(loader: str, value: object, directory: Path) -> str:
    """Write and load one input: 'loaded' or 'refused' (VitlabError); anything else propagates."""
    spec = LOADERS[loader]
    path = spec.write(value, directory)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. numpy overflow warnings while converting garbage values
            spec.load(path)
    except VitlabError:
        return "refused"
    return "loaded"


# ---------------------------------------------------------------------------------------------------- benchmark
@dataclass
class Counts:
    tried: int = 0
    loaded: int = 0
    refused: int = 0
    failures: collections.Counter = field(default_factory=collections.Counter)
    examples: dict[str, str] = field(default_factory=dict)


def fuzz(loader: str, examples: int, seed: int = 0) -> Counts:
    with tempfile.TemporaryDirectory(prefix=f"vitlab-fuzz-{loader}-") as directory:
        return _fuzz(loader, examples, seed, Path(directory))


def _fuzz(loader: str, examples: int, seed: int, directory: Path) -> Counts:
    counts = Counts()

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(value=LOADERS[loader].strategy())
    def one(value: object) -> None:
        counts.tried += 1
        try:
            outcome = try_input(loader, value, directory)
        except Exception as error:  # noqa: BLE001 - counting what escapes is the point
            frame = traceback.extract_tb(error.__traceback__)[-1]
            where = f"{type(error).__name__} at {Path(frame.filename).name}:{frame.lineno}"
            counts.failures[where] += 1
            counts.examples.setdefault(where, f"{type(error).__name__}: {str(error)[:200]}")
            return
        setattr(counts, outcome, getattr(counts, outcome) + 1)

    one()
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="inputs per loader")
    parser.add_argument("--loader", action="append", choices=sorted(LOADERS), help="default: all")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    parser.add_argument("--memory-gb", type=float, default=8.0,
                        help="address-space limit, so an input that makes a loader allocate without bound fails "
                             "here instead of exhausting the machine")
    args = parser.parse_args()
    if args.memory_gb:
        import resource

        limit = int(args.memory_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    total_failures = 0
    started = time.monotonic()
    for loader in args.loader or list(LOADERS):
        begun = time.monotonic()
        counts = fuzz(loader, args.examples, args.seed)
        total_failures += sum(counts.failures.values())
        print(f"{loader:>19}: {counts.tried} inputs tried, {counts.loaded} loaded, {counts.refused} refused with "
              f"VitlabError, {sum(counts.failures.values())} failures ({time.monotonic() - begun:.0f} s)",
              flush=True)
        for where, number in counts.failures.most_common():
            print(f"{'':>21}{number} x {where}: {counts.examples[where]}", flush=True)
    print(f"total: {total_failures} failures ({time.monotonic() - started:.0f} s)")
    return 1 if total_failures else 0


if __name__ == "__main__":
    sys.exit(main())
