"""The readers of a scenario's TOML tables: ``read_host``, ``read_pools``, ``read_domains``...

:func:`xenlab.sim.scenario.scenario_from_dict` calls one reader per table of
the merged scenario (``[host]``, ``[[pool]]``, ``[scheduler.variant.*]`` and
scheduler options, ``[[domain]]`` with its ``like`` chain, workloads and
``[domain.sched]`` parameters, ``sim.trace_*``, ``[powerclamp]``, ``[power]``,
``[[expect]]``); each returns checked values (:mod:`xenlab.sim.spec`) or
raises a ScenarioError naming the dotted key, through a
:class:`~xenlab.sim.validate.Checker`.  :func:`merge` is how tables combine
(includes, ``like``).  Pure: the one thing read from outside is the host's
own topology, for ``[host] sysfs = true``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from xenlab.errors import XenlabError
from xenlab.numa.topology import Topology, from_spec, from_sysfs
from xenlab.sim.engine import NS_PER_MS
from xenlab.sim.rtapp import read_rtapp
from xenlab.sim.spec import (
    EXPECT_BOUNDS,
    DomainSpec,
    Expectation,
    PoolSpec,
    ScenarioError,
    SchedChoice,
    scheduler_registry,
)
from xenlab.sim.validate import (
    MAX_CSTATES,
    MAX_DOMAIN_VCPUS,
    MAX_EXPECT,
    MAX_LIKE_CHAIN,
    MAX_PCPUS,
    MAX_VARIANTS,
    MAX_VCPUS,
    UNITS,
    Checker,
    affinity,
    check_host_sizes,
    join,
    show,
)
from xenlab.sim.workspec import WorkloadKind, WorkloadSpec

if TYPE_CHECKING:
    from xenlab.sim.power import PowerModel

__all__ = [
    "DEFAULT_TRACE_NS",
    "known_scheduler",
    "merge",
    "read_domains",
    "read_expect",
    "read_host",
    "read_pools",
    "read_power",
    "read_powerclamp",
    "read_trace",
    "read_variants",
    "scheduler_options",
]


#: The Gantt window when ``sim.trace_ms`` is not given: long enough to show a
#: few periods of typical 10 ms real-time tasks, short enough to stay readable.
DEFAULT_TRACE_NS = 50 * NS_PER_MS

_RATIO_PAIRS = (("budget", "period"), ("slice", "period"))

_POOL = ("name", "scheduler", "cpus")

_HOST = ("pcpus", "sockets", "cores", "threads", "llc_per_socket", "nodes_per_socket", "cpus",
         "distances", "sysfs")

_DOMAIN = ("name", "vcpus", "affinity", "like", "workload", "workloads", "rtapp", "sched",
           "pool")


def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
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
                    merged[idx] = merge(merged[idx], d)
            out[key] = merged
        elif isinstance(old, dict) and isinstance(value, Mapping):
            out[key] = merge(old, value)
        else:
            out[key] = value
    return out


# -- schedulers --------------------------------------------------------------------------------


def known_scheduler(ck: Checker, name: str, key: str, registry: Mapping[str, Any],
                    variants: Mapping[str, SchedChoice]) -> None:
    """Refuse ``name`` at ``key`` unless it is a registry scheduler or one of ``variants``."""
    if name not in registry and name not in variants:
        known = ", ".join(sorted({*registry, *variants}))
        raise ck.fail(key, f"unknown scheduler {name!r} (expected one of {known})")


def scheduler_options(ck: Checker, kind: str, options: Mapping[str, Any],
                      where: str) -> tuple[tuple[str, Any], ...]:
    """Scheduler options, checked against what the scheduler's constructor takes."""
    cls = scheduler_registry()[kind]
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


def read_variants(ck: Checker, tbl: Mapping[str, Any],
                  registry: Mapping[str, Any]) -> dict[str, SchedChoice]:
    """``[scheduler.variant.NAME]`` tables: named schedulers with their own options."""
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
        out[vname] = SchedChoice(vname, base, scheduler_options(ck, base, opts, f"{where}.options"))
    return out


def read_pools(ck: Checker, value: Any, topo: Topology, registry: Mapping[str, Any],
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
        known_scheduler(ck, sched, f"{where}.scheduler", registry, variants)
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


# -- host, trace, power ------------------------------------------------------------------------


def read_host(ck: Checker, value: Any) -> Topology:
    """``[host]``: numa.topology.from_spec's keys, or ``sysfs = true`` (this machine's)."""
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


def read_trace(ck: Checker, sim: Mapping[str, Any], duration: int) -> tuple[int, int]:
    """``sim.trace_*``: the kept window [start, end) in ns, cut at the run's end."""
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


def read_powerclamp(ck: Checker, value: Any, topo: Topology) -> tuple[tuple[str, Any], ...] | None:
    """``[powerclamp]``: the target and PowerClamp's keyword options, sorted; None: no clamp."""
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


def read_power(ck: Checker, value: Any) -> PowerModel:
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


# -- domains -----------------------------------------------------------------------------------


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
            out = merge(base, row)
        done[name] = out
        return out

    return [get(r["name"], ()) for r in rows]


def read_domains(ck: Checker, value: Any, topo: Topology, registry: Mapping[str, Any],
                 variants: Mapping[str, SchedChoice]) -> tuple[DomainSpec, ...]:
    """``[[domain]]`` tables, each with its ``like`` chain applied, within MAX_VCPUS."""
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
        works = read_rtapp(row["rtapp"], row.get("_rtapp_source", ck.source), f"{where}.rtapp", ck)
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


# -- claims ------------------------------------------------------------------------------------


def read_expect(ck: Checker, value: Any, domains: Sequence[DomainSpec],
                registry: Mapping[str, Any],
                variants: Mapping[str, SchedChoice]) -> tuple[Expectation, ...]:
    """``[[expect]]`` tables: claims about named vCPUs, domains or the host."""
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
            known_scheduler(ck, s, f"{where}.schedulers[{j}]", registry, variants)
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
