"""The destination of a migration: :func:`receive`, :func:`finish_receive`, :func:`abort_receive`
on this host, and :func:`serve_receive`, which waits for a source on another host.

:func:`receive` starts a QEMU with ``-incoming defer`` listening for the
stream (and, for a storage migration, exporting blank disks over NBD);
:func:`finish_receive` waits for the stream and resumes the guest.

:func:`serve_receive` (``xenlab vm receive``) listens on ``HOST:PORT`` and
speaks the control protocol of docs/migration.md.  Before a peer has shown
the token it can neither end nor stall the receiver: every connection is
greeted at once by its own asyncio task, must send its "prepare" within
``auth_timeout`` seconds in all (a byte a second does not keep it), in a
line of at most :data:`~xenlab.vm.migration.channel.LINE_MAX` bytes that is UTF-8
JSON; at most ``max_pending`` connections wait at a time (the oldest is
dropped for a new one, so a flood cannot lock a real source out for long:
it answers the greeting within milliseconds); a connection that breaks,
closes, resets or sends junk is told why (when it still listens) and
closed.  Anything that fails before a QEMU has started (no token, a wrong
one, a malformed request, a config or header the receiver does not take
from a peer, see :mod:`xenlab.vm.migration.peerconfig`, even a QEMU that refuses the
config) leaves nothing behind, and the receiver goes on waiting.  Once a
source is taken, the connections still waiting are told another source is
migrating here, and the port is closed.

Defaults (with reasons): ``auth_timeout`` 5 s, as a real source sends its
"prepare" right after the greeting and gives up itself after 30 s without
one; ``max_pending`` 32, which bounds the memory of half-sent lines to
32 MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from xenlab.atomic import FileWriteError
from xenlab.config.model import DomainConfig
from xenlab.config.specs.disk import DiskFormat
from xenlab.errors import BackendError, StateError, UsageError, XenlabError
from xenlab.vm import qemuimg
from xenlab.vm.domain import Toolstack
from xenlab.vm.domconfig import config_from_text, on_disks
from xenlab.vm.migration import wire
from xenlab.vm.migration.channel import (
    PROTOCOL,
    Channel,
    Lost,
    expect,
    parse_address,
    uri_host,
)
from xenlab.vm.migration.image import DiskMove
from xenlab.vm.migration.peerconfig import check_request
from xenlab.vm.migration.saverestore import Placed, image_for, place, said, settle
from xenlab.vm.runtime import VCPUS_PLUGGED
from xenlab.vm.store import DomainRecord

__all__ = [
    "AUTH_TIMEOUT",
    "MAX_PENDING",
    "Incoming",
    "abort_receive",
    "finish_receive",
    "mirrored_disks",
    "receive",
    "serve_receive",
]

_log = logging.getLogger(__name__)

AUTH_TIMEOUT: Final = 5.0
MAX_PENDING: Final = 32
# How long one side waits for the other to start or load a QEMU.
START_TIMEOUT: Final = 120.0
_BUSY: Final = "another source is migrating here"
_BACKLOG: Final = 1024
# After a failed accept() (out of file descriptors), before the next one.
_ACCEPT_BACKOFF: Final = 0.1


# --- the destination QEMU ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Incoming:
    """A destination QEMU listening for a migration (see :func:`receive`).

    ``port`` is the migration port really bound (useful when 0 was asked);
    ``nbd_port`` is set when the disks are exported for ``with_storage``;
    ``disks`` are the exported vdevs; ``created`` the disk files made for it;
    ``extra`` the record's extra once it runs (where its disks are).
    """

    record: DomainRecord
    host: str
    port: int
    nbd_port: int | None
    disks: tuple[str, ...]
    created: tuple[str, ...]
    extra: Mapping[str, Any] = field(default_factory=dict)


def mirrored_disks(dc: DomainConfig) -> list[tuple[str, str, str]]:
    """The disks a storage migration copies: (vdev, path, format) of each writable image."""
    return [
        (d.vdev, d.pdev_path, d.format.value)
        for d in dc.disks
        if d.pdev_path and d.readwrite and not d.is_cdrom
    ]


def _free_port(host: str) -> int:
    """A TCP port free on ``host`` right now (for the NBD server, which cannot report one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _check_space(todo: Sequence[tuple[str, str, int]]) -> None:
    """Refuse disks (vdev, target, size) that would not fit where they are to be made.

    The images are sparse, but the mirror fills them: each filesystem must
    have room for every disk made on it, so a size from the wire (1 EB, say)
    cannot fill this host's disk.
    """
    taken: dict[int, int] = {}
    for vdev, target, size in todo:
        parent = os.path.dirname(os.path.abspath(target))
        try:
            st = os.statvfs(parent)
            dev = os.stat(parent).st_dev
        except OSError as err:
            raise FileWriteError(f"disk {target!r} ({vdev})", f"cannot make it in {parent}: "
                                 f"{err.strerror or err}") from err
        free = st.f_bavail * st.f_frsize
        need = taken.get(dev, 0) + size
        if size <= 0 or need > free:
            raise StateError(
                f"disk {target!r} ({vdev}): the source's disk is {size} bytes, but {parent} "
                f"has {free} bytes free" + (" beside the other disks made there"
                                            if taken.get(dev) else "")
                + "; nothing was made")
        taken[dev] = need


async def receive(
    ts: Toolstack, config_text: str, port: int = 0, *, host: str = "127.0.0.1",
    overrides: Sequence[str] = (), with_storage: bool = False, nbd_port: int | None = None,
    disk_sizes: Mapping[str, int] | None = None, config_path: str = "",
    uuid: str | None = None, image: object | None = None,
    disk_paths: Sequence[DiskMove] = (), overlays: Sequence[DiskMove] = (),
    vcpus_plugged: int | None = None,
) -> Incoming:
    """Start the destination of a migration: QEMU listening on ``host:port``.

    The domain is ``config_text`` plus ``overrides``, with the disks in
    ``disk_paths`` (mirror targets) and ``overlays`` (external snapshot
    overlays) on those files unless an override moved them; it is recorded
    with state "incoming" and starts paused.  With ``with_storage`` its
    writable disks are exported over NBD on ``nbd_port`` (default
    ``port + 1``, or a free port when ``port`` is 0) for the source to
    mirror into; a disk file that does not exist is created when
    ``disk_sizes`` gives its size in bytes (by vdev), blank, in the config's
    format, if its filesystem has room for it.  Follow with
    :func:`finish_receive` once the source has sent everything, or
    :func:`abort_receive`.  :func:`serve_receive` does all of it for a
    source on another host.

    :raise XenlabError: bad config, name taken, a missing disk without a size,
        or one larger than the free space where it would be made.
    :raise BackendError: QEMU refused the config, the port or the NBD export
        (QEMU's own words quoted).  Nothing is left behind on failure.
    """
    source = config_path or f"{host}:{port} (incoming)"
    dc, text = config_from_text(config_text, source, overrides)
    text_dc = config_from_text(config_text, source)[0] if overrides else dc
    where = f"incoming {dc.name}"
    if with_storage:
        # The destination's disks are blank until mirrored: they need not exist yet.
        saved = {d.vdev: d.pdev_path for d in text_dc.disks}
        now = {d.vdev: d.pdev_path for d in dc.disks}
        keep = {m.vdev: (m.file, DiskFormat(m.format)) for m in (*disk_paths, *overlays)
                if m.vdev in now and now[m.vdev] == saved.get(m.vdev)}
        dc = on_disks(dc, keep)
        placed = Placed(dc, {m.vdev: {"file": m.file, "format": m.format}
                             for m in disk_paths if m.vdev in keep}, {})
    else:
        placed = place(text_dc, dc, disk_paths, overlays, where)
        dc = placed.config
    disks = mirrored_disks(dc) if with_storage else []
    todo: list[tuple[str, str, str, int]] = []
    for vdev, target, fmt in disks:
        if Path(target).exists():
            continue
        size = (disk_sizes or {}).get(vdev)
        if size is None:
            raise UsageError(
                f"disk {target!r} ({vdev}) does not exist on the destination; "
                f"a storage migration needs a blank image of the source's size (--disk-size)"
            )
        todo.append((vdev, target, fmt, size))
    _check_space([(v, t, s) for v, t, _, s in todo])
    created: list[str] = []
    try:
        for _, target, fmt, size in todo:
            try:
                await qemuimg.create(target, fmt, size)
            except BackendError as err:
                raise FileWriteError(target, str(err)) from err
            created.append(target)
        rec = await ts.launch(dc, text, config_path=config_path, uuid=uuid, incoming="defer",
                        image=image_for(dc, image))
    except BaseException:
        _unlink(created)
        raise
    try:
        if with_storage and nbd_port is None:
            nbd_port = port + 1 if port else _free_port(host)
        bound = await (ts.backend.migrate_prepare(
            ts.handle(rec), host, port, [v for v, _, _ in disks],
            nbd_port if with_storage else None, vcpus_plugged))
        extra = placed.extra(rec.extra)
        if vcpus_plugged:
            extra[VCPUS_PLUGGED] = vcpus_plugged
        return Incoming(rec, host, bound, nbd_port if with_storage else None,
                        tuple(v for v, _, _ in disks), tuple(created), extra)
    except BaseException as err:
        alive = ts.alive(rec)
        ts.kill_domain(rec)
        words = said(ts, rec)
        await ts.gone(rec)
        _unlink(created)
        if isinstance(err, BackendError) and words:
            raise BackendError(f"{where}: {err}" + ("" if alive else " (QEMU exited)")
                               + words) from err
        raise


def _unlink(files: Sequence[str]) -> None:
    for p in files:
        Path(p).unlink(missing_ok=True)


async def finish_receive(ts: Toolstack, incoming: Incoming, *, paused: bool = False,
                   timeout: float = 600.0) -> DomainRecord:
    """Wait until the migration stream has arrived, then resume the domain; its record.

    Stops the NBD exports of a storage migration first, then ``cont``
    (unless ``paused``).

    :raise BackendError: the stream failed or the destination QEMU went
        away (its record is removed), or nothing completed within ``timeout``.
    """
    rec = incoming.record
    async with ts.store.alock(rec.domid):
        try:
            await _finish(ts, incoming, paused, timeout)
        except BaseException as err:
            raise (await _receive_failed(ts, incoming, err)) from err
        return settle(ts, rec, "paused" if paused else "running", incoming.extra)


async def _receive_failed(ts: Toolstack, incoming: Incoming, err: BaseException) -> BaseException:
    """Kill and forget an incoming domain after ``err``; the error to raise, saying why."""
    rec = incoming.record
    alive = ts.alive(rec)
    ts.kill_domain(rec)
    words = said(ts, rec)
    await ts.gone(rec)
    _unlink(incoming.created)
    if isinstance(err, BackendError) and not alive:
        return BackendError(
            f"incoming {rec.name}: the destination QEMU exited during the migration "
            f"(the stream broke off or could not be loaded) [{err}]{words}"
        )
    if isinstance(err, BackendError):
        return BackendError(f"incoming {rec.name}: {err}{words}")
    return err


async def _finish(ts: Toolstack, inc: Incoming, paused: bool, timeout: float) -> None:
    h = ts.handle(inc.record)
    await ts.backend.migrate_wait_incoming(h, f"incoming {inc.record.name}", timeout)
    await ts.backend.migrate_finish(h, _exports(inc), paused)


def _exports(inc: Incoming) -> tuple[str, ...] | None:
    """The disks a storage migration exported (None: it was not one)."""
    return inc.disks if inc.nbd_port is not None else None


async def abort_receive(ts: Toolstack, incoming: Incoming) -> None:
    """Give up on an incoming migration: kill its QEMU, forget it, remove disks made for it."""
    rec = incoming.record
    async with ts.store.alock(rec.domid):
        ts.kill_domain(rec)
        await ts.gone(rec)
    _unlink(incoming.created)


# --- a source on another host -------------------------------------------------------------------


async def serve_receive(
    ts: Toolstack, listen: str, *, token: str, trust_peer_config: bool = False,
    disk_dir: Path | None = None, overrides: Sequence[str] = (), paused: bool = False,
    timeout: float = 600.0, accept_timeout: float | None = None,
    on_listen: Callable[[str, int], None] | None = None, image: object | None = None,
    auth_timeout: float = AUTH_TIMEOUT, max_pending: int = MAX_PENDING,
) -> DomainRecord:
    """Receive one domain migrated to ``HOST:PORT`` by a source with ``token``; its record;
    xl migrate-receive.

    Listens on ``listen`` (port 0: any; ``on_listen(host, port)`` is told
    the port bound) and admits connections as the module docstring says.
    The first source whose "prepare" carries ``token`` and asks only for
    what :func:`xenlab.vm.migration.peerconfig.check_request` takes (``overrides``,
    the receiver's own ``key=value`` lines, may set anything; ``disk_dir``
    is where the source may name disk files; ``trust_peer_config`` takes
    everything from it) gets a QEMU started from its config, listening for
    the stream on a port of its own; the guest is resumed (unless ``paused``
    here or asked by the source) only when the source says go, after which
    the source quits.  Listen on a private network only: the token travels
    in clear, and the ports QEMU opens take any connection.

    CLI: ``xenlab vm receive --listen HOST:PORT [--token-file FILE]
    [--disk-dir DIR] [--trust-peer-config] [-p] [key=value ...]``.

    :raise XenlabError: an empty ``token``, or ``listen`` not ``HOST:PORT``.
    :raise BackendError: the port cannot be bound; no source with the token
        connected within ``accept_timeout``; or, once its QEMU started, the
        source went away or gave up, or QEMU could not load or resume the
        guest (no QEMU and no record is left; the source resumes its guest).
    """
    if not token:
        raise UsageError("receive: an empty migration token would let anyone in")
    host, port = parse_address(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        # A deep backlog: a flood of connections waits in the kernel, not in SYN retries.
        srv = socket.create_server((host, port), family=family, backlog=_BACKLOG)
    except OSError as err:
        raise BackendError(f"receive: cannot listen on {listen}: {err.strerror or err}"
                           ) from err
    srv.setblocking(False)
    deadline = None if accept_timeout is None else time.monotonic() + accept_timeout
    with srv:
        if on_listen is not None:
            on_listen(host, int(srv.getsockname()[1]))
        while True:
            ch, prep = await (_admit(srv, token, deadline=deadline, accept_timeout=accept_timeout,
                                   auth_timeout=auth_timeout, max_pending=max_pending,
                                   where=listen))
            try:
                req = check_request(prep, peer=ch.peer, overrides=overrides,
                                    disk_dir=disk_dir, trust=trust_peer_config)
                header = req.header
                inc = await receive(ts, header.config_text, 0, host=host, overrides=overrides,
                              with_storage=req.with_storage, disk_sizes=req.disk_sizes,
                              config_path=header.config_path, uuid=header.uuid,
                              image=image, disk_paths=req.disk_paths,
                              overlays=req.overlays, vcpus_plugged=header.vcpus_plugged)
            except XenlabError as err:
                # Nothing started or made: tell the source why, wait for another.
                _log.warning("receive on %s: refused %s: %s", listen, ch.peer, err)
                ch.refuse(str(err))
                continue
            except Exception as err:  # a bug on a peer's input must not end the receiver
                _log.warning("receive on %s: refused %s: %s: %s", listen, ch.peer,
                             type(err).__name__, err)
                ch.refuse(f"the receiver failed on this request ({type(err).__name__})")
                continue
            break
    with contextlib.closing(ch.sock):
        return await _serve(ts, ch, inc, paused, timeout)


async def _admit(srv: socket.socket, token: str, *, deadline: float | None,
                 accept_timeout: float | None, auth_timeout: float, max_pending: int,
                 where: str) -> tuple[Channel, dict[str, Any]]:
    """Greet every connection on ``srv`` at once; the first whose "prepare" has ``token``.

    Each connection runs in its own task; the others are refused when one wins.
    """
    loop = asyncio.get_running_loop()
    won: asyncio.Future[tuple[Channel, dict[str, Any]]] = loop.create_future()
    # Connections still being greeted, oldest first; and every live task's channel.
    pending: dict[asyncio.Task[None], Channel] = {}
    owner: dict[asyncio.Task[None], Channel] = {}

    async def handshake(ch: Channel) -> None:
        # The connection is closed by the task's done callback (below), once
        # the event loop no longer watches its descriptor; here it is only
        # answered and shut down.
        try:
            # asyncio.timeout, not wait_for: no inner task whose error could go unread
            # when this one is cancelled at the same moment.
            async with asyncio.timeout(auth_timeout + 1):
                prep = await _hello(ch, token, auth_timeout)
        except asyncio.CancelledError:
            ch.refuse(_BUSY, close=False)
            raise
        except TimeoutError:
            why = f"no request within {auth_timeout:g}s"
        except Lost as err:
            _log.info("receive on %s: %s", where, err)
            return
        except BackendError as err:
            why = str(err)
        except Exception as err:  # a bug here must not end the receiver either
            _log.warning("receive on %s: %s: %s", where, ch.peer, err)
            why = f"the receiver failed on this request ({type(err).__name__})"
        else:
            if won.done():
                ch.refuse(_BUSY, close=False)
            else:
                won.set_result((ch, prep))
            return
        _log.warning("receive on %s: refused %s: %s", where, ch.peer, why)
        ch.refuse(why, close=False)

    def finished(task: asyncio.Task[None]) -> None:
        ch = owner.pop(task)
        pending.pop(task, None)
        if not (won.done() and not won.cancelled() and won.result()[0] is ch):
            ch.close()

    async def accept() -> None:
        while True:
            try:
                conn, addr = await loop.sock_accept(srv)
            except OSError as err:
                # Out of descriptors, or a connection gone before it was taken.
                _log.warning("receive on %s: accept: %s", where, err.strerror or err)
                await asyncio.sleep(_ACCEPT_BACKOFF)
                continue
            ch = Channel(conn, f"{uri_host(str(addr[0]))}:{addr[1]}")
            while len(pending) >= max_pending:
                oldest = next(iter(pending))
                pending.pop(oldest).refuse(
                    f"more than {max_pending} connections waiting; the oldest goes",
                    close=False)
                oldest.cancel()
                # Let it end (its done callback closes the socket) before the next
                # accept: a backlog of thousands must not become thousands of open files.
                await asyncio.wait({oldest}, timeout=1)
            task = asyncio.create_task(handshake(ch))
            pending[task] = owner[task] = ch
            task.add_done_callback(finished)

    acceptor = asyncio.create_task(accept())
    try:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return await asyncio.wait_for(asyncio.shield(won), left)
        except TimeoutError as err:
            raise BackendError(f"receive on {where}: no source with the token connected "
                               f"within {accept_timeout:g}s") from err
    finally:
        acceptor.cancel()
        for task in list(pending):
            task.cancel()
        await asyncio.gather(acceptor, *pending, return_exceptions=True)


async def _hello(ch: Channel, token: str, timeout: float) -> dict[str, Any]:
    """Greet a new connection; its "prepare" once it has shown ``token``.

    :raise BackendError: it said something else, nothing, or not the token.
    """
    await ch.send(wire.encode(wire.Hello(PROTOCOL)))
    prep = await ch.recv(timeout, "the source's domain")
    expect(prep, "prepare", ch.peer)
    # The token's absence has its own message (before decode names the field's type).
    got = prep.get("token")
    if not isinstance(got, str) or not got:
        raise BackendError("no migration token in the request: give the one the receiver "
                           "printed (xenlab vm migrate ... --token TOKEN)")
    # surrogatepass: a token file read with surrogateescape may hold lone
    # surrogates; the peer's string has none (the channel refuses them).
    if not hmac.compare_digest(got.encode("utf-8", "surrogatepass"),
                               token.encode("utf-8", "surrogatepass")):
        raise BackendError("wrong migration token: give the one the receiver printed")
    request = wire.decode(prep, ch.peer, wire.Prepare)
    assert isinstance(request, wire.Prepare)
    return dict(request.raw)


async def _serve(ts: Toolstack, ch: Channel, inc: Incoming, paused: bool,
           timeout: float) -> DomainRecord:
    """Follow the protocol from "listening" on with a QEMU started for the source."""
    h = ts.handle(inc.record)
    try:
        go = await _await_stream(ch, ts, inc, timeout)
        rec = inc.record
        async with ts.store.alock(rec.domid):
            still = paused or go.paused
            await ts.backend.migrate_finish(h, _exports(inc), still)
            rec = settle(ts, rec, "paused" if still else "running", inc.extra)
    except BaseException as err:
        failed = await _receive_failed(ts, inc, err)
        # Only now, with the QEMU gone, may the source take its guest back.
        await ch.quiet_send({"msg": "error", "error": str(failed)})
        if failed is err:
            raise
        raise failed from err
    try:
        await ch.send(wire.encode(wire.Resumed(rec.domid, rec.state)))
    except BackendError as err:
        # It runs here now; the source, without the report, keeps its copy paused.
        _log.warning("receive %s: %s; the source was not told that it runs here", rec.name,
                     err)
    return rec


async def _await_stream(ch: Channel, ts: Toolstack, inc: Incoming,
                        timeout: float) -> wire.Go:
    """Tell the source where to send, wait for the stream, report it, wait for "go"."""
    await ch.send(wire.encode(wire.Listening(inc.port, inc.nbd_port)))
    name = inc.record.name
    stream = asyncio.ensure_future(ts.backend.migrate_wait_incoming(
        ts.handle(inc.record), f"incoming {name}", timeout))
    # The source says nothing until the stream is done, unless it gives up
    # or vanishes: either ends the wait at once.
    control = asyncio.ensure_future(ch.recv(timeout, "the stream"))
    try:
        await asyncio.wait({stream, control}, return_when=asyncio.FIRST_COMPLETED)
        if not stream.done():
            msg = control.result()
            raise BackendError(f"the source {ch.peer} gave up: "
                               f"{str(msg.get('error') or msg.get('msg'))[:wire.ERROR_MAX]}")
        stream.result()
    except Lost as err:
        raise BackendError(f"the source went away in the middle of the stream "
                           f"({err})") from err
    finally:
        for fut in (stream, control):
            if not fut.done():
                fut.cancel()
                with contextlib.suppress(asyncio.CancelledError, BackendError):
                    await fut
    await ch.send(wire.encode(wire.Loaded()))
    go = wire.decode(await ch.recv(START_TIMEOUT, "permission to start the guest"), ch.peer,
                     wire.Go, wire.Abort)
    if isinstance(go, wire.Abort):
        raise BackendError(f"the source {ch.peer} gave up: {go.error}")
    assert isinstance(go, wire.Go)
    return go
