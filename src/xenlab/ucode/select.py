"""Which update a CPU would load, and why not the others: :func:`select`.

The rules are the loaders' (Linux's and Xen's ``microcode/{intel,amd}.c``):

- Intel: an update fits when one of its signatures (the primary or an
  extended one) equals the CPU's and its platform mask has the CPU's platform
  bit (or both masks are 0, the pre-platform-id parts).  The highest revision
  wins, compared signed as Xen does; a revision not above the one the CPU
  runs is not loaded.
- AMD: the CPU's signature is looked up in the container's equivalence table;
  a patch fits when its equivalence id is the one found.  The highest patch
  id wins.

An unknown platform (a bare ``--cpu SIG``) matches every platform, as
``iucode_tool -s SIG`` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from xenlab.ucode.cpu import CpuId, Vendor
from xenlab.ucode.update import Update


@dataclass(frozen=True, slots=True)
class Verdict:
    """One update and what the selection made of it."""

    update: Update
    fits: bool
    chosen: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Selection:
    """The outcome of :func:`select`: the chosen update (if any) and every verdict."""

    cpu: CpuId
    chosen: Update | None
    verdicts: tuple[Verdict, ...]
    note: str | None = None

    @property
    def fitting(self) -> tuple[Update, ...]:
        """Every update that fits the CPU, chosen or not."""
        return tuple(v.update for v in self.verdicts if v.fits)


def _intel_fit(upd: Update, cpu: CpuId) -> tuple[bool, str]:
    sig_hits = [(s, m) for s, m in upd.platforms if s == cpu.signature]
    if not sig_hits:
        sigs = ", ".join(f"{s:#x}" for s in upd.signatures)
        return False, f"signature {sigs} is not {cpu.signature:#x}"
    if cpu.platform_mask is None:
        return True, "signature matches (platform unknown: any platform)"
    for s, m in sig_hits:
        if m & cpu.platform_mask or (m == 0 and cpu.platform_mask == 0):
            kind = "primary" if (s, m) == upd.platforms[0] else "extended"
            return True, f"{kind} signature {s:#x} and platform mask {m:#x} match"
    masks = ", ".join(f"{m:#x}" for _, m in sig_hits)
    return False, f"platform mask {masks} excludes this CPU's platform {cpu.platform_mask:#x}"


def _amd_fit(upd: Update, cpu: CpuId) -> tuple[bool, str]:
    if cpu.signature in upd.signatures:
        return True, f"equivalence table maps {cpu.signature:#x} to id {upd.equiv_id or 0:#06x}"
    if not upd.signatures:
        return False, f"no equivalence entry for id {upd.equiv_id or 0:#06x}"
    sigs = ", ".join(f"{s:#x}" for s in upd.signatures)
    return False, f"equivalence id {upd.equiv_id or 0:#06x} is for CPUs {sigs}"


def _fit(upd: Update, cpu: CpuId) -> tuple[bool, str]:
    if cpu.vendor is not None and upd.vendor is not cpu.vendor:
        return False, f"{upd.vendor.value} update, {cpu.vendor.value} CPU"
    if not upd.checksum_ok:
        return False, "fails its checks: " + ("; ".join(upd.problems) or "bad checksum")
    if upd.vendor is Vendor.INTEL:
        return _intel_fit(upd, cpu)
    return _amd_fit(upd, cpu)


def _key(upd: Update) -> tuple[int, str]:
    # Highest revision; on a tie the newer date, then the first found (stable max).
    return (upd.revision, upd.date)


def select(updates: Iterable[Update], cpu: CpuId) -> Selection:
    """Choose the update ``cpu`` would load from ``updates``, explaining every verdict."""
    items: Sequence[Update] = list(updates)
    fits = [(u, *_fit(u, cpu)) for u in items]
    fitting = [u for u, ok, _ in fits if ok]
    chosen: Update | None = None
    for u in fitting:
        if chosen is None or _key(u) > _key(chosen):
            chosen = u
    note = None
    if chosen is not None and cpu.microcode_revision is not None:
        running = cpu.microcode_revision
        if chosen.vendor is Vendor.INTEL:
            running = running - (1 << 32) if running & 0x80000000 else running
        if chosen.revision <= running:
            note = (
                f"the CPU already runs revision {cpu.microcode_revision:#x}; "
                f"{chosen.unsigned_revision:#x} is not newer, the loader would skip it"
            )
    verdicts: list[Verdict] = []
    for u, ok, why in fits:
        if u is chosen:
            verdicts.append(Verdict(u, True, True, why))
        elif ok and chosen is not None:
            if u.revision == chosen.revision:
                reason = f"same revision {u.unsigned_revision:#x} as the chosen one"
            else:
                reason = f"older revision {u.unsigned_revision:#x} < {chosen.unsigned_revision:#x}"
            verdicts.append(Verdict(u, True, False, reason))
        else:
            verdicts.append(Verdict(u, ok, False, why))
    return Selection(cpu, chosen, tuple(verdicts), note)
