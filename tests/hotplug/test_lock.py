"""hotplug.netlink.host_lock: one lock per user, in a place only that user can reach.

The lock serialises the choosing and making of tap names between xenlab
processes of one user.  Another user must not be able to hold it (root's
``vm create`` then waited 30 s and failed), nor plant something at its path
(a FIFO hung ``open`` forever, a symlink was followed).  Most tests need root:
they run children as user nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from xenlab.hotplug import HotplugError
from xenlab.hotplug import netlink as nlmod
from xenlab.hotplug.netlink import Netlink, host_lock, netlink

NOBODY = 65534
# Where the lock was before: a world-writable, sticky tmpfs directory.
OLD_PATH = Path("/run/lock/xenlab-hotplug.lock")
# A Python that user nobody can run (the venv's lives under /root).
SYSTEM_PYTHON = Path("/usr/bin/python3")


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("running children as user nobody needs root")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user can enter (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="xenlab-lock-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


@pytest.fixture
def root_dir(shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """root's lock directory moved under ``shared_dir`` (not made yet), for this test only."""
    d = shared_dir / "run-xenlab"
    monkeypatch.setattr(nlmod, "_ROOT_LOCK_DIR", d)
    return d


@pytest.fixture
def nobody_runtime(shared_dir: Path) -> Path:
    """A private runtime directory of user nobody (as logind makes /run/user/UID)."""
    d = shared_dir / "run-user-nobody"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)
    return d


def _take(timeout: float = 1.0, path: Path | None = None) -> str:
    async def take() -> None:
        async with host_lock(timeout, path=path):
            pass

    asyncio.run(take())
    return "taken"


def _run_as_child(fn: Callable[[], str], w: int, *, uid: int | None,
                  env: dict[str, str | None] | None) -> NoReturn:  # pragma: no cover
    """In a forked child: set ``env`` and ``uid``, run ``fn``, write what it returned
    (or ``"Type: message"``) to ``w``, exit."""
    out = "?"
    try:
        for key, value in (env or {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        out = fn()
    except BaseException as err:
        out = f"{type(err).__name__}: {err}"
    finally:
        os.write(w, out.encode())
        os._exit(0)


def _child(fn: Callable[[], str], *, uid: int | None = None,
           env: dict[str, str | None] | None = None, limit: float = 10.0) -> str | None:
    """What ``fn`` returned in a forked child (as ``uid``, with ``env`` changes).

    An exception comes back as ``"Type: message"``; None when the child was
    still running after ``limit`` seconds (it is killed: the hang).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        _run_as_child(fn, w, uid=uid, env=env)
    os.close(w)
    try:
        deadline = time.monotonic() + limit
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None
            time.sleep(0.02)
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(r)


@contextlib.contextmanager
def _held(*, uid: int | None = None, env: dict[str, str | None] | None = None,
          path: Path | None = None) -> Iterator[None]:
    """``host_lock`` held by another process (as ``uid``) for the ``with`` block."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()

    def hold() -> str:
        async def body() -> None:
            async with host_lock(1.0, path=path):
                os.write(ready_w, b"held")
                os.read(go_r, 1)  # blocks the loop: nothing else runs in this child

        asyncio.run(body())
        return "released"

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(ready_r)
        os.close(go_w)  # else the read below never sees the end
        _run_as_child(hold, ready_w, uid=uid, env=env)
    os.close(ready_w)
    os.close(go_r)
    try:
        got = os.read(ready_r, 4096).decode()
        assert got == "held", got
        yield
    finally:
        os.close(go_w)
        os.waitpid(pid, 0)
        os.close(ready_r)


# --- another user ---------------------------------------------------------------

_GRAB = r"""
import errno, fcntl, json, os, sys
got = {}
fds = []
for p in sys.argv[1:]:
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
        fds.append(fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        got[p] = "held"
    except OSError as err:
        got[p] = errno.errorcode.get(err.errno, str(err.errno))
print(json.dumps(got), flush=True)
sys.stdin.read()
"""


def test_another_user_can_neither_open_nor_hold_roots_lock() -> None:
    """The reviewer's case: nobody flocks the lock file, root's vm create waits 30 s and fails."""
    need_root()
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"no {SYSTEM_PYTHON} that user nobody can run")
    assert _take(2.0) == "taken"  # root's lock file exists now
    path = nlmod._lock_path()
    grab = subprocess.Popen(
        ["runuser", "-u", "nobody", "--", str(SYSTEM_PYTHON), "-I", "-c", _GRAB,
         str(path), str(OLD_PATH)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    assert grab.stdin is not None and grab.stdout is not None
    try:
        got = json.loads(grab.stdout.readline())
        # While nobody holds whatever it could open, root takes its lock at once.
        start = time.monotonic()
        assert _take(2.0) == "taken"
        assert time.monotonic() - start < 1.0
    finally:
        grab.stdin.close()
        grab.wait(10)
    assert got[str(path)] == "EACCES"
    assert path.parent == Path("/run/xenlab")
    st = os.lstat(path.parent)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o077
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and st.st_mode & 0o777 == 0o600


def test_another_users_file_at_the_lock_path_is_refused(shared_dir: Path) -> None:
    need_root()
    lock = shared_dir / "xenlab-hotplug.lock"
    lock.touch(mode=0o666)
    os.chown(lock, NOBODY, NOBODY)
    with pytest.raises(HotplugError) as err:
        _take(1.0, lock)
    assert str(err.value) == (f"hotplug lock {lock}: belongs to uid {NOBODY}, not to this "
                              f"user ({os.geteuid()}); refusing to share a lock with it")


def test_another_users_lock_directory_is_refused(root_dir: Path) -> None:
    need_root()
    root_dir.mkdir(mode=0o700)
    os.chown(root_dir, NOBODY, NOBODY)
    with pytest.raises(HotplugError) as err:
        _take(1.0)
    assert str(err.value) == (f"hotplug lock directory {root_dir}: belongs to uid {NOBODY}, "
                              f"not to this user ({os.geteuid()}); refusing to keep private "
                              "files there")
    assert not (root_dir / "hotplug.lock").exists()


# --- planted files: bounded time, never followed ---------------------------------


def _assert_refused_in_bounded_time(fifo: Path, path: Path | None) -> None:
    start = time.monotonic()
    got = _child(lambda: _take(3.0, path), limit=10.0)
    assert got is not None, "host_lock hung on a FIFO"
    assert time.monotonic() - start < 5.0
    assert got == (f"HotplugError: hotplug lock {fifo}: is a FIFO, not a regular file; "
                   "remove it")


def test_a_fifo_at_the_lock_path_is_refused_in_bounded_time(shared_dir: Path) -> None:
    fifo = shared_dir / "xenlab-hotplug.lock"
    os.mkfifo(fifo, 0o666)
    _assert_refused_in_bounded_time(fifo, fifo)


def test_a_fifo_in_the_lock_directory_is_refused_in_bounded_time(root_dir: Path) -> None:
    need_root()
    root_dir.mkdir(mode=0o700)
    fifo = root_dir / "hotplug.lock"
    os.mkfifo(fifo, 0o666)
    _assert_refused_in_bounded_time(fifo, None)


def test_a_symlink_at_the_lock_path_is_not_followed(shared_dir: Path) -> None:
    need_root()
    target = shared_dir / "elsewhere"
    lock = shared_dir / "xenlab-hotplug.lock"
    lock.symlink_to(target)
    with pytest.raises(HotplugError) as err:
        _take(1.0, lock)
    assert str(err.value) == (f"hotplug lock {lock}: is a symbolic link; the lock is only "
                              "taken on a regular file")
    assert not target.exists()


def test_a_symlink_to_a_file_of_ours_is_not_followed(shared_dir: Path) -> None:
    need_root()
    target = shared_dir / "roots-file"
    target.write_bytes(b"keep")
    lock = shared_dir / "xenlab-hotplug.lock"
    lock.symlink_to(target)
    with pytest.raises(HotplugError, match="is a symbolic link"):
        _take(1.0, lock)
    assert target.read_bytes() == b"keep"


def test_a_symlink_as_the_lock_directory_is_refused(shared_dir: Path, root_dir: Path) -> None:
    need_root()
    real = shared_dir / "real"
    real.mkdir(mode=0o700)
    root_dir.symlink_to(real)
    with pytest.raises(HotplugError) as err:
        _take(1.0)
    assert str(err.value) == (f"hotplug lock directory {root_dir}: is a symbolic link; "
                              "xenlab keeps private files only in a real directory of its own")
    assert list(real.iterdir()) == []


def test_a_hard_link_at_the_lock_path_is_refused(shared_dir: Path) -> None:
    need_root()
    other = shared_dir / "a-file-of-ours"
    other.touch(mode=0o600)
    lock = shared_dir / "xenlab-hotplug.lock"
    os.link(other, lock)
    with pytest.raises(HotplugError) as err:
        _take(1.0, lock)
    assert str(err.value) == (f"hotplug lock {lock}: has 2 names (a hard link to another "
                              "file?); remove it")


def test_a_loose_lock_directory_and_file_of_ours_are_made_private(root_dir: Path) -> None:
    need_root()
    root_dir.mkdir()
    root_dir.chmod(0o777)
    lock = root_dir / "hotplug.lock"
    lock.touch()
    lock.chmod(0o666)
    assert _take(1.0) == "taken"
    assert root_dir.stat().st_mode & 0o777 == 0o700
    assert lock.stat().st_mode & 0o777 == 0o600


def test_a_lock_file_that_cannot_be_made_is_a_hotplug_error(tmp_path: Path) -> None:
    lock = tmp_path / "missing-dir" / "xenlab-hotplug.lock"
    with pytest.raises(HotplugError) as err:
        _take(1.0, lock)
    assert str(err.value) == f"hotplug lock {lock}: cannot open it: No such file or directory"


# --- processes of one user serialise ---------------------------------------------


@pytest.mark.parametrize("who", ["root", "nobody"])
def test_processes_of_one_user_serialise_on_one_lock(
        root_dir: Path, nobody_runtime: Path, who: str) -> None:
    need_root()
    uid = None if who == "root" else NOBODY
    env: dict[str, str | None] = {"XDG_RUNTIME_DIR": str(nobody_runtime)}
    with _held(uid=uid, env=env):
        start = time.monotonic()
        got = _child(lambda: _take(0.5), uid=uid, env=env)
        waited = time.monotonic() - start
        lock = (root_dir / "hotplug.lock" if who == "root"
                else nobody_runtime / "xenlab-hotplug.lock")
        assert got == f"HotplugError: hotplug lock {lock}: still held after 0.5 s"
        assert 0.5 <= waited < 3.0  # the timeout is kept
    assert _child(lambda: _take(0.5), uid=uid, env=env) == "taken"
    st = os.lstat(lock)
    assert st.st_uid == (0 if uid is None else uid) and st.st_mode & 0o777 == 0o600


def test_a_users_lock_is_in_their_private_runtime_dir(nobody_runtime: Path) -> None:
    need_root()
    env: dict[str, str | None] = {"XDG_RUNTIME_DIR": str(nobody_runtime)}
    got = _child(lambda: f"{nlmod._lock_path()} {_take(1.0)}", uid=NOBODY, env=env)
    assert got == f"{nobody_runtime / 'xenlab-hotplug.lock'} taken"


@pytest.mark.parametrize("kind", ["open to others", "root's", "a symlink"])
def test_a_runtime_dir_that_is_not_private_is_not_used(
        shared_dir: Path, nobody_runtime: Path, monkeypatch: pytest.MonkeyPatch,
        kind: str) -> None:
    need_root()
    xdg = shared_dir / "xdg"
    if kind == "open to others":
        xdg.mkdir(mode=0o755)
        os.chown(xdg, NOBODY, NOBODY)
    elif kind == "root's":
        xdg.mkdir(mode=0o700)
    else:
        xdg.symlink_to(nobody_runtime)
    home = shared_dir / "home"
    home.mkdir(mode=0o755)
    os.chown(home, NOBODY, NOBODY)
    monkeypatch.setattr(nlmod, "_home", lambda: home)
    got = _child(lambda: f"{nlmod._lock_path()} {_take(1.0)}", uid=NOBODY,
                 env={"XDG_RUNTIME_DIR": str(xdg)})
    state = home / ".local" / "state" / "xenlab"
    assert got == f"{state / 'hotplug.lock'} taken"
    st = os.lstat(state)
    assert st.st_uid == NOBODY and st.st_mode & 0o777 == 0o700
    assert not (xdg / "xenlab-hotplug.lock").exists()


def test_no_private_place_for_the_lock_is_a_hotplug_error(
        shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need_root()
    if Path(f"/run/user/{NOBODY}").exists():
        pytest.skip(f"/run/user/{NOBODY} exists on this machine")
    home = shared_dir / "no-such-home"
    monkeypatch.setattr(nlmod, "_home", lambda: home)
    got = _child(lambda: _take(1.0), uid=NOBODY, env={"XDG_RUNTIME_DIR": None})
    assert got == (
        "HotplugError: hotplug lock: no private directory for it: $XDG_RUNTIME_DIR is unset, "
        f"/run/user/{NOBODY} is not a private directory of this user's, and the home "
        f"directory {home} does not exist; set XDG_RUNTIME_DIR to a directory only "
        "this user can enter"
    )
    assert not home.exists()


# --- root's and a user's toolstacks do not share the lock: the kernel keeps them apart


def test_a_tap_made_since_the_name_was_checked_is_not_taken_over(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's toolstack made the tap between ``link`` and ``create_tap``'s ioctl.

    Without IFF_TUN_EXCL, TUNSETIFF (as root, or any CAP_NET_ADMIN holder)
    attaches to the existing tap and TUNSETOWNER hands it to the caller.
    """
    from tests.hotplug.bridges import ip, ip_json, need_net_admin, unique_name

    need_net_admin()
    name = unique_name("xltap")
    ip("tuntap", "add", "dev", name, "mode", "tap", "user", "4242")
    try:
        async def race() -> None:
            async with netlink() as nl:
                async def not_yet(self: Netlink, name: str) -> None:
                    return None  # the check ran before the other toolstack made it

                monkeypatch.setattr(Netlink, "link", not_yet)
                await nl.create_tap(name, uid=os.getuid(), gid=os.getgid())

        with pytest.raises(HotplugError) as err:
            asyncio.run(race())
        assert str(err.value) == f"interface {name} exists already"
        (info,) = ip_json("link", "show", "dev", name)
        assert info["linkinfo"]["info_data"]["user"] in (4242, "4242")
    finally:
        ip("link", "del", name, check=False)
