"""The SHA-256 pairing of a run's checkpoint files, read wherever a run's tensors are read.

A checkpoint NAME in a run directory is `NAME.safetensors` with its record `NAME.json`, whose `sha256` is the hash
of the tensor file; the pair before it is kept as `NAME.prev.*` (written by `vitlab.train.checkpoint`). Any record
is matched with any tensor file by checksum, so a torn, truncated or flipped file is never read as good: the
trainer's resume and every reader of weights (`vitlab.weights.io`) go through here.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from vitlab.errors import VitlabError

# sha256 of tensor files this process wrote or hashed, by (device, inode, size, mtime): a rename keeps all four,
# so the save that rotates a checkpoint need not read it back. Loading always hashes the files afresh.
_DIGESTS: dict[tuple[int, int, int, int], str] = {}


def _stat_key(path: Path) -> tuple[int, int, int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def remember(path: Path, digest: str) -> None:
    """Note the digest of a tensor file this process has just written."""
    key = _stat_key(path)
    if key is not None:
        _DIGESTS[key] = digest


def file_digest(path: Path, cached: bool) -> str | None:
    """The SHA-256 of a file (None when it cannot be read); `cached` takes a noted one for an unchanged file."""
    key = _stat_key(path)
    if key is None:
        return None
    if cached and key in _DIGESTS:
        return _DIGESTS[key]
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    except OSError:
        return None
    _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def tensor_files(directory: Path, name: str) -> list[Path]:
    return [directory / f"{name}.safetensors", directory / f"{name}.prev.safetensors"]


def candidates(directory: Path, name: str) -> list[tuple[Path, Path]]:
    """Every (record, tensor file) pairing of checkpoint NAME, the current pair first."""
    records = [directory / f"{name}.json", directory / f"{name}.prev.json"]
    return [(record, tensors) for record in records for tensors in tensor_files(directory, name)]


def read_record(record: Path) -> dict[str, Any] | None:
    """A checkpoint record as saved, or None when it is unreadable or not one (its step must be an integer)."""
    try:
        state = json.loads(record.read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("sha256"), str):
        return None
    step = state.get("step", -1)
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    return state


def consistent(directory: Path, name: str, cached: bool) -> list[tuple[int, Path, Path, dict[str, Any]]]:
    """Every (step, record, tensors, state) whose record's checksum matches its tensor file, newest first;
    NAME.json with NAME.safetensors first among equal steps."""
    found = []
    for order, (record, tensors) in enumerate(candidates(directory, name)):
        if not record.is_file() or not tensors.is_file():
            continue
        state = read_record(record)
        if state is not None and state["sha256"] == file_digest(tensors, cached):
            found.append((state.get("step", -1), order, record, tensors, state))
    found.sort(key=lambda item: (-item[0], item[1]))
    return [(step, record, tensors, state) for step, _, record, tensors, state in found]


def verified_tensor_file(path: Path) -> Path:
    """The tensor file to read for `path`, a checkpoint's `NAME.safetensors` in a run directory, checked against the
    SHA-256 its record holds, as a resume does: `path` itself when it matches, else (for `NAME.safetensors`) the
    previous good pair's tensors, with a warning; refused in one line when no pair matches. A file without a
    checkpoint record beside it (any other weights file) has no checksum to check and is returned as it is."""
    directory, stem = path.parent, path.name.removesuffix(".safetensors")
    name = stem.removesuffix(".prev")
    if not any(read_record(record) is not None for record, _ in candidates(directory, name) if record.is_file()):
        return path
    pairs = consistent(directory, name, cached=False)
    if any(tensors.name == path.name for _, _, tensors, _ in pairs):
        return path
    if not pairs or stem != name:
        raise VitlabError(f"{path} does not match the checksum its run's record holds: the file is corrupt or was "
                          "changed")
    _, _, tensors, state = pairs[0]
    warnings.warn(f"{path} does not match the checksum its record holds; using the previous good checkpoint "
                  f"{tensors.name} (step {state.get('step')})", stacklevel=2)
    return tensors
