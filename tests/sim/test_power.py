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
    # 6 ms every 24 ms from t=0: 50 injections, straight into C6, but for the first:
    # the pCPU was idle from t=0 before the clamp forced it, so that one walks down.
    assert res == {"C0": 900 * MS, "C1": 600 * US, "C6": 299_400 * US}
    assert j == pytest.approx(10 * 0.9 + 3 * 0.0006 + 0.5 * 0.2994)
    assert j < busy_j - 2.8


def test_bad_models_are_refused() -> None:
    with pytest.raises(SimError, match="first C-state must start at after_ns 0"):
        PowerModel(cstates=(CState("C1", 1.0, 5),))
    with pytest.raises(SimError, match="must strictly increase"):
        PowerModel(cstates=(CState("C1", 1.0, 0), CState("C6", 0.1, 0)))
