"""The review's toolstack defects, each on a real guest: names with commas, private files,
relative paths, QEMU's own refusal, a paused guest's exec, a full state directory."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.aio import sync
from tests.vm.guests import boot, config_text, read_marker, tmpfs, write_marker
from tests.vm.truth import check_truth, converge, qemus_named, xenlab
from xenlab.errors import BackendError, StateError
from xenlab.vm import qemuimg
from xenlab.vm.domain import Toolstack
from xenlab.vm.store import SnapshotState

pytestmark = pytest.mark.integration


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_a_name_with_a_comma_lives_and_dies(ts: Toolstack, tmp_path: Path) -> None:
    """name="web,prod" was stale at once: every verb refused it, destroy left QEMU running."""
    boot(ts, tmp_path, "web,prod", stem="web", memory=128, maxmem=None, vcpus=1)
    [status] = [s for s in sync(ts.list()) if s.record.name == "web,prod"]
    assert status.state == "running"
    pid = ts.get("web,prod").pid
    assert qemus_named({"web,prod"}) == [pid]
    sync(ts.pause("web,prod"))
    sync(ts.unpause("web,prod"))
    proc = xenlab(ts, "vm", "snapshot-create", "web,prod", "s1")
    assert proc.returncode == 0, proc.stderr
    sync(ts.destroy("web,prod"))
    assert not Path(f"/proc/{pid}").exists() or \
        Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    assert ts.get("web,prod").state == "shutoff"  # kept for its snapshot


def test_guest_memory_and_run_files_are_private(ts: Toolstack, tmp_path: Path) -> None:
    """Snapshot memory files were written under umask 022: guest RAM readable by all."""
    old = os.umask(0o022)
    try:
        boot(ts, tmp_path, "priv", memory=128, maxmem=None, vcpus=1)
        proc = xenlab(ts, "vm", "snapshot-create", "priv", "m1", "--external", "--memory")
        assert proc.returncode == 0, proc.stderr
    finally:
        os.umask(old)
    rec = ts.get("priv")
    [snap] = ts.store.list_snapshots(rec.domid)
    assert snap.memory_path is not None
    assert mode(Path(snap.memory_path)) == 0o600
    assert mode(Path(snap.memory_path).parent) == 0o700
    rundir = Path(rec.rundir)
    assert mode(rundir) == 0o700
    for f in rundir.iterdir():
        # QEMU daemonizes with umask 027; the 0700 directory keeps its group out.
        assert mode(f) & 0o007 == 0, (f, oct(mode(f)))
    assert mode(ts.state_dir) == 0o700 and mode(ts.state_dir / "xenlab.db") == 0o600


def test_relative_disk_paths_stay_beside_the_config(ts: Toolstack, tmp_path: Path) -> None:
    """A snapshot made from another directory landed in that directory."""
    home = tmp_path / "guests"
    home.mkdir()
    (home / "rel.cfg").write_text(config_text("rel", "rel.qcow2", memory=128, maxmem=None,
                                              vcpus=1))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = dict(cwd=home, capture_output=True, text=True, check=False,
               env=dict(os.environ, XENLAB_STATE_DIR=str(ts.state_dir)))
    from tests.vm.truth import XENLAB

    proc = subprocess.run([XENLAB, "vm", "create", "rel.cfg", "--create-disks", "32M",
                           "--wait", "120"], **run)  # type: ignore[call-overload]
    assert proc.returncode == 0, proc.stderr
    run["cwd"] = elsewhere
    proc = subprocess.run([XENLAB, "vm", "snapshot-create", "rel", "s1", "--external"],
                          **run)  # type: ignore[call-overload]
    assert proc.returncode == 0, proc.stderr
    assert (home / "rel.qcow2.s1.qcow2").is_file()
    assert list(elsewhere.iterdir()) == []
    check_truth(ts, {"rel"})


def test_qemus_own_refusal_is_quoted(ts: Toolstack, tmp_path: Path) -> None:
    """The reason went to the -D log, which cleanup deleted: only "exit 1" was printed."""
    cfg = tmp_path / "bad.cfg"
    (tmp_path / "adir").mkdir()
    cfg.write_text('name = "bad"\ntype = "hvm"\nmemory = 64\n'
                   f'disk = [ "format=raw,vdev=xvda,access=rw,target={tmp_path / "adir"}" ]\n')
    with pytest.raises(BackendError) as e:
        sync(ts.create(cfg))
    assert "QEMU refused the domain" in str(e.value)
    assert "directory" in str(e.value).lower(), str(e.value)  # QEMU's own words
    assert ts.store.list() == []
    # A disk another QEMU holds: QEMU's lock message.
    boot(ts, tmp_path, "holder", memory=128, maxmem=None, vcpus=1)
    held = tmp_path / "holder.qcow2"
    cfg.write_text(f'name = "thief"\ntype = "hvm"\nmemory = 64\n'
                   f'disk = [ "format=qcow2,vdev=xvda,access=rw,target={held}" ]\n')
    with pytest.raises(BackendError, match="lock"):
        sync(ts.create(cfg))


def test_exec_on_a_paused_guest_says_so(ts: Toolstack, tmp_path: Path) -> None:
    boot(ts, tmp_path, "sleepy", memory=128, maxmem=None, vcpus=1)
    sync(ts.pause("sleepy"))
    with pytest.raises(StateError, match="is paused: its guest agent cannot answer"):
        sync(ts.exec("sleepy", ["true"], timeout=5))
    sync(ts.unpause("sleepy"))
    assert sync(ts.exec("sleepy", ["true"]))[0] == 0


def test_a_full_state_directory(tmp_path: Path, guest_image: object) -> None:
    """Every verb ended in a sqlite3 traceback; snapshot-create left rows behind."""
    with tmpfs(tmp_path / "small", "2M") as small:
        ts = Toolstack(small / "state")
        try:
            boot(ts, tmp_path, "full", memory=128, maxmem=None, vcpus=1)
            write_marker(ts, "full", "kept")
            fd = os.open(small / "fill", os.O_WRONLY | os.O_CREAT)
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * 4096)
            os.close(fd)
            for args in (("vm", "snapshot-create", "full", "s1"), ("vm", "list"),
                         ("vm", "pause", "full")):
                proc = xenlab(ts, *args)
                assert "Traceback" not in proc.stderr, proc.stderr
                assert proc.returncode in (0, 1), proc.stderr
                if proc.returncode:
                    assert "state store" in proc.stderr or "No space" in proc.stderr, \
                        proc.stderr
            (small / "fill").unlink()
            converge(ts)
            xenlab(ts, "vm", "unpause", "full")
            check_truth(ts, {"full"})
            for s in ts.store.list_snapshots(ts.get("full").domid):
                assert s.state is SnapshotState.READY
            assert read_marker(ts, "full") == "kept"
        finally:
            with contextlib.suppress(Exception):
                sync(ts.destroy("full"))
            with contextlib.suppress(Exception):
                sync(ts.undefine("full"))
            ts.store.close()
            sync(qemuimg.info(tmp_path / "full.qcow2", "qcow2"))


def test_hot_plugged_vcpus_survive_save_and_restore(ts: Toolstack, tmp_path: Path) -> None:
    """A save after vcpu-set could not be restored ("Unknown savevm section cpu_common"):
    the guest was lost."""
    from tests.vm.guests import sh
    from xenlab.vm.migration.saverestore import restore, save
    from xenlab.vm.resources import vcpu_set

    boot(ts, tmp_path, "cpus", memory=128, maxmem=None, vcpus=1, maxvcpus=2)
    sync(vcpu_set(ts, "cpus", 2))
    write_marker(ts, "cpus", "two")
    image = tmp_path / "cpus.save"
    sync(save(ts, "cpus", image))
    sync(restore(ts, image))
    assert read_marker(ts, "cpus") == "two"
    assert sh(ts, "cpus", "grep -c ^processor /proc/cpuinfo").strip() == "2"
    # A memory snapshot and a local migration carry them too.
    from tests.vm.guests import clear
    from xenlab.vm.migration.sender import migrate
    from xenlab.vm.snapshot import create_snapshot, revert_snapshot

    sync(create_snapshot(ts, "cpus", "m", external=True, memory=True))
    write_marker(ts, "cpus", "later")
    sync(revert_snapshot(ts, "cpus", "m"))
    assert read_marker(ts, "cpus") == "two"
    ts.store.remove_snapshot(ts.store.get_snapshot(ts.get("cpus").domid, "m").id)
    dest = Toolstack(tmp_path / "dest")
    try:
        sync(migrate(ts, "cpus", dest))
        assert read_marker(dest, "cpus") == "two"
        assert sh(dest, "cpus", "grep -c ^processor /proc/cpuinfo").strip() == "2"
    finally:
        clear(dest)
