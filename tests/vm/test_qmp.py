"""xenlab.vm.backends.qemu.qmp against a real QEMU (TCG, no guest) and the real qemu-ga on the
host side."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from asyncio import run
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from xenlab.errors import BackendError
from xenlab.vm.backends.qemu.qmp import CommandError, GuestAgent, Qmp, run_job

pytestmark = pytest.mark.integration

QEMU = shutil.which("qemu-system-x86_64")
QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
QEMU_GA = "/usr/sbin/qemu-ga" if os.path.exists("/usr/sbin/qemu-ga") else shutil.which("qemu-ga")

needs_qemu = pytest.mark.skipif(QEMU is None or QEMU_IMG is None, reason="QEMU not installed")
needs_ga = pytest.mark.skipif(QEMU_GA is None, reason="qemu-ga not installed")


@dataclass
class Qemu:
    proc: subprocess.Popen[bytes]
    sock: Path
    dir: Path


def _sock_dir(tmp_path: Path) -> Path:
    # unix socket paths are limited to 107 bytes
    assert len(str(tmp_path / "qmp.sock")) < 100, tmp_path
    return tmp_path


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[Qemu]:
    """A paused QEMU with no devices, QMP on a unix socket in tmp_path."""
    if QEMU is None or QEMU_IMG is None:
        pytest.skip("QEMU not installed")
    sock = _sock_dir(tmp_path) / "qmp.sock"
    proc = subprocess.Popen(
        [
            QEMU, "-accel", "tcg", "-nodefaults", "-no-user-config", "-display", "none",
            "-S", "-qmp", f"unix:{sock},server=on,wait=off", "-m", "64",
        ],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        yield Qemu(proc, sock, tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


@needs_qemu
def test_query_status_and_connect_waits_for_socket(qemu: Qemu) -> None:
    async def go() -> object:
        # connect() is called at once after spawning: it must wait for the socket
        async with Qmp.open(qemu.sock, timeout=20) as qmp:
            assert qmp.connected
            return await qmp.execute("query-status")

    st = run(go())
    assert isinstance(st, dict)
    assert st["status"] == "prelaunch"
    assert st["running"] is False


@needs_qemu
def test_error_reply_names_command_and_class(qemu: Qemu) -> None:
    async def go() -> None:
        async with Qmp.open(qemu.sock, timeout=20) as qmp:
            with pytest.raises(CommandError) as info:
                await qmp.execute("no-such-command")
            err = info.value
            assert isinstance(err, BackendError)
            assert err.command == "no-such-command"
            assert err.error_class == "CommandNotFound"
            assert "no-such-command" in str(err) and "CommandNotFound" in str(err)
            assert type(err.__cause__).__name__ == "ExecuteError"
            with pytest.raises(CommandError) as info:
                await qmp.execute("blockdev-del", {"node-name": "nope"})
            assert info.value.error_class == "GenericError"
            assert "nope" in info.value.desc
            # the session is still usable after errors
            assert isinstance(await qmp.execute("query-status"), dict)

    run(go())


@needs_qemu
def test_stop_cont_powerdown_events(qemu: Qemu) -> None:
    async def go() -> list[str]:
        seen = []
        async with Qmp.open(qemu.sock, timeout=20) as qmp:
            await qmp.execute("cont")
            with qmp.listen({"STOP", "RESUME"}) as events:
                await qmp.execute("stop")
                # the event arrived while we were waiting for the reply: not lost
                seen.append((await events.wait(5))["event"])
                await qmp.execute("cont")
                seen.append((await events.wait(5))["event"])
            with qmp.listen("POWERDOWN") as events:
                await qmp.execute("system_powerdown")
                ev = await events.wait(5)
                assert "timestamp" in ev
                seen.append(ev["event"])
            assert (await qmp.execute("query-status"))["status"] == "running"  # type: ignore[index]
        return seen

    assert run(go()) == ["STOP", "RESUME", "POWERDOWN"]


@needs_qemu
def test_wait_event_with_match_and_timeout(qemu: Qemu) -> None:
    async def go() -> None:
        async with Qmp.open(qemu.sock, timeout=20) as qmp:
            t0 = time.monotonic()
            with pytest.raises(BackendError, match=r"SHUTDOWN: none within 0.5s"):
                await qmp.wait_event("SHUTDOWN", timeout=0.5)
            assert 0.4 < time.monotonic() - t0 < 3
            # the match predicate filters: a RESUME event is skipped, STOP taken
            await qmp.execute("cont")
            waiter = asyncio.ensure_future(
                qmp.wait_event({"STOP", "RESUME"}, 5, match=lambda e: e["event"] == "STOP")
            )
            await asyncio.sleep(0.1)
            await qmp.execute("stop")
            await qmp.execute("cont")
            await qmp.execute("stop")
            ev = await waiter
            assert ev["event"] == "STOP"
            # command timeout: a bound far below what any command takes
            with pytest.raises(BackendError, match="no reply within"):
                await qmp.execute("query-qmp-schema", timeout=1e-6)
            # its late reply is dropped; the session goes on
            await asyncio.sleep(0.3)
            assert (await qmp.execute("query-status"))["status"] == "paused"  # type: ignore[index]

    run(go())


def _qemu_img(*args: str) -> None:
    assert QEMU_IMG is not None
    subprocess.run([QEMU_IMG, *args], check=True, capture_output=True)


@needs_qemu
def test_block_jobs(qemu: Qemu) -> None:
    src = qemu.dir / "src.qcow2"
    _qemu_img("create", "-f", "qcow2", str(src), "4M")
    if QEMU_IO is not None:
        subprocess.run(
            [QEMU_IO, "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 3M 64k", str(src)],
            check=True, capture_output=True,
        )
    dst = qemu.dir / "dst.qcow2"
    mir = qemu.dir / "mirror.qcow2"

    async def go() -> None:
        async with Qmp.open(qemu.sock, timeout=20) as qmp:
            await qmp.execute("blockdev-add", {
                "driver": "qcow2", "node-name": "src",
                "file": {"driver": "file", "filename": str(src)},
            })
            # blockdev-create jobs: the file, then the qcow2 format on it
            await qmp.execute("blockdev-create", {
                "job-id": "mkfile",
                "options": {"driver": "file", "filename": str(dst), "size": 0},
            })
            await run_job(qmp, "mkfile", 30)
            await qmp.execute("blockdev-add", {
                "driver": "file", "node-name": "dst-file", "filename": str(dst),
            })
            await qmp.execute("blockdev-create", {
                "job-id": "mkqcow2",
                "options": {"driver": "qcow2", "file": "dst-file", "size": 4 * 1024 * 1024},
            })
            await run_job(qmp, "mkqcow2", 30)
            await qmp.execute("blockdev-add", {
                "driver": "qcow2", "node-name": "dst", "file": "dst-file",
            })
            await qmp.execute("blockdev-backup", {
                "job-id": "bk", "device": "src", "target": "dst", "sync": "full",
                "auto-dismiss": False,
            })
            await run_job(qmp, "bk", 60)
            # dismissed: no jobs left
            assert await qmp.execute("query-jobs") == []

            # a mirror waits in "ready" until completed
            _qemu_img("create", "-f", "qcow2", str(mir), "4M")
            await qmp.execute("blockdev-add", {
                "driver": "qcow2", "node-name": "mir",
                "file": {"driver": "file", "filename": str(mir)},
            })
            await qmp.execute("blockdev-mirror", {
                "job-id": "mr", "device": "src", "target": "mir", "sync": "full",
                "auto-dismiss": False,
            })
            await run_job(qmp, "mr", 60, complete_on_ready=True)

            # a job that fails: qcow2 sizes must be multiples of 512
            await qmp.execute("blockdev-create", {
                "job-id": "bad",
                "options": {"driver": "qcow2", "file": "dst-file", "size": 1000},
            })
            with pytest.raises(BackendError, match=r"job bad \(create\) failed: .*512"):
                await run_job(qmp, "bad", 30)
            assert await qmp.execute("query-jobs") == []
            with pytest.raises(BackendError, match="job ghost: no such job"):
                await run_job(qmp, "ghost", 5)
            for node in ("dst", "mir", "src"):
                await qmp.execute("blockdev-del", {"node-name": node})
            await qmp.execute("blockdev-del", {"node-name": "dst-file"})

    run(go())
    # the copies hold what the source holds
    _qemu_img("compare", str(src), str(dst))
    _qemu_img("compare", str(src), str(mir))


@needs_qemu
def test_qemu_killed_mid_session(qemu: Qemu) -> None:
    async def go() -> None:
        qmp = Qmp()
        await qmp.connect(qemu.sock, timeout=20)
        waiter = asyncio.ensure_future(qmp.wait_event("SHUTDOWN", timeout=60))
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        qemu.proc.send_signal(signal.SIGKILL)
        with pytest.raises(BackendError, match="connection lost"):
            await waiter
        assert time.monotonic() - t0 < 10  # failed at once, not at the 60 s bound
        assert not qmp.connected
        with pytest.raises(BackendError, match="query-status"):
            await qmp.execute("query-status", timeout=60)
        await qmp.close()  # closing a dead session is quiet

    run(go())


@needs_qemu
def test_connect_failures(tmp_path: Path) -> None:
    async def go() -> None:
        t0 = time.monotonic()
        with pytest.raises(BackendError, match=r"no session within 0\.3s"):
            await Qmp().connect(tmp_path / "absent.sock", timeout=0.3)
        assert time.monotonic() - t0 < 3
        with pytest.raises(BackendError, match="query-status") as info:
            await Qmp().execute("query-status")  # never connected
        assert info.value.__cause__ is not None

    run(go())


# --- the guest agent, spoken to the real qemu-ga running on the host ---

# qemu-ga runs here as whoever runs the tests, on the host: block everything
# that could touch the machine, and only ever run harmless commands.
_BLOCKED = (
    "guest-shutdown,guest-suspend-disk,guest-suspend-ram,guest-suspend-hybrid,"
    "guest-set-time,guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-fsfreeze-thaw,"
    "guest-set-user-password,guest-set-vcpus,guest-set-memory-blocks,guest-file-open,"
    "guest-ssh-add-authorized-keys,guest-ssh-remove-authorized-keys,guest-fstrim"
)


@pytest.fixture
def qga(tmp_path: Path) -> Iterator[Path]:
    if QEMU_GA is None:
        pytest.skip("qemu-ga not installed")
    sock = _sock_dir(tmp_path) / "qga.sock"
    proc = subprocess.Popen(
        [QEMU_GA, "-m", "unix-listen", "-p", str(sock), "-f", str(tmp_path / "qga.pid"),
         "-t", str(tmp_path), "-b", _BLOCKED],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        # The socket file appears at bind(), a moment before listen(): wait
        # until a connection is taken (on a busy machine the gap is visible).
        while True:
            assert proc.poll() is None, "qemu-ga exited"
            assert time.monotonic() < deadline, "qemu-ga did not take connections"
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(sock))
                break
            except OSError:
                time.sleep(0.02)
            finally:
                probe.close()
        yield sock
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@needs_ga
def test_agent_ping_info_exec(qga: Path) -> None:
    async def go() -> None:
        async with GuestAgent(qga) as agent:
            await agent.ping()
            info = await agent.info()
            assert isinstance(info["version"], str) and info["version"]
            names = {c["name"] for c in info["supported_commands"]}
            assert {"guest-exec", "guest-exec-status", "guest-sync-delimited"} <= names

            res = await agent.exec(["/bin/echo", "hello", "agent"], timeout=10)
            assert (res.exitcode, res.stdout, res.stderr) == (0, b"hello agent\n", b"")

            res = await agent.exec(
                ["/bin/sh", "-c", "echo out; echo err >&2; exit 7"], timeout=10
            )
            assert (res.exitcode, res.stdout, res.stderr) == (7, b"out\n", b"err\n")
            assert res.signal is None

            # binary output and stdin survive the base64 round trip
            res = await agent.exec(["/bin/cat"], timeout=10, input=bytes(range(256)))
            assert res.stdout == bytes(range(256))

            res = await agent.exec(["/bin/sh", "-c", "kill -TERM $$"], timeout=10)
            assert (res.exitcode, res.signal) == (-signal.SIGTERM, signal.SIGTERM)

            # a command that outlives the bound
            t0 = time.monotonic()
            with pytest.raises(BackendError, match=r"still running after 0\.3s"):
                await agent.exec(["/bin/sleep", "2"], timeout=0.3)
            assert time.monotonic() - t0 < 2

            # a program that does not exist: the agent's error, with its class
            with pytest.raises(CommandError) as info_err:
                await agent.exec(["/nonexistent/xenlab-test"], timeout=10)
            assert info_err.value.command == "guest-exec"

    run(go())


@needs_ga
def test_agent_errors_and_resync(qga: Path) -> None:
    async def go() -> None:
        agent = GuestAgent(qga)
        try:
            with pytest.raises(CommandError) as info:
                await agent.execute("guest-no-such-thing")
            assert info.value.error_class == "CommandNotFound"
            # refused shutdown (blocked in this agent) is an error reply, not silence
            with pytest.raises(CommandError, match="disabled"):
                await agent.shutdown(timeout=5)
            # a reply that comes after its timeout is skipped by the next sync
            await agent.ping()
            with pytest.raises(BackendError, match="no reply within"):
                await agent.execute("guest-info", timeout=1e-6)
            await asyncio.sleep(0.2)  # the late guest-info reply is in the socket now
            assert await agent.execute("guest-ping") == {}
            assert "version" in await agent.info()
        finally:
            await agent.close()

    run(go())


@needs_ga
def test_agent_call_cancelled_mid_reply_is_never_read_as_the_next_ones(qga: Path) -> None:
    # A caller gave up on a command after it was sent (Ctrl-C, a deadline around it): its
    # reply comes later, and the next command on that session must not take it for its
    # own (once: an exec came back with exit 0 and no output).
    async def go() -> None:
        async with GuestAgent(qga) as agent:
            await agent.ping()
            reader = agent._reader
            assert reader is not None
            real = reader.readline

            async def slow() -> bytes:
                await asyncio.sleep(0.5)
                return await real()

            reader.readline = slow  # type: ignore[method-assign]
            stale = asyncio.create_task(agent.execute("guest-exec", {
                "path": "/bin/echo", "arg": ["stale"], "capture-output": True}))
            await asyncio.sleep(0.2)  # sent, its reply not read yet
            stale.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stale
            reader.readline = real  # type: ignore[method-assign]
            await asyncio.sleep(0.2)  # the stale reply is in the socket now
            res = await agent.exec(["/bin/echo", "alive"], timeout=10)
            assert (res.exitcode, res.stdout) == (0, b"alive\n")

    run(go())


@needs_ga
def test_agent_absent_or_silent(tmp_path: Path) -> None:
    import socket

    async def go(path: Path) -> None:
        with pytest.raises(BackendError, match="cannot connect"):
            await GuestAgent(tmp_path / "none.sock").ping()
        # a socket nobody answers on (a guest without its agent)
        t0 = time.monotonic()
        with pytest.raises(BackendError, match=r"no answer to guest-sync within 0\.3s"):
            await GuestAgent(path).connect(timeout=0.3)
        assert time.monotonic() - t0 < 3

    path = _sock_dir(tmp_path) / "silent.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)
    try:
        run(go(path))
    finally:
        srv.close()
