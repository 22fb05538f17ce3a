"""Nothing lost, nobody in, part 2: a run directory has one writer, its records are checked wherever they are read
(checksums, steps, sizes, data set paths, links), and an interrupted run keeps its last completed step."""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vitlab
from helpers import interruptible, one_error_line
from vitlab.cli import main
from vitlab.errors import VitlabError
from vitlab.train.loop import Trainer
from vitlab.weights import load_model, save_weights

TINY = '{"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 4}'
SRC = Path(vitlab.__file__).resolve().parents[1]  # the vitlab under test, for a subprocess


def train_args(out: Path, *extra: str, epochs: str = "1") -> list[str]:
    """Digits at 8 px: one epoch is 22 steps, a checkpoint every 5 steps and an evaluation at the end."""
    return ["train", "--dataset", "digits", "--img-size", "8", "--epochs", epochs, "--batch-size", "64", "--out",
            str(out), "--no-progress", "--deterministic", "--set", f"model_overrides={TINY}", "--set", "threads=1",
            "--set", "checkpoint_every_steps=5", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run: last.* at step 22, last.prev.* at step 20, best.*."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(train_args(out)) == 0
    return out


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A copy of the finished run to tamper with."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def edit_record(path: Path, **changes: object) -> None:
    state = json.loads(path.read_text())
    state.update(changes)
    path.write_text(json.dumps(state))


def drop_previous(out: Path, name: str = "last") -> None:
    for suffix in ("json", "safetensors"):
        (out / f"{name}.prev.{suffix}").unlink(missing_ok=True)


def flip_a_weight_bit(path: Path) -> None:
    """Flip one bit in the tensor data (past the header), as a bad disk or a hand edit would."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little") + 8
    data[header + (len(data) - header) // 2] ^= 0x10
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------- 1. one writer
def test_a_second_writer_on_a_run_directory_is_refused_by_name(trained: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # another process's run, as the lock sees it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert main(train_args(out)) == 2
        one_error_line(capsys, str(out), "in use by another vitlab run")
        assert main(["finetune", "--from", str(trained), "--out", str(out), "--no-progress"]) == 2
        one_error_line(capsys, str(out), "in use by another vitlab run")
    assert not (out / "metrics.jsonl").exists() and not (out / "last.json").exists()
    with open(trained / ".lock") as lock:  # the finished run let its lock go
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ------------------------------------------------------------------------------------------- 2. checksums
def test_a_flipped_bit_in_best_is_refused_or_falls_back_never_read_silently(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flip_a_weight_bit(run / "last.safetensors")
    with pytest.warns(UserWarning, match="previous good checkpoint last.prev.safetensors"):
        model = load_model(run / "last.safetensors")
    expected = load_file(run / "last.prev.safetensors")
    assert torch.equal(model.state_dict()["head.weight"], expected["model/head.weight"])
    drop_previous(run, "best")
    flip_a_weight_bit(run / "best.safetensors")
    capsys.readouterr()
    for argv in (["eval", str(run), "--dataset", "digits"], ["convert", str(run), str(tmp_path / "x.safetensors")],
                 ["finetune", "--from", str(run), "--out", str(tmp_path / "ft"), "--no-progress"]):
        assert main(argv) == 2, argv
        one_error_line(capsys, "best.safetensors", "checksum")
    with pytest.raises(VitlabError, match="checksum"):
        load_model(run / "best.safetensors")


def test_weights_without_a_record_beside_them_load_as_before(trained: Path, tmp_path: Path) -> None:
    shutil.copy(trained / "best.safetensors", tmp_path / "best.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_model(tmp_path / "best.safetensors").config.img_size == (8, 8)


# ------------------------------------------------------------------------------------------- 3. records
def test_resume_from_weights_without_their_record_is_refused_not_restarted(
        run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    drop_previous(run)
    (run / "last.json").unlink()
    weights = (run / "last.safetensors").read_bytes()
    metrics = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(train_args(run, "--resume")) == 2
    one_error_line(capsys, "last.safetensors", "no record")
    assert (run / "last.safetensors").read_bytes() == weights
    assert (run / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.parametrize("step", [-5, 10 ** 18, 23, 1.5, True])
def test_a_record_with_an_absurd_step_is_refused_and_metrics_are_kept(
        step: object, run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    drop_previous(run)
    edit_record(run / "last.json", step=step)  # the checksum covers the tensors, so it still matches
    metrics = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(train_args(run, "--resume")) == 2
    one_error_line(capsys, "last")
    assert (run / "metrics.jsonl").read_bytes() == metrics


# ------------------------------------------------------------------------------------------- 4. links
def test_a_record_path_that_is_a_link_is_refused_and_nothing_is_written_outside(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outside = tmp_path / "outside.jsonl"
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for out in (fresh, run):
        (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / "metrics.jsonl").symlink_to(outside)  # dangling
    capsys.readouterr()
    assert main(train_args(fresh)) == 2
    one_error_line(capsys, str(fresh / "metrics.jsonl"), "symbolic link")
    assert main(train_args(run, "--resume")) == 2
    one_error_line(capsys, str(run / "metrics.jsonl"), "symbolic link")
    assert not outside.exists()


def test_a_fifo_as_a_record_is_refused_not_waited_on(trained: Path, run: Path) -> None:
    """In a subprocess with a time limit: reading a FIFO would wait for a writer forever."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    for name, argv in (("last.json", ["eval", str(run)]), ("metrics.jsonl", train_args(run, "--resume"))):
        (run / name).unlink()
        os.mkfifo(run / name)
        done = subprocess.run([sys.executable, "-m", "vitlab", *argv], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2, done.stderr
        assert str(run / name) in done.stderr and "regular file" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        (run / name).unlink()
        shutil.copy(trained / name, run / name)


# ------------------------------------------------------------------------------------------- 5. .npz image size
@pytest.mark.parametrize("posemb", ["learned", "sincos2d"])
def test_npz_round_trip_of_a_28_px_model_keeps_its_size_or_refuses_to_guess(posemb: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = vitlab.create_model("vit-mini-p7-28", depth=1, num_classes=10, posemb=posemb,
                                pool="token" if posemb == "learned" else "gap",
                                act="gelu_tanh").eval()  # what .npz files load with
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    save_weights(model, tmp_path / "m.npz", "npz")
    if posemb == "learned":  # the grid of the stored position embedding gives the size
        loaded = load_model(tmp_path / "m.npz")
    else:
        with pytest.raises(VitlabError, match="does not record the image size"):
            load_model(tmp_path / "m.npz")
        loaded = load_model(tmp_path / "m.npz", img_size=28)
    assert loaded.config.img_size == (28, 28)
    images = torch.randn(2, model.config.in_chans, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), model(images))


# ------------------------------------------------------------------------------------------- 6. sizes
def test_a_weight_file_asking_for_a_huge_image_is_refused_before_allocating(tmp_path: Path) -> None:
    model = vitlab.create_model("vit-mini-p7-28", depth=1, num_classes=10, posemb="sincos2d", pool="gap")
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    config = {**json.loads(json.dumps(vitlab.models.registry.config_to_dict(model.config))), "img_size": [2100, 2100]}
    save_file(state, tmp_path / "huge.safetensors", {"vitlab_config": json.dumps(config)})
    with pytest.raises(VitlabError, match=r"huge.safetensors: .*90000 tokens"):
        load_model(tmp_path / "huge.safetensors")


@pytest.mark.parametrize("field", ["depth", "crop_padding"])
def test_finetune_from_a_record_asking_for_absurd_sizes_is_one_line(
        field: str, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = json.loads((run / "last.json").read_text())
    if field == "depth":
        state["train_config"]["model_overrides"]["depth"] = 5000
    else:
        state["train_config"]["crop_padding"] = 100  # the images are 8 px
    (run / "last.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["finetune", "--from", str(run), "--out", str(tmp_path / "ft"), "--epochs", "0.1",
                 "--no-progress"]) == 2
    one_error_line(capsys, str(run / "last.json"), field)
    assert not (tmp_path / "ft" / "last.json").exists()


# ------------------------------------------------------------------------------------------- 7. recorded data set
def test_eval_follows_only_a_data_set_a_record_may_name(run: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    not_images = tmp_path / "not-images"
    for name in ("a", "b"):
        (not_images / name).mkdir(parents=True)
        (not_images / name / "passwd").write_text("root:x:0:0")
    for dataset in ("/etc", str(not_images), "no-such-set"):
        state = json.loads((run / "last.json").read_text())
        state["train_config"]["dataset"] = dataset
        (run / "last.json").write_text(json.dumps(state))
        capsys.readouterr()
        assert main(["eval", str(run)]) == 2
        one_error_line(capsys, str(run / "last.json"), repr(dataset))


# ------------------------------------------------------------------------------------------- 8. metrics lines
def test_metrics_lines_that_are_not_utf8_or_nest_too_deep_are_dropped_on_resume(
        run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = (run / "metrics.jsonl").read_bytes()
    with open(run / "metrics.jsonl", "ab") as handle:
        handle.write(b'{"step": 3, "name": "\xff\xfe"}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n")
    assert main(train_args(run, "--resume")) == 0
    assert (run / "metrics.jsonl").read_bytes() == good


# ------------------------------------------------------------------------------------------- 9. study records
STUDY = ["study", "data-size", "--dataset", "digits", "--sizes", "64", "--batch-size", "32", "--min-steps", "2",
         "--epochs", "1", "--evals", "1", "--models", "vit", "--no-progress", "--set", "threads=1"]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study")
    assert main([*STUDY, "--out", str(out)]) == 0
    return out


def tampered(state: dict, case: str) -> bytes:
    if case == "wrong-type":
        state["best_top1"] = "high"
    elif case == "missing-key":
        del state["model_config"]
    elif case == "non-finite":
        state["best_top1"] = math.nan
    elif case == "negative-step":
        state["step"] = state["total_steps"] = -3
    elif case == "deep-nesting":
        return json.dumps(state).encode()[:-1] + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return json.dumps(state).encode() if case != "not-utf8" else json.dumps(state).encode()[:-1] + b', "x": "\xff"}'


@pytest.mark.parametrize("case", ["wrong-type", "missing-key", "non-finite", "negative-step", "deep-nesting",
                                  "not-utf8", "metrics-deep-nesting", "metrics-not-utf8", "metrics-non-finite"])
def test_tampered_study_records_are_one_line_under_no_train(case: str, study: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    shutil.copytree(study, out)
    record = out / "data-size" / "vit-64" / ("metrics.jsonl" if case.startswith("metrics-") else "last.json")
    if case.startswith("metrics-"):  # the run's last evaluation, which the table reports
        line = json.loads(record.read_text().splitlines()[-1])
        bad = {"metrics-deep-nesting": json.dumps(line).encode()[:-1] + b', "x": ' + b"[" * 100_000 + b"]" * 100_000
               + b"}", "metrics-not-utf8": json.dumps(line).encode()[:-1] + b', "x": "\xff"}',
               "metrics-non-finite": json.dumps({**line, "test_top1": math.inf}).encode()}[case]
        record.write_bytes(bad + b"\n")
    else:
        record.write_bytes(tampered(json.loads(record.read_text()), case))
    capsys.readouterr()
    assert main([*STUDY, "--no-train", "--out", str(out)]) == 2
    one_error_line(capsys, str(record))


# ------------------------------------------------------------------------------------------- 10. interrupts
@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt here, even when the test run was started with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_interrupt_saves_the_last_completed_step_and_resumes_to_the_same_weights(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        sigint_raises: None) -> None:
    """A real SIGINT (the CLI turns SIGTERM and SIGHUP into the same KeyboardInterrupt) while the batch of step 8
    is drawn: step 7 is saved, though no checkpoint was due, and the resumed run ends on the uninterrupted weights."""
    real = Trainer._next_batch

    def next_batch(self: Trainer, batches, step: int):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, batches, step)

    out = tmp_path / "run"
    monkeypatch.setattr(Trainer, "_next_batch", next_batch)
    capsys.readouterr()
    assert main(train_args(out)) == 130
    assert json.loads((out / "last.json").read_text())["step"] == 7
    err = capsys.readouterr().err
    assert "holds step 7 of 22" in err and f"--resume --out {out}" in err
    monkeypatch.setattr(Trainer, "_next_batch", real)
    assert main(train_args(out, "--resume")) == 0
    resumed, uninterrupted = load_file(out / "last.safetensors"), load_file(trained / "last.safetensors")
    model_keys = [key for key in uninterrupted if key.startswith("model/")]
    assert model_keys and all(torch.equal(resumed[key], uninterrupted[key]) for key in model_keys)
    assert (out / "metrics.jsonl").read_text() .count("\n") == (trained / "metrics.jsonl").read_text().count("\n")


def test_sigint_to_a_training_process_leaves_a_checkpoint_and_says_how_to_resume(tmp_path: Path) -> None:
    """SIGTERM and SIGHUP take this path too once the command line turns them into KeyboardInterrupt."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "vitlab", *train_args(out, epochs="200")], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=interruptible)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.json").exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert f"--resume --out {out}" in err and "Traceback" not in err
    assert json.loads((out / "last.json").read_text())["step"] >= 5
