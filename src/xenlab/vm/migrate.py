"""Live migration of domains, xl migrate: :func:`migrate`; the save, restore and receive
verbs it shares its stream with are re-exported here.

:func:`migrate` moves a running domain to a second :class:`Toolstack` on
this host (standing for another host, its destination started with
:func:`~xenlab.vm.receiver.receive`), or to ``HOST:PORT`` where
:func:`~xenlab.vm.receiver.serve_receive` (``xenlab vm receive``) waits with
its token; the two hosts then speak the control protocol over a
:class:`~xenlab.vm.control.Channel`.  With ``with_storage`` the disks go
first, mirrored into the destination's NBD exports.  The source QEMU quits
only once the destination has said it runs the guest; until "go" is sent
the source may take the guest back.  The protocol, its failure rules, the
threat model of the receiver and the save image format are in
docs/migration.md.

The pieces: :mod:`xenlab.vm.saveimage` (the save image format),
:mod:`xenlab.vm.vmstate` (QEMU's stream over QMP, and the helpers all of
them share), :mod:`xenlab.vm.saverestore` (xl save and restore),
:mod:`xenlab.vm.control` (the channel and the token),
:mod:`xenlab.vm.peerconfig` (what a receiver takes from its peer) and
:mod:`xenlab.vm.receiver` (the destination).

Failures: the source domain is only stopped for good after the destination
runs: a failed or interrupted migration (a destination that dies, a
timeout) cancels the stream and the mirrors, removes the NBD nodes, resumes
the source if it was running, kills a local destination and forgets its
record, and raises :class:`BackendError` saying what happened and that the
domain still runs here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from xenlab import faults
from xenlab.errors import BackendError, StateError, UsageError, XenlabError
from xenlab.vm import vmstate
from xenlab.vm.backends.qemu.save import quit_qemu
from xenlab.vm.control import (
    PROTOCOL,
    Channel,
    Lost,
    Refused,
    expect,
    new_token,
    parse_address,
    read_token,
    uri_host,
)
from xenlab.vm.domain import Toolstack
from xenlab.vm.jobs import Job
from xenlab.vm.qemu import RuntimePaths
from xenlab.vm.qmp import Qmp
from xenlab.vm.qmp import run as _run
from xenlab.vm.receiver import (
    START_TIMEOUT,
    Incoming,
    abort_receive,
    finish_receive,
    mirrored_disks,
    receive,
    serve_receive,
)
from xenlab.vm.resources import plugged_vcpus
from xenlab.vm.runtime import CURRENT, DISK_NODES
from xenlab.vm.saveimage import (
    MAGIC,
    SAVE_VERSION,
    DiskMove,
    DiskSnapshot,
    SaveHeader,
    header_from_json,
    header_to_json,
    pack_header,
    parse_header,
    read_header,
)
from xenlab.vm.saverestore import moves_of, place, quit_domain, restore, save
from xenlab.vm.store import DomainRecord, SnapshotNode, private_dir
from xenlab.vm.vmstate import MigrationProgress, Progress

__all__ = [
    "MAGIC",
    "SAVE_VERSION",
    "DiskMove",
    "DiskSnapshot",
    "Incoming",
    "MigrationProgress",
    "MigrationResult",
    "SaveHeader",
    "abort_receive",
    "finish_receive",
    "header_from_json",
    "header_to_json",
    "migrate",
    "new_token",
    "pack_header",
    "parse_header",
    "read_header",
    "read_token",
    "receive",
    "restore",
    "save",
    "serve_receive",
]

_log = logging.getLogger(__name__)
_POLL = 0.05
# How long the sender waits for the receiver's greeting.
_HELLO_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """What a finished migration did.

    ``record`` is the destination's record when the destination is a local
    :class:`Toolstack`, else None.  ``downtime_ms`` and ``total_ms`` are
    QEMU's own figures; ``seconds`` is the whole command, mirrors included.
    """

    record: DomainRecord | None
    seconds: float
    total_ms: int
    downtime_ms: int
    ram_transferred: int
    disks: tuple[str, ...]


def _copy_snapshots(src: Toolstack, dst: Toolstack, rec: DomainRecord,
                    new: DomainRecord) -> DomainRecord:
    """Give ``new`` (in ``dst``) the snapshot tree of ``rec`` (in ``src``); parents first.

    Memory files move with their snapshots into ``dst``'s state directory: a
    file left in ``src``'s would be deleted by ``src`` (its domid reused) or
    block a new snapshot of the same name there.  A tree ``new`` has already
    (a recovery finishing this) is not copied twice.
    """
    if dst.store.list_snapshots(new.domid):
        return new
    ids: dict[int, int] = {}
    mem_dir = private_dir(dst.state_dir / "snapshots" / str(new.domid))

    def add(node: SnapshotNode, parent: int | None) -> None:
        s = node.snapshot
        memory = s.memory_path
        if memory is not None and Path(memory).is_file():
            moved = mem_dir / Path(memory).name
            shutil.move(memory, moved)
            memory = str(moved)
        made = dst.store.add_snapshot(replace(s, id=0, domid=new.domid, parent=parent,
                                              memory_path=memory))
        ids[s.id] = made.id
        for child in node.children:
            add(child, made.id)

    for root in src.store.snapshot_tree(rec.domid):
        add(root, None)
    cur = rec.extra.get(CURRENT)
    if cur is not None and int(cur) in ids:
        return dst.store.patch(new.domid, extra_set={CURRENT: ids[int(cur)]})
    return dst.store.get(new.domid)



# --- live migration ----------------------------------------------------------------------


def migrate(
    ts: Toolstack, name: str, dest: Toolstack | str, *, live: bool = True,
    with_storage: bool = False, paused: bool = False, host: str = "127.0.0.1",
    nbd_port: int | None = None, dest_overrides: Sequence[str] = (),
    max_bandwidth: int | None = None, timeout: float = 600.0,
    progress: Progress | None = None, token: str | None = None,
) -> MigrationResult:
    """Move the running domain ``name`` to ``dest``; xl migrate.

    ``dest`` is a :class:`Toolstack` on this host (its destination QEMU is
    started here, listening on ``host``, with ``dest_overrides`` appended to
    the config, e.g. other disk paths) or ``"HOST:PORT"`` where
    :func:`serve_receive` (``xenlab vm receive --listen``) waits; the two
    then speak the control protocol of the module docstring, and the source
    QEMU quits only once the destination has said it runs the guest;
    ``token`` is the one the receiver printed (needed for ``"HOST:PORT"``).
    ``live=False`` pauses the domain first (virsh migrate without --live).
    ``with_storage`` mirrors the writable disks to the destination first.
    ``paused`` leaves the destination paused.  ``max_bandwidth`` is in
    bytes/s (default: unlimited).  Disks on a mirror's target (or a local
    destination's overlays) go on running on those files at the destination.

    On success the source QEMU has quit and its record is gone; the
    destination runs.

    CLI: ``xenlab vm migrate DOM HOST:PORT --token TOKEN|--token-file FILE
    [--with-storage] [--offline] [-p] [--max-bandwidth BYTES]`` (and
    ``--dest-state-dir DIR`` for a second toolstack on this host).

    :raise XenlabError: ``dest`` is ``"HOST:PORT"`` and no ``token`` is given
        (nothing happened).
    :raise StateError: the domain is not running, or has snapshots and the
        destination is not a toolstack on this host sharing the disks.
    :raise BackendError: the migration failed (destination gone or refusing,
        timeout, a mirror error); the domain still runs here and the message
        says so; or the control connection broke after the destination was
        told to go (the message says to check both ends; the domain is left
        paused here).
    """
    started = time.monotonic()
    if isinstance(dest, Toolstack) and with_storage and not dest_overrides:
        # Both ends would open the same files: the export is refused ("Block node
        # is read-only") after the destination QEMU started.
        raise UsageError(
            f"migrate {name} --with-storage to a toolstack on this host needs other disk "
            "paths for the destination (dest_overrides); on the command line, use "
            "`xenlab vm receive --listen ... 'disk=[...]'` there and `migrate HOST:PORT` here")
    if not isinstance(dest, Toolstack):
        parse_address(dest)
        if not token:
            raise UsageError(f"migrate {name} to {dest}: the receiver wants the token it "
                             "printed (--token TOKEN or --token-file FILE)")
    with ts.live(name) as rec:
        snaps = ts.store.list_snapshots(rec.domid)
        if snaps and (with_storage or not isinstance(dest, Toolstack)):
            raise StateError(
                f"domain {rec.name!r} has {len(snaps)} snapshot(s): their records can only "
                "follow it to a second toolstack on this host with shared disks (a storage "
                "migration copies the disks' current state only); delete them first"
            )
        paths = ts.paths(rec)
        disk_paths, overlays = moves_of(rec)
        dc, _ = ts.config_of(rec)
        disks = mirrored_disks(place(dc, dc, disk_paths, overlays, f"migrate {rec.name}").config
                          ) if with_storage else []
        vdevs = [v for v, _, _ in disks]
        nodes = {v: str((rec.extra.get(DISK_NODES) or {}).get(v, f"{v}-fmt")) for v in vdevs}
        # The job's phase tells a recovery whether the destination may run the
        # guest already (recover_job): never resume both copies.
        held = contextlib.ExitStack()
        rec = held.enter_context(ts.job(
            rec, "migrate", phase="sending", guest=_run(ts.backend.state(ts.handle(rec))),
            dest=str(dest.state_dir) if isinstance(dest, Toolstack) else dest,
            local=isinstance(dest, Toolstack)))
        faults.point("migrate.job")
        with held:
            if not isinstance(dest, Toolstack):
                info = _migrate_remote(ts, rec, paths, dest, disk_paths, overlays, vdevs, nodes,
                                       live=live, paused=paused, max_bandwidth=max_bandwidth,
                                       timeout=timeout, progress=progress, started=started,
                                       token=str(token),
                                       on_phase=functools.partial(ts.update_job, rec.domid))
                dest_rec: DomainRecord | None = None
            else:
                sizes = _run(_disk_sizes(paths, nodes)) if disks else {}
                incoming = receive(
                    dest, rec.config_text, 0, host=host, overrides=dest_overrides,
                    with_storage=with_storage, nbd_port=nbd_port, disk_sizes=sizes,
                    config_path=rec.config_path, uuid=rec.uuid, disk_paths=disk_paths,
                    overlays=overlays, vcpus_plugged=plugged_vcpus(rec),
                )
                where = f"{uri_host(host)}:{incoming.port}"
                try:
                    sent = _run(_send(paths, rec.name, where, host, incoming.nbd_port, nodes,
                                      live=live, max_bandwidth=max_bandwidth, timeout=timeout,
                                      progress=progress, started=started))
                except BaseException as err:
                    dead = not dest.alive(incoming.record)
                    abort_receive(dest, incoming)
                    if isinstance(err, BackendError) and dead:
                        raise BackendError(
                            f"migrate {rec.name} to {where}: the destination QEMU went away "
                            f"during the migration; {rec.name} still runs here [{err}]"
                        ) from err
                    if isinstance(err, BackendError):
                        raise BackendError(
                            f"migrate {rec.name} to {where} failed; {rec.name} still runs here "
                            f"[{err}]"
                        ) from err
                    raise
                faults.point("migrate.streamed")
                ts.update_job(rec.domid, phase="handing-over")
                faults.point("migrate.handing-over")
                try:
                    dest_rec = finish_receive(dest, incoming, paused=paused, timeout=timeout)
                    ts.update_job(rec.domid, phase="handed-over")
                    faults.point("migrate.handed-over")
                except BaseException:
                    # The destination could not take over: the source has every
                    # page and its disks, so it carries on.
                    with contextlib.suppress(BackendError):
                        _run(_resume_source(paths, sent))
                    raise
                if snaps:
                    dest_rec = _copy_snapshots(ts, dest, rec, dest_rec)
                info = sent.info
            quit_domain(ts, rec)
            shutil.rmtree(paths.rundir, ignore_errors=True)
            ts.store.remove(rec.domid)
    ram = info.get("ram") or {}
    return MigrationResult(
        record=dest_rec, seconds=time.monotonic() - started,
        total_ms=int(info.get("total-time", 0)), downtime_ms=int(info.get("downtime", 0)),
        ram_transferred=int(ram.get("transferred", 0)),
        disks=tuple(vdevs),
    )


async def _disk_sizes(paths: RuntimePaths, nodes: Mapping[str, str]) -> dict[str, int]:
    """vdev -> virtual size of the node it runs on (``nodes``: vdev -> node name)."""
    async with Qmp.open(paths.qmp) as qmp:
        return await _node_sizes(qmp, nodes)


async def _node_sizes(qmp: Qmp, nodes: Mapping[str, str]) -> dict[str, int]:
    listed = await qmp.execute("query-named-block-nodes", {"flat": True})
    by_node = {str(n.get("node-name", "")): n for n in listed if isinstance(n, dict)
               } if isinstance(listed, list) else {}
    return {v: int(by_node[n]["image"]["virtual-size"]) for v, n in nodes.items()
            if n in by_node}


@dataclass(frozen=True, slots=True)
class _Sent:
    """A completed stream: QEMU's final ``query-migrate``, whether the guest ran
    before, and the bandwidth limit to give back if the source has to go on."""

    info: dict[str, Any]
    was_running: bool
    old_bw: object


async def _resume_source(paths: RuntimePaths, sent: _Sent) -> None:
    """Let the source go on after a completed stream the destination did not take."""
    async with Qmp.open(paths.qmp) as qmp:
        await _resume_in(qmp, sent)


async def _send(paths: RuntimePaths, name: str, where: str, dhost: str, nbd_port: int | None,
                nodes: Mapping[str, str], *, live: bool, max_bandwidth: int | None,
                timeout: float, progress: Progress | None, started: float,
                qmp: Qmp | None = None) -> _Sent:
    """Mirror ``nodes`` (vdev -> source node) to the NBD exports, migrate, end the mirrors.

    The source is left stopped (postmigrate).  On failure everything is
    undone and the guest resumed if it ran.  ``qmp``: a session to use
    instead of a new one.
    """
    if qmp is None:
        async with Qmp.open(paths.qmp) as session:
            return await _send(paths, name, where, dhost, nbd_port, nodes, live=live,
                               max_bandwidth=max_bandwidth, timeout=timeout,
                               progress=progress, started=started, qmp=session)
    was_running = await vmstate.status(qmp) == "running"
    params = await qmp.execute("query-migrate-parameters")
    old_bw = params.get("max-bandwidth") if isinstance(params, dict) else None
    await qmp.execute("migrate-set-parameters",
                      {"max-bandwidth": max_bandwidth or vmstate.UNLIMITED})
    await vmstate.enable_events(qmp)
    mirrors: list[str] = []
    added: list[str] = []
    completed = False
    if nodes:
        await _del_stale_nodes(qmp, [f"mig-{vdev}" for vdev in nodes])
    try:
        for vdev, node in nodes.items():
            assert nbd_port is not None
            await qmp.execute("blockdev-add", {
                "driver": "nbd", "node-name": f"mig-{vdev}", "export": vdev,
                "server": {"type": "inet", "host": dhost, "port": str(nbd_port)},
            })
            added.append(f"mig-{vdev}")
            await qmp.execute("blockdev-mirror", {
                "job-id": f"mig-{vdev}", "device": node, "target": f"mig-{vdev}",
                "sync": "full", "copy-mode": "write-blocking",
                # kept after it ends, so a failure's reason can be read
                "auto-dismiss": False,
            })
            mirrors.append(f"mig-{vdev}")
        if mirrors:
            await _wait_mirrors_ready(qmp, mirrors, timeout, progress, started)
        if not live and was_running:
            await qmp.execute("stop")
        with qmp.listen("MIGRATION") as watch:
            await qmp.execute("migrate", {"uri": f"tcp:{where}"})
            info = await vmstate.wait_migration(qmp, watch, f"migrate {name}", timeout, progress,
                                         started, stats=True)
        completed = True
        for job in mirrors:
            # Ready, so cancelling completes the copy without a pivot.
            await qmp.execute("block-job-cancel", {"device": job})
        await _dismiss_jobs(qmp, mirrors, 30)
        mirrors.clear()
        # The NBD nodes go with their mirrors, now: whatever the destination
        # does next, the source needs them no more, and if it has to resume, a
        # later storage migration adds them again under the same names.
        for node in added:
            try:
                await qmp.execute("blockdev-del", {"node-name": node})
            except BackendError as err:
                _log.warning("migrate %s: NBD node %s not deleted: %s", name, node, err)
        added.clear()
        return _Sent(info, was_running, old_bw)
    except BaseException:
        if not completed:
            await vmstate.cancel_migration(qmp)
        for job in mirrors:
            with contextlib.suppress(BackendError):
                await qmp.execute("block-job-cancel", {"device": job, "force": True})
        with contextlib.suppress(BackendError):
            await _dismiss_jobs(qmp, mirrors, 30)
        for node in added:
            with contextlib.suppress(BackendError):
                await qmp.execute("blockdev-del", {"node-name": node})
        if was_running:
            with contextlib.suppress(BackendError):
                await vmstate.cont_after_migration(qmp)
        if old_bw is not None:
            with contextlib.suppress(BackendError):
                await qmp.execute("migrate-set-parameters", {"max-bandwidth": old_bw})
        raise



# --- the sending side of the control channel --------------------------------------------


def _migrate_remote(ts: Toolstack, rec: DomainRecord, paths: RuntimePaths, dest: str,
                    disk_paths: tuple[DiskMove, ...], overlays: tuple[DiskMove, ...],
                    vdevs: Sequence[str], nodes: Mapping[str, str], *, live: bool,
                    paused: bool, max_bandwidth: int | None, timeout: float,
                    progress: Progress | None, started: float, token: str,
                    on_phase: Callable[..., None] = lambda **_: None) -> dict[str, Any]:
    """The sending side of the control protocol; QEMU's final ``query-migrate``.

    ``on_phase(phase=...)`` is told "handing-over" just before "go" is sent
    and "handed-over" once the destination said it resumed.
    """
    host, port = parse_address(dest)
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError as err:
        raise BackendError(f"migrate {rec.name}: cannot reach a receiver at {dest}: "
                           f"{err.strerror or err}; {rec.name} still runs here") from err
    try:
        return _run(_sender(Channel(sock, dest), rec, paths, host, disk_paths, overlays,
                            nodes, live=live, paused=paused, max_bandwidth=max_bandwidth,
                            timeout=timeout, progress=progress, started=started,
                            token=token, on_phase=on_phase))
    finally:
        sock.close()


async def _sender(ch: Channel, rec: DomainRecord, paths: RuntimePaths, host: str,
                  disk_paths: tuple[DiskMove, ...], overlays: tuple[DiskMove, ...],
                  nodes: Mapping[str, str], *, live: bool, paused: bool,
                  max_bandwidth: int | None, timeout: float, progress: Progress | None,
                  started: float, token: str,
                  on_phase: Callable[..., None] = lambda **_: None) -> dict[str, Any]:
    what = f"migrate {rec.name} to {ch.peer}"
    here = f"{rec.name} still runs here"
    async with Qmp.open(paths.qmp) as qmp:
        state = await vmstate.status(qmp)
        header = SaveHeader(
            name=rec.name, uuid=rec.uuid, config_text=rec.config_text,
            config_path=rec.config_path,
            qemu_version=vmstate.qemu_version(await qmp.execute("query-version")),
            created=time.time(), state="running" if state == "running" else "paused",
            disk_paths=disk_paths, overlays=overlays, vcpus_plugged=plugged_vcpus(rec),
        )
        sizes = await _node_sizes(qmp, nodes) if nodes else {}
        try:
            hello = await ch.recv(_HELLO_TIMEOUT, "the receiver's greeting")
            if hello.get("msg") != "hello" or hello.get("protocol") != PROTOCOL:
                raise BackendError(f"{ch.peer} is not a xenlab receiver speaking protocol "
                                   f"{PROTOCOL} (it said {str(hello)[:200]})")
            # Version 3 on the wire: version 4 adds only the checksums of an image
            # file, which TCP does not need, and older receivers read version 3.
            await ch.send({"msg": "prepare", "token": token,
                           "header": header_to_json(replace(header, version=3)),
                           "with_storage": bool(nodes), "disk_sizes": sizes})
            listening = await ch.recv(START_TIMEOUT, "the destination QEMU to listen")
            expect(listening, "listening", ch.peer)
            dport, nbd = listening.get("port"), listening.get("nbd_port")
            if not isinstance(dport, int) or (nodes and not isinstance(nbd, int)):
                raise BackendError(f"{ch.peer}: no port to send to in {listening}")
        except BackendError as err:
            raise BackendError(f"{what}: {err}; {here}") from err
        where = f"{uri_host(host)}:{dport}"
        try:
            sent = await _send(paths, rec.name, where, host, nbd if nodes else None, nodes,
                               live=live, max_bandwidth=max_bandwidth, timeout=timeout,
                               progress=progress, started=started, qmp=qmp)
        except BaseException as err:
            await ch.quiet_send({"msg": "abort", "error": str(err)})
            if isinstance(err, BackendError):
                raise BackendError(f"{what} failed; {here} [{err}]") from err
            raise
        # The stream is complete: the source is stopped, the destination holds
        # the guest, paused.  Until "go" is sent, the source may take it back.
        try:
            expect(await ch.recv(START_TIMEOUT, "the destination's report that it "
                                                  "loaded the stream"), "loaded", ch.peer)
            await asyncio.sleep(0)
            if ch.closed():
                raise Lost(f"{ch.peer} closed the control connection before it was "
                            "told to start the guest")
            on_phase(phase="handing-over")
            faults.point("migrate.handing-over")
            await ch.send({"msg": "go", "paused": paused})
        except BaseException as err:
            await ch.quiet_send({"msg": "abort", "error": str(err)})
            back = await _take_back(qmp, sent, rec.name)
            if isinstance(err, BackendError):
                raise BackendError(f"{what}: the destination did not take the guest "
                                   f"({err}); {back}") from err
            raise
        # Past the point of no return: the destination may be running the guest.
        try:
            done = await ch.recv(START_TIMEOUT, "the destination's report")
            expect(done, "resumed", ch.peer)
            on_phase(phase="handed-over")
            faults.point("migrate.handed-over")
        except Refused as err:
            # A receiver that fails here has killed its QEMU before saying so.
            back = await _take_back(qmp, sent, rec.name)
            raise BackendError(f"{what}: the destination could not start the guest "
                               f"({err}); {back}") from err
        except BackendError as err:
            raise BackendError(
                f"{what}: the control connection broke after the destination was told to "
                f"start the guest ({err}); it may run there: {rec.name} is left paused "
                f"here. Check the destination, then `xenlab vm unpause {rec.name}` here "
                f"only if it does not run there, else `xenlab vm destroy {rec.name}` here"
            ) from err
        await quit_qemu(qmp)
        return sent.info


async def _take_back(qmp: Qmp, sent: _Sent, name: str) -> str:
    """Resume the source after the destination did not take the guest; what happened.

    Resuming can fail: a destination QEMU that outlived its receiver holds the
    shared disks' locks.  The guest then stays paused here, and the message
    says so rather than claiming it runs.
    """
    try:
        await _resume_in(qmp, sent)
    except BackendError as err:
        return (f"{name} is left paused here: resuming it failed ({err}); once no "
                f"destination QEMU holds its disks, `xenlab vm unpause {name}`")
    return f"{name} was resumed here"


async def _resume_in(qmp: Qmp, sent: _Sent) -> None:
    if sent.old_bw is not None:
        with contextlib.suppress(BackendError):
            await qmp.execute("migrate-set-parameters", {"max-bandwidth": sent.old_bw})
    if sent.was_running:
        await vmstate.cont_after_migration(qmp)


# --- block jobs of a storage migration ------------------------------------------------------


async def _block_jobs(qmp: Qmp) -> dict[str, dict[str, Any]]:
    jobs = await qmp.execute("query-block-jobs")
    return {str(j.get("device")): j for j in jobs if isinstance(j, dict)} if isinstance(
        jobs, list) else {}


async def _wait_mirrors_ready(qmp: Qmp, jobs: Sequence[str], timeout: float,
                              progress: Progress | None, started: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        now = await _block_jobs(qmp)
        missing = [j for j in jobs if j not in now]
        if missing:
            raise BackendError(f"disk mirror {missing[0]} vanished before it was ready")
        mine = [now[j] for j in jobs]
        for j in mine:
            if j.get("status") in ("aborting", "concluded", "null") or j.get("error"):
                raise BackendError(f"disk mirror {j.get('device')} failed: "
                                   f"{j.get('error', 'ended before it was ready')}")
        done = sum(int(j.get("offset", 0)) for j in mine)
        total = sum(int(j.get("len", 0)) for j in mine)
        if progress is not None:
            progress(MigrationProgress("storage", "mirroring", done, total - done, total,
                                       time.monotonic() - started))
        if all(j.get("ready") for j in mine):
            return
        if time.monotonic() > deadline:
            raise BackendError(f"disk mirrors not ready within {timeout:g}s")
        await asyncio.sleep(_POLL)


async def _del_stale_nodes(qmp: Qmp, names: Sequence[str]) -> None:
    """Delete nodes ``names`` left in QEMU by an earlier migration (no job uses them)."""
    listed = await qmp.execute("query-named-block-nodes", {"flat": True})
    have = {str(n.get("node-name")) for n in listed if isinstance(n, dict)
            } if isinstance(listed, list) else set()
    for node in names:
        if node in have:
            with contextlib.suppress(BackendError):
                await qmp.execute("blockdev-del", {"node-name": node})


async def _dismiss_jobs(qmp: Qmp, jobs: Sequence[str], timeout: float) -> None:
    """Wait until each of ``jobs`` has concluded, then dismiss it."""
    deadline = time.monotonic() + timeout
    left = set(jobs)
    while left:
        now = await _block_jobs(qmp)
        for job in sorted(left):
            info = now.get(job)
            if info is None:
                left.discard(job)
            elif info.get("status") == "concluded":
                await qmp.execute("job-dismiss", {"id": job})
                left.discard(job)
        if not left:
            return
        if time.monotonic() > deadline:
            raise BackendError(f"block jobs {', '.join(sorted(left))} still running after "
                               f"{timeout:g}s")
        await asyncio.sleep(_POLL)


# --- a migration killed half-way ---------------------------------------------------------


def recover_job(ts: Toolstack, rec: DomainRecord, job: Job) -> DomainRecord | None:
    """Finish or undo a migration whose sending process was killed (``Toolstack.converge``).

    The job's phase says how far it got.  Before the destination was told to
    resume ("sending"), the migration is undone: a stream QEMU still sends
    is cancelled, the NBD nodes and mirrors go, and a guest that ran runs
    here again.  After the destination said it resumed ("handed-over"),
    it is finished: this QEMU quits and the record goes.  In between
    ("handing-over") only the destination knows: a destination toolstack on
    this host is asked (its domain runs, or its QEMU says the guest runs:
    finished; else undone); for another host the guest is left paused here
    and the message says how to decide, as after a lost control connection.
    """
    if job.verb != "migrate":
        return rec
    phase = str(job.detail.get("phase", "sending"))
    where = f"domain {rec.name}: a migration to {job.detail.get('dest')}"
    if not ts.alive(rec):
        kept = ts.gone(rec)
        _log.warning("%s was killed; the QEMU here is gone", where)
        return kept
    if phase == "handing-over":
        runs = _destination_runs(job, rec.uuid)
        if runs is None:
            _log.warning("%s was killed after the destination was told to start the guest; "
                         "it may run there: %s is left paused here. Check the destination, "
                         "then `xenlab vm unpause %s` here only if it does not run there, "
                         "else `xenlab vm destroy %s` here", where, rec.name, rec.name,
                         rec.name)
            return ts.store.patch(rec.domid, state="paused")
        phase = "handed-over" if runs else "sending"
    paths = ts.paths(rec)
    if phase == "handed-over":
        _snapshots_follow(ts, rec, job)
        quit_domain(ts, rec)
        shutil.rmtree(paths.rundir, ignore_errors=True)
        ts.store.remove(rec.domid)
        _log.warning("%s was killed after the guest ran there: finished, %s is gone from "
                     "here", where, rec.name)
        return None

    async def undo() -> str:
        async with Qmp.open(paths.qmp) as qmp:
            await vmstate.cancel_active(qmp)
            jobs = [j for j in (await _block_jobs(qmp)) if j.startswith("mig-")]
            for j in jobs:
                with contextlib.suppress(BackendError):
                    await qmp.execute("block-job-cancel", {"device": j, "force": True})
            with contextlib.suppress(BackendError):
                await _dismiss_jobs(qmp, jobs, 30)
            await _del_stale_nodes(qmp, [n for n in await _nbd_nodes(qmp)])
            if job.detail.get("guest") == "running":
                await vmstate.cont_after_migration(qmp)
            return await vmstate.status(qmp)

    # The destination's QEMU holds the disks' locks once the stream is in: a
    # local one goes first (its own converge undoes the incoming domain).
    _destination_undo(job, rec.uuid)
    try:
        state = _run(undo())
    except BackendError as err:
        _log.warning("%s was killed before the guest ran there; it cannot run here yet "
                     "(%s): %s is left paused. If the destination still holds it, end it "
                     "there, then `xenlab vm unpause %s` here", where, err, rec.name, rec.name)
        return ts.store.patch(rec.domid, state="paused")
    _log.warning("%s was killed before the guest ran there: undone, the guest is %s here",
                 where, state)
    return ts.store.patch(rec.domid, state="running" if state == "running" else "paused")


@contextlib.contextmanager
def _local_dest(job: Job) -> Iterator[Toolstack | None]:
    """The destination toolstack of a killed local migration, or None (another host)."""
    if not job.detail.get("local"):
        yield None
        return
    try:
        dest = Toolstack(Path(str(job.detail.get("dest"))))
    except XenlabError:
        yield None
        return
    try:
        yield dest
    finally:
        dest.store.close()


def _destination_undo(job: Job, uuid: str) -> None:
    """A local destination's half-received copy of the guest is undone (it never ran)."""
    with _local_dest(job) as dest:
        if dest is None:
            return
        for r in dest.store.list():
            if r.uuid == uuid and r.state == "incoming":
                with contextlib.suppress(XenlabError), dest.locked(str(r.domid)):
                    pass  # taking it converges it: a dead migration's incoming copy goes


async def _nbd_nodes(qmp: Qmp) -> list[str]:
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    return [str(n["node-name"]) for n in nodes if isinstance(n, dict)
            and str(n.get("node-name", "")).startswith("mig-")] if isinstance(nodes, list) else []


def _snapshots_follow(ts: Toolstack, rec: DomainRecord, job: Job) -> None:
    """A local destination gets the snapshot tree the killed migration had not copied yet."""
    if not ts.store.list_snapshots(rec.domid):
        return
    with _local_dest(job) as dest:
        if dest is None:
            return
        for r in dest.store.list():
            if r.uuid == rec.uuid:
                _copy_snapshots(ts, dest, rec, r)
                _log.warning("domain %s: its snapshots follow it to %s", rec.name,
                             job.detail.get("dest"))


def _destination_runs(job: Job, uuid: str) -> bool | None:
    """Whether the destination runs the guest: True, False, or None when it cannot be told."""
    with _local_dest(job) as dest:
        if dest is None:
            return None
        try:
            for r in dest.store.list():
                if r.uuid != uuid or not dest.alive(r):
                    continue
                if r.state in ("running", "paused"):
                    return True
                # Still "incoming": it ran only if QEMU says so.
                return bool(_run(dest.backend.state(dest.handle(r), timeout=2.0)) == "running")
            return False
        except XenlabError:
            return None

