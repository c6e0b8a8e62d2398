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
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.aio import sync
from tests.vm.guests import boot, clear, read_marker, write_config, write_marker
from tests.vm.truth import check_truth, converge, killed_at, points, qemus_named, xenlab
from xenlab.vm import qemuimg
from xenlab.vm.domain import SHUTOFF, Toolstack
from xenlab.vm.store import SnapshotState

pytestmark = pytest.mark.integration

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


@pytest.mark.parametrize("point", points(CREATE, ["create.rundir", "create.spawned"]))
def test_create(guest: tuple[Toolstack, Path], point: str) -> None:
    ts, tmp = guest
    cfg = write_config(tmp, "xcrashc", memory=64, maxmem=None, vcpus=1, mkfs=False)
    if not (tmp / "xcrashc.qcow2").exists():
        sync(qemuimg.create(tmp / "xcrashc.qcow2", "qcow2", "16M"))
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


@pytest.mark.parametrize("point", points(
    INTERNAL, ["job.snapshot-save.started", "snapshot-create.taken"]))
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
            "snapshot-create.switched", "vmstate.migrating", "snapshot-create.memory-done",
            "snapshot-create.taken"]


@pytest.mark.parametrize("point", points(
    EXTERNAL, ["snapshot-create.switched", "vmstate.migrating", "snapshot-create.memory-done"]))
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


@pytest.mark.parametrize("point", points(
    REVERT, ["snapshot-revert.disks", "incoming.spawned", "snapshot-revert.loading"]))
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


@pytest.mark.parametrize("point", points(DELETE, ["snapshot-delete.commit-started"]))
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


@pytest.mark.parametrize("point", points(
    ATTACH, ["block-attach.node-added", "block-attach.device-added"]))
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


SAVE = ["save.job", "save.header", "vmstate.migrating", "save.committed", "save.quit"]


@pytest.mark.parametrize("point", points(SAVE, ["vmstate.migrating", "save.committed"]))
def test_save(guest: tuple[Toolstack, Path], point: str) -> None:
    ts, tmp = guest
    reset(ts)
    write_marker(ts, "xcrash", f"saved-{point}")
    image = tmp / "xcrash.save"
    image.unlink(missing_ok=True)
    killed_at(ts, point, "vm", "save", "xcrash", str(image))
    converge(ts)
    check_truth(ts, {"xcrash"})
    assert not list(tmp.glob(".xcrash.save.*"))  # no half-written image left
    if point in ("save.committed", "save.quit"):
        # The image was whole: the save is finished, the domain stopped.
        assert not qemus_named({"xcrash"})
        assert "xcrash" not in {r.name for r in ts.store.list()}
        proc = xenlab(ts, "vm", "restore", str(image))
        assert proc.returncode == 0, proc.stderr
        check_truth(ts, {"xcrash"})
    else:
        assert not image.exists()
        assert ts.get("xcrash").state == "running"
    assert read_marker(ts, "xcrash") == f"saved-{point}"


MIGRATE = ["migrate.job", "migrate.streamed", "migrate.handing-over", "migrate.handed-over"]


@pytest.mark.parametrize("point", points(
    MIGRATE, ["migrate.streamed", "migrate.handing-over", "migrate.handed-over"]))
def test_local_migrate(guest: tuple[Toolstack, Path], point: str) -> None:
    """Whatever the point, exactly one copy of the guest runs after the next commands."""
    ts, tmp = guest
    reset(ts)
    dest = Toolstack(tmp / f"dest-{point}")
    try:
        _migrate_killed(ts, dest, point)
    finally:
        clear(dest)
        dest.store.close()


def _migrate_killed(ts: Toolstack, dest: Toolstack, point: str) -> None:
    write_marker(ts, "xcrash", f"moved-{point}")
    killed_at(ts, point, "vm", "migrate", "xcrash", "localhost",
              "--dest-state-dir", str(dest.state_dir))
    converge(ts)
    converge(dest)
    for side in (ts, dest):
        check_truth(side, {r.name for r in side.store.list()} & {"xcrash"})
    here = [r for r in ts.store.list() if r.name == "xcrash"]
    there = [r for r in dest.store.list() if r.name == "xcrash"]
    assert len(here) + len(there) == 1, (here, there)
    assert len(qemus_named({"xcrash"})) == 1
    runs = there[0] if there else here[0]
    if point == "migrate.handed-over":
        assert there  # the destination ran it: the source finished
    if point in ("migrate.job", "migrate.streamed"):
        assert here  # the destination never ran it: the source took it back
    side = dest if there else ts
    if runs.state == "paused":
        assert xenlab(side, "vm", "unpause", "xcrash").returncode == 0
    assert read_marker(side, "xcrash") == f"moved-{point}"
    if there:
        proc = xenlab(dest, "vm", "migrate", "xcrash", "localhost",
                      "--dest-state-dir", str(ts.state_dir))
        assert proc.returncode == 0, proc.stderr


def test_save_snapshot_killed_mid_stream(guest: tuple[Toolstack, Path]) -> None:
    """The recovery deleted the save's disk snapshot while QEMU's images were inactive:
    QEMU asserted and the guest died."""
    ts, tmp = guest
    reset(ts)
    write_marker(ts, "xcrash", "kept-snap")
    killed_at(ts, "vmstate.migrating", "vm", "save", "--snapshot", "xcrash",
              str(tmp / "snap.save"))
    converge(ts)
    check_truth(ts, {"xcrash"})
    assert ts.get("xcrash").state == "running"
    assert read_marker(ts, "xcrash") == "kept-snap"
    disk = str(tmp / "xcrash.qcow2")
    assert not [t for t in sync(qemuimg.snapshot_tags(disk)) if t.startswith("xenlab-save-")]


@pytest.mark.parametrize("point", points(
    ["vmstate.migrating", "snapshot-create.switched", "snapshot-create.memory-done"],
    ["vmstate.migrating"]))
def test_snapshot_create_live(guest: tuple[Toolstack, Path], point: str) -> None:
    """A --live memory snapshot killed mid-migration left the guest frozen at switch-over."""
    ts, _ = guest
    reset(ts)
    killed_at(ts, point, "vm", "snapshot-create", "xcrash", "l1", "--external", "--memory",
              "--live")
    converge(ts)
    check_truth(ts, {"xcrash"})
    rec = ts.get("xcrash")
    assert rec.state == "running"
    write_marker(ts, "xcrash", f"live-{point}")
    # Verbs that need QEMU's migration state free work again.
    proc = xenlab(ts, "vm", "pause", "xcrash")
    assert proc.returncode == 0, proc.stderr
    proc = xenlab(ts, "vm", "unpause", "xcrash")
    assert proc.returncode == 0, proc.stderr
    assert read_marker(ts, "xcrash") == f"live-{point}"


NET_ATTACH = ["network-attach.host-end", "network-attach.netdev-added",
              "network-attach.device-added"]


@pytest.mark.parametrize("point", points(
    NET_ATTACH, ["network-attach.netdev-added", "network-attach.device-added"]))
def test_network_attach(guest: tuple[Toolstack, Path], point: str) -> None:
    """A NIC in QEMU but not in the record: no verb could manage it, and a save of the
    guest could not be restored."""
    from xenlab.vm.backends.qemu.qmp import Qmp, qdev_ids

    ts, _ = guest
    reset(ts)
    killed_at(ts, point, "vm", "network-attach", "xcrash", "mac=00:16:3e:11:22:33")
    converge(ts)
    check_truth(ts, {"xcrash"})

    async def devices() -> frozenset[str]:
        async with Qmp.open(ts.paths(ts.get("xcrash")).qmp) as qmp:
            return await qdev_ids(qmp)

    from asyncio import run as run_async

    listed = json.loads(xenlab(ts, "vm", "network-list", "xcrash", "--json").stdout)
    in_qemu = {d for d in run_async(devices()) if d.startswith("vif")}
    assert {f"vif{n['devid']}" for n in listed} == in_qemu
    assert bool(listed) == (point == "network-attach.device-added")
    for n in listed:
        assert xenlab(ts, "vm", "network-detach", "xcrash", str(n["devid"])).returncode == 0
    proc = xenlab(ts, "vm", "network-attach", "xcrash", "mac=00:16:3e:11:22:33")
    assert proc.returncode == 0, proc.stderr
    assert xenlab(ts, "vm", "network-detach", "xcrash", "0").returncode == 0


def test_block_detach(guest: tuple[Toolstack, Path]) -> None:
    """Killed after the guest let the disk go: the record listed a disk QEMU no longer had."""
    ts, tmp = guest
    reset(ts)
    target = tmp / "detach.qcow2"
    spec = f"format=qcow2,vdev=xvdb,access=rw,target={target}"
    assert xenlab(ts, "vm", "block-attach", "xcrash", spec, "--create-disks",
                  "16M").returncode == 0
    for _ in range(100):  # the guest sees the disk before it can let it go
        if "vdb" in xenlab(ts, "vm", "exec", "xcrash", "--", "ls", "/sys/block").stdout:
            break
    killed_at(ts, "block-detach.unplugged", "vm", "block-detach", "xcrash", "xvdb")
    converge(ts)
    check_truth(ts, {"xcrash"})
    listed = json.loads(xenlab(ts, "vm", "block-list", "xcrash", "--json").stdout)
    assert "xvdb" not in {d["vdev"] for d in listed}
    proc = xenlab(ts, "vm", "block-attach", "xcrash", spec)
    assert proc.returncode == 0, proc.stderr
    assert xenlab(ts, "vm", "block-detach", "xcrash", "xvdb").returncode == 0
    target.unlink()
