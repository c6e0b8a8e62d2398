"""What a hotplug action works on: :class:`Vif` (the host end of a guest NIC), the actions.

Values only: no netlink, no processes.  :func:`vif_to_json` /
:func:`vif_from_json` are the form the toolstack keeps in a domain's record,
so a later command (destroy, a stale domain's clean-up) can bring exactly
that device offline.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from xenlab.errors import BackendError

__all__ = [
    "DEFAULT_BRIDGE",
    "DEFAULT_VIF_SCRIPT",
    "IFNAMSIZ",
    "HotplugError",
    "Vif",
    "VifAction",
    "default_vifname",
    "vif_from_json",
    "vif_to_json",
]

#: libxl's default bridge, used when a vif names the vif-bridge script but no bridge.
DEFAULT_BRIDGE: Final = "xenbr0"
#: libxl's default vif script (xl.conf's ``vif.default.script``).
DEFAULT_VIF_SCRIPT: Final = "vif-bridge"
#: Linux's limit on an interface name, counting the NUL: names have at most 15 bytes.
IFNAMSIZ: Final = 16


class HotplugError(BackendError):
    """A hotplug action failed; the message names the device (and bridge, script)."""


class VifAction(enum.Enum):
    """What Xen's vif scripts are asked to do (their first argument)."""

    ONLINE = "online"
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class Vif:
    """The host end of one guest network device, as Xen's vif scripts see it.

    ``vifname`` is the tap's name: Xen's backend name ``vif<domid>.<devid>``
    (:func:`default_vifname`) unless the config's ``vifname=`` gives one.
    ``script`` is a built-in (``vif-bridge``, ``vif-route``, bare or as Xen's
    ``/etc/xen/scripts/NAME``) or a user's executable (any other path, even
    one ending in a built-in's name).  ``bridge`` is the
    config's ``bridge=`` (vif-bridge uses :data:`DEFAULT_BRIDGE` without
    one).  ``mac`` is the guest's address (``00:16:3e:..``); ``mtu`` None
    means "the bridge's" (as libxl's 0); ``ip`` is xl's ``ip=``, a
    space-separated list of addresses; ``gatewaydev`` is xl's
    ``gatewaydev=`` (Xen's ``netdev``).  ``uid``/``gid`` own the tap so an
    unprivileged QEMU of that user can open it (None: this process's).
    ``ifindex`` and ``boot_id`` (the kernel's ``random/boot_id``) say which
    tap :func:`~xenlab.hotplug.online` made: names are reused, by this host's
    other toolstacks too, so ``offline`` removes a tap of that name only when
    it is that one (None, as in records from before: any tap of the name).
    """

    domid: int
    devid: int
    vifname: str
    script: str = DEFAULT_VIF_SCRIPT
    bridge: str | None = None
    mac: str | None = None
    mtu: int | None = None
    ip: str | None = None
    gatewaydev: str | None = None
    domname: str | None = None
    uid: int | None = None
    gid: int | None = None
    ifindex: int | None = None
    boot_id: str | None = None

    @property
    def where(self) -> str:
        """How messages name this device: ``vif 0 (vif3.0) of domain 3``."""
        dom = f"domain {self.domid}" + (f" ({self.domname})" if self.domname else "")
        return f"vif {self.devid} ({self.vifname}) of {dom}"


def default_vifname(domid: int, devid: int) -> str:
    """Xen's name for the backend of vif ``devid`` of domain ``domid``: ``vif<domid>.<devid>``."""
    return f"vif{domid}.{devid}"


_FIELDS: Final = ("domid", "devid", "vifname", "script", "bridge", "mac", "mtu", "ip",
                  "gatewaydev", "domname", "uid", "gid", "ifindex", "boot_id")


def vif_to_json(vif: Vif) -> dict[str, Any]:
    """``vif`` as a JSON object (every field, by name)."""
    return {name: getattr(vif, name) for name in _FIELDS}


def vif_from_json(obj: Mapping[str, Any]) -> Vif:
    """The :class:`Vif` :func:`vif_to_json` wrote; unknown keys are ignored.

    :raise HotplugError: a required field is missing or has the wrong type.
    """
    try:
        domid, devid, vifname = int(obj["domid"]), int(obj["devid"]), str(obj["vifname"])
    except (KeyError, TypeError, ValueError) as err:
        raise HotplugError(f"vif record {dict(obj)!r}: needs domid, devid and vifname") from err

    def opt_str(key: str) -> str | None:
        value = obj.get(key)
        return None if value is None else str(value)

    def opt_int(key: str) -> int | None:
        value = obj.get(key)
        return None if value is None else int(value)

    return Vif(
        domid=domid, devid=devid, vifname=vifname,
        script=str(obj.get("script") or DEFAULT_VIF_SCRIPT), bridge=opt_str("bridge"),
        mac=opt_str("mac"), mtu=opt_int("mtu"), ip=opt_str("ip"),
        gatewaydev=opt_str("gatewaydev"), domname=opt_str("domname"),
        uid=opt_int("uid"), gid=opt_int("gid"), ifindex=opt_int("ifindex"),
        boot_id=opt_str("boot_id"),
    )
