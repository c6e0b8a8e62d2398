"""``xenlab vm``: the commands as a user types them, on one real guest (TCG)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.clirun import run_cli
from tests.vm.guests import write_config

pytestmark = pytest.mark.integration


def test_a_guests_life_through_the_cli(tmp_path: Path, guest_image: object,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, "cli")
    st = ["--state-dir", str(tmp_path / "s")]
    st2 = ["--state-dir", str(tmp_path / "s2")]

    def ok(*args: str) -> str:
        code, out, err = run_cli(capsys, *args)
        assert code == 0, (args, out, err)
        return out

    try:
        assert "guest up" in ok("vm", "create", str(cfg), "--create-disks", "32M",
                                "--wait", "60", *st)
        ok("vm", "exec", "cli", *st, "--", "sh", "-c", "echo A > /mnt/disk/m; sync")
        assert "internal" in ok("vm", "snapshot-create", "cli", "s1", *st)
        ok("vm", "exec", "cli", *st, "--", "sh", "-c", "echo B > /mnt/disk/m; sync")
        tree = json.loads(ok("vm", "snapshot-list", "cli", "--json", *st))
        assert [(n["name"], n["current"]) for n in tree] == [("s1", True)]
        ok("vm", "snapshot-revert", "cli", "s1", *st)
        assert ok("vm", "exec", "cli", *st, "--", "cat", "/mnt/disk/m") == "A\n"
        code, _, err = run_cli(capsys, "vm", "snapshot-create", "cli", "s1", *st)
        assert code == 1 and "s1" in err
        ok("vm", "snapshot-delete", "cli", "s1", *st)
        assert "balloon reports 160 MiB" in ok("vm", "mem-set", "cli", "160", *st)
        rows = json.loads(ok("vm", "vcpu-list", "cli", "--json", *st))
        assert [r["vcpu"] for r in rows] == [0, 1]
        info = json.loads(ok("vm", "info", "cli", *st))
        assert info["live"]["status"] == "running"
        image = tmp_path / "cli.save"
        ok("vm", "save", "cli", str(image), *st)
        assert json.loads(ok("vm", "list", "-l", *st)) == []
        ok("vm", "restore", str(image), *st)
        assert ok("vm", "exec", "cli", *st, "--", "cat", "/mnt/disk/m") == "A\n"
        assert "migrated cli" in ok("vm", "migrate", "cli", "127.0.0.1",
                                    "--dest-state-dir", str(tmp_path / "s2"), *st)
        assert json.loads(ok("vm", "list", "-l", *st)) == []
        (dom,) = json.loads(ok("vm", "list", "-l", *st2))
        assert dom["state"] == "running"
        assert "shutdown" in ok("vm", "shutdown", "cli", *st2)
    finally:
        for s in (st, st2):
            code, out, _ = run_cli(capsys, "vm", "list", "-l", *s)
            for d in json.loads(out) if code == 0 else []:
                run_cli(capsys, "vm", "destroy", d["name"], *s)
