"""Shared parts of the EDF schedulers: :class:`EdfQueue`, :class:`CbsServer`, parameter checks.

Private to ``sedf``, ``cbs``, ``mpedf`` and ``rtds``.  An EDF queue is a
sorted list of entries ``(level, deadline, ready_since, index, vcpu)``:

* ``level`` is RTDS's priority level (0 = within budget; each extratime
  refill adds 1); the CBS schedulers leave it at 0.
* ``deadline`` is the absolute deadline (ns).
* ``ready_since`` is when the vCPU last woke (its job was queued): equal
  deadlines go to the one queued first, as the SimSo cross-check expects.
  A preempted vCPU keeps it, so it does not lose its place to a later job.
* ``index`` is the vCPU's position in ``host.vcpus``: the last tie-break,
  and the reason a :class:`~xenlab.sim.model.Vcpu` is never compared.

Insertion and removal are ``bisect`` on a plain list: run queues hold tens
of vCPUs, where a list beats a heap with lazy deletion and keeps order
visible to ``dump``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from xenlab.errors import SimError
from xenlab.sim.engine import NS_PER_US
from xenlab.sim.schedulers.base import ParamError

if TYPE_CHECKING:
    from xenlab.sim.engine import Timer
    from xenlab.sim.model import Domain, Vcpu

Entry = tuple[int, int, int, int, "Vcpu"]

#: Smallest period and budget accepted (10 us, RTDS_MIN_PERIOD/RTDS_MIN_BUDGET):
#: below that a real hypervisor would spend the period scheduling.
MIN_PERIOD_US: Final = 10
MIN_BUDGET_US: Final = 10
#: Largest period (10 s, legacy SEDF's PERIOD_MAX): keeps deadlines far from overflow.
MAX_PERIOD_US: Final = 10_000_000


class EdfQueue:
    """vCPUs sorted by ``(level, deadline, ready_since, index)``; earliest first."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[Entry] = []

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Vcpu]:
        return (e[4] for e in self.items)

    def insert(self, entry: Entry) -> None:
        """Add ``entry`` in order."""
        bisect.insort(self.items, entry)

    def remove(self, entry: Entry) -> None:
        """Take ``entry`` out (it must be there)."""
        items = self.items
        i = bisect.bisect_left(items, entry)
        if i == len(items) or (items[i] is not entry and items[i] != entry):
            raise SimError(f"{entry[4].name} is not on the run queue it was put on")
        del items[i]

    def first(self, pcpu: int) -> Entry | None:
        """The earliest entry whose vCPU may run on ``pcpu``, or None."""
        for e in self.items:
            aff = e[4].affinity
            if aff is None or pcpu in aff:
                return e
        return None


@dataclass(slots=True, eq=False)
class CbsServer:
    """One vCPU's Constant Bandwidth Server (Abeni & Buttazzo 1998): budget Q every T.

    Fields and who touches them:

    * ``deadline``, ``left``: the server's deadline and remaining budget; set
      by :func:`cbs_wake` (the wake-up rule), :meth:`charge` (exhaustion
      postpones the deadline) and :meth:`replenish` (hard variant).
    * ``last_start``: when the vCPU was last chosen; set by do_schedule,
      read by :meth:`charge` (the host's ``pcpu.since`` does not move when
      the same vCPU is chosen again).
    * ``entry``: its run-queue entry while queued; set by enqueue, cleared by
      dequeue/sleep, checked by sleep.
    * ``throttled``: hard reservation only, budget spent and waiting for the
      deadline; set by :meth:`charge`, cleared by :meth:`replenish`,
      checked by wake and do_schedule (a throttled vCPU is never queued).
    * ``rq``: the run queue it belongs to (mpedf) or its pCPU (sedf-cbs);
      set at insert and by migrations.
    """

    budget_ns: int
    period_ns: int
    hard: bool
    index: int
    deadline: int = 0
    left: int = 0
    ready_since: int = 0
    last_start: int = 0
    entry: Entry | None = None
    throttled: bool = False
    timer: Timer | None = None
    rq: int = 0

    @property
    def utilisation(self) -> float:
        """Q / T."""
        return self.budget_ns / self.period_ns

    def key(self, v: Vcpu) -> Entry:
        """Its run-queue entry as of now."""
        return (0, self.deadline, self.ready_since, self.index, v)

    def wake(self, now: int) -> None:
        """CBS's wake-up rule: keep (c, d) unless c >= (d - t) Q / T, then (Q, t + T).

        In integers: ``c * T >= (d - t) * Q``.  No special cases: a deadline
        already past always gives a fresh server job.
        """
        self.ready_since = now
        if self.throttled:
            return
        if self.left * self.period_ns >= (self.deadline - now) * self.budget_ns:
            self.deadline = now + self.period_ns
            self.left = self.budget_ns

    def charge(self, ran: int) -> bool:
        """Take ``ran`` ns off the budget; True when the hard variant throttled it.

        On exhaustion the soft (original) CBS postpones the deadline by T and
        recharges the budget at once; the hard variant waits for the deadline.
        """
        self.left -= ran
        if self.left > 0:
            return False
        if self.hard:
            self.left = 0
            self.throttled = True
            return True
        while self.left <= 0:
            self.deadline += self.period_ns
            self.left += self.budget_ns
        return False

    def replenish(self, now: int) -> None:
        """Hard variant, at the deadline: a full budget and the next deadline."""
        self.throttled = False
        self.timer = None
        self.deadline = max(self.deadline, now) + self.period_ns
        self.left = self.budget_ns


def reservation(sched: str, params: Mapping[str, Any], budget_key: str, *,
                allow_zero_budget: bool = False,
                min_budget_us: int = MIN_BUDGET_US) -> tuple[int, int]:
    """``(budget_ns, period_ns)`` from ``period``/``budget_key`` in microseconds (pure).

    :class:`ParamError` naming the key and the rule for a non-integer,
    negative, zero or too small period, a budget out of range, or a budget
    above the period.
    """
    def num(key: str) -> int:
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(key, f"{sched} {key} must be an integer number of "
                             f"microseconds, not {value!r}")
        return value

    period, budget = num("period"), num(budget_key)
    if period <= 0:
        raise ParamError("period", f"{sched} period must be positive (us), not {period}")
    if not MIN_PERIOD_US <= period <= MAX_PERIOD_US:
        raise ParamError("period", f"{sched} period {period} us is outside "
                         f"[{MIN_PERIOD_US}, {MAX_PERIOD_US}] us")
    if budget < 0:
        raise ParamError(budget_key, f"{sched} {budget_key} must not be negative, not {budget}")
    if budget == 0 and allow_zero_budget:
        return 0, period * NS_PER_US
    if budget < min_budget_us:
        raise ParamError(budget_key, f"{sched} {budget_key} {budget} us is below the "
                         f"minimum of {min_budget_us} us")
    if budget > period:
        raise ParamError(budget_key, f"{sched} {budget_key} {budget} us is above the "
                         f"period {period} us", related=("period",))
    return budget * NS_PER_US, period * NS_PER_US


def flag(sched: str, params: Mapping[str, Any], key: str) -> bool:
    """A boolean parameter (xl's 0/1 accepted; pure); :class:`ParamError` otherwise."""
    value = params[key]
    if value in (0, 1) and not isinstance(value, float):
        return bool(value)
    raise ParamError(key, f"{sched} {key} must be a boolean (or 0/1), not {value!r}")


def check_reservation(dom: Domain, sched: str, params: Mapping[str, Any], budget_key: str,
                      *, allow_zero_budget: bool = False,
                      min_budget_us: int = MIN_BUDGET_US) -> tuple[int, int]:
    """:func:`reservation` for domain ``dom``: its errors name the domain."""
    try:
        return reservation(sched, params, budget_key, allow_zero_budget=allow_zero_budget,
                           min_budget_us=min_budget_us)
    except ParamError as err:
        raise err.for_domain(dom.name) from None


def check_flag(dom: Domain, sched: str, params: Mapping[str, Any], key: str) -> bool:
    """:func:`flag` for domain ``dom``: its errors name the domain."""
    try:
        return flag(sched, params, key)
    except ParamError as err:
        raise err.for_domain(dom.name) from None


#: The key of an idle pCPU in a preemption scan: later than any deadline.
IDLE_KEY: tuple[int, ...] = (1 << 62,)


def preemption_target(order: Iterable[int], tickled: AbstractSet[int],
                      affinity: AbstractSet[int] | None,
                      running_key: Callable[[int, int], tuple[Any, ...] | None], now: int
                      ) -> tuple[int | None, tuple[Any, ...]]:
    """The pCPU a waking vCPU should preempt, scanning ``order``: the first idle one
    (key ``IDLE_KEY``), else the one running the latest key.  pCPUs ``tickled``
    already, outside ``affinity`` or whose ``running_key(c, now)`` is None (forced
    idle) are passed over.  Returns (pCPU or None, its key; () for an idle pCPU)."""
    best: int | None = None
    best_key: tuple[Any, ...] = ()
    for c in order:
        if c in tickled or (affinity is not None and c not in affinity):
            continue
        k = running_key(c, now)
        if k is None:
            continue
        if k is IDLE_KEY:
            return c, ()
        if best is None or k > best_key:
            best, best_key = c, k
    return best, best_key
