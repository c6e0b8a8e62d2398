"""Small microcode fixtures built with the project's own writers (fresh clones test themselves)."""

from __future__ import annotations

import random

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
