"""What a run measured: :func:`summarize` turns a finished :class:`Host` into :class:`RunMetrics`.

Per vCPU: CPU time, jobs, deadline misses, response times and wake-up
latencies (min/avg/p99/max, nearest-rank p99), dispatches, preemptions,
migrations.  Per pCPU: busy, idle and forced-idle time, context switches.
Values are integers (ns) or exact fractions rounded once, so the JSON of a
run is byte-identical for the same scenario and seed.
"""

from __future__ import annotations

from array import array
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xenlab.sim.host import Host


@dataclass(frozen=True, slots=True)
class Stats:
    """Distribution of a sample of integer nanoseconds."""

    count: int
    min_ns: int
    avg_ns: int
    p99_ns: int
    max_ns: int

    @classmethod
    def of(cls, values: array[int]) -> Stats:
        """The stats of ``values`` (all zero when empty); p99 by nearest rank."""
        n = len(values)
        if n == 0:
            return cls(0, 0, 0, 0, 0)
        ordered = sorted(values)
        rank = max(0, -(-99 * n // 100) - 1)  # ceil(0.99 n) - 1
        return cls(n, ordered[0], sum(ordered) // n, ordered[rank], ordered[-1])


@dataclass(frozen=True, slots=True)
class VcpuMetrics:
    """One vCPU's counters at the end of a run."""

    name: str
    domain: str
    cpu_ns: int
    jobs: int
    misses: int
    dispatches: int
    preemptions: int
    migrations: int
    response: Stats
    wake_latency: Stats


@dataclass(frozen=True, slots=True)
class PcpuMetrics:
    """One pCPU's time split at the end of a run."""

    id: int
    busy_ns: int
    idle_ns: int
    injected_ns: int
    switches: int

    @property
    def idle_pct(self) -> float:
        """Idle time as a percentage of the run (forced idle included)."""
        total = self.busy_ns + self.idle_ns
        return 100.0 * self.idle_ns / total if total else 0.0


@dataclass(frozen=True, slots=True)
class RunMetrics:
    """Everything :func:`summarize` reads off a host."""

    scheduler: str
    seed: int
    duration_ns: int
    events: int
    vcpus: tuple[VcpuMetrics, ...]
    pcpus: tuple[PcpuMetrics, ...]

    @property
    def jobs(self) -> int:
        """Jobs released, over all vCPUs."""
        return sum(v.jobs for v in self.vcpus)

    @property
    def misses(self) -> int:
        """Deadline misses, over all vCPUs."""
        return sum(v.misses for v in self.vcpus)

    def vcpu(self, name: str) -> VcpuMetrics:
        """The metrics of vCPU ``name`` (``dom.N``)."""
        for v in self.vcpus:
            if v.name == name:
                return v
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready values, stable in key order and number formatting."""
        out = asdict(self)
        out["totals"] = {"jobs": self.jobs, "misses": self.misses,
                         "switches": sum(p.switches for p in self.pcpus),
                         "migrations": sum(v.migrations for v in self.vcpus)}
        for p, pj in zip(self.pcpus, out["pcpus"], strict=True):
            pj["idle_pct"] = round(p.idle_pct, 6)
        return out


def summarize(host: Host, *, seed: int = 0) -> RunMetrics:
    """The metrics of a host whose run is over (call ``host.finish()`` first)."""
    vcpus = tuple(
        VcpuMetrics(v.name, v.dom.name, v.cpu_ns, v.jobs, v.misses, v.dispatches,
                    v.preemptions, v.migrations, Stats.of(v.response_ns),
                    Stats.of(v.wake_latency_ns))
        for v in host.vcpus
    )
    pcpus = tuple(PcpuMetrics(p.id, p.busy_ns, p.idle_ns, p.injected_ns, p.switches)
                  for p in host.pcpus)
    return RunMetrics(host.sched.name, seed, host.end_ns, host.engine.events, vcpus, pcpus)
