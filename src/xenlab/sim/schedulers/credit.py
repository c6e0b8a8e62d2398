"""Xen's credit scheduler (credit1): :class:`Credit`, proportional shares by weight, with caps.

The model of xen/common/sched/credit.c, read hook by hook, with Xen's names
(``csched_acct``, ``csched_tick``, ``__runq_tickle``, ``csched_load_balance``,
``_csched_cpu_pick``) so each part maps onto the C: credit handed out every
``tslice_ms`` by weight and cap, BOOST, UNDER and OVER priorities, one run
queue per pCPU re-sorted at the tick, stealing when the head is OVER or idle,
and cpumasks as integer bit masks.  Where the model differs from the C the
design says why; where it follows today's C rather than the intent (the
``__runq_tickle`` kick-away since Xen 4.13, commit 8a04eaa8ea) it does the
same and keeps the test in Xen's form, so the two read alike.  The defaults
are Xen's (``weight`` 256, ``tslice_ms`` 30, ``ratelimit_us`` 1000,
:data:`MIN_TIMER` 50 us).  The design (credits, priorities, tick, wake,
queues, differences and defaults) is in docs/schedulers.md, section Credit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final

from xenlab.sim.engine import NS_PER_MS, NS_PER_US, Timer
from xenlab.sim.model import Domain, Pcpu, RunState, Vcpu
from xenlab.sim.schedulers.base import IDLE, Decision, ParamError, SchedulerBase

if TYPE_CHECKING:
    from xenlab.sim.host import Host

#: Priorities (Xen's CSCHED_PRI_*): higher runs first.
BOOST: Final = 0
UNDER: Final = -1
OVER: Final = -2
IDLE_PRI: Final = -64
PRI_NAMES: Final = {BOOST: "boost", UNDER: "under", OVER: "over", IDLE_PRI: "idle"}

TICKS_PER_TSLICE: Final = 3
MIN_TIMER: Final = 50 * NS_PER_US
#: Xen's credit unit: 10 credits per ms of CPU time, i.e. 100 us each (for dump).
NS_PER_CREDIT: Final = 100 * NS_PER_US

_RUNNING = RunState.RUNNING
_RUNNABLE = RunState.RUNNABLE


@dataclass(slots=True)
class _Dom:
    """Per-domain state (``struct csched_dom``)."""

    weight: int  # set by insert_unit/adjust; read by _acct
    cap: int  # percent of one pCPU, 0 = none; set by insert_unit/adjust; read by _acct
    #: The domain's active vCPUs, the latest activated first as Xen's list_add (a dict as
    #: an ordered set).
    #: Set by _acct_start, cleared by _acct_stop; read by _acct.
    active: dict[_Unit, None] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class _Unit:
    """Per-vCPU state (``struct csched_unit``)."""

    v: Vcpu
    sdom: _Dom
    pri: int = UNDER  # set by _acct (UNDER/OVER), wake (BOOST), _unit_acct (BOOST->UNDER)
    credit: int = 0  # ns of CPU time; +_acct, -_burn
    start: int = 0  # burned up to here while running; set by do_schedule/_burn
    last_sched: int = 0  # when it last left a pCPU; checked by the steal (cache-hot)
    on_runq: bool = False  # set by _runq_insert, cleared by _runq_remove
    parked: bool = False  # set/cleared by _acct (cap); checked by wake/do_schedule
    yielding: bool = False  # set by yield_, cleared when it leaves a run queue
    #: Placed by a pick, not woken from a block: not boosted.  Set by
    #: insert_unit (Xen's csched_res_pick flag), cleared by wake.
    migrating: bool = False
    move_pending: bool = False  # the tick or a tickle wants it elsewhere; do_schedule moves it
    aff_mask: int = 0  # its affinity as a bit mask (the pool's when none); set by insert_unit


@dataclass(slots=True)
class _Pcpu:
    """Per-pCPU state (``struct csched_pcpu``)."""

    runq: list[_Unit] = field(default_factory=list)  # sorted by pri, FIFO within
    sort_last: int = 0  # the accounting epoch of the last sort; checked by _tick
    last_lb: int = -(1 << 62)  # last load balance (for lb_ratelimit)
    idle_bias: int = 0  # where _cpu_pick starts among this core's idle threads
    tick: Timer | None = None  # the 10 ms tick; stopped while idle


def _bits(mask: int) -> list[int]:
    """The pCPUs in ``mask``, lowest first."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def _cycle(n: int, mask: int) -> int:
    """Xen's ``cpumask_cycle``: the first pCPU after ``n`` in ``mask`` (not 0), wrapping."""
    high = mask >> (n + 1)
    if high:
        return n + (high & -high).bit_length()
    return (mask & -mask).bit_length() - 1


class Credit(SchedulerBase):
    """Xen's credit1: weights, caps, BOOST/UNDER/OVER, per-pCPU queues, stealing."""

    name: ClassVar[str] = "credit"
    PARAMS: ClassVar[Mapping[str, Any]] = {"weight": 256, "cap": 0}

    def __init__(self, *, tslice_ms: int = 30, ratelimit_us: int = 1000,
                 lb_ratelimit_us: int = 1000, migration_delay_us: int = 0) -> None:
        super().__init__(tslice_ms=tslice_ms, ratelimit_us=ratelimit_us,
                         lb_ratelimit_us=lb_ratelimit_us,
                         migration_delay_us=migration_delay_us)
        for key, value, lo, hi in (("tslice_ms", tslice_ms, 1, 1000),
                                   ("ratelimit_us", ratelimit_us, 0, 500_000),
                                   ("lb_ratelimit_us", lb_ratelimit_us, 0, 1_000_000),
                                   ("migration_delay_us", migration_delay_us, 0, 100_000)):
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise ParamError(key, f"scheduler credit: option {key} must be an integer in "
                                 f"{lo}..{hi}, not {value!r}")
        self.tslice = tslice_ms * NS_PER_MS
        self.tick_period = self.tslice // TICKS_PER_TSLICE
        # Xen: a rate limit above the slice is undefined and is set to the slice.
        self.ratelimit = min(ratelimit_us * NS_PER_US, self.tslice)
        self.lb_ratelimit = lb_ratelimit_us * NS_PER_US
        self.migr_delay = migration_delay_us * NS_PER_US
        # pCPUs that chose idle (not forced), bit c for pCPU c: set by do_schedule, cleared by
        # do_schedule and tickles (_idle_on/_idle_off).  Masks, as Xen's cpumasks, so a pick
        # or a tickle costs a few integer operations, not a walk over every pCPU.
        self._idle = 0
        self._queued = 0  # pCPUs whose run queue is not empty; _runq_insert/_runq_remove
        self.weight = 0  # sum of weights of active vCPUs (prv->weight)
        self.credit = 0  # credit handed out per period: one period per pCPU
        self.credit_balance = 0  # what the last accounting left over (may be < 0)
        # Domains with active vCPUs, in Xen's order: a newly active domain goes to the head
        # (list_add), and so does one that had credit to spare at an accounting.
        self.active_sdom: list[_Dom] = []
        self.runq_sort = 0  # accounting epoch; pCPUs re-sort once per epoch
        self.last_tickle = 0
        self._pcpus: list[_Pcpu] = []
        self._cpus: list[int] = []
        self._all = 0  # the pool's pCPUs
        self._sib: list[int] = []  # per pCPU: its core's pCPUs (Xen's cpu_sibling_mask)
        self._sock_ix: list[int] = []  # per pCPU: index into _sockets
        self._sockets: list[int] = []  # per socket: its pCPUs (Xen's cpu_core_mask)
        # Hyper-threads only: per socket, per count k of idle threads, the pCPUs of the cores
        # with k idle threads (kept by _idle_on/_idle_off, read by _cpu_pick).
        self._smt = False
        self._core_idle: list[int] = []  # per pCPU's core (indexed by its lowest pCPU)
        self._levels: list[list[int]] = []
        self._nodes: list[list[int]] = []
        self._node_mask: list[int] = []
        self._node_of: list[int] = []
        self._balance_bias: list[int] = []
        self._acct_timer: Timer | None = None

    # -- setup ---------------------------------------------------------------------------

    def attach(self, host: Host, *, cpus: tuple[int, ...] | None = None) -> None:
        super().attach(host, cpus=cpus)
        topo = host.topology
        mine = set(self.pool_cpus)
        self._cpus = list(self.pool_cpus)
        # Indexed by pCPU id; only this pool's entries are used (and given as priv).
        self._pcpus = [_Pcpu() for _ in topo.cpus]
        for c in self._cpus:
            host.pcpus[c].priv = self._pcpus[c]
        def mask(ids: Iterable[int]) -> int:
            return sum(1 << d for d in ids if d in mine)

        self._all = mask(self._cpus)
        self._sib = [mask(d.id for d in topo.cpus if d.core == c.core) for c in topo.cpus]
        sockets = sorted({topo.cpus[c].socket for c in self._cpus})
        self._sockets = [mask(d.id for d in topo.cpus if d.socket == s) for s in sockets]
        self._sock_ix = [sockets.index(c.socket) if c.socket in sockets else 0
                         for c in topo.cpus]
        threads = max(self._sib[c].bit_count() for c in self._cpus)
        self._smt = threads > 1
        self._core_idle = [0] * len(topo.cpus)
        self._levels = [[0] * (threads + 1) for _ in sockets]
        for c in self._cpus:  # every core starts with no idle thread, then all go idle
            if c == (self._sib[c] & -self._sib[c]).bit_length() - 1:
                self._levels[self._sock_ix[c]][0] |= self._sib[c]
        nodes = sorted({topo.cpus[c].node for c in self._cpus})
        self._nodes = [[c for c in self._cpus if topo.cpus[c].node == n] for n in nodes]
        self._node_mask = [mask(ids) for ids in self._nodes]
        self._node_of = [nodes.index(c.node) if c.node in nodes else 0 for c in topo.cpus]
        self._balance_bias = [0] * len(nodes)
        for c in self._cpus:
            self._idle_on(c)
        self.credit = self.tslice * len(self._cpus)
        self._acct_timer = host.engine.at(self.tslice, self._acct)

    def insert_unit(self, v: Vcpu) -> None:
        params = self.params_of(v.dom)
        self._check(v.dom, params)
        if v.dom.priv is None:
            v.dom.priv = _Dom(params["weight"], params["cap"])
        # Xen's insert goes through csched_res_pick, whose flag spares the first wake a BOOST.
        u = _Unit(v, v.dom.priv, migrating=True)
        u.aff_mask = self._all if v.affinity is None else sum(1 << c for c in v.affinity)
        v.priv = u
        v.processor = self._cpu_pick(v, commit=True)

    def remove_unit(self, v: Vcpu) -> None:
        u: _Unit = v.priv
        if u.on_runq:
            self._runq_remove(u)
        u.parked = False
        if u in u.sdom.active:
            self._acct_stop(u)

    def _check(self, dom: Domain, params: Mapping[str, Any]) -> None:
        try:
            self.check_values(params)
        except ParamError as err:
            raise err.for_domain(dom.name) from None

    @classmethod
    def check_values(cls, params: Mapping[str, Any]) -> None:
        """weight in 1..65535 and cap in 0..65535, integers, as ``xl sched-credit`` (pure)."""
        w, cap = params["weight"], params["cap"]
        if not isinstance(w, int) or isinstance(w, bool) or not 1 <= w <= 65535:
            raise ParamError("weight", f"credit weight must be an integer in 1..65535, "
                             f"not {w!r}")
        if not isinstance(cap, int) or isinstance(cap, bool) or not 0 <= cap <= 65535:
            raise ParamError("cap", f"credit cap must be an integer percent in "
                             f"0..65535 (0 = none), not {cap!r}")

    # -- run queues ----------------------------------------------------------------------

    def _runq_insert(self, u: _Unit) -> None:
        """``__runq_insert``: after everything of its priority or higher."""
        runq = self._pcpus[u.v.processor].runq
        pri = u.pri
        i = 0
        n = len(runq)
        while i < n and runq[i].pri >= pri:
            i += 1
        if u.yielding and i < n:
            i += 1  # a yielder goes behind one lower-priority vCPU if it can
        runq.insert(i, u)
        u.on_runq = True
        self._queued |= 1 << u.v.processor

    def _runq_remove(self, u: _Unit) -> None:
        cpu = u.v.processor
        runq = self._pcpus[cpu].runq
        runq.remove(u)
        if not runq:
            self._queued &= ~(1 << cpu)
        u.on_runq = False
        u.yielding = False

    @property
    def idlers(self) -> frozenset[int]:
        """The pCPUs that chose idle and have not been tickled since (for checks and dump)."""
        return frozenset(c for c in self._cpus if self._idle >> c & 1)

    def _idle_on(self, cpu: int) -> None:
        bit = 1 << cpu
        if self._idle & bit:
            return
        self._idle |= bit
        if self._smt:
            self._level_move(cpu, 1)

    def _idle_off(self, cpu: int) -> None:
        bit = 1 << cpu
        if not self._idle & bit:
            return
        self._idle &= ~bit
        if self._smt:
            self._level_move(cpu, -1)

    def _level_move(self, cpu: int, by: int) -> None:
        """One more (``by`` = 1) or one fewer idle thread on ``cpu``'s core."""
        sib = self._sib[cpu]
        core = (sib & -sib).bit_length() - 1
        k = self._core_idle[core]
        levels = self._levels[self._sock_ix[cpu]]
        levels[k] &= ~sib
        levels[k + by] |= sib
        self._core_idle[core] = k + by

    def queued(self, pcpu: int) -> list[Vcpu]:
        """The vCPUs waiting on pCPU ``pcpu``'s run queue, head first (for checks and dump)."""
        return [u.v for u in self._pcpus[pcpu].runq]

    # -- accounting ----------------------------------------------------------------------

    def _burn(self, u: _Unit, now: int) -> None:
        """``burn_credits``: charge the running vCPU for its time since ``start``."""
        d = now - u.start
        if d > 0:
            u.credit -= d
            u.start = now

    def _acct_start(self, u: _Unit) -> None:
        sdom = u.sdom
        if u not in sdom.active:
            sdom.active = {u: None, **sdom.active}
            self.weight += sdom.weight
            if sdom not in self.active_sdom:
                self.active_sdom.insert(0, sdom)

    def _acct_stop(self, u: _Unit) -> None:
        sdom = u.sdom
        del sdom.active[u]
        self.weight -= sdom.weight
        if not sdom.active:
            self.active_sdom.remove(sdom)

    def _acct(self) -> None:
        """``csched_acct``: hand out one period's credit by weight, within peaks and caps."""
        host = self.host
        self._acct_timer = host.engine.after(self.tslice, self._acct)
        weight_total = self.weight
        credit_total = self.credit
        tslice = self.tslice
        if self.credit_balance < 0:  # converge the balance towards 0
            credit_total -= self.credit_balance
        if weight_total == 0:
            self.credit_balance = 0
            return
        weight_left = weight_total
        balance = 0
        xtra = False
        for sdom in list(self.active_sdom):
            n = len(sdom.active)
            weight_left -= sdom.weight * n
            # At most one period per active vCPU, more only while the pool is in debt.
            peak = n * tslice
            if self.credit_balance < 0:
                peak += (-self.credit_balance * sdom.weight * n + weight_total - 1) // weight_total
            cap_per_unit = 0
            if sdom.cap:
                credit_cap = (sdom.cap * tslice + 99) // 100
                peak = min(peak, credit_cap)
                cap_per_unit = (credit_cap + n - 1) // n
            fair = (credit_total * sdom.weight * n + weight_total - 1) // weight_total
            if fair < peak:
                xtra = True
            else:
                if weight_left:
                    # What this domain cannot use goes to the ones after it.
                    credit_total += ((fair - peak) * weight_total + weight_left - 1) // weight_left
                if xtra:
                    # Lazily keep the domains that had extra at the head of the list.
                    self.active_sdom.remove(sdom)
                    self.active_sdom.insert(0, sdom)
                fair = peak
            fair = (fair + n - 1) // n
            for u in list(sdom.active):
                u.credit += fair
                credit = u.credit
                if credit < 0:
                    u.pri = OVER
                    if sdom.cap and credit < -cap_per_unit and not u.parked:
                        self._park(u)
                    if credit < -tslice:
                        credit = u.credit = -tslice
                else:
                    u.pri = UNDER
                    if u.parked:
                        self._unpark(u)
                    if credit > tslice:
                        # It stops earning; it restarts with half, a little ahead.
                        self._acct_stop(u)
                        credit = u.credit = credit // 2
                balance += credit
        self.credit_balance = balance
        self.runq_sort += 1

    def _park(self, u: _Unit) -> None:
        """Xen pauses a capped-out vCPU: off its queue, off its pCPU."""
        u.parked = True
        v = u.v
        if u.on_runq:
            self._runq_remove(u)
        elif v.state is _RUNNING:
            self.host.tickle(v.processor)

    def _unpark(self, u: _Unit) -> None:
        """Unpause: a runnable vCPU goes back on its queue (not boosted, as Xen)."""
        u.parked = False
        v = u.v
        if v.state is _RUNNABLE and not u.on_runq and self.host.pcpus[v.processor].curr is not v:
            self._runq_insert(u)
            self._runq_tickle(u)

    def _tick(self, cpu: int) -> None:
        """``csched_tick``: account the running vCPU, re-sort the queue after an accounting."""
        host = self.host
        now = host.engine.now
        st = self._pcpus[cpu]
        st.tick = host.engine.at(now + self.tick_period, lambda: self._tick(cpu))
        v = host.pcpus[cpu].curr
        if v is not None:
            self._unit_acct(v.priv, cpu, now)
        if st.sort_last != self.runq_sort:
            st.sort_last = self.runq_sort
            runq = st.runq
            # A stable partition: UNDER (and BOOST) ahead of OVER.
            runq[:] = [u for u in runq if u.pri >= UNDER] + [u for u in runq if u.pri < UNDER]

    def _unit_acct(self, u: _Unit, cpu: int, now: int) -> None:
        """``csched_unit_acct``: end a BOOST, burn, activate, or look for a better pCPU."""
        if u.pri == BOOST:
            u.pri = UNDER
        self._burn(u, now)
        if u not in u.sdom.active:
            self._acct_start(u)
        elif not u.move_pending:
            new = self._cpu_pick(u.v, commit=False)
            if new != cpu:
                u.move_pending = True
                self.host.tickle(cpu)

    # -- placement -----------------------------------------------------------------------

    def _cpu_pick(self, v: Vcpu, *, commit: bool) -> int:
        """``_csched_cpu_pick``: stay if idle, else the idle pCPU with the most idle neighbours.

        Xen walks the candidate idlers one by one from ``cpu``: a candidate whose core
        (same socket) or socket (another socket, which must be twice as idle) has more
        idle threads than ``cpu``'s becomes ``cpu``; any other is dropped with its idle
        neighbours.  A dropped candidate can never win later (``cpu`` only moves to
        more idle cores and sockets), so the walk is the same as jumping to the first
        candidate after ``cpu`` that wins, computed with masks; the jumps number at
        most a few (threads per core, then log2 of the pCPUs across sockets).
        """
        u: _Unit = v.priv
        allowed = u.aff_mask
        here = v.processor
        cpu = here if allowed >> here & 1 else _cycle(here, allowed)
        idle = self._idle
        if (cpu == here and not idle >> cpu & 1 and not self._pcpus[cpu].runq
                and self.host.pcpus[cpu].curr is v):
            # v itself is all that runs here: as good as idle.  _levels does not count it,
            # which cannot matter: this core is where the walk starts, so it is never one
            # that wins (cpu only ever moves to cores with more idle threads).
            idle |= 1 << cpu
        cand = idle & allowed
        if cand and not cand >> cpu & 1:
            cpu = _cycle(cpu, cand)
        cand &= ~(1 << cpu)
        sockets = self._sockets
        bias_owner = -1
        while cand:
            s_ix = self._sock_ix[cpu]
            here_sock = sockets[s_ix]
            win = 0
            if cand & ~here_sock:  # other sockets: twice as many idle threads
                need = 2 * (idle & here_sock).bit_count()
                for i, m in enumerate(sockets):
                    if i != s_ix and cand & m and (idle & m).bit_count() > need:
                        win |= cand & m
            if self._smt and cand & here_sock:  # this socket: more idle threads on a core
                levels = self._levels[s_ix]
                have = (idle & self._sib[cpu]).bit_count()
                for k in range(have + 1, len(levels)):
                    win |= levels[k] & cand
            if not win:
                break
            nxt = _cycle(cpu, win)
            group = self._sib[nxt] if here_sock >> nxt & 1 else sockets[self._sock_ix[nxt]]
            bias_owner = nxt
            cpu = _cycle(self._pcpus[nxt].idle_bias, idle & group & cand)
            cand &= ~self._sib[cpu]
        if commit and bias_owner >= 0:
            self._pcpus[bias_owner].idle_bias = cpu
        return cpu

    def pick_resource(self, v: Vcpu) -> int:
        return self._cpu_pick(v, commit=True)

    def _runq_tickle(self, new: _Unit) -> None:
        """``__runq_tickle``: wake the pCPU(s) that should run ``new`` now."""
        host = self.host
        cpu = new.v.processor
        p = host.pcpus[cpu]
        cur = p.curr
        if p.inject_until > host.engine.now:
            cur_pri = BOOST  # forced idle runs at BOOST in Xen: nothing preempts it
        else:
            cur_pri = IDLE_PRI if cur is None else cur.priv.pri
        idle = self._idle
        target = -1
        if cur_pri == IDLE_PRI or (not idle and new.pri > cur_pri):
            target = cpu
        elif idle:
            suitable = idle & new.aff_mask
            if not suitable:
                if new.pri > cur_pri:
                    # Xen kicks cur over to an idler if the hard affinity it tests meets
                    # the idlers: since 4.13 that is new's (here known to meet none of
                    # them), so cur stays (see "Where this model differs").
                    if cur is not None and idle & new.aff_mask:
                        cu: _Unit = cur.priv
                        cu.move_pending = True
                    target = cpu
            else:
                self.last_tickle = _cycle(self.last_tickle, suitable)
                target = self.last_tickle
        if target >= 0:
            self._idle_off(target)
            host.tickle(target)

    # -- hooks ---------------------------------------------------------------------------

    def wake(self, v: Vcpu) -> None:
        u: _Unit = v.priv
        if u.on_runq or self.host.pcpus[v.processor].curr is v:
            return
        if u.parked:
            return  # paused by its cap: it comes back at the accounting that unparks it
        migrating = u.migrating
        u.migrating = False
        if not migrating and u.pri == UNDER:
            u.pri = BOOST  # a waker with credit: low wake-up latency
        self._runq_insert(u)
        self._runq_tickle(u)

    def sleep(self, v: Vcpu) -> None:
        u: _Unit = v.priv
        if u.on_runq:
            self._runq_remove(u)

    def yield_(self, v: Vcpu) -> None:
        u: _Unit = v.priv
        u.yielding = True

    def do_schedule(self, pcpu: Pcpu, now: int, idle_forced: bool) -> Decision:
        """``csched_schedule``: rate limit, re-queue, pick the head or steal, keep the tick."""
        cpu = pcpu.id
        st: _Pcpu = pcpu.priv
        prev = pcpu.curr
        pu: _Unit | None = None
        mover: _Unit | None = None
        if prev is not None:
            pu = prev.priv
            assert pu is not None
            self._burn(pu, now)
            pu.last_sched = now
            runnable = prev.state is _RUNNING and not pu.parked
            if runnable and pu.move_pending:
                runnable = False
                mover = pu
            if (runnable and not idle_forced and not pu.yielding and self.ratelimit
                    and now - pcpu.since < self.ratelimit):
                pu.start = now
                return Decision(prev, max(self.ratelimit - (now - pcpu.since), MIN_TIMER))
            if runnable:
                self._runq_insert(pu)
        runq = st.runq
        snext: _Unit | None
        if idle_forced:
            snext = None
        else:
            pri = runq[0].pri if runq else IDLE_PRI
            if pri == IDLE_PRI or (pri <= OVER and now - st.last_lb > self.lb_ratelimit):
                st.last_lb = now
                snext = self._load_balance(cpu, pri)
                if snext is None and runq:
                    snext = runq[0]
                    self._runq_remove(snext)
            else:
                snext = runq[0]
                self._runq_remove(snext)
        if snext is None and not idle_forced:
            self._idle_on(cpu)
        else:
            self._idle_off(cpu)
        if mover is not None:
            self._migrate(mover)
        if snext is None:
            if prev is not None and st.tick is not None:
                st.tick.cancel()
                st.tick = None
            return IDLE
        snext.start = now
        if st.tick is None:
            period = self.tick_period
            st.tick = self.host.engine.at(now + period - now % period,
                                          lambda: self._tick(cpu))
        return Decision(snext.v, self.tslice)

    def _migrate(self, u: _Unit) -> None:
        """Xen's ``_VPF_migrating``: off this pCPU, re-picked, queued and tickled there."""
        u.move_pending = False
        v = u.v
        v.processor = self._cpu_pick(v, commit=True)
        self._runq_insert(u)  # straight on the queue: a migration is no wake-up, no BOOST
        self._runq_tickle(u)

    def _load_balance(self, cpu: int, pri: int) -> _Unit | None:
        """``csched_load_balance``: steal strictly better work from a busy peer, near first."""
        host = self.host
        now = host.engine.now
        pcpus = host.pcpus
        node = self._node_of[cpu]
        nnodes = len(self._nodes)
        busy = self._queued & ~self._idle & ~(1 << cpu)
        for k in range(nnodes):
            peer_node = (node + k) % nnodes
            workers = busy & self._node_mask[peer_node]
            # Peers with queued work, from the one after the last stolen from, wrapping.
            bias = self._balance_bias[peer_node] + 1
            for peer in _bits(workers >> bias << bias) + _bits(workers & ((1 << bias) - 1)):
                if pcpus[peer].curr is None:
                    continue
                for su in self._pcpus[peer].runq:
                    if su.pri <= pri:
                        break  # nothing better than what we have, further down
                    if su.yielding:
                        continue
                    sv = su.v
                    if sv.affinity is not None and cpu not in sv.affinity:
                        continue
                    if self.migr_delay and now - su.last_sched < self.migr_delay:
                        continue  # cache-hot over there
                    self._runq_remove(su)
                    sv.processor = cpu
                    self._balance_bias[peer_node] = peer
                    return su
        return None

    # -- control -------------------------------------------------------------------------

    def adjust(self, dom: Domain, params: Mapping[str, Any]) -> dict[str, Any]:
        """``xl sched-credit -d dom -w W -c C``: from the next accounting on."""
        merged = {**dom.params, **params}
        probe = Domain(dom.id, dom.name, merged)
        full = self.params_of(probe)
        self._check(dom, full)
        dom.params = merged
        sdom: _Dom | None = dom.priv
        if sdom is not None:
            n = len(sdom.active)
            self.weight += (full["weight"] - sdom.weight) * n
            sdom.weight = full["weight"]
            sdom.cap = full["cap"]
        return self.params_of(dom)

    def dump(self) -> dict[str, Any]:
        """``xl debug-keys r`` for credit: globals, per-pCPU queues, per-domain credits."""
        host = self.host

        def unit(v: Vcpu) -> dict[str, Any]:
            u: _Unit = v.priv
            return {"vcpu": v.name, "pri": PRI_NAMES[u.pri], "credit": u.credit // NS_PER_CREDIT,
                    "credit_ns": u.credit, "parked": u.parked,
                    "active": u in u.sdom.active}

        return {
            "scheduler": self.name,
            "tslice_ns": self.tslice, "tick_ns": self.tick_period,
            "ratelimit_ns": self.ratelimit, "weight": self.weight,
            "credit_balance_ns": self.credit_balance,
            "idlers": sorted(self.idlers),
            "pcpus": [{"id": p.id, "curr": unit(p.curr) if p.curr else None,
                       "runq": [unit(u.v) for u in self._pcpus[p.id].runq]}
                      for p in (host.pcpus[c] for c in self._cpus)],
            "domains": [{"name": d.name, "weight": d.priv.weight, "cap": d.priv.cap,
                         "vcpus": [unit(v) for v in d.vcpus]}
                        for d in host.domains
                        if d.priv is not None and d.vcpus and d.vcpus[0].sched is self],
        }
