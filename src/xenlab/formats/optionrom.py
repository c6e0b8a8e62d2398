"""PCI expansion ROMs (option ROMs, VGA BIOSes): walk every image with :func:`parse_rom`.

A ROM is a chain of images, each starting ``55 AA`` and pointing to its PCI
Data Structure ("PCIR", PCI Firmware Specification 3.x, chapter 5).  The walk
follows the firmware that runs them, SeaBIOS's ``src/optionroms.c`` (image to
image by the PCIR length, stopping at the last-image bit), and handles what
vendors do beyond the spec (a vendor header first, NVIDIA's NPDE, old iPXE's
class bytes).  Only x86 images are checksummed (the initialization size sums
to 0 mod 256); an EFI image's sum is reported, never judged. :func:`parse_rom`
raises only when there is no ROM at all: damage comes back as
:class:`RomProblem` entries at absolute offsets, and every byte read is
bounds-checked first.  The design (the layout, the vendor cases and the
checksums) is in docs/formats.md, section Option ROMs.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from xenlab.errors import FormatError
from xenlab.formats.buffer import Buffer

ROM_SIGNATURE = b"\x55\xaa"
# Signatures nouveau accepts for images reached through an NPDE chain.
NVIDIA_SIGNATURES = (b"\x77\xbb", b"\x56\x4e")
PCIR_SIGNATURE = b"PCIR"
NPDS_SIGNATURE = b"NPDS"
NPDE_SIGNATURE = b"NPDE"
PNP_SIGNATURE = b"$PnP"
EFI_SIGNATURE = 0x0EF1
UNIT = 512
LAST_IMAGE = 0x80
PCIR_MIN_LENGTH = 0x18
NVIDIA_VENDOR = 0x10DE
# NVIDIA firmware images (code type 0x70) end the chain; nouveau reads no NPDE there.
NVIDIA_FW_CODE_TYPE = 0x70
# The legacy option ROM area a BIOS copies x86 images into (0xC0000-0xEFFFF).
LEGACY_ROM_AREA = 0x30000

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_PCIR = struct.Struct("<4sHHHHB3sHHBB")  # up to +0x16, the fields every revision has
_EFI = struct.Struct("<HIHHH")  # +0x02 init size .. +0x0C compression
_PNP = struct.Struct("<4sBBHBBIHH3sBHHHHH")
_NPDE = struct.Struct("<4sHHHB")
_HEADER_CANDIDATE = re.compile(re.escape(ROM_SIGNATURE))
# A device list is a u16 array ended by 0; real ones have a handful of ids.
_MAX_DEVICE_LIST = 256
_MAX_PNP_STRING = 128
# Images one walk reads.  Real ROMs hold a handful (x86, EFI for two or three
# machines, an NVIDIA firmware image); a file of 512-byte images chained to
# the end would be 131,072 of them in 64 MiB, each a row in every report.
MAX_IMAGES = 256
# Bytes of candidates find_header judges at once: its numpy temporaries are a
# few times this (positions are 8 bytes each), whatever the file's size.
_SCAN_WINDOW = 1 << 20
_PCIR_U32 = _U32.unpack(PCIR_SIGNATURE)[0]
_NPDS_U32 = _U32.unpack(NPDS_SIGNATURE)[0]


class CodeType(enum.IntEnum):
    """PCIR code types (PCI Firmware 3.x, table 5-2), plus NVIDIA's firmware type."""

    X86 = 0
    OPEN_FIRMWARE = 1
    HP_PA_RISC = 2
    EFI = 3
    NVIDIA_FIRMWARE = 0x70


CODE_TYPE_NAMES = {
    CodeType.X86: "x86",
    CodeType.OPEN_FIRMWARE: "openfirmware",
    CodeType.HP_PA_RISC: "hppa",
    CodeType.EFI: "efi",
    CodeType.NVIDIA_FIRMWARE: "nvidia-fw",
}
EFI_SUBSYSTEMS = {10: "application", 11: "boot service driver", 12: "runtime driver"}
EFI_MACHINES = {
    0x014C: "IA32", 0x0200: "IA64", 0x0EBC: "EBC", 0x8664: "X64", 0x01C2: "ARM",
    0xAA64: "AArch64", 0x5032: "RISCV32", 0x5064: "RISCV64", 0x6264: "LoongArch64",
}  # fmt: skip
EFI_COMPRESSIONS = {0: "none", 1: "EFI"}


def code_type_name(code_type: int | None) -> str:
    """``x86``, ``efi``, ... for a code type; ``isa`` for an image without a PCIR."""
    if code_type is None:
        return "isa"
    try:
        return CODE_TYPE_NAMES[CodeType(code_type)]
    except ValueError:
        return f"type {code_type:#04x}"


class ProblemKind(enum.Enum):
    """What a :class:`RomProblem` is about, so callers (``fix``, boot checks) can judge it."""

    CHECKSUM = "checksum"  # an x86 image's byte sum is not 0
    VENDOR_HEADER = "vendor-header"  # bytes before the first image
    TRAILER = "trailer"  # data (not padding) after the last image
    CLASS_SWAPPED = "class-swapped"  # iPXE's class bytes
    STRUCTURE = "structure"  # a pointer, length or signature that firmware trips over
    TRUNCATED = "truncated"  # the file ends inside something
    CHAIN = "chain"  # the image chain loops or promises images that are not there


@dataclass(frozen=True, slots=True)
class RomProblem:
    """One thing wrong with a ROM, at an absolute file offset."""

    offset: int
    kind: ProblemKind
    message: str

    def __str__(self) -> str:
        return f"+{self.offset:#x}: {self.message}"


@dataclass(frozen=True, slots=True)
class Pcir:
    """A PCI Data Structure ("PCIR", or NVIDIA's "NPDS"); offsets are absolute."""

    offset: int
    signature: str
    vendor_id: int
    device_id: int
    device_list_pointer: int  # raw u16 at +0x08 (rev 3: device list; older: VPD)
    device_list: tuple[int, ...]  # rev 3 only: the extra device ids it supports
    length: int  # of this structure, bytes
    revision: int
    class_code_raw: int  # the three bytes as the spec reads them
    class_code: int  # corrected for iPXE's swapped bytes (else == raw)
    image_length: int  # bytes (the u16 x 512)
    code_revision: int
    code_type: int
    indicator: int
    max_runtime_length: int | None  # rev 3, bytes
    config_utility_offset: int | None  # rev 3, absolute, None when 0
    clp_offset: int | None  # rev 3, absolute, None when 0

    @property
    def last(self) -> bool:
        """The indicator's last-image bit."""
        return bool(self.indicator & LAST_IMAGE)


@dataclass(frozen=True, slots=True)
class PnpHeader:
    """The "$PnP" expansion header of an x86 image (PnP BIOS spec 1.0a, appendix A)."""

    offset: int
    revision: int
    length: int  # bytes
    next_offset: int
    checksum_ok: bool
    device_id: int
    manufacturer: str | None
    product: str | None
    device_type: int
    indicators: int
    bcv: int  # boot connection vector (disk ROMs)
    dv: int  # disconnect vector
    bev: int  # bootstrap entry vector (network boot ROMs)


@dataclass(frozen=True, slots=True)
class EfiHeader:
    """The EFI image header of an EFI image (UEFI spec, "PCI Option ROMs")."""

    offset: int
    initialization_size: int  # bytes
    signature: int
    subsystem: int
    machine_type: int
    compression: int
    efi_image_offset: int  # absolute: where the PE image starts

    @property
    def compressed(self) -> bool:
        """Whether the PE image is EFI-compressed (compression type 1)."""
        return self.compression == 1


@dataclass(frozen=True, slots=True)
class Npde:
    """NVIDIA's PCI Data Extension: its own image length and last-image flag."""

    offset: int
    revision: int
    length: int
    image_length: int  # bytes
    flags: int

    @property
    def last(self) -> bool:
        """The NPDE's last-image flag (bit 7)."""
        return bool(self.flags & LAST_IMAGE)


@dataclass(frozen=True, slots=True)
class RomImage:
    """One image of a ROM; offsets are absolute, lengths in bytes.

    ``length`` is what the chain steps by (the PCIR image length, NVIDIA's NPDE
    length when one continues the chain, or the header's size for an ISA ROM);
    ``header_length`` is the header's size byte (x86) or initialization size
    (EFI) times 512, the bytes an x86 checksum covers.
    """

    index: int
    offset: int
    length: int
    signature: bytes
    header_length: int
    pcir: Pcir | None
    pnp: PnpHeader | None
    efi: EfiHeader | None
    npde: Npde | None
    checksummed: bool
    checksum: int  # byte sum mod 256 over the checksummed range (or the image)
    checksum_ok: bool  # True when the sum is 0 or the image is not checksummed
    last: bool  # this image ends the chain (PCIR bit, or NPDE's)
    via_npde: bool  # reached only through an NPDE chain, past a PCIR "last" bit
    problems: tuple[RomProblem, ...]
    notes: tuple[str, ...]

    @property
    def end(self) -> int:
        """Offset just past this image."""
        return self.offset + self.length

    @property
    def code_type(self) -> int | None:
        """The PCIR code type, or None for an ISA ROM without a PCIR."""
        return self.pcir.code_type if self.pcir else None

    @property
    def vendor_id(self) -> int | None:
        return self.pcir.vendor_id if self.pcir else None

    @property
    def device_id(self) -> int | None:
        return self.pcir.device_id if self.pcir else None

    @property
    def class_code(self) -> int | None:
        """The (corrected) class code."""
        return self.pcir.class_code if self.pcir else None

    @property
    def is_x86(self) -> bool:
        """Code a legacy BIOS runs: code type 0, or an ISA ROM without a PCIR."""
        return self.pcir is None or self.pcir.code_type == CodeType.X86

    @property
    def checksum_range(self) -> tuple[int, int]:
        """``(start, end)`` of the bytes the x86 checksum covers, clipped to the image."""
        return self.offset, self.offset + min(self.header_length or self.length, self.length)


@dataclass(frozen=True, slots=True)
class OptionRom:
    """A whole ROM file: its images in chain order and what lies around them."""

    source: str
    size: int
    header_offset: int  # where the first image starts (> 0: a vendor header)
    images: tuple[RomImage, ...]
    end: int  # just past the last image walked (clipped to the file)
    trailer_length: int
    trailer_fill: int | None  # 0xFF or 0x00 when the trailer is all padding
    problems: tuple[RomProblem, ...]  # ROM-level ones; images hold their own

    def all_problems(self) -> tuple[RomProblem, ...]:
        """ROM-level and image problems, in file order."""
        found = [*self.problems, *(p for img in self.images for p in img.problems)]
        return tuple(sorted(found, key=lambda p: p.offset))

    @property
    def ok(self) -> bool:
        """No problem anywhere."""
        return not self.problems and not any(img.problems for img in self.images)


# --- small readers -------------------------------------------------------------


def _u16(view: memoryview, pos: int) -> int | None:
    if pos < 0 or pos + 2 > len(view):
        return None
    value: int = _U16.unpack_from(view, pos)[0]
    return value


def _fits(view: memoryview, pos: int, size: int) -> bool:
    return pos >= 0 and pos + size <= len(view)


def byte_sum(buf: Buffer, start: int, end: int) -> int:
    """Sum of ``buf[start:end]`` mod 256 (numpy, no copy); the range is clipped to ``buf``."""
    view = _flat(buf)
    try:
        start = max(0, start)
        end = min(end, len(view))
        if end <= start:
            return 0
        part = view[start:end]
        try:
            arr = np.frombuffer(part, dtype=np.uint8)
            total = int(np.add.reduce(arr, dtype=np.uint8))
            del arr
        finally:
            part.release()
        return total
    finally:
        view.release()


def _fill_of(view: memoryview, start: int, end: int) -> int | None:
    """0xFF or 0x00 when ``view[start:end]`` is all that byte, else None."""
    if end <= start:
        return None
    part = view[start:end]
    try:
        arr = np.frombuffer(part, dtype=np.uint8)
        first = int(arr[0])
        uniform = first in (0x00, 0xFF) and not np.any(arr != first)
        del arr
    finally:
        part.release()
    return first if uniform else None


def _has_pcir(view: memoryview, pos: int) -> bool:
    ptr = _u16(view, pos + 0x18)
    if not ptr:
        return False
    sig = bytes(view[pos + ptr : pos + ptr + 4])
    return sig in (PCIR_SIGNATURE, NPDS_SIGNATURE)


def find_header(buf: Buffer, start: int = 0, end: int | None = None) -> int | None:
    """Offset of the first ROM image at or after ``start``: ``55 AA`` whose +0x18 pointer
    lands on "PCIR" (or NVIDIA's "NPDS"), at any byte offset; None if there is none.

    rom-parser only looks at 512-byte steps, which misses headers left by
    flash tools whose size is not a multiple of 512.

    Every ``55 AA`` is a candidate, and a file can be nothing else (16 MiB of
    them took 17 s one at a time in Python): candidates are judged with numpy,
    a window of :data:`_SCAN_WINDOW` bytes at a time, so memory stays bounded
    and the cost is a few passes over the bytes.
    """
    view = _flat(buf)
    try:
        size = len(view)
        stop = size if end is None else min(end, size)
        arr = np.frombuffer(view, dtype=np.uint8)
        try:
            for lo in range(max(start, 0), stop - 1, _SCAN_WINDOW):
                hit = _first_header(arr, lo, min(lo + _SCAN_WINDOW, stop - 1))
                if hit is not None:
                    return hit
            return None
        finally:
            del arr  # the view can be released only once numpy lets go of it
    finally:
        view.release()


def _first_header(arr: npt.NDArray[np.uint8], lo: int, hi: int) -> int | None:
    """The first ``p`` in ``[lo, hi)`` with ``55 AA`` at ``p`` and "PCIR"/"NPDS" at its
    pointer (``arr[p + 1]`` may be at ``hi``), as :func:`_has_pcir` judges one."""
    size = len(arr)
    hi = min(hi, size - 0x1A)  # the pointer at +0x18 must be in the file
    if hi <= lo:
        return None
    # 32-bit positions when they fit: half the memory traffic.
    index: type[np.signedinteger[Any]] = np.int64 if size >= 1 << 31 else np.int32
    mask = arr[lo:hi] == 0x55
    mask &= arr[lo + 1 : hi + 1] == 0xAA
    ptr = arr[lo + 0x18 : hi + 0x18].astype(index)
    ptr |= arr[lo + 0x19 : hi + 0x19].astype(index) << 8
    mask &= ptr != 0
    rel = np.flatnonzero(mask).astype(index)
    at = rel + ptr[rel] + lo
    ok = at <= size - 4
    rel, at = rel[ok], at[ok]
    first = arr[at]
    ok = (first == PCIR_SIGNATURE[0]) | (first == NPDS_SIGNATURE[0])
    rel, at = rel[ok], at[ok]
    sig = arr[at].astype(np.uint32)
    for k in (1, 2, 3):
        sig |= arr[at + k].astype(np.uint32) << (8 * k)
    found = np.flatnonzero((sig == _PCIR_U32) | (sig == _NPDS_U32))
    return int(rel[found[0]]) + lo if len(found) else None


def _flat(buf: Buffer) -> memoryview:
    """A new flat byte view of ``buf``; the caller releases it (an mmap can then close)."""
    view = memoryview(buf)
    if view.format == "B" and view.ndim == 1:
        return view
    flat = view.cast("B")
    view.release()
    return flat


# --- the parts of an image -------------------------------------------------------


class _Image:
    """Mutable scratch while one image is read; turned into a RomImage at the end."""

    def __init__(self, index: int, pos: int) -> None:
        self.index = index
        self.pos = pos
        self.problems: list[RomProblem] = []
        self.notes: list[str] = []

    def problem(self, offset: int, kind: ProblemKind, message: str) -> None:
        self.problems.append(RomProblem(offset, kind, f"image {self.index}: {message}"))


def _swapped_class(raw: bytes) -> int | None:
    """The intended class when ``raw`` (prog-if, sub, base) has the base class first."""
    prog_if, sub, base = raw
    # Base class 0 with a "prog-if" that is a real base class (1..0x13) is
    # iPXE's byte order; a genuine class-0 device has prog-if 0.
    if base == 0 and 0x01 <= prog_if <= 0x13:
        return (prog_if << 16) | (sub << 8) | base
    return None


def _read_pcir(view: memoryview, im: _Image, at: int, image_end: int) -> Pcir | None:
    if not _fits(view, at, _PCIR.size):
        im.problem(at, ProblemKind.TRUNCATED,
                   f"PCIR at {at:#x} needs {_PCIR.size} bytes, the file ends at {len(view):#x}")
        return None
    (sig, vendor, device, devlist, length, revision, cls, ilen, coderev, ctype, indicator
     ) = _PCIR.unpack_from(view, at)  # fmt: skip
    if sig == NPDS_SIGNATURE:
        im.notes.append("PCI data structure signed 'NPDS' (NVIDIA); SeaBIOS looks for 'PCIR'")
    if at % 4:
        im.notes.append(f"PCIR at {at:#x} is not DWORD-aligned (the spec asks for it; "
                        "SeaBIOS and QEMU read it anyway)")
    if length < PCIR_MIN_LENGTH:
        im.problem(at + 0x0A, ProblemKind.STRUCTURE,
                   f"PCIR length {length:#x}, expected at least {PCIR_MIN_LENGTH:#x}")
    raw_class = cls[0] | cls[1] << 8 | cls[2] << 16
    fixed = _swapped_class(cls)
    if fixed is not None:
        im.problem(at + 0x0D, ProblemKind.CLASS_SWAPPED,
                   f"class code bytes {cls.hex(' ')} read as {raw_class:#08x}; the base class "
                   f"comes first, as old iPXE builds write it: meant {fixed:#08x}")
    if ilen == 0:
        im.problem(at + 0x10, ProblemKind.STRUCTURE, "PCIR image length is 0")
    max_runtime = config = clp = None
    device_list: tuple[int, ...] = ()
    if revision >= 3 and length >= 0x1C and _fits(view, at, 0x1C):
        max_units, cfg_ptr, clp_ptr = struct.unpack_from("<HHH", view, at + 0x16)
        max_runtime = max_units * UNIT
        if cfg_ptr:
            config = im.pos + cfg_ptr
            if config >= image_end:
                im.problem(at + 0x18, ProblemKind.STRUCTURE,
                           f"config utility pointer {cfg_ptr:#x} is outside the image")
        if clp_ptr:
            clp = im.pos + clp_ptr
            if clp >= image_end:
                im.problem(at + 0x1A, ProblemKind.STRUCTURE,
                           f"DMTF CLP pointer {clp_ptr:#x} is outside the image")
    if revision >= 3 and devlist:
        device_list = _read_device_list(view, im, at, at + devlist)
    return Pcir(
        offset=at, signature=sig.decode("ascii"), vendor_id=vendor, device_id=device,
        device_list_pointer=devlist, device_list=device_list, length=length,
        revision=revision, class_code_raw=raw_class,
        class_code=raw_class if fixed is None else fixed, image_length=ilen * UNIT,
        code_revision=coderev, code_type=ctype, indicator=indicator,
        max_runtime_length=max_runtime, config_utility_offset=config, clp_offset=clp,
    )  # fmt: skip


def _read_device_list(view: memoryview, im: _Image, pcir_at: int, at: int) -> tuple[int, ...]:
    # One numpy look at the at most _MAX_DEVICE_LIST words: a ROM of 32,768
    # images with full lists took 5 s read a word at a time.
    have = max(0, min(len(view) - at, 2 * _MAX_DEVICE_LIST)) // 2
    words = np.frombuffer(view[at : at + 2 * have], dtype="<u2")
    zeros = np.flatnonzero(words == 0)
    if len(zeros):
        return tuple(words[: zeros[0]].tolist())
    if have < _MAX_DEVICE_LIST:
        im.problem(pcir_at + 0x08, ProblemKind.STRUCTURE,
                   f"device list at {at:#x} runs past the end of the file")
    else:
        im.problem(pcir_at + 0x08, ProblemKind.STRUCTURE,
                   f"device list at {at:#x} has no 0 terminator in {_MAX_DEVICE_LIST} entries")
    return tuple(words.tolist())


def _cstring(view: memoryview, at: int, limit: int) -> str | None:
    if not 0 <= at < limit:
        return None
    raw = bytes(view[at : min(at + _MAX_PNP_STRING, limit)])
    text = raw.split(b"\0", 1)[0]
    return text.decode("latin-1")


def _read_pnp(view: memoryview, im: _Image, ptr: int, image_end: int) -> PnpHeader | None:
    at = im.pos + ptr
    if not _fits(view, at, 4):
        im.notes.append(f"PnP pointer {ptr:#x} points past the end of the file")
        return None
    if bytes(view[at : at + 4]) != PNP_SIGNATURE:
        # ISA ROMs such as sgabios use these bytes for code: only a note.
        return None
    if not _fits(view, at, _PNP.size):
        im.problem(at, ProblemKind.TRUNCATED, "$PnP header runs past the end of the file")
        return None
    (_, rev, units, nxt, _r, _ck, devid, manu, prod, dtype, ind, bcv, dv, bev, _r2, _sr
     ) = _PNP.unpack_from(view, at)  # fmt: skip
    length = units * 16
    ok = length > 0 and _fits(view, at, length) and byte_sum(view, at, at + length) == 0
    if not ok:
        im.notes.append(f"$PnP header at {at:#x}: its checksum is not 0 (BIOSes do not check it)")
    limit = min(image_end, len(view))
    return PnpHeader(
        offset=at, revision=rev, length=length, next_offset=nxt, checksum_ok=ok,
        device_id=devid, manufacturer=_cstring(view, im.pos + manu, limit) if manu else None,
        product=_cstring(view, im.pos + prod, limit) if prod else None,
        device_type=dtype[0] << 16 | dtype[1] << 8 | dtype[2], indicators=ind,
        bcv=bcv, dv=dv, bev=bev,
    )  # fmt: skip


def _read_efi(view: memoryview, im: _Image, image_end: int) -> EfiHeader | None:
    pos = im.pos
    if not _fits(view, pos, 0x18):
        im.problem(pos, ProblemKind.TRUNCATED, "EFI header runs past the end of the file")
        return None
    init_units, sig, subsystem, machine, compression = _EFI.unpack_from(view, pos + 2)
    (img_off,) = _U16.unpack_from(view, pos + 0x16)
    if sig != EFI_SIGNATURE:
        im.problem(pos + 4, ProblemKind.STRUCTURE,
                   f"EFI signature {sig:#x}, expected {EFI_SIGNATURE:#x}")
    if compression not in EFI_COMPRESSIONS:
        im.problem(pos + 0x0C, ProblemKind.STRUCTURE,
                   f"EFI compression type {compression}, expected 0 or 1")
    init_size = init_units * UNIT
    if pos + init_size > image_end:
        im.problem(pos + 2, ProblemKind.STRUCTURE,
                   f"EFI initialization size {init_size:#x} is larger than the image")
    start = pos + img_off
    if not img_off or start >= min(image_end, len(view)):
        im.problem(pos + 0x16, ProblemKind.STRUCTURE,
                   f"EFI image offset {img_off:#x} is outside the image")
    elif compression == 0 and bytes(view[start : start + 2]) != b"MZ":
        im.notes.append(f"uncompressed EFI image at {start:#x} does not start with 'MZ'")
    return EfiHeader(offset=pos, initialization_size=init_size, signature=sig,
                     subsystem=subsystem, machine_type=machine, compression=compression,
                     efi_image_offset=start)


def _read_npde(view: memoryview, rom_start: int, pcir: Pcir) -> Npde | None:
    # nouveau: 16-byte aligned after the PCIR, counted from the ROM's start.
    rel = pcir.offset - rom_start + max(pcir.length, PCIR_MIN_LENGTH)
    at = rom_start + ((rel + 0x0F) & ~0x0F)
    if not _fits(view, at, _NPDE.size) or bytes(view[at : at + 4]) != NPDE_SIGNATURE:
        return None
    _, revision, length, units, flags = _NPDE.unpack_from(view, at)
    return Npde(offset=at, revision=revision, length=length, image_length=units * UNIT,
                flags=flags)


# --- one image, then the chain ------------------------------------------------------


def _read_image(
    view: memoryview, index: int, pos: int, rom_start: int, via_npde: bool
) -> tuple[RomImage, int | None]:
    """Read the image at ``pos``; return it and the next image's offset (None: stop)."""
    size = len(view)
    im = _Image(index, pos)
    sig = bytes(view[pos : pos + 2])
    if sig != ROM_SIGNATURE:
        im.notes.append(f"signature {sig.hex(' ')} (NVIDIA, accepted after an NPDE chain)")
    if not _fits(view, pos, 0x1A):
        im.problem(pos, ProblemKind.TRUNCATED,
                   f"header needs 0x1a bytes, the file ends at {size:#x}")
        return _finish(view, im, sig, 0, size - pos, None, None, None, None, True, via_npde), None

    header_length = view[pos + 2] * UNIT
    ptr = _u16(view, pos + 0x18) or 0
    pcir: Pcir | None = None
    if ptr:
        at = pos + ptr
        found = bytes(view[at : at + 4]) if at < size else b""
        if at + 4 > size:
            im.problem(pos + 0x18, ProblemKind.STRUCTURE,
                       f"PCIR pointer {ptr:#x} points past the end of the file ({size:#x})")
        elif found not in (PCIR_SIGNATURE, NPDS_SIGNATURE):
            im.problem(pos + 0x18, ProblemKind.STRUCTURE,
                       f"PCIR pointer {ptr:#x} lands on {found!r} at {at:#x}, expected b'PCIR'")
        else:
            limit = pos + (_u16(view, at + 0x10) or 0) * UNIT
            pcir = _read_pcir(view, im, at, limit)
    else:
        im.notes.append("no PCI data structure (pointer at +0x18 is 0): an ISA-style ROM")

    # The length the chain steps by: PCIR, else the header's size byte.
    length = pcir.image_length if pcir and pcir.image_length else header_length
    last = pcir.last if pcir else True
    npde: Npde | None = None
    if pcir is not None and pcir.code_type == NVIDIA_FW_CODE_TYPE:
        last = True
    elif pcir is not None:
        npde = _read_npde(view, rom_start, pcir)
        if npde is not None and npde.image_length:
            if pcir.last and not npde.last:
                im.notes.append("PCIR marks the last image, NVIDIA's NPDE continues the chain")
            length, last = npde.image_length, npde.last

    efi = None
    if pcir is not None and pcir.code_type == CodeType.EFI:
        efi = _read_efi(view, im, pos + length)
    pnp = None
    if pcir is None or pcir.code_type == CodeType.X86:
        pnp_ptr = _u16(view, pos + 0x1A) or 0
        if pnp_ptr:
            pnp = _read_pnp(view, im, pnp_ptr, pos + length)

    checksummed = pcir is None or pcir.code_type == CodeType.X86
    if checksummed:
        if header_length == 0:
            im.problem(pos + 2, ProblemKind.STRUCTURE,
                       "initialization size is 0: a BIOS does not run this image")
        elif pcir is not None and header_length > length:
            im.problem(pos + 2, ProblemKind.STRUCTURE,
                       f"initialization size {header_length:#x} is larger than the PCIR image "
                       f"length {length:#x}")
    if length == 0:
        im.problem(pos, ProblemKind.CHAIN, "image length is 0: the chain would loop here")
        return _finish(view, im, sig, header_length, 0, pcir, pnp, efi, npde, True,
                       via_npde), None
    if pos + length > size:
        im.problem(pos, ProblemKind.TRUNCATED,
                   f"image length {length:#x} runs past the end of the file "
                   f"({size - pos:#x} bytes left)")
        return _finish(view, im, sig, header_length, length, pcir, pnp, efi, npde, last,
                       via_npde), None
    image = _finish(view, im, sig, header_length, length, pcir, pnp, efi, npde, last, via_npde)
    return image, None if last else pos + length


def _finish(
    view: memoryview, im: _Image, sig: bytes, header_length: int, length: int,
    pcir: Pcir | None, pnp: PnpHeader | None, efi: EfiHeader | None, npde: Npde | None,
    last: bool, via_npde: bool,
) -> RomImage:  # fmt: skip
    pos = im.pos
    checksummed = pcir is None or pcir.code_type == CodeType.X86
    end = pos + min(header_length or length, length) if checksummed else pos + length
    truncated = end > len(view)
    total = byte_sum(view, pos, end)
    ok = True
    if checksummed and header_length:
        ok = total == 0 and not truncated
        if truncated:
            if not any(p.kind is ProblemKind.TRUNCATED for p in im.problems):
                im.problem(pos, ProblemKind.TRUNCATED,
                           "checksummed bytes run past the end of the file")
        elif total:
            im.problem(pos, ProblemKind.CHECKSUM,
                       f"x86 image bytes {pos:#x}..{end:#x} sum to {total:#04x}, expected 0")
    elif not checksummed:
        im.notes.append(f"{code_type_name(pcir.code_type if pcir else None)} images carry no "
                        f"byte checksum (sum {total:#04x}, not checked)")
    return RomImage(
        index=im.index, offset=pos, length=length, signature=sig, header_length=header_length,
        pcir=pcir, pnp=pnp, efi=efi, npde=npde, checksummed=checksummed, checksum=total,
        checksum_ok=ok, last=last, via_npde=via_npde, problems=tuple(im.problems),
        notes=tuple(im.notes),
    )  # fmt: skip


def parse_rom(buf: Buffer, *, source: str = "<rom>") -> OptionRom:
    """Walk every image of the ROM in ``buf``.

    :raise FormatError: when ``buf`` holds no option ROM at all (no ``55 AA``
        at offset 0 and none anywhere whose pointer lands on "PCIR").  Any
        other damage is reported in the result's problems.
    """
    view = _flat(buf)
    try:
        return _walk(view, source)
    finally:
        view.release()


def _walk(view: memoryview, source: str) -> OptionRom:
    size = len(view)
    problems: list[RomProblem] = []
    # 55 AA at 0 starts the ROM when its pointer is 0 (an ISA ROM) or lands on
    # "PCIR"; otherwise it may be the start of a vendor header, and a later
    # header that does point at "PCIR" wins.
    at_zero = bytes(view[:2]) == ROM_SIGNATURE
    found = None
    nowhere = False  # the whole file was searched, and holds no header at all
    if not at_zero or (_u16(view, 0x18) and not _has_pcir(view, 0)):
        found = find_header(view)
        nowhere = found is None
        if at_zero and found is not None and len(view) > 2 and 0 < found <= view[2] * UNIT:
            # 55 AA at 0 whose size reaches the next image is image 0 with a broken
            # PCIR pointer, not a vendor header: walk it and report the pointer
            # (stripping it as a header would delete a BIOS).
            found = None
    if at_zero and found is None:
        start = 0
    else:
        if found is None:
            what = bytes(view[:2]).hex(" ") or "nothing"
            raise FormatError(source, 0, "signature",
                              f"{what}, expected 55 aa: no option ROM image here or at any "
                              "later offset (no 55 aa whose +0x18 pointer lands on 'PCIR')")
        start = found
        problems.append(RomProblem(0, ProblemKind.VENDOR_HEADER,
                                   f"{start:#x} bytes before the first image (a vendor or flash "
                                   "tool header): firmware reads the ROM from offset 0 and "
                                   "does not find this image there; `xenlab rom fix "
                                   "--strip-header` removes it"))
    images: list[RomImage] = []
    seen: set[int] = set()
    pos: int | None = start
    via_npde = False
    while pos is not None:
        if len(images) == MAX_IMAGES:
            problems.append(RomProblem(pos, ProblemKind.CHAIN,
                                       f"image {len(images) - 1} says more images follow; the "
                                       f"walk stops after {MAX_IMAGES} images (real ROMs hold a "
                                       "handful)"))
            break
        if pos in seen:  # cannot happen with positive lengths; kept as a guard
            problems.append(RomProblem(pos, ProblemKind.CHAIN, f"the chain loops back to {pos:#x}"))
            break
        seen.add(pos)
        if pos + 2 > size:
            problems.append(RomProblem(pos, ProblemKind.CHAIN,
                                       f"image {len(images) - 1} says more images follow, but "
                                       f"the file ends at {size:#x}"))
            break
        sig = bytes(view[pos : pos + 2])
        if sig != ROM_SIGNATURE and not (via_npde and sig in NVIDIA_SIGNATURES):
            problems.append(RomProblem(pos, ProblemKind.CHAIN,
                                       f"image {len(images) - 1} says more images follow, but "
                                       f"{pos:#x} holds {sig.hex(' ')}, not 55 aa"))
            break
        image, nxt = _read_image(view, len(images), pos, start, via_npde)
        images.append(image)
        if image.pcir is not None and image.pcir.last and nxt is not None:
            via_npde = True
        pos = nxt
    last = images[-1]
    end = min(last.end, size)
    trailer = size - end
    fill = _fill_of(view, end, size)
    # After a broken chain the rest is what the chain pointed at, already reported.
    broken = any(p.kind is ProblemKind.CHAIN for p in problems)
    if trailer and fill is None and not broken:
        # A search of the whole file that found nothing need not run again.
        hidden = None if nowhere else find_header(view, end)
        if hidden is not None:
            problems.append(RomProblem(hidden, ProblemKind.TRAILER,
                                       f"an image at {hidden:#x} lies after the last image "
                                       "(firmware never reaches it)"))
        else:
            problems.append(RomProblem(end, ProblemKind.TRAILER,
                                       f"{trailer:#x} bytes of data (not 0xff/0x00 padding) "
                                       "after the last image"))
    return OptionRom(source=source, size=size, header_offset=start, images=tuple(images),
                     end=end, trailer_length=trailer, trailer_fill=fill,
                     problems=tuple(problems))
