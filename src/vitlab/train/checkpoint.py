"""Crash-safe checkpoints: safetensors for every tensor, a JSON for everything else, nothing pickled.

`DIR/NAME.safetensors` + `DIR/NAME.json` are replaced atomically (temp file, fsync, rename); the pair they replace
is kept as `NAME.prev.*`. The JSON records the SHA-256 of its tensor file, so a torn or truncated write is detected
on load and the previous good pair is used instead, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from vitlab.atomic import atomic_write, fsync_directory
from vitlab.errors import VitlabError
from vitlab.weights import checksums


def check_writable(directory: Path) -> None:
    """Fail before training starts, not at the first save, when the output directory cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test.", delete=True)
        probe.close()
    except OSError as error:
        raise VitlabError(f"output directory {directory} is not writable: {error.strerror or error}") from None


def save_checkpoint(directory: Path, name: str, tensors: dict[str, torch.Tensor], state: dict[str, Any],
                    metadata: dict[str, str] | None = None) -> None:
    """Write NAME.safetensors and NAME.json; the newest consistent pair on disk before becomes NAME.prev.*."""
    payload = save({key: value.detach().contiguous().cpu() for key, value in tensors.items()}, metadata=metadata)
    digest = hashlib.sha256(payload).hexdigest()
    state = {**state, "sha256": digest, "tensors": f"{name}.safetensors"}
    text = json.dumps(state, indent=1).encode()
    weights, record = directory / f"{name}.safetensors", directory / f"{name}.json"
    _remove_stale_temporaries(directory, name)
    # Write both temporaries before touching the current pair, so a full disk leaves it intact.
    staged = []
    try:
        for target, data in ((weights, payload), (record, text)):
            temp = target.with_name(f".{target.name}.staging")
            atomic_write(temp, data)
            staged.append((temp, target))
    except OSError as error:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
        raise VitlabError(f"cannot save checkpoint {weights}: {error.strerror or error}; "
                          "the previous checkpoint is unchanged") from None
    # Keep the newest consistent pair as NAME.prev.*. Normally that is NAME.* itself, rotated whole; after a
    # save that was interrupted it can be NAME.json with NAME.prev.safetensors (or NAME.prev.*), and rotating
    # blindly would then pair a record with tensors it does not describe and drop the last good checkpoint.
    # Each rename below leaves that pair (or the new one) loadable, so a kill at any moment loses nothing.
    keep = checksums.consistent(directory, name, cached=True)
    kept_record, kept_tensors = (keep[0][1], keep[0][2]) if keep else (None, None)
    (weights_temp, _), (record_temp, _) = staged
    if kept_tensors == weights:
        os.replace(weights, directory / f"{name}.prev.safetensors")
    os.replace(weights_temp, weights)
    checksums.remember(weights, digest)
    if kept_record == record:
        os.replace(record, directory / f"{name}.prev.json")
    os.replace(record_temp, record)
    fsync_directory(directory)


def _remove_stale_temporaries(directory: Path, name: str) -> None:
    """Temporary files a killed save left behind (each as large as a checkpoint): one writer per run directory,
    so any that exist now belong to no save in progress."""
    for suffix in ("safetensors", "json"):
        for stale in directory.glob(f"..{name}.{suffix}.staging.*.tmp"):
            stale.unlink(missing_ok=True)


def has_tensors(directory: Path, name: str = "last") -> bool:
    """Whether a tensor file of checkpoint NAME is on disk (a run's record can be kept without its weights)."""
    return any(path.exists() for path in checksums.tensor_files(directory, name))


def load_checkpoint(directory: Path, name: str = "last") -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest consistent (tensors, state) pair under `directory`, or None when there is none at all.

    Any JSON is matched with any tensor file by checksum, so every moment of an interrupted save leaves one
    loadable pair: the new one or the previous one.
    """
    seen_any = any(record.exists() and tensors.exists() for record, tensors in checksums.candidates(directory, name))
    pairs = checksums.consistent(directory, name, cached=False)
    if not pairs:
        if seen_any:
            raise VitlabError(f"{directory}: no intact '{name}' checkpoint (checksums do not match); "
                              "remove the files to start over")
        _refuse_orphan_tensors(directory, name)
        return None
    _, record, tensors, state = pairs[0]
    if record.name != f"{name}.json" or tensors.name != f"{name}.safetensors":
        warnings.warn(f"{directory / (name + '.safetensors')} is torn or incomplete; using the previous good "
                      f"checkpoint {tensors.name} (step {state.get('step')})", stacklevel=2)
    try:
        return load_file(tensors), state
    except (SafetensorError, OSError) as error:
        raise VitlabError(f"{tensors}: unreadable checkpoint: {error}") from None


def _refuse_orphan_tensors(directory: Path, name: str) -> None:
    """Tensors of checkpoint NAME without any record cannot be verified nor resumed, and starting over would
    overwrite them: refused by name. A first save killed between its two renames leaves its record staged
    (`.NAME.json.staging`); starting over then loses only the steps since the start, as the kill did."""
    orphan = next((path for path in checksums.tensor_files(directory, name) if path.exists()), None)
    if orphan is None or (directory / f".{name}.json.staging").exists():
        return
    if not any(record.exists() for record, _ in checksums.candidates(directory, name)):
        raise VitlabError(f"{orphan} has no record ({name}.json): it cannot be resumed, and starting over would "
                          "overwrite it; move it away to start over")


def optimizer_to_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim/"
                         ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-ready param groups."""
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{prefix}{index}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{key: list(value) if isinstance(value, tuple) else value for key, value in group.items()}
              for group in state["param_groups"]]
    return tensors, groups


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           groups: list[dict[str, Any]], prefix: str = "optim/") -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, name = key[len(prefix):].split("/", 1)
            state.setdefault(int(index), {})[name] = value
    groups = [{key: tuple(value) if key == "betas" else value for key, value in group.items()} for group in groups]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
