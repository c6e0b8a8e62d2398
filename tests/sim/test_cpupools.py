"""Cpupools: pools of pCPUs with their own schedulers, domains kept inside their pool."""

from __future__ import annotations

from pathlib import Path

import pytest

from xenlab.errors import SimError
from xenlab.numa.topology import uniform
from xenlab.sim.host import Host
from xenlab.sim.metrics import summarize
from xenlab.sim.model import Pcpu, Vcpu
from xenlab.sim.scenario import ScenarioError, build_host, load_scenario
from xenlab.sim.schedulers import make
from xenlab.sim.workload import Hog, Periodic

MS = 1_000_000


class _Where:
    """Every (pCPU, vCPU) pair the host ever put together."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, str]] = set()

    def on_switch(self, p: Pcpu, prev: Vcpu | None, nxt: Vcpu | None, now: int) -> None:
        if nxt is not None:
            self.seen.add((p.id, nxt.dom.name))


@pytest.mark.parametrize("pool0", ["credit", "null", "mpedf", "rtds", "sedf-cbs"])
def test_domains_stay_in_their_pool(pool0: str) -> None:
    h = Host(uniform(cores=4), make(pool0), seed=3,
             pools=[("rt", make("rtds"), [2, 3])])
    where = _Where()
    h.observers.append(where)
    params = {"budget": 5000, "period": 10000} if pool0 in ("rtds", "mpedf", "sedf-cbs") else {}
    h.add_domain("batch", [Hog(), Hog(), Hog(), Hog()], params=params)
    h.add_domain("rt", [Periodic(2 * MS, 10 * MS)] * 2, pool="rt",
                 params={"budget": 3000, "period": 10000})
    h.run(500 * MS)
    h.finish()
    m = summarize(h)
    assert {c for c, d in where.seen if d == "batch"} <= {0, 1}
    assert {c for c, d in where.seen if d == "rt"} <= {2, 3}
    assert sum(v.misses for v in m.vcpus if v.domain == "rt") == 0
    # Pool-0's two pCPUs are all the batch guest gets, whatever it asks for.
    batch = sum(v.cpu_ns for v in m.vcpus if v.domain == "batch")
    assert batch <= 2 * 500 * MS
    assert [p.name for p in h.pools] == ["Pool-0", "rt"]
    assert h.pools[0].cpus == (0, 1) and h.pools[1].cpus == (2, 3)


def test_each_scheduler_sees_only_its_pcpus() -> None:
    credit = make("credit")
    h = Host(uniform(cores=4), credit, pools=[("rt", make("rtds"), [3])])
    h.add_domain("d", [Hog()])
    dump = credit.dump()
    assert [p["id"] for p in dump["pcpus"]] == [0, 1, 2]


def test_bad_pools_and_placements_are_refused() -> None:
    topo = uniform(cores=4)
    with pytest.raises(SimError, match="cpupool b: pCPUs \\[1\\] are in cpupool a"):
        Host(topo, make("null"), pools=[("a", make("null"), [0, 1]), ("b", make("null"), [1])])
    with pytest.raises(SimError, match="Pool-0 would have no pCPU left"):
        Host(topo, make("null"), pools=[("a", make("null"), [0, 1, 2, 3])])
    with pytest.raises(SimError, match="pCPUs \\[7\\] are not on this host"):
        Host(topo, make("null"), pools=[("a", make("null"), [7])])
    shared = make("null")
    with pytest.raises(SimError, match="its own scheduler instance"):
        Host(topo, shared, pools=[("a", shared, [3])])
    h = Host(topo, make("null"), pools=[("a", make("null"), [3])])
    with pytest.raises(SimError, match="affinity names pCPUs \\[0\\] outside cpupool a"):
        h.add_domain("d", [Hog()], pool="a", affinity=frozenset({0, 3}))
    with pytest.raises(SimError, match="no cpupool 'nope'"):
        h.add_domain("d", [Hog()], pool="nope")


SCENARIO = """\
[sim]
duration_ms = 200
scheduler = "credit"
[host]
pcpus = 4
[[pool]]
name = "rt"
scheduler = "rtds"
cpus = "2-3"
[[domain]]
name = "rt"
pool = "rt"
{extra}
workload = {{ kind = "periodic", run_us = 2000, period_us = 10000 }}
[domain.sched.rtds]
period = 10000
budget = {budget}
"""


def test_scenarios_with_pools(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text(SCENARIO.format(budget=3000, extra=""))
    sc = load_scenario(f)
    assert [(p.name, p.choice.kind, sorted(p.cpus)) for p in sc.pools] == [("rt", "rtds", [2, 3])]
    # --sched changes Pool-0 only; the rt pool keeps rtds.
    h = build_host(sc, "null")
    assert h.pools[0].sched.name == "null" and h.pools[1].sched.name == "rtds"
    h.run(sc.duration_ns)
    h.finish()
    assert summarize(h).vcpu("rt.0").misses == 0
    cases = [
        (SCENARIO.format(budget=30000, extra=""), "domain.rt.sched.rtds.budget"),
        (SCENARIO.format(budget=3000, extra='affinity = "0"'), "domain.rt.affinity: pCPUs [0]"),
        (SCENARIO.format(budget=3000, extra="").replace('pool = "rt"', 'pool = "x"'),
         "domain.rt.pool: no cpupool 'x'"),
        (SCENARIO.format(budget=3000, extra="").replace('cpus = "2-3"', 'cpus = "0-3"'),
         "pool: the pools take every pCPU"),
        (SCENARIO.format(budget=3000, extra="").replace('scheduler = "rtds"',
                                                        'scheduler = "nope"'),
         "pool.rt.scheduler: unknown scheduler 'nope'"),
    ]
    for text, want in cases:
        f.write_text(text)
        with pytest.raises(ScenarioError) as err:
            load_scenario(f)
        assert f"{f}: " in str(err.value) or str(f) in str(err.value)
        assert want in str(err.value), str(err.value)
