"""The QEMU command line of a domain: :func:`qemu_argv`.

:func:`qemu_argv` turns a :class:`~xenlab.config.model.DomainConfig` into the
argv of ``qemu-system-x86_64``, as a Xen user expects the xl keys to behave.
It is pure: it reads no file and starts nothing, so every mapping is a unit
test.  Anything the QEMU backend cannot do raises :class:`XenlabError` naming
the xl key and what is supported.  Option strings are made by
:mod:`xenlab.vm.backends.qemu.qemuopts`; the accelerator (:class:`Accel`) is chosen by
:func:`xenlab.vm.backends.qemu.accel.probe_accel`.  Both are re-exported here for the
callers that import them from this module.

The design (its tables, choices and reasons) is in docs/qemu-backend.md.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from xenlab.config.model import DomainConfig, DomainType, ShutdownAction
from xenlab.config.specs.disk import DiskFormat, DiskSpec
from xenlab.config.specs.vif import VifSpec
from xenlab.config.values import Value
from xenlab.errors import NotRunnable, UsageError
from xenlab.vm.backends.qemu.accel import Accel, probe_accel
from xenlab.vm.backends.qemu.qemuopts import (
    QemuOptionError,
    qemu_arg,
    qemu_json,
    qemu_opt_value,
    qemu_opts,
)
from xenlab.vm.domconfig import stable_mac, vif_devids
from xenlab.vm.hostcpus import cpu_ranges
from xenlab.vm.qemuimg import FORMAT_DRIVERS

# Accel, probe_accel and the option builders (vm.accel, vm.qemuopts) are re-exported:
# vm.domain and tests import them from here, where they lived before.
__all__ = [
    "GUEST_AGENT_PORT",
    "Accel",
    "GuestImageLike",
    "Nic",
    "QemuOptionError",
    "RuntimePaths",
    "balloon_target_mib",
    "nic",
    "nic_device_id",
    "nic_netdev_id",
    "nics",
    "probe_accel",
    "qemu_arg",
    "qemu_argv",
    "qemu_json",
    "qemu_opt_value",
    "qemu_opts",
]

#: The virtio-serial port name qemu-ga looks for in the guest.
GUEST_AGENT_PORT: Final = "org.qemu.guest_agent.0"

# sun_path is 108 bytes including the NUL.
_SOCKET_MAX: Final = 107
# Xen's HVM_MAX_VCPUS; QEMU's pc machine allows 255 without an IOMMU.
_MAX_VCPUS: Final = 128
# Xen's OUI, which libxl uses for the MACs it makes up.
# xvda-xvdh get fixed PCI slots 0x08-0x0f (see disk_slot), vifs 0-15 0x10-0x1f
# (see Nic.device): what is hot-added sits where a restart puts it.
_DISK_SLOT_BASE: Final = 0x08
_PINNED_DISK_SLOTS: Final = 8
_NIC_SLOT_BASE: Final = 0x10
_PINNED_NIC_SLOTS: Final = 16

_NIC_MODELS: Final[dict[str | None, str]] = {
    None: "virtio-net-pci", "virtio": "virtio-net-pci", "virtio-net": "virtio-net-pci",
    **{m: m for m in ("virtio-net-pci", "e1000", "e1000e", "rtl8139", "ne2k_pci", "pcnet")}}
_USB_DEVICES: Final = {"tablet": "usb-tablet", "mouse": "usb-mouse", "keyboard": "usb-kbd"}
_VGA_DEVICES: Final = {"stdvga": "VGA", "cirrus": "cirrus-vga", "qxl": "qxl-vga", "none": None}

# Keys whose feature this backend lacks: key -> what to do instead.
_UNSUPPORTED_KEYS: Final = {
    "soundhw": "no sound devices are emulated",
    "spice": "use vnc=1",
    "vtpm": "no TPM is emulated",
    "channel": "only the guest agent channel exists",
    "p9": "no 9p shares yet",
    "pvcalls": "PV calls are Xen-only",
    "vdispl": "PV displays are Xen-only",
    "vsnd": "PV sound is Xen-only",
    "usbctrl": "use usb=1 and usbdevice=",
    "usbdev": "USB passthrough needs a host device",
    "dtdev": "device-tree passthrough needs an IOMMU",
    "iomem": "I/O memory passthrough needs VFIO",
    "ioports": "I/O port passthrough needs VFIO",
    "irqs": "IRQ passthrough needs VFIO",
    "smbios_firmware": "SMBIOS tables are QEMU's own",
    "acpi_firmware": "ACPI tables are QEMU's own",
    "device_tree": "x86 guests have no device tree",
    "vuart": "use serial=pty",
    "tee": "no TEE mediator on x86",
}


class GuestImageLike(Protocol):
    """What :func:`qemu_argv` needs of a guest image (see :mod:`xenlab.vm.image`)."""

    @property
    def kernel(self) -> Path: ...

    @property
    def initrd(self) -> Path: ...

    @property
    def cmdline(self) -> str: ...


@dataclass(frozen=True, slots=True)
class RuntimePaths:
    """Where one domain's sockets and files live (all inside ``rundir``)."""

    rundir: Path
    qmp: Path
    qga: Path
    console: Path  # the serial console's socket
    pidfile: Path
    log: Path  # QEMU's stdout and, once daemonized, its stderr (``-D``)

    @classmethod
    def under(cls, rundir: Path) -> RuntimePaths:
        """The standard names inside ``rundir``."""
        return cls(rundir=rundir, qmp=rundir / "qmp.sock", qga=rundir / "qga.sock",
                   console=rundir / "console.sock", pidfile=rundir / "qemu.pid",
                   log=rundir / "qemu.log")

    @property
    def console_log(self) -> Path:
        """Everything the serial console printed, also while nobody was attached."""
        return self.rundir / "console.log"

    @property
    def firmware_log(self) -> Path:
        """SeaBIOS's debug output (port 0x402), for every boot of this QEMU."""
        return self.rundir / "firmware.log"

    @property
    def vnc(self) -> Path:
        """The VNC socket used when ``vnc=1`` names no display number."""
        return self.rundir / "vnc.sock"


def _unsupported(key: str, message: str) -> NotRunnable:
    return NotRunnable(key, message)


def balloon_target_mib(dc: DomainConfig) -> int | None:
    """The balloon target to set once the guest runs, or None when it starts at ``memory``.

    The guest is given ``maxmem`` (see the module notes); xl's ``memory`` is
    where the balloon takes it at start, as populate-on-demand does.
    """
    if dc.memory_mib < dc.maxmem_mib:
        return dc.memory_mib
    return None


# --- disks ------------------------------------------------------------------

_VDEV: Final = re.compile(r"(xvd|hd|sd)([a-z]+)")


def _vdev_index(vdev: str) -> tuple[str, int]:
    """(kind, number) of a vdev as libxl numbers it: xvda=0, xvdz=25, xvdaa=26."""
    m = _VDEV.fullmatch(vdev)
    if m is None:
        raise _unsupported("disk", f"vdev {vdev!r} is not supported (expected xvdX, hdX or sdX)")
    number = 0
    for ch in m.group(2):
        number = number * 26 + (ord(ch) - ord("a") + 1)
    return m.group(1), number - 1


def check_disk(disk: DiskSpec) -> None:
    """XenlabError (``disk VDEV: ...``) when the QEMU backend cannot run ``disk``."""
    where = f"disk {disk.vdev}"
    if disk.script is not None:
        raise _unsupported(where, f"script={disk.script!r}: hotplug scripts are not supported")
    if disk.backend_domname is not None:
        raise _unsupported(where, "backend=: driver domains are Xen-only")
    if disk.colo_enable:
        raise _unsupported(where, "colo: COLO replication is not supported")
    if disk.format is not DiskFormat.EMPTY and disk.format not in FORMAT_DRIVERS:
        raise _unsupported(where, f"format={disk.format.value} "
                           "(expected raw, qcow2, qcow, vhd or qed)")


def blockdev_nodes(disk: DiskSpec, node: str) -> tuple[dict[str, object], dict[str, object]]:
    """A disk image's protocol node and format node, as ``blockdev-add`` arguments.

    The same dicts give the ``-blockdev`` options at start and the QMP
    arguments of ``block-attach``, so a hot-added disk is the disk a restart
    would make.
    """
    assert disk.pdev_path is not None
    path = disk.pdev_path
    proto: dict[str, object] = {
        "driver": "host_device" if path.startswith("/dev/") else "file",
        "filename": path, "node-name": f"{node}-file", "read-only": not disk.readwrite}
    fmt: dict[str, object] = {
        "driver": FORMAT_DRIVERS[disk.format], "file": f"{node}-file",
        "node-name": f"{node}-fmt", "read-only": not disk.readwrite}
    if disk.discard_enable:
        proto["discard"] = fmt["discard"] = "unmap"
    return proto, fmt


def _blockdev(disk: DiskSpec, node: str) -> list[str]:
    """The two -blockdev options of a disk's image: a protocol node and a format node."""
    proto, fmt = blockdev_nodes(disk, node)
    key = f"disk {disk.vdev}"
    return ["-blockdev", qemu_json(proto, key=key), "-blockdev", qemu_json(fmt, key=key)]


def _device(opts: Mapping[str, object], key: str) -> list[str]:
    """One ``-device`` option, as JSON (:func:`qemu_json`)."""
    return ["-device", qemu_json(opts, key=key)]


def disk_slot(vdev: str) -> int | None:
    """The fixed PCI slot of virtio disk ``vdev`` (xvda-xvdh: 0x08-0x0f), None for others.

    Fixed so that a disk attached at run time (block-attach) sits where a
    restart, a restore or a migration destination puts it.
    """
    kind, number = _vdev_index(vdev)
    if kind == "xvd" and number < _PINNED_DISK_SLOTS:
        return _DISK_SLOT_BASE + number
    return None


def disk_device(disk: DiskSpec) -> dict[str, object]:
    """The ``device_add`` arguments of virtio disk ``disk`` (an xvdX)."""
    opts: dict[str, object] = {"driver": "virtio-blk-pci", "drive": f"{disk.vdev}-fmt",
                               "id": disk.vdev, "serial": disk.vdev}
    slot = disk_slot(disk.vdev)
    if slot is not None:
        opts["addr"] = f"{slot:#x}"
    return opts


def _disks(disks: Sequence[DiskSpec]) -> list[str]:
    argv: list[str] = []
    ide_slots: dict[int, str] = {}
    seen: set[str] = set()
    scsi = False
    # Sorted by number so xvda is the first virtio disk the guest finds (vda).
    ordered = sorted(disks, key=lambda d: _vdev_index(d.vdev)[::-1])
    for disk in ordered:
        kind, number = _vdev_index(disk.vdev)
        if disk.vdev in seen:
            raise _unsupported(f"disk {disk.vdev}", "vdev given twice")
        seen.add(disk.vdev)
        check_disk(disk)
        node = disk.vdev
        has_media = disk.pdev_path not in (None, "") and disk.format is not DiskFormat.EMPTY
        if disk.is_cdrom or kind == "hd":
            if number >= 4:
                raise _unsupported(f"disk {disk.vdev}", "only the first 4 emulated IDE devices "
                                   "exist (hda-hdd or index 0-3)")
            if number in ide_slots:
                raise _unsupported(f"disk {disk.vdev}",
                                   f"IDE slot {number} is already taken by {ide_slots[number]}")
            ide_slots[number] = disk.vdev
            if not disk.is_cdrom and not disk.readwrite:
                # libxl refuses this too: ide-hd cannot sit on a read-only node.
                raise _unsupported(f"disk {disk.vdev}", "a read-only IDE hard disk is not "
                                   "supported (use xvdX or devtype=cdrom)")
            ide: dict[str, object] = {"driver": "ide-cd" if disk.is_cdrom else "ide-hd",
                                      "bus": f"ide.{number // 2}", "unit": number % 2,
                                      "id": disk.vdev}
            if has_media:
                argv += _blockdev(disk, node)
                ide["drive"] = f"{node}-fmt"
            argv += _device(ide, f"disk {disk.vdev}")
            continue
        if not has_media:
            raise _unsupported(f"disk {disk.vdev}", "no target (only a cdrom may be empty)")
        argv += _blockdev(disk, node)
        if kind == "xvd":
            argv += _device(disk_device(disk), f"disk {disk.vdev}")
        else:
            if not scsi:
                argv += _device({"driver": "virtio-scsi-pci", "id": "scsi0"}, "disk")
                scsi = True
            argv += _device({"driver": "scsi-hd", "bus": "scsi0.0", "scsi-id": number, "lun": 0,
                             "drive": f"{node}-fmt", "id": disk.vdev}, f"disk {disk.vdev}")
    return argv


# --- network ----------------------------------------------------------------


def nic_device_id(devid: int) -> str:
    """QEMU's id of vif ``devid``'s device: ``vif<devid>``."""
    return f"vif{devid}"


def nic_netdev_id(devid: int) -> str:
    """QEMU's id of vif ``devid``'s netdev: ``net<devid>``."""
    return f"net{devid}"


@dataclass(frozen=True, slots=True)
class Nic:
    """One vif as QEMU runs it: devid, MAC (made up when the config gives none), QEMU model.

    ``tap`` says whether it needs a host tap (the config names a bridge or a
    hotplug script) or runs on QEMU's user-mode network.
    """

    devid: int
    mac: str
    model: str  # the QEMU device: virtio-net-pci, e1000, ...
    spec: VifSpec

    @property
    def tap(self) -> bool:
        """True when the vif names a bridge or a script: a tap on the host, not user mode."""
        return self.spec.bridge is not None or self.spec.script is not None

    @property
    def netdev_id(self) -> str:
        """The QEMU netdev's id: ``net<devid>``."""
        return nic_netdev_id(self.devid)

    @property
    def device_id(self) -> str:
        """The QEMU device's id: ``vif<devid>``."""
        return nic_device_id(self.devid)

    def netdev(self, tap: str | None) -> dict[str, object]:
        """The netdev's options (``-netdev``, QMP ``netdev_add``); ``tap`` names the host tap.

        A tap is opened by name, already made and configured by the hotplug
        layer: QEMU runs no ifup/ifdown script of its own (``script=no``),
        and vhost stays off (TCG, and no /dev/vhost-net needed).
        """
        if not self.tap:
            return {"type": "user", "id": self.netdev_id}
        if tap is None:
            raise _unsupported(f"vif {self.devid}",
                               "needs a tap; the toolstack brings it online before QEMU starts")
        return {"type": "tap", "id": self.netdev_id, "ifname": tap, "script": "no",
                "downscript": "no", "vhost": False}

    def device(self) -> dict[str, object]:
        """The NIC's options (``-device``, QMP ``device_add``).

        vifs 0-15 sit at PCI slot 0x10 + devid, so a NIC attached at run time
        is where a restarted or restored QEMU puts it again (migration and
        restore need the same slots on both sides).
        """
        opts: dict[str, object] = {"driver": self.model, "netdev": self.netdev_id,
                                   "mac": self.mac, "id": self.device_id}
        if self.devid < _PINNED_NIC_SLOTS:
            opts["addr"] = f"{_NIC_SLOT_BASE + self.devid:#x}"
        if self.spec.mtu is not None:
            opts["host_mtu"] = self.spec.mtu
        return opts


def nic(dc: DomainConfig, vif: VifSpec, devid: int) -> Nic:
    """vif ``devid`` of ``dc`` as QEMU runs it.

    :raise XenlabError: the vif asks for something the backend cannot do
        (``vif N: ...``).
    """
    where = f"vif {devid}"
    _check_vif(vif, where)
    model = _NIC_MODELS.get(vif.model)
    if model is None:
        known = ", ".join(sorted(k for k in _NIC_MODELS if k))
        raise _unsupported(where, f"model={vif.model!r} (expected one of {known})")
    if vif.mtu is not None and model != "virtio-net-pci":
        raise _unsupported(where, "mtu= is only supported with the virtio model")
    mac = ":".join(f"{o:02x}" for o in vif.mac) if vif.mac is not None else stable_mac(dc, devid)
    return Nic(devid=devid, mac=mac, model=model, spec=vif)


def nics(dc: DomainConfig) -> tuple[Nic, ...]:
    """Every vif of ``dc`` as QEMU runs it, with xl's devids (the list index unless ``devid=``).

    :raise XenlabError: a devid is given twice, or a vif is refused (:func:`nic`).
    """
    return tuple(nic(dc, vif, devid) for devid, vif in vif_devids(dc))


def _vifs(dc: DomainConfig, taps: Mapping[int, str]) -> list[str]:
    argv: list[str] = []
    for n in nics(dc):
        key = f"vif {n.devid}"
        argv += ["-netdev", qemu_json(n.netdev(taps.get(n.devid)), key=key),
                 *_device(n.device(), key)]
    return argv


def _check_vif(vif: VifSpec, where: str) -> None:
    if vif.rate_bytes_per_interval:
        raise _unsupported(where, "rate= limits are not supported")
    if vif.backend_domname is not None:
        raise _unsupported(where, "backend=: driver domains are Xen-only")
    if vif.gatewaydev is not None and vif.script is None:
        raise _unsupported(where, "gatewaydev= needs script=vif-route (or a script of yours)")
    if vif.colo or vif.coloft_forwarddev is not None:
        raise _unsupported(where, "COLO is not supported")


# --- memory, vCPUs, NUMA ----------------------------------------------------


def _memory_and_cpus(dc: DomainConfig) -> list[str]:
    if dc.maxvcpus > _MAX_VCPUS:
        raise _unsupported("maxvcpus", f"{dc.maxvcpus} is above {_MAX_VCPUS} (Xen's HVM limit)")
    argv = ["-m", qemu_opts([("size", f"{dc.maxmem_mib}M")], key="maxmem"),
            "-smp", qemu_opts([("cpus", dc.vcpus), ("maxcpus", dc.maxvcpus)], key="vcpus")]
    if not dc.vnuma:
        return argv
    for nodeid, node in enumerate(dc.vnuma):
        argv += ["-object", qemu_opts([("qom-type", "memory-backend-ram"),
                                       ("id", f"vnode{nodeid}"), ("size", f"{node.size_mib}M")],
                                      key="vnuma")]
        cpus = [("cpus", r) for r in cpu_ranges(node.vcpus)]
        argv += ["-numa", qemu_opts([("type", "node"), ("nodeid", nodeid), *cpus,
                                     ("memdev", f"vnode{nodeid}")], key="vnuma")]
    if len(dc.vnuma) > 1:
        for src, node in enumerate(dc.vnuma):
            for dst, val in enumerate(node.vdistances):
                if src == dst:
                    if val != 10:
                        # QEMU (and ACPI SLIT) fix the local distance at 10.
                        raise _unsupported("vnuma",
                                           f"vnode {src}: local distance {val} (QEMU needs 10)")
                    continue
                if val <= 10:
                    raise _unsupported("vnuma", f"vnode {src}: distance {val} to vnode {dst} "
                                       "(QEMU needs more than 10)")
                argv += ["-numa", qemu_opts([("type", "dist"), ("src", src), ("dst", dst),
                                             ("val", val)], key="vnuma")]
    return argv


# --- boot ---------------------------------------------------------------------


def boots_firmware(dc: DomainConfig) -> bool:
    """True when ``dc`` boots through SeaBIOS from its disks, needing no guest image.

    That is an HVM guest that gives ``boot=`` (xl's boot order: a firmware
    boot) and no kernel (xl ignores ``kernel=`` for HVM guests, the xm-era
    ``kernel="hvmloader"`` included).  Other guests without a kernel boot
    xenlab's image.
    """
    return dc.type is DomainType.HVM and dc.kernel is None and dc.boot is not None


def needs_image(dc: DomainConfig) -> bool:
    """True when ``dc`` runs on xenlab's guest image (no kernel and no firmware boot)."""
    return dc.kernel is None and not boots_firmware(dc)


def _boot(dc: DomainConfig, image: GuestImageLike | None) -> list[str]:
    if dc.bootloader is not None:
        raise _unsupported("bootloader",
                           f"{dc.bootloader!r} is not supported; give kernel=/ramdisk=/cmdline="
                           " (or none, to boot xenlab's image)")
    if "firmware" in dc.extra:
        raise _unsupported("firmware", "PV firmware (pvgrub, pvshim) is Xen-only; give kernel=")
    kernel = None if boots_firmware(dc) else dc.kernel
    if kernel is not None:
        argv = ["-kernel", qemu_arg(kernel, key="kernel")]
        if dc.ramdisk is not None:
            # QEMU's multiboot loader (a Xen or other multiboot kernel=) splits
            # -initrd into modules at commas and their arguments at spaces;
            # its Linux loader does not: one name would mean different files.
            if re.search(r"[, ]", dc.ramdisk):
                raise QemuOptionError("ramdisk", dc.ramdisk, "contains a comma or a space, "
                                      "where QEMU's multiboot loader splits modules")
            argv += ["-initrd", qemu_arg(dc.ramdisk, key="ramdisk")]
        if dc.cmdline:
            argv += ["-append", qemu_arg(dc.cmdline, key="cmdline", controls=True)]
        return argv
    if dc.ramdisk is not None:
        raise _unsupported("ramdisk", "a ramdisk needs kernel= too")
    if image is not None and not boots_firmware(dc):
        cmdline = image.cmdline if not dc.cmdline else f"{image.cmdline} {dc.cmdline}"
        # The image's kernel is Linux: its initrd is one file, whatever its name.
        return ["-kernel", qemu_arg(image.kernel, key="guest image"),
                "-initrd", qemu_arg(image.initrd, key="guest image"),
                "-append", qemu_arg(cmdline, key="cmdline", controls=True)]
    if dc.type is not DomainType.HVM:
        raise _unsupported("kernel", f"a {dc.type.value} guest needs kernel= "
                           "(or xenlab's guest image)")
    # An HVM guest without a kernel boots from its disks through SeaBIOS, as under Xen.
    order = dc.boot or "cd"
    if not re.fullmatch(r"[a-dn]+", order):
        raise _unsupported("boot", f"{order!r} (expected letters from a, b, c, d, n)")
    return ["-boot", qemu_opts([("order", order)], key="boot")]


# --- display, serial, USB -------------------------------------------------------


def _vfb_settings(dc: DomainConfig) -> dict[str, str]:
    """The key=value settings of the first vfb= entry (PV framebuffer)."""
    items = (item.strip().partition("=") for item in dc.vfb[0].split(",")) if dc.vfb else ()
    return {key: value for key, _, value in items}


def _display(dc: DomainConfig, paths: RuntimePaths) -> list[str]:
    vnc, listen, display, passwd = dc.vnc, dc.vnclisten, dc.vncdisplay, dc.vncpasswd
    sdl = dc.sdl
    vfb = _vfb_settings(dc)
    if vfb and dc.type is not DomainType.HVM:
        vnc = vfb.get("vnc", "0") not in ("", "0")
        sdl = vfb.get("sdl", "0") not in ("", "0")
        listen = vfb.get("vnclisten") or None
        display = int(vfb["vncdisplay"]) if vfb.get("vncdisplay", "").isdigit() else None
        passwd = vfb.get("vncpasswd") or None
    if sdl:
        raise _unsupported("sdl", "no local window; use vnc=1")
    if not vnc or dc.nographic:
        return ["-display", "none", *_video(dc, shown=False)]
    if listen is None and display is None:
        pairs: list[tuple[str, object]] = [("vnc", f"unix:{paths.vnc}")]
    else:
        pairs = [("vnc", _vnc_address(listen, display))]
    if passwd:
        # The password itself is set over QMP (set_password), never on argv.
        pairs.append(("password", True))
    # "vnc=" spelled out: a bare first value with "=" in it would split.
    return ["-vnc", qemu_opts(pairs, key="run directory"), *_video(dc, shown=True)]


_HOSTNAME: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")
# QEMU's VNC display N listens on TCP port 5900 + N.
_MAX_DISPLAY: Final = 65535 - 5900


def _vnc_address(listen: str | None, display: int | None) -> str:
    """``HOST:DISPLAY`` for ``-vnc`` from xl's vnclisten (``ADDRESS[:DISPLAY]``) and vncdisplay.

    Only an address or a host name is taken: the value ends up inside
    QEMU's ``-vnc`` option, where anything else would be read as options.
    """
    text = host = listen or "127.0.0.1"
    shown = None
    if host.startswith("["):  # [v6] or [v6]:N
        inner, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            host = ""
        else:
            host, shown = inner, rest[1:] if rest else None
    elif host.count(":") == 1:
        host, _, shown = host.partition(":")
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if (ip is None and not _HOSTNAME.fullmatch(host)) or (
            shown is not None and not (shown.isdigit() and int(shown) <= _MAX_DISPLAY)):
        raise QemuOptionError("vnclisten", text, "is not an address or host name with an "
                              f"optional :DISPLAY (0-{_MAX_DISPLAY})")
    number = int(shown) if shown is not None else display or 0
    return f"[{host}]:{number}" if ip is not None and ip.version == 6 else f"{host}:{number}"


def _video(dc: DomainConfig, *, shown: bool) -> list[str]:
    """The emulated display device: there when it is ``shown`` or carries ``vga_rom``.

    A passed-through GPU (``gfx_passthru``) is the primary VGA instead, and
    takes ``vga_rom`` itself (:func:`_pci`).
    """
    if dc.gfx_passthru:
        return []
    rom = dc.extra.get("vga_rom")
    if isinstance(rom, str):
        device = dc.extra.get("vga_rom_device")
        model = device if isinstance(device, str) else _vga(dc)
        if model is None:
            raise _unsupported("vga_rom", 'a VGA BIOS needs a display device, not vga="none"')
        if not re.fullmatch(r"[A-Za-z0-9_-]+(,[A-Za-z0-9_.-]+=[^,\s]+)*", model) or (
                re.search(r",(romfile|id)=", model)):
            raise _unsupported("vga_rom_device", f"{model!r} (expected a QEMU display device "
                               "such as VGA or ati-vga,model=rv100, without romfile= or id=)")
        driver, *settings = model.split(",")
        pairs: list[tuple[str, object]] = [("driver", driver), ("id", "video0")]
        pairs += [(k, v) for k, _, v in (item.partition("=") for item in settings)]
        return ["-device", qemu_opts(pairs, key="vga_rom_device") + ","
                + qemu_opts([("romfile", rom)], key="vga_rom")]
    vga = _vga(dc) if shown else None
    return _device({"driver": vga, "id": "video0"}, "vga") if vga else []


def _pci(dc: DomainConfig) -> list[str]:
    """VFIO passthrough of each ``pci=`` device; with ``gfx_passthru`` the first one is
    the guest's primary VGA (``x-vga=on``, the legacy VGA ranges and its BIOS)."""
    kind = dc.gfx_passthru_kind
    if dc.gfx_passthru and kind not in (None, "default", "vga"):
        raise _unsupported("gfx_passthru", f"{kind!r}: IGD passthrough is Xen's machine "
                           "option; pass an IGD as a plain VGA device (gfx_passthru=1)")
    if dc.gfx_passthru and not dc.pcis:
        raise _unsupported("gfx_passthru", "it needs the GPU in pci=[...]")
    argv: list[str] = []
    for i, p in enumerate(dc.pcis):
        bdf = f"{p.domain:04x}:{p.bus:02x}:{p.dev:02x}.{p.func}"
        if p.all_functions:
            raise _unsupported(f"pci {bdf}", "all functions (.*): list each function")
        if p.seize:
            raise _unsupported(f"pci {bdf}", "seize=1: bind the device to vfio-pci yourself "
                               "(driverctl set-override BDF vfio-pci)")
        opts: dict[str, object] = {"driver": "vfio-pci", "host": bdf, "id": f"hostdev{i}"}
        if p.vslot is not None:
            opts["addr"] = f"{p.vslot:#x}"
        if dc.gfx_passthru and i == 0:
            opts["x-vga"] = True
            rom = dc.extra.get("vga_rom")
            if isinstance(rom, str):
                opts["romfile"] = qemu_arg(rom, key="vga_rom")
        argv += _device(opts, f"pci {bdf}")
    return argv


def _vga(dc: DomainConfig) -> str | None:
    vga = dc.extra.get("vga")
    if isinstance(vga, str):
        if vga not in _VGA_DEVICES:
            raise _unsupported("vga", f"{vga!r} (expected stdvga, cirrus, qxl or none)")
        return _VGA_DEVICES[vga]
    # Xen's qemu-xen defaults to cirrus; the standard VGA is what QEMU and
    # guests maintain today, and stdvga=1 asks for it anyway.
    return "VGA"


def _socket(chardev: str, path: Path, *more: tuple[str, object]) -> list[str]:
    """A listening unix socket chardev at ``path`` (in the run directory)."""
    return ["-chardev", qemu_opts([("backend", "socket"), ("id", chardev), ("path", path),
                                   ("server", True), ("wait", False), *more],
                                  key="run directory")]


def _serial(dc: DomainConfig, paths: RuntimePaths) -> list[str]:
    kinds = dc.serial or ("pty",)
    if len(kinds) > 1:
        raise _unsupported("serial", "only one serial port (the console) is supported")
    if kinds[0] == "none":
        return ["-serial", "none"]
    if kinds[0] != "pty":
        raise _unsupported("serial", f"{kinds[0]!r}: only 'pty' (the console socket) or 'none' "
                           "is supported")
    return [*_socket("console0", paths.console, ("logfile", paths.console_log),
                     ("logappend", True)), "-serial", "chardev:console0"]


def _usb(dc: DomainConfig) -> list[str]:
    if not dc.usb and not dc.usbdevice:
        return []
    argv = ["-usb"]
    for name in dc.usbdevice:
        device = _USB_DEVICES.get(name)
        if device is None:
            known = ", ".join(sorted(_USB_DEVICES))
            raise _unsupported("usbdevice", f"{name!r} (expected {known})")
        argv += _device({"driver": device}, "usbdevice")
    return argv


# --- the rest -------------------------------------------------------------------


def _actions(dc: DomainConfig) -> list[str]:
    """``-action``: what QEMU itself does; the toolstack finishes the job.

    A guest reboot resets in place for restart-like actions (xl re-creates
    the domain, QEMU resets it: the guest cannot tell), otherwise QEMU stops
    and the toolstack destroys or keeps it.  ``preserve`` pauses.
    """
    restart_like = {ShutdownAction.RESTART, ShutdownAction.RENAME_RESTART,
                    ShutdownAction.COREDUMP_RESTART, ShutdownAction.SOFT_RESET}
    reboot = "reset" if dc.on_reboot in restart_like else "shutdown"
    shutdown = "pause" if dc.on_poweroff is ShutdownAction.PRESERVE else "poweroff"
    panic = "pause" if dc.on_crash is ShutdownAction.PRESERVE else "shutdown"
    if dc.on_crash in restart_like:
        panic = "none"  # the toolstack sees GUEST_PANICKED and resets
    return ["-action", qemu_opts([("reboot", reboot), ("shutdown", shutdown), ("panic", panic)],
                                 key="on_crash"), *_device({"driver": "pvpanic"}, "on_crash")]


def _strings(value: Value | None) -> list[str]:
    if value is None or isinstance(value, str):
        return [] if value is None else [value]
    return [v for v in value if isinstance(v, str)]


def _extra_keys(dc: DomainConfig) -> tuple[list[str], list[str]]:
    """(``-machine`` option, trailing argv) from the keys without a field of their own."""
    for key, why in _UNSUPPORTED_KEYS.items():
        if key in dc.extra:
            raise _unsupported(key, f"not supported by the QEMU backend ({why})")
    bios = dc.extra.get("bios")
    if isinstance(bios, str) and bios not in ("seabios", "rombios"):
        raise _unsupported("bios", f"{bios!r}: only SeaBIOS is supported")
    machine: list[tuple[str, object]] = [("type", "pc")]
    acpi = dc.extra.get("acpi")
    if isinstance(acpi, str) and acpi.strip() == "0":
        machine.append(("acpi", False))
    tail: list[str] = []
    localtime = dc.extra.get("localtime")
    if isinstance(localtime, str) and localtime.strip() not in ("", "0"):
        tail += ["-rtc", qemu_opts([("base", "localtime")], key="localtime")]
    # The user's own QEMU arguments, on purpose as they are (as libxl passes
    # them); only what no argv can carry is refused.
    kind = "device_model_args_hvm" if dc.type is DomainType.HVM else "device_model_args_pv"
    for key in ("device_model_args", kind):
        tail += [qemu_arg(a, key=key, controls=True) for a in _strings(dc.extra.get(key))]
    return ["-machine", qemu_opts(machine, key="acpi")], tail


def _check_paths(paths: RuntimePaths) -> None:
    for path in (paths.rundir, paths.pidfile, paths.log, paths.qmp, paths.qga, paths.console):
        qemu_arg(path, key="run directory")
    if "%" in str(paths.log):
        raise QemuOptionError("run directory", str(paths.log),
                              "contains '%', which QEMU's -D reads as a format")
    for what, path in (("qmp", paths.qmp), ("qga", paths.qga), ("console", paths.console)):
        if len(os.fsencode(path)) > _SOCKET_MAX:
            raise UsageError(f"{what} socket path {str(path)!r} is longer than {_SOCKET_MAX} "
                             "bytes (a unix socket limit); use a shorter run directory")


def qemu_argv(dc: DomainConfig, paths: RuntimePaths, *, accel: Accel = Accel.TCG,
               image: GuestImageLike | None = None, paused: bool = False,
               incoming: str | None = None, binary: str = "qemu-system-x86_64",
               taps: Mapping[int, str] | None = None) -> list[str]:
    """The QEMU argv that runs ``dc`` (see the module notes for the mapping).

    ``taps`` names the host tap of each vif that needs one (by devid; see
    :attr:`Nic.tap`), made beforehand by ``xenlab.hotplug``.  ``image``
    gives the kernel, initrd and command line when the config names no
    kernel; ``paused`` adds ``-S``; ``incoming`` is passed to ``-incoming``
    (``"defer"``, ``"unix:PATH"``, ``"exec:CMD"``...).  Pure: nothing is read
    or started, and relative paths stay relative.

    :raise XenlabError: the config asks for something this backend cannot do;
        the message starts with the xl key (``disk xvdb: ...``, ``pci: ...``).
    """
    _check_paths(paths)
    machine, tail = _extra_keys(dc)
    argv = [binary, "-no-user-config", "-nodefaults",
            "-name", qemu_opts([("guest", dc.name), ("debug-threads", True)], key="name")]
    if dc.uuid is not None:
        argv += ["-uuid", qemu_arg(dc.uuid, key="uuid")]
    argv += machine
    argv += ["-accel", accel.value, "-cpu", "host" if accel is Accel.KVM else "max"]
    argv += _memory_and_cpus(dc)
    argv += _boot(dc, image)
    argv += _display(dc, paths)
    argv += _serial(dc, paths)
    argv += [
        # QMP on a chardev whose path is a named key: -qmp's "unix:PATH" form
        # has the path as its implied key, which a "=" in the path breaks.
        *_socket("qmp0", paths.qmp), "-mon", "chardev=qmp0,mode=control",
        "-pidfile", str(paths.pidfile),
        # -daemonize points QEMU's stderr at /dev/null unless a log file is
        # set: with -D its later errors (a failed migration load, a
        # device's complaint) land in the run directory, to be quoted.
        "-D", str(paths.log),
        *_socket("qga0", paths.qga),
        *_device({"driver": "virtio-serial-pci", "id": "vser0"}, "qga"),
        *_device({"driver": "virtserialport", "bus": "vser0.0", "chardev": "qga0",
                  "name": GUEST_AGENT_PORT, "id": "qga-port0"}, "qga"),
        *_device({"driver": "virtio-balloon-pci", "id": "balloon0"}, "memory"),
        # SeaBIOS (and SeaVGABIOS) print their debug log to port 0x402: keep it,
        # so a guest that never reaches its kernel can still say why.
        "-chardev", qemu_opts([("backend", "file"), ("id", "fwlog"),
                               ("path", paths.firmware_log)], key="run directory"),
        *_device({"driver": "isa-debugcon", "iobase": 0x402, "chardev": "fwlog"}, "firmware"),
    ]
    argv += _actions(dc)
    argv += _disks(dc.disks)
    argv += _vifs(dc, taps or {})
    argv += _usb(dc)
    argv += _pci(dc)
    if paused:
        argv.append("-S")
    if incoming is not None:
        argv += ["-incoming", qemu_arg(incoming, key="incoming")]
    argv += tail
    return argv

