"""rom.fix: each repair changes only what it says, and never returns an invalid ROM."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.rom import builders as b
from xenlab.errors import FormatError
from xenlab.formats.optionrom import parse_rom
from xenlab.rom.check import check_vga_bios
from xenlab.rom.fix import fix_rom, parse_image_kinds


def diff(a: bytes, c: bytes) -> list[int]:
    assert len(a) == len(c)
    return [i for i in range(len(a)) if a[i] != c[i]]


def broken_multi() -> bytes:
    return b.rom(b.x86_image(size=1024, last=False, checksum=False), b.efi_image(size=2048))


def test_checksum_fix_touches_one_byte_of_that_image() -> None:
    data = broken_multi()
    res = fix_rom(data)
    assert diff(data, res.data) == [1023]  # the last byte of image 0, nothing else
    assert res.after.ok and all(img.checksum_ok for img in res.after.images)
    (c,) = res.changes
    assert c.image == 0 and c.offset == 1023 and "checksum byte" in c.what
    assert res.data[1024:] == data[1024:]  # the EFI image is untouched


def test_whole_file_fix_is_wrong_per_image() -> None:
    # rom-fixer's way: the file's last byte makes the whole file sum to 0. The
    # x86 image stays broken and the EFI image is changed.
    data = broken_multi()
    theirs = b.rom_fixer_whole_file(data)
    assert sum(theirs) & 0xFF == 0
    assert diff(data, theirs) == [len(data) - 1]
    assert not parse_rom(theirs).images[0].checksum_ok
    ours = fix_rom(data).data
    assert parse_rom(ours).images[0].checksum_ok and ours[1024:] == data[1024:]


def test_checksum_at_header_byte() -> None:
    data = b.x86_image(checksum=False)
    res = fix_rom(data, checksum_at=6)
    assert diff(data, res.data) == [6] and res.after.ok


@pytest.mark.parametrize("offset", [0, 2, 4, 0x18, 0x40, 0x45])
def test_checksum_byte_in_a_structure_is_refused(offset: int) -> None:
    data = b.x86_image(checksum=False)
    with pytest.raises(FormatError, match="refused"):
        fix_rom(data, checksum_at=offset)


def test_last_byte_inside_pcir_is_refused() -> None:
    data = b.x86_image(size=512, pcir_at=512 - 0x1C, checksum=False)
    assert parse_rom(data).images[0].pcir is not None
    with pytest.raises(FormatError, match="inside a structure"):
        fix_rom(data)
    assert fix_rom(data, checksum_at=6).after.ok


def test_nothing_to_fix_is_identity() -> None:
    data = b.multi()
    res = fix_rom(data)
    assert res.data == data and res.changes == ()


def test_strip_header_and_trailer() -> None:
    image = b.x86_image()
    data = b.rom(image, header=b"NVGI" + bytes(0x1F3 - 4), trailer=b"\xff" * 700)
    res = fix_rom(data, strip_header=True)
    assert res.data == image
    assert res.after.header_offset == 0 and res.after.ok
    assert len(res.changes) == 2


def test_image_zero_with_a_broken_pcir_pointer_is_not_a_header() -> None:
    # 55 AA at 0 whose size reaches the next image is image 0 with a bad PCIR
    # pointer: reported as such, and strip-header must not delete it.
    data = bytearray(b.multi())
    data[0x18] ^= 0xFF
    rom = parse_rom(bytes(data))
    assert rom.header_offset == 0 and rom.images[0].offset == 0
    assert any(p.offset == 0x18 and "PCIR pointer" in p.message for p in rom.all_problems())
    with pytest.raises(FormatError, match="PCIR pointer"):
        fix_rom(bytes(data), strip_header=True)


def test_header_kept_without_strip() -> None:
    data = b.rom(b.x86_image(checksum=False), header=bytes(0x123))
    res = fix_rom(data)
    assert diff(data, res.data) == [0x123 + 1023]
    assert res.after.header_offset == 0x123


def test_keep_x86_sets_last_bit_and_checksum() -> None:
    data = b.multi()
    res = fix_rom(data, keep=parse_image_kinds("x86"))
    assert len(res.data) == 1024
    changed = diff(data[:1024], res.data)
    assert changed == [0x40 + 0x15, 1023]  # PCIR indicator, then the checksum byte
    assert res.after.images[0].last and res.after.ok


def test_keep_efi_only() -> None:
    data = b.multi()
    res = fix_rom(data, keep=parse_image_kinds("efi"))
    assert res.data == data[1024:]
    assert [img.code_type for img in res.after.images] == [3]


def test_keep_nothing_refused() -> None:
    with pytest.raises(FormatError, match="no image left"):
        fix_rom(b.multi(), keep=parse_image_kinds("openfirmware"))


def test_keep_kind_names() -> None:
    assert parse_image_kinds("x86, efi") == frozenset({0, -1, 3})
    assert parse_image_kinds("0x70") == frozenset({0x70})
    with pytest.raises(ValueError, match="image kind 'arm'"):
        parse_image_kinds("arm")


def test_nvidia_keep_x86_sets_npde_last() -> None:
    data = b.nvidia()
    res = fix_rom(data, keep=parse_image_kinds("x86"))
    (img,) = res.after.images
    assert img.npde is not None and img.npde.last and img.last and img.checksum_ok
    assert len(res.data) == 1024


def test_set_ids_like_qemu_igd() -> None:
    data = b.multi()
    res = fix_rom(data, set_ids=(0x8086, 0x0412))
    assert diff(data, res.data) == [0x44, 0x45, 0x46, 0x47, 1023]
    x86, efi = res.after.images
    assert (x86.vendor_id, x86.device_id) == (0x8086, 0x0412) and x86.checksum_ok
    assert (efi.vendor_id, efi.device_id) == (0x1234, 0x1111)  # only x86 images
    assert check_vga_bios(res.after, vendor_id=0x8086, device_id=0x0412).ok


@pytest.mark.parametrize("ids", [(0xFFFF, 1), (0, 1), (0x8086, 0xFFFF)])
def test_set_ids_refuses_no_device(ids: tuple[int, int]) -> None:
    with pytest.raises(FormatError, match="is no device"):
        fix_rom(b.multi(), set_ids=ids)


def test_set_ids_needs_an_x86_image() -> None:
    with pytest.raises(FormatError, match="no x86 image"):
        fix_rom(b.efi_image(), set_ids=(0x8086, 0x0412))


@pytest.mark.parametrize("cut", [700, 1024 + 100])
def test_damaged_input_refused(cut: int) -> None:
    data = broken_multi()[:cut]
    with pytest.raises(FormatError, match="damaged beyond"):
        fix_rom(data, source="card.rom")


def test_class_quirk_is_kept(shared_data: Path) -> None:
    data = (shared_data / "rom" / "qemu-pc-bios__pxe-e1000.rom").read_bytes()
    res = fix_rom(data)
    assert res.data == data and res.changes == ()
    assert [p.kind.value for p in res.after.all_problems()] == ["class-swapped"]


def test_real_vgabios_set_ids(shared_data: Path) -> None:
    data = (shared_data / "rom" / "qemu-pc-bios__vgabios-stdvga.bin").read_bytes()
    res = fix_rom(data, set_ids=(0x8086, 0x0166))
    # The PCIR sits at 0x982c: QEMU's (unsigned char) cast of the pointer
    # would have written at 0x2c instead.
    assert diff(data, res.data) == [0x9830, 0x9831, 0x9832, 0x9833, len(data) - 1]
    assert check_vga_bios(res.after, vendor_id=0x8086, device_id=0x0166).ok
    assert not check_vga_bios(res.after, vendor_id=0x1234, device_id=0x1111).ok
