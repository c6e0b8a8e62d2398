"""Small microcode fixtures built with the project's own writers (fresh clones test themselves)."""

from __future__ import annotations

import bz2
import lzma
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import lz4.block
import lz4.frame

from xenlab.formats.amd_ucode import EquivEntry, build_container, build_patch
from xenlab.formats.cpio import CpioMember, write_newc
from xenlab.formats.intel_ucode import build_update


def payload(n: int, seed: int) -> bytes:
    """``n`` pseudo-random bytes (a multiple of 4) standing in for an update's body."""
    return random.Random(seed).randbytes(n)


def intel(
    sig: int,
    rev: int,
    pf: int,
    *,
    ext: tuple[tuple[int, int], ...] = (),
    date: str = "2024-05-06",
    size: int = 2000,
    seed: int = 0,
) -> bytes:
    """One valid Intel update."""
    return build_update(
        signature=sig,
        revision=rev,
        platform_mask=pf,
        date=date,
        payload=payload(size, seed or sig ^ rev),
        ext=ext,
    )


# Three Intel updates: an old and a new one for 0x906a4/pf 0x80 (the new one
# reaching 0x906a3 too through its extended table), and one for platform 0x40.
INTEL_OLD = intel(0x906A4, 0x10, 0x80, date="2021-01-02", seed=1)
INTEL_NEW = intel(
    0x906A3, 0x43A, 0x80, ext=((0x906A3, 0x80), (0x906A4, 0x80)), date="2025-10-12", seed=2
)
INTEL_PF40 = intel(0x906A4, 0xB, 0x40, date="2025-06-13", seed=3)

AMD_EQUIV = (
    EquivEntry(0x00800F12, 0, 0, 0x8012),
    EquivEntry(0x00800F82, 0, 0, 0x8082),
)
AMD_P1 = build_patch(
    patch_id=0x08001227, processor_rev_id=0x8012, date="2018-11-14", body=payload(3200 - 64, 11)
)
AMD_P2 = build_patch(
    patch_id=0x0800820B, processor_rev_id=0x8082, date="2018-11-14", body=payload(3200 - 64, 12)
)
AMD_CONTAINER = build_container(AMD_EQUIV, [AMD_P1, AMD_P2])


def early_cpio(intel_blob: bytes = b"", amd_blob: bytes = b"", *, prefix: str = "") -> bytes:
    """An early-microcode newc archive as the kernel docs describe it."""
    members = [
        CpioMember(prefix + d, mode=0o040755)
        for d in ("kernel", "kernel/x86", "kernel/x86/microcode")
    ]
    if intel_blob:
        members.append(CpioMember(prefix + "kernel/x86/microcode/GenuineIntel.bin", intel_blob))
    if amd_blob:
        members.append(CpioMember(prefix + "kernel/x86/microcode/AuthenticAMD.bin", amd_blob))
    return write_newc(members, align=512)


# ------------------------------------------------------------------ bombs
#
# Small inputs that claim or decompress to gigabytes.  Headers and frames are
# written by hand with struct (not through xenlab's readers or writers), and
# the big runs of one byte cost nothing to build: zstd as RLE blocks, lz4
# legacy and deflate by repeating one compressed chunk.

NEWC_FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor",
               "devminor", "rdevmajor", "rdevminor", "namesize", "check")  # fmt: skip
NAMESIZE_AT = 6 + 8 * NEWC_FIELDS.index("namesize")  # 0x5e
FILESIZE_AT = 6 + 8 * NEWC_FIELDS.index("filesize")  # 0x36
Run = tuple[int, int]  # (byte, count): that byte, count times
Piece = bytes | Run


def newc_header(name: bytes, filesize: int, *, namesize: int | None = None,
                mode: int = 0o100644, magic: bytes = b"070701") -> bytes:
    """A newc (or crc) header, then ``name`` and its NUL, padded to 4 bytes.

    With ``namesize`` larger than the name, the name written is cut short:
    the bytes after it (in the stream) are what the header claims as name.
    """
    size = len(name) + 1 if namesize is None else namesize
    values = dict.fromkeys(NEWC_FIELDS, 0) | {"ino": 1, "mode": mode, "nlink": 1,
                                              "filesize": filesize, "namesize": size}
    head = magic + b"".join(b"%08X" % values[f] for f in NEWC_FIELDS)
    if namesize is not None and namesize > len(name) + 1:
        return head + name
    body = head + name + b"\0"
    return body + bytes(-len(body) % 4)


def odc_header(name: bytes, filesize: int, *, namesize: int | None = None,
               mode: int = 0o100644) -> bytes:
    """An odc (070707) header and name (no padding in this format)."""
    size = len(name) + 1 if namesize is None else namesize
    fields = [(0, 6), (1, 6), (mode, 6), (0, 6), (0, 6), (1, 6), (0, 6), (0, 11), (size, 6),
              (filesize, 11)]  # fmt: skip
    head = b"070707" + b"".join(b"%0*o" % (w, v) for v, w in fields)
    return head + name + (b"" if namesize is not None and namesize > len(name) + 1 else b"\0")


def trailer() -> bytes:
    """A newc trailer entry."""
    return newc_header(b"TRAILER!!!", 0, mode=0)


def zstd_frame(pieces: list[Piece], *, window_log: int = 17) -> bytes:
    """One zstd frame (RFC 8878): raw blocks for bytes, RLE blocks for runs.

    No content size, no checksum; RLE blocks carry 128 KiB each, so a
    gigabyte of one byte is 8192 blocks of 4 bytes.
    """
    out = bytearray(b"\x28\xb5\x2f\xfd\x00" + bytes([(window_log - 10) << 3]))
    blocks: list[tuple[int, int, bytes]] = []  # (type, size field, content)
    for piece in pieces:
        if isinstance(piece, bytes):
            for i in range(0, len(piece), 1 << 17):
                part = piece[i : i + (1 << 17)]
                blocks.append((0, len(part), part))
        else:
            byte, count = piece
            while count:
                n = min(count, 1 << 17)
                blocks.append((1, n, bytes([byte])))
                count -= n
    if not blocks:
        blocks.append((0, 0, b""))
    for i, (kind, size, content) in enumerate(blocks):
        last = int(i == len(blocks) - 1)
        out += struct.pack("<I", (size << 3) | (kind << 1) | last)[:3] + content
    return bytes(out)


def _chunks(pieces: list[Piece], size: int) -> Iterator[tuple[bytes, int]]:
    """``(data, repeat)`` pairs spelling ``pieces``: a run is one chunk repeated, then the rest."""
    for piece in pieces:
        if isinstance(piece, bytes):
            yield piece, 1
            continue
        byte, count = piece
        full, rest = divmod(count, size)
        if full:
            yield bytes([byte]) * size, full
        if rest:
            yield bytes([byte]) * rest, 1


def gzip_stream(pieces: list[Piece]) -> bytes:
    """A gzip member of ``pieces``.

    Each chunk is deflated and fully flushed, which resets the compressor's
    history, so a run's 1 MiB chunk compresses to the same bytes every time:
    it is compressed once and its output repeated.
    """
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    crc = size = 0
    body: list[bytes] = []
    for data, repeat in _chunks(pieces, 1 << 20):
        body.append((deflate.compress(data) + deflate.flush(zlib.Z_FULL_FLUSH)) * repeat)
        for _ in range(repeat):
            crc = zlib.crc32(data, crc)
        size += len(data) * repeat
    head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return head + b"".join(body) + deflate.flush() + struct.pack("<II", crc, size & 0xFFFFFFFF)


def lz4_legacy(pieces: list[Piece]) -> bytes:
    """The lz4 legacy format (``lz4 -l``): magic, then (le32 size, block) of up to 8 MiB each."""
    out = bytearray(struct.pack("<I", 0x184C2102))
    for data, repeat in _chunks(pieces, 8 << 20):
        block = lz4.block.compress(data, store_size=False)
        out += (struct.pack("<I", len(block)) + block) * repeat
    return bytes(out)


def stream_compress(pieces: list[Piece], compressor: Callable[[], object]) -> bytes:
    """``pieces`` through a library compressor object (bzip2, xz, lzma, lz4 frame)."""
    comp: Any = compressor()
    out = [comp.begin()] if hasattr(comp, "begin") else []
    for data, repeat in _chunks(pieces, 1 << 20):
        out.extend(comp.compress(data) for _ in range(repeat))
    out.append(comp.flush())
    return b"".join(out)


def bomb(compression: str, pieces: list[Piece]) -> bytes:
    """``pieces`` compressed as ``compression`` (one of the kernel's names and "lz4-frame")."""
    if compression == "zstd":
        return zstd_frame(pieces)
    if compression == "gzip":
        return gzip_stream(pieces)
    if compression == "lz4":
        return lz4_legacy(pieces)
    makers: dict[str, Callable[[], object]] = {
        "bzip2": lambda: bz2.BZ2Compressor(9),
        "xz": lambda: lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                                          preset=0),
        "lzma": lambda: lzma.LZMACompressor(format=lzma.FORMAT_ALONE, preset=0),
        "lz4-frame": lambda: lz4.frame.LZ4FrameCompressor(),
    }
    return stream_compress(pieces, makers[compression])


BOMB_COMPRESSIONS = ("gzip", "bzip2", "xz", "lzma", "zstd", "lz4", "lz4-frame")
