"""What a running QEMU says about itself, JSON-ready: the ``live`` part of ``vm info``.

One QMP session asks for the run state, the accelerator, the balloon, the
``-m`` size, the vCPU threads (with their host affinity, read here), the CPU
slots, the block devices and the chardevs.  A reply of the wrong shape is a
:class:`~xenlab.errors.BackendError` naming the command.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from xenlab.errors import BackendError
from xenlab.vm.backends.qemu.qmp import CommandError, Qmp
from xenlab.vm.hostcpus import ranges

__all__ = ["live_info"]

_MIB = 1 << 20


def _dict(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BackendError(f"QMP {what}: unexpected reply {value!r}")
    return value


def _list(value: object, what: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise BackendError(f"QMP {what}: unexpected reply {value!r}")
    return value


async def live_info(qmp_path: Path) -> dict[str, Any]:
    """The running QEMU's facts (see the module docstring)."""
    async with Qmp.open(qmp_path) as qmp:
        status = _dict(await qmp.execute("query-status"), "query-status")
        kvm = _dict(await qmp.execute("query-kvm"), "query-kvm")
        try:
            balloon: int | None = int(
                _dict(await qmp.execute("query-balloon"), "query-balloon")["actual"])
        except CommandError:
            balloon = None  # no balloon device (a hand-made QEMU)
        size = _dict(await qmp.execute("query-memory-size-summary"),
                     "query-memory-size-summary")
        cpus = _list(await qmp.execute("query-cpus-fast"), "query-cpus-fast")
        slots = _list(await qmp.execute("query-hotpluggable-cpus"), "query-hotpluggable-cpus")
        block = _list(await qmp.execute("query-block"), "query-block")
        chardevs = _list(await qmp.execute("query-chardev"), "query-chardev")
    vcpus = []
    for c in sorted(cpus, key=lambda c: int(c["cpu-index"])):
        tid = int(c["thread-id"])
        try:
            affinity: str | None = ranges(os.sched_getaffinity(tid))
        except OSError:
            affinity = None
        vcpus.append({"vcpu": int(c["cpu-index"]), "thread_id": tid,
                      "props": c.get("props", {}), "affinity": affinity})
    disks = []
    for b in block:
        ins = b.get("inserted")
        disks.append({
            "device": b.get("qdev") or b.get("device"),
            "node": None if ins is None else ins.get("node-name"),
            "file": None if ins is None else ins.get("file"),
            "format": None if ins is None else ins.get("drv"),
            "read_only": None if ins is None else bool(ins.get("ro")),
            "removable": bool(b.get("removable")),
        })
    return {
        "status": status.get("status"),
        "accelerator": "kvm" if kvm.get("enabled") else "tcg",
        "balloon_mib": None if balloon is None else balloon // _MIB,
        "memory_mib": int(size.get("base-memory", 0)) // _MIB,
        "vcpus": vcpus,
        "maxvcpus": len(slots),
        "block": disks,
        "chardevs": [{"label": c.get("label"), "filename": c.get("filename")}
                     for c in chardevs],
    }
