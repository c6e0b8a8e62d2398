"""Option ROMs and VGA BIOSes: inspect, check, fix, and dump them from a PCI device.

Built on ``xenlab.formats.optionrom`` (the pure walk of a ROM's images); this
room adds the edges: files a user names, read without blocking and with a
bound, written atomically (:mod:`xenlab.rom.files`, :func:`inspect_file`), devices
through sysfs (:func:`read_device_rom`, :func:`dump_rom`), repairs that are
re-checked before they are written (:func:`fix_rom`), and the check a boot
runs first (:func:`check_vga_bios`).  The CLI in ``xenlab.cli.rom`` is a thin
shell over it.
"""

from xenlab.rom.check import BootCheck, check_vga_bios
from xenlab.rom.files import RomFileError, read_rom_file, write_rom_file
from xenlab.rom.fix import Change, FixResult, fix_rom, parse_image_kinds
from xenlab.rom.inspect import image_to_json, inspect_bytes, inspect_file, rom_to_json
from xenlab.rom.sysfs import (
    DeviceRom,
    PciDevice,
    dump_rom,
    inspect_device,
    parse_bdf,
    read_device_rom,
)

__all__ = [
    "BootCheck",
    "Change",
    "DeviceRom",
    "FixResult",
    "PciDevice",
    "RomFileError",
    "check_vga_bios",
    "dump_rom",
    "fix_rom",
    "image_to_json",
    "inspect_bytes",
    "inspect_device",
    "inspect_file",
    "parse_bdf",
    "parse_image_kinds",
    "read_device_rom",
    "read_rom_file",
    "rom_to_json",
    "write_rom_file",
]
