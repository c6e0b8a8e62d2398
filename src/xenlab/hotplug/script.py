"""Users' hotplug scripts, called as libxl calls Xen's: :func:`run_vif_script`.

A user's script runs as libxl runs Xen's (``libxl__get_hotplug_script_info``
and ``get_hotplug_env`` in ``tools/libs/light/libxl_linux.c``, Xen 4.17):
``SCRIPT online|offline type_if=vif`` with libxl's environment
(``XENBUS_PATH``, ``vif``, ``netdev``...) plus what Xen's scripts would read
from xenstore (``bridge``, ``mac``, ``ip``, ``mtu``...), since there is no
xenstore here.  The tap exists (down, on no bridge) before ``online`` and is
removed after ``offline``; a script that exits non-zero or runs longer than
:data:`SCRIPT_TIMEOUT` fails the action with its stderr quoted, and a name
without a ``/`` is looked up in :data:`XEN_SCRIPT_DIR`.  The design (the
calling convention and every variable) is in docs/hotplug.md, section User
scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Final

from xenlab.hotplug.device import HotplugError, Vif, VifAction

__all__ = ["SCRIPT_TIMEOUT", "XEN_SCRIPT_DIR", "resolve_script", "run_vif_script",
           "vif_script_argv", "vif_script_env"]

#: Where Xen installs its hotplug scripts; a bare ``script=NAME`` is looked up here.
XEN_SCRIPT_DIR: Final = Path("/etc/xen/scripts")
#: Seconds a script may run: libxl's LIBXL_HOTPLUG_TIMEOUT.
SCRIPT_TIMEOUT: Final = 40.0


def resolve_script(script: str, where: str) -> Path:
    """The executable ``script`` names: a path as is, a bare name in :data:`XEN_SCRIPT_DIR`.

    :raise HotplugError: it does not exist or is not executable (``where``
        names the device in the message).
    """
    path = Path(script) if "/" in script else XEN_SCRIPT_DIR / script
    if not path.is_file():
        raise HotplugError(
            f"{where}: hotplug script {script!r}: {path} is not a file (built-in scripts are "
            "vif-bridge and vif-route; another script is run by its path)"
        )
    if not os.access(path, os.X_OK):
        raise HotplugError(f"{where}: hotplug script {str(path)!r} is not executable")
    return path


def vif_script_argv(path: Path, action: VifAction) -> list[str]:
    """The argv of a vif script, as libxl builds it: ``[path, action, "type_if=vif"]``."""
    return [str(path), action.value, "type_if=vif"]


def vif_script_env(vif: Vif) -> dict[str, str]:
    """The variables a vif script gets on top of the toolstack's environment (module notes)."""
    def text(value: object) -> str:
        return "" if value is None else str(value)

    return {
        "script": vif.script,
        "XENBUS_TYPE": "vif",
        "XENBUS_PATH": f"backend/vif/{vif.domid}/{vif.devid}",
        "XENBUS_BASE_PATH": "backend",
        "netdev": text(vif.gatewaydev),
        "vif": vif.vifname,
        "bridge": text(vif.bridge),
        "mac": text(vif.mac),
        "ip": text(vif.ip),
        "mtu": text(vif.mtu),
        "domid": str(vif.domid),
        "devid": str(vif.devid),
        "domname": text(vif.domname),
    }


async def run_vif_script(vif: Vif, action: VifAction, *,
                         timeout: float = SCRIPT_TIMEOUT) -> None:
    """Run ``vif``'s user script for ``action`` with Xen's calling convention.

    :raise HotplugError: the script is missing, exits non-zero (its stderr is
        in the message) or runs longer than ``timeout`` seconds (it is killed).
    """
    path = resolve_script(vif.script, vif.where)
    argv = vif_script_argv(path, action)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, **vif_script_env(vif)},
        )
    except OSError as err:
        raise HotplugError(f"{vif.where}: cannot run {path}: {err.strerror or err}") from err
    try:
        out, err_bytes = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError as err:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise HotplugError(
            f"{vif.where}: hotplug script {path} {action.value} ran longer than {timeout:g} s"
        ) from err
    if proc.returncode != 0:
        said = (err_bytes or out).decode("utf-8", "replace").strip()
        raise HotplugError(
            f"{vif.where}: hotplug script {path} {action.value} failed (exit {proc.returncode})"
            + (f": {said}" if said else "")
        )
