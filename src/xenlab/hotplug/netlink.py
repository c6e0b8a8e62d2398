"""The netlink edge of hotplug: links, taps, bridges and routes through pyroute2's AsyncIPRoute.

Every function takes an open :class:`Netlink` (one netlink socket, opened with
:func:`netlink`) and raises :class:`~xenlab.hotplug.device.HotplugError`
naming the interface; pyroute2's errors never leave this module, and pyroute2
is imported on first use (about 0.2 s).  Taps are made with the
``TUNSETIFF``/``TUNSETOWNER``/``TUNSETGROUP``/``TUNSETPERSIST`` ioctls and
``IFF_TUN_EXCL``, so a tap of that name made meanwhile is refused (``EBUSY``),
never shared.  :func:`host_lock` serialises choosing and making a tap between
one user's processes with a ``flock`` on a file only that user can open (root:
``/run/xenlab/hotplug.lock``), opened with ``O_NOFOLLOW`` and ``O_NONBLOCK``
and judged by ``fstat``, so nothing planted there can block or redirect it.
The design (the lock's places and checks, and why users do not share one) is
in docs/hotplug.md, section Netlink and the host lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import pwd
import stat
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from xenlab.files import file_kind, private_dir
from xenlab.hotplug.device import IFNAMSIZ, HotplugError

__all__ = ["Link", "Netlink", "host_lock", "netlink"]

#: root's lock directory: in /run, where nobody else can make or replace anything.
_ROOT_LOCK_DIR: Final = Path("/run/xenlab")
#: The lock's name in root's directory and in the home fallback (both xenlab's own).
_LOCK_FILE: Final = "hotplug.lock"
#: The lock's name in a user's runtime directory (shared with other programs).
_RUNTIME_LOCK_FILE: Final = "xenlab-hotplug.lock"
# No blocking open (a FIFO), no symlink followed, no controlling terminal taken.
_LOCK_OPEN: Final = (os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC)

_TUN_DEVICE: Final = "/dev/net/tun"
_IFF_TAP: Final = 0x0002  # the flags pyroute2's kind="tuntap", mode="tap" sets
_IFF_TUN_EXCL: Final = 0x8000  # TUNSETIFF fails with EBUSY when the name exists
_IFREQ: Final = struct.Struct("16sH22x")  # struct ifreq: name, ifr_flags, rest of the union


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
    code = err.errno if isinstance(err, OSError) else getattr(err, "code", None)
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
            # Said early and for any kind of interface; TUNSETIFF below refuses
            # an existing name too (IFF_TUN_EXCL), not attaching to it.
            raise HotplugError(f"interface {name} exists already")
        try:
            _make_tap(name, uid=uid, gid=gid)
        except OSError as err:
            if err.errno == errno.EBUSY:
                # Made since the look-up, by a toolstack not under our lock
                # (another user's): the kernel refused to attach to it.
                raise HotplugError(f"interface {name} exists already") from err
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


def _make_tap(name: str, *, uid: int, gid: int) -> None:
    """Create persistent tap ``name`` owned by ``uid``/``gid``; EBUSY when the name exists.

    ``IFF_TUN_EXCL`` makes ``TUNSETIFF`` fail on an existing device instead of
    attaching to it.  A failure after ``TUNSETIFF`` leaves nothing: the tap
    is persistent only after the last ioctl, and goes with the descriptor.
    """
    from pyroute2.netlink.rtnl.ifinfmsg import tuntap  # the ioctl numbers of this machine

    if tuntap.TUNSETIFF is None:
        raise OSError(errno.EOPNOTSUPP, "pyroute2 knows no TUNSETIFF for this architecture")
    fd = os.open(_TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, tuntap.TUNSETIFF, _IFREQ.pack(os.fsencode(name), _IFF_TAP | _IFF_TUN_EXCL))
        fcntl.ioctl(fd, tuntap.TUNSETOWNER, uid)
        fcntl.ioctl(fd, tuntap.TUNSETGROUP, gid)
        fcntl.ioctl(fd, tuntap.TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def _home() -> Path | None:
    """This user's home directory from the password database (not ``$HOME``)."""
    try:
        return Path(pwd.getpwuid(os.geteuid()).pw_dir)
    except KeyError:
        return None


def _is_private(path: Path) -> bool:
    """A real directory of this user that nobody else may enter (as logind makes them)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _private_dir(path: Path, *, parents: bool = False) -> Path:
    """``path`` as a 0700 directory of this user (:func:`xenlab.files.private_dir`).

    Its parent must be writable by this user (or root) alone (/run, a home
    directory); ``parents`` makes missing parents too (0700).
    """
    if not parents and not path.parent.is_dir():
        raise HotplugError(f"hotplug lock directory {path}: {path.parent} does not exist")
    return private_dir(path, error=HotplugError, what="hotplug lock directory ")


def _lock_path() -> Path:
    """Where this user's hotplug lock is (see the module notes); its directory made or checked.

    :raise HotplugError: no private directory for it, naming what was tried.
    """
    euid = os.geteuid()
    if euid == 0:
        return _private_dir(_ROOT_LOCK_DIR) / _LOCK_FILE
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    login = Path(f"/run/user/{euid}")
    for runtime in (xdg, login):
        if runtime and os.path.isabs(runtime) and _is_private(Path(runtime)):
            return Path(runtime) / _RUNTIME_LOCK_FILE
    home = _home()
    if home is not None and home.is_absolute() and home.is_dir():
        return _private_dir(home / ".local" / "state" / "xenlab", parents=True) / _LOCK_FILE
    tried = ("$XDG_RUNTIME_DIR is unset" if not xdg else
             f"$XDG_RUNTIME_DIR ({xdg}) is not a private directory of this user's")
    nohome = ("this user has no home directory in the password database" if home is None
              else f"the home directory {home} does not exist")
    raise HotplugError(f"hotplug lock: no private directory for it: {tried}, {login} is not a "
                       f"private directory of this user's, and {nohome}; set "
                       "XDG_RUNTIME_DIR to a directory only this user can enter")


def _open_lock(path: Path) -> int:
    """A descriptor on the lock file (made 0600 if missing), judged by ``fstat``.

    Never blocks (``O_NONBLOCK``: a FIFO opens at once and is refused),
    never follows a symlink (``O_NOFOLLOW``), and locks only a regular file
    of this user with one name: anything else could be another user's (who
    could then hold it) or a file the lock was not meant for.

    :raise HotplugError: naming the file and what is wrong with it.
    """
    try:
        fd = os.open(path, _LOCK_OPEN, 0o600)
    except OSError as err:
        if err.errno == errno.ELOOP and os.path.islink(path):
            raise HotplugError(f"hotplug lock {path}: is a symbolic link; the lock is only "
                               "taken on a regular file") from err
        raise HotplugError(f"hotplug lock {path}: cannot open it: {err.strerror or err}"
                           ) from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HotplugError(f"hotplug lock {path}: is {file_kind(st.st_mode)}, not a "
                               "regular file; remove it")
        if st.st_uid != os.geteuid():
            raise HotplugError(f"hotplug lock {path}: belongs to uid {st.st_uid}, not to this "
                               f"user ({os.geteuid()}); refusing to share a lock with it")
        if st.st_nlink != 1:
            raise HotplugError(f"hotplug lock {path}: has {st.st_nlink} names (a hard link to "
                               "another file?); remove it")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.asynccontextmanager
async def host_lock(timeout: float = 30.0, *, path: Path | None = None) -> AsyncIterator[None]:
    """This user's hotplug lock: choosing a free tap name and making the tap is one step.

    Interface names are one namespace per host while domain ids are one per
    state store, so toolstacks on other state directories race for the same
    names; an ``flock`` on a file only this user can open serialises this
    user's xenlab processes (the module notes say where it is, and why root
    and other users, each on their own lock, still cannot end up sharing a
    tap).  ``path`` is for tests: it is opened and judged the same way, its
    directory is not checked.

    :raise HotplugError: no private place for the lock, the lock file cannot
        be opened or made or is not a regular file of this user's (naming
        it), or the lock is still held after ``timeout`` seconds.
    """
    path = _lock_path() if path is None else path
    fd = _open_lock(path)
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
