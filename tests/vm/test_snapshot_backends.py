"""vm.snapshot backends: the backend table, raw copies, and reverting external snapshots.

The first tests need no guest: a shut-off domain is a store record, and
``qemu-io`` writes and reads patterns in its images.  The last ones boot
real guests under TCG.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.aio import sync
from tests.vm.guests import boot, offline_domain, read_marker, uptime, write_marker
from xenlab.errors import StateError, XenlabError
from xenlab.vm.backends.qemu.qmp import Qmp
from xenlab.vm.domain import SHUTOFF, Toolstack
from xenlab.vm.snapshot import (
    BACKENDS,
    PATH_KINDS,
    SnapDisk,
    backend_for,
    create_snapshot,
    delete_snapshot,
    list_snapshots,
    register_backend,
    revert_snapshot,
    snapshot_info,
)
from xenlab.vm.store import SnapshotKind


def _img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True,
                          check=True).stdout


def _write(disk: Path, fmt: str, byte: int) -> None:
    subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -P {byte} 0 64k", str(disk)],
                   capture_output=True, check=True)


def _holds(disk: Path, fmt: str, byte: int) -> bool:
    proc = subprocess.run(["qemu-io", "-f", fmt, "-c", f"read -P {byte} 0 64k", str(disk)],
                          capture_output=True, text=True, check=True)
    return "Pattern verification failed" not in proc.stdout


def test_the_table_picks_a_backend_by_what_the_disk_is(tmp_path: Path) -> None:
    def disk(fmt: str, kind: str = "file") -> SnapDisk:
        return SnapDisk("xvda", str(tmp_path / "d"), fmt, "xvda-fmt", str(tmp_path / "d"), kind)

    assert [backend_for(disk(f), s).name for f, s in [  # type: ignore[union-attr]
        ("qcow2", "internal"), ("raw", "internal"), ("raw", "external"),
        ("qcow2", "external"),
    ]] == ["qcow2-internal", "raw-copy", "qcow2-external", "qcow2-external"]
    assert backend_for(disk("qcow2", "block"), "internal").name == "qcow2-internal"  # type: ignore[union-attr]
    assert backend_for(disk("raw", "block"), "internal") is None
    raw = backend_for(disk("raw"), "internal")
    assert raw is not None and "shut off" in str(raw.can_snapshot(disk("raw"), live=True))
    assert raw.can_snapshot(disk("raw"), live=False) is None
    with pytest.raises(ValueError):
        register_backend("sideways", "raw", "file", raw)


class _Tagged:
    """A toy backend for a made-up path kind: it records calls and keeps tags in a set."""

    name = "toy"
    layered = False

    def __init__(self) -> None:
        self.tags: set[str] = set()
        self.calls: list[str] = []

    def can_snapshot(self, disk: SnapDisk, *, live: bool) -> str | None:
        return None

    def plan(self, disk: SnapDisk, tag: str) -> dict[str, Any]:
        return {"vdev": disk.vdev, "file": disk.file, "format": disk.format, "node": disk.node}

    def action(self, entry: Mapping[str, Any], tag: str, node: str) -> dict[str, Any] | None:
        return None

    async def create(self, entry: Mapping[str, Any], tag: str, qmp: Qmp | None) -> None:
        self.calls.append(f"create {tag}")
        self.tags.add(tag)

    async def revert(self, entry: Mapping[str, Any], tag: str) -> dict[str, str] | None:
        self.calls.append(f"revert {tag}")
        return None

    async def delete(self, entry: Mapping[str, Any], tag: str, qmp: Qmp | None,
                     top: str) -> str | None:
        self.calls.append(f"delete {tag}")
        self.tags.discard(tag)
        return None

    async def discard(self, entry: Mapping[str, Any], tag: str, qmp: Qmp | None) -> None:
        self.tags.discard(tag)

    def list(self, disk: SnapDisk) -> set[str]:
        return set(self.tags)


def test_a_registered_backend_serves_the_unchanged_verbs(tmp_path: Path) -> None:
    ts, disk = offline_domain(tmp_path, "raw")
    toy = _Tagged()

    def probe(path: str) -> str | None:
        return "toy-kind" if path == str(disk) else None

    PATH_KINDS.insert(0, probe)
    register_backend("internal", "raw", "toy-kind", toy)
    try:
        s = sync(create_snapshot(ts, "off", "T1"))
        assert s.kind is SnapshotKind.DISK_ONLY and s.disks[0]["backend"] == "toy"
        sync(revert_snapshot(ts, "off", "T1"))
        sync(delete_snapshot(ts, "off", "T1"))
        assert toy.calls == ["create T1", "revert T1", "delete T1"] and toy.tags == set()
    finally:
        PATH_KINDS.remove(probe)
        del BACKENDS[("internal", "raw", "toy-kind")]


def test_raw_copies_of_a_shut_off_domain(tmp_path: Path) -> None:
    ts, disk = offline_domain(tmp_path, "raw")
    _write(disk, "raw", 0xA)
    r1 = sync(create_snapshot(ts, "off", "R1", description="raw"))
    copy = Path(f"{disk}@R1")
    assert r1.kind is SnapshotKind.DISK_ONLY and copy.is_file()
    assert not sync(snapshot_info(ts, "off", "R1")).has_memory
    _write(disk, "raw", 0xB)
    sync(create_snapshot(ts, "off", "R2"))
    assert _holds(disk, "raw", 0xB)
    sync(revert_snapshot(ts, "off", "R1"))
    assert _holds(disk, "raw", 0xA) and list_snapshots(ts, "off").current == "R1"
    sync(revert_snapshot(ts, "off", "R2"))
    assert _holds(disk, "raw", 0xB)
    with pytest.raises(XenlabError, match="exists already"):
        copy2 = Path(f"{disk}@R3")
        copy2.write_bytes(b"x")
        sync(create_snapshot(ts, "off", "R3"))
    assert [s.name for s in ts.store.list_snapshots(ts.get("off").domid)] == ["R1", "R2"]
    sync(delete_snapshot(ts, "off", "R1", children=True))
    assert not copy.exists() and not Path(f"{disk}@R2").exists()
    with pytest.raises(XenlabError, match="--memory"):
        sync(create_snapshot(ts, "off", "M", memory=True))


def test_external_revert_of_a_shut_off_domain_prunes_what_nothing_needs(
    tmp_path: Path,
) -> None:
    ts, disk = offline_domain(tmp_path, "qcow2")
    _write(disk, "qcow2", 0xA)
    sync(create_snapshot(ts, "off", "E1", external=True))
    ov1 = Path(f"{disk}.E1.qcow2")
    _write(ov1, "qcow2", 0xB)
    sync(create_snapshot(ts, "off", "E2", external=True))  # freezes ov1
    ov2 = Path(f"{disk}.E2.qcow2")
    _write(ov2, "qcow2", 0xC)

    sync(revert_snapshot(ts, "off", "E1"))
    top = Path(ts.get("off").extra["overlays"]["xvda"]["file"])
    assert top == Path(f"{disk}.E1~1.qcow2") and _holds(top, "qcow2", 0xA)
    assert list_snapshots(ts, "off").current == "E1"
    # E2 still needs ov1 (its frozen image); the abandoned top ov2 is gone.
    assert ov1.exists() and not ov2.exists()
    sync(revert_snapshot(ts, "off", "E2"))
    top = Path(ts.get("off").extra["overlays"]["xvda"]["file"])
    assert _holds(top, "qcow2", 0xB) and not Path(f"{disk}.E1~1.qcow2").exists()

    _write(top, "qcow2", 0xD)
    sync(delete_snapshot(ts, "off", "E2"))  # the top merges into ov1, which is the top now
    assert ts.get("off").extra["overlays"]["xvda"]["file"] == str(ov1)
    assert _holds(ov1, "qcow2", 0xD) and not top.exists()
    sync(delete_snapshot(ts, "off", "E1"))
    assert "overlays" not in ts.get("off").extra and not ov1.exists()
    assert _holds(disk, "qcow2", 0xD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["off.qcow2", "state"]
    assert subprocess.run(["qemu-img", "check", str(disk)], capture_output=True).returncode == 0


# --- links planted next to a disk --------------------------------------------------------


@pytest.fixture
def shared() -> Iterator[Path]:
    """A sticky, world-writable directory (as /tmp) that user nobody can reach."""
    where = Path(tempfile.mkdtemp(prefix="xenlab-shared-", dir="/tmp"))
    where.chmod(0o1777)
    try:
        yield where
    finally:
        shutil.rmtree(where)


def _plant(link: Path, to: Path) -> None:
    """``ln -s to link``: as user nobody when this runs as root, else as ourselves."""
    if os.geteuid() == 0 and shutil.which("runuser"):
        subprocess.run(["runuser", "-u", "nobody", "--", "ln", "-s", str(to), str(link)],
                       check=True)
        assert link.lstat().st_uid != 0
    else:
        link.symlink_to(to)


def _canary(tmp_path: Path) -> Path:
    canary = tmp_path / "canary"
    canary.write_text("root secret canary")
    canary.chmod(0o600)
    return canary


def test_raw_copies_write_nothing_through_planted_links(shared: Path, tmp_path: Path) -> None:
    """The review's case: a link at the old temporary name ``<disk>@<tag>.tmp`` made a copy
    overwrite a root-owned 0600 file with the disk's bytes and make it 0644."""
    canary = _canary(tmp_path)
    ts, disk = offline_domain(shared, "raw", state=tmp_path / "state")
    _write(disk, "raw", 0xA)
    disk.chmod(0o644)
    _plant(Path(f"{disk}@R1.tmp"), canary)
    sync(create_snapshot(ts, "off", "R1"))
    assert canary.read_text() == "root secret canary"
    assert stat.S_IMODE(canary.stat().st_mode) == 0o600
    copy = Path(f"{disk}@R1")
    assert not copy.is_symlink() and stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert _holds(copy, "raw", 0xA)
    # A link where the copy itself goes (dangling, or to the canary): refused, not followed.
    for tag, to in (("R2", tmp_path / "made-by-root"), ("R3", canary)):
        _plant(Path(f"{disk}@{tag}"), to)
        with pytest.raises(XenlabError, match="exists already"):
            sync(create_snapshot(ts, "off", tag))
    assert not (tmp_path / "made-by-root").exists()
    assert canary.read_text() == "root secret canary"
    # A revert writes the disk from the copy, through no planted name either.
    _plant(Path(f"{disk}.tmp"), canary)
    _write(disk, "raw", 0xB)
    sync(revert_snapshot(ts, "off", "R1"))
    assert _holds(disk, "raw", 0xA) and canary.read_text() == "root secret canary"
    assert stat.S_IMODE(disk.stat().st_mode) == 0o644  # the user's disk keeps its mode
    assert not [p.name for p in shared.iterdir() if p.name.endswith(".part")]


def test_overlays_are_never_made_through_planted_links(shared: Path, tmp_path: Path) -> None:
    """The review's case: an external snapshot's overlay and a revert overlay were created
    through dangling links, so the domain's top image was another user's link."""
    ts, disk = offline_domain(shared, "qcow2", state=tmp_path / "state")
    made = tmp_path / "created-by-root"
    _plant(Path(f"{disk}.E1.qcow2"), made)
    with pytest.raises(XenlabError, match="exists already"):
        sync(create_snapshot(ts, "off", "E1", external=True))
    assert not made.exists() and list_snapshots(ts, "off").roots == ()
    sync(create_snapshot(ts, "off", "E2", external=True))
    made2 = tmp_path / "created-by-root2"
    _plant(Path(f"{disk}.E2~1.qcow2"), made2)
    sync(revert_snapshot(ts, "off", "E2"))
    top = Path(ts.get("off").extra["overlays"]["xvda"]["file"])
    # The planted name is skipped: the new top is the next free name, a file of ours.
    assert top == Path(f"{disk}.E2~2.qcow2") and not made2.exists()
    assert not top.is_symlink() and top.lstat().st_uid == os.geteuid()
    assert stat.S_IMODE(top.stat().st_mode) == 0o600
    assert Path(f"{disk}.E2~1.qcow2").is_symlink()  # another user's link is left alone


# --- real guests ---------------------------------------------------------------------------


@pytest.mark.integration
def test_raw_disk_of_a_real_guest(ts: Toolstack, tmp_path: Path) -> None:
    cfg = boot(ts, tmp_path, "r", fmt="raw", maxmem=None)
    write_marker(ts, "r", "A")
    with pytest.raises(XenlabError, match="raw copies need the domain shut off"):
        sync(create_snapshot(ts, "r", "R1"))
    # A domain without snapshots is forgotten when it shuts down (as with
    # xl): an external snapshot keeps it defined, and deleting it while shut
    # off commits the overlay back into the raw file.
    sync(create_snapshot(ts, "r", "X1", external=True, disk_only=True))
    assert sync(ts.shutdown("r")) == "shutdown"
    sync(delete_snapshot(ts, "r", "X1"))
    assert ts.get("r").state == SHUTOFF and "overlays" not in ts.get("r").extra
    sync(create_snapshot(ts, "r", "R1"))
    sync(ts.create(cfg))
    sync(ts.wait_ready("r"))
    write_marker(ts, "r", "B")
    assert sync(ts.shutdown("r")) == "shutdown"
    sync(revert_snapshot(ts, "r", "R1", running=True))
    sync(ts.wait_ready("r"))
    assert read_marker(ts, "r") == "A"


@pytest.mark.integration
def test_external_snapshots_revert_with_and_without_memory(ts: Toolstack, tmp_path: Path) -> None:
    boot(ts, tmp_path, "x", fmt="qcow2", maxmem=None)
    disk = tmp_path / "x.qcow2"
    times: dict[str, float] = {}
    write_marker(ts, "x", "A")
    t = time.monotonic()
    sync(create_snapshot(ts, "x", "E1", external=True, memory=True))
    times["create E1 (memory)"] = time.monotonic() - t
    # QEMU made the live overlay in the file xenlab claimed: 0600, not QEMU's 0640.
    assert stat.S_IMODE(Path(f"{disk}.E1.qcow2").stat().st_mode) == 0o600
    at_e1 = uptime(ts, "x")
    write_marker(ts, "x", "B")
    sync(create_snapshot(ts, "x", "E2", external=True))  # disk-only, holds B
    write_marker(ts, "x", "C")
    time.sleep(1.5)
    before = uptime(ts, "x")

    t = time.monotonic()
    sync(revert_snapshot(ts, "x", "E1"))  # live: QEMU restarts on a new overlay, memory loaded
    times["revert E1 (memory)"] = time.monotonic() - t
    assert sync(ts.status(ts.get("x"))).state == "running"
    assert read_marker(ts, "x") == "A"
    after = uptime(ts, "x")
    assert at_e1 - 1.0 <= after < before - 1.0, (at_e1, before, after)
    assert list_snapshots(ts, "x").current == "E1"
    # E2's frozen image (E1's overlay) stays; the abandoned top (E2's overlay) is gone.
    assert Path(f"{disk}.E1.qcow2").exists() and not Path(f"{disk}.E2.qcow2").exists()

    with pytest.raises(StateError, match="no VM state"):
        sync(revert_snapshot(ts, "x", "E2"))
    assert sync(ts.shutdown("x")) == "shutdown"
    t = time.monotonic()
    sync(revert_snapshot(ts, "x", "E2", running=True))
    times["revert E2 (disk-only, boots)"] = time.monotonic() - t
    sync(ts.wait_ready("x"))
    assert read_marker(ts, "x") == "B"
    write_marker(ts, "x", "D")
    t = time.monotonic()
    sync(delete_snapshot(ts, "x", "E2"))  # live commit of the top into E1's overlay
    times["delete E2 (commit)"] = time.monotonic() - t
    assert ts.get("x").extra["overlays"]["xvda"]["file"] == f"{disk}.E1.qcow2"
    sync(revert_snapshot(ts, "x", "E1"))
    assert read_marker(ts, "x") == "A"
    sync(delete_snapshot(ts, "x", "E1"))
    assert "overlays" not in ts.get("x").extra
    assert read_marker(ts, "x") == "A"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state", "x.cfg", "x.qcow2"]
    assert sync(ts.shutdown("x")) == "shutdown"
    assert subprocess.run(["qemu-img", "check", str(disk)], capture_output=True).returncode == 0
    print("external snapshot times (s):", {k: round(v, 2) for k, v in times.items()})
