"""Many processes on the CPU (gloo): DDP equals one process at the same global batch, resume across process
counts, and WebDataset shards read exactly once per epoch across ranks and workers."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from vitlab.cli import main
from vitlab.commands.train import torchrun_command
from vitlab.data import TrainTransform
from vitlab.data.shards import ShardSet, ShardStream
from vitlab.train.config import TrainConfig
from vitlab.train.loop import Trainer

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 4}
STOP_AT = 21  # a checkpoint step (checkpoint_every_steps=7) in the first of two 22-step epochs


class Stop(Exception):
    """Ends a run right after a checkpoint, as a kill would."""


def digits_config(out: Path, **changes) -> TrainConfig:
    """1,437 digits at 8×8, global batch 64: 22 steps an epoch; no augmentation, deterministic, one thread, fp32.

    fp32 because the comparison is up to summation order: under bf16 autocast each of two processes rounds its
    weight gradients (sums over its half of the batch) to bf16's 8 mantissa bits before they are averaged, where
    one process rounds the whole sum once, so the two differ by bf16 rounding, not by summation order. Resume on
    the same process count is bit-identical in bf16 too (test_train.py)."""
    base = TrainConfig(model="vit-mini-p4-28", model_overrides=TINY, dataset="digits", img_size=8, epochs=2,
                       batch_size=64, lr=3e-3, weight_decay=0.05, warmup_steps=5, out=str(out), progress=False,
                       eval_every_epochs=1.0, checkpoint_every_steps=7, deterministic=True, threads=1, amp="fp32")
    return dataclasses.replace(base, **changes)


def run(config: TrainConfig, resume: bool = False, stop_at: int | None = None) -> dict[str, torch.Tensor]:
    """Train (on however many processes the process group has) and return this rank's final parameters."""
    trainer = Trainer(config, resume=resume)
    seen = {}
    original = trainer._save

    def save(name, model, *args, **kwargs):
        original(name, model, *args, **kwargs)
        seen["model"] = model
        if stop_at is not None and name == "last" and args[3] == stop_at:
            raise Stop

    trainer._save = save
    try:
        trainer.fit()
    except Stop:
        pass
    return {key: value.detach().clone() for key, value in seen["model"].state_dict().items()}


@contextlib.contextmanager
def recording_batches(batches: list[torch.Tensor]):
    """Record every training batch this process draws (flattened uint8 images), one tensor per step."""
    original = TrainTransform.__call__

    def call(self, images, labels):
        batches.append(images.flatten(1).clone())
        return original(self, images, labels)

    TrainTransform.__call__ = call
    try:
        yield batches
    finally:
        TrainTransform.__call__ = original


def _worker(rank: int, world: int, store: str, root: str) -> None:
    """One of two gloo processes; results go to files (queues fail once children exit)."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        base = Path(root)
        with recording_batches([]) as batches:
            torch.save(run(digits_config(base / "two")), base / f"two-rank{rank}.pt")
        torch.save(batches, base / f"batches-rank{rank}.pt")
        torch.save(run(digits_config(base / "one-to-two"), resume=True), base / f"one-to-two-rank{rank}.pt")
        run(digits_config(base / "two-to-one"), stop_at=STOP_AT)
        run(digits_config(base / "one-to-fsdp", fsdp=True), resume=True)
    finally:
        dist.destroy_process_group()


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal up to float32 summation order. The attention's key bias is the exception: its true gradient is
    exactly zero (a constant added to every key leaves the softmax unchanged), so what it gets is rounding noise,
    which Adam scales up to steps of size lr; it is only checked to stay within that noise."""
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if key.endswith("attn.qkv.bias"):
            (qa, ka, va), (qb, kb, vb) = x.chunk(3), y.chunk(3)
            torch.testing.assert_close(ka, kb, rtol=0, atol=1e-2, msg=key)
            x, y = torch.cat([qa, va]), torch.cat([qb, vb])
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
@pytest.mark.slow
def test_two_processes_equal_one_process_and_resume_across_process_counts(tmp_path: Path) -> None:
    with recording_batches([]) as one_batches:
        one = run(digits_config(tmp_path / "one"))
    run(digits_config(tmp_path / "one-to-two"), stop_at=STOP_AT)  # killed on 1 process, resumed on 2 below
    shutil.copytree(tmp_path / "one-to-two", tmp_path / "one-to-fsdp")  # ... and on 2 with FSDP

    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)

    for name in ("two", "one-to-two"):
        rank0, rank1 = (torch.load(tmp_path / f"{name}-rank{rank}.pt") for rank in (0, 1))
        assert all(torch.equal(rank0[key], rank1[key]) for key in rank0), f"{name}: ranks differ"
        assert_close(rank0, one)
        # Checkpoints hold the plain model (no DDP "module." prefix), identical to what rank 0 trained.
        saved = load_file(tmp_path / name / "last.safetensors")
        assert all(torch.equal(saved[f"model/{key}"], value) for key, value in rank0.items())
    # Each rank trained on its own half of the very global batch one process used.
    halves = [torch.load(tmp_path / f"batches-rank{rank}.pt") for rank in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == len(one_batches) == 44
    for step, whole in enumerate(one_batches):
        assert halves[0][step].shape[0] == halves[1][step].shape[0] == 32
        rows = torch.cat([halves[0][step], halves[1][step]]).tolist()
        assert sorted(rows) == sorted(whole.tolist()), f"step {step}: the ranks' batches are not a split of it"
    two = load_file(tmp_path / "two" / "last.safetensors")
    assert {k for k in two if k.startswith("optim/")} == {k for k in load_file(tmp_path / "one" / "last.safetensors")
                                                          if k.startswith("optim/")}

    # FSDP2 gathers the same single-file checkpoint (full state dicts, torch.optim's numbering).
    fsdp = load_file(tmp_path / "one-to-fsdp" / "last.safetensors")
    assert fsdp.keys() == two.keys()
    assert_close({k[6:]: v for k, v in fsdp.items() if k.startswith("model/")}, one)
    for key in (k for k in two if k.startswith("optim/") and not k.endswith("/step")):
        torch.testing.assert_close(fsdp[key], two[key], rtol=1e-3, atol=1e-6, msg=key)

    # Killed on 2 processes, finished on 1.
    assert json.loads((tmp_path / "two-to-one" / "last.json").read_text())["step"] == STOP_AT
    assert_close(run(digits_config(tmp_path / "two-to-one"), resume=True), one)

    # Rank 0 alone logged each evaluation once; the evaluation (split across ranks) matches one process.
    records = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("one", "two", "one-to-two", "two-to-one", "one-to-fsdp")}
    assert [r["step"] for r in records["two"]] == [r["step"] for r in records["one"]] == [22, 44]
    for name in ("two", "one-to-two", "two-to-one", "one-to-fsdp"):
        for mine, reference in zip(records[name], records["one"], strict=False):
            assert mine["test_top1"] == pytest.approx(reference["test_top1"], abs=1 / 360)
            assert mine["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-3)


def test_nproc_relaunches_through_torchrun() -> None:
    command = torchrun_command(4, ["train", "--nproc", "4", "--dataset", "digits", "--nproc=4", "--epochs", "1"])
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "vitlab",
                           "train", "--dataset", "digits", "--epochs", "1"]


def shard_keys(urls: list[str]) -> list[tuple[str, str]]:
    keys = []
    for url in urls:
        with tarfile.open(url) as archive:
            keys += [(url, member.name.split(".")[0]) for member in archive if member.name.endswith(".cls")]
    return keys


@pytest.mark.slow
def test_shards_are_read_exactly_once_per_epoch_across_ranks_and_workers(tmp_path: Path, capsys) -> None:
    out = tmp_path / "shards"
    assert main(["data", "shard", "digits", str(out), "--shard-size", "100"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"] == {"num_samples": 1437, "shards": 15} and summary["test"]["num_samples"] == 360
    train = ShardSet.open(str(out), "train")
    assert (len(train), train.num_classes, train.channels) == (1437, 10, 1)
    everything = shard_keys(train.urls)
    assert len(set(everything)) == 1437

    # Each of two epochs over 2 ranks × 2 DataLoader workers reads every sample exactly once.
    world, workers = 2, 2
    from vitlab.data.datasets import digits

    expected_labels = torch.bincount(digits("train").labels, minlength=10).tolist()
    rank0_shards = []
    for epoch in (0, 1):
        seen, labels = [], collections.Counter()
        for rank in range(world):
            stream = ShardStream(train.urls, rank, world, seed=3, start=epoch, channels=1, keys=True)
            loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
            for image, label, key in loader:
                assert image.shape == (1, 8, 8) and image.dtype == torch.uint8
                seen.append(tuple(key))
                labels[label] += 1
            if rank == 0:
                rank0_shards.append({url for url, _ in seen})
        assert len(seen) == len(set(seen)) == 1437 and set(seen) == set(everything)
        assert [labels[c] for c in range(10)] == expected_labels
    assert rank0_shards[0] != rank0_shards[1]  # the shard order is reshuffled every epoch

    # Resampled streams are endless (with replacement) and differ by rank.
    def head(rank: int, count: int) -> list[tuple[str, str]]:
        stream = iter(ShardStream(train.urls, rank, world, seed=3, resampled=True, channels=1, keys=True))
        return [next(stream)[2] for _ in range(count)]

    endless = head(0, 1500)
    assert len(endless) == 1500 and len(set(endless)) < 1500
    assert endless[:100] != head(1, 100)


@pytest.mark.slow
def test_training_streams_shards(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    assert main(["data", "shard", "digits", str(out), "--shard-size", "200"]) == 0
    result = Trainer(digits_config(tmp_path / "run", dataset=str(out), epochs=1)).fit()
    assert result["step"] == 22 and result["test_top1"] > 0.2  # chance is 0.1
    state = json.loads((tmp_path / "run" / "last.json").read_text())
    assert state["classes"] == [str(d) for d in range(10)]
