"""Atomic file writes, the one way xenlab puts files on disk: :func:`atomic_write_bytes`.

:func:`fsync_dir` makes a name made some other way (a rename, an ``O_EXCL``
create) durable.

A reader sees the old file or the new one, never a mix: the data goes to a
temporary file in the same directory, is flushed and fsynced, then renamed
over the target; the directory is fsynced so the rename survives a crash.
On any failure the temporary file is removed and the old file is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically; keep the old file's mode if any."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    """fsync ``directory``, so the names created or renamed in it survive a crash.

    :raise OSError: it cannot be opened or synced.
    """
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8; undecodable input bytes restored) atomically."""
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))
