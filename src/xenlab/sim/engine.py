"""The simulator's event engine: :class:`Engine`, one heap and one integer clock.

In the shape of SimPy's core, cut to what a scheduler model needs:

* Time is an integer count of nanoseconds (Xen's ``s_time_t``); nothing
  here reads the wall clock.
* One heap of ``(time, priority, serial, timer)``: the serial comes from a
  counter, so events at the same time and priority run in the order they
  were scheduled, and the same inputs always give the same run.
* :meth:`Engine.at` returns a :class:`Timer` that can be cancelled (lazy
  deletion: the entry stays in the heap, its callback is dropped), because
  schedulers re-arm slice and replenishment timers all the time.
* Small verbs: :meth:`step` runs one event, :meth:`run` loops over it up to
  a time, :meth:`peek` says when the next event is.
* Randomness is a parameter: ``Engine(seed)`` owns ``rng``, a
  ``random.Random(seed)``, the only source of chance in a run.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from typing import Final

#: Priorities at equal times: lower runs first.  Wake-ups and timers
#: (NORMAL) run before the reschedules they cause (SCHEDULE), so every
#: state change at one instant is seen by the scheduler at that instant.
URGENT: Final = 0
NORMAL: Final = 1
SCHEDULE: Final = 2

NS_PER_US: Final = 1_000
NS_PER_MS: Final = 1_000_000
NS_PER_S: Final = 1_000_000_000
#: A time later than any simulation ("never").
INFINITY: Final = 1 << 62


class Timer:
    """A scheduled callback; :meth:`cancel` takes it back (it will not run)."""

    __slots__ = ("fn", "time")

    def __init__(self, time: int, fn: Callable[[], None]) -> None:
        self.time = time
        self.fn: Callable[[], None] | None = fn

    @property
    def pending(self) -> bool:
        """True until the callback ran or was cancelled."""
        return self.fn is not None

    def cancel(self) -> None:
        """Drop the callback (idempotent)."""
        self.fn = None


class Engine:
    """The clock and the event heap of one simulation run."""

    def __init__(self, seed: int = 0) -> None:
        self.now = 0
        self.rng = random.Random(seed)
        self.events = 0  # callbacks run so far
        self._heap: list[tuple[int, int, int, Timer]] = []
        self._serial = itertools.count()

    def at(self, time: int, fn: Callable[[], None], priority: int = NORMAL) -> Timer:
        """Run ``fn`` at absolute time ``time`` (not before now); its :class:`Timer`."""
        if time < self.now:
            raise ValueError(f"cannot schedule in the past ({time} < now {self.now})")
        timer = Timer(time, fn)
        heapq.heappush(self._heap, (time, priority, next(self._serial), timer))
        return timer

    def after(self, delay: int, fn: Callable[[], None], priority: int = NORMAL) -> Timer:
        """Run ``fn`` ``delay`` ns from now."""
        return self.at(self.now + delay, fn, priority)

    def peek(self) -> int:
        """When the next pending event runs, or INFINITY when there is none."""
        heap = self._heap
        while heap and heap[0][3].fn is None:
            heapq.heappop(heap)
        return heap[0][0] if heap else INFINITY

    def step(self) -> bool:
        """Run the next pending event; False when there is none."""
        heap = self._heap
        while heap:
            time, _, _, timer = heapq.heappop(heap)
            fn = timer.fn
            if fn is None:
                continue
            timer.fn = None
            self.now = time
            self.events += 1
            fn()
            return True
        return False

    def run(self, until: int) -> None:
        """Run every event before ``until``, then set the clock to ``until``."""
        heap = self._heap
        pop = heapq.heappop
        while heap:
            entry = heap[0]
            if entry[0] >= until:
                break
            pop(heap)
            timer = entry[3]
            fn = timer.fn
            if fn is None:
                continue
            timer.fn = None
            self.now = entry[0]
            self.events += 1
            fn()
        self.now = max(self.now, until)
