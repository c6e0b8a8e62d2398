"""A domain's config as the toolstack keeps it: parsed with overrides, checked, redirected.

Pure functions over config text and records (nothing is started; reads are
limited to what :func:`check_images` and :func:`create_image` name): the
domain-name rule (:func:`check_domain_name`), parsing with xl's
``key=value`` overrides (:func:`config_from_text`), relative paths made
absolute against the config's directory (:func:`absolute_paths`), and the
places a record redirects a config since it was written: disks that a
mirror moved or an external snapshot put an overlay on, and the disk and
vif lists that hot-plug verbs changed (``on_*``).  Later settings win in an
xl config, so a change is appended to the text as a setting.  The vifs as a
backend runs them (:func:`plan_nics`) and their host ends (:func:`host_vif`)
follow xl's numbering and Xen's names.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Final

from xenlab import hotplug
from xenlab.config import parse
from xenlab.config.model import DomainConfig, domain_config
from xenlab.config.specs.disk import DiskFormat, DiskSpec, format_disk
from xenlab.config.specs.vif import VifSpec
from xenlab.errors import NotRunnable, UsageError
from xenlab.vm import qemuimg
from xenlab.vm.backend import Backend, NicPlan
from xenlab.vm.imagecheck import allowed_backing_dirs, check_disk_image
from xenlab.vm.runtime import DISK_SPECS, VIF_SPECS, VIFS, Runtime, disk_now
from xenlab.vm.store import DomainRecord

__all__ = [
    "DISK_SPECS",
    "NAME_MAX",
    "VIFS",
    "VIF_SPECS",
    "absolute_paths",
    "check_domain_name",
    "check_images",
    "config_from_text",
    "create_image",
    "disk_line",
    "on_disk_specs",
    "on_disks",
    "on_disks_now",
    "on_vif_specs",
    "vif_line",
]

# The longest domain name (libvirt's limit is the file system's; xl's is
# xenstore's): long enough for any real name, short enough for file names.
NAME_MAX: Final = 64
# Names that would be ids, paths, hidden files, option syntax or terminal tricks.
_NAME_OK = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+@:,=-]*")


def check_domain_name(name: str) -> str:
    """``name`` when every verb can handle it as a domain name; else XenlabError saying why.

    Refused: empty, longer than :data:`NAME_MAX`, all digits (xl reads that as
    a domain id), ``.``/``..``-like or starting with ``.`` or ``-`` (a hidden
    file, an option), and any character outside letters, digits and
    ``_ . + @ : , = -`` (slashes, white space, quotes, control characters).
    A comma is allowed: QEMU sees it doubled (``web,,prod``) and the store
    reads it back.
    """
    why = None
    if not name:
        why = "it is empty"
    elif len(name) > NAME_MAX:
        why = f"it is longer than {NAME_MAX} characters"
    elif name.isdigit():
        why = "it is all digits, which xl reads as a domain id"
    elif not _NAME_OK.fullmatch(name):
        why = ("use letters, digits and _ . + @ : , = - only (no slash, space, quote or "
               "control character), starting with a letter, digit or _")
    if why is not None:
        raise UsageError(f"domain name {name!r} is not usable: {why}")
    return name


def config_from_text(text: str, source: str, overrides: Sequence[str] = ()
                     ) -> tuple[DomainConfig, str]:
    """Parse xl config ``text`` with ``key=value`` ``overrides`` appended, as xl does.

    Returns the config and the text it was parsed from (the record keeps it).
    """
    if overrides:
        text = text.rstrip("\n") + "\n" + "\n".join(overrides) + "\n"
    return domain_config(parse(text, source=source)), text


def absolute_paths(dc: DomainConfig, text: str, base: Path, source: str
                   ) -> tuple[DomainConfig, str]:
    """``dc`` and its text with relative disk, kernel and ramdisk paths made absolute.

    Relative paths are taken against ``base`` (the config file's directory)
    and the absolute ones appended to the text as settings (later settings
    win), so the stored text means the same files from any directory.
    """
    fixes: list[str] = []
    from xenlab.config.writer import quote

    def absolute(p: str) -> str:
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))

    def local(d: DiskSpec) -> bool:
        # A target a script interprets (iscsi:, drbd:...) is not a file here.
        return bool(d.pdev_path) and d.script is None

    if any(local(d) and not os.path.isabs(str(d.pdev_path)) for d in dc.disks):
        specs = [format_disk(replace(d, pdev_path=absolute(str(d.pdev_path)))
                             if local(d) else d) for d in dc.disks]
        fixes.append(disk_line(specs))
    for key in ("kernel", "ramdisk"):
        value = getattr(dc, key, None)
        if isinstance(value, str) and value and not os.path.isabs(value):
            fixes.append(f"{key} = {quote(absolute(value))}")
    if not fixes:
        return dc, text
    return config_from_text(text, source, fixes)


def check_images(dc: DomainConfig) -> None:
    """Refuse a disk whose image would make QEMU open a file outside its allowed directories.

    See ``vm.imagecheck``: backing and data files must lie in the disk's own
    directory tree or in ``$XENLAB_BACKING_DIRS``.

    :raise UnsafeImageError: naming the disk, the file and why.
    """
    for disk in dc.disks:
        if disk.pdev_path and disk.format is not DiskFormat.EMPTY and disk.script is None \
                and Path(disk.pdev_path).exists():
            check_disk_image(disk.pdev_path, disk.format, allowed_backing_dirs(disk.pdev_path))


async def create_image(path: str, fmt: str, size: str) -> None:
    """Make a blank disk image ``path`` of ``size`` (qemu-img syntax) in format ``fmt``.

    :raise XenlabError: qemu-img refused, with its message.
    """
    await qemuimg.create(path, fmt, size)


def on_disks(dc: DomainConfig, moves: dict[str, tuple[str, DiskFormat]]) -> DomainConfig:
    """``dc`` with each disk named in ``moves`` (vdev: (file, format)) on that file."""
    if not moves:
        return dc
    return replace(dc, disks=tuple(
        replace(d, pdev_path=moves[d.vdev][0], format=moves[d.vdev][1]) if d.vdev in moves
        else d
        for d in dc.disks
    ))


def on_disks_now(dc: DomainConfig, rec: DomainRecord) -> DomainConfig:
    """``dc`` with each disk on the file it runs on now (:func:`vm.runtime.disk_now`).

    After a mirror pivot or an external snapshot the guest's writes go to
    another file; starting the domain on the config's file would silently go
    back in time.
    """
    rt = Runtime.of(rec)
    moves: dict[str, tuple[str, DiskFormat]] = {}
    for d in dc.disks:
        if d.vdev in rt.moved or d.vdev in rt.overlays:
            now = disk_now(rt, d.vdev, d.pdev_path or "", d.format.value)
            try:
                fmt = DiskFormat(now.format)
            except ValueError:
                fmt = DiskFormat.UNKNOWN  # refused where it is run (QEMU backend's drivers)
            moves[d.vdev] = (now.file, fmt)
    return on_disks(dc, moves)


def on_vif_specs(dc: DomainConfig, text: str, rec: DomainRecord) -> tuple[DomainConfig, str]:
    """``dc`` (and its text) with the vif list network-attach/-detach left in ``rec``.

    A NIC attached at run time stays across a restart, as with xl; the list
    is appended to the text as a ``vif =`` line (later settings win).
    """
    specs = rec.extra.get(VIF_SPECS)
    if not isinstance(specs, list):
        return dc, text
    return config_from_text(text, rec.config_path, [vif_line([str(s) for s in specs])])


def on_disk_specs(dc: DomainConfig, text: str, rec: DomainRecord) -> tuple[DomainConfig, str]:
    """``dc`` (and its text) with the disk list block-attach/-detach left in ``rec``."""
    specs = rec.extra.get(DISK_SPECS)
    if not isinstance(specs, list):
        return dc, text
    return config_from_text(text, rec.config_path, [disk_line([str(s) for s in specs])])


def disk_line(specs: Sequence[str]) -> str:
    """An xl ``disk = [ ... ]`` setting listing ``specs``."""
    from xenlab.config.writer import quote

    return "disk = [ " + ", ".join(quote(s) for s in specs) + " ]"


def vif_line(specs: Sequence[str]) -> str:
    """An xl ``vif = [ ... ]`` setting listing ``specs``."""
    from xenlab.config.writer import quote

    return "vif = [ " + ", ".join(quote(s) for s in specs) + " ]"


_XEN_OUI: Final = (0x00, 0x16, 0x3E)


def stable_mac(dc: DomainConfig, devid: int) -> str:
    """A MAC under Xen's OUI for vif ``devid`` that stays the same across restarts."""
    seed = f"{dc.uuid or dc.name}/{devid}".encode()
    tail = hashlib.sha256(seed).digest()[:3]
    octets = (*_XEN_OUI, tail[0] & 0x7F, tail[1], tail[2])
    return ":".join(f"{o:02x}" for o in octets)


def vif_devids(dc: DomainConfig) -> list[tuple[int, VifSpec]]:
    """``dc``'s vifs with xl's devids (the list index unless ``devid=``).

    :raise NotRunnable: a devid is given twice.
    """
    out: list[tuple[int, VifSpec]] = []
    for index, vif in enumerate(dc.vifs):
        devid = vif.devid if vif.devid is not None else index
        if any(d == devid for d, _ in out):
            raise NotRunnable(f"vif {devid}", "devid given twice")
        out.append((devid, vif))
    return out


def plan_nics(backend: Backend, dc: DomainConfig) -> tuple[NicPlan, ...]:
    """Every vif of ``dc`` as ``backend`` runs it (:func:`vif_devids`).

    :raise XenlabError: a devid is given twice, or the backend refuses a vif.
    """
    return tuple(backend.plan_nic(dc, vif, devid) for devid, vif in vif_devids(dc))


def host_vif(domid: int, name: str, devid: int, mac: str, spec: VifSpec) -> hotplug.Vif:
    """The hotplug description of vif ``devid``'s host end in domain ``domid`` (``name``).

    The tap is named ``vifname=`` when the config gives one, else like Xen's
    backend, ``vif<domid>.<devid>``; a vif with a bridge and no script gets
    Xen's default script, vif-bridge.
    """
    return hotplug.Vif(
        domid=domid, devid=devid,
        vifname=spec.ifname or hotplug.default_vifname(domid, devid),
        script=spec.script or hotplug.DEFAULT_VIF_SCRIPT, bridge=spec.bridge,
        mac=mac, mtu=spec.mtu, ip=spec.ip, gatewaydev=spec.gatewaydev, domname=name,
    )
