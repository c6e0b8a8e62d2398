"""ROM files a user names, read and written safely: :func:`read_rom_file`, :func:`write_rom_file`.

The safety is xenlab's general one: reading is :func:`xenlab.files.read_bounded`
(opened without blocking, judged by ``fstat``, read into memory and never
mapped, sizes over the limit refused before reading, a silent FIFO or device
given up on after :data:`PIPE_WAIT` seconds), writing is
:func:`xenlab.atomic.atomic_write_bytes` (atomic, through a symlink to its
target, refused when dangling, planted in a sticky directory, or not a
regular file).  This module adds only what is the ROM room's own: the limits
and the names messages use.

Defaults (with reasons):

- :data:`ROM_LIMIT` is 64 MiB.  A PCI ROM BAR decodes at most 16 MiB (real
  VGA BIOSes are 32 KiB to 1 MiB), but a ROM is also looked for inside whole
  SPI flash dumps, whose chips reach 512 Mbit.
- :data:`BAR_LIMIT` is 16 MiB, what a PCI ROM BAR decodes at most (PCI 3.0,
  6.2.5.2): the bound for a device's ROM read through sysfs.
- Writing over the input is safe: the input was read whole first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from xenlab.atomic import atomic_write_bytes, check_output_dir
from xenlab.files import PIPE_WAIT, FileError, read_bounded

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

#: The error of a ROM file that cannot be read or written: the general one
#: (reads raise its FileReadError, writes its FileWriteError), under the name
#: this room has always exported.
RomFileError = FileError


def read_rom_file(
    path: Path,
    *,
    name: str | None = None,
    limit: int = ROM_LIMIT,
    wait: float = PIPE_WAIT,
    what: str = "ROM file",
    regular_only: bool = False,
) -> bytes:
    """The bytes of ``path``, at most ``limit`` of them (:func:`xenlab.files.read_bounded`).

    ``name`` is how messages show the path (the CLI passes it escaped).  With
    ``regular_only`` anything but a regular file is refused.

    :raise InputTooLargeError: more than ``limit`` bytes.
    :raise FileReadError: the path cannot be opened or read, is a directory,
        or a stream gave no data for ``wait`` seconds.
    """
    return read_bounded(path, limit, what=what, wait=wait, name=name, regular_only=regular_only)


def read_small_file(path: Path, *, limit: int = 4096, wait: float = PIPE_WAIT) -> bytes:
    """A small attribute file (sysfs's ``vendor``, ``class``...), read as :func:`read_rom_file`."""
    return read_bounded(path, limit, what="attribute file", wait=wait)


def write_rom_file(path: Path, data: bytes, *, name: str | None = None) -> Path:
    """Replace ``path`` with ``data`` (:func:`xenlab.atomic.atomic_write_bytes`); the path written.

    :raise FileWriteError: the output is refused, or the write failed (the old
        file, if any, is then untouched and no temporary file is left).
    """
    return atomic_write_bytes(path, data, name=name)
