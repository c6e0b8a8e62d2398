"""vm.migrate, vm.saverestore, vm.receiver: save, restore and migration on real guests (TCG).

The save image format alone is tested in test_saveimage.py; the receiver
against hostile peers in test_receive_hostile.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from tests.aio import sync
from tests.clirun import run_cli
from tests.vm.guests import answers, boot, clear, config_text, sh, wait_ready
from xenlab.errors import BackendError, FormatError, StateError, XenlabError
from xenlab.vm import snapshot
from xenlab.vm.backends.qemu.rundir import wait_gone
from xenlab.vm.domain import SHUTOFF, Toolstack
from xenlab.vm.migration import image as saveimage
from xenlab.vm.migration import sender as mig
from xenlab.vm.migration.image import ChecksumError, CutShortError
from xenlab.vm.migration.sender import SaveHeader
from xenlab.vm.mirror import mirror
from xenlab.vm.runtime import DISK_PATHS
from xenlab.vm.store import DomainRecord, is_alive

HEADER = SaveHeader(
    name="g1", uuid="0b5e0a4c-1111-2222-3333-444455556666",
    config_text='name = "g1"\nmemory = 128\n# ünïcode\n', config_path="/etc/xen/g1.cfg",
    qemu_version="7.2.22", created=1700000000.5, state="running",
)
STREAM = b"QEVM\x00\x00\x00\x03rest of the stream"


# --- real guests ----------------------------------------------------------------------

def _disk_spec(path: Path) -> str:
    return f'disk = [ "format=qcow2,vdev=xvda,access=rw,target={path}" ]'


@pytest.fixture
def hosts(tmp_path: Path, guest_image: object) -> Iterator[tuple[Toolstack, Toolstack]]:
    """Two toolstacks with their own state directories: two hosts on one machine."""
    a, b = Toolstack(tmp_path / "host-a"), Toolstack(tmp_path / "host-b")
    yield a, b
    for t in (a, b):
        clear(t)


def _uptime_and_boot(ts: Toolstack, name: str) -> tuple[float, str]:
    up, boot = sh(ts, name, "cat /proc/uptime /proc/sys/kernel/random/boot_id").split("\n")[:2]
    return float(up.split()[0]), boot


def _compare(a: Path, b: Path) -> subprocess.CompletedProcess[str]:
    # -U: a running QEMU holds the image lock; the guest is paused while we compare.
    return subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)],
                          capture_output=True, text=True, check=False)


@pytest.mark.integration
def test_save_restore_continues_the_guest(hosts: tuple[Toolstack, Toolstack],
                                          tmp_path: Path) -> None:
    ts, _ = hosts
    boot(ts, tmp_path, "g1")
    sh(ts, "g1", "echo A > /mnt/disk/marker && sync")
    before, boot_id = _uptime_and_boot(ts, "g1")
    image = tmp_path / "g1 saved.img"  # a space: no shell anywhere
    t0 = time.monotonic()
    header = sync(mig.save(ts, "g1", image))
    save_s = time.monotonic() - t0
    assert ts.store.list() == []  # xl save: the domain is gone
    assert header.name == "g1" and header.state == "running" and header.version == 4
    assert mig.read_header(image)[0] == header
    _, summary = saveimage.check_image(image)  # every frame and the trailer
    assert summary is not None and summary.end == image.stat().st_size
    assert "xenlab.mkfs=1" in header.config_text
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []
    at_save = tmp_path / "at-save.qcow2"
    shutil.copyfile(tmp_path / "g1.qcow2", at_save)

    t0 = time.monotonic()
    rec = sync(mig.restore(ts, image, paused=True))
    restore_s = time.monotonic() - t0
    assert rec.state == "paused" and is_alive(rec) and rec.uuid == header.uuid
    assert sync(ts.status(ts.get("g1"))).state == "paused"
    cmp = _compare(at_save, tmp_path / "g1.qcow2")
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    sync(ts.unpause("g1"))
    after, boot_after = _uptime_and_boot(ts, "g1")
    assert boot_after == boot_id  # the same boot of the same kernel, not a new one
    assert after > before
    assert sh(ts, "g1", "cat /mnt/disk/marker") == "A\n"
    print(f"save {save_s:.2f}s restore {restore_s:.2f}s")


@pytest.mark.integration
def test_save_restore_of_a_mirrored_domain(hosts: tuple[Toolstack, Toolstack],
                                           tmp_path: Path) -> None:
    """The header says where the disk went; restore runs on it, the disk as saved."""
    ts, _ = hosts
    boot(ts, tmp_path, "g1")
    moved = tmp_path / "moved.qcow2"
    sync(mirror(ts, "g1", "xvda", moved))
    sh(ts, "g1", "echo M > /mnt/disk/marker && sync")
    image = tmp_path / "g1.save"
    header = sync(mig.save(ts, "g1", image))
    assert header.disk_paths == (mig.DiskMove("xvda", str(moved), "qcow2"),)
    assert header.version == 4 and mig.read_header(image)[0] == header
    (kept,) = ts.store.list()  # shut off: only its record says where the disk is
    assert kept.state == SHUTOFF and not is_alive(kept)
    at_save = tmp_path / "at-save.qcow2"
    shutil.copyfile(moved, at_save)
    rec = sync(mig.restore(ts, image, paused=True))
    assert rec.domid == kept.domid and rec.state == "paused"
    assert rec.extra[DISK_PATHS] == {"xvda": {"file": str(moved), "format": "qcow2"}}
    assert _block_files(ts, "g1") == {"xvda": str(moved)}
    cmp = _compare(at_save, moved)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    sync(ts.unpause("g1"))
    # Read from the disk, not from the page cache the memory brought back.
    assert sh(ts, "g1", "echo 3 > /proc/sys/vm/drop_caches; cat /mnt/disk/marker") == "M\n"


@pytest.mark.integration
def test_failed_save_leaves_the_domain_running(hosts: tuple[Toolstack, Toolstack],
                                               tmp_path: Path) -> None:
    ts, _ = hosts
    boot(ts, tmp_path, "g1")
    rec = ts.get("g1")
    not_a_dir = tmp_path / "plain-file"
    not_a_dir.write_text("")
    with pytest.raises(XenlabError, match="cannot write the save image"):
        sync(mig.save(ts, "g1", not_a_dir / "g1.save"))
    assert ts.get("g1") == rec and sync(ts.status(rec)).state == "running"
    # A save that fails once the stream runs (here: out of time at 1 MiB/s)
    # cancels it, resumes the guest and removes the partial file.
    with pytest.raises(BackendError, match="not completed within"):
        sync(mig.save(ts, "g1", tmp_path / "slow.save", timeout=0.5, max_bandwidth=1 << 20))
    assert sorted(p.name for p in tmp_path.iterdir() if "save" in p.name) == []
    assert ts.get("g1") == rec and sync(ts.status(rec)).state == "running"
    assert answers(ts, "g1")
    # keep_running (xl save -c): the image is made and the domain carries on.
    sync(mig.save(ts, "g1", tmp_path / "g1.save", keep_running=True))
    assert sync(ts.status(ts.get("g1"))).state == "running"
    assert sh(ts, "g1", "echo still") == "still\n"
    # Its image cannot be restored while the domain runs: the name is taken.
    with pytest.raises(XenlabError, match="already exists"):
        sync(mig.restore(ts, tmp_path / "g1.save"))
    assert [r.domid for r in ts.store.list()] == [rec.domid]

    # Restoring what is not a xenlab image, or a cut-off one, fails and leaves nothing.
    sync(ts.destroy("g1"))
    junk = tmp_path / "junk.save"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(FormatError, match="not a xenlab save image"):
        sync(mig.restore(ts, junk))
    data = (tmp_path / "g1.save").read_bytes()
    cut = tmp_path / "cut.save"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CutShortError, match=rf"cut.save\+{len(data) // 2:#x}: trailer: cut "
                                            "short: the data ends here"):
        sync(mig.restore(ts, cut))
    assert ts.store.list() == []
    assert not Path(rec.rundir).exists()
    # ...and the whole image still restores.
    sync(mig.restore(ts, tmp_path / "g1.save"))
    assert sh(ts, "g1", "echo back") == "back\n"


class _QemuWatch(threading.Thread):
    """Every QEMU process started for the domain ``uuid`` while it watches (polled)."""

    def __init__(self, uuid: str) -> None:
        super().__init__(daemon=True)
        self.needle = b"-uuid\0" + uuid.encode() + b"\0"
        self.seen: set[int] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"qemu-system" in argv and self.needle in argv:
                    self.seen.add(int(pid))
            time.sleep(0.002)

    def __enter__(self) -> _QemuWatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()


def _unchecked(image: Path, version: int = 3) -> bytes:
    """The version 4 image at ``image`` as a version ``version`` xenlab wrote it: no
    checksums, QEMU's stream right behind the header and nothing after it."""
    layout, summary = saveimage.check_image(image)
    assert summary is not None
    stream = image.read_bytes()[layout.stream_offset: layout.stream_offset + summary.bytes]
    return saveimage.pack_header(replace(layout.header, version=version)) + stream


@pytest.mark.integration
def test_damaged_images_never_start_a_qemu_and_old_ones_still_restore(
        hosts: tuple[Toolstack, Toolstack], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Item 4: a flipped byte in any section, a cut, junk appended: refused naming the
    offset, before any QEMU starts or any record is made; versions 1-3 still restore."""
    ts, _ = hosts
    boot(ts, tmp_path, "g1")
    sh(ts, "g1", "echo A > /mnt/disk/marker && sync")
    image = tmp_path / "g1.save"
    header = sync(mig.save(ts, "g1", image))
    data = image.read_bytes()
    layout, summary = saveimage.check_image(image)
    assert summary is not None and summary.chunks > 3
    first = layout.stream_offset
    size = len(data)
    table = first + summary.bytes
    middle = first + (summary.chunks // 2) * saveimage.CHUNK + 1000
    cases: list[tuple[str, bytes, type[Exception], str]] = []
    damages: list[tuple[str, int, type[Exception], str]] = [
        ("header", 40, ChecksumError, "header checksum"),
        ("header checksum", first - 3, ChecksumError, "header checksum"),
        ("stream", middle, ChecksumError, f"stream chunk {summary.chunks // 2}"),
        ("checksum table", table + 13, ChecksumError, "checksum table"),
        ("trailer", size - 20, ChecksumError, "trailer"),
    ]
    for name, pos, kind, field in damages:
        bad = bytearray(data)
        bad[pos] ^= 0x04
        cases.append((name, bytes(bad), kind, field))
    cases.append(("cut", data[: size - 100], CutShortError, "trailer"))
    cases.append(("cut in the stream", data[: first + 5 * saveimage.CHUNK], CutShortError,
                  "trailer"))
    cases.append(("junk", data + b"\0junk", FormatError, "end"))
    damaged = tmp_path / "damaged.save"
    for name, raw, kind, field in cases:
        damaged.write_bytes(raw)
        with _QemuWatch(header.uuid) as watch, pytest.raises(kind) as e:
            sync(mig.restore(ts, damaged))
        err = e.value
        assert isinstance(err, FormatError) and err.field.startswith(field), (name, str(err))
        assert str(err).startswith(f"{damaged}+0x"), str(err)
        assert watch.seen == set(), name
        assert ts.store.list() == [], name
    # The CLI says it in one line, exit 1.
    damaged.write_bytes(cases[2][1])
    code, _, err_text = run_cli_capture(["vm", "restore", str(damaged), "--state-dir",
                                         str(ts.state_dir)])
    assert code == 1 and err_text.count("\n") == 1 and "stream chunk" in err_text, err_text
    assert "Traceback" not in err_text

    # Version 3 (and 1) images carry no checksums: restored, with a warning.
    old = tmp_path / "old.save"
    old.write_bytes(_unchecked(image))
    assert saveimage.read_image(old).seed is None
    with caplog.at_level("WARNING"):
        rec = sync(mig.restore(ts, old))
    assert "version 3 save image carries no checksums" in caplog.text
    assert rec.state == "running" and sh(ts, "g1", "cat /mnt/disk/marker") == "A\n"
    sync(ts.destroy("g1"))
    # A cut one reaches QEMU, which refuses it; its own words are quoted.
    old.write_bytes(_unchecked(image)[: size // 2])
    with pytest.raises(BackendError, match="could not load the saved state") as cut_err:
        sync(mig.restore(ts, old))
    assert "load of migration failed" in str(cut_err.value), str(cut_err.value)
    assert ts.store.list() == []
    # ...and the version 4 image itself still restores.
    sync(mig.restore(ts, image))
    assert sh(ts, "g1", "cat /mnt/disk/marker") == "A\n"


def run_cli_capture(args: Sequence[str]) -> tuple[int, str, str]:
    """``xenlab ARGS`` in its own process: (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-c", "from xenlab.cli.main import main; main()",
                           *args], capture_output=True, text=True, check=False, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_restore_reads_a_raw_disk_as_raw(tmp_path: Path) -> None:
    """Item 5: a save --snapshot image restored onto a disk the config calls raw, whose
    content is a qcow2 header naming a host file as backing: refused, the file never opened
    (a FIFO nobody reads), nothing started."""
    from tests.vm.test_receive_hostile import _qcow2_header

    fifo = tmp_path / "host-secret"
    os.mkfifo(fifo)
    disk = tmp_path / "g1.raw"
    disk.write_bytes(_qcow2_header(str(fifo)).ljust(1 << 20, b"\0"))
    header = replace(HEADER, config_text=config_text("g1", disk, fmt="raw"), disk_snapshots=(
        saveimage.DiskSnapshot("xvda", str(disk), "xenlab-save-1"),))
    image = tmp_path / "g1.save"
    head = saveimage.pack_header(header)
    with image.open("w+b") as f:  # read too: the hasher reads what was written
        f.write(head + b"QEVM" + bytes(100))
        f.flush()
        saveimage.StreamHasher(f.fileno(), len(head), seed=saveimage.header_seed(head)).finish()
    ts = Toolstack(tmp_path / "state")
    with pytest.raises(XenlabError, match=r"disk xvda \(.*g1.raw\) is raw, so it holds no "
                                          r"snapshot 'xenlab-save-1'"):
        sync(mig.restore(ts, image))
    with pytest.raises(OSError):  # ENXIO: nobody opened the FIFO for reading
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert ts.store.list() == []


@pytest.mark.integration
def test_live_migration_shared_disk(hosts: tuple[Toolstack, Toolstack], tmp_path: Path) -> None:
    src, dst = hosts
    boot(src, tmp_path, "g1")
    sh(src, "g1", "echo A > /mnt/disk/marker && sync")
    before, boot_id = _uptime_and_boot(src, "g1")
    sync(snapshot.create_snapshot(src, "g1", "s1", disk_only=True))
    # Snapshot records cannot go to another host yet: refused, nothing changes.
    with pytest.raises(StateError, match="1 snapshot"):
        sync(mig.migrate(src, "g1", "127.0.0.1:4444", token="t"))
    old = src.get("g1")
    assert sync(src.status(old)).state == "running"
    seen: list[mig.MigrationProgress] = []
    res = sync(mig.migrate(src, "g1", dst, progress=seen.append))
    assert src.store.list() == [] and not is_alive(old)
    assert not Path(old.rundir).exists()
    assert res.record is not None and res.record.state == "running" and is_alive(res.record)
    assert res.record.uuid == old.uuid
    assert sync(dst.status(dst.get("g1"))).state == "running"
    assert res.ram_transferred > 0 and res.total_ms > 0
    assert seen and all(p.phase == "memory" for p in seen)
    after, boot_after = _uptime_and_boot(dst, "g1")
    assert boot_after == boot_id and after > before
    assert sh(dst, "g1", "cat /mnt/disk/marker") == "A\n"
    # On shared disks the snapshot tree follows the domain to the other toolstack.
    tree = snapshot.list_snapshots(dst, "g1")
    assert [n.snapshot.name for n in tree.roots] == ["s1"] and tree.current == "s1"
    print(f"migrate {res.seconds:.2f}s downtime {res.downtime_ms} ms")
    # And back, not live (paused for the copy, virsh migrate without --live).
    back = sync(mig.migrate(dst, "g1", src, live=False))
    assert back.record is not None and sync(src.status(back.record)).state == "running"
    assert dst.store.list() == [] and _uptime_and_boot(src, "g1")[1] == boot_id


@pytest.mark.integration
def test_live_migration_with_storage(hosts: tuple[Toolstack, Toolstack],
                                     tmp_path: Path) -> None:
    src, dst = hosts
    boot(src, tmp_path, "g1")
    sh(src, "g1", "echo A > /mnt/disk/marker && sync")
    before, boot_id = _uptime_and_boot(src, "g1")
    target = tmp_path / "host-b-g1.qcow2"  # does not exist: made blank, same size
    seen: list[mig.MigrationProgress] = []
    res = sync(mig.migrate(src, "g1", dst, with_storage=True, paused=True,
                      dest_overrides=[_disk_spec(target)], progress=seen.append))
    assert res.disks == ("xvda",) and src.store.list() == []
    assert {p.phase for p in seen} >= {"storage", "memory"}
    assert sync(dst.status(dst.get("g1"))).state == "paused"
    cmp = _compare(tmp_path / "g1.qcow2", target)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    sync(dst.unpause("g1"))
    after, boot_after = _uptime_and_boot(dst, "g1")
    assert boot_after == boot_id and after > before
    # The guest now writes to the destination's copy only.
    sh(dst, "g1", "cat /mnt/disk/marker && echo B > /mnt/disk/marker2 && sync")
    assert _compare(tmp_path / "g1.qcow2", target).returncode == 1
    print(f"migrate --with-storage {res.seconds:.2f}s")


@pytest.mark.integration
def test_destination_killed_mid_migration(hosts: tuple[Toolstack, Toolstack],
                                          tmp_path: Path) -> None:
    src, dst = hosts
    boot(src, tmp_path, "g1")
    rec = src.get("g1")
    killed: list[int] = []

    def kill_destination(p: mig.MigrationProgress) -> None:
        if p.phase == "memory" and p.transferred > 0 and not killed:
            (incoming,) = dst.store.list()
            assert incoming.pid is not None
            os.kill(incoming.pid, signal.SIGKILL)
            killed.append(incoming.pid)

    with pytest.raises(BackendError, match=r"destination QEMU went away.*still runs here"):
        # 16 MiB/s: the stream takes seconds, so the kill lands in the middle.
        sync(mig.migrate(src, "g1", dst, max_bandwidth=16 << 20, progress=kill_destination))
    assert killed
    assert src.get("g1") == rec and is_alive(rec)
    assert sync(src.status(rec)).state == "running"
    assert dst.store.list() == []
    assert answers(src, "g1")

    # The same while the disks are being mirrored: the mirror fails, and the
    # source is left with no job and no NBD node, and its own disk.
    killed.clear()

    def kill_during_mirror(p: mig.MigrationProgress) -> None:
        kill_destination(replace(p, phase="memory", transferred=1))

    target = tmp_path / "host-b-g1.qcow2"
    with pytest.raises(BackendError, match=r"destination QEMU went away.*still runs here"):
        sync(mig.migrate(src, "g1", dst, with_storage=True, dest_overrides=[_disk_spec(target)],
                    progress=kill_during_mirror))
    assert killed and dst.store.list() == [] and not target.exists()
    assert src.get("g1") == rec and sync(src.status(rec)).state == "running"
    assert asyncio.run(src.qmp_execute(rec, "query-block-jobs")) == []
    nodes = asyncio.run(src.qmp_execute(rec, "query-named-block-nodes", {"flat": True}))
    assert isinstance(nodes, list)
    assert sorted(n["node-name"] for n in nodes) == ["xvda-file", "xvda-fmt"]

    # Nothing is left in a half state: the same domain migrates fine now.
    res = sync(mig.migrate(src, "g1", dst))
    assert res.record is not None and sync(dst.status(res.record)).state == "running"


@pytest.mark.integration
def test_storage_migration_again_after_the_destination_failed(
        hosts: tuple[Toolstack, Toolstack], tmp_path: Path) -> None:
    """The destination dies once the stream is sent: the source resumes without the NBD
    nodes it added, so the next storage migration can add them again."""
    src, dst = hosts
    boot(src, tmp_path, "g1")
    sh(src, "g1", "echo A > /mnt/disk/marker && sync")
    rec = src.get("g1")
    target = tmp_path / "host-b-g1.qcow2"
    killed: list[int] = []

    def kill_after_the_stream(p: mig.MigrationProgress) -> None:
        if p.phase == "memory" and p.status == "completed" and not killed:
            (incoming,) = dst.store.list()
            assert incoming.pid is not None
            os.kill(incoming.pid, signal.SIGKILL)
            killed.append(incoming.pid)

    with pytest.raises(BackendError, match="destination QEMU exited"):
        sync(mig.migrate(src, "g1", dst, with_storage=True, dest_overrides=[_disk_spec(target)],
                    progress=kill_after_the_stream))
    assert killed and dst.store.list() == []
    assert src.get("g1") == rec and sync(src.status(rec)).state == "running"
    nodes = asyncio.run(src.qmp_execute(rec, "query-named-block-nodes", {"flat": True}))
    assert isinstance(nodes, list)
    assert sorted(n["node-name"] for n in nodes) == ["xvda-file", "xvda-fmt"]
    # A node of that name left by an older xenlab is cleared before the next one.
    asyncio.run(src.qmp_execute(rec, "blockdev-add",
                                {"driver": "null-co", "node-name": "mig-xvda"}))
    sh(src, "g1", "echo B > /mnt/disk/marker && sync")
    res = sync(mig.migrate(src, "g1", dst, with_storage=True, paused=True,
                      dest_overrides=[_disk_spec(target)]))
    assert res.disks == ("xvda",) and src.store.list() == []
    cmp = _compare(tmp_path / "g1.qcow2", target)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    sync(dst.unpause("g1"))
    assert sh(dst, "g1", "cat /mnt/disk/marker") == "B\n"


class _Receiver(threading.Thread):
    """``serve_receive`` on its own toolstack (its own thread: SQLite objects stay in theirs)."""

    def __init__(self, state_dir: Path, overrides: Sequence[str] = (),
                 accept_timeout: float = 60, disk_dir: Path | None = None) -> None:
        super().__init__(daemon=True)
        self.state_dir, self.overrides, self.disk_dir = state_dir, overrides, disk_dir
        self.accept_timeout = accept_timeout
        self.token = mig.new_token()
        self.port: queue.Queue[int] = queue.Queue()
        self.result: DomainRecord | BaseException | None = None

    def run(self) -> None:
        try:
            self.result = sync(mig.serve_receive(
                Toolstack(self.state_dir), "127.0.0.1:0", token=self.token,
                overrides=self.overrides, accept_timeout=self.accept_timeout, timeout=120,
                disk_dir=self.disk_dir,
                on_listen=lambda _h, p: self.port.put(p)))
        except BaseException as err:  # handed to the test
            self.result = err
            self.port.put(0)

    def address(self) -> str:
        return f"127.0.0.1:{self.port.get(timeout=30)}"

    def outcome(self) -> DomainRecord | BaseException | None:
        self.join(60)
        assert not self.is_alive()
        return self.result


def _block_files(ts: Toolstack, name: str) -> dict[str, str]:
    """vdev -> the file QEMU has open for it (query-block)."""
    blocks = asyncio.run(ts.qmp_execute(ts.get(name), "query-block"))
    assert isinstance(blocks, list)
    return {b["qdev"].split("/")[3]: b["inserted"]["file"] for b in blocks
            if b.get("inserted") and b.get("qdev", "").startswith("/machine/peripheral/")}


@pytest.mark.integration
def test_two_host_migration_over_the_control_channel(hosts: tuple[Toolstack, Toolstack],
                                                     tmp_path: Path) -> None:
    """`receive --listen` and `migrate DOM HOST:PORT` on two state dirs, a mirrored disk."""
    src, dst = hosts
    boot(src, tmp_path, "g1")
    moved = tmp_path / "moved.qcow2"
    sync(mirror(src, "g1", "xvda", moved))  # the config still names g1.qcow2
    sh(src, "g1", "echo A > /mnt/disk/marker && sync")
    before, boot_id = _uptime_and_boot(src, "g1")
    # Shared disks: the destination runs on the mirror's target, and says so (the
    # source may name files in tmp_path only because the receiver allows it).
    recv = _Receiver(dst.state_dir, disk_dir=tmp_path)
    recv.start()
    res = sync(mig.migrate(src, "g1", recv.address(), token=recv.token))
    got = recv.outcome()
    assert isinstance(got, DomainRecord), got
    assert res.record is None and src.store.list() == [] and res.ram_transferred > 0
    assert got.state == "running" and dst.get("g1") == got and is_alive(got)
    assert got.extra[DISK_PATHS] == {"xvda": {"file": str(moved), "format": "qcow2"}}
    assert _block_files(dst, "g1") == {"xvda": str(moved)}
    after, boot_after = _uptime_and_boot(dst, "g1")
    assert boot_after == boot_id and after > before
    assert sh(dst, "g1", "cat /mnt/disk/marker") == "A\n"

    # And back with storage, onto a new disk the receiver's override names:
    # the source mirrors from the node its disk runs on now (the pivot's).
    copy = tmp_path / "host-a-copy.qcow2"
    recv = _Receiver(src.state_dir, [_disk_spec(copy)])
    recv.start()
    back = sync(mig.migrate(dst, "g1", recv.address(), with_storage=True, paused=True,
                       token=recv.token))
    got = recv.outcome()
    assert isinstance(got, DomainRecord), got
    assert back.disks == ("xvda",) and dst.store.list() == [] and got.state == "paused"
    assert DISK_PATHS not in got.extra and _block_files(src, "g1") == {"xvda": str(copy)}
    cmp = _compare(moved, copy)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    sync(src.unpause("g1"))
    assert sh(src, "g1", "cat /mnt/disk/marker") == "A\n"
    assert _uptime_and_boot(src, "g1")[1] == boot_id


@pytest.mark.integration
def test_receiver_killed_after_the_stream_the_source_resumes(
        hosts: tuple[Toolstack, Toolstack], tmp_path: Path) -> None:
    src, dst = hosts
    boot(src, tmp_path, "g1")
    rec = src.get("g1")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from xenlab.cli.main import main; main()", "vm", "receive",
         "--listen", "127.0.0.1:0", "--state-dir", str(dst.state_dir),
         "--disk-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line + proc.stderr.read()
        address, token = line.split()[2], line.split()[-1]
        assert line.split()[3] == "token" and len(token) >= 43  # 256 bits, base64
        killed: list[str] = []

        def kill_receiver(p: mig.MigrationProgress) -> None:
            # QEMU has sent everything: the receiving host dies (the command and
            # its QEMU) before it says "loaded" or hears "go".  (A QEMU that
            # outlived its receiver would hold the shared disk's locks: the
            # source could not resume, and says so.)
            if p.status == "completed" and not killed:
                (incoming,) = dst.store.list()
                proc.kill()
                proc.wait()
                assert incoming.pid is not None
                os.kill(incoming.pid, signal.SIGKILL)
                # A host that died holds no locks: wait until its QEMU is gone (under
                # load the kernel takes a while to tear a killed QEMU down, and until
                # then its image locks stand).
                assert wait_gone(incoming.pid, 30)
                killed.append(p.status)

        with pytest.raises(BackendError, match=r"did not take the guest .*g1 was resumed here"):
            sync(mig.migrate(src, "g1", address, progress=kill_receiver, token=token))
        assert killed
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert src.get("g1") == rec and sync(src.status(rec)).state == "running"
    assert answers(src, "g1")
    # What the killed receiver left is undone by the next command there.
    assert sync(dst.list()) == [] and dst.store.list() == []


@pytest.mark.integration
def test_receiver_refuses_and_cleans_up_after_a_vanished_source(
        hosts: tuple[Toolstack, Toolstack], tmp_path: Path) -> None:
    _, dst = hosts

    recv = _Receiver(dst.state_dir, disk_dir=tmp_path)
    recv.start()
    address = recv.address()

    def source(prepare: dict[str, object]) -> tuple[socket.socket, list[dict[str, object]]]:
        host, port = address.split(":")
        ctl = socket.create_connection((host, int(port)), timeout=30)
        f = ctl.makefile("rwb")
        said = [json.loads(f.readline())]
        f.write(json.dumps({**prepare, "token": recv.token}).encode() + b"\n")
        f.flush()
        said.append(json.loads(f.readline()))
        return ctl, said

    # A header that is not one: the receiver says why, keeps nothing, and waits on.
    ctl, said = source({"msg": "prepare", "header": {"version": 3}})
    assert said[0] == {"msg": "hello", "protocol": 2}
    assert said[1]["msg"] == "error" and "header.name" in str(said[1]["error"])
    ctl.close()
    assert recv.is_alive() and dst.store.list() == []

    # A source that vanishes in the middle of the stream: the incoming QEMU is
    # killed and no record is left.
    header = mig.header_to_json(replace(
        HEADER, config_text=config_text("g1", tmp_path / "g1.qcow2"), config_path=""))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "g1.qcow2"),
                    "32M"], check=True)
    ctl, said = source({"msg": "prepare", "header": header, "with_storage": False,
                        "disk_sizes": {}})
    assert said[1]["msg"] == "listening" and said[1]["nbd_port"] is None
    (incoming,) = dst.store.list()
    assert incoming.state == "incoming" and is_alive(incoming)
    data = socket.create_connection(("127.0.0.1", int(str(said[1]["port"]))), timeout=30)
    data.sendall(b"QEVM\x00\x00\x00\x03" + os.urandom(4096)[:100])
    ctl.close()  # the source is gone
    data.close()
    err = recv.outcome()
    assert isinstance(err, BackendError), err
    assert "source" in str(err) or "exited" in str(err)
    assert dst.store.list() == [] and not is_alive(incoming)
    assert not Path(incoming.rundir).exists()


def test_bad_destinations_are_refused(tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    ts = Toolstack(tmp_path / "st")
    st = ("--state-dir", str(tmp_path / "st"))
    (tmp_path / "empty").write_text("\n")
    code, _, err = run_cli(capsys, "vm", "migrate", "g1", "127.0.0.1:4444", "--token-file",
                           str(tmp_path / "empty"), *st)
    assert code == 1 and "empty, expected a migration token" in err
    code, _, err = run_cli(capsys, "vm", "receive", "--listen", "127.0.0.1:0", "--token-file",
                           str(tmp_path / "missing"), *st)
    assert code == 1 and "missing: cannot read" in err
    code, _, err = run_cli(capsys, "vm", "migrate", "g1", "127.0.0.1:4444", "--token", "t",
                           "--token-file", str(tmp_path / "empty"), *st)
    assert code == 2 and "not both" in err
    with pytest.raises(XenlabError, match="no domain"):
        sync(mig.migrate(ts, "nope", "127.0.0.1:4444", token="t"))
    with pytest.raises(XenlabError, match="wants the token it printed"):
        sync(mig.migrate(ts, "nope", "127.0.0.1:4444"))
    with pytest.raises(XenlabError, match="expected HOST:PORT"):
        sync(mig.serve_receive(ts, "nowhere", token="t"))
    with pytest.raises(XenlabError, match="empty migration token"):
        sync(mig.serve_receive(ts, "127.0.0.1:0", token=""))
    cfg = config_text("g9", tmp_path / "missing.qcow2")
    with pytest.raises(XenlabError, match="needs a blank image of the source's size"):
        sync(mig.receive(ts, cfg, 0, with_storage=True))
    assert ts.store.list() == []


# --- save --snapshot ------------------------------------------------------------------


def _tags(disk: Path) -> set[str]:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(disk)],
                                     capture_output=True, text=True, check=True).stdout)
    return {s["name"] for s in info.get("snapshots", ())}


@pytest.mark.integration
def test_save_snapshot_restores_the_disk_with_the_memory(
        hosts: tuple[Toolstack, Toolstack], tmp_path: Path) -> None:
    ts, _ = hosts
    boot(ts, tmp_path, "g1")
    disk = tmp_path / "g1.qcow2"
    sh(ts, "g1", "echo A > /mnt/disk/marker && sync")
    before, boot_id = _uptime_and_boot(ts, "g1")
    image = tmp_path / "g1.save"
    t0 = time.monotonic()
    header = sync(mig.save(ts, "g1", image, snapshot=True))
    save_s = time.monotonic() - t0
    (snap,) = header.disk_snapshots
    assert (snap.vdev, snap.file) == ("xvda", str(disk))
    assert snap.name.startswith("xenlab-save-") and _tags(disk) == {snap.name}
    assert mig.read_header(image)[0] == header and ts.store.list() == []
    at_save = tmp_path / "at-save.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(disk), str(at_save)], check=True)

    # The domain is booted again from its config and writes B over A.
    sync(ts.create(tmp_path / "g1.cfg"))
    wait_ready(ts, "g1")
    assert sh(ts, "g1", "cat /mnt/disk/marker") == "A\n"
    sh(ts, "g1", "echo B > /mnt/disk/marker && echo B > /mnt/disk/later && sync")
    assert sync(ts.shutdown("g1")) == "shutdown"
    assert _compare(at_save, disk).returncode == 1  # the disk moved on

    t0 = time.monotonic()
    rec = sync(mig.restore(ts, image, paused=True))
    restore_s = time.monotonic() - t0
    assert rec.state == "paused"
    cmp = _compare(at_save, disk)  # the disk is back where the memory left it
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert _tags(disk) == {snap.name}  # kept: the image can be restored again
    sync(ts.unpause("g1"))
    after, boot_after = _uptime_and_boot(ts, "g1")
    assert boot_after == boot_id and after > before
    # Read from the disk, not from the page cache the memory brought back.
    assert sh(ts, "g1", "echo 3 > /proc/sys/vm/drop_caches; cat /mnt/disk/marker; "
                         "ls /mnt/disk") == "A\nlost+found\nmarker\n"
    print(f"save --snapshot {save_s:.2f}s restore {restore_s:.2f}s")


@pytest.mark.integration
def test_save_snapshot_refusals_and_failures(hosts: tuple[Toolstack, Toolstack],
                                             tmp_path: Path) -> None:
    ts, _ = hosts
    raw = tmp_path / "data.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "8M"], check=True)
    cfg = tmp_path / "g1.cfg"
    cfg.write_text(config_text("g1", tmp_path / "g1.qcow2") + f"""\
disk = [ "format=qcow2,vdev=xvda,access=rw,target={tmp_path / 'g1.qcow2'}",
         "format=raw,vdev=xvdb,access=rw,target={raw}" ]
""")
    sync(ts.create(cfg, create_disks="32M"))
    rec = ts.get("g1")
    with pytest.raises(XenlabError, match=r"disk xvdb .*data.raw\) is raw; only qcow2"):
        sync(mig.save(ts, "g1", tmp_path / "g1.save", snapshot=True))
    assert not (tmp_path / "g1.save").exists() and _tags(tmp_path / "g1.qcow2") == set()
    assert ts.get("g1") == rec and sync(ts.status(rec)).state == "running"
    sync(ts.destroy("g1"))

    boot(ts, tmp_path, "g1")
    rec = ts.get("g1")
    # A save that fails after the snapshot was taken deletes it again.
    with pytest.raises(BackendError, match="not completed within"):
        sync(mig.save(ts, "g1", tmp_path / "slow.save", snapshot=True, timeout=0.5,
                 max_bandwidth=1 << 20))
    assert _tags(tmp_path / "g1.qcow2") == set() and not (tmp_path / "slow.save").exists()
    assert ts.get("g1") == rec and sync(ts.status(rec)).state == "running"
    # keep_running: the domain carries on, the snapshot is in the disk.
    header = sync(mig.save(ts, "g1", tmp_path / "g1.save", snapshot=True, keep_running=True))
    assert _tags(tmp_path / "g1.qcow2") == {header.disk_snapshots[0].name}
    assert answers(ts, "g1")
    sync(ts.destroy("g1"))
    # Restoring onto a disk without that snapshot is refused before anything changes.
    other = tmp_path / "other.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), "32M"], check=True)
    with pytest.raises(XenlabError, match=r"has no snapshot 'xenlab-save-.*not the disk"):
        sync(mig.restore(ts, tmp_path / "g1.save", overrides=[_disk_spec(other)]))
    assert ts.store.list() == []
    # A disk held by another QEMU cannot be reverted: the restore fails cleanly.
    boot(hosts[1], tmp_path, "g1")
    with pytest.raises(BackendError, match=r"qemu-img snapshot .*lock"):
        sync(mig.restore(ts, tmp_path / "g1.save"))
    assert ts.store.list() == []


def test_local_storage_migration_without_other_disk_paths_is_refused(tmp_path: Path) -> None:
    """It started the destination and then failed with "Block node is read-only"."""
    src, dst = Toolstack(tmp_path / "a"), Toolstack(tmp_path / "b")
    with pytest.raises(XenlabError, match="needs other disk paths for the destination"):
        sync(mig.migrate(src, "any", dst, with_storage=True))
    assert dst.store.list() == []
