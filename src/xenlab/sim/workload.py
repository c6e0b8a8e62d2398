"""What a vCPU does: :class:`Workload` and the built-in kinds (periodic, sporadic, hog, ...).

A workload is a small state machine the host drives.  ``start`` arms its
first activation on the engine; an activation calls ``host.activate(v,
work_ns)``, which gives a blocked vCPU a burst of CPU work and wakes it.
When the burst is done the host calls ``burst_done``: the answer is the next
burst (the vCPU keeps running) or 0 (it blocks until the next activation).
Jobs, deadlines and response times are the workload's to count, on the
vCPU's counters (``jobs``, ``misses``, ``response_ns``).

The kinds follow rt-app and cyclictest where they fit:

* :class:`Periodic`: rt-app's ``run`` + ``timer`` (absolute period), a job
  per period with a relative deadline (the period by default).  A job that
  is released while the previous one still runs waits behind it, as in
  rt-app; a job finished after its absolute deadline is a miss.  ``run_ns``
  above the scheduler's budget makes it a misbehaving (overrunning) guest.
* :class:`Sporadic`: jobs at random gaps of at least ``min_gap_ns``.
* :class:`Hog`: always has work.
* :class:`IoBound`: short bursts and blocking waits, exponentially drawn.
* :class:`CyclicProbe`: cyclictest: wake every ``interval_ns`` on an
  absolute timer, run a few microseconds; the host's wake-up latency of
  the vCPU is what it measures.

Randomness comes from ``host.engine.rng`` only.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from xenlab.sim.host import Host
    from xenlab.sim.model import Vcpu

#: A hog's burst: longer than any run (the host never sees it end).
FOREVER = 1 << 60


class Workload(Protocol):
    """What the host calls on a vCPU's workload."""

    def start(self, host: Host, v: Vcpu) -> None:
        """Arm the first activation (the vCPU is blocked until then)."""

    def burst_done(self, host: Host, v: Vcpu) -> int:
        """The burst ended now: the next one (ns, keep running) or 0 (block)."""
        ...

    def finish(self, host: Host, v: Vcpu) -> None:
        """The run ends now: count what is still pending (a job past its deadline)."""


class Periodic:
    """rt-app's periodic task: ``run_ns`` of work every ``period_ns`` from ``offset_ns``."""

    __slots__ = ("_release_cb", "backlog", "current", "deadline_ns", "offset_ns", "period_ns",
                 "run_ns")

    def __init__(self, run_ns: int, period_ns: int, *, deadline_ns: int | None = None,
                 offset_ns: int = 0) -> None:
        self.run_ns = run_ns
        self.period_ns = period_ns
        self.deadline_ns = period_ns if deadline_ns is None else deadline_ns
        self.offset_ns = offset_ns
        self.current: int | None = None  # release time of the job being run
        self.backlog: deque[int] = deque()  # releases waiting behind it

    def start(self, host: Host, v: Vcpu) -> None:
        # One bound callback for every release of the run (not a closure per job).
        self._release_cb = lambda: self._release(host, v)
        host.engine.at(self.offset_ns, self._release_cb)

    def _gap(self, host: Host) -> int:
        """How long until the next release."""
        return self.period_ns

    def _release(self, host: Host, v: Vcpu) -> None:
        now = host.engine.now
        host.engine.at(now + self._gap(host), self._release_cb)
        v.jobs += 1
        if self.current is None:
            self.current = now
            host.activate(v, self.run_ns)
        else:
            self.backlog.append(now)

    def burst_done(self, host: Host, v: Vcpu) -> int:
        now = host.engine.now
        assert self.current is not None
        self._complete(v, self.current, now)
        if self.backlog:
            self.current = self.backlog.popleft()
            return self.run_ns
        self.current = None
        return 0

    def _complete(self, v: Vcpu, release: int, now: int) -> None:
        v.response_ns.append(now - release)
        if now > release + self.deadline_ns:
            v.misses += 1

    def finish(self, host: Host, v: Vcpu) -> None:
        now = host.engine.now
        for release in ([self.current] if self.current is not None else []) + list(self.backlog):
            if release + self.deadline_ns < now:
                v.misses += 1


class Sporadic(Periodic):
    """Jobs of ``run_ns`` at random gaps between ``min_gap_ns`` and ``max_gap_ns``
    (deadline: ``min_gap_ns`` unless given)."""

    __slots__ = ("max_gap_ns",)

    def __init__(self, run_ns: int, min_gap_ns: int, max_gap_ns: int, *,
                 deadline_ns: int | None = None, offset_ns: int = 0) -> None:
        super().__init__(run_ns, min_gap_ns, deadline_ns=deadline_ns, offset_ns=offset_ns)
        self.max_gap_ns = max_gap_ns

    def _gap(self, host: Host) -> int:
        return host.engine.rng.randint(self.period_ns, self.max_gap_ns)


class Hog:
    """A CPU hog: runnable from ``offset_ns`` to the end of the run."""

    __slots__ = ("offset_ns",)

    def __init__(self, *, offset_ns: int = 0) -> None:
        self.offset_ns = offset_ns

    def start(self, host: Host, v: Vcpu) -> None:
        host.engine.at(self.offset_ns, lambda: host.activate(v, FOREVER))

    def burst_done(self, host: Host, v: Vcpu) -> int:
        return FOREVER

    def finish(self, host: Host, v: Vcpu) -> None:
        """Nothing pending to count."""


class IoBound:
    """Bursts of about ``run_ns`` then waits of about ``block_ns`` (both exponential)."""

    __slots__ = ("block_ns", "run_ns")

    def __init__(self, run_ns: int, block_ns: int) -> None:
        self.run_ns = run_ns
        self.block_ns = block_ns

    def _draw(self, host: Host, mean: int) -> int:
        return max(1, int(host.engine.rng.expovariate(1.0 / mean)))

    def start(self, host: Host, v: Vcpu) -> None:
        host.engine.at(self._draw(host, self.block_ns), lambda: self._io_done(host, v))

    def _io_done(self, host: Host, v: Vcpu) -> None:
        v.jobs += 1
        host.activate(v, self._draw(host, self.run_ns))

    def burst_done(self, host: Host, v: Vcpu) -> int:
        host.engine.after(self._draw(host, self.block_ns), lambda: self._io_done(host, v))
        return 0

    def finish(self, host: Host, v: Vcpu) -> None:
        """Nothing pending to count."""


class CyclicProbe:
    """cyclictest: wake every ``interval_ns`` (absolute), run ``run_ns``, sleep again."""

    __slots__ = ("interval_ns", "next_at", "offset_ns", "run_ns")

    def __init__(self, interval_ns: int, *, run_ns: int = 5_000, offset_ns: int = 0) -> None:
        self.interval_ns = interval_ns
        self.run_ns = run_ns
        self.offset_ns = offset_ns
        self.next_at = offset_ns

    def start(self, host: Host, v: Vcpu) -> None:
        host.engine.at(self.offset_ns, lambda: self._fire(host, v))

    def _fire(self, host: Host, v: Vcpu) -> None:
        # Only armed by start and burst_done, so the probe is blocked here.
        self.next_at += self.interval_ns
        v.jobs += 1
        host.activate(v, self.run_ns)

    def burst_done(self, host: Host, v: Vcpu) -> int:
        now = host.engine.now
        while self.next_at <= now:  # overslept whole intervals: skip them, as cyclictest
            self.next_at += self.interval_ns
            v.misses += 1
        host.engine.at(self.next_at, lambda: self._fire(host, v))
        return 0

    def finish(self, host: Host, v: Vcpu) -> None:
        """Nothing pending to count."""
