"""Disk mirroring: :func:`mirror` copies one disk of a domain to a new image and pivots.

``xenlab vm mirror DOM VDEV TARGET`` is libvirt's ``virsh blockcopy --pivot``
over QMP, in QEMU's documented steps (docs/interop/live-block-operations.rst);
a shut-off domain's disk is copied by ``qemu-img convert``.  The record
changes only once QEMU has confirmed the pivot, and then says where the disk
runs (:mod:`xenlab.vm.runtime`).  The steps, the refusals and what a killed
mirror leaves are in docs/snapshots.md ("Disk mirroring").
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xenlab import faults
from xenlab.atomic import FileWriteError
from xenlab.config.specs.disk import DiskFormat
from xenlab.errors import (
    BackendError,
    ConflictError,
    NotFoundError,
    StateError,
    UsageError,
    XenlabError,
)
from xenlab.vm import qemuimg
from xenlab.vm.backend import BlockCopyFailed, BlockCopyRequest, CopyProgress, MirrorProgress
from xenlab.vm.domain import SHUTOFF, Toolstack
from xenlab.vm.jobs import Job, job_of
from xenlab.vm.qemuimg import FORMAT_DRIVERS, ImageFileError
from xenlab.vm.runtime import DISK_NODES, DISK_PATHS, Runtime, disk_now
from xenlab.vm.snapbackends import glob_escape
from xenlab.vm.store import DomainRecord

__all__ = [
    "DISK_NODES",
    "DISK_PATHS",
    "MirrorProgress",
    "MirrorResult",
    "mirror",
    "recover_job",
]

log = logging.getLogger(__name__)


_FORMATS = ("qcow2", "raw")
_POLL = 0.1
# How long a recovery waits for QEMU to end a mirror job a killed verb left.
_SETTLE = 120.0


@dataclass(frozen=True, slots=True)
class MirrorResult:
    """What a finished mirror did.

    ``record`` is the domain's record afterwards; ``source`` the file the
    disk was on; ``pivoted`` whether the guest now uses ``target``;
    ``bytes`` the job's final length (what it copied, guest writes included).
    """

    record: DomainRecord
    vdev: str
    source: str
    target: str
    format: str
    pivoted: bool
    bytes: int
    seconds: float


Progress = CopyProgress


async def mirror(
    ts: Toolstack, name: str, vdev: str, target: Path, *, format: str = "qcow2",
    pivot: bool = True, bandwidth: int | None = None, timeout: float = 600.0,
    progress: Progress | None = None,
) -> MirrorResult:
    """Copy disk ``vdev`` of running domain ``name`` to new image ``target``, then pivot.

    ``format`` is the target's ("qcow2" or "raw").  A shut-off domain's
    disk is copied with ``qemu-img convert`` instead (see the module
    docstring).  With ``pivot`` the guest
    goes on with ``target`` as its disk (recorded in the domain record, see
    the module docstring); without, ``target`` is a copy of the disk as it
    was when the mirror converged.  ``bandwidth`` caps the copy in bytes/s
    (default: unlimited); ``timeout`` bounds the whole operation.

    CLI: ``xenlab vm mirror DOM VDEV TARGET [--no-pivot] [--format qcow2|raw]
    [--bandwidth BYTES] [--timeout SECONDS]`` (virsh blockcopy DOM DISK DEST
    --wait --pivot / --finish, and --bandwidth).

    :raise XenlabError: unknown domain or disk, a disk without media, a bad
        format, a ``target`` that exists or cannot be created (nothing changed).
    :raise StateError: the domain's QEMU is gone (stale), or ``pivot`` on a
        disk with external overlays or a domain with snapshots.
    :raise BackendError: QEMU failed the mirror or it did not finish within
        ``timeout`` (the domain runs on its disk as before, no target left),
        or QEMU died during it (the message says what became of the domain,
        the source disk and the target).
    """
    started = time.monotonic()
    if format not in _FORMATS:
        raise UsageError(f"mirror: target format {format!r}: expected one of "
                         f"{', '.join(_FORMATS)}")
    # QEMU runs daemonized in "/": a relative path would be its, not ours.
    target = Path(os.path.abspath(target))
    rec = ts.get(name)
    if rec.state == SHUTOFF:
        return await _mirror_offline(ts, rec, vdev, target, format, pivot, timeout, progress,
                               started)
    async with ts.live(name) as rec:
        source, source_fmt = _source_file(ts, rec, vdev, pivot)
        _check_new(target)
        h = ts.handle(rec)
        req = BlockCopyRequest(vdev, target, format, pivot, timeout, started, bandwidth,
                               progress)
        # The job first: a killed mirror is finished or undone by the next command.
        with ts.job(rec, "mirror", **_job_detail(vdev, source, source_fmt, target, format,
                                                 pivot)) as rec:
            faults.point("mirror.job")
            domid = rec.domid

            def note(fact: Mapping[str, Any]) -> None:
                ts.update_job(domid, **fact)

            try:
                node, length = await ts.backend.block_copy(h, req, note)
                if pivot:
                    faults.point("mirror.recording")
                    _record_pivot(ts, rec.domid, vdev, target, format, node)
            except BlockCopyFailed as err:
                failure = await _failed(ts, rec, vdev, source, source_fmt, target, format, err)
                raise failure from err
            except BaseException:
                # Interrupted (Ctrl-C), from the copy to its record: how far it got is the
                # backend's to say, as after a kill.  Settled now; if that fails too, the
                # job is handed to the next command instead of going with this block.
                if not await _settle_interrupted(ts, domid):
                    ts.hand_over_job(domid)
                raise
        rec = ts.store.get(rec.domid)
    return MirrorResult(rec, vdev, source, str(target), format, pivot, length,
                        time.monotonic() - started)


def _job_detail(vdev: str, source: str, source_fmt: str, target: Path, fmt: str,
                pivot: bool, *, offline: bool = False) -> dict[str, Any]:
    """What a recovery needs to know of a mirror (the module docstring)."""
    return {"vdev": vdev, "source": source, "source_format": source_fmt,
            "target": str(target), "format": fmt, "pivot": pivot,
            "creates_target": True, "offline": offline, "phase": "copying"}


async def _settle_interrupted(ts: Toolstack, domid: int) -> bool:
    """Finish or undo an interrupted mirror as :func:`recover_job` would; True when done.

    Never raises (the interruption is what the caller must see): a failure, or a second
    interruption meanwhile, is logged and answered False.
    """
    try:
        now = ts.store.get(domid)
        job = job_of(now)
        if job is not None:
            await recover_job(ts, now, job)
        return True
    except BaseException as err:
        log.warning("mirror: could not settle the interrupted copy (%s); the next command "
                    "finishes or undoes it", err or type(err).__name__)
        return False


def _check_new(target: Path) -> None:
    """Refuse a ``target`` that is there already (a dangling link too) or cannot be made.

    The target itself is made later, exclusively (``qemuimg.new_image``):
    this is the early, clear answer before any job or QEMU work.
    """
    if os.path.lexists(target):
        raise ConflictError("file", str(target),
                            f"mirror target {target} exists; give a new file name")
    if not target.parent.is_dir():
        raise UsageError(f"mirror target {target}: cannot create it: no directory "
                         f"{target.parent}")


def _source_file(ts: Toolstack, rec: DomainRecord, vdev: str, pivot: bool
                 ) -> tuple[str, str]:
    """(file, qemu-img format) disk ``vdev`` runs on now; refuses what cannot be mirrored
    (or pivoted).

    The format is the one the config or the record says, never probed: a guest
    owns every byte of a raw disk and could write a qcow2 header there that
    names a host file as its backing file.
    """
    dc, _ = ts.config_of(rec)
    disk = next((d for d in dc.disks if d.vdev == vdev), None)
    if disk is None:
        have = ", ".join(d.vdev for d in dc.disks) or "none"
        raise NotFoundError("disk", vdev,
                            f"domain {rec.name!r} has no disk {vdev!r} (its disks: {have})")
    if disk.is_cdrom or not disk.pdev_path or disk.format is DiskFormat.EMPTY:
        raise UsageError(f"disk {vdev} of {rec.name!r} is a cdrom or has no medium: "
                         "only disk images are mirrored")
    now = disk_now(Runtime.of(rec), vdev, disk.pdev_path, disk.format.value)
    if pivot:
        if now.overlay:
            raise StateError(
                f"disk {vdev} of {rec.name!r} runs on an external snapshot overlay "
                f"({now.file}): a pivot would leave the snapshot behind; "
                "delete the external snapshots first, or mirror with --no-pivot for a copy"
            )
        snaps = ts.store.list_snapshots(rec.domid)
        if snaps:
            raise StateError(
                f"domain {rec.name!r} has {len(snaps)} snapshot(s), which live in its "
                "current disk files: a pivot would leave them behind; delete them first, "
                "or mirror with --no-pivot for a copy"
            )
    try:
        fmt = DiskFormat(now.format)
    except ValueError:
        fmt = DiskFormat.UNKNOWN
    return now.file, _driver(fmt, rec, vdev)


def _driver(fmt: DiskFormat, rec: DomainRecord, vdev: str) -> str:
    """QEMU's name for disk format ``fmt``; refuses a format xenlab does not run."""
    driver = FORMAT_DRIVERS.get(fmt)
    if driver is None:
        raise UsageError(f"disk {vdev} of {rec.name!r}: format {fmt.value!r}, expected one "
                         f"of {', '.join(f.value for f in FORMAT_DRIVERS)}")
    return driver


def _record_pivot(ts: Toolstack, domid: int, vdev: str, target: Path, fmt: str,
                  node: str | None) -> DomainRecord:
    rec = ts.store.get(domid)
    changes: dict[str, Any] = {DISK_PATHS: {**(rec.extra.get(DISK_PATHS) or {}),
                                            vdev: {"file": str(target), "format": fmt}}}
    if node is not None:
        changes[DISK_NODES] = {**(rec.extra.get(DISK_NODES) or {}), vdev: node}
    return ts.store.patch(domid, extra_set=changes)


# --- a shut-off domain: qemu-img convert ------------------------------------------------

async def _mirror_offline(ts: Toolstack, rec: DomainRecord, vdev: str, target: Path, fmt: str,
                    pivot: bool, timeout: float, progress: Progress | None,
                    started: float) -> MirrorResult:
    async with ts.locked(str(rec.domid)) as rec:
        if rec.state != SHUTOFF:
            raise StateError(f"domain {rec.name!r} was started meanwhile; mirror again")
        source, source_fmt = _source_file(ts, rec, vdev, pivot)
        size = await _virtual_size(source, source_fmt)
        _check_new(target)
        with ts.job(rec, "mirror", **_job_detail(vdev, source, source_fmt, target, fmt, pivot,
                                                 offline=True)) as rec:
            faults.point("mirror.job")
            try:
                # The target appears whole (fsynced, then linked, the directory
                # fsynced) or not at all: the record never names a partial copy.
                await _convert(source, source_fmt, target, fmt, vdev, size, timeout, progress,
                         started)
            except BaseException as err:
                what = f"mirror {rec.name} {vdev} -> {target} failed"
                if isinstance(err, ImageFileError):
                    raise UsageError(f"mirror target {target}: {err.detail}") from err
                if isinstance(err, OSError):
                    raise FileWriteError(what, f"{err.strerror or err}; {rec.name} stays on "
                                               f"{source}") from err
                if isinstance(err, XenlabError):
                    raise BackendError(f"{what}: {err}; {rec.name} stays on {source}"
                                       ) from err
                raise
            faults.point("mirror.copied")
            if pivot:
                _record_pivot(ts, rec.domid, vdev, target, fmt, None)
        rec = ts.store.get(rec.domid)
    return MirrorResult(rec, vdev, source, str(target), fmt, pivot, size,
                        time.monotonic() - started)


async def _virtual_size(image: str, fmt: str) -> int:
    return await qemuimg.virtual_size(image, fmt)


async def _convert(source: str, source_fmt: str, out: Path, fmt: str, vdev: str, size: int,
             timeout: float, progress: Progress | None, started: float) -> None:
    """``qemu-img convert`` ``source`` (of format ``source_fmt``) to ``out``, reporting progress."""

    def report(percent: float) -> None:
        faults.point("mirror.converting")
        if progress is not None:
            progress(MirrorProgress(vdev, "copying", int(size * percent / 100), size, False,
                                    time.monotonic() - started))

    await qemuimg.convert(source, source_fmt, out, fmt, timeout=timeout, progress=report)
    if progress is not None:
        progress(MirrorProgress(vdev, "concluded", size, size, True,
                                time.monotonic() - started))


# --- failures ------------------------------------------------------------------------


async def _failed(ts: Toolstack, rec: DomainRecord, vdev: str, source: str, source_fmt: str,
            target: Path, fmt: str, run: BlockCopyFailed) -> BaseException:
    """Leave things consistent after a failed mirror; the error to raise, saying what happened."""
    what = f"mirror {rec.name} {vdev} -> {target}"
    deadline = time.monotonic() + 5
    # A killed QEMU drops its socket a moment before its pid disappears.
    while run.lost and ts.alive(rec) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if ts.alive(rec):
        if run.pivoted:
            # The guest writes to the target now: the record must say so.
            _record_pivot(ts, rec.domid, vdev, target, fmt, run.node)
            msg = f"{what}: {run}; the disk did switch to {target} (recorded)"
        else:
            msg = f"{what} failed: {run}; {rec.name} still runs on {source}"
            if run.created:
                qemuimg.remove_own(target)
                msg += f", and {target} was removed"
        return BackendError(msg)
    notes = [f"QEMU exited during the mirror ({run})"]
    if run.pivot_asked:
        notes.append(f"the pivot had been asked, so {target} is kept (it may hold the "
                     f"guest's last writes) but the domain stays recorded on {source}")
    elif run.created:
        qemuimg.remove_own(target)
        notes.append(f"the unfinished {target} was removed")
    notes.append(await _check_source(source, source_fmt))
    await ts.gone(ts.store.get(rec.domid))
    kept = any(r.domid == rec.domid for r in ts.store.list())
    notes.append(f"{rec.name} is now shut off (it has snapshots)" if kept
                 else f"{rec.name} is gone from the store")
    return BackendError(f"{what}: " + "; ".join(notes))


async def _check_source(source: str, fmt: str) -> str:
    """``qemu-img check -r leaks`` the source (a killed QEMU may leak clusters); what it found.

    ``fmt`` is the source's format, never probed (a guest could make a raw
    disk look like a qcow2 whose "repair" would write into it).
    """
    try:
        result = await qemuimg.check(source, fmt, repair=True)
    except XenlabError as err:
        return f"the source {source} could not be checked ({err})"
    if not result.checked:  # raw: no metadata to check
        return f"the source {source} is unchanged (a mirror only reads it)"
    if result.ok:
        return (f"the source {source} passes qemu-img check"
                + (" (leaked clusters repaired)" if result.repaired else ""))
    return (f"the source {source} FAILS qemu-img check: "
            f"{result.message.splitlines()[-1:]}")


# --- a killed mirror --------------------------------------------------------------------


async def recover_job(ts: Toolstack, rec: DomainRecord, job: Job) -> DomainRecord | None:
    """Finish or undo a mirror whose process was killed (``Toolstack.converge`` calls this).

    The truth comes from QEMU (see the module docstring): the device on the
    target means finished (the pivot recorded), anything else undone (QEMU's
    mirror job cancelled and dismissed, the target's nodes deleted, the
    target removed).  Every step is logged as a warning.
    """
    if job.verb != "mirror":
        return rec
    d = job.detail
    vdev, target = str(d.get("vdev", "")), str(d.get("target", ""))
    fmt, pivot = str(d.get("format", "qcow2")), bool(d.get("pivot"))
    where = f"domain {rec.name}: mirror of {vdev} to {target}"
    if not vdev or not target:
        return rec
    if d.get("offline"):
        return _recover_offline(ts, rec, job, where)
    if rec.state == SHUTOFF or not ts.alive(rec):
        # QEMU died as well: nothing runs on the target, and the domain is stale
        # (destroy or list clears it) on the source it is recorded on.
        if pivot and d.get("phase") == "completing":
            log.warning("%s: killed while QEMU pivoted, and QEMU is gone too; %s is kept (it "
                        "may hold the guest's last writes) but the domain stays recorded on "
                        "%s: compare them before you start it", where, target, d.get("source"))
        elif d.get("creates_target") and qemuimg.remove_own(target):
            log.warning("%s: killed, and QEMU is gone too; the unfinished %s was removed",
                        where, target)
        return ts.store.get(rec.domid)
    # A pivot already asked for is let finish; anything else is cancelled.
    complete = pivot and d.get("phase") == "completing"
    node = await (ts.backend.end_block_copy(ts.handle(rec), vdev, str(d.get("source", "")),
                                                target, complete=complete))
    if node is not None:
        _record_pivot(ts, rec.domid, vdev, Path(target), fmt, node)
        log.warning("%s: a mirror killed after QEMU pivoted is finished: the guest writes to "
                    "%s, and the record now says so", where, target)
    else:
        removed = bool(d.get("creates_target")) and qemuimg.remove_own(target)
        log.warning("%s: a mirror killed before %s is undone: QEMU's mirror job and the "
                    "target's nodes are gone, the guest keeps %s%s", where,
                    "the pivot" if pivot else "it ended", d.get("source"),
                    f", and {target} was removed" if removed else "")
    return ts.store.get(rec.domid)


def _recover_offline(ts: Toolstack, rec: DomainRecord, job: Job, where: str
                     ) -> DomainRecord:
    """A killed copy of a shut-off domain: finished when its target is there, else undone."""
    d = job.detail
    target = Path(str(d["target"]))
    for part in target.parent.glob(glob_escape(f".{target.name[:200]}.") + "*.part"):
        qemuimg.remove_own(part)  # what a copy killed half-way wrote
    moved = (rec.extra.get(DISK_PATHS) or {}).get(str(d["vdev"])) or {}
    # The target appears only whole (fsynced, then linked): there means done.
    if not _own_file(target):
        log.warning("%s: a copy killed before it was whole is undone; the domain stays on "
                    "%s", where, d.get("source"))
    elif not d.get("pivot"):
        log.warning("%s: a copy killed after it was whole is finished: %s is kept", where,
                    target)
    elif moved.get("file") != str(target):
        _record_pivot(ts, rec.domid, str(d["vdev"]), target, str(d.get("format", "qcow2")),
                      None)
        log.warning("%s: a copy killed after it was whole is finished: the domain runs on "
                    "%s from its next start, as the record now says", where, target)
    return ts.store.get(rec.domid)


def _own_file(path: Path) -> bool:
    """True when ``path`` is a regular file of this user (not a link planted there)."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return path.is_file() and not path.is_symlink() and st.st_uid == os.geteuid()
