"""QEMU's side of the snapshot verbs: :class:`QemuLiveSnapshots`, one QMP session.

Images are found by file name (``query-named-block-nodes``), never by a recorded
node name alone: QEMU renames nodes when it restarts.  A job of a fixed id that a
killed command left is settled before the id is used again.  Resuming after a
memory stream is :func:`xenlab.vm.backends.qemu.vmstate.cont_after_migration`, never a bare
``cont`` (QEMU may still be inactivating the disks).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from xenlab import faults
from xenlab.errors import BackendError
from xenlab.vm.backend import DiskSnap
from xenlab.vm.backends.qemu import vmstate
from xenlab.vm.backends.qemu.qmp import Qmp, run_job, settle_job
from xenlab.vm.backends.qemu.settle import capability_off
from xenlab.vm.backends.qemu.vcpus import plug_vcpus

__all__ = ["QemuLiveSnapshots", "drop_nodes_on", "node_and_tags", "open_live_snapshots"]


async def node_and_tags(qmp: Qmp, file: str, fallback: str) -> tuple[str, set[str] | None]:
    """QEMU's format node for image ``file`` and the internal snapshot tags QEMU sees in it.

    One QMP round trip instead of a ``qemu-img info`` process (about 25 ms);
    the tags are None when QEMU has no node for the file.
    """
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    want = os.path.realpath(file)
    if isinstance(nodes, list):
        for n in nodes:
            if (isinstance(n, dict) and n.get("drv") not in ("file", "host_device")
                    and isinstance(n.get("file"), str)
                    and os.path.realpath(n["file"]) == want and n.get("node-name")):
                image = n.get("image")
                snaps = image.get("snapshots", ()) if isinstance(image, dict) else ()
                return str(n["node-name"]), {str(t.get("name")) for t in snaps
                                             if isinstance(t, dict)}
    return fallback, None


async def drop_nodes_on(qmp: Qmp, file: str) -> list[str]:
    """Delete QEMU's block nodes on image ``file`` that no device uses any more; their names.

    Nodes made with ``-blockdev`` or ``blockdev-add`` outlive a commit or a
    pivot away from them, and keep the image below them "busy" for the next
    snapshot.  A node still in use is left (QEMU refuses), silently.
    """
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    want = os.path.realpath(file)
    on = [n for n in nodes if isinstance(n, dict) and isinstance(n.get("file"), str)
          and os.path.realpath(n["file"]) == want and n.get("node-name")
          ] if isinstance(nodes, list) else []
    # Format nodes before their protocol (file) nodes: a parent goes first.
    on.sort(key=lambda n: n.get("drv") in ("file", "host_device"))
    dropped = []
    for n in on:
        try:
            await qmp.execute("blockdev-del", {"node-name": n["node-name"]})
        except BackendError:
            continue
        dropped.append(str(n["node-name"]))
    return dropped


def _action(s: DiskSnap) -> dict[str, object]:
    """The QMP transaction action for one disk's part of a snapshot."""
    if s.overlay is None:
        return {"type": "blockdev-snapshot-internal-sync",
                "data": {"device": s.node, "name": s.tag}}
    # QEMU makes the overlay by name inside its transaction: the verb has
    # claimed the name (empty, 0600, O_EXCL|O_NOFOLLOW), so QEMU formats that file.
    return {"type": "blockdev-snapshot-sync", "data": {
        "node-name": s.node, "snapshot-file": s.overlay,
        "snapshot-node-name": s.overlay_node, "format": "qcow2", "mode": "absolute-paths"}}


async def _job(qmp: Qmp, cmd: str, args: dict[str, object], timeout: float) -> None:
    job_id = str(args["job-id"])
    # A killed command may have left a job of this id in QEMU: its id is
    # taken until it is dismissed.
    await settle_job(qmp, job_id, timeout)
    await qmp.execute(cmd, args)
    faults.point(f"job.{cmd}.started")
    await run_job(qmp, job_id, timeout)


class QemuLiveSnapshots:
    """:class:`~xenlab.vm.backend.LiveSnapshots` over one QMP session."""

    def __init__(self, qmp: Qmp) -> None:
        self._qmp = qmp

    @property
    def connected(self) -> bool:
        return self._qmp.connected

    async def node_and_tags(self, file: str, fallback: str) -> tuple[str, set[str] | None]:
        return await node_and_tags(self._qmp, file, fallback)

    async def take(self, snaps: Sequence[DiskSnap], timeout: float) -> None:
        await self._qmp.execute("transaction", {"actions": [_action(s) for s in snaps]},
                                timeout=timeout)

    async def delete_internal(self, node: str, tag: str, job: str, timeout: float) -> None:
        # The snapshot-delete job, not the -sync command: the image may sit
        # below an overlay, and the sync command only takes root nodes.
        await _job(self._qmp, "snapshot-delete",
                   {"job-id": job, "tag": tag, "devices": [node]}, timeout)

    async def commit(self, top: str, top_node: str, base: str, base_node: str, job: str,
                     timeout: float) -> None:
        qmp = self._qmp
        await settle_job(qmp, job, timeout, complete_on_ready=True)
        top_node = (await node_and_tags(qmp, top, top_node))[0]
        base_node = (await node_and_tags(qmp, base, base_node))[0]
        # Active commit: the top's data goes down into the node below and the
        # device pivots onto it when the job completes.
        await qmp.execute("block-commit", {
            "job-id": job, "device": top_node, "base-node": base_node,
            "auto-dismiss": False, "auto-finalize": True,
        })
        faults.point("snapshot-delete.commit-started")
        await run_job(qmp, job, timeout, complete_on_ready=True)
        # A top opened with -blockdev (a restart on an overlay) stays in QEMU's
        # graph after the pivot, holding the image below "busy".
        await drop_nodes_on(qmp, top)

    async def drop_nodes_on(self, file: str) -> list[str]:
        return await drop_nodes_on(self._qmp, file)

    async def pause(self) -> None:
        await self._qmp.execute("stop")

    async def resume(self, *, after_stream: bool = False) -> None:
        if after_stream:
            await vmstate.cont_after_migration(self._qmp)
        else:
            await self._qmp.execute("cont")

    async def run_state(self) -> str:
        return await vmstate.status(self._qmp)

    async def save_state(self, fd: int, timeout: float,
                         at_switchover: Callable[[], Awaitable[None]] | None = None) -> None:
        await vmstate.write_stream(self._qmp, fd, timeout=timeout, at_switchover=at_switchover)

    async def load_state(self, fd: int, timeout: float, source: str,
                         vcpus_plugged: int | None) -> None:
        if vcpus_plugged:
            await plug_vcpus(self._qmp, vcpus_plugged)
        await vmstate.load_stream(self._qmp, fd, timeout=timeout, source=source)

    async def save_internal(self, tag: str, nodes: Sequence[str], timeout: float) -> None:
        await _job(self._qmp, "snapshot-save", {
            "job-id": f"save-{tag}", "tag": tag, "vmstate": nodes[0], "devices": list(nodes),
        }, timeout)

    async def load_internal(self, tag: str, nodes: Sequence[str], state_node: str,
                            timeout: float) -> None:
        await _job(self._qmp, "snapshot-load", {
            "job-id": f"load-{tag}", "tag": tag, "vmstate": state_node,
            "devices": list(nodes),
        }, timeout)

    async def finish_state_save(self, timeout: float) -> str:
        qmp = self._qmp
        st = str((await vmstate.query_migrate(qmp)).get("status", "none"))
        if st not in vmstate.ACTIVE:
            return st
        # Let a memory save the killed verb started finish on its own; at
        # pre-switchover the disks are taken already.
        if st == "pre-switchover":
            await qmp.execute("migrate-continue", {"state": "pre-switchover"})
        try:
            st = await self._completed("memory save", timeout)
        except BackendError:
            await qmp.execute("migrate_cancel")
            st = "cancelled"
        await capability_off(qmp)
        return st

    async def cancel_state_save(self) -> None:
        # A --live memory save still going would stop at its switch-over and
        # wait there for good.
        await vmstate.cancel_active(self._qmp)
        await capability_off(self._qmp)

    async def finish_state_load(self, timeout: float) -> str:
        now = str((await vmstate.query_migrate(self._qmp)).get("status", "none"))
        if now not in vmstate.ACTIVE:
            return now  # never started ("none"), or over: nothing to wait for
        try:
            return await self._completed("loading the memory", timeout)
        except BackendError:
            return "failed"

    async def _completed(self, what: str, timeout: float) -> str:
        with self._qmp.listen("MIGRATION") as watch:
            await vmstate.wait_migration(self._qmp, watch, what, timeout, None,
                                         time.monotonic(), check_first=True)
        return "completed"


@asynccontextmanager
async def open_live_snapshots(qmp_socket: Path) -> AsyncIterator[QemuLiveSnapshots]:
    """A :class:`QemuLiveSnapshots` on the QMP socket ``qmp_socket``, closed after."""
    async with Qmp.open(qmp_socket) as qmp:
        yield QemuLiveSnapshots(qmp)
