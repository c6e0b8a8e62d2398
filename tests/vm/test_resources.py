"""vm.resources on real guests (TCG): mem-set/-max, vcpu-set/-list/-pin, cpus=, rename, info."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.aio import sync
from tests.vm.guests import clear, wait_ready, write_config
from xenlab.errors import XenlabError
from xenlab.vm import resources as res
from xenlab.vm.domain import Toolstack
from xenlab.vm.store import is_alive

pytestmark = pytest.mark.integration

HOST_CPUS = frozenset(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(
    not {0, 1} <= HOST_CPUS, reason="pinning tests use host CPUs 0 and 1"
)


def _cfg(tmp_path: Path, name: str, *, memory: int = 192, maxmem: int = 256, vcpus: int = 1,
         maxvcpus: int = 3, extra: str = "", disk: str | None = None) -> Path:
    return write_config(tmp_path, name, stem=disk, memory=memory, maxmem=maxmem, vcpus=vcpus,
                        maxvcpus=maxvcpus, mkfs=False, tail=extra)


@pytest.fixture
def ts(tmp_path: Path, guest_image: object) -> Iterator[Toolstack]:
    t = Toolstack(tmp_path / "state")
    yield t
    for rec in t.store.list():
        # A renamed domain's QEMU runs under its old name: kill it by pid
        # whatever the store thinks of it.
        if rec.pid is not None:
            try:
                cmdline = Path(f"/proc/{rec.pid}/cmdline").read_bytes()
            except OSError:
                cmdline = b""
            if b"qemu-system" in cmdline:
                os.kill(rec.pid, signal.SIGKILL)
    clear(t)


def _gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie waiting for init counts as gone)."""
    try:
        return not Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def _memtotal_kib(ts: Toolstack, name: str) -> int:
    code, out, err = sync(ts.exec(name, ["sh", "-c", "grep MemTotal /proc/meminfo"]))
    assert code == 0, err
    return int(out.split()[1])


def _balloon(ts: Toolstack, name: str) -> int:
    reply = asyncio.run(ts.qmp_execute(ts.get(name), "query-balloon"))
    assert isinstance(reply, dict)
    return int(reply["actual"])


def _nproc(ts: Toolstack, name: str) -> int:
    code, out, _ = sync(ts.exec(name, ["nproc"]))
    assert code == 0
    return int(out)


def _threads(ts: Toolstack, name: str) -> dict[int, int]:
    """vCPU index -> host thread id, straight from QMP."""
    reply = asyncio.run(ts.qmp_execute(ts.get(name), "query-cpus-fast"))
    assert isinstance(reply, list)
    return {int(c["cpu-index"]): int(c["thread-id"]) for c in reply}


def test_mem_set_the_guest_reports_the_new_total(ts: Toolstack, tmp_path: Path) -> None:
    sync(ts.create(_cfg(tmp_path, "m1"), create_disks="32M"))
    wait_ready(ts, "m1")
    # create set the balloon to memory=192; wait for the guest to get there.
    first = sync(res.mem_set(ts, "m1", 192))
    assert first.reached and first.actual_mib == 192
    before = _memtotal_kib(ts, "m1")
    assert first.guest_total_kib == before

    got = sync(res.mem_set(ts, "m1", 128))
    assert got.reached and (got.target_mib, got.actual_mib) == (128, 128)
    assert _balloon(ts, "m1") == 128 << 20
    after = _memtotal_kib(ts, "m1")
    assert got.guest_total_kib == after
    # The balloon takes exactly the difference out of the guest's MemTotal.
    assert before - after == 64 * 1024
    assert ts.get("m1").extra["memory_mib"] == 128

    # Up again, within maxmem (256): the guest gets the memory back.
    up = sync(res.mem_set(ts, "m1", 224))
    assert up.reached and _balloon(ts, "m1") == 224 << 20
    assert _memtotal_kib(ts, "m1") - after == 96 * 1024

    # Above maxmem: refused, naming both, and nothing changes.
    with pytest.raises(XenlabError, match=r"mem-set 300 MiB is above its maxmem of 256 MiB"):
        sync(res.mem_set(ts, "m1", 300))
    with pytest.raises(XenlabError, match="below the 64 MiB floor"):
        sync(res.mem_set(ts, "m1", 16))
    assert _balloon(ts, "m1") == 224 << 20
    assert ts.get("m1").extra["memory_mib"] == 224

    # mem-max: lowers the ceiling for later mem-sets; cannot pass QEMU's -m
    # size (a restart is needed) nor go below the current memory.
    with pytest.raises(XenlabError, match=r"256 MiB its QEMU was started with.*restart"):
        sync(res.mem_max(ts, "m1", 512))
    with pytest.raises(XenlabError, match=r"below its current memory \(224 MiB\)"):
        sync(res.mem_max(ts, "m1", 200))
    assert sync(res.mem_max(ts, "m1", 240)) == 240
    with pytest.raises(XenlabError, match="above its maxmem of 240 MiB"):
        sync(res.mem_set(ts, "m1", 250))
    assert _balloon(ts, "m1") == 224 << 20
    assert sync(res.info(ts, "m1"))["config"]["maxmem_mib"] == 240


@needs_two_cpus
def test_vcpu_set_list_and_pin(ts: Toolstack, tmp_path: Path) -> None:
    rec = sync(ts.create(_cfg(tmp_path, "v1", vcpus=1, maxvcpus=3), create_disks="32M"))
    assert rec.pid is not None
    wait_ready(ts, "v1")
    assert _nproc(ts, "v1") == 1

    up = sync(res.vcpu_set(ts, "v1", 3))
    assert (up.vcpus, up.guest_online, up.guest_cpus) == (3, 3, "0-2")
    assert _nproc(ts, "v1") == 3
    threads = _threads(ts, "v1")
    assert sorted(threads) == [0, 1, 2]

    rows = sync(res.vcpu_list(ts, "v1"))
    assert [(r.name, r.domid, r.vcpu) for r in rows] == [("v1", rec.domid, i) for i in range(3)]
    for r in rows:
        # Real threads of this QEMU, with their real affinity and counters.
        assert r.thread_id == threads[r.vcpu]
        assert Path(f"/proc/{rec.pid}/task/{r.thread_id}").is_dir()
        assert r.affinity == frozenset(os.sched_getaffinity(r.thread_id))
        assert r.cpu in HOST_CPUS and r.time_s >= 0
        assert r.state in ("running", "blocked")
    text = res.format_vcpu_list(rows)
    assert text.splitlines()[0].startswith("Name") and len(text.splitlines()) == 4

    # Down: the guest offlines the highest CPUs; nproc follows.
    down = sync(res.vcpu_set(ts, "v1", 1))
    assert (down.guest_online, down.guest_cpus) == (1, "0")
    assert _nproc(ts, "v1") == 1
    assert [r.state for r in sync(res.vcpu_list(ts, "v1"))][1:] == ["offline", "offline"]
    assert sync(res.vcpu_set(ts, "v1", 2)).guest_online == 2
    assert _nproc(ts, "v1") == 2
    for bad in (0, 4):
        with pytest.raises(XenlabError, match=r"out of range: it has maxvcpus=3"):
            sync(res.vcpu_set(ts, "v1", bad))
    assert _nproc(ts, "v1") == 2

    # Pinning changes exactly that thread's affinity.
    assert sync(res.vcpu_pin(ts, "v1", 1, "0")) == {1: frozenset({0})}
    assert os.sched_getaffinity(threads[1]) == {0}
    assert os.sched_getaffinity(threads[0]) == HOST_CPUS
    assert sync(res.vcpu_pin(ts, "v1", "1", "1")) == {1: frozenset({1})}
    assert os.sched_getaffinity(threads[1]) == {1}
    assert [r.affinity for r in sync(res.vcpu_list(ts, "v1"))][1] == {1}
    sync(res.vcpu_pin(ts, "v1", "all", "0-1,^1"))
    assert {os.sched_getaffinity(t) == {0} for t in threads.values()} == {True}
    with pytest.raises(XenlabError, match="no vCPU 7"):
        sync(res.vcpu_pin(ts, "v1", 7, "0"))
    with pytest.raises(XenlabError, match="names CPU 4096"):
        sync(res.vcpu_pin(ts, "v1", 0, "4096"))

    # Paused: the rows say so.
    sync(ts.pause("v1"))
    assert {r.state for r in sync(res.vcpu_list(ts, "v1"))} == {"paused", "offline"}


@needs_two_cpus
def test_cpus_in_the_config_pins_every_vcpu_at_create(ts: Toolstack, tmp_path: Path) -> None:
    rec = sync(ts.create(_cfg(tmp_path, "p1", vcpus=2, maxvcpus=3, extra='cpus = "0"\n'),
                    create_disks="32M"))
    assert rec.pid is not None  # pinned by create itself (the backend's start)
    assert {v: os.sched_getaffinity(t) for v, t in _threads(ts, "p1").items()} == {
        0: {0}, 1: {0}}
    # A vCPU plugged later gets the config's affinity too.
    wait_ready(ts, "p1")
    assert sync(res.vcpu_set(ts, "p1", 3)).guest_online == 3
    assert os.sched_getaffinity(_threads(ts, "p1")[2]) == {0}

    # The list form: one spec per vCPU, the rest left alone.
    rec2 = sync(ts.create(_cfg(tmp_path, "p2", vcpus=2, maxvcpus=2, extra='cpus = ["1"]\n'),
                     create_disks="32M", paused=True))
    assert rec2.state == "paused"  # pinned before the guest ever ran
    t2 = _threads(ts, "p2")
    assert (os.sched_getaffinity(t2[0]), os.sched_getaffinity(t2[1])) == ({1}, HOST_CPUS)
    # No cpus=: nothing is pinned.
    sync(ts.create(_cfg(tmp_path, "p3", vcpus=1, maxvcpus=1), create_disks="32M", paused=True))
    assert {frozenset(os.sched_getaffinity(t)) for t in _threads(ts, "p3").values()} == {
        HOST_CPUS}


def test_rename_frees_the_old_name(ts: Toolstack, tmp_path: Path) -> None:
    rec = sync(ts.create(_cfg(tmp_path, "r1"), create_disks="32M", paused=True))
    assert rec.pid is not None
    other = sync(ts.create(_cfg(tmp_path, "r2"), create_disks="32M", paused=True))
    with pytest.raises(XenlabError, match="a domain named 'r2' already exists"):
        sync(res.rename(ts, "r1", "r2"))
    for bad in ("", "12", "a b", 'x"y'):
        with pytest.raises(XenlabError, match="is not usable"):
            sync(res.rename(ts, "r1", bad))
    assert ts.get("r1").domid == rec.domid

    new = sync(res.rename(ts, "r1", "renamed"))
    assert (new.domid, new.name) == (rec.domid, "renamed")
    assert ts.get("renamed").domid == rec.domid
    with pytest.raises(XenlabError, match="no domain named 'r1'"):
        ts.get("r1")
    # The stored config says the new name; QEMU's process keeps the old one.
    assert ts.config_of(ts.get("renamed"))[0].name == "renamed"
    assert ts.get("renamed").extra["qemu_name"] == "r1"
    assert b"guest=r1," in Path(f"/proc/{rec.pid}/cmdline").read_bytes()
    # The old name is free: a new domain can take it.
    again = sync(ts.create(_cfg(tmp_path, "r1", disk="r1b"), create_disks="32M", paused=True))
    assert again.name == "r1" and again.domid not in (rec.domid, other.domid)
    with pytest.raises(XenlabError, match="already exists"):
        sync(res.rename(ts, "renamed", "r1"))
    # Renaming back to QEMU's own name drops the note.
    sync(ts.destroy("r1"))
    assert "qemu_name" not in sync(res.rename(ts, "renamed", "r1")).extra


def test_renamed_domain_is_still_its_qemu(ts: Toolstack, tmp_path: Path) -> None:
    """The store must match a renamed record to its QEMU (run under the old name)."""
    rec = sync(ts.create(_cfg(tmp_path, "n1"), create_disks="32M", paused=True))
    sync(res.rename(ts, "n1", "n2"))
    renamed = ts.get("n2")
    assert is_alive(renamed)
    sync(ts.unpause("n2"))
    assert sync(res.info(ts, "n2"))["live"]["status"] == "running"
    sync(ts.destroy("n2"))
    assert not is_alive(renamed) and ts.store.list() == []
    assert rec.pid is not None and _gone(rec.pid)


def test_info_has_the_live_facts(ts: Toolstack, tmp_path: Path) -> None:
    rec = sync(ts.create(_cfg(tmp_path, "i1", vcpus=2, maxvcpus=3), create_disks="32M",
                         paused=True))
    out = sync(res.info(ts, "i1"))
    assert (out["domid"], out["name"], out["state"], out["pid"]) == (
        rec.domid, "i1", "paused", rec.pid)
    assert out["config"] == {"memory_mib": 192, "maxmem_mib": 256, "vcpus": 2,
                             "maxvcpus": 3, "cpus": None}
    live = out["live"]
    assert (live["status"], live["accelerator"], live["memory_mib"]) == ("prelaunch", "tcg", 256)
    assert live["maxvcpus"] == 3
    assert [v["vcpu"] for v in live["vcpus"]] == [0, 1]
    assert all(Path(f"/proc/{rec.pid}/task/{v['thread_id']}").is_dir() for v in live["vcpus"])
    (disk,) = live["block"]
    assert (disk["node"], disk["file"], disk["format"], disk["read_only"]) == (
        "xvda-fmt", str(tmp_path / "i1.qcow2"), "qcow2", False)
    assert {"qga0", "console0"} <= {c["label"] for c in live["chardevs"]}
    # A domain whose QEMU is gone: the record, no live facts.
    assert rec.pid is not None
    os.kill(rec.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while is_alive(rec) and time.monotonic() < deadline:
        time.sleep(0.05)
    gone = sync(res.info(ts, "i1"))
    assert gone["state"] == "stale (QEMU gone)" and gone["live"] is None
