"""Which host files a disk image makes QEMU open: :func:`check_disk_image`, before QEMU opens it.

A qcow2, qcow or QED image names a backing file, and a qcow2 image may name
an external data file; QEMU opens them with the image, so an image made with
``qemu-img create -f qcow2 -b /etc/shadow -F raw`` hands the host's file to
the guest.  :func:`check_disk_image` walks the chain as QEMU 7.2 does and
refuses, with :class:`UnsafeImageError`, any file QEMU would open outside the
directories allowed for that disk (:func:`allowed_backing_dirs`: the disk's
own directory and those below it, plus ``XENLAB_BACKING_DIRS``).

The walk, as QEMU's (``block.c``, ``block/qcow2.c``...)
    * The disk is read as the format the config gives; a raw (or vpc) image
      is never parsed: its bytes are the guest's, and neither format names
      another file.  An empty drive opens nothing.
    * A backing file name is used as written when it is absolute, else
      joined to the directory of the image that names it, as that image was
      named (``path_combine``: a symlinked directory is followed by the OS,
      and ``..`` after it leads where the link points).  Its real path must
      lie inside an allowed directory.
    * Its format is the one the image records; with none recorded (qcow
      always, old qcow2, QED without its raw bit) QEMU probes the file, and
      so does this walk (:func:`xenlab.formats.qcow2.probe`).  Only raw,
      qcow2, qcow and qed are taken: a probed vmdk could name further
      extents, a ``vvfat`` or ``nbd`` backing would open anything.
    * A name with a protocol prefix (``nbd:``, ``http:``, ``json:{...}``,
      ``file:``; QEMU's ``path_has_protocol``: a colon before any slash) is
      refused: QEMU would open it as given.
    * A qcow2 external data file (incompatible bit 2) is opened by its name,
      relative to QEMU's working directory, not the image's: a relative or
      protocol name is refused, an absolute one must lie inside an allowed
      directory.  It is never parsed (QEMU opens it as a protocol node).
    * A chain that comes back to an image, or is more than
      :data:`MAX_CHAIN` images long, is refused.

Reads are bounded: 64 KiB of each image, more only where its header says
QEMU reads further (a qcow2 cluster of up to 2 MiB, a qcow/QED backing name
within :data:`READ_LIMIT`), and :data:`~xenlab.formats.qcow2.PROBE_SIZE`
bytes to probe.  Files are opened read-only and non-blocking, and only
regular files and block devices are read.  What this cannot see: a file that
changes between the check and QEMU's open; checking at every start (create,
restore, receive, block-attach) keeps that window short.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from xenlab.config.specs.disk import DiskFormat
from xenlab.errors import TruncatedError, UsageError, XenlabError
from xenlab.formats import qcow2
from xenlab.vm.qemuimg import driver

__all__ = [
    "BACKING_DIRS_ENV",
    "MAX_CHAIN",
    "READ_LIMIT",
    "ChainImage",
    "ImageChain",
    "UnsafeImageError",
    "allowed_backing_dirs",
    "check_disk_image",
]

#: The environment variable with more directories (colon-separated) backing files may be in.
BACKING_DIRS_ENV: Final = "XENLAB_BACKING_DIRS"
#: The longest chain taken, disk included.
MAX_CHAIN: Final = 64
#: The most read of one image: qcow2 keeps its header in the first cluster
#: (at most 2 MiB); a qcow or QED backing name further in is refused.
READ_LIMIT: Final = 4 << 20
_FIRST_READ: Final = 64 << 10
# Formats whose images name other files, with their readers.
_READERS: Final[Mapping[str, Callable[..., qcow2.ImageHeader]]] = {
    "qcow2": qcow2.parse_qcow2, "qcow": qcow2.parse_qcow, "qed": qcow2.parse_qed}
# Formats a backing file may have: the readers' and raw.
_BACKING_FORMATS: Final = frozenset({"raw", *_READERS})


class UnsafeImageError(XenlabError):
    """Disk ``disk`` would make QEMU open ``file`` (a backing or data file, or the disk): refused.

    ``reason`` says why and what to do.
    """

    def __init__(self, disk: str, file: str, reason: str) -> None:
        self.disk = disk
        self.file = file
        self.reason = reason
        super().__init__(f"disk {disk}: {reason}")


@dataclass(frozen=True, slots=True)
class ChainImage:
    """One image of a chain: its path as QEMU names it, its real path and driver.

    ``probed`` when no format was recorded and QEMU's probe decided;
    ``backing_file`` and ``data_file`` are the names the image holds.
    """

    path: str
    realpath: str
    format: str
    probed: bool = False
    backing_file: str | None = None
    data_file: str | None = None


@dataclass(frozen=True, slots=True)
class ImageChain:
    """What QEMU opens for a disk: the disk's image first, then each backing file."""

    disk: str
    images: tuple[ChainImage, ...]

    @property
    def files(self) -> tuple[str, ...]:
        """Real paths of every file QEMU opens for the disk, data files included."""
        out: list[str] = []
        for image in self.images:
            out.append(image.realpath)
            if image.data_file is not None:
                out.append(os.path.realpath(image.data_file))
        return tuple(out)


def allowed_backing_dirs(disk_path: str | os.PathLike[str], extra: Sequence[str | Path] = (),
                         *, environ: Mapping[str, str] | None = None) -> tuple[Path, ...]:
    """Where files named by ``disk_path`` may be: its directory, ``extra``, XENLAB_BACKING_DIRS.

    Each directory allows everything below it.  ``environ`` defaults to
    ``os.environ``.

    :raise XenlabError: an entry of the variable is not an absolute path.
    """
    dirs = [Path(os.path.dirname(os.path.abspath(os.fspath(disk_path)))), *map(Path, extra)]
    text = (os.environ if environ is None else environ).get(BACKING_DIRS_ENV, "")
    for item in text.split(":"):
        if item and not os.path.isabs(item):
            raise UsageError(f"{BACKING_DIRS_ENV}: {item!r} is not an absolute directory")
        if item:
            dirs.append(Path(item))
    return tuple(dirs)


def _has_protocol(name: str) -> bool:
    """QEMU's path_has_protocol: a colon comes before any slash (``nbd:``, ``json:{``)."""
    for ch in name:
        if ch in ":/":
            return ch == ":"
    return False


class _Walk:
    """One check: the disk, the allowed directories (real paths), the chain so far."""

    def __init__(self, disk: str, allowed: Sequence[str | os.PathLike[str]]) -> None:
        self.disk = disk
        self.allowed = tuple(Path(os.path.realpath(os.fspath(d))) for d in allowed)
        self.images: list[ChainImage] = []
        self.seen: set[str] = set()

    def refuse(self, file: str, reason: str) -> UnsafeImageError:
        """The error for ``file``; ``{names}`` in ``reason`` says which image names it."""
        via = self.images[-1].path if self.images else self.disk
        who = "names" if via == self.disk else f"its backing file {via} names"
        return UnsafeImageError(self.disk, file, reason.replace("{names}", who))

    def inside(self, name: str, what: str) -> str:
        """The real path of ``name``, refused unless it lies inside an allowed directory."""
        real = os.path.realpath(name)
        if any(Path(real).is_relative_to(d) for d in self.allowed):
            return real
        where = ", ".join(str(d) for d in self.allowed)
        shown = name if real == name else f"{name} (really {real})"
        hint = f"{BACKING_DIRS_ENV}={os.path.dirname(real) or '/'}"
        raise self.refuse(name, f"{{names}} {what} {shown}, outside {where} "
                          f"(allow it with {hint})")

    def read(self, path: str, size: int) -> tuple[bytes, int]:
        """Up to ``size`` bytes from the start of ``path``, and the file's length."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as err:
            raise self.refuse(path, f"{path} cannot be read: {err.strerror or err}") from err
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise self.refuse(path, f"{path} is not a regular file or a block device")
            length = os.lseek(fd, 0, os.SEEK_END)
            return os.pread(fd, min(size, length), 0), length
        except OSError as err:
            raise self.refuse(path, f"{path} cannot be read: {err.strerror or err}") from err
        finally:
            os.close(fd)

    def header(self, path: str, fmt: str) -> qcow2.ImageHeader:
        """The header of ``path`` read as ``fmt``, reading further only where QEMU does."""
        data, length = self.read(path, _FIRST_READ)
        try:
            return _READERS[fmt](data, source=path)
        except TruncatedError as err:
            if len(data) >= length:
                raise  # the file itself ends there
            if err.offset + err.need > READ_LIMIT:
                raise self.refuse(path, f"{path}: its {err.field} lies at {err.offset:#x}, "
                                  f"beyond the first {READ_LIMIT >> 20} MiB read here: not "
                                  "checked, so not opened") from err
        data, _ = self.read(path, READ_LIMIT)
        return _READERS[fmt](data, source=path)

    def add(self, path: str, fmt: str, *, probed: bool) -> qcow2.ImageHeader | None:
        """Record image ``path``; its header when it is of a format that names files."""
        real = os.path.realpath(path)
        if real in self.seen:
            raise self.refuse(path, f"{{names}} {path} again: the backing chain loops")
        if len(self.images) >= MAX_CHAIN:
            raise self.refuse(path, f"the backing chain is longer than {MAX_CHAIN} images")
        self.seen.add(real)
        head = self.header(path, fmt) if fmt in _READERS else None
        self.images.append(ChainImage(
            path=path, realpath=real, format=fmt, probed=probed,
            backing_file=head.backing_file if head else None,
            data_file=head.data_file if head else None))
        return head

    def data_file(self, name: str) -> None:
        if _has_protocol(name):
            raise self.refuse(name, f"{{names}} data file {name!r}, a protocol name QEMU would "
                              "open as it is: not allowed")
        if not os.path.isabs(name):
            raise self.refuse(name, f"{{names}} data file {name!r} by a relative name, which "
                              "QEMU opens from its own working directory, not the image's: "
                              "record an absolute one (qemu-img amend -o data_file=PATH)")
        self.inside(name, "data file")

    def backing(self, image: str, name: str, recorded: str | None) -> tuple[str, str, bool]:
        """(path, format, probed) of the backing file ``image`` names, or refused."""
        if _has_protocol(name):
            raise self.refuse(name, f"{{names}} backing file {name!r}, a protocol or JSON name "
                              "QEMU would open as it is: not allowed")
        path = name if os.path.isabs(name) else os.path.join(os.path.dirname(image), name)
        self.inside(path, "backing file")
        if not os.path.lexists(path):
            raise self.refuse(path, f"{{names}} backing file {path}, which does not exist")
        if recorded is not None:
            fmt, probed = recorded, False
        else:
            head, length = self.read(path, qcow2.PROBE_SIZE)
            fmt, probed = qcow2.probe(head, path, length=length), True
        if fmt not in _BACKING_FORMATS:
            how = "probed: no format is recorded" if probed else "recorded"
            raise self.refuse(path, f"{{names}} backing file {path} of format {fmt!r} ({how}); "
                              "only raw, qcow2, qcow and qed backing files are opened")
        return path, fmt, probed


def check_disk_image(path: str | os.PathLike[str], fmt: DiskFormat | str,
                     allowed_dirs: Sequence[str | os.PathLike[str]]) -> ImageChain:
    """Every file QEMU would open for disk ``path`` of format ``fmt``, all inside ``allowed_dirs``.

    ``fmt`` is the config's (``DiskFormat`` or a QEMU driver name);
    ``allowed_dirs`` usually comes from :func:`allowed_backing_dirs`.  A
    relative ``path`` is taken from the current directory, as QEMU takes it
    from its own.

    :raise UnsafeImageError: a backing or data file outside the allowed
        directories, a protocol name, a relative data file, an unexpected
        probed format, a loop, a chain too long, or an image that cannot be
        read (the message names the disk, the file and what to do).
    :raise FormatError: an image in the chain is not what its format says
        (the place is the image's path and offset).
    """
    disk = os.fspath(path)
    if fmt is DiskFormat.EMPTY or fmt == DiskFormat.EMPTY.value:
        return ImageChain(disk, ())
    walk = _Walk(disk, allowed_dirs)
    current, current_fmt, probed = disk, driver(fmt), False
    while True:
        head = walk.add(current, current_fmt, probed=probed)
        if head is None:
            break
        if head.data_file is not None:
            walk.data_file(head.data_file)
        if head.backing_file is None:
            break
        current, current_fmt, probed = walk.backing(current, head.backing_file,
                                                    head.backing_format)
    return ImageChain(disk, tuple(walk.images))
