"""An external snapshot's overlays survive a shutdown: `create` starts the domain on them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from xenlab.vm.domain import Toolstack
from xenlab.vm.snapshot import create_snapshot

pytestmark = pytest.mark.integration

CFG = """\
name = "ov"
type = "hvm"
memory = 192
vcpus = 2
disk = [ "format=qcow2,vdev=xvda,access=rw,target={disk}" ]
extra = "xenlab.mkfs=1"
"""


def _ready(ts: Toolstack, timeout: float = 60) -> None:
    log = ts.paths(ts.get("ov")).console_log
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and log.read_bytes().count(b"XENLAB-READY") >= 1:
            return
        time.sleep(0.2)
    raise AssertionError(log.read_bytes()[-1500:])


def test_restart_runs_on_the_overlays(tmp_path: Path, guest_image: object) -> None:
    cfg = tmp_path / "ov.cfg"
    cfg.write_text(CFG.format(disk=tmp_path / "ov.qcow2"))
    ts = Toolstack(tmp_path / "state")
    try:
        ts.create(cfg, create_disks="32M")
        _ready(ts)
        assert ts.exec("ov", ["sh", "-c", "echo A > /mnt/disk/m; sync"])[0] == 0
        create_snapshot(ts, "ov", "ext1", external=True)
        assert ts.exec("ov", ["sh", "-c", "echo B > /mnt/disk/m; sync"])[0] == 0
        assert ts.shutdown("ov") == "shutdown"
        assert ts.status(ts.get("ov")).state == "shutoff"
        ts.create(cfg)
        _ready(ts)
        # B was written to the overlay after the snapshot: it must still be there.
        assert ts.exec("ov", ["cat", "/mnt/disk/m"])[1] == b"B\n"
    finally:
        for rec in ts.store.list():
            if rec.state != "shutoff":
                ts.destroy(rec.name)
