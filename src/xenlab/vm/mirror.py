"""Disk mirroring: :func:`mirror` copies one disk of a domain to a new image and pivots.

``xenlab vm mirror DOM VDEV TARGET`` is libvirt's ``virsh blockcopy
--pivot`` over QMP, in QEMU's documented steps
(docs/interop/live-block-operations.rst):

1. ``TARGET`` is created (``qemu-img create``, the source's virtual size;
   an existing file is refused, never overwritten) and attached as a
   blockdev of its own, ``<vdev>--mirror<N>`` (the double dash cannot come
   from a snapshot name, so an external snapshot's overlay node never
   collides with it).
2. ``blockdev-mirror sync=full`` from the node the guest's device is
   attached to *now* (``query-block``): ``<vdev>-fmt`` on a fresh domain,
   an earlier mirror's target after a pivot.  Progress is the job's
   ``offset``/``len`` from ``query-block-jobs``.
3. Once the job is ready (source and target equal, guest writes going to
   both) ``job-complete`` pivots: the device now writes to the target; the
   old nodes are deleted so QEMU closes the old file.  Without ``pivot``,
   ``block-job-cancel`` ends a ready mirror cleanly instead: the target is
   a full copy as of that instant, detached and closed, and the guest keeps
   its disk.

After a pivot the domain record says where the disk went:
``extra["disk_paths"][vdev] = {"file": TARGET, "format": FMT}`` (which a
later ``create`` must use instead of the config's file) and
``extra["disk_nodes"][vdev]`` the target's node name (valid while this QEMU
runs).  The record changes only once QEMU has confirmed the pivot, so it
never names a file the guest does not use.

A shut-off domain (defined, or kept for its snapshots or mirrored disks)
has no QEMU to mirror with: its disk is copied with ``qemu-img convert``
(``-p``'s percentages are the progress) into a temporary file beside
``TARGET``, which is fsynced and renamed over the (empty, ``O_EXCL``-made)
target once whole, the directory fsynced, and the record then says where
the disk is, as after a live pivot; the next ``create`` boots on it.  A
failed copy removes both files and leaves the record as it was.  qemu-img
is always told the source's format (``-f``, from the config or the record),
never left to probe it: a guest owns every byte of a raw disk, and a qcow2
header it wrote there could name a host file as backing file.

A pivot is refused on a disk running on external snapshot overlays and on a
domain with snapshots: their records name the current files, which the guest
would leave behind (``pivot=False`` copies such a disk, overlays flattened).

Failures
    A mirror that fails while QEMU lives (a job error, the timeout, an
    interrupt) is cancelled, the target detached and deleted: the domain
    runs on its disk as before.  If QEMU dies in the middle the source disk
    (which a mirror only reads) is checked and its leaked clusters repaired,
    the domain leaves the store like any domain whose QEMU is gone (kept
    shut off if it has snapshots), the unfinished target is deleted, or kept
    with a warning when the pivot had already been asked, and the error says
    all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xenlab.atomic import fsync_dir
from xenlab.config.specs.disk import DiskFormat
from xenlab.errors import BackendError, StateError, XenlabError
from xenlab.vm import qemuimg
from xenlab.vm.domain import SHUTOFF, Toolstack
from xenlab.vm.qemu import RuntimePaths
from xenlab.vm.qemuimg import FORMAT_DRIVERS
from xenlab.vm.qmp import Qmp
from xenlab.vm.qmp import run as _run_async
from xenlab.vm.store import DomainRecord, is_alive

__all__ = [
    "DISK_NODES",
    "DISK_PATHS",
    "MirrorProgress",
    "MirrorResult",
    "mirror",
]

# Record keys: where a pivoted disk lives now (kept across restarts), and the
# QEMU node the device uses (meaningful for the running QEMU only).
DISK_PATHS = "disk_paths"
DISK_NODES = "disk_nodes"
# The same key vm.snapshot keeps its external overlays under.
_OVERLAYS = "overlays"

_FORMATS = ("qcow2", "raw")
_POLL = 0.1


@dataclass(frozen=True, slots=True)
class MirrorProgress:
    """One progress report of a mirror: bytes ``done`` of ``total`` (QEMU's offset/len)."""

    vdev: str
    status: str
    done: int
    total: int
    ready: bool
    elapsed: float


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


Progress = Callable[[MirrorProgress], None]


@dataclass(slots=True)
class _Run:
    """How far a mirror got, for the error path."""

    node: str = ""
    pivot_asked: bool = False
    pivoted: bool = False
    length: int = 0
    lost: bool = False  # the QMP session broke off


def mirror(
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
        raise XenlabError(f"mirror: target format {format!r}: expected one of "
                          f"{', '.join(_FORMATS)}")
    # QEMU runs daemonized in "/": a relative path would be its, not ours.
    target = Path(os.path.abspath(target))
    rec = ts.get(name)
    if rec.state == SHUTOFF:
        return _mirror_offline(ts, rec, vdev, target, format, pivot, timeout, progress,
                               started)
    with ts.live(name) as rec:
        source, source_fmt = _source_file(ts, rec, vdev, pivot)
        _claim(target)
        run = _Run()
        try:
            _run_async(_mirror(ts.paths(rec), vdev, target, format, pivot, bandwidth,
                               timeout, progress, started, run))
        except BaseException as err:
            raise _failed(ts, rec, vdev, source, source_fmt, target, format, run, err) from err
        if run.pivoted:
            rec = _record_pivot(ts, rec.domid, vdev, target, format, run.node)
        else:
            rec = ts.store.get(rec.domid)
    return MirrorResult(rec, vdev, source, str(target), format, run.pivoted, run.length,
                        time.monotonic() - started)


def _claim(target: Path) -> None:
    """Make ``target`` empty and ours (O_EXCL: nobody else's file is overwritten).

    The directory is fsynced: a live mirror's record will name this very
    file (QEMU writes into it, the name stays), so its entry must outlive a
    power cut before that.
    """
    if target.exists() or target.is_symlink():
        raise XenlabError(f"mirror target {target} exists; give a new file name")
    try:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except OSError as err:
        raise XenlabError(f"mirror target {target}: cannot create it: "
                          f"{err.strerror or err}") from err
    try:
        fsync_dir(target.parent)
    except OSError as err:
        target.unlink(missing_ok=True)
        raise XenlabError(f"mirror target {target}: cannot sync its directory: "
                          f"{err.strerror or err}") from err


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
        raise XenlabError(f"domain {rec.name!r} has no disk {vdev!r} (its disks: {have})")
    if disk.is_cdrom or not disk.pdev_path or disk.format is DiskFormat.EMPTY:
        raise XenlabError(f"disk {vdev} of {rec.name!r} is a cdrom or has no medium: "
                          "only disk images are mirrored")
    overlays: Mapping[str, Mapping[str, str]] = rec.extra.get(_OVERLAYS) or {}
    if pivot:
        if vdev in overlays:
            raise StateError(
                f"disk {vdev} of {rec.name!r} runs on an external snapshot overlay "
                f"({overlays[vdev].get('file')}): a pivot would leave the snapshot behind; "
                "delete the external snapshots first, or mirror with --no-pivot for a copy"
            )
        snaps = ts.store.list_snapshots(rec.domid)
        if snaps:
            raise StateError(
                f"domain {rec.name!r} has {len(snaps)} snapshot(s), which live in its "
                "current disk files: a pivot would leave them behind; delete them first, "
                "or mirror with --no-pivot for a copy"
            )
    if vdev in overlays:
        # vm.snapshot's overlays are always qcow2.
        return str(overlays[vdev]["file"]), _driver(DiskFormat.QCOW2, rec, vdev)
    moved: Mapping[str, Mapping[str, str]] = rec.extra.get(DISK_PATHS) or {}
    if vdev in moved:
        try:
            fmt = DiskFormat(str(moved[vdev].get("format") or DiskFormat.QCOW2.value))
        except ValueError:
            fmt = DiskFormat.UNKNOWN
        return str(moved[vdev]["file"]), _driver(fmt, rec, vdev)
    return disk.pdev_path, _driver(disk.format, rec, vdev)


def _driver(fmt: DiskFormat, rec: DomainRecord, vdev: str) -> str:
    """QEMU's name for disk format ``fmt``; refuses a format xenlab does not run."""
    driver = FORMAT_DRIVERS.get(fmt)
    if driver is None:
        raise XenlabError(f"disk {vdev} of {rec.name!r}: format {fmt.value!r}, expected one "
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

def _mirror_offline(ts: Toolstack, rec: DomainRecord, vdev: str, target: Path, fmt: str,
                    pivot: bool, timeout: float, progress: Progress | None,
                    started: float) -> MirrorResult:
    with ts.locked(str(rec.domid)) as rec:
        if rec.state != SHUTOFF:
            raise StateError(f"domain {rec.name!r} was started meanwhile; mirror again")
        source, source_fmt = _source_file(ts, rec, vdev, pivot)
        size = _virtual_size(source, source_fmt)
        _claim(target)
        tmp: Path | None = None
        try:
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part",
                                        dir=target.parent)
            os.close(fd)
            tmp = Path(name)
            _convert(source, source_fmt, tmp, fmt, vdev, size, timeout, progress, started)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                # Once, before the rename: the copy is whole on disk when the
                # record starts naming it.
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
            tmp = None
            # The rename must be on disk before the record names the file: else
            # a power cut could leave the record on the empty claimed file.
            fsync_dir(target.parent)
        except BaseException as err:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            target.unlink(missing_ok=True)
            what = f"mirror {rec.name} {vdev} -> {target} failed"
            if isinstance(err, OSError):
                raise XenlabError(f"{what}: {err.strerror or err}; {rec.name} stays on "
                                  f"{source}") from err
            if isinstance(err, XenlabError):
                raise BackendError(f"{what}: {err}; {rec.name} stays on {source}") from err
            raise
        if pivot:
            rec = _record_pivot(ts, rec.domid, vdev, target, fmt, None)
    return MirrorResult(rec, vdev, source, str(target), fmt, pivot, size,
                        time.monotonic() - started)


def _virtual_size(image: str, fmt: str) -> int:
    return qemuimg.virtual_size(image, fmt)


def _convert(source: str, source_fmt: str, out: Path, fmt: str, vdev: str, size: int,
             timeout: float, progress: Progress | None, started: float) -> None:
    """``qemu-img convert`` ``source`` (of format ``source_fmt``) to ``out``, reporting progress."""

    def report(percent: float) -> None:
        if progress is not None:
            progress(MirrorProgress(vdev, "copying", int(size * percent / 100), size, False,
                                    time.monotonic() - started))

    qemuimg.convert(source, source_fmt, out, fmt, timeout=timeout, progress=report)
    if progress is not None:
        progress(MirrorProgress(vdev, "concluded", size, size, True,
                                time.monotonic() - started))


# --- the QMP side --------------------------------------------------------------------


async def _device_node(qmp: Qmp, vdev: str) -> str | None:
    """The node the guest's device ``vdev`` is attached to, as QEMU says."""
    blocks = await qmp.execute("query-block")
    for b in blocks if isinstance(blocks, list) else ():
        qdev = str(b.get("qdev", ""))
        if qdev == vdev or qdev.startswith(f"/machine/peripheral/{vdev}/") or \
                b.get("device") == vdev:
            inserted = b.get("inserted") or {}
            return str(inserted["node-name"]) if inserted.get("node-name") else None
    return None


def _file_child(node: str) -> str:
    # vm.qemu names a disk's pair <vdev>-file/<vdev>-fmt; we add <node>/<node>-file.
    return node[:-4] + "-file" if node.endswith("-fmt") else f"{node}-file"


async def _mirror(paths: RuntimePaths, vdev: str, target: Path, fmt: str, pivot: bool,
                  bandwidth: int | None, timeout: float, progress: Progress | None,
                  started: float, run: _Run) -> None:
    deadline = time.monotonic() + timeout
    job = f"mirror-{vdev}"
    async with Qmp.open(paths.qmp) as qmp:
        src = await _device_node(qmp, vdev)
        if src is None:
            raise BackendError(f"QEMU has no device {vdev} with a medium")
        nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
        listed = [n for n in nodes if isinstance(n, dict)] if isinstance(nodes, list) else []
        names = {str(n.get("node-name")) for n in listed}
        sizes = [int(n["image"]["virtual-size"]) for n in listed if n.get("node-name") == src]
        if not sizes:
            raise BackendError(f"QEMU has no block node {src} (the disk of {vdev})")
        size = sizes[0]
        n = 1
        while f"{vdev}--mirror{n}" in names or f"{vdev}--mirror{n}-file" in names:
            n += 1
        node = f"{vdev}--mirror{n}"
        qemuimg.create(target, fmt, size)
        added = False
        running = False
        try:
            await qmp.execute("blockdev-add", {
                "driver": fmt, "node-name": node,
                "file": {"driver": "file", "filename": str(target), "node-name": f"{node}-file"},
            })
            added = True
            await qmp.execute("blockdev-mirror", {
                "job-id": job, "device": src, "target": node, "sync": "full",
                "speed": bandwidth or 0,
                # kept after it ends, so its error can be read
                "auto-dismiss": False,
            })
            running = True
            info = await _wait_ready(qmp, job, vdev, deadline, timeout, progress, started)
            run.length = int(info.get("len", 0))
            if pivot:
                run.pivot_asked = True
                await qmp.execute("job-complete", {"id": job})
            else:
                # A ready mirror cancelled completes without switching the device.
                await qmp.execute("block-job-cancel", {"device": job})
            final = await _wait_concluded(qmp, job, deadline, timeout)
            running = False
            if final.get("error"):
                raise BackendError(f"mirror job failed: {final['error']}")
            run.length = int(final.get("len", run.length))
            if pivot:
                now = await _device_node(qmp, vdev)
                if now != node:
                    raise BackendError(f"the pivot did not happen: {vdev} is on {now}")
                run.node, run.pivoted = node, True
                # Nothing uses the old nodes now; deleting them closes the old file.
                with contextlib.suppress(BackendError):
                    await _del_nodes(qmp, src)
            else:
                await _del_nodes(qmp, node)
                added = False
        except BaseException:
            if not qmp.connected:
                run.lost = True
                raise
            if running:
                with contextlib.suppress(BackendError):
                    await qmp.execute("block-job-cancel", {"device": job, "force": True})
                with contextlib.suppress(BackendError):
                    await _wait_concluded(qmp, job, time.monotonic() + 30, 30)
            with contextlib.suppress(BackendError):
                if run.pivot_asked and await _device_node(qmp, vdev) == node:
                    run.node, run.pivoted = node, True
            if added and not run.pivoted:
                with contextlib.suppress(BackendError):
                    await _del_nodes(qmp, node)
            raise


async def _del_nodes(qmp: Qmp, node: str) -> None:
    # Our file node was defined inside the blockdev-add, so it goes with its
    # parent; vm.qemu's pairs are two -blockdev options and need both dels.
    await qmp.execute("blockdev-del", {"node-name": node})
    with contextlib.suppress(BackendError):
        await qmp.execute("blockdev-del", {"node-name": _file_child(node)})


async def _job(qmp: Qmp, job: str) -> dict[str, Any] | None:
    jobs = await qmp.execute("query-block-jobs")
    for j in jobs if isinstance(jobs, list) else ():
        if isinstance(j, dict) and j.get("device") == job:
            return j
    return None


async def _wait_ready(qmp: Qmp, job: str, vdev: str, deadline: float, timeout: float,
                      progress: Progress | None, started: float) -> dict[str, Any]:
    while True:
        info = await _job(qmp, job)
        if info is None:
            raise BackendError(f"mirror job {job} vanished before it was ready")
        status = str(info.get("status"))
        if info.get("error") or status in ("aborting", "concluded", "null"):
            raise BackendError(f"mirror job {job} failed: "
                               f"{info.get('error', 'it ended before it was ready')}")
        if progress is not None:
            progress(MirrorProgress(vdev, status, int(info.get("offset", 0)),
                                    int(info.get("len", 0)), bool(info.get("ready")),
                                    time.monotonic() - started))
        if info.get("ready"):
            return info
        if time.monotonic() > deadline:
            raise BackendError(f"mirror not ready within {timeout:g}s "
                               f"({info.get('offset')} of {info.get('len')} bytes copied)")
        await asyncio.sleep(_POLL)


async def _wait_concluded(qmp: Qmp, job: str, deadline: float, timeout: float
                          ) -> dict[str, Any]:
    """Wait until ``job`` has concluded, dismiss it; its last state."""
    while True:
        info = await _job(qmp, job)
        if info is None:
            return {}
        if info.get("status") == "concluded":
            await qmp.execute("job-dismiss", {"id": job})
            return info
        if time.monotonic() > deadline:
            raise BackendError(f"mirror job {job} did not end within {timeout:g}s "
                               f"(status {info.get('status')})")
        await asyncio.sleep(_POLL)


# --- failures ------------------------------------------------------------------------


def _failed(ts: Toolstack, rec: DomainRecord, vdev: str, source: str, source_fmt: str,
            target: Path, fmt: str, run: _Run, err: BaseException) -> BaseException:
    """Leave things consistent after a failed mirror; the error to raise, saying what happened."""
    what = f"mirror {rec.name} {vdev} -> {target}"
    deadline = time.monotonic() + 5
    # A killed QEMU drops its socket a moment before its pid disappears.
    while run.lost and is_alive(rec) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_alive(rec):
        if run.pivoted:
            # The guest writes to the target now: the record must say so.
            _record_pivot(ts, rec.domid, vdev, target, fmt, run.node)
            msg = f"{what}: {err}; the disk did switch to {target} (recorded)"
        else:
            target.unlink(missing_ok=True)
            msg = (f"{what} failed: {err}; {rec.name} still runs on {source}, "
                   f"and {target} was removed")
        return BackendError(msg) if isinstance(err, Exception) else err
    notes = [f"QEMU exited during the mirror ({err})"]
    if run.pivot_asked:
        notes.append(f"the pivot had been asked, so {target} is kept (it may hold the "
                     f"guest's last writes) but the domain stays recorded on {source}")
    else:
        target.unlink(missing_ok=True)
        notes.append(f"the unfinished {target} was removed")
    notes.append(_check_source(source, source_fmt))
    ts.gone(ts.store.get(rec.domid))
    kept = any(r.domid == rec.domid for r in ts.store.list())
    notes.append(f"{rec.name} is now shut off (it has snapshots)" if kept
                 else f"{rec.name} is gone from the store")
    msg = f"{what}: " + "; ".join(notes)
    return BackendError(msg) if isinstance(err, Exception) else err


def _check_source(source: str, fmt: str) -> str:
    """``qemu-img check -r leaks`` the source (a killed QEMU may leak clusters); what it found.

    ``fmt`` is the source's format, never probed (a guest could make a raw
    disk look like a qcow2 whose "repair" would write into it).
    """
    try:
        result = qemuimg.check(source, fmt, repair=True)
    except XenlabError as err:
        return f"the source {source} could not be checked ({err})"
    if not result.checked:  # raw: no metadata to check
        return f"the source {source} is unchanged (a mirror only reads it)"
    if result.ok:
        return (f"the source {source} passes qemu-img check"
                + (" (leaked clusters repaired)" if result.repaired else ""))
    return (f"the source {source} FAILS qemu-img check: "
            f"{result.message.splitlines()[-1:]}")
