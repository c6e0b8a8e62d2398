"""The scheduler models, by the name xl and Xen's ``sched=`` use: :data:`SCHEDULERS`.

An explicit registry (no registration by import side effect): each entry maps
a name to the class; :func:`make` builds one with its options.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from xenlab.errors import SimError
from xenlab.sim.schedulers.base import Decision, Scheduler, SchedulerBase
from xenlab.sim.schedulers.cbs import SedfCbs
from xenlab.sim.schedulers.credit import Credit
from xenlab.sim.schedulers.mpedf import MpEdf
from xenlab.sim.schedulers.null import Null
from xenlab.sim.schedulers.rtds import Rtds
from xenlab.sim.schedulers.sedf import Sedf

SCHEDULERS: Mapping[str, Callable[..., Scheduler]] = {
    "credit": Credit,
    "null": Null,
    "sedf": Sedf,
    "sedf-cbs": SedfCbs,
    "mpedf": MpEdf,
    "rtds": Rtds,
}


def make(name: str, **options: Any) -> Scheduler:
    """A new scheduler ``name`` with ``options``; SimError naming the known ones."""
    try:
        cls = SCHEDULERS[name]
    except KeyError:
        known = ", ".join(sorted(SCHEDULERS))
        raise SimError(f"unknown scheduler {name!r} (expected one of {known})") from None
    return cls(**options)


__all__ = ["SCHEDULERS", "Decision", "Scheduler", "SchedulerBase", "make"]
