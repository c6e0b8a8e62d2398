"""What every benchmark times with: :func:`best`."""

from __future__ import annotations

import time
from collections.abc import Callable


def best(fn: Callable[[], object], rounds: int) -> float:
    """The fastest of ``rounds`` timed calls of ``fn`` (seconds), after one warm-up call."""
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
