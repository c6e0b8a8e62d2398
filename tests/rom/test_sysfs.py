"""rom.sysfs against a sysfs-shaped tree: enable, read, disable, in that order, always.

The kernel's ``rom`` attribute is not a plain file: writing enables or
disables, reading returns the ROM.  The fake below plays the kernel's part
through a FIFO: a thread expects the enable write, serves the ROM to the
read, then expects the disable write, and records exactly what it saw.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.rom import builders as b
from xenlab.errors import FormatError, XenlabError
from xenlab.rom.sysfs import dump_rom, inspect_device, parse_bdf, read_device_rom

BDF = "0000:01:00.0"


def device(root: Path, *, vendor: int = 0x1234, device_id: int = 0x1111, rom: bool = True,
           boot_vga: bool = False) -> Path:
    d = root / "bus" / "pci" / "devices" / BDF
    d.mkdir(parents=True)
    (d / "vendor").write_text(f"{vendor:#06x}\n")
    (d / "device").write_text(f"{device_id:#06x}\n")
    (d / "class").write_text("0x030000\n")
    (d / "boot_vga").write_text("1\n" if boot_vga else "0\n")
    if rom:
        os.mkfifo(d / "rom")
    return d


class FakeKernelRom:
    """Serve one enable / read / disable round on a FIFO and record it."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path = path
        self.data = data
        self.seen: list[tuple[str, bytes]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with open(self.path, "rb") as f:  # the enable write
            self.seen.append(("write", f.read()))
        with open(self.path, "wb") as f:  # the read
            f.write(self.data)
        self.seen.append(("read", b""))
        with open(self.path, "rb") as f:  # the disable write
            self.seen.append(("write", f.read()))

    def done(self) -> list[tuple[str, bytes]]:
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), f"the kernel side is still waiting after {self.seen}"
        return self.seen


def test_parse_bdf() -> None:
    assert parse_bdf("01:00.0") == BDF
    assert parse_bdf("0000:0A:1f.7") == "0000:0a:1f.7"
    for bad in ["../../etc", "01:00", "01:20.0", "0000:01:00.8", "01:00.0/x"]:
        with pytest.raises(ValueError):
            parse_bdf(bad)


def test_read_enables_reads_disables(tmp_path: Path) -> None:
    d = device(tmp_path)
    data = b.multi()
    kernel = FakeKernelRom(d / "rom", data)
    assert read_device_rom("01:00.0", sysfs=tmp_path) == data
    # "0\n" exactly: the kernel disables only on those two bytes at offset 0.
    assert kernel.done() == [("write", b"1\n"), ("read", b""), ("write", b"0\n")]


def test_disabled_again_when_the_rom_reads_empty(tmp_path: Path) -> None:
    d = device(tmp_path)
    kernel = FakeKernelRom(d / "rom", b"")
    with pytest.raises(XenlabError, match="read back empty"):
        read_device_rom(BDF, sysfs=tmp_path)
    assert kernel.done()[-1] == ("write", b"0\n")


def test_inspect_device_compares_ids(tmp_path: Path) -> None:
    d = device(tmp_path, vendor=0x10DE, device_id=0x1B81)
    kernel = FakeKernelRom(d / "rom", b.nvidia())
    found = inspect_device(BDF, sysfs=tmp_path)
    kernel.done()
    assert len(found.rom.images) == 2
    (p,) = found.problems
    assert "10de:1b81" in p.message and "10de:1b80" in p.message


def test_dump_writes_atomically(tmp_path: Path) -> None:
    d = device(tmp_path, boot_vga=True)
    data = b.rom(b.x86_image(), trailer=b"\xff" * 1024)
    kernel = FakeKernelRom(d / "rom", data)
    out = tmp_path / "out.rom"
    got = dump_rom(BDF, out, sysfs=tmp_path)
    kernel.done()
    assert out.read_bytes() == data and got.device.boot_vga and not got.problems
    assert not list(tmp_path.glob(".out.rom.*"))


def test_dump_refuses_bytes_without_a_rom(tmp_path: Path) -> None:
    d = device(tmp_path)
    kernel = FakeKernelRom(d / "rom", b"\xff" * 4096)  # an unwired ROM BAR
    out = tmp_path / "out.rom"
    with pytest.raises(FormatError, match="nothing written"):
        dump_rom(BDF, out, sysfs=tmp_path)
    kernel.done()
    assert not out.exists()


def test_dump_force_keeps_the_bytes(tmp_path: Path) -> None:
    d = device(tmp_path)
    kernel = FakeKernelRom(d / "rom", b"\xff" * 4096)
    out = tmp_path / "out.rom"
    with pytest.raises(FormatError, match="written to"):
        dump_rom(BDF, out, sysfs=tmp_path, force=True)
    kernel.done()
    assert out.read_bytes() == b"\xff" * 4096


def test_no_rom_file(tmp_path: Path) -> None:
    device(tmp_path, rom=False)
    with pytest.raises(XenlabError, match="no ROM BAR"):
        read_device_rom(BDF, sysfs=tmp_path)


def test_no_device(tmp_path: Path) -> None:
    with pytest.raises(XenlabError, match="no such PCI device"):
        read_device_rom("02:00.0", sysfs=tmp_path)


def test_enable_refused(tmp_path: Path) -> None:
    d = device(tmp_path, rom=False)
    (d / "rom").mkdir()  # open() for writing fails, as without permission
    with pytest.raises(XenlabError, match="cannot enable the ROM"):
        read_device_rom(BDF, sysfs=tmp_path)
