"""Find every microcode update in a file, whatever holds it: :func:`scan_file`.

A file is classified by its first bytes, then walked:

- an Intel ``.bin`` bundle (concatenated updates) or ``.dat`` text,
- AMD containers back to back,
- an initrd: uncompressed cpio archives (the early part), NUL padding and
  compressed archives, walked the way the kernel unpacks them; compressed
  parts are decompressed as a stream, never loaded whole;
- anything else: searched for Intel headers and AMD container magics.

Inside archives a member is read as microcode when its name says so
(``kernel/x86/microcode/*``, ``*/intel-ucode/*``, ``*/amd-ucode/*``) or when
its first bytes are an Intel header or the AMD magic.  Problems that do not
stop the walk come back as :class:`Finding` warnings with their place.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from xenlab.errors import FormatError, ParseError, XenlabError
from xenlab.formats import amd_ucode, cpio, intel_ucode
from xenlab.formats._buffer import Buffer, skip_zeros
from xenlab.formats.compress import Compression, detect, open_stream
from xenlab.formats.cpio import CpioFormat, SegmentKind
from xenlab.ucode.cpu import Vendor
from xenlab.ucode.update import EARLY_NAMES, Container, Location, Update, from_amd, from_intel

# Members bigger than this are not read from compressed archives unless their
# name says microcode: real bundles are a few MB, kernel modules can be large.
_SNIFF_LIMIT = 16 << 20
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
    """Everything found in one file: updates, the file's layout, warnings."""

    file: str
    size: int
    updates: list[Update] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

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


@dataclass(slots=True)
class _Walker:
    file: str
    result: ScanResult
    recover: bool

    def warn(self, where: str, message: str) -> None:
        self.result.findings.append(Finding(where, message))

    def stopped(self, err: FormatError) -> None:
        """The walk cannot go on past ``err``: record it as an error finding."""
        self.result.findings.append(
            Finding(f"{err.source}+{err.offset:#x}", f"{err.field}: {err.detail}", "error")
        )

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
                self.result.updates.append(from_intel(upd, raw, loc(upd.offset)))
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
        if not (zero_tail and err.offset == good_end):
            self.warn(str(loc(err.offset)), f"{err.field}: {err.detail}")
        return found

    def _add_container(
        self, buf: Buffer, cont: amd_ucode.AmdContainer, loc: Callable[[int], Location]
    ) -> int:
        view = _view(buf)
        for patch in cont.patches:
            raw = view[patch.offset : patch.offset + patch.size]
            self.result.updates.append(from_amd(cont, patch, raw, loc(patch.offset)))
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
            for upd in intel_ucode.find_updates(buf, start, end, source=self.file):
                raw = view[upd.offset : upd.offset + upd.total_size]
                self.result.updates.append(from_intel(upd, raw, loc(upd.offset)))
                n += 1
        if amd:
            for cont in amd_ucode.find_containers(buf, start, end, source=self.file):
                n += self._add_container(buf, cont, loc)
        return n

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
        where = str(loc(0))
        try:
            binary = intel_ucode.parse_dat(bytes(data).decode("ascii", "replace"), source=where)
        except ParseError as err:
            for prob in err.problems:
                self.warn(where, f"line {prob.line}, column {prob.col}: {prob.message}")
            return 0
        # Offsets inside converted text have no byte meaning; name the update's index.
        return self.intel(binary, lambda _off: loc(0))

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
            data = memoryview(buf)[entry.data_offset : entry.data_offset + entry.filesize]
            if entry.format is CpioFormat.CRC and cpio.cpio_checksum(data) != entry.check:
                self.warn(
                    f"{self.file}+{entry.offset:#x}",
                    f"member {entry.name!r}: crc-format check {entry.check:#010x} does not "
                    f"match its data ({cpio.cpio_checksum(data):#010x}); the kernel's "
                    "unpacker refuses it",
                )
            is_early = entry.offset in early_at
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

            self.blob(data, loc, named=named)
        return Part("cpio", seg.offset, seg.end, None, len(seg.entries), tuple(early_names))

    def compressed_part(self, buf: Buffer, seg: cpio.Segment) -> Part:
        """A compressed archive, decompressed as a stream; returns where it ended."""
        assert seg.compression is not None
        comp: Compression = seg.compression
        stream = open_stream(buf, seg.offset, comp, source=self.file)

        def want(entry: cpio.CpioEntry) -> bool:
            return entry.is_regular and entry.filesize > 0 and (
                entry.filesize <= _SNIFF_LIMIT or bool(_UCODE_NAME.search(entry.name))
            )

        members = 0
        try:
            for entry, data in cpio.iter_stream(
                stream, source=f"{self.file}[{comp.name.lower()}]", want=want
            ):
                members += 1
                if data is None:
                    continue
                named = bool(_UCODE_NAME.search(entry.name))

                def loc(off: int, _e: cpio.CpioEntry = entry) -> Location:
                    return Location(
                        self.file, off, Container.COMPRESSED, _e.name, seg.offset,
                        comp.name.lower(), False,
                    )

                self.blob(data, loc, named=named)
            # Read to the end so the decompressor knows where the stream stopped.
            while stream.read(1 << 20):
                pass
        except FormatError as err:
            self.stopped(err)
            return Part("compressed", seg.offset, None, comp.name.lower(), members)
        return Part("compressed", seg.offset, stream.compressed_end, comp.name.lower(), members)

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
) -> ScanResult:
    """Scan ``buf`` (the contents of file ``name``) for microcode updates.

    ``early_only`` stops at the first compressed part, as the kernel's and
    Xen's early loaders do; ``recover`` searches unknown bytes for updates.
    Bad input yields :class:`Finding` warnings, not exceptions, except for
    errors that stop the whole walk (a corrupt compressed stream), which
    raise :class:`~xenlab.errors.FormatError` naming the offset.
    """
    result = ScanResult(name, len(buf))
    walker = _Walker(name, result, recover)

    def top(off: int) -> Location:
        return Location(name, off, Container.BUNDLE)

    if len(buf) == 0:
        result.findings.append(Finding(name, "empty file"))
    elif _looks_intel(buf) or (len(buf) < 48 and bytes(buf[:4]) == b"\x01\x00\x00\x00"):
        walker.intel(buf, top)
        result.parts.append(Part("intel-bundle", 0, len(buf)))
    elif _looks_amd(buf):
        walker.amd(buf, top)
        result.parts.append(Part("amd-containers", 0, len(buf)))
    elif name.endswith(".dat") or _DAT_START.match(bytes(buf[:64])):
        walker.dat(buf, top)
        result.parts.append(Part("dat", 0, len(buf)))
    elif bytes(buf[:4]) == b"0707" or cpio_compressed(buf):
        walker.initrd(buf, progress, early_only)
    else:
        result.parts.append(Part("data", 0, len(buf)))
        if recover:
            walker.search(buf, lambda off: Location(name, off, Container.DATA))
    if progress:
        progress(len(buf), len(buf))
    return result


def cpio_compressed(buf: Buffer) -> bool:
    """True when ``buf`` starts with a compression magic the kernel can unpack."""
    return detect(buf, 0) is not None


def scan_file(
    path: Path,
    *,
    early_only: bool = False,
    recover: bool = True,
    progress: Progress | None = None,
) -> ScanResult:
    """Scan the file at ``path`` through a read-only mmap (never loaded whole)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                return scan_buffer(b"", str(path), early_only=early_only, recover=recover)
            # Not closed here: the updates found keep zero-copy slices of the
            # mapping, and it is unmapped when the last of them goes.
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as err:
        raise XenlabError(f"{path}: cannot read: {err.strerror or err}") from err
    return scan_buffer(
        memoryview(mm), str(path), early_only=early_only, recover=recover, progress=progress
    )
