"""Bringing vifs online and offline: :func:`online` and :func:`offline`, with the built-in scripts.

``online`` makes the backend device (a persistent tap, as Xen's netback makes
``vif<domid>.<devid>``) and runs the vif's script with ``online``: a built-in
(:data:`VIF_SCRIPTS`, for ``vif-bridge`` and ``vif-route`` named bare or as
Xen's ``/etc/xen/scripts/NAME``) in-process over netlink, or a user's
executable (:mod:`xenlab.hotplug.script`).  ``online`` succeeds or leaves
nothing; with ``rename_if_taken`` a taken name gets the first free ``-N``
suffix, chosen and created under :func:`netlink.host_lock`.  ``offline`` is
idempotent and removes only the tap ``online`` recorded (its ifindex and
boot), never another toolstack's tap of that name nor an interface that is not
a tun/tap.  The design (what each built-in script does, and these rules) is in
docs/hotplug.md, section Vifs online and offline.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path, PurePath
from typing import Final, Protocol

from xenlab.hotplug.device import DEFAULT_BRIDGE, IFNAMSIZ, HotplugError, Vif, VifAction
from xenlab.hotplug.netlink import Link, Netlink, host_lock, netlink
from xenlab.hotplug.script import XEN_SCRIPT_DIR, run_vif_script

__all__ = ["VIF_SCRIPTS", "VifBridge", "VifRoute", "VifScript", "builtin_script", "offline",
           "online"]

log = logging.getLogger(__name__)

#: The MAC of a bridged tap's host end (the guest's MAC is inside QEMU), as Xen sets it.
HOST_END_MAC: Final = "fe:ff:ff:ff:ff:ff"
#: Where Linux says which boot this is (a new random id at every boot).
_BOOT_ID: Final = Path("/proc/sys/kernel/random/boot_id")
# How many "-N" suffixes to try before giving up on a free name.
_MAX_VARIANTS: Final = 99


class VifScript(Protocol):
    """A built-in vif script: what Xen's script of that name does, over netlink."""

    async def check(self, nl: Netlink, vif: Vif) -> None:
        """Refuse ``vif`` before its tap is made (a missing bridge...)."""

    async def online(self, nl: Netlink, vif: Vif, tap: Link) -> None:
        """Configure the freshly made ``tap`` (down, on no bridge) for ``vif``."""

    async def offline(self, nl: Netlink, vif: Vif, tap: Link) -> None:
        """Undo what :meth:`online` did that removing the tap would not undo."""


def bridge_hint(name: str) -> str:
    """How to make bridge ``name``, for error messages."""
    return f"create it with `ip link add {name} type bridge && ip link set {name} up`"


class VifBridge:
    """``vif-bridge``: the tap joins a bridge, with the bridge's MTU unless ``mtu=``."""

    async def _bridge(self, nl: Netlink, vif: Vif) -> Link:
        name = vif.bridge or DEFAULT_BRIDGE
        bridge = await nl.link(name)
        if bridge is None and name.startswith("xenbr") and name[5:].isdigit():
            # Xen's vif-bridge: old configs say xenbrN where the bridge is now ethN.
            eth = await nl.link(f"eth{name[5:]}")
            if eth is not None and eth.kind == "bridge":
                bridge = eth
        if bridge is None:
            raise HotplugError(f"{vif.where}: bridge {name!r} does not exist; {bridge_hint(name)}")
        if bridge.kind != "bridge":
            raise HotplugError(
                f"{vif.where}: {name!r} is not a bridge (it is a {bridge.kind or 'plain'} "
                f"interface); {bridge_hint('NAME')} and name that"
            )
        return bridge

    async def check(self, nl: Netlink, vif: Vif) -> None:
        """Refuse before anything is made: the bridge must exist and be a bridge."""
        await self._bridge(nl, vif)

    async def online(self, nl: Netlink, vif: Vif, tap: Link) -> None:
        bridge = await self._bridge(nl, vif)
        # Xen's setup_bridge_port: a bridge takes the lowest MAC of its ports,
        # so the host ends get the highest one and never become the bridge's.
        await nl.set(tap, address=HOST_END_MAC)
        await nl.set(tap, mtu=vif.mtu or bridge.mtu)
        await nl.set(tap, master=bridge.index)
        await nl.set(tap, state="up")

    async def offline(self, nl: Netlink, vif: Vif, tap: Link) -> None:
        return None  # a removed tap leaves its bridge by itself


class VifRoute:
    """``vif-route``: the tap up, and a host route through it for each address of ``ip=``."""

    async def check(self, nl: Netlink, vif: Vif) -> None:
        """Nothing to check before the tap exists."""

    async def online(self, nl: Netlink, vif: Vif, tap: Link) -> None:
        if vif.mtu:
            await nl.set(tap, mtu=vif.mtu)
        await nl.set(tap, state="up")
        for addr in (vif.ip or "").split():
            await nl.add_route(addr, tap)

    async def offline(self, nl: Netlink, vif: Vif, tap: Link) -> None:
        return None  # the kernel drops a link's routes with the link


#: The built-in scripts by name (``script=vif-bridge`` or Xen's /etc/xen/scripts/vif-bridge).
VIF_SCRIPTS: Final[dict[str, VifScript]] = {
    "vif-bridge": VifBridge(),
    "vif-route": VifRoute(),
}


def builtin_script(script: str) -> VifScript | None:
    """The built-in standing in for ``script``, or None when it is a user's script to run.

    A bare name (``vif-bridge``) or Xen's own script of that name
    (``/etc/xen/scripts/vif-route``, :data:`~xenlab.hotplug.script.XEN_SCRIPT_DIR`)
    is the built-in; any other path is the site's script and is run, even
    when it is called ``vif-bridge`` too (``/opt/site/vif-bridge``).
    """
    if "/" not in script:
        return VIF_SCRIPTS.get(script)
    path = PurePath(os.path.normpath(script))  # "./vif-bridge" stays a path: the user's
    return VIF_SCRIPTS.get(path.name) if path.parent == XEN_SCRIPT_DIR else None


def _variant(name: str, n: int) -> str:
    if n == 0:
        return name
    suffix = f"-{n}"
    base = name
    while len(os.fsencode(base + suffix)) >= IFNAMSIZ:
        base = base[:-1]
    return base + suffix


async def online(vif: Vif, *, rename_if_taken: bool = False) -> Vif:
    """Make ``vif``'s tap and run its script with ``online``; the vif as it came up.

    The result differs from ``vif`` only in ``vifname`` (when the name was
    taken and ``rename_if_taken``) and in ``uid``/``gid`` (filled in).

    :raise HotplugError: the bridge is missing or not a bridge (with how to
        create one), the name is taken, the script is missing or failed (its
        stderr quoted), or the kernel refused; nothing is left behind then.
    """
    builtin = builtin_script(vif.script)
    if builtin is None and "/" in vif.script and not os.path.isabs(vif.script):
        # offline runs it again later, maybe from another directory.
        vif = replace(vif, script=os.path.abspath(vif.script))
    uid = os.getuid() if vif.uid is None else vif.uid
    gid = os.getgid() if vif.gid is None else vif.gid
    vif = replace(vif, uid=uid, gid=gid)
    async with netlink() as nl:
        if builtin is not None:
            await builtin.check(nl, vif)
        else:
            from xenlab.hotplug.script import resolve_script

            resolve_script(vif.script, vif.where)
        async with host_lock():
            for n in range(_MAX_VARIANTS + 1):
                name = _variant(vif.vifname, n)
                if await nl.link(name) is None:
                    break
                if not rename_if_taken:
                    raise HotplugError(
                        f"{vif.where}: interface {name} exists already (another domain's, or "
                        f"left behind: `ip link del {name}` removes it)"
                    )
            else:
                raise HotplugError(f"{vif.where}: no free name like {vif.vifname}")
            tap = await nl.create_tap(name, uid=uid, gid=gid)
            vif = replace(vif, vifname=name, ifindex=tap.index, boot_id=_boot_id())
        try:
            if builtin is not None:
                await builtin.online(nl, vif, tap)
            else:
                await run_vif_script(vif, VifAction.ONLINE)
        except BaseException:
            await nl.delete(name, index=tap.index)
            raise
    log.info("%s online (%s)", vif.where, vif.script)
    return vif


def _boot_id() -> str | None:
    """This boot's id: an ifindex recorded before a reboot names nothing."""
    try:
        return _BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def _is_the_tap(vif: Vif, tap: Link) -> bool:
    """Whether ``tap`` is the one :func:`online` made for ``vif`` (old records: any)."""
    if vif.ifindex is None:
        return True
    if vif.boot_id is not None and vif.boot_id != _boot_id():
        return False  # made before a reboot: that tap died with the boot
    return tap.index == vif.ifindex


async def offline(vif: Vif) -> bool:
    """Run ``vif``'s script with ``offline`` and remove its tap; False if the tap was gone.

    Safe to call again, and after QEMU was killed.  A user script that fails
    here is logged, and the tap is removed all the same (a domain going away
    must not keep its devices).  An interface of the name that is not the
    tap ``online`` made (:attr:`Vif.ifindex`: another toolstack's, made since)
    counts as gone and is left alone.

    :raise HotplugError: the name belongs to an interface that is not a
        tap (it is left alone), or the kernel refused to remove the tap.
    """
    builtin = builtin_script(vif.script)
    async with netlink() as nl:
        tap = await nl.link(vif.vifname)
        if tap is None:
            return False
        if not _is_the_tap(vif, tap):
            log.info("%s: %s is another interface now (ifindex %d, the vif's was %s); "
                     "left alone", vif.where, vif.vifname, tap.index, vif.ifindex)
            return False
        if tap.kind != "tun":
            raise HotplugError(
                f"{vif.where}: {vif.vifname} is a {tap.kind or 'plain'} interface, not the "
                "domain's tap; left alone"
            )
        try:
            if builtin is not None:
                await builtin.offline(nl, vif, tap)
            else:
                await run_vif_script(vif, VifAction.OFFLINE)
        except HotplugError as err:
            log.warning("%s", err)
        await nl.delete(vif.vifname, index=tap.index)
    log.info("%s offline", vif.where)
    return True
