"""SEDF rebuilt on Constant Bandwidth Servers, one EDF queue per pCPU: :class:`SedfCbs`.

Phase 2 of the seed idea "Temporal Isolation and Multiprocessor Support in the
SEDF Scheduler": legacy SEDF's blocking special cases replaced by the CBS
rules of Abeni & Buttazzo (1998), so a vCPU with reservation (Q, T) gets Q in
every server period whatever its neighbours do, as long as its pCPU's
reservations add up to at most 1.  Each vCPU is a server run by absolute
deadline, postponed when its budget is spent (throttled instead with
``hard``), with one wake-up rule for every blocking case; it lives on one pCPU
(first fit) and never migrates.  It is
:class:`~xenlab.sim.schedulers.mpedf.MpEdf` with ``runqueue="cpu"`` and no
balancing, kept as its own name; ``period`` and ``budget`` default to RTDS's
(10000 and 4000 us).  The design (the CBS rules, the placement and the queues)
is in docs/schedulers.md, section SEDF on CBS.
"""

from __future__ import annotations

from typing import ClassVar

from xenlab.sim.schedulers.mpedf import MpEdf


class SedfCbs(MpEdf):
    """Per-pCPU EDF over CBS servers; no migrations (see the module notes)."""

    name: ClassVar[str] = "sedf-cbs"

    def __init__(self) -> None:
        super().__init__(runqueue="cpu", balance=False)
