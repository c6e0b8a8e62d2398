"""How each kind of disk is snapshotted: :class:`DiskSnapshotBackend` and the built-in backends.

A backend works on one disk at a time (a :class:`SnapDisk`) and on the JSON
entry it planned for a snapshot; :data:`BACKENDS` maps ``(style, format,
path kind)`` to one, with ``"*"`` for anything, and :func:`register_backend`
adds more (LVM thin, btrfs, ZFS: see docs/snapshots.md for the contract and
how).  Built in: ``qcow2-internal`` (qemu-img when shut off),
``qcow2-external`` (an overlay ``<disk>.<tag>.qcow2``) and ``raw-copy``
(``cp --reflink`` to ``<disk>@<tag>``, shut-off domains only).  On a running
domain a backend works through the hypervisor's
:class:`~xenlab.vm.backend.LiveSnapshots` session and finds the image by its
file name, so it works after a restart renamed the nodes; nothing here removes a
file the hypervisor still writes to.

Files next to a disk: the disk's directory may be writable by others, so
every file made there is new and this user's own, mode 0600, and nothing
already at its name (a symbolic link, dangling or not) is followed or
replaced.  Overlays made with qemu-img, revert overlays and raw copies
appear whole or not at all (``qemuimg.new_image``: a temporary file linked
to its name exclusively); a live overlay, which QEMU makes by name inside
its transaction, is claimed empty first (``qemuimg.claim``).  Names are
checked with ``os.path.lexists`` (``Path.exists`` misses a dangling link),
and a failed or discarded snapshot removes only regular files of this user
(``qemuimg.remove_own``).
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from xenlab.atomic import FileWriteError
from xenlab.errors import BackendError, ConflictError, StateError, XenlabError
from xenlab.vm import qemuimg
from xenlab.vm.backend import DiskSnap, LiveSnapshots
from xenlab.vm.qemuimg import ImageFileError
from xenlab.vm.store import SnapshotKind, SnapshotRecord

__all__ = [
    "BACKENDS",
    "JOB_TIMEOUT",
    "PATH_KINDS",
    "SNAPSHOT_NAME",
    "DiskSnapshotBackend",
    "Qcow2External",
    "Qcow2Internal",
    "RawCopy",
    "SnapDisk",
    "backend_for",
    "backing_chain",
    "backing_file",
    "copy_whole",
    "entry_backend",
    "glob_escape",
    "node_of",
    "path_kind",
    "qemu_uses",
    "register_backend",
]

# Jobs that copy the guest's memory: generous under TCG, bounded all the same.
JOB_TIMEOUT = 300.0
# One disk's snapshot taken with the guest paused: a command, not a job.
_TAKE_TIMEOUT = 30.0
# Revert overlays <overlay>~N.qcow2 tried before giving up.
_MAX_REVERTS = 10_000

# A name is a QEMU snapshot tag and part of a file name: keep it plain, and
# never all digits, which qemu-img would take for a snapshot id.  '~' and
# '@' are left out on purpose: revert overlays and raw copies use them, so
# their file names never collide with a snapshot's.
SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}")


@dataclass(frozen=True, slots=True)
class SnapDisk:
    """A writable disk as the domain has it now, as a backend sees it.

    ``file`` is the image the domain runs on (the config's file, or the
    newest overlay), ``format`` its format, ``node`` QEMU's format node for it
    as last recorded, ``base`` the config's file, ``path_kind`` what
    :data:`PATH_KINDS` says ``file`` is.
    """

    vdev: str
    file: str
    format: str
    node: str
    base: str
    path_kind: str


class DiskSnapshotBackend(Protocol):
    """How snapshots of one kind of disk are made, reverted and deleted (module docstring)."""

    name: str
    layered: bool

    def can_snapshot(self, disk: SnapDisk, *, live: bool) -> str | None:
        """``None`` if this backend can snapshot ``disk`` now, else why not."""
        ...

    def plan(self, disk: SnapDisk, tag: str) -> dict[str, Any]:
        """The JSON-ready entry for snapshot ``tag`` of ``disk``; nothing is made yet."""
        ...

    def action(self, entry: Mapping[str, Any], tag: str, node: str) -> DiskSnap | None:
        """This disk's part of a live snapshot taken at one instant, or ``None``."""
        ...

    async def create(self, entry: Mapping[str, Any], tag: str, live: LiveSnapshots | None) -> None:
        """Take the snapshot (``live`` is ``None`` when the domain is shut off)."""
        ...

    async def revert(self, entry: Mapping[str, Any], tag: str) -> dict[str, str] | None:
        """Bring the disk back to ``tag`` (QEMU is not running); a new top, or ``None``."""
        ...

    async def delete(self, entry: Mapping[str, Any], tag: str, live: LiveSnapshots | None,
                     top: str) -> str | None:
        """Remove ``tag``; the disk's new top image if it changed, else ``None``."""
        ...

    async def discard(self, entry: Mapping[str, Any], tag: str, live: LiveSnapshots | None) -> None:
        """Undo whatever a failed ``create`` of ``tag`` left."""
        ...

    async def list(self, disk: SnapDisk) -> set[str]:
        """The tags of this backend's snapshots found on ``disk``."""
        ...


def _block_or_file(path: str) -> str | None:
    try:
        return "block" if stat.S_ISBLK(os.stat(path).st_mode) else "file"
    except OSError:
        return "file"


# Probes that name what a disk's path is; the first that answers wins, so
# a more specific probe (say "lvm-thin") goes in front with PATH_KINDS.insert(0, ...).
PATH_KINDS: list[Callable[[str], str | None]] = [_block_or_file]

BACKENDS: dict[tuple[str, str, str], DiskSnapshotBackend] = {}


def register_backend(style: str, fmt: str, path_kind: str,
                     backend: DiskSnapshotBackend) -> None:
    """Use ``backend`` for ``style`` snapshots of ``fmt`` disks on ``path_kind`` ("*": any)."""
    if style not in ("internal", "external"):
        raise ValueError(f"style must be 'internal' or 'external', not {style!r}")
    BACKENDS[(style, fmt, path_kind)] = backend


def path_kind(path: str) -> str:
    for probe in PATH_KINDS:
        kind = probe(path)
        if kind:
            return kind
    return "file"


def backend_for(disk: SnapDisk, style: str) -> DiskSnapshotBackend | None:
    """The backend registered for ``disk`` and ``style``, most specific first."""
    for key in ((style, disk.format, disk.path_kind), (style, disk.format, "*"),
                (style, "*", disk.path_kind), (style, "*", "*")):
        if key in BACKENDS:
            return BACKENDS[key]
    return None


def _by_name(name: str) -> DiskSnapshotBackend:
    for b in BACKENDS.values():
        if b.name == name:
            return b
    raise StateError(f"no snapshot backend named {name!r} is registered here")


def entry_backend(s: SnapshotRecord, entry: Mapping[str, Any]) -> DiskSnapshotBackend:
    name = entry.get("backend")
    if name is None:  # rows written before backends were recorded
        name = "qcow2-internal" if s.kind is SnapshotKind.INTERNAL else "qcow2-external"
    return _by_name(str(name))


async def node_of(live: LiveSnapshots, file: str, fallback: str) -> str:
    """The backend's name for image ``file`` (QEMU renames nodes when it restarts)."""
    return (await live.node_and_tags(file, fallback))[0]


async def qemu_uses(live: LiveSnapshots, file: str) -> bool:
    """True when the running domain has image ``file`` open (it may be writing to it)."""
    node, _ = await live.node_and_tags(file, "")
    return bool(node)


async def backing_file(path: str, fmt: str = "qcow2") -> str | None:
    """The backing file of image ``path`` (absolute, real), or None."""
    found = await qemuimg.backing_of(path, fmt)
    return None if found is None else found[0]


async def backing_chain(path: str, fmt: str) -> list[str]:
    """``path`` and every image below it, real paths; [] when ``path`` is missing."""
    return await qemuimg.backing_chain(path, fmt)


class Qcow2Internal:
    """Internal snapshots inside qcow2 images: the live session, or qemu-img when shut off."""

    name = "qcow2-internal"
    layered = False

    def can_snapshot(self, disk: SnapDisk, *, live: bool) -> str | None:
        if disk.format != "qcow2":
            return (f"it is {disk.format}: an internal snapshot needs qcow2 "
                    "(use an external snapshot)")
        return None

    def plan(self, disk: SnapDisk, tag: str) -> dict[str, Any]:
        return {"vdev": disk.vdev, "file": disk.file, "format": disk.format, "node": disk.node}

    def action(self, entry: Mapping[str, Any], tag: str, node: str) -> DiskSnap | None:
        return DiskSnap(node=node, tag=tag)

    async def create(self, entry: Mapping[str, Any], tag: str, live: LiveSnapshots | None) -> None:
        if live is None:
            await qemuimg.snapshot("create", tag, entry["file"])
        else:
            node = await node_of(live, entry["file"], entry["node"])
            await live.take([DiskSnap(node=node, tag=tag)], _TAKE_TIMEOUT)

    async def revert(self, entry: Mapping[str, Any], tag: str) -> dict[str, str] | None:
        await qemuimg.snapshot("apply", tag, entry["file"])
        return None

    async def delete(self, entry: Mapping[str, Any], tag: str, live: LiveSnapshots | None,
                     top: str) -> str | None:
        await self.discard(entry, tag, live)
        return None

    async def discard(self, entry: Mapping[str, Any], tag: str, live: LiveSnapshots | None) -> None:
        f = entry["file"]
        if not Path(f).exists():
            return
        if live is None:
            if tag in await qemuimg.snapshot_tags(f):
                await qemuimg.snapshot("delete", tag, f)
        else:
            node, tags = await live.node_and_tags(f, entry["node"])
            if tag not in (await qemuimg.snapshot_tags(f) if tags is None else tags):
                return
            await live.delete_internal(node, tag, f"delete-{tag}-{entry['vdev']}", JOB_TIMEOUT)

    async def list(self, disk: SnapDisk) -> set[str]:
        return await qemuimg.snapshot_tags(disk.file) if Path(disk.file).exists() else set()


class Qcow2External:
    """External snapshots: a qcow2 overlay ``<disk>.<tag>.qcow2`` takes the writes from then on."""

    name = "qcow2-external"
    layered = True

    def can_snapshot(self, disk: SnapDisk, *, live: bool) -> str | None:
        return None

    def plan(self, disk: SnapDisk, tag: str) -> dict[str, Any]:
        overlay = f"{disk.base}.{tag}.qcow2"
        if os.path.lexists(overlay):
            raise ConflictError("file", str(overlay), f"overlay {overlay} exists already")
        return {"vdev": disk.vdev, "file": disk.file, "format": disk.format, "node": disk.node,
                "overlay": overlay, "overlay_node": f"{disk.vdev}-{tag}"}

    def action(self, entry: Mapping[str, Any], tag: str, node: str) -> DiskSnap | None:
        # QEMU makes the overlay by name, following a link and with its own
        # umask: the name is claimed first (empty, 0600, O_EXCL|O_NOFOLLOW),
        # and QEMU formats this very file.
        _claim_overlay(str(entry["overlay"]))
        return DiskSnap(node=node, tag=tag, overlay=str(entry["overlay"]),
                        overlay_node=str(entry["overlay_node"]))

    async def create(self, entry: Mapping[str, Any], tag: str, live: LiveSnapshots | None) -> None:
        if live is None:
            await qemuimg.create(entry["overlay"], "qcow2", backing=entry["file"],
                           backing_fmt=entry["format"])
            return
        node = await node_of(live, entry["file"], entry["node"])
        try:
            snap = self.action(entry, tag, node)
            assert snap is not None
            await live.take([snap], _TAKE_TIMEOUT)
        except BaseException:
            # Unless the hypervisor switched the disk before its answer was lost: then the
            # overlay is the guest's (the verb records it); unknown without a session.
            try:
                keep = not live.connected or await qemu_uses(live, str(entry["overlay"]))
            except XenlabError:
                keep = True
            if not keep:
                qemuimg.remove_own(entry["overlay"])
            raise

    async def revert(self, entry: Mapping[str, Any], tag: str) -> dict[str, str] | None:
        # A fresh overlay over the frozen images: the snapshot stays revertible.
        # The first free name: a name that is taken (by anything, a link planted
        # there too) is never used, and the new overlay appears whole.
        stem = str(entry["overlay"])[: -len(".qcow2")]
        for n in range(1, _MAX_REVERTS + 1):
            new = f"{stem}~{n}.qcow2"
            if os.path.lexists(new):
                continue
            try:
                await qemuimg.create(new, "qcow2", backing=entry["file"],
                               backing_fmt=entry["format"])
            except ImageFileError as err:
                if err.exists:
                    continue  # taken meanwhile
                raise
            return {"file": new, "node": f"{entry['vdev']}-fmt"}
        raise ConflictError("file", str(stem),
                            f"no free name for a revert overlay: {stem}~1.qcow2 to "
                            f"~{_MAX_REVERTS}.qcow2 are all taken")

    async def delete(self, entry: Mapping[str, Any], tag: str, live: LiveSnapshots | None,
                     top: str) -> str | None:
        frozen = os.path.realpath(entry["file"])
        if (not Path(top).exists() or os.path.realpath(top) == frozen
                or await backing_file(top) != frozen):
            return None  # another branch is current: nothing to merge, layers get pruned
        # The top holds what happened since the snapshot: merge it down.
        if live is None:
            await qemuimg.commit(top, "qcow2", timeout=JOB_TIMEOUT)
        else:
            await live.commit(top, str(entry["overlay_node"]), str(entry["file"]),
                              str(entry["node"]), f"commit-{entry['vdev']}", JOB_TIMEOUT)
        Path(top).unlink(missing_ok=True)
        return str(entry["file"])

    async def discard(self, entry: Mapping[str, Any], tag: str, live: LiveSnapshots | None) -> None:
        overlay = str(entry["overlay"])
        if live is not None and await qemu_uses(live, overlay):
            # The guest writes there: removing it would lose its writes.
            raise BackendError(f"QEMU runs disk {entry['vdev']} on {overlay}: not removed")
        qemuimg.remove_own(overlay)  # never a link someone planted there

    async def list(self, disk: SnapDisk) -> set[str]:
        prefix = Path(disk.base).name + "."
        out = set()
        for p in Path(disk.base).parent.glob(glob_escape(prefix) + "*.qcow2"):
            tag = p.name[len(prefix): -len(".qcow2")]
            if SNAPSHOT_NAME.fullmatch(tag):
                out.add(tag)
        return out


class RawCopy:
    """Raw files of shut-off domains copied to ``<disk>@<tag>`` (reflinked where possible)."""

    name = "raw-copy"
    layered = False

    def can_snapshot(self, disk: SnapDisk, *, live: bool) -> str | None:
        if live:
            return (f"it is {disk.format}: raw copies need the domain shut off "
                    "(use --external for a qcow2 overlay)")
        return None

    def plan(self, disk: SnapDisk, tag: str) -> dict[str, Any]:
        copy = f"{disk.file}@{tag}"
        if os.path.lexists(copy):
            raise ConflictError("file", str(copy), f"snapshot copy {copy} exists already")
        return {"vdev": disk.vdev, "file": disk.file, "format": disk.format, "node": disk.node,
                "copy": copy}

    def action(self, entry: Mapping[str, Any], tag: str, node: str) -> DiskSnap | None:
        return None

    async def create(self, entry: Mapping[str, Any], tag: str, live: LiveSnapshots | None) -> None:
        if live is not None:
            raise StateError("raw copies need the domain shut off")
        await copy_whole(entry["file"], entry["copy"], new=True)

    async def revert(self, entry: Mapping[str, Any], tag: str) -> dict[str, str] | None:
        if not Path(entry["copy"]).exists():
            raise StateError(f"snapshot copy {entry['copy']} is missing")
        await copy_whole(entry["copy"], entry["file"], new=False)
        return None

    async def delete(self, entry: Mapping[str, Any], tag: str, live: LiveSnapshots | None,
                     top: str) -> str | None:
        Path(entry["copy"]).unlink(missing_ok=True)
        return None

    async def discard(self, entry: Mapping[str, Any], tag: str, live: LiveSnapshots | None) -> None:
        copy = Path(entry["copy"])
        qemuimg.remove_own(copy)
        # A copy killed half-way leaves its temporary file (qemuimg.new_image's name).
        for part in copy.parent.glob(glob_escape(f".{copy.name[:200]}.") + "*.part"):
            qemuimg.remove_own(part)

    async def list(self, disk: SnapDisk) -> set[str]:
        prefix = Path(disk.file).name + "@"
        return {p.name[len(prefix):] for p in Path(disk.file).parent.glob(
            glob_escape(prefix) + "*") if SNAPSHOT_NAME.fullmatch(p.name[len(prefix):])}


def glob_escape(s: str) -> str:
    """``s`` with glob's special characters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", s)


async def copy_whole(src: str, dst: str, *, new: bool) -> None:
    """Copy image ``src`` to ``dst`` all at once: reflinked where possible, sparse.

    ``cp`` writes a temporary file beside the destination (``mkstemp``: a
    random name, 0600, ``O_EXCL|O_NOFOLLOW``) through its descriptor
    (``/dev/fd/N``, never by name), which is fsynced and then put in place:

    - ``new`` (a snapshot's copy): linked to ``dst`` exclusively
      (``qemuimg.new_image``): whatever is at ``dst``, a planted link too,
      is refused, never written through; the copy is 0600.
    - not ``new`` (a revert: ``dst`` is the disk): renamed over the disk's
      file (the real one, when the config names it through a link), whose
      permission bits it keeps; the directory is fsynced.

    :raise BackendError: ``cp`` failed (nothing changed, no file left).
    :raise XenlabError: the destination exists (``new``) or cannot be made.
    """
    if new:
        with qemuimg.new_image(dst) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                await _cp_into(src, fd, tmp)
            finally:
                os.close(fd)
        return
    real = Path(os.path.realpath(dst))
    try:
        mode = stat.S_IMODE(os.stat(real).st_mode) & 0o666
    except FileNotFoundError:
        mode = qemuimg.IMAGE_MODE  # the disk is gone: made anew, as xenlab makes images
    try:
        fd, name = tempfile.mkstemp(prefix=f".{real.name[:200]}.", suffix=".part",
                                    dir=real.parent)
    except OSError as err:
        raise FileWriteError(str(real), "cannot copy the snapshot back beside it: "
                                        f"{err.strerror or err}") from err
    tmp = Path(name)
    try:
        await _cp_into(src, fd, tmp)
        os.fchmod(fd, mode)
        st, now = os.fstat(fd), os.lstat(tmp)
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            raise FileWriteError(str(real), f"the temporary copy {tmp} was replaced while it "
                                            "was written (someone else writes to this "
                                            "directory)")
        os.replace(tmp, real)
        dir_fd = os.open(real.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        raise FileWriteError(str(real), "cannot copy the snapshot back: "
                                        f"{err.strerror or err}") from err
    finally:
        os.close(fd)
        qemuimg.remove_own(tmp)


async def _cp_into(src: str, fd: int, tmp: Path) -> None:
    """``cp --reflink=auto --sparse=always`` ``src`` into the file open as ``fd``; fsynced."""
    proc = await asyncio.create_subprocess_exec(
        "cp", "--reflink=auto", "--sparse=always", src, f"/dev/fd/{fd}", pass_fds=(fd,),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        async with asyncio.timeout(JOB_TIMEOUT):
            _, err = await proc.communicate()
    except TimeoutError as exc:
        raise BackendError(f"cp {src} {tmp}: not done within {JOB_TIMEOUT:g}s") from exc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        said = err.decode(errors="replace").strip()
        raise BackendError(f"cp {src} {tmp}: {said or proc.returncode}")
    os.fsync(fd)


def _claim_overlay(path: str) -> None:
    """Claim a live overlay's name for QEMU to fill in; one this verb claimed already is kept.

    ``action`` runs again when the verb falls back from one transaction to
    disk after disk (``create``): an empty regular file of this user at
    ``path`` is then its own claim.
    """
    try:
        qemuimg.claim(path)
    except ImageFileError as err:
        if not err.exists:
            raise
        st = os.lstat(path)
        if not (stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_size == 0):
            raise


register_backend("internal", "qcow2", "*", Qcow2Internal())
register_backend("internal", "raw", "file", RawCopy())
register_backend("external", "*", "file", Qcow2External())
