"""Find every microcode update in a file, whatever holds it: :func:`scan_file`.

A file is classified by its first bytes and walked: an Intel ``.bin`` or
``.dat``, AMD containers, an initrd walked the way the kernel unpacks it
(compressed parts decompressed as a stream, never loaded whole), anything else
searched for Intel headers and AMD magics; inside archives a member is
microcode by its name or its first bytes.  The file is mapped, never read
whole, and nothing it claims sizes anything: :class:`ScanLimits` bounds the
bytes decompressed, the bytes of one member, the bytes held and the members
walked.  What a limit stops, and each entry the kernel skips, is a
:class:`Skipped` with its place and reason; other problems are
:class:`Finding` warnings.  The design (the walk and each limit's value) is in
docs/formats.md, section Microcode scan.
"""

from __future__ import annotations

import dataclasses
import mmap
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from xenlab.errors import FormatError, ParseError, XenlabError
from xenlab.files import read_bounded
from xenlab.formats import amd_ucode, cpio, intel_ucode
from xenlab.formats.buffer import Buffer, size_text, skip_zeros
from xenlab.formats.compress import Compression, LimitError, detect, open_stream
from xenlab.formats.cpio import PATH_MAX, CpioFormat, SegmentKind
from xenlab.ucode.cpu import Vendor
from xenlab.ucode.update import EARLY_NAMES, Container, Location, Update, from_amd, from_intel

# Members bigger than this are not read from compressed archives unless their
# name says microcode: real bundles are a few MB, kernel modules can be large.
_SNIFF_LIMIT = 16 << 20
# Findings (warnings) and skips listed per scan; past this they are counted.
_MAX_REPORTS = 1000
# What the result is charged per update and per signature for the Python
# objects behind it (measured: about 720 bytes an update, 100 a signature,
# plus problem texts).
_UPDATE_COST = 1024
_SIGNATURE_COST = 256
# Inputs that cannot be mapped (pipes, character devices) are read whole, up to this.
_READ_LIMIT = 128 << 20
_UCODE_NAME = re.compile(r"(^|/)(kernel/x86/microcode/|intel-ucode/|amd-ucode/)|\.dat$")
_DAT_START = re.compile(rb"\A\s*(/\*|//|0x[0-9a-fA-F]{8})")

Progress = Callable[[int, int], None]
"""``progress(done, total)`` in bytes of the file scanned."""


@dataclass(frozen=True, slots=True)
class Finding:
    """A problem met while scanning, at a place.

    A ``warning`` leaves the rest of the file scanned; an ``error`` (a corrupt
    compressed stream, a broken archive) stopped the walk there, and what
    was found before it is kept.
    """

    where: str
    message: str
    severity: str = "warning"

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True, slots=True)
class ScanLimits:
    """How much one scan may decompress, read and keep (see the module's Limits).

    ``decompressed``: bytes decompressed over every compressed part, read or
    skipped.  ``member``: bytes of one member of a compressed archive read
    into memory, and the most ``.dat`` text parsed.  ``held``: bytes the
    result may hold (copies of updates from decompressed members, plus an
    estimate of each update's objects).  ``members``: members walked in
    decompressed archives plus compressed streams opened (real initrds have a
    few thousand members and a stream or two; each costs 10 to 40 us).
    """

    decompressed: int = 1 << 30
    member: int = 32 << 20
    held: int = 64 << 20
    members: int = 1 << 16

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value <= 0:
                raise ValueError(f"ScanLimits.{f.name} must be positive, not {value}")


@dataclass(frozen=True, slots=True)
class Skipped:
    """Something the scan did not read, and why.

    ``offset`` is where the skipped thing starts: in the file, or, when
    ``compression`` is set, in the decompressed stream that starts at
    ``archive_offset`` in the file.  ``member`` names the archive member
    (a member's offset is its header's).  ``reason`` says what was skipped
    and why, including whether the rest of the part or file went unscanned.
    """

    file: str
    offset: int
    reason: str
    member: str | None = None
    archive_offset: int | None = None
    compression: str | None = None

    @property
    def where(self) -> str:
        """``file+0xOFF``, or ``file[zstd@0xARCHIVE]+0xOFF`` inside a compressed stream."""
        if self.compression is None:
            return f"{self.file}+{self.offset:#x}"
        return f"{self.file}[{self.compression}@{self.archive_offset or 0:#x}]+{self.offset:#x}"

    def __str__(self) -> str:
        member = f"member {self.member!r}: " if self.member is not None else ""
        return f"{self.where}: {member}{self.reason}"


def skipped_to_json(item: Skipped) -> dict[str, object]:
    """One object of the ``skipped`` lists in the ``xenlab ucode`` JSON outputs."""
    return {
        "file": item.file,
        "member": item.member,
        "offset": item.offset,
        "archive_offset": item.archive_offset,
        "compression": item.compression,
        "reason": item.reason,
    }


@dataclass(frozen=True, slots=True)
class Part:
    """One top-level piece of a scanned file: what it is and where it lies."""

    kind: str  # "intel-bundle", "amd-containers", "dat", "cpio", "compressed", "data"
    offset: int
    end: int | None
    compression: str | None = None
    members: int = 0
    early_names: tuple[str, ...] = ()


@dataclass(slots=True)
class ScanResult:
    """Everything found in one file: updates, the file's layout, warnings, what was skipped."""

    file: str
    size: int
    updates: list[Update] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when nothing stopped the walk (no error finding) and nothing was skipped."""
        return not self.skipped and not any(f.severity == "error" for f in self.findings)

    def early(self, vendor: Vendor) -> list[Update]:
        """The updates the early loaders would see for ``vendor``."""
        return [u for u in self.updates if u.vendor is vendor and u.source.early]


def _view(buf: Buffer) -> memoryview:
    # Read-only so that updates holding slices stay hashable and unchanged.
    return memoryview(buf).cast("B").toreadonly()


def _looks_intel(buf: Buffer, offset: int = 0) -> bool:
    head = bytes(buf[offset : offset + 48])
    return (
        len(head) == 48
        and head[0:4] == b"\x01\x00\x00\x00"
        and head[20:24] == b"\x01\x00\x00\x00"
    )


def _looks_amd(buf: Buffer, offset: int = 0) -> bool:
    return bytes(buf[offset : offset + 4]) == b"DMA\x00"


class _Stop(Exception):
    """The walk ends here; why is already in ``ScanResult.skipped``."""


@dataclass(frozen=True, slots=True)
class _Place:
    """Where the walk is, for the skips reported there: a member, or a place in a stream."""

    member: str | None
    offset: int  # the member's header, in the file or the decompressed stream
    archive_offset: int | None = None
    compression: str | None = None


@dataclass(slots=True)
class _Walker:
    file: str
    result: ScanResult
    recover: bool
    limits: ScanLimits
    decompressed: int = 0  # bytes decompressed so far, over all streams
    held: int = 0  # bytes charged to the result so far (see keep)
    members: int = 0  # members walked in decompressed archives
    unlisted: int = 0  # warnings and skips past _MAX_REPORTS
    transient: bool = False  # updates found now point into a buffer about to go
    place: _Place | None = None

    def warn(self, where: str, message: str) -> None:
        if len(self.result.findings) >= _MAX_REPORTS:
            self.unlisted += 1
            return
        self.result.findings.append(Finding(where, message))

    def stopped(self, err: FormatError) -> None:
        """The walk cannot go on past ``err``: record it as an error finding."""
        # Never dropped: an error decides the exit status.
        self.result.findings.append(
            Finding(f"{err.source}+{err.offset:#x}", f"{err.field}: {err.detail}", "error")
        )

    def skip(self, reason: str, offset: int | None = None) -> None:
        """Report something not read: at ``offset`` in the file, or at the current member."""
        if len(self.result.skipped) >= _MAX_REPORTS:
            self.unlisted += 1
            return
        place = self.place
        if place is None:
            item = Skipped(self.file, offset or 0, reason)
        else:
            item = Skipped(self.file, place.offset, reason, place.member, place.archive_offset,
                           place.compression)  # fmt: skip
        self.result.skipped.append(item)

    def limit_hit(self, err: LimitError, then: str = "") -> None:
        """A reader stopped at a limit: report it as skipped, at its offset."""
        reason = f"{err.field}: {err.detail}" + (f"; {then}" if then else "")
        self.skip(reason, err.offset)

    def skip_at(self, where: Location, reason: str) -> None:
        """Report something not read at ``where``: a place in the file, or in a member's data."""
        if where.member is None:
            self.skip(reason, where.offset)
        else:
            # The record names the member (at its header); the reason says where in its data.
            self.skip(f"at +{where.offset:#x} of its data: {reason}")

    def keep(self, update: Update) -> None:
        """Add ``update`` to the result, within ``limits.held``; past it the walk ends."""
        signatures = max(len(update.platforms), len(update.signatures))
        cost = _UPDATE_COST + _SIGNATURE_COST * signatures
        if self.transient:
            cost += update.size
        if self.held + cost > self.limits.held:
            self.skip_at(
                update.source,
                f"with this update the result would hold more than "
                f"{size_text(self.limits.held)} (the held limit); it and the rest of the file "
                "are not scanned",
            )
            raise _Stop
        if self.transient:
            # A copy, so the member's whole data is not kept alive by a slice.
            update = dataclasses.replace(update, view=memoryview(bytes(update.view)))
        self.held += cost
        self.result.updates.append(update)

    # -- raw microcode in a buffer (a member's data or a whole file) -------------

    def intel(self, buf: Buffer, loc: Callable[[int], Location], end: int | None = None) -> int:
        """Read concatenated Intel updates; returns how many; recovers after a bad one."""
        n = 0
        stop = len(buf) if end is None else end
        view = _view(buf)
        good_end = 0
        try:
            for upd in intel_ucode.iter_updates(buf, 0, stop, source=self.file):
                raw = view[upd.offset : upd.offset + upd.total_size]
                self.keep(from_intel(upd, raw, loc(upd.offset)))
                good_end = upd.offset + upd.total_size
                n += 1
        except FormatError as err:
            n += self._after_error(buf, loc, err, good_end, stop, intel=True)
        return n

    def amd(self, buf: Buffer, loc: Callable[[int], Location], end: int | None = None) -> int:
        """Read AMD containers back to back; returns how many patches."""
        n = 0
        stop = len(buf) if end is None else end
        good_end = 0
        try:
            for cont in amd_ucode.iter_containers(buf, 0, stop, source=self.file):
                n += self._add_container(buf, cont, loc)
                good_end = cont.end
        except FormatError as err:
            n += self._after_error(buf, loc, err, good_end, stop, intel=False)
        return n

    def _after_error(
        self,
        buf: Buffer,
        loc: Callable[[int], Location],
        err: FormatError,
        good_end: int,
        stop: int,
        *,
        intel: bool,
    ) -> int:
        """A bundle went bad after ``good_end``: say where, then search the rest."""
        # Zero padding after the last unit (firmware images have it) is no
        # problem; zeros *inside* a unit that claims them are.  skip_zeros
        # reads in chunks, so a sparse gigabyte is not copied.
        zero_tail = skip_zeros(buf, err.offset, stop) >= stop
        found = 0
        if self.recover and not (zero_tail and err.offset == good_end):
            # From the end of the last good unit: the broken one may still
            # hold patches (an AMD container with a bad trailing section).
            found = self.search(buf, loc, start=good_end, end=stop, intel=intel, amd=not intel)
            if zero_tail and found:
                last = self.result.updates[-1]
                if last.source.offset + last.size >= err.offset:
                    return found  # the recovered patches reach the padding
        if isinstance(err, LimitError):
            self.skip_at(loc(err.offset), f"{err.field}: {err.detail}")
        elif not (zero_tail and err.offset == good_end):
            self.warn(str(loc(err.offset)), f"{err.field}: {err.detail}")
        return found

    def _add_container(
        self, buf: Buffer, cont: amd_ucode.AmdContainer, loc: Callable[[int], Location]
    ) -> int:
        view = _view(buf)
        for patch in cont.patches:
            raw = view[patch.offset : patch.offset + patch.size]
            self.keep(from_amd(cont, patch, raw, loc(patch.offset)))
        return len(cont.patches)

    def search(
        self,
        buf: Buffer,
        loc: Callable[[int], Location],
        *,
        start: int = 0,
        end: int | None = None,
        intel: bool = True,
        amd: bool = True,
    ) -> int:
        """Recover mode: look for updates anywhere in unknown bytes."""
        n = 0
        view = _view(buf)
        if intel:
            try:
                for upd in intel_ucode.find_updates(buf, start, end, source=self.file):
                    raw = view[upd.offset : upd.offset + upd.total_size]
                    self.keep(from_intel(upd, raw, loc(upd.offset)))
                    n += 1
            except LimitError as err:
                self._search_limit(err, loc)
        if amd:
            try:
                for cont in amd_ucode.find_containers(buf, start, end, source=self.file):
                    n += self._add_container(buf, cont, loc)
            except LimitError as err:
                self._search_limit(err, loc)
        return n

    def _search_limit(self, err: LimitError, loc: Callable[[int], Location]) -> None:
        self.skip_at(loc(err.offset), f"recover-mode search: {err.detail}")

    def blob(self, data: Buffer, loc: Callable[[int], Location], *, named: bool) -> int:
        """A member's data: a bundle if it starts like one, else searched if named so."""
        if _looks_intel(data):
            return self.intel(data, loc)
        if _looks_amd(data):
            return self.amd(data, loc)
        if _DAT_START.match(bytes(data[:64])):
            return self.dat(data, loc)
        if named and self.recover:
            found = self.search(data, loc)
            if not found and len(data):
                self.warn(str(loc(0)), "named like microcode but holds none")
            return found
        return 0

    def dat(self, data: Buffer, loc: Callable[[int], Location]) -> int:
        """Intel ``.dat`` text: converted to binary, then read as a bundle."""
        where = loc(0)
        if len(data) > self.limits.member:
            self.skip_at(
                where,
                f".dat text of {len(data)} bytes is over the {size_text(self.limits.member)} "
                "member limit: not parsed",
            )
            return 0
        try:
            binary = intel_ucode.parse_dat(
                bytes(data).decode("ascii", "replace"), source=str(where)
            )
        except ParseError as err:
            for prob in err.problems:
                self.warn(str(where), f"line {prob.line}, column {prob.col}: {prob.message}")
            return 0
        # Offsets inside converted text have no byte meaning; name the update's
        # index.  The updates are copied out of the converted bytes.
        transient, self.transient = self.transient, True
        try:
            return self.intel(binary, lambda _off: loc(0))
        finally:
            self.transient = transient

    # -- archives ----------------------------------------------------------------

    def cpio_part(self, buf: Buffer, seg: cpio.Segment, early_at: dict[int, str]) -> Part:
        """An uncompressed archive: every regular member is looked at.

        ``early_at`` maps the header offsets of the entries the early loaders
        pick (see :func:`early_entries`) to the name they asked for.
        """
        early_names: list[str] = []
        for entry in seg.entries:
            if not entry.is_regular or entry.filesize == 0:
                continue
            is_early = entry.offset in early_at
            if entry.name_too_long and not is_early:
                self.place = _Place(entry.name, entry.offset)
                self.skip(_name_too_long(entry))
                self.place = None
                continue
            data = memoryview(buf)[entry.data_offset : entry.data_offset + entry.filesize]
            if entry.format is CpioFormat.CRC and cpio.cpio_checksum(data) != entry.check:
                self.warn(
                    f"{self.file}+{entry.offset:#x}",
                    f"member {entry.name!r}: crc-format check {entry.check:#010x} does not "
                    f"match its data ({cpio.cpio_checksum(data):#010x}); the kernel's "
                    "unpacker refuses it",
                )
            if is_early:
                early_names.append(entry.name)
            elif entry.name.lstrip("./") in EARLY_NAMES.values():
                self.warn(
                    f"{self.file}+{entry.offset:#x}",
                    f"member {entry.name!r}: the early loaders match the exact name "
                    f"{entry.name.lstrip('./')!r} and will not find this one",
                )
            named = bool(_UCODE_NAME.search(entry.name))

            def loc(off: int, _e: cpio.CpioEntry = entry, _early: bool = is_early) -> Location:
                return Location(self.file, off, Container.CPIO, _e.name, seg.offset, None, _early)

            self.place = _Place(entry.name, entry.offset)
            try:
                self.blob(data, loc, named=named)
            finally:
                self.place = None
        return Part("cpio", seg.offset, seg.end, None, len(seg.entries), tuple(early_names))

    def compressed_part(self, buf: Buffer, seg: cpio.Segment) -> Part:
        """A compressed archive, decompressed as a stream; returns where it ended.

        The stream may produce what is left of ``limits.decompressed``; a
        member is read only up to ``limits.member``.  A limit that stops the
        stream ends the walk (its end is unknown), reported as skipped.

        Why one function: the decompressor loop, the three limits and the skip reports share
        the stream's state (bytes out, member count, where a limit stopped it).
        """
        assert seg.compression is not None
        comp: Compression = seg.compression
        name = comp.name.lower()
        unfinished = Part("compressed", seg.offset, None, name)
        left = self.limits.decompressed - self.decompressed
        self.members += 1
        if self.members > self.limits.members:
            self.skip(
                f"{name} stream not decompressed: more than {self.limits.members} members and "
                "compressed streams (the members limit); the rest of the file is not scanned",
                seg.offset,
            )
            return unfinished
        if left <= 0:
            self.skip(
                f"{name} stream not decompressed: the scan's decompression budget of "
                f"{size_text(self.limits.decompressed)} is used up; the rest of the file is "
                "not scanned",
                seg.offset,
            )
            return unfinished
        try:
            stream = open_stream(buf, seg.offset, comp, source=self.file, limit=left)
        except LimitError as err:
            self.limit_hit(err, "the rest of the file is not scanned")
            return unfinished
        member_limit = self.limits.member
        sniff_limit = min(_SNIFF_LIMIT, member_limit)

        def want(entry: cpio.CpioEntry) -> bool:
            if not entry.is_regular or entry.filesize == 0:
                return False
            if entry.filesize <= sniff_limit:
                return True
            return entry.filesize <= member_limit and bool(_UCODE_NAME.search(entry.name))

        members = 0
        try:
            for entry, data in cpio.iter_stream(
                stream, source=f"{self.file}[{name}]", want=want
            ):
                members += 1
                self.members += 1
                self.place = _Place(entry.name, entry.offset, seg.offset, name)
                if self.members > self.limits.members:
                    self.skip(
                        f"more than {self.limits.members} members and compressed streams (the "
                        "members limit): this one, the rest of the stream and of the file are "
                        "not scanned"
                    )
                    return dataclasses.replace(unfinished, members=members)
                if entry.name_too_long:
                    self.skip(_name_too_long(entry))
                    continue
                named = bool(_UCODE_NAME.search(entry.name))
                if data is None:
                    if entry.is_regular and named and entry.filesize > member_limit:
                        self.skip(
                            f"filesize {entry.filesize:#x} is over the "
                            f"{size_text(member_limit)} member limit: not read"
                        )
                    continue

                def loc(off: int, _e: cpio.CpioEntry = entry) -> Location:
                    return Location(
                        self.file, off, Container.COMPRESSED, _e.name, seg.offset, name, False
                    )

                self.transient = True
                try:
                    self.blob(data, loc, named=named)
                finally:
                    self.transient = False
            self.place = None
            # Read to the end so the decompressor knows where the stream stopped.
            while stream.read(1 << 20):
                pass
        except LimitError as err:
            # Where reading stopped; the member that claimed the bytes was
            # reported when it was met (filesize or name over the limits).
            self.place = _Place(None, stream.tell(), seg.offset, name)
            if stream.decompressed > left:
                reason = (
                    f"the scan's decompression budget of {size_text(self.limits.decompressed)} "
                    f"is used up here ({name} output stopped after {left:#x} "
                    "bytes)"
                )
            else:
                reason = f"{err.field}: {err.detail}"
            self.skip(f"{reason}; the rest of the stream and of the file are not scanned")
            return dataclasses.replace(unfinished, members=members)
        except FormatError as err:
            self.stopped(err)
            return dataclasses.replace(unfinished, members=members)
        finally:
            self.place = None
            self.decompressed += stream.decompressed
        return Part("compressed", seg.offset, stream.compressed_end, name, members)

    def initrd(self, buf: Buffer, progress: Progress | None, early_only: bool) -> None:
        offset = 0
        early_at = early_entries(buf, self.file)
        for off, wanted in early_at.items():
            entry = cpio.read_entry(buf, off, self.file)
            if entry.name != wanted:
                self.warn(
                    f"{self.file}+{off:#x}",
                    f"the early loaders match names by prefix: asked for {wanted!r}, they "
                    f"read {entry.name!r}",
                )
        while True:
            try:
                seg = cpio.next_segment(buf, offset, source=self.file)
            except FormatError as err:
                if early_only:
                    # find_cpio_data stops quietly here; what it read before stands.
                    self.warn(f"{err.source}+{err.offset:#x}", f"{err.field}: {err.detail}")
                else:
                    self.stopped(err)
                break
            if seg is None:
                break
            if progress:
                progress(seg.offset, len(buf))
            if seg.kind is SegmentKind.CPIO:
                self.result.parts.append(self.cpio_part(buf, seg, early_at))
            elif seg.kind is SegmentKind.PADDING:
                pass  # NULs between archives: the kernel skips them, so do we
            elif seg.kind is SegmentKind.COMPRESSED:
                if early_only:
                    assert seg.compression is not None
                    self.result.parts.append(
                        Part("compressed", seg.offset, None, seg.compression.name.lower())
                    )
                    break
                part = self.compressed_part(buf, seg)
                self.result.parts.append(part)
                if part.end is None or part.end <= seg.offset:
                    break
                offset = part.end
                continue
            else:
                self.result.parts.append(Part("data", seg.offset, seg.end))
                if self.recover and not early_only:
                    self.search(
                        buf,
                        lambda off: Location(self.file, off, Container.DATA),
                        start=seg.offset,
                        end=seg.end,
                    )
                break
            if seg.end is None or seg.end <= offset:
                break
            offset = seg.end


def _name_too_long(entry: cpio.CpioEntry) -> str:
    return (
        f"namesize {entry.namesize:#x} is over PATH_MAX ({PATH_MAX}): the kernel's unpacker "
        "skips this entry, and so does the scan"
    )


def early_entries(buf: Buffer, source: str = "<data>") -> dict[int, str]:
    """Header offsets of the members Linux's early loader and Xen's ``ucode=scan`` read.

    Both ask ``find_cpio_data`` for the vendor's name: the first regular file
    in the leading uncompressed archives (trailers do not stop it) whose name
    starts with that name.
    """
    found: dict[int, str] = {}
    for name in EARLY_NAMES.values():
        entry = cpio.find_early(buf, name, 0, source)
        if entry is not None:
            found[entry.offset] = name
    return found


def scan_buffer(
    buf: Buffer,
    name: str,
    *,
    early_only: bool = False,
    recover: bool = True,
    progress: Progress | None = None,
    limits: ScanLimits | None = None,
) -> ScanResult:
    """Scan ``buf`` (the contents of file ``name``) for microcode updates.

    ``early_only`` stops at the first compressed part, as the kernel's and
    Xen's early loaders do; ``recover`` searches unknown bytes for updates.
    ``limits`` bound the work and memory (default :class:`ScanLimits`());
    what they stop is in ``ScanResult.skipped``.  Bad input yields
    :class:`Finding` warnings, not exceptions, except for errors that stop
    the whole walk (a corrupt compressed stream), which raise
    :class:`~xenlab.errors.FormatError` naming the offset.
    """
    result = ScanResult(name, len(buf))
    walker = _Walker(name, result, recover, limits or ScanLimits())

    def top(off: int) -> Location:
        return Location(name, off, Container.BUNDLE)

    try:
        if len(buf) == 0:
            result.findings.append(Finding(name, "empty file"))
        elif _looks_intel(buf) or (len(buf) < 48 and bytes(buf[:4]) == b"\x01\x00\x00\x00"):
            result.parts.append(Part("intel-bundle", 0, len(buf)))
            walker.intel(buf, top)
        elif _looks_amd(buf):
            result.parts.append(Part("amd-containers", 0, len(buf)))
            walker.amd(buf, top)
        elif name.endswith(".dat") or _DAT_START.match(bytes(buf[:64])):
            result.parts.append(Part("dat", 0, len(buf)))
            walker.dat(buf, top)
        elif bytes(buf[:4]) == b"0707" or cpio_compressed(buf):
            walker.initrd(buf, progress, early_only)
        else:
            result.parts.append(Part("data", 0, len(buf)))
            if recover:
                walker.search(buf, lambda off: Location(name, off, Container.DATA))
    except _Stop:
        pass
    if walker.unlisted:
        result.findings.append(
            Finding(name, f"{walker.unlisted} more warnings and skipped items not listed")
        )
    if progress:
        progress(len(buf), len(buf))
    return result


def cpio_compressed(buf: Buffer) -> bool:
    """True when ``buf`` starts with a compression magic the kernel can unpack."""
    return detect(buf, 0) is not None


def map_input(path: Path) -> Buffer:
    """The contents of ``path`` without reading it whole: a read-only mapping.

    Regular files and block devices are mapped (an empty file is ``b""``);
    what cannot be mapped (a pipe, a character device) is read whole, up to
    128 MiB (:class:`~xenlab.files.InputTooLargeError` beyond).  The mapping
    is not closed here: slices of it (updates found) keep it alive, and it
    is unmapped when the last of them goes.
    """
    try:
        # Decided before opening: a FIFO must be opened once only (a second
        # open waits for a writer that has gone).
        mode = path.stat().st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            return read_bounded(path, _READ_LIMIT, what="pipe or device input")
        with path.open("rb") as f:
            if f.seek(0, 2) == 0:
                return b""
            return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    except OSError as err:
        raise XenlabError(f"{path}: cannot read: {err.strerror or err}") from err


def scan_file(
    path: Path,
    *,
    early_only: bool = False,
    recover: bool = True,
    progress: Progress | None = None,
    limits: ScanLimits | None = None,
) -> ScanResult:
    """Scan the file at ``path`` through a read-only mmap (never loaded whole)."""
    return scan_buffer(map_input(path), str(path), early_only=early_only, recover=recover,
                       progress=progress, limits=limits)  # fmt: skip
