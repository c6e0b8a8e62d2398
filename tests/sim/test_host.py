"""sim.host with the null scheduler: dispatch, accounting, workloads, the host's checks."""

from __future__ import annotations

import json

import pytest

from xenlab.errors import SimError
from xenlab.numa.topology import uniform
from xenlab.sim.host import Host
from xenlab.sim.metrics import summarize
from xenlab.sim.model import Pcpu
from xenlab.sim.schedulers import make
from xenlab.sim.schedulers.base import Decision
from xenlab.sim.schedulers.null import Null
from xenlab.sim.workload import CyclicProbe, Hog, Periodic

MS = 1_000_000


def _run(pcpus: int, seed: int = 1) -> Host:
    h = Host(uniform(cores=pcpus), make("null"), seed=seed)
    h.add_domain("rt", [Periodic(2 * MS, 10 * MS)])
    h.add_domain("hog", [Hog()])
    h.add_domain("probe", [CyclicProbe(1 * MS, run_ns=5_000)])
    h.run(1000 * MS)
    h.finish()
    return h


def test_time_is_conserved_and_jobs_counted() -> None:
    h = _run(2)
    m = summarize(h)
    for p in m.pcpus:
        assert p.busy_ns + p.idle_ns == 1000 * MS
    assert sum(v.cpu_ns for v in m.vcpus) == sum(p.busy_ns for p in m.pcpus)
    rt = m.vcpu("rt.0")
    assert rt.jobs == 100 and rt.cpu_ns == 200 * MS and rt.misses == 0
    assert rt.response.min_ns == rt.response.max_ns == 2 * MS
    assert m.vcpu("hog.0").cpu_ns == 1000 * MS  # alone on pCPU 1
    # The probe shares pCPU 0 with rt: a wake-up behind a 2 ms job waits for it.
    probe = m.vcpu("probe.0")
    assert probe.wake_latency.max_ns == 2 * MS and probe.wake_latency.min_ns == 0


def test_same_seed_same_bytes() -> None:
    a = json.dumps(summarize(_run(2)).to_json())
    b = json.dumps(summarize(_run(2)).to_json())
    assert a == b


class _Bad(Null):
    """Picks a blocked vCPU: the host must refuse."""

    def do_schedule(self, pcpu: Pcpu, now: int, idle_forced: bool) -> Decision:
        if now > 0:
            return Decision(self.host.vcpus[0])
        return super().do_schedule(pcpu, now, idle_forced)


def test_the_host_checks_the_scheduler() -> None:
    h = Host(uniform(cores=1), _Bad(), seed=1)
    h.add_domain("rt", [Periodic(1 * MS, 10 * MS, offset_ns=5 * MS)])
    with pytest.raises(SimError, match=r"t=\d+: null chose rt.0 for pCPU 0 but it is blocked"):
        h.run(100 * MS)


def test_bad_domains_are_refused() -> None:
    h = Host(uniform(cores=2), make("null"))
    with pytest.raises(SimError, match="affinity names pCPUs \\[5\\]"):
        h.add_domain("d", [Hog()], affinity=frozenset({0, 5}))
    with pytest.raises(SimError, match="at least one vCPU"):
        h.add_domain("d", [])
    with pytest.raises(SimError, match="null has no parameter weight"):
        h.add_domain("d", [Hog()], params={"weight": 256})
    with pytest.raises(SimError, match="unknown scheduler 'nope'"):
        make("nope")
