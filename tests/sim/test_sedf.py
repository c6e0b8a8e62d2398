"""Legacy sedf: slices per period, extratime, its special cases and its single-pCPU placement."""

from __future__ import annotations

import json

import pytest

from xenlab.errors import SimError
from xenlab.numa.topology import uniform
from xenlab.sim.host import Host
from xenlab.sim.metrics import summarize
from xenlab.sim.model import Vcpu
from xenlab.sim.schedulers import make
from xenlab.sim.workload import FOREVER, Hog, IoBound, Periodic, Workload

MS = 1_000_000


def test_slice_per_period_without_extratime_leaves_the_rest_idle() -> None:
    h = Host(uniform(cores=1), make("sedf"), seed=1)
    h.add_domain("rt", [Hog()], params={"period": 10_000, "slice": 3000, "extratime": False})
    h.run(1000 * MS)
    assert h.vcpus[0].cpu_ns == 300 * MS and h.pcpus[0].idle_ns == 700 * MS


def test_best_effort_domain_runs_only_in_extratime() -> None:
    h = Host(uniform(cores=1), make("sedf"), seed=1)
    h.add_domain("rt", [Hog()], params={"period": 10_000, "slice": 3000, "extratime": False})
    h.add_domain("be", [Hog()])  # Xen's defaults: slice 0, extratime on
    h.run(1000 * MS)
    assert [v.cpu_ns for v in h.vcpus] == [300 * MS, 700 * MS]


def test_extratime_is_shared_by_utilisation() -> None:
    # Slack (60 %) goes round robin weighted by slice/period: 3:1 here.
    h = Host(uniform(cores=1), make("sedf"), seed=1)
    h.add_domain("a", [Hog()], params={"period": 10_000, "slice": 3000})
    h.add_domain("b", [Hog()], params={"period": 10_000, "slice": 1000})
    h.run(1000 * MS)
    assert [v.cpu_ns for v in h.vcpus] == [750 * MS, 250 * MS]


class _RunThenHog:
    """Runs ``run_ns`` from 0, blocks ``block_ns``, then always has work."""

    def __init__(self, run_ns: int, block_ns: int) -> None:
        self.run_ns, self.block_ns, self.blocked = run_ns, block_ns, False

    def start(self, host: Host, v: Vcpu) -> None:
        host.engine.at(0, lambda: host.activate(v, self.run_ns))

    def burst_done(self, host: Host, v: Vcpu) -> int:
        if self.blocked:
            return FOREVER
        self.blocked = True
        host.engine.after(self.block_ns, lambda: host.activate(v, FOREVER))
        return 0

    def finish(self, host: Host, v: Vcpu) -> None:
        """Nothing pending to count."""


def _share(h: Host, name: str, lo: int, hi: int) -> float:
    return sum(min(e, hi) - max(s, lo) for _p, s, e, who in h.segments
               if who == name and e > lo and s < hi) / (hi - lo)


@pytest.mark.parametrize("late", ["joins-late", "wakes-after-long-block"])
def test_a_late_best_effort_vcpu_shares_extratime_at_once(late: str) -> None:
    # Two best-effort hogs (slice 0: extratime only).  b joins at 1 s, or wakes at 1 s after
    # a 0.9 s block (it shared the pCPU for its first 50 ms of work), while a ran alone.
    # Xen's relative scores bring b back at most one stride ahead, so from 1 s on they
    # alternate 500 us quanta; an absolute pass kept over the absence gave b the whole
    # pCPU until it caught up (b 100 %, a 0 % for the next second, or 0.9 s).
    b: Workload = (Hog(offset_ns=1000 * MS) if late == "joins-late"
                   else _RunThenHog(50 * MS, 900 * MS))
    h = Host(uniform(cores=1), make("sedf"), seed=1, trace=(0, 2000 * MS))
    h.add_domain("a", [Hog()], params={"period": 100_000, "slice": 0})
    h.add_domain("b", [b], params={"period": 100_000, "slice": 0})
    h.run(2000 * MS)
    h.finish()
    for lo in range(1000, 2000, 100):
        for name in ("a.0", "b.0"):
            assert abs(_share(h, name, lo * MS, (lo + 100) * MS) - 0.5) <= 0.01


def test_no_multiprocessor_support_all_vcpu0s_share_pcpu0() -> None:
    # The seed's second complaint: without pinning, placement is by vCPU id.
    h = Host(uniform(cores=2), make("sedf"), seed=1)
    h.add_domain("a", [Periodic(6 * MS, 10 * MS)], params={"period": 10_000, "slice": 6000})
    h.add_domain("b", [Periodic(6 * MS, 10 * MS)], params={"period": 10_000, "slice": 6000})
    h.run(500 * MS)
    h.finish()
    assert [v.processor for v in h.vcpus] == [0, 0]
    assert h.pcpus[1].busy_ns == 0
    assert sum(v.misses for v in h.vcpus) > 0  # 1.2 on one pCPU, one idle beside it
    assert all(v.migrations == 0 for v in h.vcpus)
    c = Host(uniform(cores=2), make("mpedf"), seed=1)  # the same guests under mpedf
    c.add_domain("a", [Periodic(6 * MS, 10 * MS)], params={"period": 10_000, "budget": 6000})
    c.add_domain("b", [Periodic(6 * MS, 10 * MS)], params={"period": 10_000, "budget": 6000})
    c.run(500 * MS)
    c.finish()
    assert sum(v.misses for v in c.vcpus) == 0


def test_a_vcpu_that_blocks_within_its_period_is_pushed_to_the_next() -> None:
    # Short-block rule: a periodic guest released inside its server period [b, d)
    # waits for d (the next period begin) even on an otherwise idle pCPU.
    h = Host(uniform(cores=1), make("sedf"), seed=1)
    h.add_domain("rt", [Periodic(2 * MS, 10 * MS)],
                 params={"period": 10_000, "slice": 2000, "extratime": False})
    h.run(100 * MS)
    h.finish()
    rt = h.vcpus[0]
    # The first wake sets the deadline to 0 + slice = 2 ms and is itself a short block:
    # its periods run [2 + 10 k, 12 + 10 k), so every release at 10 k ms waits until
    # 10 k + 2 ms: response 4 ms for a 2 ms job alone on its pCPU.
    assert rt.jobs == 10
    assert set(rt.response_ns) == {4 * MS}
    assert h.pcpus[0].idle_ns > 0


def test_same_seed_same_bytes() -> None:
    def run() -> str:
        h = Host(uniform(cores=2), make("sedf"), seed=4)
        h.add_domain("io", [IoBound(300_000, 1 * MS), IoBound(100_000, 3 * MS)],
                     params={"period": 5000, "slice": 1000})
        h.add_domain("rt", [Periodic(2 * MS, 7 * MS)], params={"period": 7000, "slice": 2000})
        h.add_domain("be", [Hog()])
        h.run(300 * MS)
        h.finish()
        return json.dumps(summarize(h, seed=4).to_json())
    assert run() == run()


@pytest.mark.parametrize(("params", "message"), [
    ({"slice": 20_000, "period": 10_000}, "d: sedf slice 20000 us is above the period"),
    ({"slice": -1}, "d: sedf slice must not be negative"),
    ({"slice": 2, "period": 1000}, "d: sedf slice 2 us is below the minimum of 5 us"),
    ({"period": 0}, "d: sedf period must be positive"),
    ({"period": 20_000_000}, "d: sedf period 20000000 us is outside"),
    ({"slice": 0, "extratime": False}, "d: sedf slice 0 \\(best effort\\) needs extratime"),
    ({"budget": 10}, "d: sedf has no parameter budget"),
])
def test_bad_parameters(params: dict[str, object], message: str) -> None:
    h = Host(uniform(cores=1), make("sedf"))
    with pytest.raises(SimError, match=message):
        h.add_domain("d", [Hog()], params=params)
