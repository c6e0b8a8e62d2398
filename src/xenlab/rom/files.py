"""ROM files a user names, read and written safely: :func:`read_rom_file`, :func:`write_rom_file`.

A path on a ``xenlab rom`` command line may be anything: ``/dev/zero``, a
FIFO with no writer (or one that never stops), a directory, a socket, a
64 GiB sparse file, a file another process truncates, a symlink loop, a file
whose name holds a newline.  Each ends quickly with one line naming the file
(:class:`RomFileError`, or :class:`~xenlab.files.InputTooLargeError` past
the limit), never a hang, a traceback or a crash.

Design (reading):

- **Opened without blocking** (``O_NONBLOCK``: opening a FIFO with no writer
  returns at once), then judged by ``fstat`` on the descriptor, so what is
  judged is what is read: regular files, block and character devices and
  FIFOs are read; directories are refused; sockets cannot be opened at all.
- **Read into memory, never mapped.**  A mapping of a file that another
  process truncates raises SIGBUS on the next touch of a lost page, which
  kills the interpreter (no Python handler can recover); a read only gets
  fewer bytes.  The limit keeps that cheap, and a walk touches most of the
  bytes anyway (it searches the whole file for a header).
- **Bounded**: :data:`ROM_LIMIT` is 64 MiB.  A PCI ROM BAR decodes at most
  16 MiB (real VGA BIOSes are 32 KiB to 1 MiB), but a ROM is also looked
  for inside whole SPI flash dumps, whose chips reach 512 Mbit.  A regular
  file or a block device over the limit is refused before a byte is read (a
  64 GiB sparse file costs one ``fstat``); a stream is read up to the limit
  plus one byte, so ``/dev/zero`` or an endless writer stops there; a file
  that grows while it is read stops there too.
- **Bounded in time**: a FIFO or character device is polled before every
  read and refused after :data:`PIPE_WAIT` seconds without data (a FIFO
  nobody writes to, a terminal, a writer that stalls).  ``rom`` commands are
  not interactive: a ROM on a slow pipe is saved to a file first.

Design (writing, :func:`write_rom_file`): through :mod:`xenlab.atomic`
(temporary file, fsync, rename), so readers see the old file or the new
one; the old file's mode is kept; writing over the input is safe because the
input was read whole first.  A symlink is written through to its target,
which keeps its mode, and the link stays, as ``config fmt -w`` does.
Refused, before anything is written:

- a dangling symlink (as GNU cp does: the name a link points at is not a
  place the user chose to create a file in);
- a symlink in a sticky, world-writable directory (``/tmp``) owned by
  neither this user nor the directory's owner: the kernel refuses to follow
  such links on ``open`` (``fs.protected_symlinks``), and following it by
  name here would bypass that;
- an output that exists and is not a regular file (a directory, ``/dev/full``,
  a FIFO): the rename would put a regular file in place of a device node.
"""

from __future__ import annotations

import errno
import os
import select
import stat
from pathlib import Path
from typing import Final

from xenlab.atomic import atomic_write_bytes
from xenlab.errors import XenlabError
from xenlab.files import InputTooLargeError

__all__ = [
    "BAR_LIMIT",
    "PIPE_WAIT",
    "ROM_LIMIT",
    "RomFileError",
    "check_output_dir",
    "read_rom_file",
    "read_small_file",
    "write_rom_file",
]

# A whole SPI flash dump (512 Mbit chips); a PCI ROM BAR itself decodes at most 16 MiB.
ROM_LIMIT: Final = 64 << 20
# What a PCI ROM BAR decodes at most (PCI 3.0, 6.2.5.2): the bound for a device's ROM.
BAR_LIMIT: Final = 16 << 20
# Seconds a FIFO or character device may keep a reader waiting for data.
PIPE_WAIT: Final = 3.0
_CHUNK: Final = 1 << 20
# Links a resolution follows before it gives up, as the kernel does (MAXSYMLINKS).
_MAX_LINKS: Final = 40


class RomFileError(XenlabError):
    """A file could not be read or written; ``name`` (as shown) and ``reason`` say why."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"{name}: {reason}")


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symlink"),
                       (stat.S_ISREG, "a regular file")):
        if test(mode):
            return what
    return "of an unknown kind"


def _open_error(path: Path, name: str, err: OSError) -> RomFileError:
    """``err`` from opening ``path``, said the way a user can act on it."""
    if err.errno == errno.ELOOP:
        return RomFileError(name, "cannot read: a symlink loop (too many levels of symbolic "
                                  "links)")
    if err.errno == errno.ENOENT and os.path.islink(path):
        return RomFileError(name, f"cannot read: a dangling symlink (to "
                                  f"{os.readlink(path)!r}, which does not exist)")
    if err.errno == errno.ENXIO:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return RomFileError(name, "is a socket, not a file")
        except OSError:
            pass
    return RomFileError(name, f"cannot read: {err.strerror or err}")


def _size_of(fd: int, mode: int) -> int | None:
    """The size of a regular file or block device; None for a stream."""
    if stat.S_ISREG(mode):
        return os.fstat(fd).st_size
    if stat.S_ISBLK(mode):
        size = os.lseek(fd, 0, os.SEEK_END)  # fstat says 0 for block devices
        os.lseek(fd, 0, os.SEEK_SET)
        return size
    return None


def read_rom_file(
    path: Path,
    *,
    name: str | None = None,
    limit: int = ROM_LIMIT,
    wait: float = PIPE_WAIT,
    what: str = "ROM file",
    regular_only: bool = False,
) -> bytes:
    """The bytes of ``path``, at most ``limit`` of them (see the module notes).

    ``name`` is how messages show the path (default ``str(path)``; the CLI
    passes it escaped).  With ``regular_only`` anything but a regular file
    is refused (``rom boot``: QEMU opens the file again itself).

    :raise InputTooLargeError: more than ``limit`` bytes.
    :raise RomFileError: the path cannot be opened or read, is a directory,
        or a stream gave no data for ``wait`` seconds.
    """
    path = Path(path)
    shown = str(path) if name is None else name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        raise _open_error(path, shown, err) from err
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise RomFileError(shown, "is a directory")
        if regular_only and not stat.S_ISREG(mode):
            raise RomFileError(shown, f"is {_kind(mode)}, not a regular file")
        size = _size_of(fd, mode)
        if size is not None and size > limit:
            raise InputTooLargeError(shown, limit, what)
        return _read_all(fd, shown, limit, what, size, wait if size is None else None)
    except OSError as err:
        raise RomFileError(shown, f"cannot read: {err.strerror or err}") from err
    finally:
        os.close(fd)


def _read_all(fd: int, name: str, limit: int, what: str, size: int | None,
              wait: float | None) -> bytes:
    """Up to ``limit`` bytes of ``fd`` (``limit + 1``: too large); ``wait``: poll first.

    ``size`` (a file's, None for a stream) is read in one piece, plus one byte
    to see the end: reading a 1 MiB file in 1 MiB chunks took ten times as long.
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
            raise RomFileError(name, f"no data for {wait:g} s at +{have:#x} (a FIFO without a "
                                     "writer, or a terminal?): save the ROM to a file first")
        try:
            want = size + 1 - have if size is not None and have <= size else _CHUNK
            chunk = os.read(fd, min(want, limit + 1 - have))
        except BlockingIOError:
            continue  # woken, but another reader took the data
        except OSError as err:
            raise RomFileError(name, f"cannot read at +{have:#x}: "
                                     f"{err.strerror or err}") from err
        if not chunk:
            break
        parts.append(chunk)
        have += len(chunk)
    if have > limit:
        raise InputTooLargeError(name, limit, what)
    return b"".join(parts)


def read_small_file(path: Path, *, limit: int = 4096, wait: float = PIPE_WAIT) -> bytes:
    """A small attribute file (sysfs's ``vendor``, ``class``...), read as :func:`read_rom_file`."""
    return read_rom_file(path, limit=limit, wait=wait, what="attribute file")


def _is_protected_link(link: str) -> bool:
    """Whether the kernel's ``fs.protected_symlinks`` would refuse to follow ``link``."""
    try:
        st = os.lstat(link)
        parent = os.stat(os.path.dirname(link) or ".")
    except OSError:
        return False
    sticky_public = parent.st_mode & stat.S_ISVTX and parent.st_mode & stat.S_IWOTH
    return bool(sticky_public) and st.st_uid not in (os.geteuid(), parent.st_uid)


def _resolve_output(path: Path, name: str) -> Path:
    """The file a write to ``path`` replaces: the end of its symlink chain, checked."""
    hop = os.fspath(path)
    for _ in range(_MAX_LINKS):
        if not os.path.islink(hop):
            break
        if _is_protected_link(hop):
            raise RomFileError(name, "cannot write: a symlink in a sticky world-writable "
                                     "directory owned by another user (the kernel would not "
                                     "follow it either)")
        hop = os.path.join(os.path.dirname(hop), os.readlink(hop))
    else:
        raise RomFileError(name, "cannot write: a symlink loop (too many levels of symbolic "
                                 "links)")
    # realpath settles links in the directories above the last name too.
    target = Path(os.path.realpath(hop))
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        if hop != os.fspath(path):
            raise RomFileError(name, f"cannot write: a dangling symlink (to "
                                     f"{os.readlink(path)!r}); not created through it") from None
        return target
    except OSError as err:
        raise RomFileError(name, f"cannot write: {err.strerror or err}") from err
    if not stat.S_ISREG(mode):
        raise RomFileError(name, f"cannot write: is {_kind(mode)}, not a regular file (only "
                                 "files are replaced)")
    return target


def write_rom_file(path: Path, data: bytes, *, name: str | None = None) -> Path:
    """Replace ``path`` with ``data`` atomically (see the module notes); the path written.

    :raise RomFileError: the output is refused, or the write failed (the old
        file, if any, is then untouched and no temporary file is left).
    """
    path = Path(path)
    shown = str(path) if name is None else name
    target = _resolve_output(path, shown)
    try:
        atomic_write_bytes(target, data)
    except OSError as err:
        raise RomFileError(shown, f"cannot write: {err.strerror or err}") from err
    return target


def check_output_dir(path: Path, *, name: str | None = None) -> None:
    """Refuse an output directory that is not one, before work that writes into it.

    A path that does not exist is fine (it is created); a dangling symlink,
    a symlink loop or anything but a directory is refused.
    """
    path = Path(path)
    shown = str(path) if name is None else name
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise RomFileError(shown, f"cannot write: a dangling symlink (to "
                                      f"{os.readlink(path)!r})") from None
        return
    except OSError as err:
        raise RomFileError(shown, f"cannot write: {err.strerror or err}") from err
    if not stat.S_ISDIR(mode):
        raise RomFileError(shown, f"is {_kind(mode)}, not a directory")

