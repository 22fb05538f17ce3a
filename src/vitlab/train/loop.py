"""The Trainer: steps, evaluation, metrics, checkpoints and resume for every model in the registry.

`Trainer.fit` is a short loop over named steps: set-up (data, model, optimizer, schedule, batch source, resume),
next batch (from a `train.batches` source), train step, evaluate and log, checkpoint. The run directory's records
go through `train.run_dir`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from vitlab.analysis.plots import plot_training_curves
from vitlab.data import (BUILTIN, EvalBatches, EvalTransform, FolderSplit, ImageTensors, Preprocessing,
                         TrainTransform, eval_batches, list_image_folder, load_dataset, match_channels)
from vitlab.data.shards import ShardSet, is_shard_dataset, load_shard_split
from vitlab.errors import TrainingDiverged, VitlabError
from vitlab.eval.metrics import EvalResult, evaluate, evaluate_batches
from vitlab.models.registry import (build_model, config_to_dict, describe_config, family_of, get_family,
                                    model_config)
from vitlab.precision import resolve_amp, select_device
from vitlab.train import checkpoint as ckpt
from vitlab.train import distributed
from vitlab.train.batches import Batch, BatchSource, FolderBatches, batch_source
from vitlab.train.config import TrainConfig, config_from_json, config_to_json
from vitlab.train.optim import build_optimizer, build_scheduler
from vitlab.train.run_dir import RunDir, check_buildable

# Settings a resumed run must share with its checkpoint: the step → sample mapping depends on the data, subset,
# seed and batch, the restored scheduler on the epochs and learning-rate schedule, and the restored optimizer keeps
# its own weight decay, betas and momentum.
RESUME_FIXED = ("dataset", "subset", "val_fraction", "seed", "batch_size", "epochs", "optimizer", "lr", "min_lr",
                "schedule", "warmup_steps", "warmup_epochs", "weight_decay", "betas", "momentum")


@dataclass
class Data:
    train: ImageTensors | ShardSet | FolderSplit  # shards are streamed and image folders read lazily
    test: ImageTensors | FolderSplit
    split: str  # the name of the evaluation split: "val", "test", "holdout", or "train" where nothing is held out


def is_image_folder(name: str) -> bool:
    """Whether a `dataset` setting names an image folder (rather than a built-in set or shards)."""
    return name not in BUILTIN and not is_shard_dataset(name) and (os.sep in name or Path(name).exists())


def load_data(config: TrainConfig, img_size: int | None) -> Data:
    """The training and evaluation splits: image folders are listed (paths and labels, nothing decoded), so that a
    bad layout is refused before anything is written; built-in sets are loaded into memory. `img_size` (None:
    the model's) is what shards' evaluation split is decoded at."""
    if is_shard_dataset(config.dataset):
        if config.subset is not None:
            raise VitlabError("--subset is not supported for WebDataset shards; shard a subset instead")
        size = img_size or model_config(config.model).img_size[0]
        return Data(ShardSet.open(config.dataset, "train"), load_shard_split(config.dataset, "test", size), "test")
    if is_image_folder(config.dataset):
        if config.subset is not None:
            raise VitlabError("--subset is not supported for image folders; train on a folder of the subset")
        val_fraction = config.val_fraction or None  # 0: nothing held out, evaluate on the training split
        train = list_image_folder(config.dataset, "train", val_fraction, config.seed, config.progress)
        test = list_image_folder(config.dataset, "eval", val_fraction, config.seed, config.progress)
        return Data(train, test, test.split)
    train = load_dataset(config.dataset, "train", config.subset, config.seed, img_size or 224,
                         config.skip_bad_images)
    test = load_dataset(config.dataset, "test", None, config.seed, img_size or 224, config.skip_bad_images)
    if train.num_classes < 2:
        raise VitlabError(f"{config.dataset}: training needs at least two classes")
    return Data(train, test, "test")


def card_preprocessing(model: nn.Module, source: str | None = None) -> Preprocessing | None:
    """The preprocessing a loaded model was trained with: its card's, else the one recorded beside a vitlab
    checkpoint `source` (a run directory or a `.safetensors` file with its record); None when neither says."""
    from vitlab.train.run_dir import read_record
    from vitlab.weights.io import model_card

    card = model_card(model).preprocessing  # a card's carries no size: the model's is applied later
    found: Preprocessing | dict | None = None if card is None else Preprocessing(
        mean=tuple(card.mean), std=tuple(card.std), interpolation=card.interpolation, crop_pct=card.crop_pct)
    if found is None and source is not None:
        path = Path(source)
        records = ([path / "best.json", path / "last.json"] if path.is_dir()
                   else [path.with_suffix(".json")] if path.suffix == ".safetensors" else [])
        for record_path in records:
            record = read_record(record_path) if record_path.is_file() else None
            if record is not None and "preprocessing" in record:
                found = record["preprocessing"]
                break
    if found is None or isinstance(found, Preprocessing):
        return found
    return Preprocessing.from_dict(found, str(source))


def model_preprocessing(model: nn.Module, known: Preprocessing | None = None) -> Preprocessing:
    """What a model's images go through: `known`'s normalisation, resampling and crop (when it has the model's
    channel count), else the official ViT's 0.5 / 0.5; at the model's image size."""
    channels = model.config.in_chans
    if known is None or known.channels != channels:
        known = Preprocessing(mean=(0.5,) * channels, std=(0.5,) * channels)
    return dataclasses.replace(known, img_size=tuple(model.config.img_size))


@dataclass
class _Window:
    """The steps since the last evaluation: the train loss logged there averages them, and a resumed run carries
    on the sum it had, so its metrics.jsonl equals an uninterrupted run's."""

    loss: float = 0.0
    steps: int = 0
    images: int = 0
    seconds: float = 0.0

    def add(self, loss: float, images: int, seconds: float) -> None:
        self.loss += loss
        self.steps += 1
        self.images += images
        self.seconds += seconds

    @property
    def img_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass
class _Run:
    """What `Trainer.fit` sets up, and what it carries from step to step."""

    model: nn.Module
    wrapped: nn.Module  # DDP / FSDP2 around the model, or the model itself
    runner: nn.Module  # `wrapped`, compiled when asked
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: AveragedModel | None
    source: BatchSource
    eval_transform: EvalTransform
    test_images: torch.Tensor | None  # an in-memory evaluation split; None for an image folder's
    test_labels: torch.Tensor | None
    test_batches: EvalBatches | None  # an image folder's evaluation split, read lazily
    split: str  # the evaluation split's name, in every metrics record and printed line
    test_forwards: int  # forward passes every rank runs over an image folder's evaluation split (0: as it has)
    run_dir: RunDir
    total_steps: int
    steps_per_epoch: int
    eval_every: int
    state_base: dict[str, Any]  # what every checkpoint record holds besides the step's state
    start_step: int = 0
    best_top1: float = -1.0
    started: float = 0.0  # perf_counter() at the run's start, earlier by the time spent before a resume
    lr: float = 0.0  # the learning rate of the last step
    window: _Window = field(default_factory=_Window)
    skipped_before: set[str] = field(default_factory=set)  # unreadable images skipped before a resume
    last_record: dict[str, Any] = field(default_factory=dict)
    # For an interrupt: the last step whose update, evaluation and checkpoint all finished, the random state right
    # after it, the step the 'last' checkpoint holds, and whether an update is under way (the state then matches
    # no step).
    completed: int = 0
    rng: list[torch.Tensor] = field(default_factory=list)
    saved: int = 0
    updating: bool = False
    bar: tqdm = field(default_factory=lambda: tqdm(disable=True))

    @property
    def skipped(self) -> set[str]:
        """Unreadable images skipped so far (with skip_bad_images), in training and evaluation."""
        met = set(self.skipped_before)
        if isinstance(self.source, FolderBatches):
            met |= self.source.skipped
        if self.test_batches is not None:
            met |= self.test_batches.skipped
        return met

    def show_step(self, loss: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.lr:.2e}", img_s=f"{self.window.img_per_s:.0f}",
                             refresh=False)


class Trainer:
    """Runs one `TrainConfig` to the end, resuming from `out/last.*` when asked."""

    def __init__(self, config: TrainConfig, resume: bool = False) -> None:
        self.config = config
        self.out = Path(config.out)
        self.resume = resume
        self.device = select_device(config.device)
        self.dist = distributed.Distributed(device=self.device)  # replaced by fit() under torchrun
        self.autocast = resolve_amp(config.amp, self.device)
        self.source_preprocessing: Preprocessing | None = None  # the fine-tuned checkpoint's, when it says

    # ---------------------------------------------------------------- set-up
    def _seed(self) -> None:
        torch.manual_seed(self.config.seed)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        if self.config.deterministic:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    def _build_model(self, num_classes: int, in_chans: int) -> nn.Module:
        config = self.config
        if config.init_from is None:
            overrides = dict(config.model_overrides)
            overrides.setdefault("in_chans", in_chans)
            built = model_config(config.model, num_classes=num_classes, img_size=config.img_size, **overrides)
            check_buildable(built, "model_overrides")
            return build_model(built)
        from vitlab.weights import load_model

        source = load_model(config.init_from)
        self.source_preprocessing = card_preprocessing(source, config.init_from)
        model_cfg = source.config
        self._name_architecture(model_cfg)
        changes: dict[str, Any] = dict(config.model_overrides)
        if config.img_size is not None:
            changes["img_size"] = config.img_size
        if changes:
            from vitlab.models.registry import apply_overrides

            changed_cfg = apply_overrides(model_cfg, changes)
            check_buildable(changed_cfg, f"{config.init_from} with model_overrides")
            model = build_model(changed_cfg)
            state, target = _resampled_state(source, model), model.state_dict()
            differ = [key for key in state if key in target and state[key].shape != target[key].shape]
            if differ:  # e.g. an MLP-Mixer's token MLP, whose size is the patch count
                changed = ", ".join(f"{key}={value}" for key, value in changes.items())
                raise VitlabError(f"{config.init_from}: {type(model).__name__} weights cannot be carried over to "
                                  f"{changed}: {differ[0]} is {tuple(state[differ[0]].shape)} in the checkpoint but "
                                  f"{tuple(target[differ[0]].shape)} in the new model")
            model.load_state_dict(state, strict=True)
        else:
            model = source
        if config.new_head or model.config.num_classes != num_classes:
            model.reset_classifier(num_classes)
        return model

    def _name_architecture(self, source: Any) -> None:
        """Make the run record name the architecture it fine-tunes: the config's model (with its overrides) when
        that is the source's architecture, else the registry name that is (`describe_config`)."""
        config = self.config
        try:
            named = model_config(config.model, **config.model_overrides)
            same = family_of(named) == family_of(source) and all(
                getattr(named, name) == getattr(source, name) for name in get_family(source).architecture_fields)
        except (VitlabError, TypeError):
            same = False
        if not same:
            name, overrides = describe_config(source)
            self.config = dataclasses.replace(config, model=name, model_overrides=overrides)

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        """Train to the end (from the last checkpoint when resuming); the last evaluation, best top-1 and run dir.

        The run directory is held by this run alone while it trains. On an interrupt (Ctrl-C; the command line
        turns SIGTERM and SIGHUP into one too) the last completed step is saved as the 'last' checkpoint, one line
        says how to resume, and the interrupt goes on."""
        with contextlib.ExitStack() as held:
            run = self._set_up(held)
            batches = run.source.batches(run.start_step)
            with run.bar:
                try:
                    held.callback(getattr(batches, "close", lambda: None))  # a loader's workers end with the run
                    for step in range(run.start_step, run.total_steps):
                        self._step(run, batches, step)
                except KeyboardInterrupt as interrupt:
                    interrupt.resume_hint = self._save_on_interrupt(run)  # the command line's one line says it
                    raise
            if run.last_record and self.dist.is_main:
                plot_training_curves(run.run_dir.metrics(), run.run_dir.curves_path)
        skipped = len(run.skipped)
        if skipped and self.dist.is_main:
            print(f"{self.config.dataset}: skipped {skipped} unreadable image(s)", file=sys.stderr)
        return {**run.last_record, "best_top1": run.best_top1, "skipped_images": skipped, "out": str(self.out)}

    def _step(self, run: _Run, batches: Iterator[Batch], step: int) -> None:
        """One step of the loop: batch, update, and the evaluation and checkpoint due after it."""
        tick = time.perf_counter()
        inputs, targets = self._next_batch(batches, step)
        loss = self._train_step(run, inputs, targets, step)
        run.window.add(loss, self.config.batch_size, time.perf_counter() - tick)
        run.show_step(loss)
        done = step + 1
        evaluated = done % run.eval_every == 0 or done == run.total_steps
        if evaluated:
            self._evaluate_and_log(run, done)
        if evaluated or done % self.config.checkpoint_every_steps == 0:
            self._checkpoint("last", run, done)
        rng = self._rng_state()
        run.rng, run.completed = rng, done
        run.updating = False  # last: until here an interrupt finds a state that matches no step

    def _rng_state(self) -> list[torch.Tensor]:
        cuda = [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else []
        return [torch.get_rng_state(), *cuda]

    def _save_on_interrupt(self, run: _Run) -> str | None:
        """Save the last completed step as the 'last' checkpoint when newer than the one on disk and the interrupt
        came between steps (not during an update, an evaluation or a save, whose state matches no step), with the
        random state it had then, so the resumed run goes on as an uninterrupted one; returns how to resume. Under
        several processes a save would need all of them, so only the checkpoints already written count."""
        if not self.dist.is_main:
            return None
        if self.dist.world_size == 1 and not run.updating and run.completed > run.saved:
            torch.set_rng_state(run.rng[0])
            if len(run.rng) > 1:
                torch.cuda.set_rng_state(run.rng[1], self.device)
            self._checkpoint("last", run, run.completed)
        held = (f"{self.out}/last.* holds step {run.saved} of {run.total_steps}" if run.saved
                else f"no checkpoint was written to {self.out} yet")
        return f"{held}; to continue, run the same command with --resume --out {self.out}"

    # ---------------------------------------------------------------- set-up
    def _set_up(self, held: contextlib.ExitStack) -> _Run:
        """Data, model, optimizer, schedule, batch source and, when resuming, the state of the last checkpoint.
        The data and the model are checked before the output directory is created, so bad input writes nothing;
        then the run directory's lock is entered on `held`."""
        self.dist = dist = distributed.setup(self.device, self.config.fsdp)
        self.device = dist.device
        self._seed()
        data = load_data(self.config, self.config.img_size)
        self._fit_batch(len(data.train))
        model = self._checked_model(data)
        config = self.config  # with the batch that fits and the fine-tuned architecture's name
        steps_per_epoch = len(data.train) // config.batch_size
        total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
        size, in_chans = tuple(model.config.img_size), model.config.in_chans
        preprocessing = model_preprocessing(model, self.source_preprocessing)
        if config.crop_padding > max(size):  # the padded image is built for every sample
            raise VitlabError(f"crop_padding {config.crop_padding} is larger than the image ({size[0]}x{size[1]})")
        if dist.is_main:
            print(self._summary(data, model, size, total_steps), flush=True)
        ckpt.check_writable(self.out)
        if dist.is_main:
            held.enter_context(RunDir(self.out).writer_lock())
            RunDir(self.out).check_regular()
        wrapped = distributed.wrap_model(model, dist, config.fsdp)  # DDP / FSDP2 under torchrun; else the model
        optimizer = build_optimizer(model, config)
        scheduler = build_scheduler(optimizer, config, total_steps,
                                    config.warmup_steps or round(config.warmup_epochs * steps_per_epoch))
        ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
               if config.ema_decay else None)
        train_transform = TrainTransform(config.augment.to_data(), size, data.train.num_classes,
                                         data.train.flips_allowed)
        folder = (preprocessing, config.augment.to_data(), config.workers, config.skip_bad_images)
        source = batch_source(data.train, config.batch_size, config.seed, dist, size, in_chans, train_transform,
                              folder)
        test_batches, test_forwards = None, 0
        if isinstance(data.test, FolderSplit):  # each rank reads its share, at most a batch per step's share
            eval_batch = max(1, min(config.eval_batch_size, config.batch_size // dist.world_size))
            test_batches = eval_batches(data.test, preprocessing, eval_batch, config.workers, dist.rank,
                                        dist.world_size, config.skip_bad_images,
                                        device=dist.device if dist.device.type == "cuda" else None,
                                        local_world_size=dist.local_world_size)
            if dist.group:
                test_forwards = math.ceil(math.ceil(len(data.test) / dist.world_size) / eval_batch)
        run = _Run(
            model=model, wrapped=wrapped, runner=torch.compile(wrapped) if config.compile else wrapped,
            optimizer=optimizer, scheduler=scheduler, ema=ema, source=source, eval_transform=EvalTransform(size),
            test_images=None if test_batches is not None else match_channels(data.test.images, in_chans),
            test_labels=None if test_batches is not None else data.test.labels, test_batches=test_batches,
            split=data.split, test_forwards=test_forwards, run_dir=RunDir(self.out), total_steps=total_steps,
            steps_per_epoch=steps_per_epoch, eval_every=max(1, round(config.eval_every_epochs * steps_per_epoch)),
            state_base={"train_config": config_to_json(config), "model_config": config_to_dict(model.config),
                        "classes": list(data.train.classes), "preprocessing": preprocessing.to_dict(),
                        "total_steps": total_steps, "steps_per_epoch": steps_per_epoch})
        elapsed_before = 0.0
        if self.resume:
            restored = self._restore(run)
            if restored is not None:
                (run.start_step, run.best_top1, elapsed_before, (run.window.loss, run.window.steps),
                 run.skipped_before) = restored
        if dist.is_main:  # only now that the restored state is known good
            run.run_dir.truncate_metrics(run.start_step)
        run.completed = run.saved = run.start_step
        run.rng = self._rng_state()
        run.started = time.perf_counter() - elapsed_before
        run.bar = tqdm(total=total_steps, initial=run.start_step, disable=not (config.progress and dist.is_main),
                       unit="step", dynamic_ncols=True)
        return run

    def _fit_batch(self, train_size: int) -> None:
        """A global batch larger than the training split becomes the largest power of two that fits, with a
        message (the accumulation and process checks still apply to it)."""
        batch = self.config.batch_size
        if batch <= train_size:
            return
        if train_size < 1:
            raise VitlabError(f"{self.config.dataset}: the training split is empty")
        reduced = 1 << (train_size.bit_length() - 1)
        if self.dist.is_main:
            print(f"batch_size {batch} is larger than the training split ({train_size} images): using {reduced}")
        self.config = dataclasses.replace(self.config, batch_size=reduced)

    def _summary(self, data: Data, model: nn.Module, size: tuple[int, ...], total_steps: int) -> str:
        """The one line printed before training: what is about to run."""
        config = self.config
        params = sum(parameter.numel() for parameter in model.parameters())
        eval_part = f"{len(data.test)} {data.split}" if data.split != "train" else "evaluated on train"
        source = f" from {config.init_from}" if config.init_from else ""
        return (f"{config.dataset}: {len(data.train)} train / {eval_part} images, {data.train.num_classes} classes; "
                f"{config.model}{source} ({params / 1e6:.2f}M parameters), {size[0]}x{size[1]} px, batch "
                f"{config.batch_size}, {total_steps} steps, {'bf16' if self.autocast else 'fp32'}")

    def _checked_model(self, data: Data) -> nn.Module:
        """The model on its device, checked against the data and the process layout."""
        dist = self.dist
        data_chans = (data.train.channels if isinstance(data.train, ShardSet)
                      else 3 if isinstance(data.train, FolderSplit) else data.train.images.shape[1])
        model = self._build_model(data.train.num_classes, data_chans).to(self.device)
        config = self.config
        if config.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise VitlabError(f"grad_checkpointing: {type(model).__name__} does not support it")
            model.set_grad_checkpointing(True)
        if data.train.num_classes != model.config.num_classes:
            raise VitlabError(f"model has {model.config.num_classes} classes, {config.dataset} has "
                              f"{data.train.num_classes}")
        if config.batch_size % (dist.world_size * config.accum_steps):
            raise VitlabError(f"batch_size {config.batch_size} (global) is not divisible by {dist.world_size} "
                              f"process(es) × accum_steps {config.accum_steps}")
        if config.fsdp and config.ema_decay:
            raise VitlabError("ema_decay is not supported with --fsdp")
        return model

    # ---------------------------------------------------------------- steps
    def _next_batch(self, batches: Iterator[Batch], step: int) -> Batch:
        """The step's augmented batch; under several processes, each rank's randomness (augmentation, dropout) is
        seeded by the step first, so it is reproducible and a resumed run draws the same numbers."""
        if self.dist.world_size > 1:
            torch.manual_seed(distributed.step_seed(self.config.seed, step, self.dist.rank))
        return next(batches)

    def _train_step(self, run: _Run, inputs: torch.Tensor, targets: torch.Tensor, step: int) -> float:
        """One optimizer step over the batch (in `accum_steps` micro-batches); the loss, averaged over processes."""
        config, model = self.config, run.model
        micro = config.batch_size // (config.accum_steps * self.dist.world_size)
        model.train()
        run.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for chunk in range(config.accum_steps):
            part = slice(chunk * micro, (chunk + 1) * micro)
            x, y = inputs[part].to(self.device, non_blocking=True), targets[part].to(self.device)
            with distributed.gradient_sync(run.wrapped, sync=chunk == config.accum_steps - 1):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    loss = F.cross_entropy(run.runner(x), y, label_smoothing=config.label_smoothing)
                (loss / config.accum_steps).backward()
            step_loss += loss.item() / config.accum_steps
        step_loss = self.dist.mean(step_loss)  # every rank sees the same loss, so all stop together on NaN
        if not math.isfinite(step_loss):
            raise TrainingDiverged(f"loss became {step_loss} at step {step + 1}; stopped, the last good "
                                   f"checkpoint in {self.out} is kept")
        if config.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        run.updating = True  # the model now leaves the state of the last completed step
        run.optimizer.step()
        run.lr = run.optimizer.param_groups[0]["lr"]
        run.scheduler.step()
        if run.ema is not None:
            run.ema.update_parameters(model)
        return step_loss

    def _evaluate_and_log(self, run: _Run, done: int) -> None:
        """Evaluate on the whole test set, log one metrics line, and keep the best checkpoint."""
        config, dist = self.config, self.dist
        eval_model = run.ema.module if run.ema is not None else run.model
        result: EvalResult
        if run.test_batches is not None:  # an image folder: each rank reads its share; the sums are all-reduced
            result = evaluate_batches(eval_model, run.test_batches, self.device, self.autocast,
                                      dist.all_reduce_sum if dist.group else None, run.test_forwards)
        elif dist.group:  # each rank evaluates its share of the test set; the sums are all-reduced
            result = distributed.evaluate(eval_model, run.test_images, run.test_labels, run.eval_transform, dist,
                                          config.eval_batch_size, self.autocast)
        else:
            result = evaluate(eval_model, run.test_images, run.test_labels, run.eval_transform, self.device,
                              config.eval_batch_size, self.autocast)
        run.last_record = {"step": done, "epoch": round(done / run.steps_per_epoch, 4),
                           "train_loss": run.window.loss / run.window.steps, "lr": run.lr, "split": run.split,
                           "test_loss": result.loss, "test_top1": result.top1, "test_top5": result.top5,
                           "img_per_s": run.window.img_per_s, "elapsed_s": time.perf_counter() - run.started}
        if dist.is_main:
            run.run_dir.append_metrics(run.last_record)
            run.bar.write(f"step {done}/{run.total_steps} epoch {run.last_record['epoch']:.2f}  train_loss "
                          f"{run.last_record['train_loss']:.4f}  on {run.split}: top1 {result.top1:.2%}  "
                          f"top5 {result.top5:.2%}  {run.window.img_per_s:.0f} img/s")
        run.window = _Window()
        if result.top1 > run.best_top1:
            run.best_top1 = result.top1
            self._checkpoint("best", run, done)

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint(self, name: str, run: _Run, step: int) -> None:
        """Write checkpoint NAME (`last` or `best`) of the run at `step`."""
        self._save(name, run.model, run.optimizer, run.scheduler, run.ema, step, run.best_top1, run.started,
                   {**run.state_base, "skipped_images": len(run.skipped), "skipped_files": sorted(run.skipped)},
                   (run.window.loss, run.window.steps))
        if name == "last":
            run.saved = step

    def _save(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
              ema: AveragedModel | None, step: int, best_top1: float, started: float,
              state_base: dict[str, Any], window: tuple[float, int] = (0.0, 0)) -> None:
        # Called on every rank: with FSDP, gathering the full state is collective; then only rank 0 writes.
        fsdp = self.config.fsdp
        eval_model = ema.module if ema is not None else model
        tensors = {f"model/{key}": value for key, value in distributed.model_state(eval_model, fsdp).items()}
        if ema is not None:
            tensors.update({f"train/{key}": value for key, value in model.state_dict().items()})
            tensors["ema/n_averaged"] = ema.n_averaged
        optim_tensors, groups = ckpt.optimizer_to_tensors(distributed.optimizer_view(model, optimizer, fsdp))
        if not self.dist.is_main:
            return
        tensors.update(optim_tensors)
        tensors["rng/torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng/cuda"] = torch.cuda.get_rng_state(self.device)
        state = {**state_base, "step": step, "best_top1": best_top1, "elapsed_s": time.perf_counter() - started,
                 "optimizer_groups": groups, "scheduler": scheduler.state_dict(),
                 "train_window": {"loss_sum": window[0], "steps": window[1]}}
        metadata = {"vitlab_config": json.dumps(state_base["model_config"]), "format": "vitlab-train",
                    "classes": json.dumps(state_base["classes"]),
                    "preprocessing": json.dumps(state_base["preprocessing"])}
        RunDir(self.out).save(name, tensors, state, metadata)

    def _restore(self, run: _Run) -> tuple[int, float, float, tuple[float, int], set[str]] | None:
        """Step, best top-1, elapsed seconds, train-loss window and unreadable images skipped of OUT/last.*, loaded
        into the run's objects.

        A record that matches its checksum but not this run (hand-edited, or written to attack) is refused with
        one line naming the run, never a traceback."""
        try:
            return self._restore_unchecked(run)
        except VitlabError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as error:
            detail = " ".join(f"{type(error).__name__}: {error}".split())
            raise VitlabError(f"{self.out}: cannot resume from its 'last' checkpoint, which does not fit this run "
                              f"({detail[:300]})") from None

    def _restore_unchecked(self, run: _Run) -> tuple[int, float, float, tuple[float, int], set[str]] | None:
        model, optimizer, scheduler, ema = run.model, run.optimizer, run.scheduler, run.ema
        loaded = run.run_dir.load("last")
        if loaded is None:
            return None
        tensors, state = loaded
        if not 0 <= state["step"] <= run.total_steps:  # an integer: the checkpoint's reader checks that
            raise VitlabError(f"{run.run_dir.record_path('last')}: step {state['step']} lies outside this run's "
                              f"0..{run.total_steps} steps; the record is damaged or was edited")
        types = {"optimizer_groups": list, "scheduler": dict, "best_top1": (int, float), "elapsed_s": (int, float),
                 "train_window": (dict, type(None)), "skipped_files": list}
        wrong = [f"{key}={state[key]!r}"[:80] for key, kinds in types.items()
                 if key in state and not isinstance(state[key], kinds)]
        if wrong:
            raise VitlabError(f"{self.out}: cannot resume from its 'last' checkpoint, whose record has field(s) of "
                              f"the wrong type: {'; '.join(wrong)}")
        saved = config_from_json(state.get("train_config", {}), str(run.run_dir.record_path("last")))
        if saved.model != self.config.model or saved.model_overrides != self.config.model_overrides:
            raise VitlabError(f"{self.out}/last.json was trained with model {saved.model}; cannot resume it as "
                              f"{self.config.model}")
        changed = [f"{name} {getattr(saved, name)!r} → {getattr(self.config, name)!r}" for name in RESUME_FIXED
                   if getattr(saved, name) != getattr(self.config, name)]
        if changed:
            raise VitlabError(f"{self.out}/last.json was trained with other settings ({'; '.join(changed)}): the "
                              "resumed run would replay or skip samples, or follow another schedule; resume with "
                              "the same settings, or train into a new --out")
        raw = "train/" if ema is not None and any(k.startswith("train/") for k in tensors) else "model/"
        distributed.load_model_state(model, _strip(tensors, raw), self.config.fsdp)
        if ema is not None:
            ema.module.load_state_dict(_strip(tensors, "model/"))
            if "ema/n_averaged" in tensors:
                ema.n_averaged.copy_(tensors["ema/n_averaged"])
        ckpt.optimizer_from_tensors(distributed.optimizer_view(model, optimizer, self.config.fsdp), tensors,
                                    state["optimizer_groups"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(tensors["rng/torch"])
        if "rng/cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng/cuda"], self.device)
        window = state.get("train_window") or {}  # absent from checkpoints of earlier versions
        skipped = {str(path) for path in state.get("skipped_files", [])}
        return (int(state["step"]), float(state.get("best_top1", -1.0)), float(state.get("elapsed_s", 0.0)),
                (float(window.get("loss_sum", 0.0)), int(window.get("steps", 0))), skipped)


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


def _resampled_state(source: nn.Module, target: nn.Module) -> dict[str, torch.Tensor]:
    """The source's weights with the learned position embedding resampled to the target's grid."""
    from vitlab.models.layers import resample_position_embedding

    state = source.state_dict()
    if getattr(target, "pos_embed", None) is not None and state["pos_embed"].shape != target.pos_embed.shape:
        state["pos_embed"] = resample_position_embedding(
            state["pos_embed"], target.config.grid_size, target.num_prefix_tokens, source.config.grid_size,
            target.config.posemb_resample)
    return state
