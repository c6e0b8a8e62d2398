"""vm.disks on a real guest: block-attach, what the guest sees, a save/restore, block-detach."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.vm.guests import boot, run_cli, sh
from xenlab.config.errors import ConfigError
from xenlab.errors import StateError, XenlabError
from xenlab.vm import migrate as mig
from xenlab.vm import snapshot
from xenlab.vm.disks import block_attach, block_detach, block_list
from xenlab.vm.domain import Toolstack

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
        block_attach(ts, "d1", spec)
    with pytest.raises(XenlabError, match="only virtio disks"):
        block_attach(ts, "d1", f"format=qcow2,vdev=hdb,access=rw,target={data}")
    with pytest.raises(XenlabError, match="has a disk xvda already"):
        block_attach(ts, "d1", f"format=qcow2,vdev=xvda,access=rw,target={data}",
                     create_size="1M")
    with pytest.raises(ConfigError):
        block_attach(ts, "d1", "vdev=xvdb,bogus=1")
    assert not data.exists() and [d.vdev for d in block_list(ts, "d1")] == ["xvda"]

    d = block_attach(ts, "d1", spec, create_size="16M")
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
    mig.save(ts, "d1", tmp_path / "d1.save")
    mig.restore(ts, tmp_path / "d1.save")
    assert sh(ts, "d1", "head -c 20 /dev/vdb") == MARK.decode()

    # A snapshot that records xvdb pins it.
    snapshot.create_snapshot(ts, "d1", "s1")
    with pytest.raises(StateError, match="snapshots s1 record it"):
        block_detach(ts, "d1", "xvdb")
    snapshot.delete_snapshot(ts, "d1", "s1")

    gone = block_detach(ts, "d1", "xvdb")
    assert gone.vdev == "xvdb"
    _wait_for(ts, "d1", "ls /sys/block | grep -c vd", "1\n")
    assert [d.vdev for d in block_list(ts, "d1")] == ["xvda"]
    # QEMU closed the file: no lock is left (qemu-img without -U would fail on one).
    subprocess.run(["qemu-img", "info", str(data)], check=True, capture_output=True)
    assert _head(data, len(MARK)) == MARK
    with pytest.raises(XenlabError, match="no such disk"):
        block_detach(ts, "d1", "xvdb")
