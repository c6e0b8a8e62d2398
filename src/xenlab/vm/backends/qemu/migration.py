"""Live migration of a QEMU over QMP: what ``QemuBackend``'s ``migrate_*`` calls do.

The sending side: :func:`begin` (run state, version, disk sizes), :func:`perform`
(NBD mirrors of the disks for a storage migration, ``migrate tcp:``, the mirrors
ended and their nodes deleted; on failure all of it undone and the guest resumed),
:func:`take_back` (the source goes on after the destination did not take the
guest) and :func:`abort` (a killed sender's stream and mirrors cancelled).  The
receiving side: :func:`prepare` (vCPUs plugged, the NBD server and exports,
``migrate-incoming``), :func:`wait_incoming` (the stream complete, the guest held
paused) and :func:`finish` (exports ended, ``cont``).  The control protocol between
two toolstacks is the verbs' (vm.migrate, vm.receiver, docs/migration.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xenlab.errors import BackendError
from xenlab.vm.backend import (
    MigrateRequest,
    MigrateSent,
    MigrationCookie,
    MigrationProgress,
    Progress,
)
from xenlab.vm.backends.qemu import vmstate
from xenlab.vm.backends.qemu.devices import pivot_node
from xenlab.vm.backends.qemu.qmp import Qmp
from xenlab.vm.backends.qemu.vcpus import plug_vcpus
from xenlab.vm.migration.channel import uri_host

__all__ = ["abort", "begin", "finish", "perform", "prepare", "take_back", "wait_incoming"]

_log = logging.getLogger(__name__)
_POLL = 0.05


def node_of(ref: Mapping[str, Any], vdev: str) -> str:
    """The node disk ``vdev`` runs on (after a pivot, the handle says which)."""
    return pivot_node(ref, vdev) or f"{vdev}-fmt"


async def begin(qmp_path: Path, ref: Mapping[str, Any], disks: Sequence[str]
                ) -> MigrationCookie:
    """What the source says before it sends: run state, QEMU's version, the disks' sizes."""
    async with Qmp.open(qmp_path) as qmp:
        running = await vmstate.status(qmp) == "running"
        version = vmstate.qemu_version(await qmp.execute("query-version"))
        sizes = await _node_sizes(qmp, {v: node_of(ref, v) for v in disks}) if disks else {}
    return MigrationCookie(running, version, sizes)


async def _node_sizes(qmp: Qmp, nodes: Mapping[str, str]) -> dict[str, int]:
    listed = await qmp.execute("query-named-block-nodes", {"flat": True})
    by_node = {str(n.get("node-name", "")): n for n in listed if isinstance(n, dict)
               } if isinstance(listed, list) else {}
    return {v: int(by_node[n]["image"]["virtual-size"]) for v, n in nodes.items()
            if n in by_node}


async def perform(qmp_path: Path, ref: Mapping[str, Any], req: MigrateRequest) -> MigrateSent:
    """Mirror ``req.disks`` to the destination's NBD exports, stream, end the mirrors.

    The source is left stopped (postmigrate).  On failure everything is
    undone and the guest resumed if it ran.
    """
    async with Qmp.open(qmp_path) as qmp:
        return await _send(qmp, ref, req)


async def _send(qmp: Qmp, ref: Mapping[str, Any], req: MigrateRequest) -> MigrateSent:
    name, where, dhost, nbd_port = req.name, req.where, req.host, req.nbd_port
    nodes = {v: node_of(ref, v) for v in req.disks}
    live, max_bandwidth, timeout = req.live, req.max_bandwidth, req.timeout
    progress, started = req.progress, req.started
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
        return MigrateSent(info, was_running, {"max-bandwidth": old_bw})
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


async def take_back(qmp_path: Path, sent: MigrateSent) -> None:
    """Let the source go on after a completed stream the destination did not take."""
    async with Qmp.open(qmp_path) as qmp:
        await _resume_in(qmp, sent)


async def _resume_in(qmp: Qmp, sent: MigrateSent) -> None:
    old_bw = sent.backend_state.get("max-bandwidth")
    if old_bw is not None:
        with contextlib.suppress(BackendError):
            await qmp.execute("migrate-set-parameters", {"max-bandwidth": old_bw})
    if sent.was_running:
        await vmstate.cont_after_migration(qmp)


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


async def _nbd_nodes(qmp: Qmp) -> list[str]:
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    return [str(n["node-name"]) for n in nodes if isinstance(n, dict)
            and str(n.get("node-name", "")).startswith("mig-")] if isinstance(nodes, list) else []


async def abort(qmp_path: Path, *, resume: bool) -> str:
    """Undo what a killed sender left: the stream cancelled, the NBD mirrors and nodes gone,
    the guest run again if ``resume``; QEMU's run state after."""
    async with Qmp.open(qmp_path) as qmp:
        await vmstate.cancel_active(qmp)
        jobs = [j for j in (await _block_jobs(qmp)) if j.startswith("mig-")]
        for j in jobs:
            with contextlib.suppress(BackendError):
                await qmp.execute("block-job-cancel", {"device": j, "force": True})
        with contextlib.suppress(BackendError):
            await _dismiss_jobs(qmp, jobs, 30)
        await _del_stale_nodes(qmp, [n for n in await _nbd_nodes(qmp)])
        if resume:
            await vmstate.cont_after_migration(qmp)
        return await vmstate.status(qmp)


async def prepare(qmp_path: Path, host: str, port: int, disks: Sequence[str],
                  nbd_port: int | None, vcpus_plugged: int | None = None) -> int:
    """Make the waiting QEMU listen for the stream on ``host:port`` (0: any free port), with
    ``disks`` exported over NBD on ``nbd_port`` for a storage migration; the port bound."""
    async with Qmp.open(qmp_path) as qmp:
        await vmstate.enable_events(qmp)
        if vcpus_plugged:
            # The stream holds every vCPU the guest had: plug them first.
            await plug_vcpus(qmp, vcpus_plugged)
        if nbd_port is not None:
            await qmp.execute("nbd-server-start", {
                "addr": {"type": "inet", "data": {"host": host, "port": str(nbd_port)}},
            })
            for vdev in disks:
                # The export activates the (still inactive) incoming node for writing.
                await qmp.execute("block-export-add", {
                    "type": "nbd", "id": f"mig-{vdev}", "node-name": f"{vdev}-fmt",
                    "name": vdev, "writable": True,
                })
        await qmp.execute("migrate-incoming", {"uri": f"tcp:{uri_host(host)}:{port}"})
        info = await vmstate.query_migrate(qmp)
        for addr in info.get("socket-address") or ():
            if isinstance(addr, dict) and addr.get("port"):
                return int(addr["port"])
        return port


async def wait_incoming(qmp_path: Path, what: str, timeout: float) -> None:
    """Wait until the incoming stream is complete and QEMU holds the guest, paused."""
    async with Qmp.open(qmp_path) as qmp:
        with qmp.listen("MIGRATION") as watch:
            await vmstate.wait_migration(qmp, watch, what, timeout, None, time.monotonic(),
                                         check_first=True)
        state = await vmstate.status(qmp)
        if state not in ("paused", "prelaunch"):
            raise BackendError(f"the incoming QEMU is {state!r} after the stream, "
                               "expected 'paused'")


async def finish(qmp_path: Path, exports: Sequence[str] | None, paused: bool) -> None:
    """End the NBD exports of a storage migration (``exports``: None without), check QEMU
    holds the guest, ``cont`` unless ``paused``."""
    async with Qmp.open(qmp_path) as qmp:
        await _resume_incoming(qmp, exports, paused)


async def _resume_incoming(qmp: Qmp, exports: Sequence[str] | None, paused: bool) -> None:
    if exports is not None:
        for vdev in exports:
            with contextlib.suppress(BackendError):
                await qmp.execute("block-export-del", {"id": f"mig-{vdev}"})
        await qmp.execute("nbd-server-stop")
    state = await vmstate.status(qmp)
    if state not in ("paused", "prelaunch"):
        raise BackendError(f"the incoming QEMU is {state!r} after the stream, "
                           "expected 'paused'")
    if not paused:
        await qmp.execute("cont")
