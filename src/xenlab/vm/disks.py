"""A domain's disks, and adding or removing them while it runs: :func:`block_attach`,
:func:`block_detach`, :func:`block_list`.

xl's verbs of the same names, over QMP.  Attaching opens the image as one
``blockdev-add`` (a format node with its protocol node inline, the options
``vm.backends.qemu.qemu.blockdev_nodes`` gives a disk at start) and plugs a
``virtio-blk-pci`` device at the disk's fixed PCI slot (``vm.backends.qemu.qemu.disk_slot``:
xvda-xvdh at 0x08-0x0f), so a restart, a restore or a migration puts it
where the guest saw it.  Detaching asks the guest to let the device go
(``device_del``), waits for QEMU's ``DEVICE_DELETED``, then deletes the
nodes so QEMU closes the file (its image lock goes with it).

Once QEMU reports the device deleted the record drops the disk first, and
the node clean-up after it is best effort: nodes QEMU keeps are listed in
``extra["stale_nodes"]`` and deleted by the next attach of that vdev.  A
detach that timed out keeps the disk in the record; run again after the
guest let go, it finds the device gone and only cleans up.

Only virtio disks (xvdX) can come and go: an IDE disk cannot be hot-plugged
on QEMU's PIIX bus (nor on Xen's emulated one), and a cdrom keeps its drive
while its medium changes.  A disk that a snapshot records cannot be
detached: reverting that snapshot would need it.

The disk list lives in the record as network-attach keeps vifs: the config
text gets a ``disk =`` line (later settings win), and ``extra["disk_specs"]``
the list for a later ``create`` of a kept domain.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from xenlab import faults
from xenlab.config.specs.disk import DiskFormat, DiskSpec, format_disk, parse_disk
from xenlab.errors import (
    BackendError,
    ConflictError,
    DeviceNotReleased,
    NotFoundError,
    StateError,
    UsageError,
    XenlabError,
)
from xenlab.vm.domain import SHUTOFF, Toolstack
from xenlab.vm.domconfig import config_from_text, create_image, disk_line, on_disks_now
from xenlab.vm.imagecheck import allowed_backing_dirs, check_disk_image
from xenlab.vm.jobs import Job
from xenlab.vm.qemuimg import remove_own
from xenlab.vm.runtime import DISK_NODES, DISK_PATHS, DISK_SPECS, STALE_NODES
from xenlab.vm.store import DomainRecord

__all__ = ["DiskInfo", "block_attach", "block_detach", "block_list", "cd_eject", "cd_insert"]

log = logging.getLogger(__name__)

#: ``extra`` key: by vdev, the nodes of a detached disk that QEMU has not
#: released yet (a failed clean-up); the next block-attach of that vdev
#: deletes them first.  Names of the running QEMU's nodes only.


@dataclass(frozen=True, slots=True)
class DiskInfo:
    """One disk of a domain as ``block-list`` shows it."""

    vdev: str
    device: str  # virtio-blk, ide-hd, ide-cd, scsi-hd
    target: str | None  # the config's file
    file: str | None  # the file the guest writes now (after mirrors and overlays)
    format: str
    mode: str  # "rw" or "ro"
    slot: int | None  # fixed PCI slot (virtio disks xvda-xvdh)
    spec: str

    def to_json(self) -> dict[str, Any]:
        """A JSON object with the field names."""
        return {"vdev": self.vdev, "device": self.device, "target": self.target,
                "file": self.file, "format": self.format, "mode": self.mode,
                "slot": self.slot, "spec": self.spec}


def _device_kind(d: DiskSpec) -> str:
    if d.is_cdrom:
        return "ide-cd"
    if d.vdev.startswith("xvd"):
        return "virtio-blk"
    if d.vdev.startswith("sd"):
        return "scsi-hd"
    return "ide-hd"


def block_list(ts: Toolstack, name: str) -> list[DiskInfo]:
    """The disks of domain ``name`` (running or not), in config order.

    CLI: ``xenlab vm block-list DOM [--json]``.
    """
    rec = ts.get(name)
    dc, _ = config_from_text(rec.config_text, rec.config_path)
    now = {d.vdev: d for d in on_disks_now(dc, rec).disks}
    return [
        DiskInfo(vdev=d.vdev, device=_device_kind(d), target=d.pdev_path,
                 file=now[d.vdev].pdev_path, format=now[d.vdev].format.value,
                 mode="rw" if d.readwrite else "ro", slot=ts.backend.disk_slot(d.vdev),
                 spec=format_disk(d))
        for d in dc.disks
    ]


def _keep(ts: Toolstack, rec: DomainRecord, disks: list[DiskSpec],
          extra_changes: dict[str, Any] | None = None) -> DomainRecord:
    """Record the domain's new disk list (config text and extra)."""
    texts = [format_disk(d) for d in disks]
    text = rec.config_text.rstrip("\n") + "\n" + disk_line(texts) + "\n"
    changes = extra_changes or {}
    return ts.store.patch(
        rec.domid, expect_uuid=rec.uuid, config_text=text,
        extra_set={DISK_SPECS: texts, **{k: v for k, v in changes.items() if v is not None}},
        extra_drop=[k for k, v in changes.items() if v is None])


async def block_attach(ts: Toolstack, name: str, spec: str, *,
                 create_size: str | None = None) -> DiskInfo:
    """Plug the disk xl disk ``spec`` describes into running domain ``name``.

    CLI: ``xenlab vm block-attach DOM 'format=qcow2,vdev=xvdb,access=rw,
    target=/srv/data.qcow2' [--create-disks SIZE]``.  The target must exist
    (or is made with ``create_size``, then removed again if the attach fails).

    :raise ConfigError: a bad spec.
    :raise XenlabError: the vdev is taken, the disk kind cannot be
        hot-plugged, or the target is missing.
    :raise BackendError: QEMU refused (the image is not opened, nothing kept).
    """
    disk = parse_disk(spec, source="block-attach")
    where = f"block-attach {name}: disk {disk.vdev}"
    if disk.is_cdrom or not disk.vdev.startswith("xvd"):
        raise UsageError(f"{where}: only virtio disks (xvdX) can be hot-plugged; IDE and "
                         "SCSI disks and cdroms are fixed at start")
    if ts.backend.disk_slot(disk.vdev) is None:
        raise UsageError(f"{where}: hot-plugged disks are xvda-xvdh (they keep a fixed "
                         "PCI slot)")
    if not disk.pdev_path:
        raise UsageError(f"{where}: no target")
    # QEMU runs in / (daemonized): a relative target means the caller's directory.
    target = os.path.abspath(disk.pdev_path)
    disk = replace(disk, pdev_path=target)
    ts.backend.check_disk(disk)  # the checks a start makes (format, script=, backend=...)
    async with ts.live(name) as rec:
        where = f"block-attach {rec.name}: disk {disk.vdev}"
        dc, _ = config_from_text(rec.config_text, rec.config_path)
        if any(d.vdev == disk.vdev for d in dc.disks):
            raise ConflictError("disk", disk.vdev,
                                f"{where}: the domain has a disk {disk.vdev} already")
        create = not Path(target).exists()
        if create and (create_size is None or target.startswith("/dev/")):
            raise UsageError(f"{where}: {target} does not exist (create it with "
                             "qemu-img, or pass --create-disks SIZE)")
        stale = list((rec.extra.get(STALE_NODES) or {}).get(disk.vdev) or [])
        nodes = list(ts.backend.disk_parts(disk))
        h = ts.handle(rec)

        async def go() -> None:
            try:
                await ts.backend.attach_disk(h, disk, stale)
            except BackendError as err:
                err.within(where)
                raise

        # The job says what is about to be plugged and made: a killed attach
        # is finished (QEMU has the device) or undone by the next command.
        with ts.job(rec, "block-attach", spec=format_disk(disk), nodes=nodes,
                    created=target if create else None) as rec:
            faults.point("block-attach.job")
            if create:
                assert create_size is not None
                await create_image(target, disk.format.value, create_size)
            try:
                check_disk_image(target, disk.format, allowed_backing_dirs(target))
                await go()
            except BaseException:
                if create:
                    remove_own(target)
                raise
            rec = _attached(ts, rec, disk)
    return next(i for i in block_list(ts, rec.name) if i.vdev == disk.vdev)


def _attached(ts: Toolstack, rec: DomainRecord, disk: DiskSpec) -> DomainRecord:
    """Record ``disk`` as attached (QEMU has its device now)."""
    dc, _ = config_from_text(rec.config_text, rec.config_path)
    pending = dict(rec.extra.get(STALE_NODES) or {})
    pending.pop(disk.vdev, None)
    return _keep(ts, rec, [*(d for d in dc.disks if d.vdev != disk.vdev), disk],
                 {STALE_NODES: pending or None})


async def recover_job(ts: Toolstack, rec: DomainRecord, job: Job) -> DomainRecord | None:
    """Finish or undo a block-attach that was killed (``Toolstack.converge`` calls this).

    QEMU has the device: the disk is recorded (finished).  It has not: the
    nodes the attach may have added are deleted and a target it made is
    removed (undone).  A domain whose QEMU is gone has nothing to finish.
    """
    if job.verb == "block-detach":
        return await _recover_detach(ts, rec, str(job.detail.get("vdev", "")))
    if job.verb != "block-attach":
        return rec
    disk = parse_disk(str(job.detail.get("spec", "")), source="interrupted block-attach")
    where = f"block-attach {rec.name}: disk {disk.vdev}"
    created = job.detail.get("created")
    if rec.state == SHUTOFF or not ts.alive(rec):
        if isinstance(created, str):
            remove_own(created)
        return rec
    h = ts.handle(rec)

    async def look() -> bool:
        if await ts.backend.has_disk(h, disk.vdev):
            return True
        await ts.backend.discard_disk(h, [str(n) for n in job.detail.get("nodes") or []])
        return False

    if await look():
        rec = _attached(ts, rec, disk)
        log.warning("%s: an attach killed before it was recorded is finished: the guest has "
                    "the disk, and the record now lists it", where)
    else:
        if isinstance(created, str):
            remove_own(created)
        log.warning("%s: an attach killed before QEMU had the device is undone", where)
    return rec


async def block_detach(ts: Toolstack, name: str, vdev: str, *, timeout: float = 30.0) -> DiskInfo:
    """Unplug disk ``vdev`` from running domain ``name``; what it was.

    CLI: ``xenlab vm block-detach DOM VDEV``.  The image file stays.  Once
    QEMU has deleted the device the record drops the disk; nodes QEMU then
    fails to delete are logged and kept for the next attach of ``vdev``.
    A device an earlier, timed-out detach left going is only cleaned up.

    :raise XenlabError: there is no such disk, or it cannot be unplugged.
    :raise StateError: a snapshot records the disk (delete those first).
    :raise BackendError: the guest did not release it within ``timeout``
        seconds (the disk stays in the record), or QEMU refused.
    """
    async with ts.live(name) as rec:
        info = {i.vdev: i for i in block_list(ts, rec.name)}
        where = f"block-detach {rec.name}: disk {vdev}"
        if vdev not in info:
            raise NotFoundError("disk", vdev, f"{where}: no such disk (the domain has "
                              f"{', '.join(info) or 'none'})")
        if info[vdev].device != "virtio-blk":
            raise UsageError(f"{where}: only virtio disks (xvdX) can be unplugged; it is "
                             f"{info[vdev].device}")
        used = [s.name for s in ts.store.list_snapshots(rec.domid)
                if any(e.get("vdev") == vdev for e in s.disks)]
        if used:
            raise StateError(f"{where}: snapshots {', '.join(used)} record it; delete them "
                             "first (reverting one would need the disk)")

        h = ts.handle(rec)

        async def unplug() -> list[str]:
            """The device gone (maybe by an earlier, timed-out detach); its parts."""
            try:
                return list(await ts.backend.detach_disk(h, vdev, timeout))
            except DeviceNotReleased as err:
                raise BackendError(
                    f"{where}: the guest did not release it within {timeout:g} s "
                    "(no PCI hotplug in the guest?); it stays in the record, and "
                    "block-detach again finishes once the guest lets it go"
                ) from err
            except BackendError as err:
                err.within(where)
                raise

        with ts.job(rec, "block-detach", vdev=vdev) as rec:
            names = await unplug()
            faults.point("block-detach.unplugged")
            rec = _detached(ts, rec, vdev, names)
        try:
            kept = await ts.backend.release_parts(h, names)
        except XenlabError as err:  # no QMP session: QEMU keeps them all, as far as we know
            kept = dict.fromkeys(names, str(err))
        pending = dict(rec.extra.get(STALE_NODES) or {})
        if kept:
            pending[vdev] = [n for n in names if n in kept]
            log.warning("%s: detached, but QEMU keeps its nodes (%s); the next block-attach of "
                        "%s deletes them", where,
                        "; ".join(f"{n}: {why}" for n, why in kept.items()), vdev)
        else:
            pending.pop(vdev, None)
        ts.store.patch(rec.domid, extra_set={STALE_NODES: pending} if pending else {},
                       extra_drop=[] if pending else [STALE_NODES])
    return info[vdev]


async def _recover_detach(ts: Toolstack, rec: DomainRecord, vdev: str) -> DomainRecord:
    """A killed block-detach: finished when the guest let the disk go (QEMU has no device)."""
    if rec.state == SHUTOFF or not ts.alive(rec):
        return rec
    if vdev not in {d.vdev for d in block_list(ts, rec.name)}:
        return rec
    h = ts.handle(rec)
    if await ts.backend.has_disk(h, vdev):
        return rec  # the guest still has it: the record is true as it is
    # The device is gone, so this detach only names what it left for clean-up.
    rec = _detached(ts, rec, vdev, list(await ts.backend.detach_disk(h, vdev, 0.0)))
    log.warning("block-detach %s: a detach killed after the guest let %s go is finished; "
                "the next block-attach of %s releases what QEMU keeps of it", rec.name, vdev,
                vdev)
    return rec


def _detached(ts: Toolstack, rec: DomainRecord, vdev: str, names: list[str]) -> DomainRecord:
    """Record disk ``vdev`` gone (QEMU has no device now); its nodes pending clean-up.

    The record says so before any clean-up can fail.
    """
    dc, _ = config_from_text(rec.config_text, rec.config_path)
    moved = dict(rec.extra.get(DISK_PATHS) or {})
    moved.pop(vdev, None)
    nodes = dict(rec.extra.get(DISK_NODES) or {})
    nodes.pop(vdev, None)
    pending = dict(rec.extra.get(STALE_NODES) or {})
    pending[vdev] = names
    return _keep(ts, rec, [d for d in dc.disks if d.vdev != vdev],
                 {DISK_PATHS: moved or None, DISK_NODES: nodes or None,
                  STALE_NODES: pending})


def _cdrom(ts: Toolstack, rec: DomainRecord, vdev: str, verb: str) -> tuple[list[DiskSpec], int]:
    dc, _ = config_from_text(rec.config_text, rec.config_path)
    for i, d in enumerate(dc.disks):
        if d.vdev == vdev:
            if not d.is_cdrom:
                raise UsageError(f"{verb} {rec.name}: {vdev} is not a cdrom")
            return list(dc.disks), i
    cdroms = ", ".join(d.vdev for d in dc.disks if d.is_cdrom) or "none"
    raise NotFoundError("disk", vdev,
                        f"{verb} {rec.name}: no cdrom {vdev} (the domain's cdroms: {cdroms})")


async def _set_medium(ts: Toolstack, name: str, vdev: str, verb: str, path: str | None,
                fmt: DiskFormat) -> DiskInfo:
    """Put ``path`` (format ``fmt``; None: eject) in running domain ``name``'s cdrom drive
    ``vdev``, then record the drive's new medium."""
    async with ts.live(name) as rec:
        disks, i = _cdrom(ts, rec, vdev, verb)
        try:
            await ts.backend.change_medium(ts.handle(rec), vdev, path, fmt)
        except BackendError as err:
            err.within(f"{verb} {rec.name} {vdev}")
            raise
        disks[i] = replace(disks[i], pdev_path=path, format=fmt)
        rec = _keep(ts, rec, disks)
    return next(d for d in block_list(ts, rec.name) if d.vdev == vdev)


async def cd_insert(ts: Toolstack, name: str, vdev: str, target: str, *,
              fmt: str = "raw") -> DiskInfo:
    """Put the image ``target`` in running domain ``name``'s cdrom drive ``vdev``.

    CLI: ``xenlab vm cd-insert DOM VDEV TARGET``, as ``xl cd-insert``.  A
    medium already in the drive is replaced (the tray opens, as on real
    hardware, and the guest sees a media change).

    :raise XenlabError: no such cdrom, or the target is missing.
    :raise BackendError: QEMU refused (the drive keeps what it had).
    """
    if not Path(target).is_file() and not target.startswith("/dev/"):
        raise UsageError(f"cd-insert {ts.live_record(name).name}: {target} does not exist")
    try:
        disk_format = DiskFormat(fmt)
    except ValueError:
        raise UsageError(f"cd-insert {name}: format {fmt!r} (expected raw or qcow2)"
                         ) from None
    path = str(Path(target).resolve())
    # Every file QEMU would open through the medium is checked first, as at create.
    check_disk_image(path, disk_format, allowed_backing_dirs(path))
    return await _set_medium(ts, name, vdev, "cd-insert", path, disk_format)


async def cd_eject(ts: Toolstack, name: str, vdev: str) -> DiskInfo:
    """Take the medium out of running domain ``name``'s cdrom drive ``vdev``.

    CLI: ``xenlab vm cd-eject DOM VDEV``, as ``xl cd-eject`` (forced: a guest
    that locked the tray does not keep the medium).
    """
    return await _set_medium(ts, name, vdev, "cd-eject", None, DiskFormat.EMPTY)
