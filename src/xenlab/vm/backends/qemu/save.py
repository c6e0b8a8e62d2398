"""Save and restore of a QEMU's state over QMP: what ``QemuBackend.save``, ``abort_save`` and
``load`` do.

One QMP session per call.  A save asks QEMU's run state and version, lets the
verb write its header, pauses the guest, takes the internal disk snapshots
in one ``transaction`` (every disk at one instant, or none), and writes the
checked stream (:func:`xenlab.vm.backends.qemu.vmstate.write_checked`); then the verb
commits the file, and QEMU quits, or runs on as it was.  On failure the guest
runs again and the snapshots go.  A load plugs the vCPUs the saved guest had,
then reads the checked stream into a QEMU started with ``-incoming defer``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

from xenlab import faults
from xenlab.atomic import FileWriteError
from xenlab.errors import BackendError
from xenlab.vm.backend import SaveFacts, SaveRequest
from xenlab.vm.backends.qemu import vmstate
from xenlab.vm.backends.qemu.qmp import Qmp
from xenlab.vm.backends.qemu.vcpus import plug_vcpus
from xenlab.vm.migration.image import DiskSnapshot

__all__ = ["abort_save", "device_nodes", "load", "quit_qemu", "save"]


async def quit_qemu(qmp: Qmp) -> None:
    """QMP ``quit``; QEMU may close the socket before or after its reply."""
    with contextlib.suppress(BackendError):
        await qmp.execute("quit")


async def device_nodes(qmp: Qmp) -> dict[str, str]:
    """vdev -> the node its guest device is attached to now (query-block)."""
    blocks = await qmp.execute("query-block")
    out: dict[str, str] = {}
    for b in blocks if isinstance(blocks, list) else ():
        qdev = str(b.get("qdev", ""))
        # vm.qemu's devices have id=<vdev>: /machine/peripheral/<vdev>/<backend>
        vdev = qdev.split("/")[3] if qdev.startswith("/machine/peripheral/") else qdev
        node = (b.get("inserted") or {}).get("node-name")
        if vdev and node:
            out[vdev] = str(node)
    return out


async def _drop_disk_snapshots(qmp: Qmp, snapshots: Sequence[DiskSnapshot]) -> list[str]:
    """Delete a failed save's disk snapshots; the files where that did not work."""
    nodes = await device_nodes(qmp)
    left: list[str] = []
    for d in snapshots:
        try:
            await qmp.execute("blockdev-snapshot-delete-internal-sync",
                              {"device": nodes.get(d.vdev, f"{d.vdev}-fmt"), "name": d.name})
        except BackendError:
            left.append(d.file)
    return left


async def save(qmp_path: Path, req: SaveRequest) -> SaveFacts:
    """Save as ``req`` says (see the module docstring); the facts the header was given."""
    started = time.monotonic()
    async with Qmp.open(qmp_path) as qmp:
        was_running = await vmstate.status(qmp) == "running"
        facts = SaveFacts(was_running, vmstate.qemu_version(await qmp.execute("query-version")))
        seed = req.header(facts)
        faults.point("save.header")
        old_bw: object = None
        if req.keep_running:
            # Only a QEMU that goes on needs its own limit back.
            params = await qmp.execute("query-migrate-parameters")
            old_bw = params.get("max-bandwidth") if isinstance(params, dict) else None
        await qmp.execute("migrate-set-parameters",
                          {"max-bandwidth": req.max_bandwidth or vmstate.UNLIMITED})
        snapped = False
        try:
            if was_running:
                await qmp.execute("stop")
            if req.snapshots:
                # One transaction: every disk at the same instant, or none.
                nodes = await device_nodes(qmp)
                await qmp.execute("transaction", {"actions": [
                    {"type": "blockdev-snapshot-internal-sync",
                     "data": {"device": nodes.get(d.vdev, f"{d.vdev}-fmt"), "name": d.name}}
                    for d in req.snapshots
                ]}, timeout=req.timeout)
                snapped = True
            await vmstate.write_checked(
                qmp, req.fd, seed=seed, what=req.what, timeout=req.timeout,
                progress=req.progress, started=started, tick=req.tick)
            req.commit()
        except BaseException as err:
            if was_running:
                with contextlib.suppress(BackendError):
                    await vmstate.cont_after_migration(qmp)
            if snapped:
                left = await _drop_disk_snapshots(qmp, req.snapshots)
                if left and isinstance(err, Exception):
                    raise BackendError(
                        f"{err}; the disk snapshot {req.snapshots[0].name!r} could not be "
                        f"deleted from {', '.join(left)} (qemu-img snapshot -d removes it)"
                    ) from err
            if isinstance(err, OSError):
                raise FileWriteError(req.what, f"cannot write the image: "
                                               f"{err.strerror or err}; the domain goes on"
                                     ) from err
            raise
        if not req.keep_running:
            await quit_qemu(qmp)
            Qmp.forget(qmp_path)  # this QEMU is going: its session is not handed out again
            return facts
        if old_bw is not None:
            with contextlib.suppress(BackendError):
                await qmp.execute("migrate-set-parameters", {"max-bandwidth": old_bw})
        if was_running:
            await vmstate.cont_after_migration(qmp)
    return facts


async def abort_save(qmp_path: Path, *, resume: bool, snapshots: Sequence[DiskSnapshot]
                     ) -> tuple[str, tuple[str, ...]]:
    """Cancel a save's stream, run the guest again if ``resume``, drop ``snapshots``."""
    async with Qmp.open(qmp_path) as qmp:
        await vmstate.cancel_active(qmp)
        left: list[str] = []
        if resume:
            # cont makes QEMU take its images back after the stream; only then may
            # their snapshots change (an inactive image asserts in QEMU).
            await vmstate.cont_after_migration(qmp)
            left = await _drop_disk_snapshots(qmp, snapshots)
        else:
            left = [s.file for s in snapshots]
        return await vmstate.status(qmp), tuple(left)


async def load(qmp_path: Path, fd: int, offset: int, checked: tuple[int, ...], source: str,
               timeout: float, *, run: bool, vcpus_plugged: int | None) -> None:
    """Read the checked stream at ``fd``'s ``offset`` into the waiting QEMU."""
    async with Qmp.open(qmp_path) as qmp:
        if vcpus_plugged:
            # The state holds every vCPU the guest had: plug them before it loads.
            await plug_vcpus(qmp, vcpus_plugged)
        await vmstate.load_checked(qmp, fd, start=offset, checked=checked, source=source,
                                   what="restore", timeout=timeout)
        if run:
            await qmp.execute("cont")
