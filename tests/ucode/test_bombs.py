"""Issue item 13 end to end: bombs through the scan and ``xenlab ucode``, with numbers.

Every bomb is built here (tests/ucode/builders.py writes the headers and
frames by hand) and sits beside real microcode: the early cpio in front, as
mkinitramfs lays it out, and sometimes a member before the bomb.  Each test
checks that the real updates are found, that the skip is reported with its
offset and reason, and a bound: peak RSS growth of a ``xenlab`` process
(its VmHWM over its RSS when the command starts, after imports), seconds,
or what the result holds.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import mutations
from tests.ucode import builders as b
from xenlab.errors import XenlabError
from xenlab.formats.cpio import CpioMember, write_newc
from xenlab.formats.intel_ucode import build_update
from xenlab.ucode.scan import ScanLimits, ScanResult, scan_buffer, scan_file
from xenlab.ucode.update import Container

MiB = 1 << 20
RSS_BOUND = 200 * MiB
UCODE = b"kernel/x86/microcode/GenuineIntel.bin"
EARLY = b.early_cpio(b.INTEL_OLD, b.AMD_CONTAINER)
EARLY_SEEN = [("intel", 0x10, True), ("amd", 0x08001227, True), ("amd", 0x0800820B, True)]
# The compression names the scan reports, by builder name.
SCAN_NAME = {"lz4": "lz4_legacy", "lz4-frame": "lz4_frame"}


def early_seen(result: ScanResult) -> list[tuple[str, int, bool]]:
    return [(u.vendor.value, u.revision, u.source.early) for u in result.updates
            if u.source.early]  # fmt: skip


def filesize_bomb() -> bytes:
    """The reviewer's first case: a member named like microcode claiming 1.6 GB, 1.6 GB of zeros."""
    return EARLY + b.zstd_frame([b.newc_header(UCODE, 0x64000000), (0, 0x64000000)])


def namesize_bomb() -> bytes:
    """The reviewer's second case: a name claiming 1.6 GB."""
    return EARLY + b.zstd_frame([b.newc_header(b"x", 0, namesize=0x64000000), (0, 0x64000000)])


# ------------------------------------------------ a xenlab process, measured

PROBE = """
import json, os, sys, time
import xenlab.cli.ucode  # the command's imports (numpy, rich, the codecs) are not the scan
from xenlab.cli.main import main


def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


# VmHWM is this process's own peak; getrusage's ru_maxrss would carry the
# parent's size across fork and exec.  Growth: the peak over the RSS at start.
before = status("VmRSS:")
start = time.perf_counter()
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
seconds = time.perf_counter() - start
with open(os.environ["XENLAB_PROBE"], "w") as f:
    json.dump({"code": code, "seconds": seconds, "rss_growth": status("VmHWM:") - before}, f)
"""


@dataclass(frozen=True)
class Probe:
    code: int
    out: str
    err: str
    seconds: float
    rss_growth: int


def probe(tmp_path: Path, *args: str) -> Probe:
    """``xenlab ARGS`` in a fresh interpreter; the scan's peak RSS growth and time."""
    rec = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "XENLAB_PROBE": str(rec)})  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    data = json.loads(rec.read_text())
    return Probe(data["code"], proc.stdout, proc.stderr, data["seconds"], data["rss_growth"])


def run_xenlab(*args: str) -> tuple[int, str, str]:
    """The installed ``xenlab`` script, as a user runs it."""
    proc = subprocess.run([str(Path(sys.executable).with_name("xenlab")), *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert "Traceback" not in proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


def put(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# ------------------------------------------------------- the reviewer's cases


def test_reviewer_filesize_bomb(tmp_path: Path) -> None:
    """Was 3.3 GB of RSS and 10 s (the member read whole, then joined)."""
    p = put(tmp_path, "initrd.img", filesize_bomb())
    assert len(p.read_bytes()) < 64_000  # 51 KB of zstd behind a 10 KB early cpio
    pr = probe(tmp_path, "ucode", "scan", "--json", str(p))
    assert pr.rss_growth < RSS_BOUND, pr.rss_growth
    assert pr.seconds < 30
    assert pr.code == 1
    assert [(u["vendor"], u["revision"], u["source"]["early"]) for u in json.loads(pr.out)] \
        == EARLY_SEEN
    at = f"{p}[zstd@{len(EARLY):#x}]"
    assert (f"skipped: {at}+0x0: member 'kernel/x86/microcode/GenuineIntel.bin': filesize "
            "0x64000000 is over the 32 MiB member limit: not read") in pr.err
    assert (f"skipped: {at}+0x40000000: the scan's decompression budget of 1 GiB is used up "
            "here (zstd output stopped after 0x40000000 bytes); the rest of the stream and of "
            "the file are not scanned") in pr.err


def test_reviewer_namesize_bomb(tmp_path: Path) -> None:
    """Was 1.7 GB of RSS (the name read whole)."""
    p = put(tmp_path, "initrd.img", namesize_bomb())
    pr = probe(tmp_path, "ucode", "scan", str(p))
    assert pr.rss_growth < RSS_BOUND, pr.rss_growth
    assert pr.seconds < 30
    assert pr.code == 1
    assert "3 update(s), 0 failing checks, 2 thing(s) skipped (see stderr)" in pr.out
    assert (f"skipped: {p}[zstd@{len(EARLY):#x}]+0x0: member 'x': namesize 0x64000000 is over "
            "PATH_MAX (4096): the kernel's unpacker skips this entry") in pr.err
    assert "decompression budget of 1 GiB is used up" in pr.err


@pytest.mark.parametrize("command", ["extract", "build-early"])
def test_extract_and_build_early_are_not_bombable(tmp_path: Path, command: str) -> None:
    p = put(tmp_path, "initrd.img", filesize_bomb())
    out = tmp_path / "out"
    if command == "extract":
        pr = probe(tmp_path, "ucode", "extract", str(p), "-o", str(out), "--json")
    else:
        pr = probe(tmp_path, "ucode", "build-early", str(out), "--from", str(p),
                   "--append-initrd", str(p), "--check", "--json")  # fmt: skip
    assert pr.rss_growth < RSS_BOUND, pr.rss_growth
    assert pr.seconds < 30
    assert pr.code == 0, pr.err
    report = json.loads(pr.out)
    assert [s["member"] for s in report["skipped"]] == [UCODE.decode(), None]
    assert report["skipped"][0] == {
        "file": str(p), "member": UCODE.decode(), "offset": 0, "archive_offset": len(EARLY),
        "compression": "zstd",
        "reason": "filesize 0x64000000 is over the 32 MiB member limit: not read"}
    if command == "extract":
        assert (out / "intel-ucode" / "06-9a-04").read_bytes() == b.INTEL_OLD
    else:
        # The old early part is replaced; the bomb follows it byte for byte.
        image = out.read_bytes()
        assert image.endswith(p.read_bytes()[len(EARLY):])
        assert report["replaced_old_early_bytes"] == len(EARLY)


# ---------------------------------------------------------- every compression


@pytest.mark.parametrize("name", b.BOMB_COMPRESSIONS)
def test_big_member_is_not_read_with_any_compression(tmp_path: Path, name: str) -> None:
    """A 160 MiB member named like microcode: it used to be read whole (twice over)."""
    big = 160 * MiB
    main = [b.newc_header(b"lib/firmware/intel-ucode/06-9a-04", big), (0, big), b.trailer()]
    p = put(tmp_path, "initrd.img", EARLY + b.bomb(name, main))
    pr = probe(tmp_path, "ucode", "scan", "--json", str(p))
    assert pr.rss_growth < RSS_BOUND, (name, pr.rss_growth)
    assert pr.seconds < 60
    assert pr.code == 1
    assert [(u["vendor"], u["revision"], u["source"]["early"]) for u in json.loads(pr.out)] \
        == EARLY_SEEN
    scan = SCAN_NAME.get(name, name)
    assert (f"skipped: {p}[{scan}@{len(EARLY):#x}]+0x0: member "
            "'lib/firmware/intel-ucode/06-9a-04': filesize 0xa000000 is over the 32 MiB "
            "member limit: not read") in pr.err
    assert "budget" not in pr.err


def _main_with_ucode() -> list[b.Piece]:
    """A compressed part whose first member is real microcode, then 32 MiB of zeros."""
    return [b.newc_header(b"lib/firmware/intel-ucode/06-9a-04", len(b.INTEL_NEW)), b.INTEL_NEW,
            b.newc_header(b"zeros.img", 32 * MiB), (0, 32 * MiB), b.trailer()]  # fmt: skip


@pytest.mark.parametrize("name", b.BOMB_COMPRESSIONS)
def test_budget_stops_every_compression_at_its_byte(name: str) -> None:
    data = EARLY + b.bomb(name, _main_with_ucode())
    start = time.perf_counter()
    result = scan_buffer(data, "i.img", limits=ScanLimits(decompressed=8 * MiB))
    assert time.perf_counter() - start < 10
    scan = SCAN_NAME.get(name, name)
    assert early_seen(result) == EARLY_SEEN
    late = [(u.revision, u.source.container, u.source.member) for u in result.updates[3:]]
    assert late == [(0x43A, Container.COMPRESSED, "lib/firmware/intel-ucode/06-9a-04")]
    (skip,) = result.skipped
    assert (skip.offset, skip.member, skip.archive_offset, skip.compression) == (
        8 * MiB, None, len(EARLY), scan)
    assert skip.reason.startswith(
        f"the scan's decompression budget of 8 MiB is used up here ({scan} output stopped")
    assert result.parts[-1].end is None and not result.complete


# ------------------------------------------------------------ other limits


def test_concatenated_streams_share_one_budget() -> None:
    """3000 zstd frames of 1 MiB of zeros each (114 KB): 1 GiB is decompressed, no more."""
    main = zstandard.ZstdCompressor().compress(
        write_newc([CpioMember("lib/firmware/intel-ucode/06-9a-04", b.INTEL_NEW)]))
    frame = b.zstd_frame([(0, MiB)])
    data = EARLY + main + frame * 3000
    start = time.perf_counter()
    result = scan_buffer(data, "c.img")
    assert time.perf_counter() - start < 60
    assert early_seen(result) == EARLY_SEEN
    assert [u.revision for u in result.updates[3:]] == [0x43A]
    (skip,) = result.skipped
    frames_at = len(EARLY) + len(main)
    assert skip.compression == "zstd" and skip.archive_offset is not None
    assert (skip.archive_offset - frames_at) % len(frame) == 0
    # The budget ends within the 1024th frame (the main archive used some of it).
    assert (skip.archive_offset - frames_at) // len(frame) == 1023
    assert len(result.parts) == 2 + 1024


def test_deeply_concatenated_archives_take_linear_time() -> None:
    """20,000 empty archives (2.5 MB): each is a part; the walk stays linear."""
    data = EARLY + b.trailer() * 20_000
    start = time.perf_counter()
    result = scan_buffer(data, "c.img")
    assert time.perf_counter() - start < 30
    assert early_seen(result) == EARLY_SEEN and result.complete


def test_members_limit() -> None:
    members = [CpioMember("lib/firmware/intel-ucode/06-9a-04", b.INTEL_NEW)]
    members += [CpioMember(f"m{i}", b"x") for i in range(5000)]
    data = EARLY + zstandard.ZstdCompressor().compress(write_newc(members))
    result = scan_buffer(data, "m.img", limits=ScanLimits(members=1000))
    assert [u.revision for u in result.updates] == [0x10, 0x08001227, 0x0800820B, 0x43A]
    (skip,) = result.skipped
    # The stream counts as one: the 1000th member is over.
    assert skip.member == "m998" and skip.compression == "zstd"
    assert skip.reason.startswith("more than 1000 members and compressed streams")
    assert ScanLimits().members == 1 << 16


def test_members_limit_counts_streams() -> None:
    """100,000 empty zstd frames (900 KB) took 4 s; the walk stops at the limit."""
    frames = b.zstd_frame([]) * 100_000
    start = time.perf_counter()
    result = scan_buffer(EARLY + frames, "f.img", limits=ScanLimits(members=2000))
    assert time.perf_counter() - start < 5
    assert early_seen(result) == EARLY_SEEN
    (skip,) = result.skipped
    assert (skip.offset, skip.member) == (len(EARLY) + 2000 * 9, None)
    assert skip.reason.startswith("zstd stream not decompressed: more than 2000 members")


def test_held_limit_copies_updates_out_of_members() -> None:
    """Twelve valid 1 MiB updates (zeros compress to nothing): the result keeps what fits."""
    ups = [build_update(signature=0x906A4, revision=i + 1, platform_mask=0x80,
                        payload=bytes(MiB - 48)) for i in range(12)]  # fmt: skip
    archive = write_newc([CpioMember(f"lib/firmware/intel-ucode/u{i}", u)
                          for i, u in enumerate(ups)])  # fmt: skip
    data = EARLY + zstandard.ZstdCompressor().compress(archive)
    assert len(data) < 100_000
    result = scan_buffer(data, "h.img", limits=ScanLimits(held=4 * MiB))
    late = result.updates[3:]
    assert [u.revision for u in late] == [1, 2, 3]
    # Copies of exactly the update, not views keeping a member's data alive.
    assert all(isinstance(u.view.obj, bytes) and len(u.view.obj) == u.size for u in late)
    (skip,) = result.skipped
    assert skip.member == "lib/firmware/intel-ucode/u3" and skip.compression == "zstd"
    assert skip.reason.startswith("at +0x0 of its data: with this update the result would hold "
                                  "more than 4 MiB (the held limit)")


def test_ext_table_over_the_limit_in_a_bundle(tmp_path: Path) -> None:
    ext = [(0x90000 + i, 1) for i in range(2000)]
    huge = build_update(signature=0x906A4, revision=7, platform_mask=1, payload=bytes(4), ext=ext)
    p = put(tmp_path, "bundle.bin", b.INTEL_OLD + huge + b.INTEL_PF40)
    result = scan_file(p)
    assert [u.revision for u in result.updates] == [0x10, 0xB]
    (skip,) = result.skipped
    ext_at = len(b.INTEL_OLD) + 48 + struct.unpack_from("<I", huge, 28)[0]  # after data_size
    assert (skip.offset, skip.member) == (ext_at, None)
    assert str(skip) == (f"{p}+{ext_at:#x}: ext_count: 2000 extended signatures, more than the "
                         "1024 read from one update (real updates have a few); not read")


def test_recover_search_over_overlapping_candidates(tmp_path: Path) -> None:
    """8 MiB of headers every 48 bytes, each claiming 1 MiB with a wrong checksum."""
    head = struct.pack("<12I", 1, 1, 0x01012020, 0x906A4, 0x1234, 1, 1, MiB - 48, MiB, 0, 0, 0)
    junk = (head * (8 * MiB // 48 + 1))[: 8 * MiB]
    p = put(tmp_path, "data.img", b"\xff" * 64 + b.INTEL_OLD + junk)
    start = time.perf_counter()
    code, _, err = run_xenlab("ucode", "scan", str(p))
    assert time.perf_counter() - start < 60
    assert code == 1
    assert "skipped:" in err and "recover-mode search: candidates that fail their checks" in err
    result = scan_file(p)
    assert result.updates[0].revision == 0x10 and result.updates[0].checksum_ok


def test_dat_over_the_member_limit(tmp_path: Path) -> None:
    text = ",\n".join(f"0x{w:08x}" for w in range(20_000)) + "\n"
    p = put(tmp_path, "microcode.dat", text.encode())
    result = scan_file(p, limits=ScanLimits(member=64 * 1024))
    (skip,) = result.skipped
    assert str(skip) == (f"{p}+0x0: .dat text of {len(text)} bytes is over the 64 KiB member "
                         "limit: not parsed")


def test_long_name_in_an_uncompressed_archive_is_skipped() -> None:
    """namesize 5000, the name spelling TRAILER!!!: skipped as the kernel does, not a trailer."""
    name = b"TRAILER!!!"
    entry = b.newc_header(name, 4, namesize=5000) + bytes(5000 - len(name))
    entry += bytes(-len(entry) % 4) + b"abcd"
    second = write_newc([CpioMember("lib/firmware/intel-ucode/06-9a-04", b.INTEL_NEW)])
    data = EARLY + entry + second
    result = scan_buffer(data, "n.img")
    assert [u.revision for u in result.updates] == [0x10, 0x08001227, 0x0800820B, 0x43A]
    (skip,) = result.skipped
    assert (skip.offset, skip.member, skip.compression) == (len(EARLY), "TRAILER!!!", None)
    assert "namesize 0x1388 is over PATH_MAX (4096)" in skip.reason


def test_reports_are_capped(tmp_path: Path) -> None:
    """50,000 tiny members named like microcode and holding none: 1000 warnings, then a count."""
    members = [CpioMember(f"intel-ucode/{i}", b"nope") for i in range(50_000)]
    data = zstandard.ZstdCompressor().compress(write_newc(members))
    result = scan_buffer(data, "r.img")
    assert len(result.findings) == 1001
    assert result.findings[-1].message == "49000 more warnings and skipped items not listed"


# ------------------------------------------------------------ inputs that are not files


@pytest.mark.timeout(60)
def test_pipe_is_read_whole(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def write() -> None:
        with fifo.open("wb") as f:
            f.write(EARLY)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        result = scan_file(fifo)
    finally:
        writer.join(10)
    assert early_seen(result) == EARLY_SEEN


def test_endless_device_is_refused(tmp_path: Path) -> None:
    """/dev/zero used to scan as an empty file (its size is 0)."""
    pr = probe(tmp_path, "ucode", "scan", "/dev/zero")
    assert pr.code == 1
    assert pr.err.strip() == "/dev/zero: pipe or device input larger than 128 MiB: not read"
    assert pr.rss_growth < 300 * MiB


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"ScanLimits\.member must be positive, not 0"):
        ScanLimits(member=0)


# ------------------------------------------------------------ fuzzing


def _seeds() -> dict[str, bytes]:
    main = write_newc([CpioMember("init", b"#!/bin/sh\n", mode=0o100755),
                       CpioMember("lib/firmware/intel-ucode/06-9a-04", b.INTEL_NEW)])
    out = {name: EARLY + b.bomb(name, [main]) for name in b.BOMB_COMPRESSIONS}
    out["gzip-multi"] = EARLY + zlib.compress(main, wbits=31) * 3
    out["bomb-zstd"] = EARLY + b.zstd_frame([b.newc_header(UCODE, 0x7FFFFFFF), (0, 4 * MiB)])
    return out


FUZZ_SEEDS = _seeds()
FUZZ_LIMITS = ScanLimits(decompressed=2 * MiB, member=256 * 1024, held=MiB, members=2000)
BIG_FIELDS = [b"FFFFFFFF", b"7FFFFFFF", b"00100000", b"00001001", b"77777777777"]


def mutated() -> st.SearchStrategy[bytes]:
    # Size fields of cpio (8 hex digits), Intel and AMD (little-endian dwords).
    return mutations.mutated(FUZZ_SEEDS, [*BIG_FIELDS, b"\xff\xff\xff\xff",
                                          b"\x00\x00\x00\x40", b"\x00\x04\x00\x00"],
                             ("flip", "truncate", "insert", "field"))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_initrds_stay_bounded(data: bytes) -> None:
    """Random mutations (huge fields among them): bounded time, only xenlab's errors."""
    start = time.perf_counter()
    try:
        result = scan_buffer(data, "m.img", limits=FUZZ_LIMITS)
    except XenlabError:
        return
    finally:
        assert time.perf_counter() - start < 5
    assert sum(u.size for u in result.updates) <= len(data) + FUZZ_LIMITS.held
    for skip in result.skipped:
        assert skip.file == "m.img" and skip.offset >= 0 and skip.reason
