"""Textbook EDF results, each a real outcome against its bound.

* Liu & Layland: uniprocessor EDF with implicit deadlines meets every deadline
  iff U <= 1 (random seeded task sets, U up to exactly 1; misses once U > 1).
* Dhall & Liu: under global EDF, m light tasks and one heavy task (C = T) miss
  although U is barely above 1 (the heavy one), while P-EDF schedules them.
* Goossens, Funk & Baruah (GFB): U <= m - (m - 1) u_max => no misses under
  G-EDF (random seeded task sets on 2-4 pCPUs), here under mpedf and rtds.

Each task is a one-vCPU domain whose server is the task (budget = WCET,
period = period), so the servers' deadlines are the jobs' deadlines.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from xenlab.numa.topology import uniform
from xenlab.sim.host import Host
from xenlab.sim.schedulers import make
from xenlab.sim.workload import Periodic

US = 1_000
PERIODS_US = (2_000, 4_000, 5_000, 8_000, 10_000, 20_000, 25_000, 40_000)

Task = tuple[int, int]  # (wcet_us, period_us)


def _tasks(rng: random.Random, n: int, total: Fraction) -> list[Task]:
    """``n`` tasks whose utilisations add up to at most ``total`` (UUniFast, floored to us)."""
    us, left = [], float(total)
    for i in range(n - 1, 0, -1):
        nxt = left * rng.random() ** (1 / i)
        us.append(left - nxt)
        left = nxt
    us.append(left)
    out = []
    for u in us:
        p = rng.choice(PERIODS_US)
        out.append((min(p, max(10, math.floor(u * p))), p))
    return out


def _u(tasks: list[Task]) -> Fraction:
    return sum((Fraction(c, p) for c, p in tasks), Fraction(0))


def _run(tasks: list[Task], cpus: int, sched: str, horizon_us: int, *,
         pinned: list[int] | None = None, **opts: object) -> Host:
    h = Host(uniform(cores=cpus), make(sched, **opts), seed=1)
    for i, (c, p) in enumerate(tasks):
        params: dict[str, object] = {"budget": c, "period": p}
        if sched == "rtds":
            params["extratime"] = False
        h.add_domain(f"t{i}", [Periodic(c * US, p * US)], params=params,
                     affinity=frozenset({pinned[i]}) if pinned is not None else None)
    h.run(horizon_us * US)
    h.finish()
    return h


def _hyper(tasks: list[Task]) -> int:
    return math.lcm(*(p for _, p in tasks))


@pytest.mark.parametrize("sched", ["sedf-cbs", "mpedf", "rtds"])
def test_uniprocessor_edf_never_misses_with_u_le_1(sched: str) -> None:
    rng = random.Random(4)
    checked = 0
    for _ in range(40):
        tasks = _tasks(rng, rng.randint(2, 7), Fraction(rng.randint(60, 100), 100))
        assert _u(tasks) <= 1
        horizon = 2 * _hyper(tasks)
        h = _run(tasks, 1, sched, horizon)
        assert sum(v.misses for v in h.vcpus) == 0, tasks
        assert [v.jobs for v in h.vcpus] == [horizon // p for _, p in tasks]
        checked += 1
    # U exactly 1: the bound is tight and still met.
    full = [(1_000, 4_000), (3_000, 8_000), (7_500, 20_000)]
    assert _u(full) == 1
    h = _run(full, 1, sched, 2 * _hyper(full))
    assert sum(v.misses for v in h.vcpus) == 0
    assert h.pcpus[0].idle_ns == 0
    assert checked == 40


def test_uniprocessor_edf_misses_once_u_exceeds_1() -> None:
    rng = random.Random(5)
    for _ in range(20):
        tasks = _tasks(rng, rng.randint(2, 6), Fraction(rng.randint(106, 130), 100))
        assert _u(tasks) > 1
        # Over one hyperperiod the demand U H exceeds H: some job due by H is late.
        h = _run(tasks, 1, "sedf-cbs", _hyper(tasks) + 1)
        assert sum(v.misses for v in h.vcpus) > 0, tasks


@pytest.mark.parametrize("m", [2, 4])
def test_dhall_effect_under_global_edf(m: int) -> None:
    light = [(200, 10_000)] * m  # C tiny, all released at 0 with the heavy task
    heavy = (10_000, 10_000)  # C = T: due at the same time, queued after the light ones
    tasks = [*light, heavy]
    u = _u(tasks)
    assert 1 < u <= Fraction(11, 10)  # "just above 1", on m pCPUs
    g = _run(tasks, m, "mpedf", 100_500, runqueue="global")
    hv = g.vcpus[-1]
    assert hv.jobs == 11
    assert hv.misses == 10  # every heavy job due by now ends late (200 us more each period)
    assert all(v.misses == 0 for v in g.vcpus[:-1])
    # P-EDF: the heavy task alone on pCPU 0, the light ones on the others: no miss.
    pinned = [1 + i % (m - 1) for i in range(m)] + [0]
    p = _run(tasks, m, "mpedf", 100_000, runqueue="cpu", pinned=pinned)
    assert sum(v.misses for v in p.vcpus) == 0


@pytest.mark.parametrize("sched", ["mpedf", "rtds"])
def test_gfb_bound_no_misses_under_global_edf(sched: str) -> None:
    rng = random.Random(6)
    tested = 0
    while tested < 24:
        m = rng.randint(2, 4)
        n = rng.randint(m + 1, 3 * m)
        tasks = _tasks(rng, n, Fraction(rng.randint(50, 100), 100) * m)
        u_max = max(Fraction(c, p) for c, p in tasks)
        if _u(tasks) > m - (m - 1) * u_max:
            continue  # outside the bound: no claim
        h = _run(tasks, m, sched, 2 * _hyper(tasks), runqueue="global") if sched == "mpedf" \
            else _run(tasks, m, sched, 2 * _hyper(tasks))
        assert sum(v.misses for v in h.vcpus) == 0, (m, tasks)
        tested += 1
