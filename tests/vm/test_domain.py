"""vm.domain and ``xenlab vm``: real guests under QEMU (TCG), end to end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.aio import sync
from tests.clirun import run_cli
from tests.vm.guests import wait_ready, write_config
from xenlab.errors import StateError, XenlabError
from xenlab.vm.domain import Toolstack
from xenlab.vm.store import is_alive

pytestmark = pytest.mark.integration


def _cfg(tmp_path: Path, name: str = "g1", memory: int = 192, maxmem: int = 256) -> Path:
    return write_config(tmp_path, name, memory=memory, maxmem=maxmem, mkfs=False)


def test_lifecycle(ts: Toolstack, tmp_path: Path) -> None:
    rec = sync(ts.create(_cfg(tmp_path), create_disks="32M"))
    assert rec.domid == 1 and rec.state == "running" and is_alive(rec)
    wait_ready(ts, "g1")
    code, out, _ = sync(ts.exec("g1", ["nproc"]))
    assert (code, out) == (0, b"2\n")
    # The guest boots with maxmem (256 MiB; MemTotal about 205 MiB after the
    # kernel's own use) and the balloon takes 64 MiB back down to memory (192).
    deadline = time.monotonic() + 30
    while True:
        kib = int(sync(ts.exec("g1", ["sh", "-c", "grep MemTotal /proc/meminfo"]))[1].split()[1])
        actual = asyncio.run(ts.qmp_execute(ts.get("g1"), "query-balloon"))
        if kib < 160 * 1024 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert actual == {"actual": 192 << 20}
    assert 120 * 1024 < kib < 160 * 1024, kib
    sync(ts.pause("g1"))
    assert sync(ts.status(ts.get("g1"))).state == "paused"
    sync(ts.unpause("g1"))
    assert sync(ts.status(ts.get("g1"))).state == "running"
    assert sync(ts.shutdown("g1", timeout=60)) == "shutdown"
    assert ts.store.list() == []
    assert not is_alive(rec)


def test_marker_survives_reboot_of_the_domain(ts: Toolstack, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "g2")
    sync(ts.create(cfg, ["extra = \"xenlab.mkfs=1\""], create_disks="32M"))
    wait_ready(ts, "g2")
    code, out, err = sync(ts.exec("g2", ["sh", "-c", "echo A > /mnt/disk/marker && sync && "
                                                "cat /mnt/disk/marker"]))
    assert (code, out) == (0, b"A\n"), err
    assert sync(ts.shutdown("g2")) == "shutdown"
    sync(ts.create(cfg))  # the disk is there now: no --create-disks needed
    wait_ready(ts, "g2")
    assert sync(ts.exec("g2", ["cat", "/mnt/disk/marker"]))[1] == b"A\n"


def test_stale_state_is_reported_and_cleared(ts: Toolstack, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg(tmp_path, "g3")
    rec = sync(ts.create(cfg, create_disks="32M"))
    assert rec.pid is not None
    os.kill(rec.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while is_alive(rec) and time.monotonic() < deadline:
        time.sleep(0.05)
    code, out, _ = run_cli(capsys, "vm", "list", "-l", "--state-dir", str(ts.state_dir))
    assert code == 0
    assert [(d["name"], d["state"]) for d in json.loads(out)] == [("g3", "stale (QEMU gone)")]
    with pytest.raises(XenlabError, match="stale state"):
        sync(ts.create(cfg))
    with pytest.raises(StateError, match="not running"):
        sync(ts.pause("g3"))
    sync(ts.destroy("g3"))
    assert ts.store.list() == []


def test_bad_input_changes_nothing(ts: Toolstack, tmp_path: Path) -> None:
    with pytest.raises(XenlabError, match="does not exist"):
        sync(ts.create(_cfg(tmp_path, "g4")))
    assert not (tmp_path / "g4.qcow2").exists() and ts.store.list() == []
    with pytest.raises(XenlabError, match="no domain"):
        sync(ts.destroy("nope"))
    # A config QEMU cannot run: more memory than this machine can map.
    bad = _cfg(tmp_path, "g5", memory=1 << 30, maxmem=1 << 30)
    with pytest.raises(XenlabError):
        sync(ts.create(bad, create_disks="32M"))
    assert ts.store.list() == [] and not (tmp_path / "g5.qcow2").exists()
    # Two domains cannot share a name.
    cfg = _cfg(tmp_path, "g6")
    sync(ts.create(cfg, create_disks="32M"))
    with pytest.raises(XenlabError, match="already exists"):
        sync(ts.create(cfg))
    assert [r.name for r in ts.store.list()] == ["g6"]


def test_commands_on_one_domain_are_serialised(ts: Toolstack, tmp_path: Path) -> None:
    sync(ts.create(_cfg(tmp_path, "g7"), create_disks="32M"))
    rec = ts.get("g7")
    order: list[str] = []
    with ts.store.lock(rec.domid):
        def other() -> None:
            t2 = Toolstack(ts.state_dir)
            sync(t2.pause("g7"))
            order.append("paused")

        th = threading.Thread(target=other)
        th.start()
        time.sleep(0.5)
        order.append("holder done")
    th.join(20)
    assert order == ["holder done", "paused"]
    assert sync(ts.status(ts.get("g7"))).state == "paused"


def test_cli_create_list_exec_destroy(tmp_path: Path, guest_image: object,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    state = str(tmp_path / "st")
    cfg = _cfg(tmp_path, "c1")
    code, out, err = run_cli(capsys, "vm", "create", str(cfg), "vcpus=1", "--create-disks", "32M",
                         "--state-dir", state)
    assert code == 0, err
    try:
        ts = Toolstack(Path(state))
        wait_ready(ts, "c1")
        code, out, _ = run_cli(capsys, "vm", "list", "-l", "--state-dir", state)
        (dom,) = json.loads(out)
        assert (dom["name"], dom["vcpus"], dom["state"]) == ("c1", 1, "running")
        code, out, _ = run_cli(capsys, "vm", "exec", "c1", "--state-dir", state, "--", "nproc")
        assert code == 0
    finally:
        code, out, _ = run_cli(capsys, "vm", "destroy", "c1", "--state-dir", state)
    assert code == 0 and "destroyed c1" in out


def test_guest_poweroff_ends_the_domain_like_xl(ts: Toolstack, tmp_path: Path) -> None:
    rec = sync(ts.create(_cfg(tmp_path, "g8"), create_disks="32M"))
    wait_ready(ts, "g8")
    sync(ts.exec("g8", ["sh", "-c", "(sleep 0.2; poweroff) >/dev/null 2>&1 &"]))
    deadline = time.monotonic() + 30
    while is_alive(rec) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not is_alive(rec)
    # A clean power-off is not a crash: the domain is simply gone.
    assert sync(ts.list()) == []
    # A crash (QEMU killed) is kept and reported as stale.
    rec = sync(ts.create(_cfg(tmp_path, "g9"), create_disks="32M"))
    assert rec.pid is not None
    os.kill(rec.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while is_alive(rec) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [s.state for s in sync(ts.list())] == ["stale (QEMU gone)"]


def test_reboot_through_the_agent(ts: Toolstack, tmp_path: Path) -> None:
    rec = sync(ts.create(_cfg(tmp_path, "g10"), create_disks="32M"))
    wait_ready(ts, "g10")
    boot_id = sync(ts.exec("g10", ["cat", "/proc/sys/kernel/random/boot_id"]))[1]
    assert sync(ts.reboot("g10")) == "guest reboot"
    log = ts.paths(rec).console_log
    deadline = time.monotonic() + 60
    while log.read_bytes().count(b"XENLAB-READY") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    sync(ts.wait_ready("g10", timeout=30))
    assert sync(ts.exec("g10", ["cat", "/proc/sys/kernel/random/boot_id"]))[1] != boot_id
    assert is_alive(rec)  # on_reboot=restart: the same QEMU carries on


def test_console_reaches_a_shell(ts: Toolstack, tmp_path: Path) -> None:
    from xenlab.vm.console import attach

    rec = sync(ts.create(_cfg(tmp_path, "g11"), create_disks="32M"))
    wait_ready(ts, "g11")
    r, w = os.pipe()
    os.write(w, b"echo con$((40+2))sole\n")
    out_r, out_w = os.pipe()
    try:
        seen = attach(ts.open_console(rec.name), stdin=r, stdout=out_w, until=b"con42sole",
                      timeout=20)
    finally:
        for fd in (r, w, out_r, out_w):
            os.close(fd)
    assert b"con42sole" in seen


def test_define_snapshot_while_shut_off_start_and_keep(ts: Toolstack, tmp_path: Path) -> None:
    import subprocess

    from xenlab.vm.snapshot import create_snapshot

    cfg = _cfg(tmp_path, "g12")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "g12.qcow2"),
                    "32M"], check=True)
    rec = sync(ts.define(cfg))
    assert [s.state for s in sync(ts.list())] == ["shutoff"]
    sync(create_snapshot(ts, "g12", "cold"))  # no QEMU: qemu-img
    tags = subprocess.run(["qemu-img", "snapshot", "-l", str(tmp_path / "g12.qcow2")],
                          capture_output=True, text=True, check=True).stdout
    assert "cold" in tags
    started = sync(ts.create(cfg))
    assert started.domid == rec.domid and started.state == "running"
    assert sync(ts.shutdown("g12")) == "shutdown"
    assert [s.state for s in sync(ts.list())] == ["shutoff"]  # defined: kept
    with pytest.raises(XenlabError, match="already exists"):
        sync(ts.define(cfg))
    sync(ts.undefine("g12"))
    assert sync(ts.list()) == []


def test_a_verb_asks_qemu_over_one_qmp_session(ts: Toolstack, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Every backend call a verb makes while it holds the domain shares one connection
    # (it used to open one per call: a local migrate opened six event loops and as many
    # sessions); a QEMU that restarts at the same socket gets a new one.
    from tests.vm.guests import boot
    from xenlab.vm.backends.qemu.qmp import Qmp
    from xenlab.vm.migration.saverestore import restore, save
    from xenlab.vm.resources import vcpu_list

    boot(ts, tmp_path, "q1", vcpus=1, maxvcpus=2)
    opened: list[str] = []
    connect = Qmp.connect

    async def counted(self: Qmp, path: Path, timeout: float = 10.0) -> None:
        opened.append(str(path))
        await connect(self, path, timeout)

    monkeypatch.setattr(Qmp, "connect", counted)
    sync(ts.pause("q1"))
    sync(ts.unpause("q1"))
    assert len(opened) == 2  # one per verb
    opened.clear()
    rows = sync(vcpu_list(ts, "q1"))  # the vCPUs, the threads and the guest's view
    assert rows and len(opened) == 1
    opened.clear()
    sync(save(ts, "q1", tmp_path / "q1.save"))
    assert len(opened) == 1
    opened.clear()
    rec = sync(restore(ts, tmp_path / "q1.save"))  # a new QEMU, its own session
    assert rec.state == "running" and len(opened) >= 1
    sync(ts.destroy("q1"))
