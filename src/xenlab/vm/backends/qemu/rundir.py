"""A domain's run directory and the QEMU in it: :func:`make_rundir`, :func:`checked_rundir`.

The run directory holds a QEMU's sockets (QMP, agent, console), its pidfile
and its logs.  Whoever can write there can make xenlab talk to another
process or kill another pid, so it is this user's alone (0700) and its name
is never predictable by others: ``<state_dir>/run/<domid>`` (inside the
private state directory) when its socket paths fit in ``sun_path``, else a
fresh ``mkdtemp`` directory in ``$XDG_RUNTIME_DIR`` or ``/tmp``.  The chosen
path is kept in the domain's record; a recorded directory is used only
after ``lstat`` shows a real directory of this user with no access for
others (:func:`checked_rundir`).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Final

from xenlab.errors import StateError
from xenlab.vm.backends.qemu.qemu import RuntimePaths
from xenlab.vm.store import private_dir

__all__ = ["SOCKET_MAX", "checked_rundir", "default_rundir", "make_rundir", "process_exists",
           "qemu_said", "read_pid", "wait_gone"]

# Unix socket paths must fit in sun_path (108 bytes with the NUL); the
# longest socket name in a run directory is "console.sock".
SOCKET_MAX: Final = 100
_LONGEST: Final = "console.sock"


def _fits(rundir: Path) -> bool:
    return len(os.fsencode(rundir / _LONGEST)) <= SOCKET_MAX


def default_rundir(state_dir: Path, domid: int) -> Path:
    """Where domain ``domid``'s run directory goes when the path is short enough."""
    return state_dir / "run" / str(domid)


def make_rundir(state_dir: Path, domid: int) -> Path:
    """A new, empty, private run directory for domain ``domid``.

    ``<state_dir>/run/<domid>`` (an old one of that name is removed first)
    when its sockets fit, else a new random directory in a private place.

    :raise StateError: no private directory could be made.
    """
    preferred = default_rundir(state_dir, domid)
    if _fits(preferred):
        private_dir(preferred.parent)
        if preferred.is_symlink():
            preferred.unlink()
        elif preferred.exists():
            shutil.rmtree(preferred)
        return private_dir(preferred)
    for base in _short_bases():
        prefix = f"xenlab-{domid}-"
        # mkdtemp makes a fresh 0700 directory with a random name, atomically:
        # nobody can have made it beforehand.
        if not _fits(Path(base) / (prefix + "x" * 8)):
            continue
        try:
            return Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        except OSError:
            continue
    raise StateError(f"no private run directory short enough for unix sockets: "
                     f"{preferred} is too long and $XDG_RUNTIME_DIR and /tmp are unusable")


def _short_bases() -> list[str]:
    out = []
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and _is_private(xdg):
        out.append(xdg)
    out.append(tempfile.gettempdir())
    if "/tmp" not in out:
        out.append("/tmp")
    return out


def _is_private(path: str | Path) -> bool:
    """True for a real directory of this user that nobody else may enter."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            and not st.st_mode & 0o077)


def checked_rundir(path: str | Path) -> RuntimePaths | None:
    """The runtime paths under a recorded run directory, or None when it is not safe to use.

    Not safe: missing, a symlink, not a directory, another user's, or open
    to others.  Callers then treat the domain's QEMU as unreachable rather
    than talk to, or kill, whatever such a directory names.
    """
    return RuntimePaths.under(Path(path)) if _is_private(path) else None


def read_pid(paths: RuntimePaths) -> int | None:
    """The pid in ``paths``' pidfile, or None (missing, empty, not a number)."""
    try:
        text = paths.pidfile.read_text(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and len(text) < 10 else None


def qemu_said(paths: RuntimePaths, lines: int = 5) -> str:
    """The last lines of QEMU's log in ``paths`` (its own words on a failure), or ""."""
    try:
        with paths.log.open("rb") as f:
            f.seek(max(0, paths.log.stat().st_size - 8192))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    said = [ln.strip() for ln in tail.splitlines() if ln.strip()][-lines:]
    return "; ".join(said)


def wait_gone(pid: int | None, timeout: float) -> bool:
    """Wait until process ``pid`` no longer exists; True if it went in time."""
    if pid is None:
        return True
    begin = time.monotonic()
    while time.monotonic() < begin + timeout:
        if not process_exists(pid):
            return True
        # A daemonized QEMU is not our child: nothing to reap, just poll,
        # often at first (QEMU usually exits within milliseconds of quit).
        time.sleep(min(0.05, max(0.002, (time.monotonic() - begin) / 8)))
    return False


def process_exists(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by init) counts as gone
    once its last thread has exited.

    A multi-threaded QEMU's main thread turns zombie first; its files (and
    the image locks on them) stay open until its other threads have exited
    too, so a zombie with threads left is not gone yet.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state is the field after the parenthesised command name.
    if stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]:
        return True
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False
