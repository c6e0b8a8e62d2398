"""Verbs on one domain at the same time never lose a record field, a process or a write.

Two kinds of test: deterministic ones, where the test holds a domain's lock
from a second store while a verb waits for it and changes the world under
it (the review's lost ``extra.overlays`` and the ``destroy`` that removed
another domain), and a free-running one, where real ``xenlab`` processes
run snapshot verbs and the other verbs on one guest at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.aio import sync
from tests.vm.guests import boot, read_marker, write_marker
from tests.vm.test_state_trust import fake_qemu, record
from tests.vm.truth import check_truth, xenlab
from xenlab.errors import BackendError, StateError, XenlabError
from xenlab.vm.backends.qemu.rundir import make_rundir
from xenlab.vm.domain import Toolstack
from xenlab.vm.store import Store


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[BaseException], list[Any]]:
    errors: list[BaseException] = []
    results: list[Any] = []

    def run() -> None:
        try:
            results.append(fn())
        except BaseException as err:
            errors.append(err)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors, results


def test_destroy_waiting_for_a_domain_that_was_replaced(tmp_path: Path) -> None:
    """destroy foo waited on foo's lock; foo went and bar took its id: bar is untouched."""
    ts = Toolstack(tmp_path / "state")
    foo = ts.store.add_domain(record("foo", state="shutoff-ish"))
    other = Store(tmp_path / "state")
    rundir = make_rundir(ts.state_dir, foo.domid)
    with fake_qemu("-name", "guest=bar", "-pidfile", str(rundir / "qemu.pid")) as bar_pid:
        with other.lock(foo.domid):
            # A toolstack of its own: an SQLite connection stays in its thread.
            t, errors, _ = in_thread(lambda: sync(Toolstack(ts.state_dir).destroy("foo")))
            time.sleep(0.3)  # destroy has resolved foo and waits for the lock
            other.remove(foo.domid)
            bar = other.add_domain(record("bar", rundir=str(rundir), pid=bar_pid))
            assert bar.domid == foo.domid
        t.join(10)
        assert errors and isinstance(errors[0], StateError | XenlabError)
        assert "replaced" in str(errors[0]) or "went away" in str(errors[0])
        assert ts.get("bar").pid == bar_pid and rundir.is_dir()
        assert Path(f"/proc/{bar_pid}").exists()


@pytest.mark.integration
def test_pause_waiting_on_a_snapshot_keeps_its_overlays(ts: Toolstack, tmp_path: Path) -> None:
    """pause read the record, waited, and wrote it back over the snapshot's overlays."""
    boot(ts, tmp_path, "rp", memory=128, maxmem=None, vcpus=1)
    rec = ts.get("rp")
    other = Store(ts.state_dir)
    with other.lock(rec.domid):
        t, errors, _ = in_thread(lambda: sync(Toolstack(ts.state_dir).pause("rp")))
        time.sleep(0.3)
        other.patch(rec.domid, extra_set={"overlays": {"xvda": {"file": "/x.s1.qcow2",
                                                                "node": "xvda-s1"}}})
    t.join(30)
    assert not errors, errors
    now = ts.get("rp")
    assert now.state == "paused"
    assert now.extra["overlays"] == {"xvda": {"file": "/x.s1.qcow2", "node": "xvda-s1"}}
    ts.store.patch(rec.domid, extra_drop=["overlays"])
    sync(ts.unpause("rp"))


@pytest.mark.integration
def _retry(fn: Callable[[], Any]) -> Any:
    """``fn()``, waited for while the other thread has the guest paused or QMP busy."""
    for _ in range(100):
        try:
            return fn()
        except (StateError, BackendError):
            time.sleep(0.1)
    return fn()


def _marker(ts: Toolstack) -> str:
    return str(_retry(lambda: read_marker(ts, "race")))


def test_verbs_race_snapshots(ts: Toolstack, tmp_path: Path) -> None:
    """Snapshot create/revert/delete (internal and external) against everything else."""
    boot(ts, tmp_path, "race", memory=128, maxmem=None, vcpus=1)
    write_marker(ts, "race", "m0")
    stop = threading.Event()
    failures: list[str] = []
    counts = {"snap": 0, "other": 0}

    def snapshots() -> None:
        mine = Toolstack(ts.state_dir)  # SQLite connections stay in their thread
        try:
            for i in range(4):
                ext = ["--external", "--memory"] if i % 2 else []
                _retry(lambda i=i: write_marker(mine, "race", f"m{i}"))
                p = xenlab(ts, "vm", "snapshot-create", "race", f"s{i}", *ext)
                if p.returncode != 0:
                    failures.append(f"create s{i}: {p.stderr}")
                    continue
                _retry(lambda: write_marker(mine, "race", "after"))
                p = xenlab(ts, "vm", "snapshot-revert", "race", f"s{i}")
                if p.returncode != 0:
                    failures.append(f"revert s{i}: {p.stderr}")
                    continue
                got = _marker(mine)
                if got != f"m{i}":
                    failures.append(f"revert s{i} reads {got!r}")
                counts["snap"] += 1
            for i in reversed(range(4)):
                p = xenlab(ts, "vm", "snapshot-delete", "race", f"s{i}", "--children")
                if p.returncode != 0 and "no snapshot" not in p.stderr:
                    failures.append(f"delete s{i}: {p.stderr}")
        except BaseException as err:
            failures.append(f"snapshot thread: {err!r}")
        finally:
            stop.set()

    def others() -> None:
        verbs = [("vm", "pause", "race"), ("vm", "unpause", "race"), ("vm", "list", "-l"),
                 ("vm", "info", "race"), ("vm", "mem-set", "race", "120"),
                 ("vm", "vcpu-list", "race"), ("vm", "snapshot-list", "race")]
        i = 0
        while not stop.is_set():
            args = verbs[i % len(verbs)]
            p = xenlab(ts, *args)
            # Refusals are fine (busy, or shut off while a revert restarts it);
            # a traceback never is.
            if "Traceback" in p.stderr:
                failures.append(f"{' '.join(args)}: {p.stderr}")
            i += 1
            counts["other"] += 1
        xenlab(ts, "vm", "unpause", "race")

    threads = [threading.Thread(target=snapshots), threading.Thread(target=others)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not failures, failures
    assert counts["snap"] == 4 and counts["other"] > 10, counts
    check_truth(ts, {"race"})
    rec = ts.get("race")
    assert "overlays" not in rec.extra  # every external snapshot was deleted
    assert ts.store.list_snapshots(rec.domid) == []
