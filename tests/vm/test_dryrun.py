"""``xenlab vm create -n``: the QEMU command line and host actions, nothing started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.clirun import run_cli
from xenlab.vm.domain import Toolstack


def _cfg(tmp_path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "g.cfg"
    cfg.write_text('name = "dry,run"\ntype = "hvm"\nmemory = 64\n'
                   'disk = [ "format=qcow2,vdev=xvda,access=rw,target=disks/g.qcow2" ]\n'
                   'vif = [ "bridge=xlbr0,mac=00:16:3e:00:00:01" ]\n' + extra)
    return cfg


def test_dry_run_starts_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    code, out, err = run_cli(capsys, "vm", "create", "-n", str(_cfg(tmp_path)),
                             "--create-disks", "64M", "--state-dir", str(state))
    assert code == 0, err
    assert out.startswith("# domain dry,run, id 1: not started\n")
    assert f"# create disk {tmp_path}/disks/g.qcow2 (format qcow2, size 64M)" in out
    assert "# vif-bridge online vif1.0 (vif 1.0, mac 00:16:3e:00:00:01, bridge xlbr0)" in out
    assert "-name guest=dry,,run,debug-threads=on \\\n" in out
    assert not (tmp_path / "disks").exists()
    assert Toolstack(state).store.list() == []
    assert not (state / "run").exists()


def test_dry_run_json_is_the_argv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "vm", "create", "-n", "--json", str(_cfg(tmp_path)),
                             "--create-disks", "64M", "--state-dir", str(tmp_path / "s"))
    assert code == 0, err
    plan = json.loads(out)
    argv = plan["argv"]
    assert argv[0].startswith("qemu-system") and argv[-1] == "-daemonize"
    assert argv[argv.index("-name") + 1] == "guest=dry,,run,debug-threads=on"
    assert plan["vifs"][0]["vifname"] == "vif1.0" and plan["vifs"][0]["bridge"] == "xlbr0"


def test_dry_run_refuses_what_create_refuses(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg(tmp_path, 'vnc = 1\nvnclisten = "0.0.0.0:0,power-control=on"\n')
    code, _, err = run_cli(capsys, "vm", "create", "-n", str(cfg), "--create-disks", "1M",
                           "--state-dir", str(tmp_path / "s"))
    assert code == 1 and "vnclisten" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "vm", "create", "-n", str(_cfg(tmp_path)),
                           "--state-dir", str(tmp_path / "s"))
    assert code == 1 and "does not exist" in err
