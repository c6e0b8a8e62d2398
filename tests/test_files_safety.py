"""xenlab.files.read_bounded and xenlab.atomic.atomic_write_bytes against hostile paths.

Inputs: a FIFO with no writer, a stalled writer, an endless one, ``/dev/zero``,
a terminal, a 64 GiB sparse file, block devices, a directory, a socket, a
symlink loop, a dangling link, a file only its owner may read.  Each ends
within its bound with one clear error naming the file, or is read.

Outputs: a character device node, a FIFO, a directory, a symlink (written
through: link, mode and owner kept), a dangling link, a link planted in a
sticky directory (as the last name or on the way), a loop.  Refused ones
leave everything as it was.
"""

from __future__ import annotations

import contextlib
import os
import pty
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

import xenlab
from xenlab.atomic import (
    FileWriteError,
    atomic_write_bytes,
    atomic_write_text,
    check_output_dir,
    make_output_dir,
)
from xenlab.files import FileReadError, InputTooLargeError, read_bounded, read_text_bounded

MIB = 1 << 20
NOBODY = 65534
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (device nodes, chown)")


class Hung(Exception):  # not an OSError, so no reader wraps it as a read error
    """A call was still blocked when its deadline came."""


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: SIGALRM interrupts a blocking open or read."""
    def expired(signum: int, frame: FrameType | None) -> None:
        raise Hung(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def writer(fifo: Path, data: bytes, *, then_stall: bool = False,
           endless: bool = False) -> Iterator[threading.Event]:
    """A thread writing ``data`` into ``fifo`` (once, once then silent, or forever)."""
    stop = threading.Event()
    wrote = threading.Event()

    def run() -> None:
        with contextlib.suppress(BrokenPipeError), open(fifo, "wb") as f:
            f.write(data)
            f.flush()
            wrote.set()
            while endless and not stop.is_set():
                f.write(data)
            if then_stall:
                stop.wait(10)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield wrote
    finally:
        stop.set()
        with contextlib.suppress(OSError):  # a writer still waiting for a reader
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            time.sleep(0.05)
            os.close(fd)
        t.join(5)
        assert not t.is_alive()


# -- reading: streams ------------------------------------------------------------------------


def test_a_fifo_without_a_writer_ends_within_the_wait(tmp_path: Path) -> None:
    # A blocking open() waits for a writer forever: `config check FIFO` hung.
    fifo = tmp_path / "f.cfg"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    with deadline(10), pytest.raises(FileReadError) as exc:
        read_bounded(fifo, MIB, what="config", wait=0.5)
    assert time.perf_counter() - t0 < 2
    assert exc.value.name == str(fifo)
    assert str(exc.value) == (f"{fifo}: no data for 0.5 s at +0x0 (a FIFO without a writer, or "
                              "a terminal?): save the config to a file first")


def test_a_stalled_writer_is_given_up_on(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    with writer(fifo, b"x" * 100, then_stall=True) as wrote, deadline(10), \
            pytest.raises(FileReadError, match=r"no data for 0.5 s at \+0x64 .*: save it to a "
                                               r"file first$"):
        read_bounded(fifo, MIB, wait=0.5)
    assert wrote.is_set() and time.perf_counter() - t0 < 3


def test_an_endless_writer_stops_at_the_limit(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    with writer(fifo, b"y" * 65536, endless=True), deadline(10), \
            pytest.raises(InputTooLargeError) as exc:
        read_bounded(fifo, MIB)
    assert (exc.value.path, exc.value.limit) == (str(fifo), MIB)


def test_a_fifo_that_ends_is_read_whole(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    with writer(fifo, b"name = 'g'\n"), deadline(10):
        assert read_text_bounded(fifo) == "name = 'g'\n"


def test_dev_zero_costs_the_limit_only() -> None:
    tracemalloc.start()
    try:
        with deadline(10), pytest.raises(InputTooLargeError,
                                         match=r"^/dev/zero: file larger than 8 MiB: not read$"):
            read_bounded("/dev/zero", 8 * MIB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MIB + 2 * MIB, f"{peak / MIB:.1f} MiB"


def test_a_terminal_is_not_waited_on() -> None:
    # A terminal named as input: no data comes, and it must not become our terminal.
    leader, follower = pty.openpty()
    try:
        with deadline(10), pytest.raises(FileReadError, match=r"no data for 0\.3 s at"):
            read_bounded(os.ttyname(follower), MIB, wait=0.3)
    finally:
        os.close(leader)
        os.close(follower)


def test_regular_only_refuses_a_fifo_without_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    with deadline(10), pytest.raises(FileReadError,
                                     match=f"^{fifo}: is a FIFO, not a regular file$"):
        read_bounded(fifo, MIB, regular_only=True)


# -- reading: sizes ----------------------------------------------------------------------------


def test_a_sparse_64_gib_file_is_refused_before_reading(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(64 << 30)
    tracemalloc.start()
    try:
        with pytest.raises(InputTooLargeError, match="larger than 64 MiB"):
            read_bounded(sparse, 64 * MIB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MIB, f"{peak / MIB:.1f} MiB read before refusing"


def test_a_file_that_says_size_0_is_read_to_its_end() -> None:
    # /proc files say 0 and hold more (ucode reads /proc/cpuinfo this way).
    text = read_text_bounded("/proc/self/status")
    assert text.startswith("Name:") and text.endswith("\n")


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[Path]:
    if shutil.which("losetup") is None:
        pytest.skip("no losetup on this machine")
    proc = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                          text=True, timeout=30, check=False)
    if proc.returncode != 0:
        pytest.fail(f"losetup gave no loop device: {proc.stderr.strip()}")
    dev = Path(proc.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", str(dev)], timeout=30, check=True)


@root_only
def test_block_devices_by_their_seek_size(tmp_path: Path) -> None:
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(9 * MIB)
    with loop_device(big) as dev:
        tracemalloc.start()
        try:
            with pytest.raises(InputTooLargeError, match=f"^{dev}: file larger than 8 MiB"):
                read_bounded(dev, 8 * MIB)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < MIB
    small = tmp_path / "small.img"
    small.write_bytes(b"\x55\xaa" * 2048)
    with loop_device(small) as dev:
        assert read_bounded(dev, 8 * MIB) == b"\x55\xaa" * 2048


# -- reading: names that are not files ---------------------------------------------------------


def test_a_directory(tmp_path: Path) -> None:
    with pytest.raises(FileReadError, match=f"^{tmp_path}: is a directory$"):
        read_bounded(tmp_path, 10)


def test_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        sock.listen()
        with pytest.raises(FileReadError, match=f"^{path}: is a socket, not a file$"):
            read_bounded(path, 10)


def test_a_symlink_loop_and_a_dangling_link(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(FileReadError) as exc:
        read_bounded(tmp_path / "a", 10)
    assert exc.value.reason == "cannot read: a symlink loop (too many levels of symbolic links)"
    (tmp_path / "d").symlink_to("nowhere")
    with pytest.raises(FileReadError) as exc:
        read_bounded(tmp_path / "d", 10)
    assert exc.value.reason == "cannot read: a dangling symlink (to 'nowhere', which does not " \
                               "exist)"


def test_messages_use_the_name_given(tmp_path: Path) -> None:
    with pytest.raises(FileReadError, match=r"^odd\\x0aname: cannot read: No such file"):
        read_bounded(tmp_path / "odd\nname", 10, name="odd\\x0aname")


def test_a_name_with_a_nul_is_an_error_not_a_crash(tmp_path: Path) -> None:
    # os.open raises ValueError for it, which escaped as a traceback.
    with pytest.raises(FileReadError, match=r"cannot read: a name with a NUL character$"):
        read_bounded(f"{tmp_path}/a\0b", 10)
    with pytest.raises(FileWriteError, match=r"cannot write: a name with a NUL character$"):
        atomic_write_bytes(tmp_path / "a\0b", b"x")
    assert list(tmp_path.iterdir()) == []


@root_only
def test_an_unreadable_file_as_nobody() -> None:
    if shutil.which("runuser") is None:
        pytest.skip("no runuser on this machine")
    top = Path(tempfile.mkdtemp(prefix="xenlab-files-"))  # not under root's 0700 tmp_path
    try:
        top.chmod(0o755)
        secret = top / "secret.cfg"
        secret.write_text("x")
        secret.chmod(0o600)
        src = Path(xenlab.__file__).resolve().parents[1]
        script = ("import sys\nfrom xenlab.files import XenlabError, read_bounded\n"
                  "try:\n    read_bounded(sys.argv[1], 10)\n"
                  "except XenlabError as e:\n    print(e)\n")
        # The venv's interpreter may sit under root's home: any python3 nobody can run.
        proc = subprocess.run(["runuser", "-u", "nobody", "--", "env", f"PYTHONPATH={src}",
                               "python3", "-c", script, str(secret)],
                              capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode == 126 or "Permission denied" in proc.stderr:
            pytest.skip(f"no python3 that nobody may run: {proc.stderr.strip()}")
        assert (proc.returncode, proc.stdout, proc.stderr) == (
            0, f"{secret}: cannot read: Permission denied\n", "")
    finally:
        shutil.rmtree(top)


# -- writing -----------------------------------------------------------------------------------


def test_a_new_file_and_a_replaced_one(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert atomic_write_bytes(out, b"one") == out
    assert out.read_bytes() == b"one" and stat.S_IMODE(out.stat().st_mode) == 0o644
    out.chmod(0o640)
    before = out.stat().st_ino
    atomic_write_text(out, "two")
    assert out.read_text() == "two" and stat.S_IMODE(out.stat().st_mode) == 0o640
    assert out.stat().st_ino != before  # renamed over, never rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@root_only
def test_a_char_device_node_is_not_replaced(tmp_path: Path) -> None:
    # /dev/full's numbers, in a private directory: never the real one.
    node = tmp_path / "full"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    with pytest.raises(FileWriteError) as exc:
        atomic_write_bytes(node, b"data")
    assert str(exc.value) == (f"{node}: cannot write: is a character device, not a regular "
                              "file (only files are replaced)")
    st = os.lstat(node)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 7)
    (tmp_path / "link").symlink_to("full")
    with pytest.raises(FileWriteError, match="is a character device"):
        atomic_write_bytes(tmp_path / "link", b"data")
    assert stat.S_ISCHR(os.lstat(node).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "link"]


def test_a_fifo_and_a_directory_are_not_replaced(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with deadline(10), pytest.raises(FileWriteError, match="is a FIFO, not a regular file"):
        atomic_write_bytes(fifo, b"data")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    (tmp_path / "dir").mkdir()
    for path in (tmp_path / "dir", Path(f"{tmp_path}/dir/"), tmp_path / "dir" / ".."):
        with pytest.raises(FileWriteError, match="is a directory, not a regular file"):
            atomic_write_bytes(path, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "fifo"]


def test_through_a_chain_of_links_to_the_target(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    target = real / "guest.cfg"
    target.write_text("old")
    target.chmod(0o640)
    if os.geteuid() == 0:
        os.chown(target, NOBODY, NOBODY)
    links = tmp_path / "links"
    links.mkdir()
    (links / "hop").symlink_to(Path("..") / "real" / "guest.cfg")  # relative to its own dir
    link = links / "guest.cfg"
    link.symlink_to("hop")
    assert atomic_write_text(link, "new") == target
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o640
    if os.geteuid() == 0:
        assert (target.stat().st_uid, target.stat().st_gid) == (NOBODY, NOBODY)
    assert os.readlink(link) == "hop" and (links / "hop").is_symlink()
    assert sorted(p.name for p in real.iterdir()) == ["guest.cfg"]
    assert sorted(p.name for p in links.iterdir()) == ["guest.cfg", "hop"]


@root_only
def test_a_private_copy_is_ours_and_never_through_a_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "copy.rom"
    out.symlink_to(victim)
    atomic_write_bytes(out, b"rom", mode=0o600, follow_symlinks=False, keep_owner=False)
    assert not out.is_symlink() and out.read_bytes() == b"rom"
    assert victim.read_bytes() == b"precious"
    os.chown(out, NOBODY, NOBODY)
    atomic_write_bytes(out, b"rom2", mode=0o600, follow_symlinks=False, keep_owner=False)
    st = out.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode), out.read_bytes()) == (0, 0o600, b"rom2")


def test_a_dangling_link_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "elsewhere" / "made")
    with pytest.raises(FileWriteError) as exc:
        atomic_write_bytes(link, b"x")
    assert exc.value.reason == (f"cannot write: a dangling symlink (to "
                                f"'{tmp_path}/elsewhere/made'); not created through it")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(FileWriteError, match="a dangling symlink"):
        atomic_write_bytes(link, b"x")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_loop_a_missing_directory_and_a_file_on_the_way(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(FileWriteError, match="a symlink loop"):
        atomic_write_bytes(tmp_path / "a", b"x")
    with pytest.raises(FileWriteError, match=r"/no/out: cannot write: No such file or directory$"):
        atomic_write_bytes(tmp_path / "no" / "out", b"x")
    (tmp_path / "file").write_text("")
    with pytest.raises(FileWriteError, match=r"/file/out: cannot write: Not a directory$"):
        atomic_write_bytes(tmp_path / "file" / "out", b"x")


def sticky_dir(tmp_path: Path) -> Path:
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    return shared


@root_only
def test_a_link_planted_in_a_sticky_directory(tmp_path: Path) -> None:
    # As the kernel's fs.protected_symlinks: another user's link in /tmp is not followed.
    shared = sticky_dir(tmp_path)
    victim = tmp_path / "victim.conf"
    victim.write_bytes(b"precious")
    link = shared / "out"
    link.symlink_to(victim)
    os.lchown(link, NOBODY, NOBODY)
    with pytest.raises(FileWriteError) as exc:
        atomic_write_bytes(link, b"x")
    assert exc.value.reason == ("cannot write: a symlink in a sticky world-writable directory "
                                "owned by another user (the kernel would not follow it either)")
    assert victim.read_bytes() == b"precious"
    os.lchown(link, 0, 0)  # one's own link is followed
    atomic_write_bytes(link, b"x")
    assert victim.read_bytes() == b"x"


@root_only
def test_a_directory_link_planted_in_a_sticky_directory(tmp_path: Path) -> None:
    # The link is on the way, not the last name: still not followed.
    shared = sticky_dir(tmp_path)
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_bytes(b"root:x:0:0")
    link = shared / "evil"
    link.symlink_to(etc)
    os.lchown(link, NOBODY, NOBODY)
    with pytest.raises(FileWriteError, match="a symlink in a sticky world-writable directory"):
        atomic_write_bytes(link / "passwd", b"owned")
    assert (etc / "passwd").read_bytes() == b"root:x:0:0"


def test_output_directories(tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(FileWriteError, match="a dangling symlink"):
        make_output_dir(tmp_path / "dangling")
    (tmp_path / "file").write_text("")
    with pytest.raises(FileWriteError, match="is a regular file, not a directory"):
        check_output_dir(tmp_path / "file")
    make_output_dir(tmp_path / "new" / "deeper")
    assert (tmp_path / "new" / "deeper").is_dir() and not (tmp_path / "gone").exists()
