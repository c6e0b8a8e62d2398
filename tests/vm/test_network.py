"""Guests on real bridges: tapped vifs at create, network-attach/-detach, clean-up on every exit.

Two guests boot once each (the costly part) and share one test; the
refusals and the user-script test start QEMU at most briefly.  The real
``ip`` command and busybox's ``ping`` are the oracles on the host side.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.aio import sync
from tests.clirun import run_cli
from tests.hotplug.bridges import bridge, ip_json, link_exists, need_net_admin, unique_name
from tests.vm.guests import sh, wait_ready, write_config
from xenlab.errors import XenlabError
from xenlab.vm.domain import Toolstack

pytestmark = pytest.mark.integration


def host_ping(addr: str) -> bool:
    """One successful reply from ``addr`` within a few tries (busybox-static's ping)."""
    done = subprocess.run(["busybox", "ping", "-c", "3", "-W", "5", addr],
                          capture_output=True, text=True, check=False)
    return done.returncode == 0


def tap_of(ts: Toolstack, name: str, devid: int = 0) -> str:
    """The tap the toolstack recorded for vif ``devid`` of domain ``name``."""
    for vif in ts.get(name).extra["vifs"]:
        if vif["devid"] == devid:
            return str(vif["vifname"])
    raise AssertionError(f"{name} has no recorded tap for vif {devid}")


def wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_guests_on_a_bridge_ping_and_nics_come_and_go(
        ts: Toolstack, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250)}"
    with bridge(f"{net}.1/24") as br:
        for name, extra in (("neta", ",mtu=1400"), ("netb", "")):
            cfg = write_config(tmp_path, name, tail=f"vif = [ 'bridge={br}{extra}' ]\n")
            sync(ts.create(cfg, create_disks="32M"))
        tap_a, tap_b = tap_of(ts, "neta"), tap_of(ts, "netb")
        assert tap_a == f"vif{ts.get('neta').domid}.0"
        # What the kernel says, through iproute2: enslaved, with the MTU asked for.
        (a,) = ip_json("link", "show", "dev", tap_a)
        (b,) = ip_json("link", "show", "dev", tap_b)
        assert (a["master"], a["mtu"], b["master"]) == (br, 1400, br)
        # Without mtu= a tap takes the bridge's, which Linux lowered to its smallest port's.
        assert b["mtu"] == ip_json("link", "show", "dev", br)[0]["mtu"] == 1400
        assert a["linkinfo"]["info_kind"] == "tun"
        for name in ("neta", "netb"):
            wait_ready(ts, name)
        sh(ts, "neta", f"ip addr add {net}.2/24 dev eth0; ip link set eth0 up")
        sh(ts, "netb", f"ip addr add {net}.3/24 dev eth0; ip link set eth0 up")
        assert sh(ts, "neta", "cat /sys/class/net/eth0/mtu").strip() == "1400"
        # Guest to guest across the bridge, and the host to a guest.
        sh(ts, "neta", f"ping -c 3 -W 5 {net}.3")
        assert host_ping(f"{net}.2")

        # network-attach: a new NIC appears in the guest, on a new tap, and works.
        state = ["--state-dir", str(ts.state_dir)]
        code, out, err = run_cli(capsys, "vm", "network-attach", "netb", f"bridge={br}",
                                 "mac=00:16:3e:5a:5b:5c", *state)
        assert code == 0, err
        tap_b1 = tap_of(ts, "netb", 1)
        assert f"vif 1 attached, 00:16:3e:5a:5b:5c, tap {tap_b1} (vif-bridge on {br})" in out
        assert ip_json("link", "show", "dev", tap_b1)[0]["master"] == br
        wait_for(lambda: "eth1" in sh(ts, "netb", "ls /sys/class/net"))
        assert sh(ts, "netb", "cat /sys/class/net/eth1/address").strip() == "00:16:3e:5a:5b:5c"
        sh(ts, "netb", f"ip addr add {net}.4/24 dev eth1; ip link set eth1 up")
        assert host_ping(f"{net}.4")
        code, out, _ = run_cli(capsys, "vm", "network-list", "netb", "--json", *state)
        listed = json.loads(out)
        assert [(n["devid"], n["tap"], n["mode"]) for n in listed] == [
            (0, tap_b, "vif-bridge"), (1, tap_b1, "vif-bridge")]
        # The record keeps the list: its config now names both NICs.
        assert "devid=1,mac=00:16:3e:5a:5b:5c" in ts.get("netb").config_text

        # network-detach: the guest lets it go, the tap goes.
        code, out, err = run_cli(capsys, "vm", "network-detach", "netb", "1", *state)
        assert code == 0, err
        assert "eth1" not in sh(ts, "netb", "ls /sys/class/net")
        assert not link_exists(tap_b1)
        code, out, _ = run_cli(capsys, "vm", "network-list", "netb", "--json", *state)
        assert [n["devid"] for n in json.loads(out)] == [0]

        # A QEMU killed with SIGKILL leaves its persistent tap; destroy removes it.
        os.kill(int(ts.get("neta").pid or 0), signal.SIGKILL)
        time.sleep(0.5)
        assert link_exists(tap_a)
        sync(ts.destroy("neta"))
        assert not link_exists(tap_a)
        sync(ts.destroy("netb"))
        assert not link_exists(tap_b)


def test_a_missing_bridge_is_refused_before_qemu_starts(ts: Toolstack, tmp_path: Path) -> None:
    need_net_admin()
    missing, tap = unique_name("nobr"), unique_name("xltap")
    cfg = write_config(tmp_path, "nobridge",
                       tail=f"vif = [ 'bridge={missing},vifname={tap}' ]\n")
    with pytest.raises(XenlabError) as err:
        sync(ts.create(cfg, create_disks="32M"))
    assert f"bridge {missing!r} does not exist; create it with `ip link add {missing}" in str(
        err.value)
    assert ts.store.list() == []  # no record
    assert not link_exists(tap)
    assert not (ts.state_dir / "run" / "1").exists()  # QEMU never started there


RECORDER = """#!/bin/sh
echo "$1 vif=$vif bridge=$bridge mac=$mac ip=$ip XENBUS_PATH=$XENBUS_PATH" >> {log}
[ "$1" = online ] && ip link set "$vif" master "$bridge" up
exit 0
"""


def test_a_user_script_runs_at_create_and_destroy_and_failures_are_reported(
        ts: Toolstack, tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    script = tmp_path / "my-vif"
    script.write_text(RECORDER.format(log=log))
    script.chmod(0o755)
    with bridge() as br:
        cfg = write_config(tmp_path, "scripted", tail=(
            f"vif = [ 'script={script},bridge={br},ip=10.1.2.3,mac=00:16:3e:0a:0b:0c' ]\n"))
        rec = sync(ts.create(cfg, create_disks="32M"))
        tap = f"vif{rec.domid}.0"
        assert ip_json("link", "show", "dev", tap)[0]["master"] == br
        sync(ts.destroy("scripted"))
        assert not link_exists(tap)
        assert log.read_text().splitlines() == [
            f"{action} vif={tap} bridge={br} mac=00:16:3e:0a:0b:0c ip=10.1.2.3 "
            f"XENBUS_PATH=backend/vif/{rec.domid}/0" for action in ("online", "offline")]

        bad = tmp_path / "bad-vif"
        bad.write_text("#!/bin/sh\necho 'no uplink for this guest' >&2\nexit 1\n")
        bad.chmod(0o755)
        cfg = write_config(tmp_path, "badscript", tail=f"vif = [ 'script={bad},bridge={br}' ]\n")
        with pytest.raises(XenlabError, match=r"online failed \(exit 1\): no uplink for this"):
            sync(ts.create(cfg, create_disks="32M"))
        assert ts.store.list() == []
        assert ip_json("link", "show", "master", br) == []


async def _qmp(ts: Toolstack, name: str, command: str, args: dict[str, object]) -> object:
    from xenlab.vm.backends.qemu.qmp import Qmp

    async with Qmp.open(ts.paths(ts.get(name)).qmp) as qmp:
        return await qmp.execute(command, args)


def test_a_late_release_and_a_failed_clean_up_are_finished_later(
        ts: Toolstack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from asyncio import run

    from xenlab import hotplug
    from xenlab.vm.network import network_attach, network_detach, network_list

    def nics_in_guest() -> str:
        return sh(ts, "netc", "ls /sys/class/net | grep -c eth")

    with bridge() as br:
        cfg = write_config(tmp_path, "netc", tail=f"vif = [ 'bridge={br}' ]\n")
        sync(ts.create(cfg, create_disks="32M"))
        wait_ready(ts, "netc")
        sync(network_attach(ts, "netc", [f"bridge={br}", "devid=1"]))
        tap1 = tap_of(ts, "netc", 1)
        wait_for(lambda: nics_in_guest() == "2\n")

        # The guest lets go only after the detach gave up: the record keeps the
        # NIC and its tap; a second detach finds the device gone and cleans up.
        with pytest.raises(XenlabError, match="did not release vif 1 within 0 s"):
            sync(network_detach(ts, "netc", "1", timeout=0))
        assert [n.devid for n in network_list(ts, "netc")] == [0, 1]
        wait_for(lambda: nics_in_guest() == "1\n")
        assert link_exists(tap1)
        sync(network_detach(ts, "netc", "1"))
        assert [n.devid for n in network_list(ts, "netc")] == [0]
        assert not link_exists(tap1)

        # A clean-up that fails after QEMU deleted the NIC: the record says the
        # NIC is gone all the same, and keeps its host end to finish later.
        sync(network_attach(ts, "netc", [f"bridge={br}", "devid=1"]))
        tap1 = tap_of(ts, "netc", 1)
        wait_for(lambda: nics_in_guest() == "2\n")

        async def refused(vif: hotplug.Vif) -> bool:
            raise hotplug.HotplugError(f"{vif.where}: the kernel refused (simulated)")

        with monkeypatch.context() as m, caplog.at_level("WARNING", "xenlab.vm.network"):
            m.setattr(hotplug, "offline", refused)
            sync(network_detach(ts, "netc", "1"))
        assert "vif 1 is detached, but cleaning up failed: vif 1 " in caplog.text
        assert [n.devid for n in network_list(ts, "netc")] == [0]
        assert link_exists(tap1)
        assert [v["devid"] for v in ts.get("netc").extra["vifs"]] == [0, 1]
        # And a netdev a detach failed to delete (made here as QEMU would keep it).
        run(_qmp(ts, "netc", "netdev_add", {"type": "user", "id": "net1"}))

        # The next attach of devid 1 removes both and gets the tap's own name back.
        sync(network_attach(ts, "netc", [f"bridge={br}", "devid=1"]))
        assert tap_of(ts, "netc", 1) == tap1
        assert [v["devid"] for v in ts.get("netc").extra["vifs"]] == [0, 1]
        assert ip_json("link", "show", "dev", tap1)[0]["master"] == br
        wait_for(lambda: nics_in_guest() == "2\n")
        sync(ts.destroy("netc"))
        assert not link_exists(tap1)
