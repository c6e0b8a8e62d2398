"""SIGKILL of the xenlab process at every marked point of a verb; the next command converges.

Each verb runs as a real ``xenlab`` process told by ``XENLAB_FAULT`` to kill
itself at one point (``xenlab.faults``); a point a verb no longer reaches
fails the test, so the list below stays true to the code.  After each kill
``xenlab vm list`` runs, as a user would, and then the truth is checked
(:func:`check_truth`): every record's state agrees with its QEMU, no QEMU
runs that no record names, no snapshot is left half-made, the record names
the file QEMU writes each disk to, the images pass ``qemu-img check``, and
the guest's data is still there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.guests import boot, read_marker, write_config, write_marker
from xenlab.vm import qemuimg
from xenlab.vm.domain import SHUTOFF, Toolstack
from xenlab.vm.qmp import Qmp
from xenlab.vm.qmp import run as run_async
from xenlab.vm.store import SnapshotState, is_alive, is_domain_qemu

pytestmark = pytest.mark.integration

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
            if a == b"-name" and argv[i + 1].split(b",")[0].removeprefix(b"guest=") in {
                    n.encode() for n in names}:
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
    from xenlab.vm.snapshot import snap_disks

    recs = {r.name: r for r in ts.store.list()}
    running = set(qemus_named(names))
    recorded = {r.pid for r in recs.values() if r.pid and is_domain_qemu(r.pid, r)}
    assert running == recorded, f"QEMUs {running} but records name {recorded}"
    for rec in recs.values():
        assert rec.state in ("running", "paused", SHUTOFF), (rec.name, rec.state)
        assert "job" not in rec.extra, (rec.name, rec.extra["job"])
        assert (rec.state == SHUTOFF) == (not is_alive(rec)), (rec.name, rec.state)
        for s in ts.store.list_snapshots(rec.domid):
            assert s.state in (SnapshotState.READY, SnapshotState.BROKEN), (s.name, s.state)
        disks = snap_disks(ts, rec)
        if is_alive(rec):
            files = run_async(qemu_files(ts, rec.name))
            for d in disks:
                assert os.path.realpath(d.file) == files[d.vdev], (
                    f"{rec.name} {d.vdev}: record says {d.file}, QEMU writes {files[d.vdev]}")
        for d in disks:
            # A running QEMU keeps some metadata in memory: a read-only check then
            # may see leaked clusters (no harm to data), never corruption.
            result = qemuimg.check(d.file, d.format)
            assert not result.corrupt and (result.ok or is_alive(rec)), result.message


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory, guest_image: object
          ) -> Iterator[tuple[Toolstack, Path]]:
    """One running guest for the module, its marker written; cleared after."""
    from tests.vm.guests import clear

    tmp = tmp_path_factory.mktemp("crash")
    ts = Toolstack(tmp / "state")
    boot(ts, tmp, "xcrash", maxmem=None, memory=128, vcpus=1)
    write_marker(ts, "xcrash", "before")
    yield ts, tmp
    clear(ts)


def reset(ts: Toolstack) -> None:
    """Back to one running guest with no snapshots."""
    for s in reversed(ts.store.list_snapshots(ts.get("xcrash").domid)):
        proc = xenlab(ts, "vm", "snapshot-delete", "xcrash", s.name, "--children")
        assert proc.returncode == 0 or "no snapshot" in proc.stderr, proc.stderr
    if ts.get("xcrash").state == SHUTOFF:
        assert xenlab(ts, "vm", "create", str(ts.get("xcrash").config_path)).returncode == 0


CREATE = ["create.recorded", "create.rundir", "create.vifs", "create.spawned"]


@pytest.mark.parametrize("point", CREATE)
def test_create(guest: tuple[Toolstack, Path], point: str) -> None:
    ts, tmp = guest
    cfg = write_config(tmp, "xcrashc", memory=64, maxmem=None, vcpus=1, mkfs=False)
    if not (tmp / "xcrashc.qcow2").exists():
        qemuimg.create(tmp / "xcrashc.qcow2", "qcow2", "16M")
    killed_at(ts, point, "vm", "create", str(cfg), "-p")
    said = converge(ts)
    assert "xcrashc" not in {r.name for r in ts.store.list()}, said
    assert not qemus_named({"xcrashc"})
    check_truth(ts, {"xcrash", "xcrashc"})
    # and the name is free for a create that is not killed
    proc = xenlab(ts, "vm", "create", str(cfg), "-p")
    assert proc.returncode == 0, proc.stderr
    assert xenlab(ts, "vm", "destroy", "xcrashc").returncode == 0


INTERNAL = ["snapshot-create.job", "snapshot-create.row", "job.snapshot-save.started",
            "snapshot-create.taken"]


@pytest.mark.parametrize("point", INTERNAL)
def test_snapshot_create_internal(guest: tuple[Toolstack, Path], point: str) -> None:
    ts, _ = guest
    reset(ts)
    killed_at(ts, point, "vm", "snapshot-create", "xcrash", "s1")
    converge(ts)
    check_truth(ts, {"xcrash"})
    snaps = {s.name: s for s in ts.store.list_snapshots(ts.get("xcrash").domid)}
    if point in ("snapshot-create.job", "snapshot-create.row"):
        assert "s1" not in snaps  # killed before anything was taken: undone
    if point == "snapshot-create.taken":
        assert snaps["s1"].state is SnapshotState.READY
    # Whatever happened, the name can be used again and QEMU's job id is free.
    xenlab(ts, "vm", "snapshot-delete", "xcrash", "s1")
    proc = xenlab(ts, "vm", "snapshot-create", "xcrash", "s1")
    assert proc.returncode == 0, proc.stderr
    assert read_marker(ts, "xcrash") == "before"


EXTERNAL = ["snapshot-create.job", "snapshot-create.row", "snapshot-create.stopped",
            "snapshot-create.switched", "snapshot-create.memory-started",
            "snapshot-create.memory-done", "snapshot-create.taken"]


@pytest.mark.parametrize("point", EXTERNAL)
def test_snapshot_create_external_with_memory(guest: tuple[Toolstack, Path], point: str
                                              ) -> None:
    ts, _ = guest
    reset(ts)
    killed_at(ts, point, "vm", "snapshot-create", "xcrash", "e1", "--external", "--memory")
    converge(ts)
    check_truth(ts, {"xcrash"})
    rec = ts.get("xcrash")
    assert rec.state == "running"  # the guest the verb paused runs again
    snaps = {s.name: s for s in ts.store.list_snapshots(rec.domid)}
    if point in ("snapshot-create.memory-done", "snapshot-create.taken"):
        assert snaps["e1"].state is SnapshotState.READY and snaps["e1"].memory_path
    # The guest's writes after the crash land where the record says they do.
    write_marker(ts, "xcrash", f"after-{point}")
    if point == "snapshot-create.switched":
        # the review's case: writes after the crash survive a destroy and a create
        assert xenlab(ts, "vm", "destroy", "xcrash").returncode == 0
        proc = xenlab(ts, "vm", "create", rec.config_path, "--wait", "120")
        assert proc.returncode == 0, proc.stderr
        assert read_marker(ts, "xcrash") == f"after-{point}"
    # Deleting it commits the overlay back: nothing the guest wrote is lost.
    if "e1" in snaps or "e1" in {s.name for s in ts.store.list_snapshots(rec.domid)}:
        proc = xenlab(ts, "vm", "snapshot-delete", "xcrash", "e1")
        assert proc.returncode == 0, proc.stderr
    check_truth(ts, {"xcrash"})
    assert read_marker(ts, "xcrash") == f"after-{point}"


REVERT = ["snapshot-revert.job", "snapshot-revert.killed", "snapshot-revert.disks",
          "incoming.recorded", "incoming.spawned", "snapshot-revert.loading"]


@pytest.mark.parametrize("point", REVERT)
def test_snapshot_revert_external(guest: tuple[Toolstack, Path], point: str) -> None:
    ts, _ = guest
    reset(ts)
    write_marker(ts, "xcrash", "at-r1")
    assert xenlab(ts, "vm", "snapshot-create", "xcrash", "r1", "--external",
                  "--memory").returncode == 0
    write_marker(ts, "xcrash", "later")
    killed_at(ts, point, "vm", "snapshot-revert", "xcrash", "r1")
    converge(ts)
    check_truth(ts, {"xcrash"})
    # Reverting again (or for the first time) always works and reads the snapshot's data.
    proc = xenlab(ts, "vm", "snapshot-revert", "xcrash", "r1")
    assert proc.returncode == 0, proc.stderr
    check_truth(ts, {"xcrash"})
    assert read_marker(ts, "xcrash") == "at-r1"


DELETE = ["snapshot-delete.deleting", "snapshot-delete.commit-started",
          "snapshot-delete.disks-done"]


@pytest.mark.parametrize("point", DELETE)
def test_snapshot_delete_external(guest: tuple[Toolstack, Path], point: str) -> None:
    ts, _ = guest
    reset(ts)
    assert xenlab(ts, "vm", "snapshot-create", "xcrash", "d1", "--external").returncode == 0
    write_marker(ts, "xcrash", f"in-overlay-{point}")
    killed_at(ts, point, "vm", "snapshot-delete", "xcrash", "d1")
    converge(ts)
    check_truth(ts, {"xcrash"})
    assert "d1" not in {s.name for s in ts.store.list_snapshots(ts.get("xcrash").domid)}
    assert read_marker(ts, "xcrash") == f"in-overlay-{point}"


ATTACH = ["block-attach.job", "block-attach.node-added", "block-attach.device-added"]


@pytest.mark.parametrize("point", ATTACH)
def test_block_attach(guest: tuple[Toolstack, Path], point: str) -> None:
    ts, tmp = guest
    reset(ts)
    target = tmp / "extra.qcow2"
    spec = f"format=qcow2,vdev=xvdb,access=rw,target={target}"
    killed_at(ts, point, "vm", "block-attach", "xcrash", spec, "--create-disks", "16M")
    converge(ts)
    check_truth(ts, {"xcrash"})
    listed = json.loads(xenlab(ts, "vm", "block-list", "xcrash", "--json").stdout)
    has = "xvdb" in {d["vdev"] for d in listed}
    assert has == (point == "block-attach.device-added")
    if has:
        assert xenlab(ts, "vm", "block-detach", "xcrash", "xvdb").returncode == 0
    else:
        assert not target.exists()  # what the killed attach made is gone
    # a later attach of the same vdev works (no device or node left in the way)
    proc = xenlab(ts, "vm", "block-attach", "xcrash", spec, "--create-disks", "16M")
    assert proc.returncode == 0, proc.stderr
    assert xenlab(ts, "vm", "block-detach", "xcrash", "xvdb").returncode == 0
    target.unlink()
