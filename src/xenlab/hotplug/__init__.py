"""Device hotplug on the host as Xen's hotplug scripts do it: :func:`online`, :func:`offline`.

Xen's toolstack brings a guest's devices to life by running a script per
device and action (``vif-bridge online``, ``block add``...).  This room
does the same for xenlab's QEMU guests, behind one small API::

    from xenlab.hotplug import Vif, online, offline, default_vifname

    vif = Vif(domid=3, devid=0, vifname=default_vifname(3, 0), bridge="xlbr0",
              mac="00:16:3e:01:02:03", mtu=1400)
    up = await online(vif)          # tap vif3.0 made, MTU 1400, on xlbr0, up
    ...                             # QEMU: -netdev tap,ifname=vif3.0,script=no,...
    await offline(up)               # tap removed (safe to repeat)

- :class:`Vif` (``device``) describes one device: domid, devid, tap name,
  script, bridge, MAC, MTU, ``ip=``, ``gatewaydev=``; frozen, and kept as JSON
  (:func:`vif_to_json`) in the domain's record so any later command can bring
  exactly that device offline.
- :func:`online` (``vif``) makes the backend device, a persistent tap named
  like Xen's backend ``vif<domid>.<devid>`` (or ``vifname=``) and owned by
  the caller's user so QEMU opens it with ``ifname=``, then runs the script:
  the built-ins ``vif-bridge`` and ``vif-route`` (named bare or as Xen's
  ``/etc/xen/scripts/NAME``) run in-process (:data:`VIF_SCRIPTS`, a
  :class:`VifScript` each); any other ``script=``, ``/opt/site/vif-bridge`` too,
  is a user's executable, run with Xen's calling convention
  (:mod:`xenlab.hotplug.script` documents exactly what it gets).
  :func:`offline` runs the script with ``offline`` and removes the tap.
- Errors are :class:`HotplugError` (a BackendError), naming the device, the
  bridge or the script: a missing bridge says how to create it; a failing
  script's stderr is quoted, and nothing is left behind.

Which library does what
    pyroute2 (``AsyncIPRoute``) does all netlink: looking links up, MTU,
    bridge ports, link state, routes (``netlink``).  Taps are made by
    ``netlink`` itself with pyroute2's ioctl numbers, because pyroute2's
    ``tuntap`` kind cannot pass ``IFF_TUN_EXCL`` (a tap of that name made
    meanwhile by another toolstack is refused, never shared).  User
    scripts run through asyncio subprocesses.  Nothing here starts QEMU or
    reads the state store: ``xenlab.vm`` calls this room, never the reverse.

Every entry point is ``async``; the caller owns the event loop.
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
