"""An external snapshot's overlays survive a shutdown: `create` starts the domain on them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.aio import sync
from tests.vm.guests import boot, wait_ready
from xenlab.vm.domain import Toolstack
from xenlab.vm.snapshot import create_snapshot

pytestmark = pytest.mark.integration



def test_restart_runs_on_the_overlays(ts: Toolstack, tmp_path: Path) -> None:
    cfg = boot(ts, tmp_path, "ov", maxmem=None)
    assert sync(ts.exec("ov", ["sh", "-c", "echo A > /mnt/disk/m; sync"]))[0] == 0
    sync(create_snapshot(ts, "ov", "ext1", external=True))
    assert sync(ts.exec("ov", ["sh", "-c", "echo B > /mnt/disk/m; sync"]))[0] == 0
    assert sync(ts.shutdown("ov")) == "shutdown"
    assert sync(ts.status(ts.get("ov"))).state == "shutoff"
    sync(ts.create(cfg))
    wait_ready(ts, "ov")
    # B was written to the overlay after the snapshot: it must still be there.
    assert sync(ts.exec("ov", ["cat", "/mnt/disk/m"]))[1] == b"B\n"
