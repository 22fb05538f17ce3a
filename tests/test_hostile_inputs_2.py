"""Nobody in, part 2: special files, links, zip bombs, hostile headers and names, out-of-range options and signals
end in one line with the promised exit code; nothing is replaced, hung on, inflated or printed raw."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import time
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vitlab.weights
from helpers import interruptible, load_benchmark, one_error_line
from vitlab.cli import main
from vitlab.errors import VitlabError

fuzz = load_benchmark("fuzz_loaders")
TINY = '{"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 4}'
SRC = Path(__file__).resolve().parents[1] / "src"


def train_args(out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", "digits", "--img-size", "8", "--epochs", "1", "--batch-size", "64", "--out",
            str(out), "--no-progress", "--set", f"model_overrides={TINY}", "--set", "threads=1", *extra]


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """A tiny vitlab weight file (1 channel, 8 px, 3 classes)."""
    path = tmp_path / "tiny.safetensors"
    vitlab.save_weights(fuzz.tiny_model(), path)
    return path


def vitlab_process(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vitlab", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible, **kwargs)


# Opens and closes the writing end of each FIFO named on its command line whenever a reader waits on it.
_UNBLOCK = """
import os, sys, time
while True:
    for fifo in sys.argv[1:]:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    time.sleep(0.05)
"""


@contextlib.contextmanager
def unblocked(*fifos: Path) -> Iterator[None]:
    """While the block runs, a separate process releases any reader of `fifos` (a thread could not: a reader
    blocked in open() may hold the GIL), so code that opens a FIFO fails the test instead of hanging it."""
    helper = subprocess.Popen([sys.executable, "-c", _UNBLOCK, *map(str, fifos)])
    try:
        yield
    finally:
        helper.kill()
        helper.wait()


# ------------------------------------------------------------------------------------ outputs: special, links, self
def test_the_atomic_writer_never_replaces_a_fifo_or_device_node(weights: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from vitlab.atomic import atomic_write

    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(VitlabError, match="FIFO"):
        atomic_write(fifo, b"data")
    capsys.readouterr()
    assert main(["convert", str(weights), str(fifo)]) == 2
    one_error_line(capsys, str(fifo), "FIFO")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    node = tmp_path / "null.npz"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except OSError:
        pytest.skip("cannot make a device node here")
    assert main(["convert", str(weights), str(node)]) == 2
    one_error_line(capsys, str(node), "character device")
    assert stat.S_ISCHR(os.lstat(node).st_mode)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["null.npz", "out.safetensors", "tiny.safetensors"]


def test_outputs_that_are_links_special_files_or_the_input_are_refused(weights: Path, tmp_path: Path) -> None:
    from vitlab.atomic import check_regular_target

    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "dangling.npz").symlink_to(elsewhere)
    (tmp_path / "link.npz").symlink_to(weights)
    hard = tmp_path / "hard.safetensors"
    os.link(weights, hard)
    for path, message in ((tmp_path / "dangling.npz", "dangling symbolic link"), (tmp_path / "link.npz", "link"),
                          (Path("/dev/null"), "character device"), (hard, "is the input")):
        with pytest.raises(VitlabError, match=message):
            check_regular_target(path, weights)
    with pytest.raises(IsADirectoryError):
        check_regular_target(tmp_path, weights)
    assert check_regular_target(tmp_path / "new.npz", weights) == tmp_path / "new.npz"
    assert not elsewhere.exists()


def test_convert_and_export_refuse_their_own_input_and_links(weights: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    tensors = {f"model/{key}": value for key, value in load_file(weights).items()}
    tensors["optim/state"] = torch.ones(3)
    metadata = {"vitlab_config": json.dumps(vitlab.models.config_to_dict(fuzz.TINY))}
    save_file(tensors, run / "best.safetensors", metadata=metadata)
    before = (run / "best.safetensors").read_bytes()
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "outside.safetensors")
    capsys.readouterr()
    for source, output in ((run / "best.safetensors", run / "best.safetensors"), (run, run / "best.safetensors"),
                           (weights, tmp_path / "dangling.safetensors")):
        assert main(["convert", str(source), str(output)]) == 2
        one_error_line(capsys, str(output))
        assert main(["export", str(source), "--out", str(output)]) == 2
        one_error_line(capsys, str(output))
    assert (run / "best.safetensors").read_bytes() == before
    assert (tmp_path / "dangling.safetensors").is_symlink() and not (tmp_path / "outside.safetensors").exists()
    assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf"]) == 0  # a fresh output still works


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_vitlab_writes_honour_the_umask(mask: int, tmp_path: Path) -> None:
    from vitlab.atomic import atomic_path, atomic_write

    previous = os.umask(mask)
    try:
        atomic_write(tmp_path / "a.json", "{}")
        with atomic_path(tmp_path / "b.png") as temporary:
            temporary.write_bytes(b"png")
    finally:
        os.umask(previous)
    for name in ("a.json", "b.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask
    (tmp_path / "a.json").chmod(0o640)  # an existing file keeps its mode, as open() would leave it
    atomic_write(tmp_path / "a.json", "[]")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640


# ---------------------------------------------------------------------------------------------------- npz bombs
def test_npz_zip_bomb_is_refused_before_decompressing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A member of 128 MiB of zeros deflates to about 128 KB: its declared size is refused before numpy inflates
    it (the bound is 16 times the archive plus 64 MiB)."""
    bomb = tmp_path / "bomb.npz"
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive, \
            archive.open("embedding/kernel.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": (1 << 25,)})
        for _ in range(128):
            member.write(chunk)
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(VitlabError, match="declares .* uncompressed bytes"):
            vitlab.weights.load_model(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak:,} bytes allocated before the refusal"
    capsys.readouterr()
    assert main(["convert", str(bomb), str(tmp_path / "out.safetensors")]) == 2
    one_error_line(capsys, "bomb.npz", "embedding/kernel.npy")


def test_an_npz_needing_an_unknown_zip_version_is_refused_by_name(tmp_path: Path) -> None:
    """zipfile raises NotImplementedError, not BadZipFile, for a member whose "version needed to extract" it does
    not know (found by the fuzzer)."""
    path = tmp_path / "future.npz"
    np.savez(path, **vitlab.weights.npz.from_state_dict(fuzz.tiny_model().state_dict(), fuzz.TINY))
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the first central-directory entry; bytes 6-7 give the version needed
    data[entry + 6:entry + 8] = (255).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(VitlabError, match="future.npz: not a readable .npz file"):
        vitlab.weights.load_model(path)


def test_a_compressed_npz_still_loads(tmp_path: Path) -> None:
    model = fuzz.tiny_model()
    np.savez_compressed(tmp_path / "small.npz", **vitlab.weights.npz.from_state_dict(model.state_dict(), fuzz.TINY))
    loaded = vitlab.weights.load_model(tmp_path / "small.npz")
    images = torch.randn(2, 1, 8, 8)
    assert torch.allclose(loaded(images), model(images), atol=1e-5)


# ------------------------------------------------------------------------------------------------ hostile headers
@pytest.mark.parametrize("config", ["[1, 2]", '"text"', "[" * 100_000 + "]" * 100_000, '{"a": ' * 50_000 + "1"
                                    + "}" * 50_000], ids=["list", "string", "nested-lists", "nested-objects"])
def test_safetensors_config_that_is_not_an_object_is_one_line(config: str, weights: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "hostile.safetensors"
    save_file(load_file(weights), path, metadata={"vitlab_config": config})
    with pytest.raises(VitlabError, match="vitlab_config"):
        vitlab.weights.load_model(path)
    capsys.readouterr()
    assert main(["convert", str(path), str(tmp_path / "out.npz")]) == 2
    one_error_line(capsys, str(path), "vitlab_config")


@pytest.mark.parametrize(("posemb", "changes", "field"), [
    ("sincos2d", {"img_size": [2048, 2048]}, "262144 tokens per image"),
    ("sincos2d", {"img_size": [65536, 8]}, r"img_size \(65536, 8\) is beyond any real model"),
    ("learned", {"img_size": [2048, 2048]}, "262144 tokens per image")])
def test_header_sizes_no_tensor_holds_are_bounded_before_building(posemb: str, changes: dict, field: str,
                                                                  tmp_path: Path) -> None:
    """No tensor says what image size a model is for: a sin-cos table would be built, a learned position embedding
    resampled, for every patch of it."""
    config = dataclasses.replace(fuzz.TINY, posemb=posemb)
    model = vitlab.models.build_model(config)
    vitlab.save_weights(model, tmp_path / "m.safetensors")
    header = {**vitlab.models.config_to_dict(config), **changes}
    path = tmp_path / "hostile.safetensors"
    save_file(load_file(tmp_path / "m.safetensors"), path, metadata={"vitlab_config": json.dumps(header)})
    with pytest.raises(VitlabError, match=field):
        vitlab.weights.load_model(path)
    with pytest.raises(VitlabError, match="tokens per image"):
        vitlab.weights.load_model(tmp_path / "m.safetensors", img_size=4096)


# ------------------------------------------------------------------------------------------------------ FIFOs
@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pth"])
def test_a_fifo_as_weights_is_refused_not_waited_on(suffix: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / f"weights{suffix}"
    os.mkfifo(fifo)
    with unblocked(fifo):
        with pytest.raises(VitlabError, match="FIFO"):
            vitlab.weights.load_model(fifo, "vit-mini-p4-28")
        capsys.readouterr()
        assert main(["convert", str(fifo), str(tmp_path / "out.safetensors")]) == 2
    one_error_line(capsys, str(fifo), "FIFO")


def test_a_fifo_as_a_run_record_is_refused_not_waited_on(weights: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    os.link(weights, run / "best.safetensors")
    os.mkfifo(run / "last.json")
    capsys.readouterr()
    with unblocked(run / "last.json"):
        assert main(["eval", str(run)]) == 2
    one_error_line(capsys, "last.json", "FIFO")


# ------------------------------------------------------------------------------------------ options out of range
@pytest.mark.parametrize(("extra", "message"), [
    (["--epochs", "1e308"], "--epochs: epochs must be"), (["--seed", str(2 ** 70)], "--seed: seed must be"),
    (["--set", "label_smoothing=5"], "label_smoothing must be a number in [0, 1)"),
    (["--set", "optimizer=sgd", "--set", "momentum=-1"], "momentum must be"),
    (["--set", "device=meta"], "unknown device 'meta'"),
    (["--set", "randaugment_ops=2", "--set", "randaugment_magnitude=1000"],
     "randaugment_magnitude must be a whole number in [0, 30]")])
def test_training_options_out_of_range_are_one_line(extra: list[str], message: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(train_args(tmp_path / "run", *extra)) == 2
    one_error_line(capsys, message)
    assert not (tmp_path / "run").exists()


def test_a_device_this_machine_lacks_is_one_line(weights: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    missing = [name for name, present in (("mps", torch.backends.mps.is_available()),
                                          ("cuda", torch.cuda.is_available())) if not present]
    if not missing:
        pytest.skip("this machine has both CUDA and MPS")
    assert main(train_args(tmp_path / "run", "--set", f"device={missing[0]}")) == 2
    one_error_line(capsys, f"device '{missing[0]}' is not available")
    assert main(["eval", str(weights), "--dataset", "digits", "--device", "meta"]) == 2
    one_error_line(capsys, "--device", "meta")


# ------------------------------------------------------------------------------------------ names on the terminal
def test_printable_escapes_control_characters() -> None:
    from vitlab.errors import printable

    assert printable("a\nvitlab train: error: \x1b[31mred\x1b[0m\t\udcff é") == \
        "a\\nvitlab train: error: \\x1b[31mred\\x1b[0m\\t\\udcff é"


def test_hostile_names_stay_on_one_line(weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = "x.safetensors\nvitlab convert: error: \x1b[2Jforged"
    assert main(["convert", str(tmp_path / fake), str(tmp_path / "out.npz")]) == 2
    line = one_error_line(capsys, "neither a file nor a known checkpoint name", "\\n", "\\x1b[2J")
    assert "\x1b" not in line
    names = ["\x1b[31mred\x1b[0m", "two\nlines", "$\\frac$"]
    path = tmp_path / "named.safetensors"
    save_file(load_file(weights), path, metadata={**load_metadata(weights), "classes": json.dumps(names)})
    image = tmp_path / "digit\nforged: 99%.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    assert main(["predict", str(path), str(image), str(image)]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 2 and "\x1b" not in out
    assert "\\x1b[31mred\\x1b[0m" in out and "two\\nlines" in out and "digit\\nforged" in out


def load_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata())


# ---------------------------------------------------------------------------------------------- mathtext in plots
def test_names_with_dollar_signs_are_drawn_literally(weights: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from vitlab.analysis import plots
    from vitlab.commands.evaluate import _plot_confusion

    names = ("$\\frac$", "$x^$", "a $1 b")
    _plot_confusion(torch.eye(3, dtype=torch.long), names, tmp_path / "confusion.png")
    plots.plot_rollout(torch.zeros(3, 1, 8, 8), torch.rand(3, 2, 2), tmp_path / "rollout.png", titles=names)
    assert (tmp_path / "confusion.png").is_file() and (tmp_path / "rollout.png").is_file()
    image = tmp_path / "$\\frac{$.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    assert main(["analyze", str(weights), "--images", str(image), "--out", str(tmp_path / "analysis")]) == 0
    assert (tmp_path / "analysis" / "rollout.png").is_file()


# ------------------------------------------------------------------------------------------------------- signals
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path: Path) -> None:
    """SIGINT while torch is still being imported (its library mapped, the import not done)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc to see when torch is being imported")
    process = vitlab_process(*train_args(tmp_path / "run"))
    deadline = time.monotonic() + 60
    while "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text() and time.monotonic() < deadline:
        time.sleep(0.005)
    # Repeated until the process ends: a library being imported may swallow one interrupt (a bare `except`).
    while process.poll() is None and time.monotonic() < deadline + 60:
        process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=0.2)
    _, err = process.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert process.returncode == 130 and len(lines) == 1 and "interrupted" in lines[0], err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_training_in_one_line(signum: int, tmp_path: Path) -> None:
    out = tmp_path / "run"
    process = vitlab_process(*train_args(out, "--epochs", "200", "--set", "checkpoint_every_steps=5"))
    deadline = time.monotonic() + 120
    while not (out / "last.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert process.returncode == 128 + signum, err
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0] and "--resume" in lines[0], err
    assert json.loads((out / "last.json").read_text())["step"] >= 5
