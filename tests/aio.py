"""The tests' way into the toolstack's ``async`` verbs: :func:`sync` runs one to its end.

A test is a short program of its own, as a command is: each verb it calls gets a loop
(``asyncio.run``), which is what a library caller without the CLI does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run verb ``coro`` to its end; its result."""
    return asyncio.run(coro)
