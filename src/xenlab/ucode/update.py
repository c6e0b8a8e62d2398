"""One vendor-neutral view of a microcode update and where it was found: :class:`Update`.

``formats.intel_ucode`` and ``formats.amd_ucode`` describe their own headers;
the rest of the room (select, extract, build) wants one shape for both, plus
the place the update came from and its raw bytes.  :func:`update_to_json` is
the ``scan --json`` contract: extend it, never change it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from xenlab.formats.amd_ucode import AmdContainer, AmdPatch, EquivEntry
from xenlab.formats.intel_ucode import IntelUpdate
from xenlab.ucode.cpu import Vendor

# Where the early loaders look: Linux's load_ucode_{intel,amd}_bsp and Xen's
# ucode=scan both ask earlycpio for exactly these names.
EARLY_NAMES = {
    Vendor.INTEL: "kernel/x86/microcode/GenuineIntel.bin",
    Vendor.AMD: "kernel/x86/microcode/AuthenticAMD.bin",
}


class Container(Enum):
    """What held the update at the top level of the file."""

    BUNDLE = "bundle"  # a .bin/.dat bundle or an AMD container file
    CPIO = "cpio"  # an uncompressed cpio archive (an early initramfs)
    COMPRESSED = "compressed"  # a member of a compressed cpio archive
    DATA = "data"  # found by searching unknown bytes


@dataclass(frozen=True, slots=True)
class Location:
    """Where an update was found.

    ``offset`` is the update's offset inside the member's data when ``member``
    is set, and inside the file otherwise.  ``archive_offset`` is where the
    archive (or compressed stream) holding the member starts in the file.
    ``early`` is true when Linux's early loader and Xen's ``ucode=scan`` would
    read this update: the vendor's early name in an uncompressed archive.
    """

    file: str
    offset: int
    container: Container
    member: str | None = None
    archive_offset: int | None = None
    compression: str | None = None
    early: bool = False

    def __str__(self) -> str:
        if self.member is None:
            return f"{self.file}+{self.offset:#x}"
        where = f"{self.compression}@{self.archive_offset:#x}" if self.compression else (
            f"cpio@{self.archive_offset:#x}"
        )
        return f"{self.file}[{where}]:{self.member}+{self.offset:#x}"


@dataclass(frozen=True, slots=True)
class Update:
    """A microcode update of either vendor, with its raw bytes.

    ``view`` is a read-only slice of the scanned buffer (for a file, of its
    mapping, which stays open while any update refers to it): scanning copies
    nothing; ``raw`` copies on demand.

    Intel: ``platforms`` pairs each signature (primary first, then extended)
    with its platform mask; ``revision`` is signed as Xen compares it.
    AMD: ``signatures`` are the installed-CPU signatures whose equivalence id
    is the patch's; ``revision`` is the patch id; ``equiv`` keeps those
    equivalence entries so the patch can be written back as a container.
    """

    vendor: Vendor
    signatures: tuple[int, ...]
    platforms: tuple[tuple[int, int], ...]
    platform_mask: int | None
    revision: int
    date: str
    size: int
    checksum_ok: bool
    source: Location
    view: memoryview = field(repr=False)
    problems: tuple[str, ...] = ()
    equiv_id: int | None = None
    family: int | None = None
    equiv: tuple[EquivEntry, ...] = ()

    @property
    def raw(self) -> bytes:
        """The update's bytes (a copy; ``view`` is the zero-copy slice of the scanned data)."""
        return bytes(self.view)

    @property
    def unsigned_revision(self) -> int:
        """The revision as the 32-bit number tools print (``rev 0x...``)."""
        return self.revision & 0xFFFFFFFF


def from_intel(
    upd: IntelUpdate, view: memoryview, source: Location
) -> Update:
    """The neutral view of one parsed Intel update."""
    platforms = upd.signatures()
    return Update(
        vendor=Vendor.INTEL,
        signatures=tuple(s for s, _ in platforms),
        platforms=platforms,
        platform_mask=upd.platform_mask,
        revision=upd.revision,
        date=upd.date,
        size=upd.total_size,
        checksum_ok=upd.checksum_ok,
        source=source,
        view=view,
        problems=upd.problems,
        family=None,
    )


def from_amd(
    container: AmdContainer, patch: AmdPatch, view: memoryview, source: Location
) -> Update:
    """The neutral view of one AMD patch, with the equivalence entries that reach it."""
    equiv = tuple(e for e in container.equiv_table if e.equiv_id == patch.processor_rev_id)
    problems = list(patch.problems)
    if not equiv:
        problems.append(
            f"no equivalence table entry maps to equivalence id {patch.processor_rev_id:#06x}: "
            "no CPU can load this patch"
        )
    if not patch.size_ok:
        problems.append(f"patch size {patch.size} is over the family {patch.family:#x} maximum")
    return Update(
        vendor=Vendor.AMD,
        signatures=tuple(e.installed_cpu for e in equiv),
        platforms=(),
        platform_mask=None,
        revision=patch.patch_id,
        date=patch.date,
        size=patch.size,
        checksum_ok=patch.size_ok and bool(equiv),
        source=source,
        view=view,
        problems=tuple(problems),
        equiv_id=patch.processor_rev_id,
        family=patch.family,
        equiv=equiv,
    )


def location_to_json(loc: Location) -> dict[str, object]:
    """The ``source`` object of the scan contract."""
    return {
        "file": loc.file,
        "member": loc.member,
        "offset": loc.offset,
        "container": loc.container.value,
        "archive_offset": loc.archive_offset,
        "compression": loc.compression,
        "early": loc.early,
    }


def update_to_json(upd: Update) -> dict[str, object]:
    """One object of ``xenlab ucode scan --json``: the stable contract plus extensions."""
    return {
        "vendor": upd.vendor.value,
        "signatures": list(upd.signatures),
        "platform_mask": upd.platform_mask,
        "revision": upd.revision,
        "date": upd.date,
        "size": upd.size,
        "checksum_ok": upd.checksum_ok,
        "source": location_to_json(upd.source),
        # Extensions (after the contract's fields).
        "platforms": [{"signature": s, "platform_mask": m} for s, m in upd.platforms],
        "equiv_id": upd.equiv_id,
        "family": upd.family,
        "problems": list(upd.problems),
    }
