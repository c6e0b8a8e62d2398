"""The simulated host: :class:`Host` runs domains' vCPUs on pCPUs under one scheduler.

This is the part of Xen's xen/common/sched/core.c that the policies plug into:
a reschedule (:meth:`Host.tickle`, like raising ``SCHEDULE_SOFTIRQ``) accounts
the running vCPU, asks the scheduler's ``do_schedule`` and arms one timer per
pCPU; a finished burst asks the workload what next; :meth:`Host.activate`
wakes a vCPU through ``pick_resource`` and ``wake``.  Cpupools give each pool
its own scheduler, forced idle (:meth:`Host.inject`) has ``do_schedule``
called with ``idle_forced``, and observers get ``on_switch`` and
``on_inject``.  The host checks the scheduler (a vCPU not runnable, running
elsewhere or outside its affinity, or a slice that is not positive, is a
:class:`SimError`), and nothing reads the wall clock: a run is a function of
its inputs and seed.  The design (each rule in full) is in docs/schedulers.md,
section Host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xenlab.errors import SimError
from xenlab.sim.engine import INFINITY, SCHEDULE, Engine
from xenlab.sim.model import Domain, Pcpu, RunState, Vcpu

if TYPE_CHECKING:
    from xenlab.numa.topology import Topology
    from xenlab.sim.schedulers.base import Scheduler
    from xenlab.sim.workload import Workload

_RUNNING = RunState.RUNNING
_RUNNABLE = RunState.RUNNABLE
_BLOCKED = RunState.BLOCKED


@dataclass(frozen=True, slots=True)
class Pool:
    """A cpupool: a name, its scheduler and its pCPUs."""

    name: str
    sched: Scheduler
    cpus: tuple[int, ...]


POOL0 = "Pool-0"


class Host:
    """pCPUs, domains and their schedulers (one per cpupool), on one engine."""

    def __init__(self, topology: Topology, scheduler: Scheduler, *, seed: int = 0,
                 trace: tuple[int, int] | None = None,
                 pools: Sequence[tuple[str, Scheduler, Iterable[int]]] = ()) -> None:
        self.topology = topology
        self.engine = Engine(seed)
        self.pcpus = [Pcpu(c) for c in topology.cpus]
        # One bound callback per pCPU for reschedules and timers, made once:
        # a closure per tickle and per timer was a measurable part of a run.
        self._schedule_cb = [self._bind(self._schedule, p) for p in self.pcpus]
        self._expire_cb = [self._bind(self._expire, p) for p in self.pcpus]
        self.domains: list[Domain] = []
        self.vcpus: list[Vcpu] = []
        self.sched = scheduler
        self.started = False
        self.end_ns = 0
        #: (start, end) of the window whose run segments are kept for Gantt charts.
        self.trace_window = trace
        #: Run segments in the window: (pcpu, start, end, vCPU name or None for idle).
        self.segments: list[tuple[int, int, int, str | None]] = []
        self.observers: list[Any] = []  # on_switch(...), optionally on_inject(...)
        self.pools = self._make_pools(scheduler, pools)
        for pool in self.pools:
            for c in pool.cpus:
                self.pcpus[c].sched = pool.sched
                self.pcpus[c].pool = pool.name
            pool.sched.attach(self, cpus=pool.cpus if len(self.pools) > 1 else None)

    def _make_pools(self, scheduler: Scheduler,
                    pools: Sequence[tuple[str, Scheduler, Iterable[int]]]) -> list[Pool]:
        n = len(self.pcpus)
        taken: dict[int, str] = {}
        out: list[Pool] = []
        for name, sched, cpus in pools:
            ids = tuple(sorted(set(cpus)))
            if name == POOL0 or any(p.name == name for p in out):
                raise SimError(f"cpupool {name}: the name is taken")
            if not ids:
                raise SimError(f"cpupool {name}: a pool needs at least one pCPU")
            bad = [c for c in ids if not 0 <= c < n]
            if bad:
                raise SimError(f"cpupool {name}: pCPUs {bad} are not on this host "
                               f"(0-{n - 1})")
            twice = [c for c in ids if c in taken]
            if twice:
                raise SimError(f"cpupool {name}: pCPUs {twice} are in cpupool "
                               f"{taken[twice[0]]} already")
            if any(sched is p.sched for p in out) or sched is scheduler:
                raise SimError(f"cpupool {name}: each pool needs its own scheduler instance")
            taken.update((c, name) for c in ids)
            out.append(Pool(name, sched, ids))
        rest = tuple(c for c in range(n) if c not in taken)
        if not rest:
            raise SimError(f"cpupool {POOL0} would have no pCPU left (every pool takes "
                           "pCPUs from it)")
        return [Pool(POOL0, scheduler, rest), *out]

    def pool(self, name: str) -> Pool:
        """The cpupool called ``name``."""
        for p in self.pools:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.pools)
        raise SimError(f"no cpupool {name!r} (the host has {known})")

    @staticmethod
    def _bind(fn: Callable[[Pcpu], None], p: Pcpu) -> Callable[[], None]:
        return lambda: fn(p)

    # -- building ------------------------------------------------------------------

    def add_domain(self, name: str, workloads: Sequence[Workload], *,
                   params: Mapping[str, Any] | None = None,
                   affinity: frozenset[int] | None = None, pool: str = POOL0) -> Domain:
        """A domain ``name`` with one vCPU per workload, given to its cpupool's scheduler."""
        if self.started:
            raise SimError(f"domain {name}: domains are added before the run starts")
        if not workloads:
            raise SimError(f"domain {name}: a domain needs at least one vCPU")
        if affinity is not None:
            bad = sorted(c for c in affinity if not 0 <= c < len(self.pcpus))
            if bad or not affinity:
                raise SimError(f"domain {name}: affinity names pCPUs {bad or '(none)'} that "
                               f"this host (pCPUs 0-{len(self.pcpus) - 1}) does not have")
        where = self.pool(pool)
        if len(where.cpus) < len(self.pcpus):
            outside = sorted(affinity - set(where.cpus)) if affinity is not None else []
            if outside:
                raise SimError(f"domain {name}: affinity names pCPUs {outside} outside "
                               f"cpupool {pool} ({', '.join(map(str, where.cpus))})")
            affinity = affinity if affinity is not None else frozenset(where.cpus)
        dom = Domain(len(self.domains), name, params or {})
        self.domains.append(dom)
        for i, w in enumerate(workloads):
            v = Vcpu(dom, i, w, affinity)
            v.sched = where.sched
            v.processor = min(affinity) if affinity else (len(self.vcpus) % len(self.pcpus))
            dom.vcpus.append(v)
            self.vcpus.append(v)
        for v in dom.vcpus:
            where.sched.insert_unit(v)
        return dom

    # -- running -------------------------------------------------------------------

    def run(self, duration_ns: int) -> None:
        """Run the host from time 0 (or where it stopped) for ``duration_ns`` more."""
        if duration_ns <= 0:
            raise SimError(f"a run needs a positive duration, not {duration_ns} ns")
        if not self.started:
            self.started = True
            for v in self.vcpus:
                v.workload.start(self, v)
        end = self.engine.now + duration_ns
        self.engine.run(end)
        for p in self.pcpus:
            self._account(p, end)
        self.end_ns = end

    def finish(self) -> None:
        """Close the books: workloads count what is still pending (jobs past deadline)."""
        for v in self.vcpus:
            v.workload.finish(self, v)
        if self.trace_window is not None:
            for p in self.pcpus:
                self._segment(p, self.end_ns)

    # -- called by workloads ---------------------------------------------------------

    def activate(self, v: Vcpu, work_ns: int) -> None:
        """Give blocked ``v`` a burst of ``work_ns`` of CPU work and wake it."""
        if v.state is not _BLOCKED:
            raise SimError(f"t={self.engine.now}: {v.name} activated while {v.state.value}")
        if work_ns <= 0:
            raise SimError(f"t={self.engine.now}: {v.name} activated with {work_ns} ns of work")
        v.work_left = work_ns
        v.state = _RUNNABLE
        v.woken_at = self.engine.now
        sched: Scheduler = v.sched
        v.processor = sched.pick_resource(v)
        sched.wake(v)

    # -- called by schedulers ------------------------------------------------------------

    def tickle(self, pcpu: int) -> None:
        """Reschedule pCPU ``pcpu`` now (after the other events of this instant)."""
        p = self.pcpus[pcpu]
        if not p.pending:
            p.pending = True
            self.engine.at(self.engine.now, self._schedule_cb[pcpu], SCHEDULE)

    # -- called by idle injection -------------------------------------------------------

    def inject(self, pcpu: int, until: int) -> None:
        """Force pCPU ``pcpu`` idle from now until ``until`` (``until <= now``: stop now).

        The pCPU's time is accounted up to now before ``inject_until`` moves, so
        only the stretch from now on counts as injected; observers with an
        ``on_inject`` hook hear of it; the pCPU reschedules at once.
        """
        p = self.pcpus[pcpu]
        now = self.engine.now
        self._account(p, now)
        end = until if until > now else now
        p.inject_until = end
        for o in self.observers:
            hook = getattr(o, "on_inject", None)  # optional: most observers only watch switches
            if hook is not None:
                hook(p, now, end)
        self.tickle(pcpu)

    # -- the dispatcher ------------------------------------------------------------------

    def _account(self, p: Pcpu, now: int) -> None:
        d = now - p.last_acct
        if d <= 0:
            return
        v = p.curr
        if v is not None:
            v.cpu_ns += d
            v.work_left -= d
            p.busy_ns += d
        else:
            p.idle_ns += d
            if p.inject_until > p.last_acct:
                p.injected_ns += min(now, p.inject_until) - p.last_acct
        p.last_acct = now

    def _segment(self, p: Pcpu, now: int) -> None:
        w = self.trace_window
        if w is None:
            return
        start, end = max(p.since, w[0]), min(now, w[1])
        if start < end:
            self.segments.append((p.id, start, end, p.curr.name if p.curr else None))

    def _schedule(self, p: Pcpu) -> None:
        p.pending = False
        now = self.engine.now
        self._account(p, now)
        if p.timer is not None:
            p.timer.cancel()
            p.timer = None
        forced = p.inject_until > now
        prev = p.curr
        sched: Scheduler = p.sched
        dec = sched.do_schedule(p, now, forced)
        nxt = dec.vcpu
        if nxt is not None:
            if forced:
                raise SimError(f"t={now}: {sched.name} ran {nxt.name} on pCPU {p.id} "
                               "during forced idle")
            if nxt.state is not _RUNNABLE and not (nxt is prev and nxt.state is _RUNNING):
                raise SimError(f"t={now}: {sched.name} chose {nxt.name} for pCPU {p.id} "
                               f"but it is {nxt.state.value}"
                               + (f" on pCPU {nxt.processor}" if nxt.state is _RUNNING else ""))
            if nxt.affinity is not None and p.id not in nxt.affinity:
                raise SimError(f"t={now}: {sched.name} put {nxt.name} on pCPU {p.id}, "
                               "outside its affinity")
        if nxt is not prev:
            if self.trace_window is not None:
                self._segment(p, now)
            p.switches += 1
            if prev is not None and prev.state is _RUNNING:
                prev.state = _RUNNABLE
                prev.preemptions += 1
            if nxt is not None:
                nxt.state = _RUNNING
                nxt.dispatches += 1
                nxt.processor = p.id
                if nxt.last_pcpu != p.id:
                    if nxt.last_pcpu >= 0:
                        nxt.migrations += 1
                    nxt.last_pcpu = p.id
                if nxt.woken_at is not None:
                    nxt.wake_latency_ns.append(now - nxt.woken_at)
                    nxt.woken_at = None
            p.curr = nxt
            p.since = now
            for o in self.observers:
                o.on_switch(p, prev, nxt, now)
            if prev is not None:
                sched.context_saved(prev)
        elif nxt is not None and nxt.woken_at is not None:
            nxt.wake_latency_ns.append(now - nxt.woken_at)  # kept running through a wake
            nxt.woken_at = None
        end = INFINITY
        if dec.slice_ns is not None:
            if dec.slice_ns <= 0:
                raise SimError(f"t={now}: {sched.name} gave pCPU {p.id} a slice of "
                               f"{dec.slice_ns} ns")
            end = now + dec.slice_ns
        if nxt is not None and now + nxt.work_left < end:
            end = now + nxt.work_left
        if forced and p.inject_until < end:
            end = p.inject_until
        if end < INFINITY:
            p.timer = self.engine.at(end, self._expire_cb[p.id])

    def _expire(self, p: Pcpu) -> None:
        p.timer = None
        now = self.engine.now
        self._account(p, now)
        v = p.curr
        if v is not None and v.work_left <= 0:
            more = v.workload.burst_done(self, v)
            if more > 0:
                v.work_left = more
            else:
                v.state = _BLOCKED
                v.sched.sleep(v)
        self._schedule(p)
