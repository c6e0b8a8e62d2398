"""A running domain's NICs: :func:`network_attach`, :func:`network_detach`, :func:`network_list`.

xl's verbs of the same names, over QMP.  Attaching brings the host end
online first (``xenlab.hotplug``: a tap on the bridge, or a user's script),
then ``netdev_add`` opens that tap by name and ``device_add`` plugs the NIC
into the guest's PCI bus (ACPI hotplug: the guest sees a new interface).
Detaching asks the guest to let the NIC go (``device_del``), waits for QEMU's
``DEVICE_DELETED``, then removes the netdev and brings the tap offline.

The domain's vif list lives in its record: the config text gets a ``vif =``
line (later settings win, as with create's overrides), so ``info``, save,
restore and migration see the NICs the domain has now; ``extra["vif_specs"]``
keeps the list for a later ``create`` of a kept domain, and
``extra["vifs"]`` the host ends to bring offline when the domain goes.  Each
spec carries its ``devid=`` and ``mac=``, so a restart gives the guest the
same NICs at the same slots (QEMU: ``Nic.device`` of its backend).

Once QEMU reports the NIC deleted the record drops it first; removing the
netdev and bringing the tap offline come after, as best effort: a host end
that failed stays in ``extra["vifs"]`` (with no vif spec), and the next
network-attach (or the domain's end) brings it offline, as it deletes a
netdev an earlier detach left.  A detach that timed out keeps the NIC in
the record; run again after the guest let go, it only cleans up.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from xenlab import faults, hotplug
from xenlab.config.specs.vif import VifSpec, format_vif, parse_vif
from xenlab.errors import BackendError, ConflictError, DeviceNotReleased, NotFoundError
from xenlab.vm.backend import NicPlan
from xenlab.vm.domain import SHUTOFF, Toolstack
from xenlab.vm.domconfig import config_from_text, plan_nics, vif_line
from xenlab.vm.jobs import Job
from xenlab.vm.runtime import VIF_SPECS, VIFS
from xenlab.vm.store import DomainRecord

__all__ = ["NicInfo", "network_attach", "network_detach", "network_list"]

log = logging.getLogger(__name__)

_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


@dataclass(frozen=True, slots=True)
class NicInfo:
    """One vif of a domain as ``network-list`` shows it."""

    devid: int
    mac: str
    model: str  # the QEMU device
    mode: str  # "user" (QEMU's user network), or the hotplug script: "vif-bridge", ...
    bridge: str | None
    tap: str | None  # the host tap; None in user mode or while the domain does not run
    mtu: int | None
    ip: str | None
    spec: str  # the xl vif spec, with its devid and mac

    def to_json(self) -> dict[str, Any]:
        """A JSON object with the field names."""
        return {"devid": self.devid, "mac": self.mac, "model": self.model, "mode": self.mode,
                "bridge": self.bridge, "tap": self.tap, "mtu": self.mtu, "ip": self.ip,
                "spec": self.spec}


def _pinned(n: NicPlan) -> VifSpec:
    """``n``'s spec with its devid and MAC written in (they must not move on a restart)."""
    mac = tuple(int(part, 16) for part in n.mac.split(":"))
    return replace(n.spec, devid=n.devid, mac=mac)  # type: ignore[arg-type]


def _info(n: NicPlan, taps: dict[int, str]) -> NicInfo:
    mode = "user"
    if n.tap:
        mode = n.spec.script or hotplug.DEFAULT_VIF_SCRIPT
    bridge = n.spec.bridge
    if bridge is None and hotplug.builtin_script(mode) is hotplug.VIF_SCRIPTS["vif-bridge"]:
        bridge = hotplug.DEFAULT_BRIDGE
    return NicInfo(devid=n.devid, mac=n.mac, model=n.model, mode=mode, bridge=bridge,
                   tap=taps.get(n.devid), mtu=n.spec.mtu, ip=n.spec.ip,
                   spec=format_vif(_pinned(n)))


def _taps(rec: DomainRecord) -> dict[int, str]:
    out: dict[int, str] = {}
    for obj in rec.extra.get(VIFS) or []:
        vif = hotplug.vif_from_json(obj)
        out[vif.devid] = vif.vifname
    return out


def _nics(ts: Toolstack, rec: DomainRecord) -> tuple[NicPlan, ...]:
    dc, _ = config_from_text(rec.config_text, rec.config_path)
    return plan_nics(ts.backend, replace(dc, uuid=rec.uuid))


def network_list(ts: Toolstack, name: str) -> list[NicInfo]:
    """The vifs of domain ``name`` (running or not), by devid.

    CLI: ``xenlab vm network-list DOM [--json]``.
    """
    rec = ts.get(name)
    return sorted((_info(n, _taps(rec)) for n in _nics(ts, rec)), key=lambda i: i.devid)


def _keep(ts: Toolstack, rec: DomainRecord, specs: list[VifSpec],
          vifs: list[dict[str, Any]]) -> DomainRecord:
    """Record the domain's new vif list and host ends (config text and extra)."""
    texts = [format_vif(s) for s in specs]
    text = rec.config_text.rstrip("\n") + "\n" + vif_line(texts) + "\n"
    return ts.store.patch(rec.domid, expect_uuid=rec.uuid, config_text=text,
                          extra_set={VIF_SPECS: texts, **({VIFS: vifs} if vifs else {})},
                          extra_drop=[] if vifs else [VIFS])


async def network_attach(ts: Toolstack, name: str, items: list[str]) -> NicInfo:
    """Plug a new NIC described by xl vif spec ``items`` into running domain ``name``.

    CLI: ``xenlab vm network-attach DOM [bridge=xlbr0] [mac=...] ...``.  The
    items are one vif spec (``bridge=xlbr0 mac=00:16:3e:..`` or
    ``'bridge=xlbr0,mac=...'``), parsed strictly as ``xl network-attach``
    does.  Without ``devid=`` the lowest free one is taken; without a bridge
    or script the NIC is on QEMU's user network.

    :raise ConfigError: a bad spec item.
    :raise XenlabError: the devid or MAC is taken, or the backend cannot do it.
    :raise HotplugError: the host end cannot come online (missing bridge...).
    :raise BackendError: QEMU refused the device.
    """
    text = ",".join(i.strip() for i in items if i.strip())
    spec = parse_vif(text, source="network-attach", strict=True)
    async with ts.live(name) as rec:
        current = _nics(ts, rec)
        used = {n.devid for n in current}
        devid = spec.devid
        if devid is None:
            devid = next(i for i in range(len(used) + 1) if i not in used)
        elif devid in used:
            raise ConflictError("vif", str(devid),
                                f"network-attach {rec.name}: devid {devid} is taken")
        dc, _ = config_from_text(rec.config_text, rec.config_path)
        new = ts.backend.plan_nic(replace(dc, uuid=rec.uuid), replace(spec, devid=devid), devid)
        for n in current:
            if n.mac == new.mac:
                raise ConflictError(
                    "vif", str(new.mac),
                    f"network-attach {rec.name}: MAC {new.mac} is vif {n.devid}'s already")
        live = {n.devid for n in current}
        stale = [obj for obj in rec.extra.get(VIFS) or []
                 if hotplug.vif_from_json(obj).devid not in live]
        h = ts.handle(rec)

        def note(fact: Mapping[str, Any]) -> None:
            ts.update_job(rec.domid, **fact)

        with ts.job(rec, "network-attach", spec=format_vif(_pinned(new))) as rec:
            try:
                made = await (ts.backend.attach_nic(h, replace(dc, uuid=rec.uuid), _pinned(new),
                                                  stale, note))
            except BackendError as err:
                err.within(f"network-attach {rec.name}")
                raise
            vifs = [obj for obj in rec.extra.get(VIFS) or [] if obj not in made.cleared]
            if made.host_end is not None:
                vifs.append(dict(made.host_end))
            rec = _keep(ts, rec, [_pinned(n) for n in (*current, new)], vifs)
    return _info(new, _taps(rec))


def _find(rec: DomainRecord, current: tuple[NicPlan, ...], which: str) -> NicPlan:
    for n in current:
        if (which.isdigit() and n.devid == int(which)) or (
                _MAC.fullmatch(which) and n.mac == which.lower()):
            return n
    raise NotFoundError(
        "vif", which, f"network-detach {rec.name}: no vif {which!r} (give a devid or a MAC; "
        f"`xenlab vm network-list {rec.name}` lists them)"
    )


async def network_detach(ts: Toolstack, name: str, which: str, *, timeout: float = 30.0) -> NicInfo:
    """Unplug vif ``which`` (a devid or a MAC) from running domain ``name``; what it was.

    CLI: ``xenlab vm network-detach DOM DEVID|MAC``.  The guest must let the
    device go (ACPI hotplug).  Once QEMU has deleted the device the record
    drops the vif; its netdev is removed and its tap brought offline after
    that, and what fails there is logged (the next network-attach or the
    domain's end retries the tap).  A NIC an earlier, timed-out detach left
    going is only cleaned up.

    :raise XenlabError: there is no such vif.
    :raise BackendError: the guest did not release the NIC within ``timeout``
        seconds (the NIC stays in the record, with its tap), or QEMU refused.
    """
    async with ts.live(name) as rec:
        current = _nics(ts, rec)
        gone = _find(rec, current, which)
        taps = _taps(rec)

        h = ts.handle(rec)
        ends = [obj for obj in rec.extra.get(VIFS) or []
                if hotplug.vif_from_json(obj).devid == gone.devid]

        with ts.job(rec, "network-detach", devid=gone.devid) as rec:
            try:
                await ts.backend.detach_nic(h, gone.devid, timeout)
            except DeviceNotReleased as err:
                raise BackendError(
                    f"network-detach {rec.name}: the guest did not release vif "
                    f"{gone.devid} within {timeout:g} s (no ACPI hotplug in the "
                    "guest?); it stays in the record, and network-detach again "
                    "finishes once the guest lets it go"
                ) from err
            except BackendError as err:
                err.within(f"network-detach {rec.name}: vif {gone.devid}")
                raise
            faults.point("network-detach.unplugged")
            # The guest has no NIC now: the record says so before any clean-up can
            # fail (the host ends stay listed until they are offline).
            rec = _keep(ts, rec, [_pinned(n) for n in current if n.devid != gone.devid],
                        list(rec.extra.get(VIFS) or []))
        freed = await ts.backend.release_nic(h, gone.devid, ends)
        if freed.offlined:
            left = [obj for obj in rec.extra.get(VIFS) or [] if obj not in freed.offlined]
            rec = ts.store.patch(rec.domid, extra_set={VIFS: left} if left else {},
                                 extra_drop=[] if left else [VIFS])
        if freed.problems:
            log.warning("network-detach %s: vif %d is detached, but cleaning up failed: %s "
                        "(the next network-attach or the domain's end retries the tap)",
                        rec.name, gone.devid, "; ".join(freed.problems))
    return _info(gone, taps)


async def recover_job(ts: Toolstack, rec: DomainRecord, job: Job) -> DomainRecord | None:
    """Finish or undo a network-attach or -detach that was killed (``Toolstack.converge``).

    The truth is whether QEMU has the NIC's device.  An attach is finished
    when it has (the NIC and its tap recorded), else undone (a leftover
    netdev deleted, a tap it brought up taken down).  A detach is finished
    when QEMU no longer has the device (the record drops the NIC; the netdev
    and tap go as far as they can), else the NIC stays, as it is there.
    """
    if rec.state == SHUTOFF or not ts.alive(rec):
        return rec
    h = ts.handle(rec)
    if job.verb == "network-attach":
        dc, _ = config_from_text(rec.config_text, rec.config_path)
        spec = parse_vif(str(job.detail.get("spec", "")), source="interrupted network-attach")
        new = ts.backend.plan_nic(replace(dc, uuid=rec.uuid), spec, int(spec.devid or 0))
        raw = job.detail.get("vif")
        vif = hotplug.vif_from_json(raw) if isinstance(raw, dict) else None

        async def has() -> bool:
            if await ts.backend.has_nic(h, new.devid):
                return True
            await ts.backend.discard_nic(h, new.devid, raw if isinstance(raw, dict) else None)
            return False

        if await has():
            current = [n for n in _nics(ts, rec) if n.devid != new.devid]
            vifs = [o for o in rec.extra.get(VIFS) or []
                    if hotplug.vif_from_json(o).devid != new.devid]
            if vif is not None:
                vifs.append(hotplug.vif_to_json(vif))
            rec = _keep(ts, rec, [*(_pinned(n) for n in current), _pinned(new)], vifs)
            log.warning("network-attach %s: an attach killed after QEMU had the NIC is "
                        "finished: vif %d is recorded", rec.name, new.devid)
        else:
            log.warning("network-attach %s: an attach killed before QEMU had the NIC is "
                        "undone", rec.name)
        return rec
    if job.verb == "network-detach":
        devid = int(job.detail.get("devid", -1))
        present_nics = _nics(ts, rec)
        gone = next((n for n in present_nics if n.devid == devid), None)
        if gone is None:
            return rec

        if not await ts.backend.has_nic(h, gone.devid):
            rec = _keep(ts, rec, [_pinned(n) for n in present_nics if n.devid != devid],
                        list(rec.extra.get(VIFS) or []))
            log.warning("network-detach %s: a detach killed after the guest let vif %d go is "
                        "finished (network-detach again takes down its tap if it is left)",
                        rec.name, devid)
    return rec

