"""Device verbs over the in-memory backend: block-attach/-detach, cd-insert/-eject,
network-attach/-detach and their recovery run their record, job and lock logic through
the Backend protocol alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.aio import sync
from tests.vm.fakebackend import FakeBackend
from xenlab import hotplug
from xenlab.errors import BackendError, ConflictError, NotFoundError, UsageError
from xenlab.vm.disks import block_attach, block_detach, block_list, cd_eject, cd_insert
from xenlab.vm.domain import Toolstack
from xenlab.vm.jobs import Job
from xenlab.vm.network import network_attach, network_detach, network_list
from xenlab.vm.runtime import DISK_PATHS, JOB, STALE_NODES, VIFS, Runtime
from xenlab.vm.store import DomainRecord


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def ts(tmp_path: Path, fake: FakeBackend) -> Toolstack:
    return Toolstack(tmp_path / "state", backend=fake)


def _running(ts: Toolstack, name: str, extra_lines: str = "") -> DomainRecord:
    cfg = ts.state_dir.parent / f"{name}.cfg"
    cfg.write_text(f'name = "{name}"\ntype = "hvm"\nmemory = 64\n{extra_lines}')
    return sync(ts.create(cfg))


def _image(tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    path.write_bytes(b"\0" * 65536)
    return str(path)


def _vdevs(ts: Toolstack, name: str) -> list[str]:
    return [d.vdev for d in block_list(ts, name)]


def test_attach_and_detach_follow_the_backend(ts: Toolstack, fake: FakeBackend,
                                              tmp_path: Path) -> None:
    rec = _running(ts, "a")
    data = _image(tmp_path, "data.img")
    info = sync(block_attach(ts, "a", f"format=raw,vdev=xvdb,access=rw,target={data}"))
    assert (info.vdev, info.file, info.slot) == ("xvdb", data, 0x21)  # the backend's slot
    assert fake.world[rec.uuid].disks == {"xvdb": data}
    assert _vdevs(ts, "a") == ["xvdb"] and JOB not in ts.get("a").extra
    # The record's disk list survives as xl config (a restart gets the disk).
    assert f"target={data}" in ts.get("a").config_text

    with pytest.raises(ConflictError):
        sync(block_attach(ts, "a", f"format=raw,vdev=xvdb,access=rw,target={data}"))
    assert [c for c in fake.calls if c[0] == "attach_disk"] == [("attach_disk", rec.uuid)]

    gone = sync(block_detach(ts, "a", "xvdb"))
    assert gone.vdev == "xvdb" and fake.world[rec.uuid].disks == {}
    assert fake.world[rec.uuid].parts == set()  # released
    assert _vdevs(ts, "a") == [] and STALE_NODES not in ts.get("a").extra
    with pytest.raises(NotFoundError):
        sync(block_detach(ts, "a", "xvdb"))


def test_a_refused_attach_keeps_nothing(ts: Toolstack, fake: FakeBackend,
                                        tmp_path: Path) -> None:
    rec = _running(ts, "a")
    fake.refuse = "no room on the bus"
    target = tmp_path / "new.qcow2"
    with pytest.raises(BackendError, match="block-attach a: disk xvdc: fake refused the disk"):
        sync(block_attach(ts, "a", f"format=qcow2,vdev=xvdc,access=rw,target={target}",
                     create_size="16M"))
    assert not target.exists()  # the image it made for the disk is gone again
    assert _vdevs(ts, "a") == [] and fake.world[rec.uuid].disks == {}
    assert JOB not in ts.get("a").extra
    with pytest.raises(UsageError, match="only virtio disks"):
        sync(block_attach(ts, "a", f"format=raw,vdev=hdb,access=rw,target={target}"))


def test_a_guest_that_keeps_the_disk_keeps_it_in_the_record(ts: Toolstack, fake: FakeBackend,
                                                            tmp_path: Path) -> None:
    rec = _running(ts, "a")
    sync(block_attach(ts, "a", f"format=raw,vdev=xvdb,access=rw,target={_image(tmp_path, 'd')}"))
    fake.clingy = True
    with pytest.raises(BackendError, match="did not release it within 0 s"):
        sync(block_detach(ts, "a", "xvdb", timeout=0))
    assert _vdevs(ts, "a") == ["xvdb"] and "xvdb" in fake.world[rec.uuid].disks
    fake.clingy = False  # the guest lets go: detach again finishes
    sync(block_detach(ts, "a", "xvdb"))
    assert _vdevs(ts, "a") == []


def test_parts_the_backend_keeps_wait_for_the_next_attach(ts: Toolstack, fake: FakeBackend,
                                                           tmp_path: Path) -> None:
    rec = _running(ts, "a")
    disk = f"format=raw,vdev=xvdb,access=rw,target={_image(tmp_path, 'd')}"
    sync(block_attach(ts, "a", disk))
    fake.sticky = True
    sync(block_detach(ts, "a", "xvdb"))  # detached; the clean-up fails and is recorded
    assert _vdevs(ts, "a") == []
    assert Runtime.of(ts.get("a")).stale_nodes == {"xvdb": ("xvdb-part",)}
    with pytest.raises(BackendError, match="fake keeps parts of an earlier xvdb"):
        sync(block_attach(ts, "a", disk))
    fake.sticky = False
    sync(block_attach(ts, "a", disk))  # the leftovers go first, then the disk
    assert STALE_NODES not in ts.get("a").extra and fake.world[rec.uuid].parts == set()


def test_a_killed_attach_is_finished_or_undone(ts: Toolstack, fake: FakeBackend,
                                               tmp_path: Path) -> None:
    rec = _running(ts, "a")
    data = _image(tmp_path, "d")
    spec = f"format=raw,vdev=xvdb,access=rw,target={data}"
    # Killed after the backend had the device, before the record said so: finished.
    fake.world[rec.uuid].disks["xvdb"] = data
    ts.store.patch(rec.domid, extra_set={JOB: Job("block-attach", 1, 0, {
        "spec": spec, "nodes": ["xvdb-part"], "created": None}).to_json()})
    assert _vdevs(ts, "a") == []  # block-list reads the record; converge is the next verb's
    sync(ts.pause("a"))
    assert _vdevs(ts, "a") == ["xvdb"] and JOB not in ts.get("a").extra

    # Killed before the backend had the device: its parts and the image it made go.
    made = _image(tmp_path, "made.img")
    fake.world[rec.uuid].parts.add("xvdc-part")
    ts.store.patch(rec.domid, extra_set={JOB: Job("block-attach", 1, 0, {
        "spec": f"format=raw,vdev=xvdc,access=rw,target={made}", "nodes": ["xvdc-part"],
        "created": made}).to_json()})
    sync(ts.unpause("a"))
    assert _vdevs(ts, "a") == ["xvdb"] and not Path(made).exists()
    assert fake.world[rec.uuid].parts == set() and ("discard_disk", rec.uuid) in fake.calls


def test_a_killed_detach_is_finished_when_the_guest_let_go(ts: Toolstack, fake: FakeBackend,
                                                            tmp_path: Path) -> None:
    rec = _running(ts, "a")
    sync(block_attach(ts, "a", f"format=raw,vdev=xvdb,access=rw,target={_image(tmp_path, 'd')}"))
    sync(block_attach(ts, "a", f"format=raw,vdev=xvdc,access=rw,target={_image(tmp_path, 'e')}"))
    del fake.world[rec.uuid].disks["xvdb"]  # the guest let xvdb go; the verb was killed
    ts.store.patch(rec.domid, extra_set={JOB: Job("block-detach", 1, 0,
                                                  {"vdev": "xvdb"}).to_json()})
    sync(ts.pause("a"))
    assert _vdevs(ts, "a") == ["xvdc"]
    assert Runtime.of(ts.get("a")).stale_nodes == {"xvdb": ("xvdb-part",)}
    # Killed while the guest still has it: the record is true as it is.
    ts.store.patch(rec.domid, extra_set={JOB: Job("block-detach", 1, 0,
                                                  {"vdev": "xvdc"}).to_json()})
    sync(ts.unpause("a"))
    assert _vdevs(ts, "a") == ["xvdc"] and JOB not in ts.get("a").extra


def test_cd_insert_and_eject(ts: Toolstack, fake: FakeBackend, tmp_path: Path) -> None:
    rec = _running(ts, "a", 'disk = [ ",raw,hdc,cdrom" ]\n')
    iso = _image(tmp_path, "install.iso")
    info = sync(cd_insert(ts, "a", "hdc", iso))
    assert (info.vdev, info.file, info.device) == ("hdc", iso, "ide-cd")
    assert fake.world[rec.uuid].disks["hdc"] == iso
    assert sync(cd_eject(ts, "a", "hdc")).file is None and fake.world[rec.uuid].disks["hdc"] is None
    with pytest.raises(NotFoundError, match="no cdrom hdd"):
        sync(cd_insert(ts, "a", "hdd", iso))
    with pytest.raises(UsageError, match="does not exist"):
        sync(cd_insert(ts, "a", "hdc", str(tmp_path / "missing.iso")))


def _devids(ts: Toolstack, name: str) -> list[int]:
    return [n.devid for n in network_list(ts, name)]


def test_network_attach_and_detach_follow_the_backend(ts: Toolstack,
                                                      fake: FakeBackend) -> None:
    rec = _running(ts, "a", 'vif = [ "" ]\n')
    assert fake.world[rec.uuid].nics == {0}
    info = sync(network_attach(ts, "a", ["bridge=xenbr9"]))
    assert (info.devid, info.bridge) == (1, "xenbr9")
    assert fake.world[rec.uuid].nics == {0, 1} and _devids(ts, "a") == [0, 1]
    (end,) = Runtime.of(ts.get("a")).vifs  # the host end the backend brought up is recorded
    assert end["devid"] == 1 and end["vifname"] in fake.ends_up
    assert JOB not in ts.get("a").extra
    with pytest.raises(ConflictError, match="devid 1 is taken"):
        sync(network_attach(ts, "a", ["devid=1"]))
    with pytest.raises(ConflictError, match="MAC"):
        sync(network_attach(ts, "a", [f"mac={info.mac}"]))

    assert sync(network_detach(ts, "a", "1")).devid == 1
    assert fake.world[rec.uuid].nics == {0} and fake.ends_up == set()
    assert _devids(ts, "a") == [0] and VIFS not in ts.get("a").extra
    assert sync(network_detach(ts, "a", "0")).devid == 0
    assert _devids(ts, "a") == []
    with pytest.raises(NotFoundError):
        sync(network_detach(ts, "a", "0"))


def test_a_refused_nic_leaves_no_host_end(ts: Toolstack, fake: FakeBackend) -> None:
    rec = _running(ts, "a")
    fake.refuse = "no slot"
    with pytest.raises(BackendError, match="network-attach a: fake refused the NIC: no slot"):
        sync(network_attach(ts, "a", ["bridge=xenbr9"]))
    assert fake.world[rec.uuid].nics == set() and fake.ends_up == set()
    assert _devids(ts, "a") == [] and JOB not in ts.get("a").extra


def test_a_nic_the_guest_keeps_and_a_host_end_that_will_not_go(ts: Toolstack,
                                                               fake: FakeBackend) -> None:
    rec = _running(ts, "a")
    sync(network_attach(ts, "a", ["bridge=xenbr9"]))
    fake.clingy = True
    with pytest.raises(BackendError, match="did not release vif 0 within 0 s"):
        sync(network_detach(ts, "a", "0", timeout=0))
    assert _devids(ts, "a") == [0] and fake.world[rec.uuid].nics == {0}
    fake.clingy, fake.sticky = False, True
    sync(network_detach(ts, "a", "0"))  # detached; taking its host end down fails
    assert _devids(ts, "a") == []
    (left,) = Runtime.of(ts.get("a")).vifs  # kept for the next attach to take down
    assert left["vifname"] in fake.ends_up
    fake.sticky = False
    sync(network_attach(ts, "a", ["bridge=xenbr9"]))
    (now,) = Runtime.of(ts.get("a")).vifs
    assert fake.ends_up == {now["vifname"]}  # the old end went first; only the new is up


def test_a_killed_network_attach_or_detach_converges(ts: Toolstack,
                                                     fake: FakeBackend) -> None:
    rec = _running(ts, "a")
    # An attach killed after the backend had the NIC and its host end: finished.
    end = hotplug.vif_to_json(hotplug.Vif(rec.domid, 0, "fkend.0", bridge="xenbr9"))
    fake.world[rec.uuid].nics.add(0)
    fake.ends_up.add("fkend.0")
    spec = "bridge=xenbr9,devid=0,mac=00:16:3e:00:00:10"
    ts.store.patch(rec.domid, extra_set={JOB: Job("network-attach", 1, 0, {
        "spec": spec, "vif": end}).to_json()})
    sync(ts.pause("a"))
    assert _devids(ts, "a") == [0] and Runtime.of(ts.get("a")).vifs == (end,)
    # One killed before the guest had it: the host end it brought up goes.
    fake.ends_up.add("fkend.1")
    end1 = hotplug.vif_to_json(hotplug.Vif(rec.domid, 1, "fkend.1", bridge="xenbr9"))
    ts.store.patch(rec.domid, extra_set={JOB: Job("network-attach", 1, 0, {
        "spec": "bridge=xenbr9,devid=1,mac=00:16:3e:00:00:11", "vif": end1}).to_json()})
    sync(ts.unpause("a"))
    assert _devids(ts, "a") == [0] and fake.ends_up == {"fkend.0"}
    assert ("discard_nic", rec.uuid) in fake.calls
    # A detach killed after the guest let the NIC go: the record drops it.
    fake.world[rec.uuid].nics.discard(0)
    ts.store.patch(rec.domid, extra_set={JOB: Job("network-detach", 1, 0,
                                                  {"devid": 0}).to_json()})
    sync(ts.pause("a"))
    assert _devids(ts, "a") == [] and JOB not in ts.get("a").extra


def test_mirror_through_the_backend(ts: Toolstack, fake: FakeBackend, tmp_path: Path) -> None:
    from xenlab.vm.mirror import mirror

    data = _image(tmp_path, "d.img")
    Path(data).write_bytes(b"guest data" * 100)
    rec = _running(ts, "a", f'disk = [ "format=raw,vdev=xvda,access=rw,target={data}" ]\n')
    copy = tmp_path / "copy.img"
    res = sync(mirror(ts, "a", "xvda", copy, format="raw", pivot=False))
    assert (res.pivoted, res.bytes) == (False, 1000) and copy.read_bytes() == b"guest data" * 100
    assert fake.world[rec.uuid].disks["xvda"] == data and DISK_PATHS not in ts.get("a").extra
    moved = tmp_path / "moved.img"
    res = sync(mirror(ts, "a", "xvda", moved, format="raw"))
    assert res.pivoted and fake.world[rec.uuid].disks["xvda"] == str(moved)
    assert Runtime.of(ts.get("a")).moved["xvda"].file == str(moved)
    assert [d.file for d in block_list(ts, "a")] == [str(moved)]
    assert JOB not in ts.get("a").extra
    with pytest.raises(ConflictError):  # the target must be new
        sync(mirror(ts, "a", "xvda", moved, format="raw"))
    fake.refuse = "busy"
    with pytest.raises(BackendError, match="fake refused the copy: busy; a still runs on"):
        sync(mirror(ts, "a", "xvda", tmp_path / "third.img", format="raw"))
    assert not (tmp_path / "third.img").exists() and JOB not in ts.get("a").extra


class _InterruptedCopy(FakeBackend):
    """A copy the user interrupts (Ctrl-C) after the backend did ``pivot`` or not."""

    async def block_copy(self, h, req, note):  # type: ignore[no-untyped-def]
        await super().block_copy(h, req, note)
        raise KeyboardInterrupt


@pytest.mark.parametrize("pivot", [True, False])
def test_an_interrupted_mirror_is_settled_before_it_lets_go(tmp_path: Path, pivot: bool) -> None:
    """The review's case: Ctrl-C after the pivot must leave the record on the target (the
    guest writes there), and without a pivot no target behind."""
    from xenlab.vm.mirror import mirror

    fake = _InterruptedCopy()
    ts = Toolstack(tmp_path / "state", backend=fake)
    data = _image(tmp_path, "d.img")
    rec = _running(ts, "a", f'disk = [ "format=raw,vdev=xvda,access=rw,target={data}" ]\n')
    target = tmp_path / "moved.img"
    with pytest.raises(KeyboardInterrupt):
        sync(mirror(ts, "a", "xvda", target, format="raw", pivot=pivot))
    now = ts.get("a")
    assert JOB not in now.extra
    if pivot:
        assert fake.world[rec.uuid].disks["xvda"] == str(target)
        assert Runtime.of(now).moved["xvda"].file == str(target)  # where the guest writes
        assert [d.file for d in block_list(ts, "a")] == [str(target)]
    else:
        assert fake.world[rec.uuid].disks["xvda"] == data and not target.exists()
        assert DISK_PATHS not in now.extra


def test_ctrl_c_between_the_pivot_and_its_record_is_settled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review 2: the copy returned, the record not yet written: still settled."""
    from xenlab import faults
    from xenlab.vm import mirror as mirror_mod

    fake = FakeBackend()
    ts = Toolstack(tmp_path / "state", backend=fake)
    data = _image(tmp_path, "d.img")
    rec = _running(ts, "a", f'disk = [ "format=raw,vdev=xvda,access=rw,target={data}" ]\n')
    target = tmp_path / "moved.img"
    real = faults.point

    def point(name: str) -> None:
        real(name)
        if name == "mirror.recording":
            raise KeyboardInterrupt

    monkeypatch.setattr(mirror_mod.faults, "point", point)
    with pytest.raises(KeyboardInterrupt):
        sync(mirror_mod.mirror(ts, "a", "xvda", target, format="raw"))
    now = ts.get("a")
    assert fake.world[rec.uuid].disks["xvda"] == str(target)
    assert Runtime.of(now).moved["xvda"].file == str(target) and JOB not in now.extra


class _SettleFailsOnce(_InterruptedCopy):
    """Interrupted after the pivot; the settle then fails once (``second``)."""

    second: BaseException | None = None

    async def end_block_copy(self, h, vdev, source, target, *, complete):  # type: ignore[no-untyped-def]
        if self.second is not None:
            err, self.second = self.second, None
            raise err
        return await super().end_block_copy(h, vdev, source, target, complete=complete)


@pytest.mark.parametrize("second", [KeyboardInterrupt(), BackendError("QMP timed out")],
                         ids=["second-ctrl-c", "backend-error"])
def test_a_settle_that_fails_hands_the_job_to_the_next_command(
        tmp_path: Path, second: BaseException) -> None:
    """Review 2: the job is not dropped with the block; the next command finds the pivot."""
    from xenlab.vm.jobs import job_of
    from xenlab.vm.mirror import mirror

    fake = _SettleFailsOnce()
    fake.second = second
    ts = Toolstack(tmp_path / "state", backend=fake)
    data = _image(tmp_path, "d.img")
    rec = _running(ts, "a", f'disk = [ "format=raw,vdev=xvda,access=rw,target={data}" ]\n')
    target = tmp_path / "moved.img"
    with pytest.raises(KeyboardInterrupt):
        sync(mirror(ts, "a", "xvda", target, format="raw"))
    job = job_of(ts.get("a"))
    assert job is not None and job.verb == "mirror" and not job.owner_alive()
    assert sync(ts.list())[0].record.name == "a"  # the next command converges it
    now = ts.get("a")
    assert Runtime.of(now).moved["xvda"].file == str(target) and JOB not in now.extra
    assert fake.world[rec.uuid].disks["xvda"] == str(target)
