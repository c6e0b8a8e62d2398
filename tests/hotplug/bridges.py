"""Real bridges for hotplug tests: :func:`bridge` makes a uniquely named one and always removes it.

The real ``ip`` command (iproute2) is the oracle: :func:`ip_link` and
:func:`ip_json` read what the kernel has, independently of pyroute2.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest


def need_net_admin() -> None:
    """Skip unless this machine lets the tests make bridges and taps (root, /dev/net/tun)."""
    if os.geteuid() != 0:
        pytest.skip("making bridges and taps needs root (CAP_NET_ADMIN)")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun on this machine")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real ``ip`` command."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def ip_json(*args: str) -> list[dict[str, Any]]:
    """``ip -j -d ARGS``, parsed."""
    out = ip("-j", "-d", *args).stdout
    return json.loads(out) if out.strip() else []


def link_exists(name: str) -> bool:
    """Whether ``ip link show NAME`` finds the interface."""
    return ip("link", "show", "dev", name, check=False).returncode == 0


def unique_name(prefix: str = "xlbr") -> str:
    """An interface name no other test (or toolstack) uses: ``xlbr`` + 6 hex digits."""
    return f"{prefix}{secrets.token_hex(3)}"


@contextlib.contextmanager
def bridge(address: str | None = None, *, mtu: int | None = None) -> Iterator[str]:
    """A new bridge, up, with ``address`` (``10.x.y.1/24``) when given; removed after."""
    need_net_admin()
    name = unique_name()
    ip("link", "add", name, "type", "bridge")
    try:
        if mtu is not None:
            ip("link", "set", name, "mtu", str(mtu))
        if address is not None:
            ip("addr", "add", address, "dev", name)
        ip("link", "set", name, "up")
        yield name
    finally:
        ip("link", "del", name, check=False)
