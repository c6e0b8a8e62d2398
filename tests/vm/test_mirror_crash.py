"""SIGKILL of ``xenlab vm mirror`` at each of its points; the next command finishes or undoes it.

The review's cases: killed after QMP ``job-complete`` (or after the job was
dismissed, the old nodes deleted, or just before the store write) QEMU wrote
to the target while the record still named the old file, so a marker written
afterwards was gone after destroy + create; killed mid-copy, QEMU's mirror
job and the target's node stayed, every later mirror failed ("Need a root
block node") and the target file was left behind.

Each kill is followed by ``xenlab vm list`` (:func:`converge`), then
:func:`check_truth` (the record names the file QEMU writes), QEMU is checked
to hold no job and no node but the disk's own, the target is there exactly
when the mirror was finished, a marker written after the kill survives
destroy + create, and a further mirror works.  One guest serves the module
(memory 128, one vCPU); the shut-off copy (``qemu-img convert``) is killed
at the end on the same domain.
"""

from __future__ import annotations

import os
from asyncio import run as run_async
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.guests import boot, clear, read_marker, write_marker
from tests.vm.truth import check_truth, converge, killed_at, points, xenlab
from xenlab.vm.backends.qemu.qmp import Qmp
from xenlab.vm.domain import SHUTOFF, Toolstack
from xenlab.vm.runtime import DISK_PATHS
from xenlab.vm.snapshot import snap_disks

pytestmark = pytest.mark.integration

NAME = "xmirror"

# Every point of a live mirror, in order; "recording" only when it pivots.
LIVE = ["mirror.job", "mirror.target-made", "mirror.node-added", "mirror.copying",
        "mirror.ready", "mirror.completing", "mirror.concluded", "mirror.nodes-deleted"]
# From job-complete on, QEMU pivots whatever happens to xenlab: finished.
PIVOTED = {"mirror.completing", "mirror.concluded", "mirror.nodes-deleted",
           "mirror.recording"}


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory, guest_image: object
          ) -> Iterator[tuple[Toolstack, Path]]:
    """One running guest for the module, its marker written; cleared after."""
    tmp = tmp_path_factory.mktemp("mcrash")
    ts = Toolstack(tmp / "state")
    boot(ts, tmp, NAME, maxmem=None, memory=128, vcpus=1)
    write_marker(ts, NAME, "before")
    yield ts, tmp
    clear(ts)


def _cfg(tmp: Path) -> str:
    return str(tmp / f"{NAME}.cfg")


def _disk(ts: Toolstack) -> str:
    """The file the record says the guest's disk is on now."""
    return next(d.file for d in snap_disks(ts, ts.get(NAME)) if d.vdev == "xvda")


def _running(ts: Toolstack, tmp: Path) -> None:
    if ts.get(NAME).state == SHUTOFF:
        proc = xenlab(ts, "vm", "create", _cfg(tmp), "--wait", "120")
        assert proc.returncode == 0, proc.stderr


async def _qemu_state(ts: Toolstack) -> tuple[object, set[str]]:
    async with Qmp.open(ts.paths(ts.get(NAME)).qmp) as qmp:
        jobs = await qmp.execute("query-jobs")
        nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    assert isinstance(nodes, list)
    return jobs, {os.path.realpath(n["file"]) for n in nodes if n.get("drv") != "file"}


def _parts(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.endswith(".part"))


def _survives_a_restart(ts: Toolstack, tmp: Path, marker: str) -> None:
    """A marker written now is there after destroy + create (the record names the disk)."""
    write_marker(ts, NAME, marker)
    proc = xenlab(ts, "vm", "destroy", NAME)
    assert proc.returncode == 0, proc.stderr
    proc = xenlab(ts, "vm", "create", _cfg(tmp), "--wait", "120")
    assert proc.returncode == 0, proc.stderr
    assert read_marker(ts, NAME) == marker


def _killed_live(ts: Toolstack, tmp: Path, point: str, pivot: bool) -> None:
    _running(ts, tmp)
    before = _disk(ts)
    target = tmp / f"{'p' if pivot else 'c'}-{point}.qcow2"
    args = ["vm", "mirror", NAME, "xvda", str(target)]
    if not pivot:
        args.append("--no-pivot")
    if point == "mirror.copying":
        args += ["--bandwidth", "1M"]  # the copy is still going when the next command runs
    killed_at(ts, point, *args)
    said = converge(ts)
    check_truth(ts, {NAME})
    rec = ts.get(NAME)
    assert rec.state == "running" and "job" not in rec.extra
    finished = pivot and point in PIVOTED
    assert _disk(ts) == (str(target) if finished else before), said
    assert target.exists() == finished, said
    if finished:
        assert rec.extra[DISK_PATHS]["xvda"] == {"file": str(target), "format": "qcow2"}
    if point != "mirror.job":
        assert "mirror of xvda" in said  # the next command says what it did
    jobs, files = run_async(_qemu_state(ts))
    assert jobs == [] and files == {os.path.realpath(_disk(ts))}, (jobs, files)
    assert _parts(tmp) == []
    # The review's "Need a root block node": a further mirror works.
    again = tmp / f"again-{target.name}"
    proc = xenlab(ts, "vm", "mirror", NAME, "xvda", str(again), "--no-pivot")
    assert proc.returncode == 0, proc.stderr
    again.unlink()
    _survives_a_restart(ts, tmp, f"after-{target.name}")


@pytest.mark.parametrize("point", points(
    [*LIVE, "mirror.recording"], ["mirror.copying", "mirror.completing", "mirror.recording"]))
def test_live_mirror_with_pivot_killed(guest: tuple[Toolstack, Path], point: str) -> None:
    ts, tmp = guest
    _killed_live(ts, tmp, point, pivot=True)


@pytest.mark.parametrize("point", points(LIVE, ["mirror.node-added", "mirror.completing"]))
def test_live_copy_killed(guest: tuple[Toolstack, Path], point: str) -> None:
    ts, tmp = guest
    _killed_live(ts, tmp, point, pivot=False)


@pytest.mark.parametrize("point", points(["mirror.job", "mirror.converting", "mirror.copied"],
                                         ["mirror.converting", "mirror.copied"]))
def test_shut_off_copy_killed(guest: tuple[Toolstack, Path], point: str) -> None:
    ts, tmp = guest
    _running(ts, tmp)
    marker = f"off-{point}"
    write_marker(ts, NAME, marker)
    proc = xenlab(ts, "vm", "destroy", NAME)
    assert proc.returncode == 0, proc.stderr
    # Earlier pivots keep the domain defined on its mirrored disk.
    assert ts.get(NAME).state == SHUTOFF
    before = _disk(ts)
    target = tmp / f"off-{point}.qcow2"
    killed_at(ts, point, "vm", "mirror", NAME, "xvda", str(target))
    said = converge(ts)
    check_truth(ts, {NAME})
    rec = ts.get(NAME)
    assert rec.state == SHUTOFF and "job" not in rec.extra
    finished = point == "mirror.copied"
    assert _disk(ts) == (str(target) if finished else before), said
    assert target.exists() == finished and _parts(tmp) == [], said
    assert "mirror of xvda" in said
    # No qemu-img outlived the killed command, holding the disk's lock.
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert f".{target.name}.".encode() not in argv, argv
    proc = xenlab(ts, "vm", "create", _cfg(tmp), "--wait", "120")
    assert proc.returncode == 0, proc.stderr
    assert read_marker(ts, NAME) == marker
