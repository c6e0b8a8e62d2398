"""Multiprocessor EDF with CBS servers, one run queue per set of pCPUs: :class:`MpEdf`.

Phases 3 and 4 of the seed idea "Temporal Isolation and Multiprocessor Support
in the SEDF Scheduler", built on :mod:`~xenlab.sim.schedulers.cbs`: every vCPU
is a CBS server (:class:`~xenlab.sim.schedulers._edf.CbsServer`), the pCPUs
are split into run queues by the option ``runqueue`` ("cpu" up to "global"),
and within one the earliest deadline runs on any of its pCPUs (ties: the vCPU
queued first, then the lower vCPU index).  A vCPU is placed by first fit; with
``balance`` (the default, except for ``runqueue="cpu"``) it is pushed on wake
and pulled by an idle pCPU, each move counted.  A running vCPU is off its
queue (as in Xen's RTDS), and ``tickled`` keeps two wake-ups at one instant
from picking one pCPU (Xen's ``prv->tickled``).  The design (placement,
balancing, queues and parameters) is in docs/schedulers.md, section
Multiprocessor EDF.
"""

from __future__ import annotations

import bisect
import itertools
from typing import TYPE_CHECKING, Any, ClassVar

from xenlab.sim.model import RunState
from xenlab.sim.schedulers._edf import (
    IDLE_KEY,
    CbsServer,
    EdfQueue,
    check_flag,
    check_reservation,
    flag,
    preemption_target,
    reservation,
)
from xenlab.sim.schedulers.base import IDLE, Decision, ParamError, SchedulerBase

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from xenlab.sim.host import Host
    from xenlab.sim.model import Domain, Pcpu, Vcpu

_RUNNING = RunState.RUNNING
_RUNNABLE = RunState.RUNNABLE
_LEVELS = ("cpu", "core", "llc", "socket", "node", "global")


#: From this many pCPUs in the pool on, wakes find idle pCPUs and the latest
#: running deadline from kept lists instead of scanning every pCPU (measured:
#: slower below about 16 pCPUs, 2x faster per job at 256).
_TRACK_MIN_CPUS = 16


class _RunQueue:
    """One run queue: its pCPUs, its queued vCPUs and their reserved utilisation."""

    __slots__ = ("cpus", "id", "load", "members", "queue")

    def __init__(self, rq_id: int, cpus: tuple[int, ...]) -> None:
        self.id = rq_id
        self.cpus = cpus
        self.members = frozenset(cpus)
        self.queue = EdfQueue()
        self.load = 0.0  # sum of Q/T of the vCPUs placed here; insert/remove/migrate


class MpEdf(SchedulerBase):
    """EDF over CBS servers with one run queue per set of pCPUs (see the module notes)."""

    name: ClassVar[str] = "mpedf"
    PARAMS: ClassVar[Mapping[str, Any]] = {"period": 10_000, "budget": 4_000, "hard": False}

    def __init__(self, *, runqueue: str = "global", balance: bool | None = None) -> None:
        super().__init__(runqueue=runqueue, balance=balance)
        if runqueue not in _LEVELS:
            raise ParamError("runqueue", f"{self.name}: runqueue {runqueue!r} is not one of "
                             f"{', '.join(_LEVELS)}")
        self.level = runqueue
        self.balance = runqueue != "cpu" if balance is None else bool(balance)
        self.rqs: list[_RunQueue] = []
        self.rq_of: list[int] = []  # pCPU -> run queue id
        self.tickled: set[int] = set()
        # pCPUs running nothing (or a vCPU that just blocked): set by do_schedule
        # returning idle and by sleep, cleared when do_schedule picks a vCPU.  A
        # wake then finds an idle pCPU without reading every pCPU's deadline.
        self.idle: list[int] = []  # sorted
        # (key, pCPU) of what each pCPU chose to run, sorted: the latest deadline
        # running is at the end.  Set by do_schedule, dropped by sleep and by the
        # pCPU's next do_schedule; a running vCPU's key does not change meanwhile.
        self.busy: list[tuple[tuple[Any, ...], int]] = []
        self.busy_key: dict[int, tuple[Any, ...]] = {}
        self.migrations = 0  # moves between run queues

    def attach(self, host: Host, *, cpus: tuple[int, ...] | None = None) -> None:
        super().attach(host, cpus=cpus)
        mine = set(self.pool_cpus)
        groups = [g for g in (tuple(c for c in grp if c in mine)
                              for grp in host.topology.group(self.level)) if g]
        self.rqs = [_RunQueue(i, g) for i, g in enumerate(groups)]
        self.idle = sorted(self.pool_cpus)
        # Below a few pCPUs a plain scan is cheaper than keeping the lists.
        self._track = len(self.pool_cpus) >= _TRACK_MIN_CPUS
        self.rq_of = [0] * len(host.pcpus)
        for rq in self.rqs:
            for c in rq.cpus:
                self.rq_of[c] = rq.id

    # -- units ---------------------------------------------------------------------

    @classmethod
    def check_values(cls, params: Mapping[str, Any]) -> None:
        """What :meth:`_server` checks: the reservation, then hard (pure)."""
        reservation(cls.name, params, "budget")
        flag(cls.name, params, "hard")

    def _server(self, dom: Domain, index: int) -> CbsServer:
        params = self.params_of(dom)
        budget, period = check_reservation(dom, self.name, params, "budget")
        return CbsServer(budget, period, check_flag(dom, self.name, params, "hard"), index)

    def _allowed(self, v: Vcpu, rq: _RunQueue) -> bool:
        aff = v.affinity
        return aff is None or any(c in aff for c in rq.cpus)

    def insert_unit(self, v: Vcpu) -> None:
        s = self._server(v.dom, len(self.host.vcpus) - len(v.dom.vcpus) + v.id)
        cands = [rq for rq in self.rqs if self._allowed(v, rq)]
        u = s.utilisation
        fit = [rq for rq in cands if rq.load + u <= len(rq.cpus) + 1e-9]
        rq = fit[0] if fit else min(cands, key=lambda r: (r.load / len(r.cpus), r.id))
        rq.load += u
        s.rq = rq.id
        v.priv = s
        v.processor = self._home_cpu(v, rq)

    def _home_cpu(self, v: Vcpu, rq: _RunQueue) -> int:
        if v.processor in rq.cpus and (v.affinity is None or v.processor in v.affinity):
            return v.processor
        return next(c for c in rq.cpus if v.affinity is None or c in v.affinity)

    def remove_unit(self, v: Vcpu) -> None:
        s: CbsServer = v.priv
        self.sleep(v)
        if s.timer is not None:
            s.timer.cancel()
        self.rqs[s.rq].load -= s.utilisation

    def pick_resource(self, v: Vcpu) -> int:
        return int(v.processor)

    # -- queues --------------------------------------------------------------------

    def _enqueue(self, v: Vcpu, s: CbsServer) -> None:
        e = s.key(v)
        s.entry = e
        self.rqs[s.rq].queue.insert(e)

    def _dequeue(self, s: CbsServer) -> None:
        if s.entry is not None:
            self.rqs[s.rq].queue.remove(s.entry)
            s.entry = None

    def _move(self, v: Vcpu, s: CbsServer, rq: _RunQueue) -> None:
        """Reassign ``v`` (not queued) to ``rq``."""
        if rq.id != s.rq:
            u = s.utilisation
            self.rqs[s.rq].load -= u
            rq.load += u
            s.rq = rq.id
            self.migrations += 1

    def _running_key(self, c: int, now: int) -> tuple[Any, ...] | None:
        """The key of what runs on pCPU ``c`` (idle: ``IDLE_KEY``), None if unusable now."""
        p = self.host.pcpus[c]
        if p.inject_until > now:
            return None  # forced idle: nothing can run there
        cur = p.curr
        if cur is None or cur.state is not _RUNNING:
            return IDLE_KEY
        cs: CbsServer = cur.priv
        return cs.key(cur)

    def _is_idle(self, c: int) -> bool:
        i = bisect.bisect_left(self.idle, c)
        return i < len(self.idle) and self.idle[i] == c

    def _set_idle(self, c: int, idle: bool) -> None:
        i = bisect.bisect_left(self.idle, c)
        there = i < len(self.idle) and self.idle[i] == c
        if idle and not there:
            self.idle.insert(i, c)
        elif not idle and there:
            del self.idle[i]

    def _set_busy(self, c: int, key: tuple[Any, ...] | None) -> None:
        old = self.busy_key.pop(c, None)
        if old is not None:
            i = bisect.bisect_left(self.busy, (old, c))
            del self.busy[i]
        if key is not None:
            self.busy_key[c] = key
            bisect.insort(self.busy, (key, c))

    def _latest_running(self, rq: _RunQueue, aff: frozenset[int] | None,
                        now: int) -> tuple[int, tuple[Any, ...]] | None:
        """The eligible pCPU of ``rq`` running the latest deadline, from ``busy``;
        None when the list cannot say (the caller scans)."""
        pcpus = self.host.pcpus
        for key, c in reversed(self.busy):
            if c not in rq.members or c in self.tickled or (aff is not None and c not in aff):
                continue
            if pcpus[c].inject_until > now:
                continue
            if self._running_key(c, now) != key:
                return None  # out of step (cannot happen): let the full scan decide
            return c, key
        return None

    def _tickle(self, v: Vcpu, s: CbsServer, now: int) -> None:
        """Reschedule the pCPU of ``v``'s run queue it should preempt (idle first)."""
        rq = self.rqs[s.rq]
        aff = v.affinity
        best: int | None = None
        best_key: tuple[Any, ...] = ()
        own = v.processor
        mine = own in rq.members
        if self._track and self.idle:
            # An idle pCPU wins: its own first, else the lowest eligible one (the
            # order the full scan below would find them in).
            pcpus = self.host.pcpus
            tickled = self.tickled

            def free(c: int) -> bool:
                return (c in rq.members and c not in tickled
                        and (aff is None or c in aff) and pcpus[c].inject_until <= now)

            pick = own if mine and self._is_idle(own) and free(own) else next(
                (c for c in self.idle if free(c)), None)
            if pick is not None:
                tickled.add(pick)
                # Off the idle list until it reschedules: a burst of wakes at one
                # instant then skips it without a look (do_schedule puts it back
                # if it finds nothing to run).
                self._set_idle(pick, False)
                self.host.tickle(pick)
                return
        found = self._latest_running(rq, aff, now) if self._track else None
        if found is not None:
            c, key = found
            if s.key(v) < key:
                self.tickled.add(c)
                self.host.tickle(c)
            return
        # Its own pCPU first, then the run queue's in order (no sort per wake: at
        # 64 pCPUs sorting here was half of a run).
        tickled = self.tickled
        order = itertools.chain((own,) if mine else (),
                                (c for c in rq.cpus if not (mine and c == own)))
        best, best_key = preemption_target(
            order, tickled, aff, self._running_key, now)
        if best is None:
            return
        if best_key and not s.key(v) < best_key:
            return
        self.tickled.add(best)
        self.host.tickle(best)

    def _push_target(self, v: Vcpu, s: CbsServer, now: int) -> _RunQueue:
        """Where a waking vCPU should queue (see "Placement and balancing")."""
        own = self.rqs[s.rq]
        if not self.balance or len(self.rqs) == 1:
            return own
        key = s.key(v)
        best: _RunQueue = own
        best_latest: tuple[Any, ...] | None = None
        for rq in sorted(self.rqs, key=lambda r: r.id != own.id):
            latest: tuple[Any, ...] | None = None
            for c in rq.cpus:
                if v.affinity is not None and c not in v.affinity:
                    continue
                if c in self.tickled:
                    continue
                k = self._running_key(c, now)
                if k is not None and (latest is None or k > latest):
                    latest = k
            if latest is IDLE_KEY:
                return rq
            if latest is not None and latest > key and (best_latest is None
                                                        or latest > best_latest):
                best, best_latest = rq, latest
        return best

    # -- hooks ---------------------------------------------------------------------

    def wake(self, v: Vcpu) -> None:
        s: CbsServer = v.priv
        if s.entry is not None:
            return
        now = self.host.engine.now
        s.wake(now)
        if s.throttled:
            return  # the replenishment queues it
        rq = self._push_target(v, s, now)
        if rq.id != s.rq:
            self._move(v, s, rq)
            v.processor = self._home_cpu(v, rq)
        self._enqueue(v, s)
        self._tickle(v, s, now)

    def sleep(self, v: Vcpu) -> None:
        s: CbsServer = v.priv
        self._dequeue(s)
        if self._track and self.host.pcpus[v.processor].curr is v:
            self._set_busy(v.processor, None)
            self._set_idle(v.processor, True)  # its pCPU reschedules now: free for a wake

    def _replenisher(self, v: Vcpu) -> Callable[[], None]:
        return lambda: self._replenish(v)

    def _replenish(self, v: Vcpu) -> None:
        s: CbsServer = v.priv
        now = self.host.engine.now
        s.replenish(now)
        if v.state is _RUNNABLE and s.entry is None:
            self._enqueue(v, s)
            self._tickle(v, s, now)

    def do_schedule(self, pcpu: Pcpu, now: int, idle_forced: bool) -> Decision:
        self.tickled.discard(pcpu.id)
        track = self._track
        if track:
            self._set_busy(pcpu.id, None)
        prev = pcpu.curr
        if prev is not None:
            s: CbsServer = prev.priv
            if s.charge(now - s.last_start):
                s.timer = self.host.engine.at(max(now, s.deadline),
                                              self._replenisher(prev))
            elif prev.state is _RUNNING:
                self._enqueue(prev, s)
        if idle_forced:
            if track:
                self._set_idle(pcpu.id, True)
            return IDLE
        rq = self.rqs[self.rq_of[pcpu.id]]
        e = rq.queue.first(pcpu.id)
        if e is None and self.balance:
            e = self._pull(pcpu.id, rq)
        if e is None:
            if track:
                self._set_idle(pcpu.id, True)
            return IDLE
        if track:
            self._set_idle(pcpu.id, False)
        rq.queue.remove(e)
        v = e[4]
        s = v.priv
        s.entry = None
        s.last_start = now
        if track:
            self._set_busy(pcpu.id, s.key(v))
        return Decision(v, s.left)

    def _pull(self, c: int, into: _RunQueue) -> Any:
        """The earliest vCPU another run queue has that may run on ``c``, moved to ``into``."""
        best = None
        for rq in self.rqs:
            if rq is into:
                continue
            e = rq.queue.first(c)
            if e is not None and (best is None or e < best):
                best = e
        if best is None:
            return None
        v = best[4]
        s: CbsServer = v.priv
        self._dequeue(s)
        self._move(v, s, into)
        e = s.key(v)
        s.entry = e
        into.queue.insert(e)
        return e

    def adjust(self, dom: Domain, params: Mapping[str, Any]) -> dict[str, Any]:
        """New parameters; each vCPU's server takes them (deadline and budget kept)."""
        out = super().adjust(dom, params)
        for v in dom.vcpus:
            s: CbsServer = v.priv
            new = self._server(dom, s.index)
            self.rqs[s.rq].load += new.utilisation - s.utilisation
            s.budget_ns, s.period_ns, s.hard = new.budget_ns, new.period_ns, new.hard
            s.left = min(s.left, s.budget_ns)
        return out

    def dump(self) -> dict[str, Any]:
        return {
            "scheduler": self.name, "runqueue": self.level, "balance": self.balance,
            "migrations": self.migrations,
            "runqueues": [
                {"cpus": list(rq.cpus), "load": round(rq.load, 6),
                 "queued": [{"vcpu": e[4].name, "deadline": e[1]} for e in rq.queue.items]}
                for rq in self.rqs],
        }
