"""xenlab.vm.store: ids, names, snapshot trees, locks across processes, crash consistency."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from xenlab.errors import StateError, XenlabError
from xenlab.vm.store import (
    DomainRecord,
    SnapshotKind,
    SnapshotNode,
    SnapshotRecord,
    SnapshotState,
    Store,
    default_state_dir,
    effective_state,
    is_alive,
)

SRC = str(Path(__file__).resolve().parents[2] / "src")


def dom(name: str, **kw: object) -> DomainRecord:
    base = DomainRecord(
        domid=0, name=name, uuid=f"uuid-{name}", config_path=f"/etc/xen/{name}.cfg",
        config_text=f'name = "{name}"\n', rundir="", pid=None, state="creating",
        created=1000.0, accel="tcg",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def snap(domid: int, name: str, parent: int | None = None, created: float = 0.0
         ) -> SnapshotRecord:
    return SnapshotRecord(
        id=0, domid=domid, name=name, parent=parent, created=created,
        kind=SnapshotKind.EXTERNAL, description=f"about {name}",
        disks=({"device": "vda", "file": f"/img/{name}.qcow2", "format": "qcow2"},),
        memory_path=f"/img/{name}.mem",
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state") as s:
        yield s


def test_layout_wal_and_schema(tmp_path: Path) -> None:
    with Store(tmp_path / "st") as s:
        assert s.path == tmp_path / "st" / "xenlab.db"
        assert s.schema_version == 2  # 2: the backend column
        assert (tmp_path / "st" / "locks").is_dir()
        assert s.check() == []
    db = sqlite3.connect(tmp_path / "st" / "xenlab.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"domains", "snapshots", "schema_version"} <= tables
    # a database from a newer xenlab is refused, not misread
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="schema version 99 is newer"):
        Store(tmp_path / "st")


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XENLAB_STATE_DIR", str(tmp_path / "x"))
    assert default_state_dir() == tmp_path / "x"
    monkeypatch.delenv("XENLAB_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "xenlab"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "xenlab"


def test_domids_smallest_free(store: Store) -> None:
    a = store.add_domain(dom("a"))
    b = store.add_domain(dom("b"))
    c = store.add_domain(dom("c"))
    assert [a.domid, b.domid, c.domid] == [1, 2, 3]
    store.remove(2)
    assert store.add_domain(dom("d")).domid == 2  # the hole is reused
    store.remove(1)
    assert store.add_domain(dom("e")).domid == 1
    assert store.add_domain(dom("f")).domid == 4
    assert [r.name for r in store.list()] == ["e", "d", "c", "f"]
    assert [r.domid for r in store.list()] == [1, 2, 3, 4]


def test_get_update_remove_roundtrip(store: Store) -> None:
    rec = store.add_domain(dom("web", extra={"vnc": 5901, "tags": ["a", "b"]}))
    assert store.get("web") == rec
    assert store.get(rec.domid) == rec
    assert store.get(str(rec.domid)) == rec
    assert store.get("web").extra == {"vnc": 5901, "tags": ["a", "b"]}
    running = replace(rec, pid=4242, state="running", rundir="/run/x/1")
    store.update(running)
    assert store.get("web") == running
    with pytest.raises(XenlabError, match="no domain named 'nope'"):
        store.get("nope")
    with pytest.raises(XenlabError, match="no domain with id 9"):
        store.get(9)
    with pytest.raises(XenlabError, match="no domain with id 7"):
        store.update(replace(rec, domid=7, name="other"))
    store.remove(rec.domid)
    store.remove(rec.domid)  # idempotent
    assert store.list() == []


def test_names_are_unique(store: Store) -> None:
    a = store.add_domain(dom("a"))
    store.add_domain(dom("b"))
    with pytest.raises(XenlabError, match=r"a domain named 'a' already exists \(id 1\)"):
        store.add_domain(dom("a"))
    with pytest.raises(XenlabError, match="'b' already exists"):
        store.update(replace(a, name="b"))
    # a failed add leaves nothing behind and burns no id
    assert [r.name for r in store.list()] == ["a", "b"]
    assert store.add_domain(dom("c")).domid == 3


def test_snapshot_tree_and_removal(store: Store) -> None:
    d = store.add_domain(dom("vm"))
    other = store.add_domain(dom("vm2"))
    root = store.add_snapshot(snap(d.domid, "base", created=1))
    assert root.id > 0 and root.state is SnapshotState.CREATING
    a = store.add_snapshot(snap(d.domid, "a", root.id, created=2))
    b = store.add_snapshot(snap(d.domid, "b", root.id, created=3))
    a1 = store.add_snapshot(snap(d.domid, "a1", a.id, created=4))
    lone = store.add_snapshot(snap(d.domid, "lone", None, created=5))
    store.add_snapshot(snap(other.domid, "base", created=1))  # same name, other domain

    assert store.get_snapshot(d.domid, "a1") == a1
    assert store.get_snapshot(d.domid, "a1").disks[0]["file"] == "/img/a1.qcow2"
    assert [s.name for s in store.list_snapshots(d.domid)] == ["base", "a", "b", "a1", "lone"]
    assert store.snapshot_tree(d.domid) == (
        SnapshotNode(root, (SnapshotNode(a, (SnapshotNode(a1, ()),)), SnapshotNode(b, ()))),
        SnapshotNode(lone, ()),
    )

    with pytest.raises(XenlabError, match="already has a snapshot named 'a'"):
        store.add_snapshot(snap(d.domid, "a"))
    with pytest.raises(XenlabError, match="is not a snapshot of domain"):
        store.add_snapshot(snap(other.domid, "x", parent=a.id))
    with pytest.raises(XenlabError, match="no domain with id 99"):
        store.add_snapshot(snap(99, "x"))
    with pytest.raises(XenlabError, match="has no snapshot named 'zz'"):
        store.get_snapshot(d.domid, "zz")

    ready = store.set_snapshot_state(a.id, SnapshotState.READY)
    assert ready.state is SnapshotState.READY
    assert store.get_snapshot(d.domid, "a").state is SnapshotState.READY
    with pytest.raises(XenlabError):
        store.set_snapshot_state(12345, SnapshotState.BROKEN)

    with pytest.raises(StateError, match=r"snapshot 'base' has children \('a1', 'a', 'b'\)"):
        store.remove_snapshot(root.id)
    assert len(store.list_snapshots(d.domid)) == 5  # refused: nothing removed
    assert [s.name for s in store.remove_snapshot(b.id)] == ["b"]
    removed = store.remove_snapshot(root.id, children=True)
    assert [s.name for s in removed] == ["a1", "a", "base"]  # leaves first
    assert store.snapshot_tree(d.domid) == (SnapshotNode(lone, ()),)

    # a domain's snapshots go with it; the other domain's stay
    store.remove(d.domid)
    assert store.list_snapshots(d.domid) == []
    assert [s.name for s in store.list_snapshots(other.domid)] == ["base"]
    assert store.check() == []


def test_lock_is_reentrant_in_one_store(store: Store) -> None:
    with store.lock(1), store.lock(1), store.global_lock():
        # add_domain takes the global lock itself: no self-deadlock
        store.add_domain(dom("x"))
    with store.lock(1, timeout=0.1):
        pass


def _child(code: str, state_dir: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=SRC)
    script = "import sys, time\nfrom pathlib import Path\nfrom xenlab.vm.store import *\n"
    script += f"state = Path({str(state_dir)!r})\n" + textwrap.dedent(code)
    return subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True
    )


@contextlib.contextmanager
def _running(code: str, state_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """Run ``code`` in a child process until it prints "ready"; killed (if still there) after."""
    proc = _child(code, state_dir)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


def _kill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the child and wait until it is gone: a crash, no clean-up of its own."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def test_lock_contention_between_processes(tmp_path: Path) -> None:
    state = tmp_path / "st"
    with Store(state) as s, _running(
        """
            s = Store(state)
            with s.lock(1):
                print("ready", flush=True)
                time.sleep(60)
            """,
        state,
    ) as holder:
        t0 = time.monotonic()
        with pytest.raises(StateError) as info, s.lock(1, timeout=0.3):
            pass
        assert time.monotonic() - t0 >= 0.3
        assert str(info.value).startswith(
            "domain 1 is busy: another xenlab command holds its lock"
        )
        with s.lock(2, timeout=0.3):  # other domains are not blocked
            pass
        # the holder dies without releasing: the kernel drops its lock
        _kill(holder)
        with s.lock(1, timeout=5):
            pass


def test_waiter_gets_lock_when_released(tmp_path: Path) -> None:
    state = tmp_path / "st"
    with _running(
        """
        s = Store(state)
        with s.global_lock():
            print("ready", flush=True)
            time.sleep(0.5)
        """,
        state,
    ), Store(state) as s:
        t0 = time.monotonic()
        with s.global_lock(timeout=10):
            assert time.monotonic() - t0 >= 0.2  # it did wait for the holder


def test_crash_inside_a_transaction(tmp_path: Path) -> None:
    state = tmp_path / "st"
    with Store(state) as s:
        keep = s.add_domain(dom("keep"))
    # the child writes megabytes inside one transaction (enough to spill
    # uncommitted pages into the WAL), says so, and is killed before COMMIT
    with _running(
        """
        s = Store(state)
        with s._tx() as db:
            for i in range(40):
                db.execute(
                    "INSERT INTO domains (domid, name, uuid, config_path, config_text, rundir,"
                    " pid, state, created, accel, extra) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (100 + i, f"doomed{i}", "u", "p", "x" * 500_000, "", None, "s", 0.0,
                     "tcg", "{}"),
                )
            db.execute("UPDATE domains SET state = 'clobbered'")
            print("ready", flush=True)
            time.sleep(60)
        """,
        state,
    ) as child:
        assert (state / "xenlab.db-wal").stat().st_size > 1_000_000  # pages did spill
        _kill(child)
    with Store(state) as s:
        assert s.check() == []
        assert s.list() == [keep]  # none of the killed transaction is visible
        assert s.add_domain(dom("next")).domid == 2


def test_crash_during_a_stream_of_writes(tmp_path: Path) -> None:
    state = tmp_path / "st"
    with _running(
        """
        s = Store(state)
        print("ready", flush=True)
        i = 0
        while True:
            rec = s.add_domain(DomainRecord(0, f"d{i}", "u", "p", "t" * 20_000, "", None,
                                            "running", 0.0, "tcg", {"i": i}))
            snap = s.add_snapshot(SnapshotRecord(0, rec.domid, "s", None, 0.0,
                                                 SnapshotKind.INTERNAL))
            s.add_snapshot(SnapshotRecord(0, rec.domid, "t", snap.id, 0.0,
                                          SnapshotKind.INTERNAL))
            if i % 3 == 0:
                s.remove(rec.domid)
            i += 1
        """,
        state,
    ) as child:
        time.sleep(1.0)
        _kill(child)
    with Store(state) as s:
        assert s.check() == []
        recs = s.list()
        assert recs, "the child should have committed something in a second"
        last = max(r.extra["i"] for r in recs)
        for r in recs:
            assert r.config_text == "t" * 20_000
            # removed ones stay removed (the last may have died before its remove)
            assert r.extra["i"] % 3 != 0 or r.extra["i"] == last
            # every snapshot row is whole and points at its domain's own parent
            for sn in s.list_snapshots(r.domid):
                assert sn.parent is None or s.snapshot_by_id(sn.parent).domid == r.domid
        ids = [r.domid for r in recs]
        assert ids == sorted(set(ids))
        nxt = s.add_domain(dom("after"))
        assert nxt.domid == min(set(range(1, len(ids) + 2)) - set(ids))


def test_is_alive_and_stale_state(tmp_path: Path) -> None:
    rec = dom("guest1", pid=None, state="running")
    assert not is_alive(rec)
    assert effective_state(rec) == "running"
    # a process that is not QEMU (this test run) does not count, even with the pid
    mine = replace(rec, pid=os.getpid())
    assert not is_alive(mine)
    assert effective_state(mine) == "stale (QEMU gone)"
    # a process whose argv is QEMU's for that name: the real QEMU when there
    # is one, and a stand-in with QEMU's argv[0] for the plain "-name NAME" form
    qemu = shutil.which("qemu-system-x86_64")
    argvs: list[tuple[list[str], str | None]] = [
        (["qemu-system-x86_64", "-c", "import time; time.sleep(30)", "-name", "guest1"],
         sys.executable),
    ]
    if qemu is not None:
        argvs.append(([qemu, "-accel", "tcg", "-nodefaults", "-no-user-config", "-S",
                       "-display", "none", "-m", "32", "-name", "guest=guest1,debug-threads=on"],
                      None))
    for argv, exe in argvs:
        proc = subprocess.Popen(argv, executable=exe, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.2)
            assert proc.poll() is None
            live = replace(rec, pid=proc.pid)
            assert is_alive(live)
            assert effective_state(live) == "running"
            assert not is_alive(replace(live, name="guest2"))
        finally:
            proc.kill()
            proc.wait(10)
        assert not is_alive(replace(rec, pid=proc.pid))  # gone


def test_lookups_and_clashes_raise_errors_a_caller_can_sort(store: Store) -> None:
    from xenlab.errors import ConflictError, NotFoundError, UsageError

    a = store.add_domain(dom("a"))
    with pytest.raises(NotFoundError) as missing:
        store.get("nope")
    assert (missing.value.kind, missing.value.name) == ("domain", "nope")
    assert isinstance(missing.value, LookupError)
    with pytest.raises(NotFoundError) as no_snap:
        store.get_snapshot(a.domid, "s9")
    assert (no_snap.value.kind, no_snap.value.name) == ("snapshot", "s9")
    with pytest.raises(ConflictError) as clash:
        store.add_domain(dom("a"))
    assert (clash.value.kind, clash.value.name) == ("domain", "a")
    s1 = store.add_snapshot(snap(a.domid, "s1"))
    with pytest.raises(ConflictError) as twice:
        store.add_snapshot(snap(a.domid, "s1"))
    assert (twice.value.kind, twice.value.name) == ("snapshot", "s1")
    assert store.get_snapshot(a.domid, "s1") == s1
    with pytest.raises(UsageError, match="not UTF-8"):
        store.get("bad\udcff")
