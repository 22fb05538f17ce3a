"""Crash-safe file writes: a file appears under its final name only once it is whole.

vitlab writes every whole file through this module (weights, checkpoints, ONNX graphs, plots, study tables, shard
indexes), so a kill or a full disk never leaves a half-written file where a reader expects a finished one. Shards
are staged under their own temporary names, and `metrics.jsonl` is appended line by line (a resumed run drops a
torn last line).

The writers never rename over anything but a regular file (or a link, which is replaced, never written through),
and give their files the mode `open()` would. `check_regular_target` refuses an output a user names that is a
link, a special file or one of the inputs; `open_regular` and `regular_file` keep readers off FIFOs and devices,
which would block a read forever or never end it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from vitlab.errors import VitlabError, printable


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
    _refuse_special(path)  # before the work of writing, not only before the rename
    try:
        descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    except OSError as error:
        raise _naming(error, path) from None
    os.close(descriptor)
    try:
        yield Path(name)
        with open(name, "rb+") as written:  # whoever wrote it has closed it; its data reaches the disk first
            os.fsync(written.fileno())
        os.chmod(name, _new_file_mode(path))  # only now: a read-only mode must not stop the writing
        _refuse_special(path)
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


def check_regular_target(path: str | os.PathLike[str], *sources: str | os.PathLike[str]) -> Path:
    """`path` as a Path, refused unless it is absent or a regular file that is none of `sources` (the files a
    command reads): a link at an output would be replaced rather than written through, a FIFO or device node
    would be replaced by a file, and an input written over loses what it held beyond what was converted."""
    path = Path(path)
    try:
        found = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # absent; a file in the way of its directory fails on writing
        return path
    if stat.S_ISLNK(found.st_mode):
        target = os.readlink(path)
        dangling = "" if path.exists() else "dangling "
        raise VitlabError(f"{printable(str(path))}: a {dangling}symbolic link (to {printable(target)}); refusing to "
                          "write through it, name the file itself")
    _refuse_special(path, found)
    for source in sources:
        with contextlib.suppress(OSError):
            if os.path.samefile(path, source):
                raise VitlabError(f"{printable(str(path))}: is the input {printable(str(source))}; refusing to write "
                                  "over it, name another output")
    return path


def regular_file(path: str | os.PathLike[str]) -> Path:
    """`path` as a Path once it names a regular file (links followed), for a reader that opens by name; a missing
    file raises FileNotFoundError as opening it would."""
    path = Path(path)
    _refuse_special(path, os.stat(path), reading=True)
    return path


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """`path` opened for binary reading, refused unless it is a regular file. It is opened non-blocking, so a FIFO
    is refused instead of waiting for a writer, and checked on the open descriptor, so it cannot be swapped."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        _refuse_special(Path(path), os.fstat(descriptor), reading=True)
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _refuse_special(path: Path, found: os.stat_result | None = None, reading: bool = False) -> None:
    """Refuse `path` (`found` being its stat, when known) if it exists as neither a regular file nor a link: a
    directory with the IsADirectoryError that writing it would give, anything else with a VitlabError."""
    if found is None:
        try:
            found = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):  # absent: creating it reports a file in the way
            return
    if stat.S_ISREG(found.st_mode) or stat.S_ISLNK(found.st_mode):
        return
    if stat.S_ISDIR(found.st_mode):  # the error opening or renaming onto it would give, named as the user named it
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    kind = next((name for test, name in _KINDS if test(found.st_mode)), "not a regular file")
    action = "refusing to read it" if reading else "refusing to replace it"
    raise VitlabError(f"{printable(str(path))}: {kind}, not a regular file; {action}")


def _new_file_mode(path: Path) -> int:
    """The mode `open(path, "w")` would leave: the old file's when it exists, else 0o666 less the umask."""
    with contextlib.suppress(OSError):
        found = os.stat(path)
        if stat.S_ISREG(found.st_mode):
            return stat.S_IMODE(found.st_mode)
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask can only set it)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
