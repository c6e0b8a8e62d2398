"""Legacy SEDF, as in Xen before its removal in 4.6 (xen/common/sched_sedf.c): :class:`Sedf`.

The baseline the seed idea "Temporal Isolation and Multiprocessor Support in
the SEDF Scheduler" complains about, modelled rule for rule (read, not copied)
so its rough edges show in numbers: per-pCPU EDF of a ``slice`` every
``period``, extratime in 500 us quanta (the penalty queue, then the
utilisation queue), and the special cases on wake-up (first wake, short block,
long block) that CBS replaces.  A vCPU is placed once by vCPU id and never
migrates; the running vCPU stays on its queues and equal keys keep insertion
order, as in Xen; latency scaling and weights are left out.  Keep the special
cases as they are: they are what the model exists to show.  The design (the
special cases, the queues and the parameters) is in docs/schedulers.md,
section SEDF.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final

from xenlab.errors import SimError
from xenlab.sim.engine import NS_PER_US
from xenlab.sim.model import RunState
from xenlab.sim.schedulers._edf import flag, reservation
from xenlab.sim.schedulers.base import IDLE, Decision, ParamError, SchedulerBase

if TYPE_CHECKING:
    from collections.abc import Mapping

    from xenlab.sim.model import Domain, Pcpu, Vcpu

_RUNNING = RunState.RUNNING
#: An extratime run (EXTRA_QUANTUM): short enough to share slack fairly,
#: long enough not to reschedule constantly.
EXTRA_QUANTUM: Final = 500 * NS_PER_US
#: Smallest slice (SLICE_MIN): scheduling overhead.
SLICE_MIN_US: Final = 5
#: Score scale of the utilisation queue for a best-effort vCPU (1 << 17 / extraweight 1).
_BEST_EFFORT_STRIDE: Final = 1 << 17

_EDF, _PEN, _UTIL = 0, 1, 2
_Item = tuple[int, int, "Vcpu"]


class _Sorted:
    """A list kept sorted by (key, insertion serial)."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[_Item] = []

    def add(self, item: _Item) -> _Item:
        bisect.insort(self.items, item)
        return item

    def drop(self, item: _Item) -> None:
        i = bisect.bisect_left(self.items, item)
        if i == len(self.items) or self.items[i] != item:
            raise SimError(f"{item[2].name} is not on the SEDF queue it was put on")
        del self.items[i]

    def head(self) -> Vcpu | None:
        return self.items[0][2] if self.items else None


@dataclass(slots=True, eq=False)
class _Info:
    """Per-vCPU state (Xen's sedf_vcpu_info); who sets and checks each field is noted."""

    period: int
    slice: int
    extra_aware: bool  # extratime parameter
    pcpu: int  # where it lives; set at insert
    deadl: int = 0  # absolute deadline; wake, desched_edf, update_queues
    cputime: int = 0  # real-time run this period; desched_*, wake
    sched_start: int = 0  # when it was last chosen; do_schedule
    block_abs: int = 0  # when it last blocked; do_schedule, read by wake
    mode: int = _EDF  # how it runs now (EDF or one of the extra queues); do_schedule
    want_pen: bool = False  # owed penalty extratime; short-block wake, desched_extra
    short_block_lost: int = 0
    pen_score: int = 0
    # Xen's score[EXTRA_UTIL_Q], relative to the utilisation queue's base (see _Cpu): its
    # stride after an extratime run (desched_extra); frozen while off the queue, so a vCPU
    # that joins late or wakes after a long block comes back at most one stride ahead of
    # the others, not with the pass it had when it left.  Read and written by _util_add/_del.
    util_score: int = 0
    edf_item: _Item | None = None  # on runq or waitq (which: edf_on_runq)
    edf_on_runq: bool = False
    pen_item: _Item | None = None
    util_item: _Item | None = None
    extra_ns: int = 0  # extratime received (statistics)

    @property
    def period_begin(self) -> int:
        return self.deadl - self.period


@dataclass(slots=True)
class _Cpu:
    runq: _Sorted = field(default_factory=_Sorted)
    waitq: _Sorted = field(default_factory=_Sorted)
    penq: _Sorted = field(default_factory=_Sorted)
    utilq: _Sorted = field(default_factory=_Sorted)
    slice_expires: int = 0  # current_slice_expires; do_schedule, read by wake
    # What Xen subtracts from every score on the utilisation queue after an extratime run
    # (extraq_add_sort_update's ``sub``), added here once instead: an entry's key is its
    # score plus the base at the time it was queued.  Raised by desched_extra.
    util_base: int = 0


class Sedf(SchedulerBase):
    """Legacy SEDF: per-pCPU EDF with period/slice, special-cased blocking, extratime."""

    name: ClassVar[str] = "sedf"
    PARAMS: ClassVar[Mapping[str, Any]] = {"period": 100_000, "slice": 0, "extratime": True}

    def __init__(self) -> None:
        super().__init__()
        self.cpus: list[_Cpu] = []
        self._serial = itertools.count()

    def _cpu(self, c: int) -> _Cpu:
        if not self.cpus:
            self.cpus = [_Cpu() for _ in self.host.pcpus]
        return self.cpus[c]

    # -- queues --------------------------------------------------------------------

    def _item(self, key: int, v: Vcpu) -> _Item:
        return (key, next(self._serial), v)

    def _edf_del(self, v: Vcpu, inf: _Info) -> None:
        if inf.edf_item is not None:
            cpu = self._cpu(inf.pcpu)
            (cpu.runq if inf.edf_on_runq else cpu.waitq).drop(inf.edf_item)
            inf.edf_item = None

    def _to_runq(self, v: Vcpu, inf: _Info) -> None:
        inf.edf_item = self._cpu(inf.pcpu).runq.add(self._item(inf.deadl, v))
        inf.edf_on_runq = True

    def _to_waitq(self, v: Vcpu, inf: _Info) -> None:
        inf.edf_item = self._cpu(inf.pcpu).waitq.add(self._item(inf.period_begin, v))
        inf.edf_on_runq = False

    def _pen_add(self, v: Vcpu, inf: _Info) -> None:
        if inf.pen_item is None:
            inf.pen_item = self._cpu(inf.pcpu).penq.add(self._item(inf.pen_score, v))

    def _pen_del(self, inf: _Info) -> None:
        if inf.pen_item is not None:
            self._cpu(inf.pcpu).penq.drop(inf.pen_item)
            inf.pen_item = None

    def _util_add(self, v: Vcpu, inf: _Info) -> None:
        if inf.util_item is None:
            cpu = self._cpu(inf.pcpu)
            inf.util_item = cpu.utilq.add(self._item(inf.util_score + cpu.util_base, v))

    def _util_del(self, inf: _Info) -> None:
        if inf.util_item is not None:
            cpu = self._cpu(inf.pcpu)
            cpu.utilq.drop(inf.util_item)
            inf.util_score = inf.util_item[0] - cpu.util_base
            inf.util_item = None

    # -- units ---------------------------------------------------------------------

    @classmethod
    def check_values(cls, params: Mapping[str, Any]) -> None:
        """What :meth:`_info` checks (pure)."""
        cls._reservation(params)

    @classmethod
    def _reservation(cls, params: Mapping[str, Any]) -> tuple[int, int, bool]:
        """``(slice_ns, period_ns, extratime)``; :class:`ParamError` naming the key."""
        extra = flag(cls.name, params, "extratime")
        sl, period = reservation(cls.name, params, "slice", allow_zero_budget=True,
                                 min_budget_us=SLICE_MIN_US)
        if sl == 0 and not extra:
            raise ParamError("slice", "sedf slice 0 (best effort) needs extratime",
                             related=("extratime",))
        return sl, period, extra

    def _info(self, dom: Domain, pcpu: int) -> _Info:
        params = self.params_of(dom)
        try:
            sl, period, extra = self._reservation(params)
        except ParamError as err:
            raise err.for_domain(dom.name) from None
        return _Info(period, sl, extra, pcpu)

    def insert_unit(self, v: Vcpu) -> None:
        # sedf_pick_cpu: cycle from (vcpu_id % weight - 1) over the allowed pCPUs.
        allowed = sorted(v.affinity) if v.affinity is not None else list(
            range(len(self.host.pcpus)))
        start = v.id % len(allowed) - 1
        pcpu = next((c for c in allowed if c > start), allowed[0])
        v.priv = self._info(v.dom, pcpu)
        v.processor = pcpu

    def pick_resource(self, v: Vcpu) -> int:
        inf: _Info = v.priv
        return inf.pcpu

    # -- hooks ---------------------------------------------------------------------

    def sleep(self, v: Vcpu) -> None:
        inf: _Info = v.priv
        if self.host.pcpus[inf.pcpu].curr is v:
            return  # the host reschedules; desched_* takes it off the queues
        self._edf_del(v, inf)
        self._pen_del(inf)
        self._util_del(inf)

    def wake(self, v: Vcpu) -> None:
        inf: _Info = v.priv
        if inf.edf_item is not None:
            return
        now = self.host.engine.now
        if inf.deadl == 0:
            inf.deadl = now + inf.slice  # the initial special case
        if now < inf.period_begin:
            if inf.want_pen:
                self._pen_add(v, inf)
        elif now < inf.deadl:
            self._unblock_short(v, inf)
        else:
            inf.deadl = now + inf.period  # long block, case 2b
            inf.cputime = 0
        if inf.extra_aware:
            self._util_add(v, inf)
        if inf.period_begin > now:
            self._to_waitq(v, inf)
        else:
            self._to_runq(v, inf)
        if self._should_switch(v, inf):
            self.host.tickle(inf.pcpu)

    def _unblock_short(self, v: Vcpu, inf: _Info) -> None:
        inf.deadl += inf.period  # no more real-time execution in this period
        if inf.block_abs:
            inf.short_block_lost = max(0, inf.slice - inf.cputime)
            if inf.short_block_lost:
                inf.pen_score = (inf.period << 10) // inf.short_block_lost
                self._pen_del(inf)
                inf.want_pen = True
                self._pen_add(v, inf)
        inf.cputime = 0

    def _should_switch(self, v: Vcpu, inf: _Info) -> bool:
        p = self.host.pcpus[inf.pcpu]
        cur = p.curr
        if cur is None or cur.state is not _RUNNING:
            return True
        if inf.period_begin < self._cpu(inf.pcpu).slice_expires:
            return True
        ci: _Info = cur.priv
        if ci.mode == _EDF:
            return False
        if ci.mode == _PEN:
            return inf.want_pen and inf.pen_score < ci.pen_score
        return inf.want_pen

    def do_schedule(self, pcpu: Pcpu, now: int, idle_forced: bool) -> Decision:
        cpu = self._cpu(pcpu.id)
        prev = pcpu.curr
        if prev is not None:
            inf: _Info = prev.priv
            if prev.state is not _RUNNING:
                inf.block_abs = now
            if inf.mode == _EDF:
                self._desched_edf(now, prev, inf)
            else:
                self._desched_extra(now, prev, inf)
        self._update_queues(now, cpu)
        if idle_forced or (not cpu.runq.items and not cpu.waitq.items):
            cpu.slice_expires = now
            return IDLE
        nxt = cpu.runq.head()
        if nxt is not None:
            ni: _Info = nxt.priv
            ni.mode = _EDF
            time = ni.slice - ni.cputime
            w = cpu.waitq.head()
            if w is not None:
                time = min(time, w.priv.period_begin - now)
        else:
            w = cpu.waitq.head()
            assert w is not None
            nxt, time = self._extra_schedule(now, w.priv.period_begin, cpu)
        if time <= 0:
            time = EXTRA_QUANTUM  # "seriously BEHIND schedule"
        cpu.slice_expires = now + time
        if nxt is not None:
            nxt.priv.sched_start = now
        return Decision(nxt, time)

    def _extra_schedule(self, now: int, end_xt: int, cpu: _Cpu) -> tuple[Vcpu | None, int]:
        if end_xt - now < EXTRA_QUANTUM:
            return None, end_xt - now
        for q, mode in ((cpu.penq, _PEN), (cpu.utilq, _UTIL)):
            v = q.head()
            if v is not None:
                v.priv.mode = mode
                return v, EXTRA_QUANTUM
        return None, end_xt - now

    def _desched_edf(self, now: int, v: Vcpu, inf: _Info) -> None:
        inf.cputime += now - inf.sched_start
        runnable = v.state is _RUNNING
        if inf.cputime < inf.slice and runnable:
            return
        self._edf_del(v, inf)
        if inf.cputime >= inf.slice:
            inf.cputime -= inf.slice
            inf.deadl += inf.period
        if runnable:
            self._to_waitq(v, inf)
        else:
            self._pen_del(inf)
            self._util_del(inf)

    def _desched_extra(self, now: int, v: Vcpu, inf: _Info) -> None:
        mode, inf.mode = inf.mode, _EDF
        inf.cputime = 0  # "fresh slice for the next run"
        inf.extra_ns += now - inf.sched_start
        runnable = v.state is _RUNNING
        if mode == _PEN:
            self._pen_del(inf)
            inf.short_block_lost = 0  # compensated: off the penalty queue
            inf.want_pen = False
        else:
            self._util_del(inf)
            # Everyone queued moves up by the runner's old score (it was the lowest, so
            # none goes negative); the runner goes back with its stride.
            self._cpu(inf.pcpu).util_base += inf.util_score
            inf.util_score = ((inf.period << 10) // inf.slice if inf.slice
                              else _BEST_EFFORT_STRIDE)
            if runnable and inf.extra_aware:
                self._util_add(v, inf)
        if not runnable:
            self._edf_del(v, inf)
            self._pen_del(inf)
            self._util_del(inf)

    def _update_queues(self, now: int, cpu: _Cpu) -> None:
        while cpu.waitq.items and cpu.waitq.items[0][0] <= now:
            v = cpu.waitq.items[0][2]
            inf: _Info = v.priv
            self._edf_del(v, inf)
            self._to_runq(v, inf)
        while cpu.runq.items:
            v = cpu.runq.items[0][2]
            inf = v.priv
            if inf.slice == 0:
                self._edf_del(v, inf)
                inf.deadl += inf.period
                if inf.period_begin < now:
                    inf.deadl += -(-(now - inf.period_begin) // inf.period) * inf.period
                self._to_waitq(v, inf)
            elif inf.deadl < now or inf.cputime > inf.slice:
                self._edf_del(v, inf)
                inf.deadl += inf.period
                if inf.deadl < now:
                    inf.deadl += -(-(now - inf.deadl) // inf.period) * inf.period
                inf.cputime = 0
                if inf.period_begin > now:
                    self._to_waitq(v, inf)
                else:
                    self._to_runq(v, inf)
            else:
                break

    def dump(self) -> dict[str, Any]:
        def names(q: _Sorted) -> list[str]:
            return [it[2].name for it in q.items]
        return {"scheduler": self.name,
                "pcpus": {i: {"runq": names(c.runq), "waitq": names(c.waitq),
                              "penq": names(c.penq), "utilq": names(c.utilq)}
                          for i, c in enumerate(self.cpus)}}
