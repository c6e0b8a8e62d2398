"""hotplug.netlink.host_lock: one lock for every user's toolstack on the host."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from xenlab.hotplug import HotplugError
from xenlab.hotplug.netlink import host_lock

NOBODY = 65534


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user can enter (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="xenlab-lock-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def _as_nobody(lock: Path, timeout: float) -> int:
    """Take ``host_lock(path=lock)`` in a child running as user nobody; its exit code.

    0: taken; 1: HotplugError (the lock was held); 2: any other error (the bug:
    a raw PermissionError).
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 2
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)

            async def take() -> None:
                async with host_lock(timeout, path=lock):
                    pass

            asyncio.run(take())
            code = 0
        except HotplugError:
            code = 1
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_another_users_lock_file_is_taken_read_only_and_still_excludes(
        shared_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("running a child as user nobody needs root")
    lock = shared_dir / "xenlab-hotplug.lock"
    # root's toolstack made the lock file first: 0644, root's.
    asyncio.run(_take_once(lock))
    assert lock.stat().st_uid == 0 and lock.stat().st_mode & 0o777 == 0o644
    assert _as_nobody(lock, 1.0) == 0
    # And the read-only flock excludes: while root holds it, nobody times out.
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert _as_nobody(lock, 0.2) == 1
    finally:
        os.close(fd)


async def _take_once(lock: Path) -> None:
    old = os.umask(0o022)
    try:
        async with host_lock(1.0, path=lock):
            pass
    finally:
        os.umask(old)


def test_a_lock_file_that_cannot_be_made_is_a_hotplug_error(tmp_path: Path) -> None:
    lock = tmp_path / "missing-dir" / "xenlab-hotplug.lock"
    with pytest.raises(HotplugError) as err:
        asyncio.run(_take_once(lock))
    assert str(err.value) == f"hotplug lock {lock}: cannot open it: No such file or directory"
