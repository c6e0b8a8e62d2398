"""Snapshot verbs that a killed command left half-done, finished or undone: :func:`recover_job`.

``Toolstack.converge`` calls :func:`recover_job` when a domain's job names a
snapshot verb whose process is dead (see ``vm.jobs``).  QEMU goes on with
what it was told after xenlab dies (a ``snapshot-save`` job, a migration of
the memory to its file, a block-commit), so the truth is read from QEMU and
the images, never assumed from the record:

- first the disks: the file QEMU runs each disk on now becomes the record's
  top (``query-block``), so a restart never goes back to an image under an
  overlay the guest wrote to;
- then QEMU's jobs of the verb are waited for (bounded) and dismissed, so
  their ids are free again;
- then the snapshot row: a ``creating`` snapshot whose parts are all there
  is made ready (with its memory if the memory file was completed, else as
  a disk-only snapshot); one with nothing made is discarded; a half-switched
  one is marked broken with its overlays recorded.  A ``deleting`` one is
  deleted again.  An interrupted revert is completed where QEMU completed it
  (the memory loaded) and otherwise leaves the domain shut off on the
  reverted disks;
- last, a guest that the verb paused is resumed if it ran before.

Everything done is logged as a warning naming the domain and snapshot.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from xenlab.errors import BackendError, FormatError, XenlabError
from xenlab.vm.domain import SHUTOFF, Toolstack
from xenlab.vm.jobs import Job
from xenlab.vm.migration import image as saveimage
from xenlab.vm.snapbackends import entry_backend
from xenlab.vm.snapshot import (
    current_id,
    delete_one,
    entry_images,
    has_memory,
    prune,
    record_created,
    repair_images,
    set_current,
    set_tops,
    snap_disks,
)
from xenlab.vm.store import (
    DomainRecord,
    SnapshotKind,
    SnapshotRecord,
    SnapshotState,
)

__all__ = ["recover_job"]

log = logging.getLogger(__name__)

# How long a recovery waits for QEMU to finish what the killed verb started.
_SETTLE = 120.0


async def recover_job(ts: Toolstack, rec: DomainRecord, job: Job) -> DomainRecord | None:
    """Bring domain ``rec`` to a true state after a killed snapshot verb; its record."""
    name = str(job.detail.get("name", ""))
    if job.verb == "snapshot-revert" and rec.state in ("incoming", "creating"):
        # Killed while the reverted domain was being started.
        return await _recover_incoming_revert(ts, rec, job, name)
    live = rec.state != SHUTOFF and ts.alive(rec)
    if rec.state != SHUTOFF and not live:
        # QEMU died too: the images may hold what a killed save-job leaked;
        # the domain itself is stale, which destroy (or list) clears.
        await _stale_rows(ts, rec, name)
        return ts.store.get(rec.domid)
    if live:
        # QEMU's jobs first: a commit it completes moves a disk to another file.
        await _settle_jobs(ts, rec, name)
        await _sync_tops(ts, rec)
    rec = ts.store.get(rec.domid)
    if job.verb == "snapshot-create":
        await _recover_create(ts, rec, name, live)
    elif job.verb == "snapshot-delete":
        await _recover_delete(ts, rec, live)
    elif job.verb == "snapshot-revert":
        await _recover_revert(ts, rec, job, name, live)
    if live and job.detail.get("guest", job.detail.get("was")) == "running" and \
            job.verb != "snapshot-revert":
        await _resume(ts, rec, f"snapshot {name!r}")
    return ts.store.get(rec.domid)


# --- the truth from QEMU ------------------------------------------------------------------


async def _sync_tops(ts: Toolstack, rec: DomainRecord) -> None:
    """Make the record name, for every writable disk, the image QEMU writes to now."""

    now = await ts.backend.disk_files(ts.handle(rec))
    changes: dict[str, Mapping[str, str] | None] = {}
    for d in snap_disks(ts, rec):
        seen = now.get(d.vdev)
        if seen is None or os.path.realpath(seen[0]) == os.path.realpath(d.file):
            continue
        if os.path.realpath(seen[0]) == os.path.realpath(d.base):
            changes[d.vdev] = None
        else:
            changes[d.vdev] = {"file": seen[0], "node": seen[1]}
        log.warning("domain %s: disk %s runs on %s, not on %s as recorded; the record now "
                    "says so", rec.name, d.vdev, seen[0], d.file)
    if changes:
        set_tops(ts, rec.domid, changes)


async def _settle_jobs(ts: Toolstack, rec: DomainRecord, name: str) -> None:
    """Wait for and forget the backend's jobs a killed snapshot verb of ``name`` started
    (a commit is completed, as the verb would have); a killed --live snapshot's
    switch-over capability goes off once no migration runs."""
    for job_id, status, error in await (ts.backend.settle_jobs(
            ts.handle(rec), (f"save-{name}", f"load-{name}"), (f"delete-{name}-", "commit-"),
            ("commit-",), _SETTLE)):
        log.warning("domain %s: QEMU job %s (%s when found) %s", rec.name, job_id, status,
                    f"failed: {error}" if error else "is done and dismissed")


async def _resume(ts: Toolstack, rec: DomainRecord, what: str) -> None:
    """Resume a guest that an interrupted verb paused (it ran before)."""

    try:
        resumed = await ts.backend.resume_stopped(ts.handle(rec))
    except BackendError as err:
        log.warning("domain %s: could not resume the guest after %s: %s", rec.name, what, err)
        return
    if resumed:
        ts.store.patch(rec.domid, state="running")
        log.warning("domain %s: the guest, paused by an interrupted %s, runs again",
                    rec.name, what)


# --- create -----------------------------------------------------------------------------


def _row(ts: Toolstack, rec: DomainRecord, name: str) -> SnapshotRecord | None:
    try:
        return ts.store.get_snapshot(rec.domid, name)
    except XenlabError:
        return None


async def _present(ts: Toolstack, rec: DomainRecord, row: SnapshotRecord, live: bool
             ) -> list[bool]:
    """For each disk of ``row``: is its part of the snapshot there?"""
    out: list[bool] = []
    files: dict[str, tuple[str, str]] = {}
    tags: dict[str, set[str] | None] = {}
    if live:
        async def look() -> None:
            files.update(await ts.backend.disk_files(ts.handle(rec)))
            async with ts.backend.live_snapshots(ts.handle(rec)) as live:
                for e in row.disks:
                    tags[str(e["file"])] = (await live.node_and_tags(str(e["file"]), ""))[1]

        await look()
    for e in row.disks:
        b = entry_backend(row, e)
        if b.layered:
            overlay = str(e["overlay"])
            if live:
                seen = files.get(str(e["vdev"]))
                out.append(seen is not None and
                           os.path.realpath(seen[0]) == os.path.realpath(overlay))
            else:
                out.append(Path(overlay).exists())
        elif live and b.name == "qcow2-internal":
            found = tags.get(str(e["file"]))
            out.append(found is not None and row.name in found)
        else:
            disk = next((d for d in snap_disks(ts, rec) if d.vdev == e["vdev"]), None)
            out.append(disk is not None and row.name in await b.list(disk))
    return out


async def _recover_create(ts: Toolstack, rec: DomainRecord, name: str, live: bool) -> None:
    row = _row(ts, rec, name)
    if row is None or row.state is not SnapshotState.CREATING:
        return
    where = f"domain {rec.name}: snapshot {name!r}"
    there = await _present(ts, rec, row, live)
    pairs = [(e, entry_backend(row, e)) for e in row.disks]
    if all(there):
        if row.memory_path is not None and not await _memory_complete(ts, rec, row, live):
            Path(row.memory_path).unlink(missing_ok=True)
            row = ts.store.update_snapshot(row.id, kind=SnapshotKind.DISK_ONLY,
                                           drop_memory=True)
            log.warning("%s: its create was killed after the disks were taken but before "
                        "the memory was saved; kept as a disk-only snapshot", where)
        else:
            log.warning("%s: its create was killed after every part was made; it is "
                        "finished (ready)", where)
        record_created(ts, rec.domid, row, pairs)
        return
    if any(there[i] and b.layered for i, (_, b) in enumerate(pairs)):
        # Some disks switched to overlays: they hold the guest's writes now.
        set_tops(ts, rec.domid, {str(e["vdev"]): {"file": str(e["overlay"]),
                                                  "node": str(e["overlay_node"])}
                                 for i, (e, b) in enumerate(pairs) if there[i] and b.layered})
        ts.store.set_snapshot_state(row.id, SnapshotState.BROKEN)
        log.warning("%s: its create was killed half-way; the disks that switched keep "
                    "their overlays (recorded), and the snapshot is marked broken "
                    "(snapshot-delete commits them back)", where)
        return
    await _discard(ts, rec, row, live)
    ts.store.remove_snapshot(row.id)
    log.warning("%s: its create was killed before it took effect; undone", where)


async def _memory_complete(ts: Toolstack, rec: DomainRecord, row: SnapshotRecord,
                     live: bool) -> bool:
    """True when QEMU finished writing ``row``'s memory file (its migration completed)."""
    if not live or row.memory_path is None or not Path(row.memory_path).is_file():
        return False

    async def status() -> str:
        async with ts.backend.live_snapshots(ts.handle(rec)) as live:
            return await live.finish_state_save(_SETTLE)

    if await status() != "completed":
        return False
    return _finish_stream(row.memory_path)


def _finish_stream(path: str) -> bool:
    """Make the memory file QEMU completed alone a whole checked VM state file.

    The killed xenlab did not append its checksum table and trailer: every
    byte QEMU wrote is final (it completed), so they are computed now.
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            saveimage.check_stream_open(fd, path)
            return True  # whole already
        except FormatError:
            pass
        try:
            saveimage.StreamHasher(fd, len(saveimage.STREAM_MAGIC)).finish()
            os.fsync(fd)
            saveimage.check_stream_open(fd, path)
        except (FormatError, OSError, ValueError):
            return False
        return True
    finally:
        os.close(fd)


async def _discard(ts: Toolstack, rec: DomainRecord, row: SnapshotRecord, live: bool) -> None:
    async def go() -> None:
        if live:
            async with ts.backend.live_snapshots(ts.handle(rec)) as session:
                # A --live memory save still going would stop at its switch-over
                # and wait there for good: it goes first.
                await session.cancel_state_save()
                for e in row.disks:
                    await entry_backend(row, e).discard(e, row.name, session)
        else:
            for e in row.disks:
                await entry_backend(row, e).discard(e, row.name, None)

    await go()
    if row.memory_path:
        Path(row.memory_path).unlink(missing_ok=True)


async def _stale_rows(ts: Toolstack, rec: DomainRecord, name: str) -> None:
    """QEMU is gone: a half-made snapshot of ``name`` is undone offline, leaks repaired."""
    row = _row(ts, rec, name)
    if row is None or row.state is not SnapshotState.CREATING:
        return
    await repair_images(entry_images(row.disks))
    layered = [e for e in row.disks if entry_backend(row, e).layered
               and Path(e["overlay"]).exists()]
    if layered:
        ts.store.set_snapshot_state(row.id, SnapshotState.BROKEN)
        return
    await _discard(ts, rec, row, False)
    ts.store.remove_snapshot(row.id)
    log.warning("domain %s: snapshot %r, whose create was killed with its QEMU, is undone",
                rec.name, name)


# --- delete -----------------------------------------------------------------------------


async def _recover_delete(ts: Toolstack, rec: DomainRecord, live: bool) -> None:
    """Delete again every snapshot a killed delete left ``deleting`` (broken if that fails)."""
    state = "live" if live else SHUTOFF
    for s in ts.store.list_snapshots(rec.domid):
        if s.state is not SnapshotState.DELETING:
            continue
        where = f"domain {rec.name}: snapshot {s.name!r}"
        try:
            if live:
                await _drop_overlay_nodes(ts, rec, s)
            await delete_one(ts, rec, s, state)
        except XenlabError as err:
            ts.store.set_snapshot_state(s.id, SnapshotState.BROKEN)
            log.warning("%s: its delete was killed, and finishing it failed (%s); it is "
                        "marked broken (delete it again to retry)", where, err)
            continue
        cur = current_id(ts, ts.store.get(rec.domid))
        ts.store.remove_snapshot(s.id)
        await prune(ts, rec.domid, {str(e[k]) for e in s.disks for k in ("file", "overlay")
                              if k in e})
        if cur == s.id:
            set_current(ts, rec.domid, s.parent)
        log.warning("%s: its delete was killed; it is finished (deleted)", where)


async def _drop_overlay_nodes(ts: Toolstack, rec: DomainRecord, s: SnapshotRecord) -> None:
    """Nodes on ``s``'s overlays that a commit QEMU finished alone left in its graph."""
    async with ts.backend.live_snapshots(ts.handle(rec)) as live:
        for e in s.disks:
            if "overlay" in e:
                await live.drop_nodes_on(str(e["overlay"]))


# --- revert -----------------------------------------------------------------------------


async def _recover_revert(ts: Toolstack, rec: DomainRecord, job: Job, name: str,
                    live: bool) -> None:
    row = _row(ts, rec, name)
    if row is None:
        return
    where = f"domain {rec.name}: snapshot {name!r}"
    go = bool(job.detail.get("go"))
    if live and row.kind is SnapshotKind.INTERNAL and has_memory(row):
        # The load job has been settled: QEMU either loaded the snapshot or
        # said why not (logged by _settle_jobs).
        set_current(ts, rec.domid, row.id)
        if go:
            await _resume(ts, rec, f"revert to {name!r}")
        log.warning("%s: a revert killed while QEMU loaded it has been completed by QEMU; "
                    "check the guest, or revert again if the load failed", where)
        return
    if rec.state == SHUTOFF and not has_memory(row):
        log.warning("%s: a revert was killed; the domain is shut off: revert again to be "
                    "sure every disk is back at the snapshot", where)
        return
    if rec.state == SHUTOFF:
        log.warning("%s: a revert was killed before the memory was loaded; the domain is "
                    "shut off; revert again", where)


async def _recover_incoming_revert(ts: Toolstack, rec: DomainRecord, job: Job, name: str
                             ) -> DomainRecord | None:
    """A revert killed while QEMU loaded the memory file: finish it if QEMU did."""
    where = f"domain {rec.name}: snapshot {name!r}"
    if not ts.alive(rec):
        # Before QEMU started, or before its pid was recorded (the pidfile has it).
        ts.kill_domain(rec)
        kept = await ts.gone(rec)
        log.warning("%s: a revert killed while it started the domain is undone: the domain "
                    "is shut off on the snapshot's disks; revert again", where)
        return kept

    async def status() -> str:
        async with ts.backend.live_snapshots(ts.handle(rec)) as live:
            return await live.finish_state_load(_SETTLE)

    if await status() == "completed":
        row = _row(ts, rec, name)
        rec = ts.store.patch(rec.domid, state="paused")
        if row is not None:
            set_current(ts, rec.domid, row.id)
        if job.detail.get("go"):
            await _resume(ts, rec, f"revert to {name!r}")
        log.warning("%s: a revert killed while the memory loaded is finished", where)
        return ts.store.get(rec.domid)
    ts.kill_domain(rec)
    kept = await ts.gone(rec)
    log.warning("%s: a revert killed before the memory was loaded is undone: the domain is "
                "shut off on the snapshot's disks; revert again", where)
    return kept
