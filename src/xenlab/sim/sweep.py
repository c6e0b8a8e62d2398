"""Parameter sweeps: :func:`grid` makes the points, :func:`run_point` runs one.

A sweep is a scenario, a few parameters each with a list of values
(dotted keys, as in :func:`xenlab.sim.scenario.with_params`), and a list of
schedulers; the points are the product of all of them.

Design
* **Seeds.**  Each point's seed is derived from the scenario's seed and the
  point's parameter values (SHA-256 of their canonical JSON), not from its
  position: adding a value to a sweep leaves the other points' results
  unchanged, and every scheduler sees the same random workload at a point
  (common random numbers, so differences come from the schedulers).
* **Bounded.**  At most ``MAX_POINTS`` (10,000) points, counted before any
  is built; no value is given twice for a parameter.
* **Checked first.**  Every point's scenario is read and checked, and its
  host built (without running) under each of its schedulers, before
  anything runs: a bad value, or one only the scheduler refuses, fails at
  once with ``file: key: reason``.  A point that still fails in a worker
  sends its error back (a :class:`ScenarioError` pickles whole), and a
  worker process that dies is an error naming the sweep, not a traceback.
* **Where it runs** is not this module's business: :func:`run_point` runs one
  point wherever it is called, and :mod:`xenlab.sim.runner` sends the points
  to local processes or a Dask cluster.  A point carries the merged scenario
  (rt-app files already read in), so workers need none of the scenario's
  files (``host.sysfs = true`` reads the worker's own machine).
* Results come back as they finish (for a progress bar); :func:`sweep_json`
  and :func:`sweep_csv` sort them by point, so the files are the same
  whatever ran where.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from xenlab.errors import XenlabError
from xenlab.sim.report import csv_text, dumps, run_scenario
from xenlab.sim.scenario import (
    Scenario,
    attach_powerclamp,
    build_host,
    parse_value,
    scenario_from_dict,
    with_params,
)
from xenlab.sim.validate import MAX_POINTS

__all__ = [
    "Point",
    "PointResult",
    "grid",
    "parse_param",
    "point_seed",
    "run_point",
    "sweep_csv",
    "sweep_json",
]


@dataclass(frozen=True, slots=True)
class Point:
    """One run of a sweep: parameter values, a scheduler, a seed."""

    index: int
    params: tuple[tuple[str, Any], ...]
    scheduler: str
    seed: int

    @property
    def label(self) -> str:
        """``key=value`` pairs (the last part of each key), for tables and plots."""
        return ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.params) or "-"


@dataclass(frozen=True, slots=True)
class PointResult:
    """What a point measured (small: it crosses process and network boundaries)."""

    point: Point
    jobs: int
    misses: int
    migrations: int
    events: int
    idle_pct: float
    ok: bool  # the scenario's [[expect]] claims hold
    #: Per domain, sorted by name: (name, cpu_pct, jobs, misses, wake_p99_ns, response_max_ns).
    domains: tuple[tuple[str, float, int, int, int, int], ...]


def parse_param(text: str) -> tuple[str, tuple[Any, ...]]:
    """``key=v1,v2,...`` (values as TOML literals or bare strings)."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        raise XenlabError(f"--param {text!r}: expected KEY=V1,V2,... "
                          "(e.g. domain.rt.sched.rtds.budget=2000,3000)")
    return key, tuple(parse_value(v.strip()) for v in values.split(","))


def point_seed(base: int, params: Sequence[tuple[str, Any]]) -> int:
    """The seed of the point with ``params`` (independent of scheduler and grid order)."""
    text = json.dumps([base, sorted([k, v] for k, v in params)], sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def grid(scenario: Scenario, params: Sequence[tuple[str, Sequence[Any]]],
         schedulers: Sequence[str]) -> list[Point]:
    """Every combination of ``params`` values, under each scheduler, each point checked.

    A parameter or value given twice, a grid of more than ``MAX_POINTS``
    points, a scheduler the scenario cannot run, or a point whose host cannot
    be built (a value its scheduler refuses) is an error.
    """
    keys = [k for k, _ in params]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise XenlabError(f"--param {dup[0]} is given twice")
    for key, vals in params:
        # Compared as JSON: 1 and true differ, as they do in the scenario.
        seen = [json.dumps(v, sort_keys=True, default=repr) for v in vals]
        again = next((v for i, v in enumerate(vals) if seen[i] in seen[:i]), None)
        if again is not None:
            raise XenlabError(f"--param {key}: the value {again!r} is given twice")
    size = math.prod(len(v) for _, v in params) * len(schedulers)
    if size > MAX_POINTS:  # counted before a point is built: each is checked whole
        counts = " x ".join(str(len(v)) for _, v in params)
        many = "s" if len(schedulers) != 1 else ""
        raise XenlabError(f"--param: {counts} values under {len(schedulers)} scheduler{many} "
                          f"make {size} points, at most {MAX_POINTS}")
    for name in schedulers:
        scenario.choice(name)
    points: list[Point] = []
    for combo in itertools.product(*(vals for _, vals in params)):
        values = tuple(zip(keys, combo, strict=True))
        checked = with_params(scenario, dict(values))  # fails here, before anything runs
        seed = point_seed(scenario.seed, values)
        for name in schedulers:
            # Built, not run: the scheduler's own checks (weight ranges, parameters it
            # refuses) happen here rather than in a worker.
            attach_powerclamp(checked, build_host(checked, name, seed, trace=False))
            points.append(Point(len(points), values, name, seed))
    return points


def run_point(raw_json: str, source: str, point: Point) -> PointResult:
    """Run one point (in whatever process or machine this is called)."""
    base = scenario_from_dict(json.loads(raw_json), source=source)
    scenario = with_params(base, dict(point.params))
    r = run_scenario(scenario, point.scheduler, point.seed)
    m = r.metrics
    dur = m.duration_ns or 1
    doms = []
    for d in sorted({v.domain for v in m.vcpus}):
        vs = [v for v in m.vcpus if v.domain == d]
        doms.append((d, round(100.0 * sum(v.cpu_ns for v in vs) / dur, 6),
                     sum(v.jobs for v in vs), sum(v.misses for v in vs),
                     max(v.wake_latency.p99_ns for v in vs), max(v.response.max_ns for v in vs)))
    idle = round(sum(p.idle_pct for p in m.pcpus) / len(m.pcpus), 6)
    return PointResult(point, m.jobs, m.misses, sum(v.migrations for v in m.vcpus), m.events,
                       idle, r.ok, tuple(doms))


# -- formats -----------------------------------------------------------------------------------


def _row(r: PointResult) -> dict[str, Any]:
    return {
        "index": r.point.index, "scheduler": r.point.scheduler, "seed": r.point.seed,
        "params": {k: v for k, v in r.point.params}, "jobs": r.jobs, "misses": r.misses,
        "migrations": r.migrations, "events": r.events, "idle_pct": r.idle_pct, "ok": r.ok,
        "domains": {d[0]: {"cpu_pct": d[1], "jobs": d[2], "misses": d[3], "wake_p99_ns": d[4],
                           "response_max_ns": d[5]} for d in r.domains},
    }


def sweep_json(scenario: Scenario, results: Sequence[PointResult]) -> bytes:
    """sweep.json: the points in order, the same bytes wherever they ran."""
    rows = [_row(r) for r in sorted(results, key=lambda r: r.point.index)]
    return dumps({"scenario": scenario.name, "seed": scenario.seed, "points": rows})


def sweep_csv(results: Sequence[PointResult]) -> str:
    """sweep.csv: one row per point; per-domain columns ``DOMAIN.misses`` and the like."""
    ordered = sorted(results, key=lambda r: r.point.index)
    keys = list(dict.fromkeys(k for r in ordered for k, _ in r.point.params))
    doms = sorted({d[0] for r in ordered for d in r.domains})
    header = ["index", "scheduler", "seed", *keys, "jobs", "misses", "migrations", "idle_pct",
              "ok"]
    for d in doms:
        header += [f"{d}.cpu_pct", f"{d}.jobs", f"{d}.misses", f"{d}.wake_p99_ns",
                   f"{d}.response_max_ns"]
    rows = []
    for r in ordered:
        params: Mapping[str, Any] = dict(r.point.params)
        by_dom = {d[0]: d for d in r.domains}
        row: list[Any] = [r.point.index, r.point.scheduler, r.point.seed,
                          *(params.get(k, "") for k in keys), r.jobs, r.misses, r.migrations,
                          f"{r.idle_pct:.6f}", r.ok]
        for d in doms:
            got = by_dom.get(d)
            row += [f"{got[1]:.6f}", *got[2:]] if got else [""] * 5
        rows.append(row)
    return csv_text(header, rows)

