"""rom.check: the verdict a boot asks for before it starts a guest with a VGA BIOS."""

from __future__ import annotations

from pathlib import Path

from tests.rom import builders as b
from xenlab.formats.optionrom import parse_rom
from xenlab.rom.check import check_vga_bios


def test_seavgabios_is_bootable(shared_data: Path) -> None:
    rom = parse_rom((shared_data / "rom" / "qemu-pc-bios__vgabios-stdvga.bin").read_bytes())
    v = check_vga_bios(rom, vendor_id=0x1234, device_id=0x1111)
    assert v.ok and v.image is rom.images[0] and not v.warnings


def test_broken_checksum_refused() -> None:
    v = check_vga_bios(parse_rom(b.x86_image(checksum=False)), vendor_id=0x1234,
                       device_id=0x1111)
    assert not v.ok and "CONFIG_OPTIONROMS_CHECKS" in v.problems[0]


def test_ids_must_match() -> None:
    rom = parse_rom(b.x86_image())
    v = check_vga_bios(rom, vendor_id=0x10DE, device_id=0x1B80)
    assert not v.ok and "--set-ids" in v.problems[0]
    unchecked = check_vga_bios(rom)
    assert unchecked.ok and "1234:1111" in unchecked.warnings[0]


def test_vendor_header_refused() -> None:
    v = check_vga_bios(parse_rom(b.rom(b.x86_image(), header=bytes(0x200))))
    assert not v.ok and "--strip-header" in v.problems[0]


def test_isa_rom_is_not_a_pci_vga_bios() -> None:
    v = check_vga_bios(parse_rom(b.isa_image()))
    assert not v.ok and "isa-vga" in v.problems[0]


def test_second_image_matches() -> None:
    rom = parse_rom(b.rom(b.x86_image(vendor=0x1002, last=False),
                          b.x86_image(vendor=0x1234, seed=4)))
    v = check_vga_bios(rom, vendor_id=0x1234, device_id=0x1111)
    assert v.ok and v.image is rom.images[1]


def test_npde_images_are_not_seen() -> None:
    # An x86 image reached only through NVIDIA's NPDE is past SeaBIOS's last bit.
    x86a = b.x86_image(vendor=0x10DE, device=0x1B80, last=True, npde=(2, False))
    x86b = b.x86_image(vendor=0x10DE, device=0x1B81, seed=8)
    rom = parse_rom(b.rom(x86a, x86b))
    assert rom.images[1].via_npde
    assert not check_vga_bios(rom, vendor_id=0x10DE, device_id=0x1B81).ok


def test_not_display_class_warns() -> None:
    v = check_vga_bios(parse_rom(b.x86_image(class_bytes=b"\x00\x00\x02")))
    assert v.ok and any("not a display controller" in w for w in v.warnings)
