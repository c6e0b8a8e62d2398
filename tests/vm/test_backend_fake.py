"""The verbs over a second backend: an in-memory fake runs the Toolstack's store, lock and
convergence logic through the Backend protocol, with no QEMU anywhere."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.aio import sync
from tests.vm.fakebackend import FakeBackend
from xenlab.errors import BackendError, ConflictError, NotFoundError, StateError
from xenlab.vm.backend import Capabilities, DomainHandle, ExitReason, Unsupported
from xenlab.vm.domain import SHUTOFF, Toolstack
from xenlab.vm.jobs import Job
from xenlab.vm.runtime import DEFINED, JOB
from xenlab.vm.store import DomainRecord


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def ts(tmp_path: Path, fake: FakeBackend) -> Toolstack:
    return Toolstack(tmp_path / "state", backend=fake)


def _running(ts: Toolstack, fake: FakeBackend, name: str, **extra: object) -> DomainRecord:
    """A domain created through the verbs on the fake (``extra``: record facts to add)."""
    cfg = ts.state_dir.parent / f"{name}.cfg"
    cfg.write_text(f'name = "{name}"\ntype = "hvm"\nmemory = 64\n')
    rec = sync(ts.create(cfg))
    if extra:
        rec = ts.store.patch(rec.domid, extra_set=dict(extra))
    return rec


def _states(ts: Toolstack) -> dict[str, str]:
    return {s.record.name: s.state for s in sync(ts.list())}


def test_pause_and_unpause_reach_the_backend_and_the_record(ts: Toolstack,
                                                            fake: FakeBackend) -> None:
    rec = _running(ts, fake, "a")
    sync(ts.pause("a"))
    assert fake.world[rec.uuid].state == "paused" and ts.get("a").state == "paused"
    assert _states(ts) == {"a": "paused"}
    sync(ts.unpause("a"))
    assert fake.world[rec.uuid].state == "running" and ts.get("a").state == "running"
    assert ("pause", rec.uuid) in fake.calls and ("resume", rec.uuid) in fake.calls


def test_the_record_follows_the_backends_truth(ts: Toolstack, fake: FakeBackend) -> None:
    # A pause killed after the backend paused, before the record said so.
    rec = _running(ts, fake, "a")
    fake.world[rec.uuid].state = "paused"
    assert _states(ts) == {"a": "paused"}
    assert ts.get("a").state == "paused"


def test_a_vanished_domain_is_stale_and_destroy_clears_it(ts: Toolstack,
                                                          fake: FakeBackend) -> None:
    rec = _running(ts, fake, "a")
    _running(ts, fake, "b")
    fake.vanish(rec.uuid)
    assert _states(ts) == {"a": "stale (QEMU gone)", "b": "running"}
    with pytest.raises(StateError, match="is not running"):
        sync(ts.pause("a"))
    assert ("pause", rec.uuid) not in fake.calls  # refused before the backend is asked
    sync(ts.destroy("a"))
    assert [r.name for r in ts.store.list()] == ["b"]
    assert ("release", rec.uuid) in fake.calls
    assert fake.world[ts.get("b").uuid].alive  # the other domain is untouched


def test_a_clean_power_off_is_forgotten_and_a_defined_domain_kept(ts: Toolstack,
                                                                 fake: FakeBackend) -> None:
    gone = _running(ts, fake, "gone")
    kept = _running(ts, fake, "kept", **{DEFINED: True})
    fake.vanish(gone.uuid, ExitReason.POWEROFF)
    fake.vanish(kept.uuid, ExitReason.POWEROFF)
    assert _states(ts) == {"kept": SHUTOFF}
    assert ts.get("kept").state == SHUTOFF


def test_a_killed_destroy_is_finished_by_the_next_command(ts: Toolstack,
                                                         fake: FakeBackend) -> None:
    # The job of a process that is no more (pid 1's start time never matches 0).
    rec = _running(ts, fake, "a", **{JOB: Job("destroy", 1, 0).to_json()})
    assert _states(ts) == {}
    assert ("destroy", rec.uuid) in fake.calls and not fake.world.get(rec.uuid)
    assert ts.store.list() == []


def test_verbs_on_one_domain_wait_for_each_other(ts: Toolstack, fake: FakeBackend) -> None:
    rec = _running(ts, fake, "a")
    fake.slow = 0.5  # the pause holds the domain's lock this long
    # Each command has its own store handle (SQLite connections stay in their thread).
    paused = threading.Thread(
        target=lambda: sync(Toolstack(ts.state_dir, backend=fake).pause("a")))
    paused.start()
    time.sleep(0.1)
    sync(ts.destroy("a"))  # waits for the pause, then destroys
    paused.join()
    names = [c for c, u in fake.calls if u == rec.uuid]
    assert names.index("pause") < names.index("destroy")
    assert ts.store.list() == []


def test_create_goes_through_prepare_and_start(ts: Toolstack, fake: FakeBackend) -> None:
    rec = _running(ts, fake, "a")
    assert (rec.state, rec.accel, rec.pid) == ("running", "fake", None)
    assert [c for c, _ in fake.calls] == ["prepare", "start"]
    assert "job" not in ts.get("a").extra  # the create's job ended with it
    with pytest.raises(ConflictError, match="already exists") as clash:
        _running(ts, fake, "a")
    assert (clash.value.kind, clash.value.name) == ("domain", "a")
    # A start the backend refuses leaves no record behind, and says why.
    fake.refuse = "no such firmware"
    with pytest.raises(BackendError, match="no such firmware"):
        _running(ts, fake, "b")
    assert [r.name for r in ts.store.list()] == ["a"]
    fake.refuse = None
    # A defined domain starts again under its id.
    cfg = ts.state_dir.parent / "c.cfg"
    cfg.write_text('name = "c"\ntype = "hvm"\nmemory = 64\n')
    defined = sync(ts.define(cfg))
    started = sync(ts.create(cfg, paused=True))
    assert started.domid == defined.domid and started.state == "paused"
    assert fake.world[started.uuid].state == "paused"
    sync(ts.destroy("c"))
    assert ts.get("c").state == SHUTOFF  # defined: kept, shut off


def test_shutdown_reboot_and_the_agent(ts: Toolstack, fake: FakeBackend) -> None:
    a = _running(ts, fake, "a")
    assert sync(ts.wait_ready("a", timeout=5)) >= 0
    assert sync(ts.exec("a", ["echo", "hi"])) == (0, b"echo hi\n", b"")
    sync(ts.pause("a"))
    with pytest.raises(StateError, match="is paused: its guest agent cannot answer"):
        sync(ts.exec("a", ["true"]))
    assert ("agent_exec", a.uuid) not in fake.calls[-2:]
    sync(ts.unpause("a"))
    assert sync(ts.reboot("a")) == "guest reboot"
    fake.agent = False
    assert sync(ts.reboot("a")) == "reset"  # no agent: a hard reset, as xl -F
    assert sync(ts.shutdown("a", timeout=1)) == "shutdown"
    assert ts.store.list() == []  # a clean power off forgets the domain, as xl
    _running(ts, fake, "b")
    fake.stubborn = True
    with pytest.raises(StateError, match=r"did not shut down within 0\.05 s"):
        sync(ts.shutdown("b", timeout=0.05))
    assert "job" not in ts.get("b").extra and ts.get("b").state == "running"
    assert sync(ts.shutdown("b", timeout=0.05, force=True)) == "destroyed"
    assert ts.store.list() == []


def test_memory_bounds_are_the_verbs_and_the_backends(ts: Toolstack, fake: FakeBackend
                                                      ) -> None:
    from xenlab.errors import UsageError
    from xenlab.vm.resources import mem_max, mem_set

    cfg = ts.state_dir.parent / "m.cfg"
    cfg.write_text('name = "m"\ntype = "hvm"\nmemory = 96\nmaxmem = 128\n')
    rec = sync(ts.create(cfg))
    assert fake.world[rec.uuid].started_mib == 128
    report = sync(mem_set(ts, "m", 100))
    assert (report.target_mib, report.actual_mib, report.reached) == (100, 100, True)
    assert fake.world[rec.uuid].memory_mib == 100 and ts.get("m").extra["memory_mib"] == 100
    calls = len(fake.calls)
    with pytest.raises(UsageError, match="above its maxmem of 128 MiB"):
        sync(mem_set(ts, "m", 200))
    with pytest.raises(UsageError, match="below the 64 MiB floor"):
        sync(mem_set(ts, "m", 8))
    with pytest.raises(UsageError, match="below its current memory"):
        sync(mem_max(ts, "m", 90))
    assert len(fake.calls) == calls  # the verbs refused: the backend was not asked
    with pytest.raises(UsageError, match="above the 128 MiB it started with"):
        sync(mem_max(ts, "m", 256))  # the backend refused
    assert "maxmem_mib" not in ts.get("m").extra
    assert sync(mem_max(ts, "m", 110)) == 110 and ts.get("m").extra["maxmem_mib"] == 110
    with pytest.raises(UsageError, match="above its maxmem of 110 MiB"):
        sync(mem_set(ts, "m", 120))


def test_vcpus_through_the_backend(ts: Toolstack, fake: FakeBackend) -> None:
    from xenlab.errors import NotFoundError, UsageError
    from xenlab.vm.resources import vcpu_list, vcpu_pin, vcpu_set

    cfg = ts.state_dir.parent / "v.cfg"
    cfg.write_text('name = "v"\ntype = "hvm"\nmemory = 64\nvcpus = 1\nmaxvcpus = 3\n')
    rec = sync(ts.create(cfg))
    assert sync(vcpu_set(ts, "v", 2)).guest_online == 2
    assert ts.get("v").extra["vcpus"] == 2 and ts.get("v").extra["vcpus_plugged"] == 2
    sync(vcpu_set(ts, "v", 1))
    assert ts.get("v").extra["vcpus_plugged"] == 2  # only grows
    with pytest.raises(UsageError, match="out of range"):
        sync(vcpu_set(ts, "v", 4))
    assert [(r.name, r.domid, r.vcpu, r.state) for r in sync(vcpu_list(ts, "v"))] == [
        ("v", rec.domid, 0, "running"), ("v", rec.domid, 1, "offline"),
        ("v", rec.domid, 2, "offline")]
    assert sync(vcpu_pin(ts, "v", 1, "0")) == {1: frozenset({0})}
    assert sync(vcpu_pin(ts, "v", "all", "0")) == {0: {0}, 1: {0}, 2: {0}}
    with pytest.raises(NotFoundError):
        sync(vcpu_pin(ts, "v", 7, "0"))
    with pytest.raises(UsageError, match="not a vCPU number"):
        sync(vcpu_pin(ts, "v", "x", "0"))


def test_a_missing_capability_is_refused_before_anything_changes() -> None:
    caps = Capabilities(pause=False)
    with pytest.raises(Unsupported, match="the fake backend cannot do it") as err:
        caps.require("pause", "pause a", "fake")
    assert (err.value.backend, err.value.capability) == ("fake", "pause")
    with pytest.raises(ValueError):
        caps.require("fly", "x", "fake")


def test_rename_and_info_through_the_backend(ts: Toolstack, fake: FakeBackend) -> None:
    from xenlab.errors import ConflictError as Taken
    from xenlab.vm import resources

    rec = _running(ts, fake, "a")
    _running(ts, fake, "b")
    renamed = sync(resources.rename(ts, "a", "web"))
    assert renamed.name == "web" and renamed.uuid == rec.uuid
    assert ("rename", rec.uuid) in fake.calls and "qemu_name" not in renamed.extra
    with pytest.raises(Taken):
        sync(resources.rename(ts, "web", "b"))
    out = sync(resources.info(ts, "web"))
    assert (out["name"], out["state"]) == ("web", "running")
    assert out["live"] == {"state": "running", "memory_mib": 64, "vcpus": 1, "disks": {},
                           "nics": []}
    fake.vanish(rec.uuid)  # gone behind our back: info shows the stale record, no live part
    out = sync(resources.info(ts, "web"))
    assert out["live"] is None


def test_save_and_restore_through_the_backend(ts: Toolstack, fake: FakeBackend,
                                              tmp_path: Path) -> None:
    """The verbs own the image (header, checksums, rename, record); the backend its stream."""
    from xenlab.errors import FormatError
    from xenlab.vm.migration.image import check_open
    from xenlab.vm.migration.saverestore import restore, save

    rec = _running(ts, fake, "a")
    fake.world[rec.uuid].memory_mib = 48  # the guest's state, as the backend has it
    image = tmp_path / "a.save"
    header = sync(save(ts, "a", image))
    assert (header.name, header.uuid, header.state, header.qemu_version) == (
        "a", rec.uuid, "running", "fake-1")
    assert ts.store.list() == [] and rec.uuid not in fake.world  # the domain went, released
    assert not list(tmp_path.glob(".a.save.*"))  # no temporary file left
    with open(image, "rb") as f:
        layout, _ = check_open(f.fileno(), str(image))  # a whole, checked image
    assert layout.seed is not None

    back = sync(restore(ts, image, image=object()))
    assert (back.name, back.uuid, back.state) == ("a", rec.uuid, "running")
    assert fake.world[rec.uuid].memory_mib == 48  # the stream carried the guest's state
    assert ("load", rec.uuid) in fake.calls

    # keep_running: the domain goes on, paused stays paused.
    sync(ts.pause("a"))
    again = tmp_path / "b.save"
    assert sync(save(ts, "a", again, keep_running=True)).state == "paused"
    assert ts.get("a").state == "paused" and fake.world[rec.uuid].state == "paused"

    # A damaged image is refused before any domain is made.
    sync(ts.destroy("a"))
    data = bytearray(again.read_bytes())
    data[-100] ^= 0xFF
    again.write_bytes(bytes(data))
    with pytest.raises(FormatError):
        sync(restore(ts, again, image=object()))
    assert ts.store.list() == []


def test_the_console_is_the_backends_stream(ts: Toolstack, fake: FakeBackend) -> None:
    import os

    from xenlab.vm.console import attach

    rec = _running(ts, fake, "a")
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    os.write(w, b"root\n")
    seen = attach(ts.open_console("a"), stdin=r, stdout=out_w, until=b"ROOT", timeout=10)
    assert seen == b"fake login: ROOT\n" and os.read(out_r, 100) == seen
    for fd in (r, w, out_r, out_w):
        os.close(fd)
    assert ("open_console", rec.uuid) in fake.calls
    sync(ts.destroy("a"))
    with pytest.raises(NotFoundError):  # gone, as with xl
        ts.open_console("a")


def test_migrate_between_two_toolstacks_through_the_backend(tmp_path: Path) -> None:
    """The control flow, jobs and records of a local migration over two fake backends."""
    from xenlab.vm.migration.sender import migrate

    src_fake, dst_fake = FakeBackend(), FakeBackend()
    src = Toolstack(tmp_path / "src", backend=src_fake)
    dst = Toolstack(tmp_path / "dst", backend=dst_fake)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0" * 512)  # a kernel in the config: no guest image is built
    cfg = tmp_path / "m.cfg"
    cfg.write_text(f'name = "m"\ntype = "hvm"\nmemory = 64\nkernel = "{kernel}"\n')
    rec = sync(src.create(cfg))
    src_fake.world[rec.uuid].memory_mib = 50  # what the guest's state holds

    res = sync(migrate(src, "m", dst))
    assert res.record is not None and (res.record.name, res.record.uuid) == ("m", rec.uuid)
    assert src.store.list() == [] and rec.uuid not in src_fake.world  # gone here, released
    there = dst_fake.world[rec.uuid]
    assert (there.state, there.memory_mib) == ("running", 50)  # the state travelled
    assert dst.get("m").state == "running" and "job" not in dst.get("m").extra
    assert ("migrate_perform", rec.uuid) in src_fake.calls
    assert ("migrate_finish", rec.uuid) in dst_fake.calls

    # A destination that does not take the stream: the guest runs on at the source.
    back = Toolstack(tmp_path / "back", backend=FakeBackend())
    dst_fake.refuse = "no"
    with pytest.raises(BackendError, match="m still runs here"):
        sync(migrate(dst, "m", back))
    assert dst.get("m").state == "running" and dst_fake.world[rec.uuid].state == "running"
    assert back.store.list() == []  # the half-made destination is gone


def test_a_backend_that_streams_without_the_header_commits_nothing(
        ts: Toolstack, fake: FakeBackend, tmp_path: Path) -> None:
    from xenlab.vm.backend import SaveFacts, SaveRequest
    from xenlab.vm.migration.saverestore import save

    class Headless(FakeBackend):
        async def save(self, h: DomainHandle, req: SaveRequest) -> SaveFacts:
            req.commit()  # no header written: the verb must refuse the image
            return SaveFacts(True, "x")

    headless = Headless()
    ts2 = Toolstack(tmp_path / "state2", backend=headless)
    _running(ts2, headless, "a")
    with pytest.raises(BackendError, match="without its header; nothing saved"):
        sync(save(ts2, "a", tmp_path / "a.save"))
    assert not list(tmp_path.glob("*a.save*")) and ts2.get("a").state == "running"


def test_verbs_a_backend_cannot_do_refuse_before_they_change_anything(
        ts: Toolstack, fake: FakeBackend, tmp_path: Path) -> None:
    from xenlab.vm.snapshot import create_snapshot
    from xenlab.vm.vgaboot import boot_rom

    rec = _running(ts, fake, "a")
    with pytest.raises(Unsupported, match=r"snapshot-create a s1: the fake backend cannot do "
                                          r"it .live disk snapshots"):
        sync(create_snapshot(ts, "a", "s1"))
    assert ts.store.list_snapshots(rec.domid) == [] and "job" not in ts.get("a").extra
    rom = tmp_path / "card.rom"
    rom.write_bytes(b"\x55\xaa" + bytes(510))
    with pytest.raises(Unsupported, match=r"rom boot: the fake backend cannot do it .screen"):
        sync(boot_rom(ts, rom, out_dir=tmp_path / "out"))
    assert not (tmp_path / "out").exists() and [r.name for r in ts.store.list()] == ["a"]
    # QEMU's own paths are for QEMU's domains only.
    with pytest.raises(Unsupported):
        ts.paths(ts.get("a"))


def test_a_killed_migration_to_another_backend_concludes_nothing(ts: Toolstack,
                                                                 fake: FakeBackend,
                                                                 tmp_path: Path) -> None:
    """The destination's backend is in the job: one this command cannot run is not opened
    as QEMU's (its guest may run there), so the source is left paused, as for another host."""
    rec = _running(ts, fake, "a", **{JOB: Job("migrate", 1, 0, {
        "phase": "handing-over", "local": True, "dest": str(tmp_path / "xen-state"),
        "dest_backend": "xen", "guest": "running"}).to_json()})
    fake.world[rec.uuid].state = "paused"  # the stream is complete: the source is stopped
    assert _states(ts) == {"a": "paused"}
    assert ts.get("a").state == "paused" and "job" not in ts.get("a").extra
    assert not (tmp_path / "xen-state").exists()  # never opened as a state directory
    assert fake.world[rec.uuid].alive


def test_within_prefixes_once_and_keeps_the_class() -> None:
    from xenlab.errors import DeviceNotReleased, Refused, XenlabError

    err = Refused("device_add", "busy", "QEMU refused: busy")
    assert str(err.within("block-attach a").within("block-attach a")) == (
        "block-attach a: QEMU refused: busy")
    assert (err.command, err.reason) == ("device_add", "busy")

    class Own(XenlabError):
        def __str__(self) -> str:
            return "its own words"

    assert str(Own().within("verb")) == "its own words"
    gone = DeviceNotReleased("xvdb", 0)
    assert str(gone.within("w")) == "w: the guest did not release device xvdb within 0 s"


def test_a_backend_that_returns_without_committing_saved_nothing(tmp_path: Path) -> None:
    """Review 2: the header check's twin; no image, no temporary file, an error."""
    from xenlab.vm.backend import SaveFacts, SaveRequest
    from xenlab.vm.migration.saverestore import save

    class Uncommitted(FakeBackend):
        async def save(self, h: DomainHandle, req: SaveRequest) -> SaveFacts:
            facts = SaveFacts(True, "fake-1")
            req.header(facts)
            return facts  # no req.commit()

    fake = Uncommitted()
    ts = Toolstack(tmp_path / "state", backend=fake)
    _running(ts, fake, "a")
    with pytest.raises(BackendError, match="without committing the image; nothing was saved"):
        sync(save(ts, "a", tmp_path / "a.save"))
    assert not [p for p in tmp_path.iterdir() if "a.save" in p.name]
    assert ts.get("a").state == "running" and "job" not in ts.get("a").extra


def test_snapshots_follow_a_killed_migration_to_another_backends_toolstack(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review 2: killed after the destination resumed, the destination another backend's:
    the snapshot tree moves there (its store is all that is used), never dropped."""
    from xenlab.vm.migration import sender
    from xenlab.vm.store import SnapshotKind, SnapshotRecord, SnapshotState

    src_fake, dst_fake = FakeBackend(), FakeBackend()
    src = Toolstack(tmp_path / "src", backend=src_fake)
    dst = Toolstack(tmp_path / "dst", backend=dst_fake)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0" * 512)
    cfg = tmp_path / "m.cfg"
    cfg.write_text(f'name = "m"\ntype = "hvm"\nmemory = 64\nkernel = "{kernel}"\n')
    rec = sync(src.create(cfg))
    src.store.add_snapshot(SnapshotRecord(0, rec.domid, "s1", None, 0.0, SnapshotKind.INTERNAL,
                                          state=SnapshotState.READY))
    saved: dict[str, Any] = {}
    real = sender.faults.point

    class Killed(BaseException):
        pass

    def point(name: str) -> None:
        real(name)
        if name == "migrate.handed-over":  # a SIGKILL here leaves the job in the record
            saved["job"] = src.get("m").extra[JOB]
            raise Killed

    monkeypatch.setattr(sender.faults, "point", point)
    with pytest.raises(Killed):
        sync(sender.migrate(src, "m", dst))
    job = dict(saved["job"])
    assert job["detail"]["dest_backend"] == "fake"
    job["since"] = -1  # its owner is gone
    src.store.patch(rec.domid, extra_set={JOB: job})
    sync(src.list())  # the next command finishes the migration
    assert src.store.list() == []
    assert [s.name for s in dst.store.list_snapshots(dst.get("m").domid)] == ["s1"]


def test_a_dry_run_shows_the_backends_command_and_changes_nothing(
        ts: Toolstack, fake: FakeBackend, tmp_path: Path) -> None:
    from xenlab.vm.dryrun import plan_create

    _running(ts, fake, "a")
    cfg = tmp_path / "b.cfg"
    cfg.write_text('name = "b"\ntype = "hvm"\nmemory = 64\n'
                   'vif = ["bridge=br0,vifname=tapb0"]\n')
    plan = sync(plan_create(ts, cfg))
    # The next free id, the backend's own command, and the host end it would bring up.
    assert plan.domid == 2 and plan.argv == ("fake-start", "2", "b", "tap=0:tapb0")
    assert [(v.vifname, v.bridge) for v in plan.vifs] == [("tapb0", "br0")]
    assert [r.name for r in ts.store.list()] == ["a"]
    assert [c for c, _ in fake.calls].count("start") == 1  # only a's


def test_a_command_runs_every_backend_call_on_one_event_loop(
        ts: Toolstack, fake: FakeBackend, tmp_path: Path) -> None:
    from xenlab.cli.loop import command_loop, go
    from xenlab.vm.migration.saverestore import restore, save

    async def save_and_restore(name: str) -> None:
        await ts.pause(name)
        await ts.unpause(name)
        await save(ts, name, tmp_path / f"{name}.save")
        await restore(ts, tmp_path / f"{name}.save")

    _running(ts, fake, "a")
    sync(save_and_restore("a"))  # one verb: every backend call on its one loop
    assert len(fake.loops) == 1
    fake.loops.clear()
    _running(ts, fake, "b")
    with command_loop():  # as the CLI runs every `xenlab vm` command: verb after verb
        go(ts.pause("b"))
        go(ts.unpause("b"))
        go(save(ts, "b", tmp_path / "b.save"))
        go(restore(ts, tmp_path / "b.save"))
    assert len(fake.loops) == 1
    assert ts.get("b").state == "running"


def test_two_tasks_of_one_process_take_a_domains_lock_in_turn(
        ts: Toolstack, fake: FakeBackend) -> None:
    # The lock is re-entrant for its holder only: a second task (a library running verbs
    # with asyncio.gather) waits, as a second process does.
    import asyncio

    _running(ts, fake, "a")
    fake.aslow = 0.2

    async def three() -> list[object]:
        return list(await asyncio.gather(ts.pause("a"), ts.unpause("a"), ts.pause("a"),
                                         return_exceptions=True))

    assert sync(three()) == [None, None, None]
    assert fake.peak == 1  # never two verbs inside the domain at once
    assert fake.world[ts.get("a").uuid].state == "paused"


def test_a_cancel_ends_a_verb_waiting_for_a_lock_at_once(
        ts: Toolstack, fake: FakeBackend) -> None:
    # Ctrl-C under the CLI's loop is a cancel: a verb waiting for another command's lock
    # must end then, before it does anything, not once it has the lock.
    import asyncio

    from xenlab.vm.store import Store

    rec = _running(ts, fake, "a")
    other = Store(ts.state_dir)  # another command's hold: its own descriptor

    async def go() -> float:
        with other.lock(rec.domid):
            task = asyncio.create_task(ts.pause("a"))
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return time.monotonic() - t0

    assert sync(go()) < 0.2
    assert "pause" not in [c for c, _ in fake.calls]
    other.close()


def test_a_cancel_ends_a_shutdown_waiting_for_the_guest_at_once(
        ts: Toolstack, fake: FakeBackend) -> None:
    import asyncio

    _running(ts, fake, "a")
    fake.stubborn = True  # the guest ignores the button: the verb waits

    async def go() -> float:
        task = asyncio.create_task(ts.shutdown("a", timeout=30))
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return time.monotonic() - t0

    assert sync(go()) < 0.3
    assert ts.get("a").state == "running" and JOB not in ts.get("a").extra
