"""vm.snapshot: snapshot life-cycles on real guests under QEMU (TCG), end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.aio import sync
from tests.vm.guests import boot, read_marker, uptime, wait_ready, write_marker
from xenlab.errors import BackendError, StateError, XenlabError
from xenlab.vm.domain import SHUTOFF, Toolstack
from xenlab.vm.snapshot import (
    create_snapshot,
    delete_snapshot,
    list_snapshots,
    revert_snapshot,
    snapshot_info,
)
from xenlab.vm.store import SnapshotKind, SnapshotNode, SnapshotState, is_alive

pytestmark = pytest.mark.integration

T = TypeVar("T")

# Two vCPUs (the guests' default): the guest then marks the TSC unstable
# and keeps time with the HPET, whose counter snapshot-load restores.  A
# one-vCPU guest under TCG keeps time with the TSC, which QEMU does not
# rewind on snapshot-load, so its uptime would run on across a revert
# although memory is restored.


def _boot(ts: Toolstack, tmp_path: Path, name: str) -> Path:
    """Create domain ``name`` on a new 32 MiB disk and wait for the guest; the disk."""
    boot(ts, tmp_path, name)
    return tmp_path / f"{name}.qcow2"


def _check(disk: Path, *, shared: bool = False) -> subprocess.CompletedProcess[str]:
    args = ["qemu-img", "check", *(["-U"] if shared else []), str(disk)]
    return subprocess.run(args, capture_output=True, text=True, check=False)


def _tags(disk: Path) -> list[str]:
    out = subprocess.run(["qemu-img", "snapshot", "-U", "-l", str(disk)],
                         capture_output=True, text=True, check=True).stdout
    return [line.split()[1] for line in out.splitlines()[2:]]


def _shape(nodes: tuple[SnapshotNode, ...]) -> list[object]:
    return [(n.snapshot.name, _shape(n.children)) for n in nodes]


def _timed(what: str, times: dict[str, float], fn: Callable[..., Coroutine[Any, Any, T]],
           *args: object, **kw: object) -> T:
    t = time.monotonic()
    result = sync(fn(*args, **kw))
    times[what] = time.monotonic() - t
    return result


def test_memory_snapshot_reverts_disk_and_memory(ts: Toolstack, tmp_path: Path) -> None:
    disk = _boot(ts, tmp_path, "m1")
    write_marker(ts, "m1", "A")
    times: dict[str, float] = {}
    s1 = _timed("create", times, create_snapshot, ts, "m1", "S1", description="before B")
    assert s1.kind is SnapshotKind.INTERNAL and s1.state is SnapshotState.READY
    at_s1 = uptime(ts, "m1")
    write_marker(ts, "m1", "B")
    time.sleep(3.0)  # a margin for the reads after the revert on a loaded machine
    before = uptime(ts, "m1")
    assert read_marker(ts, "m1") == "B"
    _timed("revert", times, revert_snapshot, ts, "m1", "S1")
    assert sync(ts.status(ts.get("m1"))).state == "running"
    assert read_marker(ts, "m1") == "A"
    after = uptime(ts, "m1")
    # The guest's clock continues from S1: less time has passed than before the revert.
    assert after < before - 1.0 and after >= at_s1 - 1.0, (at_s1, before, after)
    info = sync(snapshot_info(ts, "m1", "S1"))
    assert info.has_memory and info.current and info.vm_state_bytes
    assert info.record.description == "before B"
    assert _tags(disk) == ["S1"]
    _timed("delete", times, delete_snapshot, ts, "m1", "S1")
    assert _tags(disk) == [] and list_snapshots(ts, "m1").roots == ()
    assert _check(disk, shared=True).returncode == 0
    assert sync(ts.shutdown("m1")) == "shutdown"
    check = _check(disk)
    assert check.returncode == 0 and "No errors" in check.stdout, check
    print("snapshot times (s):", {k: round(v, 3) for k, v in times.items()})


def test_tree_survives_a_new_toolstack_and_bad_input_changes_nothing(
    ts: Toolstack, tmp_path: Path
) -> None:
    _boot(ts, tmp_path, "t1")
    write_marker(ts, "t1", "1")
    sync(create_snapshot(ts, "t1", "S1"))
    write_marker(ts, "t1", "2")
    sync(create_snapshot(ts, "t1", "S2"))
    sync(revert_snapshot(ts, "t1", "S1"))
    assert list_snapshots(ts, "t1").current == "S1"
    write_marker(ts, "t1", "3")
    sync(create_snapshot(ts, "t1", "S3", disk_only=True))
    sync(create_snapshot(ts, "t1", "S4"))
    expect: list[object] = [("S1", [("S2", []), ("S3", [("S4", [])])])]

    again = Toolstack(ts.state_dir)
    tree = list_snapshots(again, "t1")
    assert _shape(tree.roots) == expect and tree.current == "S4"
    assert tree.lines() == [
        "S1 (internal)", "  S2 (internal)", "  S3 (internal)", "    S4 (internal) *",
    ]
    assert tree.to_json()[0]["children"][1]["children"][0]["current"] is True
    sync(revert_snapshot(again, "t1", "S2", running=False))
    assert sync(again.status(again.get("t1"))).state == "paused"
    sync(again.unpause("t1"))
    assert read_marker(again, "t1") == "2"
    assert list_snapshots(ts, "t1").current == "S2"

    # Bad input: a clear error and nothing changed.
    with pytest.raises(XenlabError, match="no domain"):
        sync(create_snapshot(ts, "nope", "S9"))
    with pytest.raises(XenlabError, match="already has a snapshot named 'S2'"):
        sync(create_snapshot(ts, "t1", "S2"))
    with pytest.raises(XenlabError, match="bad snapshot name"):
        sync(create_snapshot(ts, "t1", "12"))
    with pytest.raises(XenlabError, match="no snapshot named 'S9'"):
        sync(revert_snapshot(ts, "t1", "S9"))
    with pytest.raises(XenlabError, match="no snapshot named 'S9'"):
        sync(delete_snapshot(ts, "t1", "S9"))
    with pytest.raises(StateError, match=r"has children \('S4'\)"):
        sync(delete_snapshot(ts, "t1", "S3"))
    with pytest.raises(XenlabError, match="contradict"):
        sync(create_snapshot(ts, "t1", "S9", disk_only=True, memory=True))
    with pytest.raises(XenlabError, match="--live needs"):
        sync(create_snapshot(ts, "t1", "S9", live=True))
    assert _shape(list_snapshots(ts, "t1").roots) == expect
    assert list_snapshots(ts, "t1").current == "S2"
    assert sorted(_tags(tmp_path / "t1.qcow2")) == ["S1", "S2", "S3", "S4"]

    gone = sync(delete_snapshot(ts, "t1", "S3", children=True))
    assert [s.name for s in gone] == ["S4", "S3"]
    sync(delete_snapshot(ts, "t1", "S2"))  # the current one: current moves to its parent
    tree = list_snapshots(ts, "t1")
    assert _shape(tree.roots) == [("S1", [])] and tree.current == "S1"
    assert _tags(tmp_path / "t1.qcow2") == ["S1"]


def test_disk_only_snapshots_and_a_shut_off_domain(ts: Toolstack, tmp_path: Path) -> None:
    disk = _boot(ts, tmp_path, "d1")
    write_marker(ts, "d1", "A")
    live = sync(create_snapshot(ts, "d1", "L1", disk_only=True))
    assert not sync(snapshot_info(ts, "d1", "L1")).has_memory and _tags(disk) == ["L1"]
    with pytest.raises(StateError, match="shut off"):
        sync(revert_snapshot(ts, "d1", "L1"))
    assert sync(ts.shutdown("d1")) == "shutdown"
    assert ts.get("d1").state == SHUTOFF  # kept: it has snapshots
    with pytest.raises(StateError, match="no VM state to save"):
        sync(create_snapshot(ts, "d1", "X", memory=True))
    off = sync(create_snapshot(ts, "d1", "O1"))  # qemu-img snapshot -c
    assert off.parent == live.id and _tags(disk) == ["L1", "O1"]

    sync(revert_snapshot(ts, "d1", "O1", running=True))  # starts the domain
    wait_ready(ts, "d1")
    assert read_marker(ts, "d1") == "A"
    write_marker(ts, "d1", "B")
    assert sync(ts.shutdown("d1")) == "shutdown"
    sync(revert_snapshot(ts, "d1", "O1"))  # qemu-img snapshot -a, stays shut off
    assert ts.get("d1").state == SHUTOFF
    sync(revert_snapshot(ts, "d1", "L1", running=True))
    wait_ready(ts, "d1")
    assert read_marker(ts, "d1") == "A"
    assert list_snapshots(ts, "d1").current == "L1"

    # A domain whose QEMU is gone is refused, and nothing is recorded.
    pid = ts.get("d1").pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while is_alive(ts.get("d1")) and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(StateError, match="QEMU is gone"):
        sync(create_snapshot(ts, "d1", "L2"))
    assert [s.name for s in ts.store.list_snapshots(ts.get("d1").domid)] == ["L1", "O1"]


def test_external_snapshots(ts: Toolstack, tmp_path: Path) -> None:
    disk = _boot(ts, tmp_path, "e1")
    write_marker(ts, "e1", "A")
    sync(create_snapshot(ts, "e1", "I1"))
    e1 = sync(create_snapshot(ts, "e1", "E1", external=True))
    assert e1.kind is SnapshotKind.DISK_ONLY
    ov1 = Path(f"{disk}.E1.qcow2")
    assert ov1.exists()
    write_marker(ts, "e1", "B")
    e2 = sync(create_snapshot(ts, "e1", "E2", external=True, memory=True))
    assert e2.kind is SnapshotKind.EXTERNAL and e2.memory_path
    assert Path(e2.memory_path).stat().st_size > 1 << 20
    assert sync(ts.status(ts.get("e1"))).state == "running"
    write_marker(ts, "e1", "C")
    e3 = sync(create_snapshot(ts, "e1", "E3", external=True, memory=True, live=True))
    assert sync(ts.status(ts.get("e1"))).state == "running"
    assert read_marker(ts, "e1") == "C"
    assert _shape(list_snapshots(ts, "e1").roots) == [
        ("I1", [("E1", [("E2", [("E3", [])])])])
    ]
    chain = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", f"{disk}.E3.qcow2"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert chain.count("backing file:") == 3
    with pytest.raises(StateError, match=r"no VM state.*shut off"):
        sync(revert_snapshot(ts, "e1", "E1"))  # disk-only, and the domain runs
    with pytest.raises(StateError, match="children"):
        sync(delete_snapshot(ts, "e1", "E1"))
    assert ov1.exists()

    sync(delete_snapshot(ts, "e1", "E3"))  # active commit into E2's overlay, pivot
    assert not Path(f"{disk}.E3.qcow2").exists() and e3.memory_path
    assert not Path(e3.memory_path).exists()
    sync(delete_snapshot(ts, "e1", "E1", children=True))
    assert not ov1.exists() and not Path(f"{disk}.E2.qcow2").exists()
    assert "overlays" not in ts.get("e1").extra
    assert read_marker(ts, "e1") == "C"

    # The memory file cannot be made (a directory is in the way): refused
    # before any disk switched, so nothing is kept and the guest runs on.
    mem_dir = ts.state_dir / "snapshots" / str(ts.get("e1").domid)
    (mem_dir / "F1.mem").mkdir()
    with pytest.raises(BackendError, match=r"F1\.mem.*snapshot 'F1' was not kept"):
        sync(create_snapshot(ts, "e1", "F1", external=True, memory=True))
    assert "F1" not in {s.name for s in ts.store.list_snapshots(ts.get("e1").domid)}
    assert not Path(f"{disk}.F1.qcow2").exists() and "overlays" not in ts.get("e1").extra
    assert sync(ts.status(ts.get("e1"))).state == "running"
    (mem_dir / "F1.mem").rmdir()
    write_marker(ts, "e1", "D")  # the guest writes to the base image again
    assert sync(ts.shutdown("e1")) == "shutdown"
    assert _check(disk).returncode == 0
    sync(revert_snapshot(ts, "e1", "I1"))
    assert read_marker(ts, "e1") == "A"


def test_qemu_killed_during_snapshot_save(ts: Toolstack, tmp_path: Path) -> None:
    disk = _boot(ts, tmp_path, "k1")
    write_marker(ts, "k1", "A")
    sync(create_snapshot(ts, "k1", "S1"))
    write_marker(ts, "k1", "B")
    pid = ts.get("k1").pid
    assert pid is not None
    start = disk.stat().st_size
    killed: list[float] = []

    def killer() -> None:
        # The VM state goes to the end of the image: once it grows, the job runs.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if disk.stat().st_size > start + (4 << 20):
                os.kill(pid, signal.SIGKILL)
                killed.append(time.monotonic())
                return
            time.sleep(0.001)

    th = threading.Thread(target=killer)
    th.start()
    with pytest.raises(BackendError) as err:
        sync(create_snapshot(ts, "k1", "S2"))
    th.join()
    assert killed, "the job ended before QEMU could be killed"
    msg = str(err.value)
    assert "snapshot-create k1 S2 failed" in msg and "shut off" in msg, msg
    # The store: S2 is gone, S1 is ready and current, the domain is shut off.
    assert ts.store.check() == []
    rec = ts.get("k1")
    assert rec.state == SHUTOFF
    assert [(s.name, s.state) for s in ts.store.list_snapshots(rec.domid)] == [
        ("S1", SnapshotState.READY)
    ]
    assert list_snapshots(ts, "k1").current == "S1"
    check = _check(disk)
    assert check.returncode == 0, check
    assert _tags(disk) == ["S1"]
    sync(revert_snapshot(ts, "k1", "S1"))  # starts QEMU again and loads S1
    assert sync(ts.status(ts.get("k1"))).state == "running"
    assert read_marker(ts, "k1") == "A"
