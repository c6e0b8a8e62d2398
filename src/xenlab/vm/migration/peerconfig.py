"""What a migration receiver takes from its peer: :func:`check_request`.

A receiver starts a QEMU from the config and header its peer sends, so even
a peer with the token (a stolen one, a compromised source) must not make
this host run a program, read or write a host file, or hand a host device,
port or network to the guest.  The rules, which ``--trust-peer-config``
lifts (and the receiver's own ``key=value`` overrides never meet: what they
set is the receiver's):

- Keys: an allowlist (:data:`PEER_KEYS`).  A key the peer sets that is not
  on it is refused with the reason it is not (:data:`NOT_FROM_PEER`, or
  "not known to be safe" for anything else, unknown keys included).
- Entries of allowed keys that can still name host resources are checked
  one by one: ``disk`` targets (below), ``vif`` entries without ``script=``,
  ``bridge=``, ``vifname=``, ``ip=``, ``gatewaydev=``, ``backend=`` or COLO
  forwarding (which choose host networks, run programs or change host
  routes), ``serial`` only ``pty``/``none``, ``usbdevice`` only the emulated
  tablet, mouse and keyboard.
- Host paths (``disk`` targets, the header's mirror targets and overlays,
  ``kernel``, ``ramdisk``) must be absolute, have no ``..``, and resolve
  (symlinks followed) strictly inside the receiver's ``disk_dir``; without
  one a peer may name none.  An existing image there is walked as QEMU
  would open it, in the format the config declares
  (:func:`xenlab.vm.imagecheck.check_disk_image`): its backing files and
  data file must stay inside ``disk_dir`` too.
- Always, trusted or not: the domain name follows ``create``'s rules
  (:func:`xenlab.vm.domain.check_domain_name`), the uuid is a UUID, ``with_storage`` a boolean and
  ``disk_sizes`` positive byte counts (bounded against free space where
  disks are made, by :func:`xenlab.vm.migration.sender.receive`).

Who owns a setting: the config text is the peer's, the overrides are
appended after it; a key whose last ``=`` comes from an override is the
receiver's, otherwise its value as the peer left it (``+=`` entries the
receiver appended are the receiver's) is the peer's.
"""

from __future__ import annotations

import os
import re
import uuid as uuidlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

from xenlab.config import Op, Value, parse
from xenlab.config.errors import ConfigError
from xenlab.config.specs.disk import DiskFormat, parse_disk
from xenlab.config.specs.vif import parse_vif
from xenlab.errors import FormatError, XenlabError
from xenlab.vm.domconfig import check_domain_name, config_from_text
from xenlab.vm.imagecheck import UnsafeImageError, check_disk_image
from xenlab.vm.migration.image import DiskMove, SaveHeader, header_from_json

__all__ = [
    "NOT_FROM_PEER",
    "PEER_KEYS",
    "PeerRefusedError",
    "PeerRequest",
    "PeerRequestError",
    "check_request",
]

#: Keys a peer may set: each changes only what the guest sees, or is a
#: Xen-only knob the QEMU backend ignores (and so names nothing here).
PEER_KEYS: Final = frozenset({
    # identity and shape (name and uuid are checked on their own)
    "name", "uuid", "type", "builder", "memory", "maxmem", "vcpus", "maxvcpus",
    "cpus", "cpus_soft", "vnuma", "pool",
    # scheduling and Xen-only limits (ignored by the QEMU backend)
    "cpu_weight", "cap", "period", "slice", "latency", "extratime",
    "max_grant_frames", "max_maptrack_frames", "max_grant_version",
    "max_event_channels", "shadow_memory", "hap", "oos",
    # what happens on guest events
    "on_poweroff", "on_reboot", "on_crash", "on_watchdog", "on_soft_reset",
    # booting: the kernel's command line (kernel/ramdisk are paths: checked)
    "kernel", "ramdisk", "cmdline", "root", "extra", "boot", "bios",
    # the virtual platform
    "acpi", "acpi_s3", "acpi_s4", "acpi_laptop_slate", "apic", "pae", "nx", "hpet",
    "vpt_align", "viridian", "mmio_hole", "nestedhvm", "altp2m", "altp2mhvm",
    "cpuid", "vpmu", "msr_relaxed", "tsc_mode", "timer_mode", "rtc_timeoffset",
    "localtime", "nomigrate", "xen_platform_pci", "vendor_device", "ms_vm_genid",
    "mca_caps", "gic_version", "device_model_version",
    # emulated devices (the display on a socket in the run directory)
    "vga", "stdvga", "videoram", "hdtype", "nographic", "vnc", "vncunused",
    "vncpasswd", "usb", "usbversion", "usbdevice", "vkb_device", "serial",
    # devices whose entries are checked one by one
    "disk", "vif",
})

#: Why the keys a config most often carries, and a peer may not set, are refused.
NOT_FROM_PEER: Final[Mapping[str, str]] = {
    "device_model_args": "QEMU arguments, passed as they are",
    "device_model_args_hvm": "QEMU arguments, passed as they are",
    "device_model_args_pv": "QEMU arguments, passed as they are",
    "device_model_override": "a program run here",
    "device_model_user": "a user QEMU runs as here",
    "bootloader": "a program run here",
    "bootloader_args": "arguments of a program run here",
    "vga_rom": "a host file read into the guest",
    "vga_rom_device": "a device given a host file",
    "firmware": "a host file booted",
    "firmware_override": "a host file booted",
    "bios_path_override": "a host file booted",
    "smbios_firmware": "a host file read into the guest",
    "acpi_firmware": "a host file read into the guest",
    "device_tree": "a host file read into the guest",
    "pvshim_path": "a host file booted",
    "pci": "a host PCI device handed to the guest",
    "gfx_passthru": "a host GPU handed to the guest",
    "usbctrl": "host USB controllers",
    "usbdev": "a host USB device handed to the guest",
    "dtdev": "a host device handed to the guest",
    "iomem": "host memory handed to the guest",
    "ioports": "host I/O ports handed to the guest",
    "irqs": "host interrupts handed to the guest",
    "rdm": "host memory regions reserved for the guest",
    "e820_host": "the host's memory map shown to the guest",
    "p9": "a host directory shared with the guest",
    "vtpm": "a host TPM backend",
    "channel": "a host socket or file connected to the guest",
    "vfb": "a display listening on a host address",
    "vnclisten": "a host address the display listens on",
    "vncdisplay": "a host port the display listens on",
    "spice": "a display listening on a host address",
    "spicehost": "a host address the display listens on",
    "spiceport": "a host port the display listens on",
    "spicetls_port": "a host port the display listens on",
    "sdl": "a window on this host's display",
    "opengl": "this host's GPU",
    "display": "this host's X display",
    "xauthority": "a host file read",
    "keymap": "a host keymap file",
    "soundhw": "this host's sound device",
    "stubdomain_kernel": "a host file booted",
    "stubdomain_ramdisk": "a host file booted",
    "seclabel": "a host security label",
    "init_seclabel": "a host security label",
    "device_model_stubdomain_seclabel": "a host security label",
}

# Why vif settings are refused from a peer.
_VIF_FIELDS: Final = (
    ("script", "script=", "an executable run here"),
    ("bridge", "bridge=", "a host bridge the guest joins"),
    ("ifname", "vifname=", "a host interface name"),
    ("ip", "ip=", "host routes made for the guest"),
    ("gatewaydev", "gatewaydev=", "a host interface routed for the guest"),
    ("backend_domname", "backend=", "a backend domain"),
    ("coloft_forwarddev", "forwarddev=", "a host interface for COLO"),
    ("colo", "colo_*=", "host sockets for COLO"),
)
_SERIALS: Final = frozenset({"pty", "none"})
_USB_DEVICES: Final = frozenset({"tablet", "mouse", "keyboard"})
_SIZES_MAX: Final = 256


class PeerRefusedError(XenlabError):
    """The peer's request asks for what the receiver does not take; ``reasons`` lists each
    setting refused (``key (why)``), ``peer`` who asked."""

    def __init__(self, peer: str, message: str, reasons: Sequence[str] = ()) -> None:
        self.peer = peer
        self.reasons = tuple(reasons)
        super().__init__(message)


class PeerRequestError(XenlabError, ValueError):
    """The peer's request is malformed (a bad name, uuid, path, size or flag); ``peer``
    names who sent it."""

    def __init__(self, peer: str, message: str) -> None:
        self.peer = peer
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class PeerRequest:
    """A "prepare" the receiver takes: the header, whether the disks come too and their
    sizes, and the disk moves that apply (those of the disks the peer names)."""

    header: SaveHeader
    with_storage: bool
    disk_sizes: Mapping[str, int]
    disk_paths: tuple[DiskMove, ...]
    overlays: tuple[DiskMove, ...]


def _check_name(name: str, where: str) -> None:
    try:
        check_domain_name(name)
    except XenlabError as err:
        raise PeerRequestError(where, f"{where}: {err}") from None


def check_request(prep: Mapping[str, Any], *, peer: str, overrides: Sequence[str] = (),
                  disk_dir: Path | None = None, trust: bool = False) -> PeerRequest:
    """Check a "prepare" from ``peer`` against the receiver's rules (module docstring).

    ``overrides`` are the receiver's ``key=value`` settings, ``disk_dir`` the
    directory the peer may name files in, ``trust`` the receiver's
    ``--trust-peer-config``.  Reads the headers of existing images in
    ``disk_dir`` (vm.imagecheck, in their declared format); changes nothing.

    :raise FormatError: the header is not one.
    :raise ConfigError: the config does not parse.
    :raise PeerRefusedError: what the peer asks for is not taken from it.
    :raise XenlabError: a field of the wrong type or out of bounds.
    """
    where = f"migration from {peer}"
    try:
        header = header_from_json(prep.get("header"), where)
    except FormatError as err:
        # A message on the wire has no offset worth showing.
        raise PeerRequestError(where, f"{where}: {err.field}: {err.detail}") from None
    with_storage = prep.get("with_storage", False)
    if not isinstance(with_storage, bool):
        raise PeerRequestError(
            where, f"{where}: with_storage is {_kind(with_storage)}, expected a boolean")
    sizes = _sizes(prep.get("disk_sizes", {}), where)
    _check_name(header.name, where)
    try:
        uuidlib.UUID(header.uuid)
    except ValueError:
        raise PeerRequestError(where, f"{where}: uuid {header.uuid[:80]!r} is not a UUID") from None
    if _CONTROL.search(header.config_path) or len(header.config_path) > 4096:
        raise PeerRequestError(
            where, f"{where}: config_path {header.config_path[:80]!r} is not a path")
    source = f"{where} (config of {header.name})"
    dc, _ = config_from_text(header.config_text, source, overrides)
    _check_name(dc.name, where)
    owned = _peer_owned(header.config_text, overrides, source)
    disks = _peer_disks(owned.get("disk", ()), source)
    moves = [m for m in (*header.disk_paths, *header.overlays) if m.vdev in disks]
    request = PeerRequest(
        header, with_storage, sizes,
        tuple(m for m in header.disk_paths if m.vdev in disks),
        tuple(m for m in header.overlays if m.vdev in disks))
    if trust:
        return request
    reasons: list[str] = []
    for key, parts in owned.items():
        if not parts:
            continue
        if key not in PEER_KEYS:
            reasons.append(f"{key} ({NOT_FROM_PEER.get(key, 'not known to be safe')})")
        elif key == "vif":
            reasons += _vif_reasons(parts, source)
        elif key == "serial":
            reasons += [f"serial={p!r} (a host device, file or socket)"
                        for p in parts if p not in _SERIALS]
        elif key == "usbdevice":
            reasons += [f"usbdevice={p!r} (a host USB device)"
                        for p in parts if p not in _USB_DEVICES]
        elif key in ("kernel", "ramdisk") and isinstance(parts[0], str):
            why = _outside(parts[0], disk_dir)
            if why:
                reasons.append(f"{key}={parts[0]!r} ({why})")
    by_vdev = {d.vdev: d for d in dc.disks}
    final = {m.vdev: (m.file, DiskFormat(m.format)) for m in moves}  # overlays win
    for vdev in sorted(disks):
        disk = by_vdev.get(vdev)
        if disk is None:
            continue
        if disk.script is not None:
            reasons.append(f"disk {vdev} script= (a program run here)")
        file, fmt = final.get(vdev, (disk.pdev_path, disk.format))
        if not file:
            continue
        why = _outside(file, disk_dir) or _chain(file, fmt, disk_dir)
        if why:
            reasons.append(f"disk {vdev} target {file!r} ({why})")
    if reasons:
        raise PeerRefusedError(
            peer,
            f"{where}: the config of {header.name!r} sets {'; '.join(reasons)}: not taken "
            "from the source; the receiver may set them itself (key=value overrides"
            + (", --disk-dir DIR for disks" if disk_dir is None else "")
            + "), or trust the source (--trust-peer-config)",
            reasons)
    return request


_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def _kind(value: object) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def _sizes(value: object, where: str) -> dict[str, int]:
    if not isinstance(value, dict) or len(value) > _SIZES_MAX:
        raise PeerRequestError(where, f"{where}: disk_sizes is {_kind(value)}"
                               + (f" of {len(value)} entries" if isinstance(value, dict) else "")
                               + f", expected an object of at most {_SIZES_MAX} vdev: bytes")
    out: dict[str, int] = {}
    for vdev, size in value.items():
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size < 1 << 63:
            raise PeerRequestError(where, f"{where}: disk_sizes.{vdev[:40]} is "
                                   f"{size!r:.40}, expected a positive number of bytes")
        out[vdev] = size
    return out


def _peer_owned(text: str, overrides: Sequence[str], source: str) -> dict[str, tuple[Value, ...]]:
    """Key -> the entries of its final value that are the peer's (module docstring)."""
    peer_text = text.rstrip("\n")
    boundary = peer_text.count("\n") + 1
    combined = peer_text + "\n" + "\n".join(overrides) + "\n" if overrides else text
    cfg = parse(combined, source=source)
    out: dict[str, tuple[Value, ...]] = {}
    for name in cfg.names():
        stmts = [s for s in cfg.settings if s.name == name]
        assigns = [s for s in stmts if s.op is Op.ASSIGN]
        if assigns and assigns[-1].name_line > boundary:
            out[name] = ()
            continue
        mine = [s for s in stmts if s.name_line <= boundary]
        if not mine:
            out[name] = ()
            continue
        value = mine[-1].value
        out[name] = value if isinstance(value, tuple) else (value,)
    return out


def _peer_disks(entries: Iterable[Value], source: str) -> set[str]:
    """The vdevs of the disk entries the peer owns."""
    vdevs: set[str] = set()
    for entry in entries:
        spec: str | list[str]
        if isinstance(entry, str):
            spec = entry
        elif all(isinstance(e, str) for e in entry):
            spec = [str(e) for e in entry]
        else:
            continue  # not a disk: the config's own checks refused it already
        try:
            vdevs.add(parse_disk(spec, source=source).vdev)
        except ConfigError:
            continue
    return vdevs


def _vif_reasons(parts: Iterable[Value], source: str) -> list[str]:
    out: list[str] = []
    for entry in parts:
        if not isinstance(entry, str):
            continue
        try:
            nic = parse_vif(entry, source=source)
        except ConfigError:
            continue  # the config's own checks refuse it
        for attr, shown, why in _VIF_FIELDS:
            if getattr(nic, attr):
                out.append(f"vif {shown} ({why})")
    return sorted(set(out), key=out.index)


def _outside(path: str, disk_dir: Path | None) -> str | None:
    """Why host path ``path`` from the peer is not taken, or None when it is inside ``disk_dir``."""
    if disk_dir is None:
        return "a host path; the source may name none without --disk-dir"
    if not os.path.isabs(path):
        return "not an absolute path"
    if ".." in PurePosixPath(path).parts:
        return "a path with '..'"
    root = os.path.realpath(disk_dir)
    real = os.path.realpath(path)
    if not real.startswith(root.rstrip("/") + "/"):
        return f"resolves to {real}, outside --disk-dir {root}"
    return None


def _chain(path: str, fmt: DiskFormat, disk_dir: Path | None) -> str | None:
    """Why existing image ``path`` makes QEMU open a file outside ``disk_dir``, or None.

    Read as its declared format, as QEMU will (vm.imagecheck walks the chain).
    """
    if disk_dir is None or not os.path.exists(path):
        return None
    try:
        check_disk_image(path, fmt, [disk_dir])
    except UnsafeImageError as err:
        # Its own advice (XENLAB_BACKING_DIRS) is for local disks, not a peer's.
        return (f"as {fmt.value} it makes QEMU open {err.file}, outside --disk-dir "
                f"{os.path.realpath(disk_dir)}")
    except XenlabError as err:  # FormatError: not the format the peer says
        return str(err)
    return None
