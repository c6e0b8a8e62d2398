"""The command's event loop: :func:`command_loop` and :func:`go`, the CLI's one way into
the toolstack's ``async`` verbs.

Every ``xenlab vm`` command (and ``rom boot``) opens one loop (an ``asyncio.Runner``) and
runs each verb it calls on it with :func:`go`: one loop per command however many verbs
it calls.  Nothing below cli/ starts a loop.  Tasks a verb leaves are cancelled when the
command ends, as ``asyncio.run`` does; only the thread that opened the loop uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

__all__ = ["command_loop", "go"]

T = TypeVar("T")

_LOOP: contextvars.ContextVar[tuple[asyncio.Runner, int] | None] = contextvars.ContextVar(
    "xenlab_command_loop", default=None)


@contextlib.contextmanager
def command_loop() -> Iterator[None]:
    """One event loop for a whole command: every :func:`go` inside the block uses it."""
    with asyncio.Runner() as runner:
        token = _LOOP.set((runner, threading.get_ident()))
        try:
            yield
        finally:
            _LOOP.reset(token)


def go(coro: Coroutine[Any, Any, T]) -> T:
    """Run verb ``coro`` on the command's loop (a loop of its own outside one)."""
    held = _LOOP.get()
    if held is not None and held[1] == threading.get_ident():
        return held[0].run(coro)
    return asyncio.run(coro)
