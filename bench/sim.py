"""Benchmark: the same global-EDF workload in xenlab's simulator and in SimSo.

Workload (the issue's): 4 pCPUs, 20 periodic tasks of total utilization 3.0
(UUniFast-discard, seed 4, periods from 10-100 ms), implicit deadlines,
synchronous release, 10 simulated seconds.  xenlab runs it on ``mpedf`` with
``runqueue="global"`` and each task a CBS server with budget = WCET and
period = period (that is G-EDF); SimSo runs its ``simso.schedulers.EDF``.
Both sides are built by tests/oracle/simso.py, which also says how the two
models are aligned; the job and miss totals are printed side by side.

Timed: building the model, running it and collecting the results (SimSo's
``run_model`` includes its Results analysis; xenlab's run includes
``finish``).  Best of 3 for xenlab, best of 2 for SimSo (the first one warms
imports).  jobs/s = jobs released / wall s; events/s = each simulator's own
events (SimPy 2 steps for SimSo, engine callbacks for xenlab; they are not
the same unit, so the headline is jobs/s).  X = xenlab throughput / SimSo's.

Then xenlab alone: wall time as pCPUs grow (4 to 256, 5 tasks and U = 0.75
per pCPU, 10 s) and as simulated time grows (10 s to 1000 s on 4 pCPUs),
with wall per job, the figure that stays flat when growth is linear.

The last line is ``sim_gedf ratio=X`` (jobs/s).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from tests.oracle.simso import (  # noqa: E402
    Outcome,
    Task,
    run_simso,
    run_xenlab,
    task_set,
)

PERIODS_US = (10_000, 20_000, 25_000, 40_000, 50_000, 100_000)
SEED = 4
SCHED = "mpedf"
OPTIONS = {"runqueue": "global"}
S = 1_000_000  # us


def workload(cpus: int, seed: int = SEED) -> tuple[Task, ...]:
    """5 tasks per pCPU at U = 0.75 per pCPU (20 tasks, U = 3.0 on 4 pCPUs)."""
    return task_set(seed, 5 * cpus, 0.75 * cpus, PERIODS_US)


def best(runs: int, fn: Callable[[], Outcome]) -> Outcome:
    """The fastest of ``runs`` runs."""
    return min((fn() for _ in range(runs)), key=lambda o: o.wall_s)


def xenlab(tasks: tuple[Task, ...], cpus: int, horizon_us: int, runs: int = 3) -> Outcome:
    return best(runs, lambda: run_xenlab(tasks, cpus, horizon_us, scheduler=SCHED,
                                         options=OPTIONS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smaller scaling tables (up to 64 pCPUs and 100 s)")
    args = ap.parse_args()

    tasks = workload(4)
    horizon = 10 * S
    x = xenlab(tasks, 4, horizon)
    s = best(2, lambda: run_simso(tasks, 4, horizon, scheduler="gedf"))
    print(f"G-EDF, 4 pCPUs, {len(tasks)} tasks, U = "
          f"{sum(t.utilization for t in tasks):.3f}, 10 s simulated")
    print(f"{'':<8}{'jobs':>8}{'misses':>8}{'events':>10}{'wall':>10}{'jobs/s':>12}"
          f"{'events/s':>12}")
    rows = (("xenlab", x), ("SimSo", s))
    for name, o in rows:
        jobs, ev = sum(o.jobs), o.events
        print(f"{name:<8}{jobs:>8}{sum(o.misses):>8}{ev:>10}{o.wall_s * 1e3:>8.1f}ms"
              f"{jobs / o.wall_s:>12,.0f}{ev / o.wall_s:>12,.0f}")
    same = x.jobs == s.jobs and x.misses == s.misses
    print(f"per-task jobs and misses {'agree' if same else 'DIFFER'} "
          f"(this set has equal deadlines, where tie-breaking may differ by construction)")
    jobs_ratio = (sum(x.jobs) / x.wall_s) / (sum(s.jobs) / s.wall_s)
    events_ratio = (x.events / x.wall_s) / (s.events / s.wall_s)
    print(f"ratios: jobs/s {jobs_ratio:.1f}x, events/s {events_ratio:.1f}x "
          f"(SimSo takes {s.events / x.events:.1f} events for xenlab's one)")

    print()
    print("xenlab scaling (mpedf global; wall per job flat = linear)")
    print(f"{'pCPUs':>6}{'tasks':>7}{'sim s':>7}{'jobs':>10}{'events':>11}{'wall':>10}"
          f"{'us/job':>9}")
    pcpus = (4, 16, 64) if args.quick else (4, 16, 64, 256)
    seconds = (10, 100) if args.quick else (10, 100, 1000)
    per_job: dict[str, list[float]] = {"pcpus": [], "time": []}
    for cpus in pcpus:
        o = x if cpus == 4 else xenlab(workload(cpus), cpus, horizon, runs=1)
        per_job["pcpus"].append(_row(cpus, 5 * cpus, 10, o))
    for sec in seconds:
        o = x if sec == 10 else xenlab(tasks, 4, sec * S, runs=1)
        per_job["time"].append(_row(4, 20, sec, o))
    for key, what in (("pcpus", f"pCPUs x{pcpus[-1] // pcpus[0]}"),
                      ("time", f"simulated time x{seconds[-1] // seconds[0]}")):
        vals = per_job[key]
        print(f"{what}: wall per job x{vals[-1] / vals[0]:.2f} "
              f"({'near linear' if vals[-1] / vals[0] < 1.5 else 'super-linear'} in jobs)")
    print(f"sim_gedf ratio={jobs_ratio:.1f}")


def _row(cpus: int, ntasks: int, sec: int, o: Outcome) -> float:
    jobs = sum(o.jobs)
    us_per_job = o.wall_s * 1e6 / jobs
    print(f"{cpus:>6}{ntasks:>7}{sec:>7}{jobs:>10}{o.events:>11}{o.wall_s:>9.2f}s"
          f"{us_per_job:>9.2f}")
    return us_per_job


if __name__ == "__main__":
    main()
