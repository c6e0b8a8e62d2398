"""What a killed verb left in a running QEMU, and settling it: the truths the snapshot
recovery reads (which file each disk runs on, which jobs run) and the steps it takes
(let jobs end, turn a migration capability off, run a paused guest again).

A job a killed command started is let end (a commit completed when it is ready, as the
verb would have), then dismissed, so its fixed id is free again; QEMU's own error is
reported, not raised.  Resuming after a stream is :func:`xenlab.vm.backends.qemu.vmstate.
cont_after_migration`, never a bare ``cont`` (QEMU may still be inactivating disks).
"""

from __future__ import annotations

from collections.abc import Sequence

from xenlab.vm.backends.qemu import vmstate
from xenlab.vm.backends.qemu.qmp import Qmp, job_ids, settle_job

__all__ = ["capability_off", "disk_files", "resume_stopped", "settle_jobs"]


async def disk_files(qmp: Qmp) -> dict[str, tuple[str, str]]:
    """``{vdev: (file, node)}``: the image QEMU runs each guest disk on now."""
    blocks = await qmp.execute("query-block")
    out: dict[str, tuple[str, str]] = {}
    for b in blocks if isinstance(blocks, list) else []:
        if not isinstance(b, dict):
            continue
        qdev = str(b.get("qdev", ""))
        vdev = qdev.removeprefix("/machine/peripheral/").split("/", 1)[0]
        inserted = b.get("inserted") or {}
        file = inserted.get("file")
        if vdev and isinstance(file, str) and not file.startswith("json:"):
            out[vdev] = (file, str(inserted.get("node-name", f"{vdev}-fmt")))
    return out


async def capability_off(qmp: Qmp) -> None:
    """Turn ``pause-before-switchover`` off once no migration runs (a killed --live
    snapshot leaves QEMU waiting at pre-switchover with it on)."""
    info = await qmp.execute("query-migrate")
    status = str(info.get("status")) if isinstance(info, dict) else "none"
    if status in ("active", "setup", "device", "pre-switchover", "cancelling"):
        return
    await qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "pause-before-switchover", "state": False}]})


async def settle_jobs(qmp: Qmp, ids: Sequence[str], prefixes: Sequence[str],
                      complete: Sequence[str], timeout: float
                      ) -> list[tuple[str, str, str | None]]:
    """Let the jobs named ``ids`` or starting with ``prefixes`` end (those starting with
    ``complete`` completed when ready), dismiss them; (id, status when found, error)."""
    done = []
    for job_id, status in (await job_ids(qmp)).items():
        if job_id not in ids and not job_id.startswith(tuple(prefixes)):
            continue
        found, error = await settle_job(qmp, job_id, timeout,
                                        complete_on_ready=job_id.startswith(tuple(complete)))
        if found:
            done.append((job_id, status, error))
    await capability_off(qmp)
    return done


async def resume_stopped(qmp: Qmp) -> bool:
    """Run the guest again if a killed verb left it stopped; True when it did."""
    st = await qmp.execute("query-status")
    status = st.get("status") if isinstance(st, dict) else None
    if status in ("paused", "postmigrate", "finish-migrate"):
        # Not a bare `cont`: in finish-migrate (a memory save just completed) QEMU's
        # migration thread still has to inactivate the disks and set postmigrate, and a
        # `cont` before that runs the guest on disks that are then taken away (CI under
        # load: a write after it was lost).
        await vmstate.cont_after_migration(qmp)
        return True
    return False
