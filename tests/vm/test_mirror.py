"""vm.mirror: disk mirroring of running guests (TCG), pivot and copy, refusals, QEMU killed."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.aio import sync
from tests.vm.guests import boot, sh, tmpfs, wait_ready, write_config
from xenlab.errors import BackendError, StateError, XenlabError
from xenlab.vm import mirror as mirror_mod
from xenlab.vm import snapshot
from xenlab.vm.backends.qemu.qemu import Accel
from xenlab.vm.domain import SHUTOFF, Toolstack
from xenlab.vm.migration import sender as mig
from xenlab.vm.mirror import MirrorProgress, mirror
from xenlab.vm.runtime import DISK_NODES, DISK_PATHS
from xenlab.vm.store import DomainRecord, is_alive

pytestmark = pytest.mark.integration

def _boot(ts: Toolstack, tmp_path: Path, overrides: tuple[str, ...] = ()) -> Path:
    return boot(ts, tmp_path, "g1", overrides=overrides, timeout=90, maxmem=None)


def _ready(ts: Toolstack) -> None:
    wait_ready(ts, "g1", 90)


def _sh(ts: Toolstack, script: str) -> str:
    return sh(ts, "g1", script)


def _compare(a: Path, b: Path) -> int:
    # -U: a running QEMU holds the image lock; the guest is paused while we compare.
    return subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)],
                          capture_output=True, check=False).returncode


def _raw_bytes(image: Path, tmp_path: Path) -> bytes:
    """The guest-visible bytes of ``image``: where a marker file's text can be found."""
    out = tmp_path / f"{image.name}.{uuid.uuid4().hex}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(out)], check=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def test_mirror_pivots_the_guest_onto_the_target(ts: Toolstack, tmp_path: Path) -> None:
    cfg = _boot(ts, tmp_path)
    source = tmp_path / "g1.qcow2"
    _sh(ts, "echo A > /mnt/disk/marker && dd if=/dev/urandom of=/mnt/disk/blob bs=64k "
            "count=64 2>/dev/null && sync")
    target = tmp_path / "moved.qcow2"
    seen: list[MirrorProgress] = []
    res = sync(mirror(ts, "g1", "xvda", target, progress=seen.append))
    assert res.pivoted and res.source == str(source) and res.target == str(target)
    assert seen and seen[-1].ready and seen[-1].done == seen[-1].total == res.bytes > 0
    assert res.record.extra[DISK_PATHS] == {"xvda": {"file": str(target), "format": "qcow2"}}
    assert res.record.extra[DISK_NODES] == {"xvda": "xvda--mirror1"}
    assert ts.get("g1") == res.record
    # QEMU has let go of the old file: no -U needed, no lock held on it.
    subprocess.run(["qemu-img", "check", str(source)], check=True, capture_output=True)
    sync(ts.pause("g1"))
    assert _compare(source, target) == 0
    sync(ts.unpause("g1"))
    # Marker C written after the pivot lands in the target only.
    marker = f"MARKER-C-{uuid.uuid4().hex}"
    _sh(ts, f"echo {marker} > /mnt/disk/c && sync && echo 3 > /proc/sys/vm/drop_caches")
    assert marker.encode() in _raw_bytes(target, tmp_path)
    assert marker.encode() not in _raw_bytes(source, tmp_path)
    assert _compare(source, target) == 1
    # A save says where the disk is now (restore runs on it: tests/vm/test_migrate.py).
    header = sync(mig.save(ts, "g1", tmp_path / "g1.save", keep_running=True))
    assert header.disk_paths == (mig.DiskMove("xvda", str(target), "qcow2"),)
    (tmp_path / "g1.save").unlink()
    # A second mirror goes from where the disk is now (the first target). The guest is
    # paused for it: any write after the pivot (a journal commit) would land in the new
    # copy only, and the comparison below is of the bytes at the pivot.
    _sh(ts, "sync")
    sync(ts.pause("g1"))
    again = sync(mirror(ts, "g1", "xvda", tmp_path / "again.raw", format="raw"))
    assert again.source == str(target) and again.pivoted
    assert again.record.extra[DISK_NODES] == {"xvda": "xvda--mirror2"}
    assert _compare(target, tmp_path / "again.raw") == 0
    # The guest restarted on the mirror's copy finds everything, marker C too.
    sync(ts.destroy("g1"))
    sync(ts.create(cfg, ['disk = [ "format=raw,vdev=xvda,access=rw,target='
                    f'{tmp_path / "again.raw"}" ]']))
    _ready(ts)
    assert _sh(ts, "cat /mnt/disk/c /mnt/disk/marker") == f"{marker}\nA\n"
    print(f"mirror 32 MiB: {res.seconds:.2f}s (second, to raw: {again.seconds:.2f}s)")


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_mirror_copy_without_pivot_and_refusals(ts: Toolstack, tmp_path: Path,
                                                 umask_022: None) -> None:
    _boot(ts, tmp_path)
    source = tmp_path / "g1.qcow2"
    source.chmod(0o600)
    _sh(ts, "echo A > /mnt/disk/marker && sync")
    sync(ts.pause("g1"))
    rec = ts.get("g1")
    copy = tmp_path / "copy.raw"
    res = sync(mirror(ts, "g1", "xvda", copy, format="raw", pivot=False))
    assert not res.pivoted and res.record == rec  # the record did not change
    assert _compare(source, copy) == 0
    # The guest's data is not for other users, whatever the umask (the review: 0644).
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    nodes = asyncio.run(ts.qmp_execute(rec, "query-named-block-nodes", {"flat": True}))
    assert isinstance(nodes, list)
    assert sorted(n["node-name"] for n in nodes) == ["xvda-file", "xvda-fmt"]
    assert asyncio.run(ts.qmp_execute(rec, "query-block-jobs")) == []
    sync(ts.unpause("g1"))
    _sh(ts, "echo D > /mnt/disk/d && sync && echo 3 > /proc/sys/vm/drop_caches")
    assert _compare(source, copy) == 1  # the guest still writes to its own disk

    # Bad input: a clear error and nothing changes.
    with pytest.raises(XenlabError, match=r"has no disk 'xvdz' \(its disks: xvda\)"):
        sync(mirror(ts, "g1", "xvdz", tmp_path / "z.qcow2"))
    before = copy.read_bytes()
    with pytest.raises(XenlabError, match="exists; give a new file name"):
        sync(mirror(ts, "g1", "xvda", copy))
    assert copy.read_bytes() == before
    with pytest.raises(XenlabError, match="target format 'vmdk'"):
        sync(mirror(ts, "g1", "xvda", tmp_path / "x.vmdk", format="vmdk"))
    with pytest.raises(XenlabError, match="cannot create it"):
        sync(mirror(ts, "g1", "xvda", tmp_path / "no-such-dir" / "x.qcow2"))
    with pytest.raises(XenlabError, match="no domain"):
        sync(mirror(ts, "nope", "xvda", tmp_path / "x.qcow2"))
    sync(snapshot.create_snapshot(ts, "g1", "s1", disk_only=True))
    with pytest.raises(StateError, match=r"1 snapshot.*--no-pivot"):
        sync(mirror(ts, "g1", "xvda", tmp_path / "x.qcow2"))
    # A failure inside QEMU (out of time) cancels the job and removes the target.
    with pytest.raises(BackendError, match=r"not ready within .*still runs on .*was removed"):
        sync(mirror(ts, "g1", "xvda", tmp_path / "slow.qcow2", pivot=False, bandwidth=64 << 10,
               timeout=0.5))
    assert not (tmp_path / "slow.qcow2").exists()
    assert asyncio.run(ts.qmp_execute(rec, "query-block-jobs")) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".qcow2", ".raw")) == [
        "copy.raw", "g1.qcow2"]
    assert ts.get("g1").extra.get(DISK_PATHS) is None
    assert _sh(ts, "cat /mnt/disk/marker") == "A\n"
    sync(ts.destroy("g1"))
    # Shut off (kept for its snapshot): a pivot would still leave the snapshot behind.
    with pytest.raises(StateError, match=r"1 snapshot.*--no-pivot"):
        sync(mirror(ts, "g1", "xvda", tmp_path / "x.qcow2"))
    assert not (tmp_path / "x.qcow2").exists()


def test_qemu_killed_mid_mirror(ts: Toolstack, tmp_path: Path) -> None:
    cfg = _boot(ts, tmp_path)
    source = tmp_path / "g1.qcow2"
    _sh(ts, "echo A > /mnt/disk/marker && dd if=/dev/urandom of=/mnt/disk/blob bs=64k "
            "count=128 2>/dev/null && sync")
    rec = ts.get("g1")
    target = tmp_path / "target.qcow2"
    killed: list[MirrorProgress] = []

    def kill(p: MirrorProgress) -> None:
        if p.done > 0 and not killed:
            assert rec.pid is not None
            os.kill(rec.pid, signal.SIGKILL)
            killed.append(p)

    t0 = time.monotonic()
    with pytest.raises(BackendError) as e:
        # 2 MiB/s over 8 MiB of data: the kill lands in the middle.
        sync(mirror(ts, "g1", "xvda", target, bandwidth=2 << 20, progress=kill))
    took = time.monotonic() - t0
    msg = str(e.value)
    assert killed and killed[0].done < killed[0].total
    assert "QEMU exited during the mirror" in msg
    assert f"the unfinished {target} was removed" in msg
    assert f"the source {source} passes qemu-img check" in msg
    assert "g1 is gone from the store" in msg
    assert not target.exists() and not is_alive(rec)
    assert ts.store.list() == []  # no half-recorded pivot, no stale record
    subprocess.run(["qemu-img", "check", str(source)], check=True, capture_output=True)
    # The domain boots again on its own disk with its data.
    sync(ts.create(cfg))
    _ready(ts)
    assert _sh(ts, "cat /mnt/disk/marker; wc -c < /mnt/disk/blob") == "A\n8388608\n"
    print(f"killed mirror reported in {took:.2f}s")


def test_mirror_of_a_shut_off_domain(ts: Toolstack, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "g1", maxmem=None)
    source = tmp_path / "g1.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(source), "32M"], check=True)
    sync(ts.define(cfg))
    sync(ts.create(cfg))
    _ready(ts)
    _sh(ts, "echo A > /mnt/disk/marker && dd if=/dev/urandom of=/mnt/disk/blob bs=64k "
            "count=64 2>/dev/null && sync")
    assert sync(ts.shutdown("g1")) == "shutdown"
    kept = ts.get("g1")
    assert kept.state == SHUTOFF

    # Failures leave the old path in force and no file behind.
    with tmpfs(tmp_path / "small", "1M") as small:
        with pytest.raises(BackendError, match=r"qemu-img convert .*No space left.*g1 stays on"):
            sync(mirror(ts, "g1", "xvda", small / "full.qcow2"))
        assert list(small.iterdir()) == []
        subprocess.run(["mount", "-o", "remount,ro", str(small)], check=True)
        with pytest.raises(XenlabError, match="cannot create it: Read-only file system"):
            sync(mirror(ts, "g1", "xvda", small / "ro.qcow2"))
    assert ts.get("g1") == kept and ts.get("g1").extra.get(DISK_PATHS) is None

    target = tmp_path / "offline.raw"
    seen: list[MirrorProgress] = []
    res = sync(mirror(ts, "g1", "xvda", target, format="raw", progress=seen.append))
    assert res.pivoted and res.source == str(source) and res.record.state == SHUTOFF
    assert res.record.extra[DISK_PATHS] == {"xvda": {"file": str(target), "format": "raw"}}
    assert DISK_NODES not in res.record.extra
    assert seen and seen[-1].done == seen[-1].total == 32 << 20
    assert sorted(p.name for p in tmp_path.iterdir() if ".part" in p.name) == []
    assert _compare(source, target) == 0
    # create boots on the target: the guest's writes go there, not to the old file.
    sync(ts.create(cfg))
    _ready(ts)
    blocks = asyncio.run(ts.qmp_execute(ts.get("g1"), "query-block"))
    assert isinstance(blocks, list)
    assert [b["inserted"]["file"] for b in blocks if b.get("inserted")] == [str(target)]
    marker = f"MARKER-E-{uuid.uuid4().hex}"
    assert _sh(ts, f"cat /mnt/disk/marker; echo {marker} > /mnt/disk/e && sync && "
                   "echo 3 > /proc/sys/vm/drop_caches") == "A\n"
    assert marker.encode() in _raw_bytes(target, tmp_path)
    assert marker.encode() not in _raw_bytes(source, tmp_path)


def _defined(tmp_path: Path, fmt: str) -> Toolstack:
    """A toolstack holding domain g1, defined (shut off) on the disk ``g1.<fmt>``."""
    ts = Toolstack(tmp_path / "state", accel=Accel.TCG)
    sync(ts.define(write_config(tmp_path, "g1", fmt=fmt, maxmem=None)))
    return ts


def test_offline_mirror_reads_a_raw_disk_as_raw(tmp_path: Path) -> None:
    """A guest owns every byte of its raw disk: a qcow2 header it writes there, naming a
    host file as backing file, must not make the copy read that file."""
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"HOST-SECRET!" * (1 << 16))
    evil = tmp_path / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw",
                    str(evil), "1M"], check=True)
    data = evil.read_bytes().ljust(2 << 20, b"\0")
    disk = tmp_path / "g1.raw"
    disk.write_bytes(data)
    ts = _defined(tmp_path, "raw")
    target = tmp_path / "copy.raw"
    res = sync(mirror(ts, "g1", "xvda", target, format="raw"))
    assert res.bytes == len(data)
    copied = target.read_bytes()
    assert b"HOST-SECRET!" not in copied
    assert copied == data
    # The check after a killed mirror reads it as raw too (qemu-img check -r
    # would otherwise "repair" a qcow2 the guest made up, inside its disk).
    assert sync(mirror_mod._check_source(str(disk), "raw")) == (
        f"the source {disk} is unchanged (a mirror only reads it)")
    assert disk.read_bytes() == data


def test_offline_mirror_is_durable_before_it_is_recorded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy is fsynced, linked to its name, and the directory fsynced, before the
    record names the target: after a power cut it cannot name a partial file."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "g1.qcow2"),
                    "4M"], check=True)
    ts = _defined(tmp_path, "qcow2")
    target = tmp_path / "copy.qcow2"
    events: list[str] = []
    fsync, link, patch = os.fsync, os.link, ts.store.patch

    def logged_fsync(fd: int) -> None:
        events.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}")
        fsync(fd)

    def logged_link(a: Any, b: Any, **kw: Any) -> None:
        events.append(f"link {b}")
        link(a, b, **kw)

    def logged_patch(domid: int, **kw: Any) -> DomainRecord:
        events.append("record" if DISK_PATHS in kw.get("extra_set", {}) else "job")
        return patch(domid, **kw)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "link", logged_link)
    monkeypatch.setattr(ts.store, "patch", logged_patch)
    sync(mirror(ts, "g1", "xvda", target))
    at = events.index(f"link {target.name}")
    # The job is recorded before anything is made, the copy is on disk before its link...
    assert events[0] == "job"
    assert events[at - 1].startswith(f"fsync {tmp_path}/.copy.qcow2.")
    assert events[at - 1].endswith(".part")
    # ...and the link before the record.
    assert events[at + 1:] == [f"fsync {tmp_path}", "record", "job"]
    assert ts.get("g1").extra[DISK_PATHS] == {"xvda": {"file": str(target), "format": "qcow2"}}
    assert "job" not in ts.get("g1").extra
