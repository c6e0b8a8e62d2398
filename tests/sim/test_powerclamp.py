"""sim.powerclamp: idle held at the target on busy hosts, never a vCPU in forced idle."""

from __future__ import annotations

import pytest

from xenlab.errors import SimError
from xenlab.numa.topology import uniform
from xenlab.sim.host import Host
from xenlab.sim.model import Pcpu, Vcpu
from xenlab.sim.powerclamp import MAX_STATE, PowerClamp, idle_ns_now
from xenlab.sim.schedulers import SCHEDULERS, make
from xenlab.sim.workload import Hog, IoBound, Periodic

MS = 1_000_000
S = 1000 * MS


def _idle_pct_after_warmup(h: Host, warm_ns: int, run_ns: int) -> list[float]:
    h.run(warm_ns)
    start = [idle_ns_now(p, h.engine.now) for p in h.pcpus]
    h.run(run_ns)
    return [100 * (p.idle_ns - s) / run_ns for p, s in zip(h.pcpus, start, strict=True)]


@pytest.mark.parametrize("sched", ["credit", "null"])
@pytest.mark.parametrize("target", [10, 25, 40])
def test_busy_host_idles_at_the_target(sched: str, target: int) -> None:
    h = Host(uniform(cores=2), make(sched), seed=2)
    for i in range(3):
        h.add_domain(f"hog{i}", [Hog()])
    clamp = PowerClamp(h)
    clamp.cur_state = target
    idle = _idle_pct_after_warmup(h, 1 * S, 3 * S)
    for pct in idle:
        assert abs(pct - target) <= 2.0, idle
    assert clamp.cur_state == target
    assert abs(clamp.measured_pct - target) <= 2.0
    assert all(p.injected_ns > 0 for p in h.pcpus)


def test_partly_loaded_host_counts_natural_idle() -> None:
    # I/O-bound vCPUs idle about 17 % of the time on their own: the clamp injects only the rest.
    h = Host(uniform(cores=2), make("credit"), seed=2)
    for i in range(2):
        h.add_domain(f"io{i}", [IoBound(5 * MS, 1 * MS)])
    clamp = PowerClamp(h)
    clamp.cur_state = 25
    h.run(1 * S)
    inj0 = [p.injected_ns for p in h.pcpus]
    idle = _idle_pct_after_warmup(h, 1, 5 * S)
    for pct in idle:
        assert abs(pct - 25) <= 2.0, idle
    for p, i0 in zip(h.pcpus, inj0, strict=True):
        assert 0.05 * 5 * S < p.injected_ns - i0 < 0.15 * 5 * S  # about 25 - 17 + overlap


def test_idle_host_is_not_clamped_further() -> None:
    h = Host(uniform(cores=2), make("credit"), seed=2)
    h.add_domain("light", [Periodic(3 * MS, 20 * MS)])  # 15 % of one pCPU
    clamp = PowerClamp(h)
    clamp.cur_state = 40
    h.run(1 * S)
    inj0 = [p.injected_ns for p in h.pcpus]
    h.run(4 * S)
    for p, i0 in zip(h.pcpus, inj0, strict=True):
        assert p.injected_ns == i0  # already above target + guard: nothing injected
    assert h.vcpus[0].cpu_ns == pytest.approx(0.15 * 5 * S, rel=0.01)  # work unharmed
    assert h.vcpus[0].misses == 0


class _Spy:
    """Host observer: a vCPU put on a pCPU inside a forced-idle stretch is a failure."""

    def __init__(self) -> None:
        self.bad: list[tuple[int, int, str]] = []
        self.forced_switches = 0

    def on_switch(self, p: Pcpu, prev: Vcpu | None, nxt: Vcpu | None, now: int) -> None:
        if p.inject_until > now:
            if nxt is not None:
                self.bad.append((now, p.id, nxt.name))
            else:
                self.forced_switches += 1


@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
def test_no_vcpu_runs_during_injection(sched: str) -> None:
    """Every registered scheduler honours idle_forced (the host also raises if not)."""
    h = Host(uniform(cores=2), make(sched), seed=4)
    for i in range(2):
        h.add_domain(f"hog{i}", [Hog()])
    h.add_domain("io", [IoBound(1 * MS, 1 * MS)])
    spy = _Spy()
    h.observers.append(spy)
    clamp = PowerClamp(h, duration_ms=10, window_size=3)
    clamp.cur_state = 30
    h.run(2 * S)
    assert spy.bad == []
    # Some schedulers leave these hogs idle part of the time (budgets), and the clamp then
    # injects less: what matters is that it did force idle, and that nothing ran in it.
    assert spy.forced_switches > 0
    assert all(p.injected_ns > 0 for p in h.pcpus)


def test_cooling_device_interface() -> None:
    h = Host(uniform(cores=2), make("credit"), seed=1)
    h.add_domain("hog", [Hog(), Hog()])
    clamp = PowerClamp(h)
    assert (clamp.type, clamp.max_state, clamp.cur_state) == ("intel_powerclamp", MAX_STATE, -1)
    clamp.cur_state = 80  # clamped to max_state - 1, as Linux
    assert clamp.cur_state == 49
    h.run(1 * S)
    clamp.cur_state = 20  # adjusted while running
    h.run(1 * S)
    assert clamp.history[-1].target_pct == 20
    clamp.cur_state = 0
    assert clamp.cur_state == -1
    assert all(p.inject_until <= h.engine.now for p in h.pcpus)
    injected = [p.injected_ns for p in h.pcpus]
    h.run(1 * S)
    assert [p.injected_ns for p in h.pcpus] == injected  # off means off
    clamp.cur_state = -1
    assert clamp.cur_state == -1
    with pytest.raises(SimError, match=r"duration_ms must be an integer in 6\.\.25"):
        PowerClamp(h, duration_ms=2)
    with pytest.raises(SimError, match=r"cpus \[7\] are not pCPUs of this host \(0-1\)"):
        PowerClamp(h, cpus=[0, 7])


def test_injected_ns_counts_only_the_forced_stretches() -> None:
    # One pCPU, a guest that does nothing for 300 ms; 25 % = 6 ms every 24 ms from t=0.
    # Injections at 0 and 24 ms; the window that closes at 48 ms measures 100 % idle with
    # the ratio at its floor, so the clamp skips (the next cycle, 600 ms on, is past the end).
    # Forced: [0, 6) and [24, 30) = 12 ms; the natural idle around them is not injected.
    h = Host(uniform(cores=1), make("credit"), seed=1)
    h.add_domain("quiet", [Periodic(1 * MS, 10_000 * MS, offset_ns=999 * MS)])
    clamp = PowerClamp(h)
    clamp.cur_state = 25
    h.run(300 * MS)
    p = h.pcpus[0]
    assert [(s.time_ns, s.idle_pm, s.skipped) for s in clamp.history] == [(48 * MS, 1000, True)]
    assert p.injected_ns == 12 * MS
    assert p.idle_ns == 300 * MS


def test_injected_ns_on_a_loaded_pcpu() -> None:
    # A 1 ms job every 10 ms (from 3 ms) beside the same clamp: the injections at 0 and
    # 24 ms are 6 ms each whatever ran before them.
    h = Host(uniform(cores=1), make("credit"), seed=1)
    h.add_domain("light", [Periodic(1 * MS, 10 * MS, offset_ns=3 * MS)])
    clamp = PowerClamp(h)
    clamp.cur_state = 25
    h.run(47 * MS)
    assert h.pcpus[0].injected_ns == 12 * MS
