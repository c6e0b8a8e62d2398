"""A running QEMU's block copy (libvirt's blockcopy) over QMP: what ``QemuBackend.block_copy``
and ``end_block_copy`` do, in QEMU's documented steps (docs/interop/live-block-operations.rst).

The target image is made here (it needs the source's size from QEMU), opened
as a new node, and filled by ``blockdev-mirror`` (a job kept after it ends,
so its error can be read); once ready the job is completed (the pivot) or
cancelled (a copy).  A failure undoes what it can and raises
:class:`~xenlab.vm.backend.BlockCopyFailed`, whose fields say how far it got
(the verb must record a pivot that happened).  The job's id is fixed per
disk (``mirror-<vdev>``), so a recovery finds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

from xenlab import faults
from xenlab.errors import BackendError
from xenlab.vm import qemuimg
from xenlab.vm.backend import (
    BlockCopyFailed,
    BlockCopyRequest,
    CopyProgress,
    MirrorProgress,
    Note,
)
from xenlab.vm.backends.qemu.qmp import CommandError, Qmp
from xenlab.vm.backends.qemu.snapshots import drop_nodes_on

__all__ = ["block_copy", "end_block_copy", "job_id"]

_POLL = 0.1
# How long a recovery waits for QEMU to end a mirror job a killed verb left.
_SETTLE = 120.0


def job_id(vdev: str) -> str:
    """The id of QEMU's mirror job of disk ``vdev`` (fixed: a recovery finds it)."""
    return f"mirror-{vdev}"


async def _device_node(qmp: Qmp, vdev: str) -> str | None:
    """The node the guest's device ``vdev`` is attached to, as QEMU says."""
    return (await _device_file(qmp, vdev))[0]


async def _device_file(qmp: Qmp, vdev: str) -> tuple[str | None, str | None]:
    """(node, file) the guest's device ``vdev`` is attached to, as QEMU says."""
    blocks = await qmp.execute("query-block")
    for b in blocks if isinstance(blocks, list) else ():
        qdev = str(b.get("qdev", ""))
        if qdev == vdev or qdev.startswith(f"/machine/peripheral/{vdev}/") or \
                b.get("device") == vdev:
            inserted = b.get("inserted") or {}
            node, file = inserted.get("node-name"), inserted.get("file")
            return (str(node) if node else None,
                    str(file) if isinstance(file, str) else None)
    return None, None


def _file_child(node: str) -> str:
    # vm.qemu names a disk's pair <vdev>-file/<vdev>-fmt; we add <node>/<node>-file.
    return node[:-4] + "-file" if node.endswith("-fmt") else f"{node}-file"


async def block_copy(qmp_path: Path, req: BlockCopyRequest, note: Note) -> tuple[str, int]:
    """Copy disk ``req.vdev`` to the new image ``req.target`` and pivot (or not); the node the
    guest runs on after a pivot ("" without) and the bytes copied.

    :raise BlockCopyFailed: with how far it got (see the module docstring).
    """
    run = BlockCopyFailed("")
    try:
        return await _copy(qmp_path, req, note, run)
    except Exception as err:
        run.args = (str(err),)
        raise run from err


async def _copy(qmp_path: Path, req: BlockCopyRequest, note: Note, run: BlockCopyFailed
                ) -> tuple[str, int]:
    vdev, target, fmt, pivot = req.vdev, req.target, req.format, req.pivot
    progress, started, timeout = req.progress, req.started, req.timeout
    deadline = time.monotonic() + timeout
    job = job_id(vdev)
    async with Qmp.open(qmp_path) as qmp:
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
        # New, 0600, and nobody else's file or link at the name (qemuimg.new_image);
        # the directory is fsynced: the record may name this very file soon.
        await qemuimg.create(target, fmt, size)
        run.created = True
        faults.point("mirror.target-made")
        added = False
        running = False
        try:
            await qmp.execute("blockdev-add", {
                "driver": fmt, "node-name": node,
                "file": {"driver": "file", "filename": str(target), "node-name": f"{node}-file"},
            })
            added = True
            faults.point("mirror.node-added")
            await qmp.execute("blockdev-mirror", {
                "job-id": job, "device": src, "target": node, "sync": "full",
                "speed": req.bandwidth or 0,
                # kept after it ends, so its error can be read
                "auto-dismiss": False,
            })
            running = True
            faults.point("mirror.copying")
            info = await _wait_ready(qmp, job, vdev, deadline, timeout, progress, started)
            run.length = int(info.get("len", 0))
            faults.point("mirror.ready")
            # From here QEMU may switch the device to the target at any moment.
            note({"phase": "completing"})
            if pivot:
                run.pivot_asked = True
                await qmp.execute("job-complete", {"id": job})
            else:
                # A ready mirror cancelled completes without switching the device.
                await qmp.execute("block-job-cancel", {"device": job})
            faults.point("mirror.completing")
            final = await _wait_concluded(qmp, job, deadline, timeout)
            running = False
            faults.point("mirror.concluded")
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
            faults.point("mirror.nodes-deleted")
            return run.node, run.length
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
                      progress: CopyProgress | None, started: float) -> dict[str, Any]:
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


async def end_block_copy(qmp_path: Path, vdev: str, source: str, target: str, *,
                         complete: bool) -> str | None:
    """End QEMU's side of a killed copy of ``vdev`` (a pivot already asked for, ``complete``,
    is let finish; anything else is cancelled); the node the device runs on if it is the
    target."""
    target = os.path.realpath(target)
    async with Qmp.open(qmp_path) as qmp:
        await _end_job(qmp, job_id(vdev), complete=complete)
        node, file = await _device_file(qmp, vdev)
        if node is not None and file is not None and os.path.realpath(file) == target:
            # The old image's nodes: nothing uses them now (QEMU refuses otherwise).
            await drop_nodes_on(qmp, source)
            return node
        await drop_nodes_on(qmp, target)
        return None


async def _end_job(qmp: Qmp, job: str, *, complete: bool) -> None:
    """Bring QEMU's job ``job`` to its end (completed or cancelled) and dismiss it."""
    deadline = time.monotonic() + _SETTLE
    asked = False
    while True:
        jobs = await qmp.execute("query-jobs")
        info = next((j for j in jobs if isinstance(j, dict) and j.get("id") == job),
                    None) if isinstance(jobs, list) else None
        if info is None:
            return
        status = str(info.get("status"))
        if status == "concluded":
            await qmp.execute("job-dismiss", {"id": job})
            return
        if not asked and (status == "ready" or not complete):
            with contextlib.suppress(CommandError):  # it may have moved on meanwhile
                if complete:
                    await qmp.execute("job-complete", {"id": job})
                else:
                    await qmp.execute("block-job-cancel", {"device": job, "force": True})
                asked = True
        if time.monotonic() > deadline:
            raise BackendError(f"QEMU's mirror job {job} did not end within {_SETTLE:g}s "
                               f"(status {status})")
        await asyncio.sleep(_POLL)
