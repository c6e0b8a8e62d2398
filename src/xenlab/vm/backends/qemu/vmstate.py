"""QEMU's VM state stream over QMP into and out of checked files: :func:`write_checked` /
:func:`load_checked` (save images), :func:`write_stream` / :func:`load_stream` (snapshot
memory files), and the migration helpers save, restore and migrate share
(:func:`wait_migration`, ...).

QEMU reads and writes the file itself, through a descriptor handed over
with ``getfd`` (migration URI ``fd:NAME``), as before checksums: nothing of
its stream is copied through xenlab.  Saving, the chunks QEMU has written
are hashed from the page cache while it writes, and the checksum table and
trailer of :mod:`~xenlab.vm.migration.image` are appended once QEMU reports the
stream complete.  Loading, the caller has checked the whole file before it
started QEMU (:func:`~xenlab.vm.migration.image.check_image`), so a damaged file
never reaches a QEMU; QEMU then reads the same open file, and a file that
changed after the check (its size, times or inode) is refused before the
guest runs.

Rules: waiting on QEMU is by its MIGRATION events (the ``events``
capability), as a one-shot QMP client does; ``query-migrate`` is asked once
at the end, or every ``_TICK`` seconds when a progress callback wants
figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from xenlab import faults
from xenlab.errors import BackendError, FormatError
from xenlab.vm.backend import MigrationProgress, Progress
from xenlab.vm.backends.qemu.qmp import EventWatch, Qmp
from xenlab.vm.migration import image as saveimage

__all__ = [
    "ACTIVE",
    "UNLIMITED",
    "MigrationProgress",
    "Progress",
    "cancel_active",
    "cancel_migration",
    "cont_after_migration",
    "enable_events",
    "load_checked",
    "load_stream",
    "qemu_version",
    "query_migrate",
    "send_fd",
    "status",
    "wait_migration",
    "write_checked",
    "write_stream",
]

_log = logging.getLogger(__name__)

# QEMU 7.2 throttles migration to 32 MiB/s by default, which makes a save of
# a 256 MiB guest take 8 s for no reason on one host; like libvirt's save,
# lift the limit unless the caller asks for one.
UNLIMITED: Final = 1 << 40
_POLL: Final = 0.05
# How often a migration with a progress callback asks QEMU how far it got.
_TICK: Final = 0.1
# How often a save hashes what QEMU wrote so far (and starts the kernel writing it out).
_KICK: Final = 0.005
_FD_NAME: Final = "xenlab-vmstate"




# --- QMP helpers --------------------------------------------------------------------------


async def send_fd(qmp: Qmp, fd: int, name: str) -> None:
    """Hand ``fd`` to QEMU under ``name`` (:meth:`Qmp.send_fd`)."""
    await qmp.send_fd(fd, name)


async def status(qmp: Qmp) -> str:
    """QEMU's run state (``query-status``): "running", "paused", "postmigrate", ..."""
    st = await qmp.execute("query-status")
    return str(st.get("status", "unknown")) if isinstance(st, dict) else "unknown"


async def query_migrate(qmp: Qmp) -> dict[str, Any]:
    """``query-migrate``, or {} when QEMU answers something else."""
    info = await qmp.execute("query-migrate")
    return info if isinstance(info, dict) else {}


async def enable_events(qmp: Qmp) -> None:
    """Ask QEMU for a MIGRATION event at each change of the migration's status.

    Off by default in QEMU; it has to be on in the QEMU that sends and in
    the one that receives (before ``migrate-incoming``).
    """
    await qmp.execute("migrate-set-capabilities",
                      {"capabilities": [{"capability": "events", "state": True}]})


def qemu_version(v: object) -> str:
    """``major.minor.micro`` from a ``query-version`` answer ("unknown" if it has none)."""
    if isinstance(v, dict) and isinstance(v.get("qemu"), dict):
        q = v["qemu"]
        return f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}"
    return "unknown"


def _report(progress: Progress | None, info: Mapping[str, Any], state: str,
            started: float) -> None:
    ram = info.get("ram") or {}
    if progress is not None and ram:
        progress(MigrationProgress(
            "memory", state, int(ram.get("transferred", 0)), int(ram.get("remaining", 0)),
            int(ram.get("total", 0)), time.monotonic() - started,
        ))


async def wait_migration(qmp: Qmp, watch: EventWatch, what: str, timeout: float,
                         progress: Progress | None, started: float, *,
                         stats: bool = False, check_first: bool = False,
                         tick: Callable[[], None] | None = None,
                         until: frozenset[str] = frozenset({"completed"})) -> dict[str, Any]:
    """Wait on QEMU's MIGRATION events until the migration reaches a status in ``until``.

    ``watch`` must listen to "MIGRATION" since before the command that
    started the migration (or ``check_first`` asks ``query-migrate`` once,
    for a migration that may have ended before the watch).  Returns the
    final ``query-migrate`` when ``stats`` (or a progress report is wanted),
    else nothing: the event says all a save or a restore needs.  Progress is
    reported every ``_TICK`` seconds from ``query-migrate`` while it runs,
    and once at the end with status "completed".  ``tick`` is called every
    ``_KICK`` seconds while it runs.

    :raise BackendError: the migration failed or was cancelled (QEMU's
        ``error-desc``, asked once, in the message), QEMU went away, or
        ``timeout`` passed.
    """
    deadline = time.monotonic() + timeout
    state = "unknown"
    ends = until | {"failed", "cancelled"}
    if check_first:
        state = str((await query_migrate(qmp)).get("status", "none"))
    while state not in ends:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            with contextlib.suppress(BackendError):
                state = str((await query_migrate(qmp)).get("status", state))
            raise BackendError(f"{what}: not completed within {timeout:g}s (status {state})")
        wait = remaining
        if progress is not None:
            wait = min(wait, _TICK)
        if tick is not None:
            wait = min(wait, _KICK)
            tick()
        try:
            ev = await watch.wait(wait)
        except BackendError as err:
            if not qmp.connected:
                raise BackendError(f"{what}: {err}") from err
            if progress is not None:
                info = await query_migrate(qmp)
                _report(progress, info, str(info.get("status", state)), started)
            continue
        state = str((ev.get("data") or {}).get("status", state))
    if state not in until:
        info = await query_migrate(qmp)
        why = info.get("error-desc") or state
        raise BackendError(f"{what}: QEMU reports the migration {state}: {why}")
    if not stats and progress is None:
        return {}
    info = await query_migrate(qmp)
    # QEMU sends "completed" before it has computed the totals (migration.c
    # sets the state, then migration_calculate_complete): ask again briefly.
    for _ in range(40):
        if info.get("total-time") or info.get("status") != "completed":
            break
        await asyncio.sleep(0.005)
        info = await query_migrate(qmp)
    _report(progress, info, "completed", started)
    return info


async def cancel_migration(qmp: Qmp) -> None:
    """``migrate_cancel`` and wait (briefly) until QEMU has left the active states."""
    with contextlib.suppress(BackendError):
        await qmp.execute("migrate_cancel")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = str((await query_migrate(qmp)).get("status", "none"))
        except BackendError:
            return
        if state in ("none", "completed", "failed", "cancelled"):
            return
        await asyncio.sleep(_POLL)


# query-migrate statuses of a migration still going.
ACTIVE: Final = frozenset({"active", "setup", "device", "pre-switchover"})


async def cancel_active(qmp: Qmp) -> str:
    """Cancel a migration that is still going (one a killed command left); its status."""
    status = str((await query_migrate(qmp)).get("status"))
    if status in ACTIVE:
        await cancel_migration(qmp)
    return status


async def cont_after_migration(qmp: Qmp, timeout: float = 10.0) -> None:
    """``cont`` a source whose outgoing migration has ended, once QEMU has finished it.

    QEMU reports "completed" while its migration thread still holds the VM in
    finish-migrate; it sets postmigrate only after that.  A ``cont`` in between
    starts the vCPUs and is then overwritten: the guest runs while QEMU says
    postmigrate.  So wait for finish-migrate to end, ``cont``, and check.
    """
    deadline = time.monotonic() + timeout
    while True:
        state = await status(qmp)
        if state == "running":
            return
        if state != "finish-migrate":
            await qmp.execute("cont")
            state = await status(qmp)
            if state == "running":
                return
        if time.monotonic() > deadline:
            raise BackendError(f"the source QEMU did not resume: it is {state!r}")
        await asyncio.sleep(0.005)


# --- QEMU's stream into and out of a checked file ------------------------------------------


async def write_checked(qmp: Qmp, fd: int, *, seed: int, what: str, timeout: float,
                        progress: Progress | None = None, started: float | None = None,
                        tick: Callable[[], None] | None = None,
                        at_switchover: Callable[[], Awaitable[None]] | None = None,
                        ) -> saveimage.StreamSummary:
    """Migrate QEMU's state into ``fd`` from its current offset, then append the checksum
    table and trailer (:class:`~xenlab.vm.migration.image.StreamHasher`).

    QEMU writes the file itself; every ``_KICK`` seconds the chunks it has
    written are hashed from the page cache (and ``tick`` called), the rest
    once QEMU reports the migration completed.  With ``at_switchover`` QEMU
    pauses before the switch-over (its ``pause-before-switchover``
    capability), the callback runs (the guest is stopped and its last pages
    not yet sent: a snapshot takes the disks here), and the migration goes
    on.  The events capability is turned on here.  Returns what the stream
    holds.

    :raise BackendError: QEMU failed or cancelled the migration, or it took
        longer than ``timeout`` (the migration is cancelled).
    :raise OSError: ``fd`` could not be read or written (a full disk).
    """
    started = time.monotonic() if started is None else started
    hasher = saveimage.StreamHasher(fd, os.lseek(fd, 0, os.SEEK_CUR), seed=seed)

    def kick() -> None:
        hasher.update()
        if tick is not None:
            tick()

    await enable_events(qmp)
    await send_fd(qmp, fd, _FD_NAME)
    try:
        if at_switchover is not None:
            await qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "pause-before-switchover", "state": True}]})
        try:
            with qmp.listen("MIGRATION") as watch:
                await qmp.execute("migrate", {"uri": f"fd:{_FD_NAME}"})
                faults.point("vmstate.migrating")
                if at_switchover is not None:
                    await wait_migration(qmp, watch, what, timeout, None, started, tick=kick,
                                         until=frozenset({"pre-switchover"}))
                    await at_switchover()
                    await qmp.execute("migrate-continue", {"state": "pre-switchover"})
                await wait_migration(qmp, watch, what, timeout, progress, started, tick=kick)
        finally:
            if at_switchover is not None:
                with contextlib.suppress(BackendError):
                    await qmp.execute("migrate-set-capabilities", {"capabilities": [
                        {"capability": "pause-before-switchover", "state": False}]})
    except BaseException:
        with contextlib.suppress(BackendError):
            await cancel_migration(qmp)
        with contextlib.suppress(BackendError):
            await qmp.execute("closefd", {"fdname": _FD_NAME})
        raise
    try:
        return hasher.finish()
    except ValueError as err:
        raise BackendError(f"{what}: {err}") from err


async def load_checked(qmp: Qmp, fd: int, *, start: int, checked: tuple[int, ...],
                       source: str, what: str, timeout: float) -> None:
    """Load QEMU's state from file ``fd`` at ``start``, a stream already checked whole while
    the file was as ``checked`` (:func:`file_identity` then) says.

    QEMU reads the file itself; once it has loaded the stream the file is
    looked at again, and a file that changed since it was checked (another
    writer: its size, times or inode differ) is refused, so QEMU is never
    resumed on bytes nobody checked.  QEMU waits with ``-incoming defer``
    and is left paused.

    :raise FormatError: the file changed while QEMU read it.
    :raise BackendError: QEMU could not load the stream, or ``timeout`` passed.
    """
    started = time.monotonic()
    os.lseek(fd, start, os.SEEK_SET)
    await enable_events(qmp)
    await send_fd(qmp, fd, _FD_NAME)
    with qmp.listen("MIGRATION") as watch:
        await qmp.execute("migrate-incoming", {"uri": f"fd:{_FD_NAME}"})
        await wait_migration(qmp, watch, what, timeout, None, started)
    if saveimage.file_identity(fd) != checked:
        raise FormatError(source, start, "stream",
                          "the file changed after it was checked and while QEMU read it; "
                          "its state was not used")


async def write_stream(qmp: Qmp, fd: int, *, timeout: float = 300.0,
                       at_switchover: Callable[[], Awaitable[None]] | None = None,
                       ) -> saveimage.StreamSummary:
    """Write QEMU's state to the empty file ``fd`` as a checked VM state file (a
    snapshot's memory file): :data:`~xenlab.vm.migration.image.STREAM_MAGIC`, QEMU's
    stream, the checksum table and trailer.

    The guest is left as the migration leaves it (postmigrate); see
    :func:`write_checked` for ``at_switchover`` and the errors.  The caller
    fsyncs and renames.
    """
    os.write(fd, saveimage.STREAM_MAGIC)
    return await write_checked(qmp, fd, seed=0, what="saving the VM state", timeout=timeout,
                               at_switchover=at_switchover)


async def load_stream(qmp: Qmp, fd: int, *, timeout: float = 300.0,
                      source: str = "VM state") -> None:
    """Load QEMU's state from the VM state file ``fd``: one from :func:`write_stream`,
    checked whole first, or (older files) QEMU's raw stream, unchecked, with a warning.

    QEMU waits with ``-incoming defer`` and is left paused.  Call
    :func:`~xenlab.vm.migration.image.check_stream_file` before starting QEMU, to
    refuse a damaged file before there is a QEMU to stop; this checks again,
    on the descriptor QEMU gets.

    :raise FormatError: neither kind of file, damaged, cut short, or changed
        while QEMU read it.
    :raise BackendError: QEMU could not load it, or ``timeout`` passed.
    """
    checked = saveimage.file_identity(fd)
    summary = saveimage.check_stream_open(fd, source)
    if summary is None:
        _log.warning("%s: a VM state written before checksums: loaded unchecked", source)
        start = 0
    else:
        start = len(saveimage.STREAM_MAGIC)
    await load_checked(qmp, fd, start=start, checked=checked, source=source,
                       what=f"loading {source}", timeout=timeout)
