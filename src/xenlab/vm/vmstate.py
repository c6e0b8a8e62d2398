"""QEMU's VM state stream over QMP: :func:`write_frames` / :func:`feed_frames` (checksummed
files), :func:`write_stream` / :func:`load_stream` (for snapshot memory files), and the
migration helpers save, restore and migrate share (:func:`wait_migration`, ...).

QEMU never touches a xenlab file directly.  Saving, it writes its stream into
a pipe handed over with ``getfd`` (migration URI ``fd:NAME``); a thread reads
the pipe and writes :mod:`~xenlab.vm.saveimage` frames, each with its XXH64
checksum, and the trailer once QEMU reports the migration completed.
Loading, a thread checks each frame and only then writes its data into the
pipe QEMU reads; the caller has checked the whole file before it started
QEMU (:func:`~xenlab.vm.saveimage.check_image`), so a damaged file never
reaches QEMU, and a file changed between the two passes stops at the first
bad frame: QEMU's load then fails on a stream that ends early.

Rules: the threads poll with a short timeout and stop when told, so no
coroutine here returns while one of its threads still runs (asyncio.run
waits for them); every pipe end is closed on every path.  Waiting on QEMU
is by its MIGRATION events (the ``events`` capability), as a one-shot QMP
client does; ``query-migrate`` is asked once at the end, or every
``_TICK`` seconds when a progress callback wants figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import select
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, Final

from xenlab.errors import BackendError, FormatError
from xenlab.vm import saveimage
from xenlab.vm.qmp import EventWatch, Qmp

__all__ = [
    "UNLIMITED",
    "MigrationProgress",
    "Progress",
    "cancel_migration",
    "cont_after_migration",
    "enable_events",
    "feed_frames",
    "load_stream",
    "qemu_version",
    "query_migrate",
    "send_fd",
    "status",
    "wait_migration",
    "write_frames",
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
# How often a save starts the kernel writing out what QEMU wrote so far.
_KICK: Final = 0.005
# How long the pipe threads sleep in poll() before looking at their stop flag.
_THREAD_POLL: Final = 0.1
# After QEMU says "completed" it closes its end of the pipe at once; the
# pump then drains what is left.  Far more than that takes.
_DRAIN_TIMEOUT: Final = 60.0
_F_SETPIPE_SZ: Final = 1031
_FD_NAME: Final = "xenlab-vmstate"


@dataclass(frozen=True, slots=True)
class MigrationProgress:
    """One progress report: ``phase`` is "storage" (disk mirrors) or "memory".

    Byte counts are QEMU's: for memory, RAM transferred and remaining of
    ``total``; for storage, the mirrors' offsets summed over all disks.
    """

    phase: str
    status: str
    transferred: int
    remaining: int
    total: int
    elapsed: float


Progress = Callable[[MigrationProgress], None]


# --- QMP helpers --------------------------------------------------------------------------


async def send_fd(qmp: Qmp, fd: int, name: str) -> None:
    """Hand ``fd`` to QEMU under ``name`` (SCM_RIGHTS, then ``getfd``)."""
    # Qmp has no fd passing of its own: the library's send_fd_scm on the
    # session's client, then getfd names the descriptor that came with it.
    try:
        qmp._client.send_fd_scm(fd)
    except Exception as err:  # the library's QMPError or an OSError from sendmsg
        raise BackendError(f"QMP getfd: cannot pass the file descriptor: {err}") from err
    await qmp.execute("getfd", {"fdname": name})


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


# --- the pipe between QEMU and a framed file ---------------------------------------------------


def _pipe() -> tuple[int, int]:
    """A pipe (read end, write end) with room for one frame, where the kernel allows it."""
    r, w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        # Fewer wake-ups per frame; above /proc/sys/fs/pipe-max-size it is refused.
        fcntl.fcntl(w, _F_SETPIPE_SZ, saveimage.FRAME_MAX)
    return r, w


def _feed(f: BinaryIO, w: int, *, seed: int, source: str, offset: int,
          stop: threading.Event) -> None:
    """Write the data of each checked frame of ``f`` into pipe ``w``; close ``w`` at the end.

    A damaged frame raises before any of its bytes are written, and closing
    the pipe then leaves QEMU with a stream that ends early.
    """
    try:
        os.set_blocking(w, False)
        poller = select.poll()
        poller.register(w, select.POLLOUT | select.POLLERR)
        for data in saveimage.iter_frames(f, seed=seed, source=source, offset=offset):
            view = data
            while view:
                if stop.is_set():
                    return
                if not poller.poll(_THREAD_POLL * 1000):
                    continue
                try:
                    n = os.write(w, view)
                except BlockingIOError:
                    continue
                view = view[n:]
    finally:
        os.close(w)


async def _race(migration: Awaitable[dict[str, Any]], thread: asyncio.Future[Any]
                ) -> dict[str, Any]:
    """Await ``migration``; if ``thread`` fails first, its error wins (the migration task is
    cancelled): a damaged frame or a full disk says more than QEMU's broken stream."""
    task = asyncio.ensure_future(migration)
    try:
        await asyncio.wait({task, thread}, return_when=asyncio.FIRST_COMPLETED)
        if thread.done() and thread.exception() is not None and not task.done():
            raise thread.exception()  # type: ignore[misc]
        return await task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, BackendError):
                await task


async def write_frames(qmp: Qmp, fd: int, *, seed: int, what: str, timeout: float,
                       progress: Progress | None = None, started: float | None = None,
                       tick: Callable[[], None] | None = None,
                       at_switchover: Callable[[], Awaitable[None]] | None = None,
                       ) -> saveimage.StreamSummary:
    """Migrate QEMU's state into ``fd`` as checksummed frames, then the trailer.

    ``fd`` is written from its current offset.  QEMU writes into a pipe; the
    frames are written as the data comes, the trailer only once QEMU has
    reported the migration completed and closed its end.  With
    ``at_switchover`` QEMU pauses before the switch-over (its
    ``pause-before-switchover`` capability), the callback runs (the guest is
    stopped and its last pages not yet sent: a snapshot takes the disks
    here), and the migration goes on.  The events capability is turned on
    here.  Returns what the stream holds (``end`` counts from ``fd``'s offset).

    :raise BackendError: QEMU failed or cancelled the migration, or it took
        longer than ``timeout`` (the migration is cancelled; nothing is
        written after what QEMU had sent).
    :raise OSError: ``fd`` could not be written (a full disk).
    """
    started = time.monotonic() if started is None else started
    await enable_events(qmp)
    r, w = _pipe()
    try:
        await send_fd(qmp, w, _FD_NAME)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)  # QEMU holds its own copy now
    writer = saveimage.FrameWriter(fd, seed=seed)
    stop = threading.Event()
    loop = asyncio.get_running_loop()
    pumping = loop.run_in_executor(None, functools.partial(saveimage.pump, r, writer,
                                                           stop=stop, poll=_THREAD_POLL))
    done = False
    try:
        if at_switchover is not None:
            await qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "pause-before-switchover", "state": True}]})
        try:
            with qmp.listen("MIGRATION") as watch:
                await qmp.execute("migrate", {"uri": f"fd:{_FD_NAME}"})
                if at_switchover is not None:
                    await _race(wait_migration(qmp, watch, what, timeout, None, started,
                                               until=frozenset({"pre-switchover"})), pumping)
                    await at_switchover()
                    await qmp.execute("migrate-continue", {"state": "pre-switchover"})
                await _race(wait_migration(qmp, watch, what, timeout, progress, started,
                                           tick=tick), pumping)
        finally:
            if at_switchover is not None:
                with contextlib.suppress(BackendError):
                    await qmp.execute("migrate-set-capabilities", {"capabilities": [
                        {"capability": "pause-before-switchover", "state": False}]})
        try:
            await asyncio.wait_for(asyncio.shield(pumping), _DRAIN_TIMEOUT)
        except TimeoutError as err:
            raise BackendError(f"{what}: QEMU completed the migration but did not close "
                               f"its end of the stream within {_DRAIN_TIMEOUT:g}s") from err
        done = True
        return writer.finish()
    except BaseException:
        if not done:
            with contextlib.suppress(BackendError):
                await cancel_migration(qmp)
            with contextlib.suppress(BackendError):
                await qmp.execute("closefd", {"fdname": _FD_NAME})
        raise
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await pumping
        os.close(r)


async def feed_frames(qmp: Qmp, f: BinaryIO, *, seed: int, source: str, offset: int,
                      what: str, timeout: float) -> None:
    """Load QEMU's state from the framed stream ``f`` reads (positioned at its first frame,
    ``offset`` in ``source``), each frame checked before QEMU sees its bytes.

    QEMU must wait with ``-incoming defer``; it is left paused.

    :raise FormatError: a frame, the trailer or the end of ``f`` is wrong (the
        file changed since it was checked); QEMU got a stream that ends early.
    :raise BackendError: QEMU could not load the stream, or ``timeout`` passed.
    """
    started = time.monotonic()
    await enable_events(qmp)
    r, w = _pipe()
    try:
        await send_fd(qmp, r, _FD_NAME)
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    stop = threading.Event()
    loop = asyncio.get_running_loop()
    feeding = loop.run_in_executor(None, functools.partial(
        _feed, f, w, seed=seed, source=source, offset=offset, stop=stop))
    try:
        with qmp.listen("MIGRATION") as watch:
            await qmp.execute("migrate-incoming", {"uri": f"fd:{_FD_NAME}"})
            try:
                await _race(wait_migration(qmp, watch, what, timeout, None, started), feeding)
            except BackendError:
                # A stream cut by a damaged frame fails in QEMU too: the frame says why.
                if feeding.done() and isinstance(feeding.exception(), FormatError):
                    raise feeding.exception() from None  # type: ignore[misc]
                raise
        # QEMU took the whole stream; the feeder has still to check the trailer.
        await asyncio.wait_for(asyncio.shield(feeding), _DRAIN_TIMEOUT)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await feeding


async def write_stream(qmp: Qmp, fd: int, *, timeout: float = 300.0,
                       at_switchover: Callable[[], Awaitable[None]] | None = None,
                       ) -> saveimage.StreamSummary:
    """Write QEMU's state to ``fd`` as a bare framed stream (a snapshot's memory file):
    :data:`~xenlab.vm.saveimage.STREAM_MAGIC`, checksummed frames, trailer.

    The guest is left as the migration leaves it (postmigrate); see
    :func:`write_frames` for ``at_switchover`` and the errors.  The caller
    fsyncs and renames.
    """
    os.write(fd, saveimage.STREAM_MAGIC)
    return await write_frames(qmp, fd, seed=0, what="saving the VM state", timeout=timeout,
                              at_switchover=at_switchover)


async def load_stream(qmp: Qmp, fd: int, *, timeout: float = 300.0,
                      source: str = "VM state") -> None:
    """Load QEMU's state from ``fd`` (at its current offset): a framed stream from
    :func:`write_stream`, each frame checked before QEMU sees it, or (older files) QEMU's
    raw stream, unchecked, with a warning.  QEMU waits with ``-incoming defer`` and is
    left paused.  Check the file with :func:`~xenlab.vm.saveimage.check_stream_file`
    before starting QEMU.

    :raise FormatError: neither kind of stream, or a damaged frame.
    :raise BackendError: QEMU could not load it, or ``timeout`` passed.
    """
    head = os.pread(fd, len(saveimage.STREAM_MAGIC), os.lseek(fd, 0, os.SEEK_CUR))
    start = os.lseek(fd, 0, os.SEEK_CUR)
    if head.startswith(saveimage.QEMU_MAGIC):
        _log.warning("%s: an unframed VM state (written before checksums): loaded unchecked",
                     source)
        await enable_events(qmp)
        await send_fd(qmp, fd, _FD_NAME)
        with qmp.listen("MIGRATION") as watch:
            await qmp.execute("migrate-incoming", {"uri": f"fd:{_FD_NAME}"})
            await wait_migration(qmp, watch, f"loading {source}", timeout, None,
                                 time.monotonic())
        return
    if head != saveimage.STREAM_MAGIC:
        raise FormatError(source, start, "magic", f"found {head!r}, expected "
                          f"{saveimage.STREAM_MAGIC!r}: not a xenlab VM state")
    with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
        f.seek(start + len(saveimage.STREAM_MAGIC))
        await feed_frames(qmp, f, seed=0, source=source,
                          offset=start + len(saveimage.STREAM_MAGIC),
                          what=f"loading {source}", timeout=timeout)
