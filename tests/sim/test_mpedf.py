"""mpedf: run queues per set of pCPUs, push/pull balancing, migrations, determinism."""

from __future__ import annotations

import json
import random
from typing import cast

import pytest

from xenlab.errors import SimError
from xenlab.numa.topology import uniform
from xenlab.sim.host import Host
from xenlab.sim.metrics import summarize
from xenlab.sim.schedulers import make
from xenlab.sim.schedulers.mpedf import MpEdf
from xenlab.sim.schedulers.rtds import Rtds
from xenlab.sim.workload import Hog, IoBound, Periodic

MS = 1_000_000


def _mixed(seed: int, **opts: object) -> Host:
    h = Host(uniform(sockets=2, cores=2), make("mpedf", **opts), seed=seed)
    for i in range(6):
        h.add_domain(f"rt{i}", [Periodic((1 + i) * MS, 10 * MS)],
                     params={"budget": (1 + i) * 1000, "period": 10_000})
    h.add_domain("io", [IoBound(300_000, 2 * MS)], params={"budget": 1000, "period": 5000})
    h.add_domain("hog", [Hog()], params={"budget": 2000, "period": 10_000})
    h.run(500 * MS)
    h.finish()
    return h


def test_migrations_happen_under_global_and_never_per_cpu() -> None:
    g = _mixed(1, runqueue="global")
    assert sum(v.migrations for v in g.vcpus) > 50
    assert sum(v.misses for v in g.vcpus) == 0  # U = 2.5 on 4 pCPUs, within GFB
    c = _mixed(1, runqueue="cpu")
    assert all(v.migrations == 0 for v in c.vcpus)
    assert isinstance(c.sched, MpEdf) and c.sched.migrations == 0


def test_balancing_spreads_vcpus_over_run_queues() -> None:
    # Four hogs reserving 0.4 each fit socket 0's first-fit budget (1.6 <= 2 pCPUs);
    # without balancing they share its 2 pCPUs, with pull-on-idle socket 1 takes two.
    def run(balance: bool) -> Host:
        h = Host(uniform(sockets=2, cores=2), make("mpedf", runqueue="socket",
                                                    balance=balance), seed=1)
        for i in range(4):
            h.add_domain(f"h{i}", [Hog()], params={"budget": 4000, "period": 10_000})
        assert {v.processor for v in h.vcpus} <= {0, 1}
        h.run(200 * MS)
        return h

    alone = run(False)
    assert [p.busy_ns for p in alone.pcpus] == [200 * MS, 200 * MS, 0, 0]
    spread = run(True)
    assert all(p.busy_ns >= 190 * MS for p in spread.pcpus)
    assert isinstance(spread.sched, MpEdf) and spread.sched.migrations >= 2
    assert all(v.cpu_ns >= 190 * MS for v in spread.vcpus)


def test_push_on_wake_to_a_run_queue_with_an_idle_pcpu() -> None:
    h = Host(uniform(cores=2), make("mpedf", runqueue="cpu", balance=True), seed=1)
    h.add_domain("a", [Periodic(3 * MS, 10 * MS)], params={"budget": 3000, "period": 10_000})
    h.add_domain("b", [Periodic(3 * MS, 10 * MS)], params={"budget": 3000, "period": 10_000})
    assert [v.processor for v in h.vcpus] == [0, 0]  # first fit
    h.run(100 * MS)
    h.finish()
    # Both released at 0: the second wake finds pCPU 0 taken and pCPU 1 idle.
    assert [v.misses for v in h.vcpus] == [0, 0]
    assert max(h.vcpus[1].response_ns) == 3 * MS
    assert h.pcpus[1].busy_ns == 30 * MS


def test_same_seed_same_bytes_and_seeds_differ() -> None:
    a = json.dumps(summarize(_mixed(7, runqueue="llc")).to_json())
    b = json.dumps(summarize(_mixed(7, runqueue="llc")).to_json())
    c = json.dumps(summarize(_mixed(8, runqueue="llc")).to_json())
    assert a == b and a != c


def test_dump_shows_run_queues() -> None:
    h = Host(uniform(sockets=2, cores=2), make("mpedf", runqueue="socket"), seed=1)
    h.add_domain("d", [Hog(), Hog()], params={"budget": 1000, "period": 2000})
    d = h.sched.dump()
    assert d["runqueue"] == "socket" and [r["cpus"] for r in d["runqueues"]] == [[0, 1], [2, 3]]


@pytest.mark.parametrize(("params", "message"), [
    ({"budget": 20_000, "period": 10_000}, "d: mpedf budget 20000 us is above the period"),
    ({"budget": -1, "period": 10_000}, "d: mpedf budget must not be negative"),
    ({"period": 0}, "d: mpedf period must be positive"),
    ({"period": -10}, "d: mpedf period must be positive"),
])
def test_bad_parameters(params: dict[str, object], message: str) -> None:
    h = Host(uniform(cores=2), make("mpedf"))
    with pytest.raises(SimError, match=message):
        h.add_domain("d", [Hog()], params=params)


def test_bad_runqueue_option() -> None:
    with pytest.raises(SimError, match="mpedf: runqueue 'rack' is not one of cpu, core"):
        make("mpedf", runqueue="rack")


@pytest.mark.parametrize("sched", ["mpedf", "rtds"])
def test_global_edf_invariant_holds_at_every_instant(sched: str) -> None:
    # G-EDF: once every event of an instant ran, no queued vCPU has an earlier deadline
    # than a running one, and no pCPU idles while a vCPU waits.
    rng = random.Random(11)
    h = Host(uniform(cores=3), make(sched), seed=2)
    for i in range(7):
        p = rng.choice([10_007, 17_443, 21_067, 27_689, 32_999])
        c = rng.randint(p // 4, p // 2)
        params: dict[str, object] = {"budget": c, "period": p}
        if sched == "rtds":
            params["extratime"] = False
        h.add_domain(f"t{i}", [Periodic(c * 1000, p * 1000)], params=params)
    h.started = True
    for v in h.vcpus:
        v.workload.start(h, v)
    e = h.engine
    sched_ = h.sched
    queued = sched_.rqs[0].queue if isinstance(sched_, MpEdf) else cast(Rtds, sched_).runq
    checked = 0
    while e.now < 300 * MS and e.step():
        if e.peek() == e.now or not queued.items:
            continue
        running = [p.curr.priv.deadline for p in h.pcpus if p.curr is not None]
        assert len(running) == 3, e.now
        assert max(running) <= queued.items[0][1], e.now
        checked += 1
    assert checked > 100


@pytest.mark.parametrize("runqueue", ["global", "socket"])
def test_kept_idle_and_deadline_lists_decide_like_the_scan(
        runqueue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Large pools keep sorted idle/busy lists instead of scanning every pCPU on a
    # wake: the runs must be the same, decision for decision.
    from xenlab.sim import schedulers
    from xenlab.sim.schedulers import mpedf
    from xenlab.sim.workload import Hog, Periodic

    def run() -> str:
        rng = random.Random(5)
        h = Host(uniform(sockets=2, cores=16), schedulers.make("mpedf", runqueue=runqueue),
                 seed=5)
        for i in range(70):  # about 38 pCPUs of load on 32: every path is taken
            period = rng.choice([5, 7, 10, 14, 20]) * 1000
            run_us = rng.randint(500, period * 9 // 10)
            h.add_domain(f"t{i}", [Periodic(run_us * 1000, period * 1000)],
                         params={"budget": run_us, "period": period})
        h.add_domain("hog", [Hog()], params={"budget": 5000, "period": 10000})
        h.run(300_000_000)
        h.finish()
        return json.dumps(summarize(h).to_json())

    calls = {"busy": 0}
    latest = mpedf.MpEdf._latest_running

    def counted(self: mpedf.MpEdf, *args: object) -> object:
        found = latest(self, *args)  # type: ignore[arg-type]
        calls["busy"] += found is not None
        return found

    monkeypatch.setattr(mpedf.MpEdf, "_latest_running", counted)
    tracked = run()
    assert calls["busy"] > 100  # the kept deadline list decided many wakes
    monkeypatch.setattr(mpedf, "_TRACK_MIN_CPUS", 10**9)
    assert run() == tracked
