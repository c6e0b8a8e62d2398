"""What the simulated host is made of: :class:`Vcpu`, :class:`Domain`, :class:`Pcpu`.

These are the mutable objects of a run (the engine and the host are where
state is the point).  They hold what Xen's generic scheduling code keeps
per unit and per pCPU (run state, where a vCPU runs, how long it has run)
and the counters the metrics are made from; a scheduler keeps its own state
in ``priv`` (a dataclass of its own, like Xen's ``sched_priv``).
"""

from __future__ import annotations

import enum
from array import array
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xenlab.numa.topology import Cpu
    from xenlab.sim.engine import Timer
    from xenlab.sim.workload import Workload


class RunState(enum.Enum):
    """A vCPU's run state (Xen's RUNSTATE_running/runnable/blocked/offline)."""

    RUNNING = "running"
    RUNNABLE = "runnable"
    BLOCKED = "blocked"
    OFFLINE = "offline"


class Domain:
    """A guest: a name, scheduler parameters (xl sched-* names) and vCPUs."""

    __slots__ = ("id", "name", "params", "priv", "vcpus")

    def __init__(self, domid: int, name: str, params: Mapping[str, Any]) -> None:
        self.id = domid
        self.name = name
        self.params: dict[str, Any] = dict(params)
        self.vcpus: list[Vcpu] = []
        self.priv: Any = None  # the scheduler's per-domain state

    def __repr__(self) -> str:
        return f"<Domain {self.id} {self.name}>"


class Vcpu:
    """One vCPU: its run state, its workload's current burst, and its counters.

    ``work_left`` is what is left of the burst the workload asked for (ns of
    CPU time); the host takes time off it while the vCPU runs and asks the
    workload what next when it reaches 0.
    """

    __slots__ = (
        "affinity", "cpu_ns", "dispatches", "dom", "id", "jobs", "last_pcpu", "migrations",
        "misses", "name", "preemptions", "priv", "processor", "response_ns", "sched", "state",
        "wake_latency_ns", "woken_at", "work_left", "workload",
    )  # fmt: skip

    def __init__(self, dom: Domain, vcpu_id: int, workload: Workload,
                 affinity: frozenset[int] | None = None) -> None:
        self.dom = dom
        self.id = vcpu_id
        self.name = f"{dom.name}.{vcpu_id}"
        self.workload = workload
        self.affinity = affinity  # pCPUs it may run on (None: all); xl's cpus=
        self.state = RunState.BLOCKED
        self.processor = 0  # the pCPU it runs on, or will (Xen's v->processor)
        self.last_pcpu = -1  # the pCPU it last ran on, for migration counts
        self.work_left = 0
        self.woken_at: int | None = None
        self.priv: Any = None  # the scheduler's per-unit state
        self.sched: Any = None  # the scheduler of its domain's cpupool (set by the host)
        # Counters, read by sim.metrics.
        self.cpu_ns = 0
        self.dispatches = 0  # times it was put on a pCPU
        self.preemptions = 0  # times it left a pCPU while still runnable
        self.migrations = 0  # dispatches on another pCPU than the last one
        self.jobs = 0
        self.misses = 0
        self.response_ns = array("q")
        self.wake_latency_ns = array("q")

    @property
    def runnable(self) -> bool:
        """Running or waiting to run."""
        return self.state is RunState.RUNNING or self.state is RunState.RUNNABLE

    def __repr__(self) -> str:
        return f"<Vcpu {self.name} {self.state.value}>"


class Pcpu:
    """One physical CPU: what runs on it now, and its busy/idle accounting."""

    __slots__ = (
        "busy_ns", "cpu", "curr", "id", "idle_ns", "inject_until", "injected_ns", "last_acct",
        "pending", "pool", "priv", "sched", "since", "switches", "timer",
    )  # fmt: skip

    def __init__(self, cpu: Cpu) -> None:
        self.id = cpu.id
        self.cpu = cpu
        self.curr: Vcpu | None = None  # None: the idle vCPU runs
        self.since = 0  # when curr was put on (or idle began)
        self.last_acct = 0  # up to when curr's run time is accounted
        self.timer: Timer | None = None  # slice end or burst end, whichever is first
        self.pending = False  # a reschedule is queued (Xen's SCHEDULE_SOFTIRQ)
        self.inject_until = 0  # forced idle (PowerClamp) until this time
        self.priv: Any = None  # the scheduler's per-pCPU state
        self.sched: Any = None  # the scheduler of its cpupool (set by the host)
        self.pool = ""  # the name of its cpupool
        self.busy_ns = 0
        self.idle_ns = 0
        self.injected_ns = 0  # of idle_ns, the part that was forced
        self.switches = 0  # context switches (a different vCPU, or idle, put on)

    def __repr__(self) -> str:
        return f"<Pcpu {self.id} curr={self.curr and self.curr.name}>"
