"""``xenlab ucode`` against hostile and unlucky input: errors name the place, nothing crashes.

Issue 3: truncated headers, wrong checksums, sizes past the end of the file,
cpio names past the end, ``../`` member names, 1 GiB sparse files, random and
mutated bytes must give a clear error or warning naming the offset; never a
traceback, never an exception other than xenlab's, never a write outside the
target; outputs are replaced atomically.  Commands run through
``xenlab.cli.main.main`` (as a user runs them, exit codes included) and, for
a few cases, through the installed ``xenlab`` script in a subprocess.

Every bug these tests found (11) has been fixed; they now pin the behaviour.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import lzma
import os
import re
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import mutations
from tests.ucode import builders as b
from xenlab.cli.main import main
from xenlab.errors import XenlabError
from xenlab.formats.amd_ucode import build_container
from xenlab.formats.cpio import CpioMember, cpio_checksum, write_newc
from xenlab.ucode.early import build_early, old_early_end
from xenlab.ucode.scan import early_entries, scan_buffer, scan_file

XENLAB = Path(sys.executable).with_name("xenlab")
CPU = "0x906a4,0x80"
INTEL = b.INTEL_OLD  # one 2048-byte update for 0x906a4/0x80, rev 0x10
OFFSET = re.compile(r"\+0x[0-9a-f]+")


# --------------------------------------------------------------------- helpers


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``xenlab ARGS`` in-process; any exception but SystemExit fails the test."""
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return code, out, err


def run_proc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed ``xenlab`` script as a user would."""
    proc = subprocess.run(
        [str(XENLAB), *args], capture_output=True, text=True, timeout=240,
        env={**os.environ, **(env or {})},
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc


def put(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def tree(root: Path) -> set[str]:
    """Every path under ``root`` (files, dirs and links), relative."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def set_u32(data: bytes, offset: int, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into("<I", out, offset, value)
    return bytes(out)


def set_hex(data: bytes, offset: int, value: bytes) -> bytes:
    """Overwrite an 8-hex-digit newc header field."""
    out = bytearray(data)
    out[offset : offset + 8] = value
    return bytes(out)


# newc header field offsets (after the 6-byte magic, 8 hex digits each)
FILESIZE_AT = 6 + 6 * 8  # 0x36
NAMESIZE_AT = 6 + 11 * 8  # 0x5e
CHECK_AT = 6 + 12 * 8  # 0x66
NAME_AT = 110  # 0x6e


def main_cpio() -> bytes:
    return write_newc([
        CpioMember("init", b"#!/bin/sh\nexec /bin/sh\n", mode=0o100755),
        CpioMember("etc/hostname", b"xen\n"),
        CpioMember("lib/firmware/intel-ucode/06-9a-04", b.INTEL_NEW),
    ])


def debian_like() -> bytes:
    """Early cpio (Intel + AMD), then a zstd-compressed main archive, as mkinitramfs lays out."""
    early = b.early_cpio(b.INTEL_OLD + b.INTEL_PF40, b.AMD_CONTAINER)
    return early + zstandard.ZstdCompressor().compress(main_cpio())


# --------------------------------------------------- Intel headers and sizes


def test_truncated_update_warns_at_its_offset(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    p = put(tmp_path, "trunc.bin", INTEL + INTEL[:100])
    code, out, err = run(capsys, "ucode", "scan", "--json", str(p))
    assert code == 0
    assert [u["revision"] for u in json.loads(out)] == [0x10]
    assert f"{p}+0x800" in err and "total_size" in err and "100" in err


def test_truncated_header_alone_warns(capsys: pytest.CaptureFixture[str],
                                      tmp_path: Path) -> None:
    p = put(tmp_path, "hdr.bin", INTEL[:40])
    code, _, err = run(capsys, "ucode", "scan", str(p))
    assert code in (0, 1)
    assert f"{p}+0x0" in err


def test_wrong_checksum_is_shown_with_offset(capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    bad = bytearray(b.INTEL_PF40)
    bad[100] ^= 1
    p = put(tmp_path, "bad.bin", INTEL + bytes(bad))
    code, out, _ = run(capsys, "ucode", "scan", "--json", str(p))
    assert code == 0
    second = json.loads(out)[1]
    assert second["checksum_ok"] is False and second["source"]["offset"] == 0x800
    assert any("0x800" in prob for prob in second["problems"])
    code, out, _ = run(capsys, "ucode", "scan", str(p))
    assert "NO" in out and "bad.bin+0x800" in out and "1 failing" in out
    # A failing update is never written out.
    code, _, err = run(capsys, "ucode", "extract", str(p), "--cpu", "0x906a4,0x40",
                       "--bundle", str(tmp_path / "x.bin"))
    assert code == 1 and "no update" in err and not (tmp_path / "x.bin").exists()


@pytest.mark.parametrize(("total", "where", "field"), [
    (0x7FFFFFFF, 0x20, "total_size"),  # not a multiple of 1024: the field itself
    (0x7FFFFC00, 0x0, "total_size"),  # runs past the end: the update's start
    (0xFFFFFC00, 0x0, "total_size"),
    (16, 0x20, "total_size"),  # smaller than the header
])
def test_total_size_past_the_end(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                 total: int, where: int, field: str) -> None:
    p = put(tmp_path, "huge.bin", INTEL + set_u32(b.INTEL_PF40, 32, total))
    code, out, err = run(capsys, "ucode", "scan", "--json", str(p))
    assert code == 0
    assert [u["revision"] for u in json.loads(out)] == [0x10]
    assert f"{p}+{0x800 + where:#x}" in err and field in err


def test_ext_count_huge(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data_size = struct.unpack_from("<I", b.INTEL_NEW, 28)[0]
    ext_at = 48 + data_size
    p = put(tmp_path, "ext.bin", set_u32(b.INTEL_NEW, ext_at, 0xFFFFFFFF))
    code, out, err = run(capsys, "ucode", "scan", "--json", str(p))
    assert code == 0
    assert f"{p}+{ext_at:#x}" in err and "ext_count" in err and "4294967295" in err
    assert json.loads(out) == []


def test_data_size_not_dwords(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    p = put(tmp_path, "ds.bin", set_u32(INTEL, 28, 2001))
    code, _, err = run(capsys, "ucode", "scan", str(p))
    assert code == 0 and f"{p}+0x1c" in err and "data_size" in err


# ------------------------------------------------------------------ AMD


def _amd_section() -> int:
    return 12 + int(struct.unpack_from("<I", b.AMD_CONTAINER, 8)[0])


@pytest.mark.parametrize(("mutate", "where", "field"), [
    (lambda d: set_u32(d, 8, 0xFFFFFFF0), 0xC, "equivalence table"),
    (lambda d: set_u32(d, 4, 9), 0x4, "equiv_type"),
    (lambda d: set_u32(d, _amd_section() + 4, 0xFFFFFFFF), None, "patch section"),
    (lambda d: set_u32(d, _amd_section(), 7), None, "section_type"),
    (lambda d: d[:30], 0xC, "equivalence table"),
])
def test_amd_container_sizes(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                             mutate: object, where: int | None, field: str) -> None:
    assert callable(mutate)
    p = put(tmp_path, "amd.bin", mutate(b.AMD_CONTAINER))
    code, _, err = run(capsys, "ucode", "scan", "--json", str(p))
    assert code == 0
    at = _amd_section() if where is None else where
    assert f"{p}+{at:#x}" in err and field in err


def test_amd_equivalence_table_only(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    p = put(tmp_path, "amd0.bin", build_container(b.AMD_EQUIV, []))
    code, out, _ = run(capsys, "ucode", "scan", "--json", str(p))
    assert code == 0 and json.loads(out) == []
    code, out, _ = run(capsys, "ucode", "select", "--cpu", "amd:0x800f12", str(p))
    assert code == 1 and "no update fits" in out
    code, _, err = run(capsys, "ucode", "extract", str(p), "-o", str(tmp_path / "fw"))
    assert code == 1 and "no update" in err and not (tmp_path / "fw").exists()


def test_xen_cmdline_amd_container_without_patches(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    p = put(tmp_path, "amd0.bin", build_container(b.AMD_EQUIV, []))
    code, out, _ = run(capsys, "ucode", "xen-cmdline", str(p))
    assert code == 1 and "problem" in out


# ------------------------------------------------------------------ cpio


def test_cpio_namesize_past_the_end(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    arc = write_newc([CpioMember("kernel/x86/microcode/GenuineIntel.bin", INTEL)])
    p = put(tmp_path, "n.cpio", set_hex(arc, NAMESIZE_AT, b"7FFFFFFF"))
    code, _, err = run(capsys, "ucode", "scan", str(p))
    assert code == 1 and "namesize" in err
    assert re.search(rf"{re.escape(str(p))}\+0x(5e|6e)\b", err), err


def test_cpio_namesize_past_the_end_in_a_later_archive(capsys: pytest.CaptureFixture[str],
                                                       tmp_path: Path) -> None:
    early = b.early_cpio(INTEL)
    bad = set_hex(write_newc([CpioMember("x", b"1234")]), NAMESIZE_AT, b"7FFFFFFF")
    p = put(tmp_path, "second.img", early + bad)
    code, _, err = run(capsys, "ucode", "scan", str(p))
    assert code == 1 and "namesize" in err
    # The offset is absolute in the file, not relative to the second archive.
    got = int(re.search(rf"{re.escape(str(p))}\+(0x[0-9a-f]+)", err).group(1), 16)  # type: ignore[union-attr]
    assert got in (len(early) + NAMESIZE_AT, len(early) + NAME_AT)


def test_early_only_survives_a_broken_later_archive(capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    early = b.early_cpio(INTEL)
    bad = set_hex(write_newc([CpioMember("x", b"1234")]), NAMESIZE_AT, b"7FFFFFFF")
    p = put(tmp_path, "second.img", early + bad)
    code, out, _ = run(capsys, "ucode", "scan", "--early-only", "--json", str(p))
    assert code == 0 and [u["source"]["early"] for u in json.loads(out)] == [True]


@pytest.mark.parametrize("size", [b"FFFFFFFF", b"7FFFFFFF", b"00100000"])
def test_cpio_filesize_past_the_end(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                    size: bytes) -> None:
    arc = write_newc([CpioMember("kernel/x86/microcode/GenuineIntel.bin", INTEL)])
    p = put(tmp_path, "f.cpio", set_hex(arc, FILESIZE_AT, size))
    code, _, err = run(capsys, "ucode", "scan", str(p))
    assert code == 1 and "filesize" in err
    data_at = NAME_AT + len("kernel/x86/microcode/GenuineIntel.bin") + 1
    data_at += -data_at % 4
    assert f"{p}+{data_at:#x}" in err


@pytest.mark.parametrize("cut", [3, 6, 50, 109, 120])
def test_cpio_truncated_header(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                               cut: int) -> None:
    arc = write_newc([CpioMember("kernel/x86/microcode/GenuineIntel.bin", INTEL)])
    p = put(tmp_path, "t.cpio", arc[:cut])
    code, _, err = run(capsys, "ucode", "scan", str(p))
    assert code in (0, 1)
    if code == 1:
        assert OFFSET.search(err) and str(p) in err


def test_cpio_non_hex_field(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    arc = write_newc([CpioMember("kernel/x86/microcode/GenuineIntel.bin", INTEL)])
    p = put(tmp_path, "h.cpio", set_hex(arc, FILESIZE_AT, b"0000zz00"))
    code, _, err = run(capsys, "ucode", "scan", str(p))
    # The offset names the bad digit itself (field at 0x36, 'z' 4 digits in).
    assert code == 1 and "filesize" in err and f"{p}+0x3a" in err


def test_cpio_crc_wrong_check_is_reported(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    arc = bytearray(write_newc([CpioMember("kernel/x86/microcode/GenuineIntel.bin", INTEL)]))
    arc[0:6] = b"070702"
    good = b"%08X" % cpio_checksum(INTEL)
    assert set_hex(bytes(arc), CHECK_AT, good) != set_hex(bytes(arc), CHECK_AT, b"00000001")
    p = put(tmp_path, "crc.cpio", set_hex(bytes(arc), CHECK_AT, b"00000001"))
    _, _, err = run(capsys, "ucode", "scan", str(p))
    assert f"{p}+0x0" in err and "check" in err


def test_cpio_crc_right_check_is_quiet(capsys: pytest.CaptureFixture[str],
                                       tmp_path: Path) -> None:
    arc = bytearray(write_newc([CpioMember("kernel/x86/microcode/GenuineIntel.bin", INTEL)]))
    arc[0:6] = b"070702"
    p = put(tmp_path, "crc.cpio", set_hex(bytes(arc), CHECK_AT, b"%08X" % cpio_checksum(INTEL)))
    code, out, err = run(capsys, "ucode", "scan", "--json", str(p))
    assert code == 0 and err == ""
    assert [u["source"]["early"] for u in json.loads(out)] == [True]


# ------------------------------------------------------- names as paths


TRAVERSAL = ("../../etc/passwd", "/abs", "./../x/../../y", "kernel/../../../z")


def _traversal_cpio() -> bytes:
    blobs = (b.INTEL_OLD, b.INTEL_PF40, b.INTEL_NEW, b.AMD_CONTAINER)
    return write_newc([CpioMember(n, d) for n, d in zip(TRAVERSAL, blobs, strict=True)])


def test_scan_reports_traversal_members(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    p = put(tmp_path, "trav.cpio", _traversal_cpio())
    code, out, _ = run(capsys, "ucode", "scan", "--json", str(p))
    assert code == 0
    members = {u["source"]["member"] for u in json.loads(out)}
    assert members == set(TRAVERSAL)
    code, out, _ = run(capsys, "ucode", "scan", str(p))
    flat = re.sub(r"[\s│]+", "", out)
    assert "../../etc/passwd" in flat and ":/abs+0x0" in flat


def test_extract_never_uses_member_names(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    p = put(work, "trav.cpio", _traversal_cpio())
    before = tree(tmp_path)
    out_dir = work / "fw"
    code, _, _ = run(capsys, "ucode", "extract", str(p), "-o", str(out_dir), "--all-revisions")
    assert code == 0
    assert tree(out_dir) == {"intel-ucode", "intel-ucode/06-9a-03", "intel-ucode/06-9a-04",
                             "amd-ucode", "amd-ucode/microcode_amd_fam17h.bin"}
    new = tree(tmp_path) - before
    assert all(n.startswith("a/b/c/fw") for n in new), new
    assert not (tmp_path / "etc").exists() and not Path("/abs").exists()
    # The early cpio built from them uses the loaders' names only.
    out = work / "early.cpio"
    code, _, _ = run(capsys, "ucode", "build-early", str(out), "--from", str(p), "--check")
    assert code == 0
    names = subprocess.run(["cpio", "-t", "--quiet"], input=out.read_bytes(),
                           capture_output=True, check=True).stdout.decode().split()
    assert names == ["kernel", "kernel/x86", "kernel/x86/microcode",
                     "kernel/x86/microcode/GenuineIntel.bin",
                     "kernel/x86/microcode/AuthenticAMD.bin"]


@pytest.mark.parametrize("link", ["intel-ucode", "intel-ucode/06-9a-04"])
def test_extract_refuses_symlinks_out_of_the_target(capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path, link: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "fw"
    (target / "intel-ucode").mkdir(parents=True)
    if link == "intel-ucode":
        (target / "intel-ucode").rmdir()
        (target / link).symlink_to(outside)
    else:
        (target / link).symlink_to(outside / "victim")
    p = put(tmp_path, "one.bin", INTEL)
    code, _, err = run(capsys, "ucode", "extract", str(p), "-o", str(target))
    assert code == 1 and "outside the target" in err and "06-9a-04" in err
    assert list(outside.iterdir()) == []


def test_member_names_do_not_drive_the_terminal(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    arc = write_newc([CpioMember("[bold red]x[/]", INTEL)])
    p = put(tmp_path, "markup.cpio", arc)
    code, out, _ = run(capsys, "ucode", "scan", str(p))
    assert code == 0 and "[bold" in out  # markup shown as text, not interpreted


def test_member_name_escape_sequences_are_neutralised(capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    p = put(tmp_path, "ansi.cpio", write_newc([CpioMember("a\x1b]0;owned\x07\x1b[2Jb", INTEL)]))
    code, out, err = run(capsys, "ucode", "scan", str(p))
    assert code == 0 and "\x1b" not in out and "\x1b" not in err


def test_undecodable_member_name_on_an_ascii_console(tmp_path: Path) -> None:
    p = put(tmp_path, "u.cpio", write_newc([CpioMember("bad\udcffname", INTEL)]))
    proc = run_proc("ucode", "scan", str(p), env={"PYTHONIOENCODING": "ascii"})
    assert proc.returncode == 0


# -------------------------------------------------- compressed and nested


@pytest.mark.parametrize("how", ["truncate", "flip"])
@pytest.mark.parametrize("comp", ["zstd", "gzip", "xz"])
def test_corrupt_compressed_part(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                 comp: str, how: str) -> None:
    payload = main_cpio() + write_newc([CpioMember("big", os.urandom(40000))])
    if comp == "zstd":
        packed = zstandard.ZstdCompressor().compress(payload)
    elif comp == "gzip":
        packed = gzip.compress(payload)
    else:
        packed = lzma.compress(payload, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    early = b.early_cpio(INTEL)
    if how == "truncate":
        body = packed[: len(packed) // 2]
    else:
        flipped = bytearray(packed)
        flipped[len(flipped) // 3] ^= 0xFF
        body = bytes(flipped)
    p = put(tmp_path, "initrd.img", early + body)
    code, _, err = run(capsys, "ucode", "scan", str(p))
    assert code in (0, 1)
    if code == 1:
        assert str(p) in err and OFFSET.search(err)
    # The early part is intact: the early-only view and build-early still work.
    code, out, _ = run(capsys, "ucode", "scan", "--early-only", "--json", str(p))
    assert code == 0 and [u["revision"] for u in json.loads(out)] == [0x10]
    out_img = tmp_path / "new.img"
    code, _, _ = run(capsys, "ucode", "build-early", str(out_img), "--from", str(p),
                     "--append-initrd", str(p), "--cpu", CPU)
    assert code in (0, 1)


def test_truncated_zstd_error_offset_is_in_the_compressed_part(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    early = b.early_cpio(INTEL)
    z = zstandard.ZstdCompressor().compress(main_cpio() + os.urandom(20000))
    p = put(tmp_path, "t.img", early + z[: len(z) // 2])
    code, _, err = run(capsys, "ucode", "scan", str(p))
    assert code == 1 and "zstd" in err
    got = int(re.search(rf"{re.escape(str(p))}\+(0x[0-9a-f]+)", err).group(1), 16)  # type: ignore[union-attr]
    assert len(early) <= got < p.stat().st_size


def test_early_cpio_inside_a_compressed_archive(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    p = put(tmp_path, "nested.img", zstandard.ZstdCompressor().compress(b.early_cpio(INTEL)))
    code, out, _ = run(capsys, "ucode", "scan", "--json", str(p))
    assert code == 0
    (u,) = json.loads(out)
    assert u["source"]["compression"] == "zstd" and u["source"]["early"] is False
    code, out, _ = run(capsys, "ucode", "xen-cmdline", str(p))
    assert code == 1 and "compressed archive" in out


def test_dat_inside_an_initrd(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    words = [int.from_bytes(INTEL[i : i + 4], "little") for i in range(0, len(INTEL), 4)]
    dat = "/* intel */\n" + "".join(f"0x{w:08x},\n" for w in words)
    arc = write_newc([CpioMember("lib/firmware/microcode.dat", dat.encode()),
                      CpioMember("usr/share/broken.dat", b"0x00000001, 0xzz\n")])
    p = put(tmp_path, "dat.img", gzip.compress(arc))
    code, out, err = run(capsys, "ucode", "scan", "--json", str(p))
    assert code == 0
    assert [(u["revision"], u["source"]["member"]) for u in json.loads(out)] == [
        (0x10, "lib/firmware/microcode.dat")]
    assert "broken.dat" in err


@pytest.mark.parametrize("text", [b"0x00000001, 0xzz\n/* open", b"\xff\xfe\x00garbage",
                                  b"0x" + b"f" * 5000 + b",\n", b""])
def test_bad_dat_files(capsys: pytest.CaptureFixture[str], tmp_path: Path, text: bytes) -> None:
    p = put(tmp_path, "microcode.dat", text)
    code, out, err = run(capsys, "ucode", "scan", "--json", str(p))
    assert code == 0 and json.loads(out) == []
    assert str(p) in err


# --------------------------------------------------- command-line input


@pytest.mark.parametrize("spec", ["", "zz", "0x", "0x1,", ",0x80", "06-9a", "intel:", "-1",
                                  "06-9a-04-05", "amd:0x906a4,0x80", "\x00", "0x" + "f" * 40,
                                  "0x906a4,0xfffffffffffffffff", "0x906a4,,", "😀"])
def test_bad_cpu_spec(capsys: pytest.CaptureFixture[str], tmp_path: Path, spec: str) -> None:
    p = put(tmp_path, "one.bin", INTEL)
    for cmd in (["select"], ["extract", "--bundle", str(tmp_path / "o.bin")],
                ["build-early", str(tmp_path / "o.cpio")]):
        args = ["ucode", *cmd, "--cpu", spec]
        args += ["--from", str(p)] if cmd[0] == "build-early" else [str(p)]
        code, _, err = run(capsys, *args)
        assert code == 1, (cmd, err)
        assert re.match(r"--cpu:1:\d+: ", err), err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["one.bin"]


def _missing_cases(tmp_path: Path, good: Path, bad: str) -> list[list[str]]:
    return [
        ["scan", bad],
        ["scan", str(good), bad],
        ["select", "--cpu", CPU, bad],
        ["extract", bad, "-o", str(tmp_path / "fw")],
        ["build-early", str(tmp_path / "e.cpio"), "--from", bad],
        ["build-early", str(tmp_path / "e.cpio"), "--from", str(good), "--append-initrd", bad],
        ["xen-cmdline", bad],
        ["load", bad, "--root", str(tmp_path)],
    ]


def test_missing_input_names_the_file(capsys: pytest.CaptureFixture[str],
                                      tmp_path: Path) -> None:
    good = put(tmp_path, "good.bin", INTEL)
    bad = str(tmp_path / "no-such-initrd.img")
    for case in _missing_cases(tmp_path, good, bad):
        code, _, err = run(capsys, "ucode", *case)
        assert code == 2, case
        assert "no-such-initrd.img" in err and "does not exist" in err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["good.bin"]


def test_directory_where_a_file_is_needed_names_it(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    good = put(tmp_path, "good.bin", INTEL)
    d = tmp_path / "intel-ucode"
    d.mkdir()
    for case in (
        ["build-early", str(tmp_path / "e.cpio"), "--from", str(good), "--append-initrd", str(d)],
        ["xen-cmdline", str(d)],
        ["build-early", str(d), "--from", str(good)],
    ):
        code, _, err = run(capsys, "ucode", *case)
        assert code == 2, case
        assert "intel-ucode" in err and "is a directory" in err


def test_directory_inputs_stand_for_their_files(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    d = tmp_path / "intel-ucode"
    d.mkdir()
    put(d, "06-9a-04", INTEL)
    (d / "sub").mkdir()  # not recursed into
    put(d / "sub", "x.bin", b.INTEL_PF40)
    code, out, _ = run(capsys, "ucode", "scan", "--json", str(d))
    assert code == 0 and [u["source"]["file"] for u in json.loads(out)] == [str(d / "06-9a-04")]
    e = tmp_path / "e.cpio"
    code, _, _ = run(capsys, "ucode", "build-early", str(e), "--from", str(d), "--check")
    assert code == 0 and e.stat().st_size % 512 == 0


@pytest.mark.parametrize("name", ["empty", "empty.dat", "empty.img"])
def test_empty_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str) -> None:
    p = put(tmp_path, name, b"")
    code, out, err = run(capsys, "ucode", "scan", "--json", str(p))
    assert code == 0 and json.loads(out) == [] and f"{p}: empty file" in err
    code, _, _ = run(capsys, "ucode", "select", "--cpu", CPU, str(p))
    assert code == 1
    code, _, err = run(capsys, "ucode", "extract", str(p), "-o", str(tmp_path / "fw"))
    assert code == 1 and "no update" in err
    code, _, _ = run(capsys, "ucode", "xen-cmdline", str(p))
    assert code == 1
    # An empty initrd to append is allowed: the result is the early cpio alone.
    good = put(tmp_path, "good.bin", INTEL)
    out_img = tmp_path / "e.img"
    code, _, _ = run(capsys, "ucode", "build-early", str(out_img), "--from", str(good),
                     "--append-initrd", str(p), "--check")
    assert code == 0 and len(out_img.read_bytes()) % 512 == 0


def test_device_files(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "ucode", "scan", "--json", "/dev/null")
    assert code == 0 and json.loads(out) == [] and "empty file" in err


def test_load_with_garbage_cpuinfo(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    good = put(tmp_path, "good.bin", INTEL)
    (tmp_path / "root/proc").mkdir(parents=True)
    cpuinfo = tmp_path / "root/proc/cpuinfo"
    for text in (b"\xff\xfe\nvendor_id\t: GenuineIntel\ncpu family\t: zz\nmodel\t: 1\n",
                 b"processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n"
                 b"model\t\t: 99999999999999999999\nstepping\t: 4\n"):
        cpuinfo.write_bytes(text)
        code, _, err = run(capsys, "ucode", "load", str(good), "--root", str(tmp_path / "root"))
        assert code == 1 and re.match(rf"{re.escape(str(cpuinfo))}:\d+:\d+: ", err), err
    cpuinfo.unlink()
    code, _, err = run(capsys, "ucode", "load", str(good), "--root", str(tmp_path / "root"))
    assert code == 1 and "--cpu" in err


# ------------------------------------------------------ atomic outputs


def _assert_untouched(out: Path, before: bytes) -> None:
    assert out.read_bytes() == before
    leftovers = [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_failing_build_early_leaves_out_untouched(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    out = put(tmp_path, "initrd.new", b"the old image")
    rnd = put(tmp_path, "random.bin", os.urandom(4096))
    good = put(tmp_path, "good.bin", INTEL)
    bad_initrd = put(tmp_path, "bad.img", set_hex(
        write_newc([CpioMember("kernel/x86/microcode/GenuineIntel.bin", INTEL)]),
        NAMESIZE_AT, b"7FFFFFFF"))
    trunc = debian_like()
    z = put(tmp_path, "ztrunc.img", zstandard.ZstdCompressor().compress(main_cpio())[:40])
    cases = [
        ["--from", str(rnd)],  # nothing found
        ["--from", str(good), "--cpu", "0x50654"],  # nothing fits
        ["--from", str(good), "--cpu", "nonsense"],  # bad --cpu
        ["--from", str(good), "--append-initrd", str(bad_initrd)],  # broken initrd
        ["--from", str(z)],  # corrupt compressed source
        ["--from", str(put(tmp_path, "cut.img", trunc[:-7]))],
    ]
    for case in cases:
        code, _, err = run(capsys, "ucode", "build-early", str(out), *case)
        assert code == 1, (case, err)
        _assert_untouched(out, b"the old image")


def test_failing_check_leaves_out_untouched(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import xenlab.cli.ucode as cli_ucode
    from xenlab.ucode.scan import ScanResult

    out = put(tmp_path, "initrd.new", b"the old image")
    good = put(tmp_path, "good.bin", INTEL)

    def loaders_see_nothing(buf: object, name: str, **kw: object) -> ScanResult:
        # Stand-in for an image the early loaders cannot read.
        return ScanResult(name, 0)

    monkeypatch.setattr(cli_ucode, "scan_buffer", loaders_see_nothing)
    code, _, err = run(capsys, "ucode", "build-early", str(out), "--from", str(good), "--check")
    assert code == 1 and "check failed" in err
    _assert_untouched(out, b"the old image")


@pytest.mark.parametrize("kind", ["build-early", "bundle", "tree"])
def test_unwritable_output_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                            kind: str) -> None:
    good = put(tmp_path, "good.bin", INTEL)
    where = {
        "build-early": ["build-early", str(tmp_path / "no-dir" / "e.cpio"), "--from", str(good)],
        "bundle": ["extract", str(good), "--bundle", str(tmp_path / "no-dir" / "x.bin")],
        "tree": ["extract", str(good), "-o", str(good / "sub")],
    }[kind]
    try:
        code, _, err = run(capsys, "ucode", *where)
    except OSError as exc:  # what the bug looks like in-process
        pytest.fail(f"{type(exc).__name__}: {exc}")
    assert code == 1 and ("no-dir" in err or "good.bin" in err)


def test_unwritable_output_subprocess(tmp_path: Path) -> None:
    """The same through the installed script: no traceback may reach the user."""
    good = put(tmp_path, "good.bin", INTEL)
    proc = subprocess.run([str(XENLAB), "ucode", "build-early",
                           str(tmp_path / "no-dir" / "e.cpio"), "--from", str(good)],
                          capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 1 and "no-dir" in proc.stderr


# ---------------------------------------------------------- big and sparse


def _sparse(path: Path, size: int, pieces: dict[int, bytes]) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        for at, data in pieces.items():
            f.seek(at)
            f.write(data)
    return path


def test_sparse_gib_of_zeros(tmp_path: Path) -> None:
    p = _sparse(tmp_path / "zeros.img", 1 << 30, {})
    proc = run_proc("ucode", "scan", "--json", str(p))
    assert proc.returncode == 0 and json.loads(proc.stdout) == []


def test_sparse_gib_with_an_update_in_the_middle(tmp_path: Path) -> None:
    p = _sparse(tmp_path / "mid.img", 1 << 30, {512 << 20: b.INTEL_NEW, (1 << 30) - 100: b"x"})
    proc = run_proc("ucode", "scan", "--json", str(p))
    assert proc.returncode == 0
    assert [(u["revision"], u["source"]["offset"]) for u in json.loads(proc.stdout)] == [
        (0x43A, 512 << 20)]


@pytest.mark.parametrize("size", [4096, (1 << 30) - 1024])
def test_total_size_over_zeros_warns(tmp_path: Path, size: int) -> None:
    """An update claiming more bytes than its data, the rest of the file NULs (sparse)."""
    p = _sparse(tmp_path / "claim.bin", max(size, 8192), {0: set_u32(INTEL, 32, size)})
    proc = run_proc("ucode", "scan", "--json", str(p))
    assert proc.returncode == 0
    assert f"{p}+0x800" in proc.stderr and "ext" in proc.stderr


def test_total_size_over_data_warns(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    p = put(tmp_path, "claim.bin", set_u32(INTEL, 32, 4096) + bytes(2048) + b.INTEL_PF40)
    code, out, err = run(capsys, "ucode", "scan", "--json", str(p))
    assert code == 0 and f"{p}+0x800" in err and "ext_count" in err
    assert [u["revision"] for u in json.loads(out)] == [0xB]


def test_initrd_followed_by_nul_padding(tmp_path: Path) -> None:
    p = _sparse(tmp_path / "pad.img", 96 << 20, {0: b.early_cpio(INTEL)})
    proc = run_proc("ucode", "scan", "--json", str(p))
    assert proc.returncode == 0
    assert [(u["revision"], u["source"]["early"]) for u in json.loads(proc.stdout)] == [
        (0x10, True)]


def test_bundle_tail_is_not_copied(tmp_path: Path) -> None:
    p = _sparse(tmp_path / "tail.bin", 64 << 20, {0: INTEL})
    tracemalloc.start()
    try:
        result = scan_file(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [u.revision for u in result.updates] == [0x10]
    assert peak < 16 << 20, f"peak {peak >> 20} MiB for a 64 MiB file"


def test_sparse_scans_stay_small(tmp_path: Path) -> None:
    """Data files and padded initrds are walked without copying them."""
    cases = [_sparse(tmp_path / "d.img", 64 << 20, {32 << 20: INTEL}),
             _sparse(tmp_path / "i.img", 16 << 20, {0: b.early_cpio(INTEL)})]
    for p in cases:
        tracemalloc.start()
        try:
            result = scan_file(p)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert [u.revision for u in result.updates] == [0x10]
        assert peak < 16 << 20, (p.name, peak)


# ------------------------------------------------ subprocess end to end


def test_subprocess_bad_inputs(tmp_path: Path) -> None:
    rnd = put(tmp_path, "random.bin", os.urandom(20000))
    proc = run_proc("ucode", "scan", str(rnd))
    assert proc.returncode == 0 and "0 update(s)" in proc.stdout
    proc = run_proc("ucode", "scan", str(tmp_path / "missing.img"))
    assert proc.returncode == 2 and "missing.img" in proc.stderr
    proc = run_proc("ucode", "select", "--cpu", "06-zz-04", str(rnd))
    assert proc.returncode == 1 and proc.stderr.startswith("--cpu:1:")
    trunc = debian_like()
    cut = put(tmp_path, "cut.img", trunc[: len(trunc) - 30])
    proc = run_proc("ucode", "xen-cmdline", str(cut))
    assert proc.returncode == 1 and f"{cut}+0x" in proc.stderr
    arc = set_hex(write_newc([CpioMember("a", b"x")]), NAMESIZE_AT, b"FFFFFFFF")
    proc = run_proc("ucode", "scan", str(put(tmp_path, "n.cpio", arc)))
    assert proc.returncode == 1 and "namesize" in proc.stderr


# ----------------------------------------------------- library fuzzing


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_random_bytes_library(data: bytes) -> None:
    """Random bytes: the room's entry points raise nothing but xenlab's errors."""
    for early_only in (False, True):
        with contextlib.suppress(XenlabError):
            scan_buffer(data, "rnd", early_only=early_only)
    try:
        early_entries(data, "rnd")
        cut = old_early_end(data, "rnd")
        assert 0 <= cut <= len(data)
        build_early([], data)
    except XenlabError:
        pass


def _prefixed(draw: st.DrawFn) -> bytes:
    head = draw(st.sampled_from([b"070701", b"070702", b"070707", b"\x01\x00\x00\x00",
                                 b"DMA\x00", b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"\xfd7zXZ\x00",
                                 b"\x02\x21\x4c\x18", b"BZh", b"\x5d\x00\x00", b"0x"]))
    return head + draw(st.binary(max_size=400))


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.composite(_prefixed)())
def test_random_bytes_behind_magics_library(data: bytes) -> None:
    with contextlib.suppress(XenlabError):
        scan_buffer(data, "rnd")


# ---------------------------------------- mutated real-looking initrds


SEEDS = {
    "debian-zstd": debian_like(),
    "early-gzip": b.early_cpio(INTEL) + gzip.compress(main_cpio()),
    "early-xz": b.early_cpio(INTEL, b.AMD_CONTAINER)
    + lzma.compress(main_cpio(), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    "bundle": b.INTEL_OLD + b.INTEL_NEW + b.INTEL_PF40,
    "amd": b.AMD_CONTAINER,
}

FIELDS = [b"FFFFFFFF", b"7FFFFFFF", b"00000000", b"\xff" * 8, b"\x00" * 8, b"00100000"]


def mutated() -> st.SearchStrategy[bytes]:
    return mutations.mutated(SEEDS, FIELDS)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow,
                                                  HealthCheck.function_scoped_fixture])
@given(mutated())
def test_mutated_initrds_through_the_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                         data: bytes) -> None:
    work = tmp_path / "w"
    work.mkdir(exist_ok=True)
    p = work / "initrd.img"
    p.write_bytes(data)
    out = work / "OUT"
    out.write_bytes(b"old")
    fw = work / "fw"
    commands = [
        ["scan", "--json", str(p)],
        ["scan", "--early-only", str(p)],
        ["select", "--cpu", CPU, "--all", str(p)],
        ["xen-cmdline", str(p)],
        ["extract", str(p), "-o", str(fw), "--all-revisions"],
        ["build-early", str(out), "--from", str(p), "--append-initrd", str(p), "--check"],
    ]
    for cmd in commands:
        code, stdout, err = run(capsys, "ucode", *cmd)
        assert code in (0, 1), (cmd, code, err)
        if code == 1 and cmd[0] == "scan":
            assert str(p) in err and OFFSET.search(err), err
        if cmd[0] == "scan" and "--json" in cmd and code == 0:
            assert isinstance(json.loads(stdout), list)
        if cmd[0] == "build-early" and code == 1:
            assert out.read_bytes() == b"old"
    allowed = {"initrd.img", "OUT", "fw"}
    assert {x.name for x in work.iterdir()} <= allowed
    if fw.exists():
        assert all(n.split("/")[0] in ("intel-ucode", "amd-ucode") for n in tree(fw))
