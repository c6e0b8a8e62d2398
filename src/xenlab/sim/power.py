"""A simple power model of a host's pCPUs: :class:`PowerMeter` turns a run into joules.

Design
* A pCPU is in C0 while a vCPU runs on it, at :attr:`PowerModel.busy_w`.
* An idle stretch walks down the C-states (:attr:`PowerModel.cstates`, in
  order of depth): it is in each state from that state's ``after_ns``
  (residency threshold: how long the idle governor waits before it trusts
  the stretch to be long enough) until the next state's, and in the
  deepest one to the end.  So a 100 us idle stays in C1 while a 10 ms one
  spends 600 us in C1 and the rest in C6.
* Forced idle (PowerClamp) goes straight to the deepest state, as
  intel_powerclamp asks MWAIT for the deepest hint, for exactly the forced
  time: the host's ``on_inject`` hook says when a forced stretch starts and
  ends.  Natural idle before it is a stretch of its own (it walked down the
  states until the injection); natural idle after it, when nothing wants
  the pCPU at its end, is a new stretch that walks down from the shallowest
  state (the injection's timer woke the pCPU; the idle governor starts over).
* :class:`PowerMeter` is a host observer (``on_switch``, ``on_inject``) that
  records each pCPU's stretches as they end; :meth:`PowerMeter.report`
  closes the open ones at the end of the run.  Residency is integer
  nanoseconds; energy is watts x seconds (joules).

Defaults (with reasons): a server core of the 2010s, round numbers that
make hand checks easy: 10 W busy, C1 3 W from the first ns (HLT/MWAIT C1
costs nothing to enter), C6 0.5 W after 600 us of idle (a C6 exit costs
tens of microseconds, so governors want a few hundred of residency).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from xenlab.errors import SimError

if TYPE_CHECKING:
    from xenlab.sim.host import Host
    from xenlab.sim.model import Pcpu, Vcpu


@dataclass(frozen=True, slots=True)
class CState:
    """An idle state: its power and how long an idle stretch lasts before it is entered."""

    name: str
    watts: float
    after_ns: int


@dataclass(frozen=True, slots=True)
class PowerModel:
    """Busy watts and the idle C-states, shallow to deep (the first one from 0 ns)."""

    busy_w: float = 10.0
    cstates: tuple[CState, ...] = (CState("C1", 3.0, 0), CState("C6", 0.5, 600_000))
    forced_deepest: bool = True  # PowerClamp's idle goes straight to the deepest state

    def __post_init__(self) -> None:
        if not self.cstates or self.cstates[0].after_ns != 0:
            raise SimError("power model: the first C-state must start at after_ns 0")
        times = [c.after_ns for c in self.cstates]
        if times != sorted(set(times)):
            raise SimError(f"power model: C-state thresholds {times} must strictly increase")
        if self.busy_w < 0 or any(c.watts < 0 for c in self.cstates):
            raise SimError("power model: watts must not be negative")

    @property
    def names(self) -> tuple[str, ...]:
        """"C0" and the idle states' names, in order."""
        return ("C0", *(c.name for c in self.cstates))

    def split_idle(self, length_ns: int, *, forced: bool = False) -> list[int]:
        """How an idle stretch of ``length_ns`` divides among the idle states (ns each)."""
        cs = self.cstates
        out = [0] * len(cs)
        if forced and self.forced_deepest:
            out[-1] = length_ns
            return out
        for i, c in enumerate(cs):
            end = cs[i + 1].after_ns if i + 1 < len(cs) else length_ns
            out[i] = max(0, min(end, length_ns) - c.after_ns)
        return out


@dataclass(frozen=True, slots=True)
class PcpuPower:
    """One pCPU's residency per state (ns, C0 first), energy and average power."""

    id: int
    residency_ns: dict[str, int]
    joules: float
    avg_w: float


@dataclass(frozen=True, slots=True)
class PowerReport:
    """Energy over a run: per pCPU and total."""

    duration_ns: int
    pcpus: tuple[PcpuPower, ...]
    joules: float
    avg_w: float

    def to_json(self) -> dict[str, Any]:
        """JSON-ready values, rounded once (byte-stable for the same run)."""
        return {"duration_ns": self.duration_ns, "joules": round(self.joules, 9),
                "avg_w": round(self.avg_w, 9),
                "pcpus": [{"id": p.id, "residency_ns": dict(p.residency_ns),
                           "joules": round(p.joules, 9), "avg_w": round(p.avg_w, 9)}
                          for p in self.pcpus]}


@dataclass(slots=True)
class _Track:
    """One pCPU's open stretch and its totals so far.

    An idle stretch is forced from ``start`` to ``until`` (if ``until`` is
    later) and natural after that: set by on_switch and on_inject, read by
    _close.
    """

    start: int = 0
    busy: bool = False
    until: int = 0  # the forced part's end (the pCPU's inject_until when last told)
    res: list[int] = field(default_factory=list)  # C0, then each idle state


class PowerMeter:
    """Watches a host's switches and reports energy; attach before the run starts.

    ``meter = PowerMeter(host)``; ``host.run(...)``; ``meter.report()``.
    """

    def __init__(self, host: Host, model: PowerModel | None = None) -> None:
        self.host = host
        self.model = model or PowerModel()
        n = len(self.model.cstates) + 1
        now = host.engine.now
        self._t = [_Track(now, p.curr is not None, p.inject_until, [0] * n)
                   for p in host.pcpus]
        host.observers.append(self)

    def _close(self, t: _Track, now: int) -> None:
        d = now - t.start
        if d <= 0:
            return
        res = t.res
        if t.busy:
            res[0] += d
            return
        forced = min(max(t.until - t.start, 0), d)
        if forced:
            for i, ns in enumerate(self.model.split_idle(forced, forced=True)):
                res[i + 1] += ns
        if d > forced:
            for i, ns in enumerate(self.model.split_idle(d - forced)):
                res[i + 1] += ns

    def on_switch(self, p: Pcpu, prev: Vcpu | None, nxt: Vcpu | None, now: int) -> None:
        """Host observer hook: a stretch of ``p`` ends, a busy or idle one begins."""
        t = self._t[p.id]
        busy = nxt is not None
        if busy == t.busy:
            return  # vCPU to vCPU: still C0
        self._close(t, now)
        t.start = now
        t.busy = busy
        t.until = p.inject_until

    def on_inject(self, p: Pcpu, start: int, end: int) -> None:
        """Host observer hook: ``p`` is forced idle from ``start`` to ``end`` (or no more).

        ``end <= start`` ends a forced stretch early.
        """
        t = self._t[p.id]
        if t.busy:
            return  # the host's reschedule at this instant puts idle on: on_switch sees it
        if end <= start and t.until <= start:
            return  # nothing forced is running: the natural stretch goes on
        self._close(t, start)
        t.start = start
        t.until = end

    def report(self) -> PowerReport:
        """Residency and energy from the start of watching to the host's current time."""
        now = self.host.engine.now
        m = self.model
        watts = (m.busy_w, *(c.watts for c in m.cstates))
        pcpus = []
        span = 0
        for pid, t in enumerate(self._t):
            res = list(t.res)
            tmp = _Track(t.start, t.busy, t.until, res)
            self._close(tmp, now)
            span = max(span, sum(res))
            joules = sum(w * ns for w, ns in zip(watts, res, strict=True)) / 1e9
            total = sum(res)
            pcpus.append(PcpuPower(pid, dict(zip(m.names, res, strict=True)), joules,
                                   joules * 1e9 / total if total else 0.0))
        joules = sum(p.joules for p in pcpus)
        return PowerReport(span, tuple(pcpus), joules, joules * 1e9 / span if span else 0.0)
