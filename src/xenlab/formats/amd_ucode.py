"""AMD microcode containers (``amd-ucode/microcode_amd*.bin``): read them with `parse_container`.

A container is a magic, an equivalence table (CPU signature to 16-bit
equivalence id) and patch sections; several may follow each other
(`iter_containers`), `find_containers` recovers them inside unknown data, and
`build_patch` and `build_container` write them.  Only headers and tables are
read, never the patch body's meaning.  No checksum holds for every family, so
``checksum_ok`` is ``None`` (unknown) from family 14h on, ``size_ok`` checks
Xen's ``verify_patch_size`` table, and anything structurally unsound raises
`FormatError`.  Lengths are checked before they are read, and
``MAX_EQUIV_ENTRIES``, ``MAX_PATCHES`` and the search's cost bound raise
``LimitError``.  The design (the layout, checksums, families and bounds) is in
docs/formats.md, section AMD microcode.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from xenlab.errors import FormatError, TruncatedError
from xenlab.formats.buffer import Buffer, LimitError, size_text
from xenlab.formats.intel_ucode import decode_bcd_date, dword_sum, encode_bcd_date

CONTAINER_MAGIC = 0x00414D44
EQUIV_TYPE = 0
PATCH_TYPE = 1
CONTAINER_HEADER_SIZE = 12
SECTION_HEADER_SIZE = 8
EQUIV_ENTRY_SIZE = 16
PATCH_HEADER_SIZE = 64
_MAGIC = struct.pack("<I", CONTAINER_MAGIC)
_EQUIV = struct.Struct("<IIIHH")
_PATCH = struct.Struct("<IIHBBIIIHBBB3x8I")
_M32 = 0xFFFFFFFF
# A container starts with the magic and the equivalence-table type 0.
_CANDIDATE = re.compile(re.escape(_MAGIC + struct.pack("<I", EQUIV_TYPE)))
# What one container may hold before LimitError (see the module's Bounds).
MAX_EQUIV_ENTRIES = 1024
MAX_PATCHES = 1024
# find_containers may scan this many times the searched length (plus the
# floor) in candidates it rejects before it gives up.
_SEARCH_WORK_FACTOR = 8
_SEARCH_WORK_FLOOR = 64 << 20
# The least a rejected candidate is charged: about what its Python costs.
_REJECT_COST = 4096

# Maximum patch sizes (the section length) per family, from Xen's
# verify_patch_size and Linux's F1XH/F14H limits.  Families not listed
# (0x13, 0x18 Hygon, 0x1b and later, ...) have no known limit.
_MAX_PATCH_SIZE = {
    0x10: 2048,
    0x11: 2048,
    0x12: 2048,
    0x14: 1824,
    0x15: 4096,
    0x16: 3458,
    0x17: 3200,
    0x19: 5568,
    0x1A: 15296,
}


@dataclass(frozen=True, slots=True)
class EquivEntry:
    """One equivalence-table entry: a CPU signature and the equivalence id its patches use."""

    installed_cpu: int
    fixed_errata_mask: int
    fixed_errata_compare: int
    equiv_id: int


@dataclass(frozen=True, slots=True)
class AmdPatch:
    """One patch section's header (``offset`` is the patch header, after the section header)."""

    offset: int
    size: int
    date: str
    date_raw: int
    patch_id: int
    processor_rev_id: int
    data_id: int
    data_len: int
    init_flag: int
    checksum: int
    nb_dev_id: int
    sb_dev_id: int
    nb_rev_id: int
    sb_rev_id: int
    bios_api_rev: int
    family: int
    size_ok: bool
    problems: tuple[str, ...]
    checksum_ok: bool | None = None

    @property
    def end(self) -> int:
        """Offset just past the patch: where the next section starts."""
        return self.offset + self.size


@dataclass(frozen=True, slots=True)
class AmdContainer:
    """One container: its equivalence table (without the terminator) and its patches."""

    offset: int
    end: int
    equiv_table: tuple[EquivEntry, ...]
    patches: tuple[AmdPatch, ...]
    problems: tuple[str, ...] = ()

    def signatures_for(self, patch: AmdPatch) -> tuple[int, ...]:
        """The CPU signatures whose equivalence id is the patch's ``processor_rev_id``."""
        return tuple(
            e.installed_cpu for e in self.equiv_table if e.equiv_id == patch.processor_rev_id
        )


def family_of(signature: int) -> int:
    """The family of a CPUID(1).EAX signature (0x800f12 -> 0x17)."""
    base = (signature >> 8) & 0xF
    return base + ((signature >> 20) & 0xFF) if base == 0xF else base


def patch_family(processor_rev_id: int) -> int:
    """The family a patch is for, from its 16-bit equivalence id (0x8012 -> 0x17)."""
    return 0xF + ((processor_rev_id >> 12) & 0xF)


def max_patch_size(family: int) -> int | None:
    """The largest patch (section length) the loaders accept for ``family``; None if unknown."""
    return _MAX_PATCH_SIZE.get(family)


def _view(buf: Buffer) -> memoryview:
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _patch(
    view: memoryview, at: int, size: int, equiv_ids: frozenset[int], source: str
) -> AmdPatch:
    (
        date_raw,
        patch_id,
        data_id,
        data_len,
        init_flag,
        checksum,
        nb_dev_id,
        sb_dev_id,
        rev_id,
        nb_rev_id,
        sb_rev_id,
        bios_api_rev,
        *_match,
    ) = _PATCH.unpack_from(view, at)
    date, date_problems = decode_bcd_date(date_raw)
    problems = list(date_problems)
    family = patch_family(rev_id)
    limit = max_patch_size(family)
    size_ok = limit is None or size <= limit
    if not size_ok:
        problems.append(f"patch of {size} bytes exceeds family {family:#x}'s maximum of {limit}")
    if nb_dev_id or sb_dev_id:
        problems.append(
            f"chipset-specific patch (nb_dev_id {nb_dev_id:#x}, sb_dev_id {sb_dev_id:#x}):"
            " Linux refuses it"
        )
    if rev_id not in equiv_ids:
        problems.append(f"no equivalence entry maps to processor_rev_id {rev_id:#06x}")
    checksum_ok: bool | None = None
    if data_len:
        body = (size - PATCH_HEADER_SIZE) & ~3
        total = dword_sum(view, at + PATCH_HEADER_SIZE, body)
        checksum_ok = total == checksum
        if not checksum_ok:
            problems.append(f"checksum {checksum:#010x}, the body's dword sum is {total:#010x}")
    return AmdPatch(
        offset=at,
        size=size,
        date=date,
        date_raw=date_raw,
        patch_id=patch_id,
        processor_rev_id=rev_id,
        data_id=data_id,
        data_len=data_len,
        init_flag=init_flag,
        checksum=checksum,
        nb_dev_id=nb_dev_id,
        sb_dev_id=sb_dev_id,
        nb_rev_id=nb_rev_id,
        sb_rev_id=sb_rev_id,
        bios_api_rev=bios_api_rev,
        family=family,
        size_ok=size_ok,
        problems=tuple(problems),
        checksum_ok=checksum_ok,
    )


def _parse(
    view: memoryview, offset: int, limit: int, source: str, *, recover: bool
) -> AmdContainer:
    have = limit - offset
    if offset < 0 or have < 0:
        raise FormatError(source, offset, "offset", f"outside the data (0..{limit:#x})")
    if have < CONTAINER_HEADER_SIZE:
        raise TruncatedError(source, offset, "container header", CONTAINER_HEADER_SIZE, have)
    magic, etype, elen = struct.unpack_from("<III", view, offset)
    if magic != CONTAINER_MAGIC:
        raise FormatError(
            source, offset, "magic", f"{magic:#010x}, expected {CONTAINER_MAGIC:#010x}"
        )
    if etype != EQUIV_TYPE:
        raise FormatError(
            source, offset + 4, "equiv_type", f"{etype}, expected {EQUIV_TYPE} (equivalence table)"
        )
    if elen < EQUIV_ENTRY_SIZE or elen % EQUIV_ENTRY_SIZE:
        raise FormatError(
            source,
            offset + 8,
            "equiv_len",
            f"{elen}, expected a nonzero multiple of {EQUIV_ENTRY_SIZE}",
        )
    table_at = offset + CONTAINER_HEADER_SIZE
    if elen > limit - table_at:
        raise TruncatedError(source, table_at, "equivalence table", elen, limit - table_at)
    count = _equiv_count(view, table_at, elen, source)
    entries = []
    for i in range(count):
        cpu, mask, compare, equiv_id, _res = _EQUIV.unpack_from(view, table_at + 16 * i)
        entries.append(EquivEntry(cpu, mask, compare, equiv_id))
    equiv_ids = frozenset(e.equiv_id for e in entries)

    patches: list[AmdPatch] = []
    problems: list[str] = []
    pos = table_at + elen
    while pos < limit:
        if limit - pos >= 4 and view[pos : pos + 4] == _MAGIC:
            break
        try:
            if limit - pos < SECTION_HEADER_SIZE:
                raise TruncatedError(
                    source, pos, "section header", SECTION_HEADER_SIZE, limit - pos
                )
            stype, slen = struct.unpack_from("<II", view, pos)
            if stype != PATCH_TYPE:
                raise FormatError(
                    source, pos, "section_type", f"{stype:#x}, expected {PATCH_TYPE} (patch)"
                )
            if slen < PATCH_HEADER_SIZE:
                raise FormatError(
                    source,
                    pos + 4,
                    "section_len",
                    f"{slen}, less than the {PATCH_HEADER_SIZE}-byte patch header",
                )
            if slen > limit - pos - SECTION_HEADER_SIZE:
                raise TruncatedError(
                    source, pos, "patch section", SECTION_HEADER_SIZE + slen, limit - pos
                )
            if len(patches) >= MAX_PATCHES:
                raise LimitError(
                    source, pos, "patch section",
                    f"more than {MAX_PATCHES} patches in one container (real ones have a "
                    "few dozen); the rest not read",
                    MAX_PATCHES,
                )
        except FormatError as err:
            if not recover:
                raise
            # Linux does the same: a bad section ends the container quietly.
            problems.append(f"container ends at a bad section: {err}")
            break
        patches.append(_patch(view, pos + SECTION_HEADER_SIZE, slen, equiv_ids, source))
        pos += SECTION_HEADER_SIZE + slen
    return AmdContainer(
        offset=offset,
        end=pos,
        equiv_table=tuple(entries),
        patches=tuple(patches),
        problems=tuple(problems),
    )


def _equiv_count(view: memoryview, table_at: int, elen: int, source: str) -> int:
    """How many entries come before the table's terminator (installed_cpu 0) or its end.

    Found in C: only the entries that count become objects, and a table
    with more than ``MAX_EQUIV_ENTRIES`` of them raises ``LimitError``.
    """
    total = elen // EQUIV_ENTRY_SIZE
    scan = min(total, MAX_EQUIV_ENTRIES + 1)
    part = view[table_at : table_at + scan * EQUIV_ENTRY_SIZE]
    try:
        cpus = np.frombuffer(part, dtype="<u4")[:: EQUIV_ENTRY_SIZE // 4]
        zeros = np.flatnonzero(cpus == 0)
        count = int(zeros[0]) if len(zeros) else scan
        del cpus, zeros
    finally:
        part.release()
    if count > MAX_EQUIV_ENTRIES:
        raise LimitError(
            source, table_at, "equivalence table",
            f"more than {MAX_EQUIV_ENTRIES} entries before its terminator (real tables "
            "have a few dozen); not read",
            MAX_EQUIV_ENTRIES,
        )
    return count


def _limit(view: memoryview, end: int | None) -> int:
    return len(view) if end is None else max(0, min(end, len(view)))


def parse_container(buf: Buffer, offset: int = 0, source: str = "<data>") -> AmdContainer:
    """Parse the container at ``offset``; it ends at the next magic or the end of the data.

    :raise TruncatedError: a header, the table or a patch runs past the data.
    :raise FormatError: bad magic, table type or length, or a section that is
        not a patch (the offset names the field).
    """
    with _view(buf) as view:
        return _parse(view, offset, len(view), source, recover=False)


def iter_containers(
    buf: Buffer, offset: int = 0, end: int | None = None, source: str = "<data>"
) -> Iterator[AmdContainer]:
    """Walk the containers stored back to back in ``buf[offset:end]``, strictly."""
    with _view(buf) as view:
        limit = _limit(view, end)
        pos = offset
        while pos < limit:
            container = _parse(view, pos, limit, source, recover=False)
            yield container
            pos = container.end


def find_containers(
    buf: Buffer,
    start: int = 0,
    end: int | None = None,
    source: str = "<data>",
    *,
    work: int | None = None,
) -> Iterator[AmdContainer]:
    """Recover the containers found anywhere in ``buf[start:end]``, at any alignment.

    A candidate is the magic followed by table type 0; one with a bad table is
    skipped, and a bad section (or one past ``MAX_PATCHES``) ends its
    container (noted in ``problems``), as Linux's loader does.

    :raise LimitError: rejected candidates (whose tables are scanned, up to
        ``MAX_EQUIV_ENTRIES`` entries each) cost more than ``work`` bytes
        (default: 8 times the searched length, plus 64 MiB); the containers
        yielded before it stand, the rest is not searched.
    """
    with _view(buf) as view:
        limit = _limit(view, end)
        pos = max(0, start)
        if work is None:
            work = _SEARCH_WORK_FACTOR * max(0, limit - pos) + _SEARCH_WORK_FLOOR
        spent = 0
        while pos < limit:
            match = _CANDIDATE.search(view, pos, limit)
            if match is None:
                return
            at = match.start()
            try:
                container = _parse(view, at, limit, source, recover=True)
            except FormatError:
                container = None
            if container is None or (not container.equiv_table and not container.patches):
                spent += _rejected_cost(view, at, limit)
                if spent > work:
                    raise LimitError(
                        source, at, "search",
                        f"rejected candidates overlap so much that checking them took more "
                        f"than {size_text(work)}; the rest ({at + 1:#x}..{limit:#x}) is "
                        "not searched",
                        work,
                    )
                pos = at + 1
                continue
            yield container
            pos = max(container.end, at + 1)


def _rejected_cost(view: memoryview, at: int, limit: int) -> int:
    """The bytes a rejected candidate at ``at`` may have made ``_parse`` look at."""
    if limit - at < CONTAINER_HEADER_SIZE:
        return _REJECT_COST
    elen: int = struct.unpack_from("<I", view, at + 8)[0]
    table = min(elen, (MAX_EQUIV_ENTRIES + 1) * EQUIV_ENTRY_SIZE)
    return max(_REJECT_COST, CONTAINER_HEADER_SIZE + table)


def build_patch(
    *,
    patch_id: int,
    processor_rev_id: int,
    date: str | int = "2020-01-01",
    body: bytes,
    data_id: int = 0x8000,
    data_len: int = 0,
    init_flag: int = 0,
    checksum: int | None = None,
    nb_dev_id: int = 0,
    sb_dev_id: int = 0,
    nb_rev_id: int = 0,
    sb_rev_id: int = 0,
    bios_api_rev: int = 0,
    match_reg: Sequence[int] = (0,) * 8,
) -> bytes:
    """A patch (64-byte header + ``body``), to be wrapped by `build_container`.

    ``checksum=None`` writes the dword sum of the body when ``data_len`` is
    nonzero (the family 10h-12h convention) and 0 otherwise.
    """
    if len(match_reg) != 8:
        raise ValueError(f"match_reg has {len(match_reg)} values, expected 8")
    if checksum is None:
        checksum = dword_sum(body, 0, len(body) & ~3) if data_len else 0
    header = _PATCH.pack(
        encode_bcd_date(date),
        patch_id,
        data_id,
        data_len,
        init_flag,
        checksum,
        nb_dev_id,
        sb_dev_id,
        processor_rev_id,
        nb_rev_id,
        sb_rev_id,
        bios_api_rev,
        *match_reg,
    )
    return header + body


def build_container(
    equiv: Sequence[EquivEntry], patches: Sequence[bytes], *, terminator: bool = True
) -> bytes:
    """A container: magic, the equivalence table (plus a zero terminator entry, as
    AMD's files have) and one patch section per patch from `build_patch`."""
    rows = [
        _EQUIV.pack(e.installed_cpu, e.fixed_errata_mask, e.fixed_errata_compare, e.equiv_id, 0)
        for e in equiv
    ]
    if terminator:
        rows.append(bytes(EQUIV_ENTRY_SIZE))
    table = b"".join(rows)
    out = bytearray(struct.pack("<III", CONTAINER_MAGIC, EQUIV_TYPE, len(table)))
    out += table
    for patch in patches:
        out += struct.pack("<II", PATCH_TYPE, len(patch))
        out += patch
    return bytes(out)
