"""The state store can be trusted: private files, whole-record writes that lose nothing,
QEMU recognised by its command line, clear errors when the disk is full (no QEMU needed)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.aio import sync
from tests.vm.guests import tmpfs
from xenlab.errors import StateError, XenlabError
from xenlab.vm.backends.qemu.rundir import SOCKET_MAX, checked_rundir, make_rundir
from xenlab.vm.domain import Toolstack, absolute_paths, check_domain_name, config_from_text
from xenlab.vm.jobs import Job, job_of, new_job, process_start
from xenlab.vm.store import (
    DomainRecord,
    Store,
    StoreError,
    is_domain_qemu,
    private_dir,
    qemu_opts,
)


def record(name: str = "a", **kw: object) -> DomainRecord:
    base = DomainRecord(domid=0, name=name, uuid=f"uuid-{name}", config_path="/c",
                        config_text=f'name = "{name}"\n', rundir="", pid=None,
                        state="running", created=1.0, accel="tcg")
    return replace(base, **kw)  # type: ignore[arg-type]


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


# --- private state -----------------------------------------------------------------------


def test_new_state_is_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Store(state) as s:
        s.add_domain(record())
        with s.lock(1), s.global_lock():
            pass
    assert mode(state) == 0o700 and mode(state / "locks") == 0o700
    for f in ("xenlab.db", "xenlab.db-wal", "xenlab.db-shm", "locks/1.lock",
              "locks/global.lock"):
        if (state / f).exists():
            assert mode(state / f) == 0o600, f
    assert mode(state / "xenlab.db") == 0o600


def test_old_open_state_is_tightened(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Store(state).close()
    os.chmod(state, 0o755)
    os.chmod(state / "xenlab.db", 0o644)
    os.chmod(state / "locks", 0o777)
    Store(state).close()
    assert mode(state) == 0o700 and mode(state / "xenlab.db") == 0o600
    assert mode(state / "locks") == 0o700


def test_state_dir_of_another_user_or_a_symlink_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(other, 65534, 65534)
        with pytest.raises(StateError, match="belongs to uid 65534"):
            Store(other)
    link = tmp_path / "link"
    real = tmp_path / "real"
    real.mkdir()
    link.symlink_to(real)
    with pytest.raises(StateError, match="symbolic link"):
        Store(link)


def test_a_planted_lock_symlink_is_not_followed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Store(state) as s:
        victim = tmp_path / "victim"
        victim.write_text("keep")
        (state / "locks" / "7.lock").symlink_to(victim)
        with pytest.raises(StateError, match=r"7\.lock: cannot open"), s.lock(7):
            pass
    assert victim.read_text() == "keep"


def test_private_dir_creates_parents_0700(tmp_path: Path) -> None:
    p = private_dir(tmp_path / "a" / "b")
    assert mode(p) == 0o700 and mode(p.parent) == 0o700


# --- patch and lookups ------------------------------------------------------------------


def test_patch_keeps_what_others_wrote(tmp_path: Path) -> None:
    """The lost update of the review: pause wrote back an old copy and dropped overlays."""
    with Store(tmp_path / "s") as s:
        rec = s.add_domain(record())
        stale = s.get(rec.domid)  # what `pause` read before the snapshot ran
        s.patch(rec.domid, extra_set={"overlays": {"xvda": {"file": "/x.s1.qcow2"}}})
        s.patch(stale.domid, state="paused")
        now = s.get(rec.domid)
        assert now.state == "paused" and now.extra["overlays"] == {"xvda": {"file": "/x.s1.qcow2"}}
        s.patch(rec.domid, extra_drop=["overlays"], extra_set={"current_snapshot": 3})
        assert dict(s.get(rec.domid).extra) == {"current_snapshot": 3}


def test_patch_refuses_another_domain_under_the_same_id(tmp_path: Path) -> None:
    with Store(tmp_path / "s") as s:
        foo = s.add_domain(record("foo"))
        s.remove(foo.domid)
        bar = s.add_domain(record("bar"))
        assert bar.domid == foo.domid
        with pytest.raises(StateError, match="another domain now"):
            s.patch(foo.domid, expect_uuid=foo.uuid, state="paused")
        assert s.get(bar.domid).state == "running"
        with pytest.raises(XenlabError, match="cannot patch domain fields"):
            s.patch(bar.domid, pidx=9)


def test_ids_are_found_before_names(tmp_path: Path) -> None:
    """xl resolves ids first: `destroy 1` is domain 1, even beside an old domain named "1"."""
    with Store(tmp_path / "s") as s:
        one = s.add_domain(record("x"))
        s.add_domain(record("1", uuid="u-named-1"))
        assert s.get("1").domid == one.domid
        assert s.get("x").domid == one.domid
        with pytest.raises(XenlabError, match="no domain named '99'"):
            s.get("99")


@pytest.mark.parametrize("name", ["", "..", ".", "a/b", "x" * 65, "a\nb", "1", "007",
                                  "-n", ".hidden", "a b", 'a"b', "a\\b", "a\x00b",
                                  "\udcff", "é"])
def test_unusable_names_are_refused(name: str) -> None:
    with pytest.raises(XenlabError, match=r"domain name .* is not usable"):
        check_domain_name(name)


@pytest.mark.parametrize("name", ["web,prod", "a", "x" * 64, "db-1.example.org", "a_b+c@d:e=f"])
def test_usable_names(name: str) -> None:
    assert check_domain_name(name) == name


def test_qemu_opts_read_doubled_commas() -> None:
    assert qemu_opts("guest=web,,prod,debug-threads=on") == ["guest=web,prod",
                                                             "debug-threads=on"]
    assert qemu_opts("a,,,,b,c") == ["a,,b", "c"]
    assert qemu_opts("") == [""]


# --- QEMU recognised by its command line ------------------------------------------------


@contextlib.contextmanager
def fake_qemu(*args: str, user: str | None = None) -> Iterator[int]:
    """A process whose argv[0] is qemu-system-x86_64 and whose arguments are ``args``."""
    script = 'exec -a qemu-system-x86_64 "$0" -c "import time; time.sleep(60)" "$@"'
    # The system's python: another user may not enter this project's venv.
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    argv = ["bash", "-c", script, python, *args]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    proc = subprocess.Popen(argv)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid = proc.pid
            if user is not None:
                kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                pid = int(kids[0]) if kids else 0
            if pid:
                try:
                    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    raw = b""
                if raw.startswith(b"qemu-system"):
                    yield pid
                    return
            time.sleep(0.02)
        raise AssertionError("the fake QEMU did not start")
    finally:
        proc.kill()
        proc.wait()


def test_a_name_with_a_comma_is_read_back(tmp_path: Path) -> None:
    rundir = tmp_path / "run"
    with fake_qemu("-name", "guest=web,,prod,debug-threads=on") as pid:
        assert is_domain_qemu(pid, record("web,prod"))
        assert not is_domain_qemu(pid, record("web"))
    with fake_qemu("-name", "guest=web,,prod", "-pidfile", str(rundir / "qemu.pid")) as pid:
        rec = record("renamed", rundir=str(rundir))
        assert is_domain_qemu(pid, rec)  # the pidfile decides: it survives a rename
        assert not is_domain_qemu(pid, record("web,prod", rundir=str(tmp_path / "other")))


def test_another_users_process_is_never_taken_for_ours(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user")
    rundir = tmp_path / "run"
    with fake_qemu("-name", "guest=a", "-pidfile", str(rundir / "qemu.pid"),
                   user="nobody") as pid:
        assert not is_domain_qemu(pid, record("a", rundir=str(rundir)))


def test_destroy_kills_only_our_qemu(tmp_path: Path) -> None:
    """A pidfile naming some other process: destroy forgets the record, kills nothing."""
    ts = Toolstack(tmp_path / "state")
    rundir = make_rundir(ts.state_dir, 1)
    with fake_qemu("-name", "guest=other") as victim:
        (rundir / "qemu.pid").write_text(f"{victim}\n")
        ts.store.add_domain(record("a", rundir=str(rundir), pid=victim))
        sync(ts.destroy("a"))
        assert Path(f"/proc/{victim}").exists()
        with pytest.raises(XenlabError):
            ts.get("a")


# --- run directories ------------------------------------------------------------------------


def test_rundir_is_private_and_unpredictable_when_the_state_path_is_long(tmp_path: Path
                                                                          ) -> None:
    deep = tmp_path / ("d" * 90)
    state = private_dir(deep / "state")
    short = make_rundir(tmp_path, 3)
    assert short == tmp_path / "run" / "3" and mode(short) == 0o700
    long_one = make_rundir(state, 3)
    again = make_rundir(state, 3)
    assert long_one != again  # never the same name twice: nobody can pre-create it
    for d in (long_one, again):
        assert len(os.fsencode(d / "console.sock")) <= SOCKET_MAX
        assert mode(d) == 0o700 and os.stat(d).st_uid == os.geteuid()
        assert not str(d).startswith(str(state))


def test_a_recorded_rundir_that_is_not_private_is_not_used(tmp_path: Path) -> None:
    d = tmp_path / "r"
    d.mkdir(mode=0o700)
    assert checked_rundir(d) is not None
    os.chmod(d, 0o777)
    assert checked_rundir(d) is None
    os.chmod(d, 0o700)
    link = tmp_path / "l"
    link.symlink_to(d)
    assert checked_rundir(link) is None
    assert checked_rundir(tmp_path / "missing") is None


# --- jobs --------------------------------------------------------------------------------


def test_jobs_know_a_dead_owner_from_a_recycled_pid() -> None:
    mine = new_job("x", a=1)
    assert mine.owner_alive() and mine.mine()
    proc = subprocess.Popen(["sleep", "0"])
    proc.wait()
    assert not Job("x", proc.pid, 1, {}).owner_alive()
    # pid 1 is alive, but not since the recorded time.
    assert process_start(1) is not None
    assert not Job("x", 1, (process_start(1) or 0) + 1, {}).owner_alive()
    rec = record(extra={"job": {"verb": "v", "pid": "junk"}})
    assert job_of(rec) is None


def test_a_killed_create_is_undone_by_the_next_command(tmp_path: Path) -> None:
    """A record left 'creating' by a dead process, with a QEMU only its pidfile knows."""
    ts = Toolstack(tmp_path / "state")
    rundir = make_rundir(ts.state_dir, 1)
    dead = subprocess.Popen(["true"])
    dead.wait()
    job = Job("create", dead.pid, 12345, {}).to_json()
    with fake_qemu("-name", "guest=a", "-pidfile", str(rundir / "qemu.pid")) as qemu:
        (rundir / "qemu.pid").write_text(f"{qemu}\n")
        ts.store.add_domain(record("a", rundir=str(rundir), pid=None, state="creating",
                                   extra={"job": job}))
        assert [s.record.name for s in sync(ts.list())] == []
        for _ in range(100):
            if not Path(f"/proc/{qemu}").exists() or \
                    Path(f"/proc/{qemu}/stat").read_text().split(")")[-1].split()[0] == "Z":
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the QEMU of the killed create still runs")
    assert not rundir.exists()


# --- relative paths ----------------------------------------------------------------------


def test_relative_paths_become_absolute_against_the_config(tmp_path: Path) -> None:
    text = ('name = "a"\ntype = "pv"\nkernel = "k/vmlinuz"\nramdisk = "/boot/initrd"\n'
            'disk = [ "format=qcow2,vdev=xvda,access=rw,target=disks/a.qcow2", '
            '"/dev/vg/b,raw,xvdb,rw" ]\n')
    dc, text2 = absolute_paths(*config_from_text(text, "a.cfg"), tmp_path, "a.cfg")
    assert [d.pdev_path for d in dc.disks] == [str(tmp_path / "disks/a.qcow2"), "/dev/vg/b"]
    assert dc.kernel == str(tmp_path / "k/vmlinuz") and dc.ramdisk == "/boot/initrd"
    again, _ = config_from_text(text2, "a.cfg")  # what later commands parse
    assert again.disks == dc.disks and again.kernel == dc.kernel


# --- a full disk ----------------------------------------------------------------------


def test_a_full_disk_is_a_clear_error_and_destroy_still_forgets(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "512k") as small:
        ts = Toolstack(small / "state")
        ts.store.add_domain(record("a"))
        # Fill the file system to the last block.
        fd = os.open(small / "fill", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        with pytest.raises(StoreError, match=r"state store .*xenlab.db: .*full"):
            for i in range(1000):
                ts.store.patch(1, extra_set={f"k{i}": "x" * 2000})
        (small / "fill").unlink()
        sync(ts.destroy("a"))
        with pytest.raises(XenlabError):
            ts.get("a")


def test_sqlite_errors_never_escape_as_tracebacks(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Store(state).close()
    (state / "xenlab.db").write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (state / f"xenlab.db{suffix}").unlink(missing_ok=True)
    with pytest.raises(StoreError, match="state store"):
        Store(state)
    assert issubclass(StoreError, StateError)
    assert not issubclass(StoreError, sqlite3.Error)


# --- backing chains checked before QEMU opens them -------------------------------------


def test_create_refuses_a_disk_backed_by_a_host_file(tmp_path: Path) -> None:
    """The review's case: a qcow2 over /etc/shadow booted, and the guest read it."""
    from xenlab.vm import qemuimg

    disk = tmp_path / "x.qcow2"
    sync(qemuimg.create(disk, "qcow2", backing="/etc/shadow", backing_fmt="raw"))
    cfg = tmp_path / "x.cfg"
    cfg.write_text(f'name = "x"\ntype = "hvm"\nmemory = 64\n'
                   f'disk = [ "format=qcow2,vdev=xvda,access=rw,target={disk}" ]\n')
    ts = Toolstack(tmp_path / "state")
    with pytest.raises(XenlabError, match=r"names backing file /etc/shadow, outside"):
        sync(ts.create(cfg))
    assert ts.store.list() == []
    with pytest.raises(XenlabError, match=r"names backing file /etc/shadow, outside"):
        sync(ts.define(cfg))
    assert ts.store.list() == []
    # A chain inside the disk's own directory is fine.
    base = tmp_path / "base.qcow2"
    sync(qemuimg.create(base, "qcow2", "16M"))
    disk.unlink()
    sync(qemuimg.create(disk, "qcow2", backing=base, backing_fmt="qcow2"))
    assert sync(ts.define(cfg)).name == "x"
