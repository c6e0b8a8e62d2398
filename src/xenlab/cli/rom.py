"""``xenlab rom``: inspect, fix and dump PCI option ROMs and VGA BIOSes.

Every path a user names is read and written through :mod:`xenlab.rom.files`
(xenlab's one safe reader and writer, :mod:`xenlab.files` and
:mod:`xenlab.atomic`, with the ROM limits): a FILE that is a FIFO, a device,
a directory, a symlink loop or too large ends with one line naming it (exit
1), and outputs are replaced atomically, through a symlink to its target,
never over a device.  Names are shown
escaped (:func:`~xenlab.cli.output.printable`): a newline or an escape
sequence in a file name stays on its line.
"""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from xenlab.cli.output import emit_json, printable, stderr, stdout
from xenlab.errors import XenlabError
from xenlab.files import FileReadError
from xenlab.formats.optionrom import OptionRom, RomImage, code_type_name
from xenlab.rom.check import check_vga_bios
from xenlab.rom.files import check_output_dir, read_rom_file, write_rom_file
from xenlab.rom.fix import fix_rom, parse_image_kinds
from xenlab.rom.inspect import inspect_file, rom_to_json
from xenlab.rom.sysfs import SYSFS, DeviceRom, dump_rom, inspect_device, parse_bdf

_SYSFS = click.option("--sysfs", type=click.Path(file_okay=False, path_type=Path), default=SYSFS,
                      show_default=True, help="Root of sysfs (for tests and chroots).")
_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
# No click checks on paths: they would be usage errors of several lines with the
# name unescaped; xenlab.rom.files says what is wrong in one line.
_PATH = click.Path(path_type=Path)


def _name(path: Path | str) -> str:
    """How messages show ``path``: control characters and undecodable bytes escaped."""
    return printable(str(path))


def _esc(text: str) -> str:
    return escape(printable(text))


def _ids(img: RomImage) -> str:
    if img.pcir is None:
        return "-"
    return f"{img.pcir.vendor_id:04x}:{img.pcir.device_id:04x}"


def _class(img: RomImage) -> str:
    p = img.pcir
    if p is None:
        return "-"
    if p.class_code != p.class_code_raw:
        return f"{p.class_code:06x} (raw {p.class_code_raw:06x})"
    return f"{p.class_code:06x}"


def _checksum(img: RomImage) -> str:
    if not img.checksummed:
        return f"[dim]n/a ({code_type_name(img.code_type)})[/]"
    return "[green]ok[/]" if img.checksum_ok else f"[red]BAD ({img.checksum:#04x})[/]"


def _details(img: RomImage) -> str:
    parts = []
    if img.pcir is not None:
        p = img.pcir
        parts.append(f"PCIR r{p.revision} @{p.offset:#x}")
        if p.device_list:
            parts.append("devices " + ",".join(f"{d:04x}" for d in p.device_list))
    if img.efi is not None:
        e = img.efi
        parts.append(f"EFI subsys {e.subsystem} machine {e.machine_type:#06x}"
                     f"{' compressed' if e.compressed else ''}")
    if img.pnp is not None:
        parts.append(f"$PnP {img.pnp.manufacturer or '?'} / {img.pnp.product or '?'}")
    if img.npde is not None:
        parts.append(f"NPDE len {img.npde.image_length:#x}{' last' if img.npde.last else ''}")
    if img.via_npde:
        parts.append("via NPDE")
    return _esc("; ".join(parts))


def _print_rom(rom: OptionRom) -> None:
    title = f"{rom.source} ({rom.size} bytes)"
    t = Table(title=_esc(title), title_justify="left")
    for col in ("#", "offset", "length", "type", "ids", "class", "last", "checksum", "details"):
        t.add_column(col, justify="right" if col in ("#", "offset", "length") else "left")
    for img in rom.images:
        t.add_row(str(img.index), f"{img.offset:#x}", f"{img.length:#x}",
                  code_type_name(img.code_type), _ids(img), _class(img),
                  "yes" if img.last else "no", _checksum(img), _details(img))
    stdout.print(t)
    if rom.header_offset:
        stdout.print(f"vendor header: {rom.header_offset:#x} bytes before the first image")
    if rom.trailer_length:
        fill = f"{rom.trailer_fill:#04x} padding" if rom.trailer_fill is not None else "data"
        stdout.print(f"after the last image: {rom.trailer_length:#x} bytes of {fill}")
    for img in rom.images:
        for note in img.notes:
            stdout.print(f"[dim]note: image {img.index}: {_esc(note)}[/]")
    problems = rom.all_problems()
    for p in problems:
        stdout.print(f"[red]problem[/]: {_esc(str(p))}", soft_wrap=True)
    if not problems:
        stdout.print(f"{len(rom.images)} image(s), no problems")


def _device_json(d: DeviceRom) -> dict[str, object]:
    return {"address": d.device.address, "vendor_id": d.device.vendor_id,
            "device_id": d.device.device_id, "class_code": d.device.class_code,
            "boot_vga": d.device.boot_vga, "problems": [str(p) for p in d.problems]}


def _boot_vga_note(d: DeviceRom) -> None:
    if d.device.boot_vga:
        stderr.print("[yellow]note[/]: this is the boot VGA device: the kernel shows the "
                     "shadow copy at 0xC0000 (the x86 image as the BIOS left it), not the "
                     "card's whole ROM")


@click.group()
def rom() -> None:
    """PCI option ROMs and VGA BIOSes: inspect, fix, dump."""


@rom.command("inspect")
@click.argument("target")
@_JSON
@click.option("--strict", is_flag=True, help="Exit 1 when any problem is found.")
@_SYSFS
def inspect_cmd(target: str, as_json: bool, strict: bool, sysfs: Path) -> None:
    """Every image of a ROM FILE, or of a device's ROM (PCI address, e.g. 01:00.0)."""
    path = Path(target)
    device: DeviceRom | None = None
    # Anything with that name is a file (a dangling link is one, and says so).
    if os.path.lexists(path):
        result = inspect_file(path, source=_name(path))
    else:
        try:
            parse_bdf(target)
        except ValueError:
            raise FileReadError(_name(target), "no such file, and not a PCI address "
                                                "([DDDD:]BB:DD.F)") from None
        device = inspect_device(target, sysfs=sysfs)
        result = device.rom
    problems = [*result.all_problems(), *(device.problems if device else ())]
    if as_json:
        data = rom_to_json(result)
        if device is not None:
            data["device"] = _device_json(device)
        emit_json(data)
    else:
        _print_rom(result)
        if device is not None:
            _boot_vga_note(device)
            for p in device.problems:
                stdout.print(f"[red]problem[/]: {_esc(str(p))}", soft_wrap=True)
    if strict and problems:
        raise click.exceptions.Exit(1)


def _ids_option(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        vendor, device = (int(x, 16) for x in text.split(":"))
    except ValueError:
        raise click.BadParameter(f"{text!r}, expected VENDOR:DEVICE in hex, e.g. 8086:0412",
                                 param_hint="--set-ids") from None
    if not (0 <= vendor <= 0xFFFF and 0 <= device <= 0xFFFF):
        raise click.BadParameter(f"{text!r}: ids are 16-bit", param_hint="--set-ids")
    return vendor, device


def _checksum_at(text: str) -> str | int:
    if text == "last":
        return text
    try:
        return int(text, 0)
    except ValueError:
        raise click.BadParameter(f"{text!r}, expected 'last' or an image offset (6)",
                                 param_hint="--checksum-at") from None


@rom.command("fix")
@click.argument("file", type=_PATH)
@click.option("-o", "--output", "out", required=True, type=_PATH,
              help="Where to write the repaired ROM (atomically; through a symlink to its "
                   "target; FILE itself is fine).")
@click.option("--strip-header", is_flag=True,
              help="Drop a vendor header before the first image and anything after the last.")
@click.option("--set-ids", "set_ids", metavar="VENDOR:DEVICE",
              help="Write these ids into the x86 image's PCIR (as QEMU does for IGD).")
@click.option("--keep-images", "keep", metavar="KINDS",
              help="Keep only these image kinds: x86, efi, openfirmware, hppa, nvidia-fw.")
@click.option("--checksum-at", default="last", show_default=True, metavar="last|OFFSET",
              help="The byte each checksum repair writes: the image's last byte, or an "
                   "offset in the image (6 for SeaBIOS and iPXE builds).")
@click.option("--dry-run", is_flag=True, help="Print the changes, write nothing.")
@_JSON
def fix_cmd(file: Path, out: Path, strip_header: bool, set_ids: str | None, keep: str | None,
            checksum_at: str, dry_run: bool, as_json: bool) -> None:
    """Repair per-image checksums, strip vendor headers, rewrite ids, drop images."""
    try:
        kinds = parse_image_kinds(keep) if keep is not None else None
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--keep-images") from None
    data = read_rom_file(file, name=_name(file))
    result = fix_rom(data, source=_name(file), strip_header=strip_header, keep=kinds,
                     set_ids=_ids_option(set_ids), checksum_at=_checksum_at(checksum_at))
    if not dry_run:
        write_rom_file(out, result.data, name=_name(out))
    if as_json:
        emit_json({
            "output": None if dry_run else str(out),
            "size": len(result.data),
            "changes": [{"offset": c.offset, "image": c.image, "what": c.what,
                         "old": c.old.hex(), "new": c.new.hex()} for c in result.changes],
            "result": rom_to_json(result.after),
        })  # fmt: skip
        return
    for c in result.changes:
        stdout.print(_esc(str(c)), soft_wrap=True)
    if not result.changes:
        stdout.print("nothing to change")
    verb = "would write" if dry_run else "wrote"
    stdout.print(f"{verb} {len(result.data)} bytes to {_esc(str(out))}: "
                 f"{len(result.after.images)} image(s)")
    for p in result.after.all_problems():
        stdout.print(f"[yellow]kept[/]: {_esc(str(p))}", soft_wrap=True)


@rom.command("dump")
@click.argument("address")
@click.option("-o", "--output", "out", required=True, type=_PATH,
              help="Where to write the ROM (atomically; through a symlink to its target).")
@click.option("--force", is_flag=True, help="Write the bytes even when they hold no ROM.")
@_SYSFS
@_JSON
def dump_cmd(address: str, out: Path, force: bool, sysfs: Path, as_json: bool) -> None:
    """Read a PCI device's ROM through sysfs (enable, read, disable) into a file."""
    try:
        parse_bdf(address)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="ADDRESS") from None
    d = dump_rom(address, out, sysfs=sysfs, force=force, out_name=_name(out))
    if as_json:
        emit_json({"device": _device_json(d), "output": str(out), "size": len(d.data),
                   "rom": rom_to_json(d.rom)})
        return
    stdout.print(f"wrote {len(d.data)} bytes from {d.device.address} "
                 f"({d.device.vendor_id:04x}:{d.device.device_id:04x}) to {_esc(str(out))}")
    _print_rom(d.rom)
    _boot_vga_note(d)
    for p in d.problems:
        stdout.print(f"[red]problem[/]: {_esc(str(p))}", soft_wrap=True)


@rom.command("check")
@click.argument("file", type=_PATH)
@click.option("--ids", metavar="VENDOR:DEVICE",
              help="The device the ROM will sit on (QEMU's -device VGA is 1234:1111).")
@_JSON
def check_cmd(file: Path, ids: str | None, as_json: bool) -> None:
    """Would SeaBIOS run FILE as a device's VGA BIOS?  Exit 0 only if it would."""
    want = _ids_option(ids)
    result = inspect_file(file, source=_name(file))
    verdict = check_vga_bios(result, vendor_id=want[0] if want else None,
                             device_id=want[1] if want else None)
    if as_json:
        emit_json({"ok": verdict.ok,
                   "image": verdict.image.index if verdict.image else None,
                   "problems": list(verdict.problems), "warnings": list(verdict.warnings)})
    else:
        if verdict.ok and verdict.image is not None:
            stdout.print(f"[green]ok[/]: image {verdict.image.index} "
                         f"({_ids(verdict.image)}) runs as the VGA BIOS")
        for p in verdict.problems:
            stdout.print(f"[red]problem[/]: {_esc(p)}", soft_wrap=True)
        for w in verdict.warnings:
            stdout.print(f"[yellow]warning[/]: {_esc(w)}", soft_wrap=True)
    if not verdict.ok:
        raise click.exceptions.Exit(1)


@rom.command("boot", context_settings={"ignore_unknown_options": True})
@click.argument("file", type=_PATH)
@click.argument("overrides", nargs=-1)
@click.option("--cfg", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Boot this xl config (default: a firmware-only guest).")
@click.option("--check", is_flag=True,
              help="Boot, take the evidence, destroy the guest; exit 0 only if the ROM ran.")
@click.option("--device", metavar="QEMU-DEVICE",
              help="The emulated display to give the ROM (default: the one with its PCI ids).")
@click.option("--pci", metavar="BDF",
              help="A host GPU bound to vfio-pci: gfx_passthru=1, pci=[BDF], x-vga=on.")
@click.option("--name", help="The domain's name (default rom-<file stem>, or the config's).")
@click.option("--out", "out_dir", type=_PATH,
              default=Path("."), show_default=True,
              help="Where the config, screendump (PNG) and firmware log are written.")
@click.option("--force", is_flag=True, help="Boot a ROM the pre-boot check refuses.")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds for the firmware to reach its boot step.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              envvar="XENLAB_STATE_DIR", help="The toolstack's state (as `xenlab vm`).")
@_JSON
def boot_cmd(file: Path, overrides: tuple[str, ...], cfg: Path | None, check: bool,
             device: str | None, pci: str | None, name: str | None, out_dir: Path, force: bool,
             timeout: float, state_dir: Path | None, as_json: bool) -> None:
    """Start a guest whose primary VGA runs the BIOS in FILE (SeaBIOS runs it at c000).

    Extra KEY=VALUE arguments are xl overrides for --cfg.  The guest is stopped
    for a moment when SeaBIOS goes to boot: the text on its screen, a PNG
    screendump and SeaBIOS's debug log are taken as evidence.
    """
    from xenlab.cli.loop import command_loop, go
    from xenlab.vm.domain import Toolstack
    from xenlab.vm.vgaboot import boot_rom

    if overrides and cfg is None:
        raise XenlabError("KEY=VALUE overrides need --cfg (the firmware guest takes none)")
    # Read once, here, so errors name the file as this CLI shows it; the guest
    # boots a private copy of these bytes.  A regular file only: a ROM is a
    # file, and a boot is no place to wait on a pipe.
    data = read_rom_file(file, name=_name(file), regular_only=True)
    check_output_dir(out_dir, name=_name(out_dir))
    with command_loop():  # one event loop for the whole boot
        result = go(boot_rom(Toolstack(state_dir), file, out_dir=out_dir, cfg=cfg,
                          overrides=overrides, device=device, pci=pci, name=name,
                          check=check, force=force, timeout=timeout, data=data))
    if as_json:
        emit_json(result.to_json())
    else:
        fw = result.firmware
        table = Table(title=f"{_esc(result.domain)}: {_esc(result.rom)} on {_esc(result.device)}",
                      show_header=False)
        table.add_row("primary VGA", fw.primary_vga or "-")
        table.add_row("VGA ROM ran at", fw.vga_rom_at or "[red]not run[/]")
        table.add_row("VGA BIOS says", _esc(fw.vga_banner or "-"))
        for p in fw.problems:
            table.add_row("[red]SeaBIOS[/]", _esc(p))
        table.add_row("firmware booted", _esc(fw.booted or "-"))
        table.add_row("screendump", _esc(result.screendump or "-"))
        stdout.print(table)
        if result.screen:
            stdout.print("screen:")
            for line in result.screen:
                stdout.print("  | " + _esc(line), soft_wrap=True)
        colour = "green" if result.ran else "red"
        stdout.print(f"[{colour}]{'ran' if result.ran else 'did not run'}[/]: "
                     f"{_esc(result.verdict)}", soft_wrap=True)
        if not check:
            stdout.print(f"the domain runs on: `xenlab vm destroy {_esc(result.domain)}` stops it")
    if check and not result.ran:
        raise click.exceptions.Exit(1)
