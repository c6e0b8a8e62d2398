"""A test oracle over SimSo (PyPI ``simso`` 0.8.5, SimPy 2): run_simso() and run_xenlab().

The issue asks that xenlab's EDF schedulers give the same job counts and
deadline-miss counts as SimSo for the same periodic task sets, on G-EDF and
P-EDF.  This module holds both sides and the task sets, so the test and
bench/sim.py run exactly the same thing:

* :func:`task_set`: UUniFast-discard utilizations from a seeded
  ``random.Random``, periods drawn from a given set, integer microseconds.
  :func:`prime_periods` gives period sets in which no two jobs of different
  tasks ever share a deadline (see *Ties* below).
* :func:`run_simso`: SimSo's own global EDF (``simso.schedulers.EDF``), its
  P-EDF (``simso.schedulers.P_EDF``: decreasing-utilization first fit, then
  uniprocessor EDF per CPU), or ``Fixed_PEDF`` with a partition we give
  (SimSo's P-EDF refuses sets first fit cannot pack, so overloaded CPUs need
  the fixed one).
* :func:`run_xenlab`: the same set on a xenlab :class:`~xenlab.sim.host.Host`,
  each task a domain with one vCPU running a
  :class:`~xenlab.sim.workload.Periodic` workload, pinned by affinity when a
  partition is given.

How the two models are aligned (read from SimSo's core/Task.py, Job.py,
Processor.py, Model.py, results.py and SimPy 2's ``simulate``):

Time unit
    SimSo counts time in cycles and takes task parameters in "ms", a cycle
    being ``1 / cycles_per_ms`` ms; WCETs and periods become cycles through
    ``int(x * cycles_per_ms)`` and absolute deadlines are floats in ms.  We
    set ``cycles_per_ms = 1`` and give SimSo our integer microseconds as its
    "ms": every time in SimSo is then an integer count of microseconds
    carried exactly by floats, and nothing is truncated (with real ms and
    1000 cycles/ms, ``int(0.57 * 1000)`` is 569).  xenlab gets ``us * 1000`` ns.
Jobs
    Both release job k of a task at ``k * period`` (synchronous release, no
    offset) and count every release.  A job released while the previous one
    of its task is unfinished waits behind it in both (SimSo's per-task
    activation FIFO, xenlab's ``Periodic.backlog``), keeping its own
    deadline ``release + period``.
Late jobs
    ``abort_on_miss=False`` in SimSo: a job past its deadline keeps running
    to completion, as in xenlab (no abort).
Misses
    A job is a miss if it completed after its absolute deadline, or if it is
    still unfinished at the end of the run with its deadline strictly before
    the end.  xenlab's ``Periodic`` counts exactly that (``finish``); SimSo's
    ``Results`` counts only jobs that ended (an unfinished job has no end
    date), so we count from SimSo's Job objects ourselves: completion after
    deadline as SimSo's ``Job.exceeded_deadline`` does, plus unfinished jobs
    whose deadline is before the end.  Finishing exactly at the deadline is
    not a miss in either.
End of the run
    xenlab's engine runs the events strictly before the end; SimPy 2's
    ``simulate(until)`` runs those at ``until`` too.  SimSo is therefore run
    to ``horizon - 1`` cycles: with all times integer microseconds, both see
    exactly the events in ``[0, horizon)`` (a job released at the horizon is
    counted by neither; one finishing at it is unfinished in both).
Ties
    SimSo's G-EDF takes the ready job with the smallest deadline, the first
    in task-list order on a tie, and never preempts a running job for an
    equal deadline; xenlab's mpedf breaks ties by queueing order.  These can
    differ by construction, so the cross-check uses :func:`prime_periods`:
    distinct primes above ``sqrt(horizon + max period)`` make two deadlines
    ``a * p == b * q`` impossible within the run.  With distinct deadlines the
    set of running jobs at every instant is fixed by G-EDF (or EDF per CPU),
    whatever the CPU choice or the order of simultaneous events, so the
    counts must match exactly.
SimSo's G-EDF prints each decision (a debugging ``print`` left in
    ``simso/schedulers/EDF.py``); :func:`run_simso` silences it at run time
    by giving that module a no-op ``print`` (site-packages stays untouched),
    which also keeps the bench from timing a terminal.

SimSo 0.8.5 runs on Python 3.11 as it is (its ``import imp`` is deprecated
but present until 3.12).  One bug of its own, not of 3.11, is worked around
at run time: Fixed_PEDF cannot load its per-CPU EDF (:func:`_fixed_pedf`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from xenlab.numa.topology import uniform
from xenlab.sim.host import Host
from xenlab.sim.schedulers import make
from xenlab.sim.workload import Periodic

NS_PER_US = 1_000


@dataclass(frozen=True, slots=True)
class Task:
    """A periodic task with an implicit deadline: ``wcet_us`` of work every ``period_us``."""

    wcet_us: int
    period_us: int

    @property
    def utilization(self) -> float:
        """wcet / period."""
        return self.wcet_us / self.period_us


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one simulator reported for a task set, per task in the set's order."""

    jobs: tuple[int, ...]  # jobs released in [0, horizon)
    misses: tuple[int, ...]  # late or unfinished-past-deadline jobs
    events: int  # the simulator's own events (SimPy steps; xenlab engine callbacks)
    wall_s: float  # wall time of the simulation proper (build + run + results)
    partition: tuple[int, ...] | None = None  # CPU index per task (partitioned runs)


# -- task sets ---------------------------------------------------------------------------------


def uunifast_discard(rng: random.Random, n: int, total: float, *,
                     u_max: float = 1.0) -> list[float]:
    """``n`` utilizations summing to ``total``, uniformly drawn (Bini & Buttazzo's UUniFast),
    drawing again while one exceeds ``u_max`` (Davis & Burns' discard variant)."""
    if not 0 < total <= n * u_max:
        raise ValueError(f"cannot split {total} into {n} utilizations of at most {u_max}")
    while True:
        us = []
        rest = total
        for i in range(1, n):
            nxt = rest * rng.random() ** (1.0 / (n - i))
            us.append(rest - nxt)
            rest = nxt
        us.append(rest)
        if max(us) <= u_max:
            return us


def task_set(seed: int, n: int, total: float, periods_us: Sequence[int], *,
             u_max: float = 1.0, distinct: bool = False,
             min_wcet_us: int = 10) -> tuple[Task, ...]:
    """``n`` tasks of total utilization about ``total`` (WCETs round to whole microseconds).

    Periods are drawn from ``periods_us`` (without repetition when
    ``distinct``); each WCET is at least ``min_wcet_us`` (the EDF schedulers'
    smallest budget, 10 us as RTDS's) and at most the period.
    """
    rng = random.Random(seed)
    us = uunifast_discard(rng, n, total, u_max=u_max)
    if distinct:
        periods = rng.sample(list(periods_us), n)
    else:
        periods = [rng.choice(periods_us) for _ in range(n)]
    return tuple(Task(min(p, max(min_wcet_us, round(u * p))), p)
                 for u, p in zip(us, periods, strict=True))


def prime_periods(lo_us: int, hi_us: int) -> tuple[int, ...]:
    """The primes in ``[lo_us, hi_us]``: periods under which no two tasks share a deadline
    before ``lo_us ** 2`` microseconds."""
    sieve = bytearray([1]) * (hi_us + 1)
    sieve[:2] = b"\x00\x00"
    for i in range(2, int(hi_us**0.5) + 1):
        if sieve[i]:
            sieve[i * i::i] = bytes(len(range(i * i, hi_us + 1, i)))
    return tuple(p for p in range(max(lo_us, 2), hi_us + 1) if sieve[p])


def decreasing_first_fit(tasks: Sequence[Task], cpus: int) -> tuple[int, ...] | None:
    """The partition SimSo's P-EDF computes (tasks by decreasing utilization, stable, each on
    the first CPU where the load stays <= 1), in exact rationals; None when one does not fit."""
    load = [Fraction(0)] * cpus
    out = [-1] * len(tasks)
    for i in sorted(range(len(tasks)), key=lambda i: -tasks[i].utilization):
        u = Fraction(tasks[i].wcet_us, tasks[i].period_us)
        for c in range(cpus):
            if load[c] + u <= 1:
                load[c] += u
                out[i] = c
                break
        else:
            return None
    return tuple(out)


# -- SimSo -------------------------------------------------------------------------------------


def _quiet_simso() -> None:
    """Silence the decision ``print`` in SimSo's G-EDF (a module global shadows the builtin)."""
    import simso.schedulers.EDF as gedf

    gedf.print = lambda *args, **kwargs: None  # type: ignore[attr-defined]


def _fixed_pedf() -> type:
    """SimSo's Fixed_PEDF with its uniprocessor EDF named so that SimSo can load it.

    0.8.5's ``Fixed_PEDF.init`` passes ``SchedulerInfo("EDF_mono", EDF_mono)``:
    the class lands in the ``overhead`` argument and the name has no module,
    so loading fails and every run stops with "'NoneType' object has no
    attribute 'add_processor'".  This subclass names ``simso.schedulers.EDF_mono``
    as P_EDF does and keeps Fixed_PEDF's packer (``task.data["cpu"]``).
    """
    from simso.core.Scheduler import SchedulerInfo
    from simso.schedulers.Fixed_PEDF import Fixed_PEDF
    from simso.utils.PartitionedScheduler import PartitionedScheduler

    class FixedPEDF(Fixed_PEDF):  # type: ignore[misc]
        def init(self) -> None:
            PartitionedScheduler.init(self, SchedulerInfo("simso.schedulers.EDF_mono"))

    return FixedPEDF


def run_simso(tasks: Sequence[Task], cpus: int, horizon_us: int, *, scheduler: str,
              partition: Sequence[int] | None = None, count_events: bool = True) -> Outcome:
    """Run ``tasks`` on SimSo for ``[0, horizon_us)``.

    ``scheduler``: ``"gedf"`` (simso.schedulers.EDF), ``"pedf"``
    (simso.schedulers.P_EDF, its own partition, reported back) or
    ``"fixed-pedf"`` (simso.schedulers.Fixed_PEDF on ``partition``, with its
    loading bug worked around, see :func:`_fixed_pedf`).
    ``count_events`` counts SimPy steps (one Python call per step more).
    """
    from simso.configuration import Configuration
    from simso.core import Model

    _quiet_simso()
    clas: str | type = {"gedf": "simso.schedulers.EDF", "pedf": "simso.schedulers.P_EDF",
                        "fixed-pedf": "simso.schedulers.Fixed_PEDF"}[scheduler]
    if scheduler == "fixed-pedf":
        clas = _fixed_pedf()
    if (scheduler == "fixed-pedf") != (partition is not None):
        raise ValueError("a partition goes with fixed-pedf, and only with it")
    start = time.perf_counter()
    conf = Configuration()
    conf.cycles_per_ms = 1  # our microseconds are SimSo's "ms" (see the module notes)
    conf.duration = horizon_us - 1  # SimPy 2 runs the events at `until` too
    conf.etm = "wcet"
    for i, t in enumerate(tasks):
        data: dict[str, Any] = {"cpu": partition[i] + 1} if partition is not None else {}
        conf.add_task(name=f"T{i}", identifier=i + 1, task_type="Periodic",
                      abort_on_miss=False, period=t.period_us, activation_date=0,
                      wcet=t.wcet_us, deadline=t.period_us, data=data)
    for c in range(cpus):
        conf.add_processor(name=f"CPU{c}", identifier=c + 1)
    conf.scheduler_info.clas = clas
    conf.check_all()
    model = Model(conf)
    steps = [0]
    if count_events:
        from SimPy.Simulation import Simulation

        base_step = Simulation.step

        def step() -> Any:
            steps[0] += 1
            return base_step(model)

        model.step = step  # simulate() looks self.step up once
    model.run_model()
    wall = time.perf_counter() - start
    jobs, misses = [], []
    for task in model.task_list:  # in identifier order: the order given
        jobs.append(len(task.jobs))
        late = 0
        for job in task.jobs:
            deadline = job.absolute_deadline_cycles
            end = job.end_date
            if (end is not None and job.exceeded_deadline) or (end is None
                                                               and deadline < horizon_us):
                late += 1
        misses.append(late)
    placed = None
    if scheduler != "gedf":
        placed = tuple(task.cpu.identifier - 1 for task in model.task_list)
    return Outcome(tuple(jobs), tuple(misses), steps[0], wall, placed)


# -- xenlab ------------------------------------------------------------------------------------


def build_xenlab(tasks: Sequence[Task], cpus: int, *, scheduler: str,
                 options: dict[str, Any] | None = None,
                 reservation: tuple[str, str] | None = ("budget", "period"),
                 partition: Sequence[int] | None = None) -> Host:
    """A host with one single-vCPU domain per task (``t0``, ``t1``...), each a Periodic job
    stream, pinned to ``partition[i]`` when given.

    ``reservation`` names the scheduler's (budget, period) parameters: each domain
    gets WCET and period there (in microseconds, xl's unit), a CBS server that is
    exactly its task; None gives no parameters (the null scheduler).
    """
    host = Host(uniform(cores=cpus), make(scheduler, **(options or {})))
    for i, t in enumerate(tasks):
        params = None
        if reservation is not None:
            params = {reservation[0]: t.wcet_us, reservation[1]: t.period_us}
        host.add_domain(
            f"t{i}", [Periodic(t.wcet_us * NS_PER_US, t.period_us * NS_PER_US)],
            params=params,
            affinity=frozenset({partition[i]}) if partition is not None else None)
    return host


def run_xenlab(tasks: Sequence[Task], cpus: int, horizon_us: int, *, scheduler: str,
               options: dict[str, Any] | None = None,
               reservation: tuple[str, str] | None = ("budget", "period"),
               partition: Sequence[int] | None = None) -> Outcome:
    """Run ``tasks`` on xenlab's ``scheduler`` for ``[0, horizon_us)``."""
    start = time.perf_counter()
    host = build_xenlab(tasks, cpus, scheduler=scheduler, options=options,
                        reservation=reservation, partition=partition)
    host.run(horizon_us * NS_PER_US)
    host.finish()
    wall = time.perf_counter() - start
    return Outcome(tuple(v.jobs for v in host.vcpus), tuple(v.misses for v in host.vcpus),
                   host.engine.events, wall,
                   tuple(partition) if partition is not None else None)
