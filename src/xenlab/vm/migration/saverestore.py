"""Save and restore of domains, xl save / xl restore: :func:`save`, :func:`restore`; and where
a domain's disks are when it starts again from a stream (:func:`moves_of`, :func:`place`).

``save`` pauses the domain and writes a :mod:`~xenlab.vm.migration.image` image:
the header (config, where the disks really run, the disk snapshots of
``--snapshot``) with its checksum, QEMU's stream, and the stream's checksum
table and trailer (:func:`~xenlab.vm.backends.qemu.vmstate.write_checked`).  The image
goes to a temporary file beside the target, is fsynced and renamed into place once QEMU
reports the stream complete and before QEMU quits, so a failed save leaves no file
and a finished one is on disk before the guest's only other copy goes.

``restore`` checks the whole image first (:func:`~xenlab.vm.migration.image.check_open`:
the header's checksum, every MiB of the stream, the table, the trailer,
nothing after it), so a damaged or cut image is refused naming its offset
before any disk is reverted or any QEMU started; then QEMU, started with
``-incoming defer``, reads the same open file, and a file changed meanwhile
is refused before the guest runs.  Images of versions 1 to 3 carry no
checksums: they are restored as before, with a warning.

Rules: qemu-img is run only through :mod:`xenlab.vm.qemuimg`, told the
format the config or the record gives, never probing a disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xenlab import faults
from xenlab.atomic import FileWriteError, fsync_dir, write_all
from xenlab.config.model import DomainConfig
from xenlab.config.specs.disk import DiskFormat
from xenlab.errors import BackendError, UsageError
from xenlab.files import FileReadError
from xenlab.vm import qemuimg
from xenlab.vm.backend import Progress, SaveFacts, SaveRequest
from xenlab.vm.domain import Toolstack
from xenlab.vm.domconfig import config_from_text, on_disks
from xenlab.vm.jobs import Job
from xenlab.vm.migration.image import (
    DiskMove,
    DiskSnapshot,
    SaveHeader,
    check_open,
    file_identity,
    header_seed,
    pack_header,
)
from xenlab.vm.resources import plugged_vcpus
from xenlab.vm.runtime import DISK_NODES, DISK_PATHS, JOB, OVERLAYS, VCPUS_PLUGGED, Runtime
from xenlab.vm.snapbackends import glob_escape
from xenlab.vm.store import DomainRecord

__all__ = [
    "Placed",
    "image_for",
    "moves_of",
    "place",
    "quit_domain",
    "restore",
    "said",
    "save",
    "settle",
    "wait_quit",
]

_log = logging.getLogger(__name__)


# --- where the disks are --------------------------------------------------------------------


def moves_of(rec: DomainRecord) -> tuple[tuple[DiskMove, ...], tuple[DiskMove, ...]]:
    """(mirror targets, external overlays) the domain's disks run on, from its record."""
    rt = Runtime.of(rec)
    paths = tuple(DiskMove(v, m.file, m.format) for v, m in sorted(rt.moved.items()))
    tops = tuple(DiskMove(v, o.file, DiskFormat.QCOW2.value)
                 for v, o in sorted(rt.overlays.items()))
    return paths, tops


@dataclass(frozen=True, slots=True)
class Placed:
    """A config with its moved disks on their files, and the record facts that say so."""

    config: DomainConfig
    disk_paths: dict[str, dict[str, str]]
    overlays: dict[str, dict[str, str]]

    def extra(self, old: Mapping[str, Any]) -> dict[str, Any]:
        """``old`` (a record's extra) saying where the disks are now, for a fresh QEMU."""
        extra = {k: v for k, v in old.items() if k not in (DISK_PATHS, OVERLAYS, DISK_NODES)}
        if self.disk_paths:
            extra[DISK_PATHS] = self.disk_paths
        if self.overlays:
            extra[OVERLAYS] = self.overlays
        return extra


def place(text_dc: DomainConfig, dc: DomainConfig, disk_paths: Sequence[DiskMove],
          overlays: Sequence[DiskMove], source: str) -> Placed:
    """``dc`` with each moved disk on the file it moved to.

    ``text_dc`` is the config as saved (no overrides): a disk that the
    overrides point at another file keeps the override (the caller moved
    it on purpose); the others go where the domain last ran, overlays on
    top of mirror targets.  A moved disk the config no longer has is an
    error: the guest's memory expects it.
    """
    saved = {d.vdev: d.pdev_path for d in text_dc.disks}
    now = {d.vdev: d.pdev_path for d in dc.disks}
    moves: dict[str, tuple[str, DiskFormat]] = {}
    paths: dict[str, dict[str, str]] = {}
    tops: dict[str, dict[str, str]] = {}
    for kind, items in (("mirror", disk_paths), ("overlay", overlays)):
        for m in items:
            if m.vdev not in now:
                raise UsageError(f"{source}: disk {m.vdev} ran on {m.file} ({kind}), "
                                 "but the config has no such disk")
            if now[m.vdev] != saved.get(m.vdev):
                continue  # overridden
            moves[m.vdev] = (m.file, DiskFormat(m.format))
            if kind == "mirror":
                paths[m.vdev] = {"file": m.file, "format": m.format}
            else:
                # A fresh QEMU names the disk's top node <vdev>-fmt (vm.backends.qemu.qemu).
                tops[m.vdev] = {"file": m.file, "node": f"{m.vdev}-fmt"}
    for vdev, (file, _) in sorted(moves.items()):
        if not Path(file).exists():
            raise UsageError(f"{source}: disk {vdev} ran on {file}, which does not exist "
                             "(give the disk's place with a disk=[...] override)")
    return Placed(on_disks(dc, moves), paths, tops)


# --- QEMU's process -------------------------------------------------------------------------


def said(ts: Toolstack, rec: DomainRecord) -> str:
    """``"; QEMU said: ..."`` with the hypervisor's last words about ``rec``, or ""."""
    tail = ts.backend.said(ts.handle(rec))
    return f"; {ts.backend.name.upper()} said: {tail}" if tail else ""


def settle(ts: Toolstack, rec: DomainRecord, state: str, extra: Mapping[str, Any]
           ) -> DomainRecord:
    """Record that ``rec`` now runs (``state``) on the disks ``extra`` says (a
    :meth:`Placed.extra`), its restore or receive job done."""
    moved = (DISK_PATHS, OVERLAYS, DISK_NODES)
    kept = {k: extra[k] for k in (*moved, VCPUS_PLUGGED) if k in extra}
    return ts.store.patch(rec.domid, expect_uuid=rec.uuid, state=state, extra_set=kept,
                          extra_drop=[*(k for k in moved if k not in extra), JOB])


async def quit_domain(ts: Toolstack, rec: DomainRecord) -> None:
    """Make the domain end now (QEMU: QMP quit), destroyed if it lingers."""
    with contextlib.suppress(BackendError):
        await ts.backend.quit(ts.handle(rec))
    await wait_quit(ts, rec)


async def wait_quit(ts: Toolstack, rec: DomainRecord) -> None:
    """Wait up to 10 s for the domain to end (a save's QEMU quits on its own), then
    destroy it."""
    h = ts.handle(rec)
    if not await ts.until_gone(h, 10):
        ts.backend.destroy(h)


@functools.cache
def _default_image() -> object:
    """The project's guest image, looked up once per process (restore and receive
    start QEMU often; finding the cached image costs an ldd and some hashing)."""
    from xenlab.vm.image import build_image

    return build_image()


def image_for(dc: DomainConfig, image: object | None) -> object | None:
    """The guest image to start ``dc`` on: ``image``, none when it has a kernel, else ours."""
    return image if image is not None or dc.kernel is not None else _default_image()


# --- save -------------------------------------------------------------------------------------


async def save(ts: Toolstack, name: str, path: Path, *, keep_running: bool = False,
         snapshot: bool = False, timeout: float = 300.0, max_bandwidth: int | None = None,
         progress: Progress | None = None) -> SaveHeader:
    """Save the domain's memory and device state to ``path``, with its config; xl save.

    The domain is paused, its migration stream written behind a
    :class:`SaveHeader` and checksummed, and then it is stopped (its QEMU quits and
    its record goes, or stays shut off when it has snapshots or mirrored
    disks), unless ``keep_running``, when it carries on as it was (paused
    stays paused).  The header names the files the disks really run on (a
    mirror's target, an external snapshot's overlay), so :func:`restore`
    starts on them.

    With ``snapshot`` every writable disk gets an internal snapshot named
    ``xenlab-save-<time>`` (one QMP ``transaction``) while the guest is
    paused for the save, recorded in the header's ``disk_snapshots``;
    :func:`restore` reverts the disks to it.  The snapshot is taken after
    ``stop`` and just before the stream starts, not after it ends: once the
    stream is complete QEMU has handed its images over (inactivated them)
    and refuses internal snapshots; the guest does not run in between, so
    it is the same instant.  The snapshot stays in the images (so the save
    image can be restored again); ``qemu-img snapshot -d`` drops it.

    Durability: the image is written to a temporary file beside ``path``
    (the kernel is told to start writing it out while QEMU still writes),
    fsynced, and renamed into place (the directory fsynced), all before QEMU
    quits; so the guest's state is on disk before its only other copy goes.

    CLI: ``xenlab vm save [-c|--keep-running] [--snapshot] DOM FILE`` (xl
    save's ``-c`` leaves the domain running).

    :raise XenlabError: ``path`` cannot be created or written (a full disk),
        or ``snapshot`` with a disk that is not qcow2 (nothing else happened).
    :raise StateError: the domain is not running.
    :raise BackendError: QEMU failed the migration or it took longer than
        ``timeout``; the domain runs (or stays paused) as before, no file is
        left behind and the disk snapshot is deleted again.

    Why one function: the job, the temporary file, the stream, the commit and the quit
    are one sequence whose every step has a fault point and a recovery rule
    (:func:`recover_job`); split, that order would be harder to check.
    """
    path = Path(path)
    async with ts.live(name) as rec:
        h = ts.handle(rec)
        snaps = _save_snapshots(ts, rec) if snapshot else ()
        disk_paths, overlays = moves_of(rec)
        # The job comes before the temporary file, and names it by its
        # prefix: a kill at any point leaves nothing the next command does
        # not find (recover_job).  The guest's state as QEMU has it, not as
        # the record may say (a killed pause or unpause).
        prefix = f".{path.name}.{os.getpid()}."
        guest = await ts.backend.state(h)
        held = contextlib.ExitStack()
        rec = held.enter_context(ts.job(rec, "save", dir=str(path.parent.absolute()),
                                        prefix=prefix, guest=guest,
                                        keep_running=keep_running,
                                        snapshot=snaps[0].name if snaps else None))
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=path.parent)
        except OSError as err:
            held.close()
            raise FileWriteError(str(path), "cannot write the save image: "
                                            f"{err.strerror or err}") from err
        tmp = Path(tmp_name)
        faults.point("save.job")

        headers: list[SaveHeader] = []
        committed: list[bool] = []

        def commit() -> None:
            # Once, before the rename: the image is whole on disk before QEMU
            # quits (most of it already is: see _write_out); then the rename.
            if len(headers) != 1:  # a backend that streamed without the verb's header
                raise BackendError(f"save {rec.name}: the {ts.backend.name} backend "
                                   "committed an image without its header; nothing saved")
            os.fsync(fd)
            os.replace(tmp, path)
            committed.append(True)
            with contextlib.suppress(OSError):  # the rename is done; a sync may not be
                fsync_dir(path.parent)

        def write_header(facts: SaveFacts) -> int:
            # The image's header, written before the stream; its checksum seeds the stream's.
            header = SaveHeader(
                name=rec.name, uuid=rec.uuid, config_text=rec.config_text,
                config_path=rec.config_path, qemu_version=facts.version, created=time.time(),
                state="running" if facts.running else "paused",
                vcpus_plugged=plugged_vcpus(rec), disk_snapshots=snaps, disk_paths=disk_paths,
                overlays=overlays)
            head = pack_header(header)
            try:
                write_all(fd, head)
            except OSError as err:
                raise FileWriteError(str(path), "cannot write the save image: "
                                     f"{err.strerror or err}; the domain goes on") from err
            headers.append(header)
            return header_seed(head)

        with held:
            try:
                await (ts.backend.save(h, SaveRequest(
                    fd, write_header, commit, keep_running, timeout,
                    max_bandwidth=max_bandwidth, progress=progress, snapshots=snaps,
                    tick=functools.partial(_write_out, fd), what=f"save {rec.name}")))
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            finally:
                os.close(fd)
            if not committed:  # a backend that returned without the image on disk
                tmp.unlink(missing_ok=True)
                raise BackendError(f"save {rec.name}: the {ts.backend.name} backend returned "
                                   "without committing the image; nothing was saved")
            header = headers[0]
            ts.update_job(rec.domid, committed=True)
            faults.point("save.committed")
            if keep_running:
                ts.store.patch(rec.domid, expect_uuid=rec.uuid, state=header.state)
            else:
                await wait_quit(ts, rec)
                faults.point("save.quit")
                await ts.gone(rec)
            return header


async def recover_job(ts: Toolstack, rec: DomainRecord, job: Job) -> DomainRecord | None:
    """Finish or undo a save that was killed (``Toolstack.converge`` calls this).

    Before the image was committed, the save is undone: a migration QEMU
    still runs is cancelled, the half-written file and the save's disk
    snapshot go, and a guest that ran runs again.  After the commit the
    image is whole, and the save is finished: the QEMU quits and the domain
    goes (or, with ``keep_running``, the guest goes on as it was).
    """
    where = f"domain {rec.name}: save"
    committed = bool(job.detail.get("committed"))

    def drop_partial() -> None:
        folder, prefix = job.detail.get("dir"), job.detail.get("prefix")
        if isinstance(folder, str) and isinstance(prefix, str) and not committed:
            for part in Path(folder).glob(glob_escape(prefix) + "*.part"):
                part.unlink(missing_ok=True)
    if not ts.alive(rec):
        drop_partial()
        kept = await ts.gone(rec)
        _log.warning("%s killed after its QEMU quit: %s", where,
                    "the image was written; the domain is gone" if committed else
                    "the image was not finished")
        return kept
    if committed and not job.detail.get("keep_running"):
        await quit_domain(ts, rec)
        kept = await ts.gone(rec)
        _log.warning("%s killed after the image was written: finished, the domain is "
                     "stopped", where)
        return kept

    snap = job.detail.get("snapshot")
    snaps: list[DiskSnapshot] = []
    if isinstance(snap, str) and not committed:
        dc, _ = ts.config_of(rec)
        snaps = [DiskSnapshot(d.vdev, str(d.pdev_path), snap)
                 for d in dc.disks if d.pdev_path and d.readwrite and not d.is_cdrom]
    state, left = await (ts.backend.abort_save(
        ts.handle(rec), resume=job.detail.get("guest") == "running", snapshots=snaps))
    drop_partial()
    if left:
        _log.warning("%s: the disk snapshot %r stays in %s (the guest was paused, so its "
                     "images could not change: `qemu-img snapshot -d` removes it)", where,
                     job.detail.get("snapshot"), ", ".join(left))
    _log.warning("%s killed %s; the guest is %s", where,
                "after the image was written" if committed else
                "before the image was written: undone, no image", state)
    return ts.store.patch(rec.domid, state="running" if state == "running" else "paused")


def _save_snapshots(ts: Toolstack, rec: DomainRecord) -> tuple[DiskSnapshot, ...]:
    """The disk snapshots ``save --snapshot`` will take: every writable disk, all qcow2.

    Each is taken in the image the disk runs on now (an overlay over a
    mirror's target over the config's file), which is the file
    :func:`restore` will start it on.
    """
    dc, _ = ts.config_of(rec)
    tag = "xenlab-save-" + time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 10**9:09d}"
    disk_paths, overlays = moves_of(rec)
    now = {m.vdev: (m.file, m.format) for m in (*disk_paths, *overlays)}  # overlays win
    out: list[DiskSnapshot] = []
    for d in dc.disks:
        if d.is_cdrom or not d.readwrite or not d.pdev_path or d.format is DiskFormat.EMPTY:
            continue  # read-only media cannot change behind the memory's back
        file, fmt = now.get(d.vdev, (d.pdev_path, d.format.value))
        if fmt != DiskFormat.QCOW2.value:
            raise UsageError(
                f"save --snapshot: disk {d.vdev} ({file}) is {fmt}; "
                "only qcow2 images hold internal snapshots (save without --snapshot, or "
                "convert the disk with qemu-img convert -O qcow2)"
            )
        out.append(DiskSnapshot(d.vdev, file, tag))
    return tuple(out)


_libc = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2


def _write_out(fd: int) -> None:
    """Start writing ``fd``'s dirty pages to disk, without waiting for them
    (sync_file_range(SYNC_FILE_RANGE_WRITE); the page cache is kept, unlike
    with posix_fadvise, so a restore right after reads from memory)."""
    _libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), _SYNC_FILE_RANGE_WRITE)


# --- restore ----------------------------------------------------------------------------------


async def _revert_plan(dc: DomainConfig, header: SaveHeader, path: Path) -> list[tuple[str, str]]:
    """(file, tag) of each disk ``restore`` must revert; checked before anything changes.

    The files are the ones the (possibly overridden, moved) config names now:
    the domain will run on those, so those must hold the snapshot.  Only a
    disk the config calls qcow2 can; it is read as qcow2, never probed (a raw
    disk holding a qcow2 header is the guest's data, not an image to open).
    """
    by_vdev = {d.vdev: d for d in dc.disks}
    plan: list[tuple[str, str]] = []
    for s in header.disk_snapshots:
        disk = by_vdev.get(s.vdev)
        if disk is None or not disk.pdev_path:
            raise UsageError(
                f"restore {path}: the image was saved with a snapshot of disk {s.vdev}, "
                "which the config no longer has"
            )
        if disk.format is not DiskFormat.QCOW2:
            raise UsageError(
                f"restore {path}: disk {s.vdev} ({disk.pdev_path}) is {disk.format.value}, "
                f"so it holds no snapshot {s.name!r} (saved with --snapshot from {s.file}, "
                "a qcow2 image); it is not the disk that was saved"
            )
        try:
            tags = await qemuimg.snapshot_tags(disk.pdev_path)
        except BackendError as err:
            raise FileReadError(f"restore {path}: disk {disk.pdev_path}",
                                f"cannot read it: {err}") from err
        if s.name not in tags:
            raise UsageError(
                f"restore {path}: disk {s.vdev} ({disk.pdev_path}) has no snapshot "
                f"{s.name!r} (saved with --snapshot from {s.file}); it is not the disk that "
                "was saved, or the snapshot was deleted"
            )
        plan.append((disk.pdev_path, s.name))
    return plan


async def restore(ts: Toolstack, path: Path, *, paused: bool = False, overrides: Sequence[str] = (),
            timeout: float = 300.0, image: object | None = None) -> DomainRecord:
    """Start the domain saved in ``path`` where it left off; its record; xl restore.

    The whole image is checked first (its header's checksum, every MiB of
    QEMU's stream, the trailer): a damaged or cut image is refused before
    anything else happens.  The config comes from the image's header
    (``overrides`` are appended to it, xl-style ``key=value``); the domain
    keeps its name and uuid.  Disks that ran on a mirror's target or an
    external overlay when it was saved (the header says which) start on
    those files again, and the record says so, unless an override points
    the disk elsewhere.  It runs unless ``paused``.  An image saved with
    ``snapshot`` first reverts each disk to the snapshot taken with the
    memory (``qemu-img snapshot -a``, with no QEMU running); everything
    written to the disks since is lost, as it must be for the guest's
    memory to match them.  Images of versions 1-3 have no checksums: they
    are restored unchecked, with a warning.

    CLI: ``xenlab vm restore [-p] FILE [key=value ...]``.

    :raise FormatError: ``path`` is not a xenlab save image, or it is damaged
        or cut short (the message names the offset); nothing happened.
    :raise XenlabError: the name is taken, the config no longer works here,
        a disk the domain ran on is missing, or a disk lacks the image's
        snapshot (nothing changed).
    :raise BackendError: qemu-img could not revert a disk (one in use by
        another QEMU), or QEMU could not load the stream (a QEMU or config
        that does not match; QEMU's own words are quoted); no record and no
        QEMU is left.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise FileReadError(str(path), f"cannot read: {err.strerror or err}") from err
    with contextlib.closing(_Fd(fd)):
        # Checked on the descriptor QEMU will read, before anything else happens.
        checked = file_identity(fd)
        layout, _ = check_open(fd, str(path))
        header = layout.header
        if layout.seed is None:
            _log.warning("%s: a version %d save image carries no checksums: restored "
                         "unchecked", path, header.version)
        source = f"{path} (saved config)"
        dc, text = config_from_text(header.config_text, source, overrides)
        text_dc = config_from_text(header.config_text, source)[0] if overrides else dc
        placed = place(text_dc, dc, header.disk_paths, header.overlays, f"restore {path}")
        dc = placed.config
        plan = await _revert_plan(dc, header, path)

        async def revert() -> None:
            for file, tag in plan:
                await qemuimg.snapshot("apply", tag, file)

        rec = await ts.launch(dc, text, config_path=header.config_path, uuid=header.uuid,
                        incoming="defer", image=image_for(dc, image),
                        prepare=revert if plan else None)
        h = ts.handle(rec)
        try:
            async with ts.store.alock(rec.domid):
                try:
                    await (ts.backend.load(h, fd, layout.stream_offset, checked, str(path),
                                         timeout, run=not paused,
                                         vcpus_plugged=header.vcpus_plugged))
                except BackendError as err:
                    if not ts.alive(rec):
                        tail = ts.backend.said(h)
                        raise BackendError(
                            f"restore {path}: QEMU could not load the saved state and "
                            "exited (a corrupt image, or one saved by an incompatible "
                            f"QEMU/config){': ' + tail if tail else ''} [{err}]"
                        ) from err
                    raise BackendError(f"restore {path}: {err}{said(ts, rec)}") from err
                extra = placed.extra(rec.extra)
                if header.vcpus_plugged:
                    extra[VCPUS_PLUGGED] = header.vcpus_plugged
                return settle(ts, rec, "paused" if paused else "running", extra)
        except BaseException:
            ts.kill_domain(rec)
            await ts.gone(rec)
            raise


@dataclass(frozen=True, slots=True)
class _Fd:
    """A descriptor for :func:`contextlib.closing`."""

    fd: int

    def close(self) -> None:
        os.close(self.fd)
