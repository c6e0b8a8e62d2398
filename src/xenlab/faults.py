"""Named points where a test can kill xenlab: :func:`point`.

Crash safety is tested, not assumed: a verb marks the steps between which a
SIGKILL would leave different states (``point("create.spawned")``), and a
test runs the verb as a real process with ``XENLAB_FAULT=<name>`` so that
the process kills itself with SIGKILL exactly there, then checks that the
next command converges to the truth.  ``XENLAB_FAULT_LOG=<file>`` appends
the name of every point passed, so a test can first learn a verb's points
and then kill it at each one.

Without those variables a point costs one dictionary lookup.  The names
are ``<verb>.<step>``; they are not an API and may change with the code.
"""

from __future__ import annotations

import os
import signal

__all__ = ["point"]

FAULT = "XENLAB_FAULT"
FAULT_LOG = "XENLAB_FAULT_LOG"


def point(name: str) -> None:
    """Die by SIGKILL here when ``$XENLAB_FAULT`` is ``name``; log it to ``$XENLAB_FAULT_LOG``."""
    env = os.environ
    if FAULT_LOG in env:
        with open(env[FAULT_LOG], "a", encoding="utf-8") as f:
            f.write(name + "\n")
    if env.get(FAULT) == name:
        os.kill(os.getpid(), signal.SIGKILL)
