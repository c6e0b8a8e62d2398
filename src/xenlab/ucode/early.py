"""Build the early-microcode cpio and put it in front of an initrd: :func:`build_early`.

The early archive is what Linux's early loader and Xen's ``ucode=scan`` read:
an *uncompressed* newc cpio, first in the initrd, holding
``kernel/x86/microcode/GenuineIntel.bin`` (Intel updates concatenated) and/or
``kernel/x86/microcode/AuthenticAMD.bin`` (AMD containers).  It is padded to
512 bytes, as GNU cpio and iucode_tool do, so the archive after it starts on
the 4-byte boundary the kernel's unpacker needs.

When the initrd already starts with uncompressed archives that hold only
``kernel/x86/microcode`` entries (an older early part), they are replaced
rather than left in front, where the loaders would still find the old files
first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from xenlab.formats import cpio
from xenlab.formats.buffer import Buffer
from xenlab.formats.cpio import CpioMember, SegmentKind
from xenlab.ucode.cpu import Vendor
from xenlab.ucode.extract import amd_bundle, intel_bundle
from xenlab.ucode.update import EARLY_NAMES, Update

_DIRS = ("kernel", "kernel/x86", "kernel/x86/microcode")
EARLY_ALIGN = 512


@dataclass(frozen=True, slots=True)
class EarlyImage:
    """A built image: its bytes and what went into it."""

    data: bytes
    early_size: int
    intel_count: int
    amd_count: int
    replaced_early: int  # bytes of an old early part that were dropped


def early_cpio(updates: Iterable[Update], *, mtime: int = 0) -> tuple[bytes, int, int]:
    """The early archive for ``updates``; returns (bytes, intel count, amd count)."""
    ups = list(updates)
    intel = intel_bundle(ups)
    amd = amd_bundle(ups)
    members = [CpioMember(d, mode=0o040755, mtime=mtime) for d in _DIRS]
    n_intel = sum(1 for u in ups if u.vendor is Vendor.INTEL)
    n_amd = sum(1 for u in ups if u.vendor is Vendor.AMD)
    if intel:
        members.append(CpioMember(EARLY_NAMES[Vendor.INTEL], intel, mtime=mtime))
    if amd:
        members.append(CpioMember(EARLY_NAMES[Vendor.AMD], amd, mtime=mtime))
    return cpio.write_newc(members, align=EARLY_ALIGN), n_intel, n_amd


def old_early_end(initrd: Buffer, source: str = "<initrd>") -> int:
    """Where a leading microcode-only early part of ``initrd`` ends (0 if none).

    Only archives whose every entry is ``kernel``, ``kernel/x86``, something
    under ``kernel/x86/microcode`` or the trailer count, with the NUL padding
    after them; anything else is kept.
    """
    offset = 0
    end = 0
    while True:
        seg = cpio.next_segment(initrd, offset, source=source)
        if seg is None or seg.end is None:
            return end
        if seg.kind is SegmentKind.PADDING:
            if end == offset:  # padding right after a dropped archive goes too
                end = seg.end
            offset = seg.end
            continue
        if seg.kind is not SegmentKind.CPIO:
            return end
        for e in seg.entries:
            name = e.name.removeprefix("./")
            if not (
                e.is_trailer
                or name in (".", "kernel", "kernel/x86")
                or name == "kernel/x86/microcode"
                or name.startswith("kernel/x86/microcode/")
            ):
                return end
        offset = end = seg.end


def build_early(
    updates: Iterable[Update],
    initrd: Buffer | None = None,
    *,
    keep_old_early: bool = False,
    source: str = "<initrd>",
) -> EarlyImage:
    """The early archive, followed by ``initrd`` (without its old early part) if given."""
    early, n_intel, n_amd = early_cpio(updates)
    if initrd is None:
        return EarlyImage(early, len(early), n_intel, n_amd, 0)
    cut = 0 if keep_old_early else old_early_end(initrd, source)
    # A Linux-bootable initrd keeps 4-byte alignment of every part: early is
    # 512-aligned, the rest starts where it started before, at a multiple of 4.
    return EarlyImage(early + bytes(initrd[cut:]), len(early), n_intel, n_amd, cut)
