"""sim.power: C-state residency and energy, checked against hand-computed numbers."""

from __future__ import annotations

import pytest

from xenlab.errors import SimError
from xenlab.numa.topology import uniform
from xenlab.sim.host import Host
from xenlab.sim.power import CState, PowerMeter, PowerModel
from xenlab.sim.powerclamp import PowerClamp
from xenlab.sim.schedulers import make
from xenlab.sim.workload import Hog, Periodic

MS = 1_000_000
US = 1_000


def test_idle_stretches_walk_down_the_cstates() -> None:
    m = PowerModel()
    assert m.split_idle(100 * US) == [100 * US, 0]
    assert m.split_idle(10 * MS) == [600 * US, 9400 * US]
    assert m.split_idle(10 * MS, forced=True) == [0, 10 * MS]
    three = PowerModel(cstates=(CState("C1", 2.0, 0), CState("C3", 1.0, 100 * US),
                                CState("C6", 0.0, 1 * MS)))
    assert three.split_idle(500 * US) == [100 * US, 400 * US, 0]
    assert three.split_idle(3 * MS) == [100 * US, 900 * US, 2 * MS]


def test_periodic_load_energy_by_hand() -> None:
    # One pCPU, a job of 2 ms every 10 ms, for 1 s: 100 jobs, 100 idle stretches of 8 ms.
    h = Host(uniform(cores=1), make("credit"), seed=1)
    h.add_domain("rt", [Periodic(2 * MS, 10 * MS)])
    meter = PowerMeter(h)
    h.run(1000 * MS)
    r = meter.report()
    p = r.pcpus[0]
    # C0: 100 x 2 ms; C1: 100 x 600 us; C6: 100 x 7.4 ms.
    assert p.residency_ns == {"C0": 200 * MS, "C1": 60 * MS, "C6": 740 * MS}
    # 10 W x 0.2 s + 3 W x 0.06 s + 0.5 W x 0.74 s = 2 + 0.18 + 0.37 = 2.55 J.
    assert p.joules == pytest.approx(2.55)
    assert p.avg_w == pytest.approx(2.55)
    assert r.joules == pytest.approx(2.55) and r.duration_ns == 1000 * MS


def test_two_pcpus_busy_and_idle() -> None:
    # pCPU 0 runs a hog the whole second; pCPU 1 never runs anything: 1 idle stretch.
    h = Host(uniform(cores=2), make("null"), seed=1)
    h.add_domain("hog", [Hog()], affinity=frozenset({0}))
    meter = PowerMeter(h)
    h.run(1000 * MS)
    r = meter.report()
    assert r.pcpus[0].residency_ns == {"C0": 1000 * MS, "C1": 0, "C6": 0}
    assert r.pcpus[1].residency_ns == {"C0": 0, "C1": 600 * US, "C6": 999_400 * US}
    assert r.pcpus[0].joules == pytest.approx(10.0)
    assert r.pcpus[1].joules == pytest.approx(3.0 * 0.0006 + 0.5 * 0.9994)
    assert r.avg_w == pytest.approx(10.0 + 0.0018 + 0.4997)
    assert r.to_json()["pcpus"][1]["residency_ns"]["C6"] == 999_400 * US


def test_forced_idle_goes_deep_at_once_and_saves_energy() -> None:
    def run(target: int) -> tuple[float, dict[str, int]]:
        h = Host(uniform(cores=1), make("credit"), seed=1)
        h.add_domain("hog", [Hog()])
        meter = PowerMeter(h)
        if target:
            PowerClamp(h).cur_state = target
        h.run(1200 * MS)
        r = meter.report()
        return r.joules, r.pcpus[0].residency_ns

    busy_j, _ = run(0)
    assert busy_j == pytest.approx(12.0)
    j, res = run(25)
    # 6 ms every 24 ms from t=0: 50 injections, each straight into C6 (the first one too:
    # the clamp forces the pCPU idle at t=0 before the hog is put on).
    assert res == {"C0": 900 * MS, "C1": 0, "C6": 300 * MS}
    assert j == pytest.approx(10 * 0.9 + 0.5 * 0.3)
    assert j < busy_j - 2.8


def test_forced_stretches_by_hand() -> None:
    # One pCPU, a 4 ms job every 20 ms, 40 ms; forced idle set by hand:
    # * at 4 ms, as the job ends, until 10 ms: a busy pCPU goes into forced idle, which
    #   runs on into natural idle up to the next injection;
    # * at 14 ms, on the idle pCPU, until 18 ms: natural idle, then forced, then natural.
    h = Host(uniform(cores=1), make("null"), seed=1)
    h.add_domain("rt", [Periodic(4 * MS, 20 * MS)])
    meter = PowerMeter(h)
    h.run(4 * MS)  # the job's end at 4 ms has not been handled yet
    h.inject(0, 10 * MS)
    h.run(10 * MS)
    h.inject(0, 18 * MS)
    h.run(26 * MS)
    # C0 [0,4) [20,24); forced [4,10) 6 ms and [14,18) 4 ms, all C6;
    # natural [10,14) 0.6 + 3.4, [18,20) 0.6 + 1.4, [24,40) 0.6 + 15.4 ms.
    res = meter.report().pcpus[0].residency_ns
    assert res == {"C0": 8 * MS, "C1": 1800 * US, "C6": 30_200 * US}
    # 10 W x 8 ms + 3 W x 1.8 ms + 0.5 W x 30.2 ms = 0.08 + 0.0054 + 0.0151 J.
    assert meter.report().joules == pytest.approx(0.1005)
    assert h.pcpus[0].injected_ns == 10 * MS


def test_clamped_idle_pcpu_by_hand() -> None:
    # Nothing runs for 300 ms; the clamp (25 %) forces [0,6) and [24,30), then skips
    # (tests/sim/test_powerclamp.py): 12 ms of C6, natural [6,24) and [30,300) walk down.
    h = Host(uniform(cores=1), make("credit"), seed=1)
    h.add_domain("quiet", [Periodic(1 * MS, 10_000 * MS, offset_ns=999 * MS)])
    meter = PowerMeter(h)
    PowerClamp(h).cur_state = 25
    h.run(300 * MS)
    r = meter.report()
    # C6: 12 + 17.4 + 269.4 ms; C1: 2 x 0.6 ms.
    assert r.pcpus[0].residency_ns == {"C0": 0, "C1": 1200 * US, "C6": 298_800 * US}
    assert r.joules == pytest.approx(3 * 0.0012 + 0.5 * 0.2988)


def test_an_injection_stopped_early_ends_the_forced_stretch() -> None:
    # Idle pCPU forced from 0 to 50 ms, stopped at 10 ms; a 1 ms job at 10.3 ms.
    # Forced [0,10) C6; natural [10,10.3) C1; C0 [10.3,11.3); natural [11.3,100): 0.6 + 88.1.
    h = Host(uniform(cores=1), make("null"), seed=1)
    h.add_domain("once", [Periodic(1 * MS, 10_000 * MS, offset_ns=10_300 * US)])
    meter = PowerMeter(h)
    h.inject(0, 50 * MS)
    h.run(10 * MS)
    h.inject(0, 0)
    h.run(90 * MS)
    assert meter.report().pcpus[0].residency_ns == {"C0": 1 * MS, "C1": 900 * US,
                                                    "C6": 98_100 * US}
    assert h.pcpus[0].injected_ns == 10 * MS


def test_bad_models_are_refused() -> None:
    with pytest.raises(SimError, match="first C-state must start at after_ns 0"):
        PowerModel(cstates=(CState("C1", 1.0, 5),))
    with pytest.raises(SimError, match="must strictly increase"):
        PowerModel(cstates=(CState("C1", 1.0, 0), CState("C6", 0.1, 0)))
