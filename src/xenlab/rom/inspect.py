"""Read a ROM file and describe it: :func:`inspect_file`, and the ``--json`` shape.

Files are read through :func:`xenlab.rom.files.read_rom_file`: without
blocking, at most 64 MiB, into memory rather than mapped (a mapping of a
file another process truncates dies of SIGBUS; see that module).
"""

from __future__ import annotations

from pathlib import Path

from xenlab.errors import FormatError
from xenlab.formats.buffer import Buffer
from xenlab.formats.optionrom import (
    EFI_COMPRESSIONS,
    EFI_MACHINES,
    EFI_SUBSYSTEMS,
    OptionRom,
    RomImage,
    code_type_name,
    parse_rom,
)
from xenlab.rom.files import ROM_LIMIT, read_rom_file


def inspect_bytes(data: Buffer, *, source: str = "<rom>") -> OptionRom:
    """Walk the ROM in ``data`` (see :func:`xenlab.formats.optionrom.parse_rom`).

    :raise FormatError: when there is no option ROM in ``data`` at all.
    """
    return parse_rom(data, source=source)


def inspect_file(path: Path, *, source: str | None = None, limit: int = ROM_LIMIT) -> OptionRom:
    """Walk the ROM in the file at ``path``; ``source`` names it in messages (default: the path).

    :raise FormatError: the file is empty or holds no option ROM.
    :raise InputTooLargeError: the file holds more than ``limit`` bytes.
    :raise XenlabError: the file cannot be opened or read (see
        :func:`~xenlab.rom.files.read_rom_file`).
    """
    name = str(path) if source is None else source
    data = read_rom_file(Path(path), name=name, limit=limit)
    if not data:
        raise FormatError(name, 0, "signature", "the file is empty, expected 55 aa")
    return parse_rom(data, source=name)


def image_to_json(img: RomImage) -> dict[str, object]:
    """One image as ``inspect --json`` prints it (the contract fields first)."""
    p = img.pcir
    out: dict[str, object] = {
        "index": img.index,
        "offset": img.offset,
        "length": img.length,
        "code_type": p.code_type if p else None,
        "code_type_name": code_type_name(p.code_type if p else None),
        "vendor_id": p.vendor_id if p else None,
        "device_id": p.device_id if p else None,
        "class_code": p.class_code if p else None,
        "last": img.last,
        "checksum_ok": img.checksum_ok,
        "problems": [str(x) for x in img.problems],
        "checksummed": img.checksummed,
        "checksum": img.checksum,
        "header_length": img.header_length,
        "signature": img.signature.hex(),
        "via_npde": img.via_npde,
        "notes": list(img.notes),
    }
    if p is not None:
        out["pcir"] = {
            "offset": p.offset,
            "signature": p.signature,
            "revision": p.revision,
            "length": p.length,
            "class_code_raw": p.class_code_raw,
            "image_length": p.image_length,
            "code_revision": p.code_revision,
            "indicator": p.indicator,
            "device_list_pointer": p.device_list_pointer,
            "device_list": list(p.device_list),
            "max_runtime_length": p.max_runtime_length,
            "config_utility_offset": p.config_utility_offset,
            "clp_offset": p.clp_offset,
        }
    if img.pnp is not None:
        n = img.pnp
        out["pnp"] = {
            "offset": n.offset, "revision": n.revision, "length": n.length,
            "checksum_ok": n.checksum_ok, "device_id": n.device_id,
            "manufacturer": n.manufacturer, "product": n.product,
            "device_type": n.device_type, "bcv": n.bcv, "dv": n.dv, "bev": n.bev,
        }  # fmt: skip
    if img.efi is not None:
        e = img.efi
        out["efi"] = {
            "offset": e.offset,
            "signature": e.signature,
            "initialization_size": e.initialization_size,
            "subsystem": e.subsystem,
            "subsystem_name": EFI_SUBSYSTEMS.get(e.subsystem),
            "machine_type": e.machine_type,
            "machine_name": EFI_MACHINES.get(e.machine_type),
            "compression": e.compression,
            "compression_name": EFI_COMPRESSIONS.get(e.compression),
            "efi_image_offset": e.efi_image_offset,
        }
    if img.npde is not None:
        d = img.npde
        out["npde"] = {"offset": d.offset, "revision": d.revision, "length": d.length,
                       "image_length": d.image_length, "last": d.last}
    return out


def rom_to_json(rom: OptionRom) -> dict[str, object]:
    """The whole ROM as ``inspect --json`` prints it: top-level fields and ``images``."""
    return {
        "source": rom.source,
        "size": rom.size,
        "header_offset": rom.header_offset,
        "problems": [str(p) for p in rom.problems],
        "end": rom.end,
        "trailer_length": rom.trailer_length,
        "trailer_fill": rom.trailer_fill,
        "images": [image_to_json(img) for img in rom.images],
    }
