"""formats.optionrom: real ROMs, hand-built ROMs with every quirk, damaged and random input."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.rom import builders as b
from xenlab.errors import FormatError
from xenlab.formats.optionrom import (
    CodeType,
    OptionRom,
    ProblemKind,
    find_header,
    parse_rom,
)

ROM = "rom"


def kinds(rom: OptionRom) -> list[ProblemKind]:
    return [p.kind for p in rom.all_problems()]


# --- the real ROMs of ../shared/data/rom (SOURCES.md section 4) ----------------


def test_shared_stdvga(shared_data: Path) -> None:
    rom = parse_rom((shared_data / ROM / "qemu-pc-bios__vgabios-stdvga.bin").read_bytes())
    assert rom.ok and rom.header_offset == 0 and rom.size == 39424
    (img,) = rom.images
    assert img.pcir is not None
    assert (img.vendor_id, img.device_id, img.class_code) == (0x1234, 0x1111, 0x030000)
    assert img.pcir.revision == 0 and img.pcir.max_runtime_length is None
    assert (img.code_type, img.length, img.last, img.checksum_ok) == (0, 39424, True, True)
    assert img.pcir.offset == 0x982C  # past 0xff: QEMU's IGD code's (u8) cast would miss it


def test_shared_ati(shared_data: Path) -> None:
    rom = parse_rom((shared_data / ROM / "qemu-pc-bios__vgabios-ati.bin").read_bytes())
    (img,) = rom.images
    assert (img.vendor_id, img.device_id, img.class_code) == (0x1002, 0x5159, 0x030000)
    assert img.checksum_ok and img.last and rom.ok


def test_shared_pxe_e1000_class_quirk(shared_data: Path) -> None:
    rom = parse_rom((shared_data / ROM / "qemu-pc-bios__pxe-e1000.rom").read_bytes())
    (img,) = rom.images
    assert img.pcir is not None and img.pnp is not None
    assert (img.vendor_id, img.device_id, img.pcir.revision) == (0x8086, 0x100E, 3)
    assert img.pcir.class_code_raw == 0x000002 and img.class_code == 0x020000
    assert img.pnp.offset == 0x3C and img.pnp.product == "iPXE"
    assert img.pcir.max_runtime_length == 0x83 * 512
    assert img.checksum_ok
    (p,) = img.problems
    assert p.kind is ProblemKind.CLASS_SWAPPED and p.offset == 0x20 + 0x0D
    assert "02 00 00" in str(p) and "0x020000" in str(p)


def test_shared_efi_virtio_two_images(shared_data: Path) -> None:
    rom = parse_rom((shared_data / ROM / "qemu-pc-bios__efi-virtio.rom").read_bytes())
    assert rom.ok and len(rom.images) == 2
    x86, efi = rom.images
    assert (x86.offset, x86.length, x86.code_type, x86.last) == (0, 69120, 0, False)
    assert (x86.vendor_id, x86.device_id, x86.class_code) == (0x1AF4, 0x1000, 0x020000)
    assert x86.checksum_ok and x86.checksummed
    assert (efi.offset, efi.length, efi.code_type, efi.last) == (0x10E00, 91648, 3, True)
    assert efi.efi is not None
    assert (efi.efi.signature, efi.efi.subsystem, efi.efi.machine_type) == (0x0EF1, 11, 0x8664)
    assert efi.efi.compressed
    # EFI images are not checksummed: this one sums to 0xa0 and is fine.
    assert not efi.checksummed and efi.checksum == 0xA0 and efi.checksum_ok
    assert any("no byte checksum" in n for n in efi.notes)


def test_shared_sgabios_without_pcir(shared_data: Path) -> None:
    rom = parse_rom((shared_data / ROM / "qemu-pc-bios__sgabios.bin").read_bytes())
    (img,) = rom.images
    assert img.pcir is None and img.code_type is None and img.is_x86
    assert (img.length, img.checksum_ok, img.last) == (4096, True, True)
    assert rom.ok


# --- hand-built ROMs ----------------------------------------------------------------


def test_multi_image_fields() -> None:
    data = b.rom(b.x86_image(size=1024, last=False, pnp=True, devices=(0x1112, 0x1113)),
                 b.efi_image(size=2048, machine=0xAA64, compression=1))
    rom = parse_rom(data)
    assert rom.ok, rom.all_problems()
    x86, efi = rom.images
    assert x86.pcir is not None and x86.pnp is not None
    assert x86.pcir.device_list == (0x1112, 0x1113)
    assert (x86.pnp.manufacturer, x86.pnp.product, x86.pnp.checksum_ok) == ("Maker", "Product",
                                                                           True)
    assert efi.offset == 1024 and efi.efi is not None
    assert (efi.efi.machine_type, efi.efi.compression, efi.efi.efi_image_offset) == (
        0xAA64, 1, 1024 + 0x40)
    assert efi.code_type == CodeType.EFI and efi.last and not x86.last
    assert rom.end == len(data) and rom.trailer_length == 0


def test_checksum_is_per_image() -> None:
    good, bad = b.x86_image(seed=5, last=False), b.x86_image(seed=6, checksum=False)
    data = b.rom(good, bad)
    assert sum(data) & 0xFF != 0
    rom = parse_rom(data)
    assert [img.checksum_ok for img in rom.images] == [True, False]
    (p,) = rom.all_problems()
    assert p.kind is ProblemKind.CHECKSUM and p.offset == len(good)


def test_whole_file_sum_is_not_the_rule() -> None:
    # Both images are right while the file sums to non-zero (the EFI image is
    # not checksummed): a whole-file check would call this ROM broken.
    data = b.multi()
    assert sum(data) & 0xFF != 0
    assert parse_rom(data).ok


def test_efi_checksum_never_judged() -> None:
    rom = parse_rom(b.multi())
    efi = rom.images[1]
    assert not efi.checksummed and efi.checksum_ok and not efi.problems


@pytest.mark.parametrize("header_len", [1, 0x1F3, 0x200, 0x401, 0x800])
def test_vendor_header_at_any_offset(header_len: int) -> None:
    # rom-parser steps by 512 bytes and misses 0x1f3 and 0x401.
    header = b"NVGI" + bytes(header_len - 4) if header_len >= 4 else b"\x01" * header_len
    data = b.rom(b.x86_image(), header=header)
    rom = parse_rom(data)
    assert rom.header_offset == header_len
    assert rom.images[0].offset == header_len and rom.images[0].checksum_ok
    (p,) = rom.problems
    assert p.kind is ProblemKind.VENDOR_HEADER and "--strip-header" in p.message


def test_vendor_header_with_decoy_signature() -> None:
    # 55 AA in the header whose pointer does not land on PCIR is skipped.
    header = b"\x55\xaa" + bytes(0x16) + struct.pack("<H", 0x10) + bytes(0x100)
    data = b.rom(b.x86_image(), header=header)
    assert find_header(data) == len(header)
    assert parse_rom(data).header_offset == len(header)


def test_nvidia_npde_continues_the_chain() -> None:
    rom = parse_rom(b.nvidia())
    assert len(rom.images) == 2, rom.all_problems()
    x86, efi = rom.images
    assert x86.pcir is not None and x86.pcir.last and x86.npde is not None
    assert (x86.npde.image_length, x86.npde.last) == (1024, False)
    assert not x86.last and x86.length == 1024
    assert efi.via_npde and efi.code_type == 3 and efi.last
    assert any("NPDE continues" in n for n in x86.notes)
    assert rom.ok


def test_nvidia_npde_last_stops() -> None:
    rom = parse_rom(b.nvidia(npde_last=True))
    assert len(rom.images) == 1
    # The EFI image is then a hidden image after the last one.
    assert kinds(rom) == [ProblemKind.TRAILER]


def test_npds_signature_accepted() -> None:
    rom = parse_rom(b.x86_image(pcir_signature=b"NPDS"))
    (img,) = rom.images
    assert img.pcir is not None and img.pcir.signature == "NPDS" and rom.ok


@pytest.mark.parametrize("fill", [b"\xff", b"\x00"])
def test_padding_is_quiet(fill: bytes) -> None:
    data = b.rom(b.x86_image(), trailer=fill * 5000)
    rom = parse_rom(data)
    assert rom.ok and rom.trailer_length == 5000 and rom.trailer_fill == fill[0]


def test_data_after_last_image() -> None:
    data = b.rom(b.x86_image(), trailer=b"\xff" * 100 + b"junk" + b"\xff" * 100)
    rom = parse_rom(data)
    (p,) = rom.all_problems()
    assert p.kind is ProblemKind.TRAILER and p.offset == 1024


def test_hidden_image_after_last() -> None:
    data = b.rom(b.x86_image(), b"\xff" * 512, b.x86_image(seed=9))
    rom = parse_rom(data)
    (p,) = rom.all_problems()
    assert p.kind is ProblemKind.TRAILER and p.offset == 1536 and "never reaches" in p.message


def test_pcir_pointer_out_of_bounds() -> None:
    # rom-parser reads through such a pointer; here it is a problem at +0x18.
    img = bytearray(b.x86_image())
    img[0x18:0x1A] = struct.pack("<H", 0xFFF0)
    rom = parse_rom(bytes(img))
    (image,) = rom.images
    assert image.pcir is None
    p = next(p for p in rom.all_problems() if p.kind is ProblemKind.STRUCTURE)
    assert p.offset == 0x18 and "past the end" in p.message


def test_pcir_pointer_to_garbage() -> None:
    img = bytearray(b.x86_image())
    img[0x18:0x1A] = struct.pack("<H", 0x100)
    img[0x100:0x104] = b"XXXX"
    rom = parse_rom(bytes(img))
    assert any("lands on b'XXXX'" in str(p) for p in rom.all_problems())


def test_swapped_class_detection_is_narrow() -> None:
    for cls, raw, fixed in [(b"\x02\x00\x00", 0x000002, 0x020000),
                            (b"\x00\x00\x03", 0x030000, 0x030000),
                            (b"\x00\x00\x00", 0, 0), (b"\x80\x00\x00", 0x80, 0x80)]:
        (img,) = parse_rom(b.x86_image(class_bytes=cls)).images
        assert img.pcir is not None
        assert (img.pcir.class_code_raw, img.class_code) == (raw, fixed), cls


def test_chain_runs_off_the_file() -> None:
    data = b.x86_image(last=False)
    rom = parse_rom(data)
    assert len(rom.images) == 1
    (p,) = rom.all_problems()
    assert p.kind is ProblemKind.CHAIN and p.offset == 1024


def test_chain_points_at_garbage() -> None:
    data = b.rom(b.x86_image(last=False), b"\x12\x34" + bytes(510))
    (p,) = parse_rom(data).all_problems()
    assert p.kind is ProblemKind.CHAIN and "12 34" in p.message


def test_zero_length_image_would_loop() -> None:
    img = bytearray(b.x86_image(last=False))
    img[0x40 + 0x10 : 0x40 + 0x12] = b"\0\0"  # PCIR length 0
    img[2] = 0  # and the header size
    rom = parse_rom(bytes(img))
    assert len(rom.images) == 1
    assert ProblemKind.CHAIN in kinds(rom)


@pytest.mark.parametrize("cut", [2, 0x10, 0x1A, 0x42, 0x50, 0x100, 1023])
def test_truncated_image(cut: int) -> None:
    data = b.x86_image()[:cut]
    rom = parse_rom(data)
    assert rom.images and not rom.ok
    assert any(p.kind in (ProblemKind.TRUNCATED, ProblemKind.STRUCTURE)
               for p in rom.all_problems())
    assert all(0 <= p.offset <= len(data) for p in rom.all_problems())


def test_truncated_second_image() -> None:
    data = b.multi()[:1024 + 700]
    rom = parse_rom(data)
    assert len(rom.images) == 2
    assert rom.images[1].problems[0].kind is ProblemKind.TRUNCATED
    assert rom.end == len(data)


@pytest.mark.parametrize("data", [b"", b"\x55", b"MZ" + bytes(100), bytes(4096), b"\xff" * 600])
def test_no_rom_raises_format_error(data: bytes) -> None:
    with pytest.raises(FormatError) as err:
        parse_rom(data, source="x.rom")
    assert str(err.value).startswith("x.rom+0x0: signature: ")


# --- arbitrary input: only FormatError, every place inside the data -----------------


def _check(data: bytes) -> None:
    try:
        rom = parse_rom(memoryview(data))
    except FormatError:
        return
    n = len(data)
    assert 0 <= rom.header_offset < n and rom.end <= n
    for img in rom.images:
        assert 0 <= img.offset < n
        if img.pcir is not None:
            assert img.pcir.offset + 0x18 <= n
        if img.efi is not None:
            assert img.efi.offset + 0x18 <= n
        if img.npde is not None:
            assert img.npde.offset + 11 <= n
        if img.pnp is not None:
            assert img.pnp.offset + 32 <= n
    for p in rom.all_problems():
        assert 0 <= p.offset <= n


@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _check(data)


@given(st.binary(max_size=2048))
def test_random_bytes_after_signature(data: bytes) -> None:
    _check(b"\x55\xaa" + data)


_BASES = [b.multi(), b.nvidia(), b.x86_image(pnp=True, devices=(1, 2, 3)),
          b.rom(b.isa_image(), trailer=b"\xff" * 512)]


@settings(max_examples=300)
@given(
    base=st.sampled_from(range(len(_BASES))),
    edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=12),
    cut=st.integers(0, 4096),
)
def test_mutated_builder_roms(base: int, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(_BASES[base])
    for pos, value in edits:
        data[pos % len(data)] = value
    _check(bytes(data[: max(cut, 1)]) if cut < len(data) else bytes(data))


_HOT = [0, 1, 2, 0x18, 0x19, 0x1A, 0x1B]  # header bytes worth hitting often


@settings(max_examples=200)
@given(
    name=st.sampled_from(["qemu-pc-bios__efi-virtio.rom", "qemu-pc-bios__pxe-e1000.rom",
                          "qemu-pc-bios__vgabios-stdvga.bin", "qemu-pc-bios__sgabios.bin"]),
    edits=st.lists(st.tuples(st.one_of(st.sampled_from(_HOT), st.integers(0, 1 << 18)),
                             st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 1 << 18),
)
def test_mutated_real_roms(
    shared_data: Path, name: str, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray((shared_data / ROM / name).read_bytes())
    for pos, value in edits:
        data[pos % len(data)] = value
    _check(bytes(data[:cut]) if cut < len(data) else bytes(data))
