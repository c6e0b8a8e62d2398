"""Lay updates out as the kernel's firmware files or as bundles: :func:`firmware_files`.

- Intel: ``intel-ucode/FF-MM-SS`` (display family, model, stepping in hex),
  one file per signature the update covers, extended signatures included, as
  linux-firmware ships them and ``iucode_tool -K`` writes them.
- AMD: ``amd-ucode/microcode_amd.bin`` for families below 0x15 and
  ``amd-ucode/microcode_amd_famXXh.bin`` above, each one container holding
  the equivalence entries its patches need.

Duplicates (the same bytes found twice) are written once.  Writing goes
through :func:`write_tree`, which refuses any path outside the target.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath

from xenlab.atomic import atomic_write_bytes
from xenlab.errors import XenlabError
from xenlab.formats.amd_ucode import EquivEntry, build_container
from xenlab.formats.cpio import safe_member_path
from xenlab.ucode.cpu import Vendor, fms_from_signature
from xenlab.ucode.update import Update


def unique(updates: Iterable[Update]) -> list[Update]:
    """``updates`` without byte-identical repeats, in first-seen order."""
    seen: set[bytes] = set()
    out: list[Update] = []
    for u in updates:
        if u.raw not in seen:
            seen.add(u.raw)
            out.append(u)
    return out


def newest_only(updates: Iterable[Update]) -> list[Update]:
    """Keep, per signature and platform (Intel) or equivalence id (AMD), the newest revision."""
    best: dict[tuple[object, ...], Update] = {}
    order: list[tuple[object, ...]] = []
    for u in unique(updates):
        keys: list[tuple[object, ...]]
        if u.vendor is Vendor.INTEL:
            keys = [("intel", s, m) for s, m in u.platforms]
        else:
            keys = [("amd", u.equiv_id, tuple(u.signatures))]
        for k in keys:
            if k not in best:
                order.append(k)
                best[k] = u
            elif (u.revision, u.date) > (best[k].revision, best[k].date):
                best[k] = u
    return unique(best[k] for k in order)


def intel_name(signature: int) -> str:
    """The firmware file name of an Intel signature: ``FF-MM-SS``."""
    fam, model, step = fms_from_signature(signature)
    return f"{fam:02x}-{model:02x}-{step:02x}"


def amd_name(family: int) -> str:
    """The linux-firmware container name for an AMD family."""
    return "microcode_amd.bin" if family < 0x15 else f"microcode_amd_fam{family:x}h.bin"


def amd_container(updates: Sequence[Update]) -> bytes:
    """One AMD container holding ``updates`` and the equivalence entries they need."""
    equiv: list[EquivEntry] = []
    for u in updates:
        for e in u.equiv:
            if e not in equiv:
                equiv.append(e)
    return build_container(equiv, [u.raw for u in updates])


def intel_bundle(updates: Iterable[Update]) -> bytes:
    """Intel updates concatenated: the ``GenuineIntel.bin`` / ``.bin`` bundle format."""
    return b"".join(u.raw for u in unique(u for u in updates if u.vendor is Vendor.INTEL))


def amd_bundle(updates: Iterable[Update]) -> bytes:
    """AMD patches as containers back to back, one per family (``AuthenticAMD.bin``)."""
    by_family: dict[int, list[Update]] = {}
    for u in unique(u for u in updates if u.vendor is Vendor.AMD):
        by_family.setdefault(u.family or 0, []).append(u)
    return b"".join(amd_container(by_family[f]) for f in sorted(by_family))


def firmware_files(updates: Iterable[Update]) -> dict[PurePosixPath, bytes]:
    """The kernel firmware layout of ``updates``: relative path -> file bytes."""
    intel: dict[str, list[Update]] = {}
    amd: dict[str, list[Update]] = {}
    for u in unique(updates):
        if u.vendor is Vendor.INTEL:
            for sig in dict.fromkeys(u.signatures):
                intel.setdefault(intel_name(sig), []).append(u)
        else:
            amd.setdefault(amd_name(u.family or 0), []).append(u)
    files: dict[PurePosixPath, bytes] = {}
    for name, ups in sorted(intel.items()):
        # Order does not matter to the kernel (it picks the best fit in the
        # file); iucode_tool -K puts wider platform masks first, and so do we,
        # so that the two tools' files are byte-identical.
        def width(u: Update, _name: str = name) -> int:
            return -max(m for s, m in u.platforms if intel_name(s) == _name)

        files[PurePosixPath("intel-ucode", name)] = b"".join(u.raw for u in sorted(ups, key=width))
    for name, ups in sorted(amd.items()):
        files[PurePosixPath("amd-ucode", name)] = amd_container(ups)
    return files


def write_tree(target: Path, files: Mapping[PurePosixPath, bytes]) -> list[Path]:
    """Write ``files`` under ``target`` atomically; never outside it.

    Every path is checked before anything is written, so a bad one changes
    nothing.
    """
    root = target.resolve()
    planned: list[tuple[Path, bytes]] = []
    for rel, data in files.items():
        safe = safe_member_path(str(rel))
        dest = (root / safe).resolve() if safe is not None else None
        if dest is None or not dest.is_relative_to(root) or dest == root:
            raise XenlabError(f"{target}: refusing to write {str(rel)!r} outside the target")
        planned.append((dest, data))
    written: list[Path] = []
    for dest, data in planned:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(dest, data)
        except OSError as err:
            raise XenlabError(f"{dest}: cannot write: {err.strerror or err}") from err
        written.append(dest)
    return written
