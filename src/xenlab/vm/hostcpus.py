"""This host's CPUs: their topology from sysfs, and xl cpus specs resolved against it.

Pure but for :func:`host_topology`, which reads ``/sys/devices/system``.  Used by
the verbs (``vcpu-pin``) and by the backends (a config's ``cpus=`` at start).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from xenlab.config.specs.cpus import CpuSet, HostTopology, parse_cpus
from xenlab.errors import UsageError
from xenlab.numa.topology import cpu_list

__all__ = ["cpu_ranges", "cpulist", "host_topology", "ranges", "resolve_cpus"]


def host_topology() -> HostTopology:
    """This host's CPUs and NUMA nodes, from ``/sys/devices/system``."""
    nr = os.cpu_count() or 1
    nodes: dict[int, frozenset[int]] = {}
    base = Path("/sys/devices/system/node")
    for d in sorted(base.glob("node[0-9]*")) if base.is_dir() else ():
        try:
            cpus = cpulist((d / "cpulist").read_text())
        except (OSError, ValueError):
            continue
        nodes[int(d.name[4:])] = frozenset(cpus)
    return HostTopology(nr, nodes)


def cpulist(text: str) -> set[int]:
    """Parse the kernel's ``0-3,5`` CPU list format."""
    return set(cpu_list(text))


def cpu_ranges(cpus: Iterable[int]) -> list[str]:
    """CPU numbers as ranges, in order: ``[5, 0, 1, 2]`` -> ``["0-2", "5"]``."""
    out: list[str] = []
    ordered = sorted(cpus)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return out


def ranges(cpus: Iterable[int]) -> str:
    """Write CPUs as ``0-3,5``."""
    return ",".join(cpu_ranges(cpus))


def resolve_cpus(spec: CpuSet | str, host: HostTopology, what: str) -> frozenset[int]:
    cpuset = parse_cpus(spec, source=what, host=host) if isinstance(spec, str) else spec
    cpus = cpuset.resolve(host.nr_cpus, host.node_cpus)
    if not cpus:
        raise UsageError(f"{what}: {str(cpuset)!r} names no CPU of this host")
    return cpus
