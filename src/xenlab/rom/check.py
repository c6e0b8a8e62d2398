"""Will a BIOS run this ROM as the primary VGA BIOS?  :func:`check_vga_bios`, before a boot.

The rules are SeaBIOS's (``src/optionroms.c``), which is what runs a guest's
VGA BIOS under QEMU: the ROM of the VGA device is read from its ROM BAR at
offset 0; images are tried in chain order (stepping by the PCIR image
length, stopping at the PCIR last-image bit, so an NVIDIA NPDE continuation
is never seen); the first with "PCIR", the device's vendor:device and code
type 0 is the one; it must start with ``55 AA``, have a non-zero size, and
(with CONFIG_OPTIONROMS_CHECKS, SeaBIOS's default) sum to 0 over that size;
it is copied below 0xF0000, so it must fit the 192 KiB from 0xC0000.
"""

from __future__ import annotations

from dataclasses import dataclass

from xenlab.formats.optionrom import (
    LEGACY_ROM_AREA,
    PCIR_SIGNATURE,
    CodeType,
    OptionRom,
    RomImage,
)

_DISPLAY_CLASS = 0x03


@dataclass(frozen=True, slots=True)
class BootCheck:
    """The verdict: ``ok`` when SeaBIOS would run ``image`` as the VGA BIOS.

    ``problems`` say why not; ``warnings`` are worth knowing but do not stop it.
    """

    ok: bool
    image: RomImage | None
    problems: tuple[str, ...]
    warnings: tuple[str, ...]


def check_vga_bios(
    rom: OptionRom, *, vendor_id: int | None = None, device_id: int | None = None
) -> BootCheck:
    """Check ``rom`` as the VGA BIOS of a device ``vendor_id:device_id``.

    Without ids the match is not checked (a warning says what SeaBIOS will
    compare); QEMU's ``-device VGA`` is 1234:1111.
    """
    problems: list[str] = []
    warnings: list[str] = []
    if rom.header_offset:
        problems.append(f"{rom.header_offset:#x} bytes of vendor header before the first image: "
                        "the BIOS reads offset 0 and finds no 55 aa (strip it with "
                        "`xenlab rom fix --strip-header`)")
    chosen: RomImage | None = None
    for img in rom.images:
        if img.via_npde:
            break  # SeaBIOS stops at the PCIR last-image bit
        p = img.pcir
        if p is None or p.signature != PCIR_SIGNATURE.decode():
            if img.index == 0 and p is None:
                problems.append("image 0 has no PCI data structure: SeaBIOS runs a PCI "
                                "device's ROM only through its PCIR (an ISA VGA BIOS such as "
                                "vgabios-isavga.bin is for -device isa-vga)")
            break
        ids_match = vendor_id is None or (p.vendor_id, p.device_id) == (vendor_id, device_id)
        if p.code_type == CodeType.X86 and ids_match:
            chosen = img
            break
        if p.last:
            break
    if chosen is None:
        if vendor_id is not None and not problems:
            problems.append(f"no x86 image with ids {vendor_id:04x}:{device_id or 0:04x} before "
                            "the last-image bit: SeaBIOS would not run any image (rewrite "
                            "them with `xenlab rom fix --set-ids`)")
        elif not problems:
            problems.append("no x86 image before the last-image bit")
        return BootCheck(False, None, tuple(problems), tuple(warnings))
    if vendor_id is None and chosen.pcir is not None:
        warnings.append(f"SeaBIOS runs it only on a device with ids "
                        f"{chosen.pcir.vendor_id:04x}:{chosen.pcir.device_id:04x}")
    if not chosen.header_length:
        problems.append(f"image {chosen.index}: size byte is 0: SeaBIOS skips it")
    elif not chosen.checksum_ok:
        problems.append(f"image {chosen.index}: checksum sums to {chosen.checksum:#04x}, not 0: "
                        "SeaBIOS (CONFIG_OPTIONROMS_CHECKS) refuses to run it (repair with "
                        "`xenlab rom fix`)")
    if chosen.header_length > LEGACY_ROM_AREA:
        problems.append(f"image {chosen.index}: {chosen.header_length // 1024} KiB does not fit "
                        "the 192 KiB legacy option ROM area (0xC0000-0xEFFFF)")
    if chosen.class_code is not None and chosen.class_code >> 16 != _DISPLAY_CLASS:
        warnings.append(f"image {chosen.index}: class code {chosen.class_code:#08x} is not a "
                        "display controller (SeaBIOS runs the VGA device's ROM whatever its "
                        "class says)")
    return BootCheck(not problems, chosen, tuple(problems), tuple(warnings))
