"""QMP and guest-agent sessions: :class:`Qmp`, :func:`run_job` and :class:`GuestAgent`.

:class:`Qmp` is a thin async layer over ``qemu.qmp.QMPClient``: every call is
bounded by a timeout and every failure (QEMU's error reply, a lost
connection, a timeout) becomes :class:`xenlab.errors.BackendError` naming the
command, with the library's error chained as ``__cause__``.  Nothing above
``vm/`` imports ``qemu.qmp``.

Events are read through listeners registered *before* the command that
causes them, so an event that arrives between two calls is never lost::

    async with Qmp.open(path) as qmp:
        with qmp.listen({"STOP"}) as events:
            await qmp.execute("stop")
            ev = await events.wait(timeout=5)

:class:`GuestAgent` speaks the QEMU guest agent protocol on the host end of
the agent's socket.  It is not QMP: there is no greeting and no capability
negotiation, and after a timeout a late reply may still be in the pipe, so
every session starts with ``guest-sync-delimited`` (a random id; the agent
answers behind a ``0xFF`` byte, which lets us skip partial and stale output).

Design: sessions are short (one per verb step, on the command's event loop,
cli/loop.py), so there is no reconnect logic; a session whose
QEMU died raises :class:`BackendError` from every call instead of hanging.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    Runstate,
)
from qemu.qmp import QMPError as _LibError
from qemu.qmp.qmp_client import NegotiationError

from xenlab.errors import BackendError, DeviceNotReleased, Refused

__all__ = [
    "CommandError",
    "DeviceNotReleased",
    "EventWatch",
    "ExecResult",
    "GuestAgent",
    "Qmp",
    "delete_device",
    "job_ids",
    "qdev_ids",
    "run_job",
    "settle_job",
]

T = TypeVar("T")
Event = dict[str, Any]
EventMatch = Callable[[Event], bool]

@dataclass
class _Shared:
    """The sessions of a :meth:`Qmp.sharing` block: by socket path, and all to close."""

    by_path: dict[str, Qmp]
    opened: list[Qmp]


_SHARED: contextvars.ContextVar[_Shared | None] = contextvars.ContextVar(
    "xenlab_qmp_shared", default=None)


# How often connect() retries while QEMU is still creating its socket.
_CONNECT_RETRY = 0.05
# How many times connect() tries again after an event raced the negotiation.
_NEGOTIATION_RETRIES = 5


class CommandError(Refused):
    """QEMU (or the guest agent) answered a command with an error reply.

    ``command`` is the command sent, ``error_class`` QEMU's error class
    (``CommandNotFound``, ``GenericError``, ...) and ``desc`` (also ``reason``)
    its description.
    """

    def __init__(self, where: str, command: str, error_class: str, desc: str) -> None:
        self.error_class = error_class
        self.desc = desc
        super().__init__(command, desc, f"{where} {command}: {error_class}: {desc}")


def _names(name: str | Iterable[str]) -> frozenset[str]:
    return frozenset((name,)) if isinstance(name, str) else frozenset(name)


class EventWatch:
    """Events of some names, queued from the moment :meth:`Qmp.listen` registered them."""

    def __init__(self, qmp: Qmp, names: frozenset[str], match: EventMatch | None) -> None:
        self._qmp = qmp
        self.names = names
        self._match = match
        self._listener = EventListener(set(names))

    async def wait(self, timeout: float, match: EventMatch | None = None) -> Event:
        """The next queued event that passes ``match`` (and the watch's own match).

        Events that do not pass are dropped from this watch only.

        :raise BackendError: when ``timeout`` seconds pass first, or the
            connection is lost with no matching event queued.
        """
        deadline = time.monotonic() + timeout
        while True:
            ev = await self._qmp._next_event(self._listener, deadline, self.names, timeout)
            if self._match is not None and not self._match(ev):
                continue
            if match is not None and not match(ev):
                continue
            return ev

    def pending(self) -> list[Event]:
        """Take every event queued so far, without waiting."""
        return [_event_dict(m) for m in self._listener.clear()]


def _event_dict(msg: Mapping[str, Any]) -> Event:
    return dict(msg)


class Qmp:
    """One QMP session with one QEMU, over its unix socket.

    :raise BackendError: from every method on failure; QEMU's error replies
        raise :class:`CommandError`, a subclass carrying the error class.
    """

    def __init__(self, name: str | None = None) -> None:
        self._client = QMPClient(name)
        self._path: Path | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path, timeout: float = 10.0) -> AsyncIterator[Qmp]:
        """Connect to ``path`` for the length of an ``async with`` block; inside a
        :meth:`sharing` block, the session that block keeps for ``path`` (opened once)."""
        shared = _SHARED.get()
        if shared is not None:
            held = shared.by_path.get(str(path))
            if held is None or not held.connected:
                held = cls()
                await held.connect(path, timeout)
                shared.by_path[str(path)] = held
                shared.opened.append(held)
            yield held
            return
        qmp = cls()
        await qmp.connect(path, timeout)
        try:
            yield qmp
        finally:
            await qmp.close()

    @staticmethod
    @contextlib.asynccontextmanager
    async def sharing() -> AsyncIterator[None]:
        """One session per QMP socket for the block (a verb's backend calls share it);
        all are closed when it ends.  A nested block uses the outer one's."""
        if _SHARED.get() is not None:
            yield
            return
        shared = _Shared({}, [])
        token = _SHARED.set(shared)
        try:
            yield
        finally:
            # Closed first: a block left from another context (an abandoned generator
            # closed by the loop) cannot reset the variable, and must still close them.
            for qmp in shared.opened:
                with contextlib.suppress(Exception):
                    await qmp.close()
            with contextlib.suppress(ValueError):
                _SHARED.reset(token)

    @staticmethod
    def forget(path: Path) -> None:
        """The QEMU at ``path`` is stopping or starting: its shared session (if any) is
        not handed out again (a restarted QEMU listens on the same path, and a killed
        one's session is seen dead only once the loop has run)."""
        shared = _SHARED.get()
        if shared is not None:
            shared.by_path.pop(str(path), None)

    @property
    def connected(self) -> bool:
        """True while the session is up (False once QEMU has gone)."""
        return self._client.runstate == Runstate.RUNNING

    async def connect(self, path: Path, timeout: float = 10.0) -> None:
        """Connect and negotiate capabilities, retrying while the socket is not there yet.

        QEMU creates its QMP socket a moment after it starts, so a caller that
        just spawned QEMU may call this at once.

        :raise BackendError: when no session is up within ``timeout`` seconds.
        """
        self._path = Path(path)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        races = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendError(
                    f"QMP connect {path}: no session within {timeout:g}s: {last}"
                ) from last
            try:
                await asyncio.wait_for(self._client.connect(str(path)), remaining)
                return
            except TimeoutError as err:
                last = err
            except ConnectError as err:
                # A missing or refusing socket is normal while QEMU starts up;
                # anything else (a bad greeting) will not get better by waiting,
                # except one race: QEMU may send an event (a MIGRATION status, say)
                # between switching the session to command mode and its reply to
                # qmp_capabilities, which the library takes for a bad reply.
                negotiation = isinstance(err.exc, NegotiationError) and isinstance(
                    err.exc.exc, AssertionError)
                if negotiation:
                    races += 1
                if not (isinstance(err.exc, FileNotFoundError | ConnectionRefusedError)
                        or (negotiation and races <= _NEGOTIATION_RETRIES)):
                    raise BackendError(f"QMP connect {path}: {err}") from err
                last = err
            await asyncio.sleep(min(_CONNECT_RETRY, max(0.0, deadline - time.monotonic())))

    async def send_fd(self, fd: int, name: str) -> None:
        """Hand file descriptor ``fd`` to QEMU under ``name`` (SCM_RIGHTS, then ``getfd``).

        QEMU then reads or writes the file itself (a migration URI ``fd:NAME``),
        with no shell and no path for anybody to swap.

        :raise BackendError: the descriptor could not be passed, or QEMU refused it.
        """
        try:
            self._client.send_fd_scm(fd)
        except Exception as err:  # the library's QMPError, or OSError from sendmsg
            raise BackendError(f"QMP getfd {name}: cannot pass the descriptor: {err}") from err
        await self.execute("getfd", {"fdname": name})

    async def execute(
        self, cmd: str, args: Mapping[str, object] | None = None, timeout: float = 30.0
    ) -> object:
        """Run QMP command ``cmd`` with ``args``; its ``return`` value.

        :raise CommandError: when QEMU answers with an error.
        :raise BackendError: on timeout, or when the connection is or gets lost.
        """
        try:
            return await asyncio.wait_for(self._client.execute(cmd, args), timeout)
        except ExecuteError as err:
            raise CommandError("QMP", cmd, err.error_class, str(err)) from err
        except TimeoutError as err:
            raise BackendError(f"QMP {cmd}: no reply within {timeout:g}s") from err
        except ExecInterruptedError as err:
            raise BackendError(f"QMP {cmd}: connection lost (QEMU gone?): {err}") from err
        except (_LibError, OSError, EOFError) as err:
            raise BackendError(f"QMP {cmd}: {type(err).__name__}: {err}") from err

    @contextlib.contextmanager
    def listen(
        self, names: str | Iterable[str], match: EventMatch | None = None
    ) -> Iterator[EventWatch]:
        """Queue events named ``names`` (passing ``match``) from now until the block ends.

        Register the watch before the command that triggers the events, then
        :meth:`EventWatch.wait` for them: nothing that arrives in between is lost.
        """
        watch = EventWatch(self, _names(names), match)
        with self._client.listen(watch._listener):
            yield watch

    async def wait_event(
        self, name: str | Iterable[str], timeout: float, match: EventMatch | None = None
    ) -> Event:
        """The next event named ``name`` (one of them, for a set) that passes ``match``.

        Only events arriving after this call are seen; to catch the events a
        command causes, use :meth:`listen` around the command instead.

        :raise BackendError: after ``timeout`` seconds, or when QEMU goes away.
        """
        with self.listen(name, match) as watch:
            return await watch.wait(timeout)

    async def _next_event(
        self, listener: EventListener, deadline: float, names: frozenset[str], timeout: float
    ) -> Event:
        what = "/".join(sorted(names))
        while True:
            if not listener.empty():
                return _event_dict(await listener.get())
            if self._client.runstate != Runstate.RUNNING:
                raise BackendError(f"QMP event {what}: connection lost (QEMU gone?)")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendError(f"QMP event {what}: none within {timeout:g}s")
            # Race the next event against a change of connection state, so a
            # QEMU that dies makes the wait fail at once rather than time out.
            get = asyncio.ensure_future(listener.get())
            changed = asyncio.ensure_future(self._client.runstate_changed())
            try:
                done, _ = await asyncio.wait(
                    {get, changed}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for fut in (get, changed):
                    if not fut.done():
                        fut.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await fut
            if get in done:
                return _event_dict(get.result())

    async def close(self, timeout: float = 5.0) -> None:
        """End the session; closing one whose QEMU already died is not an error."""
        # disconnect() re-raises whatever stopped the reader (EOFError when
        # QEMU exited), which is the expected end of a session, not a failure.
        with contextlib.suppress(_LibError, OSError, EOFError, TimeoutError):
            await asyncio.wait_for(self._client.disconnect(), timeout)


async def _job_info(qmp: Qmp, job_id: str) -> dict[str, Any] | None:
    jobs = await qmp.execute("query-jobs")
    if isinstance(jobs, list):
        for job in jobs:
            if isinstance(job, dict) and job.get("id") == job_id:
                return job
    return None


async def qdev_ids(qmp: Qmp) -> frozenset[str]:
    """The ids of the devices QEMU has now (``-device id=`` / ``device_add``'s ``id``)."""
    listed = await qmp.execute("qom-list", {"path": "/machine/peripheral"})
    return frozenset(str(p["name"]) for p in listed if isinstance(p, dict)
                     and str(p.get("type", "")).startswith("child<")
                     ) if isinstance(listed, list) else frozenset()


async def delete_device(qmp: Qmp, device_id: str, timeout: float) -> bool:
    """Ask the guest to let ``device_id`` go and wait for QEMU's ``DEVICE_DELETED``.

    False when QEMU had no such device already (an earlier request timed out and
    the guest let go since).  A device that vanishes between that check and
    ``device_del`` (the guest released it just then: QEMU says DeviceNotFound) is
    released, not an error.

    :raise CommandError: QEMU refused, and the device is still there.
    :raise DeviceNotReleased: the guest did not release it within ``timeout`` seconds.
    """
    if device_id not in await qdev_ids(qmp):
        return False
    with qmp.listen("DEVICE_DELETED",
                    lambda ev: ev.get("data", {}).get("device") == device_id) as watch:
        try:
            await qmp.execute("device_del", {"id": device_id})
        except CommandError:
            if device_id not in await qdev_ids(qmp):
                return True
            raise
        try:
            await watch.wait(timeout)
        except BackendError as err:
            raise DeviceNotReleased(device_id, timeout) from err
    return True


async def run_job(
    qmp: Qmp, job_id: str, timeout: float, *, complete_on_ready: bool = False
) -> None:
    """Wait for job ``job_id`` to conclude, then dismiss it.

    Safe to call after the command that started the job returned: the job's
    state is read after the listener is in place, so a job that already
    concluded is seen.  Jobs should be started with ``auto-dismiss: false``
    so their error can be read; a job that vanished on its own is taken as
    done unless a ``BLOCK_JOB_COMPLETED`` event reported an error.
    ``complete_on_ready`` sends ``job-complete`` when the job is ready (a
    mirror), otherwise a job that waits in ``ready`` runs into the timeout.

    :raise BackendError: the job's own error, an unknown job, or no
        conclusion within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout

    def ours(ev: Event) -> bool:
        data = ev.get("data") or {}
        return data.get("id") == job_id or data.get("device") == job_id

    with qmp.listen({"JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED"}, ours) as watch:
        info = await _job_info(qmp, job_id)
        if info is None:
            raise BackendError(f"job {job_id}: no such job")
        status = str(info.get("status"))
        block_error: str | None = None
        completed = False
        while status != "concluded":
            if status == "ready" and complete_on_ready and not completed:
                await qmp.execute("job-complete", {"id": job_id})
                completed = True
            if status == "null":
                if block_error:
                    raise BackendError(f"job {job_id} failed: {block_error}")
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendError(
                    f"job {job_id}: not concluded within {timeout:g}s (status {status})"
                )
            try:
                ev = await watch.wait(remaining)
            except BackendError as err:
                raise BackendError(f"job {job_id}: {err} (status {status})") from err
            data = ev.get("data") or {}
            if ev.get("event") == "BLOCK_JOB_COMPLETED":
                block_error = data.get("error")
            else:
                status = str(data.get("status"))
        info = await _job_info(qmp, job_id)
        await qmp.execute("job-dismiss", {"id": job_id})
    error = (info or {}).get("error") or block_error
    if error:
        kind = (info or {}).get("type", "job")
        raise BackendError(f"job {job_id} ({kind}) failed: {error}")


async def settle_job(qmp: Qmp, job_id: str, timeout: float, *,
                     complete_on_ready: bool = False) -> tuple[bool, str | None]:
    """Let a job that an earlier, killed command started end, and dismiss it.

    Returns ``(found, error)``: whether QEMU had a job ``job_id``, and its
    error if it failed.  A job left undismissed blocks its id for good
    ("Job ID ... already in use"), so every command that starts a job of a
    fixed id settles the old one first.

    :raise BackendError: the job did not end within ``timeout`` seconds.
    """
    if await _job_info(qmp, job_id) is None:
        return False, None
    try:
        await run_job(qmp, job_id, timeout, complete_on_ready=complete_on_ready)
    except BackendError as err:
        if "not concluded within" in str(err):
            raise
        return True, str(err)
    return True, None


async def job_ids(qmp: Qmp) -> dict[str, str]:
    """QEMU's jobs now: ``{id: status}``."""
    jobs = await qmp.execute("query-jobs")
    return {str(j.get("id")): str(j.get("status")) for j in jobs if isinstance(j, dict)
            } if isinstance(jobs, list) else {}


@dataclass(frozen=True, slots=True)
class ExecResult:
    """What a command run through the guest agent did.

    ``exitcode`` is the exit status, or ``-signal`` when a signal ended it
    (as ``subprocess`` reports it); ``signal`` is that signal or None.
    """

    exitcode: int
    stdout: bytes
    stderr: bytes
    signal: int | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False


# The agent caps captured output at 16 MiB per stream, base64 makes it 4/3.
_QGA_LINE_LIMIT = 64 * 1024 * 1024


class GuestAgent:
    """A session with the QEMU guest agent behind the unix socket ``path``.

    Connects on first use; one request at a time.  After any timeout the
    next call resynchronises first, skipping the late reply.

    :raise BackendError: from every method on failure; error replies raise
        :class:`CommandError`.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._in_sync = False
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> GuestAgent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, timeout: float = 10.0) -> None:
        """Open the socket and synchronise with the agent.

        :raise BackendError: when the socket cannot be opened or the agent
            does not answer the sync within ``timeout`` seconds.
        """
        async with self._lock:
            await self._ensure(time.monotonic() + timeout, timeout)

    async def close(self) -> None:
        """Close the socket (idempotent)."""
        writer, self._writer, self._reader = self._writer, None, None
        self._in_sync = False
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _ensure(self, deadline: float, timeout: float) -> None:
        if self._writer is None:
            try:
                self._reader, self._writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(str(self.path), limit=_QGA_LINE_LIMIT),
                    max(0.0, deadline - time.monotonic()),
                )
            except (OSError, TimeoutError) as err:
                raise BackendError(f"guest agent {self.path}: cannot connect: {err}") from err
        if not self._in_sync:
            await self._sync(deadline, timeout)

    async def _sync(self, deadline: float, timeout: float) -> None:
        assert self._reader is not None and self._writer is not None
        token = random.randrange(1, 2**31)
        msg = {"execute": "guest-sync-delimited", "arguments": {"id": token}}
        # The leading 0xFF makes the agent's JSON parser drop any partial
        # request; its reply comes after a 0xFF of its own, so everything
        # before that byte (stale replies, the parse error) is skipped.
        try:
            self._writer.write(b"\xff" + json.dumps(msg).encode() + b"\n")
            await self._writer.drain()
            seen_sentinel = False
            while True:
                line = await asyncio.wait_for(
                    self._reader.readline(), max(0.0, deadline - time.monotonic())
                )
                if not line:
                    raise EOFError("agent closed the connection")
                if b"\xff" in line:
                    seen_sentinel = True
                    line = line.rsplit(b"\xff", 1)[1]
                if not seen_sentinel:
                    continue
                reply = _parse_line(line)
                if reply is not None and reply.get("return") == token:
                    self._in_sync = True
                    return
        except TimeoutError as err:
            await self.close()
            raise BackendError(
                f"guest agent {self.path}: no answer to guest-sync within {timeout:g}s "
                "(is qemu-ga running in the guest?)"
            ) from err
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as err:
            await self.close()
            raise BackendError(f"guest agent {self.path}: guest-sync: {err}") from err

    async def execute(
        self,
        cmd: str,
        args: Mapping[str, object] | None = None,
        timeout: float = 30.0,
        *,
        reply: bool = True,
    ) -> object:
        """Run agent command ``cmd``; its ``return`` value (None when ``reply`` is False).

        :raise CommandError: when the agent answers with an error.
        :raise BackendError: on timeout or a lost connection.
        """
        deadline = time.monotonic() + timeout
        async with self._lock:
            await self._ensure(deadline, timeout)
            assert self._reader is not None and self._writer is not None
            msg: dict[str, object] = {"execute": cmd}
            if args is not None:
                msg["arguments"] = dict(args)
            # Out of step until this command's reply is read back: a timeout, an error
            # or a cancel in between leaves a reply in the pipe, and the next call must
            # resync past it rather than take it for its own.
            self._in_sync = False
            try:
                self._writer.write(json.dumps(msg).encode() + b"\n")
                await self._writer.drain()
                if not reply:
                    self._in_sync = True
                    return None
                line = await asyncio.wait_for(
                    self._reader.readline(), max(0.0, deadline - time.monotonic())
                )
            except TimeoutError as err:
                raise BackendError(f"guest agent {cmd}: no reply within {timeout:g}s") from err
            except (OSError, asyncio.LimitOverrunError, ValueError) as err:
                await self.close()
                raise BackendError(f"guest agent {cmd}: {err}") from err
            if not line:
                await self.close()
                raise BackendError(f"guest agent {cmd}: connection closed (guest gone?)")
            self._in_sync = True
            return _reply_value(cmd, line)

    async def ping(self, timeout: float = 10.0) -> None:
        """Check that the agent answers."""
        await self.execute("guest-ping", timeout=timeout)

    async def info(self, timeout: float = 10.0) -> dict[str, Any]:
        """The agent's version and supported commands (``guest-info``)."""
        value = await self.execute("guest-info", timeout=timeout)
        if not isinstance(value, dict):
            raise BackendError(f"guest agent guest-info: unexpected reply {value!r}")
        return value

    async def exec(
        self,
        argv: list[str],
        timeout: float,
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ExecResult:
        """Run ``argv`` in the guest and wait for it to exit; output captured.

        :raise BackendError: when it cannot start, or is still running after
            ``timeout`` seconds (it is left running: the agent cannot kill it).
        """
        if not argv:
            raise BackendError("guest agent guest-exec: empty command")
        deadline = time.monotonic() + timeout
        args: dict[str, object] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
        if input is not None:
            args["input-data"] = base64.b64encode(input).decode("ascii")
        if env is not None:
            args["env"] = [f"{k}={v}" for k, v in env.items()]
        started = await self.execute("guest-exec", args, timeout=timeout)
        # Exactly the replies of these commands: anything else is another command's,
        # read out of step, and never taken for this one's result.
        if not isinstance(started, dict) or set(started) != {"pid"} or \
                not isinstance(started["pid"], int):
            raise BackendError(f"guest agent guest-exec: unexpected reply {started!r}")
        pid: int = started["pid"]
        delay = 0.01
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendError(
                    f"guest agent guest-exec {argv[0]}: still running after {timeout:g}s "
                    f"(guest pid {pid})"
                )
            status = await self.execute("guest-exec-status", {"pid": pid}, timeout=remaining)
            if not isinstance(status, dict) or not isinstance(status.get("exited"), bool):
                raise BackendError(f"guest agent guest-exec-status: unexpected reply {status!r}")
            if status.get("exited"):
                return _exec_result(status)
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.2)

    async def shutdown(self, mode: str = "powerdown", timeout: float = 5.0) -> None:
        """Ask the guest to power down (``mode``: powerdown, halt or reboot).

        The agent sends no reply on success, only on failure, so this waits
        up to ``timeout`` seconds for an error reply and otherwise returns.

        :raise CommandError: when the agent refuses.
        """
        async with self._lock:
            deadline = time.monotonic() + timeout
            await self._ensure(deadline, timeout)
            assert self._reader is not None and self._writer is not None
            msg = {"execute": "guest-shutdown", "arguments": {"mode": mode}}
            try:
                self._writer.write(json.dumps(msg).encode() + b"\n")
                await self._writer.drain()
                line = await asyncio.wait_for(
                    self._reader.readline(), max(0.0, deadline - time.monotonic())
                )
            except (TimeoutError, OSError):
                # Silence or a dropped connection is what success looks like.
                line = b""
            self._in_sync = False
            if line:
                _reply_value("guest-shutdown", line)


def _parse_line(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _reply_value(cmd: str, line: bytes) -> object:
    reply = _parse_line(line)
    if reply is None:
        raise BackendError(f"guest agent {cmd}: reply is not a JSON object: {line[:200]!r}")
    if "error" in reply:
        err = reply["error"] if isinstance(reply["error"], dict) else {}
        raise CommandError(
            "guest agent", cmd, str(err.get("class", "?")), str(err.get("desc", reply["error"]))
        )
    if "return" not in reply:
        raise BackendError(f"guest agent {cmd}: reply without return: {line[:200]!r}")
    return reply["return"]


def _b64(status: Mapping[str, Any], key: str) -> bytes:
    data = status.get(key)
    if not data:
        return b""
    try:
        return base64.b64decode(str(data), validate=True)
    except ValueError as err:
        raise BackendError(f"guest agent guest-exec-status: {key} is not base64") from err


def _exec_result(status: Mapping[str, Any]) -> ExecResult:
    sig = status.get("signal")
    code = status.get("exitcode")
    if isinstance(sig, int):
        exitcode = -sig
    elif isinstance(code, int):
        exitcode = code
    else:
        raise BackendError(f"guest agent guest-exec-status: exited without a code: {status!r}")
    return ExecResult(
        exitcode=exitcode,
        stdout=_b64(status, "out-data"),
        stderr=_b64(status, "err-data"),
        signal=sig if isinstance(sig, int) else None,
        stdout_truncated=bool(status.get("out-truncated")),
        stderr_truncated=bool(status.get("err-truncated")),
    )
