"""Save, restore and live migration of domains: :func:`save`, :func:`restore`, :func:`migrate`.

All three ride on QEMU's migration stream; what differs is where it goes.

Save image
    ``xl save`` keeps the domain's config inside the save file, so
    ``restore`` needs nothing else.  A xenlab save image is::

        "XENLAB-SAVE\\n"           12 bytes, the magic
        u32 big-endian N           length of the JSON header
        N bytes of JSON            SaveHeader: version, name, uuid, config text, ...
        QEMU's migration stream    starts with QEMU's own magic "QEVM"

    Version 2 adds ``disk_snapshots``: with ``save --snapshot`` each writable
    qcow2 disk gets an internal snapshot taken while the guest is paused for
    the save, and ``restore`` reverts the disks to it before loading the
    memory, so the guest finds its disks as its memory remembers them even
    if the domain was booted and wrote to them in between.  Version 1
    images (no such field) are still read.

    :func:`pack_header` and :func:`parse_header` are the pure halves of the
    format.  The stream goes through a file descriptor handed to QEMU with
    ``getfd`` (migration URI ``fd:NAME``) rather than ``exec:cat > PATH``:
    no shell, no quoting, an unwritable path fails in ``open`` before the
    domain is touched, and QEMU writes (or reads) from the descriptor's
    current offset, just behind the header we wrote (or skipped).  The image
    is written to a temporary file beside the target and renamed into place
    once QEMU reports ``completed``, so a failed save leaves no file.

Live migration
    The destination is a QEMU started from the same config with
    ``-incoming defer -S`` and told ``migrate-incoming tcp:HOST:PORT``
    (:func:`receive`); the source sends with ``migrate tcp:HOST:PORT``
    (:func:`migrate`); once the stream is complete the destination resumes
    (:func:`finish_receive`) and only then does the source QEMU quit and its
    record go.  Between two hosts the two halves are two commands::

        dest$   xenlab vm migrate-receive guest.cfg --port 4444 [--with-storage]
        source$ xenlab vm migrate guest dest.example:4444 [--with-storage]

    On one host ``dest`` may be a second :class:`Toolstack` (another state
    directory standing for the other host), and :func:`migrate` runs both
    halves itself.

    ``with_storage`` copies the disks too, QEMU's documented NBD flow
    (docs/interop/live-block-operations.rst): the destination exports its
    blank images of the same size over NBD (``nbd-server-start`` on port
    PORT+1 unless told otherwise, ``block-export-add`` writable); the source
    attaches each export as an ``nbd`` blockdev, runs ``blockdev-mirror
    sync=full`` into it, waits until every mirror is ready, migrates, and
    then ends each mirror with ``block-job-cancel`` (a ready mirror cancelled
    completes without pivoting: the source keeps its own disk).  Mirrors run
    in ``write-blocking`` mode, so once ready every guest write reaches the
    destination before the guest sees it complete, and the destination's disk
    is whole when the memory stream ends.

Failures
    The source domain is only stopped for good after the destination runs:
    a failed or interrupted migration (a destination that dies, a timeout)
    cancels the stream and the mirrors, removes the NBD nodes, resumes the
    source if it was running, kills a local destination and forgets its
    record, and raises :class:`BackendError` saying what happened and that
    the domain still runs here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from xenlab.config.model import DomainConfig
from xenlab.config.specs.disk import DiskFormat
from xenlab.errors import BackendError, FormatError, StateError, TruncatedError, XenlabError
from xenlab.vm.domain import Toolstack, config_from_text, create_image
from xenlab.vm.mirror import DISK_PATHS
from xenlab.vm.qemu import RuntimePaths
from xenlab.vm.qmp import Qmp
from xenlab.vm.qmp import run as _run
from xenlab.vm.snapshot import CURRENT, OVERLAYS, _img, _img_tags
from xenlab.vm.store import DomainRecord, SnapshotNode, is_alive

__all__ = [
    "MAGIC",
    "SAVE_VERSION",
    "DiskSnapshot",
    "Incoming",
    "MigrationProgress",
    "MigrationResult",
    "SaveHeader",
    "abort_receive",
    "finish_receive",
    "migrate",
    "pack_header",
    "parse_header",
    "read_header",
    "receive",
    "restore",
    "save",
]

MAGIC = b"XENLAB-SAVE\n"
SAVE_VERSION = 2
# Versions this xenlab still reads (1: before disk_snapshots).
_READS = (1, 2)
# QEMU_VM_FILE_MAGIC: every migration stream starts with it.
_QEMU_MAGIC = b"QEVM"
_LEN = struct.Struct(">I")
# A config is a few KiB; anything near this is not a header.
_HEADER_MAX = 16 << 20
# QEMU 7.2 throttles migration to 32 MiB/s by default, which makes a save of
# a 256 MiB guest take 8 s for no reason on one host; like libvirt's save,
# lift the limit unless the caller asks for one.
_UNLIMITED = 1 << 40
_POLL = 0.05


def _poll(since: float) -> float:
    """How long to sleep before asking QEMU again: 2 ms at first, then longer.

    Most operations on a small guest end within tens of milliseconds; a
    fixed 50 ms period added half of that to each of them on average.  The
    delay grows with the time already waited, up to ``_POLL``.
    """
    return min(_POLL, max(0.002, (time.monotonic() - since) / 8))
_FD_NAME = "xenlab-mig"


# --- the save image header (pure) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiskSnapshot:
    """The internal snapshot ``save --snapshot`` took of one disk: vdev, image file, tag."""

    vdev: str
    file: str
    name: str


@dataclass(frozen=True, slots=True)
class SaveHeader:
    """What a save image records about its domain, ahead of QEMU's stream.

    ``state`` is the domain's run state when it was saved ("running" or
    "paused"); ``qemu_version`` the saving QEMU's ``major.minor.micro``;
    ``disk_snapshots`` the disks' internal snapshots taken with the memory
    (empty unless saved with ``snapshot``; always empty in version 1).
    """

    name: str
    uuid: str
    config_text: str
    config_path: str
    qemu_version: str
    created: float
    state: str
    version: int = SAVE_VERSION
    disk_snapshots: tuple[DiskSnapshot, ...] = ()


_HEADER_FIELDS: Mapping[str, type | tuple[type, ...]] = {
    "version": int,
    "name": str,
    "uuid": str,
    "config_text": str,
    "config_path": str,
    "qemu_version": str,
    "created": (int, float),
    "state": str,
}


def pack_header(h: SaveHeader) -> bytes:
    """The bytes that precede QEMU's stream in a save image: magic, length, JSON.

    A header of version 1 is written as version 1 wrote it (no disk snapshots).
    """
    if h.version not in _READS or (h.version == 1 and h.disk_snapshots):
        raise ValueError(f"cannot write a version {h.version} header with "
                         f"{len(h.disk_snapshots)} disk snapshot(s)")
    obj: dict[str, object] = {k: getattr(h, k) for k in _HEADER_FIELDS}
    if h.version >= 2:
        obj["disk_snapshots"] = [
            {"vdev": d.vdev, "file": d.file, "name": d.name} for d in h.disk_snapshots
        ]
    body = json.dumps(obj, sort_keys=True, ensure_ascii=False).encode(
        "utf-8", "surrogateescape")
    return MAGIC + _LEN.pack(len(body)) + body


def parse_header(buf: bytes | bytearray | memoryview, source: str = "save image"
                 ) -> tuple[SaveHeader, int]:
    """Parse a save image's header; (header, offset of QEMU's stream).

    ``buf`` must hold at least the header and the 4 bytes of QEMU's magic
    behind it (which are checked too, so an image cut right after its header
    is refused here rather than by QEMU).

    :raise TruncatedError: ``buf`` ends inside the header or the stream magic.
    :raise FormatError: wrong magic, an oversized length, a header that is not
        the JSON object this version writes, or no QEMU stream behind it.
    """
    mv = memoryview(buf).cast("B")
    if len(mv) < len(MAGIC):
        if bytes(mv) != MAGIC[: len(mv)]:
            raise FormatError(source, 0, "magic",
                              f"found {bytes(mv)!r}, expected {MAGIC!r}: not a xenlab save image")
        raise TruncatedError(source, 0, "magic", len(MAGIC), len(mv))
    if bytes(mv[: len(MAGIC)]) != MAGIC:
        raise FormatError(source, 0, "magic",
                          f"found {bytes(mv[:len(MAGIC)])!r}, expected {MAGIC!r}: "
                          "not a xenlab save image")
    at = len(MAGIC)
    if len(mv) < at + _LEN.size:
        raise TruncatedError(source, at, "header length", _LEN.size, len(mv) - at)
    (n,) = _LEN.unpack_from(mv, at)
    if n > _HEADER_MAX:
        raise FormatError(source, at, "header length",
                          f"{n} bytes, more than the {_HEADER_MAX} a header may have")
    at += _LEN.size
    if len(mv) < at + n:
        raise TruncatedError(source, at, "header", n, len(mv) - at)
    try:
        obj = json.loads(bytes(mv[at: at + n]).decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError) as err:
        raise FormatError(source, at, "header", f"not JSON: {err}") from None
    if not isinstance(obj, dict):
        raise FormatError(source, at, "header",
                          f"a JSON {type(obj).__name__}, expected an object")
    version = obj.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SAVE_VERSION:
        raise FormatError(source, at, "header.version",
                          f"version {version} is newer than this xenlab reads ({SAVE_VERSION})")
    for key, kind in _HEADER_FIELDS.items():
        value = obj.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, kind):
            raise FormatError(source, at, f"header.{key}",
                              f"found {_describe(value)}, expected "
                              f"{'a number' if key == 'created' else 'a ' + _kind_name(kind)}")
    if version not in _READS:
        raise FormatError(source, at, "header.version",
                          f"version {version}, expected one of "
                          f"{', '.join(map(str, _READS))}")
    created = float(obj["created"])
    if not math.isfinite(created):
        raise FormatError(source, at, "header.created", f"{created}, expected a time")
    header = SaveHeader(
        name=obj["name"], uuid=obj["uuid"], config_text=obj["config_text"],
        config_path=obj["config_path"], qemu_version=obj["qemu_version"],
        created=created, state=obj["state"], version=version,
        disk_snapshots=_disk_snapshots(obj, source, at) if version >= 2 else (),
    )
    at += n
    if len(mv) < at + len(_QEMU_MAGIC):
        raise TruncatedError(source, at, "stream magic", len(_QEMU_MAGIC), len(mv) - at)
    found = bytes(mv[at: at + len(_QEMU_MAGIC)])
    if found != _QEMU_MAGIC:
        raise FormatError(source, at, "stream magic",
                          f"found {found!r}, expected QEMU's {_QEMU_MAGIC!r}")
    return header, at


def _disk_snapshots(obj: Mapping[str, Any], source: str, at: int) -> tuple[DiskSnapshot, ...]:
    items = obj.get("disk_snapshots")
    if not isinstance(items, list):
        raise FormatError(source, at, "header.disk_snapshots",
                          f"found {_describe(items)}, expected a list")
    out: list[DiskSnapshot] = []
    for i, item in enumerate(items):
        field = f"header.disk_snapshots[{i}]"
        if not isinstance(item, dict):
            raise FormatError(source, at, field, f"found {_describe(item)}, expected an object")
        for key in ("vdev", "file", "name"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise FormatError(source, at, f"{field}.{key}",
                                  f"found {_describe(item.get(key))}, expected a non-empty str")
        out.append(DiskSnapshot(item["vdev"], item["file"], item["name"]))
    if len({d.vdev for d in out}) != len(out):
        raise FormatError(source, at, "header.disk_snapshots", "a disk appears twice")
    return tuple(out)


def _describe(value: object) -> str:
    return "nothing" if value is None else f"a {type(value).__name__}"


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)


def read_header(path: Path) -> tuple[SaveHeader, int]:
    """Read and parse the header of the save image at ``path``; (header, stream offset).

    :raise XenlabError: the file cannot be read.
    :raise FormatError: it is not a xenlab save image (or is cut short).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + _LEN.size)
            n = _LEN.unpack_from(head, len(MAGIC))[0] if (
                len(head) == len(MAGIC) + _LEN.size and head.startswith(MAGIC)) else 0
            if n <= _HEADER_MAX:
                head += f.read(n + len(_QEMU_MAGIC))
    except OSError as err:
        raise XenlabError(f"{path}: cannot read: {err.strerror or err}") from err
    return parse_header(head, str(path))


# --- progress and results ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MigrationProgress:
    """One progress report: ``phase`` is "storage" (disk mirrors) or "memory".

    Byte counts are QEMU's: for memory, RAM transferred and remaining of
    ``total``; for storage, the mirrors' offsets summed over all disks.
    """

    phase: str
    status: str
    transferred: int
    remaining: int
    total: int
    elapsed: float


Progress = Callable[[MigrationProgress], None]


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """What a finished migration did.

    ``record`` is the destination's record when the destination is a local
    :class:`Toolstack`, else None.  ``downtime_ms`` and ``total_ms`` are
    QEMU's own figures; ``seconds`` is the whole command, mirrors included.
    """

    record: DomainRecord | None
    seconds: float
    total_ms: int
    downtime_ms: int
    ram_transferred: int
    disks: tuple[str, ...]


# --- QMP helpers -------------------------------------------------------------------------


async def _send_fd(qmp: Qmp, fd: int, name: str) -> None:
    """Hand ``fd`` to QEMU under ``name`` (SCM_RIGHTS, then ``getfd``)."""
    # Qmp has no fd passing of its own: the library's send_fd_scm on the
    # session's client, then getfd names the descriptor that came with it.
    try:
        qmp._client.send_fd_scm(fd)
    except Exception as err:  # the library's QMPError or an OSError from sendmsg
        raise BackendError(f"QMP getfd: cannot pass the file descriptor: {err}") from err
    await qmp.execute("getfd", {"fdname": name})


async def _status(qmp: Qmp) -> str:
    st = await qmp.execute("query-status")
    return str(st.get("status", "unknown")) if isinstance(st, dict) else "unknown"


async def _query_migrate(qmp: Qmp) -> dict[str, Any]:
    info = await qmp.execute("query-migrate")
    return info if isinstance(info, dict) else {}


async def _wait_migration(qmp: Qmp, what: str, timeout: float, progress: Progress | None,
                          started: float) -> dict[str, Any]:
    """Poll ``query-migrate`` until it is completed; its last answer.

    :raise BackendError: the migration failed or was cancelled (QEMU's
        ``error-desc`` in the message), QEMU went away, or ``timeout`` passed.
    """
    begin = time.monotonic()
    deadline = begin + timeout
    while True:
        info = await _query_migrate(qmp)
        status = str(info.get("status", "none"))
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            why = info.get("error-desc") or status
            raise BackendError(f"{what}: QEMU reports the migration {status}: {why}")
        ram = info.get("ram") or {}
        if progress is not None and ram:
            progress(MigrationProgress(
                "memory", status, int(ram.get("transferred", 0)), int(ram.get("remaining", 0)),
                int(ram.get("total", 0)), time.monotonic() - started,
            ))
        if time.monotonic() > deadline:
            raise BackendError(f"{what}: not completed within {timeout:g}s (status {status})")
        await asyncio.sleep(_poll(begin))


async def _cancel_migration(qmp: Qmp) -> None:
    """``migrate_cancel`` and wait (briefly) until QEMU has left the active states."""
    with contextlib.suppress(BackendError):
        await qmp.execute("migrate_cancel")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            status = str((await _query_migrate(qmp)).get("status", "none"))
        except BackendError:
            return
        if status in ("none", "completed", "failed", "cancelled"):
            return
        await asyncio.sleep(_POLL)


def _qemu_version(v: object) -> str:
    if isinstance(v, dict) and isinstance(v.get("qemu"), dict):
        q = v["qemu"]
        return f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}"
    return "unknown"


# --- starting an incoming QEMU -----------------------------------------------------------


def _log_tail(paths: RuntimePaths, lines: int = 5) -> str:
    try:
        text = paths.log.read_text(errors="replace").strip()
    except OSError:
        return ""
    return " | ".join(text.splitlines()[-lines:])


def _quit(ts: Toolstack, rec: DomainRecord, paths: RuntimePaths) -> None:
    """Make the domain's QEMU exit (QMP quit, SIGKILL if it lingers)."""
    with contextlib.suppress(BackendError):
        _run(_qmp_quit(paths))
    begin = time.monotonic()
    while is_alive(rec) and time.monotonic() < begin + 10:
        time.sleep(_poll(begin))
    if is_alive(rec):
        ts._kill(paths, rec.pid)


async def _qmp_quit(paths: RuntimePaths) -> None:
    async with Qmp.open(paths.qmp) as qmp:
        # QEMU may close the socket before or after the reply.
        with contextlib.suppress(BackendError):
            await qmp.execute("quit")


def _refuse_mirrored(rec: DomainRecord, verb: str) -> None:
    """A disk pivoted by a mirror is not in the config either (see vm.mirror)."""
    moved = rec.extra.get(DISK_PATHS) or {}
    if moved:
        files = ", ".join(f"{v} -> {m.get('file')}" for v, m in sorted(moved.items()))
        raise StateError(
            f"domain {rec.name!r} runs on mirrored disks its config does not name ({files}): "
            f"{verb} would start it again on the old files; point the config's disks at "
            "the new files first"
        )


def _refuse_overlays(rec: DomainRecord, verb: str) -> None:
    """External snapshot overlays are not in the config: a new QEMU would miss them."""
    overlays = rec.extra.get(OVERLAYS) or {}
    if overlays:
        raise StateError(
            f"domain {rec.name!r} runs on external snapshot overlays "
            f"({', '.join(sorted(overlays))}): {verb} would start it again on the base "
            "images; delete the external snapshots first"
        )


def _copy_snapshots(src: Toolstack, dst: Toolstack, rec: DomainRecord,
                    new: DomainRecord) -> DomainRecord:
    """Give ``new`` (in ``dst``) the snapshot tree of ``rec`` (in ``src``); parents first."""
    ids: dict[int, int] = {}

    def add(node: SnapshotNode, parent: int | None) -> None:
        s = node.snapshot
        made = dst.store.add_snapshot(replace(s, id=0, domid=new.domid, parent=parent))
        ids[s.id] = made.id
        for child in node.children:
            add(child, made.id)

    for root in src.store.snapshot_tree(rec.domid):
        add(root, None)
    extra = dict(new.extra)
    cur = rec.extra.get(CURRENT)
    if cur is not None and int(cur) in ids:
        extra[CURRENT] = ids[int(cur)]
    return dst.store.update(replace(new, extra=extra))


# --- save / restore ----------------------------------------------------------------------


def save(ts: Toolstack, name: str, path: Path, *, keep_running: bool = False,
         snapshot: bool = False, timeout: float = 300.0, max_bandwidth: int | None = None,
         progress: Progress | None = None) -> SaveHeader:
    """Save the domain's memory and device state to ``path``, with its config; xl save.

    The domain is paused, its migration stream written behind a
    :class:`SaveHeader`, and then it is stopped (its QEMU quits and its
    record goes, or stays shut off when it has snapshots), unless
    ``keep_running``, when it carries on as it was (paused stays paused).

    With ``snapshot`` every writable disk gets an internal snapshot named
    ``xenlab-save-<time>`` (one QMP ``transaction``) while the guest is
    paused for the save, recorded in the header's ``disk_snapshots``;
    :func:`restore` reverts the disks to it.  The snapshot is taken after
    ``stop`` and just before the stream starts, not after it ends: once the
    stream is complete QEMU has handed its images over (inactivated them)
    and refuses internal snapshots; the guest does not run in between, so
    it is the same instant.  The snapshot stays in the images (so the save
    image can be restored again); ``qemu-img snapshot -d`` drops it.

    CLI: ``xenlab vm save [-c|--keep-running] [--snapshot] DOM FILE`` (xl
    save's ``-c`` leaves the domain running).

    :raise XenlabError: ``path`` cannot be created, or ``snapshot`` with a
        disk that is not qcow2 (nothing else happened).
    :raise StateError: the domain is not running.
    :raise BackendError: QEMU failed the migration or it took longer than
        ``timeout``; the domain runs (or stays paused) as before, no file is
        left behind and the disk snapshot is deleted again.
    """
    rec = ts._live(name)
    path = Path(path)
    with ts.store.lock(rec.domid):
        rec = ts._live(str(rec.domid))
        _refuse_overlays(rec, "restoring the image")
        _refuse_mirrored(rec, "restoring the image")
        paths = ts.paths(rec)
        snaps = _save_snapshots(ts, rec) if snapshot else ()
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part",
                                            dir=path.parent)
        except OSError as err:
            raise XenlabError(
                f"{path}: cannot write the save image: {err.strerror or err}"
            ) from err
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                header = _run(_save_stream(
                    paths, f, rec, keep_running=keep_running, timeout=timeout,
                    max_bandwidth=max_bandwidth, progress=progress, snapshots=snaps,
                ))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if keep_running:
            ts.store.update(replace(rec, state=header.state))
        else:
            _quit(ts, rec, paths)
            ts._gone(rec)
        return header


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _save_snapshots(ts: Toolstack, rec: DomainRecord) -> tuple[DiskSnapshot, ...]:
    """The disk snapshots ``save --snapshot`` will take: every writable disk, all qcow2."""
    dc, _ = ts._config_of(rec)
    tag = "xenlab-save-" + time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 10**9:09d}"
    out: list[DiskSnapshot] = []
    for d in dc.disks:
        if d.is_cdrom or not d.readwrite or not d.pdev_path or d.format is DiskFormat.EMPTY:
            continue  # read-only media cannot change behind the memory's back
        if d.format is not DiskFormat.QCOW2:
            raise XenlabError(
                f"save --snapshot: disk {d.vdev} ({d.pdev_path}) is {d.format.value}; "
                "only qcow2 images hold internal snapshots (save without --snapshot, or "
                "convert the disk with qemu-img convert -O qcow2)"
            )
        out.append(DiskSnapshot(d.vdev, d.pdev_path, tag))
    return tuple(out)


async def _save_stream(paths: RuntimePaths, f: Any, rec: DomainRecord, *, keep_running: bool,
                       timeout: float, max_bandwidth: int | None,
                       progress: Progress | None,
                       snapshots: Sequence[DiskSnapshot] = ()) -> SaveHeader:
    started = time.monotonic()
    async with Qmp.open(paths.qmp) as qmp:
        state = await _status(qmp)
        was_running = state == "running"
        header = SaveHeader(
            name=rec.name, uuid=rec.uuid, config_text=rec.config_text,
            config_path=rec.config_path,
            qemu_version=_qemu_version(await qmp.execute("query-version")),
            created=time.time(), state="running" if was_running else "paused",
            disk_snapshots=tuple(snapshots),
        )
        f.write(pack_header(header))
        f.flush()
        params = await qmp.execute("query-migrate-parameters")
        old_bw = params.get("max-bandwidth") if isinstance(params, dict) else None
        await qmp.execute("migrate-set-parameters",
                          {"max-bandwidth": max_bandwidth or _UNLIMITED})
        snapped = False
        try:
            if was_running:
                await qmp.execute("stop")
            if snapshots:
                # One transaction: every disk at the same instant, or none.
                await qmp.execute("transaction", {"actions": [
                    {"type": "blockdev-snapshot-internal-sync",
                     "data": {"device": f"{d.vdev}-fmt", "name": d.name}} for d in snapshots
                ]}, timeout=timeout)
                snapped = True
            await _send_fd(qmp, f.fileno(), _FD_NAME)
            await qmp.execute("migrate", {"uri": f"fd:{_FD_NAME}"})
            await _wait_migration(qmp, f"save {rec.name}", timeout, progress, started)
        except BaseException as err:
            with contextlib.suppress(BackendError):
                await _cancel_migration(qmp)
                with contextlib.suppress(BackendError):
                    await qmp.execute("closefd", {"fdname": _FD_NAME})
                if was_running:
                    await qmp.execute("cont")
            if snapped:
                left = await _drop_disk_snapshots(qmp, snapshots)
                if left and isinstance(err, Exception):
                    raise BackendError(
                        f"{err}; the disk snapshot {snapshots[0].name!r} could not be "
                        f"deleted from {', '.join(left)} (qemu-img snapshot -d removes it)"
                    ) from err
            raise
        finally:
            if old_bw is not None:
                with contextlib.suppress(BackendError):
                    await qmp.execute("migrate-set-parameters", {"max-bandwidth": old_bw})
        if keep_running and was_running:
            await qmp.execute("cont")
    return header


async def _drop_disk_snapshots(qmp: Qmp, snapshots: Sequence[DiskSnapshot]) -> list[str]:
    """Delete a failed save's disk snapshots; the files where that did not work."""
    left: list[str] = []
    for d in snapshots:
        try:
            await qmp.execute("blockdev-snapshot-delete-internal-sync",
                              {"device": f"{d.vdev}-fmt", "name": d.name})
        except BackendError:
            left.append(d.file)
    return left


def _revert_plan(dc: DomainConfig, header: SaveHeader, path: Path
                 ) -> list[tuple[str, str]]:
    """(file, tag) of each disk ``restore`` must revert; checked before anything changes.

    The files are the ones the (possibly overridden) config names now: the
    domain will run on those, so those must hold the snapshot.
    """
    by_vdev = {d.vdev: d for d in dc.disks}
    plan: list[tuple[str, str]] = []
    for s in header.disk_snapshots:
        disk = by_vdev.get(s.vdev)
        if disk is None or not disk.pdev_path:
            raise XenlabError(
                f"restore {path}: the image was saved with a snapshot of disk {s.vdev}, "
                "which the config no longer has"
            )
        tags = _image_tags(disk.pdev_path)
        if s.name not in tags:
            raise XenlabError(
                f"restore {path}: disk {s.vdev} ({disk.pdev_path}) has no snapshot "
                f"{s.name!r} (saved with --snapshot from {s.file}); it is not the disk that "
                "was saved, or the snapshot was deleted"
            )
        plan.append((disk.pdev_path, s.name))
    return plan


def _image_tags(file: str) -> set[str]:
    """The internal snapshot tags in image ``file``; XenlabError if it cannot be read."""
    try:
        return _img_tags(file)
    except (BackendError, ValueError) as err:
        raise XenlabError(f"disk {file}: cannot read it: {err}") from err


def restore(ts: Toolstack, path: Path, *, paused: bool = False, overrides: Sequence[str] = (),
            timeout: float = 300.0, image: object | None = None) -> DomainRecord:
    """Start the domain saved in ``path`` where it left off; its record; xl restore.

    The config comes from the image's header (``overrides`` are appended to
    it, xl-style ``key=value``); the domain keeps its name and uuid.  It runs
    unless ``paused``.  An image saved with ``snapshot`` first reverts each
    disk to the snapshot taken with the memory (``qemu-img snapshot -a``,
    with no QEMU running); everything written to the disks since is lost,
    as it must be for the guest's memory to match them.

    CLI: ``xenlab vm restore [-p] FILE [key=value ...]``.

    :raise FormatError: ``path`` is not a xenlab save image.
    :raise XenlabError: the name is taken, the config no longer works here,
        or a disk lacks the image's snapshot (nothing changed).
    :raise BackendError: qemu-img could not revert a disk (one in use by
        another QEMU), or QEMU could not load the stream (a corrupt image, a
        QEMU or config that does not match); no record and no QEMU is left.
    """
    path = Path(path)
    header, offset = read_header(path)
    dc, text = config_from_text(header.config_text, f"{path} (saved config)", overrides)
    plan = _revert_plan(dc, header, path)

    def revert() -> None:
        for file, tag in plan:
            _img("snapshot", "-a", tag, file, timeout=300.0)

    rec = ts._start(dc, text, config_path=header.config_path, uuid=header.uuid,
                    incoming="defer", image=image, prepare=revert if plan else None)
    paths = ts.paths(rec)
    try:
        with ts.store.lock(rec.domid):
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    _run(_load_stream(paths, f.fileno(), timeout, paused))
            except BackendError as err:
                if not is_alive(rec):
                    tail = _log_tail(paths)
                    raise BackendError(
                        f"restore {path}: QEMU could not load the saved state and exited "
                        f"(a corrupt image, or one saved by an incompatible QEMU/config)"
                        + (f": {tail}" if tail else "") + f" [{err}]"
                    ) from err
                raise BackendError(f"restore {path}: {err}") from err
            return ts.store.update(replace(rec, state="paused" if paused else "running"))
    except BaseException:
        ts._kill(paths, rec.pid)
        ts._gone(rec)
        raise


async def _load_stream(paths: RuntimePaths, fd: int, timeout: float, paused: bool) -> None:
    started = time.monotonic()
    async with Qmp.open(paths.qmp) as qmp:
        await _send_fd(qmp, fd, _FD_NAME)
        await qmp.execute("migrate-incoming", {"uri": f"fd:{_FD_NAME}"})
        await _wait_migration(qmp, "restore", timeout, None, started)
        if not paused:
            await qmp.execute("cont")


# --- live migration ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Incoming:
    """A destination QEMU listening for a migration (see :func:`receive`).

    ``port`` is the migration port really bound (useful when 0 was asked);
    ``nbd_port`` is set when the disks are exported for ``with_storage``;
    ``disks`` are the exported vdevs; ``created`` the disk files made for it.
    """

    record: DomainRecord
    host: str
    port: int
    nbd_port: int | None
    disks: tuple[str, ...]
    created: tuple[str, ...]


def _uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _free_port(host: str) -> int:
    """A TCP port free on ``host`` right now (for the NBD server, which cannot report one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _mirrored(dc: DomainConfig) -> list[tuple[str, str, str]]:
    """The disks a storage migration copies: (vdev, path, format) of each writable image."""
    return [
        (d.vdev, d.pdev_path, d.format.value)
        for d in dc.disks
        if d.pdev_path and d.readwrite and not d.is_cdrom
    ]


def receive(
    ts: Toolstack, config_text: str, port: int = 0, *, host: str = "127.0.0.1",
    overrides: Sequence[str] = (), with_storage: bool = False, nbd_port: int | None = None,
    disk_sizes: Mapping[str, int] | None = None, config_path: str = "",
    uuid: str | None = None, image: object | None = None,
) -> Incoming:
    """Start the destination of a migration: QEMU listening on ``host:port``.

    The domain is ``config_text`` plus ``overrides``; it is recorded with
    state "incoming" and starts paused.  With ``with_storage`` its writable
    disks are exported over NBD on ``nbd_port`` (default ``port + 1``, or a
    free port when ``port`` is 0) for the source to mirror into; a disk file
    that does not exist is created when ``disk_sizes`` gives its size in
    bytes (by vdev), blank, in the config's format.  Follow with
    :func:`finish_receive` once the source has sent everything, or
    :func:`abort_receive`.

    CLI: ``xenlab vm migrate-receive CFG --port N [--listen HOST]
    [--with-storage [--disk-size VDEV=SIZE ...]] [-p]``, which runs this,
    then waits in :func:`finish_receive`.

    :raise XenlabError: bad config, name taken, a missing disk without a size.
    :raise BackendError: QEMU refused the config, the port or the NBD export.
    """
    dc, text = config_from_text(config_text, config_path or f"{host}:{port} (incoming)", overrides)
    created: list[str] = []
    disks = _mirrored(dc) if with_storage else []
    for vdev, target, fmt in disks:
        if Path(target).exists():
            continue
        size = (disk_sizes or {}).get(vdev)
        if size is None:
            _unlink(created)
            raise XenlabError(
                f"disk {target!r} ({vdev}) does not exist on the destination; "
                f"a storage migration needs a blank image of the source's size (--disk-size)"
            )
        try:
            create_image(target, fmt, str(size))
        except XenlabError:
            _unlink(created)
            raise
        created.append(target)
    try:
        rec = ts._start(dc, text, config_path=config_path, uuid=uuid, incoming="defer",
                        image=image)
    except BaseException:
        _unlink(created)
        raise
    paths = ts.paths(rec)
    try:
        if with_storage and nbd_port is None:
            nbd_port = port + 1 if port else _free_port(host)
        bound = _run(_listen(paths, host, port, [v for v, _, _ in disks],
                               nbd_port if with_storage else None))
        return Incoming(rec, host, bound, nbd_port if with_storage else None,
                        tuple(v for v, _, _ in disks), tuple(created))
    except BaseException:
        ts._kill(paths, rec.pid)
        ts._gone(rec)
        _unlink(created)
        raise


def _unlink(files: Sequence[str]) -> None:
    for p in files:
        Path(p).unlink(missing_ok=True)


async def _listen(paths: RuntimePaths, host: str, port: int, disks: Sequence[str],
                  nbd_port: int | None) -> int:
    async with Qmp.open(paths.qmp) as qmp:
        if nbd_port is not None:
            await qmp.execute("nbd-server-start", {
                "addr": {"type": "inet", "data": {"host": host, "port": str(nbd_port)}},
            })
            for vdev in disks:
                # The export activates the (still inactive) incoming node for writing.
                await qmp.execute("block-export-add", {
                    "type": "nbd", "id": f"mig-{vdev}", "node-name": f"{vdev}-fmt",
                    "name": vdev, "writable": True,
                })
        await qmp.execute("migrate-incoming", {"uri": f"tcp:{_uri_host(host)}:{port}"})
        info = await _query_migrate(qmp)
        for addr in info.get("socket-address") or ():
            if isinstance(addr, dict) and addr.get("port"):
                return int(addr["port"])
        return port


def finish_receive(ts: Toolstack, incoming: Incoming, *, paused: bool = False,
                   timeout: float = 600.0) -> DomainRecord:
    """Wait until the migration stream has arrived, then resume the domain; its record.

    Stops the NBD exports of a storage migration first, then ``cont``
    (unless ``paused``).

    :raise BackendError: the stream failed or the destination QEMU went
        away (its record is removed), or nothing completed within ``timeout``.
    """
    rec = incoming.record
    paths = ts.paths(rec)
    with ts.store.lock(rec.domid):
        try:
            _run(_finish(paths, incoming, paused, timeout))
        except BaseException as err:
            alive = is_alive(rec)
            ts._kill(paths, rec.pid)
            ts._gone(rec)
            if isinstance(err, BackendError) and not alive:
                raise BackendError(
                    f"incoming {rec.name}: the destination QEMU exited during the migration "
                    f"(the stream broke off or could not be loaded) [{err}]"
                ) from err
            raise
        return ts.store.update(replace(rec, state="paused" if paused else "running"))


async def _finish(paths: RuntimePaths, inc: Incoming, paused: bool, timeout: float) -> None:
    async with Qmp.open(paths.qmp) as qmp:
        await _wait_migration(qmp, f"incoming {inc.record.name}", timeout, None,
                              time.monotonic())
        if inc.nbd_port is not None:
            for vdev in inc.disks:
                with contextlib.suppress(BackendError):
                    await qmp.execute("block-export-del", {"id": f"mig-{vdev}"})
            await qmp.execute("nbd-server-stop")
        if not paused:
            await qmp.execute("cont")


def abort_receive(ts: Toolstack, incoming: Incoming) -> None:
    """Give up on an incoming migration: kill its QEMU, forget it, remove disks made for it."""
    rec = incoming.record
    with ts.store.lock(rec.domid):
        ts._kill(ts.paths(rec), rec.pid)
        ts._gone(rec)
    _unlink(incoming.created)


def _parse_dest(dest: str) -> tuple[str, int]:
    host, sep, port = dest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise XenlabError(f"migration destination {dest!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def migrate(
    ts: Toolstack, name: str, dest: Toolstack | str, *, live: bool = True,
    with_storage: bool = False, paused: bool = False, host: str = "127.0.0.1",
    nbd_port: int | None = None, dest_overrides: Sequence[str] = (),
    max_bandwidth: int | None = None, timeout: float = 600.0,
    progress: Progress | None = None,
) -> MigrationResult:
    """Move the running domain ``name`` to ``dest``; xl migrate.

    ``dest`` is a :class:`Toolstack` on this host (its destination QEMU is
    started here, listening on ``host``, with ``dest_overrides`` appended to
    the config, e.g. other disk paths) or ``"HOST:PORT"`` where
    ``xenlab vm migrate-receive`` listens (NBD on ``nbd_port``, default
    PORT+1).  ``live=False`` pauses the domain first (virsh migrate without
    --live).  ``with_storage`` mirrors the writable disks to the destination
    first.  ``paused`` leaves a local destination paused.  ``max_bandwidth``
    is in bytes/s (default: unlimited).

    On success the source QEMU has quit and its record is gone; the
    destination runs.

    CLI: ``xenlab vm migrate DOM HOST:PORT [--with-storage] [--offline]
    [--max-bandwidth BYTES]`` (and ``--dest-state-dir DIR`` for a second
    toolstack on this host).

    :raise StateError: the domain is not running.
    :raise BackendError: the migration failed (destination gone, timeout, a
        mirror error); the domain still runs here and the message says so.
    """
    started = time.monotonic()
    rec = ts._live(name)
    with ts.store.lock(rec.domid):
        rec = ts._live(str(rec.domid))
        _refuse_overlays(rec, "the destination")
        _refuse_mirrored(rec, "the destination")
        snaps = ts.store.list_snapshots(rec.domid)
        if snaps and (with_storage or not isinstance(dest, Toolstack)):
            raise StateError(
                f"domain {rec.name!r} has {len(snaps)} snapshot(s): their records can only "
                "follow it to a second toolstack on this host with shared disks (a storage "
                "migration copies the disks' current state only); delete them first"
            )
        paths = ts.paths(rec)
        dc, _ = ts._config_of(rec)
        disks = _mirrored(dc) if with_storage else []
        incoming: Incoming | None = None
        if isinstance(dest, Toolstack):
            sizes = _run(_disk_sizes(paths, [v for v, _, _ in disks])) if disks else {}
            incoming = receive(
                dest, rec.config_text, 0, host=host, overrides=dest_overrides,
                with_storage=with_storage, nbd_port=nbd_port, disk_sizes=sizes,
                config_path=rec.config_path, uuid=rec.uuid,
            )
            dhost, dport, dnbd = host, incoming.port, incoming.nbd_port
        else:
            dhost, dport = _parse_dest(dest)
            dnbd = (nbd_port or dport + 1) if with_storage else None
        where = f"{_uri_host(dhost)}:{dport}"
        try:
            info = _run(_send(paths, rec.name, where, dhost, dnbd,
                                [v for v, _, _ in disks], live=live,
                                max_bandwidth=max_bandwidth, timeout=timeout,
                                progress=progress, started=started))
        except BaseException as err:
            if incoming is not None:
                dead = not is_alive(incoming.record)
                abort_receive(dest, incoming)  # type: ignore[arg-type]
                if isinstance(err, BackendError) and dead:
                    raise BackendError(
                        f"migrate {rec.name} to {where}: the destination QEMU went away "
                        f"during the migration; {rec.name} still runs here [{err}]"
                    ) from err
            if isinstance(err, BackendError):
                raise BackendError(
                    f"migrate {rec.name} to {where} failed; {rec.name} still runs here "
                    f"[{err}]"
                ) from err
            raise
        dest_rec: DomainRecord | None = None
        if incoming is not None:
            try:
                dest_rec = finish_receive(dest, incoming, paused=paused,  # type: ignore[arg-type]
                                          timeout=timeout)
            except BaseException:
                # The destination could not take over: the source has every
                # page and its disks, so it carries on.
                _unlink(incoming.created)
                with contextlib.suppress(BackendError):
                    _run(ts._qmp(rec, "cont"))
                raise
            if snaps:
                dest_rec = _copy_snapshots(ts, dest, rec, dest_rec)  # type: ignore[arg-type]
        _quit(ts, rec, paths)
        shutil.rmtree(paths.rundir, ignore_errors=True)
        ts.store.remove(rec.domid)
    ram = info.get("ram") or {}
    return MigrationResult(
        record=dest_rec, seconds=time.monotonic() - started,
        total_ms=int(info.get("total-time", 0)), downtime_ms=int(info.get("downtime", 0)),
        ram_transferred=int(ram.get("transferred", 0)),
        disks=tuple(v for v, _, _ in disks),
    )


async def _disk_sizes(paths: RuntimePaths, vdevs: Sequence[str]) -> dict[str, int]:
    async with Qmp.open(paths.qmp) as qmp:
        nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    sizes: dict[str, int] = {}
    for node in nodes if isinstance(nodes, list) else ():
        name = str(node.get("node-name", ""))
        if name.endswith("-fmt") and name[:-4] in vdevs:
            sizes[name[:-4]] = int(node["image"]["virtual-size"])
    return sizes


async def _send(paths: RuntimePaths, name: str, where: str, dhost: str, nbd_port: int | None,
                disks: Sequence[str], *, live: bool, max_bandwidth: int | None,
                timeout: float, progress: Progress | None, started: float) -> dict[str, Any]:
    async with Qmp.open(paths.qmp) as qmp:
        was_running = await _status(qmp) == "running"
        params = await qmp.execute("query-migrate-parameters")
        old_bw = params.get("max-bandwidth") if isinstance(params, dict) else None
        await qmp.execute("migrate-set-parameters",
                          {"max-bandwidth": max_bandwidth or _UNLIMITED})
        mirrors: list[str] = []
        nodes: list[str] = []
        completed = False
        try:
            for vdev in disks:
                assert nbd_port is not None
                await qmp.execute("blockdev-add", {
                    "driver": "nbd", "node-name": f"mig-{vdev}", "export": vdev,
                    "server": {"type": "inet", "host": dhost, "port": str(nbd_port)},
                })
                nodes.append(f"mig-{vdev}")
                await qmp.execute("blockdev-mirror", {
                    "job-id": f"mig-{vdev}", "device": f"{vdev}-fmt", "target": f"mig-{vdev}",
                    "sync": "full", "copy-mode": "write-blocking",
                    # kept after it ends, so a failure's reason can be read
                    "auto-dismiss": False,
                })
                mirrors.append(f"mig-{vdev}")
            if mirrors:
                await _wait_mirrors_ready(qmp, mirrors, timeout, progress, started)
            if not live and was_running:
                await qmp.execute("stop")
            await qmp.execute("migrate", {"uri": f"tcp:{where}"})
            info = await _wait_migration(qmp, f"migrate {name}", timeout, progress, started)
            completed = True
            for job in mirrors:
                # Ready, so cancelling completes the copy without a pivot.
                await qmp.execute("block-job-cancel", {"device": job})
            await _dismiss_jobs(qmp, mirrors, 30)
            mirrors.clear()
            return info
        except BaseException:
            if not completed:
                await _cancel_migration(qmp)
            for job in mirrors:
                with contextlib.suppress(BackendError):
                    await qmp.execute("block-job-cancel", {"device": job, "force": True})
            with contextlib.suppress(BackendError):
                await _dismiss_jobs(qmp, mirrors, 30)
            for node in nodes:
                with contextlib.suppress(BackendError):
                    await qmp.execute("blockdev-del", {"node-name": node})
            if not completed and was_running:
                with contextlib.suppress(BackendError):
                    if await _status(qmp) != "running":
                        await qmp.execute("cont")
            raise
        finally:
            if old_bw is not None:
                with contextlib.suppress(BackendError):
                    await qmp.execute("migrate-set-parameters", {"max-bandwidth": old_bw})


async def _block_jobs(qmp: Qmp) -> dict[str, dict[str, Any]]:
    jobs = await qmp.execute("query-block-jobs")
    return {str(j.get("device")): j for j in jobs if isinstance(j, dict)} if isinstance(
        jobs, list) else {}


async def _wait_mirrors_ready(qmp: Qmp, jobs: Sequence[str], timeout: float,
                              progress: Progress | None, started: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        now = await _block_jobs(qmp)
        missing = [j for j in jobs if j not in now]
        if missing:
            raise BackendError(f"disk mirror {missing[0]} vanished before it was ready")
        mine = [now[j] for j in jobs]
        for j in mine:
            if j.get("status") in ("aborting", "concluded", "null") or j.get("error"):
                raise BackendError(f"disk mirror {j.get('device')} failed: "
                                   f"{j.get('error', 'ended before it was ready')}")
        done = sum(int(j.get("offset", 0)) for j in mine)
        total = sum(int(j.get("len", 0)) for j in mine)
        if progress is not None:
            progress(MigrationProgress("storage", "mirroring", done, total - done, total,
                                       time.monotonic() - started))
        if all(j.get("ready") for j in mine):
            return
        if time.monotonic() > deadline:
            raise BackendError(f"disk mirrors not ready within {timeout:g}s")
        await asyncio.sleep(_POLL)


async def _dismiss_jobs(qmp: Qmp, jobs: Sequence[str], timeout: float) -> None:
    """Wait until each of ``jobs`` has concluded, then dismiss it."""
    deadline = time.monotonic() + timeout
    left = set(jobs)
    while left:
        now = await _block_jobs(qmp)
        for job in sorted(left):
            info = now.get(job)
            if info is None:
                left.discard(job)
            elif info.get("status") == "concluded":
                await qmp.execute("job-dismiss", {"id": job})
                left.discard(job)
        if not left:
            return
        if time.monotonic() > deadline:
            raise BackendError(f"block jobs {', '.join(sorted(left))} still running after "
                               f"{timeout:g}s")
        await asyncio.sleep(_POLL)
