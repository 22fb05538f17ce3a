"""Crash-safe file writes: a file appears under its final name only once it is whole.

vitlab writes every whole file through this module (weights, checkpoints, ONNX graphs, plots, study tables, shard
indexes), so a kill or a full disk never leaves a half-written file where a reader expects a finished one. Shards
are staged under their own temporary names, and `metrics.jsonl` is appended line by line (a resumed run drops a
torn last line).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary file in `path`'s directory that replaces `path` only once fully written and synced.

    An OSError about the temporary file names `path` instead, so the command line reports the user's argument.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # its error names the directory that could not be made
    with _replacing(path, ".tmp") as temporary, open(temporary, "wb") as handle:
        yield handle


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write `data` (text as UTF-8) so that `path` holds either its old content or all of the new one."""
    with atomic_writer(path) as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix) for a library that writes by file name (ONNX, Matplotlib,
    Pillow); it is synced and replaces `path` only when the block completes."""
    path = Path(path)
    with _replacing(path, f".tmp{path.suffix}") as temporary:
        yield temporary


@contextlib.contextmanager
def _replacing(path: Path, suffix: str) -> Iterator[Path]:
    """The one mechanism behind both writers: a temporary file beside `path`, synced and renamed over `path` once
    the block completes, removed otherwise; an OSError about it is reported as about `path`."""
    try:
        descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    except OSError as error:
        raise _naming(error, path) from None
    os.close(descriptor)
    try:
        yield Path(name)
        with open(name, "rb+") as written:  # whoever wrote it has closed it; its data reaches the disk first
            os.fsync(written.fileno())
        os.replace(name, path)
    except OSError as error:
        raise _naming(error, path, name) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
    fsync_directory(path.parent)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make renames in `directory` durable where the platform allows it (a no-op where it does not)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _naming(error: OSError, path: Path, temporary: str | None = None) -> OSError:
    """`error` as about `path` when it is about the temporary file (or names no file), else unchanged."""
    if not error.errno or (temporary is not None and error.filename not in (None, temporary)):
        return error
    return type(error)(error.errno, error.strerror, str(path))
