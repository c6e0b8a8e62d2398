"""vm.vgaboot: SeaBIOS's debug log, the VGA text buffer and the verdict (pure), then real boots."""

from __future__ import annotations

import pytest

from xenlab.errors import XenlabError
from xenlab.vm.vgaboot import (
    FirmwareReport,
    check_rom_ids,
    judge,
    parse_firmware_log,
    qemu_vga_device,
    screen_text,
)

# Excerpts of SeaBIOS 1.16.2's debug port (isa-debugcon 0x402) under QEMU 7.2, as
# this machine printed them: the stdvga ROM on VGA, the same ROM with one byte
# flipped, and the stdvga ROM given to cirrus-vga (ids that do not match).
GOOD = """\
Running on QEMU (i440fx)
PCI: init bdf=00:02.0 id=1234:1111
PCI: Using 00:02.0 for primary VGA
Scan for VGA option rom
Running option rom at c000:0003
Start SeaVGABIOS (version 1.16.2-debian-1.16.2-1)
VGABUILD: gcc: (Debian 12.2.0-14) 12.2.0 binutils: (GNU Binutils for Debian) 2.40
enter vga_post:
Turning on vga text mode console
set VGA mode 3
SeaBIOS (version 1.16.2-debian-1.16.2-1)
Scan for option roms
Running option rom at ca00:0003
Booting from Hard Disk...
"""
BAD_SUM = """\
PCI: Using 00:02.0 for primary VGA
Scan for VGA option rom
Found option rom with bad checksum: loc=0x000c0000 len=39936 sum=31
Turning on vga text mode console
Scan for option roms
Running option rom at c000:0003
Booting from Hard Disk...
Booting from Floppy...
No bootable device.
"""
MISMATCH = """\
PCI: Using 00:02.0 for primary VGA
Scan for VGA option rom
Turning on vga text mode console
Scan for option roms
Running option rom at c000:0003
Booting from Hard Disk...
"""


def test_a_vga_rom_that_ran() -> None:
    r = parse_firmware_log(GOOD)
    assert r.primary_vga == "00:02.0"
    assert r.vga_rom_at == "c000:0003"
    assert r.vga_banner == "Start SeaVGABIOS (version 1.16.2-debian-1.16.2-1)"
    assert r.problems == ()
    assert r.booted == "Booting from Hard Disk..."
    assert "Running option rom at ca00:0003" not in r.evidence  # a later, non-VGA ROM


def test_a_bad_checksum_is_seabios_refusing_it() -> None:
    r = parse_firmware_log(BAD_SUM)
    # c000 is free once no VGA ROM took it: the later ROM there is not the VGA BIOS.
    assert r.vga_rom_at is None and r.vga_banner is None
    assert r.problems == ("Found option rom with bad checksum: loc=0x000c0000 len=39936 sum=31",)
    ran, why = judge(r, ["SeaBIOS (version x)"], "VGA")
    assert not ran and "bad checksum" in why


def test_mismatched_ids_run_nothing() -> None:
    r = parse_firmware_log(MISMATCH)
    assert r.vga_rom_at is None and r.problems == ()
    ran, why = judge(r, [], "cirrus-vga")
    assert not ran and "PCI ids" in why


def test_judge_needs_text_on_screen() -> None:
    r = parse_firmware_log(GOOD)
    assert judge(r, ["", "  "], "VGA")[0] is False
    ran, why = judge(r, ["SeaBIOS (version 1.16.2-debian-1.16.2-1)"], "VGA")
    assert ran and "c000:0003" in why and "00:02.0" in why


def test_screen_text_decodes_cp437_and_trims() -> None:
    rows = ["SeaBIOS", "", "caf\x82 \xb0"]  # \x82 is é and \xb0 a shade block in cp437
    mem = bytearray(80 * 25 * 2)
    for r, text in enumerate(rows):
        for c, ch in enumerate(text.encode("latin-1")):
            mem[(r * 80 + c) * 2] = ch
            mem[(r * 80 + c) * 2 + 1] = 0x07
    assert screen_text(bytes(mem)) == ["SeaBIOS", "", "café ░"]
    assert screen_text(bytes(4000)) == []


def test_device_for_rom_ids() -> None:
    assert qemu_vga_device(0x1234, 0x1111) == "VGA"
    assert qemu_vga_device(0x1002, 0x5159) == "ati-vga,model=rv100"
    assert qemu_vga_device(0x10DE, 0x1C82) is None
    assert check_rom_ids(0x10DE, 0x1C82, "VGA") == "VGA"  # the user's choice wins
    with pytest.raises(XenlabError, match=r"10de:1c82.*--set-ids"):
        check_rom_ids(0x10DE, 0x1C82, None)


def test_report_json_round() -> None:
    r = parse_firmware_log(GOOD)
    j = r.to_json()
    assert FirmwareReport(**{**j, "problems": tuple(j["problems"]),
                             "evidence": tuple(j["evidence"])}) == r
