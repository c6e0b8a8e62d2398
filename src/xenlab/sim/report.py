"""Running a scenario and writing up the run: :func:`run_scenario` -> :class:`RunReport`.

A report is the metrics of one run plus what the plots need (the Gantt
window's segments, every vCPU's wake-up latencies, the idle-vs-target
series when PowerClamp is on) and the verdict on the scenario's
``[[expect]]`` claims.  The formats are pure functions of a report:

* :func:`report_json`: bytes, byte-identical for the same scenario, scheduler
  and seed (sorted keys, integers in ns, floats rounded once to 6 digits);
* :func:`vcpus_csv`, :func:`pcpus_csv`: one row per vCPU / pCPU;
* :func:`compare_json`: several runs of one scenario side by side.

Writing files is the caller's (the CLI writes them atomically).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xenlab.sim.metrics import RunMetrics, summarize
from xenlab.sim.power import PowerMeter
from xenlab.sim.scenario import (
    Expectation,
    Scenario,
    SchedChoice,
    attach_powerclamp,
    build_host,
)

if TYPE_CHECKING:
    from xenlab.sim.host import Host

__all__ = [
    "IDLE_SAMPLES",
    "IDLE_STEP_MIN_NS",
    "RunReport",
    "Verdict",
    "check",
    "compare_json",
    "csv_text",
    "dumps",
    "pcpus_csv",
    "report_json",
    "report_to_json",
    "run_scenario",
    "vcpus_csv",
]

#: Points in the idle-vs-target series: enough for a smooth line over any
#: run length, few enough that sampling costs nothing next to the run.
IDLE_SAMPLES = 200
#: The shortest idle sampling step: two of PowerClamp's cycles at 25 % (24 ms
#: each), so a sample sees whole cycles rather than one injection or none.
IDLE_STEP_MIN_NS = 20_000_000


@dataclass(frozen=True, slots=True)
class Verdict:
    """One ``[[expect]]`` bound checked against a run."""

    index: int
    target: str  # "rt.0", "domain rt" or "host"
    bound: str  # e.g. "misses_max"
    limit: float
    value: float
    ok: bool

    def __str__(self) -> str:
        word = "ok" if self.ok else "FAILED"
        return f"expect[{self.index}] {self.target}: {self.bound} {_num(self.limit)}: " \
               f"got {_num(self.value)} ({word})"


@dataclass(frozen=True, slots=True)
class RunReport:
    """One run of a scenario under one scheduler and seed."""

    scenario: str  # the scenario's name
    source: str  # its file's name (no directory: reports must not depend on cwd)
    choice: SchedChoice
    nr_pcpus: int
    metrics: RunMetrics
    trace_ns: tuple[int, int]
    segments: tuple[tuple[int, int, int, str | None], ...]
    latencies: tuple[tuple[str, tuple[int, ...]], ...]  # vCPU name -> wake-up latencies (ns)
    #: (time ns, mean idle % over pCPUs in the interval before it); PowerClamp runs only.
    idle_series: tuple[tuple[int, float], ...]
    idle_target: float | None
    extra: tuple[tuple[str, Any], ...]  # model reports (energy, the cooling device), sorted
    verdicts: tuple[Verdict, ...]

    @property
    def ok(self) -> bool:
        """Every claim the scenario makes for this scheduler holds."""
        return all(v.ok for v in self.verdicts)


class _IdleSampler:
    """Every ``step`` ns, the mean idle share of the pCPUs since the last sample."""

    __slots__ = ("host", "last", "last_t", "out", "step")

    def __init__(self, host: Host, step: int) -> None:
        self.host = host
        self.step = step
        self.last = [0] * len(host.pcpus)
        self.last_t = 0
        self.out: list[tuple[int, float]] = []
        host.engine.at(step, self._tick)

    def _idle(self) -> list[int]:
        now = self.host.engine.now
        # pCPU accounting is lazy (done at each reschedule): add the idle time since.
        return [p.idle_ns + (now - p.last_acct if p.curr is None else 0)
                for p in self.host.pcpus]

    def _tick(self) -> None:
        self.sample()
        self.host.engine.at(self.host.engine.now + self.step, self._tick)

    def sample(self) -> None:
        """Record the idle share since the last sample (nothing when no time passed)."""
        now = self.host.engine.now
        if now <= self.last_t:
            return
        idle = self._idle()
        span = (now - self.last_t) * len(idle)
        pct = 100.0 * sum(i - j for i, j in zip(idle, self.last, strict=True)) / span
        self.out.append((now, round(pct, 6)))
        self.last, self.last_t = idle, now


def run_scenario(scenario: Scenario, scheduler: str | None = None,
                 seed: int | None = None) -> RunReport:
    """Run ``scenario`` under ``scheduler`` (default: its own) with ``seed`` (default: its own)."""
    seed = scenario.seed if seed is None else seed
    host = build_host(scenario, scheduler, seed)
    clamp = attach_powerclamp(scenario, host)
    meter = PowerMeter(host, scenario.power)
    sampler = None
    if clamp is not None:
        step = max(IDLE_STEP_MIN_NS, scenario.duration_ns // IDLE_SAMPLES)
        sampler = _IdleSampler(host, step)
    host.run(scenario.duration_ns)
    if sampler is not None:
        sampler.sample()  # the last interval, up to the end of the run
    host.finish()
    metrics = summarize(host, seed=seed)
    choice = scenario.choice(scheduler)
    extra: dict[str, Any] = {"energy": meter.report().to_json()}
    target = None
    if clamp is not None:
        target = float(dict(scenario.powerclamp or ()).get("target", 0))
        # The cooling device as Linux's thermal sysfs shows it, at the end of the run.
        extra["powerclamp"] = {"type": clamp.type, "max_state": clamp.max_state,
                               "cur_state": clamp.cur_state,
                               "measured_pct": round(clamp.measured_pct, 6)}
    return RunReport(
        scenario.name, Path(scenario.source).name, choice, len(host.pcpus), metrics,
        scenario.trace_ns, tuple(host.segments),
        tuple((v.name, tuple(v.wake_latency_ns)) for v in host.vcpus),
        tuple(sampler.out) if sampler is not None else (), target,
        tuple(sorted(extra.items())), check(scenario, choice.name, metrics))


# -- expectations ----------------------------------------------------------------------------


def _measure(e: Expectation, bound: str, m: RunMetrics) -> float:
    vcpus = [v for v in m.vcpus
             if (e.vcpu is None or v.name == e.vcpu) and (e.domain is None or v.domain == e.domain)]
    dur = m.duration_ns or 1
    if bound.startswith("misses"):
        return float(sum(v.misses for v in vcpus))
    if bound == "jobs_min":
        return float(sum(v.jobs for v in vcpus))
    if bound.startswith("cpu_pct"):
        return round(100.0 * sum(v.cpu_ns for v in vcpus) / dur, 6)
    if bound == "wake_p99_us_max":
        return max((v.wake_latency.p99_ns for v in vcpus), default=0) / 1_000
    if bound == "response_max_us_max":
        return max((v.response.max_ns for v in vcpus), default=0) / 1_000
    if bound == "migrations_min":
        return float(sum(v.migrations for v in vcpus))
    if bound.startswith("idle_pct"):
        return round(sum(p.idle_pct for p in m.pcpus) / len(m.pcpus), 6)
    if bound == "pcpu_busy_pct_min":
        return round(min(100.0 - p.idle_pct for p in m.pcpus), 6)
    raise ValueError(bound)


def check(scenario: Scenario, sched: str, metrics: RunMetrics) -> tuple[Verdict, ...]:
    """The scenario's claims for scheduler ``sched``, each checked against ``metrics``."""
    out = []
    for e in scenario.expect:
        if not e.applies(sched):
            continue
        target = e.vcpu or (f"domain {e.domain}" if e.domain else "host")
        for bound, limit in e.bounds:
            value = _measure(e, bound, metrics)
            ok = value <= limit if bound.endswith("_max") else value >= limit
            out.append(Verdict(e.index, target, bound, limit, value, ok))
    return tuple(out)


# -- formats -------------------------------------------------------------------------------


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _stable(value: Any) -> Any:
    """Floats rounded once to 6 digits (and -0.0 made 0.0), so the text never wobbles."""
    if isinstance(value, float):
        r = round(value, 6)
        return 0.0 if r == 0 else r
    if isinstance(value, Mapping):
        return {str(k): _stable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_stable(v) for v in value]
    return value


def dumps(data: Any) -> bytes:
    """JSON bytes with sorted keys and stable floats, ending in a newline."""
    return (json.dumps(_stable(data), sort_keys=True, indent=2, ensure_ascii=False)
            + "\n").encode()


def report_to_json(r: RunReport) -> dict[str, Any]:
    """A report as JSON-ready values (what :func:`report_json` writes)."""
    return {
        "scenario": r.scenario,
        "file": r.source,
        "scheduler": {"name": r.choice.name, "kind": r.choice.kind,
                      "options": dict(r.choice.options)},
        "seed": r.metrics.seed,
        "pcpus": r.nr_pcpus,
        "metrics": r.metrics.to_json(),
        "idle": ({"target_pct": r.idle_target,
                  "series": [[t, pct] for t, pct in r.idle_series]}
                 if r.idle_target is not None else None),
        **{k: v for k, v in r.extra},
        "expect": [{"index": v.index, "target": v.target, "bound": v.bound,
                    "limit": v.limit, "value": v.value, "ok": v.ok} for v in r.verdicts],
        "ok": r.ok,
    }


def report_json(r: RunReport) -> bytes:
    """results.json: byte-identical for the same scenario, scheduler and seed."""
    return dumps(report_to_json(r))


def compare_json(reports: Sequence[RunReport]) -> bytes:
    """Several runs of one scenario (``xenlab sim compare``), in the order given."""
    return dumps({"scenario": reports[0].scenario if reports else None,
                  "runs": [report_to_json(r) for r in reports]})


_VCPU_FIELDS = ("scheduler", "vcpu", "domain", "cpu_ns", "cpu_pct", "jobs", "misses",
                "dispatches", "preemptions", "migrations", "response_min_ns",
                "response_avg_ns", "response_p99_ns", "response_max_ns", "wake_count",
                "wake_min_ns", "wake_avg_ns", "wake_p99_ns", "wake_max_ns")
_PCPU_FIELDS = ("scheduler", "pcpu", "busy_ns", "idle_ns", "injected_ns", "idle_pct", "switches")


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """CSV text (``\n`` line ends) with a header row."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def vcpus_csv(reports: Sequence[RunReport]) -> str:
    """vcpus.csv: one row per vCPU (per run, for comparisons)."""
    rows = []
    for r in reports:
        dur = r.metrics.duration_ns or 1
        for v in r.metrics.vcpus:
            rows.append((r.choice.name, v.name, v.domain, v.cpu_ns,
                         f"{100.0 * v.cpu_ns / dur:.6f}", v.jobs, v.misses, v.dispatches,
                         v.preemptions, v.migrations, v.response.min_ns, v.response.avg_ns,
                         v.response.p99_ns, v.response.max_ns, v.wake_latency.count,
                         v.wake_latency.min_ns, v.wake_latency.avg_ns, v.wake_latency.p99_ns,
                         v.wake_latency.max_ns))
    return csv_text(_VCPU_FIELDS, rows)


def pcpus_csv(reports: Sequence[RunReport]) -> str:
    """pcpus.csv: one row per pCPU (per run)."""
    rows = [(r.choice.name, p.id, p.busy_ns, p.idle_ns, p.injected_ns, f"{p.idle_pct:.6f}",
             p.switches) for r in reports for p in r.metrics.pcpus]
    return csv_text(_PCPU_FIELDS, rows)
