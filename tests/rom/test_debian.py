"""Debian's real ROMs: every SeaVGABIOS and every iPXE ROM walks clean, and the rules hold."""

from __future__ import annotations

from pathlib import Path

from xenlab.formats.optionrom import CodeType
from xenlab.rom.check import check_vga_bios
from xenlab.rom.fix import fix_rom, parse_image_kinds
from xenlab.rom.inspect import inspect_file

# vgabios file -> the PCI ids QEMU gives the device it belongs to (None: ISA, no PCIR)
VGA = {
    "vgabios-stdvga.bin": (0x1234, 0x1111),
    "vgabios-bochs-display.bin": (0x1234, 0x1111),
    "vgabios-cirrus.bin": (0x1013, 0x00B8),
    "vgabios-qxl.bin": (0x1B36, 0x0100),
    "vgabios-vmware.bin": (0x15AD, 0x0405),
    "vgabios-virtio.bin": (0x1AF4, 0x1050),
    "vgabios-ati.bin": (0x1002, 0x5159),
    "vgabios-isavga.bin": None,
    "vgabios-ramfb.bin": None,
}


def test_seavgabios_roms(debian_roms: Path) -> None:
    root = debian_roms / "usr" / "share" / "seabios"
    seen = 0
    for name, ids in VGA.items():
        rom = inspect_file(root / name)
        assert rom.ok, (name, rom.all_problems())
        (img,) = rom.images
        assert img.checksum_ok and img.is_x86 and img.last
        if ids is None:
            assert img.pcir is None
            continue
        assert (img.vendor_id, img.device_id, img.class_code) == (*ids, 0x030000), name
        assert check_vga_bios(rom, vendor_id=ids[0], device_id=ids[1]).ok
        seen += 1
    assert seen == 7


def test_ipxe_roms(debian_roms: Path) -> None:
    roms = sorted((debian_roms / "usr" / "lib" / "ipxe" / "qemu").glob("*.rom"))
    assert len(roms) >= 10
    for path in roms:
        rom = inspect_file(path)
        assert rom.ok, (path.name, rom.all_problems())
        assert rom.images[0].code_type == CodeType.X86 and rom.images[0].checksum_ok
        assert rom.images[0].pnp is not None and rom.images[0].pnp.product == "iPXE"
        if path.name.startswith("efi-"):
            x86, efi = rom.images
            assert not x86.last and efi.last and efi.efi is not None
            assert efi.efi.signature == 0x0EF1 and efi.efi.machine_type == 0x8664
            # Dropping the EFI image: the x86 image's last-image bit and its
            # checksum byte change, nothing else, and it stays valid.
            data = path.read_bytes()
            fixed = fix_rom(data, keep=parse_image_kinds("x86"))
            assert len(fixed.data) == x86.length and len(fixed.changes) == 3
            changed = [i for i in range(x86.length) if data[i] != fixed.data[i]]
            assert x86.pcir is not None
            assert changed == [x86.pcir.offset + 0x15, x86.length - 1]
            assert fixed.after.ok
