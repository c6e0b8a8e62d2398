"""sim.engine: order of events, cancellation, the clock."""

from __future__ import annotations

import pytest

from xenlab.sim.engine import INFINITY, NORMAL, SCHEDULE, URGENT, Engine


def test_same_time_runs_by_priority_then_insertion() -> None:
    e = Engine()
    seen: list[str] = []
    e.at(5, lambda: seen.append("sched"), SCHEDULE)
    e.at(5, lambda: seen.append("a"), NORMAL)
    e.at(5, lambda: seen.append("b"), NORMAL)
    e.at(5, lambda: seen.append("urgent"), URGENT)
    e.at(3, lambda: seen.append("early"))
    e.run(10)
    assert seen == ["early", "urgent", "a", "b", "sched"]
    assert e.now == 10 and e.events == 5


def test_cancelled_timers_never_run_and_peek_skips_them() -> None:
    e = Engine()
    seen: list[int] = []
    t1 = e.at(1, lambda: seen.append(1))
    e.at(2, lambda: seen.append(2))
    t1.cancel()
    t1.cancel()
    assert not t1.pending and e.peek() == 2
    assert e.step() and seen == [2]
    assert not e.step() and e.peek() == INFINITY


def test_run_stops_before_until_and_events_can_schedule_events() -> None:
    e = Engine()
    seen: list[int] = []

    def tick() -> None:
        seen.append(e.now)
        e.after(10, tick)

    e.at(0, tick)
    e.run(35)
    assert seen == [0, 10, 20, 30] and e.now == 35
    e.run(41)
    assert seen[-1] == 40
    with pytest.raises(ValueError, match="past"):
        e.at(3, tick)


def test_the_seed_is_the_only_randomness() -> None:
    a, b = Engine(7), Engine(7)
    assert [a.rng.random() for _ in range(5)] == [b.rng.random() for _ in range(5)]
    assert Engine(8).rng.random() != Engine(7).rng.random()
