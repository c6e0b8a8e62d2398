"""Shared fixtures: the libxlutil oracle (``libxlu``) and ``shared_data``.

Also registers and loads the Hypothesis profile ``ci``: no deadline (the
machines are small and shared) and derandomized, so a run is reproducible.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

from tests.oracle.libxlu import Libxlu, OracleUnavailable, load

settings.register_profile("ci", deadline=None, derandomize=True)
settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def libxlu() -> Libxlu:
    """Debian's real libxlutil 4.17, fetched once into a cache and loaded."""
    try:
        return load()
    except OracleUnavailable as err:
        pytest.skip(f"Debian archive not reachable: {err.reason}")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder beside the repo (real files, read in place)."""
    path = REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip("../shared not present")
    return path
