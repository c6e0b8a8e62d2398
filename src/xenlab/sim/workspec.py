"""One vCPU's workload as a scenario gives it: :class:`WorkloadSpec`, and ``build()`` to run it.

:class:`WorkloadKind` names what a vCPU runs and a :class:`WorkloadSpec` holds
one vCPU's checked workload (a frozen value of the scenario); ``build()``
makes a fresh workload object for every run, since workloads hold run state.
The kinds are :mod:`xenlab.sim.workload`'s, plus the two rt-app behaviours it
lacks, kept here beside the only code that makes them: :class:`RunSleep`
(rt-app's ``run`` then ``sleep``, no timer) and a periodic task that stops
after ``loop`` jobs.  Pure, as all of sim/; reading workloads from files is
:mod:`xenlab.sim.tables` (TOML) and :mod:`xenlab.sim.rtapp` (rt-app JSON).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xenlab.sim.workload import CyclicProbe, Hog, IoBound, Periodic, Sporadic

if TYPE_CHECKING:
    from xenlab.sim.host import Host
    from xenlab.sim.model import Vcpu
    from xenlab.sim.workload import Workload

__all__ = ["RunSleep", "WorkloadKind", "WorkloadSpec"]


class WorkloadKind(enum.Enum):
    """What a vCPU runs."""

    PERIODIC = "periodic"
    SPORADIC = "sporadic"
    HOG = "hog"
    IO = "io"
    CYCLICTEST = "cyclictest"
    RUN_SLEEP = "run-sleep"  # rt-app run + sleep without a timer


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """One vCPU's workload, checked; :meth:`build` makes a fresh workload object."""

    kind: WorkloadKind
    run_ns: int = 0
    period_ns: int = 0  # periodic; sporadic's min gap; io's block; cyclictest's interval
    max_gap_ns: int = 0
    deadline_ns: int | None = None
    offset_ns: int = 0
    loops: int = -1  # jobs (rt-app loop); -1 = forever

    def build(self) -> Workload:
        """A new workload object (workloads hold run state: one per vCPU and run)."""
        k = self.kind
        if k is WorkloadKind.PERIODIC:
            if self.loops >= 0:
                return _Jobs(self.run_ns, self.period_ns, self.loops,
                             deadline_ns=self.deadline_ns, offset_ns=self.offset_ns)
            return Periodic(self.run_ns, self.period_ns, deadline_ns=self.deadline_ns,
                            offset_ns=self.offset_ns)
        if k is WorkloadKind.SPORADIC:
            return Sporadic(self.run_ns, self.period_ns, self.max_gap_ns,
                            deadline_ns=self.deadline_ns, offset_ns=self.offset_ns)
        if k is WorkloadKind.HOG:
            return Hog(offset_ns=self.offset_ns)
        if k is WorkloadKind.IO:
            return IoBound(self.run_ns, self.period_ns)
        if k is WorkloadKind.CYCLICTEST:
            return CyclicProbe(self.period_ns, run_ns=self.run_ns, offset_ns=self.offset_ns)
        return RunSleep(self.run_ns, self.period_ns, loops=self.loops, offset_ns=self.offset_ns)


# -- the run-sleep workload (rt-app run + sleep) -----------------------------------------------


class RunSleep:
    """rt-app's ``run`` then ``sleep`` (relative), repeated ``loops`` times (-1: forever)."""

    __slots__ = ("left", "offset_ns", "run_ns", "sleep_ns")

    def __init__(self, run_ns: int, sleep_ns: int, *, loops: int = -1, offset_ns: int = 0) -> None:
        self.run_ns = run_ns
        self.sleep_ns = sleep_ns
        self.left = loops
        self.offset_ns = offset_ns

    def start(self, host: Host, v: Vcpu) -> None:
        """Arm the first activation."""
        if self.left != 0:
            host.engine.at(self.offset_ns, lambda: self._go(host, v))

    def _go(self, host: Host, v: Vcpu) -> None:
        v.jobs += 1
        if self.left > 0:
            self.left -= 1
        host.activate(v, self.run_ns)

    def burst_done(self, host: Host, v: Vcpu) -> int:
        """The loop's run ended: sleep, or run the next loop at once (no sleep)."""
        if self.left == 0:
            return 0
        if self.sleep_ns == 0:
            v.jobs += 1
            if self.left > 0:
                self.left -= 1
            return self.run_ns
        host.engine.after(self.sleep_ns, lambda: self._go(host, v))
        return 0

    def finish(self, host: Host, v: Vcpu) -> None:
        """Nothing pending to count (no deadlines)."""


class _Jobs(Periodic):
    """A periodic task that stops after ``jobs`` releases (rt-app's ``loop``)."""

    __slots__ = ("left",)

    def __init__(self, run_ns: int, period_ns: int, jobs: int, *,
                 deadline_ns: int | None = None, offset_ns: int = 0) -> None:
        super().__init__(run_ns, period_ns, deadline_ns=deadline_ns, offset_ns=offset_ns)
        self.left = jobs

    def _release(self, host: Host, v: Vcpu) -> None:
        if self.left <= 0:
            return
        self.left -= 1
        super()._release(host, v)
