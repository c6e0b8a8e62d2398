"""Scenario bounds and untrusted-value checks: :class:`Checker` and the limits scenarios obey.

A scenario is input from anyone, so nothing in it may size memory, time or a
loop without a bound, and no value is used before its type is checked; every
refusal is a :class:`~xenlab.sim.spec.ScenarioError` (re-exported here)
``file: key: reason`` naming the exact key (``domain.a.sched.budget``).  The
bounds (files read through :func:`xenlab.files.read_bounded`, text, plain
values, sizes, and the events :func:`estimate_events` counts) are this
module's constants, and docs/sim-scenarios.md lists the same bounds with the
runs that measured them: change both together.  Pure: no I/O except
:meth:`Files.read`, the one place scenario files are read.  The design (each
rule and its reason) is in docs/schedulers.md, section Scenario bounds.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from xenlab.errors import XenlabError
from xenlab.files import read_bounded
from xenlab.sim.engine import NS_PER_MS, NS_PER_US
from xenlab.sim.schedulers.credit import TICKS_PER_TSLICE
from xenlab.sim.spec import DomainSpec, PoolSpec, ScenarioError, SchedChoice
from xenlab.sim.workspec import WorkloadSpec

if TYPE_CHECKING:
    from xenlab.numa.topology import Topology

__all__ = [
    "FILE_LIMIT",
    "MAX_CSTATES",
    "MAX_DEPTH",
    "MAX_DOMAIN_VCPUS",
    "MAX_EVENTS",
    "MAX_EXPECT",
    "MAX_FILES",
    "MAX_KEY_PARTS",
    "MAX_LIKE_CHAIN",
    "MAX_LOOPS",
    "MAX_PCPUS",
    "MAX_POINTS",
    "MAX_TIME_NS",
    "MAX_TRACE_EVENTS",
    "MAX_VARIANTS",
    "MAX_VCPUS",
    "UNITS",
    "Checker",
    "Files",
    "ScenarioError",
    "about",
    "affinity",
    "check_host_sizes",
    "check_params",
    "check_plain",
    "estimate_events",
    "join",
    "parse_json",
    "parse_toml",
    "show",
]

#: One scenario, include or rt-app file: real ones are a few KB.
FILE_LIMIT: Final = 1 << 20
#: Files one scenario reads (itself, includes, rt-app files; each time named).
MAX_FILES: Final = 64
#: Dotted parts in one TOML key (``a.b.c`` has 3); scenarios use at most 4.
MAX_KEY_PARTS: Final = 32
#: Nesting of tables and lists; scenarios nest at most 7 (an rt-app timer).
MAX_DEPTH: Final = 32
#: pCPUs of a host: building one costs up to ~1 s at this size (null, sedf-cbs).
MAX_PCPUS: Final = 1024
#: vCPUs of one domain, and of all domains together.
MAX_DOMAIN_VCPUS: Final = 1024
MAX_VCPUS: Final = 4096
#: Any time in a scenario: one hour of simulated time.
MAX_TIME_NS: Final = 3600 * 1000 * NS_PER_MS
#: Workload releases, replenishments, ticks and injections in one run (tens of seconds),
#: and inside the trace window (whose every switch is kept, and drawn with --out).
MAX_EVENTS: Final = 2_000_000
MAX_TRACE_EVENTS: Final = 200_000
#: ``[scheduler.variant.*]`` tables (each is built, and run by compare).
MAX_VARIANTS: Final = 16
#: ``like`` references in a row (``a`` like ``b`` like ``c``: 2).
MAX_LIKE_CHAIN: Final = 32
#: C-states of the power model (every idle stretch walks them); Intel's go to C10.
MAX_CSTATES: Final = 16
#: ``[[expect]]`` claims (each is measured over every vCPU after a run).
MAX_EXPECT: Final = 256
#: rt-app's loop counter is a C int.
MAX_LOOPS: Final = 2**31 - 1
#: Points of one sweep (parameter values x schedulers), each built before any runs.
MAX_POINTS: Final = 10_000

UNITS: Final = {"ns": 1, "us": NS_PER_US, "ms": NS_PER_MS, "s": 1000 * NS_PER_MS}
_INT64: Final = 1 << 63


# -- files and text ----------------------------------------------------------------------------


class Files:
    """The files one scenario reads: at most :data:`MAX_FILES`, each :data:`FILE_LIMIT` bytes."""

    def __init__(self) -> None:
        self.count = 0

    def read(self, path: Path, file: str, key: str = "") -> str:
        """``path``'s text.  Errors are ``file: reason`` for the scenario itself (``key``
        empty), else ``file: key: path: reason`` (an include or rt-app file named at key)."""
        self.count += 1
        if self.count > MAX_FILES:
            raise ScenarioError(file, key, f"more than {MAX_FILES} files (the scenario, "
                                "includes and rt-app files, each time one is named)")
        name = str(path)
        where = f"{name}: " if key else ""
        if "\x00" in name:
            raise ScenarioError(file, key, "a file name with a NUL character")
        try:
            data = read_bounded(path, FILE_LIMIT)
        except XenlabError as err:  # InputTooLargeError included: its text names the limit
            reason = str(err).removeprefix(f"{name}: ")
            raise ScenarioError(file, key, where + reason) from err
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ScenarioError(name if key else file, "", f"not UTF-8 text (byte "
                                f"0x{data[err.start]:02x} at offset {err.start})") from err


# A TOML key at the start of a line (a key/value pair or a table header): bare or quoted
# parts joined by dots.  Inside multi-line strings this may match text that is not a key,
# which can only make the count larger: such a line is refused, never a deep key missed.
_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
_KEY_AT_LINE = re.compile(rf"^[ \t]*\[{{0,2}}[ \t]*({_PART}(?:[ \t]*\.[ \t]*{_PART})*)", re.M)
_PARTS = re.compile(_PART)


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """``text`` as TOML, its keys and nesting bounded; ScenarioError naming ``source``."""
    for m in _KEY_AT_LINE.finditer(text):
        if m.group(1).count(".") >= MAX_KEY_PARTS:
            parts = sum(1 for _ in _PARTS.finditer(m.group(1)))
            if parts > MAX_KEY_PARTS:
                line = text.count("\n", 0, m.start(1)) + 1
                raise ScenarioError(source, "", f"line {line}: a key of {parts} parts, at most "
                                    f"{MAX_KEY_PARTS}")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(source, "", f"not valid TOML: {err}") from err
    except RecursionError as err:
        raise ScenarioError(source, "", "not valid TOML: nested too deeply") from err


def parse_json(text: str, source: str) -> Any:
    """``text`` as JSON (NaN and Infinity then refused by :func:`check_plain`)."""
    try:
        return json.loads(text)
    except RecursionError as err:
        raise ScenarioError(source, "", "not valid JSON: nested too deeply") from err
    except ValueError as err:  # JSONDecodeError, and integers of more than 4300 digits
        raise ScenarioError(source, "", f"not valid JSON: {err}") from err


def _text_problem(s: str) -> str | None:
    if "\x00" in s:
        return "a NUL character in a string"
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return "holds a lone surrogate (not Unicode text)"
    return None


def _seg(key: str) -> str:
    """A key as it appears in a dotted path (lone surrogates and controls escaped)."""
    return key.encode("unicode_escape").decode("ascii") if not key.isprintable() or \
        _text_problem(key) else key


def _good_name(v: Any) -> bool:
    return isinstance(v, str) and bool(v) and "." not in v and _text_problem(v) is None


def check_plain(value: Any, source: str, base: str = "") -> None:
    """Every value under ``value`` is plain data (see the module notes); ScenarioError at its key.

    Rows of the top-level ``domain`` and ``pool`` lists are named by their
    ``name`` (``domain.a.vcpus``) when it is a good name, else by index.
    """
    stack: list[tuple[Any, str, int]] = [(value, base, 0)]
    while stack:
        v, key, depth = stack.pop()
        if isinstance(v, dict | list) and depth > MAX_DEPTH:
            raise ScenarioError(source, key, f"nested more than {MAX_DEPTH} deep")
        if isinstance(v, dict):
            children = []
            for k, x in v.items():
                if not isinstance(k, str):
                    raise ScenarioError(source, key, f"keys must be strings, got {k!r}")
                problem = _text_problem(k)
                if problem:
                    raise ScenarioError(source, join(key, _seg(k)), problem)
                children.append((x, join(key, _seg(k)), depth + 1))
            stack.extend(reversed(children))
        elif isinstance(v, list):
            named = depth == 1 and key in ("domain", "pool")
            stack.extend(reversed([
                (x, f"{key}.{x['name']}" if named and isinstance(x, dict)
                 and _good_name(x.get("name")) else f"{key}[{i}]", depth + 1)
                for i, x in enumerate(v)]))
        elif isinstance(v, bool):
            continue
        elif isinstance(v, int):
            if not -_INT64 <= v < _INT64:
                raise ScenarioError(source, key, f"integer {v} does not fit in 64 bits")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise ScenarioError(source, key, f"expected a finite number, got {v}")
        elif isinstance(v, str):
            problem = _text_problem(v)
            if problem:
                raise ScenarioError(source, key, problem)
        else:
            what = type(v).__name__.replace("datetime", "date and time")
            raise ScenarioError(source, key, "expected a number, string, boolean, list or "
                                f"table, got a {what}")


# -- reading values out of tables --------------------------------------------------------------


def join(where: str, key: str) -> str:
    """``where.key`` (``key`` alone at the top)."""
    return f"{where}.{key}" if where else key


def show(value: Any) -> str:
    """A value in a message: repr for scalars, the type's name for lists and tables."""
    return repr(value) if not isinstance(value, Mapping | list) else type(value).__name__


def _ms(ns: int) -> str:
    return f"{ns // NS_PER_MS} ms" + (" (one hour)" if ns == MAX_TIME_NS else "")


class Checker:
    """Reads values out of a table, raising ScenarioError with the file and dotted key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, reason: str) -> ScenarioError:
        """The error for ``key`` (returned, for ``raise ck.fail(...)``)."""
        return ScenarioError(self.source, key, reason)

    def table(self, value: Any, key: str) -> Mapping[str, Any]:
        """``value``, which must be a table."""
        if not isinstance(value, Mapping):
            raise self.fail(key, f"expected a table, got {show(value)}")
        return value

    def only(self, tbl: Mapping[str, Any], where: str, allowed: Iterable[str]) -> None:
        """No key in ``tbl`` but ``allowed`` (and ``_``-prefixed ones xenlab adds)."""
        ok = set(allowed)
        for k in tbl:
            if k not in ok and not k.startswith("_"):
                raise self.fail(join(where, k),
                                f"unknown key (expected one of {', '.join(sorted(ok))})")

    def name(self, value: Any, key: str, what: str) -> str:
        """``value``, which must be a string (a ``what`` name)."""
        if not isinstance(value, str):
            raise self.fail(key, f"expected {what}, got {show(value)}")
        return value

    def integer(self, tbl: Mapping[str, Any], key: str, where: str, default: int | None = None,
                *, minimum: int | None = None, maximum: int | None = None) -> int:
        """``tbl[key]``: an integer (not a boolean or float) within the bounds."""
        value = tbl.get(key, default)
        if value is None:
            raise self.fail(join(where, key), "missing (required)")
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(join(where, key), f"expected an integer, got {show(value)}")
        if minimum is not None and value < minimum:
            raise self.fail(join(where, key), f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.fail(join(where, key), f"must be at most {maximum}, got {value}")
        return value

    def duration(self, tbl: Mapping[str, Any], base: str, where: str, *,
                 required: bool = True, positive: bool = True,
                 default: int | None = None) -> int | None:
        """``base_ns``/``_us``/``_ms``/``_s`` (exactly one) as integer ns, at most an hour."""
        found = [(f"{base}_{u}", m) for u, m in UNITS.items() if f"{base}_{u}" in tbl]
        if len(found) > 1:
            raise self.fail(join(where, found[1][0]),
                            f"{base} is given twice ({found[0][0]} and {found[1][0]})")
        if not found:
            if required:
                raise self.fail(join(where, f"{base}_us"),
                                f"missing (required: {base}_ns, _us, _ms or _s)")
            return default
        key, mult = found[0]
        return self.time(tbl[key], join(where, key), mult, positive=positive)

    def time(self, value: Any, key: str, mult: int, *, positive: bool = True) -> int:
        """A number of ``mult`` ns as integer ns: finite, not negative, at most an hour."""
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            raise self.fail(key, f"expected a{' finite' if isinstance(value, float) else ''} "
                            f"number, got {show(value)}")
        ns = round(value * mult)
        if ns < 0 or (positive and ns == 0):
            raise self.fail(key, f"must be {'positive' if positive else 'at least 0'}, "
                            f"got {value}")
        if ns > MAX_TIME_NS:
            raise self.fail(key, f"must be at most {_ms(MAX_TIME_NS)}, got {value}")
        return int(ns)


def check_host_sizes(ck: Checker, tbl: Mapping[str, Any]) -> None:
    """``[host]`` counts and lists within :data:`MAX_PCPUS`, before a topology is built.

    Other wrong values are left to numa.topology.from_spec, whose messages name the key.
    """
    if "sysfs" in tbl and not isinstance(tbl["sysfs"], bool):
        raise ck.fail("host.sysfs", f"expected true or false, got {show(tbl['sysfs'])}")

    def count(key: str) -> int:
        v = tbl.get(key, 1)
        return v if isinstance(v, int) and not isinstance(v, bool) else 1

    for key in ("pcpus", "sockets", "cores", "threads", "llc_per_socket", "nodes_per_socket"):
        if count(key) > MAX_PCPUS:
            raise ck.fail(f"host.{key}", f"must be at most {MAX_PCPUS}, got {count(key)}")
    total = 1
    for key in ("sockets", "cores", "threads"):
        total *= count(key)
        if total > MAX_PCPUS:
            whole = count("sockets") * count("cores") * count("threads")
            raise ck.fail(f"host.{key}", f"{count('sockets')} sockets x {count('cores')} cores "
                          f"x {count('threads')} threads is {whole} pCPUs, at most {MAX_PCPUS}")
    cpus = tbl.get("cpus")
    if isinstance(cpus, list) and len(cpus) > MAX_PCPUS:
        raise ck.fail("host.cpus", f"{len(cpus)} pCPUs, at most {MAX_PCPUS}")


def affinity(ck: Checker, value: Any, key: str, topo: Topology) -> frozenset[int] | None:
    """An xl cpus string (``0-3,^2``, ``all``, ``node:1``, ``nodes:0-1``) or a list of ids.

    A term naming a pCPU or node the host lacks is an error before any set
    is built, so ``0-1000000000000`` costs nothing; excluding one is harmless.
    """
    if value is None:
        return None
    n = topo.nr_cpus
    if isinstance(value, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in value):
            raise ck.fail(key, f"expected a list of pCPU ids (integers), got {show(value)}")
        bad = [c for c in value if not 0 <= c < n]
        if bad:
            raise ck.fail(key, f"pCPU {min(bad)} is outside the host (pCPUs 0-{n - 1})")
        cpus = set(value)
    elif isinstance(value, str):
        cpus = set()
        for term in (t.strip() for t in value.split(",")):
            if not term:
                continue
            exclude = term.startswith("^")
            body = term[1:] if exclude else term
            chosen = _cpu_term(ck, key, body, term, topo, exclude)
            if exclude:
                cpus -= chosen
            else:
                cpus |= chosen
    else:
        raise ck.fail(key, f"expected an xl cpus string or a list of pCPU ids, "
                      f"got {show(value)}")
    if not cpus:
        raise ck.fail(key, "names no pCPU")
    return frozenset(cpus)


def _cpu_term(ck: Checker, key: str, body: str, term: str, topo: Topology,
              exclude: bool) -> set[int]:
    n = topo.nr_cpus
    if body == "all":
        if exclude:
            raise ck.fail(key, "'^all' removes every pCPU")
        return set(range(n))
    nodes = False
    for prefix in ("node:", "nodes:"):
        if body.startswith(prefix):
            nodes, body = True, body[len(prefix):]
    lo, dash, hi = body.partition("-")
    if not lo.isdecimal() or (dash and not hi.isdecimal()) or not lo.isascii() \
            or not hi.isascii():
        raise ck.fail(key, f"bad term {term!r} (expected N, A-B, all, node:N or nodes:A-B, "
                      "optionally after ^)")
    first, last = int(lo), int(hi) if dash else int(lo)
    if last < first:
        raise ck.fail(key, f"range {body!r} goes backwards")
    if not nodes:
        if last >= n and not exclude:
            raise ck.fail(key, f"pCPU {max(first, n)} is outside the host (pCPUs 0-{n - 1})")
        return set(range(first, min(last, n - 1) + 1))
    have = set(topo.nodes)
    # At most len(have) + 1 steps find the first missing node of first..last, if any.
    missing = next((x for x in range(first, min(last, first + len(have)) + 1)
                    if x not in have), None)
    if missing is not None:
        raise ck.fail(key, f"node {missing} is not on the host (nodes: "
                      f"{', '.join(map(str, topo.nodes))})")
    return {c.id for c in topo.cpus if first <= c.node <= last}


# -- scheduler parameters ----------------------------------------------------------------------


def check_params(ck: Checker, d: DomainSpec, kind: str, cls: Any) -> None:
    """Domain ``d``'s parameters as scheduler ``cls`` (registry name ``kind``) checks them.

    The same pure check the scheduler makes when the host is built
    (``check_params``); the error names the key the file gave the value at:
    ``domain.NAME.sched.KIND.KEY``, or ``domain.NAME.sched.KEY`` for a
    parameter given for every scheduler.
    """
    from xenlab.sim.schedulers.base import ParamError

    known = getattr(cls, "PARAMS", None)
    check = getattr(cls, "check_params", None)
    if not isinstance(known, Mapping) or check is None:
        return
    for sched, params in d.by_sched:
        if sched != kind:
            continue
        for k, _ in params:
            if k not in known:
                raise ck.fail(f"domain.{d.name}.sched.{kind}.{k}",
                              f"unknown key: {kind} takes {', '.join(sorted(known)) or 'none'}")
    try:
        check(d.params_for(kind, known))
    except ParamError as err:
        own = {k for s, ps in d.by_sched if s == kind for k, _ in ps}
        common = {k for k, _ in d.common}
        for k in (err.key, *err.related):
            if k in own:
                raise ck.fail(f"domain.{d.name}.sched.{kind}.{k}", err.reason) from err
            if k in common:
                raise ck.fail(f"domain.{d.name}.sched.{k}", err.reason) from err
        raise ck.fail(f"domain.{d.name}.sched", err.reason) from err


# -- how long a run takes ----------------------------------------------------------------------


def _releases(w: WorkloadSpec, span_ns: int) -> int:
    """How many times ``w`` wakes its vCPU in ``span_ns`` (at most)."""
    kind = w.kind.value
    if kind == "hog":
        return 0
    gap = w.run_ns + w.period_ns if kind in ("io", "run-sleep") else w.period_ns
    n = span_ns // max(1, gap) + 1
    return min(n, w.loops) if w.loops >= 0 and kind in ("periodic", "run-sleep") else n


def estimate_events(span_ns: int, domains: Sequence[DomainSpec], pools: Sequence[PoolSpec],
                    nr_cpus: int, choice: SchedChoice, registry: Mapping[str, Any],
                    clamp: Mapping[str, Any] | None) -> tuple[int, str]:
    """About how many events drive ``span_ns`` of a run under ``choice``; the busiest domain.

    Counted: each vCPU's workload releases (periods, gaps, intervals, loops),
    a budget replenishment per vCPU per reservation period (schedulers
    taking ``period``), credit's three ticks per time slice on each of its
    pCPUs, and two per idle-injection cycle on each clamped pCPU.
    """
    def sched_of(d: DomainSpec) -> SchedChoice:
        return next((p.choice for p in pools if p.name == d.pool), choice)

    per_dom: dict[str, int] = {}
    for d in domains:
        c = sched_of(d)
        known = getattr(registry[c.kind], "PARAMS", None) or {}
        period = {**known, **d.params_for(c.kind, known)}.get("period") if "period" in known \
            else None
        refills = span_ns // (period * NS_PER_US) if isinstance(period, int) and period > 0 \
            else 0
        per_dom[d.name] = sum(_releases(w, span_ns) + refills for w in d.workloads)
    total = sum(per_dom.values())
    pool_cpus = [(p.choice, len(p.cpus)) for p in pools]
    for c, cpus in [(choice, nr_cpus - sum(n for _, n in pool_cpus)), *pool_cpus]:
        if c.kind == "credit":
            tslice = dict(c.options).get("tslice_ms")
            tslice = tslice if isinstance(tslice, int) and tslice > 0 else 30  # credit's default
            total += cpus * span_ns * TICKS_PER_TSLICE // (tslice * NS_PER_MS)
    if clamp is not None:
        cycle = clamp.get("duration_ms")
        cycle = cycle if isinstance(cycle, int) and cycle > 0 else 6  # PowerClamp's default
        clamped = clamp.get("cpus")
        cpus = len(clamped) if isinstance(clamped, Sequence) else nr_cpus
        total += 2 * cpus * span_ns // (cycle * NS_PER_MS)
    busiest = max(per_dom, key=lambda k: per_dom[k]) if per_dom else ""
    return total, busiest


def about(n: int) -> str:
    """``n`` to two significant digits, with thousands separators."""
    digits = len(str(n))
    return f"{round(n, -(digits - 2)) if digits > 2 else n:,}"
