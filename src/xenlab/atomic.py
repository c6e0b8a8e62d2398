"""Atomic file writes, the one way xenlab puts files on disk: :func:`atomic_write_bytes`.

A reader sees the old file or the new one, never a mix: the data goes to a
temporary file in the target's directory, is fsynced and renamed over the
target, and the directory is fsynced; on any failure the temporary file is
removed and the old file is untouched.  A user-named output is written through
a symlink to its target (mode, and as root owner, kept) and refused before
anything is written (:class:`FileWriteError`, naming the path) when the link
dangles, when a link in a sticky world-writable directory is owned by neither
the user nor the directory's owner, or when the target is not a regular file;
the path is walked with descriptors (``openat``), never by name again.
:func:`atomic_write_text`, :func:`make_output_dir`, :func:`check_output_dir`
and :func:`fsync_dir` keep the same rules; :mod:`xenlab.files` is the reading
half.  The design (the policy for output paths, and why) is in docs/rooms.md,
section Atomic writes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from xenlab.files import FileError, file_kind

__all__ = [
    "MAX_LINKS",
    "FileWriteError",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_dir",
    "fsync_dir",
    "make_output_dir",
    "write_all",
]

# Links a resolution follows before it gives up, as the kernel does (MAXSYMLINKS).
MAX_LINKS: Final = 40
_DIR_FLAGS: Final = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A file's name may be NAME_MAX (255) bytes: the temporary name keeps a prefix of it.
_TMP_NAME_BYTES: Final = 200


class FileWriteError(FileError):
    """An output was refused, or could not be written (the old file, if any, untouched)."""


@dataclass(frozen=True, slots=True)
class _Place:
    """Where a write lands: a directory descriptor (``O_PATH``), its path, and a name in it."""

    dir_fd: int
    directory: str
    name: str
    existing: os.stat_result | None  # the name's lstat, None when it does not exist


def _protected(link_st: os.stat_result, dir_st: os.stat_result) -> bool:
    """Whether the kernel's ``fs.protected_symlinks`` would refuse to follow this link."""
    sticky_public = dir_st.st_mode & stat.S_ISVTX and dir_st.st_mode & stat.S_IWOTH
    return bool(sticky_public) and link_st.st_uid not in (os.geteuid(), dir_st.st_uid)


def _lstat_at(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


class _Walk:
    """One resolution of an output path, name by name, holding one directory descriptor."""

    def __init__(self, path: str, shown: str, follow: bool) -> None:
        self.shown = shown
        self.follow = follow
        self.links = 0
        self.via_link: str | None = None  # the first link followed at the final name
        absolute = path.startswith("/")
        self.fd = os.open("/" if absolute else ".", _DIR_FLAGS)
        self.parts = [] if absolute else [p for p in os.getcwd().split("/") if p]

    def refuse(self, reason: str) -> FileWriteError:
        return FileWriteError(self.shown, f"cannot write: {reason}")

    def enter(self, name: str) -> None:
        """Move the descriptor to directory ``name`` (".." included) under it."""
        fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        os.close(self.fd)
        self.fd = fd
        if name == "..":
            if self.parts:
                self.parts.pop()
        else:
            self.parts.append(name)

    def splice(self, name: str, st: os.stat_result, todo: list[str]) -> None:
        """Follow the link ``name`` here: its target's names go in front of ``todo``."""
        self.links += 1
        if self.links > MAX_LINKS:
            raise self.refuse("a symlink loop (too many levels of symbolic links)")
        if _protected(st, os.fstat(self.fd)):
            raise self.refuse("a symlink in a sticky world-writable directory owned by another "
                              "user (the kernel would not follow it either)")
        target = os.readlink(name, dir_fd=self.fd)
        if not todo and self.via_link is None:
            self.via_link = target
        if target.startswith("/"):
            fd = os.open("/", _DIR_FLAGS)
            os.close(self.fd)
            self.fd, self.parts = fd, []
        todo[:0] = target.split("/")

    def missing(self, err: OSError) -> FileWriteError:
        """A name on the way is missing: said as a dangling link when one led here."""
        if self.via_link is not None and err.errno == errno.ENOENT:
            return self.refuse(f"a dangling symlink (to {self.via_link!r}); not created "
                               "through it")
        return self.refuse(err.strerror or str(err))

    def run(self, path: str) -> _Place:
        todo = path.split("/")
        while todo:
            name = todo.pop(0)
            last = not todo
            if name in ("", ".", ".."):
                if name == "..":
                    self.enter(name)
                if last:  # "dir/", "." or "..": the output would be a directory
                    raise self.refuse("is a directory, not a regular file (only files are "
                                      "replaced)")
                continue
            st = _lstat_at(name, self.fd)
            if st is not None and stat.S_ISLNK(st.st_mode) and (self.follow or not last):
                self.splice(name, st, todo)
                continue
            if last:
                if st is None and self.via_link is not None:
                    raise self.missing(FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT)))
                if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                    raise self.refuse(f"is {file_kind(st.st_mode)}, not a regular file (only "
                                      "files are replaced)")
                return _Place(self.fd, "/" + "/".join(self.parts), name, st)
            if st is None:
                raise self.missing(FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT)))
            if not stat.S_ISDIR(st.st_mode):
                raise self.missing(NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))
            self.enter(name)
        raise self.refuse("an empty path")  # split("/") never gives no names: unreachable


def _place(path: Path, shown: str, follow: bool) -> _Place:
    """Where a write to ``path`` lands, checked (see the module notes); the caller closes it."""
    name = os.fspath(path)
    if "\0" in name:  # os calls raise ValueError: no file can have such a name
        raise FileWriteError(shown, "cannot write: a name with a NUL character")
    try:
        walk = _Walk(name, shown, follow)
    except OSError as err:  # the working directory is gone, or "/" cannot be opened
        raise FileWriteError(shown, f"cannot write: {err.strerror or err}") from err
    try:
        return walk.run(name)
    except FileWriteError:
        os.close(walk.fd)
        raise
    except OSError as err:
        os.close(walk.fd)
        raise walk.missing(err) from err


def atomic_write_bytes(
    path: Path,
    data: bytes,
    *,
    mode: int | None = None,
    follow_symlinks: bool = True,
    keep_owner: bool = True,
    name: str | None = None,
) -> Path:
    """Replace ``path`` with ``data`` atomically (see the module notes); the path written.

    ``mode`` is the new file's mode (default: the old file's, else 0644).
    With ``keep_owner`` (and running as root) the old file's owner and group
    are kept; without it the file is this process's, as a private copy must
    be.  ``name`` is how messages show the path (default ``str(path)``).

    :raise FileWriteError: the output is refused (nothing written), or the
        write failed (the ``OSError`` is its ``__cause__``; the old file, if
        any, is untouched and no temporary file is left).
    """
    path = Path(path)
    shown = str(path) if name is None else name
    where = _place(path, shown, follow_symlinks)
    try:
        _replace(where, data, mode, keep_owner)
    except OSError as err:
        raise FileWriteError(shown, f"cannot write: {err.strerror or err}") from err
    finally:
        os.close(where.dir_fd)
    return Path(where.directory, where.name)


def _replace(where: _Place, data: bytes, mode: int | None, keep_owner: bool) -> None:
    """Temporary file, fsync, rename, fsync directory: all relative to ``where.dir_fd``."""
    old = where.existing if where.existing is not None and stat.S_ISREG(
        where.existing.st_mode) else None
    if mode is None:
        mode = stat.S_IMODE(old.st_mode) if old is not None else 0o644
    stem = os.fsdecode(os.fsencode(where.name)[:_TMP_NAME_BYTES])
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = f".{stem}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=where.dir_fd)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(errno.EEXIST, "no free temporary name")
    try:
        try:
            write_all(fd, data)
            if keep_owner and old is not None and os.geteuid() == 0:
                os.fchown(fd, old.st_uid, old.st_gid)
            os.fchmod(fd, mode)  # after fchown, which clears set-id bits
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, where.name, src_dir_fd=where.dir_fd, dst_dir_fd=where.dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=where.dir_fd)
        raise
    _fsync_dir_fd(where.dir_fd)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` at ``fd``'s offset (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir_fd(dir_fd: int) -> None:
    """fsync the directory behind an ``O_PATH`` descriptor (which cannot be synced itself)."""
    try:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    except PermissionError:
        return  # a directory one may write in but not list: the rename stands, unsynced
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str, *, mode: int | None = None,
                      follow_symlinks: bool = True, keep_owner: bool = True,
                      name: str | None = None) -> Path:
    """Replace ``path`` with ``text`` (UTF-8; undecodable input bytes restored) atomically."""
    return atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"), mode=mode,
                              follow_symlinks=follow_symlinks, keep_owner=keep_owner,
                              name=name)


def fsync_dir(directory: Path) -> None:
    """fsync ``directory``, so the names created or renamed in it survive a crash.

    :raise OSError: it cannot be opened or synced.
    """
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_output_dir(path: Path, *, name: str | None = None) -> None:
    """Refuse an output directory that is not one, before work that writes into it.

    A path that does not exist is fine (it is created); a dangling symlink,
    a symlink loop or anything but a directory is refused
    (:class:`FileWriteError`).
    """
    path = Path(path)
    shown = str(path) if name is None else name
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise FileWriteError(shown, f"cannot write: a dangling symlink (to "
                                        f"{os.readlink(path)!r})") from None
        return
    except OSError as err:
        raise FileWriteError(shown, f"cannot write: {err.strerror or err}") from err
    if not stat.S_ISDIR(mode):
        raise FileWriteError(shown, f"is {file_kind(mode)}, not a directory")


def make_output_dir(path: Path, *, name: str | None = None) -> None:
    """:func:`check_output_dir`, then create ``path`` and its parents as needed.

    The files written into it are judged one by one by :func:`atomic_write_bytes`.
    """
    check_output_dir(path, name=name)
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        shown = str(path) if name is None else name
        raise FileWriteError(shown, f"cannot write: {err.strerror or err}") from err
