"""Nothing lost: SIGKILLed runs resume to the same weights and metrics, torn checkpoints fall back to the previous
good pair, a diverged loss and a full disk leave the last good checkpoint in place."""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from helpers import load_benchmark, one_error_line
from vitlab.cli import main
from vitlab.train import checkpoint as ckpt

TINY = '{"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 4}'



def train_args(out: Path, *extra: str) -> list[str]:
    """One epoch of digits (22 steps), a checkpoint every 5 steps: last.* at 5, 10, 15, 20 and 22."""
    return ["train", "--dataset", "digits", "--img-size", "8", "--epochs", "1", "--batch-size", "64", "--out",
            str(out), "--no-progress", "--deterministic", "--set", f"model_overrides={TINY}", "--set", "threads=1",
            "--set", "checkpoint_every_steps=5", *extra]



def record(out: Path, name: str = "last") -> dict:
    return json.loads((out / f"{name}.json").read_text())


def temporaries(out: Path) -> list[str]:
    return sorted(name for name in os.listdir(out) if name.endswith((".staging", ".tmp")))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_args(out)) == 0
    return out


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """benchmarks/kill_resume.py with 3 kills (one random, one at a checkpoint step, one mid-write)."""
    report = load_benchmark("kill_resume").run(kills=3, every=5, epochs=4, seed=1, workdir=tmp_path, verbose=False)
    assert not report.failures, "\n".join(report.lines())
    assert report.kills == report.survived == 3
    assert report.kinds == {"random": 1, "at-save": 1, "mid-write": 1}
    assert 0 <= report.max_recomputed <= 5 and len(report.recomputed) == 3
    assert report.identical_weights and report.tensors_compared > 100
    assert report.identical_metrics and report.metric_records == 4


class Killed(BaseException):
    """Stands in for SIGKILL between two file operations of a save."""


def interrupted_save(directory: Path, step: int, cut: int | None) -> None:
    """save_checkpoint, stopped before its `cut`-th rename (atomic_write's renames included)."""
    real_replace = os.replace
    calls = itertools.count()

    def replace(source, target):
        if next(calls) == cut:
            raise Killed
        real_replace(source, target)

    ckpt.os.replace = replace
    try:
        ckpt.save_checkpoint(directory, "last", {"w": torch.full((4,), float(step))}, {"step": step})
    except Killed:
        pass
    finally:
        ckpt.os.replace = real_replace


def loaded_step_of_run(out: Path) -> int:
    """The step of OUT/last.*, which must be the current pair: any fallback warning is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return ckpt.load_checkpoint(out)[1]["step"]


def loaded_step(directory: Path) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tensors, state = ckpt.load_checkpoint(directory, "last")
    assert torch.equal(tensors["w"], torch.full((4,), float(state["step"])))  # a record with its own tensors
    return state["step"]


@pytest.mark.slow
def test_two_interrupted_saves_in_a_row_never_lose_the_last_good_checkpoint(tmp_path: Path) -> None:
    """A save is cut at each of its renames, resumed, and the resumed run's first save cut again: a loadable
    pair no older than the last completed save is always left (rotating blindly lost it: the record of the
    pair kept was moved next to the torn save's tensors)."""
    renames = 6  # two staging renames, then at most four rotations
    for first, second in itertools.product(range(renames + 1), repeat=2):
        directory = tmp_path / f"{first}-{second}"
        for step in (1, 2):
            interrupted_save(directory, step, None)
        interrupted_save(directory, 3, first)
        resumed = loaded_step(directory)
        assert resumed in (2, 3), (first, second, resumed)
        interrupted_save(directory, resumed + 1, second)
        assert loaded_step(directory) in (resumed, resumed + 1), (first, second)
        interrupted_save(directory, resumed + 2, None)
        assert loaded_step_of_run(directory) == resumed + 2  # a completed save is the newest pair, no fallback
        assert temporaries(directory) == [], (first, second)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_torn_checkpoint_resumes_from_the_previous_one_with_a_warning(
        finished_run: Path, tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    assert record(out)["step"] == 22 and record(out, "last.prev")["step"] == 20
    weights = out / "last.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        del data[len(data) // 2:]
    else:  # same size, one tensor byte changed: only the checksum can tell
        data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"last\.safetensors is torn or incomplete; using the previous good "
                                         r"checkpoint last\.prev\.safetensors \(step 20\)"):
        assert main(train_args(out, "--resume")) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 22
    assert record(out)["step"] == 22 and loaded_step_of_run(out) == 22
    reference = ckpt.load_checkpoint(finished_run)[0]
    resumed = ckpt.load_checkpoint(out)[0]
    assert all(torch.equal(reference[key], resumed[key]) for key in reference if key.startswith("model/"))


def test_both_checkpoints_torn_is_one_clear_error(finished_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    for name in ("last.safetensors", "last.prev.safetensors"):
        (out / name).write_bytes((out / name).read_bytes()[:1000])
    capsys.readouterr()
    assert main(train_args(out, "--resume")) == 2
    one_error_line(capsys, "no intact 'last' checkpoint", str(out))


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import vitlab.train.loop as loop

    real_loss = loop.F.cross_entropy
    calls = itertools.count(1)

    def diverging(*args, **kwargs):  # the 8th step's loss is NaN
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if next(calls) == 8 else loss

    monkeypatch.setattr(loop.F, "cross_entropy", diverging)
    out = tmp_path / "run"
    assert main(train_args(out)) == 1
    one_error_line(capsys, "loss became nan at step 8", "last good checkpoint", str(out))
    state = record(out)
    assert state["step"] == 5 and not (out / "last.prev.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensors, _ = ckpt.load_checkpoint(out)  # intact: its checksum matches, no fallback
    assert all(torch.isfinite(value).all() for key, value in tensors.items() if key.startswith("model/"))
    from vitlab.weights import load_model

    model = load_model(out / "last.safetensors")  # and loadable as weights
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())
    monkeypatch.setattr(loop.F, "cross_entropy", real_loss)
    assert main(train_args(out, "--resume")) == 0  # and training goes on from it
    assert record(out)["step"] == 22


@pytest.mark.parametrize("failing_write", [3, 4], ids=["tensors", "record"])
def test_full_disk_at_the_second_save_keeps_the_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str], failing_write: int) -> None:
    """ENOSPC from the writer at the second save (its tensor file, or its record after the tensor file was
    staged): exit 2 with one line, and last.* still hold the first save, whole, with nothing half-written."""
    real_write = ckpt.atomic_write
    writes = itertools.count(1)

    def filling_disk(path: Path, data: bytes) -> None:
        if next(writes) >= failing_write:  # writes 1 and 2 are the first save's tensors and record
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data)

    monkeypatch.setattr(ckpt, "atomic_write", filling_disk)
    out = tmp_path / "run"
    assert main(train_args(out)) == 2
    one_error_line(capsys, "cannot save checkpoint", "No space left on device", "previous checkpoint is unchanged")
    assert record(out)["step"] == 5
    assert loaded_step_of_run(out) == 5
    assert temporaries(out) == [] and not (out / "last.prev.json").exists()
    monkeypatch.setattr(ckpt, "atomic_write", real_write)
    assert main(train_args(out, "--resume")) == 0  # space again: it carries on from step 5
    assert record(out)["step"] == 22


def test_full_disk_when_logging_metrics_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import builtins

    real_open = builtins.open

    def no_space_for_metrics(file, mode="r", *args, **kwargs):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_space_for_metrics)
    out = tmp_path / "run"
    assert main(train_args(out)) == 2
    one_error_line(capsys, "metrics.jsonl", "No space left on device")
    assert loaded_step_of_run(out) == 20  # the checkpoints before the evaluation are intact


def test_unwritable_output_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(train_args(blocker / "run")) == 2
    one_error_line(capsys, "not writable", str(blocker / "run"))


def test_a_writer_by_file_name_that_fails_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    """atomic_path, as ONNX export and the plots use it: the target changes only when the writer finishes."""
    from vitlab.atomic import atomic_path

    target = tmp_path / "graph.onnx"
    target.write_bytes(b"old")
    with pytest.raises(Killed), atomic_path(target) as temporary:
        assert temporary.suffix == ".onnx" and temporary.parent == tmp_path
        temporary.write_bytes(b"half of the new")
        raise Killed
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]
    with atomic_path(target) as temporary:
        temporary.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [target]


def test_only_errors_about_the_temporary_file_are_renamed_to_the_target(tmp_path: Path) -> None:
    """The user is told about the file they named, and an error about another file keeps that file's name."""
    from vitlab.atomic import atomic_path

    target = tmp_path / "plot.png"
    with pytest.raises(FileNotFoundError) as raised, atomic_path(target):
        open(tmp_path / "an-input-that-is-missing.npz", "rb")
    assert raised.value.filename.endswith("an-input-that-is-missing.npz")
    (tmp_path / "a-folder").mkdir()
    with pytest.raises(IsADirectoryError) as raised, atomic_path(tmp_path / "a-folder") as temporary:
        temporary.write_bytes(b"png")
    assert raised.value.filename == str(tmp_path / "a-folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-folder"]
