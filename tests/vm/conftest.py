"""Shared fixtures for the toolstack tests: ``guest_image``, the project's guest image, and ``ts``.

The image is built once per machine (cached under ``~/.cache/xenlab/images``)
and once per session at most; every test that boots a guest reuses it.
``ts`` is a toolstack on a fresh state directory, cleared after the test.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.guests import clear
from xenlab.vm.domain import Toolstack
from xenlab.vm.image import BUSYBOX, QEMU_GA, GuestImage, build_image


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The guest image from :func:`xenlab.vm.image.build_image` (kernel, initrd, cmdline)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        pytest.skip("the guest image needs apt-get and dpkg (a Debian host)")
    for tool in (BUSYBOX, QEMU_GA):
        if not tool.is_file():
            pytest.skip(f"the guest image needs {tool}")
    return build_image()


@pytest.fixture
def ts(tmp_path: Path, guest_image: object) -> Iterator[Toolstack]:
    """A toolstack on ``tmp_path / "state"``; its domains are destroyed or undefined after."""
    t = Toolstack(tmp_path / "state")
    yield t
    clear(t)
