"""A checked scenario as values: :class:`Scenario` and its parts; :class:`ScenarioError`.

What :func:`xenlab.sim.scenario.load_scenario` returns: frozen values
(:class:`Scenario`, :class:`DomainSpec`, :class:`SchedChoice`,
:class:`PoolSpec`, :class:`Expectation`, with :data:`EXPECT_BOUNDS`, the
bounds a claim may give), each made only after every value in it was
checked.  :class:`ScenarioError` (``file: key: reason``) is the one error
reading or building a scenario raises; it lives here, at the bottom of the
scenario modules, so that every one of them can raise it.
:func:`scheduler_registry` is the scheduler table the checks read.
Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xenlab.errors import XenlabError
from xenlab.sim.schedulers import SCHEDULERS

if TYPE_CHECKING:
    from xenlab.numa.topology import Topology
    from xenlab.sim.power import PowerModel
    from xenlab.sim.workspec import WorkloadSpec

__all__ = [
    "EXPECT_BOUNDS",
    "DomainSpec",
    "Expectation",
    "PoolSpec",
    "Scenario",
    "ScenarioError",
    "SchedChoice",
    "scheduler_registry",
]


class ScenarioError(XenlabError, ValueError):
    """A scenario file is wrong: ``file: key: reason``."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        super().__init__(f"{file}: {key}: {reason}" if key else f"{file}: {reason}")

    def __reduce__(self) -> tuple[type[ScenarioError], tuple[str, str, str]]:
        # Exceptions pickle as cls(*args), and args holds the one message: a sweep's
        # worker process or Dask worker could not send this error back without it.
        return (ScenarioError, (self.file, self.key, self.reason))


def scheduler_registry() -> Mapping[str, Any]:
    """The schedulers by name (:data:`xenlab.sim.schedulers.SCHEDULERS`), typed for the checks."""
    return SCHEDULERS


@dataclass(frozen=True, slots=True)
class DomainSpec:
    """A guest: name, vCPU workloads, affinity and scheduler parameters."""

    name: str
    workloads: tuple[WorkloadSpec, ...]
    affinity: frozenset[int] | None
    #: Parameters for every scheduler that takes them (``[domain.sched]``).
    common: tuple[tuple[str, Any], ...]
    #: Per scheduler kind (``[domain.sched.NAME]``), name -> parameters.
    by_sched: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
    #: The cpupool it lives in (``pool =``); None: Pool-0.
    pool: str | None = None

    def params_for(self, kind: str, known: Iterable[str]) -> dict[str, Any]:
        """The parameters scheduler ``kind`` (taking ``known``) gets for this domain."""
        names = set(known)
        out = {k: v for k, v in self.common if k in names}
        for sched, params in self.by_sched:
            if sched == kind:
                out.update(params)
        return out


@dataclass(frozen=True, slots=True)
class SchedChoice:
    """A scheduler as a scenario names it: the registry ``kind`` and its options."""

    name: str
    kind: str
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """A cpupool (``[[pool]]``): its name, its scheduler and its pCPUs."""

    name: str
    choice: SchedChoice
    cpus: frozenset[int]


@dataclass(frozen=True, slots=True)
class Expectation:
    """A claim about a run (``[[expect]]``): bounds on a vCPU, a domain or the host."""

    index: int
    schedulers: tuple[str, ...]  # empty: every scheduler
    vcpu: str | None
    domain: str | None
    bounds: tuple[tuple[str, float], ...]

    def applies(self, sched: str) -> bool:
        """Whether this claim is made for scheduler (or variant) ``sched``."""
        return not self.schedulers or sched in self.schedulers


#: Bounds an ``[[expect]]`` entry may give, and what each one reads.
EXPECT_BOUNDS = {
    "misses_max": "deadline misses (vCPU, domain or host total)",
    "misses_min": "deadline misses (a baseline that is expected to fail)",
    "jobs_min": "jobs released",
    "cpu_pct_min": "CPU time in percent of one pCPU over the run",
    "cpu_pct_max": "CPU time in percent of one pCPU over the run",
    "wake_p99_us_max": "99th percentile wake-up latency (the worst vCPU's)",
    "response_max_us_max": "longest job response time (the worst vCPU's)",
    "idle_pct_min": "host idle time, percent (mean over pCPUs)",
    "idle_pct_max": "host idle time, percent (mean over pCPUs)",
    "pcpu_busy_pct_min": "the least busy pCPU's busy time, percent",
    "migrations_min": "vCPU migrations between pCPUs",
}


@dataclass(frozen=True, slots=True)
class Scenario:
    """A checked scenario.  ``raw_json`` is the merged file (for sweeps: :func:`with_params`)."""

    source: str
    name: str
    duration_ns: int
    seed: int
    scheduler: SchedChoice
    compare: tuple[SchedChoice, ...]
    variants: tuple[SchedChoice, ...]
    topology: Topology
    domains: tuple[DomainSpec, ...]
    trace_ns: tuple[int, int]
    powerclamp: tuple[tuple[str, Any], ...] | None
    power: PowerModel
    expect: tuple[Expectation, ...]
    raw_json: str
    pools: tuple[PoolSpec, ...] = ()

    def raw(self) -> dict[str, Any]:
        """A fresh copy of the merged scenario as plain data."""
        data: dict[str, Any] = json.loads(self.raw_json)
        return data

    def choice(self, name: str | None = None) -> SchedChoice:
        """The scheduler ``name`` (a registry name or a variant); the default when None."""
        if name is None:
            return self.scheduler
        for c in (self.scheduler, *self.variants):
            if c.name == name:
                return c
        registry = scheduler_registry()
        if name not in registry:
            known = ", ".join(sorted({*registry, *(v.name for v in self.variants)}))
            raise ScenarioError(self.source, "scheduler",
                                f"unknown scheduler {name!r} (expected one of {known})")
        return SchedChoice(name, name)
