"""Nobody in: hostile and broken inputs are refused in one line (exit 2 on the CLI), never run, never a traceback.

Pickles that would run code, torn or fuzzed weight files of every format, run records with unknown or wrong-typed
fields, every kind of odd image, a tampered download cache, and names that try to leave their directory.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from hypothesis import HealthCheck, given, settings
from safetensors.torch import load_file, save_file

import vitlab
import vitlab.weights
from helpers import load_benchmark, one_error_line, slow_when
from vitlab.cli import main
from vitlab.errors import VitlabError

TINY = '{"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 4}'
DIGITS_MODEL = ["--model", "vit-mini-p4-28"]



fuzz = load_benchmark("fuzz_loaders")


def train_args(out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", "digits", "--img-size", "8", "--epochs", "1", "--batch-size", "64", "--out",
            str(out), "--no-progress", "--set", f"model_overrides={TINY}", "--set", "threads=1",
            "--set", "checkpoint_every_steps=5", *extra]



def files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished digits run: last.* at step 22, last.prev.* at step 20, best.*."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    assert main(train_args(out)) == 0
    return out


# ------------------------------------------------------------------------------------------- pickles that run code
class Payload:
    """Unpickling this runs `open(marker, 'w')`: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.fixture
def evil_files(tmp_path: Path) -> tuple[dict[str, Path], Path]:
    marker = tmp_path / "code-ran"
    state = dict(fuzz.tiny_model().state_dict())
    files = {}
    files["zip.pth"] = tmp_path / "evil.pth"
    torch.save({**state, "payload": Payload(marker)}, files["zip.pth"])
    files["legacy.bin"] = tmp_path / "evil-legacy.bin"
    torch.save({"state_dict": state, "payload": Payload(marker)}, files["legacy.bin"],
               _use_new_zipfile_serialization=False)
    files["bare.pt"] = tmp_path / "bare.pt"
    import pickle

    files["bare.pt"].write_bytes(pickle.dumps({"w": Payload(marker)}, protocol=2))
    files["hf-dir"] = tmp_path / "hf-evil"
    files["hf-dir"].mkdir()
    vitlab.save_weights(fuzz.tiny_model(), tmp_path / "hf-good", "hf")
    shutil.copy(tmp_path / "hf-good" / "config.json", files["hf-dir"] / "config.json")
    shutil.copy(files["zip.pth"], files["hf-dir"] / "pytorch_model.bin")
    files["object.npz"] = tmp_path / "evil.npz"
    with zipfile.ZipFile(files["object.npz"], "w") as archive:  # an object array: a pickle inside the .npy
        buffer = io.BytesIO()
        np.save(buffer, np.array([Payload(marker)], dtype=object), allow_pickle=True)
        archive.writestr("embedding/kernel.npy", buffer.getvalue())
    return files, marker


def test_pickles_that_would_run_code_are_refused_and_nothing_runs(
        evil_files: tuple[dict[str, Path], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files, marker = evil_files
    from vitlab.models.vit import VisionTransformer

    for name, path in files.items():
        with pytest.raises(VitlabError, match="refused|not a readable"):
            vitlab.load_weights(VisionTransformer(fuzz.TINY), path)
        with pytest.raises(VitlabError, match="refused|not a readable"):
            vitlab.weights.load_model(path, fuzz.TIMM_NAME, **fuzz.TIMM_OVERRIDES)
        capsys.readouterr()
        assert main(["convert", str(path), str(tmp_path / f"{name}.safetensors"), *DIGITS_MODEL]) == 2, name
        one_error_line(capsys, str(path))
        assert not (tmp_path / f"{name}.safetensors").exists()
        assert main(["eval", str(path), *DIGITS_MODEL, "--dataset", "digits"]) == 2, name
        assert "weights_only` set to `False" not in one_error_line(capsys, str(path))  # torch.load's advice
        assert main(["finetune", "--from", str(path), "--out", str(tmp_path / "ft"), "--no-progress", "--dataset",
                     "digits", "--img-size", "8"]) == 2, name
        one_error_line(capsys, str(path))
        assert not marker.exists(), f"{name}: the payload ran"
    # The payload is live: an unrestricted unpickle does run it.
    torch.load(files["zip.pth"], weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------------------------------- broken weight files
def test_truncated_and_corrupted_safetensors_are_one_line(trained: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = (trained / "best.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")
    broken = {"truncated": data[: len(data) // 2], "header-cut": data[: 8 + header // 2], "empty": b"",
              "huge-header-length": (2 ** 62).to_bytes(8, "little") + data[8:],
              "header-not-json": data[:8] + b"{" * header + data[8 + header:],
              "config-not-json": data.replace(b'"vitlab_config":"{', b'"vitlab_config":"[', 1)}
    image = tmp_path / "x.png"
    Image.new("L", (8, 8), 128).save(image)
    for name, content in broken.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        capsys.readouterr()
        for argv in (["eval", str(path), "--dataset", "digits"], ["predict", str(path), str(image)],
                     ["convert", str(path), str(tmp_path / "out.npz")], ["analyze", str(path), "--images", str(image),
                                                                        "--out", str(tmp_path / "an")]):
            assert main(argv) == 2, (name, argv[0])
            one_error_line(capsys, path.name)


def npz_variants() -> dict[str, dict[str, np.ndarray]]:
    from vitlab.weights import npz

    good = npz.from_state_dict(fuzz.tiny_model().state_dict(), fuzz.TINY)
    block = "Transformer/encoderblock_0/"
    return {
        "missing-key": {k: v for k, v in good.items() if k != f"{block}MlpBlock_3/Dense_1/kernel"},
        "missing-embedding": {k: v for k, v in good.items() if k != "embedding/kernel"},
        "wrong-shape-bias": {**good, "embedding/bias": np.zeros(5, np.float32)},
        "wrong-shape-kernel": {**good, f"{block}MlpBlock_3/Dense_0/kernel": np.zeros((3, 3), np.float32)},
        "wrong-rank-query": {**good, f"{block}MultiHeadDotProductAttention_1/query/kernel": np.zeros((8, 8),
                                                                                                  np.float32)},
        "int-dtype": {**good, "embedding/kernel": good["embedding/kernel"].astype(np.int32)},
        "string-dtype": {**good, "cls": np.array(["a", "b"])},
        "empty-posemb": {**good, "Transformer/posembed_input/pos_embedding": np.zeros((1, 0, 8), np.float32)},
        "extra-array": {**good, "unexpected/thing": np.zeros(3, np.float32)},
        "gap-in-blocks": {**{k.replace("encoderblock_0", "encoderblock_1"): v for k, v in good.items()}},
    }


@pytest.mark.parametrize("variant", sorted(npz_variants()))
def test_npz_with_wrong_shapes_dtypes_or_keys_is_one_line(variant: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / f"{variant}.npz"
    np.savez(path, **npz_variants()[variant])
    with pytest.raises(VitlabError, match=variant):
        vitlab.weights.load_model(path)
    capsys.readouterr()
    assert main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 2
    one_error_line(capsys, path.name)
    assert not (tmp_path / "out.safetensors").exists()


def test_npz_archive_oddities_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = {}
    with zipfile.ZipFile(tmp_path / "raw-member.npz", "w") as archive:  # np.load hands such members back as bytes
        archive.writestr("embedding/kernel", b"raw bytes")
    cases["raw-member.npz"] = "not .npy arrays"
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    cases["empty.npz"] = "not a ViT checkpoint"
    with open(tmp_path / "bare-npy.npz", "wb") as handle:
        np.save(handle, np.zeros(3))
    cases["bare-npy.npz"] = "not a readable .npz"
    (tmp_path / "text.npz").write_text("embedding/kernel = 1")
    cases["text.npz"] = "not a readable .npz"
    for name, message in cases.items():
        with pytest.raises(VitlabError, match=message):
            vitlab.weights.load_model(tmp_path / name)
        capsys.readouterr()
        assert main(["convert", str(tmp_path / name), str(tmp_path / "out.safetensors")]) == 2
        one_error_line(capsys, name)


def test_a_config_that_would_allocate_without_bound_is_refused_before_allocating(tmp_path: Path) -> None:
    """A vitlab file or HF config.json naming a width of 10^11 (its tensors being tiny) is refused by the shape
    check, which runs on a model without storage; building it would ask for terabytes."""
    model = fuzz.tiny_model()
    vitlab.save_weights(model, tmp_path / "m.safetensors")
    tensors = load_file(tmp_path / "m.safetensors")
    config = {**vitlab.models.config_to_dict(fuzz.TINY), "embed_dim": 10 ** 11, "num_heads": 1, "mlp_dim": 10 ** 11}
    save_file(tensors, tmp_path / "huge.safetensors", metadata={"vitlab_config": json.dumps(config)})
    with pytest.raises(VitlabError, match="cannot be built"):
        vitlab.weights.load_model(tmp_path / "huge.safetensors")
    config.update(embed_dim=2 ** 20, mlp_dim=2 ** 20)  # 4 TB of parameters, but a size torch can represent
    save_file(tensors, tmp_path / "big.safetensors", metadata={"vitlab_config": json.dumps(config)})
    with pytest.raises(VitlabError, match="does not (fit|match)"):
        vitlab.weights.load_model(tmp_path / "big.safetensors")
    vitlab.save_weights(model, tmp_path / "hf", "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf_config, "hidden_size": 2 ** 20,
                                                             "num_attention_heads": 1}))
    with pytest.raises(VitlabError, match="does not (fit|match)"):
        vitlab.weights.load_model(tmp_path / "hf")


@pytest.mark.parametrize("config", [
    b"\xff\xfe not utf-8", b"[1, 2]", b'{"hidden_size": 0}', b'{"num_attention_heads": 0}', b'{"patch_size": 0}',
    b'{"image_size": "big"}', b'{"image_size": [8, 8, 8]}', b'{"model_type": "bert"}', b'{"hidden_size": "wide"}',
    b'{"hidden_dropout_prob": -1}', b'{"layer_norm_eps": -1e-12}', b'{"num_hidden_layers": 4294967297}',
    b'{"hidden_size": 4294967296, "intermediate_size": 4294967296, "num_attention_heads": 1}',
    b"[" * 100_000], ids=lambda config: config[:20].decode(errors="replace"))
def test_hostile_hf_config_is_one_line(config: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vitlab.save_weights(fuzz.tiny_model(), tmp_path / "hf", "hf")
    path = tmp_path / "hf" / "config.json"
    if config.startswith(b"{"):
        config = json.dumps({**json.loads(path.read_text()), **json.loads(config)}).encode()
    path.write_bytes(config)
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out.safetensors")]) == 2
    one_error_line(capsys, "hf")


# ------------------------------------------------------------------------------------------- fuzzing every loader
@pytest.mark.parametrize("loader", slow_when(sorted(fuzz.LOADERS), {"pth-entries"}))
def test_fuzzed_inputs_load_or_raise_vitlab_error_only(loader: str, tmp_path_factory: pytest.TempPathFactory
                                                       ) -> None:
    """60 mutated inputs per loader here; `python benchmarks/fuzz_loaders.py` tries 2,000 each."""
    directory = tmp_path_factory.mktemp(f"fuzz-{loader}")

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(value=fuzz.LOADERS[loader].strategy())
    def check(value: object) -> None:
        assert fuzz.try_input(loader, value, directory) in ("loaded", "refused")

    check()


# ------------------------------------------------------------------------------------------- run records
def hostile_records() -> dict[str, object]:
    return {
        "unknown-config-field": lambda s: s["train_config"].update(evil=1) or s,
        "wrong-type-epochs": lambda s: s["train_config"].update(epochs="ten") or s,
        "wrong-type-betas": lambda s: s["train_config"].update(betas=5) or s,
        "wrong-type-dataset": lambda s: s["train_config"].update(dataset=5) or s,
        "config-not-object": lambda s: s.update(train_config=[1, 2]) or s,
        "optimizer-groups-number": lambda s: s.update(optimizer_groups=5) or s,
        "optimizer-groups-wrong": lambda s: s.update(optimizer_groups=[{"lr": "fast"}]) or s,
        "scheduler-list": lambda s: s.update(scheduler=[]) or s,
        "best-top1-text": lambda s: s.update(best_top1="best") or s,
        "elapsed-null": lambda s: s.update(elapsed_s=None) or s,
        "window-text": lambda s: s.update(train_window="x") or s,
    }


@pytest.mark.parametrize("name", sorted(hostile_records()))
def test_run_record_with_unknown_or_wrong_typed_fields_is_one_line(
        name: str, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The record still matches its tensors' checksum (as an edited or crafted one can): resuming it is refused in
    one line naming the run, and so is evaluating it when the field is one `vitlab eval` reads."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    state = json.loads((out / "last.json").read_text())
    (out / "last.json").write_text(json.dumps(hostile_records()[name](state)))
    capsys.readouterr()
    assert main(train_args(out, "--resume")) == 2
    one_error_line(capsys, str(out))
    if "config" in name or "type" in name:
        assert main(["eval", str(out)]) == 2
        one_error_line(capsys, "last.json")


@pytest.mark.parametrize("content", [b'{"step": "x", "sha256": "00"}', b"[]", b"\xff\xfe", b"{"])
def test_unreadable_run_record_falls_back_or_is_one_line(content: bytes, trained: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (out / "last.json").write_bytes(content)
    capsys.readouterr()
    with pytest.warns(UserWarning, match="previous good checkpoint"):
        assert main(train_args(out, "--resume")) == 0  # the previous pair (step 20) is used
    assert json.loads((out / "last.json").read_text())["step"] == 22
    (out / "last.json").write_bytes(content)
    for name in ("last.prev.json", "last.prev.safetensors"):
        (out / name).unlink()
    capsys.readouterr()
    assert main(train_args(out, "--resume")) == 2
    one_error_line(capsys, "no intact 'last' checkpoint")
    assert main(["eval", str(out)]) == 2
    one_error_line(capsys, str(out))


# ------------------------------------------------------------------------------------------- images
def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def odd_images(directory: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """(images vitlab must read, images it must refuse), each a small file."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8))
    readable = {"rgb.png": rgb, "gray.png": rgb.convert("L"), "palette.png": rgb.convert("P"),
                "rgba.png": rgb.convert("RGBA"), "la.png": rgb.convert("LA"), "bilevel.png": rgb.convert("1"),
                "16bit.png": Image.fromarray(rng.integers(0, 65535, (12, 20)).astype(np.uint16)),
                "cmyk.jpg": rgb.convert("CMYK"), "cmyk.tif": rgb.convert("CMYK"),
                "float.tif": Image.fromarray(rng.random((12, 20)).astype(np.float32)),
                "1x1.png": Image.new("RGB", (1, 1), (200, 10, 10)), "webp.webp": rgb, "bmp.bmp": rgb}
    ok = {}
    for name, image in readable.items():
        image.save(directory / name)
        ok[name] = directory / name
    exif = rgb.getexif()
    exif[0x0112] = 6
    rgb.save(directory / "exif-rotated.jpg", exif=exif.tobytes())
    ok["exif-rotated.jpg"] = directory / "exif-rotated.jpg"
    frames = [rgb.convert("P"), rgb.rotate(90).convert("P")]
    frames[0].save(directory / "animated.gif", save_all=True, append_images=frames[1:])
    ok["animated.gif"] = directory / "animated.gif"

    buffer = io.BytesIO()
    rgb.save(buffer, "PNG")
    png = buffer.getvalue()
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    header = b"\x89PNG\r\n\x1a\n"
    bad_bytes = {
        "truncated.png": png[: len(png) // 2], "truncated.jpg": jpeg[: len(jpeg) // 2],
        "corrupt.jpg": jpeg[:2] + b"\x00" * 200 + jpeg[202:], "zero-byte.png": b"", "text.png": b"hello\n",
        "html.jpg": b"<html><body>not a picture</body></html>",
        "bomb.png": header + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""),
        "postscript.png": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n",
    }
    bad = {}
    for name, content in bad_bytes.items():
        (directory / name).write_bytes(content)
        bad[name] = directory / name
    bad["a-directory.png"] = directory / "a-directory.png"
    bad["a-directory.png"].mkdir()
    bad["missing.png"] = directory / "missing.png"
    return ok, bad


@pytest.mark.slow
def test_predict_and_analyze_read_every_odd_image_or_refuse_it_in_one_line(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok, bad = odd_images(tmp_path)
    capsys.readouterr()
    assert main(["predict", str(trained), *map(str, ok.values()), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [Path(line["image"]).name for line in lines] == list(ok)
    assert main(["analyze", str(trained), "--images", *map(str, ok.values()), "--out", str(tmp_path / "an")]) == 0
    capsys.readouterr()
    for name, path in bad.items():
        assert main(["predict", str(trained), str(path)]) == 2, name
        one_error_line(capsys, name, "cannot read image")
        assert main(["analyze", str(trained), "--images", str(path), "--out", str(tmp_path / "an-bad")]) == 2, name
        one_error_line(capsys, name)
    assert Image.MAX_IMAGE_PIXELS and Image.MAX_IMAGE_PIXELS > 0  # the decompression-bomb limit is still on


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    from vitlab.data.folder import read_image

    image = Image.new("L", (12, 6), 0)
    image.paste(255, (0, 0, 6, 6))  # left half white
    exif = image.getexif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    image.save(tmp_path / "tagged.png", exif=exif.tobytes())
    image.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")
    assert np.array_equal(read_image(tmp_path / "tagged.png", "L", (8, 8)),
                          read_image(tmp_path / "upright.png", "L", (8, 8)))


def test_postscript_named_png_never_reaches_ghostscript(trained: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Pillow picks decoders by content and renders EPS with `gs`; a fake `gs` first on PATH records any call."""
    from PIL import EpsImagePlugin

    marker = tmp_path / "gs-ran"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    picture = tmp_path / "cat.png"
    picture.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n")
    folder = tmp_path / "folder"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        shutil.copy(picture, folder / label / "cat.png")
    capsys.readouterr()
    assert main(["predict", str(trained), str(picture)]) == 2
    one_error_line(capsys, "cat.png", "cannot read image")
    assert main(["analyze", str(trained), "--images", str(picture), "--out", str(tmp_path / "an")]) == 2
    one_error_line(capsys, "cat.png")
    # One image per class: nothing can be held out, so train and evaluate on the training images.
    assert main(train_args(tmp_path / "run", "--dataset", str(folder), "--val-fraction", "0")) == 2
    one_error_line(capsys, "cat.png")
    assert not marker.exists()
    with pytest.raises(OSError), Image.open(picture) as unrestricted:  # what the restriction prevents
        unrestricted.load()
    assert marker.exists()


def image_folder(root: Path, bad: dict[str, bytes]) -> Path:
    rng = np.random.default_rng(1)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for index in range(6):
            Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(root / label / f"{index}.png")
    for name, content in bad.items():
        (root / name).write_bytes(content)
    return root


def test_image_folder_with_corrupt_files_stops_naming_the_first_or_skips_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = image_folder(tmp_path / "pets", {"dog/b-truncated.png": b"\x89PNG\r\n\x1a\n\x00\x00",
                                              "cat/zero.jpg": b"", "dog/a-text.png": b"not an image"})
    capsys.readouterr()
    # Three epochs of the training split and the hold-out evaluated after each: every file is met.
    args = ["train", "--dataset", str(folder), "--img-size", "8", "--epochs", "3", "--batch-size", "4",
            "--out", str(tmp_path / "run"), "--no-progress", "--set", f"model_overrides={TINY}"]
    assert main(args) == 2
    err = one_error_line(capsys, "cannot read image", "skip_bad_images=true")  # the first one met, in a worker
    assert sum(name in err for name in ("zero.jpg", "b-truncated.png", "a-text.png")) == 1
    assert main([*args, "--set", "skip_bad_images=true"]) == 0
    err = capsys.readouterr().err
    assert f"{folder}: skipped 3 unreadable image(s)" in err and "Traceback" not in err
    record = json.loads((tmp_path / "run" / "last.json").read_text())
    assert record["classes"] == ["cat", "dog"] and record["skipped_images"] == 3


# ------------------------------------------------------------------------------------------- download cache
@pytest.fixture
def published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from vitlab.weights import hub

    remote = tmp_path / "remote" / "vit.npz"
    vitlab.save_weights(fuzz.tiny_model(), remote, "npz")
    entry = hub.Pretrained("vit-mini-p4-28", "test", remote.as_uri(), img_size=8, num_classes=3)
    return hub, entry, remote, tmp_path / "cache"


def test_cache_refuses_a_tampered_file_and_fetches_it_again(published) -> None:
    hub, entry, remote, cache = published
    first = hub.download(entry, cache)
    good = first.read_bytes()
    first.write_bytes(good[:-10] + b"0123456789")  # corrupted (or replaced) after the download
    again = hub.download(entry, cache)
    assert again == first and again.read_bytes() == good  # fetched again; the tampered copy was not used
    model = vitlab.weights.load_model(again)
    assert model.config.embed_dim == fuzz.TINY.embed_dim


def test_cache_refuses_a_download_that_does_not_match_the_recorded_checksum(published) -> None:
    hub, entry, remote, cache = published
    cached = hub.download(entry, cache)
    recorded = (cache / f"{cached.name}.sha256").read_text().split()[0]
    cached.write_bytes(b"tampered")
    remote.write_bytes(b"tampered at the source too")
    with pytest.raises(VitlabError, match=f"does not match the one recorded at the first download.*{recorded}"):
        hub.download(entry, cache)
    assert not cached.exists()  # refused, deleted, and no temporary left behind
    assert sorted(path.name for path in cache.iterdir()) == [f"{cached.name}.sha256"]


def test_cache_verifies_the_catalogue_checksum_of_a_cached_file(published) -> None:
    import dataclasses
    import hashlib

    hub, entry, remote, cache = published
    digest = hashlib.sha256(remote.read_bytes()).hexdigest()
    pinned = dataclasses.replace(entry, sha256=digest)
    cached = hub.download(pinned, cache)
    cached.write_bytes(b"x" * len(remote.read_bytes()))
    (cache / f"{cached.name}.sha256").write_text(f"{digest}  {cached.name}\n")  # a record that lies
    assert hub.download(pinned, cache).read_bytes() == remote.read_bytes()
    with pytest.raises(VitlabError, match="does not match the catalogue's"):
        hub.download(dataclasses.replace(entry, sha256="0" * 64), cache)


# ------------------------------------------------------------------------------------------- names that leave home
@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/absolute.safetensors", "link.safetensors",
                                   "sub/../../outside.safetensors"])
def test_shard_names_cannot_leave_the_model_directory(shard: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = tmp_path / "hf"
    vitlab.save_weights(fuzz.tiny_model(), model_dir, "hf")
    weights = model_dir / "model.safetensors"
    shutil.move(weights, tmp_path / "outside.safetensors")
    (model_dir / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    keys = load_file(tmp_path / "outside.safetensors")
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard for k in keys}}))
    with pytest.raises(VitlabError, match="lies outside"):
        vitlab.weights.load_model(model_dir)
    capsys.readouterr()
    assert main(["convert", str(model_dir), str(tmp_path / "out.safetensors")]) == 2
    one_error_line(capsys, "lies outside")


def test_names_from_a_checkpoint_or_archive_write_nothing_outside(trained: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Class names, array names and image names with `../` end up in printed output and in HTML/JSON (escaped),
    never in a path: every file written lies under the output directory asked for."""
    from safetensors import safe_open

    work = tmp_path / "work"
    work.mkdir()
    with safe_open(str(trained / "best.safetensors"), "pt") as reader:
        metadata = dict(reader.metadata())
    evil_names = [f"../../../{index}/evil" for index in range(9)] + ["/tmp/evil-absolute"]
    checkpoint = work / "hostile.safetensors"
    save_file(load_file(trained / "best.safetensors"), checkpoint,
              metadata={**metadata, "classes": json.dumps(evil_names)})
    image = work / "..%2F..%2Fx.png"
    Image.new("L", (8, 8), 100).save(image, format="PNG")
    archive = work / "names.npz"
    with zipfile.ZipFile(archive, "w") as handle:
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(3, np.float32))
        for name in ("../../escaped.npy", "/tmp/escaped-absolute.npy", "embedding/kernel.npy"):
            handle.writestr(name, buffer.getvalue())
    before = files_under(tmp_path)
    capsys.readouterr()
    assert main(["predict", str(checkpoint), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top"][0]["class"] in evil_names
    assert main(["eval", str(checkpoint), "--dataset", "digits", "--out", str(work / "eval")]) == 2
    one_error_line(capsys, "classes differ")  # digits' class names are not the checkpoint's: nothing is scored
    assert main(["analyze", str(checkpoint), "--images", str(image), "--out", str(work / "analysis")]) == 0
    assert main(["convert", str(archive), str(work / "converted.safetensors")]) == 2
    capsys.readouterr()
    created = files_under(tmp_path) - before
    assert created and all(path.is_relative_to(work / "eval") or path.is_relative_to(work / "analysis")
                           for path in created), sorted(created)
    assert not Path("/tmp/evil-absolute").exists() and not Path("/tmp/escaped-absolute.npy").exists()
