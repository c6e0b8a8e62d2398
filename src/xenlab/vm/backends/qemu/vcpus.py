"""vCPUs of a QEMU domain: hotplug, the guest onlining them, thread affinity and stats.

The slots come from ``query-hotpluggable-cpus``; :func:`set_vcpus` plugs free
slots with ``device_add`` (lowest topology first) and never unplugs (on QEMU
7.2 under TCG a CPU ``device_add`` after an unplug aborts QEMU), then the guest
agent onlines or offlines guest CPUs (CPU N stays QEMU's vCPU N), as Xen's
guest xenbus handler onlines the CPUs the toolstack makes available.  Host
affinity is set on QEMU's vCPU threads (``query-cpus-fast`` gives their ids)
with ``sched_setaffinity``; Linux has no soft affinity.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xenlab.config.model import DomainConfig
from xenlab.config.specs.cpus import CpuSet
from xenlab.errors import BackendError, NotFoundError, StateError, UsageError
from xenlab.vm.backend import VcpuReport, VcpuState
from xenlab.vm.backends.qemu.qmp import GuestAgent, Qmp
from xenlab.vm.hostcpus import cpulist, host_topology, ranges, resolve_cpus

__all__ = ["apply_config_affinity", "pin", "plug_vcpus", "set_vcpus", "vcpu_rows",
           "vcpu_threads"]

_GUEST_TIMEOUT = 5.0
# The topology properties of a CPU slot, outermost first: the plug order.
_TOPOLOGY = ("node-id", "drawer-id", "book-id", "socket-id", "die-id", "cluster-id",
             "module-id", "core-id", "thread-id")


def _list(value: object, what: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise BackendError(f"QMP {what}: unexpected reply {value!r:.200}")
    return value


def pin_thread(tid: int, cpus: frozenset[int], what: str) -> None:
    try:
        os.sched_setaffinity(tid, cpus)
    except OSError as err:
        raise BackendError(
            f"{what}: sched_setaffinity(thread {tid}, {ranges(cpus)}): "
            f"{err.strerror or err} (CPUs outside this process's cpuset?)"
        ) from err


async def vcpu_threads(qmp: Qmp) -> list[tuple[int, int]]:
    """(vCPU index, host thread id) of each plugged vCPU, by index."""
    cpus = _list(await qmp.execute("query-cpus-fast"), "query-cpus-fast")
    return sorted((int(c["cpu-index"]), int(c["thread-id"])) for c in cpus)


def _affinity_for(dc: DomainConfig, vcpu: int) -> CpuSet | None:
    if dc.cpus is None:
        return None
    if isinstance(dc.cpus, CpuSet):
        return dc.cpus
    # The list form: vCPUs beyond the list are left on all CPUs, as xl does.
    return dc.cpus[vcpu] if vcpu < len(dc.cpus) else None


def apply_config_affinity(dc: DomainConfig, threads: Sequence[tuple[int, int]], name: str,
                          only: set[int] | None = None) -> dict[int, frozenset[int]]:
    host = host_topology()
    done: dict[int, frozenset[int]] = {}
    for vcpu, tid in threads:
        if only is not None and vcpu not in only:
            continue
        spec = _affinity_for(dc, vcpu)
        if spec is None:
            continue
        cpus = resolve_cpus(spec, host, f"domain {name!r} cpus= (vCPU {vcpu})")
        pin_thread(tid, cpus, f"domain {name!r} vCPU {vcpu}")
        done[vcpu] = cpus
    return done


def _slot_key(slot: Mapping[str, Any]) -> tuple[int, ...]:
    props = slot.get("props", {})
    return tuple(int(props.get(k, -1)) for k in _TOPOLOGY)


def _slot_id(slot: Mapping[str, Any]) -> str:
    props = slot.get("props", {})
    return "vcpu-" + "-".join(str(props[k]) for k in _TOPOLOGY if k in props)


async def plug_vcpus(qmp: Qmp, want: int) -> set[int]:
    """Plug free CPU slots until ``want`` are present (never unplugs); the vCPU indexes added."""
    slots = _list(await qmp.execute("query-hotpluggable-cpus"), "query-hotpluggable-cpus")
    present = sum(1 for s in slots if "qom-path" in s)
    free = sorted((s for s in slots if "qom-path" not in s), key=_slot_key)
    if want <= present:
        return set()
    before = {i for i, _ in await vcpu_threads(qmp)}
    for slot in free[: want - present]:
        args = {"driver": slot["type"], "id": _slot_id(slot), **slot.get("props", {})}
        await qmp.execute("device_add", args)
    return {i for i, _ in await vcpu_threads(qmp)} - before


_CPU_STATE = "cat /sys/devices/system/cpu/present /sys/devices/system/cpu/online"
_NPROC = "nproc; cat /sys/devices/system/cpu/online"


async def _guest_cpu_sets(agent: GuestAgent) -> tuple[set[int], set[int]]:
    """The guest's (present, online) CPUs."""
    res = await agent.exec(["sh", "-c", _CPU_STATE], timeout=_GUEST_TIMEOUT)
    lines = res.stdout.decode("ascii", "replace").split()
    if res.exitcode != 0 or len(lines) != 2:
        raise BackendError(f"guest: {_CPU_STATE!r} failed: {res.stderr!r}")
    return cpulist(lines[0]), cpulist(lines[1])


async def _guest_online(qga: Path, name: str, want: int, timeout: float
                        ) -> tuple[int, str]:
    """Online or offline guest CPUs until ``want`` are online; (nproc, online list).

    Onlines the lowest offline CPUs and offlines the highest online ones
    (never CPU 0), so guest CPU N stays QEMU's vCPU N.

    :raise StateError: the agent does not answer, or the guest does not get
        there within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    try:
        async with GuestAgent(qga) as agent:
            while True:
                present, online = await _guest_cpu_sets(agent)
                if len(online) == want:
                    res = await agent.exec(["sh", "-c", _NPROC], timeout=_GUEST_TIMEOUT)
                    nproc, cpus = res.stdout.decode("ascii", "replace").split()
                    return int(nproc), cpus
                if time.monotonic() >= deadline:
                    raise StateError(
                        f"domain {name!r}: the guest has CPUs {ranges(online)} online "
                        f"(present {ranges(present)}) after {timeout:g} s, not {want}"
                    )
                if len(online) < want:
                    change = sorted(present - online)[: want - len(online)]
                    value = 1
                else:
                    change = sorted(online - {0}, reverse=True)[: len(online) - want]
                    value = 0
                if change:
                    script = "; ".join(
                        f"echo {value} > /sys/devices/system/cpu/cpu{c}/online" for c in change)
                    await agent.exec(["sh", "-c", script], timeout=_GUEST_TIMEOUT)
                else:
                    # A plugged CPU reaches the guest by an ACPI event a moment later.
                    await asyncio.sleep(0.2)
    except BackendError as err:
        raise StateError(
            f"domain {name!r}: vCPUs are plugged in QEMU but the guest could not be told "
            f"to online/offline them (its agent: {err})"
        ) from err


def thread_stat(pid: int, tid: int) -> tuple[str, float, int]:
    """(state letter, user+system seconds, last host CPU) of thread ``tid``."""
    text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    # Fields after the parenthesised name start at field 3 (the state).
    fields = text.rsplit(")", 1)[1].split()
    ticks = int(fields[14 - 3]) + int(fields[15 - 3])
    return fields[0], ticks / os.sysconf("SC_CLK_TCK"), int(fields[39 - 3])


async def set_vcpus(qmp: Qmp, qga: Path, name: str, n: int, dc: DomainConfig,
                    timeout: float) -> VcpuReport:
    """Plug slots up to ``n`` (the config's ``cpus=`` on the new threads), then have the
    guest online exactly ``n``."""
    slots = _list(await qmp.execute("query-hotpluggable-cpus"), "query-hotpluggable-cpus")
    if not 1 <= n <= len(slots):
        raise UsageError(
            f"domain {name!r}: vcpu-set {n} is out of range: it has "
            f"maxvcpus={len(slots)} (1 to {len(slots)})"
        )
    added = await plug_vcpus(qmp, n)
    if added:
        apply_config_affinity(dc, await vcpu_threads(qmp), name, added)
    online, cpus = await _guest_online(qga, name, n, timeout)
    return VcpuReport(n, online, cpus)


async def vcpu_rows(qmp: Qmp, pid: int, name: str, online: int | None
                    ) -> tuple[VcpuState, ...]:
    """Each vCPU's thread: its state, CPU time, last host CPU and affinity."""
    status = await qmp.execute("query-status")
    running = bool(status.get("running")) if isinstance(status, dict) else False
    threads = await vcpu_threads(qmp)
    # vcpu-set keeps guest CPUs 0..n-1 online (guest CPU N is QEMU's vCPU N).
    up = len(threads) if online is None else online
    rows: list[VcpuState] = []
    for vcpu, tid in threads:
        try:
            letter, seconds, cpu = thread_stat(pid, tid)
            affinity = frozenset(os.sched_getaffinity(tid))
        except (OSError, IndexError, ValueError) as err:
            raise BackendError(f"domain {name!r} vCPU {vcpu}: thread {tid}: {err}") from err
        if vcpu >= up:
            state = "offline"
        elif not running:
            state = "paused"
        else:
            state = "running" if letter == "R" else "blocked"
        rows.append(VcpuState(vcpu, cpu, state, seconds, affinity, tid))
    return tuple(rows)


async def pin(qmp: Qmp, name: str, vcpu: int | None, cpus: frozenset[int]
              ) -> dict[int, frozenset[int]]:
    """Pin vCPU ``vcpu``'s thread (None: every vCPU's) to ``cpus``; {vCPU: CPUs} pinned."""
    threads = await vcpu_threads(qmp)
    if vcpu is not None:
        threads = [(i, t) for i, t in threads if i == vcpu]
        if not threads:
            raise NotFoundError("vcpu", str(vcpu), f"domain {name!r} has no vCPU {vcpu}")
    done: dict[int, frozenset[int]] = {}
    for i, tid in threads:
        pin_thread(tid, cpus, f"domain {name!r} vCPU {i}")
        done[i] = cpus
    return done
