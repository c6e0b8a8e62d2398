"""A state database written by the release before schema version 2 still reads.

``data/store-v1.db`` was written by xenlab at commit e5624cd (schema version
1) through its ``Store`` API: a running domain whose ``extra`` has every
run-time key (and one key a newer xenlab might add), a snapshot, and a
defined, shut-off domain.  Opening it applies the step to version 2 (the
``backend`` column) in place; every field and run-time fact must read as it
was written.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.aio import sync
from tests.vm.fakebackend import FakeBackend
from xenlab.vm.backend import WrongBackend
from xenlab.vm.domain import Toolstack
from xenlab.vm.runtime import DiskFile, Overlay, Runtime, disk_now
from xenlab.vm.store import SCHEMA_VERSION, SnapshotKind, SnapshotState, Store

V1 = Path(__file__).parent / "data" / "store-v1.db"


@pytest.fixture()
def v1_dir(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    shutil.copyfile(V1, state / "xenlab.db")
    (state / "xenlab.db").chmod(0o600)
    return state


def test_the_fixture_is_version_1() -> None:
    db = sqlite3.connect(f"file:{V1}?immutable=1", uri=True)  # writes nothing beside it
    try:
        assert db.execute("SELECT version FROM schema_version").fetchone()[0] == 1
        columns = {r[1] for r in db.execute("PRAGMA table_info(domains)")}
        assert "backend" not in columns
    finally:
        db.close()


def test_version_1_records_read_unchanged(v1_dir: Path) -> None:
    with Store(v1_dir) as store:
        assert store.schema_version == SCHEMA_VERSION == 2
        assert store.check() == []
        web, db = store.list()
        assert (web.domid, web.name, web.uuid) == (1, "web", "6f2b9a3e-0c1d-4b5e-9f60-1a2b3c4d5e6f")
        assert (web.config_path, web.rundir, web.pid, web.state, web.accel) == (
            "/etc/xen/web.cfg", "/run/user/1000/xenlab/1-web", 4242, "running", "tcg")
        assert web.created == 1796000000.5
        assert 'disk = ["file:/srv/web.qcow2,xvda,w"]' in web.config_text
        assert web.backend == db.backend == "qemu"  # every earlier record is QEMU's
        assert (db.domid, db.name, db.state, db.pid, db.extra) == (
            2, "db", "shut off", None, {"defined": True})

        rt = Runtime.of(web)
        assert rt.moved == {"xvda": DiskFile("/srv/moved/web.qcow2", "qcow2")}
        assert rt.nodes == {"xvda": "xvda-mirror-1"}
        assert rt.overlays == {"xvda": Overlay("/srv/web.snap1.qcow2", "xvda-snap-1")}
        assert rt.current_snapshot == 1
        assert rt.stale_nodes == {"xvdb": ("xvdb-fmt", "xvdb-file")}
        assert rt.vifs[0]["name"] == "vif1.0" and len(rt.vifs) == 1
        assert rt.vif_specs == ("mac=00:16:3e:00:00:01,bridge=xenbr0",)
        assert rt.disk_specs == ("file:/srv/web.qcow2,xvda,w",)
        assert (rt.vcpus_plugged, rt.vcpus, rt.memory_mib, rt.maxmem_mib) == (2, 2, 192, 256)
        assert (rt.qemu_name, rt.defined) == ("web-old", True)
        assert rt.job is not None and rt.job["verb"] == "block-attach"
        assert rt.other == {"a_key_from_the_future": {"x": 1}}
        assert rt.to_extra() == dict(web.extra)  # nothing lost on the way through
        now = disk_now(rt, "xvda", "/srv/web.qcow2", "qcow2")
        assert (now.file, now.node, now.base.file, now.overlay) == (
            "/srv/web.snap1.qcow2", "xvda-snap-1", "/srv/moved/web.qcow2", True)

        (node,) = store.snapshot_tree(web.domid)
        snap = node.snapshot
        assert (snap.name, snap.kind, snap.state, snap.parent, snap.memory_path) == (
            "before-upgrade", SnapshotKind.EXTERNAL, SnapshotState.READY, None,
            "/var/lib/xenlab/web.mem")
        assert snap.disks[0]["overlay"] == "/srv/web.snap1.qcow2"

        # Writes after the upgrade keep what they do not name.
        after = store.patch(web.domid, state="paused")
        assert after.extra == web.extra and after.backend == "qemu"

    # The upgrade happened once, in place: a second open finds version 2.
    raw = sqlite3.connect(v1_dir / "xenlab.db")
    try:
        assert raw.execute("SELECT version FROM schema_version").fetchone()[0] == 2
        assert raw.execute("SELECT backend FROM domains ORDER BY domid").fetchall() == [
            ("qemu",), ("qemu",)]
    finally:
        raw.close()
    with Store(v1_dir) as again:
        assert [r.name for r in again.list()] == ["web", "db"]


def test_a_newer_schema_is_refused(v1_dir: Path) -> None:
    raw = sqlite3.connect(v1_dir / "xenlab.db")
    raw.execute("UPDATE schema_version SET version = 99")
    raw.commit()
    raw.close()
    with pytest.raises(Exception, match="schema version 99 is newer"):
        Store(v1_dir)


def test_another_backends_domain_is_shown_never_touched(v1_dir: Path) -> None:
    """A toolstack of another backend lists QEMU's domains as recorded and refuses verbs."""
    ts = Toolstack(v1_dir, backend=FakeBackend())
    before = {r.name: r for r in ts.store.list()}
    rows = {s.record.name: s.state for s in sync(ts.list())}
    assert rows == {"web": "running (qemu)", "db": "shut off (qemu)"}
    with pytest.raises(WrongBackend) as err:
        sync(ts.pause("web"))
    assert (err.value.domain, err.value.recorded, err.value.running) == ("web", "qemu", "fake")
    with pytest.raises(WrongBackend):
        sync(ts.destroy("web"))
    assert {r.name: r for r in ts.store.list()} == before  # the record is as it was
