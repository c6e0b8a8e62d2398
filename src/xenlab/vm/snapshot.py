"""Snapshots of domains, their tree and their life-cycle: :func:`create_snapshot` and its verbs.

The verbs (:func:`create_snapshot`, :func:`list_snapshots`,
:func:`revert_snapshot`, :func:`delete_snapshot`, :func:`snapshot_info`)
take a :class:`~xenlab.vm.domain.Toolstack` and a domain name, hold the
domain's lock, and keep the store's snapshot rows in step with the disks.

Kinds (``SnapshotKind``) and how each is made:

- ``internal``: inside the qcow2 images.  On a live domain (running or
  paused) the QMP ``snapshot-save`` job stores the disks and the VM state
  (in the first qcow2 disk's format node); with ``disk_only`` a
  ``transaction`` of ``blockdev-snapshot-internal-sync`` takes every disk at
  once and no VM state.  On a shut-off domain ``qemu-img snapshot -c`` takes
  the disks (there is no VM state to save, so ``memory`` is refused).
- ``disk-only`` (``external`` without ``memory``): a qcow2 overlay
  ``<disk>.<snap>.qcow2`` next to each disk (``blockdev-snapshot-sync`` in
  one transaction, or ``qemu-img create -b`` when shut off); the files as
  they were are the snapshot, the overlays take the writes from then on.
- ``external`` (with ``memory``): overlays as above plus the VM state in
  ``<state_dir>/snapshots/<domid>/<snap>.mem``, written by QMP ``migrate``
  to ``exec:cat > FILE`` (QEMU 7.2 has no ``file:`` URI).  The guest is
  paused for the disk switch and the state; with ``live`` the state is
  copied while the guest runs and the disks switch at the migration's
  ``pre-switchover`` pause, so both are taken at the same instant.

Behaviours decided (and why):

- The new snapshot's parent is the domain's *current* snapshot, kept in the
  domain record's ``extra["current_snapshot"]`` (a snapshot id); revert
  moves it, deleting it moves it to the deleted snapshot's parent.
- Reverting a snapshot with VM state loads it with ``snapshot-load``; a
  shut-off domain is started paused first (QEMU from its stored config),
  so revert behaves the same whatever the domain's state.  The guest then
  runs if it ran when the snapshot was taken, unless ``running`` says.
- Reverting an internal snapshot *without* VM state needs the domain shut
  off: QEMU cannot load an internal disk snapshot under a running guest
  (there is no QMP command for it), and swapping disks under a running
  kernel would corrupt its file systems anyway.  It is refused on a live
  domain; ``qemu-img snapshot -a`` reverts each disk of a shut-off one.
- Reverting external snapshots is refused (not supported yet): it needs the
  domain restarted on new overlays over the snapshot's files, which means
  changing the disks the stored config names.
- Deleting an external snapshot commits its overlays back into the files
  below (active ``block-commit`` and pivot, or ``qemu-img commit``) and so is
  only possible while those overlays are the disks' top layer.
- A snapshot with children is deleted only with ``children=True``
  (descendants first); a snapshot's row is ``creating`` while it is made,
  ``deleting`` while it is removed and ``ready`` otherwise.  A failed
  create removes what it made (a partial internal snapshot, new overlays)
  and the row; if that cleanup fails too the row is left ``broken``.
- If QEMU dies during a verb, the disks are repaired with
  ``qemu-img check -r leaks`` (a killed ``snapshot-save`` leaks clusters),
  and the domain becomes shut off (it has snapshots), so the previous
  snapshots still revert.
- A stale domain (QEMU gone without the toolstack knowing) is refused:
  ``xenlab vm destroy`` clears it first.

The per-disk bookkeeping of each snapshot is its row's ``disks``: one
mapping per disk with ``vdev``, ``file`` and ``node`` (the image holding an
internal snapshot, or the image below an overlay), ``format``, and for
external kinds ``overlay`` and ``overlay_node``; ``vmstate`` marks the disk
holding internal VM state and ``guest`` records whether the guest ran.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from xenlab.config.specs.disk import DiskFormat
from xenlab.errors import BackendError, StateError, XenlabError
from xenlab.vm.domain import SHUTOFF, Toolstack, _run_async
from xenlab.vm.qmp import Qmp, run_job
from xenlab.vm.store import (
    DomainRecord,
    SnapshotKind,
    SnapshotNode,
    SnapshotRecord,
    SnapshotState,
    is_alive,
)

__all__ = [
    "SnapshotInfo",
    "SnapshotTree",
    "create_snapshot",
    "delete_snapshot",
    "list_snapshots",
    "revert_snapshot",
    "snapshot_info",
]

# Jobs that copy the guest's memory: generous under TCG, bounded all the same.
JOB_TIMEOUT = 300.0

# A name is a QEMU snapshot tag and part of a file name: keep it plain, and
# never all digits, which qemu-img would take for a snapshot id.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}")

CURRENT = "current_snapshot"
OVERLAYS = "overlays"


@dataclass(frozen=True, slots=True)
class _Disk:
    """A writable disk as QEMU has it now: its top image file and format node."""

    vdev: str
    file: str
    format: str
    node: str


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
    if not _NAME.fullmatch(snap) or snap.isdigit() or snap in (".", ".."):
        raise XenlabError(
            f"bad snapshot name {snap!r}: use 1-64 letters, digits, '_', '.', '+', '-' "
            "(not all digits)"
        )


def _img(*args: str, timeout: float = 120.0) -> str:
    """Run ``qemu-img ARGS``; its stdout, or BackendError with its message."""
    try:
        proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True,
                              check=False, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BackendError(f"qemu-img {' '.join(args)}: {err}") from err
    if proc.returncode != 0:
        msg = proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}"
        raise BackendError(f"qemu-img {args[0]} {args[-1]}: {msg}")
    return proc.stdout


def _img_tags(path: str) -> set[str]:
    """The internal snapshot names in image ``path`` (read with -U: QEMU may hold it)."""
    info = json.loads(_img("info", "-U", "--output=json", path))
    return {str(s.get("name")) for s in info.get("snapshots", ())}


def _repair(paths: Sequence[str]) -> None:
    """Fix leaked clusters (what a killed QEMU leaves); BackendError if an image is corrupt."""
    for p in paths:
        proc = subprocess.run(["qemu-img", "check", "-q", "-r", "leaks", p],
                              capture_output=True, text=True, check=False, timeout=300)
        if proc.returncode not in (0, 3):
            raise BackendError(f"qemu-img check {p}: {proc.stderr.strip() or proc.returncode}")


def _extra(rec: DomainRecord) -> dict[str, Any]:
    return dict(rec.extra)


def _disks(ts: Toolstack, rec: DomainRecord) -> list[_Disk]:
    """The domain's writable disks with media, on top of any external overlays."""
    dc, _ = ts._config_of(rec)
    overlays: Mapping[str, Mapping[str, str]] = rec.extra.get(OVERLAYS, {})
    out: list[_Disk] = []
    for d in dc.disks:
        if d.is_cdrom or not d.readwrite or not d.pdev_path or d.format is DiskFormat.EMPTY:
            continue
        top = overlays.get(d.vdev)
        if top is not None:
            out.append(_Disk(d.vdev, top["file"], "qcow2", top["node"]))
        else:
            out.append(_Disk(d.vdev, d.pdev_path, d.format.value, f"{d.vdev}-fmt"))
    return out


def _qcow2_only(disks: Sequence[_Disk], what: str) -> None:
    if not disks:
        raise XenlabError("the domain has no writable disk to snapshot")
    for d in disks:
        if d.format != "qcow2":
            raise XenlabError(
                f"disk {d.vdev} ({d.file}) is {d.format}: {what} needs qcow2 "
                "(use an external snapshot)"
            )


def _liveness(ts: Toolstack, rec: DomainRecord) -> str:
    """``"shutoff"``, or QEMU's run state; StateError for a stale domain."""
    if rec.state == SHUTOFF:
        return SHUTOFF
    if not is_alive(rec):
        raise StateError(
            f"domain {rec.name!r} (id {rec.domid}) is not running: its QEMU is gone; "
            f"`xenlab vm destroy {rec.name}` clears it"
        )
    return _run_async(ts._status(ts.paths(rec)))


def _set_current(ts: Toolstack, domid: int, snap_id: int | None) -> DomainRecord:
    rec = ts.store.get(domid)
    extra = _extra(rec)
    if snap_id is None:
        extra.pop(CURRENT, None)
    else:
        extra[CURRENT] = snap_id
    return ts.store.update(replace(rec, extra=extra))


def _current_id(ts: Toolstack, rec: DomainRecord) -> int | None:
    cur = rec.extra.get(CURRENT)
    if cur is None:
        return None
    try:
        s = ts.store.snapshot_by_id(int(cur))
    except XenlabError:
        return None
    return s.id if s.domid == rec.domid else None


async def _job(qmp: Qmp, cmd: str, args: dict[str, object], timeout: float) -> None:
    await qmp.execute(cmd, args)
    await run_job(qmp, str(args["job-id"]), timeout)


async def _wait_migration(qmp: Qmp, until: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        info = await qmp.execute("query-migrate")
        status = str(info.get("status")) if isinstance(info, dict) else "?"
        if status in until:
            return status
        if status in ("failed", "cancelled"):
            desc = info.get("error-desc", "") if isinstance(info, dict) else ""
            raise BackendError(f"saving the VM state: migration {status}: {desc}")
        if time.monotonic() > deadline:
            raise BackendError(f"saving the VM state: not done within {timeout:g}s ({status})")
        await asyncio.sleep(0.02)


def _guest_ran(s: SnapshotRecord) -> bool:
    return bool(s.disks) and s.disks[0].get("guest") == "running"


def _has_memory(s: SnapshotRecord) -> bool:
    return s.memory_path is not None or any(d.get("vmstate") for d in s.disks)


def _start_paused(ts: Toolstack, rec: DomainRecord) -> DomainRecord:
    """Start a shut-off domain paused from its stored config (create keeps its domid)."""
    cfg_dir = ts.state_dir / "snapshots" / str(rec.domid)
    cfg_dir.mkdir(parents=True, exist_ok=True)
    cfg = cfg_dir / "start.cfg"
    cfg.write_text(rec.config_text, encoding="utf-8", errors="surrogateescape")
    started = ts.create(cfg, paused=True)
    # create recorded our copy as the config's path; keep the user's.
    return ts.store.update(replace(started, config_path=rec.config_path, extra=rec.extra))


# --- create -----------------------------------------------------------------


def create_snapshot(
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
    domain gets an internal snapshot with its VM state, a shut-off one an
    internal disk snapshot.  ``memory`` asks for the VM state (internal
    snapshots of live domains always have it unless ``disk_only``);
    ``live`` (external with memory only) copies the memory while the guest
    runs.

    :raise XenlabError: unknown domain, bad or duplicate name, conflicting flags.
    :raise StateError: a stale domain, or memory asked of a shut-off one.
    :raise BackendError: QEMU or qemu-img failed (what was made is undone).
    """
    _check_name(snap)
    if disk_only and memory:
        raise XenlabError("--disk-only and --memory contradict each other")
    if live and not (external and memory):
        raise XenlabError(
            "--live needs --external --memory: internal snapshots pause the guest while "
            "its state is saved"
        )
    rec = ts.get(name)
    with ts.store.lock(rec.domid):
        rec = ts.get(name)
        state = _liveness(ts, rec)
        shutoff = state == SHUTOFF
        if shutoff and memory:
            raise StateError(
                f"domain {rec.name!r} is shut off: there is no VM state to save "
                "(drop --memory)"
            )
        if any(s.name == snap for s in ts.store.list_snapshots(rec.domid)):
            raise XenlabError(f"domain {rec.name!r} already has a snapshot named {snap!r}")
        disks = _disks(ts, rec)
        if external:
            if not disks:
                raise XenlabError("the domain has no writable disk to snapshot")
            kind = SnapshotKind.EXTERNAL if memory else SnapshotKind.DISK_ONLY
        else:
            _qcow2_only(disks, "an internal snapshot")
            kind = SnapshotKind.INTERNAL
        with_state = not shutoff and not disk_only and (memory or not external)
        guest = "running" if state == "running" else ("shutoff" if shutoff else "paused")
        entries = _entries(ts, rec, disks, snap, kind, with_state, guest)
        for e in entries:
            if "overlay" in e and Path(e["overlay"]).exists():
                raise XenlabError(f"overlay {e['overlay']} exists already")
        mem_path = None
        if kind is SnapshotKind.EXTERNAL:
            mem_dir = ts.state_dir / "snapshots" / str(rec.domid)
            mem_dir.mkdir(parents=True, exist_ok=True)
            mem_path = str(mem_dir / f"{snap}.mem")
        row = ts.store.add_snapshot(SnapshotRecord(
            id=0, domid=rec.domid, name=snap, parent=_current_id(ts, rec),
            created=time.time(), kind=kind, description=description,
            disks=tuple(entries), memory_path=mem_path, state=SnapshotState.CREATING,
        ))
        try:
            if kind is SnapshotKind.INTERNAL:
                if shutoff:
                    _internal_offline(disks, snap)
                else:
                    _run_async(_internal_live(ts, rec, disks, snap, with_state, timeout))
            elif shutoff:
                _external_offline(entries)
            else:
                _run_async(_external_live(ts, rec, entries, mem_path, live, state, timeout))
        except BaseException as err:
            failure = _create_failed(ts, rec, row, err)
            if failure is err:
                raise
            raise failure from err
        if kind is not SnapshotKind.INTERNAL:
            _record_overlays(ts, rec.domid, entries)
        ready = ts.store.set_snapshot_state(row.id, SnapshotState.READY)
        _set_current(ts, rec.domid, ready.id)
        return ready


def _record_overlays(ts: Toolstack, domid: int, entries: Sequence[Mapping[str, Any]]) -> None:
    """The disks' top layers are now these overlays."""
    rec = ts.store.get(domid)
    extra = _extra(rec)
    extra[OVERLAYS] = {
        **extra.get(OVERLAYS, {}),
        **{e["vdev"]: {"file": e["overlay"], "node": e["overlay_node"]} for e in entries},
    }
    ts.store.update(replace(rec, extra=extra))


def _entries(ts: Toolstack, rec: DomainRecord, disks: Sequence[_Disk], snap: str,
             kind: SnapshotKind, with_state: bool, guest: str) -> list[dict[str, Any]]:
    dc, _ = ts._config_of(rec)
    base = {d.vdev: d.pdev_path for d in dc.disks}
    out: list[dict[str, Any]] = []
    for i, d in enumerate(disks):
        e: dict[str, Any] = {"vdev": d.vdev, "file": d.file, "format": d.format,
                             "node": d.node, "guest": guest}
        if kind is SnapshotKind.INTERNAL:
            e["vmstate"] = with_state and i == 0
        else:
            e["overlay"] = f"{base[d.vdev]}.{snap}.qcow2"
            e["overlay_node"] = f"{d.vdev}-{snap}"
        out.append(e)
    return out


def _internal_offline(disks: Sequence[_Disk], snap: str) -> None:
    done: list[str] = []
    try:
        for d in disks:
            _img("snapshot", "-c", snap, d.file)
            done.append(d.file)
    except BaseException:
        for f in done:
            _img("snapshot", "-d", snap, f)
        raise


async def _internal_live(ts: Toolstack, rec: DomainRecord, disks: Sequence[_Disk], snap: str,
                         with_state: bool, timeout: float) -> None:
    async with Qmp.open(ts.paths(rec).qmp) as qmp:
        if with_state:
            await _job(qmp, "snapshot-save", {
                "job-id": f"save-{snap}", "tag": snap, "vmstate": disks[0].node,
                "devices": [d.node for d in disks],
            }, timeout)
        else:
            # One transaction: every disk at the same instant, or none.
            await qmp.execute("transaction", {"actions": [
                {"type": "blockdev-snapshot-internal-sync",
                 "data": {"device": d.node, "name": snap}} for d in disks
            ]}, timeout=timeout)


def _external_offline(entries: Sequence[Mapping[str, Any]]) -> None:
    done: list[str] = []
    try:
        for e in entries:
            _img("create", "-q", "-f", "qcow2", "-b", e["file"], "-F", e["format"],
                 e["overlay"])
            done.append(e["overlay"])
    except BaseException:
        for f in done:
            Path(f).unlink(missing_ok=True)
        raise


async def _external_live(ts: Toolstack, rec: DomainRecord, entries: Sequence[Mapping[str, Any]],
                         mem_path: str | None, live: bool, state: str, timeout: float) -> None:
    actions = [
        {"type": "blockdev-snapshot-sync", "data": {
            "node-name": e["node"], "snapshot-file": e["overlay"],
            "snapshot-node-name": e["overlay_node"], "format": "qcow2",
            "mode": "absolute-paths"}}
        for e in entries
    ]
    async with Qmp.open(ts.paths(rec).qmp) as qmp:
        if mem_path is None:
            await qmp.execute("transaction", {"actions": actions}, timeout=timeout)
            return
        uri = f"exec:cat > {shlex.quote(mem_path)}"
        switched = False
        try:
            if live:
                # The disks switch at the pause before switch-over, when the
                # guest has stopped and its last memory is about to be sent.
                await qmp.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "pause-before-switchover", "state": True}]})
                try:
                    await qmp.execute("migrate", {"uri": uri})
                    await _wait_migration(qmp, {"pre-switchover"}, timeout)
                    await qmp.execute("transaction", {"actions": actions}, timeout=timeout)
                    switched = True
                    await qmp.execute("migrate-continue", {"state": "pre-switchover"})
                    await _wait_migration(qmp, {"completed"}, timeout)
                finally:
                    await qmp.execute("migrate-set-capabilities", {"capabilities": [
                        {"capability": "pause-before-switchover", "state": False}]})
            else:
                if state == "running":
                    await qmp.execute("stop")
                await qmp.execute("transaction", {"actions": actions}, timeout=timeout)
                switched = True
                await qmp.execute("migrate", {"uri": uri})
                await _wait_migration(qmp, {"completed"}, timeout)
        except BaseException:
            if not switched:
                for e in entries:
                    Path(e["overlay"]).unlink(missing_ok=True)
            Path(mem_path).unlink(missing_ok=True)
            raise
        finally:
            if state == "running" and qmp.connected:
                await qmp.execute("cont")


def _create_failed(ts: Toolstack, rec: DomainRecord, row: SnapshotRecord,
                   err: BaseException) -> BaseException:
    """Undo a failed create as far as possible; the error to raise, saying what happened."""
    notes: list[str] = []
    gone = rec.state != SHUTOFF and not is_alive(rec)
    try:
        if row.kind is not SnapshotKind.INTERNAL and any(
            Path(e["overlay"]).exists() for e in row.disks
        ):
            # The disks switched to the overlays before the failure: they
            # hold the guest's writes now, so keep them, recorded, for
            # snapshot-delete to commit back.
            _record_overlays(ts, rec.domid, row.disks)
            raise BackendError("the disks run on its overlays now; snapshot-delete commits "
                               "them back")
        if row.kind is SnapshotKind.INTERNAL:
            for d in row.disks:
                if (gone or rec.state == SHUTOFF) and row.name in _img_tags(d["file"]):
                    _img("snapshot", "-d", row.name, d["file"])
            if gone:
                _repair([d["file"] for d in row.disks])
                notes.append("the disks were checked and their leaks repaired")
            elif rec.state != SHUTOFF:
                _run_async(_drop_partial_live(ts, rec, row))
        ts.store.remove_snapshot(row.id)
        notes.append(f"snapshot {row.name!r} was not kept")
    except Exception as cleanup:
        ts.store.set_snapshot_state(row.id, SnapshotState.BROKEN)
        notes.append(f"snapshot {row.name!r} is marked broken (cleanup failed: {cleanup})")
    if gone:
        ts._gone(ts.store.get(rec.domid))
        notes.append("QEMU is gone, so the domain is now shut off"
                     if ts.store.list_snapshots(rec.domid) else "QEMU is gone")
    msg = f"snapshot-create {rec.name} {row.name} failed: {err}; " + "; ".join(notes)
    return BackendError(msg) if isinstance(err, Exception) else err


async def _drop_partial_live(ts: Toolstack, rec: DomainRecord, row: SnapshotRecord) -> None:
    """Delete whatever part of internal snapshot ``row`` a failed job left in live images."""
    async with Qmp.open(ts.paths(rec).qmp) as qmp:
        for d in row.disks:
            if row.name in _img_tags(d["file"]):
                await qmp.execute("blockdev-snapshot-delete-internal-sync",
                                  {"device": d["node"], "name": row.name})


# --- list and info ----------------------------------------------------------


def list_snapshots(ts: Toolstack, name: str) -> SnapshotTree:
    """Domain ``name``'s snapshot tree and its current snapshot.

    CLI: ``xenlab vm snapshot-list DOM [--tree] [--json]``.

    :raise XenlabError: unknown domain.
    """
    rec = ts.get(name)
    cur = _current_id(ts, rec)
    current = None if cur is None else ts.store.snapshot_by_id(cur).name
    return SnapshotTree(rec.name, ts.store.snapshot_tree(rec.domid), current)


def snapshot_info(ts: Toolstack, name: str, snap: str) -> SnapshotInfo:
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
                    info = json.loads(_img("info", "-U", "--output=json", d["file"]))
                except BackendError:
                    break
                for item in info.get("snapshots", ()):
                    if item.get("name") == s.name:
                        vm_bytes = int(item.get("vm-state-size", 0))
    elif s.memory_path and Path(s.memory_path).exists():
        vm_bytes = Path(s.memory_path).stat().st_size
    return SnapshotInfo(s, parent, children, _current_id(ts, rec) == s.id, _has_memory(s),
                        vm_bytes)


# --- revert -----------------------------------------------------------------


def revert_snapshot(ts: Toolstack, name: str, snap: str, *, running: bool | None = None,
                    timeout: float = JOB_TIMEOUT) -> DomainRecord:
    """Bring domain ``name`` back to snapshot ``snap``; the domain's record.

    CLI: ``xenlab vm snapshot-revert DOM NAME [--running|--paused]``.  A
    snapshot with VM state leaves the guest running if it ran when taken,
    unless ``running`` says otherwise (a shut-off domain is started).  A
    disk-only internal snapshot needs the domain shut off; with ``running``
    set the domain is started afterwards.

    :raise XenlabError: unknown domain or snapshot.
    :raise StateError: a stale domain, a broken snapshot, a disk-only
        snapshot of a live domain, or an external snapshot.
    :raise BackendError: QEMU or qemu-img failed.
    """
    rec = ts.get(name)
    with ts.store.lock(rec.domid):
        rec = ts.get(name)
        s = ts.store.get_snapshot(rec.domid, snap)
        if s.state is not SnapshotState.READY:
            raise StateError(f"snapshot {snap!r} is {s.state.value}: it cannot be reverted")
        if s.kind is not SnapshotKind.INTERNAL:
            raise StateError(
                f"snapshot {snap!r} is {s.kind.value}: reverting external snapshots is not "
                "supported yet (delete it to merge its overlays back)"
            )
        state = _liveness(ts, rec)
        if rec.extra.get(OVERLAYS):
            raise StateError(
                f"domain {rec.name!r} runs on external overlays: delete its external "
                "snapshots before reverting an internal one"
            )
        if _has_memory(s):
            if state == SHUTOFF:
                rec = _start_paused(ts, rec)
            go = _guest_ran(s) if running is None else running
            try:
                _run_async(_load(ts, rec, s, go, timeout))
            except BaseException:
                if not is_alive(rec):
                    _repair([d["file"] for d in s.disks])
                    ts._gone(ts.store.get(rec.domid))
                raise
            rec = ts.store.update(replace(ts.store.get(rec.domid),
                                          state="running" if go else "paused"))
        else:
            if state != SHUTOFF:
                raise StateError(
                    f"snapshot {snap!r} has no VM state: its disks can only be reverted with "
                    f"the domain shut off (`xenlab vm shutdown {rec.name}` first); QEMU cannot "
                    "load a disk snapshot under a running guest"
                )
            for d in s.disks:
                _img("snapshot", "-a", snap, d["file"])
            if running is not None:
                rec = _start_paused(ts, rec)
                if running:
                    _run_async(ts._qmp(rec, "cont"))
                    rec = ts.store.update(replace(rec, state="running"))
        return _set_current(ts, rec.domid, s.id)


async def _load(ts: Toolstack, rec: DomainRecord, s: SnapshotRecord, go: bool,
                timeout: float) -> None:
    vm = next(d for d in s.disks if d.get("vmstate"))
    async with Qmp.open(ts.paths(rec).qmp) as qmp:
        await _job(qmp, "snapshot-load", {
            "job-id": f"load-{s.name}", "tag": s.name, "vmstate": vm["node"],
            "devices": [d["node"] for d in s.disks],
        }, timeout)
        st = await qmp.execute("query-status")
        status = st.get("status") if isinstance(st, dict) else None
        if go and status != "running":
            await qmp.execute("cont")
        elif not go and status == "running":
            await qmp.execute("stop")


# --- delete -----------------------------------------------------------------


def delete_snapshot(ts: Toolstack, name: str, snap: str, *, children: bool = False,
                    timeout: float = JOB_TIMEOUT) -> list[SnapshotRecord]:
    """Delete snapshot ``snap`` of domain ``name`` (with ``children``, its subtree).

    CLI: ``xenlab vm snapshot-delete DOM NAME [--children]``.  Returns the
    records deleted, descendants first.  Internal snapshots leave the
    images; external ones are committed into the files below their overlays.

    :raise XenlabError: unknown domain or snapshot.
    :raise StateError: children without ``children``, a stale domain, or an
        external snapshot whose overlays are no longer the top layer.
    :raise BackendError: QEMU or qemu-img failed (that snapshot stays, ``broken``).
    """
    rec = ts.get(name)
    with ts.store.lock(rec.domid):
        rec = ts.get(name)
        top = ts.store.get_snapshot(rec.domid, snap)
        snaps = ts.store.list_snapshots(rec.domid)
        order: list[SnapshotRecord] = []

        def collect(s: SnapshotRecord) -> None:
            for c in snaps:
                if c.parent == s.id:
                    collect(c)
            order.append(s)

        collect(top)
        if len(order) > 1 and not children:
            names = ", ".join(repr(s.name) for s in order[:-1])
            raise StateError(
                f"snapshot {snap!r} has children ({names}): delete them first or use --children"
            )
        state = _liveness(ts, rec)
        # Each external snapshot must be the disks' top layer by the time
        # its turn comes (descendants go first and pop their overlays).
        tops = {v: o.get("file") for v, o in rec.extra.get(OVERLAYS, {}).items()}
        for s in order:
            if s.kind is not SnapshotKind.INTERNAL:
                for d in s.disks:
                    if not Path(d["overlay"]).exists():
                        continue  # a broken create that never made it
                    if tops.get(d["vdev"]) != d["overlay"]:
                        raise StateError(
                            f"snapshot {s.name!r}: overlay {d['overlay']} is no longer the top "
                            f"of disk {d['vdev']}; delete the snapshots above it first"
                        )
                    tops[d["vdev"]] = d["file"]
        cur = _current_id(ts, rec)
        done: list[SnapshotRecord] = []
        for s in order:
            ts.store.set_snapshot_state(s.id, SnapshotState.DELETING)
            try:
                _delete_one(ts, rec, s, state, timeout)
            except BaseException as err:
                ts.store.set_snapshot_state(s.id, SnapshotState.BROKEN)
                if state != SHUTOFF and not is_alive(rec):
                    _repair([d["file"] for d in s.disks])
                    ts._gone(ts.store.get(rec.domid))
                if isinstance(err, Exception):
                    raise BackendError(
                        f"snapshot-delete {rec.name} {s.name} failed: {err}; it is marked "
                        "broken (delete it again to retry)"
                    ) from err
                raise
            ts.store.remove_snapshot(s.id)
            done.append(s)
            if cur == s.id:
                cur = top.parent
                _set_current(ts, rec.domid, cur)
        return done


def _delete_one(ts: Toolstack, rec: DomainRecord, s: SnapshotRecord, state: str,
                timeout: float) -> None:
    if s.kind is SnapshotKind.INTERNAL:
        present = [d for d in s.disks if Path(d["file"]).exists() and s.name in
                   _img_tags(d["file"])]
        if not present:
            return
        if state == SHUTOFF:
            for d in present:
                _img("snapshot", "-d", s.name, d["file"])
        else:
            _run_async(_job_delete(ts, rec, s.name, [d["node"] for d in present], timeout))
        return
    tops = {v: o.get("file") for v, o in ts.store.get(rec.domid).extra.get(OVERLAYS, {}).items()}
    if all(tops.get(d["vdev"]) == d["overlay"] for d in s.disks):
        if state == SHUTOFF:
            for d in s.disks:
                _img("commit", "-q", d["overlay"], timeout=timeout)
        else:
            _run_async(_commit_live(ts, rec, s, timeout))
        _pop_overlays(ts, rec.domid, s)
    for d in s.disks:
        Path(d["overlay"]).unlink(missing_ok=True)
    if s.memory_path:
        Path(s.memory_path).unlink(missing_ok=True)


async def _job_delete(ts: Toolstack, rec: DomainRecord, tag: str, nodes: list[str],
                      timeout: float) -> None:
    async with Qmp.open(ts.paths(rec).qmp) as qmp:
        await _job(qmp, "snapshot-delete",
                   {"job-id": f"delete-{tag}", "tag": tag, "devices": nodes}, timeout)


async def _commit_live(ts: Toolstack, rec: DomainRecord, s: SnapshotRecord,
                       timeout: float) -> None:
    async with Qmp.open(ts.paths(rec).qmp) as qmp:
        for d in s.disks:
            job = f"commit-{d['vdev']}"
            # Active commit: the overlay's data goes down into the node below
            # and the device pivots onto it when the job completes.
            await qmp.execute("block-commit", {
                "job-id": job, "device": d["overlay_node"], "base-node": d["node"],
                "auto-dismiss": False, "auto-finalize": True,
            })
            await run_job(qmp, job, timeout, complete_on_ready=True)


def _pop_overlays(ts: Toolstack, domid: int, s: SnapshotRecord) -> None:
    """After a commit the disks' top is what was below the overlays again."""
    rec = ts.store.get(domid)
    extra = _extra(rec)
    overlays = dict(extra.get(OVERLAYS, {}))
    dc, _ = ts._config_of(rec)
    base = {d.vdev: d.pdev_path for d in dc.disks}
    for d in s.disks:
        if d["file"] == base.get(d["vdev"]):
            overlays.pop(d["vdev"], None)
        else:
            overlays[d["vdev"]] = {"file": d["file"], "node": d["node"]}
    if overlays:
        extra[OVERLAYS] = overlays
    else:
        extra.pop(OVERLAYS, None)
    ts.store.update(replace(rec, extra=extra))
