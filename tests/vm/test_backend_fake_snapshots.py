"""The snapshot verbs over the in-memory backend: create, revert and delete of internal,
external and memory snapshots run their records, jobs and files through the Backend
protocol's LiveSnapshots session alone (the images are real qcow2 files, made and merged
with qemu-img as a hypervisor's own image code would)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.aio import sync
from tests.vm.fakebackend import FakeBackend
from xenlab.errors import BackendError
from xenlab.vm.backend import Capabilities, Unsupported
from xenlab.vm.domain import Toolstack
from xenlab.vm.runtime import JOB
from xenlab.vm.snapshot import (
    create_snapshot,
    delete_snapshot,
    list_snapshots,
    revert_snapshot,
    tops_of,
)
from xenlab.vm.store import DomainRecord, SnapshotKind

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

SNAPS = Capabilities(pause=True, internal_snapshots=True, live_disk_snapshots=True,
                     memory_snapshots=True)


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend(caps=SNAPS)


@pytest.fixture
def ts(tmp_path: Path, fake: FakeBackend) -> Toolstack:
    return Toolstack(tmp_path / "state", backend=fake)


def _running(ts: Toolstack, tmp_path: Path, name: str = "a") -> tuple[DomainRecord, str]:
    disk = tmp_path / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    cfg = tmp_path / f"{name}.cfg"
    cfg.write_text(f'name = "{name}"\ntype = "hvm"\nmemory = 64\n'
                   f'disk = ["format=qcow2,vdev=xvda,access=rw,target={disk}"]\n')
    return sync(ts.create(cfg)), str(disk)


def _backing(path: str) -> str | None:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], check=True,
                         capture_output=True, text=True).stdout
    found = json.loads(out).get("full-backing-filename")
    return None if found is None else os.path.realpath(found)


def _calls(fake: FakeBackend) -> list[str]:
    return [c for c, _ in fake.calls]


def test_internal_snapshot_keeps_the_memory_and_reverts_it(
        ts: Toolstack, fake: FakeBackend, tmp_path: Path) -> None:
    rec, disk = _running(ts, tmp_path)
    dom = fake.world[rec.uuid]
    dom.memory_mib = 48
    row = sync(create_snapshot(ts, "a", "s1"))
    assert row.kind is SnapshotKind.INTERNAL and row.disks[0]["vmstate"] is True
    assert fake.tags[os.path.realpath(disk)] == {"s1"}
    assert "save_internal" in _calls(fake) and JOB not in ts.get("a").extra

    dom.memory_mib = 20  # the guest moves on
    sync(revert_snapshot(ts, "a", "s1"))
    assert dom.memory_mib == 48 and dom.state == "running"  # it ran when taken
    assert ts.get("a").state == "running"
    assert list_snapshots(ts, "a").current == "s1"

    sync(delete_snapshot(ts, "a", "s1"))
    assert fake.tags[os.path.realpath(disk)] == set()
    assert "delete_internal" in _calls(fake) and list_snapshots(ts, "a").roots == ()


def test_external_disk_snapshot_switches_and_commits_back(
        ts: Toolstack, fake: FakeBackend, tmp_path: Path) -> None:
    rec, disk = _running(ts, tmp_path)
    sync(create_snapshot(ts, "a", "e1", external=True, disk_only=True))
    overlay = f"{disk}.e1.qcow2"
    assert fake.world[rec.uuid].disks["xvda"] == overlay
    assert _backing(overlay) == os.path.realpath(disk)
    assert os.stat(overlay).st_mode & 0o777 == 0o600  # claimed by the verb, private
    assert tops_of(ts, ts.get("a"))["xvda"] == overlay

    sync(delete_snapshot(ts, "a", "e1"))
    assert "commit" in _calls(fake)
    assert fake.world[rec.uuid].disks["xvda"] == disk and not Path(overlay).exists()
    assert tops_of(ts, ts.get("a")).get("xvda", disk) == disk


def test_external_memory_snapshot_restarts_the_domain_on_its_state(
        ts: Toolstack, fake: FakeBackend, tmp_path: Path) -> None:
    rec, disk = _running(ts, tmp_path)
    fake.world[rec.uuid].memory_mib = 40
    row = sync(create_snapshot(ts, "a", "m1", external=True, memory=True))
    assert row.kind is SnapshotKind.EXTERNAL and row.memory_path is not None
    assert os.stat(row.memory_path).st_mode & 0o777 == 0o600
    assert fake.world[rec.uuid].state == "running"  # resumed after its memory was saved

    fake.world[rec.uuid].memory_mib = 10
    after = sync(revert_snapshot(ts, "a", "m1"))
    dom = fake.world[after.uuid]
    assert dom.memory_mib == 40 and dom.state == "running" and after.state == "running"
    # The old guest was destroyed and a new one started to take the memory.
    assert _calls(fake).count("start") == 2 and "load_state" in _calls(fake)
    # A fresh overlay over the image the snapshot froze: the snapshot stays revertible.
    top = tops_of(ts, ts.get("a"))["xvda"]
    assert top == f"{disk}.m1~1.qcow2" and _backing(top) == os.path.realpath(disk)
    assert dom.disks["xvda"] == top


def test_a_backend_without_live_snapshots_refuses_before_anything_changes(
        tmp_path: Path) -> None:
    fake = FakeBackend()  # no snapshot capabilities
    ts = Toolstack(tmp_path / "state", backend=fake)
    _running(ts, tmp_path)
    with pytest.raises(Unsupported, match="live disk snapshots"):
        sync(create_snapshot(ts, "a", "s1"))
    assert list_snapshots(ts, "a").roots == () and "live_snapshots" not in _calls(fake)
    assert JOB not in ts.get("a").extra


def test_a_refused_take_leaves_no_row_and_no_overlay(
        ts: Toolstack, fake: FakeBackend, tmp_path: Path) -> None:
    rec, disk = _running(ts, tmp_path)
    fake.refuse = "no space"
    with pytest.raises(BackendError, match="fake refused the snapshot: no space"):
        sync(create_snapshot(ts, "a", "e1", external=True, disk_only=True))
    assert not os.path.lexists(f"{disk}.e1.qcow2")  # the claimed name is given back
    assert fake.world[rec.uuid].disks["xvda"] == disk
    assert list_snapshots(ts, "a").roots == () and JOB not in ts.get("a").extra


def test_a_shut_off_domain_is_snapshotted_without_a_session(
        ts: Toolstack, fake: FakeBackend, tmp_path: Path) -> None:
    disk = tmp_path / "b.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    cfg = tmp_path / "b.cfg"
    cfg.write_text('name = "b"\ntype = "hvm"\nmemory = 64\n'
                   f'disk = ["format=qcow2,vdev=xvda,access=rw,target={disk}"]\n')
    sync(ts.define(cfg))
    sync(create_snapshot(ts, "b", "off1"))
    tags = subprocess.run(["qemu-img", "snapshot", "-l", str(disk)], check=True,
                          capture_output=True, text=True).stdout
    assert "off1" in tags and "live_snapshots" not in _calls(fake)
    sync(delete_snapshot(ts, "b", "off1"))
    assert "off1" not in subprocess.run(["qemu-img", "snapshot", "-l", str(disk)], check=True,
                                        capture_output=True, text=True).stdout


def test_a_lost_answer_after_the_switch_keeps_the_overlay_the_guest_writes_to(
        ts: Toolstack, fake: FakeBackend, tmp_path: Path) -> None:
    # The hypervisor applied the snapshot and then its answer was lost: the disk runs on
    # the overlay, so removing it would lose every write from then on.
    rec, disk = _running(ts, tmp_path)
    fake.lose_answer = True
    with pytest.raises(BackendError, match="the disks run on its overlays now"):
        sync(create_snapshot(ts, "a", "e1", external=True, disk_only=True))
    overlay = f"{disk}.e1.qcow2"
    assert fake.world[rec.uuid].disks["xvda"] == overlay and Path(overlay).exists()
    assert tops_of(ts, ts.get("a"))["xvda"] == overlay  # a restart runs on it too
    assert [s.state.value for s in ts.store.list_snapshots(rec.domid)] == ["broken"]
    fake.lose_answer = False
    sync(delete_snapshot(ts, "a", "e1"))  # commits the overlay back
    assert fake.world[rec.uuid].disks["xvda"] == disk and not Path(overlay).exists()


def test_a_session_lost_mid_memory_leaves_the_guest_running(
        ts: Toolstack, fake: FakeBackend, tmp_path: Path) -> None:
    rec, _ = _running(ts, tmp_path)
    fake.drop_session = True
    with pytest.raises(BackendError, match="the guest, paused for the snapshot, runs again"):
        sync(create_snapshot(ts, "a", "m1", external=True, memory=True))
    assert fake.world[rec.uuid].state == "running" and ts.get("a").state == "running"


def test_a_backend_that_cannot_keep_memory_takes_no_default_live_snapshot(
        tmp_path: Path) -> None:
    # The default on a running domain keeps its memory: refused before anything is made,
    # not taken and then refused at revert.
    fake = FakeBackend(caps=Capabilities(pause=True, live_disk_snapshots=True,
                                         internal_snapshots=True))
    ts = Toolstack(tmp_path / "state", backend=fake)
    _running(ts, tmp_path)
    with pytest.raises(Unsupported, match="memory snapshots"):
        sync(create_snapshot(ts, "a", "s1"))
    assert list_snapshots(ts, "a").roots == () and "live_snapshots" not in _calls(fake)
    row = sync(create_snapshot(ts, "a", "d1", disk_only=True))  # the disks alone it can do
    assert row.kind is SnapshotKind.INTERNAL and row.disks[0]["vmstate"] is False
