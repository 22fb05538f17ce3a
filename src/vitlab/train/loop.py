"""The Trainer: steps, evaluation, metrics, checkpoints and resume for every model in the registry."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from vitlab.data import AugmentConfig, EvalTransform, ImageTensors, TrainTransform, load_dataset, match_channels
from vitlab.data.shards import ShardSet, is_shard_dataset, load_shard_split, stream_batches
from vitlab.errors import TrainingDiverged, VitlabError
from vitlab.eval.metrics import evaluate
from vitlab.models.registry import build_model, config_to_dict, model_config
from vitlab.precision import resolve_amp
from vitlab.train import checkpoint as ckpt
from vitlab.train import distributed
from vitlab.train.config import TrainConfig, config_from_json, config_to_json
from vitlab.train.optim import build_optimizer, build_scheduler


# Settings a resumed run must share with its checkpoint: the step → sample mapping depends on the data, subset,
# seed and batch, the restored scheduler on the epochs and learning-rate schedule, and the restored optimizer keeps
# its own weight decay, betas and momentum.
RESUME_FIXED = ("dataset", "subset", "seed", "batch_size", "epochs", "optimizer", "lr", "min_lr", "schedule",
                "warmup_steps", "warmup_epochs", "weight_decay", "betas", "momentum")


@dataclass
class Data:
    train: ImageTensors | ShardSet  # a ShardSet streams WebDataset shards instead of holding the images
    test: ImageTensors


def select_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise VitlabError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VitlabError("device cuda was asked for but CUDA is not available")
    return device


def load_data(config: TrainConfig, img_size: int) -> Data:
    if is_shard_dataset(config.dataset):
        if config.subset is not None:
            raise VitlabError("--subset is not supported for WebDataset shards; shard a subset instead")
        return Data(ShardSet.open(config.dataset, "train"), load_shard_split(config.dataset, "test", img_size))
    train = load_dataset(config.dataset, "train", config.subset, config.seed, img_size, config.skip_bad_images)
    test = load_dataset(config.dataset, "test", None, config.seed, img_size, config.skip_bad_images)
    if train.num_classes < 2:
        raise VitlabError(f"{config.dataset}: training needs at least two classes")
    return Data(train, test)


class Trainer:
    """Runs one `TrainConfig` to the end, resuming from `out/last.*` when asked."""

    def __init__(self, config: TrainConfig, resume: bool = False) -> None:
        self.config = config
        self.out = Path(config.out)
        self.resume = resume
        self.device = select_device(config.device)
        self.dist = distributed.Distributed(device=self.device)  # replaced by fit() under torchrun
        self.autocast = resolve_amp(config.amp, self.device)

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
            return build_model(model_config(config.model, num_classes=num_classes, img_size=config.img_size,
                                            **overrides))
        from vitlab.weights import load_model

        source = load_model(config.init_from)
        model_cfg = source.config
        changes: dict[str, Any] = dict(config.model_overrides)
        if config.img_size is not None:
            changes["img_size"] = config.img_size
        if changes:
            from vitlab.models.registry import apply_overrides

            model = build_model(apply_overrides(model_cfg, changes))
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

    # ---------------------------------------------------------------- main
    def fit(self) -> dict[str, Any]:
        config = self.config
        ckpt.check_writable(self.out)
        self.dist = dist = distributed.setup(self.device, config.fsdp)
        self.device = dist.device
        self._seed()
        probe_size = config.img_size or model_config(config.model).img_size[0]
        data = load_data(config, probe_size)
        data_chans = data.train.channels if isinstance(data.train, ShardSet) else data.train.images.shape[1]
        model = self._build_model(data.train.num_classes, data_chans).to(self.device)
        if config.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise VitlabError(f"grad_checkpointing: {type(model).__name__} does not support it")
            model.set_grad_checkpointing(True)
        size = tuple(model.config.img_size)
        in_chans = model.config.in_chans
        if data.train.num_classes != model.config.num_classes:
            raise VitlabError(f"model has {model.config.num_classes} classes, {config.dataset} has "
                              f"{data.train.num_classes}")
        if config.batch_size % (dist.world_size * config.accum_steps):
            raise VitlabError(f"batch_size {config.batch_size} (global) is not divisible by {dist.world_size} "
                              f"process(es) × accum_steps {config.accum_steps}")
        if config.fsdp and config.ema_decay:
            raise VitlabError("ema_decay is not supported with --fsdp")
        wrapped = distributed.wrap_model(model, dist, config.fsdp)  # DDP / FSDP2 under torchrun; else the model

        steps_per_epoch = len(data.train) // config.batch_size
        if steps_per_epoch == 0:
            raise VitlabError(f"batch_size {config.batch_size} is larger than the training set ({len(data.train)})")
        total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
        eval_every = max(1, round(config.eval_every_epochs * steps_per_epoch))
        warmup = config.warmup_steps or round(config.warmup_epochs * steps_per_epoch)

        optimizer = build_optimizer(model, config)
        scheduler = build_scheduler(optimizer, config, total_steps, warmup)
        ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
               if config.ema_decay else None)
        runner = torch.compile(wrapped) if config.compile else wrapped

        augment = AugmentConfig(config.crop_padding, config.hflip, config.randaugment_ops,
                                config.randaugment_magnitude, mixup_alpha=config.mixup_alpha,
                                cutmix_alpha=config.cutmix_alpha)
        train_transform = TrainTransform(augment, size, data.train.num_classes, data.train.flips_allowed)
        eval_transform = EvalTransform(size)
        test_images = match_channels(data.test.images, in_chans)

        start_step, best_top1, elapsed_before, window = 0, -1.0, 0.0, (0.0, 0)
        if self.resume:
            restored = self._restore(model, optimizer, scheduler, ema)
            if restored is not None:
                start_step, best_top1, elapsed_before, window = restored
        metrics_path = self.out / "metrics.jsonl"
        if dist.is_main:
            _truncate_metrics(metrics_path, start_step)
        stream = (stream_batches(data.train, config.batch_size // dist.world_size, dist.rank, dist.world_size,
                                 config.seed, start_step, size, dist.local_world_size)
                  if isinstance(data.train, ShardSet) else None)

        state_base = {"train_config": config_to_json(config), "model_config": config_to_dict(model.config),
                      "classes": list(data.train.classes), "total_steps": total_steps,
                      "steps_per_epoch": steps_per_epoch}
        generator_seed = config.seed * 1_000_003
        order: torch.Tensor | None = None
        order_epoch = -1
        last_record: dict[str, Any] = {}
        # The train loss logged at each evaluation averages the steps since the previous one; a run resumed between
        # two evaluations carries on the sum it had, so its metrics.jsonl equals an uninterrupted run's.
        window_loss, window_count, window_images, window_time = window[0], window[1], 0, 0.0
        started = time.perf_counter() - elapsed_before
        bar = tqdm(total=total_steps, initial=start_step, disable=not (config.progress and dist.is_main),
                   unit="step", dynamic_ncols=True)
        micro = config.batch_size // (config.accum_steps * dist.world_size)
        for step in range(start_step, total_steps):
            tick = time.perf_counter()
            if dist.world_size > 1:  # each rank's own, reproducible augmentation and dropout randomness
                torch.manual_seed(distributed.step_seed(config.seed, step, dist.rank))
            if stream is not None:
                images, labels = next(stream)
            else:
                epoch, position = divmod(step, steps_per_epoch)
                if epoch != order_epoch:
                    order = torch.randperm(len(data.train),
                                           generator=torch.Generator().manual_seed(generator_seed + epoch))
                    order_epoch = epoch
                # Every rank draws the same global batch and takes its strided share (DistributedSampler-like).
                indices = order[position * config.batch_size:(position + 1) * config.batch_size]
                indices = indices[dist.rank::dist.world_size]
                images, labels = data.train.images[indices], data.train.labels[indices]
            inputs, targets = train_transform(match_channels(images, in_chans), labels)
            model.train()
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for chunk in range(config.accum_steps):
                part = slice(chunk * micro, (chunk + 1) * micro)
                x, y = inputs[part].to(self.device, non_blocking=True), targets[part].to(self.device)
                with distributed.gradient_sync(wrapped, sync=chunk == config.accum_steps - 1):
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                        loss = F.cross_entropy(runner(x), y, label_smoothing=config.label_smoothing)
                    (loss / config.accum_steps).backward()
                step_loss += loss.item() / config.accum_steps
            step_loss = dist.mean(step_loss)  # every rank sees the same loss, so all stop together on NaN
            if not math.isfinite(step_loss):
                bar.close()
                raise TrainingDiverged(f"loss became {step_loss} at step {step + 1}; stopped, the last good "
                                       f"checkpoint in {self.out} is kept")
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            window_loss += step_loss
            window_count += 1
            window_images += config.batch_size
            window_time += time.perf_counter() - tick
            done = step + 1
            img_per_s = window_images / max(window_time, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", img_s=f"{img_per_s:.0f}", refresh=False)

            is_eval = done % eval_every == 0 or done == total_steps
            if is_eval:
                eval_model = ema.module if ema is not None else model
                if dist.group:  # each rank evaluates its share of the test set; the sums are all-reduced
                    result = distributed.evaluate(eval_model, test_images, data.test.labels, eval_transform, dist,
                                                  config.eval_batch_size, self.autocast)
                else:
                    result = evaluate(eval_model, test_images, data.test.labels, eval_transform, self.device,
                                      config.eval_batch_size, self.autocast)
                last_record = {"step": done, "epoch": round(done / steps_per_epoch, 4),
                               "train_loss": window_loss / window_count, "lr": lr, "test_loss": result.loss,
                               "test_top1": result.top1, "test_top5": result.top5, "img_per_s": img_per_s,
                               "elapsed_s": time.perf_counter() - started}
                if dist.is_main:
                    _append_metrics(metrics_path, last_record)
                    bar.write(f"step {done}/{total_steps} epoch {last_record['epoch']:.2f}  train_loss "
                              f"{last_record['train_loss']:.4f}  test_top1 {result.top1:.2%}  "
                              f"top5 {result.top5:.2%}  {img_per_s:.0f} img/s")
                window_loss, window_count, window_images, window_time = 0.0, 0, 0, 0.0
                if result.top1 > best_top1:
                    best_top1 = result.top1
                    self._save("best", model, optimizer, scheduler, ema, done, best_top1, started, state_base,
                               (window_loss, window_count))
            if is_eval or done % config.checkpoint_every_steps == 0:
                self._save("last", model, optimizer, scheduler, ema, done, best_top1, started, state_base,
                           (window_loss, window_count))
        bar.close()
        if last_record and dist.is_main:
            from vitlab.train.curves import plot_curves

            plot_curves(metrics_path, self.out / "curves.png")
        return {**last_record, "best_top1": best_top1, "out": str(self.out)}

    # ---------------------------------------------------------------- checkpoints
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
                    "classes": json.dumps(state_base["classes"])}
        ckpt.save_checkpoint(self.out, name, tensors, state, metadata)

    def _restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 ema: AveragedModel | None) -> tuple[int, float, float, tuple[float, int]] | None:
        """Step, best top-1, elapsed seconds and train-loss window of OUT/last.*, loaded into the objects given.

        A record that matches its checksum but not this run (hand-edited, or written to attack) is refused with
        one line naming the run, never a traceback."""
        try:
            return self._restore_unchecked(model, optimizer, scheduler, ema)
        except VitlabError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as error:
            detail = " ".join(f"{type(error).__name__}: {error}".split())
            raise VitlabError(f"{self.out}: cannot resume from its 'last' checkpoint, which does not fit this run "
                              f"({detail[:300]})") from None

    def _restore_unchecked(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                           ema: AveragedModel | None) -> tuple[int, float, float, tuple[float, int]] | None:
        loaded = ckpt.load_checkpoint(self.out, "last")
        if loaded is None:
            return None
        tensors, state = loaded
        types = {"optimizer_groups": list, "scheduler": dict, "best_top1": (int, float), "elapsed_s": (int, float),
                 "train_window": (dict, type(None))}
        wrong = [f"{key}={state[key]!r}"[:80] for key, kinds in types.items()
                 if key in state and not isinstance(state[key], kinds)]
        if wrong:
            raise VitlabError(f"{self.out}: cannot resume from its 'last' checkpoint, whose record has field(s) of "
                              f"the wrong type: {'; '.join(wrong)}")
        saved = config_from_json(state.get("train_config", {}), str(self.out / "last.json"))
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
        return (int(state["step"]), float(state.get("best_top1", -1.0)), float(state.get("elapsed_s", 0.0)),
                (float(window.get("loss_sum", 0.0)), int(window.get("steps", 0))))


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


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    try:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:  # a full disk: stop with one line; the last checkpoint is intact
        raise VitlabError(f"cannot write {path}: {error.strerror or error}") from None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records newer than the checkpoint we resume from, so a resumed run logs each evaluation once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by a kill mid-write
    ckpt.atomic_write(path, "".join(line + "\n" for line in kept).encode())
