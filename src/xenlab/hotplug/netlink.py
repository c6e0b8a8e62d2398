"""The netlink edge of hotplug: links, taps, bridges and routes through pyroute2's AsyncIPRoute.

Every function takes an open :class:`Netlink` (one netlink socket, opened
with :func:`netlink`) and raises :class:`~xenlab.hotplug.device.HotplugError`
naming the interface; pyroute2's errors never leave this module.  A tap is
made with the ``TUNSETIFF``/``TUNSETOWNER``/``TUNSETPERSIST`` ioctls (the
kernel cannot create one over rtnetlink); pyroute2 does them for
``kind="tuntap"``.

pyroute2 is imported on first use: it takes about 0.2 s to import, which
every ``xenlab`` command would otherwise pay.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from xenlab.hotplug.device import IFNAMSIZ, HotplugError

__all__ = ["Link", "Netlink", "host_lock", "netlink"]

_LOCK_NAME: Final = "xenlab-hotplug.lock"


@dataclass(frozen=True, slots=True)
class Link:
    """What hotplug needs to know of one interface."""

    index: int
    name: str
    kind: str | None  # IFLA_INFO_KIND: "bridge", "tun", "veth"...; None for a plain NIC
    mtu: int
    master: int | None  # the bridge's index, when enslaved
    up: bool


def _message(err: BaseException) -> str:
    code = getattr(err, "code", None)
    if isinstance(code, int) and code > 0:
        text = os.strerror(code)
        if code == errno.EPERM:
            text += " (network changes need root or CAP_NET_ADMIN)"
        return text
    return str(err) or type(err).__name__


class Netlink:
    """One rtnetlink socket (pyroute2 ``AsyncIPRoute``), with the few verbs hotplug needs."""

    def __init__(self, ipr: Any) -> None:
        self._ipr = ipr

    async def link(self, name: str) -> Link | None:
        """The interface called ``name``, or None when there is none."""
        try:
            found = await self._ipr.link("get", ifname=name)
        except Exception as err:
            if getattr(err, "code", None) == errno.ENODEV:
                return None
            raise HotplugError(f"interface {name}: netlink get: {_message(err)}") from err
        msg = found[0]
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        return Link(
            index=int(msg["index"]), name=str(msg.get_attr("IFLA_IFNAME")),
            kind=None if kind is None else str(kind), mtu=int(msg.get_attr("IFLA_MTU")),
            master=msg.get_attr("IFLA_MASTER"), up=bool(msg["flags"] & 1),
        )

    async def create_tap(self, name: str, *, uid: int, gid: int) -> Link:
        """Make persistent tap ``name`` owned by ``uid``/``gid`` (down, on no bridge).

        :raise HotplugError: the name is too long or taken, or the kernel refused.
        """
        if not name or len(os.fsencode(name)) >= IFNAMSIZ or "/" in name or " " in name:
            raise HotplugError(
                f"interface name {name!r} is not usable (1 to {IFNAMSIZ - 1} bytes, "
                "no '/' or blanks)"
            )
        if await self.link(name) is not None:
            # TUNSETIFF would quietly attach to an existing persistent tap.
            raise HotplugError(f"interface {name} exists already")
        try:
            await self._ipr.link("add", ifname=name, kind="tuntap", mode="tap", uid=uid, gid=gid)
        except Exception as err:
            raise HotplugError(f"tap {name}: cannot create it: {_message(err)}") from err
        made = await self.link(name)
        if made is None:
            raise HotplugError(f"tap {name}: created, but the kernel does not show it")
        return made

    async def set(self, link: Link, **changes: Any) -> None:
        """Change ``link``: pyroute2's ``link("set")`` keywords (mtu, master, state)."""
        try:
            await self._ipr.link("set", index=link.index, **changes)
        except Exception as err:
            what = ", ".join(f"{k}={v}" for k, v in changes.items())
            raise HotplugError(f"interface {link.name}: cannot set {what}: {_message(err)}"
                               ) from err

    async def delete(self, name: str, *, index: int | None = None) -> bool:
        """Remove interface ``name``; False when it was not there (not an error).

        With ``index``, the interface with that ifindex is removed (``name``
        is for messages): a name can pass to another interface between a
        lookup and the removal, an ifindex is not reused.
        """
        try:
            if index is None:
                await self._ipr.link("del", ifname=name)
            else:
                await self._ipr.link("del", index=index)
        except Exception as err:
            if getattr(err, "code", None) == errno.ENODEV:
                return False
            raise HotplugError(f"interface {name}: cannot remove it: {_message(err)}") from err
        return True

    async def add_route(self, dst: str, link: Link) -> None:
        """A host route to ``dst`` (an address or network) through ``link``."""
        prefix = dst if "/" in dst else (f"{dst}/128" if ":" in dst else f"{dst}/32")
        try:
            await self._ipr.route("replace", dst=prefix, oif=link.index)
        except Exception as err:
            raise HotplugError(
                f"interface {link.name}: cannot add a route to {dst}: {_message(err)}"
            ) from err


@contextlib.asynccontextmanager
async def netlink() -> AsyncIterator[Netlink]:
    """An open :class:`Netlink` for the length of an ``async with`` block."""
    from pyroute2 import AsyncIPRoute  # see the module notes: imported on first use

    try:
        ipr = AsyncIPRoute()
        await ipr.setup_endpoint()
    except Exception as err:
        raise HotplugError(f"netlink: cannot open a socket: {_message(err)}") from err
    try:
        yield Netlink(ipr)
    finally:
        ipr.close()


def _lock_path() -> Path:
    run = Path("/run/lock")
    if os.access(run, os.W_OK):
        return run / _LOCK_NAME
    return Path(tempfile.gettempdir()) / f"{_LOCK_NAME}.{os.getuid()}"


def _open_lock(path: Path) -> int:
    """A read-only descriptor on the lock file, made if missing (flock needs no write access).

    Read-only because another user may own the file (0644 after their
    umask).  An existing file is opened without O_CREAT: a sticky /run/lock
    under fs.protected_regular refuses O_CREAT on another user's file.
    """
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        pass
    try:
        return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except PermissionError:
        # Another user made it between the two opens (protected_regular).
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


@contextlib.asynccontextmanager
async def host_lock(timeout: float = 30.0, *, path: Path | None = None) -> AsyncIterator[None]:
    """The host-wide hotplug lock: choosing a free name and creating it is one step.

    Interface names are one namespace per host while domain ids are one per
    state store, so toolstacks on other state directories race for the same
    names; an flock on a file in /run/lock serialises them (``path`` is for
    tests).  Any user's toolstack can take it: the file is opened read-only.

    :raise HotplugError: the lock file cannot be opened or made (naming it),
        or the lock is still held after ``timeout`` seconds.
    """
    path = _lock_path() if path is None else path
    try:
        fd = _open_lock(path)
    except OSError as err:
        raise HotplugError(f"hotplug lock {path}: cannot open it: {err.strerror or err}"
                           ) from err
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as err:
                if loop.time() > deadline:
                    raise HotplugError(f"hotplug lock {path}: still held after {timeout:g} s"
                                       ) from err
                await asyncio.sleep(0.01)
        yield
    finally:
        os.close(fd)
