"""A host's CPU topology: :class:`Topology` (pCPUs by core, LLC, socket and NUMA node).

One type for the simulator and the toolstack.  It comes from a spec
(:func:`from_spec`: counts of sockets, cores, threads, or explicit lists;
what scenario files give) or from this machine's sysfs (:func:`from_sysfs`,
which reads only the files under the root it is given, so tests hand it a
directory shaped like the kernel's).  Pure values: nothing here changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xenlab.errors import XenlabError


@dataclass(frozen=True, slots=True)
class Cpu:
    """One pCPU and where it sits."""

    id: int
    core: int  # physical core (hyperthreads share it)
    llc: int  # last-level cache domain
    socket: int
    node: int  # NUMA node


@dataclass(frozen=True, slots=True)
class Topology:
    """pCPUs in id order, and the NUMA distance matrix (``distances[a][b]``, 10 = local)."""

    cpus: tuple[Cpu, ...]
    distances: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if not self.cpus:
            raise XenlabError("a host needs at least one pCPU")
        if [c.id for c in self.cpus] != list(range(len(self.cpus))):
            raise XenlabError("pCPU ids must be 0..N-1 in order")

    @property
    def nr_cpus(self) -> int:
        """How many pCPUs."""
        return len(self.cpus)

    @property
    def nodes(self) -> tuple[int, ...]:
        """The NUMA node ids, sorted."""
        return tuple(sorted({c.node for c in self.cpus}))

    def group(self, level: str) -> tuple[tuple[int, ...], ...]:
        """pCPU ids grouped by ``level``: "cpu", "core", "llc", "socket", "node" or "global"."""
        if level == "global":
            return (tuple(c.id for c in self.cpus),)
        if level == "cpu":
            return tuple((c.id,) for c in self.cpus)
        if level not in ("core", "llc", "socket", "node"):
            raise XenlabError(
                f"unknown topology level {level!r} (expected cpu, core, llc, socket, node "
                "or global)")
        groups: dict[int, list[int]] = {}
        for c in self.cpus:
            groups.setdefault(getattr(c, level), []).append(c.id)
        return tuple(tuple(v) for _, v in sorted(groups.items()))

    def distance(self, a: int, b: int) -> int:
        """NUMA distance between nodes ``a`` and ``b`` (10 local, 20 remote by default)."""
        if self.distances:
            return self.distances[a][b]
        return 10 if a == b else 20

    def to_json(self) -> dict[str, Any]:
        """The topology as JSON-ready values."""
        return {"cpus": [{"id": c.id, "core": c.core, "llc": c.llc, "socket": c.socket,
                          "node": c.node} for c in self.cpus],
                "distances": [list(r) for r in self.distances]}


def uniform(*, sockets: int = 1, cores: int = 1, threads: int = 1,
            llc_per_socket: int = 1, nodes_per_socket: int = 1) -> Topology:
    """A symmetric host: ``sockets`` x ``cores`` x ``threads`` pCPUs, numbered socket-major.

    Each socket's cores are split evenly into ``llc_per_socket`` cache domains
    and ``nodes_per_socket`` NUMA nodes.
    """
    for name, value in (("sockets", sockets), ("cores", cores), ("threads", threads),
                        ("llc_per_socket", llc_per_socket),
                        ("nodes_per_socket", nodes_per_socket)):
        if value < 1:
            raise XenlabError(f"{name} must be at least 1, not {value}")
    if cores % llc_per_socket or cores % nodes_per_socket:
        raise XenlabError(f"{cores} cores per socket do not split into {llc_per_socket} LLCs "
                          f"and {nodes_per_socket} nodes evenly")
    cpus: list[Cpu] = []
    for s in range(sockets):
        for k in range(cores):
            core = s * cores + k
            llc = s * llc_per_socket + k // (cores // llc_per_socket)
            node = s * nodes_per_socket + k // (cores // nodes_per_socket)
            for _t in range(threads):
                cpus.append(Cpu(len(cpus), core, llc, s, node))
    return Topology(tuple(cpus))


def from_spec(spec: Mapping[str, Any], *, where: str = "host") -> Topology:
    """A topology from a scenario's ``[host]`` table.

    Either ``pcpus = N`` (one socket, one LLC, one node), counts
    (``sockets``, ``cores``, ``threads``, ``llc_per_socket``,
    ``nodes_per_socket``), or ``cpus = [{core, llc, socket, node}, ...]``;
    ``distances`` optional.  XenlabError names ``where`` and the key.
    """
    def count(key: str, default: int) -> int:
        value = spec.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise XenlabError(f"{where}.{key}: expected a positive integer, got {value!r}")
        return value

    if "cpus" in spec:
        rows = spec["cpus"]
        if not isinstance(rows, list) or not rows:
            raise XenlabError(f"{where}.cpus: expected a non-empty list of tables")
        cpus = []
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise XenlabError(f"{where}.cpus[{i}]: expected a table")
            fields = {}
            for key in ("core", "llc", "socket", "node"):
                v = row.get(key, 0 if key != "core" else i)
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise XenlabError(f"{where}.cpus[{i}].{key}: expected an integer >= 0, "
                                      f"got {v!r}")
                fields[key] = v
            cpus.append(Cpu(i, **fields))
        topo = Topology(tuple(cpus))
    elif "pcpus" in spec:
        topo = uniform(cores=count("pcpus", 1))
    else:
        topo = uniform(sockets=count("sockets", 1), cores=count("cores", 1),
                       threads=count("threads", 1), llc_per_socket=count("llc_per_socket", 1),
                       nodes_per_socket=count("nodes_per_socket", 1))
    distances = spec.get("distances")
    if distances is not None:
        n = len(topo.nodes)
        ok = (isinstance(distances, list) and len(distances) == n and all(
            isinstance(r, list) and len(r) == n and all(isinstance(x, int) for x in r)
            for r in distances))
        if not ok or topo.nodes != tuple(range(n)):
            raise XenlabError(f"{where}.distances: expected a {n}x{n} list of integers")
        topo = Topology(topo.cpus, tuple(tuple(r) for r in distances))
    return topo


def cpu_list(text: str) -> list[int]:
    """A sysfs cpu list ("0-3,8") as integers."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def from_sysfs(root: Path = Path("/sys")) -> Topology:
    """This machine's topology from ``root``/devices/system/{cpu,node} (online pCPUs only).

    The LLC is the highest-level cache's ``shared_cpu_list``; a pCPU with no
    cache information is its own LLC.  pCPU ids are renumbered 0..N-1 in
    the order of the kernel's ids.
    """
    base = root / "devices" / "system" / "cpu"
    try:
        online = cpu_list((base / "online").read_text())
    except OSError as err:
        raise XenlabError(f"{base / 'online'}: cannot read the online CPUs: {err}") from err
    node_of: dict[int, int] = {}
    nodes_dir = root / "devices" / "system" / "node"
    if nodes_dir.is_dir():
        for nd in sorted(nodes_dir.glob("node[0-9]*")):
            try:
                for cpu in cpu_list((nd / "cpulist").read_text()):
                    node_of[cpu] = int(nd.name[4:])
            except OSError:
                continue
    llc_key: dict[int, tuple[int, ...]] = {}
    for cpu in online:
        caches = sorted((base / f"cpu{cpu}" / "cache").glob("index[0-9]*"))
        best: tuple[int, tuple[int, ...]] | None = None
        for c in caches:
            try:
                level = int((c / "level").read_text())
                shared = tuple(cpu_list((c / "shared_cpu_list").read_text()))
            except (OSError, ValueError):
                continue
            if best is None or level > best[0]:
                best = (level, shared)
        llc_key[cpu] = best[1] if best else (cpu,)
    llc_ids: dict[tuple[int, ...], int] = {}
    cpus = []
    for i, cpu in enumerate(online):
        topo = base / f"cpu{cpu}" / "topology"

        def read(name: str, default: int, topo: Path = topo) -> int:
            try:
                return int((topo / name).read_text())
            except (OSError, ValueError):
                return default

        socket = read("physical_package_id", 0)
        core = read("core_id", cpu) + socket * 100_000
        llc = llc_ids.setdefault(llc_key[cpu], len(llc_ids))
        cpus.append(Cpu(i, core, llc, socket, node_of.get(cpu, 0)))
    # Dense ids for cores, sockets and nodes, in order of first appearance.
    def dense(values: list[int]) -> list[int]:
        seen: dict[int, int] = {}
        return [seen.setdefault(v, len(seen)) for v in values]

    cores = dense([c.core for c in cpus])
    sockets = dense([c.socket for c in cpus])
    nodes = dense([c.node for c in cpus])
    return Topology(tuple(Cpu(c.id, cores[i], c.llc, sockets[i], nodes[i])
                          for i, c in enumerate(cpus)))
