"""Checking that the store tells the truth, written once: :func:`check_truth` and the CLI runner.

:func:`xenlab` runs the real command on a toolstack's state directory (a
fault to die at may be given), :func:`converge` is the next command a user
runs, and :func:`check_truth` compares every record with the QEMU it names,
the files QEMU writes, the snapshot rows and the images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from asyncio import run as run_async
from collections.abc import Sequence
from pathlib import Path

from tests.aio import sync
from xenlab.vm import qemuimg
from xenlab.vm.backends.qemu.qmp import Qmp
from xenlab.vm.domain import SHUTOFF, Toolstack
from xenlab.vm.store import SnapshotState, is_alive, is_domain_qemu, qemu_opts

XENLAB = str(Path(sys.executable).with_name("xenlab"))


def xenlab(ts: Toolstack, *args: str, fault: str | None = None, timeout: float = 300
           ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XENLAB_STATE_DIR=str(ts.state_dir))
    env.pop("XENLAB_FAULT", None)
    if fault is not None:
        env["XENLAB_FAULT"] = fault
    return subprocess.run([XENLAB, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def killed_at(ts: Toolstack, point: str, *args: str) -> None:
    """Run ``xenlab ARGS`` and have it SIGKILLed at ``point`` (it must get there)."""
    proc = xenlab(ts, *args, fault=point)
    assert proc.returncode == -9, (
        f"{' '.join(args)} never reached {point} (exit {proc.returncode}): {proc.stderr}")


def converge(ts: Toolstack) -> str:
    """The next command a user runs; its stderr (what the convergence said)."""
    proc = xenlab(ts, "vm", "list", "-l")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    json.loads(proc.stdout)
    return proc.stderr


def qemus_named(names: set[str]) -> list[int]:
    """Pids of QEMU processes whose -name is one of ``names``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not os.path.basename(argv[0]).startswith(b"qemu-system"):
            continue
        for i, a in enumerate(argv[:-1]):
            if a == b"-name":
                first = qemu_opts(argv[i + 1].decode("utf-8", "surrogateescape"))[0]
                if first.removeprefix("guest=") in names:
                    out.append(int(d.name))
    return out


async def qemu_files(ts: Toolstack, name: str) -> dict[str, str]:
    async with Qmp.open(ts.paths(ts.get(name)).qmp) as qmp:
        blocks = await qmp.execute("query-block")
    out = {}
    for b in blocks if isinstance(blocks, list) else []:
        vdev = str(b.get("qdev", "")).removeprefix("/machine/peripheral/").split("/")[0]
        file = (b.get("inserted") or {}).get("file")
        if vdev and file:
            out[vdev] = os.path.realpath(file)
    return out


def check_truth(ts: Toolstack, names: set[str]) -> None:
    """Everything the store says is so, and nothing runs that it does not say."""
    from xenlab.vm.runtime import Runtime
    from xenlab.vm.snapshot import snap_disks

    recs = {r.name: r for r in ts.store.list()}
    running = set(qemus_named(names))
    recorded = {r.pid for r in recs.values() if r.pid and is_domain_qemu(r.pid, r)}
    assert running == recorded, f"QEMUs {running} but records name {recorded}"
    for rec in recs.values():
        assert rec.state in ("running", "paused", SHUTOFF), (rec.name, rec.state)
        assert "job" not in rec.extra, (rec.name, rec.extra["job"])
        # The typed view of the run-time facts reads every record the verbs wrote whole.
        assert Runtime.of(rec).to_extra() == dict(rec.extra), (rec.name, rec.extra)
        assert not Runtime.of(rec).other, (rec.name, "keys vm.runtime does not name")
        assert (rec.state == SHUTOFF) == (not is_alive(rec)), (rec.name, rec.state)
        for s in ts.store.list_snapshots(rec.domid):
            assert s.state in (SnapshotState.READY, SnapshotState.BROKEN), (s.name, s.state)
        disks = snap_disks(ts, rec)
        if is_alive(rec):
            said = run_async(ts.backend.state(ts.handle(rec)))
            assert said == rec.state, f"{rec.name}: record says {rec.state}, QEMU {said}"
            files = run_async(qemu_files(ts, rec.name))
            for d in disks:
                assert os.path.realpath(d.file) == files[d.vdev], (
                    f"{rec.name} {d.vdev}: record says {d.file}, QEMU writes {files[d.vdev]}")
        for d in disks:
            # A running QEMU keeps some metadata in memory: a read-only check then
            # may see leaked clusters (no harm to data), never corruption.
            result = sync(qemuimg.check(d.file, d.format))
            assert not result.corrupt and (result.ok or is_alive(rec)), result.message


def points(every: Sequence[str], default: Sequence[str]) -> list[str]:
    """The fault points a crash test kills at: ``default`` (a few per verb, the
    steps whose recovery differs), or ``every`` one with ``XENLAB_CRASH_ALL=1``
    (``./dev.sh crash``) — the default suite stays short, the whole matrix runs
    on demand."""
    missing = set(default) - set(every)
    assert not missing, missing
    return list(every) if os.environ.get("XENLAB_CRASH_ALL") == "1" else list(default)

