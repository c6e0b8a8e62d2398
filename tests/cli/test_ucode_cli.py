"""``xenlab ucode``: the commands end to end, through main() as a user runs them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import zstandard

from tests.clirun import run_cli as run
from tests.ucode import builders as b
from xenlab.formats.cpio import CpioMember, write_newc

ALL = b.INTEL_OLD + b.INTEL_NEW + b.INTEL_PF40




@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    p = tmp_path / "intel.bin"
    p.write_bytes(ALL)
    return p


@pytest.fixture
def amd(tmp_path: Path) -> Path:
    p = tmp_path / "microcode_amd_fam17h.bin"
    p.write_bytes(b.AMD_CONTAINER)
    return p


def test_scan_json(capsys: pytest.CaptureFixture[str], bundle: Path, amd: Path) -> None:
    code, out, _ = run(capsys, "ucode", "scan", "--json", str(bundle), str(amd))
    assert code == 0
    data = json.loads(out)
    assert [(d["vendor"], d["revision"]) for d in data] == [
        ("intel", 0x10), ("intel", 0x43A), ("intel", 0xB),
        ("amd", 0x08001227), ("amd", 0x0800820B)]
    assert data[3]["signatures"] == [0x800F12]
    assert data[1]["source"]["offset"] == len(b.INTEL_OLD)


def test_scan_table(capsys: pytest.CaptureFixture[str], bundle: Path) -> None:
    code, out, _ = run(capsys, "ucode", "scan", str(bundle))
    assert code == 0
    assert "0x43a" in out and "2025-10-12" in out and "3 update(s), 0 failing" in out


def test_select_explains(capsys: pytest.CaptureFixture[str], bundle: Path) -> None:
    code, out, _ = run(capsys, "ucode", "select", "--cpu", "0x906a4,0x80", "--json", str(bundle))
    assert code == 0
    data = json.loads(out)
    assert data["selected"]["revision"] == 0x43A
    assert {c["revision"]: c["fits"] for c in data["considered"]} == {
        0x10: True, 0x43A: True, 0xB: False}
    code, out, _ = run(capsys, "ucode", "select", "--cpu", "0x50654", str(bundle))
    assert code == 1 and "no update fits" in out


def test_select_needs_one_cpu_option(capsys: pytest.CaptureFixture[str], bundle: Path) -> None:
    code, _, err = run(capsys, "ucode", "select", str(bundle))
    assert code == 2 and "--cpu" in err
    code, _, err = run(capsys, "ucode", "select", "--cpu", "0xzz", str(bundle))
    assert code == 1 and "--cpu" in err


def test_extract_firmware_dir_and_bundle(capsys: pytest.CaptureFixture[str], bundle: Path,
                                         amd: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "fw"
    code, _, _ = run(capsys, "ucode", "extract", str(bundle), str(amd), "-o", str(out_dir))
    assert code == 0
    names = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    assert names == ["amd-ucode/microcode_amd_fam17h.bin", "intel-ucode/06-9a-03",
                     "intel-ucode/06-9a-04"]
    one = tmp_path / "one.bin"
    code, _, _ = run(capsys, "ucode", "extract", str(bundle), "--cpu", "0x906a4,0x40",
                     "--bundle", str(one))
    assert code == 0 and one.read_bytes() == b.INTEL_PF40


def _initrd(tmp_path: Path) -> Path:
    main_cpio = write_newc([CpioMember("init", b"#!/bin/sh\n", mode=0o100755)])
    p = tmp_path / "initrd.img"
    p.write_bytes(zstandard.ZstdCompressor().compress(main_cpio))
    return p


def test_build_early_append_check(capsys: pytest.CaptureFixture[str], bundle: Path, amd: Path,
                                  tmp_path: Path) -> None:
    initrd = _initrd(tmp_path)
    out = tmp_path / "new.img"
    code, text, _ = run(capsys, "ucode", "build-early", str(out), "--from", str(bundle),
                        "--from", str(amd), "--append-initrd", str(initrd), "--check", "--json")
    assert code == 0, text
    rep = json.loads(text)
    assert rep["intel"] == 2 and rep["amd"] == 2 and rep["check"]["missing"] == 0
    assert out.read_bytes().endswith(initrd.read_bytes())
    # Debian's own tool sees both parts.
    ls = subprocess.run(["lsinitramfs", str(out)], capture_output=True, text=True, check=True)
    assert "kernel/x86/microcode/GenuineIntel.bin" in ls.stdout
    assert "kernel/x86/microcode/AuthenticAMD.bin" in ls.stdout
    assert "init" in ls.stdout.split()
    # And the Xen advice is ucode=scan.
    code, text, _ = run(capsys, "ucode", "xen-cmdline", str(out), "--cpu", "0x906a4,0x80",
                        "--json")
    adv = json.loads(text)
    assert code == 0 and adv["option"] == "ucode=scan" and adv["ok"]
    assert any("0x43a" in n for n in adv["notes"])


def test_xen_cmdline_flags_compressed_only(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    main_cpio = write_newc([CpioMember("lib/firmware/intel-ucode/06-9a-04", b.INTEL_PF40)])
    p = tmp_path / "late.img"
    p.write_bytes(zstandard.ZstdCompressor().compress(main_cpio))
    code, text, _ = run(capsys, "ucode", "xen-cmdline", str(p))
    assert code == 1 and "compressed archive" in text and "build-early" in text


def test_xen_cmdline_raw_bundle(capsys: pytest.CaptureFixture[str], bundle: Path) -> None:
    code, text, _ = run(capsys, "ucode", "xen-cmdline", str(bundle), "--module", "2", "--json")
    assert code == 0 and json.loads(text)["option"] == "ucode=2"


def test_load_is_a_dry_run_by_default(capsys: pytest.CaptureFixture[str], bundle: Path,
                                      tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "proc/cpuinfo").write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 154\n"
        "stepping\t: 4\nmicrocode\t: 0x400\n\n")
    code, text, _ = run(capsys, "ucode", "load", str(bundle), "--root", str(root))
    assert code == 0 and "dry run" in text and "intel-ucode/06-9a-04" in text
    assert not (root / "lib").exists()


def test_cpu_json_is_self_consistent(capsys: pytest.CaptureFixture[str]) -> None:
    from xenlab.ucode.cpu import signature_from_fms

    code, out, _ = run(capsys, "ucode", "cpu", "--json")
    assert code == 0
    cpu = json.loads(out)
    assert cpu["vendor"] in ("intel", "amd")
    assert cpu["signature"] & 0x0FFF3FFF == signature_from_fms(
        cpu["family"], cpu["model"], cpu["stepping"])


# ------------------------------------------------- what a scan skipped (issue item 13)


UCODE = b"kernel/x86/microcode/GenuineIntel.bin"
EARLY = b.early_cpio(b.INTEL_OLD, b.AMD_CONTAINER)


@pytest.fixture
def small_bomb(tmp_path: Path) -> Path:
    """A member named like microcode claiming 64 MiB (over the member limit), quick to scan."""
    main = [b.newc_header(UCODE, 64 << 20), (0, 64 << 20), b.trailer()]
    p = tmp_path / "initrd.img"
    p.write_bytes(EARLY + b.zstd_frame(main))
    return p


SKIP_JSON_KEYS = ["file", "member", "offset", "archive_offset", "compression", "reason"]


def test_scan_table_lists_skips_below(capsys: pytest.CaptureFixture[str], small_bomb: Path
                                      ) -> None:
    code, out, err = run(capsys, "ucode", "scan", str(small_bomb))
    assert code == 1
    assert "3 update(s), 0 failing checks, 1 thing(s) skipped (see stderr)" in out
    assert err.splitlines() == [
        f"skipped: {small_bomb}[zstd@{len(EARLY):#x}]+0x0: member "
        "'kernel/x86/microcode/GenuineIntel.bin': filesize 0x4000000 is over the 32 MiB member "
        "limit: not read"]


def test_scan_json_keeps_its_list(capsys: pytest.CaptureFixture[str], small_bomb: Path) -> None:
    code, out, err = run(capsys, "ucode", "scan", "--json", str(small_bomb))
    assert code == 1
    data = json.loads(out)
    assert isinstance(data, list) and len(data) == 3
    assert list(data[0]) == ["vendor", "signatures", "platform_mask", "revision", "date", "size",
                             "checksum_ok", "source", "platforms", "equiv_id", "family",
                             "problems"]  # fmt: skip
    assert err.startswith("skipped: ")


@pytest.mark.parametrize("command", ["select", "extract", "build-early", "xen-cmdline"])
def test_json_objects_carry_skipped(capsys: pytest.CaptureFixture[str], small_bomb: Path,
                                    tmp_path: Path, command: str) -> None:
    args = {
        "select": ["select", "--cpu", "0x906a4,0x80", str(small_bomb)],
        "extract": ["extract", str(small_bomb), "-o", str(tmp_path / "fw")],
        "build-early": ["build-early", str(tmp_path / "e.cpio"), "--from", str(small_bomb)],
        "xen-cmdline": ["xen-cmdline", str(small_bomb)],
    }[command]
    code, out, err = run(capsys, "ucode", *args, "--json")
    assert code == 0, err
    (skip,) = json.loads(out)["skipped"]
    assert list(skip) == SKIP_JSON_KEYS
    assert (skip["member"], skip["offset"], skip["archive_offset"]) == (
        UCODE.decode(), 0, len(EARLY))
    assert "skipped: " in err
