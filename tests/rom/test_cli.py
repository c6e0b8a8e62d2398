"""``xenlab rom``: the commands end to end, through main() as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.clirun import run_cli as run
from tests.rom import builders as b
from tests.rom.test_sysfs import BDF, FakeKernelRom, device


def test_inspect_json(capsys: pytest.CaptureFixture[str], shared_data: Path) -> None:
    code, out, _ = run(capsys, "rom", "inspect", "--json",
                       str(shared_data / "rom" / "qemu-pc-bios__efi-virtio.rom"))
    assert code == 0
    data = json.loads(out)
    assert data["header_offset"] == 0 and data["problems"] == []
    assert [(i["offset"], i["code_type"], i["vendor_id"], i["device_id"], i["class_code"],
             i["last"], i["checksum_ok"]) for i in data["images"]] == [
        (0, 0, 0x1AF4, 0x1000, 0x020000, False, True),
        (0x10E00, 3, 0x1AF4, 0x1000, 0, True, True)]


def test_inspect_table_and_strict(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    p = tmp_path / "bad.rom"
    p.write_bytes(b.x86_image(checksum=False))
    code, out, _ = run(capsys, "rom", "inspect", str(p))
    assert code == 0 and "BAD" in out and "problem" in out
    code, _, _ = run(capsys, "rom", "inspect", "--strict", str(p))
    assert code == 1


def test_inspect_neither_file_nor_address(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "rom", "inspect", "no-such.rom")
    assert (code, err) == (1, "no-such.rom: no such file, and not a PCI address "
                              "([DDDD:]BB:DD.F)\n")


def test_inspect_no_rom(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    p = tmp_path / "zero.bin"
    p.write_bytes(bytes(1000))
    code, _, err = run(capsys, "rom", "inspect", str(p))
    assert code == 1 and err.startswith(f"{p}+0x0: signature: 00 00, expected 55 aa")


def test_fix_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = tmp_path / "card.rom"
    data = b.rom(b.x86_image(checksum=False, last=False), b.efi_image(),
                 header=b"NVGI" + bytes(0x80))
    src.write_bytes(data)
    out = tmp_path / "fixed.rom"
    code, text, _ = run(capsys, "rom", "fix", str(src), "-o", str(out), "--strip-header",
                        "--set-ids", "10de:1b80", "--keep-images", "x86", "--json")
    assert code == 0
    report = json.loads(text)
    assert out.read_bytes()[:2] == b"\x55\xaa" and len(out.read_bytes()) == 1024
    whats = [c["what"] for c in report["changes"]]
    assert any("vendor header" in w for w in whats) and any("efi image" in w for w in whats)
    assert report["result"]["images"][0]["vendor_id"] == 0x10DE
    assert report["result"]["images"][0]["checksum_ok"] is True


def test_fix_refusal_writes_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = tmp_path / "cut.rom"
    src.write_bytes(b.x86_image()[:700])
    out = tmp_path / "out.rom"
    code, _, err = run(capsys, "rom", "fix", str(src), "-o", str(out))
    assert code == 1 and "refused" in err and not out.exists()


def test_fix_bad_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = tmp_path / "a.rom"
    src.write_bytes(b.x86_image())
    for opt in (["--set-ids", "zz"], ["--keep-images", "arm"], ["--checksum-at", "middle"]):
        code, _, _ = run(capsys, "rom", "fix", str(src), "-o", str(tmp_path / "o"), *opt)
        assert code == 2, opt


def test_check(capsys: pytest.CaptureFixture[str], shared_data: Path, tmp_path: Path) -> None:
    vga = shared_data / "rom" / "qemu-pc-bios__vgabios-stdvga.bin"
    code, out, _ = run(capsys, "rom", "check", str(vga), "--ids", "1234:1111")
    assert code == 0 and "runs as the VGA BIOS" in out
    bad = tmp_path / "bad.bin"
    raw = bytearray(vga.read_bytes())
    raw[-1] ^= 1
    bad.write_bytes(bytes(raw))
    code, out, _ = run(capsys, "rom", "check", "--json", str(bad), "--ids", "1234:1111")
    assert code == 1 and json.loads(out)["ok"] is False


def test_dump(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = device(tmp_path / "sys", boot_vga=True)
    kernel = FakeKernelRom(d / "rom", b.multi())
    out = tmp_path / "dump.rom"
    code, text, err = run(capsys, "rom", "dump", "01:00.0", "-o", str(out),
                          "--sysfs", str(tmp_path / "sys"))
    kernel.done()
    assert code == 0 and out.read_bytes() == b.multi()
    assert f"from {BDF}" in text and "boot VGA" in err


def test_inspect_device(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = device(tmp_path / "sys")
    kernel = FakeKernelRom(d / "rom", b.multi())
    code, text, _ = run(capsys, "rom", "inspect", "--json", "01:00.0",
                        "--sysfs", str(tmp_path / "sys"))
    kernel.done()
    data = json.loads(text)
    assert code == 0 and data["device"]["address"] == BDF and len(data["images"]) == 2
