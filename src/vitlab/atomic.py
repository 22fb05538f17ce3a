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

    An OSError names `path` itself, not the temporary file, so the command line can report the user's argument.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # its error names the directory that could not be made
    try:
        handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    except OSError as error:
        raise _naming(error, path) from None
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(handle.name)
        if isinstance(error, OSError):
            raise _naming(error, path) from None
        raise
    fsync_directory(path.parent)


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write `data` (text as UTF-8) so that `path` holds either its old content or all of the new one."""
    with atomic_writer(path) as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix) for a library that writes by file name (ONNX, Matplotlib);
    it replaces `path` only when the block completes."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        raise _naming(error, path) from None
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make renames in `directory` durable where the platform allows it (a no-op where it does not)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _naming(error: OSError, path: Path) -> OSError:
    return type(error)(error.errno, error.strerror, str(path)) if error.errno else error
