"""Repair a ROM and say exactly what changed: :func:`fix_rom` (pure: bytes in, bytes out).

What it can do, each listed as a :class:`Change`:

- repair the checksum of every x86 image whose byte sum is not 0, one image
  at a time: image k's fix writes one byte inside image k's checksummed
  range and nothing else (rom-fixer sums the whole file and writes the
  file's last byte, which leaves image 0 broken and corrupts an EFI image
  behind it);
- ``strip_header``: drop a vendor header before the first image and
  whatever follows the last one (nvflash/GPU-Z headers, padding);
- ``keep``: keep only images of some code types, setting the last-image bit
  (PCIR, or NVIDIA's NPDE when it drives the chain) on the new last image;
- ``set_ids``: write a vendor:device pair into the PCIR of the x86 image(s),
  as QEMU's Xen IGD passthrough (``xen_pt_setup_vga``) does with the host
  device's id so SeaBIOS's id match finds the VBIOS; QEMU then fixes the
  checksum through the last byte of the image, as here.

The checksum byte: by default the last byte of the checksummed range (the
header's initialization size), the byte QEMU's IGD code, Xen's old
hvmloader, QEMU's ``scripts/signrom.py`` and EDK2's EfiRom adjust.
Producers that reserve a byte say so: SeaBIOS's ``scripts/buildrom.py`` and
iPXE's romprefix keep the checksum at image offset 6; ``checksum_at=6``
uses it.  A byte inside a structure the walk read (signature, size, entry
jump, pointers, PCIR, device list, $PnP, EFI header, NPDE) is refused.

Design: the input is walked first and refused if it is damaged beyond these
repairs (truncated, out-of-bounds pointers, a broken chain).  The output is
walked again and refused unless it holds the images asked for, with good
checksums: an invalid ROM is never returned.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from xenlab.errors import FormatError
from xenlab.formats.buffer import Buffer
from xenlab.formats.optionrom import (
    CODE_TYPE_NAMES,
    LAST_IMAGE,
    PCIR_MIN_LENGTH,
    CodeType,
    OptionRom,
    ProblemKind,
    RomImage,
    byte_sum,
    code_type_name,
    parse_rom,
)

# Problems no repair here can cure: the output would be as broken.
_FATAL = frozenset({ProblemKind.STRUCTURE, ProblemKind.TRUNCATED, ProblemKind.CHAIN})
_KIND_NAMES = {name: int(ct) for ct, name in CODE_TYPE_NAMES.items()} | {"isa": -1}
_ISA = -1  # an image without a PCIR, kept with "x86"


@dataclass(frozen=True, slots=True)
class Change:
    """One edit: where in the output, which input image, what it was and is."""

    offset: int  # in the output
    image: int | None  # the input image's index, None for the whole file
    what: str
    old: bytes = b""
    new: bytes = b""

    def __str__(self) -> str:
        where = f"image {self.image}" if self.image is not None else "rom"
        return f"{where} (+{self.offset:#x} out): {self.what}"


@dataclass(frozen=True, slots=True)
class FixResult:
    """The repaired bytes, the edits made and the walks of input and output."""

    data: bytes
    changes: tuple[Change, ...]
    before: OptionRom
    after: OptionRom


def parse_image_kinds(text: str) -> frozenset[int]:
    """``"x86,efi"`` -> the code types to keep (x86 includes ISA ROMs without a PCIR).

    Names: x86, efi, openfirmware, hppa, nvidia-fw, or a number (``0x70``).

    :raise ValueError: an unknown name.
    """
    kinds: set[int] = set()
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        if part in _KIND_NAMES:
            kinds.add(_KIND_NAMES[part])
            if part == "x86":
                kinds.add(_ISA)
            continue
        try:
            kinds.add(int(part, 0))
        except ValueError:
            names = ", ".join(sorted(_KIND_NAMES))
            raise ValueError(f"image kind {part!r}, expected one of {names} or a number") from None
    return frozenset(kinds)


def _kind(img: RomImage) -> int:
    return _ISA if img.pcir is None else img.pcir.code_type


def _protected(img: RomImage) -> list[tuple[int, int]]:
    """Byte ranges (absolute, input) of the structures the walk read in ``img``."""
    pos = img.offset
    spans = [(pos, pos + 3), (pos + 0x18, pos + 0x1C)]
    if img.is_x86:
        spans.append((pos + 3, pos + 6))  # the entry jump
    if img.pcir is not None:
        p = img.pcir
        spans.append((p.offset, p.offset + max(p.length, PCIR_MIN_LENGTH)))
        if p.device_list_pointer and p.revision >= 3:
            start = p.offset + p.device_list_pointer
            spans.append((start, start + 2 * (len(p.device_list) + 1)))
    if img.pnp is not None:
        spans.append((img.pnp.offset, img.pnp.offset + max(img.pnp.length, 0x20)))
    if img.efi is not None:
        spans.append((pos, pos + 0x18))
    if img.npde is not None:
        spans.append((img.npde.offset, img.npde.offset + max(img.npde.length, 0x0B)))
    return spans


def _refuse(rom: OptionRom, offset: int, message: str) -> FormatError:
    return FormatError(rom.source, offset, "fix", f"refused: {message}")


def fix_rom(
    data: Buffer,
    *,
    source: str = "<rom>",
    strip_header: bool = False,
    keep: Iterable[int] | None = None,
    set_ids: tuple[int, int] | None = None,
    checksum_at: str | int = "last",
) -> FixResult:
    """Repair ``data`` and return the new bytes with the list of changes.

    ``keep`` holds code types (see :func:`parse_image_kinds`); ``checksum_at``
    is ``"last"`` or an offset inside each image (6 for SeaBIOS/iPXE builds).

    :raise FormatError: no ROM in ``data``, a ROM damaged beyond these
        repairs, or a change that would leave an invalid ROM (the message
        says which and where).

    Why one function: the repairs run in one order on the bytes the previous one left
    (size, PCI data structure, PnP header, checksum last), and each must see the others'
    results to refuse a change that would leave an invalid ROM.
    """
    rom = parse_rom(data, source=source)
    for prob in rom.all_problems():
        if prob.kind in _FATAL:
            raise _refuse(rom, prob.offset,
                          f"the ROM is damaged beyond a checksum or header fix: {prob}")
    if set_ids is not None:
        vendor, device = set_ids
        if not (0 < vendor < 0xFFFF and 0 <= device < 0xFFFF):
            raise _refuse(rom, 0, f"ids {vendor:#06x}:{device:#06x}: vendor 0 or 0xffff, or "
                          "device 0xffff, is no device")
    if not isinstance(checksum_at, int) and checksum_at != "last":
        raise ValueError(f"checksum_at {checksum_at!r}, expected 'last' or an offset")

    kept = list(rom.images)
    if keep is not None:
        wanted = frozenset(keep)
        kept = [img for img in rom.images if _kind(img) in wanted]
        if not kept:
            have = ", ".join(code_type_name(img.code_type) for img in rom.images)
            raise _refuse(rom, rom.header_offset, f"no image left (the ROM has: {have})")

    changes: list[Change] = []
    out = bytearray()
    if strip_header and rom.header_offset:
        changes.append(Change(0, None, f"removed the {rom.header_offset:#x}-byte vendor header "
                                       "before the first image"))
    elif rom.header_offset:
        out += bytes(memoryview(data)[: rom.header_offset])
    # Where each kept image lands in the output.
    moved: dict[int, int] = {}
    for img in rom.images:
        if img in kept:
            moved[img.index] = len(out)
            out += bytes(memoryview(data)[img.offset : img.end])
        else:
            changes.append(Change(len(out), img.index,
                                  f"removed the {code_type_name(img.code_type)} image "
                                  f"({img.length:#x} bytes at +{img.offset:#x} in)"))
    if rom.trailer_length:
        if strip_header:
            fill = (f"{rom.trailer_fill:#04x} padding" if rom.trailer_fill is not None
                    else "data")
            changes.append(Change(len(out), None, f"removed {rom.trailer_length:#x} bytes of "
                                                  f"{fill} after the last image"))
        else:
            out += bytes(memoryview(data)[rom.end : rom.size])

    def at(img: RomImage, absolute: int) -> int:
        return moved[img.index] + absolute - img.offset

    def put(img: RomImage, absolute: int, new: bytes, what: str) -> None:
        o = at(img, absolute)
        old = bytes(out[o : o + len(new)])
        if old != new:
            out[o : o + len(new)] = new
            changes.append(Change(o, img.index, what, old, new))

    # Last-image bits: only the new last image says "last".
    for n, img in enumerate(kept):
        final = n == len(kept) - 1
        npde_drives = img.npde is not None and img.npde.image_length > 0
        if img.pcir is None:
            continue
        p = img.pcir
        if npde_drives and img.npde is not None:
            d = img.npde
            flags = d.flags | LAST_IMAGE if final else d.flags & ~LAST_IMAGE
            put(img, d.offset + 0x0A, bytes([flags]),
                f"NPDE last-image flag {d.flags:#04x} -> {flags:#04x}")
            if final and not p.last:
                put(img, p.offset + 0x15, bytes([p.indicator | LAST_IMAGE]),
                    f"PCIR indicator {p.indicator:#04x} -> {p.indicator | LAST_IMAGE:#04x}")
        else:
            ind = p.indicator | LAST_IMAGE if final else p.indicator & ~LAST_IMAGE
            put(img, p.offset + 0x15, bytes([ind]),
                f"PCIR indicator {p.indicator:#04x} -> {ind:#04x}"
                + (" (last image)" if final else " (more images follow)"))

    if set_ids is not None:
        targets = [img for img in kept if img.pcir is not None
                   and img.pcir.code_type == CodeType.X86]
        if not targets:
            raise _refuse(rom, rom.header_offset, "--set-ids: no x86 image with a PCIR to set "
                          "ids in")
        vendor, device = set_ids
        for img in targets:
            assert img.pcir is not None
            p = img.pcir
            put(img, p.offset + 4, vendor.to_bytes(2, "little") + device.to_bytes(2, "little"),
                f"PCIR ids {p.vendor_id:04x}:{p.device_id:04x} -> {vendor:04x}:{device:04x}")

    for img in kept:
        if not img.checksummed or not img.header_length:
            continue
        start, end = img.checksum_range
        total = byte_sum(out, at(img, start), at(img, end))
        if total == 0:
            continue
        target = end - 1 if checksum_at == "last" else img.offset + int(checksum_at)
        if not start <= target < end:
            raise _refuse(rom, img.offset, f"image {img.index}: checksum byte at image offset "
                          f"{target - img.offset:#x} is outside its checksummed "
                          f"{end - start:#x} bytes")
        for lo, hi in _protected(img):
            if lo <= target < hi:
                raise _refuse(rom, target, f"image {img.index}: the checksum byte at "
                              f"+{target:#x} lies inside a structure ({lo:#x}..{hi:#x}); "
                              "choose another with --checksum-at")
        o = at(img, target)
        new = (out[o] - total) & 0xFF
        put(img, target, bytes([new]),
            f"checksum byte at image offset {target - img.offset:#x}: {out[o]:#04x} -> "
            f"{new:#04x} (the image summed to {total:#04x})")

    result = bytes(out)
    try:
        after = parse_rom(result, source=f"{source} (fixed)")
    except FormatError as err:
        raise _refuse(rom, err.offset, f"the result would not be a ROM: {err}") from err
    _verify(rom, after, kept, set_ids, strip_header)
    return FixResult(data=result, changes=tuple(changes), before=rom, after=after)


def _verify(
    rom: OptionRom,
    after: OptionRom,
    kept: list[RomImage],
    set_ids: tuple[int, int] | None,
    strip_header: bool,
) -> None:
    """Refuse a result that is not the valid ROM asked for."""
    bad = [p for p in after.all_problems() if p.kind in _FATAL or p.kind is ProblemKind.CHECKSUM]
    if bad:
        raise _refuse(rom, bad[0].offset, f"the result would be invalid: {bad[0]}")
    if len(after.images) != len(kept):
        raise _refuse(rom, after.end, f"the result walks to {len(after.images)} image(s), "
                      f"expected {len(kept)}")
    if strip_header and after.header_offset:
        raise _refuse(rom, 0, "the result still starts with a header")
    if set_ids is not None:
        for img in after.images:
            if img.pcir is not None and img.pcir.code_type == CodeType.X86 and (
                img.pcir.vendor_id, img.pcir.device_id) != set_ids:  # fmt: skip
                raise _refuse(rom, img.pcir.offset, "the ids did not take")
