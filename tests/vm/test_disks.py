"""vm.disks on a real guest: block-attach, what the guest sees, a save/restore, block-detach."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.aio import sync
from tests.clirun import run_cli
from tests.vm.guests import boot, sh
from xenlab.config.errors import ConfigError
from xenlab.errors import StateError, XenlabError
from xenlab.vm import snapshot
from xenlab.vm.disks import block_attach, block_detach, block_list
from xenlab.vm.domain import Toolstack
from xenlab.vm.migration import sender as mig

pytestmark = pytest.mark.integration

MARK = b"XENLAB-DATA-ON-XVDB\n"


def _wait_for(ts: Toolstack, name: str, script: str, want: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = sh(ts, name, script)
        if got == want:
            return
        assert time.monotonic() < deadline, f"{script!r}: {got!r}, wanted {want!r}"
        time.sleep(0.2)


def _head(path: Path, n: int) -> bytes:
    out = path.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(out)], check=True)
    return out.read_bytes()[:n]


def test_a_disk_comes_survives_a_restore_and_goes(
        ts: Toolstack, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    boot(ts, tmp_path, "d1")
    data = tmp_path / "data.qcow2"
    spec = f"format=qcow2,vdev=xvdb,access=rw,target={data}"
    # Refusals first: nothing is made or changed by them.
    with pytest.raises(XenlabError, match="does not exist"):
        sync(block_attach(ts, "d1", spec))
    with pytest.raises(XenlabError, match="only virtio disks"):
        sync(block_attach(ts, "d1", f"format=qcow2,vdev=hdb,access=rw,target={data}"))
    with pytest.raises(XenlabError, match="has a disk xvda already"):
        sync(block_attach(ts, "d1", f"format=qcow2,vdev=xvda,access=rw,target={data}",
                     create_size="1M"))
    with pytest.raises(ConfigError):
        sync(block_attach(ts, "d1", "vdev=xvdb,bogus=1"))
    assert not data.exists() and [d.vdev for d in block_list(ts, "d1")] == ["xvda"]

    d = sync(block_attach(ts, "d1", spec, create_size="16M"))
    assert (d.vdev, d.device, d.slot, d.mode, d.format) == ("xvdb", "virtio-blk", 9, "rw",
                                                           "qcow2")
    # The guest sees a second virtio disk, at the slot block-list says.
    _wait_for(ts, "d1", "ls /sys/block | grep -c vd", "2\n")
    assert sh(ts, "d1", "cat /sys/block/vdb/serial") == "xvdb"
    assert sh(ts, "d1", "basename $(readlink -f /sys/block/vdb/device/..)") == "0000:00:09.0\n"
    sh(ts, "d1", f"printf '{MARK.decode().strip()}\\n' | dd of=/dev/vdb bs=512 conv=sync "
                 "2>/dev/null; sync")
    code, out, _ = run_cli(capsys, "vm", "block-list", "d1", "--json",
                           "--state-dir", str(ts.state_dir))
    assert code == 0 and [r["vdev"] for r in json.loads(out)] == ["xvda", "xvdb"]

    # A save and restore starts a new QEMU from the record: the disk is there, at its slot.
    sync(mig.save(ts, "d1", tmp_path / "d1.save"))
    sync(mig.restore(ts, tmp_path / "d1.save"))
    assert sh(ts, "d1", "head -c 20 /dev/vdb") == MARK.decode()

    # A snapshot that records xvdb pins it.
    sync(snapshot.create_snapshot(ts, "d1", "s1"))
    with pytest.raises(StateError, match="snapshots s1 record it"):
        sync(block_detach(ts, "d1", "xvdb"))
    sync(snapshot.delete_snapshot(ts, "d1", "s1"))

    gone = sync(block_detach(ts, "d1", "xvdb"))
    assert gone.vdev == "xvdb"
    _wait_for(ts, "d1", "ls /sys/block | grep -c vd", "1\n")
    assert [d.vdev for d in block_list(ts, "d1")] == ["xvda"]
    # QEMU closed the file: no lock is left (qemu-img without -U would fail on one).
    subprocess.run(["qemu-img", "info", str(data)], check=True, capture_output=True)
    assert _head(data, len(MARK)) == MARK
    with pytest.raises(XenlabError, match="no such disk"):
        sync(block_detach(ts, "d1", "xvdb"))


async def _medium(ts: Toolstack, name: str, vdev: str) -> str | None:
    from xenlab.vm.backends.qemu.qmp import Qmp

    async with Qmp.open(ts.paths(ts.get(name)).qmp) as qmp:
        blocks = await qmp.execute("query-block")
    for b in blocks if isinstance(blocks, list) else []:
        if b.get("qdev") == vdev or b.get("qdev", "").endswith(f"/{vdev}"):
            inserted = b.get("inserted")
            return str(inserted["file"]) if inserted else None
    raise AssertionError(f"no block device {vdev}: {blocks}")


def test_cd_insert_and_eject(ts: Toolstack, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    from asyncio import run

    from xenlab.vm.disks import cd_eject, cd_insert

    boot(ts, tmp_path, "c1", tail='disk = [ "format=qcow2,vdev=xvda,access=rw,target='
         f'{tmp_path}/c1.qcow2", "vdev=hdc,devtype=cdrom,format=empty" ]\n')
    iso = tmp_path / "one.iso"
    iso.write_bytes(b"\0" * 32768 + b"\1CD001" + b"\0" * 2043)
    assert run(_medium(ts, "c1", "hdc")) is None  # empty, as libxl makes it
    d = sync(cd_insert(ts, "c1", "hdc", str(iso)))
    assert d.file == str(iso) and d.device == "ide-cd"
    assert run(_medium(ts, "c1", "hdc")) == str(iso)  # what QEMU has in the drive
    with pytest.raises(XenlabError, match="xvda is not a cdrom"):
        sync(cd_insert(ts, "c1", "xvda", str(iso)))
    with pytest.raises(XenlabError, match="does not exist"):
        sync(cd_insert(ts, "c1", "hdc", str(tmp_path / "none.iso")))
    # A medium is checked as a disk is: a qcow2 over a host file never reaches QEMU.
    from xenlab.vm import qemuimg

    sync(qemuimg.create(tmp_path / "evil.qcow2", "qcow2", backing="/etc/shadow", backing_fmt="raw"))
    with pytest.raises(XenlabError, match="names backing file /etc/shadow"):
        sync(cd_insert(ts, "c1", "hdc", str(tmp_path / "evil.qcow2"), fmt="qcow2"))
    assert run(_medium(ts, "c1", "hdc")) == str(iso)
    # The record keeps the medium: a save/restore starts QEMU with it in the drive.
    sync(mig.save(ts, "c1", tmp_path / "c1.save"))
    sync(mig.restore(ts, tmp_path / "c1.save"))
    assert run(_medium(ts, "c1", "hdc")) == str(iso)
    code, _, err = run_cli(capsys, "vm", "cd-eject", "c1", "hdc",
                             "--state-dir", str(ts.state_dir))
    assert code == 0, err
    assert run(_medium(ts, "c1", "hdc")) is None
    assert [d.file for d in block_list(ts, "c1") if d.vdev == "hdc"] == [None]
    assert sync(cd_eject(ts, "c1", "hdc")).file is None  # ejecting an empty drive is fine


async def _qmp(ts: Toolstack, name: str, command: str, args: dict[str, object]) -> object:
    from xenlab.vm.backends.qemu.qmp import Qmp

    async with Qmp.open(ts.paths(ts.get(name)).qmp) as qmp:
        return await qmp.execute(command, args)


def test_a_relative_target_a_late_release_and_a_node_qemu_kept(
        ts: Toolstack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from asyncio import run

    from xenlab.vm.runtime import STALE_NODES

    boot(ts, tmp_path, "d2")
    # A relative target is the caller's file, not one relative to QEMU's / .
    monkeypatch.chdir(tmp_path)
    d = sync(block_attach(ts, "d2", "format=qcow2,vdev=xvdb,access=rw,target=rel.qcow2",
                     create_size="16M"))
    assert d.target == d.file == str(tmp_path / "rel.qcow2")
    _wait_for(ts, "d2", "ls /sys/block | grep -c vd", "2\n")

    # The guest lets go only after the detach gave up: the record keeps the disk,
    # and a second detach finds the device gone and only cleans up.
    with pytest.raises(XenlabError, match="did not release it within 0 s"):
        sync(block_detach(ts, "d2", "xvdb", timeout=0))
    assert [x.vdev for x in block_list(ts, "d2")] == ["xvda", "xvdb"]
    _wait_for(ts, "d2", "ls /sys/block | grep -c vd", "1\n")
    assert sync(block_detach(ts, "d2", "xvdb")).vdev == "xvdb"
    assert [x.vdev for x in block_list(ts, "d2")] == ["xvda"]
    subprocess.run(["qemu-img", "info", "rel.qcow2"], check=True, capture_output=True)

    # A clean-up QEMU refuses (another node holds the disk's node): the record
    # says the disk is gone all the same, and names what QEMU kept.
    sync(block_attach(ts, "d2", "format=qcow2,vdev=xvdb,access=rw,target=rel.qcow2"))
    _wait_for(ts, "d2", "ls /sys/block | grep -c vd", "2\n")
    run(_qmp(ts, "d2", "blockdev-add", {"driver": "raw", "node-name": "holder",
                                        "file": "xvdb-fmt", "read-only": True}))
    with caplog.at_level("WARNING", logger="xenlab.vm.disks"):
        sync(block_detach(ts, "d2", "xvdb"))
    assert "detached, but QEMU keeps its nodes (xvdb-fmt: " in caplog.text
    assert [x.vdev for x in block_list(ts, "d2")] == ["xvda"]
    assert "xvdb-fmt" in ts.get("d2").extra[STALE_NODES]["xvdb"]
    # While the node is held, an attach says so and changes nothing ...
    with pytest.raises(XenlabError, match="QEMU keeps nodes of an earlier xvdb: xvdb-fmt"):
        sync(block_attach(ts, "d2", "format=qcow2,vdev=xvdb,access=rw,target=rel.qcow2"))
    assert [x.vdev for x in block_list(ts, "d2")] == ["xvda"]
    # ... once it is free, the attach finishes the removal and the disk is back.
    run(_qmp(ts, "d2", "blockdev-del", {"node-name": "holder"}))
    sync(block_attach(ts, "d2", "format=qcow2,vdev=xvdb,access=rw,target=rel.qcow2"))
    _wait_for(ts, "d2", "ls /sys/block | grep -c vd", "2\n")
    assert STALE_NODES not in ts.get("d2").extra
