"""Memory of a QEMU domain: the virtio balloon (mem-set) and the size it was started with.

xl's memory model on QEMU: the guest's address space is ``-m MAXMEM``, fixed at
start, and the balloon holds it to the target.  ``balloon_to`` sets the target
and follows ``BALLOON_CHANGE`` (QEMU throttles it to one a second, so it also
asks ``query-balloon`` at that pace) until ``actual`` gets there or the time is up.
"""

from __future__ import annotations

import re
import time

from xenlab.errors import BackendError, UsageError
from xenlab.vm.backends.qemu.qmp import Qmp

__all__ = ["balloon_to", "check_max", "memtotal_kib", "started_mib"]

_MIB = 1 << 20
_BALLOON_POLL = 1.0  # seconds: QEMU's BALLOON_CHANGE throttle


def _actual(reply: object) -> int:
    if not isinstance(reply, dict) or "actual" not in reply:
        raise BackendError(f"QEMU's query-balloon answered {reply!r:.200}")
    return int(reply["actual"])


async def balloon_to(qmp: Qmp, target: int, timeout: float) -> tuple[int, bool]:
    """Set the balloon to ``target`` bytes, wait for ``actual`` to get there: (actual, reached)."""
    deadline = time.monotonic() + timeout
    with qmp.listen("BALLOON_CHANGE") as changes:
        await qmp.execute("balloon", {"value": target})
        actual = _actual(await qmp.execute("query-balloon"))
        while actual != target:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return actual, False
            try:
                ev = await changes.wait(min(_BALLOON_POLL, remaining))
                actual = int(ev.get("data", {}).get("actual", actual))
            except BackendError:
                if not qmp.connected:
                    raise
                # No event this second (throttled or lost): ask directly.
                actual = _actual(await qmp.execute("query-balloon"))
    return actual, True


def memtotal_kib(meminfo: bytes | None) -> int | None:
    """``MemTotal`` from the guest's /proc/meminfo (None when it could not be read)."""
    if meminfo is None:
        return None
    m = re.search(rb"^MemTotal:\s+(\d+)\s+kB", meminfo, re.MULTILINE)
    return int(m.group(1)) if m else None


async def started_mib(qmp: Qmp) -> int:
    """The memory QEMU was started with (``-m``), MiB: the most a balloon can give back."""
    summary = await qmp.execute("query-memory-size-summary")
    if not isinstance(summary, dict) or "base-memory" not in summary:
        raise BackendError(f"QEMU's query-memory-size-summary answered {summary!r:.200}")
    return int(summary["base-memory"]) // _MIB


def check_max(name: str, mib: int, started: int) -> None:
    """mem-max above what QEMU was started with needs a restart."""
    if mib > started:
        raise UsageError(
            f"domain {name!r}: mem-max {mib} MiB is above the {started} MiB its QEMU "
            f"was started with; raising it needs a restart with maxmem={mib}")
