"""Live migration of domains, xl migrate: :func:`migrate`; the save, restore and receive
verbs it shares its stream with are re-exported here.

:func:`migrate` moves a running domain to a second :class:`Toolstack` on
this host (standing for another host, its destination started with
:func:`~xenlab.vm.migration.receiver.receive`), or to ``HOST:PORT`` where
:func:`~xenlab.vm.migration.receiver.serve_receive` (``xenlab vm receive``) waits with
its token; the two hosts then speak the control protocol over a
:class:`~xenlab.vm.migration.channel.Channel`.  With ``with_storage`` the disks go
first, mirrored into the destination's NBD exports.  The source QEMU quits
only once the destination has said it runs the guest; until "go" is sent
the source may take the guest back.  The protocol, its failure rules, the
threat model of the receiver and the save image format are in
docs/migration.md.

The pieces: :mod:`xenlab.vm.migration.image` (the save image format),
:mod:`xenlab.vm.backends.qemu.vmstate` (QEMU's stream over QMP, and the helpers all of
them share), :mod:`xenlab.vm.migration.saverestore` (xl save and restore),
:mod:`xenlab.vm.migration.channel` (the channel and the token),
:mod:`xenlab.vm.migration.peerconfig` (what a receiver takes from its peer) and
:mod:`xenlab.vm.migration.receiver` (the destination).

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
from xenlab.vm.backend import (
    Backend,
    DomainHandle,
    MigrateRequest,
    MigrateSent,
    MigrationProgress,
    Progress,
)
from xenlab.vm.domain import Toolstack
from xenlab.vm.jobs import Job
from xenlab.vm.migration import wire
from xenlab.vm.migration.channel import (
    PROTOCOL,
    Channel,
    ChannelError,
    Lost,
    Refused,
    expect,
    new_token,
    parse_address,
    read_token,
    uri_host,
)
from xenlab.vm.migration.image import (
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
from xenlab.vm.migration.receiver import (
    START_TIMEOUT,
    Incoming,
    abort_receive,
    finish_receive,
    mirrored_disks,
    receive,
    serve_receive,
)
from xenlab.vm.migration.saverestore import moves_of, place, quit_domain, restore, save
from xenlab.vm.resources import plugged_vcpus
from xenlab.vm.runtime import CURRENT
from xenlab.vm.store import DomainRecord, SnapshotNode, private_dir

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


async def migrate(
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

    Why one function: the phases (sending, handing-over, handed-over) and what undoes each
    are one sequence with fault points between them; :func:`recover_job` follows the
    same phases, and the two are read side by side.
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
    async with ts.live(name) as rec:
        snaps = ts.store.list_snapshots(rec.domid)
        if snaps and (with_storage or not isinstance(dest, Toolstack)):
            raise StateError(
                f"domain {rec.name!r} has {len(snaps)} snapshot(s): their records can only "
                "follow it to a second toolstack on this host with shared disks (a storage "
                "migration copies the disks' current state only); delete them first"
            )
        h = ts.handle(rec)
        disk_paths, overlays = moves_of(rec)
        dc, _ = ts.config_of(rec)
        disks = mirrored_disks(place(dc, dc, disk_paths, overlays, f"migrate {rec.name}").config
                          ) if with_storage else []
        vdevs = [v for v, _, _ in disks]
        # The job's phase tells a recovery whether the destination may run the
        # guest already (recover_job): never resume both copies.
        held = contextlib.ExitStack()
        rec = held.enter_context(ts.job(
            rec, "migrate", phase="sending", guest=await ts.backend.state(h),
            dest=str(dest.state_dir) if isinstance(dest, Toolstack) else dest,
            local=isinstance(dest, Toolstack),
            dest_backend=dest.backend.name if isinstance(dest, Toolstack) else None))
        faults.point("migrate.job")
        info: Mapping[str, Any]
        with held:
            if not isinstance(dest, Toolstack):
                info = await _migrate_remote(ts, rec, h, dest, disk_paths, overlays, vdevs,
                                       live=live, paused=paused, max_bandwidth=max_bandwidth,
                                       timeout=timeout, progress=progress, started=started,
                                       token=str(token),
                                       on_phase=functools.partial(ts.update_job, rec.domid))
                dest_rec: DomainRecord | None = None
            else:
                sizes = dict((await ts.backend.migrate_begin(h, vdevs)).disk_sizes) if disks else {}
                incoming = await receive(
                    dest, rec.config_text, 0, host=host, overrides=dest_overrides,
                    with_storage=with_storage, nbd_port=nbd_port, disk_sizes=sizes,
                    config_path=rec.config_path, uuid=rec.uuid, disk_paths=disk_paths,
                    overlays=overlays, vcpus_plugged=plugged_vcpus(rec),
                )
                where = f"{uri_host(host)}:{incoming.port}"
                try:
                    sent = await (ts.backend.migrate_perform(h, MigrateRequest(
                        rec.name, where, host, incoming.nbd_port, tuple(vdevs), live,
                        max_bandwidth, timeout, started, progress)))
                except BaseException as err:
                    dead = not dest.alive(incoming.record)
                    await abort_receive(dest, incoming)
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
                    dest_rec = await finish_receive(dest, incoming, paused=paused, timeout=timeout)
                    ts.update_job(rec.domid, phase="handed-over")
                    faults.point("migrate.handed-over")
                except BaseException:
                    # The destination could not take over: the source has every
                    # page and its disks, so it carries on.
                    with contextlib.suppress(BackendError):
                        await ts.backend.migrate_take_back(h, sent)
                    raise
                if snaps:
                    dest_rec = _copy_snapshots(ts, dest, rec, dest_rec)
                info = sent.info
            try:
                await quit_domain(ts, rec)
            except BaseException:
                # Handed over: the guest runs there.  Whatever stopped this (a Ctrl-C
                # lands here as a cancel), the source must never run again, so its job
                # goes to the next command, which finishes the quit (recover_job).
                ts.hand_over_job(rec.domid)
                raise
            ts.backend.release(h)
            ts.store.remove(rec.domid)
    ram = info.get("ram") or {}
    return MigrationResult(
        record=dest_rec, seconds=time.monotonic() - started,
        total_ms=int(info.get("total-time", 0)), downtime_ms=int(info.get("downtime", 0)),
        ram_transferred=int(ram.get("transferred", 0)),
        disks=tuple(vdevs),
    )


# --- the sending side of the control channel --------------------------------------------


async def _migrate_remote(ts: Toolstack, rec: DomainRecord, h: DomainHandle, dest: str,
                    disk_paths: tuple[DiskMove, ...], overlays: tuple[DiskMove, ...],
                    vdevs: Sequence[str], *, live: bool,
                    paused: bool, max_bandwidth: int | None, timeout: float,
                    progress: Progress | None, started: float, token: str,
                    on_phase: Callable[..., None] = lambda **_: None) -> Mapping[str, Any]:
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
        return await (_sender(Channel(sock, dest), ts.backend, h, rec, host, disk_paths,
                            overlays, tuple(vdevs), live=live, paused=paused,
                            max_bandwidth=max_bandwidth, timeout=timeout, progress=progress,
                            started=started, token=token, on_phase=on_phase))
    finally:
        sock.close()


async def _sender(ch: Channel, backend: Backend, h: DomainHandle, rec: DomainRecord,
                  host: str, disk_paths: tuple[DiskMove, ...], overlays: tuple[DiskMove, ...],
                  nodes: tuple[str, ...], *, live: bool, paused: bool,
                  max_bandwidth: int | None, timeout: float, progress: Progress | None,
                  started: float, token: str,
                  on_phase: Callable[..., None] = lambda **_: None) -> Mapping[str, Any]:
    what = f"migrate {rec.name} to {ch.peer}"
    here = f"{rec.name} still runs here"
    cookie = await backend.migrate_begin(h, nodes)
    header = SaveHeader(
        name=rec.name, uuid=rec.uuid, config_text=rec.config_text,
        config_path=rec.config_path, qemu_version=cookie.version,
        created=time.time(), state="running" if cookie.running else "paused",
        disk_paths=disk_paths, overlays=overlays, vcpus_plugged=plugged_vcpus(rec),
    )
    sizes = dict(cookie.disk_sizes)
    try:
        greeting = await ch.recv(_HELLO_TIMEOUT, "the receiver's greeting")
        try:
            hello = wire.decode(greeting, ch.peer, wire.Hello)
        except ChannelError:
            hello = None
        if not isinstance(hello, wire.Hello) or hello.protocol != PROTOCOL:
            raise BackendError(f"{ch.peer} is not a xenlab receiver speaking protocol "
                               f"{PROTOCOL} (it said {str(greeting)[:200]})")
        # Version 3 on the wire: version 4 adds only the checksums of an image
        # file, which TCP does not need, and older receivers read version 3.
        await ch.send(wire.encode(wire.Prepare(token, {
            "header": header_to_json(replace(header, version=3)),
            "with_storage": bool(nodes), "disk_sizes": sizes})))
        listening = wire.decode(await ch.recv(START_TIMEOUT, "the destination QEMU to listen"),
                                ch.peer, wire.Listening)
        assert isinstance(listening, wire.Listening)
        dport, nbd = listening.port, listening.nbd_port
        if nodes and nbd is None:
            raise BackendError(f"{ch.peer}: no port to send the disks to in {listening}")
    except BackendError as err:
        raise BackendError(f"{what}: {err}; {here}") from err
    where = f"{uri_host(host)}:{dport}"
    try:
        sent = await backend.migrate_perform(h, MigrateRequest(
            rec.name, where, host, nbd if nodes else None, nodes, live, max_bandwidth,
            timeout, started, progress))
    except BaseException as err:
        await ch.quiet_send(wire.encode(wire.Abort(str(err))))
        if isinstance(err, BackendError):
            raise BackendError(f"{what} failed; {here} [{err}]") from err
        raise
    # The stream is complete: the source is stopped, the destination holds
    # the guest, paused.  Until "go" is sent, the source may take it back.
    try:
        wire.decode(await ch.recv(START_TIMEOUT, "the destination's report that it loaded "
                                                 "the stream"), ch.peer, wire.Loaded)
        await asyncio.sleep(0)
        if ch.closed():
            raise Lost(f"{ch.peer} closed the control connection before it was "
                        "told to start the guest")
        on_phase(phase="handing-over")
        faults.point("migrate.handing-over")
        await ch.send(wire.encode(wire.Go(paused)))
    except BaseException as err:
        await ch.quiet_send(wire.encode(wire.Abort(str(err))))
        back = await _take_back(backend, h, sent, rec.name)
        if isinstance(err, BackendError):
            raise BackendError(f"{what}: the destination did not take the guest "
                               f"({err}); {back}") from err
        raise
    # Past the point of no return: the destination may be running the guest.
    try:
        # Past the point of no return only the kind matters: a "resumed" whose fields are
        # odd still says the guest runs there (the source must not resume it).
        expect(await ch.recv(START_TIMEOUT, "the destination's report"), "resumed", ch.peer)
        on_phase(phase="handed-over")
        faults.point("migrate.handed-over")
    except Refused as err:
        # A receiver that fails here has killed its QEMU before saying so.
        back = await _take_back(backend, h, sent, rec.name)
        raise BackendError(f"{what}: the destination could not start the guest "
                           f"({err}); {back}") from err
    except BackendError as err:
        raise BackendError(
            f"{what}: the control connection broke after the destination was told to "
            f"start the guest ({err}); it may run there: {rec.name} is left paused "
            f"here. Check the destination, then `xenlab vm unpause {rec.name}` here "
            f"only if it does not run there, else `xenlab vm destroy {rec.name}` here"
        ) from err
    # The source's QEMU quits next (migrate: quit_domain), its guest running there.
    return sent.info


async def _take_back(backend: Backend, h: DomainHandle, sent: MigrateSent, name: str) -> str:
    """Resume the source after the destination did not take the guest; what happened.

    Resuming can fail: a destination QEMU that outlived its receiver holds the
    shared disks' locks.  The guest then stays paused here, and the message
    says so rather than claiming it runs.
    """
    try:
        await backend.migrate_take_back(h, sent)
    except BackendError as err:
        return (f"{name} is left paused here: resuming it failed ({err}); once no "
                f"destination QEMU holds its disks, `xenlab vm unpause {name}`")
    return f"{name} was resumed here"


# --- a migration killed half-way ---------------------------------------------------------


async def recover_job(ts: Toolstack, rec: DomainRecord, job: Job) -> DomainRecord | None:
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
        kept = await ts.gone(rec)
        _log.warning("%s was killed; the QEMU here is gone", where)
        return kept
    if phase == "handing-over":
        runs = await _destination_runs(job, rec.uuid)
        if runs is None:
            _log.warning("%s was killed after the destination was told to start the guest; "
                         "it may run there: %s is left paused here. Check the destination, "
                         "then `xenlab vm unpause %s` here only if it does not run there, "
                         "else `xenlab vm destroy %s` here", where, rec.name, rec.name,
                         rec.name)
            return ts.store.patch(rec.domid, state="paused")
        phase = "handed-over" if runs else "sending"
    h = ts.handle(rec)
    if phase == "handed-over":
        await _snapshots_follow(ts, rec, job)
        await quit_domain(ts, rec)
        ts.backend.release(h)
        ts.store.remove(rec.domid)
        _log.warning("%s was killed after the guest ran there: finished, %s is gone from "
                     "here", where, rec.name)
        return None

    # The destination's QEMU holds the disks' locks once the stream is in: a
    # local one goes first (its own converge undoes the incoming domain).
    await _destination_undo(job, rec.uuid)
    try:
        state = await ts.backend.migrate_abort(h, resume=job.detail.get("guest") == "running")
    except BackendError as err:
        _log.warning("%s was killed before the guest ran there; it cannot run here yet "
                     "(%s): %s is left paused. If the destination still holds it, end it "
                     "there, then `xenlab vm unpause %s` here", where, err, rec.name, rec.name)
        return ts.store.patch(rec.domid, state="paused")
    _log.warning("%s was killed before the guest ran there: undone, the guest is %s here",
                 where, state)
    return ts.store.patch(rec.domid, state="running" if state == "running" else "paused")


@contextlib.contextmanager
def _local_dest(job: Job, *, store_only: bool = False) -> Iterator[Toolstack | None]:
    """The destination toolstack of a killed local migration, or None (another host, or a
    backend this command cannot run: then nothing is concluded about the destination).
    ``store_only``: the caller uses its store alone, which any backend's toolstack has."""
    if not job.detail.get("local") or (
            job.detail.get("dest_backend", "qemu") != "qemu" and not store_only):
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


async def _destination_undo(job: Job, uuid: str) -> None:
    """A local destination's half-received copy of the guest is undone (it never ran)."""
    with _local_dest(job) as dest:
        if dest is None:
            return
        for r in dest.store.list():
            if r.uuid == uuid and r.state == "incoming":
                with contextlib.suppress(XenlabError):
                    async with dest.locked(str(r.domid)):
                        pass  # taking it converges it: a dead migration's incoming copy goes


async def _snapshots_follow(ts: Toolstack, rec: DomainRecord, job: Job) -> None:
    """A local destination gets the snapshot tree the killed migration had not copied yet."""
    if not ts.store.list_snapshots(rec.domid):
        return
    with _local_dest(job, store_only=True) as dest:
        if dest is None:
            return
        for r in dest.store.list():
            if r.uuid == rec.uuid:
                async with dest.store.alock(r.domid):
                    _copy_snapshots(ts, dest, rec, dest.store.get(r.domid))
                _log.warning("domain %s: its snapshots follow it to %s", rec.name,
                             job.detail.get("dest"))


async def _destination_runs(job: Job, uuid: str) -> bool | None:
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
                return bool(await dest.backend.state(dest.handle(r), timeout=2.0) == "running")
            return False
        except XenlabError:
            return None

