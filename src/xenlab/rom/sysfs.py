"""A PCI device's ROM through sysfs: :func:`read_device_rom`, :func:`dump_rom`, and more.

Linux shows a device's expansion ROM as ``/sys/bus/pci/devices/<BDF>/rom``:
write ``1`` (the kernel enables the ROM BAR decode), read, write ``0`` and a
newline (the kernel disables only on exactly those two bytes), the last in a
``finally`` so an error still leaves the ROM disabled.  Every function takes
the sysfs root, so tests give a directory shaped like the kernel's, and every
file under it is read as a user-named file (:mod:`xenlab.rom.files`: without
blocking, bounded at 16 MiB, never mapped).  Some devices do not give the
card's ROM this way (the boot VGA's shadow copy, no ``rom`` file, EIO,
EACCES).  The design (those cases and what to do about each) is in
docs/rooms.md, section ROMs through sysfs.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import re
import stat
import termios
import time
from dataclasses import dataclass
from pathlib import Path

from xenlab.errors import FormatError, XenlabError
from xenlab.formats.optionrom import OptionRom, RomProblem, parse_rom
from xenlab.formats.optionrom import ProblemKind as _Kind
from xenlab.rom.files import (
    BAR_LIMIT,
    PIPE_WAIT,
    read_rom_file,
    read_small_file,
    write_rom_file,
)

SYSFS = Path("/sys")
_BDF = re.compile(
    r"(?:(?P<domain>[0-9a-fA-F]{1,4}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<dev>[0-9a-fA-F]{1,2})"
    r"\.(?P<fn>[0-7])\Z"
)
# The kernel (pci_write_rom) disables only on exactly "0\n" at offset 0, two
# bytes, as `echo 0 > rom` writes; a bare "0" would *enable* the ROM.
_ENABLE = b"1\n"
_DISABLE = b"0\n"
_EIO_HELP = (
    "the kernel could not read the ROM BAR (EIO): the device's memory decoding may be off "
    "(bind a driver or write 1 to its 'enable' file first), it may be in D3, or it has no "
    "ROM behind the BAR"
)


def parse_bdf(text: str) -> str:
    """``01:00.0`` or ``0000:01:00.0`` -> the sysfs name ``0000:01:00.0``.

    :raise ValueError: not a PCI address (nothing else reaches a path).
    """
    m = _BDF.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a PCI address, expected [DDDD:]BB:DD.F")
    domain = int(m["domain"] or "0", 16)
    bus, dev, fn = int(m["bus"], 16), int(m["dev"], 16), int(m["fn"])
    if dev > 0x1F:
        raise ValueError(f"{text!r}: device {dev:#x} is above 0x1f")
    return f"{domain:04x}:{bus:02x}:{dev:02x}.{fn}"


@dataclass(frozen=True, slots=True)
class PciDevice:
    """The ids sysfs shows for a device."""

    address: str
    vendor_id: int
    device_id: int
    class_code: int
    boot_vga: bool


@dataclass(frozen=True, slots=True)
class DeviceRom:
    """A device's ROM as read, walked, and compared with the device."""

    device: PciDevice
    data: bytes
    rom: OptionRom
    problems: tuple[RomProblem, ...]  # the device/ROM mismatches (the ROM's own are in rom)


def _device_dir(address: str, sysfs: Path) -> Path:
    path = sysfs / "bus" / "pci" / "devices" / parse_bdf(address)
    if not path.is_dir():
        raise XenlabError(f"{path}: no such PCI device")
    return path


def _hex_file(path: Path) -> int:
    try:
        return int(read_small_file(path).decode("ascii").strip(), 16)
    except (XenlabError, UnicodeDecodeError, ValueError) as err:
        raise XenlabError(f"{path}: cannot read a hex number: {err}") from err


def device_info(address: str, *, sysfs: Path = SYSFS) -> PciDevice:
    """The vendor, device and class of ``address`` from sysfs."""
    d = _device_dir(address, sysfs)
    boot = d / "boot_vga"
    try:
        boot_vga = read_small_file(boot).strip() == b"1"
    except XenlabError:
        boot_vga = False
    return PciDevice(address=d.name, vendor_id=_hex_file(d / "vendor"),
                     device_id=_hex_file(d / "device"), class_code=_hex_file(d / "class"),
                     boot_vga=boot_vga)


def _write_flag(path: Path, value: bytes, *, wait: float = PIPE_WAIT) -> None:
    """Write ``value`` to ``path`` in one write; a FIFO gets ``wait`` seconds to have a reader.

    :raise OSError: the open or the write failed (ENXIO: nobody read the FIFO).
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            break
        except OSError as err:
            # ENXIO: a FIFO without a reader (the kernel's attribute never says it).
            if err.errno != errno.ENXIO or time.monotonic() >= deadline:
                if err.errno == errno.ENXIO:
                    raise OSError(errno.ENXIO, f"nobody reads it (waited {wait:g} s)") from err
                raise
            time.sleep(0.01)
    try:
        os.write(fd, value)
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            # Taken when the reader has read it, as the kernel's attribute has
            # by the time write() returns; a read of the same FIFO must not
            # get it back.
            pending = array.array("i", [1])
            while time.monotonic() < deadline + wait:
                fcntl.ioctl(fd, termios.FIONREAD, pending)
                if not pending[0]:
                    break
                time.sleep(0.005)
    finally:
        os.close(fd)


def _flag_error(rom: Path, what: str, err: OSError) -> XenlabError:
    root = " (root is needed)" if err.errno in (errno.EACCES, errno.EPERM) else ""
    return XenlabError(f"{rom}: {what}: {err.strerror or err}{root}")


def read_device_rom(address: str, *, sysfs: Path = SYSFS) -> bytes:
    """The bytes of ``address``'s ROM: enable, read, disable (always, also on error).

    :raise XenlabError: no such device, no ``rom`` file, permission denied,
        a read error (with the known causes), or an empty ROM.
    """
    d = _device_dir(address, sysfs)
    rom = d / "rom"
    if not rom.exists():
        raise XenlabError(f"{rom}: no ROM file: the device has no ROM BAR (an integrated GPU's "
                          "VBIOS is in the system firmware; read the 0xC0000 shadow or take it "
                          "from the vendor's firmware)")
    try:
        _write_flag(rom, _ENABLE)
    except OSError as err:
        raise _flag_error(rom, "cannot enable the ROM", err) from err
    data = b""
    read_failed = True
    try:
        data = read_rom_file(rom, limit=BAR_LIMIT, what="ROM")
        read_failed = False
    except XenlabError as err:
        cause = err.__cause__
        if isinstance(cause, OSError) and cause.errno == errno.EIO:
            raise XenlabError(f"{rom}: cannot read: {_EIO_HELP}") from err
        raise
    finally:
        try:
            _write_flag(rom, _DISABLE)
        except OSError as err:
            # After a failed read, that error is the one to show.
            if not read_failed:
                raise _flag_error(rom, "read, but cannot disable the ROM again",
                                  err) from err
    if not data:
        raise XenlabError(f"{rom}: the ROM read back empty: {_EIO_HELP}")
    return data


def _compare(dev: PciDevice, rom: OptionRom) -> tuple[RomProblem, ...]:
    ids = {(img.vendor_id, img.device_id) for img in rom.images if img.pcir is not None}
    listed = {(img.vendor_id, d) for img in rom.images if img.pcir is not None
              for d in img.pcir.device_list}
    if ids and (dev.vendor_id, dev.device_id) not in ids | listed:
        have = ", ".join(f"{v:04x}:{d:04x}" for v, d in sorted(i for i in ids if None not in i))
        return (RomProblem(rom.header_offset, _Kind.STRUCTURE,
                           f"no image has the device's ids {dev.vendor_id:04x}:"
                           f"{dev.device_id:04x} (the ROM has {have})"),)
    return ()


def inspect_device(address: str, *, sysfs: Path = SYSFS) -> DeviceRom:
    """Read ``address``'s ROM and walk it; compare its ids with the device's.

    :raise FormatError: what was read holds no option ROM (a note says if the
        device is the boot VGA, whose ROM file is the shadow copy).
    """
    dev = device_info(address, sysfs=sysfs)
    data = read_device_rom(address, sysfs=sysfs)
    source = str(sysfs / "bus" / "pci" / "devices" / dev.address / "rom")
    rom = parse_rom(data, source=source)
    return DeviceRom(device=dev, data=data, rom=rom, problems=_compare(dev, rom))


def dump_rom(address: str, out: Path, *, sysfs: Path = SYSFS, force: bool = False,
             out_name: str | None = None) -> DeviceRom:
    """Read ``address``'s ROM and write it to ``out`` atomically; return what was read.

    Bytes with no option ROM in them (all 0xFF from an unwired BAR, say) are
    not written unless ``force``.  ``out`` is written as
    :func:`xenlab.rom.files.write_rom_file` writes (through a symlink, never
    over a device); ``out_name`` is how messages show it.

    :raise XenlabError: see :func:`read_device_rom`; FormatError when the
        bytes hold no ROM and ``force`` is not set; RomFileError when ``out``
        is refused or cannot be written.
    """
    dev = device_info(address, sysfs=sysfs)
    data = read_device_rom(address, sysfs=sysfs)
    source = str(sysfs / "bus" / "pci" / "devices" / dev.address / "rom")
    shown = str(out) if out_name is None else out_name
    try:
        rom = parse_rom(data, source=source)
    except FormatError as err:
        if not force:
            raise FormatError(err.source, err.offset, err.field,
                              f"{err.detail} (nothing written; --force writes the bytes "
                              "anyway)") from err
        write_rom_file(Path(out), data, name=shown)
        raise FormatError(err.source, err.offset, err.field,
                          f"{err.detail} ({len(data)} bytes written to {shown} anyway)") from err
    write_rom_file(Path(out), data, name=shown)
    return DeviceRom(device=dev, data=data, rom=rom, problems=_compare(dev, rom))
