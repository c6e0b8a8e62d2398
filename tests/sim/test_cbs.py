"""sedf-cbs: CBS temporal isolation (Abeni & Buttazzo 1998), against legacy SEDF's special cases."""

from __future__ import annotations

import pytest

from xenlab.errors import SimError
from xenlab.numa.topology import uniform
from xenlab.sim.host import Host
from xenlab.sim.model import Vcpu
from xenlab.sim.schedulers import make
from xenlab.sim.schedulers._edf import CbsServer
from xenlab.sim.workload import Hog, Periodic, Workload

MS = 1_000_000
US = 1_000
T_MS = 10  # the victim's reservation: Q = 2 ms every T = 10 ms
Q_MS = 2


def _neighbour(kind: str) -> Workload:
    # A misbehaving neighbour with reservation 7 ms / 10 ms: a hog, or a periodic guest
    # that asks for 9.5 ms every 10 ms (overruns its budget by 2.5 ms each period).
    return Hog() if kind == "hog" else Periodic(9_500_000, 10 * MS)


def _isolation(sched: str, neighbour: str, *, victim: Workload, cpus: int = 1,
               hard: bool = False, **opts: object) -> Host:
    """``cpus`` victims with reservation (2 ms, 10 ms) beside misbehaving neighbours (7, 10)."""
    h = Host(uniform(cores=cpus), make(sched, **opts), seed=3, trace=(0, 1000 * MS))
    key = "slice" if sched == "sedf" else "budget"
    rt: dict[str, object] = {"period": T_MS * 1000, key: Q_MS * 1000}
    nb: dict[str, object] = {"period": 10_000, key: 7_000}
    if sched != "sedf":
        rt["hard"] = nb["hard"] = hard
    for i in range(cpus):
        h.add_domain(f"rt{i}", [victim], params=rt)
        h.add_domain(f"nb{i}", [_neighbour(neighbour)], params=nb)
    h.run(1000 * MS)
    h.finish()
    return h


def _per_window(h: Host, name: str, period_ns: int) -> list[int]:
    """CPU time ``name`` got in each window [k T, (k + 1) T) of the run."""
    out = [0] * (h.end_ns // period_ns)
    for _p, start, end, who in h.segments:
        if who != name:
            continue
        t = start
        while t < end:
            k = t // period_ns
            stop = min(end, (k + 1) * period_ns)
            out[k] += stop - t
            t = stop
    return out


CASES = [("sedf-cbs", {}, 1), ("mpedf", {}, 1), ("mpedf", {"runqueue": "global"}, 2),
         ("mpedf", {"runqueue": "cpu"}, 2)]


@pytest.mark.parametrize(("sched", "opts", "cpus"), CASES)
@pytest.mark.parametrize("neighbour", ["hog", "overrun"])
@pytest.mark.parametrize("hard", [False, True])
def test_a_reservation_gets_q_every_t_whatever_the_neighbour_does(
        sched: str, opts: dict[str, object], cpus: int, neighbour: str, hard: bool) -> None:
    # The victim always has work (a hog inside its reservation): CBS gives it Q by
    # every server deadline, k T, whatever the neighbour asks for.  On 2 pCPUs under
    # G-EDF the servers meet the GFB bound (1.8 <= 2 - 0.7), so the guarantee holds too.
    h = _isolation(sched, neighbour, victim=Hog(), cpus=cpus, hard=hard, **opts)
    for i in range(cpus):
        windows = _per_window(h, f"rt{i}.0", T_MS * MS)
        assert min(windows) >= Q_MS * MS
        nb = _per_window(h, f"nb{i}.0", T_MS * MS)
        if hard:  # a hard reservation never gives the neighbour more than its 7 ms
            assert max(nb) <= 7 * MS
    if hard:
        assert all(min(_per_window(h, f"rt{i}.0", T_MS * MS)) == Q_MS * MS
                   for i in range(cpus))


@pytest.mark.parametrize("offset_ms", [0, 3, 5, 8])
@pytest.mark.parametrize("neighbour", ["hog", "overrun"])
def test_cbs_task_with_c_le_q_and_t_ge_period_never_misses(offset_ms: int,
                                                           neighbour: str) -> None:
    # Abeni & Buttazzo's guarantee: a job of C <= Q every T >= T_s, served by CBS(Q, T_s),
    # meets its deadline when the reservations add up to at most 1 (here 0.9).
    victim = Periodic(Q_MS * MS, T_MS * MS, offset_ns=offset_ms * MS)
    h = _isolation("sedf-cbs", neighbour, victim=victim)
    rt = h.vcpus[0]
    assert rt.jobs == 100 and rt.misses == 0
    assert max(rt.response_ns) <= T_MS * MS


@pytest.mark.parametrize("neighbour", ["hog", "overrun"])
def test_legacy_sedf_misses_with_the_same_reservations(neighbour: str) -> None:
    # The same guest under legacy SEDF: its first wake at 5 ms sets the deadline to
    # 5 + slice (the initial special case), so its periods run [7, 17) while its jobs
    # are due at 15: every wake is a "short block", pushed to the next period begin,
    # where the neighbour's equal deadline goes first.
    victim = Periodic(Q_MS * MS, T_MS * MS, offset_ns=5 * MS)
    h = _isolation("sedf", neighbour, victim=victim)
    rt = h.vcpus[0]
    assert rt.jobs == 100
    assert rt.misses >= 30


def test_no_migrations_and_first_fit_placement() -> None:
    h = Host(uniform(cores=2), make("sedf-cbs"), seed=1)
    for i, (b, p) in enumerate([(6, 10), (3, 10), (5, 10), (1, 10)]):
        h.add_domain(f"d{i}", [Periodic(b * MS, p * MS)], params={"period": p * 1000,
                                                                 "budget": b * 1000})
    assert [v.processor for v in h.vcpus] == [0, 0, 1, 0]  # 0.6+0.3 fit, 0.5 does not
    h.run(500 * MS)
    h.finish()
    assert all(v.migrations == 0 and v.misses == 0 for v in h.vcpus)
    assert sum(v.jobs for v in h.vcpus) == 200


def test_pinned_vcpus_stay_on_their_pcpu() -> None:
    h = Host(uniform(cores=2), make("sedf-cbs"), seed=1)
    h.add_domain("a", [Hog()], params={"budget": 1000, "period": 10_000},
                 affinity=frozenset({1}))
    h.add_domain("b", [Hog()], params={"budget": 1000, "period": 10_000},
                 affinity=frozenset({1}))
    h.run(100 * MS)
    assert [p.busy_ns for p in h.pcpus] == [0, 100 * MS]
    a, b = h.vcpus
    assert a.cpu_ns == b.cpu_ns == 50 * MS  # equal budgets: EDF alternates server jobs


@pytest.mark.parametrize(("params", "message"), [
    ({"budget": 20_000, "period": 10_000}, "d: sedf-cbs budget 20000 us is above the period"),
    ({"budget": -5}, "d: sedf-cbs budget must not be negative"),
    ({"period": 0}, "d: sedf-cbs period must be positive"),
    ({"period": 5}, "d: sedf-cbs period 5 us is outside"),
    ({"budget": 2.5}, "d: sedf-cbs budget must be an integer"),
    ({"hard": "yes"}, "d: sedf-cbs hard must be a boolean"),
    ({"slice": 10}, "d: sedf-cbs has no parameter slice"),
])
def test_bad_parameters_name_domain_and_key(params: dict[str, object], message: str) -> None:
    h = Host(uniform(cores=1), make("sedf-cbs"))
    with pytest.raises(SimError, match=message):
        h.add_domain("d", [Hog()], params=params)


class _RunSleep:
    """Runs ``run_ns``, sleeps ``sleep_ns``, again and again from time 0."""

    def __init__(self, run_ns: int, sleep_ns: int) -> None:
        self.run_ns, self.sleep_ns = run_ns, sleep_ns

    def start(self, host: Host, v: Vcpu) -> None:
        host.engine.at(0, lambda: host.activate(v, self.run_ns))

    def burst_done(self, host: Host, v: Vcpu) -> int:
        host.engine.after(self.sleep_ns, lambda: host.activate(v, self.run_ns))
        return 0

    def finish(self, host: Host, v: Vcpu) -> None:
        """Nothing pending to count."""


def test_the_wake_rule_stops_a_frequent_waker_from_renewing_its_deadline() -> None:
    # The neighbour (1 ms every 2 ms) runs 0.9 ms and sleeps 10 us, over and over.  At each
    # wake its budget left is small against (d - t) Q / T, so CBS keeps its (c, d): it stays
    # within 1/2 of the pCPU and the victim (5 ms every 10 ms, utilisation 0.5) never misses.
    # Were every wake a fresh server job (d = t + T), the neighbour would run ahead of the
    # victim's deadline each time and the victim would miss almost every job (99 of 100).
    h = Host(uniform(cores=1), make("sedf-cbs"), seed=1)
    h.add_domain("victim", [Periodic(5 * MS, 10 * MS)],
                 params={"budget": 5000, "period": 10_000})
    h.add_domain("nb", [_RunSleep(900 * US, 10 * US)], params={"budget": 1000, "period": 2000})
    h.run(1000 * MS)
    h.finish()
    victim, nb = h.vcpus
    assert victim.jobs == 100 and victim.misses == 0
    assert max(victim.response_ns) <= 10 * MS
    assert nb.cpu_ns <= 500 * MS + 1 * MS  # its reservation, give or take the last period


@pytest.mark.parametrize(("left_us", "deadline_us", "now_us", "expect"), [
    # keep: c T = 300 * 10000 < (d - t) Q = 8000 * 1000
    (300, 10_000, 2_000, (300, 10_000)),
    # reset although d is still ahead: c T = 900 * 10000 >= (d - t) Q = 8000 * 1000
    (900, 10_000, 2_000, (1000, 12_000)),
    # the boundary: c T == (d - t) Q resets
    (800, 10_000, 2_000, (1000, 12_000)),
    # reset because the deadline passed (even with no budget left)
    (0, 10_000, 10_500, (1000, 20_500)),
])
def test_cbs_wake_rule(left_us: int, deadline_us: int, now_us: int,
                       expect: tuple[int, int]) -> None:
    s = CbsServer(budget_ns=1000 * US, period_ns=10_000 * US, hard=False, index=0,
                  deadline=deadline_us * US, left=left_us * US)
    s.wake(now_us * US)
    assert (s.left, s.deadline) == (expect[0] * US, expect[1] * US)
    assert s.ready_since == now_us * US
