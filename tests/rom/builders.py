"""Option ROM fixtures built by hand with ``struct`` (never through the reader's layouts).

Each builder returns the bytes of one image; :func:`rom` chains them with an
optional vendor header and trailer.  x86 images get a correct checksum in
byte 6 (where SeaBIOS's buildrom.py and iPXE put it) unless asked not to,
so a test can break it on purpose.
"""

from __future__ import annotations

import random
import struct


def _pcir(
    vendor: int,
    device: int,
    *,
    class_bytes: bytes,
    units: int,
    code_type: int,
    last: bool,
    revision: int = 3,
    devlist_ptr: int = 0,
    signature: bytes = b"PCIR",
    max_runtime: int = 0,
) -> bytes:
    body = (
        signature
        + struct.pack("<HHHHB", vendor, device, devlist_ptr, 0x1C if revision >= 3 else 0x18,
                      revision)
        + class_bytes
        + struct.pack("<HHBB", units, 1, code_type, 0x80 if last else 0)
    )  # fmt: skip
    if revision >= 3:
        body += struct.pack("<HHH", max_runtime or units, 0, 0)
    else:
        body += b"\0\0"
    return body


def _sum_to_zero(img: bytearray, at: int) -> None:
    img[at] = 0
    img[at] = (-sum(img)) & 0xFF


def x86_image(
    *,
    size: int = 1024,
    vendor: int = 0x1234,
    device: int = 0x1111,
    class_bytes: bytes = b"\x00\x00\x03",
    last: bool = True,
    pcir_at: int = 0x40,
    pcir_revision: int = 3,
    pnp: bool = False,
    devices: tuple[int, ...] = (),
    npde: tuple[int, bool] | None = None,
    header_units: int | None = None,
    checksum: bool = True,
    seed: int = 1,
    pcir_signature: bytes = b"PCIR",
) -> bytes:
    """A PC-compatible image: 55 AA, size, a near jump, PCIR (rev 3), optional $PnP/NPDE."""
    assert size % 512 == 0
    img = bytearray(random.Random(seed).randbytes(size))
    units = size // 512
    img[0:3] = b"\x55\xaa" + bytes([header_units if header_units is not None else units])
    img[3:6] = b"\xe9\x10\x00"  # jmp near
    img[6:0x18] = bytes(0x12)
    img[0x18:0x1A] = struct.pack("<H", pcir_at)
    img[0x1A:0x1C] = struct.pack("<H", 0)
    devlist_ptr = 0
    if devices:
        devlist_ptr = 0x20  # from the PCIR, behind it
        ids = b"".join(struct.pack("<H", d) for d in devices) + b"\0\0"
        img[pcir_at + devlist_ptr : pcir_at + devlist_ptr + len(ids)] = ids
    pcir = _pcir(vendor, device, class_bytes=class_bytes, units=units, code_type=0, last=last,
                 revision=pcir_revision, devlist_ptr=devlist_ptr, signature=pcir_signature)
    img[pcir_at : pcir_at + len(pcir)] = pcir
    if pnp:
        at = 0x20
        img[0x1A:0x1C] = struct.pack("<H", at)
        manu, prod = 0x1C0, 0x1D0
        img[manu : manu + 6] = b"Maker\0"
        img[prod : prod + 8] = b"Product\0"
        hdr = bytearray(struct.pack("<4sBBHBBIHH3sBHHHHH", b"$PnP", 1, 2, 0, 0, 0, 0x12345678,
                                    manu, prod, b"\x00\x00\x03", 0x14, 0, 0, 0x80, 0, 0))
        hdr[9] = (-sum(hdr)) & 0xFF
        img[at : at + 32] = hdr
    if npde is not None:
        units_npde, npde_last = npde
        at = (pcir_at + 0x1C + 0x0F) & ~0x0F
        img[at : at + 11] = struct.pack("<4sHHHB", b"NPDE", 0x101, 0x0C, units_npde,
                                        0x80 if npde_last else 0)
    if checksum:
        _sum_to_zero(img, 6)
    else:
        _sum_to_zero(img, 6)
        img[6] ^= 0x5A
    return bytes(img)


def efi_image(
    *,
    size: int = 2048,
    vendor: int = 0x1234,
    device: int = 0x1111,
    last: bool = True,
    subsystem: int = 11,
    machine: int = 0x8664,
    compression: int = 0,
    pcir_at: int = 0x1C,
    efi_offset: int = 0x40,
    seed: int = 2,
) -> bytes:
    """An EFI image: 55 AA, the EFI header (0x0EF1), PCIR code type 3, "MZ" at the image."""
    assert size % 512 == 0
    img = bytearray(random.Random(seed).randbytes(size))
    units = size // 512
    img[0:0x1A] = (b"\x55\xaa" + struct.pack("<HIHHH", units, 0x0EF1, subsystem, machine,
                                             compression)
                   + bytes(8) + struct.pack("<HH", efi_offset, pcir_at))  # fmt: skip
    pcir = _pcir(vendor, device, class_bytes=b"\x00\x00\x03", units=units, code_type=3, last=last)
    img[pcir_at : pcir_at + len(pcir)] = pcir
    img[efi_offset : efi_offset + 2] = b"MZ"
    return bytes(img)


def isa_image(*, size: int = 512, seed: int = 3) -> bytes:
    """An ISA-style ROM (sgabios): 55 AA, size, no PCIR, checksummed."""
    img = bytearray(random.Random(seed).randbytes(size))
    img[0:3] = b"\x55\xaa" + bytes([size // 512])
    img[0x18:0x1C] = bytes(4)
    _sum_to_zero(img, 6)
    return bytes(img)


def rom(*images: bytes, header: bytes = b"", trailer: bytes = b"") -> bytes:
    """Images back to back, after ``header`` and before ``trailer``."""
    return header + b"".join(images) + trailer


def image_sum(data: bytes, start: int, length: int) -> int:
    """Byte sum mod 256 of ``data[start:start+length]``."""
    return sum(data[start : start + length]) & 0xFF


def rom_fixer_whole_file(data: bytes) -> bytes:
    """What rom-fixer-style tools do: make the *file's* sum 0 through its last byte."""
    out = bytearray(data)
    out[-1] = (out[-1] - sum(out)) & 0xFF
    return bytes(out)


def multi() -> bytes:
    """x86 (not last) + EFI (last): the common GPU/NIC layout."""
    return rom(x86_image(size=1024, last=False), efi_image(size=2048))


def nvidia(*, npde_last: bool = False) -> bytes:
    """NVIDIA style: the x86 image's PCIR says last, its NPDE continues to an EFI image."""
    x86 = x86_image(size=1024, vendor=0x10DE, device=0x1B80, last=True, npde=(2, npde_last))
    efi = efi_image(size=1024, vendor=0x10DE, device=0x1B80, last=True)
    return rom(x86, efi)
