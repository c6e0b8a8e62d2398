"""Xen's null scheduler: each vCPU owns one pCPU, no time sharing: :class:`Null`.

Design (xen/common/sched/null.c): a vCPU is assigned to a free pCPU when it
is inserted and stays there; a pCPU runs its vCPU whenever it is runnable
and idles otherwise.  With more vCPUs than pCPUs the extra ones wait, in
insertion order, for a pCPU to be freed (here: they share the least loaded
pCPU in FIFO order, taking turns only when the holder blocks), which is
what makes the null scheduler the baseline with no scheduling at all.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

from xenlab.sim.model import Pcpu, RunState, Vcpu
from xenlab.sim.schedulers.base import IDLE, Decision, SchedulerBase


@dataclass(slots=True)
class _PcpuState:
    """Per-pCPU: the vCPUs assigned to it, and the runnable ones in FIFO order."""

    assigned: list[Vcpu] = field(default_factory=list)  # set by insert_unit
    queue: deque[Vcpu] = field(default_factory=deque)  # runnable, not running; wake/do_schedule


class Null(SchedulerBase):
    """One pCPU per vCPU (shared in FIFO order when there are more vCPUs)."""

    name: ClassVar[str] = "null"

    def _state(self, p: Pcpu) -> _PcpuState:
        if p.priv is None:
            p.priv = _PcpuState()
        st: _PcpuState = p.priv
        return st

    def insert_unit(self, v: Vcpu) -> None:
        self.params_of(v.dom)
        pcpus = [self.host.pcpus[c] for c in self.pool_cpus
                 if v.affinity is None or c in v.affinity]
        home = min(pcpus, key=lambda p: (len(self._state(p).assigned), p.id))
        self._state(home).assigned.append(v)
        v.priv = home.id
        v.processor = home.id

    def remove_unit(self, v: Vcpu) -> None:
        st = self._state(self.host.pcpus[v.priv])
        st.assigned.remove(v)
        if v in st.queue:
            st.queue.remove(v)

    def pick_resource(self, v: Vcpu) -> int:
        home: int = v.priv
        return home

    def wake(self, v: Vcpu) -> None:
        p = self.host.pcpus[v.priv]
        self._state(p).queue.append(v)
        if p.curr is None:
            self.host.tickle(p.id)

    def sleep(self, v: Vcpu) -> None:
        st = self._state(self.host.pcpus[v.priv])
        if v in st.queue:
            st.queue.remove(v)

    def do_schedule(self, pcpu: Pcpu, now: int, idle_forced: bool) -> Decision:
        st = self._state(pcpu)
        prev = pcpu.curr
        if prev is not None and prev.state is RunState.RUNNING:
            if idle_forced:
                st.queue.appendleft(prev)  # it keeps its turn
                return IDLE
            return Decision(prev)
        if idle_forced or not st.queue:
            return IDLE
        return Decision(st.queue.popleft())

    def dump(self) -> dict[str, Any]:
        return {"scheduler": self.name,
                "pcpus": {c: [v.name for v in self._state(self.host.pcpus[c]).assigned]
                          for c in self.pool_cpus}}
