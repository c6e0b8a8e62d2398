"""hotplug.online/offline against the real kernel, with iproute2's ``ip`` as the oracle."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import pytest

from tests.hotplug.bridges import bridge as make_bridge
from tests.hotplug.bridges import ip, ip_json, link_exists, need_net_admin, unique_name
from xenlab.hotplug import (
    HotplugError,
    Vif,
    default_vifname,
    offline,
    online,
    vif_from_json,
    vif_script_argv,
    vif_script_env,
    vif_to_json,
)
from xenlab.hotplug.device import VifAction

pytestmark = pytest.mark.integration


def new_vif(**kw: object) -> Vif:
    """A vif of a made-up domain whose name no running toolstack uses (domids 5000-9999)."""
    domid = 5000 + secrets.randbelow(5000)
    fields: dict[str, object] = {"domid": domid, "devid": 0, "vifname": default_vifname(domid, 0),
                                 "mac": "00:16:3e:01:02:03"}
    fields.update(kw)
    return Vif(**fields)  # type: ignore[arg-type]


def link(name: str) -> dict[str, object]:
    (obj,) = ip_json("link", "show", "dev", name)
    return obj


def test_vif_bridge_makes_an_enslaved_tap_and_offline_removes_it(bridge: str) -> None:
    vif = new_vif(bridge=bridge, mtu=1400)
    up = asyncio.run(online(vif))
    try:
        assert up.vifname == vif.vifname and up.uid == os.getuid()
        got = link(up.vifname)
        assert got["master"] == bridge
        assert got["mtu"] == 1400
        assert "UP" in got["flags"]  # type: ignore[operator]
        assert got["address"] == "fe:ff:ff:ff:ff:ff"  # never the bridge's MAC
        info = got["linkinfo"]
        assert info["info_kind"] == "tun"  # type: ignore[index]
        data = info["info_data"]  # type: ignore[index]
        assert data["type"] == "tap" and data["persist"] is True
        assert data["user"] in ("root", str(os.getuid()))
    finally:
        gone = asyncio.run(offline(up))
    assert gone is True and not link_exists(up.vifname)
    # Offline again, on a tap already gone: nothing to do, no error.
    assert asyncio.run(offline(up)) is False


def test_the_tap_takes_the_bridges_mtu_unless_given() -> None:
    with make_bridge(mtu=1450) as br:
        up = asyncio.run(online(new_vif(bridge=br)))
        try:
            assert link(up.vifname)["mtu"] == 1450
        finally:
            asyncio.run(offline(up))


def test_a_missing_bridge_is_refused_naming_it_and_leaves_no_tap() -> None:
    need_net_admin()
    missing = unique_name("nobr")
    vif = new_vif(bridge=missing)
    with pytest.raises(HotplugError) as err:
        asyncio.run(online(vif))
    msg = str(err.value)
    assert msg.startswith(f"vif 0 ({vif.vifname}) of domain {vif.domid}: bridge {missing!r} "
                          "does not exist")
    assert f"ip link add {missing} type bridge" in msg
    assert not link_exists(vif.vifname)


def test_an_interface_that_is_not_a_bridge_is_refused() -> None:
    need_net_admin()
    dummy = unique_name("xlve")
    ip("link", "add", dummy, "type", "veth", "peer", "name", f"{dummy}p")
    try:
        vif = new_vif(bridge=dummy)
        with pytest.raises(HotplugError, match=f"'{dummy}' is not a bridge .it is a veth"):
            asyncio.run(online(vif))
        assert not link_exists(vif.vifname)
        # offline never removes an interface that is not a tap, even under a vif's name.
        with pytest.raises(HotplugError, match="not the domain's tap; left alone"):
            asyncio.run(offline(new_vif(vifname=dummy)))
        assert link_exists(dummy)
    finally:
        ip("link", "del", dummy, check=False)


def test_a_stale_record_never_removes_a_newer_tap_of_the_same_name(bridge: str) -> None:
    # Store A's domain had the tap; it went (QEMU killed, the host end cleaned
    # up elsewhere) but A's record still names it.  Store B's domain then got
    # a tap of the same name.
    first = asyncio.run(online(new_vif(bridge=bridge)))
    assert first.ifindex == link(first.vifname)["ifindex"] and first.boot_id
    stale = vif_to_json(first)
    ip("link", "del", first.vifname)
    second = asyncio.run(online(new_vif(bridge=bridge, vifname=first.vifname)))
    try:
        assert second.ifindex != first.ifindex
        # A's clean-up, from its record: B's tap is not A's, it stays (and enslaved).
        assert asyncio.run(offline(vif_from_json(stale))) is False
        assert link(second.vifname)["master"] == bridge
        # A record from before the reboot the tap was made in names no tap either.
        rebooted = vif_from_json({**vif_to_json(second), "boot_id": "an-earlier-boot"})
        assert asyncio.run(offline(rebooted)) is False
        assert link_exists(second.vifname)
        # Records from before ifindexes were kept: any tap of the name, as before.
        old = {k: v for k, v in vif_to_json(second).items() if k not in ("ifindex", "boot_id")}
        assert asyncio.run(offline(vif_from_json(old))) is True
        assert not link_exists(second.vifname)
    finally:
        asyncio.run(offline(second))


def test_a_taken_name_is_refused_or_varied(bridge: str) -> None:
    first = asyncio.run(online(new_vif(bridge=bridge, vifname="xlvif-longname0")))
    try:
        with pytest.raises(HotplugError, match="interface xlvif-longname0 exists already"):
            asyncio.run(online(new_vif(bridge=bridge, vifname="xlvif-longname0")))
        # As a local migration's destination: the next free name, cut to 15 bytes.
        second = asyncio.run(online(new_vif(bridge=bridge, vifname="xlvif-longname0"),
                                    rename_if_taken=True))
        try:
            assert second.vifname == "xlvif-longnam-1"
            assert link(second.vifname)["master"] == bridge
        finally:
            asyncio.run(offline(second))
    finally:
        asyncio.run(offline(first))


def test_vif_route_brings_the_tap_up_with_host_routes() -> None:
    need_net_admin()
    net = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250)}"
    up = asyncio.run(online(new_vif(script="vif-route", ip=f"{net}.5 {net}.6", mtu=1300)))
    try:
        got = link(up.vifname)
        assert "UP" in got["flags"] and got["mtu"] == 1300  # type: ignore[operator]
        assert "master" not in got
        routes = {r["dst"] for r in ip_json("route", "show", "dev", up.vifname)}
        assert routes == {f"{net}.5", f"{net}.6"}
    finally:
        asyncio.run(offline(up))
    assert ip("route", "show", "dev", up.vifname, check=False).returncode != 0


def test_vif_json_round_trip() -> None:
    vif = Vif(domid=3, devid=1, vifname="vif3.1", script="/x/y", bridge="br", mac="m",
              mtu=9000, ip="1.2.3.4", gatewaydev="eth0", domname="g", uid=5, gid=6,
              ifindex=42, boot_id="b")
    assert vif_from_json(vif_to_json(vif)) == vif
    with pytest.raises(HotplugError, match="needs domid, devid and vifname"):
        vif_from_json({"domid": 3})


# --- users' scripts --------------------------------------------------------------------


def test_the_script_calling_convention_is_xens() -> None:
    vif = Vif(domid=7, devid=2, vifname="vif7.2", script="/etc/my-vif", bridge="xlbr0",
              mac="00:16:3e:aa:bb:cc", ip="10.0.0.2 10.0.0.3", gatewaydev="eth1", domname="g")
    assert vif_script_argv(Path("/etc/my-vif"), VifAction.ONLINE) == [
        "/etc/my-vif", "online", "type_if=vif"]
    assert vif_script_env(vif) == {
        "script": "/etc/my-vif", "XENBUS_TYPE": "vif", "XENBUS_PATH": "backend/vif/7/2",
        "XENBUS_BASE_PATH": "backend", "netdev": "eth1", "vif": "vif7.2", "bridge": "xlbr0",
        "mac": "00:16:3e:aa:bb:cc", "ip": "10.0.0.2 10.0.0.3", "mtu": "", "domid": "7",
        "devid": "2", "domname": "g",
    }


RECORDER = """#!/bin/sh
# Writes what it was given, and what the tap looked like then, to $log.
{{
  echo "argv: $*"
  for v in script XENBUS_TYPE XENBUS_PATH XENBUS_BASE_PATH netdev vif bridge mac ip mtu \\
           domid devid domname; do
    eval "echo \\"$v=\\${{$v}}\\""
  done
  ip -o link show dev "$vif" >/dev/null 2>&1 && echo "tap: present" || echo "tap: missing"
}} >> {log}
[ "$1" = online ] && ip link set "$vif" master "$bridge" up
exit 0
"""


def test_a_user_script_gets_argv_and_env_and_runs_with_the_tap(
        tmp_path: Path, bridge: str) -> None:
    log = tmp_path / "calls.log"
    script = tmp_path / "my-vif"
    script.write_text(RECORDER.format(log=log))
    script.chmod(0o755)
    vif = new_vif(script=str(script), bridge=bridge, ip="10.9.9.9", domname="guest")
    up = asyncio.run(online(vif))
    try:
        # The script did the attaching: the built-in vif-bridge did not run.
        assert link(up.vifname)["master"] == bridge
    finally:
        asyncio.run(offline(up))
    calls = log.read_text().split("argv: ")[1:]
    assert len(calls) == 2
    online_call, offline_call = (c.splitlines() for c in calls)
    assert online_call[0] == "online type_if=vif" and offline_call[0] == "offline type_if=vif"
    assert online_call[1:] == [
        f"script={script}", "XENBUS_TYPE=vif", f"XENBUS_PATH=backend/vif/{vif.domid}/0",
        "XENBUS_BASE_PATH=backend", "netdev=", f"vif={vif.vifname}", f"bridge={bridge}",
        "mac=00:16:3e:01:02:03", "ip=10.9.9.9", "mtu=", f"domid={vif.domid}", "devid=0",
        "domname=guest", "tap: present",
    ]
    assert offline_call[-1] == "tap: present"  # removed after the script ran
    assert not link_exists(up.vifname)


def test_a_failing_script_is_reported_with_its_stderr_and_the_tap_removed(
        tmp_path: Path) -> None:
    need_net_admin()
    script = tmp_path / "bad-vif"
    script.write_text("#!/bin/sh\necho 'cannot find the uplink' >&2\nexit 3\n")
    script.chmod(0o755)
    vif = new_vif(script=str(script))
    with pytest.raises(HotplugError) as err:
        asyncio.run(online(vif))
    assert str(err.value) == (
        f"{vif.where}: hotplug script {script} online failed (exit 3): cannot find the uplink")
    assert not link_exists(vif.vifname)
    missing = new_vif(script=str(tmp_path / "nope"))
    with pytest.raises(HotplugError, match="nope is not a file"):
        asyncio.run(online(missing))
    assert not link_exists(missing.vifname)


def test_only_bare_names_and_xens_own_scripts_are_the_built_ins() -> None:
    from xenlab.hotplug import VIF_SCRIPTS, builtin_script

    bridge, route = VIF_SCRIPTS["vif-bridge"], VIF_SCRIPTS["vif-route"]
    assert builtin_script("vif-bridge") is bridge
    assert builtin_script("/etc/xen/scripts/vif-route") is route
    assert builtin_script("/etc/xen/scripts/../scripts/vif-bridge") is bridge
    for site in ("/opt/site/vif-bridge", "./vif-bridge", "scripts/vif-route",
                 "/etc/xen/scripts/my-vif", "vif-nat"):
        assert builtin_script(site) is None, site


def test_a_site_script_named_like_a_built_in_is_run(tmp_path: Path, bridge: str) -> None:
    log = tmp_path / "calls.log"
    site = tmp_path / "site"
    site.mkdir()
    script = site / "vif-bridge"
    script.write_text(RECORDER.format(log=log))
    script.chmod(0o755)
    up = asyncio.run(online(new_vif(script=str(script), bridge=bridge)))
    try:
        assert link(up.vifname)["master"] == bridge
        # The site's script ran, not the built-in: the tap keeps its own MAC.
        assert link(up.vifname)["address"] != "fe:ff:ff:ff:ff:ff"
    finally:
        asyncio.run(offline(up))
    assert [c.split("\n")[0] for c in log.read_text().split("argv: ")[1:]] == [
        "online type_if=vif", "offline type_if=vif"]
