"""Xen's RTDS scheduler: global EDF over deferrable servers, with extratime: :class:`Rtds`.

The comparator upstream chose instead of fixing SEDF (xen/common/sched/rt.c;
read, not copied): global preemptive EDF in which each vCPU is a deferrable
server with ``budget`` every ``period`` (periods aligned from time 0, unused
budget lost), and an ``extratime`` vCPU runs on at a higher level once its
budget is spent.  The queues are rt.c's (``runq``, ``depletedq``, ``replq``
with one replenishment timer), and a running vCPU is on neither run queue.
Where rt.c and its intent part (the replenishment does not tickle for an
extratime vCPU dropping back to level 0; tests/sim/test_rtds.py measures it)
the model follows rt.c.  Parameters are ``xl sched-rtds``'s, with Xen's
defaults and minimums (RTDS_DEFAULT_PERIOD/BUDGET, RTDS_MIN_PERIOD/BUDGET).
The design (the queues, the per-vCPU state, the rt.c behaviour kept and the
parameters) is in docs/schedulers.md, section RTDS.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from xenlab.sim.model import RunState
from xenlab.sim.schedulers._edf import (
    IDLE_KEY,
    EdfQueue,
    Entry,
    check_flag,
    check_reservation,
    flag,
    preemption_target,
    reservation,
)
from xenlab.sim.schedulers.base import IDLE, Decision, SchedulerBase

if TYPE_CHECKING:
    from collections.abc import Mapping

    from xenlab.sim.engine import Timer
    from xenlab.sim.model import Domain, Pcpu, Vcpu

_RUNNING = RunState.RUNNING
_RUNNABLE = RunState.RUNNABLE
_NOWHERE, _RUNQ, _DEPLETEDQ = 0, 1, 2


@dataclass(slots=True, eq=False)
class _Unit:
    """RTDS's per-vCPU state (Xen's struct rt_unit); see the module notes."""

    budget_ns: int
    period_ns: int
    extratime: bool
    index: int
    deadline: int = 0
    left: int = 0
    level: int = 0
    ready_since: int = 0
    last_start: int = 0
    depleted: bool = False
    on_q: int = _NOWHERE
    entry: Entry | None = None
    on_replq: bool = False
    repl_serial: int = 0  # the live replq entry's serial (older ones are stale)

    def key(self, v: Vcpu) -> Entry:
        return (self.level, self.deadline, self.ready_since, self.index, v)

    def update_deadline(self, now: int) -> None:
        """Move to the period holding ``now``: deadline at its end, full budget, level 0."""
        p = self.period_ns
        if self.deadline <= now:
            self.deadline += ((now - self.deadline) // p + 1) * p
        self.last_start = now
        self.left = self.budget_ns
        self.level = 0

    def burn(self, now: int) -> None:
        """Charge the time run since ``last_start`` (Xen's burn_budget)."""
        self.left -= now - self.last_start
        self.last_start = now
        if self.left <= 0:
            if self.extratime:
                self.level += 1
                self.left = self.budget_ns
            else:
                self.left = 0
                self.depleted = True


class Rtds(SchedulerBase):
    """Global EDF with deferrable servers and extratime (see the module notes)."""

    name: ClassVar[str] = "rtds"
    PARAMS: ClassVar[Mapping[str, Any]] = {"period": 10_000, "budget": 4_000,
                                           "extratime": True}

    def __init__(self) -> None:
        super().__init__()
        self.runq = EdfQueue()
        self.depletedq: set[Vcpu] = set()
        self.replq: list[tuple[int, int, Vcpu]] = []  # (deadline, serial, vCPU), lazy
        self._serial = 0
        self.repl_timer: Timer | None = None
        self.tickled: set[int] = set()

    @classmethod
    def check_values(cls, params: Mapping[str, Any]) -> None:
        """What :meth:`_unit` checks: the reservation, then extratime (pure)."""
        reservation(cls.name, params, "budget")
        flag(cls.name, params, "extratime")

    def _unit(self, dom: Domain, index: int) -> _Unit:
        params = self.params_of(dom)
        budget, period = check_reservation(dom, self.name, params, "budget")
        return _Unit(budget, period, check_flag(dom, self.name, params, "extratime"), index)

    def insert_unit(self, v: Vcpu) -> None:
        v.priv = self._unit(v.dom, len(self.host.vcpus) - len(v.dom.vcpus) + v.id)

    def pick_resource(self, v: Vcpu) -> int:
        # rt_res_pick: where it was if allowed, else the next allowed pCPU.
        aff = v.affinity
        cur: int = v.processor
        if aff is None or cur in aff:
            return cur
        n = len(self.host.pcpus)
        for i in range(1, n):
            c = (cur + i) % n
            if c in aff:
                return c
        return min(aff)

    # -- queues --------------------------------------------------------------------

    def _q_insert(self, v: Vcpu, u: _Unit) -> None:
        if u.left > 0 or u.extratime:
            e = u.key(v)
            u.entry = e
            u.on_q = _RUNQ
            self.runq.insert(e)
        else:
            u.on_q = _DEPLETEDQ
            self.depletedq.add(v)

    def _q_remove(self, v: Vcpu, u: _Unit) -> None:
        if u.on_q == _RUNQ and u.entry is not None:
            self.runq.remove(u.entry)
            u.entry = None
        elif u.on_q == _DEPLETEDQ:
            self.depletedq.discard(v)
        u.on_q = _NOWHERE

    def _replq_insert(self, v: Vcpu, u: _Unit) -> None:
        self._serial += 1
        u.repl_serial = self._serial
        u.on_replq = True
        heapq.heappush(self.replq, (u.deadline, self._serial, v))
        self._arm()

    def _replq_remove(self, u: _Unit) -> None:
        u.on_replq = False
        u.repl_serial = 0  # its heap entry is stale now

    def _arm(self) -> None:
        q = self.replq
        while q and (not q[0][2].priv.on_replq or q[0][2].priv.repl_serial != q[0][1]):
            heapq.heappop(q)
        if not q:
            return
        at = q[0][0]
        t = self.repl_timer
        if t is not None and t.pending and t.time == at:
            return
        if t is not None:
            t.cancel()
        self.repl_timer = self.host.engine.at(max(at, self.host.engine.now), self._replenish)

    # -- tickling ------------------------------------------------------------------

    def _running_key(self, c: int, now: int) -> tuple[Any, ...] | None:
        p = self.host.pcpus[c]
        if p.inject_until > now:
            return None
        cur = p.curr
        if cur is None or cur.state is not _RUNNING:
            return IDLE_KEY
        cu: _Unit = cur.priv
        return cu.key(cur)

    def _tickle(self, v: Vcpu, u: _Unit, now: int) -> None:
        """runq_tickle: an idle pCPU (its own first), else the lowest priority one if later."""
        aff = v.affinity
        n = len(self.host.pcpus)
        start = v.processor
        tickled = self.tickled
        best, best_key = preemption_target(
            ((start + i) % n for i in range(n)), tickled, aff, self._running_key, now)
        if best is None or (best_key and not u.key(v) < best_key):
            return
        self.tickled.add(best)
        self.host.tickle(best)

    # -- hooks ---------------------------------------------------------------------

    def wake(self, v: Vcpu) -> None:
        u: _Unit = v.priv
        if u.on_q != _NOWHERE:
            return
        now = self.host.engine.now
        u.ready_since = now
        if now >= u.deadline:
            u.update_deadline(now)
            u.depleted = False
        self._replq_insert(v, u)
        self._q_insert(v, u)
        self._tickle(v, u, now)

    def sleep(self, v: Vcpu) -> None:
        u: _Unit = v.priv
        if u.on_q != _NOWHERE:
            self._q_remove(v, u)
            self._replq_remove(u)
        # A running vCPU: do_schedule sees it blocked and drops its replenishment.

    def do_schedule(self, pcpu: Pcpu, now: int, idle_forced: bool) -> Decision:
        self.tickled.discard(pcpu.id)
        prev = pcpu.curr
        if prev is not None:
            u: _Unit = prev.priv
            u.burn(now)
            if prev.state is _RUNNING:
                self._q_insert(prev, u)
            else:
                self._replq_remove(u)
        if idle_forced:
            return IDLE
        e = self.runq.first(pcpu.id)
        if e is None:
            return IDLE
        v = e[4]
        nu: _Unit = v.priv
        self._q_remove(v, nu)
        nu.last_start = now
        return Decision(v, nu.left)

    def _replenish(self) -> None:
        """repl_timer_handler: refill every vCPU whose period ended, then tickle."""
        now = self.host.engine.now
        self.repl_timer = None
        done: list[Vcpu] = []
        q = self.replq
        while q and q[0][0] <= now:
            _, serial, v = heapq.heappop(q)
            u: _Unit = v.priv
            if not u.on_replq or u.repl_serial != serial:
                continue
            if u.on_q != _NOWHERE:
                self._q_remove(v, u)
                u.update_deadline(now)
                self._q_insert(v, u)
            else:
                u.update_deadline(now)
            done.append(v)
        for v in done:
            u = v.priv
            if v.state is _RUNNING:
                head = self.runq.items[0] if self.runq.items else None
                if head is not None and head < u.key(v):
                    self._tickle(head[4], head[4].priv, now)
            elif u.depleted and u.on_q != _NOWHERE:
                self._tickle(v, u, now)
            # An extratime vCPU back at level 0 on runq is not tickled (module notes).
            u.depleted = False
            self._serial += 1
            u.repl_serial = self._serial
            heapq.heappush(q, (u.deadline, self._serial, v))
        self._arm()

    def adjust(self, dom: Domain, params: Mapping[str, Any]) -> dict[str, Any]:
        """xl sched-rtds -d DOM -p -b -e: new period/budget/extratime for every vCPU."""
        out = super().adjust(dom, params)
        for v in dom.vcpus:
            u: _Unit = v.priv
            new = self._unit(dom, u.index)
            u.budget_ns, u.period_ns, u.extratime = new.budget_ns, new.period_ns, new.extratime
        return out

    def dump(self) -> dict[str, Any]:
        return {
            "scheduler": self.name,
            "runq": [{"vcpu": e[4].name, "level": e[0], "deadline": e[1]}
                     for e in self.runq.items],
            "depletedq": sorted(v.name for v in self.depletedq),
            "replq": sorted((d, v.name) for d, s, v in self.replq
                            if v.priv.on_replq and v.priv.repl_serial == s),
        }

