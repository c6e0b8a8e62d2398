"""Shared fixtures for the toolstack tests: ``guest_image``, the project's guest image.

Built once per machine (cached under ``~/.cache/xenlab/images``) and once
per session at most; every test that boots a guest reuses it.
"""

from __future__ import annotations

import shutil

import pytest

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
