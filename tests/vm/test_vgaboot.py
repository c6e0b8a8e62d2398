"""vm.vgaboot: SeaBIOS's debug log, the VGA text buffer and the verdict (pure), then real boots."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from tests.aio import sync
from tests.clirun import run_cli
from tests.rom import builders as b
from tests.test_files_safety import deadline
from tests.vm.guests import clear, sh, wait_ready, write_config
from xenlab.atomic import FileWriteError
from xenlab.errors import BackendError, XenlabError
from xenlab.files import InputTooLargeError
from xenlab.vm.backend import Capabilities
from xenlab.vm.domain import Toolstack
from xenlab.vm.vgaboot import (
    LOG_LIMIT,
    FirmwareReport,
    boot_rom,
    check_rom_ids,
    judge,
    parse_firmware_log,
    plan_rom,
    qemu_vga_device,
    read_log,
    screen_text,
    wait_for_boot,
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
        r = sync(boot_rom(ts, _rom("vgabios-stdvga.bin"), out_dir=out, check=True))
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
    # The guest booted a private copy of the bytes checked, not the file named.
    copy = out / f"{r.domain}.rom"
    assert 'boot = "c"' in cfg and f'vga_rom = "{copy}"' in cfg
    assert f"a copy of {SEABIOS}/vgabios-stdvga.bin" in cfg
    assert copy.read_bytes() == _rom("vgabios-stdvga.bin").read_bytes()
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert "Running option rom at c000:0003" in (out / f"{r.domain}-firmware.log").read_text()
    assert ts.store.list() == []  # --check destroys the guest


@pytest.mark.integration
def test_ati_bios_gets_the_device_with_its_ids(tmp_path: Path, guest_image: object) -> None:
    ts = Toolstack(tmp_path / "state")
    try:
        r = sync(boot_rom(ts, _rom("vgabios-ati.bin"), out_dir=tmp_path, check=True))
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
            sync(boot_rom(ts, bad, out_dir=tmp_path, check=True))
        assert ts.store.list() == [] and not (tmp_path / "rom-bad.cfg").exists()
        # Booted anyway: SeaBIOS refuses it too, and the screen stays empty.
        r = sync(boot_rom(ts, bad, out_dir=tmp_path, check=True, force=True))
        assert not r.ran and r.firmware.vga_rom_at is None
        assert r.firmware.problems and "bad checksum" in r.firmware.problems[0]
        assert "refused the VGA ROM" in r.verdict and r.screen == ()
        # The stdvga BIOS on a Cirrus card: ids differ, so SeaBIOS runs nothing.
        with pytest.raises(XenlabError, match="no x86 image with ids 1013:00b8"):
            sync(boot_rom(ts, _rom("vgabios-stdvga.bin"), out_dir=tmp_path, device="cirrus-vga"))
        r = sync(boot_rom(ts, _rom("vgabios-stdvga.bin"), out_dir=tmp_path, device="cirrus-vga",
                     check=True, force=True))
        assert not r.ran and "PCI ids" in r.verdict
    finally:
        clear(ts)


@pytest.mark.integration
def test_rom_boot_of_a_guest_config_keeps_it_running(tmp_path: Path, guest_image: object,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    ts = Toolstack(tmp_path / "state")
    cfg = write_config(tmp_path, "vg1")
    try:
        sync(ts.check_disks(ts.load_config(cfg)[0], "32M"))
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


# --- the files a boot reads and writes (no QEMU: the toolstack stops where QEMU would start) ---

GOOD_ROM = b.x86_image()  # ids 1234:1111: the std VGA, which SeaBIOS would run it on
OTHER_ROM = b.x86_image(size=1024)


class Stopped(XenlabError):
    """Where QEMU would have started."""


class BeforeQemu:
    """A toolstack whose ``create`` takes what QEMU would open (the config's vga_rom), then stops.

    ``meanwhile`` runs first: what someone else does between the check and the boot.
    """

    def __init__(self, meanwhile: Callable[[], object] = lambda: None) -> None:
        self.meanwhile = meanwhile
        self.booted: list[tuple[str, Path, bytes, os.stat_result]] = []

    # As a QEMU toolstack: rom boot may run.
    backend = SimpleNamespace(name="qemu", caps=Capabilities(screen=True))

    def create(self, cfg: Path) -> None:
        text = cfg.read_text()
        found = re.search(r'^vga_rom = "(.*)"$', text, re.MULTILINE)
        assert found is not None, text
        self.meanwhile()
        rom = Path(found.group(1))
        self.booted.append((text, rom, rom.read_bytes(), rom.stat()))
        raise Stopped("QEMU would start here")

    def destroy(self, name: str) -> None:
        raise AssertionError(f"nothing was started, yet {name} is destroyed")


def _boot(ts: BeforeQemu, rom: Path, out: Path, *, data: bytes | None = None,
          name: str | None = None) -> None:
    sync(boot_rom(cast(Toolstack, ts), rom, out_dir=out, check=True, data=data, name=name))


def test_the_guest_boots_a_private_copy_of_the_checked_bytes(tmp_path: Path) -> None:
    # QEMU opened the user's file itself, after the check: it could hold other bytes by then.
    rom = tmp_path / "card.rom"
    rom.write_bytes(GOOD_ROM)
    ts = BeforeQemu(meanwhile=lambda: rom.write_bytes(OTHER_ROM))
    out = tmp_path / "out"
    with pytest.raises(Stopped):
        _boot(ts, rom, out)
    ((text, booted, data, st),) = ts.booted
    assert booted == out / "rom-card.rom" and data == GOOD_ROM
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert f"a copy of {rom}" in text
    # The bytes the caller read are the ones checked and booted.
    rom.write_bytes(GOOD_ROM)
    ts = BeforeQemu()
    with pytest.raises(Stopped):
        _boot(ts, rom, out, data=OTHER_ROM, name="second")
    assert ts.booted[0][2] == OTHER_ROM


def test_links_planted_in_the_output_directory(tmp_path: Path) -> None:
    rom = tmp_path / "card.rom"
    rom.write_bytes(GOOD_ROM)
    out = tmp_path / "out"
    out.mkdir()
    cfg = out / "rom-card.cfg"
    cfg.symlink_to(tmp_path / "made.cfg")  # write_text created the link's target
    ts = BeforeQemu()
    with pytest.raises(FileWriteError, match="a dangling symlink"):
        _boot(ts, rom, out)
    assert not (tmp_path / "made.cfg").exists() and ts.booted == []
    cfg.unlink()
    os.mkfifo(tmp_path / "fifo")
    cfg.symlink_to(tmp_path / "fifo")  # write_text waited for a reader forever
    with deadline(10), pytest.raises(FileWriteError, match="is a FIFO, not a regular file"):
        _boot(ts, rom, out)
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode) and ts.booted == []
    # The copy replaces a link in its place, never what the link names (that
    # file could be changed after the check).
    cfg.unlink()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (out / "rom-card.rom").unlink()  # the copy, written before the config was refused
    (out / "rom-card.rom").symlink_to(victim)
    with pytest.raises(Stopped):
        _boot(ts, rom, out)
    assert victim.read_bytes() == b"precious"
    assert not (out / "rom-card.rom").is_symlink() and ts.booted[0][2] == GOOD_ROM


def test_an_input_the_outputs_would_replace_is_refused(tmp_path: Path) -> None:
    rom = tmp_path / "card.rom"
    rom.write_bytes(GOOD_ROM)
    ts = BeforeQemu()
    with pytest.raises(XenlabError, match=f"^{rom} would be overwritten by card.rom, which rom "
                                          "boot writes; give --out another directory$"):
        _boot(ts, rom, tmp_path, name="card")
    assert rom.read_bytes() == GOOD_ROM and ts.booted == []


def test_paths_in_messages_are_escaped(tmp_path: Path) -> None:
    odd = tmp_path / "odd\nname\x1b[31m.rom"
    odd.write_bytes(b.x86_image(checksum=False))
    with pytest.raises(XenlabError) as exc:
        plan_rom(odd)
    assert str(exc.value).startswith(f"{str(odd)!r}: refused before boot: ")
    assert "\n" not in str(exc.value) and "\x1b" not in str(exc.value)
    log = tmp_path / "run\ndir" / "firmware.log"
    with pytest.raises(BackendError) as bexc:
        sync(wait_for_boot(log, 0.01))
    assert repr(str(log)) in str(bexc.value) and "\n" not in str(bexc.value)


def test_the_firmware_log_is_read_with_a_bound(tmp_path: Path) -> None:
    # A ROM that floods SeaBIOS's debug port: the log is refused, not read whole each poll.
    log = tmp_path / "firmware.log"
    assert read_log(log) == ""
    log.write_text("Booting from Hard Disk...\n")
    assert sync(wait_for_boot(log, 1)) == "Booting from Hard Disk...\n"
    with open(log, "ab") as f:
        f.truncate(LOG_LIMIT + 1)
    with pytest.raises(InputTooLargeError, match="firmware log larger than 16 MiB"):
        read_log(log)
