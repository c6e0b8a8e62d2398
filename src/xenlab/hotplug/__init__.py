"""Device hotplug on the host as Xen's hotplug scripts do it: :func:`online`, :func:`offline`.

This room does for xenlab's QEMU guests what Xen's per-device hotplug scripts
do: a frozen :class:`Vif` (kept as JSON in the domain's record,
:func:`vif_to_json`) goes :func:`online` (a persistent tap named like Xen's
``vif<domid>.<devid>`` and owned by the caller's user, then the built-in or
user script) and :func:`offline` (the script, then the tap is removed; safe to
repeat).  Errors are :class:`HotplugError` naming the device, the bridge or
the script, and nothing is left behind.  pyroute2 does all netlink, taps are
made with ``IFF_TUN_EXCL``, nothing here starts QEMU or reads the state store
(``xenlab.vm`` calls this room, never the reverse), and every entry point is
``async``: the caller owns the event loop.  The design (the API with an
example, and which library does what) is in docs/hotplug.md, section The room.
"""

from xenlab.hotplug.device import (
    DEFAULT_BRIDGE,
    DEFAULT_VIF_SCRIPT,
    HotplugError,
    Vif,
    VifAction,
    default_vifname,
    vif_from_json,
    vif_to_json,
)
from xenlab.hotplug.script import vif_script_argv, vif_script_env
from xenlab.hotplug.vif import VIF_SCRIPTS, VifScript, builtin_script, offline, online

__all__ = [
    "DEFAULT_BRIDGE",
    "DEFAULT_VIF_SCRIPT",
    "VIF_SCRIPTS",
    "HotplugError",
    "Vif",
    "VifAction",
    "VifScript",
    "builtin_script",
    "default_vifname",
    "offline",
    "online",
    "vif_from_json",
    "vif_script_argv",
    "vif_script_env",
    "vif_to_json",
]
