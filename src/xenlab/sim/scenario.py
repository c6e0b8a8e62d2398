"""Scenario files: :func:`load_scenario` reads a TOML scenario, :func:`build_host` makes its host.

A scenario says what host, which guests, what they run and under which
scheduler, for how long and with which seed.  Every value is checked when
the file is read; a bad one is a :class:`ScenarioError` ``file: key: reason``
where ``key`` is the dotted path of the value (``domain.rt.sched.rtds.budget``),
the same path ``xenlab sim sweep --param`` takes.

This module is the front door: it reads the files (includes merged, rt-app
files put in place), checks the merged scenario (:func:`scenario_from_dict`,
one reader of :mod:`xenlab.sim.tables` per table), derives sweep points
(:func:`with_params`) and builds hosts (:func:`build_host`).  The values are
:mod:`xenlab.sim.spec`'s and :mod:`xenlab.sim.workspec`'s, re-exported here.
Imports go one way: scenario -> tables -> rtapp -> validate -> spec, workspec.

The design (its tables, choices and reasons) is in docs/sim-scenarios.md.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xenlab.errors import XenlabError
from xenlab.numa.topology import Topology
from xenlab.sim.engine import NS_PER_MS
from xenlab.sim.rtapp import inline_rtapp
from xenlab.sim.spec import (
    DomainSpec,
    Expectation,
    PoolSpec,
    Scenario,
    ScenarioError,
    SchedChoice,
    scheduler_registry,
)
from xenlab.sim.tables import (
    known_scheduler,
    merge,
    read_domains,
    read_expect,
    read_host,
    read_pools,
    read_power,
    read_powerclamp,
    read_trace,
    read_variants,
    scheduler_options,
)
from xenlab.sim.validate import (
    MAX_EVENTS,
    MAX_TRACE_EVENTS,
    UNITS,
    Checker,
    Files,
    about,
    check_params,
    check_plain,
    estimate_events,
    parse_toml,
    show,
)
from xenlab.sim.workspec import WorkloadKind, WorkloadSpec

if TYPE_CHECKING:
    from xenlab.sim.host import Host
    from xenlab.sim.powerclamp import PowerClamp
    from xenlab.sim.schedulers.base import Scheduler

# The value types (sim.spec, sim.workspec) are re-exported: report, sweep, the CLI and the
# tests import them from here.
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


# -- reading files -----------------------------------------------------------------------------


def _read_toml(path: Path, shown: str, files: Files, by: str = "", key: str = "",
               ) -> dict[str, Any]:
    """File ``path`` (named ``shown`` in messages; named at ``by``'s ``key`` if included)."""
    data = parse_toml(files.read(path, by or shown, key), shown)
    check_plain(data, shown)
    return data


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
            merged = merge(merged, _resolve(target, str(target), (*chain, real), files, shown))
    inline_rtapp(data, path, shown, files)
    return merge(merged, data)


def load_scenario(path: Path | str) -> Scenario:
    """Read and check the scenario at ``path``; ScenarioError ``file: key: reason``."""
    p = Path(path)
    raw = _resolve(p, str(p), (), Files())
    return scenario_from_dict(raw, source=str(p))


# -- the scenario ------------------------------------------------------------------------------

_TOP = ("sim", "scheduler", "host", "pool", "domain", "powerclamp", "power", "expect", "name")

_SIM = ("duration_ns", "duration_us", "duration_ms", "duration_s", "seed", "scheduler",
        "compare", "trace_ns", "trace_us", "trace_ms", "trace_s")


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
    registry = scheduler_registry()
    variants = read_variants(ck, sched_tbl, registry)
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
        known_scheduler(ck, default_name, "sim.scheduler", registry, variants)
        default = SchedChoice(default_name, default_name,
                              scheduler_options(ck, default_name, options, "scheduler.options"))
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
            known_scheduler(ck, n, f"sim.compare[{i}]", registry, variants)
            by_name[n] = SchedChoice(n, n)
        compare.append(by_name[n])

    topology = read_host(ck, raw.get("host", {}))
    pools = read_pools(ck, raw.get("pool", []), topology, registry, variants)
    domains = read_domains(ck, raw.get("domain"), topology, registry, variants)
    by_pool = {p.name: p for p in pools}
    for d in domains:
        if d.pool is not None and d.pool not in by_pool:
            known = ", ".join(by_pool) or "none: add a [[pool]]"
            raise ck.fail(f"domain.{d.name}.pool", f"no cpupool {d.pool!r} (pools: {known})")
        if d.pool is not None and d.affinity is not None and not d.affinity <= by_pool[d.pool].cpus:
            raise ck.fail(f"domain.{d.name}.affinity",
                          f"pCPUs {sorted(d.affinity - by_pool[d.pool].cpus)} are outside "
                          f"cpupool {d.pool}")
    trace = read_trace(ck, sim, duration)
    clamp = read_powerclamp(ck, raw.get("powerclamp"), topology)
    power = read_power(ck, raw.get("power", {}))
    # --sched may choose any scheduler, so a domain's parameters are checked for every
    # one (the scenario's own first, so a refusal names the one the user meant); a
    # pool's domains run under the pool's scheduler whatever --sched says.
    choices = list({c.name: c for c in (default, *compare, *variants.values(),
                                        *(SchedChoice(k, k) for k in registry))}.values())
    kinds = list(dict.fromkeys(c.kind for c in choices))
    for d in domains:
        for kind in [by_pool[d.pool].choice.kind] if d.pool else kinds:
            check_params(ck, d, kind, registry[kind])
    expect = read_expect(ck, raw.get("expect", []), domains, registry, variants)
    _check_time(ck, sim, duration, trace, domains, pools, topology, choices, clamp)
    return Scenario(source, name, duration, seed, default, tuple(compare),
                    tuple(variants.values()), topology, domains, trace, clamp, power, expect,
                    raw_json, pools)


def _check_time(ck: Checker, sim: Mapping[str, Any], duration: int, trace: tuple[int, int],
                domains: Sequence[DomainSpec], pools: Sequence[PoolSpec], topo: Topology,
                choices: Sequence[SchedChoice], clamp: tuple[tuple[str, Any], ...] | None
                ) -> None:
    """A run under any of ``choices`` within MAX_EVENTS, its trace within MAX_TRACE_EVENTS."""
    registry = scheduler_registry()
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


# -- sweeps ------------------------------------------------------------------------------------


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


# -- building a host ---------------------------------------------------------------------------


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
    registry = scheduler_registry()
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
                                *(v.name for v in scenario.variants),
                                *sorted(scheduler_registry())]))
    for name in names:
        attach_powerclamp(scenario, build_host(scenario, name, trace=False))
    return tuple(names)
