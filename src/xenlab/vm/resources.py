"""xl's resource verbs on a domain: memory, vCPUs, affinity, rename and info (:func:`mem_set`, ...).

Every verb is a function over a :class:`~xenlab.vm.domain.Toolstack` and a
domain name or id.  Verbs that change a domain hold its lock; every wait on
QEMU or the guest has a timeout.

Design:
    - Memory is xl's balloon model: :func:`mem_set` moves the target within
      the record's bounds (maxmem, a 64 MiB floor) and the backend balloons
      (on QEMU: backends/qemu/memory.py); :func:`mem_max` lowers the ceiling
      for later ``mem_set`` calls, as xl's ``mem-max`` does, and the backend
      refuses what it cannot give (QEMU: above the ``-m`` it started with).
    - vCPUs and their host affinity go through the backend (on QEMU:
      backends/qemu/vcpus.py: CPU hotplug, the guest agent onlining CPUs,
      ``sched_setaffinity`` on the vCPU threads; the config's ``cpus=`` is
      applied at start and to vCPUs plugged later).
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

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from xenlab.config.model import DomainConfig
from xenlab.config.specs.cpus import CpuSet
from xenlab.errors import (
    ConflictError,
    StateError,
    UsageError,
    XenlabError,
)
from xenlab.vm.backend import MemoryReport, VcpuReport
from xenlab.vm.domain import SHUTOFF, Toolstack
from xenlab.vm.domconfig import check_domain_name, config_from_text
from xenlab.vm.hostcpus import host_topology, ranges, resolve_cpus
from xenlab.vm.runtime import MAXMEM_MIB, MEMORY_MIB, VCPUS, VCPUS_PLUGGED
from xenlab.vm.store import STALE, DomainRecord

__all__ = [
    "MIN_MEMORY_MIB",
    "VCPUS_PLUGGED",
    "MemoryReport",
    "VcpuInfo",
    "VcpuReport",
    "format_vcpu_list",
    "host_topology",
    "info",
    "mem_max",
    "mem_set",
    "plugged_vcpus",
    "rename",
    "vcpu_list",
    "vcpu_pin",
    "vcpu_set",
]

MIN_MEMORY_MIB = 64
_MIB = 1 << 20


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


async def mem_set(ts: Toolstack, name: str, mib: int, *, timeout: float = 30.0) -> MemoryReport:
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
    async with ts.live(name) as rec:
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

        report = await ts.backend.set_memory(ts.handle(rec), mib, timeout)
        _set_extra(ts, rec.domid, memory_mib=mib)
    return report


async def mem_max(ts: Toolstack, name: str, mib: int) -> int:
    """Set the ceiling for later :func:`mem_set` calls on ``name``; returns it (MiB).

    CLI: ``xenlab vm mem-max DOM MEMORY`` (xl's ``mem-max``).  As libxl does,
    the ceiling cannot go below the current balloon target.  It cannot go
    above the memory QEMU was started with either: the guest's address space
    is fixed at start, so raising maxmem beyond it needs the domain restarted
    with a bigger ``maxmem=``.

    :raise XenlabError: ``mib`` out of those bounds; nothing is changed then.
    :raise StateError: the domain is not running.
    """
    async with ts.live(name) as rec:
        dc = _config(rec)
        target = _target(rec, dc)
        if mib < target:
            raise UsageError(
                f"domain {rec.name!r}: mem-max {mib} MiB is below its current memory "
                f"({target} MiB); mem-set it lower first"
            )
        # The backend refuses what it cannot give (QEMU: above what it was started with).
        await ts.backend.set_max_memory(ts.handle(rec), mib)
        _set_extra(ts, rec.domid, maxmem_mib=mib)
    return mib


# --- vCPUs -----------------------------------------------------------------------


def plugged_vcpus(rec: DomainRecord) -> int | None:
    """The vCPUs vcpu-set has plugged into the domain's QEMU, or None (only the boot ones)."""
    n = rec.extra.get(VCPUS_PLUGGED)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


async def vcpu_set(ts: Toolstack, name: str, n: int, *, timeout: float = 30.0) -> VcpuReport:
    """Make ``n`` vCPUs online in domain ``name`` (1 <= n <= maxvcpus).

    CLI: ``xenlab vm vcpu-set DOM VCPUS`` (xl's ``vcpu-set``).  The backend
    plugs what is missing (the config's ``cpus=`` on new vCPUs) and has the
    guest online or offline CPUs; on QEMU vCPUs going down stay plugged, as
    Xen's vCPUs up to maxvcpus stay allocated while the guest has them
    offline (backends/qemu/vcpus.py says why).

    :raise UsageError: ``n`` out of range (naming maxvcpus).
    :raise StateError: the domain is not running, or the guest did not
        online/offline the CPUs within ``timeout``.
    :raise BackendError: the hypervisor refused.
    """
    async with ts.live(name) as rec:
        report = await ts.backend.set_vcpus(ts.handle(rec), n, _config(rec), timeout)
        # The plugged count only grows (unplugging crashes QEMU 7.2 under TCG):
        # a QEMU that loads this guest's state later must have that many.
        plugged = max(n, int(rec.extra.get(VCPUS_PLUGGED) or 0))
        _set_extra(ts, rec.domid, vcpus=n, **{VCPUS_PLUGGED: plugged})
    return report


async def vcpu_list(ts: Toolstack, name: str) -> list[VcpuInfo]:
    """One row per vCPU of domain ``name``, as ``xl vcpu-list`` shows them.

    CLI: ``xenlab vm vcpu-list [DOM...]`` (xl's ``vcpu-list``; no DOM: every
    running domain), printed with :func:`format_vcpu_list`.

    :raise StateError: the domain is not running.
    :raise BackendError: the hypervisor failed, or a vCPU vanished meanwhile.
    """
    rec = _live(ts, name)
    set_to = rec.extra.get(VCPUS)
    online = set_to if isinstance(set_to, int) and not isinstance(set_to, bool) else None
    rows = await ts.backend.vcpus(ts.handle(rec), online)
    return [VcpuInfo(rec.name, rec.domid, r.vcpu, r.cpu, r.state, r.time_s, r.affinity,
                     r.thread_id) for r in rows]


_XL_STATE = {"running": "r--", "blocked": "-b-", "paused": "--p", "offline": "---"}


def format_vcpu_list(rows: Iterable[VcpuInfo], nr_host_cpus: int | None = None) -> str:
    """``rows`` as xl prints vcpu-list (header included); affinity ``all`` when it is."""
    nr = nr_host_cpus or os.cpu_count() or 1
    everything = frozenset(range(nr))
    lines = [f"{'Name':<32} {'ID':>5} {'VCPU':>5} {'CPU':>5} {'State':<5} {'Time(s)':>9} "
             "Affinity (Hard / Soft)"]
    for r in rows:
        hard = "all" if r.affinity >= everything else ranges(r.affinity)
        lines.append(f"{r.name:<32} {r.domid:>5} {r.vcpu:>5} {r.cpu:>5} "
                     f"{_XL_STATE.get(r.state, r.state):<5} {r.time_s:>9.1f} {hard} / all")
    return "\n".join(lines) + "\n"


async def vcpu_pin(ts: Toolstack, name: str, vcpu: int | str, cpus: str | CpuSet
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
    wanted = resolve_cpus(cpus, host_topology(), "vcpu-pin")
    index = None if vcpu == "all" else vcpu if isinstance(vcpu, int) else _vcpu_index(vcpu)
    async with ts.live(name) as rec:
        return await ts.backend.pin_vcpus(ts.handle(rec), index, wanted)


def _vcpu_index(text: str) -> int:
    if not text.isdigit():
        raise UsageError(f"vcpu-pin: {text!r} is not a vCPU number or 'all'")
    return int(text)


# --- rename and info -------------------------------------------------------------



async def rename(ts: Toolstack, name: str, new: str) -> DomainRecord:
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
    if rec.state != SHUTOFF and not ts.alive(rec):
        raise StateError(
            f"domain {rec.name!r} (id {rec.domid}) has stale state: `xenlab vm destroy "
            f"{rec.name}` clears it"
        )
    async with ts.store.aglobal_lock(), ts.locked(str(rec.domid)) as now:
        if now.uuid != rec.uuid:
            raise StateError(f"domain {rec.name!r} was replaced while rename waited for it; "
                             "nothing was done")
        rec = now
        if new == rec.name:
            return rec
        for other in ts.store.list():
            if other.name == new:
                raise ConflictError("domain", new, f"rename: a domain named {new!r} "
                                    f"already exists (id {other.domid})")
        # Later settings win in an xl config, as with create's overrides.
        text = rec.config_text.rstrip("\n") + f'\nname = "{new}"\n'
        # A running domain may keep its old name inside the hypervisor (QEMU's -name):
        # the backend says which record facts keep track of that.
        facts = (await ts.backend.rename(ts.handle(rec), new) if rec.state != SHUTOFF
                 else {})
        return ts.store.patch(
            rec.domid, expect_uuid=rec.uuid, name=new, config_text=text,
            extra_set={k: v for k, v in facts.items() if v is not None},
            extra_drop=[k for k, v in facts.items() if v is None])


async def info(ts: Toolstack, name: str) -> dict[str, Any]:
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
    alive = rec.state != SHUTOFF and ts.alive(rec)
    state = rec.state if alive or rec.state == SHUTOFF or rec.pid is None else STALE
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
    if not alive:
        return out

    live = dict(await ts.backend.info(ts.handle(rec)))
    if "qemu_name" in live:
        out["qemu_name"] = live.pop("qemu_name")  # where `vm info --json` has always had it
    out["live"] = live
    return out
