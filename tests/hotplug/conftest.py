"""Fixtures for the hotplug tests: ``bridge``, a real bridge made for one test and removed after."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.hotplug.bridges import bridge as make_bridge


@pytest.fixture
def bridge() -> Iterator[str]:
    """The name of a new bridge (up, MTU 1500) that is deleted after the test, even on failure."""
    with make_bridge() as name:
        yield name
