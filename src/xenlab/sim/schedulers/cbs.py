"""SEDF rebuilt on Constant Bandwidth Servers, one EDF queue per pCPU: :class:`SedfCbs`.

Phase 2 of the seed idea "Temporal Isolation and Multiprocessor Support in
the SEDF Scheduler": legacy SEDF's special cases for blocking and
unblocking (:mod:`~xenlab.sim.schedulers.sedf`) replaced by the CBS rules
of Abeni & Buttazzo (1998), which give temporal isolation: a vCPU with
reservation (Q, T) gets Q in every server period whatever its neighbours
do, as long as the reservations on its pCPU add up to at most 1.

Design
    Each vCPU is a server with budget Q (``budget``) every T (``period``):

    * it runs at the server's absolute deadline d, earliest first (EDF);
    * running burns the budget c; when c reaches 0 the deadline is
      postponed, d = d + T, and c = Q at once (``hard`` = True instead
      throttles it until d, then d = d + T, c = Q: a hard reservation);
    * on waking at t: if c >= (d - t) Q / T then d = t + T and c = Q, else
      the server keeps (c, d).  That one rule covers every blocking and
      unblocking case legacy SEDF special-cased.

    Each vCPU lives on one pCPU: its affinity's only pCPU when pinned,
    otherwise the first pCPU (in its affinity) whose reserved utilisation
    still fits, else the least loaded one.  It never migrates.  Equal
    deadlines run in wake order, then vCPU order.

Queue scheme
    Per pCPU one EDF queue of the runnable vCPUs not running; a throttled
    vCPU waits on its own replenishment timer.  It is
    :class:`~xenlab.sim.schedulers.mpedf.MpEdf` with ``runqueue="cpu"`` and
    no balancing, kept as its own name because it is the seed's phase 2.

Parameters (per domain, microseconds as ``xl sched-rtds -p -b``)
    ``period`` (default 10000), ``budget`` (default 4000; RTDS's defaults),
    ``hard`` (default False).  For a periodic rt-app vCPU, budget = run
    time and period = period.
"""

from __future__ import annotations

from typing import ClassVar

from xenlab.sim.schedulers.mpedf import MpEdf


class SedfCbs(MpEdf):
    """Per-pCPU EDF over CBS servers; no migrations (see the module notes)."""

    name: ClassVar[str] = "sedf-cbs"

    def __init__(self) -> None:
        super().__init__(runqueue="cpu", balance=False)
