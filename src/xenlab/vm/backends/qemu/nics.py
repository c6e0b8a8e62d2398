"""NICs of a running QEMU: host ends through ``xenlab.hotplug``, devices over QMP.

An attach brings the host end online first (a tap on the bridge, or a user's
script), tells the verb about it before anything else can fail (``note``: a
killed attach must find the tap), then ``netdev_add`` opens the tap by name
and ``device_add`` plugs the NIC into the guest's PCI bus.  A detach asks
the guest to let the NIC go and waits for ``DEVICE_DELETED``; the netdev and
the tap go afterwards, best effort, and what failed is reported, never
raised.  Host ends are :func:`xenlab.hotplug.vif_to_json` objects, which the
verbs keep in the record.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from xenlab import faults, hotplug
from xenlab.errors import BackendError
from xenlab.vm.backends.qemu.qemu import Nic, nic_device_id, nic_netdev_id
from xenlab.vm.backends.qemu.qmp import CommandError, Qmp, delete_device, qdev_ids
from xenlab.vm.domconfig import host_vif

__all__ = ["attach_nic", "detach_nic", "discard_nic", "release_nic"]

log = logging.getLogger(__name__)

Note = Callable[[Mapping[str, Any]], None]


async def _finish_removals(qmp_path: Path, new: Nic, leftovers: Sequence[Mapping[str, Any]]
                           ) -> list[Mapping[str, Any]]:
    """What earlier detaches left: a netdev of this devid, host ends of gone NICs."""
    async with Qmp.open(qmp_path) as qmp:
        if new.device_id in await qdev_ids(qmp):
            raise BackendError(
                f"QEMU still has a device {new.device_id} that the record does not list "
                "(an interrupted attach?); it must go first")
        # The record lists no vif of this devid: a netdev of its id is a leftover.
        with contextlib.suppress(CommandError):
            await qmp.execute("netdev_del", {"id": new.netdev_id})
    cleared = []
    for obj in leftovers:
        try:
            await hotplug.offline(hotplug.vif_from_json(obj))
            cleared.append(obj)
        except hotplug.HotplugError as err:
            log.warning("an earlier host end: %s", err)
    return cleared


async def attach_nic(qmp_path: Path, domid: int, name: str, new: Nic,
                     leftovers: Sequence[Mapping[str, Any]], note: Note
                     ) -> tuple[dict[str, Any] | None, tuple[Mapping[str, Any], ...]]:
    """Plug ``new``; (its host end's JSON or None in user mode, the leftovers cleared)."""
    cleared = await _finish_removals(qmp_path, new, leftovers)
    vif = None
    if new.tap:
        vif = await hotplug.online(host_vif(domid, name, new.devid, new.mac, new.spec),
                                   rename_if_taken=not new.spec.ifname)
        # The tap is up: a kill from here on must find it.
        note({"vif": hotplug.vif_to_json(vif)})
    faults.point("network-attach.host-end")
    added_netdev = False
    try:
        async with Qmp.open(qmp_path) as qmp:
            await qmp.execute("netdev_add", new.netdev(vif.vifname if vif else None))
            added_netdev = True
            faults.point("network-attach.netdev-added")
            await qmp.execute("device_add", new.device())
            faults.point("network-attach.device-added")
    except BaseException:
        if added_netdev:
            async with Qmp.open(qmp_path) as qmp:
                await qmp.execute("netdev_del", {"id": new.netdev_id})
        if vif is not None:
            await hotplug.offline(vif)
        raise
    return (hotplug.vif_to_json(vif) if vif is not None else None), tuple(cleared)


async def detach_nic(qmp: Qmp, devid: int, timeout: float) -> None:
    """The device of vif ``devid`` gone (maybe by an earlier, timed-out detach).

    :raise DeviceNotReleased: the guest kept it ``timeout`` seconds.
    :raise CommandError: QEMU refused.
    """
    await delete_device(qmp, nic_device_id(devid), timeout)


async def release_nic(qmp_path: Path, devid: int, host_ends: Sequence[Mapping[str, Any]]
                      ) -> tuple[tuple[Mapping[str, Any], ...], tuple[str, ...]]:
    """Remove vif ``devid``'s netdev and take its host ends offline; (offlined, problems)."""
    problems: list[str] = []
    offlined: list[Mapping[str, Any]] = []
    try:
        async with Qmp.open(qmp_path) as qmp:
            await qmp.execute("netdev_del", {"id": nic_netdev_id(devid)})
    except BackendError as err:
        problems.append(f"netdev {nic_netdev_id(devid)}: {err}")
    for obj in host_ends:
        try:
            await hotplug.offline(hotplug.vif_from_json(obj))
            offlined.append(obj)
        except hotplug.HotplugError as err:
            problems.append(str(err))
    return tuple(offlined), tuple(problems)


async def discard_nic(qmp_path: Path, devid: int, host_end: Mapping[str, Any] | None) -> None:
    """Undo a killed attach of vif ``devid`` (the guest has no such device)."""
    async with Qmp.open(qmp_path) as qmp:
        with contextlib.suppress(CommandError):
            await qmp.execute("netdev_del", {"id": nic_netdev_id(devid)})
    if host_end is not None:
        with contextlib.suppress(hotplug.HotplugError):
            await hotplug.offline(hotplug.vif_from_json(host_end))
