"""Idle injection in the manner of Linux's intel_powerclamp: :class:`PowerClamp`.

A cooling device (``type``, ``max_state``, ``cur_state``) that holds each
pCPU's idle time at a target percentage, after Linux's
drivers/thermal/intel/intel_powerclamp.c and its idle_inject framework: cycles
of ``duration_ms`` of forced idle, aligned so pCPUs idle together, injected
through :meth:`Host.inject <xenlab.sim.host.Host.inject>` (the scheduler then
sees ``idle_forced``), and every ``window_size`` cycles an integral controller
corrects the ratio from the measured idle.  Unlike Linux's, the correction
runs both ways and per pCPU, and skipping a window waits for it.
``cur_state`` reads and writes as Linux's does (-1 when off, clamped to
``0..max_state-1``), and the defaults are Linux's (6 ms, 2, :data:`MAX_STATE`
50).  The design (cycles, injection, feedback, interface and defaults) is in
docs/schedulers.md, section PowerClamp.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Final

from xenlab.errors import SimError
from xenlab.sim.engine import NS_PER_MS, Timer

if TYPE_CHECKING:
    from xenlab.sim.host import Host
    from xenlab.sim.model import Pcpu

MAX_STATE: Final = 50
#: The effective ratio's floor (per mille): a cycle no longer than 100 durations.
_MIN_RATIO_PM: Final = 10


def idle_ns_now(p: Pcpu, now: int) -> int:
    """``p``'s idle ns up to ``now``, the open idle stretch included (the host is lazy)."""
    idle: int = p.idle_ns
    if p.curr is None and now > p.last_acct:
        idle += now - p.last_acct
    return idle


@dataclass(frozen=True, slots=True)
class WindowSample:
    """One pCPU's measurement at the end of a window (for idle-vs-target plots)."""

    time_ns: int
    pcpu: int
    idle_pm: int  # measured idle over the window, per mille
    target_pct: int
    ratio_pm: int  # the effective injection ratio chosen for the next window, per mille
    skipped: bool  # at or above target + guard: no injection in the next window


class _Ctl:
    """One pCPU's controller (Linux keeps one per CPU in the idle_inject device)."""

    __slots__ = ("count", "cpu", "last_pm", "ratio_pm", "skip", "timer", "win_idle",
                 "win_start")

    def __init__(self, cpu: int, ratio_pm: int) -> None:
        self.cpu = cpu
        self.count = 0  # cycles begun; a window closes every window_size of them
        self.ratio_pm = ratio_pm  # effective ratio: target corrected by feedback
        self.skip = False  # measured >= target + guard: this window injects nothing
        self.win_start = 0  # the window's start and the pCPU's idle ns then; set by _begin
        self.win_idle = 0
        self.last_pm = -1  # last measured idle ratio, per mille (-1: none yet)
        self.timer: Timer | None = None


class PowerClamp:
    """The ``intel_powerclamp`` cooling device for a simulated host.

    ``PowerClamp(host)`` attaches to ``host`` (before or during a run);
    ``clamp.cur_state = 25`` starts holding 25 % idle on every pCPU (or on
    ``cpus``), ``clamp.cur_state = 0`` stops.
    """

    type: Final = "intel_powerclamp"
    max_state: Final = MAX_STATE

    def __init__(self, host: Host, *, duration_ms: int = 6, window_size: int = 2,
                 cpus: Iterable[int] | None = None) -> None:
        if not isinstance(duration_ms, int) or not 6 <= duration_ms <= 25:
            raise SimError(f"powerclamp: duration_ms must be an integer in 6..25, "
                           f"not {duration_ms!r}")
        if not isinstance(window_size, int) or not 2 <= window_size <= 10:
            raise SimError(f"powerclamp: window_size must be an integer in 2..10, "
                           f"not {window_size!r}")
        self.host = host
        self.duration = duration_ms * NS_PER_MS
        self.window_size = window_size
        ids = list(range(len(host.pcpus))) if cpus is None else sorted(set(cpus))
        bad = [c for c in ids if not 0 <= c < len(host.pcpus)]
        if bad or not ids:
            raise SimError(f"powerclamp: cpus {bad or '(none)'} are not pCPUs of this host "
                           f"(0-{len(host.pcpus) - 1})")
        self.cpus = ids
        self.target = 0  # Linux's set_target_ratio; 0 = off
        self.history: list[WindowSample] = []
        self._ctl: dict[int, _Ctl] = {}

    # -- the thermal cooling-device interface ----------------------------------------

    @property
    def cur_state(self) -> int:
        """The target percent idle while clamping, -1 when off."""
        return self.target if self.target > 0 else -1

    @cur_state.setter
    def cur_state(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise SimError(f"powerclamp: cur_state must be an integer, not {value!r}")
        new = min(max(value, 0), MAX_STATE - 1)
        if self.target == 0 and new > 0:
            self.target = new
            self._start()
        elif self.target > 0 and new == 0:
            self._stop()
            self.target = 0
        elif new != self.target:
            self.target = new
            for c in self._ctl.values():
                c.ratio_pm = new * 10  # a new target starts from scratch, as Linux

    @property
    def measured_pct(self) -> float:
        """Mean idle percent of the controlled pCPUs over their last windows (-1: none yet)."""
        got = [c.last_pm for c in self._ctl.values() if c.last_pm >= 0]
        return sum(got) / (10 * len(got)) if got else -1.0

    # -- the controller ----------------------------------------------------------------

    def _interval(self, ratio_pm: int) -> int:
        return self.duration * 1000 // ratio_pm

    def _start(self) -> None:
        eng = self.host.engine
        now = eng.now
        ratio = self.target * 10
        interval = self._interval(ratio)
        first = -(-now // interval) * interval  # aligned: pCPUs idle together
        for cpu in self.cpus:
            c = _Ctl(cpu, ratio)
            self._ctl[cpu] = c
            c.timer = eng.at(first, partial(self._begin, c))

    def _stop(self) -> None:
        now = self.host.engine.now
        for c in self._ctl.values():
            if c.timer is not None:
                c.timer.cancel()
            if self.host.pcpus[c.cpu].inject_until > now:
                self.host.inject(c.cpu, now)
        self._ctl.clear()

    def _begin(self, c: _Ctl) -> None:
        """A cycle starts: close the window if due, then inject (unless skipping)."""
        host = self.host
        now = host.engine.now
        p = host.pcpus[c.cpu]
        if c.count == 0:
            c.win_start, c.win_idle = now, idle_ns_now(p, now)
        c.count += 1
        if c.count > 1 and (c.count - 1) % self.window_size == 0:
            self._window(c, p, now)
        interval = self._interval(c.ratio_pm)
        c.timer = host.engine.at(now + interval, partial(self._begin, c))
        if not c.skip:
            host.inject(c.cpu, now + self.duration)

    def _window(self, c: _Ctl, p: Pcpu, now: int) -> None:
        """``powerclamp_adjust_controls``: measure the window, correct the ratio, skip or not."""
        idle = idle_ns_now(p, now)
        span = now - c.win_start
        measured = (idle - c.win_idle) * 1000 // span if span > 0 else 0
        c.win_start, c.win_idle = now, idle
        c.last_pm = measured
        target = self.target * 10
        guard = (1 + self.target // 20) * 10
        ratio = c.ratio_pm + (target - measured) // 2
        c.ratio_pm = min(max(ratio, _MIN_RATIO_PM), (MAX_STATE - 1) * 10)
        c.skip = measured >= target + guard and c.ratio_pm == _MIN_RATIO_PM
        self.history.append(WindowSample(now, c.cpu, measured, self.target, c.ratio_pm, c.skip))
