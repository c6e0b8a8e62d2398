"""Scenario files: :func:`load_scenario` reads a TOML scenario, :func:`build_host` makes its host.

A scenario says what host, which guests, what they run and under which
scheduler, for how long and with which seed.  Every value is checked when
the file is read; a bad one is a :class:`ScenarioError` ``file: key: reason``
where ``key`` is the dotted path of the value (``domain.rt.sched.rtds.budget``),
the same path ``xenlab sim sweep --param`` takes.

Format
======

::

    include = "base.toml"          # optional: a file (or list) this one extends

    [sim]
    duration_ms = 1000             # or _ns, _us, _s (one of them; required)
    seed = 1                       # default 0
    scheduler = "rtds"             # what `xenlab sim run` uses by default
    compare = ["sedf", "sedf-cbs", "rtds"]   # what `xenlab sim compare` uses
    trace_ms = [0, 50]             # the Gantt chart's window (default: the first 50 ms)

    [scheduler.options]            # options of sim.scheduler (e.g. runqueue = "llc")
    [scheduler.variant.mpedf-cpu]  # a named variant usable wherever a scheduler name is
    base = "mpedf"
    options = { runqueue = "cpu" }

    [host]                         # numa.topology.from_spec keys, or sysfs = true
    pcpus = 4

    [[pool]]                       # a cpupool (xl cpupool-create); Pool-0 keeps the rest
    name = "rt-pool"               # and runs sim.scheduler (or --sched)
    scheduler = "rtds"             # fixed: --sched does not change a pool's scheduler
    cpus = "2-3"

    [[domain]]
    name = "rt"
    pool = "rt-pool"               # default: Pool-0
    vcpus = 2                      # default: 1, or as many as workloads / rt-app tasks
    affinity = "0-3,^2"            # xl cpus= syntax (N, A-B, ^, all, node:N, nodes:A-B)
                                   # or a list of pCPU ids; default: every pCPU
    like = "other"                 # start from domain "other"'s settings
    workload = { kind = "periodic", run_us = 2000, period_us = 10000 }   # every vCPU
    # workloads = [ {...}, {...} ] # one per vCPU
    # rtapp = "rt.json"            # rt-app tasks, one vCPU per task instance

    [domain.sched]                 # xl sched-* parameters for every scheduler that has them
    weight = 256
    [domain.sched.rtds]            # only under rtds (and its variants)
    period = 10000
    budget = 4000

    [powerclamp]                   # idle injection (xenlab.sim.powerclamp)
    target = 25                    # percent idle (cur_state); duration_ms, window_size, cpus

    [power]                        # the energy model (xenlab.sim.power; these are defaults)
    busy_w = 10.0
    cstates = [{ name = "C1", watts = 3.0, after_us = 0 },
               { name = "C6", watts = 0.5, after_us = 600 }]

    [[expect]]                     # claims `xenlab sim run --check` and the tests verify
    schedulers = ["sedf-cbs", "rtds"]   # default: every scheduler
    vcpu = "rt.0"                  # or domain = "rt", or neither (the host)
    misses_max = 0

Workload kinds (times take a unit suffix _ns, _us, _ms or _s):
``periodic`` (run, period, deadline?, offset?), ``sporadic`` (run, min_gap,
max_gap, deadline?, offset?), ``hog`` (offset?), ``io`` (run, block: means
of exponential draws), ``cyclictest`` (interval, run? = 5 us, offset?).
A periodic task whose ``run`` exceeds its budget is a misbehaving guest.

Scheduler parameters are passed to the scheduler as written (its own
units: rtds takes microseconds, as ``xl sched-rtds``).  They are checked
when the file is read, each by the scheduler's own pure ``check_params``
(what it checks when the host is built), naming the key the value was
given at.  ``[domain.sched.NAME]`` is checked for scheduler NAME;
``[domain.sched]`` for every scheduler that takes the parameter, since
``--sched`` may choose any; a pool's domains for the pool's scheduler.
So a file is valid or not whatever scheduler a run picks.

Bounds
======

Everything that sizes memory, time or a loop is bounded (sizes of hosts,
domains, files, times, the events a run makes): the limits and the value
checks are in :mod:`xenlab.sim.validate` and docs/sim-scenarios.md.

rt-app
======

``rtapp`` names a JSON file in rt-app's format (times in microseconds):
``{"tasks": {"name": {...}}, "global": {...}}``.  Supported task keys:
``instance`` (that many vCPUs), ``loop`` (-1 = forever, else that many
jobs), ``run`` (alias ``runtime``), ``timer`` (``{"ref", "period",
"mode": "absolute"}``: a job every period, deadline = period), ``sleep``
(no timer: run then sleep, repeated) and ``delay`` (first activation).
``run`` alone with ``loop = -1`` is a hog.  ``policy``, ``priority`` and
``cpus`` are the guest's own scheduling and are ignored (the hypervisor
cannot see them), as is ``global``.  Other keys (``phases``, ``lock``,
``barrier``, ...) and ``timer`` together with ``sleep`` are refused.

References
==========

``include`` (files) and ``like`` (domains) are references; a cycle in
either is an error naming the chain.  Included files are merged first:
tables merge key by key, the including file wins, and ``[[domain]]``
entries with the same name merge while new names are appended.
"""

from __future__ import annotations

import enum
import inspect
import json
import math
import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xenlab.errors import XenlabError
from xenlab.numa.topology import Topology, from_spec, from_sysfs
from xenlab.sim.engine import NS_PER_MS, NS_PER_US
from xenlab.sim.validate import (
    MAX_CSTATES,
    MAX_DOMAIN_VCPUS,
    MAX_EVENTS,
    MAX_EXPECT,
    MAX_LIKE_CHAIN,
    MAX_LOOPS,
    MAX_PCPUS,
    MAX_TRACE_EVENTS,
    MAX_VARIANTS,
    MAX_VCPUS,
    UNITS,
    Checker,
    Files,
    ScenarioError,
    about,
    affinity,
    check_host_sizes,
    check_params,
    check_plain,
    estimate_events,
    join,
    parse_json,
    parse_toml,
    show,
)
from xenlab.sim.workload import CyclicProbe, Hog, IoBound, Periodic, Sporadic

if TYPE_CHECKING:
    from xenlab.sim.host import Host
    from xenlab.sim.model import Vcpu
    from xenlab.sim.power import PowerModel
    from xenlab.sim.powerclamp import PowerClamp
    from xenlab.sim.schedulers.base import Scheduler
    from xenlab.sim.workload import Workload

__all__ = [
    "DomainSpec",
    "Expectation",
    "Scenario",
    "ScenarioError",
    "SchedChoice",
    "WorkloadKind",
    "WorkloadSpec",
    "attach_powerclamp",
    "build_host",
    "check_builds",
    "load_scenario",
    "parse_value",
    "scenario_from_dict",
    "with_params",
]

#: The Gantt window when ``sim.trace_ms`` is not given: long enough to show a
#: few periods of typical 10 ms real-time tasks, short enough to stay readable.
DEFAULT_TRACE_NS = 50 * NS_PER_MS

_RATIO_PAIRS = (("budget", "period"), ("slice", "period"))


class WorkloadKind(enum.Enum):
    """What a vCPU runs."""

    PERIODIC = "periodic"
    SPORADIC = "sporadic"
    HOG = "hog"
    IO = "io"
    CYCLICTEST = "cyclictest"
    RUN_SLEEP = "run-sleep"  # rt-app run + sleep without a timer


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """One vCPU's workload, checked; :meth:`build` makes a fresh workload object."""

    kind: WorkloadKind
    run_ns: int = 0
    period_ns: int = 0  # periodic; sporadic's min gap; io's block; cyclictest's interval
    max_gap_ns: int = 0
    deadline_ns: int | None = None
    offset_ns: int = 0
    loops: int = -1  # jobs (rt-app loop); -1 = forever

    def build(self) -> Workload:
        """A new workload object (workloads hold run state: one per vCPU and run)."""
        k = self.kind
        if k is WorkloadKind.PERIODIC:
            if self.loops >= 0:
                return _Jobs(self.run_ns, self.period_ns, self.loops,
                             deadline_ns=self.deadline_ns, offset_ns=self.offset_ns)
            return Periodic(self.run_ns, self.period_ns, deadline_ns=self.deadline_ns,
                            offset_ns=self.offset_ns)
        if k is WorkloadKind.SPORADIC:
            return Sporadic(self.run_ns, self.period_ns, self.max_gap_ns,
                            deadline_ns=self.deadline_ns, offset_ns=self.offset_ns)
        if k is WorkloadKind.HOG:
            return Hog(offset_ns=self.offset_ns)
        if k is WorkloadKind.IO:
            return IoBound(self.run_ns, self.period_ns)
        if k is WorkloadKind.CYCLICTEST:
            return CyclicProbe(self.period_ns, run_ns=self.run_ns, offset_ns=self.offset_ns)
        return RunSleep(self.run_ns, self.period_ns, loops=self.loops, offset_ns=self.offset_ns)


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
        registry = _registry()
        if name not in registry:
            known = ", ".join(sorted({*registry, *(v.name for v in self.variants)}))
            raise ScenarioError(self.source, "scheduler",
                                f"unknown scheduler {name!r} (expected one of {known})")
        return SchedChoice(name, name)


# -- the run-sleep workload (rt-app run + sleep) ---------------------------------------------


class RunSleep:
    """rt-app's ``run`` then ``sleep`` (relative), repeated ``loops`` times (-1: forever)."""

    __slots__ = ("left", "offset_ns", "run_ns", "sleep_ns")

    def __init__(self, run_ns: int, sleep_ns: int, *, loops: int = -1, offset_ns: int = 0) -> None:
        self.run_ns = run_ns
        self.sleep_ns = sleep_ns
        self.left = loops
        self.offset_ns = offset_ns

    def start(self, host: Host, v: Vcpu) -> None:
        """Arm the first activation."""
        if self.left != 0:
            host.engine.at(self.offset_ns, lambda: self._go(host, v))

    def _go(self, host: Host, v: Vcpu) -> None:
        v.jobs += 1
        if self.left > 0:
            self.left -= 1
        host.activate(v, self.run_ns)

    def burst_done(self, host: Host, v: Vcpu) -> int:
        """The loop's run ended: sleep, or run the next loop at once (no sleep)."""
        if self.left == 0:
            return 0
        if self.sleep_ns == 0:
            v.jobs += 1
            if self.left > 0:
                self.left -= 1
            return self.run_ns
        host.engine.after(self.sleep_ns, lambda: self._go(host, v))
        return 0

    def finish(self, host: Host, v: Vcpu) -> None:
        """Nothing pending to count (no deadlines)."""


class _Jobs(Periodic):
    """A periodic task that stops after ``jobs`` releases (rt-app's ``loop``)."""

    __slots__ = ("left",)

    def __init__(self, run_ns: int, period_ns: int, jobs: int, *,
                 deadline_ns: int | None = None, offset_ns: int = 0) -> None:
        super().__init__(run_ns, period_ns, deadline_ns=deadline_ns, offset_ns=offset_ns)
        self.left = jobs

    def _release(self, host: Host, v: Vcpu) -> None:
        if self.left <= 0:
            return
        self.left -= 1
        super()._release(host, v)


# -- reading files ----------------------------------------------------------------------------


def _registry() -> Mapping[str, Any]:
    from xenlab.sim.schedulers import SCHEDULERS

    return SCHEDULERS


def _read_toml(path: Path, shown: str, files: Files, by: str = "", key: str = "",
               ) -> dict[str, Any]:
    """File ``path`` (named ``shown`` in messages; named at ``by``'s ``key`` if included)."""
    data = parse_toml(files.read(path, by or shown, key), shown)
    check_plain(data, shown)
    return data


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: tables merge, domains merge by name, the rest replaces."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        if key == "domain" and isinstance(old, list) and isinstance(value, list):
            merged = list(old)
            for d in value:
                name = d.get("name") if isinstance(d, Mapping) else None
                idx = next((i for i, o in enumerate(merged)
                            if isinstance(o, Mapping) and name is not None
                            and o.get("name") == name), None)
                if idx is None:
                    merged.append(d)
                else:
                    merged[idx] = _merge(merged[idx], d)
            out[key] = merged
        elif isinstance(old, dict) and isinstance(value, Mapping):
            out[key] = _merge(old, value)
        else:
            out[key] = value
    return out


def _real(path: Path) -> Path:
    # realpath, not Path.resolve: a symlink loop is then a path that cannot be read
    # (an error naming it), not a RuntimeError.
    return Path(os.path.realpath(path))


def _resolve(path: Path, shown: str, chain: tuple[Path, ...], files: Files,
             by: str = "") -> dict[str, Any]:
    """The file with its includes merged in and its rt-app files read."""
    real = _real(path)
    data = _read_toml(path, shown, files, by, "include" if by else "")
    inc = data.pop("include", None)
    merged: dict[str, Any] = {}
    if inc is not None:
        incs = [inc] if isinstance(inc, str) else inc
        if not isinstance(incs, list) or not all(isinstance(i, str) for i in incs):
            raise ScenarioError(shown, "include", "expected a file name or a list of them")
        for name in incs:
            target = path.parent / name
            if "\x00" in name:
                raise ScenarioError(shown, "include", "a file name with a NUL character")
            seen = (*chain, real)
            if _real(target) in seen:  # named in the file whose include closes the cycle
                loop = seen[seen.index(_real(target)):]
                names = " -> ".join(p.name for p in (*loop, _real(target)))
                raise ScenarioError(shown, "include", f"cyclic include: {names}")
            merged = _merge(merged, _resolve(target, str(target), (*chain, real), files, shown))
    _inline_rtapp(data, path, shown, files)
    return _merge(merged, data)


def _inline_rtapp(data: dict[str, Any], path: Path, shown: str, files: Files) -> None:
    """Replace each domain's ``rtapp = "file.json"`` by the file's content."""
    domains = data.get("domain")
    if not isinstance(domains, list):
        return
    for i, d in enumerate(domains):
        if not isinstance(d, dict) or not isinstance(d.get("rtapp"), str):
            continue
        target = path.parent / d["rtapp"]
        name = d.get("name")
        key = f"domain.{name if isinstance(name, str) else i}.rtapp"
        doc = parse_json(files.read(target, shown, key), str(target))
        check_plain(doc, str(target))
        d["rtapp"] = doc
        d["_rtapp_source"] = str(target)


def load_scenario(path: Path | str) -> Scenario:
    """Read and check the scenario at ``path``; ScenarioError ``file: key: reason``."""
    p = Path(path)
    raw = _resolve(p, str(p), (), Files())
    return scenario_from_dict(raw, source=str(p))


# -- the scenario ------------------------------------------------------------------------------

_TOP = ("sim", "scheduler", "host", "pool", "domain", "powerclamp", "power", "expect", "name")
_POOL = ("name", "scheduler", "cpus")
_SIM = ("duration_ns", "duration_us", "duration_ms", "duration_s", "seed", "scheduler",
        "compare", "trace_ns", "trace_us", "trace_ms", "trace_s")
_HOST = ("pcpus", "sockets", "cores", "threads", "llc_per_socket", "nodes_per_socket", "cpus",
         "distances", "sysfs")
_DOMAIN = ("name", "vcpus", "affinity", "like", "workload", "workloads", "rtapp", "sched",
           "pool")


def scenario_from_dict(raw: Mapping[str, Any], *, source: str) -> Scenario:
    """Check a merged scenario (``load_scenario``'s second half; sweeps call it per point)."""
    ck = Checker(source)
    check_plain(raw, source)
    raw_json = json.dumps(raw, sort_keys=True, separators=(",", ":"))
    ck.only(raw, "", _TOP)
    name = raw.get("name", Path(source).stem)
    if not isinstance(name, str):
        raise ck.fail("name", f"expected a string, got {show(name)}")

    sim = ck.table(raw.get("sim", {}), "sim")
    ck.only(sim, "sim", _SIM)
    duration = ck.duration(sim, "duration", "sim")
    assert duration is not None
    seed = ck.integer(sim, "seed", "sim", 0, minimum=0)

    sched_tbl = ck.table(raw.get("scheduler", {}), "scheduler")
    ck.only(sched_tbl, "scheduler", ("options", "variant"))
    registry = _registry()
    variants = _variants(ck, sched_tbl, registry)
    default_name = sim.get("scheduler")
    if not isinstance(default_name, str):
        raise ck.fail("sim.scheduler", "missing (required: a scheduler name)"
                      if default_name is None else f"expected a name, got {show(default_name)}")
    options = ck.table(sched_tbl.get("options", {}), "scheduler.options")
    if default_name in variants:
        if options:
            raise ck.fail("scheduler.options", f"sim.scheduler {default_name!r} is a variant: "
                          "give its options in its [scheduler.variant] table")
        default = variants[default_name]
    else:
        _known_scheduler(ck, default_name, "sim.scheduler", registry, variants)
        default = SchedChoice(default_name, default_name, _options(ck, default_name, options,
                                                                   "scheduler.options"))
    compare_names = sim.get("compare", [default.name])
    if not isinstance(compare_names, list) or not compare_names \
            or not all(isinstance(n, str) for n in compare_names):
        raise ck.fail("sim.compare", "expected a non-empty list of scheduler names")
    by_name = {default.name: default, **variants}
    compare: list[SchedChoice] = []
    for i, n in enumerate(compare_names):
        if n in compare_names[:i]:
            raise ck.fail(f"sim.compare[{i}]", f"{n!r} is named twice")
        if n not in by_name:
            _known_scheduler(ck, n, f"sim.compare[{i}]", registry, variants)
            by_name[n] = SchedChoice(n, n)
        compare.append(by_name[n])

    topology = _host(ck, raw.get("host", {}))
    pools = _pools(ck, raw.get("pool", []), topology, registry, variants)
    domains = _domains(ck, raw.get("domain"), topology, registry, variants)
    by_pool = {p.name: p for p in pools}
    for d in domains:
        if d.pool is not None and d.pool not in by_pool:
            known = ", ".join(by_pool) or "none: add a [[pool]]"
            raise ck.fail(f"domain.{d.name}.pool", f"no cpupool {d.pool!r} (pools: {known})")
        if d.pool is not None and d.affinity is not None and not d.affinity <= by_pool[d.pool].cpus:
            raise ck.fail(f"domain.{d.name}.affinity",
                          f"pCPUs {sorted(d.affinity - by_pool[d.pool].cpus)} are outside "
                          f"cpupool {d.pool}")
    trace = _trace(ck, sim, duration)
    clamp = _powerclamp(ck, raw.get("powerclamp"), topology)
    power = _power(ck, raw.get("power", {}))
    # --sched may choose any scheduler, so a domain's parameters are checked for every
    # one (the scenario's own first, so a refusal names the one the user meant); a
    # pool's domains run under the pool's scheduler whatever --sched says.
    choices = list({c.name: c for c in (default, *compare, *variants.values(),
                                        *(SchedChoice(k, k) for k in registry))}.values())
    kinds = list(dict.fromkeys(c.kind for c in choices))
    for d in domains:
        for kind in [by_pool[d.pool].choice.kind] if d.pool else kinds:
            check_params(ck, d, kind, registry[kind])
    expect = _expect(ck, raw.get("expect", []), domains, registry, variants)
    _check_time(ck, sim, duration, trace, domains, pools, topology, choices, clamp)
    return Scenario(source, name, duration, seed, default, tuple(compare),
                    tuple(variants.values()), topology, domains, trace, clamp, power, expect,
                    raw_json, pools)


def _check_time(ck: Checker, sim: Mapping[str, Any], duration: int, trace: tuple[int, int],
                domains: Sequence[DomainSpec], pools: Sequence[PoolSpec], topo: Topology,
                choices: Sequence[SchedChoice], clamp: tuple[tuple[str, Any], ...] | None
                ) -> None:
    """A run under any of ``choices`` within MAX_EVENTS, its trace within MAX_TRACE_EVENTS."""
    registry = _registry()
    opts = dict(clamp) if clamp is not None else None
    dkey = next(f"sim.duration_{u}" for u in UNITS if f"duration_{u}" in sim)
    tkey = next((f"sim.trace_{u}" for u in UNITS if f"trace_{u}" in sim), dkey)
    what = "(workload releases, budget refills and ticks; most from domain {})"
    for span, key, limit, where in ((duration, dkey, MAX_EVENTS, ""),
                                    (trace[1] - trace[0], tkey, MAX_TRACE_EVENTS,
                                     " in the trace window")):
        for c in choices:
            n, busiest = estimate_events(span, domains, pools, topo.nr_cpus, c, registry, opts)
            if n > limit:
                span_text = f"{duration / (1000 * NS_PER_MS):g} s" if duration >= 1000 * NS_PER_MS \
                    else f"{duration / NS_PER_MS:g} ms"
                raise ck.fail(key, f"a run of {span_text} under {c.name} makes "
                              f"about {about(n)} events{where}, at most {limit:,} "
                              f"{what.format(busiest)}: shorten the run"
                              f"{' or the trace' if where else ''} or lengthen the periods")


def _pools(ck: Checker, value: Any, topo: Topology, registry: Mapping[str, Any],
           variants: Mapping[str, SchedChoice]) -> tuple[PoolSpec, ...]:
    """``[[pool]]`` tables: cpupools beside Pool-0, which keeps the pCPUs left over."""
    if not isinstance(value, list):
        raise ck.fail("pool", "expected [[pool]] tables")
    out: list[PoolSpec] = []
    taken: dict[int, str] = {}
    for i, row in enumerate(value):
        row = ck.table(row, f"pool[{i}]")
        name = row.get("name")
        if not isinstance(name, str) or not name or "." in name or name == "Pool-0":
            raise ck.fail(f"pool[{i}].name", "missing or not a name (a non-empty string "
                          "without '.', not Pool-0)")
        where = f"pool.{name}"
        if any(p.name == name for p in out):
            raise ck.fail(f"{where}.name", "a pool of that name is already defined")
        ck.only(row, where, _POOL)
        sched = row.get("scheduler")
        if not isinstance(sched, str):
            raise ck.fail(f"{where}.scheduler", "missing (required: a scheduler name)")
        _known_scheduler(ck, sched, f"{where}.scheduler", registry, variants)
        choice = variants.get(sched) or SchedChoice(sched, sched)
        cpus = affinity(ck, row.get("cpus"), f"{where}.cpus", topo)
        if cpus is None:
            raise ck.fail(f"{where}.cpus", "missing (required: the pool's pCPUs)")
        twice = sorted(c for c in cpus if c in taken)
        if twice:
            raise ck.fail(f"{where}.cpus", f"pCPUs {twice} are in pool {taken[twice[0]]} "
                          "already")
        taken.update((c, name) for c in cpus)
        out.append(PoolSpec(name, choice, cpus))
    if len(taken) >= topo.nr_cpus and out:
        raise ck.fail("pool", "the pools take every pCPU: Pool-0 needs at least one")
    return tuple(out)


def _known_scheduler(ck: Checker, name: str, key: str, registry: Mapping[str, Any],
                     variants: Mapping[str, SchedChoice]) -> None:
    if name not in registry and name not in variants:
        known = ", ".join(sorted({*registry, *variants}))
        raise ck.fail(key, f"unknown scheduler {name!r} (expected one of {known})")


def _options(ck: Checker, kind: str, options: Mapping[str, Any],
             where: str) -> tuple[tuple[str, Any], ...]:
    """Scheduler options, checked against what the scheduler's constructor takes."""
    cls = _registry()[kind]
    allowed: set[str] | None = None
    declared = getattr(cls, "OPTIONS", None)
    if isinstance(declared, Mapping | tuple | frozenset | set | list):
        allowed = set(declared)
    else:
        try:
            sig = inspect.signature(cls)
        except (TypeError, ValueError):
            sig = None
        if sig is not None and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            allowed = {n for n, p in sig.parameters.items()
                       if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    for k, v in options.items():
        if allowed is not None and k not in allowed:
            takes = ", ".join(sorted(allowed)) or "none"
            raise ck.fail(join(where, k), f"unknown option for {kind} (it takes: {takes})")
        if isinstance(v, Mapping | list):
            raise ck.fail(join(where, k), f"expected a number, string or boolean, "
                          f"got {show(v)}")
    from xenlab.sim.schedulers.base import ParamError

    try:  # constructors are pure: the one check of an option's value is building one
        cls(**options)
    except ParamError as err:
        raise ck.fail(join(where, err.key), err.reason) from err
    except XenlabError as err:
        raise ck.fail(where, str(err)) from err
    return tuple(sorted(options.items()))


def _variants(ck: Checker, tbl: Mapping[str, Any],
              registry: Mapping[str, Any]) -> dict[str, SchedChoice]:
    out: dict[str, SchedChoice] = {}
    table = ck.table(tbl.get("variant", {}), "scheduler.variant")
    if len(table) > MAX_VARIANTS:
        raise ck.fail("scheduler.variant", f"{len(table)} variants, at most {MAX_VARIANTS}")
    for vname, spec in table.items():
        where = f"scheduler.variant.{vname}"
        spec = ck.table(spec, where)
        ck.only(spec, where, ("base", "options"))
        base = spec.get("base")
        if vname in registry:
            raise ck.fail(where, f"a variant cannot take the name of scheduler {vname!r}")
        if not isinstance(base, str):
            raise ck.fail(f"{where}.base", "missing (required: the scheduler it is a variant of)")
        if base not in registry:
            known = ", ".join(sorted(registry))
            raise ck.fail(f"{where}.base", f"unknown scheduler {base!r} (expected one of "
                          f"{known})")
        opts = ck.table(spec.get("options", {}), f"{where}.options")
        out[vname] = SchedChoice(vname, base, _options(ck, base, opts, f"{where}.options"))
    return out


def _host(ck: Checker, value: Any) -> Topology:
    tbl = ck.table(value, "host")
    ck.only(tbl, "host", _HOST)
    check_host_sizes(ck, tbl)
    try:
        if tbl.get("sysfs"):
            if len(tbl) > 1:
                raise ck.fail("host.sysfs", "sysfs = true takes no other host keys")
            topo = from_sysfs()
            if topo.nr_cpus > MAX_PCPUS:
                raise ck.fail("host.sysfs", f"this machine has {topo.nr_cpus} pCPUs, at most "
                              f"{MAX_PCPUS}")
            return topo
        if "pcpus" in tbl and any(k in tbl for k in ("sockets", "cores", "threads", "cpus")):
            raise ck.fail("host.pcpus", "give pcpus, or sockets/cores/threads, or cpus: "
                          "one of them")
        return from_spec(tbl, where="host")
    except ScenarioError:
        raise
    except XenlabError as err:
        msg = str(err)
        key, sep, reason = msg.partition(": ")
        if sep and key.startswith("host"):
            raise ck.fail(key, reason) from err
        raise ck.fail("host", msg) from err


def _trace(ck: Checker, sim: Mapping[str, Any], duration: int) -> tuple[int, int]:
    found = [k for k in ("trace_ns", "trace_us", "trace_ms", "trace_s") if k in sim]
    if not found:
        return (0, min(duration, DEFAULT_TRACE_NS))
    key = found[0]
    value = sim[key]
    mult = UNITS[key.rsplit("_", 1)[1]]
    if not (isinstance(value, list) and len(value) == 2):
        raise ck.fail(f"sim.{key}", "expected [start, end]")
    start, end = (ck.time(x, f"sim.{key}[{i}]", mult, positive=False)
                  for i, x in enumerate(value))
    if not 0 <= start < end or start >= duration:
        raise ck.fail(f"sim.{key}", f"expected 0 <= start < end, start within the run, "
                      f"got {value}")
    return (start, min(end, duration))


def _powerclamp(ck: Checker, value: Any, topo: Topology) -> tuple[tuple[str, Any], ...] | None:
    if value is None:
        return None
    from xenlab.sim.powerclamp import MAX_STATE, PowerClamp

    tbl = ck.table(value, "powerclamp")
    target = tbl.get("target")
    if target is None:
        raise ck.fail("powerclamp.target", f"missing (required: percent idle, 0-{MAX_STATE - 1})")
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < MAX_STATE:
        raise ck.fail("powerclamp.target", f"expected a percentage of idle time, an integer "
                      f"0-{MAX_STATE - 1} (max_state {MAX_STATE}), got {show(target)}")
    sig = inspect.signature(PowerClamp)
    takes = sorted(n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY)
    for k, v in tbl.items():
        if k == "target":
            continue
        if k not in takes:
            raise ck.fail(f"powerclamp.{k}", f"unknown key (expected target, {', '.join(takes)})")
        if isinstance(v, Mapping):
            raise ck.fail(f"powerclamp.{k}", f"expected a number or a list, got {show(v)}")
    if "cpus" in tbl:
        if not isinstance(tbl["cpus"], list):
            raise ck.fail("powerclamp.cpus", f"expected a list of pCPU ids, got "
                          f"{show(tbl['cpus'])}")
        affinity(ck, tbl["cpus"], "powerclamp.cpus", topo)  # ids, on the host
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(tbl.items()))


def _power(ck: Checker, value: Any) -> PowerModel:
    """``[power]``: busy_w and cstates = [{name, watts, after_us}] (default: sim.power's)."""
    from xenlab.sim.power import CState, PowerModel

    tbl = ck.table(value, "power")
    ck.only(tbl, "power", ("busy_w", "cstates"))
    default = PowerModel()
    busy = tbl.get("busy_w", default.busy_w)
    if isinstance(busy, bool) or not isinstance(busy, int | float) or busy < 0:
        raise ck.fail("power.busy_w", f"expected watts (a number >= 0), got {show(busy)}")
    cstates = default.cstates
    if "cstates" in tbl:
        rows = tbl["cstates"]
        if not isinstance(rows, list) or not rows:
            raise ck.fail("power.cstates", "expected a non-empty list of {name, watts, after_us}")
        if len(rows) > MAX_CSTATES:
            raise ck.fail("power.cstates", f"{len(rows)} C-states, at most {MAX_CSTATES}")
        got = []
        for i, row in enumerate(rows):
            where = f"power.cstates[{i}]"
            row = ck.table(row, where)
            ck.only(row, where, ("name", "watts", *(f"after_{u}" for u in UNITS)))
            name, watts = row.get("name"), row.get("watts")
            if not isinstance(name, str):
                raise ck.fail(f"{where}.name", "missing or not a string")
            if isinstance(watts, bool) or not isinstance(watts, int | float) or watts < 0:
                raise ck.fail(f"{where}.watts", f"expected watts (>= 0), got {show(watts)}")
            after = _req(ck.duration(row, "after", where, required=False, positive=False,
                                     default=0))
            got.append(CState(name, float(watts), after))
        cstates = tuple(got)
    try:
        return PowerModel(float(busy), cstates)
    except XenlabError as err:
        raise ck.fail("power.cstates", str(err)) from err


def attach_powerclamp(scenario: Scenario, host: Host) -> PowerClamp | None:
    """The scenario's ``[powerclamp]`` cooling device on ``host``, clamping from time 0."""
    if scenario.powerclamp is None:
        return None
    from xenlab.sim.powerclamp import PowerClamp

    opts = dict(scenario.powerclamp)
    target = opts.pop("target")
    try:
        clamp = PowerClamp(host, **opts)
        clamp.cur_state = target
    except XenlabError as err:
        # "powerclamp: duration_ms must be ...": the option it names is the key.
        reason = str(err).removeprefix("powerclamp: ")
        option = reason.split(" ", 1)[0]
        raise ScenarioError(scenario.source, f"powerclamp.{option}" if option in opts
                            else "powerclamp", reason) from err
    return clamp


# -- domains ----------------------------------------------------------------------------------


def _resolve_like(ck: Checker, rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each domain with its ``like`` chain applied (a cycle is an error)."""
    by_name = {r["name"]: r for r in rows}
    done: dict[str, dict[str, Any]] = {}

    def get(name: str, chain: tuple[str, ...]) -> dict[str, Any]:
        if name in done:
            return done[name]
        row = by_name[name]
        like = row.get("like")
        if like is None:
            out = dict(row)
        else:
            key = f"domain.{name}.like"
            if not isinstance(like, str):
                raise ck.fail(key, f"expected a domain name, got {show(like)}")
            if like not in by_name:
                raise ck.fail(key, f"no domain named {like!r}")
            if like in chain or like == name:
                start = chain[chain.index(like):] if like in chain else ()
                cycle = " -> ".join((*start, name, like))
                raise ck.fail(key, f"cyclic reference: {cycle}")
            if len(chain) >= MAX_LIKE_CHAIN:  # and this recursion stays shallow
                raise ck.fail(f"domain.{chain[0]}.like", f"a chain of more than "
                              f"{MAX_LIKE_CHAIN} like references ({chain[0]} -> {chain[1]} "
                              "-> ...)")
            base = {k: v for k, v in get(like, (*chain, name)).items()
                    if k not in ("name", "like")}
            # A domain's own workload keys replace the base's (they exclude each other).
            if any(k in row for k in ("workload", "workloads", "rtapp")):
                for k in ("workload", "workloads", "rtapp", "_rtapp_source", "vcpus"):
                    base.pop(k, None)
            out = _merge(base, row)
        done[name] = out
        return out

    return [get(r["name"], ()) for r in rows]


def _domains(ck: Checker, value: Any, topo: Topology, registry: Mapping[str, Any],
             variants: Mapping[str, SchedChoice]) -> tuple[DomainSpec, ...]:
    if value is None:
        raise ck.fail("domain", "missing (a scenario needs at least one [[domain]])")
    if not isinstance(value, list) or not value:
        raise ck.fail("domain", "expected one or more [[domain]] tables")
    rows: list[Mapping[str, Any]] = []
    seen: set[str] = set()
    for i, row in enumerate(value):
        row = ck.table(row, f"domain[{i}]")
        name = row.get("name")
        if not isinstance(name, str) or not name or "." in name:
            raise ck.fail(f"domain[{i}].name",
                          "missing or not a name (a non-empty string without '.')")
        if name in seen:
            raise ck.fail(f"domain.{name}.name", "a domain of that name is already defined")
        seen.add(name)
        ck.only(row, f"domain.{name}", _DOMAIN)
        rows.append(row)
    out: list[DomainSpec] = []
    total = 0
    for r in _resolve_like(ck, rows):
        out.append(_domain(ck, r, topo, registry, variants))
        total += len(out[-1].workloads)
        if total > MAX_VCPUS:
            given = next(k for k in ("vcpus", "workloads", "rtapp", "workload") if k in r)
            raise ck.fail(f"domain.{r['name']}.{given}", f"{total} vCPUs in all, at most "
                          f"{MAX_VCPUS}")
    return tuple(out)


def _domain(ck: Checker, row: Mapping[str, Any], topo: Topology, registry: Mapping[str, Any],
            variants: Mapping[str, SchedChoice]) -> DomainSpec:
    name: str = row["name"]
    where = f"domain.{name}"
    given = [k for k in ("workload", "workloads", "rtapp") if k in row]
    if len(given) != 1:
        raise ck.fail(where, "give exactly one of workload, workloads or rtapp"
                      + (f" (got {', '.join(given)})" if given else ""))
    count = row.get("vcpus")
    if count is not None:
        count = ck.integer(row, "vcpus", where, minimum=1, maximum=MAX_DOMAIN_VCPUS)
    if "workload" in row:
        w = _workload(ck, row["workload"], f"{where}.workload")
        works = tuple([w] * (count or 1))
    elif "workloads" in row:
        items = row["workloads"]
        if not isinstance(items, list) or not items:
            raise ck.fail(f"{where}.workloads", "expected a non-empty list of tables")
        if len(items) > MAX_DOMAIN_VCPUS:
            raise ck.fail(f"{where}.workloads", f"{len(items)} vCPUs, at most "
                          f"{MAX_DOMAIN_VCPUS}")
        works = tuple(_workload(ck, t, f"{where}.workloads[{i}]") for i, t in enumerate(items))
        if count is not None and count != len(works):
            raise ck.fail(f"{where}.vcpus", f"{count} vCPUs but {len(works)} workloads")
    else:
        works = _rtapp(row["rtapp"], row.get("_rtapp_source", ck.source), f"{where}.rtapp", ck)
        if count is not None and count != len(works):
            raise ck.fail(f"{where}.vcpus", f"{count} vCPUs but the rt-app tasks make "
                          f"{len(works)}")
    aff = affinity(ck, row.get("affinity"), f"{where}.affinity", topo)
    sched = ck.table(row.get("sched", {}), f"{where}.sched")
    kinds = set(registry)
    common: list[tuple[str, Any]] = []
    by_sched: list[tuple[str, tuple[tuple[str, Any], ...]]] = []
    all_params = set().union(*(set(getattr(c, "PARAMS", {}) or {}) for c in registry.values()))
    for k, v in sched.items():
        key = f"{where}.sched.{k}"
        if isinstance(v, Mapping):
            if k in variants:
                raise ck.fail(key, f"{k!r} is a variant: give parameters for its base "
                              f"scheduler {variants[k].kind!r}")
            if k not in kinds:
                known = ", ".join(sorted(kinds))
                raise ck.fail(key, f"unknown scheduler {k!r} (expected one of {known})")
            for pk, pv in v.items():
                _param_value(ck, f"{key}.{pk}", pv)
            _ratio(ck, v, key)
            by_sched.append((k, tuple(sorted(v.items()))))
        else:
            if k not in all_params:
                raise ck.fail(key, "unknown key: no scheduler takes this parameter (known: "
                              f"{', '.join(sorted(all_params)) or 'none'})")
            _param_value(ck, key, v)
            common.append((k, v))
    _ratio(ck, dict(common), f"{where}.sched")
    pool = row.get("pool")
    if pool is not None and not isinstance(pool, str):
        raise ck.fail(f"{where}.pool", f"expected a pool name, got {show(pool)}")
    return DomainSpec(name, works, aff, tuple(sorted(common)), tuple(sorted(by_sched)),
                      pool)


def _param_value(ck: Checker, key: str, v: Any) -> None:
    if isinstance(v, Mapping | list):
        raise ck.fail(key, f"expected a number, string or boolean, got {show(v)}")
    if isinstance(v, int | float) and not isinstance(v, bool) and v < 0:
        raise ck.fail(key, f"must not be negative, got {v}")


def _ratio(ck: Checker, params: Mapping[str, Any], where: str) -> None:
    for part, whole in _RATIO_PAIRS:
        a, b = params.get(part), params.get(whole)
        if isinstance(a, int | float) and isinstance(b, int | float) and a > b:
            raise ck.fail(f"{where}.{part}", f"{part} {a} is greater than {whole} {b}")


# -- workloads ---------------------------------------------------------------------------------

_WORKLOAD_KEYS = {
    WorkloadKind.PERIODIC: ("run", "period", "deadline", "offset"),
    WorkloadKind.SPORADIC: ("run", "min_gap", "max_gap", "deadline", "offset"),
    WorkloadKind.HOG: ("offset",),
    WorkloadKind.IO: ("run", "block"),
    WorkloadKind.CYCLICTEST: ("interval", "run", "offset"),
}


def _workload(ck: Checker, value: Any, where: str) -> WorkloadSpec:
    tbl = ck.table(value, where)
    kind_name = tbl.get("kind")
    kinds = {k.value: k for k in _WORKLOAD_KEYS}
    if not isinstance(kind_name, str) or kind_name not in kinds:
        raise ck.fail(f"{where}.kind", f"expected one of {', '.join(kinds)}, "
                      f"got {show(kind_name)}")
    kind = kinds[kind_name]
    bases = _WORKLOAD_KEYS[kind]
    ck.only(tbl, where, ("kind", *(f"{b}_{u}" for b in bases for u in UNITS)))

    def dur(base: str, *, required: bool = True, positive: bool = True,
            default: int | None = None) -> int | None:
        return ck.duration(tbl, base, where, required=required, positive=positive,
                           default=default)

    offset = dur("offset", required=False, positive=False, default=0) if "offset" in bases else 0
    assert offset is not None
    if kind is WorkloadKind.HOG:
        return WorkloadSpec(kind, offset_ns=offset)
    if kind is WorkloadKind.IO:
        return WorkloadSpec(kind, run_ns=_req(dur("run")), period_ns=_req(dur("block")))
    if kind is WorkloadKind.CYCLICTEST:
        interval = _req(dur("interval"))
        run = _req(dur("run", required=False, default=5_000))
        if run >= interval:
            raise ck.fail(f"{where}.run_us", "a probe's run must be shorter than its interval")
        return WorkloadSpec(kind, run_ns=run, period_ns=interval, offset_ns=offset)
    run = _req(dur("run"))
    deadline = dur("deadline", required=False)
    if kind is WorkloadKind.PERIODIC:
        return WorkloadSpec(kind, run_ns=run, period_ns=_req(dur("period")),
                            deadline_ns=deadline, offset_ns=offset)
    lo, hi = _req(dur("min_gap")), _req(dur("max_gap"))
    if hi < lo:
        raise ck.fail(f"{where}.max_gap", "max_gap is below min_gap")
    return WorkloadSpec(kind, run_ns=run, period_ns=lo, max_gap_ns=hi, deadline_ns=deadline,
                        offset_ns=offset)


def _req(v: int | None) -> int:
    assert v is not None  # required durations are never None
    return v


_RTAPP_IGNORED = ("policy", "priority", "cpus")
_RTAPP_TASK = ("instance", "loop", "run", "runtime", "timer", "sleep", "delay", *_RTAPP_IGNORED)


def _rtapp(value: Any, source: str, where: str, outer: Checker) -> tuple[WorkloadSpec, ...]:
    """rt-app tasks as workloads (see the module notes for what is supported)."""
    inline = source == outer.source
    ck = outer if inline else Checker(source)
    base = where if inline else ""
    doc = ck.table(value, base or "rt-app")
    ck.only(doc, base, ("tasks", "global"))
    tasks = ck.table(doc.get("tasks"), join(base, "tasks"))
    if not tasks:
        raise ck.fail(join(base, "tasks"), "no tasks")
    out: list[WorkloadSpec] = []
    for tname, task in tasks.items():
        w = join(base, f"tasks.{tname}")
        task = ck.table(task, w)
        for k in task:
            if k not in _RTAPP_TASK:
                raise ck.fail(f"{w}.{k}", "not supported here (supported: "
                              f"{', '.join(_RTAPP_TASK)})")
        instance = ck.integer(task, "instance", w, 1, minimum=1, maximum=MAX_DOMAIN_VCPUS)
        if len(out) + instance > MAX_DOMAIN_VCPUS:
            raise ck.fail(f"{w}.instance", f"the tasks make {len(out) + instance} vCPUs, at "
                          f"most {MAX_DOMAIN_VCPUS}")
        loop = ck.integer(task, "loop", w, -1, minimum=-1, maximum=MAX_LOOPS)
        if "run" in task and "runtime" in task:
            raise ck.fail(f"{w}.runtime", "give run or runtime, not both")
        run_key = "runtime" if "runtime" in task else "run"
        run = _us(ck, task, run_key, w, required=True)
        delay = _us(ck, task, "delay", w, positive=False) or 0
        if "timer" in task:
            if "sleep" in task:
                raise ck.fail(f"{w}.sleep", "timer and sleep together are not supported")
            timer = ck.table(task["timer"], f"{w}.timer")
            ck.only(timer, f"{w}.timer", ("ref", "period", "mode"))
            if timer.get("mode", "absolute") != "absolute":
                raise ck.fail(f"{w}.timer.mode", "only absolute timers are supported")
            period = _us(ck, timer, "period", f"{w}.timer", required=True)
            spec = WorkloadSpec(WorkloadKind.PERIODIC, run_ns=run, period_ns=period,
                                offset_ns=delay, loops=loop)
        elif "sleep" in task:
            sleep = _us(ck, task, "sleep", w, positive=False) or 0
            spec = WorkloadSpec(WorkloadKind.RUN_SLEEP, run_ns=run, period_ns=sleep,
                                offset_ns=delay, loops=loop)
        elif loop == -1:
            spec = WorkloadSpec(WorkloadKind.HOG, offset_ns=delay)
        else:
            spec = WorkloadSpec(WorkloadKind.RUN_SLEEP, run_ns=run, period_ns=0,
                                offset_ns=delay, loops=loop)
        out.extend([spec] * instance)
    return tuple(out)


def _us(ck: Checker, tbl: Mapping[str, Any], key: str, where: str, *,
        required: bool = False, positive: bool = True) -> int:
    """An rt-app time (integer microseconds) as ns."""
    if key not in tbl:
        if required:
            raise ck.fail(join(where, key), "missing (required, microseconds)")
        return 0
    v = tbl[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
            or v < 0 or (positive and v == 0):
        raise ck.fail(join(where, key), f"expected {'a positive' if positive else 'a'} "
                      f"number of microseconds, got {show(v)}")
    return ck.time(v, join(where, key), NS_PER_US, positive=positive)


def _expect(ck: Checker, value: Any, domains: Sequence[DomainSpec],
            registry: Mapping[str, Any],
            variants: Mapping[str, SchedChoice]) -> tuple[Expectation, ...]:
    if not isinstance(value, list):
        raise ck.fail("expect", "expected [[expect]] tables")
    if len(value) > MAX_EXPECT:  # each is measured over every vCPU after a run
        raise ck.fail("expect", f"{len(value)} claims, at most {MAX_EXPECT}")
    vcpus = {f"{d.name}.{i}" for d in domains for i in range(len(d.workloads))}
    names = {d.name for d in domains}
    out = []
    for i, row in enumerate(value):
        where = f"expect[{i}]"
        row = ck.table(row, where)
        ck.only(row, where, ("schedulers", "vcpu", "domain", *EXPECT_BOUNDS))
        scheds = row.get("schedulers", [])
        if not isinstance(scheds, list) or not all(isinstance(s, str) for s in scheds):
            raise ck.fail(f"{where}.schedulers", "expected a list of scheduler names")
        for j, s in enumerate(scheds):
            _known_scheduler(ck, s, f"{where}.schedulers[{j}]", registry, variants)
        vcpu, dom = row.get("vcpu"), row.get("domain")
        if vcpu is not None:
            ck.name(vcpu, f"{where}.vcpu", "a vCPU name")
        if dom is not None:
            ck.name(dom, f"{where}.domain", "a domain name")
        if vcpu is not None and dom is not None:
            raise ck.fail(where, "give vcpu or domain, not both")
        if vcpu is not None and vcpu not in vcpus:
            raise ck.fail(f"{where}.vcpu", f"no vCPU {vcpu!r} (vCPUs: "
                          f"{', '.join(sorted(vcpus))})")
        if dom is not None and dom not in names:
            raise ck.fail(f"{where}.domain", f"no domain {dom!r}")
        bounds = []
        for k in EXPECT_BOUNDS:
            if k in row:
                v = row[k]
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise ck.fail(f"{where}.{k}", f"expected a number, got {show(v)}")
                bounds.append((k, float(v)))
        if not bounds:
            raise ck.fail(where, f"no bound given (one of {', '.join(EXPECT_BOUNDS)})")
        out.append(Expectation(i, tuple(scheds), vcpu, dom, tuple(bounds)))
    return tuple(out)


# -- sweeps ---------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A value given on the command line: a TOML literal (1, 2.5, true, "x") or a bare string."""
    if "\n" in text or "\r" in text:  # one value, not more lines of TOML
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):  # not a literal, or nested beyond sense
        return text


def with_params(scenario: Scenario, params: Mapping[str, Any]) -> Scenario:
    """``scenario`` with values set by dotted key (``domain.rt.sched.rtds.budget = 3000``).

    ``domain.NAME`` selects a domain by name; tables on the way are created.
    The result is checked like a file.
    """
    raw = scenario.raw()
    for key, value in params.items():
        parts = key.split(".")
        if parts[0] == "domain":
            if len(parts) < 3:
                raise ScenarioError(scenario.source, key, "expected domain.NAME.KEY")
            node = _domain_row(scenario, raw, parts[1], key)
            rest = parts[2:]
        else:
            node, rest = raw, parts
        for i, part in enumerate(rest[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ScenarioError(scenario.source, key,
                                    f"{'.'.join(rest[:i + 1])} is not a table")
            node = child
        last = rest[-1]
        stem, _, unit = last.rpartition("_")
        if stem and unit in UNITS:  # a time in one unit replaces the same time in another
            for u in UNITS:
                node.pop(f"{stem}_{u}", None)
        node[last] = value
    return scenario_from_dict(raw, source=scenario.source)


def _domain_row(scenario: Scenario, raw: dict[str, Any], name: str, key: str) -> dict[str, Any]:
    for row in raw.get("domain", []):
        if isinstance(row, dict) and row.get("name") == name:
            return row
    raise ScenarioError(scenario.source, key, f"no domain named {name!r}")


# -- building a host -------------------------------------------------------------------------


def make_scheduler(scenario: Scenario, choice: SchedChoice) -> Scheduler:
    """A new scheduler for ``choice``; its errors carry the scenario's file."""
    from xenlab.sim.schedulers import make

    try:
        return make(choice.kind, **dict(choice.options))
    except XenlabError as err:
        raise ScenarioError(scenario.source, "scheduler", str(err)) from err
    except TypeError as err:  # an option the constructor does not take
        raise ScenarioError(scenario.source, "scheduler.options", str(err)) from err


def build_host(scenario: Scenario, scheduler: str | None = None, seed: int | None = None, *,
               trace: bool = True) -> Host:
    """A host ready to run ``scenario`` under ``scheduler`` (a name or variant; default its own).

    Scheduler parameters are checked for the chosen scheduler, each refusal a
    ScenarioError naming the parameter's key; whatever else the host refuses
    names the domain.  With ``trace`` the host keeps the run segments of
    ``scenario.trace_ns``.
    """
    from xenlab.sim.host import Host

    choice = scenario.choice(scheduler)
    registry = _registry()
    ck = Checker(scenario.source)
    kinds = {p.name: p.choice.kind for p in scenario.pools}
    for d in scenario.domains:
        kind = kinds[d.pool] if d.pool else choice.kind
        check_params(ck, d, kind, registry[kind])
    sched = make_scheduler(scenario, choice)
    pools = [(p.name, make_scheduler(scenario, p.choice), sorted(p.cpus))
             for p in scenario.pools]
    try:
        host = Host(scenario.topology, sched, seed=scenario.seed if seed is None else seed,
                    trace=scenario.trace_ns if trace else None, pools=pools)
    except XenlabError as err:
        raise ScenarioError(scenario.source, "pool", str(err)) from err
    for d in scenario.domains:
        kind = kinds[d.pool] if d.pool else choice.kind
        known = getattr(registry[kind], "PARAMS", None)
        params = d.params_for(kind, known if isinstance(known, Mapping) else ())
        try:
            host.add_domain(d.name, [w.build() for w in d.workloads], params=params,
                            affinity=d.affinity, pool=d.pool or "Pool-0")
        except XenlabError as err:
            # The host and schedulers name the domain themselves; the key already does.
            reason = str(err).removeprefix(f"domain {d.name}: ")
            raise ScenarioError(scenario.source, f"domain.{d.name}", reason) from err
    return host


def check_builds(scenario: Scenario) -> tuple[str, ...]:
    """Build ``scenario``'s host, without running it, under every scheduler a run may use.

    That is the scenario's own schedulers and variants and every registry
    scheduler (``--sched`` takes any), each with its powerclamp attached: what
    ``xenlab sim check`` does, so a file it passes is one every run accepts.
    Returns the names built; the first refusal is a ScenarioError.
    """
    names = list(dict.fromkeys([scenario.scheduler.name, *(c.name for c in scenario.compare),
                                *(v.name for v in scenario.variants), *sorted(_registry())]))
    for name in names:
        attach_powerclamp(scenario, build_host(scenario, name, trace=False))
    return tuple(names)
