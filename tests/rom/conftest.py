"""Debian's ROM packages (seabios, ipxe-qemu), downloaded and unpacked once, never installed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.oracle.debs import unpack_debs

PACKAGES = ("seabios", "ipxe-qemu")


@pytest.fixture(scope="session")
def debian_roms() -> Path:
    """The unpacked root of Debian's seabios and ipxe-qemu packages.

    Skipped only on a machine without apt-get; a failing download fails the tests.
    """
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        pytest.skip("apt-get/dpkg not found (not a Debian machine)")
    return unpack_debs(PACKAGES, Path.home() / ".cache" / "xenlab" / "rom-debs")
