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
    if the domain was booted and wrote to them in between.  Version 3 adds
    ``disk_paths`` and ``overlays`` (``{vdev: {"file", "format"}}``): the
    files the disks really ran on when a mirror had pivoted them
    (vm.mirror) or an external snapshot had put an overlay on them
    (vm.snapshot), which the config does not name; ``restore`` starts the
    domain on those files and records them.  Versions 1 and 2 are still read.

    :func:`pack_header` and :func:`parse_header` are the pure halves of the
    format.  The stream goes through a file descriptor handed to QEMU with
    ``getfd`` (migration URI ``fd:NAME``) rather than ``exec:cat > PATH``:
    no shell, no quoting, an unwritable path fails in ``open`` before the
    domain is touched, and QEMU writes (or reads) from the descriptor's
    current offset, just behind the header we wrote (or skipped).  The image
    is written to a temporary file beside the target, fsynced and renamed
    into place once QEMU reports ``completed`` and before QEMU quits, so a
    failed save leaves no file and a finished one is on disk.

Waiting on QEMU
    Save, restore and migration wait on QEMU's MIGRATION events (the
    ``events`` migration capability, turned on in both QEMUs), as a one-shot
    QMP client does, and ask ``query-migrate`` once at the end: for the
    error text of a failure, or a migration's figures.  With a progress
    callback ``query-migrate`` is also asked every 0.1 s.

Live migration
    The destination is a QEMU started from the same config with
    ``-incoming defer -S`` and told ``migrate-incoming tcp:HOST:PORT``
    (:func:`receive`); the source sends with ``migrate tcp:HOST:PORT``;
    once the stream is complete the destination resumes
    (:func:`finish_receive`) and only then does the source QEMU quit and its
    record go.  On one host ``dest`` may be a second :class:`Toolstack`
    (another state directory standing for the other host), and
    :func:`migrate` runs both halves itself.  Between two hosts the halves
    are two commands that talk over a control connection::

        dest$   xenlab vm receive --listen 10.0.0.2:4444 [key=value ...]
                listening on 10.0.0.2:4444 token 3q2-7wE...
        source$ xenlab vm migrate guest 10.0.0.2:4444 --token 3q2-7wE... [--with-storage]

Control protocol (two hosts)
    One TCP connection to the receiver's HOST:PORT; each message one line
    of JSON with a ``"msg"`` key, in the order of xl's migration handshake
    (the receiver says it has the guest, the sender says go, the receiver
    reports the guest resumed, and only then does the sender destroy its
    copy)::

        R -> S  {"msg": "hello", "protocol": 2}
        S -> R  {"msg": "prepare", "token": TOKEN,
                 "header": {SaveHeader as in a save image},
                 "with_storage": bool, "disk_sizes": {vdev: bytes}}
        R -> S  {"msg": "listening", "port": N, "nbd_port": M | null}
                (R started its QEMU with -incoming; the stream goes to HOST:N,
                 the disks' NBD exports are on HOST:M)
        ....    S mirrors the disks (with_storage) and migrates to HOST:N
        R -> S  {"msg": "loaded"}      R's QEMU completed the stream and is paused
        S -> R  {"msg": "go", "paused": bool}
        R -> S  {"msg": "resumed", "domid": D, "state": "running" | "paused"}
        ....    S quits its QEMU and forgets the domain

    Either side may send ``{"msg": "error", "error": TEXT}`` (the receiver)
    or ``{"msg": "abort", "error": TEXT}`` (the sender) instead of its next
    message, and then closes.  Rules:

    - The receiver resumes its QEMU only after "go", and answers "error"
      only once its QEMU is killed and its record gone.  If the sender gives
      up or the connection ends before "go" (a source that vanishes in the
      middle of the stream), it kills its QEMU and leaves no record.
    - Before "go" the sender may take the guest back: an error, a closed
      connection (also one closed just before "go" is sent) or no "loaded"
      within 120 s, and it resumes its own copy and reports why.  After
      "go", a "resumed" makes it quit; an "error" makes it resume its copy.
    - A connection lost after "go" and before the answer leaves the sender
      unable to know whether the destination runs the guest: like xl, it
      then neither destroys nor resumes its copy, leaves it paused and says
      to check the destination (resuming both would run one guest twice on
      the same disks).

Who may migrate here
    A receiver starts a QEMU from the config its peer sends, so it takes
    only a peer that proves it was sent by whoever started the receiver:
    :func:`serve_receive` has a one-time token (``xenlab vm receive`` makes
    one with :func:`new_token` and prints it beside the address, or reads it
    with ``--token-file``), and the sender's "prepare" must carry it
    (``xenlab vm migrate ... --token TOKEN`` or ``--token-file``; compared
    with :func:`hmac.compare_digest`).  A connection without it, or with
    another one, is answered "error" and closed, and nothing is started: the
    receiver goes on waiting for its source (a port scan does not end it).
    Even with the token, the settings that run programs or hand host
    resources to the guest are refused from the wire (see
    :data:`_UNTRUSTED`: ``device_model_args*`` go to QEMU as they are, a vif
    ``script=`` runs an executable, ``bootloader`` a program, ``vga_rom``
    reads a host file into the guest, ``pci`` passes a host device through);
    the receiver's own ``key=value`` overrides may set them, and
    ``--trust-peer-config`` (``trust_peer_config``) takes them from the peer.
    Disk paths still come from the peer (and, with ``with_storage``, a
    missing one is created and exported writable): the token is what
    stands between them and a stranger.

    The token travels in clear, and the stream and NBD ports QEMU opens for
    the migration take any connection while it runs (as with xl, which
    migrates over ssh): listen on a private network only (a management
    VLAN, a VPN), never on an address strangers reach.  An ssh tunnel of the
    control port alone is not enough: the source also connects to the
    ports "listening" names, on the same host.

    ``with_storage`` copies the disks too, QEMU's documented NBD flow
    (docs/interop/live-block-operations.rst): the destination exports its
    blank images of the same size over NBD (``nbd-server-start`` on port
    PORT+1 unless told otherwise, ``block-export-add`` writable); the source
    attaches each export as an ``nbd`` blockdev, runs ``blockdev-mirror
    sync=full`` into it (from the node the disk runs on, a mirror's target
    after a pivot), waits until every mirror is ready, migrates, and
    then ends each mirror with ``block-job-cancel`` (a ready mirror cancelled
    completes without pivoting: the source keeps its own disk) and deletes
    its ``nbd`` node at once, so a source that has to resume (the
    destination failed after the stream) can migrate with storage again.  Mirrors run
    in ``write-blocking`` mode, so once ready every guest write reaches the
    destination before the guest sees it complete, and the destination's disk
    is whole when the memory stream ends.

Failures
    The source domain is only stopped for good after the destination runs:
    a failed or interrupted migration (a destination that dies, a timeout)
    cancels the stream and the mirrors, removes the NBD nodes, resumes the
    source if it was running, kills a local destination and forgets its
    record, and raises :class:`BackendError` saying what happened and that
    the domain still runs here.  An incoming QEMU that fails after it
    started is quoted from its log (qemu.log in its run directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import hmac
import json
import logging
import math
import os
import secrets
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from xenlab.config.model import DomainConfig
from xenlab.config.specs.disk import DiskFormat
from xenlab.errors import BackendError, FormatError, StateError, TruncatedError, XenlabError
from xenlab.vm.domain import Toolstack, _on_disks, config_from_text, create_image
from xenlab.vm.mirror import DISK_NODES, DISK_PATHS
from xenlab.vm.qemu import RuntimePaths
from xenlab.vm.qmp import EventWatch, Qmp
from xenlab.vm.qmp import run as _run
from xenlab.vm.snapshot import CURRENT, OVERLAYS, _img, _img_tags
from xenlab.vm.snapshot import _disks as _snap_disks
from xenlab.vm.store import DomainRecord, SnapshotNode, is_alive

__all__ = [
    "MAGIC",
    "SAVE_VERSION",
    "DiskMove",
    "DiskSnapshot",
    "Incoming",
    "MigrationProgress",
    "MigrationResult",
    "SaveHeader",
    "abort_receive",
    "finish_receive",
    "header_from_json",
    "header_to_json",
    "migrate",
    "new_token",
    "pack_header",
    "parse_header",
    "read_header",
    "read_token",
    "receive",
    "restore",
    "save",
    "serve_receive",
]

_log = logging.getLogger(__name__)

MAGIC = b"XENLAB-SAVE\n"
SAVE_VERSION = 3
# Versions this xenlab still reads (1: before disk_snapshots, 2: before
# disk_paths and overlays).
_READS = (1, 2, 3)
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
# How often a migration with a progress callback asks QEMU how far it got.
_TICK = 0.1
# How often a save starts the kernel writing out what QEMU wrote so far, so
# the fsync at the end has little left to wait for.
_KICK = 0.005
# The control protocol's version (the receiver's hello says it).  2: the
# sender's "prepare" carries the receiver's token.
_PROTOCOL = 2
# How long a connection may take to say who it is (its "prepare").
_AUTH_TIMEOUT = 30.0
# How long one side waits for the other to start or load a QEMU.
_START_TIMEOUT = 120.0


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
class DiskMove:
    """Where disk ``vdev`` really is, when that is not the file its config names.

    In ``SaveHeader.disk_paths``: the file a mirror pivoted it to (the
    record's ``extra["disk_paths"]``); in ``SaveHeader.overlays``: the
    external-snapshot overlay it runs on (``extra["overlays"]``, always
    qcow2).  ``format`` is a :class:`DiskFormat` value.
    """

    vdev: str
    file: str
    format: str


@dataclass(frozen=True, slots=True)
class SaveHeader:
    """What a save image records about its domain, ahead of QEMU's stream.

    ``state`` is the domain's run state when it was saved ("running" or
    "paused"); ``qemu_version`` the saving QEMU's ``major.minor.micro``;
    ``disk_snapshots`` the disks' internal snapshots taken with the memory
    (empty unless saved with ``snapshot``; always empty in version 1);
    ``disk_paths`` and ``overlays`` the disks that ran elsewhere than the
    config says (always empty before version 3).
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
    disk_paths: tuple[DiskMove, ...] = ()
    overlays: tuple[DiskMove, ...] = ()


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


def header_to_json(h: SaveHeader) -> dict[str, object]:
    """The header as the JSON object a save image (or the migration channel) carries.

    Each version is written as it was: no field a version did not have.

    :raise ValueError: ``h`` has something its version cannot say.
    """
    if h.version not in _READS or (h.version == 1 and h.disk_snapshots) or (
            h.version < 3 and (h.disk_paths or h.overlays)):
        raise ValueError(f"cannot write a version {h.version} header with "
                         f"{len(h.disk_snapshots)} disk snapshot(s), "
                         f"{len(h.disk_paths) + len(h.overlays)} moved disk(s)")
    obj: dict[str, object] = {k: getattr(h, k) for k in _HEADER_FIELDS}
    if h.version >= 2:
        obj["disk_snapshots"] = [
            {"vdev": d.vdev, "file": d.file, "name": d.name} for d in h.disk_snapshots
        ]
    if h.version >= 3:
        obj["disk_paths"] = {m.vdev: {"file": m.file, "format": m.format}
                             for m in h.disk_paths}
        obj["overlays"] = {m.vdev: {"file": m.file, "format": m.format} for m in h.overlays}
    return obj


def pack_header(h: SaveHeader) -> bytes:
    """The bytes that precede QEMU's stream in a save image: magic, length, JSON.

    A header of an older version is written as that version wrote it.
    """
    body = json.dumps(header_to_json(h), sort_keys=True, ensure_ascii=False).encode(
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
    header = header_from_json(obj, source, at)
    at += n
    if len(mv) < at + len(_QEMU_MAGIC):
        raise TruncatedError(source, at, "stream magic", len(_QEMU_MAGIC), len(mv) - at)
    found = bytes(mv[at: at + len(_QEMU_MAGIC)])
    if found != _QEMU_MAGIC:
        raise FormatError(source, at, "stream magic",
                          f"found {found!r}, expected QEMU's {_QEMU_MAGIC!r}")
    return header, at


def header_from_json(obj: object, source: str = "header", at: int = 0) -> SaveHeader:
    """The :class:`SaveHeader` a decoded JSON value describes (versions 1 to 3).

    ``at`` is the offset reported in errors (where the JSON starts).

    :raise FormatError: ``obj`` is not a header of a version this xenlab reads.
    """
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
    return SaveHeader(
        name=obj["name"], uuid=obj["uuid"], config_text=obj["config_text"],
        config_path=obj["config_path"], qemu_version=obj["qemu_version"],
        created=created, state=obj["state"], version=version,
        disk_snapshots=_disk_snapshots(obj, source, at) if version >= 2 else (),
        disk_paths=_disk_moves(obj, "disk_paths", source, at) if version >= 3 else (),
        overlays=_disk_moves(obj, "overlays", source, at) if version >= 3 else (),
    )


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


def _disk_moves(obj: Mapping[str, Any], key: str, source: str, at: int
                ) -> tuple[DiskMove, ...]:
    items = obj.get(key)
    if not isinstance(items, dict):
        raise FormatError(source, at, f"header.{key}",
                          f"found {_describe(items)}, expected an object (vdev: place)")
    out: list[DiskMove] = []
    for vdev, item in sorted(items.items()):
        field = f"header.{key}.{vdev}"
        if not vdev:
            raise FormatError(source, at, f"header.{key}", "an empty vdev")
        if not isinstance(item, dict):
            raise FormatError(source, at, field, f"found {_describe(item)}, expected an object")
        for k in ("file", "format"):
            if not isinstance(item.get(k), str) or not item[k]:
                raise FormatError(source, at, f"{field}.{k}",
                                  f"found {_describe(item.get(k))}, expected a non-empty str")
        try:
            DiskFormat(item["format"])
        except ValueError:
            raise FormatError(source, at, f"{field}.format",
                              f"{item['format']!r}, expected a disk format "
                              f"({', '.join(f.value for f in DiskFormat)})") from None
        out.append(DiskMove(vdev, item["file"], item["format"]))
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


async def _migration_events(qmp: Qmp) -> None:
    """Ask QEMU for a MIGRATION event at each change of the migration's status.

    Off by default in QEMU; it has to be on in the QEMU that sends and in
    the one that receives (before ``migrate-incoming``).
    """
    await qmp.execute("migrate-set-capabilities",
                      {"capabilities": [{"capability": "events", "state": True}]})


def _report(progress: Progress | None, info: Mapping[str, Any], status: str,
            started: float) -> None:
    ram = info.get("ram") or {}
    if progress is not None and ram:
        progress(MigrationProgress(
            "memory", status, int(ram.get("transferred", 0)), int(ram.get("remaining", 0)),
            int(ram.get("total", 0)), time.monotonic() - started,
        ))


async def _wait_migration(qmp: Qmp, watch: EventWatch, what: str, timeout: float,
                          progress: Progress | None, started: float, *,
                          stats: bool = False, check_first: bool = False,
                          tick: Callable[[], None] | None = None) -> dict[str, Any]:
    """Wait on QEMU's MIGRATION events until the migration has completed.

    ``watch`` must listen to "MIGRATION" since before the command that
    started the migration (or ``check_first`` asks ``query-migrate`` once,
    for a migration that may have ended before the watch).  Returns the
    final ``query-migrate`` when ``stats`` (or a progress report is wanted),
    else nothing: the event says all a save or a restore needs.  Progress is
    reported every ``_TICK`` seconds from ``query-migrate`` while it runs,
    and once at the end with status "completed".  ``tick`` is called every
    ``_KICK`` seconds while it runs.

    :raise BackendError: the migration failed or was cancelled (QEMU's
        ``error-desc``, asked once, in the message), QEMU went away, or
        ``timeout`` passed.
    """
    deadline = time.monotonic() + timeout
    status = "unknown"
    if check_first:
        status = str((await _query_migrate(qmp)).get("status", "none"))
    while status not in ("completed", "failed", "cancelled"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            with contextlib.suppress(BackendError):
                status = str((await _query_migrate(qmp)).get("status", status))
            raise BackendError(f"{what}: not completed within {timeout:g}s (status {status})")
        wait = remaining
        if progress is not None:
            wait = min(wait, _TICK)
        if tick is not None:
            wait = min(wait, _KICK)
            tick()
        try:
            ev = await watch.wait(wait)
        except BackendError as err:
            if not qmp.connected:
                raise BackendError(f"{what}: {err}") from err
            if progress is not None:
                info = await _query_migrate(qmp)
                _report(progress, info, str(info.get("status", status)), started)
            continue
        status = str((ev.get("data") or {}).get("status", status))
    if status != "completed":
        info = await _query_migrate(qmp)
        why = info.get("error-desc") or status
        raise BackendError(f"{what}: QEMU reports the migration {status}: {why}")
    if not stats and progress is None:
        return {}
    info = await _query_migrate(qmp)
    # QEMU sends "completed" before it has computed the totals (migration.c
    # sets the state, then migration_calculate_complete): ask again briefly.
    for _ in range(40):
        if info.get("total-time") or info.get("status") != "completed":
            break
        await asyncio.sleep(0.005)
        info = await _query_migrate(qmp)
    _report(progress, info, "completed", started)
    return info


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


# --- where the disks are ------------------------------------------------------------------


def _moves_of(rec: DomainRecord) -> tuple[tuple[DiskMove, ...], tuple[DiskMove, ...]]:
    """(mirror targets, external overlays) the domain's disks run on, from its record."""
    moved: Mapping[str, Any] = rec.extra.get(DISK_PATHS) or {}
    overlays: Mapping[str, Any] = rec.extra.get(OVERLAYS) or {}
    paths = tuple(DiskMove(v, str(m["file"]), str(m.get("format") or "qcow2"))
                  for v, m in sorted(moved.items()) if isinstance(m, dict) and m.get("file"))
    tops = tuple(DiskMove(v, str(o["file"]), DiskFormat.QCOW2.value)
                 for v, o in sorted(overlays.items()) if isinstance(o, dict) and o.get("file"))
    return paths, tops


@dataclass(frozen=True, slots=True)
class _Placed:
    """A config with its moved disks on their files, and the record facts that say so."""

    config: DomainConfig
    disk_paths: dict[str, dict[str, str]]
    overlays: dict[str, dict[str, str]]

    def extra(self, old: Mapping[str, Any]) -> dict[str, Any]:
        """``old`` (a record's extra) saying where the disks are now, for a fresh QEMU."""
        extra = {k: v for k, v in old.items() if k not in (DISK_PATHS, OVERLAYS, DISK_NODES)}
        if self.disk_paths:
            extra[DISK_PATHS] = self.disk_paths
        if self.overlays:
            extra[OVERLAYS] = self.overlays
        return extra


def _place(text_dc: DomainConfig, dc: DomainConfig, disk_paths: Sequence[DiskMove],
           overlays: Sequence[DiskMove], source: str) -> _Placed:
    """``dc`` with each moved disk on the file it moved to.

    ``text_dc`` is the config as saved (no overrides): a disk that the
    overrides point at another file keeps the override (the caller moved
    it on purpose); the others go where the domain last ran, overlays on
    top of mirror targets.  A moved disk the config no longer has is an
    error: the guest's memory expects it.
    """
    saved = {d.vdev: d.pdev_path for d in text_dc.disks}
    now = {d.vdev: d.pdev_path for d in dc.disks}
    moves: dict[str, tuple[str, DiskFormat]] = {}
    paths: dict[str, dict[str, str]] = {}
    tops: dict[str, dict[str, str]] = {}
    for kind, items in (("mirror", disk_paths), ("overlay", overlays)):
        for m in items:
            if m.vdev not in now:
                raise XenlabError(f"{source}: disk {m.vdev} ran on {m.file} ({kind}), "
                                  "but the config has no such disk")
            if now[m.vdev] != saved.get(m.vdev):
                continue  # overridden
            moves[m.vdev] = (m.file, DiskFormat(m.format))
            if kind == "mirror":
                paths[m.vdev] = {"file": m.file, "format": m.format}
            else:
                # A fresh QEMU names the disk's top node <vdev>-fmt (vm.qemu).
                tops[m.vdev] = {"file": m.file, "node": f"{m.vdev}-fmt"}
    for vdev, (file, _) in sorted(moves.items()):
        if not Path(file).exists():
            raise XenlabError(f"{source}: disk {vdev} ran on {file}, which does not exist "
                              "(give the disk's place with a disk=[...] override)")
    return _Placed(_on_disks(dc, moves), paths, tops)


# --- shared steps ---------------------------------------------------------------------------


def _log_tail(paths: RuntimePaths, lines: int = 5) -> str:
    try:
        text = paths.log.read_text(errors="replace").strip()
    except OSError:
        return ""
    return " | ".join(text.splitlines()[-lines:])


def _qemu_said(paths: RuntimePaths) -> str:
    tail = _log_tail(paths)
    return f"; QEMU said: {tail}" if tail else ""


def _quit(ts: Toolstack, rec: DomainRecord, paths: RuntimePaths) -> None:
    """Make the domain's QEMU exit (QMP quit, SIGKILL if it lingers)."""
    with contextlib.suppress(BackendError):
        _run(_qmp_quit(paths))
    _wait_quit(ts, rec, paths)


def _wait_quit(ts: Toolstack, rec: DomainRecord, paths: RuntimePaths) -> None:
    begin = time.monotonic()
    while is_alive(rec) and time.monotonic() < begin + 10:
        time.sleep(_poll(begin))
    if is_alive(rec):
        ts._kill(paths, rec.pid)


async def _qmp_quit(paths: RuntimePaths) -> None:
    async with Qmp.open(paths.qmp) as qmp:
        await _quit_in(qmp)


async def _quit_in(qmp: Qmp) -> None:
    # QEMU may close the socket before or after the reply.
    with contextlib.suppress(BackendError):
        await qmp.execute("quit")


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


@functools.cache
def _default_image() -> object:
    """The project's guest image, looked up once per process (restore and receive
    start QEMU often; finding the cached image costs an ldd and some hashing)."""
    from xenlab.vm.image import build_image

    return build_image()


def _image_for(dc: DomainConfig, image: object | None) -> object | None:
    return image if image is not None or dc.kernel is not None else _default_image()


# --- save / restore ----------------------------------------------------------------------


def save(ts: Toolstack, name: str, path: Path, *, keep_running: bool = False,
         snapshot: bool = False, timeout: float = 300.0, max_bandwidth: int | None = None,
         progress: Progress | None = None) -> SaveHeader:
    """Save the domain's memory and device state to ``path``, with its config; xl save.

    The domain is paused, its migration stream written behind a
    :class:`SaveHeader`, and then it is stopped (its QEMU quits and its
    record goes, or stays shut off when it has snapshots or mirrored disks),
    unless ``keep_running``, when it carries on as it was (paused stays
    paused).  The header names the files the disks really run on (a
    mirror's target, an external snapshot's overlay), so :func:`restore`
    starts on them.

    With ``snapshot`` every writable disk gets an internal snapshot named
    ``xenlab-save-<time>`` (one QMP ``transaction``) while the guest is
    paused for the save, recorded in the header's ``disk_snapshots``;
    :func:`restore` reverts the disks to it.  The snapshot is taken after
    ``stop`` and just before the stream starts, not after it ends: once the
    stream is complete QEMU has handed its images over (inactivated them)
    and refuses internal snapshots; the guest does not run in between, so
    it is the same instant.  The snapshot stays in the images (so the save
    image can be restored again); ``qemu-img snapshot -d`` drops it.

    Durability: the image is written to a temporary file beside ``path``
    (the kernel is told to start writing it out while QEMU still writes),
    fsynced, and renamed into place (the directory fsynced), all before QEMU
    quits; so the guest's state is on disk before its only other copy goes.

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
        paths = ts.paths(rec)
        snaps = _save_snapshots(ts, rec) if snapshot else ()
        disk_paths, overlays = _moves_of(rec)
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part",
                                            dir=path.parent)
        except OSError as err:
            raise XenlabError(
                f"{path}: cannot write the save image: {err.strerror or err}"
            ) from err
        tmp = Path(tmp_name)

        def commit() -> None:
            # Once, before the rename: the image is whole on disk before QEMU
            # quits (most of it already is: see _write_out); then the rename.
            os.fsync(fd)
            os.replace(tmp, path)
            _fsync_dir(path.parent)

        try:
            with os.fdopen(fd, "wb") as f:
                header = _run(_save_stream(
                    paths, f, rec, keep_running=keep_running, timeout=timeout,
                    max_bandwidth=max_bandwidth, progress=progress, snapshots=snaps,
                    disk_paths=disk_paths, overlays=overlays, commit=commit,
                ))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if keep_running:
            ts.store.update(replace(rec, state=header.state))
        else:
            _wait_quit(ts, rec, paths)
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
    """The disk snapshots ``save --snapshot`` will take: every writable disk, all qcow2.

    Each is taken in the image the disk runs on now (a mirror's target, an
    overlay), which is the file :func:`restore` will start it on.
    """
    dc, _ = ts._config_of(rec)
    tag = "xenlab-save-" + time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 10**9:09d}"
    out: list[DiskSnapshot] = []
    by_vdev = {d.vdev: d for d in _snap_disks(ts, rec)}
    for d in dc.disks:
        if d.is_cdrom or not d.readwrite or not d.pdev_path or d.format is DiskFormat.EMPTY:
            continue  # read-only media cannot change behind the memory's back
        now = by_vdev.get(d.vdev)
        file, fmt = (now.file, now.format) if now is not None else (d.pdev_path, d.format.value)
        if fmt != DiskFormat.QCOW2.value:
            raise XenlabError(
                f"save --snapshot: disk {d.vdev} ({file}) is {fmt}; "
                "only qcow2 images hold internal snapshots (save without --snapshot, or "
                "convert the disk with qemu-img convert -O qcow2)"
            )
        out.append(DiskSnapshot(d.vdev, file, tag))
    return tuple(out)


async def _save_stream(paths: RuntimePaths, f: Any, rec: DomainRecord, *, keep_running: bool,
                       timeout: float, max_bandwidth: int | None,
                       progress: Progress | None,
                       snapshots: Sequence[DiskSnapshot] = (),
                       disk_paths: tuple[DiskMove, ...] = (),
                       overlays: tuple[DiskMove, ...] = (),
                       commit: Callable[[], None] = lambda: None) -> SaveHeader:
    """Write the header and QEMU's stream to ``f``, ``commit`` it, then quit or go on.

    One QMP session for all of it, as a one-shot client would do it.
    """
    started = time.monotonic()
    async with Qmp.open(paths.qmp) as qmp:
        state = await _status(qmp)
        was_running = state == "running"
        header = SaveHeader(
            name=rec.name, uuid=rec.uuid, config_text=rec.config_text,
            config_path=rec.config_path,
            qemu_version=_qemu_version(await qmp.execute("query-version")),
            created=time.time(), state="running" if was_running else "paused",
            disk_snapshots=tuple(snapshots), disk_paths=disk_paths, overlays=overlays,
        )
        f.write(pack_header(header))
        f.flush()
        old_bw: object = None
        if keep_running:
            # Only a QEMU that goes on needs its own limit back.
            params = await qmp.execute("query-migrate-parameters")
            old_bw = params.get("max-bandwidth") if isinstance(params, dict) else None
        await qmp.execute("migrate-set-parameters",
                          {"max-bandwidth": max_bandwidth or _UNLIMITED})
        await _migration_events(qmp)
        snapped = False
        try:
            if was_running:
                await qmp.execute("stop")
            if snapshots:
                # One transaction: every disk at the same instant, or none.
                nodes = await _device_nodes(qmp)
                await qmp.execute("transaction", {"actions": [
                    {"type": "blockdev-snapshot-internal-sync",
                     "data": {"device": nodes.get(d.vdev, f"{d.vdev}-fmt"), "name": d.name}}
                    for d in snapshots
                ]}, timeout=timeout)
                snapped = True
            await _send_fd(qmp, f.fileno(), _FD_NAME)
            with qmp.listen("MIGRATION") as watch:
                await qmp.execute("migrate", {"uri": f"fd:{_FD_NAME}"})
                await _wait_migration(qmp, watch, f"save {rec.name}", timeout, progress,
                                      started, tick=functools.partial(_write_out, f.fileno()))
            f.flush()
            commit()
        except BaseException as err:
            with contextlib.suppress(BackendError):
                await _cancel_migration(qmp)
                with contextlib.suppress(BackendError):
                    await qmp.execute("closefd", {"fdname": _FD_NAME})
                if was_running:
                    await _cont_after_migration(qmp)
            if snapped:
                left = await _drop_disk_snapshots(qmp, snapshots)
                if left and isinstance(err, Exception):
                    raise BackendError(
                        f"{err}; the disk snapshot {snapshots[0].name!r} could not be "
                        f"deleted from {', '.join(left)} (qemu-img snapshot -d removes it)"
                    ) from err
            if isinstance(err, OSError):
                raise XenlabError(f"save {rec.name}: cannot write the image: "
                                  f"{err.strerror or err}; the domain goes on") from err
            raise
        if not keep_running:
            await _quit_in(qmp)
            return header
        if old_bw is not None:
            with contextlib.suppress(BackendError):
                await qmp.execute("migrate-set-parameters", {"max-bandwidth": old_bw})
        if was_running:
            await _cont_after_migration(qmp)
    return header


_libc = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2


def _write_out(fd: int) -> None:
    """Start writing ``fd``'s dirty pages to disk, without waiting for them
    (sync_file_range(SYNC_FILE_RANGE_WRITE); the page cache is kept, unlike
    with posix_fadvise, so a restore right after reads from memory)."""
    _libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), _SYNC_FILE_RANGE_WRITE)


async def _device_nodes(qmp: Qmp) -> dict[str, str]:
    """vdev -> the node its guest device is attached to now (query-block)."""
    blocks = await qmp.execute("query-block")
    out: dict[str, str] = {}
    for b in blocks if isinstance(blocks, list) else ():
        qdev = str(b.get("qdev", ""))
        # vm.qemu's devices have id=<vdev>: /machine/peripheral/<vdev>/<backend>
        vdev = qdev.split("/")[3] if qdev.startswith("/machine/peripheral/") else qdev
        node = (b.get("inserted") or {}).get("node-name")
        if vdev and node:
            out[vdev] = str(node)
    return out


async def _drop_disk_snapshots(qmp: Qmp, snapshots: Sequence[DiskSnapshot]) -> list[str]:
    """Delete a failed save's disk snapshots; the files where that did not work."""
    nodes = await _device_nodes(qmp)
    left: list[str] = []
    for d in snapshots:
        try:
            await qmp.execute("blockdev-snapshot-delete-internal-sync",
                              {"device": nodes.get(d.vdev, f"{d.vdev}-fmt"), "name": d.name})
        except BackendError:
            left.append(d.file)
    return left


def _revert_plan(dc: DomainConfig, header: SaveHeader, path: Path
                 ) -> list[tuple[str, str]]:
    """(file, tag) of each disk ``restore`` must revert; checked before anything changes.

    The files are the ones the (possibly overridden, moved) config names now:
    the domain will run on those, so those must hold the snapshot.
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
    it, xl-style ``key=value``); the domain keeps its name and uuid.  Disks
    that ran on a mirror's target or an external overlay when it was saved
    (the header says which) start on those files again, and the record says
    so, unless an override points the disk elsewhere.  It runs unless
    ``paused``.  An image saved with ``snapshot`` first reverts each disk to
    the snapshot taken with the memory (``qemu-img snapshot -a``, with no
    QEMU running); everything written to the disks since is lost, as it
    must be for the guest's memory to match them.

    CLI: ``xenlab vm restore [-p] FILE [key=value ...]``.

    :raise FormatError: ``path`` is not a xenlab save image.
    :raise XenlabError: the name is taken, the config no longer works here,
        a disk the domain ran on is missing, or a disk lacks the image's
        snapshot (nothing changed).
    :raise BackendError: qemu-img could not revert a disk (one in use by
        another QEMU), or QEMU could not load the stream (a corrupt image, a
        QEMU or config that does not match; QEMU's own words are quoted); no
        record and no QEMU is left.
    """
    path = Path(path)
    header, offset = read_header(path)
    source = f"{path} (saved config)"
    dc, text = config_from_text(header.config_text, source, overrides)
    text_dc = config_from_text(header.config_text, source)[0] if overrides else dc
    placed = _place(text_dc, dc, header.disk_paths, header.overlays, f"restore {path}")
    dc = placed.config
    plan = _revert_plan(dc, header, path)

    def revert() -> None:
        for file, tag in plan:
            _img("snapshot", "-a", tag, file, timeout=300.0)

    rec = ts._start(dc, text, config_path=header.config_path, uuid=header.uuid,
                    incoming="defer", image=_image_for(dc, image),
                    prepare=revert if plan else None)
    paths = ts.paths(rec)
    try:
        with ts.store.lock(rec.domid):
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    _run(_load_stream(paths, f.fileno(), timeout, paused))
            except BackendError as err:
                if not is_alive(rec):
                    raise BackendError(
                        f"restore {path}: QEMU could not load the saved state and exited "
                        f"(a corrupt image, or one saved by an incompatible QEMU/config)"
                        + (f": {_log_tail(paths)}" if _log_tail(paths) else "") + f" [{err}]"
                    ) from err
                raise BackendError(f"restore {path}: {err}{_qemu_said(paths)}") from err
            return ts.store.update(replace(rec, state="paused" if paused else "running",
                                           extra=placed.extra(rec.extra)))
    except BaseException:
        ts._kill(paths, rec.pid)
        ts._gone(rec)
        raise


async def _load_stream(paths: RuntimePaths, fd: int, timeout: float, paused: bool) -> None:
    started = time.monotonic()
    async with Qmp.open(paths.qmp) as qmp:
        await _migration_events(qmp)
        await _send_fd(qmp, fd, _FD_NAME)
        with qmp.listen("MIGRATION") as watch:
            await qmp.execute("migrate-incoming", {"uri": f"fd:{_FD_NAME}"})
            await _wait_migration(qmp, watch, "restore", timeout, None, started)
        if not paused:
            await qmp.execute("cont")


# --- live migration ----------------------------------------------------------------------


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
    disk_paths: Sequence[DiskMove] = (), overlays: Sequence[DiskMove] = (),
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
    format.  Follow with :func:`finish_receive` once the source has sent
    everything, or :func:`abort_receive`.  :func:`serve_receive` does all of
    it for a source on another host.

    :raise XenlabError: bad config, name taken, a missing disk without a size.
    :raise BackendError: QEMU refused the config, the port or the NBD export
        (QEMU's own words quoted).
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
        dc = _on_disks(dc, keep)
        placed = _Placed(dc, {m.vdev: {"file": m.file, "format": m.format}
                              for m in disk_paths if m.vdev in keep}, {})
    else:
        placed = _place(text_dc, dc, disk_paths, overlays, where)
        dc = placed.config
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
                        image=_image_for(dc, image))
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
                        tuple(v for v, _, _ in disks), tuple(created),
                        placed.extra(rec.extra))
    except BaseException as err:
        alive = is_alive(rec)
        ts._kill(paths, rec.pid)
        said = _qemu_said(paths)
        ts._gone(rec)
        _unlink(created)
        if isinstance(err, BackendError) and said:
            raise BackendError(f"{where}: {err}" + ("" if alive else " (QEMU exited)")
                               + said) from err
        raise


def _unlink(files: Sequence[str]) -> None:
    for p in files:
        Path(p).unlink(missing_ok=True)


async def _listen(paths: RuntimePaths, host: str, port: int, disks: Sequence[str],
                  nbd_port: int | None) -> int:
    async with Qmp.open(paths.qmp) as qmp:
        await _migration_events(qmp)
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
            raise _receive_failed(ts, incoming, err) from err
        return ts.store.update(replace(rec, state="paused" if paused else "running",
                                       extra=incoming.extra))


def _receive_failed(ts: Toolstack, incoming: Incoming, err: BaseException) -> BaseException:
    """Kill and forget an incoming domain after ``err``; the error to raise, saying why."""
    rec = incoming.record
    paths = ts.paths(rec)
    alive = is_alive(rec)
    ts._kill(paths, rec.pid)
    said = _qemu_said(paths)
    ts._gone(rec)
    _unlink(incoming.created)
    if isinstance(err, BackendError) and not alive:
        return BackendError(
            f"incoming {rec.name}: the destination QEMU exited during the migration "
            f"(the stream broke off or could not be loaded) [{err}]{said}"
        )
    if isinstance(err, BackendError):
        return BackendError(f"incoming {rec.name}: {err}{said}")
    return err


async def _finish(paths: RuntimePaths, inc: Incoming, paused: bool, timeout: float) -> None:
    async with Qmp.open(paths.qmp) as qmp:
        with qmp.listen("MIGRATION") as watch:
            await _wait_migration(qmp, watch, f"incoming {inc.record.name}", timeout, None,
                                  time.monotonic(), check_first=True)
        await _resume_incoming(qmp, inc, paused)


async def _resume_incoming(qmp: Qmp, inc: Incoming, paused: bool) -> None:
    """End the NBD exports of a storage migration, check QEMU holds the guest, ``cont``."""
    if inc.nbd_port is not None:
        for vdev in inc.disks:
            with contextlib.suppress(BackendError):
                await qmp.execute("block-export-del", {"id": f"mig-{vdev}"})
        await qmp.execute("nbd-server-stop")
    status = await _status(qmp)
    if status not in ("paused", "prelaunch"):
        raise BackendError(f"the incoming QEMU is {status!r} after the stream, "
                           "expected 'paused'")
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
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise XenlabError(f"migration address {dest!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def migrate(
    ts: Toolstack, name: str, dest: Toolstack | str, *, live: bool = True,
    with_storage: bool = False, paused: bool = False, host: str = "127.0.0.1",
    nbd_port: int | None = None, dest_overrides: Sequence[str] = (),
    max_bandwidth: int | None = None, timeout: float = 600.0,
    progress: Progress | None = None, token: str | None = None,
) -> MigrationResult:
    """Move the running domain ``name`` to ``dest``; xl migrate.

    ``dest`` is a :class:`Toolstack` on this host (its destination QEMU is
    started here, listening on ``host``, with ``dest_overrides`` appended to
    the config, e.g. other disk paths) or ``"HOST:PORT"`` where
    :func:`serve_receive` (``xenlab vm receive --listen``) waits; the two
    then speak the control protocol of the module docstring, and the source
    QEMU quits only once the destination has said it runs the guest;
    ``token`` is the one the receiver printed (needed for ``"HOST:PORT"``).
    ``live=False`` pauses the domain first (virsh migrate without --live).
    ``with_storage`` mirrors the writable disks to the destination first.
    ``paused`` leaves the destination paused.  ``max_bandwidth`` is in
    bytes/s (default: unlimited).  Disks on a mirror's target (or a local
    destination's overlays) go on running on those files at the destination.

    On success the source QEMU has quit and its record is gone; the
    destination runs.

    CLI: ``xenlab vm migrate DOM HOST:PORT --token TOKEN|--token-file FILE
    [--with-storage] [--offline] [-p] [--max-bandwidth BYTES]`` (and
    ``--dest-state-dir DIR`` for a second toolstack on this host).

    :raise XenlabError: ``dest`` is ``"HOST:PORT"`` and no ``token`` is given
        (nothing happened).
    :raise StateError: the domain is not running, or has snapshots and the
        destination is not a toolstack on this host sharing the disks.
    :raise BackendError: the migration failed (destination gone or refusing,
        timeout, a mirror error); the domain still runs here and the message
        says so; or the control connection broke after the destination was
        told to go (the message says to check both ends; the domain is left
        paused here).
    """
    started = time.monotonic()
    if not isinstance(dest, Toolstack):
        _parse_dest(dest)
        if not token:
            raise XenlabError(f"migrate {name} to {dest}: the receiver wants the token it "
                              "printed (--token TOKEN or --token-file FILE)")
    rec = ts._live(name)
    with ts.store.lock(rec.domid):
        rec = ts._live(str(rec.domid))
        snaps = ts.store.list_snapshots(rec.domid)
        if snaps and (with_storage or not isinstance(dest, Toolstack)):
            raise StateError(
                f"domain {rec.name!r} has {len(snaps)} snapshot(s): their records can only "
                "follow it to a second toolstack on this host with shared disks (a storage "
                "migration copies the disks' current state only); delete them first"
            )
        paths = ts.paths(rec)
        disk_paths, overlays = _moves_of(rec)
        dc, _ = ts._config_of(rec)
        disks = _mirrored(_place(dc, dc, disk_paths, overlays, f"migrate {rec.name}").config
                          ) if with_storage else []
        vdevs = [v for v, _, _ in disks]
        nodes = {v: str((rec.extra.get(DISK_NODES) or {}).get(v, f"{v}-fmt")) for v in vdevs}
        if not isinstance(dest, Toolstack):
            info = _migrate_remote(ts, rec, paths, dest, disk_paths, overlays, vdevs, nodes,
                                   live=live, paused=paused, max_bandwidth=max_bandwidth,
                                   timeout=timeout, progress=progress, started=started,
                                   token=str(token))
            dest_rec: DomainRecord | None = None
        else:
            sizes = _run(_disk_sizes(paths, nodes)) if disks else {}
            incoming = receive(
                dest, rec.config_text, 0, host=host, overrides=dest_overrides,
                with_storage=with_storage, nbd_port=nbd_port, disk_sizes=sizes,
                config_path=rec.config_path, uuid=rec.uuid, disk_paths=disk_paths,
                overlays=overlays,
            )
            where = f"{_uri_host(host)}:{incoming.port}"
            try:
                sent = _run(_send(paths, rec.name, where, host, incoming.nbd_port, nodes,
                                  live=live, max_bandwidth=max_bandwidth, timeout=timeout,
                                  progress=progress, started=started))
            except BaseException as err:
                dead = not is_alive(incoming.record)
                abort_receive(dest, incoming)
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
            try:
                dest_rec = finish_receive(dest, incoming, paused=paused, timeout=timeout)
            except BaseException:
                # The destination could not take over: the source has every
                # page and its disks, so it carries on.
                with contextlib.suppress(BackendError):
                    _run(_resume_source(paths, sent))
                raise
            if snaps:
                dest_rec = _copy_snapshots(ts, dest, rec, dest_rec)
            info = sent.info
        _quit(ts, rec, paths)
        shutil.rmtree(paths.rundir, ignore_errors=True)
        ts.store.remove(rec.domid)
    ram = info.get("ram") or {}
    return MigrationResult(
        record=dest_rec, seconds=time.monotonic() - started,
        total_ms=int(info.get("total-time", 0)), downtime_ms=int(info.get("downtime", 0)),
        ram_transferred=int(ram.get("transferred", 0)),
        disks=tuple(vdevs),
    )


async def _disk_sizes(paths: RuntimePaths, nodes: Mapping[str, str]) -> dict[str, int]:
    """vdev -> virtual size of the node it runs on (``nodes``: vdev -> node name)."""
    async with Qmp.open(paths.qmp) as qmp:
        return await _node_sizes(qmp, nodes)


async def _node_sizes(qmp: Qmp, nodes: Mapping[str, str]) -> dict[str, int]:
    listed = await qmp.execute("query-named-block-nodes", {"flat": True})
    by_node = {str(n.get("node-name", "")): n for n in listed if isinstance(n, dict)
               } if isinstance(listed, list) else {}
    return {v: int(by_node[n]["image"]["virtual-size"]) for v, n in nodes.items()
            if n in by_node}


@dataclass(frozen=True, slots=True)
class _Sent:
    """A completed stream: QEMU's final ``query-migrate``, whether the guest ran
    before, and the bandwidth limit to give back if the source has to go on."""

    info: dict[str, Any]
    was_running: bool
    old_bw: object


async def _resume_source(paths: RuntimePaths, sent: _Sent) -> None:
    """Let the source go on after a completed stream the destination did not take."""
    async with Qmp.open(paths.qmp) as qmp:
        await _resume_in(qmp, sent)


async def _cont_after_migration(qmp: Qmp, timeout: float = 10.0) -> None:
    """``cont`` a source whose outgoing migration has ended, once QEMU has finished it.

    QEMU reports "completed" while its migration thread still holds the VM in
    finish-migrate; it sets postmigrate only after that.  A ``cont`` in between
    starts the vCPUs and is then overwritten: the guest runs while QEMU says
    postmigrate.  So wait for finish-migrate to end, ``cont``, and check.
    """
    deadline = time.monotonic() + timeout
    while True:
        status = await _status(qmp)
        if status == "running":
            return
        if status != "finish-migrate":
            await qmp.execute("cont")
            status = await _status(qmp)
            if status == "running":
                return
        if time.monotonic() > deadline:
            raise BackendError(f"the source QEMU did not resume: it is {status!r}")
        await asyncio.sleep(0.005)


async def _send(paths: RuntimePaths, name: str, where: str, dhost: str, nbd_port: int | None,
                nodes: Mapping[str, str], *, live: bool, max_bandwidth: int | None,
                timeout: float, progress: Progress | None, started: float,
                qmp: Qmp | None = None) -> _Sent:
    """Mirror ``nodes`` (vdev -> source node) to the NBD exports, migrate, end the mirrors.

    The source is left stopped (postmigrate).  On failure everything is
    undone and the guest resumed if it ran.  ``qmp``: a session to use
    instead of a new one.
    """
    if qmp is None:
        async with Qmp.open(paths.qmp) as session:
            return await _send(paths, name, where, dhost, nbd_port, nodes, live=live,
                               max_bandwidth=max_bandwidth, timeout=timeout,
                               progress=progress, started=started, qmp=session)
    was_running = await _status(qmp) == "running"
    params = await qmp.execute("query-migrate-parameters")
    old_bw = params.get("max-bandwidth") if isinstance(params, dict) else None
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": max_bandwidth or _UNLIMITED})
    await _migration_events(qmp)
    mirrors: list[str] = []
    added: list[str] = []
    completed = False
    if nodes:
        await _del_stale_nodes(qmp, [f"mig-{vdev}" for vdev in nodes])
    try:
        for vdev, node in nodes.items():
            assert nbd_port is not None
            await qmp.execute("blockdev-add", {
                "driver": "nbd", "node-name": f"mig-{vdev}", "export": vdev,
                "server": {"type": "inet", "host": dhost, "port": str(nbd_port)},
            })
            added.append(f"mig-{vdev}")
            await qmp.execute("blockdev-mirror", {
                "job-id": f"mig-{vdev}", "device": node, "target": f"mig-{vdev}",
                "sync": "full", "copy-mode": "write-blocking",
                # kept after it ends, so a failure's reason can be read
                "auto-dismiss": False,
            })
            mirrors.append(f"mig-{vdev}")
        if mirrors:
            await _wait_mirrors_ready(qmp, mirrors, timeout, progress, started)
        if not live and was_running:
            await qmp.execute("stop")
        with qmp.listen("MIGRATION") as watch:
            await qmp.execute("migrate", {"uri": f"tcp:{where}"})
            info = await _wait_migration(qmp, watch, f"migrate {name}", timeout, progress,
                                         started, stats=True)
        completed = True
        for job in mirrors:
            # Ready, so cancelling completes the copy without a pivot.
            await qmp.execute("block-job-cancel", {"device": job})
        await _dismiss_jobs(qmp, mirrors, 30)
        mirrors.clear()
        # The NBD nodes go with their mirrors, now: whatever the destination
        # does next, the source needs them no more, and if it has to resume, a
        # later storage migration adds them again under the same names.
        for node in added:
            try:
                await qmp.execute("blockdev-del", {"node-name": node})
            except BackendError as err:
                _log.warning("migrate %s: NBD node %s not deleted: %s", name, node, err)
        added.clear()
        return _Sent(info, was_running, old_bw)
    except BaseException:
        if not completed:
            await _cancel_migration(qmp)
        for job in mirrors:
            with contextlib.suppress(BackendError):
                await qmp.execute("block-job-cancel", {"device": job, "force": True})
        with contextlib.suppress(BackendError):
            await _dismiss_jobs(qmp, mirrors, 30)
        for node in added:
            with contextlib.suppress(BackendError):
                await qmp.execute("blockdev-del", {"node-name": node})
        if was_running:
            with contextlib.suppress(BackendError):
                await _cont_after_migration(qmp)
        if old_bw is not None:
            with contextlib.suppress(BackendError):
                await qmp.execute("migrate-set-parameters", {"max-bandwidth": old_bw})
        raise


# --- the control channel between two hosts --------------------------------------------------


class _Lost(BackendError):
    """The peer closed the control connection (or it broke)."""


class _Refused(BackendError):
    """The peer answered with an error message."""


class _Channel:
    """Newline-delimited JSON messages over one TCP connection.

    The socket is non-blocking and read with the running loop's
    ``sock_recv``, so the channel outlives the event loops of the steps
    between its messages (each toolstack step runs its own).
    """

    def __init__(self, sock: socket.socket, peer: str) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.peer = peer
        self._buf = bytearray()
        self._eof = False

    async def send(self, msg: Mapping[str, object]) -> None:
        data = json.dumps(msg, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n"
        try:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)
        except OSError as err:
            raise _Lost(f"control connection to {self.peer}: cannot send "
                        f"{msg.get('msg')!r}: {err.strerror or err}") from err

    async def quiet_send(self, msg: Mapping[str, object]) -> None:
        """Send, best effort: for an error report whose peer may be gone already."""
        with contextlib.suppress(BackendError):
            await asyncio.wait_for(self.send(msg), 5)

    async def recv(self, timeout: float, what: str) -> dict[str, Any]:
        """The next message; ``what`` says what is awaited, for the errors.

        :raise _Refused: the peer sent an error message.
        :raise _Lost: the connection closed or broke.
        :raise BackendError: nothing within ``timeout``, or not a message.
        """
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            if self._eof:
                raise _Lost(f"{self.peer} closed the control connection "
                            f"(while waiting for {what})")
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 16),
                                               max(0.0, deadline - time.monotonic()))
            except TimeoutError as err:
                raise BackendError(f"{self.peer}: nothing within {timeout:g}s while waiting "
                                   f"for {what}") from err
            except OSError as err:
                raise _Lost(f"control connection to {self.peer} broke (while waiting for "
                            f"{what}): {err.strerror or err}") from err
            if not chunk:
                self._eof = True
            self._buf += chunk
            if len(self._buf) > _HEADER_MAX:
                raise BackendError(f"{self.peer}: a control message longer than "
                                   f"{_HEADER_MAX} bytes")
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        try:
            msg = json.loads(line.decode("utf-8", "surrogateescape"))
        except (ValueError, RecursionError):
            msg = None
        if not isinstance(msg, dict) or not isinstance(msg.get("msg"), str):
            raise BackendError(f"{self.peer}: {line[:200]!r} is not a control message "
                               f"(while waiting for {what})")
        if msg["msg"] == "error":
            raise _Refused(f"{self.peer}: {msg.get('error')}")
        return msg

    def closed(self) -> bool:
        """True when the peer has closed the connection (looked at without waiting)."""
        if self._eof:
            return True
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return not data


def _expect(msg: Mapping[str, Any], kind: str, peer: str) -> None:
    if msg.get("msg") != kind:
        raise BackendError(f"{peer}: sent {msg.get('msg')!r}, expected {kind!r}")


def _migrate_remote(ts: Toolstack, rec: DomainRecord, paths: RuntimePaths, dest: str,
                    disk_paths: tuple[DiskMove, ...], overlays: tuple[DiskMove, ...],
                    vdevs: Sequence[str], nodes: Mapping[str, str], *, live: bool,
                    paused: bool, max_bandwidth: int | None, timeout: float,
                    progress: Progress | None, started: float, token: str
                    ) -> dict[str, Any]:
    """The sending side of the control protocol; QEMU's final ``query-migrate``."""
    host, port = _parse_dest(dest)
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError as err:
        raise BackendError(f"migrate {rec.name}: cannot reach a receiver at {dest}: "
                           f"{err.strerror or err}; {rec.name} still runs here") from err
    try:
        return _run(_sender(_Channel(sock, dest), rec, paths, host, disk_paths, overlays,
                            nodes, live=live, paused=paused, max_bandwidth=max_bandwidth,
                            timeout=timeout, progress=progress, started=started,
                            token=token))
    finally:
        sock.close()


async def _sender(ch: _Channel, rec: DomainRecord, paths: RuntimePaths, host: str,
                  disk_paths: tuple[DiskMove, ...], overlays: tuple[DiskMove, ...],
                  nodes: Mapping[str, str], *, live: bool, paused: bool,
                  max_bandwidth: int | None, timeout: float, progress: Progress | None,
                  started: float, token: str) -> dict[str, Any]:
    what = f"migrate {rec.name} to {ch.peer}"
    here = f"{rec.name} still runs here"
    async with Qmp.open(paths.qmp) as qmp:
        state = await _status(qmp)
        header = SaveHeader(
            name=rec.name, uuid=rec.uuid, config_text=rec.config_text,
            config_path=rec.config_path,
            qemu_version=_qemu_version(await qmp.execute("query-version")),
            created=time.time(), state="running" if state == "running" else "paused",
            disk_paths=disk_paths, overlays=overlays,
        )
        sizes = await _node_sizes(qmp, nodes) if nodes else {}
        try:
            hello = await ch.recv(30, "the receiver's greeting")
            if hello.get("msg") != "hello" or hello.get("protocol") != _PROTOCOL:
                raise BackendError(f"{ch.peer} is not a xenlab receiver speaking protocol "
                                   f"{_PROTOCOL} (it said {str(hello)[:200]})")
            await ch.send({"msg": "prepare", "token": token, "header": header_to_json(header),
                           "with_storage": bool(nodes), "disk_sizes": sizes})
            listening = await ch.recv(_START_TIMEOUT, "the destination QEMU to listen")
            _expect(listening, "listening", ch.peer)
            dport, nbd = listening.get("port"), listening.get("nbd_port")
            if not isinstance(dport, int) or (nodes and not isinstance(nbd, int)):
                raise BackendError(f"{ch.peer}: no port to send to in {listening}")
        except BackendError as err:
            raise BackendError(f"{what}: {err}; {here}") from err
        where = f"{_uri_host(host)}:{dport}"
        try:
            sent = await _send(paths, rec.name, where, host, nbd if nodes else None, nodes,
                               live=live, max_bandwidth=max_bandwidth, timeout=timeout,
                               progress=progress, started=started, qmp=qmp)
        except BaseException as err:
            await ch.quiet_send({"msg": "abort", "error": str(err)})
            if isinstance(err, BackendError):
                raise BackendError(f"{what} failed; {here} [{err}]") from err
            raise
        # The stream is complete: the source is stopped, the destination holds
        # the guest, paused.  Until "go" is sent, the source may take it back.
        try:
            _expect(await ch.recv(_START_TIMEOUT, "the destination's report that it "
                                                  "loaded the stream"), "loaded", ch.peer)
            await asyncio.sleep(0)
            if ch.closed():
                raise _Lost(f"{ch.peer} closed the control connection before it was "
                            "told to start the guest")
            await ch.send({"msg": "go", "paused": paused})
        except BaseException as err:
            await ch.quiet_send({"msg": "abort", "error": str(err)})
            with contextlib.suppress(BackendError):
                await _resume_in(qmp, sent)
            if isinstance(err, BackendError):
                raise BackendError(f"{what}: the destination did not take the guest "
                                   f"({err}); {rec.name} was resumed here") from err
            raise
        # Past the point of no return: the destination may be running the guest.
        try:
            done = await ch.recv(_START_TIMEOUT, "the destination's report")
            _expect(done, "resumed", ch.peer)
        except _Refused as err:
            # A receiver that fails here has killed its QEMU before saying so.
            with contextlib.suppress(BackendError):
                await _resume_in(qmp, sent)
            raise BackendError(f"{what}: the destination could not start the guest "
                               f"({err}); {rec.name} was resumed here") from err
        except BackendError as err:
            raise BackendError(
                f"{what}: the control connection broke after the destination was told to "
                f"start the guest ({err}); it may run there: {rec.name} is left paused "
                f"here. Check the destination, then `xenlab vm unpause {rec.name}` here "
                f"only if it does not run there, else `xenlab vm destroy {rec.name}` here"
            ) from err
        await _quit_in(qmp)
        return sent.info


async def _resume_in(qmp: Qmp, sent: _Sent) -> None:
    if sent.old_bw is not None:
        with contextlib.suppress(BackendError):
            await qmp.execute("migrate-set-parameters", {"max-bandwidth": sent.old_bw})
    if sent.was_running:
        await _cont_after_migration(qmp)


def new_token() -> str:
    """A new one-time migration token for :func:`serve_receive` (256 random bits)."""
    return secrets.token_urlsafe(32)


def read_token(path: Path) -> str:
    """The token in file ``path`` (its text, blanks around it dropped).

    :raise XenlabError: the file cannot be read or holds no token.
    """
    try:
        token = Path(path).read_text(encoding="utf-8", errors="surrogateescape").strip()
    except OSError as err:
        raise XenlabError(f"{path}: cannot read the migration token: "
                          f"{err.strerror or err}") from err
    if not token:
        raise XenlabError(f"{path}: empty, expected a migration token")
    return token


def serve_receive(
    ts: Toolstack, listen: str, *, token: str, trust_peer_config: bool = False,
    overrides: Sequence[str] = (), paused: bool = False,
    timeout: float = 600.0, accept_timeout: float | None = None,
    on_listen: Callable[[str, int], None] | None = None, image: object | None = None,
) -> DomainRecord:
    """Receive one domain migrated with :func:`migrate` to ``HOST:PORT``; its record; xl
    migrate-receive.

    Listens on ``listen`` (port 0: any; ``on_listen(host, port)`` is told
    the port bound) for a source whose "prepare" carries ``token`` (see
    "Who may migrate here" in the module docstring: other connections are
    told why and closed, and the wait goes on), then follows the protocol
    of the module docstring: the domain's config comes from the source
    (``overrides`` appended, e.g. other disk paths), a QEMU is started
    listening for the stream on a port of its own, and the guest is resumed
    (unless ``paused`` here or asked by the source) only when the source
    says go, after which the source quits.  Settings in :data:`_UNTRUSTED`
    are refused from the source unless ``trust_peer_config`` (the
    ``overrides`` may set them).  Listen on a private network only: the
    token travels in clear, and the ports QEMU opens take any connection.

    CLI: ``xenlab vm receive --listen HOST:PORT [--token-file FILE]
    [--trust-peer-config] [-p] [key=value ...]``.

    :raise XenlabError: an empty ``token``; the config cannot run here or
        sets what is not taken from the wire (the source is told and its
        domain goes on).
    :raise BackendError: no source with the token connected within
        ``accept_timeout``, the source went away or gave up, or QEMU could
        not load or resume the guest; no QEMU and no record is left (the
        source resumes its guest).
    """
    if not token:
        raise XenlabError("receive: an empty migration token would let anyone in")
    host, port = _parse_dest(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        srv = socket.create_server((host, port), family=family)
    except OSError as err:
        raise BackendError(f"receive: cannot listen on {listen}: {err.strerror or err}"
                           ) from err
    deadline = None if accept_timeout is None else time.monotonic() + accept_timeout
    with srv:
        if on_listen is not None:
            on_listen(host, int(srv.getsockname()[1]))
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            srv.settimeout(left)
            try:
                conn, addr = srv.accept()
            except TimeoutError as err:
                raise BackendError(f"receive on {listen}: no source with the token connected "
                                   f"within {accept_timeout:g}s") from err
            ch = _Channel(conn, f"{_uri_host(str(addr[0]))}:{addr[1]}")
            try:
                prep = _run(_hello(ch, token))
                break
            except BackendError as err:
                # Not our source (or not one yet): tell it, hang up, wait on.
                _log.warning("receive on %s: refused %s: %s", listen, ch.peer, err)
                if not isinstance(err, _Lost):
                    _run(ch.quiet_send({"msg": "error", "error": str(err)}))
                conn.close()
    with conn:
        return _serve(ts, ch, prep, host, overrides, paused, timeout, image,
                      trust_peer_config)


# Settings a receiver does not take from its peer's config (unless it trusts
# the peer): what they would make this host do.
_UNTRUSTED: Mapping[str, str] = {
    "device_model_args": "QEMU arguments, passed as they are",
    "device_model_args_hvm": "QEMU arguments, passed as they are",
    "device_model_args_pv": "QEMU arguments, passed as they are",
    "bootloader": "a program run here",
    "vif script=": "an executable run here",
    "vga_rom": "a host file read into the guest",
    "pci": "a host PCI device handed to the guest",
}


def _untrusted(config_text: str, overrides: Sequence[str], source: str) -> list[str]:
    """The settings of :data:`_UNTRUSTED` that ``config_text`` (from the peer) makes the
    domain run with, ``overrides`` (the receiver's own) applied; each with why.

    A setting the overrides replace is the receiver's, not the peer's; one the
    overrides leave as the peer said it (a ``vif +=`` keeps the peer's
    entries) is the peer's.
    """
    peer, _ = config_from_text(config_text, source)
    final = config_from_text(config_text, source, overrides)[0] if overrides else peer
    found: list[str] = []
    for key in ("device_model_args", "device_model_args_hvm", "device_model_args_pv",
                "vga_rom"):
        value = final.extra.get(key)
        if value is not None and value == peer.extra.get(key):
            found.append(key)
    if final.bootloader is not None and final.bootloader == peer.bootloader:
        found.append("bootloader")
    if any(v.script is not None and v in peer.vifs for v in final.vifs):
        found.append("vif script=")
    if any(p in peer.pcis for p in final.pcis):
        found.append("pci")
    return [f"{key} ({_UNTRUSTED[key]})" for key in found]


def _serve(ts: Toolstack, ch: _Channel, prep: Mapping[str, Any], host: str,
           overrides: Sequence[str], paused: bool, timeout: float, image: object | None,
           trust_peer_config: bool) -> DomainRecord:
    try:
        header = header_from_json(prep.get("header"), f"migration from {ch.peer}")
        if not trust_peer_config:
            risky = _untrusted(header.config_text, overrides,
                               header.config_path or f"migration from {ch.peer}")
            if risky:
                raise XenlabError(
                    f"migration from {ch.peer}: the config of {header.name!r} sets "
                    f"{'; '.join(risky)}: not taken from the source; the receiver may set "
                    "them itself (key=value overrides), or trust the source "
                    "(--trust-peer-config)")
        sizes = prep.get("disk_sizes") or {}
        if not isinstance(sizes, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in sizes.values()):
            raise BackendError(f"{ch.peer}: disk_sizes {str(sizes)[:200]} is not "
                               "vdev: bytes")
        inc = receive(ts, header.config_text, 0, host=host, overrides=overrides,
                      with_storage=bool(prep.get("with_storage")), disk_sizes=sizes,
                      config_path=header.config_path, uuid=header.uuid, image=image,
                      disk_paths=header.disk_paths, overlays=header.overlays)
    except XenlabError as err:
        _run(ch.quiet_send({"msg": "error", "error": str(err)}))
        raise
    paths = ts.paths(inc.record)
    try:
        go = _run(_await_stream(ch, paths, inc, timeout))
        rec = inc.record
        with ts.store.lock(rec.domid):
            still = bool(paused or go.get("paused"))
            _run(_resume_session(paths, inc, still))
            rec = ts.store.update(replace(rec, state="paused" if still else "running",
                                          extra=inc.extra))
    except BaseException as err:
        failed = _receive_failed(ts, inc, err)
        # Only now, with the QEMU gone, may the source take its guest back.
        _run(ch.quiet_send({"msg": "error", "error": str(failed)}))
        if failed is err:
            raise
        raise failed from err
    try:
        _run(ch.send({"msg": "resumed", "domid": rec.domid, "state": rec.state}))
    except BackendError as err:
        # It runs here now; the source, without the report, keeps its copy paused.
        _log.warning("receive %s: %s; the source was not told that it runs here", rec.name,
                     err)
    return rec


async def _hello(ch: _Channel, token: str) -> dict[str, Any]:
    """Greet a new connection; its "prepare" once it has shown ``token``.

    :raise BackendError: it said something else, nothing, or not the token.
    """
    await ch.send({"msg": "hello", "protocol": _PROTOCOL})
    prep = await ch.recv(_AUTH_TIMEOUT, "the source's domain")
    _expect(prep, "prepare", ch.peer)
    got = prep.get("token")
    if not isinstance(got, str) or not got:
        raise BackendError("no migration token in the request: give the one the receiver "
                           "printed (xenlab vm migrate ... --token TOKEN)")
    if not hmac.compare_digest(got.encode("utf-8", "surrogateescape"),
                               token.encode("utf-8", "surrogateescape")):
        raise BackendError("wrong migration token: give the one the receiver printed")
    return prep


async def _await_stream(ch: _Channel, paths: RuntimePaths, inc: Incoming,
                        timeout: float) -> dict[str, Any]:
    """Tell the source where to send, wait for the stream, report it, wait for "go"."""
    await ch.send({"msg": "listening", "port": inc.port, "nbd_port": inc.nbd_port})
    name = inc.record.name
    async with Qmp.open(paths.qmp) as qmp:
        with qmp.listen("MIGRATION") as watch:
            stream = asyncio.ensure_future(_wait_migration(
                qmp, watch, f"incoming {name}", timeout, None, time.monotonic(),
                check_first=True))
            # The source says nothing until the stream is done, unless it gives up
            # or vanishes: either ends the wait at once.
            control = asyncio.ensure_future(ch.recv(timeout, "the stream"))
            try:
                await asyncio.wait({stream, control}, return_when=asyncio.FIRST_COMPLETED)
                if not stream.done():
                    msg = control.result()
                    raise BackendError(f"the source {ch.peer} gave up: "
                                       f"{msg.get('error') or msg.get('msg')}")
                stream.result()
            except _Lost as err:
                raise BackendError(f"the source went away in the middle of the stream "
                                   f"({err})") from err
            finally:
                for fut in (stream, control):
                    if not fut.done():
                        fut.cancel()
                        with contextlib.suppress(asyncio.CancelledError, BackendError):
                            await fut
        status = await _status(qmp)
        if status not in ("paused", "prelaunch"):
            raise BackendError(f"the incoming QEMU is {status!r} after the stream, "
                               "expected 'paused'")
    await ch.send({"msg": "loaded"})
    go = await ch.recv(_START_TIMEOUT, "permission to start the guest")
    if go.get("msg") == "abort":
        raise BackendError(f"the source {ch.peer} gave up: {go.get('error')}")
    _expect(go, "go", ch.peer)
    return go


async def _resume_session(paths: RuntimePaths, inc: Incoming, paused: bool) -> None:
    async with Qmp.open(paths.qmp) as qmp:
        await _resume_incoming(qmp, inc, paused)


# --- block jobs of a storage migration ------------------------------------------------------


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


async def _del_stale_nodes(qmp: Qmp, names: Sequence[str]) -> None:
    """Delete nodes ``names`` left in QEMU by an earlier migration (no job uses them)."""
    listed = await qmp.execute("query-named-block-nodes", {"flat": True})
    have = {str(n.get("node-name")) for n in listed if isinstance(n, dict)
            } if isinstance(listed, list) else set()
    for node in names:
        if node in have:
            with contextlib.suppress(BackendError):
                await qmp.execute("blockdev-del", {"node-name": node})


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
