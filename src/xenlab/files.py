"""Reading files a user names, safely and with a bound: :func:`read_bounded`.

A path on a command line may be anything (``/dev/zero``, a FIFO with no
writer, a directory, a 64 GiB sparse file, a file another process truncates);
each ends quickly with one line naming the file (:class:`FileReadError`, or
:class:`InputTooLargeError` past the limit), never a hang or a crash.  Every
reader of a user-named file goes through here; :mod:`xenlab.atomic` is the
writing half.  A file is opened with ``O_NONBLOCK`` and ``O_NOCTTY`` and
judged by ``fstat`` on the descriptor, read into memory (never mapped: a
truncated mapping is SIGBUS), bounded in size (an oversized regular file or
block device is refused before a byte is read, a stream stops at ``limit``
plus one byte) and in time (FIFOs and character devices are polled,
:data:`PIPE_WAIT`).  The design (each rule and its reason) is in
docs/rooms.md, section Bounded reads.
"""

from __future__ import annotations

import errno
import os
import select
import stat
from pathlib import Path
from typing import Final

from xenlab.errors import XenlabError

__all__ = [
    "CONFIG_LIMIT",
    "PIPE_WAIT",
    "FileError",
    "FileReadError",
    "InputTooLargeError",
    "file_kind",
    "private_dir",
    "read_bounded",
    "read_text_bounded",
]

# An xl config, a scenario, an xm file: real ones are a few KB; 16 MiB leaves
# room for generated ones and is still nothing to hold in memory.
CONFIG_LIMIT: Final = 16 << 20
# Seconds a FIFO or character device may keep a reader waiting for data: long
# enough for a producer that starts up, short enough that a forgotten FIFO is
# an error and not a hang.
PIPE_WAIT: Final = 3.0
_CHUNK: Final = 1 << 20


class FileError(XenlabError):
    """A file a user names could not be used; ``name`` (as shown) and ``reason`` say why."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"{name}: {reason}")


class FileReadError(FileError):
    """A file could not be read: refused by kind, unopenable, or silent for too long."""


class InputTooLargeError(XenlabError):
    """A file holds more than a reader takes; ``path`` and ``limit`` (bytes) say which."""

    def __init__(self, path: str, limit: int, what: str = "file") -> None:
        self.path = path
        self.limit = limit
        super().__init__(f"{path}: {what} larger than {_size(limit)}: not read")


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def file_kind(mode: int) -> str:
    """What ``mode`` (an ``st_mode``) is, as messages say it: "a FIFO", "a directory"..."""
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symlink"),
                       (stat.S_ISREG, "a regular file")):
        if test(mode):
            return what
    return "of an unknown kind"


def _open_error(path: Path, name: str, err: OSError) -> FileReadError:
    """``err`` from opening ``path``, said the way a user can act on it."""
    if err.errno == errno.ELOOP:
        return FileReadError(name, "cannot read: a symlink loop (too many levels of symbolic "
                                   "links)")
    if err.errno == errno.ENOENT and os.path.islink(path):
        return FileReadError(name, f"cannot read: a dangling symlink (to "
                                   f"{os.readlink(path)!r}, which does not exist)")
    if err.errno == errno.ENXIO:  # what open() says of a Unix socket
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return FileReadError(name, "is a socket, not a file")
        except OSError:
            pass
    return FileReadError(name, f"cannot read: {err.strerror or err}")


def _size_of(fd: int, mode: int) -> int | None:
    """The size of a regular file or block device; None for a stream."""
    if stat.S_ISREG(mode):
        return os.fstat(fd).st_size
    if stat.S_ISBLK(mode):
        size = os.lseek(fd, 0, os.SEEK_END)  # fstat says 0 for block devices
        os.lseek(fd, 0, os.SEEK_SET)
        return size
    return None


def read_bounded(
    path: str | Path,
    limit: int,
    *,
    what: str = "file",
    wait: float = PIPE_WAIT,
    name: str | None = None,
    regular_only: bool = False,
) -> bytes:
    """The bytes of ``path``, at most ``limit`` of them (see the module notes).

    ``what`` names the file's role in messages ("config", "ROM file");
    ``name`` is how messages show the path (default ``str(path)``; the CLI
    passes it escaped).  ``wait`` bounds each wait for data on a FIFO or
    character device.  With ``regular_only`` anything but a regular file is
    refused (for a caller whose file is opened again by another program).

    :raise InputTooLargeError: more than ``limit`` bytes.
    :raise FileReadError: the path cannot be opened or read, is a directory
        (or not a regular file, with ``regular_only``), or a stream gave no
        data for ``wait`` seconds.  A read error's ``OSError`` is its
        ``__cause__``.
    """
    path = Path(path)
    shown = str(path) if name is None else name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        raise _open_error(path, shown, err) from err
    except ValueError as err:  # no file can have such a name: not a bug to show as one
        raise FileReadError(shown, "cannot read: a name with a NUL character") from err
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise FileReadError(shown, "is a directory")
        if regular_only and not stat.S_ISREG(mode):
            raise FileReadError(shown, f"is {file_kind(mode)}, not a regular file")
        size = _size_of(fd, mode)
        if size is not None and size > limit:
            raise InputTooLargeError(shown, limit, what)
        return _read_all(fd, shown, limit, what, size, wait if size is None else None)
    except OSError as err:
        raise FileReadError(shown, f"cannot read: {err.strerror or err}") from err
    finally:
        os.close(fd)


def _read_all(fd: int, name: str, limit: int, what: str, size: int | None,
              wait: float | None) -> bytes:
    """Up to ``limit`` bytes of ``fd`` (``limit + 1``: too large); ``wait``: poll first.

    ``size`` (a file's, None for a stream) is read in one piece, plus one byte
    to see the end: reading a 1 MiB file in 1 MiB chunks took ten times as long.
    The pieces are joined once at the end (one piece is returned as it is), so
    the peak stays near the limit.
    """
    parts: list[bytes] = []
    have = 0
    poller = None
    if wait is not None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
    while have <= limit:
        # Linux reports a FIFO that never had a writer as neither readable nor
        # hung up (while read() would say end of file): poll waits for a writer.
        if poller is not None and wait is not None and not poller.poll(wait * 1000):
            raise FileReadError(name, f"no data for {wait:g} s at +{have:#x} (a FIFO without a "
                                      f"writer, or a terminal?): {_save_first(what)}")
        try:
            want = size + 1 - have if size is not None and have <= size else _CHUNK
            chunk = os.read(fd, min(want, limit + 1 - have))
        except BlockingIOError:
            continue  # woken, but another reader took the data
        except OSError as err:
            raise FileReadError(name, f"cannot read at +{have:#x}: "
                                      f"{err.strerror or err}") from err
        if not chunk:
            break
        parts.append(chunk)
        have += len(chunk)
    if have > limit:
        raise InputTooLargeError(name, limit, what)
    return b"".join(parts)


def _save_first(what: str) -> str:
    """The advice for a stream that went silent: "save the ROM to a file first"."""
    noun = what.removesuffix(" file")
    return "save it to a file first" if noun == "file" else f"save the {noun} to a file first"


def read_text_bounded(path: str | Path, limit: int = CONFIG_LIMIT, *, what: str = "file",
                      wait: float = PIPE_WAIT, name: str | None = None) -> str:
    """:func:`read_bounded` as text: UTF-8, undecodable bytes kept as surrogates."""
    data = read_bounded(path, limit, what=what, wait=wait, name=name)
    return data.decode("utf-8", "surrogateescape")


def private_dir(path: Path, *, create: bool = True,
                error: type[XenlabError] = XenlabError, what: str = "") -> Path:
    """Make sure ``path`` is a directory only this user can enter (0700); returns it.

    Created 0700 when missing (parents too, as ``mkdir -p`` with umask 077);
    an existing one of ours is tightened to 0700 (only this user, or root,
    could have loosened it).  A symlink, a non-directory or a directory owned
    by another user is refused: whoever owns it could replace the files we
    trust there.  Its parent should be writable by this user (or root) alone,
    so nothing can be swapped in after the check.

    :raise error: naming the path (after ``what``, e.g. "hotplug lock directory ")
        and what is wrong with it (``StateError`` for the state store,
        ``HotplugError`` for the hotplug lock...).
    """
    name = f"{what}{path}"
    if create:
        old = os.umask(0o077)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise error(f"{name}: cannot create: {err.strerror or err}") from err
        finally:
            os.umask(old)
    try:
        st = os.lstat(path)
    except OSError as err:
        raise error(f"{name}: {err.strerror or err}") from err
    if stat.S_ISLNK(st.st_mode):
        raise error(f"{name}: is a symbolic link; xenlab keeps private files only in a "
                    "real directory of its own")
    if not stat.S_ISDIR(st.st_mode):
        raise error(f"{name}: is not a directory")
    if st.st_uid != os.geteuid():
        raise error(f"{name}: belongs to uid {st.st_uid}, not to this user "
                    f"({os.geteuid()}); refusing to keep private files there")
    if st.st_mode & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError as err:
            raise error(f"{name}: cannot make private: {err.strerror or err}") from err
    return path

