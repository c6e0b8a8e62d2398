"""What the toolstack tests do to real guests, written once: :func:`boot` and its helpers.

A config for the project's guest image (:func:`write_config`), booting it
on a new disk and waiting for the image's ``XENLAB-READY`` console line
(:func:`boot`, :func:`wait_ready`), shell commands through the guest agent
(:func:`sh` and the marker file on the guest's disk), and clearing a
toolstack's domains (:func:`clear`, used by the ``ts`` fixture in
conftest.py).  The CLI in-process is :func:`tests.clirun.run_cli`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.aio import sync
from xenlab.errors import XenlabError
from xenlab.vm.domain import SHUTOFF, Toolstack


def config_text(name: str, disk: Path | str, *, fmt: str = "qcow2", memory: int = 192,
                maxmem: int | None = 256, vcpus: int = 2, maxvcpus: int | None = None,
                mkfs: bool = True, tail: str = "") -> str:
    """An xl config for the guest image with one writable disk; ``tail`` is appended as is.

    ``mkfs`` asks the image to make a file system on the disk and mount it
    at /mnt/disk (where the marker file lives).
    """
    lines = [f'name = "{name}"', 'type = "hvm"', f"memory = {memory}"]
    if maxmem is not None:
        lines.append(f"maxmem = {maxmem}")
    lines.append(f"vcpus = {vcpus}")
    if maxvcpus is not None:
        lines.append(f"maxvcpus = {maxvcpus}")
    lines.append(f'disk = [ "format={fmt},vdev=xvda,access=rw,target={disk}" ]')
    if mkfs:
        lines.append('extra = "xenlab.mkfs=1"')
    return "\n".join(lines) + "\n" + tail


def write_config(tmp_path: Path, name: str, *, stem: str | None = None, fmt: str = "qcow2",
                 **kw: object) -> Path:
    """Write ``<stem>.cfg`` for domain ``name`` on disk ``<stem>.<fmt>`` in ``tmp_path``.

    ``stem`` defaults to ``name``; the other keywords go to :func:`config_text`.
    """
    stem = stem or name
    cfg = tmp_path / f"{stem}.cfg"
    cfg.write_text(config_text(name, tmp_path / f"{stem}.{fmt}", fmt=fmt, **kw))  # type: ignore[arg-type]
    return cfg


def wait_ready(ts: Toolstack, name: str, timeout: float = 60, *, count: int = 1) -> None:
    """Wait until the guest's console shows ``XENLAB-READY`` ``count`` times (once per boot)."""
    log = ts.paths(ts.get(name)).console_log
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and log.read_bytes().count(b"XENLAB-READY") >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"guest not ready: {log.read_bytes()[-2000:]!r}")


def boot(ts: Toolstack, tmp_path: Path, name: str, *, overrides: Sequence[str] = (),
         timeout: float = 60, **kw: object) -> Path:
    """Create domain ``name`` on a new 32 MiB disk and wait for the guest; its config.

    The config ``<name>.cfg`` is (re)written with :func:`write_config` (``kw``).
    """
    cfg = write_config(tmp_path, name, **kw)
    sync(ts.create(cfg, list(overrides), create_disks="32M"))
    wait_ready(ts, name, timeout)
    return cfg


def sh(ts: Toolstack, name: str, script: str) -> str:
    """Run ``sh -c script`` in the guest; its stdout (it must exit 0)."""
    code, out, err = sync(ts.exec(name, ["sh", "-c", script]))
    assert code == 0, err
    return out.decode()


def answers(ts: Toolstack, name: str, timeout: float = 20.0) -> bool:
    """True once the guest runs a command and its output comes back (``echo alive``).

    Right after a guest resumes from a stopped or cancelled migration stream, an
    agent command has come back once in a CI run with exit 0 and no output (under
    investigation, docs/backend.md); a guest that runs answers the next time.
    """
    deadline = time.monotonic() + timeout
    while True:
        if sh(ts, name, "echo alive") == "alive\n":
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def write_marker(ts: Toolstack, name: str, marker: str) -> None:
    """Write ``marker`` to /mnt/disk/marker in the guest and make it durable.

    One ``sync`` is not enough on the image's journal-less ext2: sync(2) flushes the
    disk's cache before it writes the inode and bitmap blocks, so a QEMU killed after it
    (``vm destroy`` is a power cut) may lose a fresh overlay's qcow2 mappings the guest
    never flushed, and the restarted guest reads the old inode from the base (a helper
    found it: 1 loss in 30 under load; 0 in 300 with a second sync).  The second sync's
    flush covers what the first wrote.
    """
    sh(ts, name, f"echo {marker} > /mnt/disk/marker && sync && sync")


def read_marker(ts: Toolstack, name: str) -> str:
    """What /mnt/disk/marker in the guest says."""
    return sh(ts, name, "cat /mnt/disk/marker").strip()


def uptime(ts: Toolstack, name: str) -> float:
    """The guest's uptime in seconds (its own clock)."""
    return float(sh(ts, name, "cat /proc/uptime").split()[0])




def clear(ts: Toolstack) -> None:
    """Destroy every live or stale domain of ``ts`` and forget the shut-off ones."""
    for rec in ts.store.list():
        try:
            if rec.state == SHUTOFF:
                sync(ts.undefine(rec.name))
            else:
                sync(ts.destroy(rec.name))
        except XenlabError:
            # What a killed command left may be undone on the way ("is gone"),
            # or a domain be shut off by it: try once more, then it must be gone.
            with contextlib.suppress(XenlabError):
                sync(ts.destroy(str(rec.domid)))
            with contextlib.suppress(XenlabError):
                sync(ts.undefine(str(rec.domid)))
            if any(r.domid == rec.domid and r.uuid == rec.uuid for r in ts.store.list()):
                raise


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at ``where`` (a file system that fills up); skips where none can be mounted."""
    import subprocess

    import pytest

    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def offline_domain(where: Path, fmt: str, *, state: Path | None = None,
                   mode: int | None = None) -> tuple[Toolstack, Path]:
    """A shut-off domain "off" (a store record, no QEMU) on a new 8 MiB disk in ``where``
    (of ``mode`` if given), its state in ``state`` (default ``where / "state"``)."""
    import subprocess
    import uuid as _uuid

    from xenlab.vm.store import DomainRecord

    disk = where / f"off.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(disk), "8M"], check=True)
    if mode is not None:
        disk.chmod(mode)
    ts = Toolstack(state or where / "state")
    ts.store.add_domain(DomainRecord(
        domid=0, name="off", uuid=str(_uuid.UUID(int=1)), config_path=str(where / "off.cfg"),
        config_text=config_text("off", disk, fmt=fmt, maxmem=None), rundir="", pid=None,
        state=SHUTOFF, created=time.time(), accel="tcg",
    ))
    return ts, disk

