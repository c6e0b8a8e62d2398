"""xl's resource verbs on a domain: memory, vCPUs, affinity, rename and info (:func:`mem_set`, ...).

Every verb is a function over a :class:`~xenlab.vm.domain.Toolstack` and a
domain name or id.  Verbs that change a domain hold its lock; every wait on
QEMU or the guest has a timeout.

Design:
    - Memory is the balloon model of ``vm.qemu``: QEMU was started with
      ``-m MAXMEM`` and ``virtio-balloon-pci``; :func:`mem_set` moves the
      balloon target (QMP ``balloon``, in bytes) and waits until the guest's
      driver reports it (``BALLOON_CHANGE`` events, ``query-balloon``).
      :func:`mem_max` lowers the ceiling for later ``mem_set`` calls, as xl's
      ``mem-max`` does; it cannot raise it above the ``-m`` size QEMU runs
      with (that needs a restart with a bigger ``maxmem``).
    - vCPUs are QEMU's x86 CPU hotplug: the slots come from
      ``query-hotpluggable-cpus``; :func:`vcpu_set` plugs free slots with
      ``device_add`` (lowest topology first) and unplugs the highest with
      ``device_del`` (ACPI eject: the guest kernel offlines the CPU itself).
      A plugged CPU arrives offline in a guest without udev, so the verb
      onlines it through the guest agent, as Xen's guest xenbus handler
      onlines CPUs the toolstack makes available.
    - Host affinity is set on QEMU's vCPU threads (``query-cpus-fast`` gives
      their ids) with ``sched_setaffinity``; the config's ``cpus=`` is applied
      by :func:`apply_affinity` at create and to CPUs plugged later.  Linux has
      no soft affinity, so ``cpus_soft=`` is not applied.
    - :func:`rename` changes the store (the source of truth) and the stored
      config; a running QEMU keeps the name it was started with (``ps`` shows
      it), recorded in the record's ``extra[QEMU_NAME]``.

State kept in ``DomainRecord.extra`` (JSON):
    ``maxmem_mib`` (set by mem_max), ``memory_mib`` (the last balloon target),
    ``vcpus`` (the last vcpu_set count), ``qemu_name`` (the name QEMU runs
    under, when a rename made it differ).

Defaults (with reasons):
    - Memory floor 64 MiB: below that the project's Debian guest kernel
      (modules, page tables for ``maxmem``) runs out of memory and the OOM
      killer takes the agent; xl has no floor and lets the guest die.
    - Guest-report timeouts 5 s: the reports are extras, and a paused guest or
      one without an agent must not hold the verb for long.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xenlab.config.model import DomainConfig
from xenlab.config.specs.cpus import CpuSet, HostTopology, parse_cpus
from xenlab.errors import (
    BackendError,
    ConflictError,
    NotFoundError,
    StateError,
    UsageError,
    XenlabError,
)
from xenlab.vm.backend import MemoryReport
from xenlab.vm.domain import SHUTOFF, Toolstack
from xenlab.vm.domconfig import check_domain_name, config_from_text
from xenlab.vm.qemu import cpu_ranges
from xenlab.vm.qmp import CommandError, GuestAgent, Qmp
from xenlab.vm.qmp import run as _run
from xenlab.vm.runtime import MAXMEM_MIB, MEMORY_MIB, QEMU_NAME, VCPUS, VCPUS_PLUGGED
from xenlab.vm.store import DomainRecord, effective_state, is_alive

__all__ = [
    "MIN_MEMORY_MIB",
    "VCPUS_PLUGGED",
    "MemoryReport",
    "VcpuInfo",
    "VcpuReport",
    "apply_affinity",
    "format_vcpu_list",
    "host_topology",
    "info",
    "mem_max",
    "mem_set",
    "plug_vcpus",
    "plugged_vcpus",
    "rename",
    "vcpu_list",
    "vcpu_pin",
    "vcpu_set",
]

MIN_MEMORY_MIB = 64
_GUEST_TIMEOUT = 5.0
_MIB = 1 << 20
# The topology properties of a CPU slot, outermost first: the plug order.
_TOPOLOGY = ("node-id", "drawer-id", "book-id", "socket-id", "die-id", "cluster-id",
             "module-id", "core-id", "thread-id")


@dataclass(frozen=True, slots=True)
class VcpuReport:
    """What :func:`vcpu_set` achieved: plugged vCPUs and what the guest sees.

    ``guest_online`` is the guest's ``nproc`` and ``guest_cpus`` its
    ``/sys/devices/system/cpu/online`` (None when its agent did not answer).
    """

    vcpus: int
    guest_online: int | None
    guest_cpus: str | None


@dataclass(frozen=True, slots=True)
class VcpuInfo:
    """One row of ``vcpu-list``.

    ``cpu`` is the host CPU the thread last ran on, ``state`` ``running``,
    ``blocked`` (the vCPU thread sleeps: the guest idles), ``paused`` or
    ``offline`` (plugged in QEMU, offlined in the guest by :func:`vcpu_set`),
    ``time_s`` the thread's user+system CPU time, ``affinity`` its host CPUs.
    """

    name: str
    domid: int
    vcpu: int
    cpu: int
    state: str
    time_s: float
    affinity: frozenset[int]
    thread_id: int


# --- helpers ---------------------------------------------------------------------


def _live(ts: Toolstack, name: str) -> DomainRecord:
    return ts.live_record(name)


def _config(rec: DomainRecord) -> DomainConfig:
    return config_from_text(rec.config_text, rec.config_path)[0]


def _dict(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BackendError(f"QMP {what}: unexpected reply {value!r}")
    return value


def _list(value: object, what: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise BackendError(f"QMP {what}: unexpected reply {value!r}")
    return value


def _set_extra(ts: Toolstack, domid: int, **values: object) -> DomainRecord:
    """Merge ``values`` into the stored record's extra (None: drop the key), nothing else."""
    return ts.store.patch(domid, extra_set={k: v for k, v in values.items() if v is not None},
                          extra_drop=[k for k, v in values.items() if v is None])


# --- memory ----------------------------------------------------------------------


def _maxmem(rec: DomainRecord, dc: DomainConfig) -> int:
    value = rec.extra.get(MAXMEM_MIB)
    return int(value) if isinstance(value, int) else dc.maxmem_mib


def _target(rec: DomainRecord, dc: DomainConfig) -> int:
    value = rec.extra.get(MEMORY_MIB)
    return int(value) if isinstance(value, int) else dc.memory_mib


def mem_set(ts: Toolstack, name: str, mib: int, *, timeout: float = 30.0) -> MemoryReport:
    """Balloon domain ``name`` to ``mib`` MiB and report what QEMU and the guest see.

    CLI: ``xenlab vm mem-set DOM MEMORY`` (xl's ``mem-set``; MEMORY in MiB, or
    with a k/m/g suffix parsed by the caller).  Waits up to ``timeout``
    seconds for the guest's balloon driver to reach the target; a guest that
    has not got there by then is reported with ``reached=False`` (the target
    stays set, as with xl, which does not wait at all).

    :raise XenlabError: ``mib`` above the domain's maxmem (naming both) or
        below :data:`MIN_MEMORY_MIB`; nothing is changed then.
    :raise StateError: the domain is not running.
    :raise BackendError: QEMU failed.
    """
    with ts.live(name) as rec:
        dc = _config(rec)
        maxmem = _maxmem(rec, dc)
        if mib > maxmem:
            how = ("raise it with mem-max first" if maxmem < dc.maxmem_mib else
                   "a bigger maxmem needs a restart with a bigger maxmem=")
            raise UsageError(
                f"domain {rec.name!r}: mem-set {mib} MiB is above its maxmem of {maxmem} MiB "
                f"(xl cannot set memory beyond maxmem; {how})"
            )
        if mib < MIN_MEMORY_MIB:
            raise UsageError(
                f"domain {rec.name!r}: mem-set {mib} MiB is below the {MIN_MEMORY_MIB} MiB "
                "floor (the guest would run out of memory)"
            )

        report = _run(ts.backend.set_memory(ts.handle(rec), mib, timeout))
        _set_extra(ts, rec.domid, memory_mib=mib)
    return report


def mem_max(ts: Toolstack, name: str, mib: int) -> int:
    """Set the ceiling for later :func:`mem_set` calls on ``name``; returns it (MiB).

    CLI: ``xenlab vm mem-max DOM MEMORY`` (xl's ``mem-max``).  As libxl does,
    the ceiling cannot go below the current balloon target.  It cannot go
    above the memory QEMU was started with either: the guest's address space
    is fixed at start, so raising maxmem beyond it needs the domain restarted
    with a bigger ``maxmem=``.

    :raise XenlabError: ``mib`` out of those bounds; nothing is changed then.
    :raise StateError: the domain is not running.
    """
    with ts.live(name) as rec:
        dc = _config(rec)
        target = _target(rec, dc)
        if mib < target:
            raise UsageError(
                f"domain {rec.name!r}: mem-max {mib} MiB is below its current memory "
                f"({target} MiB); mem-set it lower first"
            )
        # The backend refuses what it cannot give (QEMU: above what it was started with).
        _run(ts.backend.set_max_memory(ts.handle(rec), mib))
        _set_extra(ts, rec.domid, maxmem_mib=mib)
    return mib


# --- vCPUs -----------------------------------------------------------------------


def host_topology() -> HostTopology:
    """This host's CPUs and NUMA nodes, from ``/sys/devices/system``."""
    nr = os.cpu_count() or 1
    nodes: dict[int, frozenset[int]] = {}
    base = Path("/sys/devices/system/node")
    for d in sorted(base.glob("node[0-9]*")) if base.is_dir() else ():
        try:
            cpus = _cpulist((d / "cpulist").read_text())
        except (OSError, ValueError):
            continue
        nodes[int(d.name[4:])] = frozenset(cpus)
    return HostTopology(nr, nodes)


def _cpulist(text: str) -> set[int]:
    """Parse the kernel's ``0-3,5`` CPU list format."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _ranges(cpus: Iterable[int]) -> str:
    """Write CPUs as ``0-3,5``."""
    return ",".join(cpu_ranges(cpus))


def _resolve(spec: CpuSet | str, host: HostTopology, what: str) -> frozenset[int]:
    cpuset = parse_cpus(spec, source=what, host=host) if isinstance(spec, str) else spec
    cpus = cpuset.resolve(host.nr_cpus, host.node_cpus)
    if not cpus:
        raise UsageError(f"{what}: {str(cpuset)!r} names no CPU of this host")
    return cpus


def _pin_thread(tid: int, cpus: frozenset[int], what: str) -> None:
    try:
        os.sched_setaffinity(tid, cpus)
    except OSError as err:
        raise BackendError(
            f"{what}: sched_setaffinity(thread {tid}, {_ranges(cpus)}): "
            f"{err.strerror or err} (CPUs outside this process's cpuset?)"
        ) from err


async def _vcpu_threads(qmp: Qmp) -> list[tuple[int, int]]:
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


def _apply(dc: DomainConfig, threads: Sequence[tuple[int, int]], name: str,
           only: set[int] | None = None) -> dict[int, frozenset[int]]:
    host = host_topology()
    done: dict[int, frozenset[int]] = {}
    for vcpu, tid in threads:
        if only is not None and vcpu not in only:
            continue
        spec = _affinity_for(dc, vcpu)
        if spec is None:
            continue
        cpus = _resolve(spec, host, f"domain {name!r} cpus= (vCPU {vcpu})")
        _pin_thread(tid, cpus, f"domain {name!r} vCPU {vcpu}")
        done[vcpu] = cpus
    return done


def apply_affinity(ts: Toolstack, rec: DomainRecord) -> dict[int, frozenset[int]]:
    """Pin ``rec``'s vCPU threads as its config's ``cpus=`` says; {vCPU: host CPUs} pinned.

    For ``create`` to call once QEMU runs (the domain's lock is re-entrant).
    A single spec applies to every vCPU; the list form gives one spec per
    vCPU and leaves the rest unpinned.  ``cpus_soft=`` has no Linux
    counterpart and is ignored.

    :raise XenlabError: a spec names no CPU of this host.
    :raise BackendError: the kernel refused the affinity.
    """
    dc = _config(rec)
    if dc.cpus is None:
        return {}
    with ts.store.lock(rec.domid):

        async def threads() -> list[tuple[int, int]]:
            async with Qmp.open(ts.paths(rec).qmp) as qmp:
                return await _vcpu_threads(qmp)

        return _apply(dc, _run(threads()), rec.name)


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
    before = {i for i, _ in await _vcpu_threads(qmp)}
    for slot in free[: want - present]:
        args = {"driver": slot["type"], "id": _slot_id(slot), **slot.get("props", {})}
        await qmp.execute("device_add", args)
    return {i for i, _ in await _vcpu_threads(qmp)} - before


_CPU_STATE = "cat /sys/devices/system/cpu/present /sys/devices/system/cpu/online"
# DomainRecord.extra key: vCPUs present in QEMU, boot and hot-plugged (saves and
# memory snapshots carry it; the QEMU that loads them plugs as many first).
_NPROC = "nproc; cat /sys/devices/system/cpu/online"


async def _guest_cpu_sets(agent: GuestAgent) -> tuple[set[int], set[int]]:
    """The guest's (present, online) CPUs."""
    res = await agent.exec(["sh", "-c", _CPU_STATE], timeout=_GUEST_TIMEOUT)
    lines = res.stdout.decode("ascii", "replace").split()
    if res.exitcode != 0 or len(lines) != 2:
        raise BackendError(f"guest: {_CPU_STATE!r} failed: {res.stderr!r}")
    return _cpulist(lines[0]), _cpulist(lines[1])


async def _guest_online(ts: Toolstack, rec: DomainRecord, want: int, timeout: float
                        ) -> tuple[int, str]:
    """Online or offline guest CPUs until ``want`` are online; (nproc, online list).

    Onlines the lowest offline CPUs and offlines the highest online ones
    (never CPU 0), so guest CPU N stays QEMU's vCPU N.

    :raise StateError: the agent does not answer, or the guest does not get
        there within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    try:
        async with GuestAgent(ts.paths(rec).qga) as agent:
            while True:
                present, online = await _guest_cpu_sets(agent)
                if len(online) == want:
                    res = await agent.exec(["sh", "-c", _NPROC], timeout=_GUEST_TIMEOUT)
                    nproc, cpus = res.stdout.decode("ascii", "replace").split()
                    return int(nproc), cpus
                if time.monotonic() >= deadline:
                    raise StateError(
                        f"domain {rec.name!r}: the guest has CPUs {_ranges(online)} online "
                        f"(present {_ranges(present)}) after {timeout:g} s, not {want}"
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
            f"domain {rec.name!r}: vCPUs are plugged in QEMU but the guest could not be told "
            f"to online/offline them (its agent: {err})"
        ) from err


def plugged_vcpus(rec: DomainRecord) -> int | None:
    """The vCPUs vcpu-set has plugged into the domain's QEMU, or None (only the boot ones)."""
    n = rec.extra.get(VCPUS_PLUGGED)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def vcpu_set(ts: Toolstack, name: str, n: int, *, timeout: float = 30.0) -> VcpuReport:
    """Make ``n`` vCPUs online in domain ``name`` (1 <= n <= maxvcpus).

    CLI: ``xenlab vm vcpu-set DOM VCPUS`` (xl's ``vcpu-set``).  Going up,
    QEMU CPU slots not plugged yet are plugged with ``device_add`` (the
    config's ``cpus=`` affinity is applied to their threads); then the guest
    agent onlines CPUs up to ``n``.  Going down, the agent offlines the
    highest CPUs, which stay plugged in QEMU, as Xen's vCPUs up to maxvcpus
    stay allocated while the guest has them offline.  QEMU's ``device_del``
    is not used: on QEMU 7.2 under TCG any CPU ``device_add`` after a CPU
    unplug aborts QEMU ("double free or corruption").

    :raise XenlabError: ``n`` out of range (naming maxvcpus).
    :raise StateError: the domain is not running, or the guest (its agent)
        did not online/offline the CPUs within ``timeout``.
    :raise BackendError: QEMU refused.
    """
    with ts.live(name) as rec:
        dc = _config(rec)

        async def go() -> tuple[int, str]:
            async with Qmp.open(ts.paths(rec).qmp) as qmp:
                slots = _list(await qmp.execute("query-hotpluggable-cpus"),
                              "query-hotpluggable-cpus")
                if not 1 <= n <= len(slots):
                    raise UsageError(
                        f"domain {rec.name!r}: vcpu-set {n} is out of range: it has "
                        f"maxvcpus={len(slots)} (1 to {len(slots)})"
                    )
                added = await plug_vcpus(qmp, n)
                if added:
                    _apply(dc, await _vcpu_threads(qmp), rec.name, added)
            return await _guest_online(ts, rec, n, timeout)

        online, cpus = _run(go())
        # The plugged count only grows (unplugging crashes QEMU 7.2 under TCG):
        # a QEMU that loads this guest's state later must have that many.
        plugged = max(n, int(rec.extra.get(VCPUS_PLUGGED) or 0))
        _set_extra(ts, rec.domid, vcpus=n, **{VCPUS_PLUGGED: plugged})
    return VcpuReport(n, online, cpus)


def _thread_stat(pid: int, tid: int) -> tuple[str, float, int]:
    """(state letter, user+system seconds, last host CPU) of thread ``tid``."""
    text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    # Fields after the parenthesised name start at field 3 (the state).
    fields = text.rsplit(")", 1)[1].split()
    ticks = int(fields[14 - 3]) + int(fields[15 - 3])
    return fields[0], ticks / os.sysconf("SC_CLK_TCK"), int(fields[39 - 3])


def vcpu_list(ts: Toolstack, name: str) -> list[VcpuInfo]:
    """One row per vCPU of domain ``name``, as ``xl vcpu-list`` shows them.

    CLI: ``xenlab vm vcpu-list [DOM...]`` (xl's ``vcpu-list``; no DOM: every
    running domain), printed with :func:`format_vcpu_list`.

    :raise StateError: the domain is not running.
    :raise BackendError: QEMU failed, or a vCPU thread vanished meanwhile.
    """
    rec = _live(ts, name)
    assert rec.pid is not None

    async def go() -> tuple[bool, list[tuple[int, int]]]:
        async with Qmp.open(ts.paths(rec).qmp) as qmp:
            status = _dict(await qmp.execute("query-status"), "query-status")
            return bool(status.get("running")), await _vcpu_threads(qmp)

    running, threads = _run(go())
    # vcpu_set keeps guest CPUs 0..n-1 online (guest CPU N is QEMU's vCPU N).
    set_to = rec.extra.get(VCPUS)
    online = int(set_to) if isinstance(set_to, int) else len(threads)
    rows: list[VcpuInfo] = []
    for vcpu, tid in threads:
        try:
            letter, seconds, cpu = _thread_stat(rec.pid, tid)
            affinity = frozenset(os.sched_getaffinity(tid))
        except (OSError, IndexError, ValueError) as err:
            raise BackendError(f"domain {rec.name!r} vCPU {vcpu}: thread {tid}: {err}") from err
        if vcpu >= online:
            state = "offline"
        elif not running:
            state = "paused"
        else:
            state = "running" if letter == "R" else "blocked"
        rows.append(VcpuInfo(rec.name, rec.domid, vcpu, cpu, state, seconds, affinity, tid))
    return rows


_XL_STATE = {"running": "r--", "blocked": "-b-", "paused": "--p", "offline": "---"}


def format_vcpu_list(rows: Iterable[VcpuInfo], nr_host_cpus: int | None = None) -> str:
    """``rows`` as xl prints vcpu-list (header included); affinity ``all`` when it is."""
    nr = nr_host_cpus or os.cpu_count() or 1
    everything = frozenset(range(nr))
    lines = [f"{'Name':<32} {'ID':>5} {'VCPU':>5} {'CPU':>5} {'State':<5} {'Time(s)':>9} "
             "Affinity (Hard / Soft)"]
    for r in rows:
        hard = "all" if r.affinity >= everything else _ranges(r.affinity)
        lines.append(f"{r.name:<32} {r.domid:>5} {r.vcpu:>5} {r.cpu:>5} "
                     f"{_XL_STATE.get(r.state, r.state):<5} {r.time_s:>9.1f} {hard} / all")
    return "\n".join(lines) + "\n"


def vcpu_pin(ts: Toolstack, name: str, vcpu: int | str, cpus: str | CpuSet
             ) -> dict[int, frozenset[int]]:
    """Set the host affinity of vCPU ``vcpu`` (an index or ``"all"``) to ``cpus``.

    CLI: ``xenlab vm vcpu-pin DOM VCPU|all CPUS`` (xl's ``vcpu-pin``, hard
    affinity; ``CPUS`` in xl's cpus syntax, e.g. ``0-1,^1`` or ``node:0``).
    Returns {vCPU: host CPUs} for the threads pinned.  Like xl, this changes
    the running domain only: CPUs plugged later get the config's ``cpus=``.

    :raise XenlabError: an unknown vCPU, or a spec naming CPUs this host lacks.
    :raise StateError: the domain is not running.
    :raise BackendError: the kernel refused the affinity.
    """
    host = host_topology()
    wanted = _resolve(cpus, host, "vcpu-pin")
    with ts.live(name) as rec:

        async def go() -> list[tuple[int, int]]:
            async with Qmp.open(ts.paths(rec).qmp) as qmp:
                return await _vcpu_threads(qmp)

        threads = _run(go())
        if vcpu != "all":
            index = vcpu if isinstance(vcpu, int) else _vcpu_index(vcpu)
            threads = [(i, t) for i, t in threads if i == index]
            if not threads:
                raise NotFoundError("vcpu", str(index), f"domain {rec.name!r} has no vCPU {index}")
        done: dict[int, frozenset[int]] = {}
        for i, tid in threads:
            _pin_thread(tid, wanted, f"domain {rec.name!r} vCPU {i}")
            done[i] = wanted
        return done


def _vcpu_index(text: str) -> int:
    if not text.isdigit():
        raise UsageError(f"vcpu-pin: {text!r} is not a vCPU number or 'all'")
    return int(text)


# --- rename and info -------------------------------------------------------------



def rename(ts: Toolstack, name: str, new: str) -> DomainRecord:
    """Rename domain ``name`` to ``new``; the updated record.

    CLI: ``xenlab vm rename DOM NEWNAME`` (xl's ``rename``).  The store and
    the stored config take the new name; a running QEMU keeps the name it was
    started with (``ps`` still shows ``guest=OLD``): it is kept in
    ``extra[QEMU_NAME]`` so the record can still be matched to its process.

    :raise XenlabError: ``new`` is taken, empty, all digits (it would read as
        an id) or has quotes, slashes, white space or control characters.
    :raise StateError: the domain's QEMU is gone (destroy it first).
    """
    try:
        check_domain_name(new)  # the rule create, restore and revert apply
    except XenlabError as err:
        raise UsageError(f"rename: {err}") from None
    rec = ts.get(name)
    if rec.state != SHUTOFF and not is_alive(rec):
        raise StateError(
            f"domain {rec.name!r} (id {rec.domid}) has stale state: `xenlab vm destroy "
            f"{rec.name}` clears it"
        )
    with ts.store.global_lock(), ts.locked(str(rec.domid)) as now:
        if now.uuid != rec.uuid:
            raise StateError(f"domain {rec.name!r} was replaced while rename waited for it; "
                             "nothing was done")
        rec = now
        if new == rec.name:
            return rec
        for other in ts.store.list():
            if other.name == new:
                raise ConflictError("domain", new, f"rename: a domain named {new!r} already exists "
                                  f"(id {other.domid})")
        # Later settings win in an xl config, as with create's overrides.
        text = rec.config_text.rstrip("\n") + f'\nname = "{new}"\n'
        extra = dict(rec.extra)
        if rec.state != SHUTOFF:
            qemu_name = str(extra.get(QEMU_NAME, rec.name))
            if qemu_name == new:
                extra.pop(QEMU_NAME, None)
            else:
                extra[QEMU_NAME] = qemu_name
        return ts.store.patch(rec.domid, expect_uuid=rec.uuid, name=new, config_text=text,
                              extra_set=extra, extra_drop=[k for k in rec.extra
                                                           if k not in extra])


def info(ts: Toolstack, name: str) -> dict[str, Any]:
    """The record of domain ``name`` plus live QMP facts, JSON-ready.

    CLI: ``xenlab vm info DOM [--json]``.  Keys: the record's fields,
    ``state`` (as ``list`` shows it), ``config`` (memory, maxmem, vcpus,
    maxvcpus, cpus), ``extra``, and ``live`` (None unless QEMU runs): QEMU's
    ``status``, ``accelerator``, ``balloon_mib``, ``memory_mib`` (the -m
    size), ``vcpus`` (index, thread, topology, host affinity), ``maxvcpus``,
    ``block`` (device, node, file, format, read-only), ``chardevs``.
    """
    rec = ts.get(name)
    dc = _config(rec)
    state = SHUTOFF if rec.state == SHUTOFF else effective_state(rec)
    out: dict[str, Any] = {
        "domid": rec.domid, "name": rec.name, "uuid": rec.uuid, "state": state,
        "pid": rec.pid, "config_path": rec.config_path, "created": rec.created,
        "accel": rec.accel, "extra": dict(rec.extra),
        "config": {
            "memory_mib": dc.memory_mib, "maxmem_mib": _maxmem(rec, dc),
            "vcpus": dc.vcpus, "maxvcpus": dc.maxvcpus,
            "cpus": None if dc.cpus is None else (
                str(dc.cpus) if isinstance(dc.cpus, CpuSet) else [str(c) for c in dc.cpus]),
        },
        "live": None,
    }
    if rec.state == SHUTOFF or not is_alive(rec):
        return out

    async def go() -> dict[str, Any]:
        async with Qmp.open(ts.paths(rec).qmp) as qmp:
            status = _dict(await qmp.execute("query-status"), "query-status")
            kvm = _dict(await qmp.execute("query-kvm"), "query-kvm")
            try:
                balloon: int | None = int(
                    _dict(await qmp.execute("query-balloon"), "query-balloon")["actual"])
            except CommandError:
                balloon = None  # no balloon device (a hand-made QEMU)
            size = _dict(await qmp.execute("query-memory-size-summary"),
                         "query-memory-size-summary")
            cpus = _list(await qmp.execute("query-cpus-fast"), "query-cpus-fast")
            slots = _list(await qmp.execute("query-hotpluggable-cpus"),
                          "query-hotpluggable-cpus")
            block = _list(await qmp.execute("query-block"), "query-block")
            chardevs = _list(await qmp.execute("query-chardev"), "query-chardev")
        vcpus = []
        for c in sorted(cpus, key=lambda c: int(c["cpu-index"])):
            tid = int(c["thread-id"])
            try:
                affinity: str | None = _ranges(os.sched_getaffinity(tid))
            except OSError:
                affinity = None
            vcpus.append({"vcpu": int(c["cpu-index"]), "thread_id": tid,
                          "props": c.get("props", {}), "affinity": affinity})
        disks = []
        for b in block:
            ins = b.get("inserted")
            disks.append({
                "device": b.get("qdev") or b.get("device"),
                "node": None if ins is None else ins.get("node-name"),
                "file": None if ins is None else ins.get("file"),
                "format": None if ins is None else ins.get("drv"),
                "read_only": None if ins is None else bool(ins.get("ro")),
                "removable": bool(b.get("removable")),
            })
        return {
            "status": status.get("status"),
            "accelerator": "kvm" if kvm.get("enabled") else "tcg",
            "balloon_mib": None if balloon is None else balloon // _MIB,
            "memory_mib": int(size.get("base-memory", 0)) // _MIB,
            "vcpus": vcpus,
            "maxvcpus": len(slots),
            "block": disks,
            "chardevs": [{"label": c.get("label"), "filename": c.get("filename")}
                         for c in chardevs],
        }

    out["live"] = _run(go())
    out["qemu_name"] = rec.extra.get(QEMU_NAME, rec.name)
    return out
