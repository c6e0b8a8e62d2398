"""Boot a guest whose primary display runs a given VGA BIOS, and show that it did: :func:`boot_rom`.

The seed idea ("boot with a passed-through GPU as the primary display")
failed on one step: getting the card's VGA BIOS to run in the guest.  Here
the guest's firmware is SeaBIOS, which runs a PCI VGA ROM only when the
ROM's PCI ids match the display device's and its checksum is right, at
segment c000, before any other option ROM.  So the evidence is taken from
three places, none of which trusts the ROM's own say-so:

* SeaBIOS's debug log (QEMU's ``isa-debugcon`` on port 0x402, which every
  domain gets as ``firmware.log`` in its run directory): between ``Scan for
  VGA option rom`` and the next phase it prints ``Running option rom at
  c000:0003`` only if it ran a VGA ROM, or ``Found option rom with bad
  checksum`` when it refused one.  The VGA phase is told apart from the
  later scan, where c000 may hold another ROM once no VGA ROM took it.
* The VGA text buffer at 0xb8000, read with QMP ``pmemsave`` while the
  guest is stopped: SeaBIOS prints its banner through the VGA BIOS's int 10h
  handler, so text there means the ROM's code ran and drew it.
* A QMP ``screendump`` (PNG) of the same moment, for people.

Pure parts (:func:`parse_firmware_log`, :func:`screen_text`,
:func:`qemu_vga_device`) are separate from the boot (:func:`boot_rom`),
which goes through the toolstack like any domain.

Files (:func:`boot_rom`): the ROM is read once (:mod:`xenlab.files`, bounded,
without blocking), checked, and a private copy of exactly those bytes (0600)
is what the guest boots: QEMU opens its ``romfile`` itself, later, so the
user's file could have changed between the check and the boot.  Everything
written into the output directory goes through :mod:`xenlab.atomic` (never
through a symlink the policy refuses, never over a device); QEMU itself
writes only into the domain's private run directory, and its screendump is
copied out from there.  Messages show paths escaped (:func:`shown_path`).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from xenlab.atomic import atomic_write_bytes, atomic_write_text, make_output_dir
from xenlab.errors import BackendError, NotFoundError, UsageError
from xenlab.files import FileReadError, read_bounded

if TYPE_CHECKING:
    from xenlab.vm.domain import Toolstack

#: PCI vendor:device of QEMU's emulated VGA-class devices -> the ``-device``
#: that presents those ids, so SeaBIOS will run a ROM built for them.
VGA_DEVICES: Final[Mapping[tuple[int, int], str]] = {
    (0x1234, 0x1111): "VGA",  # Bochs/std VGA (SeaVGABIOS stdvga)
    (0x1013, 0x00B8): "cirrus-vga",  # Cirrus CLGD 5446
    (0x1002, 0x5159): "ati-vga,model=rv100",  # ATI Radeon RV100 QY
    (0x1002, 0x5046): "ati-vga,model=rage128p",  # ATI Rage 128 Pro
    (0x15AD, 0x0405): "vmware-svga",
    (0x1B36, 0x0100): "qxl-vga",
    (0x1AF4, 0x1050): "virtio-vga",
}

# SeaBIOS's words, as its debug port prints them (src/optionroms.c, post.c).
_VGA_SCAN: Final = "Scan for VGA option rom"
_RUNNING: Final = "Running option rom at "
_BAD_SUM: Final = "Found option rom with bad checksum"
_PRIMARY: Final = "for primary VGA"
# Lines that end the VGA phase: SeaBIOS gave up on a VGA ROM, or moved on.
_VGA_PHASE_END: Final = ("Turning on vga text mode console", "Scan for option roms")
_BOOTING: Final = ("Booting from ", "No bootable device")

TEXT_COLS: Final = 80
TEXT_ROWS: Final = 25
# SeaBIOS's log of one boot is a few KB; a ROM that floods the debug port stops here.
LOG_LIMIT: Final = 16 << 20


def shown_path(path: object) -> str:
    """How this module's messages show a path: as it is when printable, else its repr.

    A name with a newline or an escape sequence must not break a message's line
    or reach a terminal (the CLI's own escaper lives in cli/, which vm/ does not
    import).
    """
    text = str(path)
    return text if text.isprintable() else repr(text)


def qemu_vga_device(vendor: int, device: int) -> str | None:
    """The QEMU ``-device`` whose PCI ids are ``vendor:device``, or None when QEMU has none."""
    return VGA_DEVICES.get((vendor, device))


@dataclass(frozen=True, slots=True)
class FirmwareReport:
    """What SeaBIOS's debug log says about the VGA ROM (see :func:`parse_firmware_log`)."""

    primary_vga: str | None  # the PCI address SeaBIOS took as primary VGA ("00:02.0")
    vga_rom_at: str | None  # where it ran the VGA ROM ("c000:0003"), None if it ran none
    vga_banner: str | None  # the first line the VGA ROM printed to the log, if any
    problems: tuple[str, ...]  # SeaBIOS's complaints about ROMs (bad checksum, ...)
    booted: str | None  # the first "Booting from ..." / "No bootable device" line
    evidence: tuple[str, ...]  # the log lines the report rests on, in order

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready values."""
        return {
            "primary_vga": self.primary_vga, "vga_rom_at": self.vga_rom_at,
            "vga_banner": self.vga_banner, "problems": list(self.problems),
            "booted": self.booted, "evidence": list(self.evidence),
        }


def parse_firmware_log(text: str) -> FirmwareReport:
    """Read SeaBIOS's debug log: which ROM it ran as the VGA BIOS, and what it refused.

    Only a ``Running option rom at c000:...`` inside the VGA phase (after
    ``Scan for VGA option rom``, before SeaBIOS falls back to its own text
    console or scans the other ROMs) counts as the VGA BIOS.
    """
    primary = rom_at = banner = booted = None
    problems: list[str] = []
    evidence: list[str] = []
    in_vga = False
    after_rom = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if _PRIMARY in line and primary is None:
            # "PCI: Using 00:02.0 for primary VGA"
            words = line.split()
            primary = words[words.index("for") - 1] if "for" in words[1:] else None
            evidence.append(line)
        elif line.startswith(_VGA_SCAN):
            in_vga = True
            evidence.append(line)
        elif _BAD_SUM in line:
            problems.append(line)
            evidence.append(line)
        elif in_vga and line.startswith(_RUNNING):
            rom_at = line[len(_RUNNING):].strip()
            if rom_at.lower().startswith("c000:"):
                after_rom = True
            else:
                rom_at = None
            evidence.append(line)
        elif after_rom and banner is None:
            banner = line  # the VGA BIOS's own first words (SeaVGABIOS names itself)
            evidence.append(line)
            after_rom = False
        elif in_vga and line.startswith(_VGA_PHASE_END):
            in_vga = after_rom = False
            evidence.append(line)
        elif line.startswith(_BOOTING) and booted is None:
            booted = line
            evidence.append(line)
    return FirmwareReport(primary, rom_at, banner, tuple(problems), booted, tuple(evidence))


def screen_text(mem: bytes, cols: int = TEXT_COLS, rows: int = TEXT_ROWS) -> list[str]:
    """The characters of a VGA text buffer (code page 437, attributes dropped), trailing
    blank rows and spaces removed."""
    chars = bytes(mem[0:cols * rows * 2:2])
    lines = [chars[r * cols:(r + 1) * cols].decode("cp437").replace("\x00", " ").rstrip()
             for r in range(rows)]
    while lines and not lines[-1]:
        lines.pop()
    return lines


@dataclass(frozen=True, slots=True)
class RomBoot:
    """The outcome of :func:`boot_rom`: what ran, what the screen showed, and the verdict."""

    domain: str
    rom: str
    device: str  # the QEMU device the ROM was given to
    firmware: FirmwareReport
    screen: tuple[str, ...]  # the text on the guest's screen when SeaBIOS went to boot
    screendump: str | None  # PNG of that moment
    ran: bool  # the ROM ran as the primary VGA BIOS
    verdict: str

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-ready values."""
        return {
            "domain": self.domain, "rom": self.rom, "device": self.device, "ran": self.ran,
            "verdict": self.verdict, "firmware": self.firmware.to_json(),
            "screen": list(self.screen), "screendump": self.screendump,
        }


def judge(firmware: FirmwareReport, screen: Sequence[str], device: str) -> tuple[bool, str]:
    """Whether the ROM ran as the primary VGA BIOS, and one sentence saying why."""
    if firmware.vga_rom_at is None:
        if firmware.problems:
            return False, f"SeaBIOS refused the VGA ROM: {firmware.problems[0]}"
        return False, (f"SeaBIOS ran no VGA ROM on {device}: the ROM's PCI ids or code type "
                       "do not match the device, or the device has no ROM")
    shown = [ln for ln in screen if ln.strip()]
    if not shown:
        return False, (f"SeaBIOS ran the VGA ROM at {firmware.vga_rom_at}, but nothing "
                       "reached the text screen: its int 10h output does not work")
    return True, (f"the ROM ran as the primary VGA BIOS at {firmware.vga_rom_at} "
                  f"(primary VGA {firmware.primary_vga or '?'}) and drew "
                  f"{len(shown)} line(s) of text, e.g. {shown[0].strip()!r}")


async def wait_for_boot(log: Path, timeout: float, *, alive: Any = None) -> str:
    """Wait until SeaBIOS's log shows it went to boot (or gave up); the log's text.

    ``alive`` is a callable; when it returns False the wait ends early
    (QEMU exited).  BackendError when the time runs out.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    text = ""
    while True:
        text = read_log(log)
        if any(b in text for b in _BOOTING):
            return text
        if alive is not None and not alive():
            raise BackendError(f"QEMU exited before the firmware went to boot "
                               f"({shown_path(log)})")
        if time.monotonic() > deadline:
            raise BackendError(
                f"the firmware did not reach its boot step within {timeout:g}s "
                f"({shown_path(log)}: "
                f"{' | '.join(text.splitlines()[-3:]) or 'empty'})"
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


def read_log(log: Path) -> str:
    """SeaBIOS's debug log so far ("" before QEMU made it), at most :data:`LOG_LIMIT` bytes.

    :raise InputTooLargeError: the log is larger (a ROM flooding the debug port).
    """
    try:
        return read_bounded(log, LOG_LIMIT, what="firmware log").decode("latin-1")
    except FileReadError as err:
        if isinstance(err.__cause__, FileNotFoundError):
            return ""
        raise


def check_rom_ids(vendor: int, device: int, qemu_device: str | None) -> str:
    """The QEMU device to present a ROM built for ``vendor:device``; XenlabError when none fits."""
    if qemu_device is not None:
        return qemu_device
    found = qemu_vga_device(vendor, device)
    if found is None:
        known = ", ".join(f"{v:04x}:{d:04x} ({n})" for (v, d), n in VGA_DEVICES.items())
        raise UsageError(
            f"no emulated display has PCI ids {vendor:04x}:{device:04x}, so SeaBIOS would "
            f"not run this ROM; pass a real device (--pci BDF, VFIO), rewrite the ids "
            f"(xenlab rom fix --set-ids) for one of: {known}, or name --device"
        )
    return found


# --- the boot ---------------------------------------------------------------------------

#: QEMU device -> the PCI ids it presents (the inverse of VGA_DEVICES).
_DEVICE_IDS: Final[Mapping[str, tuple[int, int]]] = {v: k for k, v in VGA_DEVICES.items()}

_FIRMWARE_GUEST = """\
# Written by `xenlab rom boot`: a firmware-only guest (no disk, no kernel) whose
# primary display runs {source}; SeaBIOS prints its banner and boot attempts on it.
name = {name}
type = "hvm"
memory = 64
vcpus = 1
boot = "c"
"""


def _xl_string(value: str) -> str:
    """``value`` as an xl string literal (double quotes, escapes for '"' and '\\')."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(value: str) -> str:
    """``value`` safe inside an xl comment line: non-ASCII and control characters escaped."""
    return value.encode("unicode_escape").decode("ascii")


def rom_config(rom: Path, *, name: str, device: str | None, pci: str | None,
               base_text: str | None = None, source: Path | None = None) -> str:
    """The xl config ``rom boot`` writes: ``base_text`` (a firmware-only guest when None)
    plus the keys that put ``rom`` behind the primary display.

    ``pci`` (a host BDF) is the passthrough case, xl's ``gfx_passthru=1`` +
    ``pci=[...]``; otherwise an emulated ``device``.  ``vga_rom`` and
    ``vga_rom_device`` are xenlab's keys (xl ignores keys it does not know).
    ``source`` is the file ``rom`` is a copy of, named in a comment.
    """
    origin = _comment(str(source if source is not None else rom))
    text = base_text if base_text is not None else _FIRMWARE_GUEST.format(
        source=origin if source is None else f"a copy of {origin}", name=_xl_string(name))
    lines = [text.rstrip("\n"), "",
             "# the VGA BIOS under test" + ("" if source is None else f": a copy of {origin}")]
    if base_text is not None:
        lines.append(f"name = {_xl_string(name)}")
    lines.append(f"vga_rom = {_xl_string(str(rom))}")
    if pci is not None:
        lines += ["gfx_passthru = 1", f"pci = [ {_xl_string(pci)} ]"]
    elif device is not None:
        lines.append(f"vga_rom_device = {_xl_string(device)}")
    return "\n".join(lines) + "\n"


def plan_rom(rom: Path, *, data: bytes | None = None, device: str | None = None,
             pci: str | None = None, force: bool = False) -> tuple[str | None, tuple[str, ...]]:
    """Check ``rom`` the way SeaBIOS will, before any boot: (QEMU device, warnings).

    ``data`` is the ROM's bytes when they are already read (what is checked
    is then what is booted); None reads ``rom``.  The device is the one whose
    ids the ROM's x86 image names (or ``device``); None for a passed-through
    ``pci`` device.  With ``force`` a ROM SeaBIOS would refuse is booted
    anyway (to watch it refuse).

    :raise FormatError: ``rom`` holds no option ROM.
    :raise XenlabError: the check failed (its problems named), or no
        emulated display has the ROM's ids.
    """
    from xenlab.rom.check import check_vga_bios
    from xenlab.rom.inspect import inspect_bytes, inspect_file

    shown = shown_path(rom)
    parsed = inspect_file(rom, source=shown) if data is None else inspect_bytes(data, source=shown)
    first = check_vga_bios(parsed)
    ids: tuple[int, int] | None = None
    if first.image is not None and first.image.pcir is not None:
        ids = (first.image.pcir.vendor_id, first.image.pcir.device_id)
    qdev: str | None = None
    if pci is None:
        if ids is None and device is None:
            raise UsageError(f"{shown}: refused before boot: {'; '.join(first.problems)}")
        qdev = check_rom_ids(*(ids or (0, 0)), device)
        ids = _DEVICE_IDS.get(qdev, ids)
    verdict = check_vga_bios(parsed, vendor_id=ids[0] if ids else None,
                             device_id=ids[1] if ids else None)
    if not verdict.ok and not force:
        raise UsageError(f"{shown}: refused before boot: {'; '.join(verdict.problems)} "
                         "(--force boots it anyway)")
    return qdev, verdict.warnings + (verdict.problems if force else ())


def check_vfio(bdf: str, *, sysfs: Path = Path("/sys")) -> str:
    """The sysfs name of host device ``bdf`` when it is bound to vfio-pci (what QEMU
    needs to pass it through); XenlabError saying what to do otherwise."""
    from xenlab.rom.sysfs import parse_bdf

    try:
        name = parse_bdf(bdf)
    except ValueError as err:
        raise UsageError(str(err)) from err
    dev = sysfs / "bus" / "pci" / "devices" / name
    if not dev.exists():
        raise NotFoundError("pci device", name,
                            f"PCI device {name}: not on this host ({shown_path(dev)} does not "
                            "exist)")
    driver = dev / "driver"
    bound = driver.resolve().name if driver.exists() else None
    if bound != "vfio-pci":
        raise UsageError(
            f"PCI device {name} is bound to {bound or 'no driver'}, not vfio-pci: bind it "
            f"first (`driverctl set-override {name} vfio-pci`, or echo vfio-pci > "
            f"{shown_path(dev / 'driver_override')} and {name} > /sys/bus/pci/drivers_probe)"
        )
    return name


async def boot_rom(ts: Toolstack, rom: Path, *, out_dir: Path, cfg: Path | None = None,
             overrides: Sequence[str] = (), device: str | None = None, pci: str | None = None,
             name: str | None = None, check: bool = False, force: bool = False,
             timeout: float = 60.0, data: bytes | None = None) -> RomBoot:
    """Start a guest whose primary VGA runs ``rom``, and report whether the ROM ran.

    CLI: ``xenlab rom boot FILE [--cfg CFG] [--check]``.  ``data`` is the
    ROM's bytes when the caller has read them (None: ``rom`` is read here,
    bounded); they are checked (:func:`plan_rom`) and copied to
    ``out_dir/<name>.rom`` (0600, this user's), the file the guest boots, so
    what boots is what was checked.  The config (``cfg`` with ``overrides``,
    or a firmware-only guest) gets the ROM keys (:func:`rom_config`) and is
    written to ``out_dir/<name>.cfg``; the toolstack ``ts`` creates the
    domain.  When SeaBIOS's log shows it went to boot, the guest is stopped
    for a moment: the VGA text buffer and a PNG screendump are taken in the
    domain's run directory, the PNG is copied to ``out_dir/<name>.png`` and
    the log to ``out_dir/<name>-firmware.log``.  With ``check`` the domain is
    then destroyed, otherwise it runs on.  Every file in ``out_dir`` is
    written by :mod:`xenlab.atomic`.

    :raise XenlabError: the ROM was refused before boot, the config is bad,
        or a file in ``out_dir`` was refused (FileWriteError).
    :raise BackendError: QEMU failed, or the firmware did not reach its boot
        step within ``timeout`` (the domain is destroyed).
    """
    ts.backend.caps.require("screen", "rom boot", ts.backend.name)
    from xenlab.rom.files import read_rom_file

    given = Path(rom)
    if data is None:
        data = read_rom_file(given, name=shown_path(given))
    # Resolved only to be named (in the result and the config's comment): the
    # guest boots the copy, and nothing opens this path again.
    rom = given.resolve()
    if any(ord(c) < 0x20 or c == "\x7f" for c in str(rom)):
        raise UsageError(f"{str(rom)!r}: a ROM path with control characters cannot go "
                         "into an xl config")
    # Absolute (QEMU runs in / once daemonized) but not resolved: the writer
    # judges the links on the way, as the kernel would.
    out_dir = Path(out_dir).absolute()
    if pci is not None:
        pci = check_vfio(pci)
    qdev, warnings = plan_rom(rom, data=data, device=device, pci=pci, force=force)
    base: str | None = None
    dom = name or f"rom-{_safe(rom.stem)}"
    if cfg is not None:
        dc, base = ts.load_config(cfg, overrides)
        dom = name or dc.name
    stem = _safe(dom)  # file names in out_dir come from the domain's name
    outputs = {kind: out_dir / f"{stem}{suffix}" for kind, suffix in (
        ("cfg", ".cfg"), ("rom", ".rom"), ("png", ".png"), ("log", "-firmware.log"))}
    _refuse_clobbering(outputs.values(), [given] + ([Path(cfg)] if cfg is not None else []))
    make_output_dir(out_dir, name=shown_path(out_dir))
    physical = os.path.realpath(out_dir)
    if any(ord(c) < 0x20 or c == "\x7f" for c in physical):
        raise UsageError(f"{physical!r}: an output directory with control characters cannot "
                         "go into an xl config")
    # Never through a link (a link's target could be changed after the write),
    # and this user's even over another's file: a private copy.
    copy = atomic_write_bytes(outputs["rom"], data, mode=0o600, follow_symlinks=False,
                              keep_owner=False, name=shown_path(outputs["rom"]))
    cfg_out = atomic_write_text(
        outputs["cfg"], rom_config(copy, name=dom, device=qdev, pci=pci, base_text=base,
                                   source=rom), name=shown_path(outputs["cfg"]))
    rec = await ts.create(cfg_out)
    handle = ts.handle(rec)
    log = ts.backend.firmware_log(handle)
    try:
        await wait_for_boot(log, timeout, alive=lambda: ts.alive(rec))

        shown_now = await ts.backend.capture_screen(handle, resume=not check)
        firmware_text = read_log(log)
        screen = screen_text(shown_now.text)
        png_data = shown_now.png
    except BaseException:
        await ts.destroy(dom)
        raise
    try:
        png = atomic_write_bytes(outputs["png"], png_data, name=shown_path(outputs["png"]))
        atomic_write_bytes(outputs["log"], firmware_text.encode("latin-1"),
                           name=shown_path(outputs["log"]))
    finally:
        if check:
            await ts.destroy(dom)
    report = parse_firmware_log(firmware_text)
    shown = "passed-through device" if pci is not None else str(qdev)
    ran, verdict = judge(report, screen, shown)
    if warnings:
        verdict += " (note: " + "; ".join(warnings) + ")"
    return RomBoot(dom, str(rom), shown, report, tuple(screen), str(png), ran, verdict)


def _refuse_clobbering(outputs: Iterable[Path], inputs: Iterable[Path]) -> None:
    """XenlabError when writing one of ``outputs`` would replace one of ``inputs``."""
    def places(p: Path) -> set[str]:
        # The name itself (a write that replaces a link) and what it ends at.
        return {os.path.join(os.path.realpath(p.parent), p.name), os.path.realpath(p)}

    for path in inputs:
        for out in outputs:
            if places(out) & places(path):
                raise UsageError(f"{shown_path(path)} would be overwritten by "
                                 f"{shown_path(out.name)}, which rom boot writes; give --out "
                                 "another directory")


def _safe(stem: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in stem)[:40] or "rom"
