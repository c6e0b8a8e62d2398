"""Disks and cdrom media of a running QEMU, over QMP: what ``QemuBackend``'s device calls do.

A disk is one ``blockdev-add`` (a format node with its protocol node inline,
as ``vm.qemu.blockdev_nodes`` gives it at start) and a ``virtio-blk-pci`` at
its fixed slot; its *parts* are those node names.  Unplugging asks the guest
(``device_del``) and waits for ``DEVICE_DELETED``; the nodes are released
afterwards, and what QEMU keeps is reported (never raised), so the verbs can
record the disk gone first.  QMP refusals become :class:`~xenlab.errors.Refused`
with QEMU's words.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from xenlab import faults
from xenlab.config.specs.disk import DiskFormat, DiskSpec
from xenlab.errors import BackendError, Refused
from xenlab.vm.backends.qemu.qemu import blockdev_nodes, disk_device
from xenlab.vm.backends.qemu.qmp import CommandError, Qmp, delete_device, qdev_ids
from xenlab.vm.qemuimg import driver
from xenlab.vm.runtime import DISK_NODES

__all__ = ["attach_disk", "change_medium", "detach_disk", "disk_parts", "node_names",
           "pivot_node", "release_nodes"]

log = logging.getLogger(__name__)


def disk_parts(disk: DiskSpec) -> tuple[str, ...]:
    """The block nodes an attach of ``disk`` adds (format node first)."""
    proto, fmt = blockdev_nodes(disk, disk.vdev)
    return str(fmt["node-name"]), str(proto["node-name"])


async def node_names(qmp: Qmp) -> frozenset[str]:
    """Every block node QEMU has."""
    listed = await qmp.execute("query-named-block-nodes", {"flat": True})
    return frozenset(str(n["node-name"]) for n in listed if isinstance(n, dict)
                     ) if isinstance(listed, list) else frozenset()


async def release_nodes(qmp: Qmp, names: Sequence[str]) -> dict[str, str]:
    """Delete what is left of removed disks' nodes (QEMU then closes their files).

    Parents come first in ``names``; a name QEMU does not know is fine (gone
    with its parent, or never there).  What QEMU still has after: ``{node: why}``.
    """
    why: dict[str, str] = {}
    for node in names:
        try:
            await qmp.execute("blockdev-del", {"node-name": node})
        except CommandError as err:
            why[node] = err.desc
    left = await node_names(qmp)
    return {n: why.get(n, "still there") for n in names if n in left}


async def _finish_removal(qmp: Qmp, vdev: str, names: Sequence[str]) -> None:
    """Before ``vdev`` is attached: delete the nodes an earlier detach of it left."""
    if vdev in await qdev_ids(qmp):
        raise BackendError(f"QEMU still has a device {vdev} that the record does not list "
                           "(an interrupted attach?); it must go first")
    present = await node_names(qmp)
    old = [n for n in dict.fromkeys(names) if n in present]
    if not old:
        return
    kept = await release_nodes(qmp, old)
    if kept:
        raise BackendError(f"QEMU keeps nodes of an earlier {vdev}: "
                           + "; ".join(f"{n}: {why}" for n, why in kept.items()))
    log.info("disk %s: released the nodes an earlier detach left: %s", vdev, ", ".join(old))


async def attach_disk(qmp: Qmp, disk: DiskSpec, leftovers: Sequence[str]) -> None:
    """Open ``disk``'s image and plug its device; nothing is kept when either step fails."""
    proto, fmt = blockdev_nodes(disk, disk.vdev)
    fmt["file"] = dict(proto)
    await _finish_removal(qmp, disk.vdev, [*leftovers, *disk_parts(disk)])
    try:
        await qmp.execute("blockdev-add", fmt)
    except CommandError as err:
        raise Refused("blockdev-add", err.desc,
                      f"QEMU cannot open {disk.pdev_path}: {err}") from err
    faults.point("block-attach.node-added")
    try:
        await qmp.execute("device_add", disk_device(disk))
        faults.point("block-attach.device-added")
    except BaseException as err:
        await qmp.execute("blockdev-del", {"node-name": fmt["node-name"]})
        if isinstance(err, CommandError):
            raise Refused("device_add", err.desc,
                          f"QEMU refused the device: {err}") from err
        raise


async def detach_disk(qmp: Qmp, vdev: str, pivoted: str | None, timeout: float
                      ) -> tuple[str, ...]:
    """The device ``vdev`` gone from QEMU (maybe by an earlier, timed-out detach); its nodes.

    ``pivoted`` is the node a mirror left the disk on.  :raise DeviceNotReleased:
    the guest kept it ``timeout`` seconds.
    """
    root: str | None = None
    blocks = await qmp.execute("query-block")
    qdevs = (vdev, f"/machine/peripheral/{vdev}/virtio-backend")
    for b in blocks if isinstance(blocks, list) else []:
        if isinstance(b, dict) and b.get("qdev") in qdevs:
            root = (b.get("inserted") or {}).get("node-name")
    try:
        await delete_device(qmp, vdev, timeout)
    except CommandError as err:
        raise Refused("device_del", err.desc, f"QEMU refused: {err}") from err
    tops = (root, pivoted, f"{vdev}-fmt")
    return tuple(dict.fromkeys(x for t in tops if t for x in (t, f"{t}-file")))


async def change_medium(qmp: Qmp, vdev: str, path: str | None, fmt: DiskFormat) -> None:
    """Put ``path`` (format ``fmt``) in cdrom drive ``vdev``, or eject it (None, forced)."""
    command, args = ("eject", {"id": vdev, "force": True}) if path is None else (
        "blockdev-change-medium", {"id": vdev, "filename": path, "format": driver(fmt),
                                   "read-only-mode": "read-only"})
    try:
        await qmp.execute(command, args)
    except CommandError as err:
        raise Refused(command, err.desc, str(err)) from err


def pivot_node(ref: Mapping[str, object], vdev: str) -> str | None:
    """The node a mirror pivot left disk ``vdev`` on, as the handle carries it (None: the
    node a start gives it, ``<vdev>-fmt``)."""
    nodes = ref.get(DISK_NODES)
    node = nodes.get(vdev) if isinstance(nodes, dict) else None
    return node if isinstance(node, str) else None
