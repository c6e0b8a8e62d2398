"""Snapshots of domains, their tree and life-cycle: :func:`create_snapshot` and the other verbs.

The verbs (:func:`create_snapshot`, :func:`list_snapshots`,
:func:`revert_snapshot`, :func:`delete_snapshot`, :func:`snapshot_info`)
take a :class:`~xenlab.vm.domain.Toolstack` and a domain name, hold the
domain's lock, record a job (``vm.jobs``: a killed verb is finished or undone
by ``vm.snaprecover``), and keep the store's snapshot rows in step with the
disks.  They never touch a disk themselves: each disk is handled by a backend
of ``vm.snapbackends`` (qcow2-internal, qcow2-external, raw-copy), chosen by
what the disk is.  Memory goes to a checked VM state file (``vm.backends.qemu.vmstate``)
except for internal snapshots of qcow2 disks, which keep it in the first
image.  What runs on a live domain goes through its backend's
:class:`~xenlab.vm.backend.LiveSnapshots` session, one per verb.  The design,
the backend contract and the behaviours decided are in docs/snapshots.md.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xenlab import faults
from xenlab.config.specs.disk import DiskFormat
from xenlab.errors import BackendError, ConflictError, StateError, UsageError, XenlabError
from xenlab.vm import qemuimg
from xenlab.vm.backend import LiveSnapshots
from xenlab.vm.domain import SHUTOFF, Toolstack
from xenlab.vm.domconfig import on_disks_now
from xenlab.vm.migration import image as saveimage
from xenlab.vm.resources import plugged_vcpus
from xenlab.vm.runtime import CURRENT, OVERLAYS, VCPUS_PLUGGED, Runtime, disk_now
from xenlab.vm.snapbackends import (
    BACKENDS,
    JOB_TIMEOUT,
    PATH_KINDS,
    SNAPSHOT_NAME,
    DiskSnapshotBackend,
    Qcow2Internal,
    SnapDisk,
    backend_for,
    backing_chain,
    entry_backend,
    node_of,
    path_kind,
    register_backend,
)
from xenlab.vm.store import (
    DomainRecord,
    SnapshotKind,
    SnapshotNode,
    SnapshotRecord,
    SnapshotState,
    descendants_first,
    private_dir,
)

__all__ = [
    "BACKENDS",
    "PATH_KINDS",
    "DiskSnapshotBackend",
    "SnapDisk",
    "SnapshotInfo",
    "SnapshotTree",
    "backend_for",
    "create_snapshot",
    "delete_snapshot",
    "list_snapshots",
    "register_backend",
    "revert_snapshot",
    "snapshot_info",
]


@dataclass(frozen=True, slots=True)
class SnapshotTree:
    """A domain's snapshots as a forest, and which one is current."""

    domain: str
    roots: tuple[SnapshotNode, ...]
    current: str | None

    def lines(self) -> list[str]:
        """The tree as indented text (``snapshot-list --tree``); ``*`` marks current."""
        out: list[str] = []

        def walk(node: SnapshotNode, depth: int) -> None:
            s = node.snapshot
            mark = " *" if s.name == self.current else ""
            state = "" if s.state is SnapshotState.READY else f" [{s.state.value}]"
            out.append(f"{'  ' * depth}{s.name} ({s.kind.value}){state}{mark}")
            for child in node.children:
                walk(child, depth + 1)

        for root in self.roots:
            walk(root, 0)
        return out

    def to_json(self) -> list[dict[str, Any]]:
        """The tree as JSON-ready nested mappings (``snapshot-list --json``)."""

        def conv(node: SnapshotNode) -> dict[str, Any]:
            s = node.snapshot
            return {
                "name": s.name, "kind": s.kind.value, "state": s.state.value,
                "created": s.created, "description": s.description,
                "current": s.name == self.current,
                "children": [conv(c) for c in node.children],
            }

        return [conv(r) for r in self.roots]


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One snapshot in detail (``snapshot-info``)."""

    record: SnapshotRecord
    parent: str | None
    children: tuple[str, ...]
    current: bool
    has_memory: bool
    vm_state_bytes: int | None  # internal VM state size as the image reports it



# --- helpers ----------------------------------------------------------------


def _check_name(snap: str) -> None:
    if not SNAPSHOT_NAME.fullmatch(snap) or snap.isdigit() or snap in (".", ".."):
        raise UsageError(
            f"bad snapshot name {snap!r}: use 1-64 letters, digits, '_', '.', '+', '-' "
            "(not all digits)"
        )


async def repair_images(images: Sequence[tuple[str, str]]) -> None:
    """Fix leaked clusters (what a killed QEMU leaves) in ``(file, format)`` images.

    The format is the one the config or record gives, never probed: a raw
    disk's content is the guest's, and "repairing" it as qcow2 would write
    into it.  BackendError if an image is corrupt.
    """
    for path, fmt in images:
        if not Path(path).exists():
            continue
        result = await qemuimg.check(path, fmt, repair=True)
        if not result.ok:
            raise BackendError(f"qemu-img check {path}: {result.message}")


def entry_images(disks: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """The ``(file, format)`` of each snapshot entry's image."""
    return [(str(e["file"]), str(e.get("format", "qcow2"))) for e in disks]


def snap_disks(ts: Toolstack, rec: DomainRecord) -> list[SnapDisk]:
    """The domain's writable disks with media, on top of any external overlays."""
    dc, _ = ts.config_of(rec)
    rt = Runtime.of(rec)
    out: list[SnapDisk] = []
    for d in dc.disks:
        if d.is_cdrom or not d.readwrite or not d.pdev_path or d.format is DiskFormat.EMPTY:
            continue
        now = disk_now(rt, d.vdev, d.pdev_path, d.format.value)
        out.append(SnapDisk(d.vdev, now.file, now.format, now.node, now.base.file,
                            path_kind(now.file)))
    return out


def tops_of(ts: Toolstack, rec: DomainRecord) -> dict[str, str]:
    """vdev -> the image each writable disk runs on now."""
    return {d.vdev: d.file for d in snap_disks(ts, rec)}


def shut_off(ts: Toolstack, rec: DomainRecord) -> bool:
    """True for a shut-off domain, False for a live one; StateError for a stale domain."""
    if rec.state == SHUTOFF:
        return True
    if not ts.alive(rec):
        raise StateError(
            f"domain {rec.name!r} (id {rec.domid}) is not running: its QEMU is gone; "
            f"`xenlab vm destroy {rec.name}` clears it"
        )
    return False


async def _liveness(ts: Toolstack, rec: DomainRecord) -> str:
    """``"shutoff"``, or QEMU's run state; StateError for a stale domain."""
    if shut_off(ts, rec):
        return SHUTOFF
    return await ts.backend.state(ts.handle(rec))


def set_current(ts: Toolstack, domid: int, snap_id: int | None) -> DomainRecord:
    if snap_id is None:
        return ts.store.patch(domid, extra_drop=[CURRENT])
    return ts.store.patch(domid, extra_set={CURRENT: snap_id})


def current_id(ts: Toolstack, rec: DomainRecord) -> int | None:
    cur = rec.extra.get(CURRENT)
    if cur is None:
        return None
    try:
        s = ts.store.snapshot_by_id(int(cur))
    except XenlabError:
        return None
    return s.id if s.domid == rec.domid else None


def set_tops(ts: Toolstack, domid: int, tops: Mapping[str, Mapping[str, str] | None]) -> None:
    """Record new top images per vdev (``None``: back on the config's file)."""
    rec = ts.store.get(domid)
    overlays = dict(rec.extra.get(OVERLAYS, {}))
    dc, _ = ts.config_of(rec)
    rt = Runtime.of(rec)
    base = {d.vdev: disk_now(rt, d.vdev, d.pdev_path or "", d.format.value).base.file
            for d in dc.disks}
    for vdev, top in tops.items():
        if top is None or top["file"] == base.get(vdev):
            overlays.pop(vdev, None)
        else:
            overlays[vdev] = dict(top)
    if overlays:
        ts.store.patch(domid, extra_set={OVERLAYS: overlays})
    else:
        ts.store.patch(domid, extra_drop=[OVERLAYS])


async def prune(ts: Toolstack, domid: int, candidates: set[str]) -> list[str]:
    """Remove the overlay files in ``candidates`` that no snapshot and no disk needs any more.

    Needed: every image a snapshot recorded, every disk's top, and the
    backing chains of all of them.  Only files named like our overlays
    (``<config disk>.<...>.qcow2``) are ever removed.
    """
    rec = ts.store.get(domid)
    dc, _ = ts.config_of(rec)
    bases = {os.path.realpath(d.pdev_path) for d in dc.disks if d.pdev_path}
    maybe = {os.path.realpath(c) for c in candidates}
    maybe = {r for r in maybe if r not in bases and r.endswith(".qcow2")
             and any(r.startswith(b + ".") for b in bases) and Path(r).exists()}
    if not maybe:
        return []  # nothing could go: spare reading every backing chain
    roots = {(d.file, d.format) for d in snap_disks(ts, rec)}
    for s in ts.store.list_snapshots(domid):
        roots.update(entry_images(s.disks))
    needed: set[str] = set()
    for r, fmt in roots:
        needed.update(await backing_chain(r, fmt) or [os.path.realpath(r)])
    removed = []
    for real in sorted(maybe - needed):
        if qemuimg.remove_own(real):
            removed.append(real)
    return removed


def guest_ran(s: SnapshotRecord) -> bool:
    return bool(s.disks) and s.disks[0].get("guest") == "running"


def has_memory(s: SnapshotRecord) -> bool:
    return s.memory_path is not None or any(d.get("vmstate") for d in s.disks)


async def _start_paused(ts: Toolstack, rec: DomainRecord) -> DomainRecord:
    """Start a shut-off domain paused from its stored config (create keeps its domid)."""
    dc, text = ts.config_of(rec)
    return await ts.launch(dc, text, config_path=rec.config_path, paused=True)


# --- create -----------------------------------------------------------------


async def create_snapshot(
    ts: Toolstack,
    name: str,
    snap: str,
    *,
    disk_only: bool = False,
    memory: bool = False,
    external: bool = False,
    live: bool = False,
    description: str = "",
    timeout: float = JOB_TIMEOUT,
) -> SnapshotRecord:
    """Take snapshot ``snap`` of domain ``name``; its stored record (state ready).

    CLI: ``xenlab vm snapshot-create DOM NAME [--disk-only] [--memory]
    [--external] [--live] [--description TEXT]``.  Without flags a live
    domain gets an internal snapshot with its VM state, a shut-off one a
    disk snapshot (internal in qcow2, a copy of a raw file).  ``memory``
    asks for the VM state (internal snapshots of live domains always have it
    unless ``disk_only``); ``live`` (external with memory only) copies the
    memory while the guest runs.

    :raise XenlabError: unknown domain, bad or duplicate name, conflicting
        flags, a disk no backend can snapshot now.
    :raise StateError: a stale domain, or memory asked of a shut-off one.
    :raise BackendError: QEMU or a disk tool failed (what was made is undone).

    Why one function: the row, the job, the disks, the memory and the record of the
    result are one sequence with a fault point and a recovery rule at each step
    (vm.snaprecover), read side by side with the recovery.
    """
    _check_name(snap)
    if disk_only and memory:
        raise UsageError("--disk-only and --memory contradict each other")
    if live and not (external and memory):
        raise UsageError(
            "--live needs --external --memory: internal snapshots pause the guest while "
            "its state is saved"
        )
    async with ts.locked(name) as rec:
        state = await _liveness(ts, rec)
        shutoff = state == SHUTOFF
        if shutoff and memory:
            raise StateError(
                f"domain {rec.name!r} is shut off: there is no VM state to save "
                "(drop --memory)"
            )
        if not shutoff:
            ts.backend.caps.require("live_disk_snapshots", f"snapshot-create {rec.name} {snap}",
                                    ts.backend.name)
        if any(s.name == snap for s in ts.store.list_snapshots(rec.domid)):
            raise ConflictError("snapshot", snap,
                                f"domain {rec.name!r} already has a snapshot named {snap!r}")
        disks = snap_disks(ts, rec)
        if not disks:
            raise UsageError("the domain has no writable disk to snapshot")
        style = "external" if external else "internal"
        backends: list[DiskSnapshotBackend] = []
        for d in disks:
            b = backend_for(d, style)
            why = (f"no {style} snapshot backend for {d.format} on a {d.path_kind}"
                   if b is None else b.can_snapshot(d, live=not shutoff))
            if b is None or why:
                raise UsageError(f"disk {d.vdev} ({d.file}): {why}")
            backends.append(b)
        all_internal = all(isinstance(b, Qcow2Internal) for b in backends)
        if all_internal and not external:
            kind = SnapshotKind.INTERNAL
        elif memory and not external:
            raise UsageError("--memory without --external needs every disk in qcow2 "
                             "(add --external to save the memory to a file)")
        else:
            kind = SnapshotKind.EXTERNAL if memory else SnapshotKind.DISK_ONLY
        with_state = kind is SnapshotKind.INTERNAL and not shutoff and not disk_only
        # Refused before anything is made: a snapshot the backend could not revert is
        # never taken (the default on a running domain keeps its memory).
        what, who = f"snapshot-create {rec.name} {snap}", ts.backend.name
        if kind is SnapshotKind.INTERNAL and not shutoff:
            ts.backend.caps.require("internal_snapshots", what, who)
        if with_state or memory:
            ts.backend.caps.require("memory_snapshots", what, who)
        if live:
            ts.backend.caps.require("live_memory_snapshots", what, who)
        guest = "running" if state == "running" else ("shutoff" if shutoff else "paused")
        entries: list[dict[str, Any]] = []
        plugged = plugged_vcpus(rec)
        for i, (d, b) in enumerate(zip(disks, backends, strict=True)):
            e = b.plan(d, snap)
            e.update({"backend": b.name, "guest": guest})
            if i == 0 and plugged and memory:
                # The memory holds every vCPU: a revert plugs them before it loads.
                e[VCPUS_PLUGGED] = plugged
            if kind is SnapshotKind.INTERNAL:
                e["vmstate"] = with_state and i == 0
            entries.append(e)
        mem_path = None
        if kind is SnapshotKind.EXTERNAL:
            # Guest memory: this user's only (QEMU writes it with umask 077).
            mem_dir = private_dir(ts.state_dir / "snapshots" / str(rec.domid))
            mem_path = str(mem_dir / f"{snap}.mem")
        # The job comes before the row: a killed create is finished or undone
        # by the next command (recover_job), whatever step it died in.
        with ts.job(rec, "snapshot-create", name=snap, guest=guest) as rec:
            faults.point("snapshot-create.job")
            row = ts.store.add_snapshot(SnapshotRecord(
                id=0, domid=rec.domid, name=snap, parent=current_id(ts, rec),
                created=time.time(), kind=kind, description=description,
                disks=tuple(entries), memory_path=mem_path, state=SnapshotState.CREATING,
            ))
            pairs = list(zip(entries, backends, strict=True))
            faults.point("snapshot-create.row")
            try:
                if shutoff:
                    await _take_offline(pairs, snap)
                else:
                    await (_take_live(ts, rec, pairs, snap, mem_path,
                                          "internal" if with_state else
                                          "live" if live else "paused", state, timeout))
            except BaseException as err:
                failure = await _create_failed(ts, rec, row, err, resume=state == "running")
                if failure is err:
                    raise
                raise failure from err
            faults.point("snapshot-create.taken")
            return record_created(ts, rec.domid, row, pairs)


def record_created(ts: Toolstack, domid: int, row: SnapshotRecord, pairs: Sequence[Pair]
             ) -> SnapshotRecord:
    """Snapshot ``row`` is whole: its overlays recorded as tops, ready, current."""
    _record_layers(ts, domid, pairs)
    ready = ts.store.set_snapshot_state(row.id, SnapshotState.READY)
    set_current(ts, domid, ready.id)
    return ready


Pair = tuple[Mapping[str, Any], DiskSnapshotBackend]


def _record_layers(ts: Toolstack, domid: int, pairs: Sequence[Pair]) -> None:
    """The disks of layered backends run on their new overlays now."""
    tops = {e["vdev"]: {"file": e["overlay"], "node": e["overlay_node"]}
            for e, b in pairs if b.layered and Path(e["overlay"]).exists()}
    if tops:
        set_tops(ts, domid, tops)


async def _take_offline(pairs: Sequence[Pair], snap: str) -> None:
    done: list[Pair] = []
    try:
        for e, b in pairs:
            await b.create(e, snap, None)
            faults.point("snapshot-create.offline-disk")
            done.append((e, b))
    except BaseException:
        for e, b in done:
            await b.discard(e, snap, None)
        raise


async def _take_disks(live: LiveSnapshots, pairs: Sequence[Pair], snap: str, state: str,
                      timeout: float) -> None:
    """Take every disk at one instant: one transaction, or one by one with the guest paused."""
    snaps = []
    try:
        # action() claims a layered disk's overlay file: built inside the try,
        # so a failure on a later disk takes the earlier claims back.
        for e, b in pairs:
            a = b.action(e, snap, await node_of(live, e["file"], e["node"]))
            if a is None:
                break
            snaps.append(a)
        else:
            await live.take(snaps, timeout)
            faults.point("snapshot-create.switched")
            return
    except BaseException:
        # A transaction that failed switched nothing, unless its answer was lost after the
        # hypervisor applied it: a discard asks the session first and keeps an overlay the
        # guest writes to.  With the session gone the files are left for _create_failed,
        # which reads where each disk runs from a new one.
        if live.connected:
            for e, b in pairs:
                if b.layered:
                    with contextlib.suppress(XenlabError):
                        await b.discard(e, snap, live)
        raise
    if state == "running":
        await live.pause()
    done: list[Pair] = []
    try:
        for e, b in pairs:
            await b.create(e, snap, live)
            done.append((e, b))
    except BaseException:
        for e, b in done:
            if not b.layered:
                await b.discard(e, snap, live)
        raise
    finally:
        if state == "running" and live.connected:
            await live.resume()


async def _take_live(ts: Toolstack, rec: DomainRecord, pairs: Sequence[Pair], snap: str,
                     mem_path: str | None, how: str, state: str, timeout: float) -> None:
    """Take a running domain's snapshot in one session; ``how``: "internal" (disks and
    VM state in the qcow2 images, qcow2's own speciality), "live" (the memory copied
    while the guest runs) or "paused"."""
    async with ts.backend.live_snapshots(ts.handle(rec)) as live:
        if how == "internal":
            nodes = [await node_of(live, e["file"], e["node"]) for e, _ in pairs]
            await live.save_internal(snap, nodes, timeout)
            return
        if mem_path is None:
            await _take_disks(live, pairs, snap, state, timeout)
            return
        # The memory file is made here, private (0600), and handed to the
        # backend: QEMU's own files are 0640 (it daemonizes with umask 027).
        # It is a checked VM state file (XXH64 per chunk), so a damaged one is
        # refused at revert.
        try:
            fd = os.open(mem_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise BackendError(f"cannot make the memory file {mem_path}: "
                               f"{err.strerror or err}") from err
        streamed = False
        try:
            if how == "live":
                async def take() -> None:
                    # The guest has stopped and its last pages are not sent yet.
                    await _take_disks(live, pairs, snap, "paused", timeout)

                streamed = True
                await live.save_state(fd, timeout, at_switchover=take)
            else:
                if state == "running":
                    await live.pause()
                faults.point("snapshot-create.stopped")
                await _take_disks(live, pairs, snap, "paused", timeout)
                streamed = True
                await live.save_state(fd, timeout)
            faults.point("snapshot-create.memory-done")
            os.fsync(fd)
        except BaseException:
            Path(mem_path).unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
            if state == "running" and live.connected:
                await live.resume(after_stream=streamed)


async def _switched(ts: Toolstack, rec: DomainRecord, row: SnapshotRecord, gone: bool
              ) -> list[Mapping[str, Any]]:
    """The entries of ``row`` whose disk switched to its new overlay: the hypervisor's word
    while the domain runs, else an overlay it wrote (a claimed name is an empty file)."""
    layered = [e for e in row.disks if entry_backend(row, e).layered
               and Path(e["overlay"]).exists()]
    if not layered:
        return []
    if rec.state != SHUTOFF and not gone:
        now = await ts.backend.disk_files(ts.handle(rec))
        return [e for e in layered if e["vdev"] in now and os.path.realpath(
            now[e["vdev"]][0]) == os.path.realpath(e["overlay"])]
    return [e for e in layered if Path(e["overlay"]).stat().st_size > 0]


async def _create_failed(ts: Toolstack, rec: DomainRecord, row: SnapshotRecord,
                   err: BaseException, *, resume: bool) -> BaseException:
    """Undo a failed create as far as possible; the error to raise, saying what happened.

    A guest that ran before runs again (the verb's own session may have gone with the
    failure, so through a new one)."""
    notes: list[str] = []
    gone = rec.state != SHUTOFF and not ts.alive(rec)
    if rec.state != SHUTOFF and not gone:
        try:
            await ts.backend.state(ts.handle(rec), 2.0)
        except BackendError:
            # It does not answer: a QEMU killed under the verb may still be exiting.
            gone = await ts.until_gone(ts.handle(rec), 3.0)
    if resume and not gone:
        try:
            if await ts.backend.resume_stopped(ts.handle(rec)):
                notes.append("the guest, paused for the snapshot, runs again")
        except XenlabError as problem:
            notes.append(f"the guest may be left paused ({problem}): `xenlab vm unpause`")
    try:
        layered = await _switched(ts, rec, row, gone)
        if layered:
            # The disks switched to the overlays before the failure: they
            # hold the guest's writes now, so keep them, recorded, for
            # snapshot-delete to commit back.
            set_tops(ts, rec.domid, {e["vdev"]: {"file": e["overlay"],
                                                  "node": e["overlay_node"]} for e in layered})
            raise BackendError("the disks run on its overlays now; snapshot-delete commits "
                               "them back")
        if gone or rec.state == SHUTOFF:
            for e in row.disks:
                await entry_backend(row, e).discard(e, row.name, None)
            if gone:
                await repair_images(entry_images(row.disks))
                notes.append("the disks were checked and their leaks repaired")
        else:
            await _discard_live(ts, rec, row)
        ts.store.remove_snapshot(row.id)
        notes.append(f"snapshot {row.name!r} was not kept")
    except Exception as cleanup:
        ts.store.set_snapshot_state(row.id, SnapshotState.BROKEN)
        notes.append(f"snapshot {row.name!r} is marked broken (cleanup failed: {cleanup})")
    if gone:
        await ts.gone(ts.store.get(rec.domid))
        notes.append("QEMU is gone, so the domain is now shut off"
                     if ts.store.list_snapshots(rec.domid) else "QEMU is gone")
    msg = f"snapshot-create {rec.name} {row.name} failed: {err}; " + "; ".join(notes)
    return BackendError(msg) if isinstance(err, Exception) else err


async def _discard_live(ts: Toolstack, rec: DomainRecord, row: SnapshotRecord) -> None:
    """Remove whatever part of ``row`` a failed live create left in the images."""
    async with ts.backend.live_snapshots(ts.handle(rec)) as live:
        for e in row.disks:
            await entry_backend(row, e).discard(e, row.name, live)


# --- list and info ----------------------------------------------------------


def list_snapshots(ts: Toolstack, name: str) -> SnapshotTree:
    """Domain ``name``'s snapshot tree and its current snapshot.

    CLI: ``xenlab vm snapshot-list DOM [--tree] [--json]``.

    :raise XenlabError: unknown domain.
    """
    rec = ts.get(name)
    cur = current_id(ts, rec)
    current = None if cur is None else ts.store.snapshot_by_id(cur).name
    return SnapshotTree(rec.name, ts.store.snapshot_tree(rec.domid), current)


async def snapshot_info(ts: Toolstack, name: str, snap: str) -> SnapshotInfo:
    """Snapshot ``snap`` of domain ``name`` in detail.

    CLI: ``xenlab vm snapshot-info DOM NAME [--json]``.

    :raise XenlabError: unknown domain or snapshot.
    """
    rec = ts.get(name)
    s = ts.store.get_snapshot(rec.domid, snap)
    snaps = ts.store.list_snapshots(rec.domid)
    parent = next((p.name for p in snaps if p.id == s.parent), None)
    children = tuple(c.name for c in snaps if c.parent == s.id)
    vm_bytes: int | None = None
    if s.kind is SnapshotKind.INTERNAL:
        for d in s.disks:
            if d.get("vmstate") and Path(d["file"]).exists():
                try:
                    info = await qemuimg.info(d["file"], "qcow2")
                except BackendError:
                    break
                for item in info.get("snapshots", ()):
                    if item.get("name") == s.name:
                        vm_bytes = int(item.get("vm-state-size", 0))
    elif s.memory_path and Path(s.memory_path).exists():
        vm_bytes = Path(s.memory_path).stat().st_size
    return SnapshotInfo(s, parent, children, current_id(ts, rec) == s.id, has_memory(s),
                        vm_bytes)



# --- revert -----------------------------------------------------------------


async def revert_snapshot(ts: Toolstack, name: str, snap: str, *, running: bool | None = None,
                    timeout: float = JOB_TIMEOUT) -> DomainRecord:
    """Bring domain ``name`` back to snapshot ``snap``; the domain's record.

    CLI: ``xenlab vm snapshot-revert DOM NAME [--running|--paused]``.  A
    snapshot with VM state leaves the guest running if it ran when taken,
    unless ``running`` says otherwise (a shut-off domain is started; a live
    one on external snapshots is restarted on new overlays).  A snapshot
    without VM state needs the domain shut off; with ``running`` set the
    domain is started afterwards.

    :raise XenlabError: unknown domain or snapshot.
    :raise StateError: a stale domain, a broken snapshot, a disk-only
        snapshot of a live domain, or a snapshot stored in an image the
        disk no longer runs on.
    :raise BackendError: QEMU or a disk tool failed.
    """
    async with ts.locked(name) as rec:
        s = ts.store.get_snapshot(rec.domid, snap)
        if s.state is not SnapshotState.READY:
            raise StateError(f"snapshot {snap!r} is {s.state.value}: it cannot be reverted")
        state = await _liveness(ts, rec)
        pairs = [(e, entry_backend(s, e)) for e in s.disks]
        tops = tops_of(ts, rec)
        for e, b in pairs:
            top = tops.get(e["vdev"])
            if not b.layered and top is not None and os.path.realpath(top) != os.path.realpath(
                    e["file"]):
                raise StateError(
                    f"domain {rec.name!r} runs on external overlays: disk {e['vdev']} runs on "
                    f"{top}, above the image holding {snap!r}; delete its external snapshots "
                    "before reverting this one"
                )
        mem = has_memory(s)
        if mem:
            ts.backend.caps.require("memory_snapshots", f"snapshot-revert {rec.name} {snap}",
                                    ts.backend.name)
        if not mem and state != SHUTOFF:
            raise StateError(
                f"snapshot {snap!r} has no VM state: its disks can only be reverted with "
                f"the domain shut off (`xenlab vm shutdown {rec.name}` first); QEMU cannot "
                "load a disk snapshot under a running guest"
            )
        go = guest_ran(s) if running is None else running
        with ts.job(rec, "snapshot-revert", name=snap, go=go, start=running is not None,
                    was=state) as rec:
            faults.point("snapshot-revert.job")
            if mem and s.kind is SnapshotKind.INTERNAL:
                rec = await _revert_internal_state(ts, rec, s, state, go, timeout)
            elif mem:
                rec = await _revert_with_memory_file(ts, rec, s, pairs, state, go, timeout)
            else:
                previous = await revert_disks(ts, rec, s, pairs)
                await prune(ts, rec.domid, set(previous.values()))
                if running is not None:
                    rec = await _start_paused(ts, ts.store.get(rec.domid))
                    if running:
                        await ts.backend.resume(ts.handle(rec))
                        rec = ts.store.patch(rec.domid, state="running")
            return set_current(ts, rec.domid, s.id)


async def _revert_internal_state(ts: Toolstack, rec: DomainRecord, s: SnapshotRecord, state: str,
                           go: bool, timeout: float) -> DomainRecord:
    if state == SHUTOFF:
        rec = await _start_paused(ts, rec)
    try:
        await _load(ts, rec, s, go, timeout)
    except BaseException:
        if not ts.alive(rec):
            await repair_images(entry_images(s.disks))
            await ts.gone(ts.store.get(rec.domid))
        raise
    return ts.store.patch(rec.domid, state="running" if go else "paused")


async def revert_disks(ts: Toolstack, rec: DomainRecord, s: SnapshotRecord,
                  pairs: Sequence[Pair]) -> dict[str, str]:
    """Revert every disk of ``s`` (QEMU is not running); the previous tops of moved disks.

    Disks that moved to new overlays are recorded; the abandoned layers are
    pruned when nothing needs them.  On failure, the new overlays are removed
    and the disks stay on their previous tops.
    """
    old = tops_of(ts, rec)
    moved: dict[str, dict[str, str]] = {}
    try:
        for e, b in pairs:
            top = await b.revert(e, s.name)
            if top is not None:
                moved[e["vdev"]] = top
    except BaseException:
        for top in moved.values():
            qemuimg.remove_own(top["file"])
        raise
    set_tops(ts, rec.domid, moved)
    return {v: old[v] for v in moved if v in old}


async def _revert_with_memory_file(ts: Toolstack, rec: DomainRecord, s: SnapshotRecord,
                             pairs: Sequence[Pair], state: str, go: bool,
                             timeout: float) -> DomainRecord:
    """Shut the domain off, revert its disks, start QEMU on them and load the memory file."""
    assert s.memory_path is not None
    if not Path(s.memory_path).is_file():
        raise StateError(f"snapshot {s.name!r}: its memory file {s.memory_path} is missing")
    # A damaged memory file is refused before the domain is touched.
    saveimage.check_stream_file(Path(s.memory_path))
    if state != SHUTOFF:
        # Reverting discards the guest as it is now, as libvirt does.
        ts.kill_domain(rec)
        await ts.gone(rec)
        faults.point("snapshot-revert.killed")
        await repair_images([(d.file, d.format) for d in snap_disks(ts, rec)])
        rec = ts.store.get(rec.domid)
    previous = await revert_disks(ts, rec, s, pairs)
    faults.point("snapshot-revert.disks")
    rec = ts.store.get(rec.domid)
    dc, text = ts.config_of(rec)
    try:
        started = await ts.launch(on_disks_now(dc, rec), text, config_path=rec.config_path,
                            uuid=rec.uuid, incoming="defer")
        try:
            with open(s.memory_path, "rb") as f:
                plugged = s.disks[0].get(VCPUS_PLUGGED) if s.disks else None
                await (_load_memory(ts, started, f.fileno(), go, timeout,
                                        f"snapshot {s.name!r} memory {s.memory_path}",
                                        plugged if isinstance(plugged, int) else None))
        except BaseException as err:
            ts.kill_domain(started)
            await ts.gone(ts.store.get(rec.domid))
            if isinstance(err, Exception):
                raise BackendError(f"snapshot-revert {rec.name} {s.name}: loading the memory "
                                   f"failed: {err}") from err
            raise
    except BaseException:
        # Back on the disks as they were (the guest itself is gone, shut off).
        new = {v: t for v, t in tops_of(ts, ts.store.get(rec.domid)).items() if v in previous}
        set_tops(ts, rec.domid, {v: {"file": p, "node": f"{v}-fmt"}
                                  for v, p in previous.items()})
        for path in new.values():
            qemuimg.remove_own(path)
        raise
    await prune(ts, rec.domid, set(previous.values()))
    return ts.store.patch(rec.domid, state="running" if go else "paused")


async def _load_memory(ts: Toolstack, rec: DomainRecord, fd: int, go: bool, timeout: float,
                       source: str, plugged: int | None) -> None:
    async with ts.backend.live_snapshots(ts.handle(rec)) as live:
        faults.point("snapshot-revert.loading")
        await live.load_state(fd, timeout, source, plugged)
        if go:
            await live.resume()


async def _load(ts: Toolstack, rec: DomainRecord, s: SnapshotRecord, go: bool,
                timeout: float) -> None:
    async with ts.backend.live_snapshots(ts.handle(rec)) as live:
        nodes = [await node_of(live, d["file"], d["node"]) for d in s.disks]
        vm = next(n for n, d in zip(nodes, s.disks, strict=True) if d.get("vmstate"))
        await live.load_internal(s.name, nodes, vm, timeout)
        status = await live.run_state()
        if go and status != "running":
            await live.resume()
        elif not go and status == "running":
            await live.pause()


# --- delete -----------------------------------------------------------------


async def delete_snapshot(ts: Toolstack, name: str, snap: str, *, children: bool = False,
                    timeout: float = JOB_TIMEOUT) -> list[SnapshotRecord]:
    """Delete snapshot ``snap`` of domain ``name`` (with ``children``, its subtree).

    CLI: ``xenlab vm snapshot-delete DOM NAME [--children]``.  Returns the
    records deleted, descendants first.  Internal snapshots leave the
    images; external ones are committed into the images below them when
    those are right under the disk's top, and otherwise just dropped.

    :raise XenlabError: unknown domain or snapshot.
    :raise StateError: children without ``children``, or a stale domain.
    :raise BackendError: QEMU or a disk tool failed (that snapshot stays, ``broken``).
    """
    async with ts.locked(name) as rec:
        top = ts.store.get_snapshot(rec.domid, snap)
        order = descendants_first(top, ts.store.list_snapshots(rec.domid))
        if len(order) > 1 and not children:
            names = ", ".join(repr(s.name) for s in order[:-1])
            raise StateError(
                f"snapshot {snap!r} has children ({names}): delete them first or use --children"
            )
        # Deleting needs no run state, only whether a QEMU holds the images.
        state = SHUTOFF if shut_off(ts, rec) else "live"
        if state != SHUTOFF:
            ts.backend.caps.require("live_disk_snapshots", f"snapshot-delete {rec.name} {snap}",
                                    ts.backend.name)
        cur = current_id(ts, rec)
        with ts.job(rec, "snapshot-delete", name=snap, children=children) as rec:
            done: list[SnapshotRecord] = []
            for s in order:
                ts.store.set_snapshot_state(s.id, SnapshotState.DELETING)
                faults.point("snapshot-delete.deleting")
                try:
                    await delete_one(ts, rec, s, state)
                    faults.point("snapshot-delete.disks-done")
                except BaseException as err:
                    ts.store.set_snapshot_state(s.id, SnapshotState.BROKEN)
                    if state != SHUTOFF and not ts.alive(rec):
                        await repair_images(entry_images(s.disks))
                        await ts.gone(ts.store.get(rec.domid))
                    if isinstance(err, Exception):
                        raise BackendError(
                            f"snapshot-delete {rec.name} {s.name} failed: {err}; it is marked "
                            "broken (delete it again to retry)"
                        ) from err
                    raise
                ts.store.remove_snapshot(s.id)
                await prune(ts, rec.domid, {str(e[k]) for e in s.disks for k in ("file", "overlay")
                                       if k in e})
                done.append(s)
                if cur == s.id:
                    cur = top.parent
                    set_current(ts, rec.domid, cur)
            return done


async def delete_one(ts: Toolstack, rec: DomainRecord, s: SnapshotRecord, state: str) -> None:
    async def each(live: LiveSnapshots | None) -> None:
        for e in s.disks:
            top = tops_of(ts, ts.store.get(rec.domid)).get(e["vdev"], e["file"])
            new = await entry_backend(s, e).delete(e, s.name, live, top)
            if new is not None:
                set_tops(ts, rec.domid, {e["vdev"]: {"file": new, "node": e["node"]}})

    if state == SHUTOFF:
        await each(None)
    else:
        async with ts.backend.live_snapshots(ts.handle(rec)) as live:
            await each(live)
    if s.memory_path:
        Path(s.memory_path).unlink(missing_ok=True)

