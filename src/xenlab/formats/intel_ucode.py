"""Intel microcode update files (SDM vol. 3A, 9.11): read them with `parse_update` / `iter_updates`.

An update is a 48-byte header, ``data_size`` bytes of opaque payload and maybe
an extended signature table; a ``.bin`` file is several back to back
(`iter_updates`), `find_updates` recovers them in unknown data as
``iucode_tool -tr`` does, `parse_dat` reads ``microcode.dat`` text and
`build_update` writes one.  The payload is only summed, never interpreted
(Intel's licence).  What is refused is the union of what Xen
(``microcode_sanity_check``), Linux and iucode_tool reject, so an accepted
file is accepted by all three; what a reader must still show (a bad checksum
or date, revision 0) goes in ``checksum_ok`` and ``problems``.  Sizes are
checked before anything is read, and ``MAX_EXT_SIGNATURES`` and the search's
cost bound raise ``LimitError``.  The design (the layout, the rules and the
bounds) is in docs/formats.md, section Intel microcode.
"""

from __future__ import annotations

import array
import re
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from xenlab.errors import FormatError, ParseError, TruncatedError
from xenlab.formats.buffer import Buffer, LimitError, size_text

HEADER_SIZE = 48
EXT_HEADER_SIZE = 20
EXT_ENTRY_SIZE = 12
LEGACY_DATA_SIZE = 2000
LEGACY_TOTAL_SIZE = 2048
_HEADER = struct.Struct("<IiIIIIIIIIII")
_EXT_HEADER = struct.Struct("<5I")
_EXT_ENTRY = struct.Struct("<3I")
_M32 = 0xFFFFFFFF
# The most extended signatures read from one update.  The SDM sets no bound;
# real updates list at most a few (06-97-05: 6), and each entry becomes
# Python objects about 16 times its 12 bytes.
MAX_EXT_SIGNATURES = 1024
# find_updates may sum this many times the length it searches (plus the
# floor) in candidates whose checksum fails before it gives up: real data
# has few such candidates; crafted data can overlap one every 48 bytes.
_SEARCH_WORK_FACTOR = 8
_SEARCH_WORK_FLOOR = 64 << 20
# What a candidate that fails a structural rule is charged: about what its
# Python costs (an exception, some 15 us) in numpy summing.  Random data has
# no candidates (28 fixed bytes); crafted data can put one every 48 bytes.
_REJECT_COST = 4096

# The bytes every real update has at fixed places: header version 1, loader
# version 1 at +20 and the reserved upper bytes of the platform flags at +25.
# A compiled regex finds these in C at any (also odd) offset.
_CANDIDATE = re.compile(rb"\x01\x00\x00\x00.{16}\x01\x00\x00\x00.\x00\x00\x00", re.DOTALL)
_CANDIDATE_LEN = 28
# find_updates looks at the data in chunks and skips all-zero chunks with
# numpy, which is far faster than any byte scan (sparse files, padding).
_SCAN_CHUNK = 1 << 22


@dataclass(frozen=True, slots=True)
class ExtSignature:
    """One entry of the extended signature table."""

    signature: int
    platform_mask: int
    checksum: int


@dataclass(frozen=True, slots=True)
class IntelUpdate:
    """One parsed update; sizes are the effective ones (0 in the header => 2000/2048)."""

    offset: int
    header_version: int
    revision: int
    date: str
    date_raw: int
    signature: int
    checksum: int
    loader_version: int
    platform_mask: int
    data_size: int
    total_size: int
    ext_signatures: tuple[ExtSignature, ...]
    ext_checksum: int | None
    checksum_ok: bool
    problems: tuple[str, ...]
    metadata_size: int = 0
    min_revision: int = 0

    @property
    def end(self) -> int:
        """Offset just past this update: where the next one of a bundle starts."""
        return self.offset + self.total_size

    def signatures(self) -> tuple[tuple[int, int], ...]:
        """``(signature, platform_mask)`` pairs: the primary one, then the extended ones."""
        ext = tuple((e.signature, e.platform_mask) for e in self.ext_signatures)
        return ((self.signature, self.platform_mask), *ext)


# --- helpers shared with amd_ucode -------------------------------------------


def decode_bcd_date(raw: int) -> tuple[str, tuple[str, ...]]:
    """Turn a packed-BCD ``0xMMDDYYYY`` dword into ``("YYYY-MM-DD", problems)``.

    The text always shows the nibbles as they are (as Xen prints them), so a
    bad date stays visible; each invalid part is described in ``problems``.
    """
    month = (raw >> 24) & 0xFF
    day = (raw >> 16) & 0xFF
    year = raw & 0xFFFF
    text = f"{year:04x}-{month:02x}-{day:02x}"
    problems: list[str] = []
    if raw == 0:
        return text, ("date is missing (0)",)
    if any(((raw >> shift) & 0xF) > 9 for shift in range(0, 32, 4)):
        problems.append(f"date {raw:#010x} is not packed BCD mmddyyyy")
        return text, tuple(problems)
    m = int(f"{month:x}")
    d = int(f"{day:x}")
    if not 1 <= m <= 12:
        problems.append(f"date {raw:#010x} has month {m}, expected 1..12")
    if not 1 <= d <= 31:
        problems.append(f"date {raw:#010x} has day {d}, expected 1..31")
    return text, tuple(problems)


_DATE_TEXT = re.compile(r"(\d{4})-(\d{2})-(\d{2})\Z")


def encode_bcd_date(date: str | int) -> int:
    """``"YYYY-MM-DD"`` -> packed-BCD ``0xMMDDYYYY``; an int is taken as the raw field."""
    if isinstance(date, int):
        if not 0 <= date <= _M32:
            raise ValueError(f"raw date {date:#x} does not fit 32 bits")
        return date
    m = _DATE_TEXT.match(date)
    if m is None:
        raise ValueError(f"date {date!r}, expected YYYY-MM-DD")
    year, month, day = m.groups()
    return int(month + day + year, 16)


def _view(buf: Buffer) -> memoryview:
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def dword_sum(buf: Buffer, offset: int, size: int) -> int:
    """Sum of the little-endian dwords in ``buf[offset:offset+size]``, mod 2**32.

    numpy sums in C over a view of the buffer (no copy): a 40 MB bundle takes
    milliseconds.  ``size`` must be a multiple of 4 and lie inside the buffer.
    """
    if size % 4:
        raise FormatError("<data>", offset, "size", f"{size} bytes is not a whole number of dwords")
    view = _view(buf)
    try:
        if offset < 0 or offset > len(view):
            raise FormatError("<data>", offset, "offset", f"outside the {len(view)}-byte buffer")
        if size > len(view) - offset:
            raise TruncatedError("<data>", offset, "dwords", size, len(view) - offset)
        part = view[offset : offset + size]
        try:
            words = np.frombuffer(part, dtype="<u4")
            # uint32 arithmetic wraps mod 2**32, which is the checksum's own
            # rule, and it sums four times faster than widening to uint64.
            total = int(np.add.reduce(words, dtype=np.uint32))
            del words
        finally:
            part.release()
    finally:
        view.release()
    return total


# --- reading -------------------------------------------------------------------


def _parse(view: memoryview, offset: int, limit: int, source: str) -> IntelUpdate:
    """The update at ``offset`` (the data ends at ``limit``), every field checked where the
    SDM's layout puts it; FormatError names the offset of the first thing wrong.

    Why one function: the header, the data, the extended signature table and the two
    checksums are checked in the layout's order, each check using sizes the earlier ones
    proved, so a hostile size is refused before anything reads past it.
    """
    have = limit - offset
    if offset < 0 or have < 0:
        raise FormatError(source, offset, "offset", f"outside the data (0..{limit:#x})")
    if have < HEADER_SIZE:
        raise TruncatedError(source, offset, "header", HEADER_SIZE, have)
    (
        hdrver,
        rev,
        date_raw,
        sig,
        cksum,
        ldrver,
        pf,
        raw_data,
        raw_total,
        metasize,
        min_rev,
        reserved,
    ) = _HEADER.unpack_from(view, offset)
    if hdrver != 1:
        raise FormatError(source, offset, "header_version", f"{hdrver:#x}, expected 1")
    if ldrver != 1:
        raise FormatError(source, offset + 20, "loader_version", f"{ldrver:#x}, expected 1")
    data_size = raw_data or LEGACY_DATA_SIZE
    total_size = raw_total or LEGACY_TOTAL_SIZE
    if raw_data == 0 and total_size != LEGACY_TOTAL_SIZE:
        # Xen trusts total_size here, iucode_tool and the SDM say 2048: refuse
        # what the loaders would read differently.
        raise FormatError(
            source,
            offset + 32,
            "total_size",
            f"{raw_total} with data_size 0, expected 0 or 2048 (a 2000-byte legacy update)",
        )
    if data_size % 4:
        raise FormatError(source, offset + 28, "data_size", f"{data_size} is not a multiple of 4")
    if total_size % 1024:
        raise FormatError(
            source, offset + 32, "total_size", f"{total_size} is not a multiple of 1024"
        )
    if total_size < HEADER_SIZE + data_size:
        raise FormatError(
            source,
            offset + 32,
            "total_size",
            f"{total_size} is smaller than the header (48) + data_size ({data_size})",
        )
    if total_size > have:
        raise TruncatedError(source, offset, "update (total_size)", total_size, have)

    # Every structural rule is checked before any summing, so a candidate
    # that fails costs no more than its header (find_updates counts on it).
    ext_at = offset + HEADER_SIZE + data_size
    ext_size = total_size - HEADER_SIZE - data_size
    ext: tuple[ExtSignature, ...] = ()
    ext_checksum: int | None = None
    count = 0
    if ext_size:
        if ext_size < EXT_HEADER_SIZE:
            raise FormatError(
                source,
                ext_at,
                "ext_table",
                f"{ext_size} bytes left after the data, less than the 20-byte table header",
            )
        count, ext_checksum = struct.unpack_from("<II", view, ext_at)
        if (ext_size - EXT_HEADER_SIZE) % EXT_ENTRY_SIZE or count != (
            ext_size - EXT_HEADER_SIZE
        ) // EXT_ENTRY_SIZE:
            raise FormatError(
                source,
                ext_at,
                "ext_count",
                f"{count} entries need {EXT_HEADER_SIZE + EXT_ENTRY_SIZE * count} bytes,"
                f" the table has {ext_size}",
            )
        if count > MAX_EXT_SIGNATURES:
            raise LimitError(
                source,
                ext_at,
                "ext_count",
                f"{count} extended signatures, more than the {MAX_EXT_SIGNATURES} read from "
                "one update (real updates have a few); not read",
                MAX_EXT_SIGNATURES,
            )

    problems: list[str] = []
    checksum_ok = True
    main_sum = dword_sum(view, offset, HEADER_SIZE + data_size)
    if main_sum:
        checksum_ok = False
        problems.append(
            f"checksum: dword sum of header+data at {offset:#x} is {main_sum:#010x}, expected 0"
        )

    if ext_size:
        table_sum = dword_sum(view, ext_at, ext_size)
        if table_sum:
            checksum_ok = False
            problems.append(
                f"ext_checksum: dword sum of the extended table at {ext_at:#x} is"
                f" {table_sum:#010x}, expected 0"
            )
        primary = (sig + pf + cksum) & _M32
        entries = []
        for i in range(count):
            at = ext_at + EXT_HEADER_SIZE + EXT_ENTRY_SIZE * i
            e_sig, e_pf, e_ck = _EXT_ENTRY.unpack_from(view, at)
            entries.append(ExtSignature(e_sig, e_pf, e_ck))
            if (e_sig + e_pf + e_ck) & _M32 != primary:
                checksum_ok = False
                want = (primary - e_sig - e_pf) & _M32
                problems.append(
                    f"ext entry {i} at {at:#x} (sig {e_sig:#x}): checksum {e_ck:#010x},"
                    f" expected {want:#010x}"
                )
        ext = tuple(entries)

    date, date_problems = decode_bcd_date(date_raw)
    problems.extend(date_problems)
    if rev == 0:
        problems.append("revision 0 is not a valid update revision")
    if pf >> 8:
        problems.append(f"platform_mask {pf:#x} has reserved bits 8..31 set")
    if reserved:
        problems.append(f"reserved dword at +44 is {reserved:#x}, expected 0")
    return IntelUpdate(
        offset=offset,
        header_version=hdrver,
        revision=rev,
        date=date,
        date_raw=date_raw,
        signature=sig,
        checksum=cksum,
        loader_version=ldrver,
        platform_mask=pf,
        data_size=data_size,
        total_size=total_size,
        ext_signatures=ext,
        ext_checksum=ext_checksum,
        checksum_ok=checksum_ok,
        problems=tuple(problems),
        metadata_size=metasize,
        min_revision=min_rev,
    )


def _limit(view: memoryview, end: int | None) -> int:
    return len(view) if end is None else max(0, min(end, len(view)))


def parse_update(buf: Buffer, offset: int = 0, source: str = "<data>") -> IntelUpdate:
    """Parse the update at ``offset``.

    :raise TruncatedError: the header or ``total_size`` runs past the data.
    :raise FormatError: a header or size rule is broken (the offset names the field).
    A wrong checksum is not an error: see ``checksum_ok`` and ``problems``.
    """
    with _view(buf) as view:
        return _parse(view, offset, len(view), source)


def iter_updates(
    buf: Buffer, offset: int = 0, end: int | None = None, source: str = "<data>"
) -> Iterator[IntelUpdate]:
    """Walk the updates stored back to back in ``buf[offset:end]`` (a ``.bin`` file).

    Strict: the first bad header raises (with its offset); updates with a wrong
    checksum are yielded with ``checksum_ok=False``.
    """
    with _view(buf) as view:
        limit = _limit(view, end)
        pos = offset
        while pos < limit:
            update = _parse(view, pos, limit, source)
            yield update
            pos = update.end


def _nonzero_from(view: memoryview, pos: int, limit: int) -> int:
    """The start of the first chunk at or after ``pos`` that holds a nonzero byte."""
    while pos < limit:
        stop = min(limit, (pos // _SCAN_CHUNK + 1) * _SCAN_CHUNK)
        part = view[pos:stop]
        try:
            if np.frombuffer(part, dtype=np.uint8).any():
                return pos
        finally:
            part.release()
        pos = stop
    return limit


def find_updates(
    buf: Buffer,
    start: int = 0,
    end: int | None = None,
    source: str = "<data>",
    *,
    work: int | None = None,
) -> Iterator[IntelUpdate]:
    """Recover the updates found anywhere in ``buf[start:end]``, at any alignment.

    Candidates are found by their fixed bytes, then checked like `parse_update`;
    structurally bad candidates (and those over ``MAX_EXT_SIGNATURES``) are
    skipped silently.  An update whose checksums hold is skipped over whole
    (its payload is not searched); one whose checksum fails is yielded with
    ``checksum_ok=False`` and the search goes on inside it, so a false match
    cannot hide a real update.

    :raise LimitError: the work on candidates that failed (the bytes summed
        in those whose checksum fails, 4 KiB for one that breaks a size rule)
        passed ``work`` (default: 8 times the searched length, plus 64 MiB);
        the updates yielded before it stand, the rest is not searched.
    """
    with _view(buf) as view:
        limit = _limit(view, end)
        pos = max(0, start)
        if work is None:
            work = _SEARCH_WORK_FACTOR * max(0, limit - pos) + _SEARCH_WORK_FLOOR
        spent = 0
        checked = -1  # the end of the chunk last found to hold a nonzero byte
        while pos + HEADER_SIZE <= limit:
            # Once per chunk: checking again after each rejected candidate
            # rescanned the rest of the chunk every time (quadratic).
            if pos >= checked:
                pos = _nonzero_from(view, pos, limit)
                checked = min(limit, (pos // _SCAN_CHUNK + 1) * _SCAN_CHUNK)
            chunk_end = min(limit, (pos // _SCAN_CHUNK + 1) * _SCAN_CHUNK)
            match = _CANDIDATE.search(view, pos, min(limit, chunk_end + _CANDIDATE_LEN - 1))
            if match is None or match.start() >= chunk_end:
                pos = chunk_end
                continue
            at = match.start()
            try:
                update = _parse(view, at, limit, source)
            except FormatError:
                spent += _REJECT_COST
            else:
                yield update
                if update.checksum_ok:
                    pos = update.end
                    continue
                spent += update.total_size
            if spent > work:
                raise LimitError(
                    source,
                    at,
                    "search",
                    f"candidates that fail their checks overlap so much that checking them "
                    f"took more than {size_text(work)} of work; the rest "
                    f"({at + 1:#x}..{limit:#x}) is not searched",
                    work,
                )
            pos = at + 1


# --- Intel .dat text -----------------------------------------------------------

_DAT_TOKEN = re.compile(
    r"""
    (?P<space>[ \t\r\f\v]+)
  | (?P<newline>\n)
  | (?P<comma>,)
  | (?P<block>/\*)
  | (?P<line>//[^\n]*)
  | (?P<number>0[xX][0-9a-fA-F]+)
    """,
    re.VERBOSE,
)


def parse_dat(text: str, source: str = "<text>") -> bytes:
    """Intel's ``microcode.dat`` text -> the binary bundle it spells.

    The text is C source for an array of 32-bit words: ``0x`` hex numbers
    separated by commas and/or white space, with ``/* */`` and ``//`` comments,
    as iucode_tool reads it.  Each number becomes a little-endian dword.

    :raise ParseError: at the line and column of the first thing that is not a
        comment, separator or 32-bit hex number.
    """
    # 4 bytes a word (a list of ints would be 9 to 36): the text may be large.
    words = array.array("I")
    line = 1
    line_start = 0
    pos = 0
    n = len(text)
    while pos < n:
        m = _DAT_TOKEN.match(text, pos)
        col = pos - line_start + 1
        if m is None:
            bad = text[pos]
            raise ParseError.at(
                source, line, col, f"unexpected {bad!r}, expected a 0x hex word, ',' or a comment"
            )
        kind = m.lastgroup
        if kind == "number":
            value = int(m.group(), 16)
            if value > _M32:
                raise ParseError.at(source, line, col, f"{m.group()} does not fit in 32 bits")
            # A word glued to the next token ("0x1g") is not a word.
            nxt = m.end()
            if nxt < n and (text[nxt].isalnum() or text[nxt] == "_"):
                raise ParseError.at(
                    source, line, nxt - line_start + 1, f"unexpected {text[nxt]!r} in a hex word"
                )
            words.append(value)
            pos = nxt
            continue
        if kind == "newline":
            line += 1
            line_start = m.end()
            pos = m.end()
        elif kind == "block":
            close = text.find("*/", m.end())
            if close < 0:
                raise ParseError.at(source, line, col, "unterminated /* comment")
            body = text[pos:close]
            newlines = body.count("\n")
            if newlines:
                line += newlines
                line_start = pos + body.rfind("\n") + 1
            pos = close + 2
        else:
            pos = m.end()
    if sys.byteorder == "big":  # the words are little-endian dwords
        words.byteswap()
    return words.tobytes()


# --- writing -------------------------------------------------------------------


def build_update(
    *,
    signature: int,
    revision: int,
    platform_mask: int,
    date: str | int = "2020-01-01",
    payload: bytes,
    ext: Sequence[tuple[int, int]] = (),
    loader_version: int = 1,
    header_version: int = 1,
    min_revision: int = 0,
    pad: bool = True,
    legacy_sizes: bool = False,
) -> bytes:
    """A complete update with correct checksums (header, extended table and entries).

    ``payload`` is the data (a multiple of 4 bytes).  Header, data and table
    must add up to a multiple of 1024 bytes, so by default (``pad=True``) zero
    bytes are appended to the payload until they do (``data_size`` then counts
    them); ``pad=False`` raises instead.  ``ext`` lists extended ``(signature,
    platform_mask)`` pairs.  ``legacy_sizes=True`` writes 0 in both size fields,
    which needs a 2000-byte payload and no table.  ``revision`` is signed
    (-1 writes 0xffffffff).  ``date`` is ``"YYYY-MM-DD"`` or a raw dword.

    :raise ValueError: the sizes cannot make a valid update.
    """
    if len(payload) % 4:
        raise ValueError(f"payload of {len(payload)} bytes is not a whole number of dwords")
    ext_size = EXT_HEADER_SIZE + EXT_ENTRY_SIZE * len(ext) if ext else 0
    if pad:
        short = -(HEADER_SIZE + len(payload) + ext_size) % 1024
        payload = payload + bytes(short)
    data_size = len(payload)
    total_size = HEADER_SIZE + data_size + ext_size
    if total_size % 1024:
        raise ValueError(f"header+payload+table is {total_size} bytes, not a multiple of 1024")
    if legacy_sizes:
        if data_size != LEGACY_DATA_SIZE or ext:
            raise ValueError("legacy_sizes needs a 2000-byte payload and no extended table")
        raw_data = raw_total = 0
    else:
        raw_data, raw_total = data_size, total_size
    fields = [
        header_version,
        revision & _M32,
        encode_bcd_date(date),
        signature,
        0,
        loader_version,
        platform_mask,
        raw_data,
        raw_total,
        0,
        min_revision,
        0,
    ]
    header = struct.pack("<12I", *fields)
    checksum = -(dword_sum(header, 0, HEADER_SIZE) + dword_sum(payload, 0, data_size)) & _M32
    fields[4] = checksum
    out = bytearray(struct.pack("<12I", *fields))
    out += payload
    if ext:
        primary = (signature + platform_mask + checksum) & _M32
        entries = b"".join(_EXT_ENTRY.pack(sig, pf, (primary - sig - pf) & _M32) for sig, pf in ext)
        table_sum = (len(ext) + dword_sum(entries, 0, len(entries))) & _M32
        out += _EXT_HEADER.pack(len(ext), -table_sum & _M32, 0, 0, 0)
        out += entries
    return bytes(out)
