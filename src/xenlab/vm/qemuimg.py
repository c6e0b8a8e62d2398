"""qemu-img, run from one place and always told the format: :func:`info`, :func:`create`, ...

Every call names the image's format (``-f``) from the config or the record:
qemu-img never probes a guest's disk.  A raw disk is the guest's own bytes,
so a guest can write a qcow2 header into it; probed, that header would
make qemu-img open a host file named as its backing file, or write to a
host file named as its external data file.  Repairs run only on formats
that have metadata to repair (qcow2, qed).  Reads use ``-U`` (force share):
the image may be open in a running QEMU.

Formats are given as xl names (``DiskFormat`` values: ``vhd``...) or as
QEMU driver names (``vpc``...); :func:`driver` maps one to the other.

Files xenlab makes
    Images sit in directories other users may write to (a shared ``/tmp``,
    a group's disk directory), so a new image never goes through a name
    that is already there.  :func:`create` and :func:`convert` make their
    output in a temporary file beside it (``mkstemp``: ``O_CREAT|O_EXCL|
    O_NOFOLLOW``, a random name), fsync it, and then hard-link it to its name,
    which fails if anything is there, a dangling symbolic link included
    (``rename`` would replace what is there, ``open`` would follow the
    link): the name appears only once the image is whole, and only as this
    file.  Where the file system has no hard links the name is first claimed
    empty (:func:`claim`) and the image renamed over it.  :func:`claim` is
    also the way for a file another program fills in by name (QEMU's live
    snapshot overlays): it is made empty, exclusively, without following a
    link, before that program opens it.  :func:`remove_own` takes back only
    a regular file of this user, never a link planted in its place.

    Mode: every image xenlab makes is 0600 (:data:`IMAGE_MODE`), whatever the
    umask and whatever the mode of the image it derives from (an overlay's
    backing file, a copy's source).  Decided: 0600 is at least as strict as
    any source for every other user (it gives them nothing), and an owner
    who cannot write their own overlay could not run the guest on it, so a
    source's stricter owner bits (0400) are not copied.  qemu-img itself
    runs with umask 077, so nothing it makes on its own is readable by others
    either.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from xenlab.config.specs.disk import DiskFormat
from xenlab.errors import BackendError, UsageError, XenlabError

__all__ = [
    "FORMAT_DRIVERS",
    "IMAGE_MODE",
    "CheckResult",
    "ImageFileError",
    "QemuImgError",
    "backing_chain",
    "backing_of",
    "check",
    "claim",
    "commit",
    "convert",
    "create",
    "driver",
    "info",
    "new_image",
    "remove_own",
    "snapshot",
    "snapshot_tags",
    "virtual_size",
]

# xl's disk formats and the QEMU block driver for each.
FORMAT_DRIVERS: Final[dict[DiskFormat, str]] = {
    DiskFormat.RAW: "raw",
    DiskFormat.QCOW2: "qcow2",
    DiskFormat.QCOW: "qcow",
    DiskFormat.VHD: "vpc",
    DiskFormat.QED: "qed",
}
_DRIVERS: Final = frozenset(FORMAT_DRIVERS.values())
# Formats whose metadata `qemu-img check -r` can repair; others have none.
_REPAIRABLE: Final = frozenset({"qcow2", "qed"})
# Metadata operations are quick; copies and commits get the caller's bound.
TIMEOUT: Final = 120.0
#: The mode of every image file xenlab makes (module docstring: "Files xenlab makes").
IMAGE_MODE: Final = 0o600
# qemu-img runs with this umask: nothing it makes by itself is for other users.
_UMASK: Final = 0o077


class QemuImgError(BackendError):
    """qemu-img failed or refused; ``path`` is the image, ``detail`` its own message."""

    def __init__(self, command: str, path: str, detail: str) -> None:
        self.command = command
        self.path = path
        self.detail = detail
        super().__init__(f"qemu-img {command} {path}: {detail}")


class ImageFileError(XenlabError):
    """A new image file could not be made at ``path``: ``exists`` when something is there
    (a file, a directory or a symbolic link, dangling or not), else ``detail`` says why."""

    def __init__(self, path: str | Path, detail: str, *, exists: bool = False) -> None:
        self.path = str(path)
        self.detail = detail
        self.exists = exists
        super().__init__(f"{path}: {detail}")


def _exists_error(path: str | Path) -> ImageFileError:
    return ImageFileError(path, "exists (a file or a symbolic link); xenlab makes only new "
                          "files here, give a new name", exists=True)


def claim(path: str | Path) -> None:
    """Make ``path`` a new, empty file of this user with mode 0600, or refuse.

    ``O_CREAT|O_EXCL|O_NOFOLLOW``: whatever is at ``path`` already, a
    symbolic link even when it dangles, is refused, never followed or
    replaced.  The caller owns the file from here and removes it
    (:func:`remove_own`) if what it was claimed for fails.

    :raise ImageFileError: something is at ``path`` (``exists``), or the file
        cannot be made (its directory is missing or read-only...).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     IMAGE_MODE)
    except FileExistsError as err:
        raise _exists_error(path) from err
    except OSError as err:
        raise ImageFileError(path, f"cannot create it: {err.strerror or err}") from err
    try:
        os.fchmod(fd, IMAGE_MODE)  # exactly 0600, whatever the umask took away
    finally:
        os.close(fd)


def remove_own(path: str | Path) -> bool:
    """Remove ``path`` if it is a regular file of this user; whether it was removed.

    A symbolic link, another user's file or nothing at all is left as it is:
    what a failed or killed verb takes back is only what it could have made.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


# link(2) errors of file systems without hard links (vfat, some FUSE and network ones).
_NO_LINKS: Final = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK,
                              errno.ENOSYS})


@contextlib.contextmanager
def new_image(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write a new image into; ``path`` once it is whole.

    The temporary file is made by ``mkstemp`` (0600, ``O_EXCL|O_NOFOLLOW``,
    a random name ``.<name>.XXXXXXXX.part``).  When the block ends without an
    error it is fsynced and hard-linked to ``path`` (refused if anything is
    there, a dangling link included), the directory fsynced, the temporary
    name removed.  On a file system without hard links, ``path`` is claimed
    (:func:`claim`) and the file renamed over the claim.  On an error the
    temporary file goes and ``path`` is untouched.

    :raise ImageFileError: something is at ``path`` (``exists``), or no file
        can be made beside it.
    """
    path = Path(path)
    if os.path.lexists(path):
        raise _exists_error(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".part",
                                    dir=path.parent)
    except OSError as err:
        raise ImageFileError(path, f"cannot create it: {err.strerror or err}") from err
    tmp = Path(name)
    try:
        os.fchmod(fd, IMAGE_MODE)
        yield tmp
        try:
            os.fsync(fd)
            st, now = os.fstat(fd), os.lstat(tmp)
            if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
                raise ImageFileError(path, f"its temporary file {tmp} was replaced while it "
                                     "was written (someone else writes to this directory)")
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _publish(fd, tmp, path, dir_fd)
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as err:
            raise ImageFileError(path, f"cannot create it: {err.strerror or err}") from err
    finally:
        os.close(fd)
        remove_own(tmp)


def _publish(fd: int, tmp: Path, path: Path, dir_fd: int) -> None:
    """Give the file open as ``fd`` (named ``tmp``) the new name ``path``, exclusively."""
    # The open file itself (through /proc), not whatever the name says now; a
    # dst_dir_fd makes CPython call linkat(AT_SYMLINK_FOLLOW), not link().
    proc_fd = f"/proc/self/fd/{fd}"
    try:
        if os.path.exists(proc_fd):
            os.link(proc_fd, path.name, dst_dir_fd=dir_fd, follow_symlinks=True)
        else:
            os.link(tmp.name, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd,
                    follow_symlinks=False)
        return
    except FileExistsError as err:
        raise _exists_error(path) from err
    except OSError as err:
        if err.errno not in _NO_LINKS:
            raise ImageFileError(path, f"cannot create it: {err.strerror or err}") from err
    # No hard links here: claim the name, then put the image over the claim.
    claim(path)
    try:
        os.replace(tmp, path)
    except OSError as err:
        remove_own(path)
        raise ImageFileError(path, f"cannot create it: {err.strerror or err}") from err


def driver(fmt: DiskFormat | str) -> str:
    """The QEMU driver name for an xl format (``vhd`` -> ``vpc``) or a driver name.

    :raise XenlabError: a format qemu-img is not to be told (``empty``, unknown).
    """
    if isinstance(fmt, DiskFormat):
        found = FORMAT_DRIVERS.get(fmt)
    elif fmt in _DRIVERS:
        found = fmt
    else:
        try:
            found = FORMAT_DRIVERS.get(DiskFormat(fmt))
        except ValueError:
            found = None
    if found is None:
        name = fmt.value if isinstance(fmt, DiskFormat) else fmt
        raise UsageError(f"disk format {name!r} has no image driver here")
    return found


@dataclass(frozen=True, slots=True)
class _Done:
    """A finished qemu-img: its exit status and what it said."""

    returncode: int
    stdout: str
    stderr: str


async def _run(command: str, path: str | Path, args: Sequence[str], *,
               timeout: float = TIMEOUT, ok: Sequence[int] = (0,)) -> _Done:
    """Run ``qemu-img COMMAND ARGS`` (the one place it runs, without blocking the loop);
    the finished process, or QemuImgError with its words.  A qemu-img that runs out of
    time, or whose verb is cancelled, is killed and waited for."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", command, *args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, umask=_UMASK)
    except OSError as err:
        raise QemuImgError(command, str(path), err.strerror or str(err)) from err
    try:
        async with asyncio.timeout(timeout):
            out, err_out = await proc.communicate()
    except TimeoutError as err:
        raise QemuImgError(command, str(path), f"not done within {timeout:g}s") from err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    done = _Done(proc.returncode if proc.returncode is not None else -1,
                 out.decode(errors="replace"), err_out.decode(errors="replace"))
    if done.returncode not in ok:
        msg = done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}"
        raise QemuImgError(command, str(path), msg.removeprefix("qemu-img: "))
    return done


async def create(path: str | Path, fmt: DiskFormat | str, size: int | str | None = None, *,
           backing: str | Path | None = None, backing_fmt: DiskFormat | str | None = None
           ) -> None:
    """Make new image ``path``: blank of ``size`` (bytes or qemu-img's ``64M``), or over
    ``backing``.

    The image is made beside ``path`` and appears there whole, mode 0600
    (:func:`new_image`); nothing that is at ``path`` already is written
    through or replaced.  A backing file is always recorded with its format
    (``-F``), so nothing that opens the new image probes the one below; a
    relative ``backing`` is relative to ``path``'s directory, as QEMU reads it.

    :raise ImageFileError: something is at ``path``, or no file can be made there.
    :raise QemuImgError: qemu-img refused (nothing is left behind).
    """
    args = ["-q", "-f", driver(fmt)]
    if backing is not None:
        if backing_fmt is None:
            raise UsageError(f"{path}: a backing file needs its format")
        args += ["-b", str(backing), "-F", driver(backing_fmt)]
    with new_image(path) as tmp, _named(tmp, path):
        await _run("create", path, [*args, str(tmp), *([] if size is None else [str(size)])])


@contextlib.contextmanager
def _named(tmp: Path, path: str | Path) -> Iterator[None]:
    """qemu-img's messages about temporary file ``tmp`` name the image it becomes."""
    try:
        yield
    except QemuImgError as err:
        raise QemuImgError(err.command, err.path,
                           err.detail.replace(str(tmp), str(path))) from err


async def info(path: str | Path, fmt: DiskFormat | str) -> dict[str, Any]:
    """``qemu-img info`` of image ``path`` read as ``fmt`` (its backing file is not opened)."""
    out = (await _run("info", path, ["-U", "-f", driver(fmt), "--output=json", str(path)])).stdout
    try:
        data = json.loads(out)
    except ValueError as err:
        raise QemuImgError("info", str(path), f"unreadable answer: {err}") from err
    if not isinstance(data, dict):
        raise QemuImgError("info", str(path), "unreadable answer: not an object")
    return data


async def virtual_size(path: str | Path, fmt: DiskFormat | str) -> int:
    """The size the guest sees of image ``path``, in bytes."""
    return int((await info(path, fmt)).get("virtual-size", 0))


async def backing_of(path: str | Path, fmt: DiskFormat | str
                     ) -> tuple[str, str | None] | None:
    """Image ``path``'s backing file (absolute, real) and its recorded format, or None."""
    data = await info(path, fmt)
    b = data.get("full-backing-filename") or data.get("backing-filename")
    if not b:
        return None
    real = os.path.realpath(os.path.join(os.path.dirname(str(path)), str(b)))
    bfmt = data.get("backing-filename-format")
    return real, (str(bfmt) if bfmt else None)


async def backing_chain(path: str | Path, fmt: DiskFormat | str, *, limit: int = 256
                        ) -> list[str]:
    """``path`` and every image below it, as real paths; [] when ``path`` is missing.

    Walked one image at a time, each read as the format its parent recorded
    (an image without a recorded backing format ends the walk: it would be
    probed, and is not read here).
    """
    if not Path(path).exists():
        return []
    out = [os.path.realpath(str(path))]
    cur: tuple[str, str | None] | None = await backing_of(path, fmt)
    while cur is not None:
        file, bfmt = cur
        if file in out:
            raise QemuImgError("info", str(path), f"backing chain loops at {file}")
        if len(out) >= limit:
            raise QemuImgError("info", str(path), f"backing chain longer than {limit}")
        out.append(file)
        if bfmt is None or not Path(file).exists():
            break
        cur = await backing_of(file, bfmt)
    return out


async def snapshot_tags(path: str | Path) -> set[str]:
    """The internal snapshot names in qcow2 image ``path``."""
    return {str(s.get("name")) for s in (await info(path, "qcow2")).get("snapshots", ())
            if isinstance(s, dict)}


async def snapshot(op: str, tag: str, path: str | Path) -> None:
    """``qemu-img snapshot`` on qcow2 image ``path``: ``op`` is create, apply or delete.

    ``qemu-img snapshot`` has no ``-f``: the format is given as image
    options (``driver=qcow2``), so it is never probed here either.
    """
    flag = {"create": "-c", "apply": "-a", "delete": "-d"}[op]
    opts = f"driver=qcow2,file.driver=file,file.filename={str(path).replace(',', ',,')}"
    await _run("snapshot", path, ["--image-opts", flag, tag, opts])


async def commit(path: str | Path, fmt: DiskFormat | str, *, timeout: float = TIMEOUT
                 ) -> None:
    """Merge image ``path`` into its backing file (``qemu-img commit``)."""
    await _run("commit", path, ["-q", "-f", driver(fmt), str(path)], timeout=timeout)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What ``qemu-img check`` said: ``ok`` when the image is consistent (now)."""

    path: str
    checked: bool  # False for formats without metadata to check (raw, vpc)
    ok: bool
    repaired: bool
    message: str
    corrupt: bool = False  # errors, not only leaked clusters (no harm to data)


async def check(path: str | Path, fmt: DiskFormat | str, *, repair: bool = False,
                timeout: float = 300.0) -> CheckResult:
    """``qemu-img check`` image ``path`` of format ``fmt``; with ``repair``, fix leaked clusters.

    Formats without metadata (raw) are not checked, never "repaired".  A check
    without repair may run while QEMU uses the image (it only reads); a
    repair needs the image unused.
    """
    drv = driver(fmt)
    if drv not in _REPAIRABLE:
        return CheckResult(str(path), False, True, False, f"{drv}: nothing to check")
    # A plain check only reads (-U: QEMU may hold the image); a repair writes,
    # so it must get the image's lock.
    args = ["-f", drv, *(["-r", "leaks"] if repair else ["-U"])]
    # 0 consistent, 2 corrupted, 3 leaks (left or repaired), 63 cannot check
    proc = await _run("check", path, [*args, str(path)], timeout=timeout, ok=(0, 2, 3, 63))
    text = (proc.stdout + proc.stderr).strip()
    if proc.returncode == 63:
        return CheckResult(str(path), False, True, False, text)
    repaired = repair and "repaired" in text.lower()
    ok = proc.returncode == 0 or (proc.returncode == 3 and repaired)
    return CheckResult(str(path), True, ok, repaired, text, corrupt=proc.returncode == 2)


# qemu-img convert -p rewrites one line: "    (12.34/100%)\r"
_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


async def convert(source: str | Path, source_fmt: DiskFormat | str, out: str | Path,
                  out_fmt: DiskFormat | str, *, timeout: float,
                  progress: Callable[[float], None] | None = None) -> None:
    """``qemu-img convert -p`` ``source`` to new image ``out``, calling ``progress(percent)``
    as it goes.

    ``out`` appears whole, mode 0600, or not at all (:func:`new_image`):
    the copy is made in a temporary file beside it, fsynced, then linked to
    ``out``.

    :raise ImageFileError: something is at ``out``, or no file can be made there.
    :raise QemuImgError: qemu-img failed or ran out of time (nothing is left behind).
    """
    with new_image(out) as tmp, _named(tmp, out):
        await _convert(source, source_fmt, tmp, out_fmt, timeout=timeout, progress=progress)


async def _convert(source: str | Path, source_fmt: DiskFormat | str, out: Path,
                   out_fmt: DiskFormat | str, *, timeout: float,
                   progress: Callable[[float], None] | None) -> None:
    argv = ["qemu-img", "convert", "-p", "-f", driver(source_fmt), "-O", driver(out_fmt),
            str(source), str(out)]
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        # A copy outlives a killed xenlab otherwise, holding the source's
        # image lock (a later start of the domain fails on it) for minutes.
        argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            umask=_UMASK)
    except OSError as err:
        raise QemuImgError("convert", str(source), err.strerror or str(err)) from err
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(timeout):
            buf = b""
            while chunk := await proc.stdout.read(4096):
                buf = (buf + chunk)[-256:]
                found = _PERCENT.findall(buf)
                if found and progress is not None:
                    progress(float(found[-1]))
            err_text = (await proc.stderr.read()).decode(errors="replace").strip()
            rc = await proc.wait()
    except TimeoutError as err:
        raise QemuImgError("convert", str(source), f"not done within {timeout:g}s") from err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if rc != 0:
        raise QemuImgError("convert", str(source),
                           err_text.removeprefix("qemu-img: ") or f"exit {rc}")
