"""vm.vgaboot: SeaBIOS's debug log, the VGA text buffer and the verdict (pure), then real boots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.clirun import run_cli
from tests.vm.guests import clear, sh, wait_ready, write_config
from xenlab.errors import XenlabError
from xenlab.vm.domain import Toolstack
from xenlab.vm.vgaboot import (
    FirmwareReport,
    boot_rom,
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


# --- real boots (QEMU under TCG, SeaBIOS, the seabios package's VGA BIOSes) -------------

SEABIOS = Path("/usr/share/seabios")


def _rom(name: str) -> Path:
    path = SEABIOS / name
    if not path.is_file():
        pytest.fail(f"{path} missing: ./dev.sh installs Debian's seabios package")
    return path


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.integration
def test_stdvga_bios_runs_as_the_primary_display(tmp_path: Path, guest_image: object) -> None:
    ts = Toolstack(tmp_path / "state")
    out = tmp_path / "out"
    try:
        r = boot_rom(ts, _rom("vgabios-stdvga.bin"), out_dir=out, check=True)
    finally:
        clear(ts)
    assert r.ran, r.verdict
    assert r.device == "VGA"
    assert r.firmware.primary_vga == "00:02.0" and r.firmware.vga_rom_at == "c000:0003"
    assert r.firmware.vga_banner is not None
    assert r.firmware.vga_banner.startswith("Start SeaVGABIOS")
    assert r.firmware.booted is not None and r.firmware.problems == ()
    # SeaBIOS's banner, drawn through the ROM's int 10h, is in the text buffer.
    assert any(line.startswith("SeaBIOS (version") for line in r.screen), r.screen
    assert _png_size(Path(str(r.screendump))) == (720, 400)  # 80x25 text, 9x16 glyphs
    cfg = (out / f"{r.domain}.cfg").read_text()
    assert 'boot = "c"' in cfg and f'vga_rom = "{SEABIOS}/vgabios-stdvga.bin"' in cfg
    assert "Running option rom at c000:0003" in (out / f"{r.domain}-firmware.log").read_text()
    assert ts.store.list() == []  # --check destroys the guest


@pytest.mark.integration
def test_ati_bios_gets_the_device_with_its_ids(tmp_path: Path, guest_image: object) -> None:
    ts = Toolstack(tmp_path / "state")
    try:
        r = boot_rom(ts, _rom("vgabios-ati.bin"), out_dir=tmp_path, check=True)
    finally:
        clear(ts)
    assert r.device == "ati-vga,model=rv100"
    assert r.ran, r.verdict


@pytest.mark.integration
def test_broken_roms_are_refused_before_boot_and_seabios_agrees(tmp_path: Path,
                                                                 guest_image: object) -> None:
    data = bytearray(_rom("vgabios-stdvga.bin").read_bytes())
    data[0x100] ^= 0xFF
    bad = tmp_path / "bad.bin"
    bad.write_bytes(data)
    ts = Toolstack(tmp_path / "state")
    try:
        with pytest.raises(XenlabError, match=r"refused before boot: image 0: checksum"):
            boot_rom(ts, bad, out_dir=tmp_path, check=True)
        assert ts.store.list() == [] and not (tmp_path / "rom-bad.cfg").exists()
        # Booted anyway: SeaBIOS refuses it too, and the screen stays empty.
        r = boot_rom(ts, bad, out_dir=tmp_path, check=True, force=True)
        assert not r.ran and r.firmware.vga_rom_at is None
        assert r.firmware.problems and "bad checksum" in r.firmware.problems[0]
        assert "refused the VGA ROM" in r.verdict and r.screen == ()
        # The stdvga BIOS on a Cirrus card: ids differ, so SeaBIOS runs nothing.
        with pytest.raises(XenlabError, match="no x86 image with ids 1013:00b8"):
            boot_rom(ts, _rom("vgabios-stdvga.bin"), out_dir=tmp_path, device="cirrus-vga")
        r = boot_rom(ts, _rom("vgabios-stdvga.bin"), out_dir=tmp_path, device="cirrus-vga",
                     check=True, force=True)
        assert not r.ran and "PCI ids" in r.verdict
    finally:
        clear(ts)


@pytest.mark.integration
def test_rom_boot_of_a_guest_config_keeps_it_running(tmp_path: Path, guest_image: object,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    ts = Toolstack(tmp_path / "state")
    cfg = write_config(tmp_path, "vg1")
    try:
        ts.check_disks(ts.load_config(cfg)[0], "32M")
        code, out, err = run_cli(capsys, "rom", "boot", str(_rom("vgabios-stdvga.bin")),
                                 "--cfg", str(cfg), "--out", str(tmp_path / "out"), "--json",
                                 "memory=160", "--state-dir", str(tmp_path / "state"))
        assert code == 0, out + err
        result = json.loads(out)
        assert result["ran"] and result["domain"] == "vg1"
        assert result["firmware"]["vga_rom_at"] == "c000:0003"
        # Without --check the guest boots on: xenlab's image comes up and answers.
        wait_ready(ts, "vg1")
        assert sh(ts, "vg1", "cat /sys/bus/pci/devices/0000:00:02.0/vendor") == "0x1234\n"
        written = (tmp_path / "out" / "vg1.cfg").read_text()
        assert "memory=160" in written and "vga_rom = " in written
    finally:
        clear(ts)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x55\xaa\x01" + bytes(509))  # a ROM without PCI data
    code, out, err = run_cli(capsys, "rom", "boot", str(bad), "--check",
                             "--state-dir", str(tmp_path / "state"))
    assert code != 0 and "refused before boot" in err, (out, err)


def test_passthrough_needs_the_device_bound_to_vfio(tmp_path: Path) -> None:
    # The kernel's shape of sysfs: devices/<BDF>/driver -> ../../../bus/pci/drivers/<name>.
    from xenlab.vm.vgaboot import check_vfio

    devs = tmp_path / "bus" / "pci" / "devices"
    drivers = tmp_path / "bus" / "pci" / "drivers"
    for name, drv in (("0000:01:00.0", "vfio-pci"), ("0000:02:00.0", "nouveau")):
        (devs / name).mkdir(parents=True)
        (drivers / drv).mkdir(parents=True, exist_ok=True)
        (devs / name / "driver").symlink_to(drivers / drv)
    (devs / "0000:03:00.0").mkdir()
    assert check_vfio("01:00.0", sysfs=tmp_path) == "0000:01:00.0"
    with pytest.raises(XenlabError, match="bound to nouveau, not vfio-pci: bind it"):
        check_vfio("0000:02:00.0", sysfs=tmp_path)
    with pytest.raises(XenlabError, match="bound to no driver"):
        check_vfio("03:00.0", sysfs=tmp_path)
    with pytest.raises(XenlabError, match="not on this host"):
        check_vfio("04:00.0", sysfs=tmp_path)
    with pytest.raises(XenlabError, match="not a PCI address"):
        check_vfio("../../etc", sysfs=tmp_path)


@pytest.mark.integration
def test_relative_out_and_odd_names(tmp_path: Path, guest_image: object,
                                    monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    # QEMU runs in / once daemonized: a relative --out must still land here.
    monkeypatch.chdir(tmp_path)
    state = str(tmp_path / "state")
    code, out, err = run_cli(capsys, "rom", "boot", str(_rom("vgabios-stdvga.bin")), "--check",
                             "--out", "rel", "--name", "we,ird", "--json", "--state-dir", state)
    assert code == 0, out + err
    result = json.loads(out)
    assert result["ran"] and result["domain"] == "we,ird"
    assert (tmp_path / "rel" / "we-ird.png").is_file()
    assert 'name = "we,ird"' in (tmp_path / "rel" / "we-ird.cfg").read_text()
    # A name no verb could handle later is refused before anything starts.
    code, out, err = run_cli(capsys, "rom", "boot", str(_rom("vgabios-stdvga.bin")), "--check",
                             "--out", "rel", "--name", 'we"ird', "--state-dir", state)
    assert code == 1 and "is not usable" in err
    # --cfg in the output directory would be overwritten: refused before anything starts.
    cfg = write_config(tmp_path / "rel", "vg2")
    code, out, err = run_cli(capsys, "rom", "boot", str(_rom("vgabios-stdvga.bin")),
                             "--cfg", str(cfg), "--out", "rel", "--state-dir", state)
    assert code == 1 and "would be overwritten" in err
    assert Toolstack(tmp_path / "state").store.list() == []
