"""vm.migrate: the save image header, and save/restore/migrate on real guests (TCG)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.clirun import run_cli
from tests.vm.guests import boot, clear, config_text, sh, wait_ready
from xenlab.errors import BackendError, FormatError, StateError, TruncatedError, XenlabError
from xenlab.vm import migrate as mig
from xenlab.vm import snapshot
from xenlab.vm.domain import SHUTOFF, Toolstack
from xenlab.vm.migrate import MAGIC, DiskSnapshot, SaveHeader, pack_header, parse_header
from xenlab.vm.mirror import DISK_PATHS, mirror
from xenlab.vm.store import DomainRecord, is_alive

HEADER = SaveHeader(
    name="g1", uuid="0b5e0a4c-1111-2222-3333-444455556666",
    config_text='name = "g1"\nmemory = 128\n# ünïcode\n', config_path="/etc/xen/g1.cfg",
    qemu_version="7.2.22", created=1700000000.5, state="running",
)
STREAM = b"QEVM\x00\x00\x00\x03rest of the stream"


# --- the header, pure -----------------------------------------------------------------


def test_header_round_trip() -> None:
    raw = pack_header(HEADER) + STREAM
    assert raw.startswith(MAGIC)
    (n,) = struct.unpack_from(">I", raw, 12)
    header, offset = parse_header(raw)
    assert header == HEADER
    assert offset == 16 + n and raw[offset:].startswith(b"QEVM")
    # memoryviews and bytearrays parse the same
    assert parse_header(memoryview(bytearray(raw)))[0] == HEADER


def _fields(**change: object) -> dict[str, object]:
    fields: dict[str, object] = {k: getattr(HEADER, k) for k in SaveHeader.__slots__}
    fields.update(disk_snapshots=[], disk_paths={}, overlays={})
    fields.update(change)
    return fields


def _raw(obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return MAGIC + struct.pack(">I", len(body)) + body


def test_header_errors_name_the_place() -> None:
    raw = pack_header(HEADER) + STREAM
    n = struct.unpack_from(">I", raw, 12)[0]
    with pytest.raises(FormatError, match="not a xenlab save image") as e:
        parse_header(b"\x7fELF" + raw[4:], "f")
    assert (e.value.offset, e.value.field) == (0, "magic")
    with pytest.raises(FormatError, match="not a xenlab save image"):
        parse_header(b"QEVM")
    with pytest.raises(FormatError) as e:
        parse_header(MAGIC + struct.pack(">I", 1 << 30))
    assert (e.value.offset, e.value.field) == (12, "header length")
    with pytest.raises(FormatError, match="not JSON") as e:
        parse_header(MAGIC + struct.pack(">I", 3) + b"{{{" + STREAM)
    assert e.value.offset == 16
    with pytest.raises(FormatError, match="expected an object"):
        parse_header(MAGIC + struct.pack(">I", 2) + b"[]" + STREAM)
    with pytest.raises(FormatError, match="found a int, expected a str") as e:
        parse_header(_raw(_fields(state=7)) + STREAM)
    assert (e.value.offset, e.value.field) == (16, "header.state")
    with pytest.raises(FormatError, match="found nothing") as e:
        parse_header(_raw(_fields(uuid=None)) + STREAM)
    assert e.value.field == "header.uuid"
    with pytest.raises(FormatError, match="newer than this xenlab"):
        parse_header(_raw(_fields(version=9)) + STREAM)
    with pytest.raises(FormatError, match="expected a time"):
        parse_header(_raw(_fields(created=float("inf"))) + STREAM)
    with pytest.raises(FormatError, match="expected QEMU's") as e:
        parse_header(pack_header(HEADER) + b"JUNKJUNK")
    assert (e.value.offset, e.value.field) == (16 + n, "stream magic")


def test_header_v2_disk_snapshots_and_v1_still_read() -> None:
    snaps = (DiskSnapshot("xvda", "/d/a.qcow2", "xenlab-save-1"),
             DiskSnapshot("xvdb", "/d/b.qcow2", "xenlab-save-1"))
    h2 = replace(HEADER, disk_snapshots=snaps)
    assert h2.version == mig.SAVE_VERSION == 3
    assert parse_header(pack_header(h2) + STREAM)[0] == h2
    # A version 1 image (what the previous xenlab wrote) has no such field.
    v1 = {k: getattr(HEADER, k) for k in SaveHeader.__slots__
          if k not in ("disk_snapshots", "disk_paths", "overlays")}
    v1["version"] = 1
    h1, _ = parse_header(_raw(v1) + STREAM)
    assert h1 == replace(HEADER, version=1) and h1.disk_snapshots == ()
    # ...and a version 1 header packs as version 1 wrote it.
    assert parse_header(pack_header(h1) + STREAM)[0] == h1
    with pytest.raises(ValueError):
        pack_header(replace(h2, version=1))
    bad: list[tuple[object, str]] = [
        (None, "header.disk_snapshots"),
        ({"vdev": "xvda"}, "header.disk_snapshots"),
        (["xvda"], "header.disk_snapshots[0]"),
        ([{"vdev": "xvda", "file": "/a", "name": ""}], "header.disk_snapshots[0].name"),
        ([{"vdev": "xvda", "file": 3, "name": "n"}], "header.disk_snapshots[0].file"),
        ([{"vdev": "xvda", "file": "/a", "name": "n"}] * 2, "header.disk_snapshots"),
    ]
    for value, field in bad:
        fields = _fields(version=2)
        del fields["disk_paths"], fields["overlays"]
        fields["disk_snapshots"] = value
        with pytest.raises(FormatError) as e:
            parse_header(_raw(fields) + STREAM)
        assert (e.value.offset, e.value.field) == (16, field), value
    with pytest.raises(FormatError, match="expected one of 1, 2, 3"):
        parse_header(_raw(_fields(version=0)) + STREAM)


def test_header_v3_disk_paths_and_overlays_and_v2_still_read() -> None:
    h3 = replace(HEADER, disk_paths=(mig.DiskMove("xvda", "/d/moved.raw", "raw"),),
                 overlays=(mig.DiskMove("xvdb", "/d/b.s1.qcow2", "qcow2"),))
    raw = pack_header(h3) + STREAM
    assert parse_header(raw)[0] == h3
    body = json.loads(raw[16: 16 + struct.unpack_from(">I", raw, 12)[0]])
    assert body["disk_paths"] == {"xvda": {"file": "/d/moved.raw", "format": "raw"}}
    assert body["overlays"] == {"xvdb": {"file": "/d/b.s1.qcow2", "format": "qcow2"}}
    # The channel carries the same object.
    assert mig.header_from_json(mig.header_to_json(h3)) == h3
    # What version 2 wrote (no such fields) is still read, and written back as such.
    v2 = {k: getattr(HEADER, k) for k in SaveHeader.__slots__
          if k not in ("disk_paths", "overlays")}
    v2.update(version=2, disk_snapshots=[])
    h2, _ = parse_header(_raw(v2) + STREAM)
    assert h2 == replace(HEADER, version=2) and h2.disk_paths == h2.overlays == ()
    assert "disk_paths" not in json.loads(pack_header(h2)[16:])
    with pytest.raises(ValueError):
        pack_header(replace(h3, version=2))
    bad: list[tuple[str, object, str]] = [
        ("disk_paths", None, "header.disk_paths"),
        ("disk_paths", [], "header.disk_paths"),
        ("overlays", {"xvda": "/x"}, "header.overlays.xvda"),
        ("disk_paths", {"xvda": {"file": "", "format": "raw"}}, "header.disk_paths.xvda.file"),
        ("disk_paths", {"xvda": {"file": "/x"}}, "header.disk_paths.xvda.format"),
        ("disk_paths", {"xvda": {"file": "/x", "format": "vmdk"}},
         "header.disk_paths.xvda.format"),
        ("overlays", {"": {"file": "/x", "format": "qcow2"}}, "header.overlays"),
    ]
    for key, value, field in bad:
        fields = _fields(version=3, disk_paths={}, overlays={})
        fields[key] = value
        with pytest.raises(FormatError) as e:
            parse_header(_raw(fields) + STREAM)
        assert (e.value.offset, e.value.field) == (16, field), (key, value)


def test_every_cut_is_truncated() -> None:
    raw = pack_header(HEADER) + b"QEVM"
    for cut in range(len(raw)):
        with pytest.raises(TruncatedError):
            parse_header(raw[:cut])


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_format_errors(data: bytes) -> None:
    for buf in (data, MAGIC + data, MAGIC + struct.pack(">I", len(data)) + data + b"QEVM"):
        with contextlib.suppress(FormatError):
            parse_header(buf)


@given(st.dictionaries(st.sampled_from(["version", "name", "uuid", "config_text", "state",
                                        "config_path", "qemu_version", "created",
                                        "disk_snapshots", "disk_paths", "overlays"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                                 st.text(max_size=5))))
def test_random_json_headers_raise_only_format_errors(obj: dict[str, object]) -> None:
    try:
        h, _ = parse_header(_raw(obj) + b"QEVM")
    except FormatError:
        return
    assert isinstance(h.name, str) and isinstance(h.created, float)


def test_read_header_of_files(tmp_path: Path) -> None:
    good = tmp_path / "good.save"
    good.write_bytes(pack_header(HEADER) + STREAM)
    assert mig.read_header(good)[0] == HEADER
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(FormatError, match=f"{text}.*not a xenlab save image"):
        mig.read_header(text)
    with pytest.raises(XenlabError, match="cannot read"):
        mig.read_header(tmp_path / "missing.save")


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
    header = mig.save(ts, "g1", image)
    save_s = time.monotonic() - t0
    assert ts.store.list() == []  # xl save: the domain is gone
    assert header.name == "g1" and header.state == "running"
    assert mig.read_header(image)[0] == header
    assert "xenlab.mkfs=1" in header.config_text
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []
    at_save = tmp_path / "at-save.qcow2"
    shutil.copyfile(tmp_path / "g1.qcow2", at_save)

    t0 = time.monotonic()
    rec = mig.restore(ts, image, paused=True)
    restore_s = time.monotonic() - t0
    assert rec.state == "paused" and is_alive(rec) and rec.uuid == header.uuid
    assert ts.status(ts.get("g1")).state == "paused"
    cmp = _compare(at_save, tmp_path / "g1.qcow2")
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    ts.unpause("g1")
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
    mirror(ts, "g1", "xvda", moved)
    sh(ts, "g1", "echo M > /mnt/disk/marker && sync")
    image = tmp_path / "g1.save"
    header = mig.save(ts, "g1", image)
    assert header.disk_paths == (mig.DiskMove("xvda", str(moved), "qcow2"),)
    assert header.version == 3 and mig.read_header(image)[0] == header
    (kept,) = ts.store.list()  # shut off: only its record says where the disk is
    assert kept.state == SHUTOFF and not is_alive(kept)
    at_save = tmp_path / "at-save.qcow2"
    shutil.copyfile(moved, at_save)
    rec = mig.restore(ts, image, paused=True)
    assert rec.domid == kept.domid and rec.state == "paused"
    assert rec.extra[DISK_PATHS] == {"xvda": {"file": str(moved), "format": "qcow2"}}
    assert _block_files(ts, "g1") == {"xvda": str(moved)}
    cmp = _compare(at_save, moved)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    ts.unpause("g1")
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
        mig.save(ts, "g1", not_a_dir / "g1.save")
    assert ts.get("g1") == rec and ts.status(rec).state == "running"
    # A save that fails once the stream runs (here: out of time at 1 MiB/s)
    # cancels it, resumes the guest and removes the partial file.
    with pytest.raises(BackendError, match="not completed within"):
        mig.save(ts, "g1", tmp_path / "slow.save", timeout=0.5, max_bandwidth=1 << 20)
    assert sorted(p.name for p in tmp_path.iterdir() if "save" in p.name) == []
    assert ts.get("g1") == rec and ts.status(rec).state == "running"
    assert sh(ts, "g1", "echo alive") == "alive\n"
    # keep_running (xl save -c): the image is made and the domain carries on.
    mig.save(ts, "g1", tmp_path / "g1.save", keep_running=True)
    assert ts.status(ts.get("g1")).state == "running"
    assert sh(ts, "g1", "echo still") == "still\n"
    # Its image cannot be restored while the domain runs: the name is taken.
    with pytest.raises(XenlabError, match="already exists"):
        mig.restore(ts, tmp_path / "g1.save")
    assert [r.domid for r in ts.store.list()] == [rec.domid]

    # Restoring what is not a xenlab image, or a cut-off one, fails and leaves nothing.
    ts.destroy("g1")
    junk = tmp_path / "junk.save"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(FormatError, match="not a xenlab save image"):
        mig.restore(ts, junk)
    data = (tmp_path / "g1.save").read_bytes()
    cut = tmp_path / "cut.save"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BackendError, match="could not load the saved state") as cut_err:
        mig.restore(ts, cut)
    # QEMU's own words (its stderr after -daemonize, kept by -D) are quoted.
    assert "load of migration failed" in str(cut_err.value), str(cut_err.value)
    assert ts.store.list() == []
    assert not ts.paths(rec).rundir.exists()
    # ...and the whole image still restores.
    mig.restore(ts, tmp_path / "g1.save")
    assert sh(ts, "g1", "echo back") == "back\n"


@pytest.mark.integration
def test_live_migration_shared_disk(hosts: tuple[Toolstack, Toolstack], tmp_path: Path) -> None:
    src, dst = hosts
    boot(src, tmp_path, "g1")
    sh(src, "g1", "echo A > /mnt/disk/marker && sync")
    before, boot_id = _uptime_and_boot(src, "g1")
    snapshot.create_snapshot(src, "g1", "s1", disk_only=True)
    # Snapshot records cannot go to another host yet: refused, nothing changes.
    with pytest.raises(StateError, match="1 snapshot"):
        mig.migrate(src, "g1", "127.0.0.1:4444", token="t")
    old = src.get("g1")
    assert src.status(old).state == "running"
    seen: list[mig.MigrationProgress] = []
    res = mig.migrate(src, "g1", dst, progress=seen.append)
    assert src.store.list() == [] and not is_alive(old)
    assert not src.paths(old).rundir.exists()
    assert res.record is not None and res.record.state == "running" and is_alive(res.record)
    assert res.record.uuid == old.uuid
    assert dst.status(dst.get("g1")).state == "running"
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
    back = mig.migrate(dst, "g1", src, live=False)
    assert back.record is not None and src.status(back.record).state == "running"
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
    res = mig.migrate(src, "g1", dst, with_storage=True, paused=True,
                      dest_overrides=[_disk_spec(target)], progress=seen.append)
    assert res.disks == ("xvda",) and src.store.list() == []
    assert {p.phase for p in seen} >= {"storage", "memory"}
    assert dst.status(dst.get("g1")).state == "paused"
    cmp = _compare(tmp_path / "g1.qcow2", target)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    dst.unpause("g1")
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
        mig.migrate(src, "g1", dst, max_bandwidth=16 << 20, progress=kill_destination)
    assert killed
    assert src.get("g1") == rec and is_alive(rec)
    assert src.status(rec).state == "running"
    assert dst.store.list() == []
    assert sh(src, "g1", "echo alive") == "alive\n"

    # The same while the disks are being mirrored: the mirror fails, and the
    # source is left with no job and no NBD node, and its own disk.
    killed.clear()

    def kill_during_mirror(p: mig.MigrationProgress) -> None:
        kill_destination(replace(p, phase="memory", transferred=1))

    target = tmp_path / "host-b-g1.qcow2"
    with pytest.raises(BackendError, match=r"destination QEMU went away.*still runs here"):
        mig.migrate(src, "g1", dst, with_storage=True, dest_overrides=[_disk_spec(target)],
                    progress=kill_during_mirror)
    assert killed and dst.store.list() == [] and not target.exists()
    assert src.get("g1") == rec and src.status(rec).state == "running"
    assert asyncio.run(src._qmp(rec, "query-block-jobs")) == []
    nodes = asyncio.run(src._qmp(rec, "query-named-block-nodes", {"flat": True}))
    assert isinstance(nodes, list)
    assert sorted(n["node-name"] for n in nodes) == ["xvda-file", "xvda-fmt"]

    # Nothing is left in a half state: the same domain migrates fine now.
    res = mig.migrate(src, "g1", dst)
    assert res.record is not None and dst.status(res.record).state == "running"


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
        mig.migrate(src, "g1", dst, with_storage=True, dest_overrides=[_disk_spec(target)],
                    progress=kill_after_the_stream)
    assert killed and dst.store.list() == []
    assert src.get("g1") == rec and src.status(rec).state == "running"
    nodes = asyncio.run(src._qmp(rec, "query-named-block-nodes", {"flat": True}))
    assert isinstance(nodes, list)
    assert sorted(n["node-name"] for n in nodes) == ["xvda-file", "xvda-fmt"]
    # A node of that name left by an older xenlab is cleared before the next one.
    asyncio.run(src._qmp(rec, "blockdev-add", {"driver": "null-co", "node-name": "mig-xvda"}))
    sh(src, "g1", "echo B > /mnt/disk/marker && sync")
    res = mig.migrate(src, "g1", dst, with_storage=True, paused=True,
                      dest_overrides=[_disk_spec(target)])
    assert res.disks == ("xvda",) and src.store.list() == []
    cmp = _compare(tmp_path / "g1.qcow2", target)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    dst.unpause("g1")
    assert sh(dst, "g1", "cat /mnt/disk/marker") == "B\n"


class _Receiver(threading.Thread):
    """``serve_receive`` on its own toolstack (its own thread: SQLite objects stay in theirs)."""

    def __init__(self, state_dir: Path, overrides: Sequence[str] = (),
                 accept_timeout: float = 60) -> None:
        super().__init__(daemon=True)
        self.state_dir, self.overrides = state_dir, overrides
        self.accept_timeout = accept_timeout
        self.token = mig.new_token()
        self.port: queue.Queue[int] = queue.Queue()
        self.result: DomainRecord | BaseException | None = None

    def run(self) -> None:
        try:
            self.result = mig.serve_receive(
                Toolstack(self.state_dir), "127.0.0.1:0", token=self.token,
                overrides=self.overrides, accept_timeout=self.accept_timeout, timeout=120,
                on_listen=lambda _h, p: self.port.put(p))
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
    blocks = asyncio.run(ts._qmp(ts.get(name), "query-block"))
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
    mirror(src, "g1", "xvda", moved)  # the config still names g1.qcow2
    sh(src, "g1", "echo A > /mnt/disk/marker && sync")
    before, boot_id = _uptime_and_boot(src, "g1")
    # Shared disks: the destination runs on the mirror's target, and says so.
    recv = _Receiver(dst.state_dir)
    recv.start()
    res = mig.migrate(src, "g1", recv.address(), token=recv.token)
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
    back = mig.migrate(dst, "g1", recv.address(), with_storage=True, paused=True,
                       token=recv.token)
    got = recv.outcome()
    assert isinstance(got, DomainRecord), got
    assert back.disks == ("xvda",) and dst.store.list() == [] and got.state == "paused"
    assert DISK_PATHS not in got.extra and _block_files(src, "g1") == {"xvda": str(copy)}
    cmp = _compare(moved, copy)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    src.unpause("g1")
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
         "--listen", "127.0.0.1:0", "--state-dir", str(dst.state_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line + proc.stderr.read()
        address, token = line.split()[2], line.split()[-1]
        assert line.split()[3] == "token" and len(token) >= 43  # 256 bits, base64
        killed: list[str] = []

        def kill_receiver(p: mig.MigrationProgress) -> None:
            # QEMU has sent everything: the receiver dies before it says "loaded"
            # or hears "go".
            if p.status == "completed" and not killed:
                proc.kill()
                proc.wait()
                killed.append(p.status)

        with pytest.raises(BackendError, match=r"did not take the guest .*g1 was resumed here"):
            mig.migrate(src, "g1", address, progress=kill_receiver, token=token)
        assert killed
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert src.get("g1") == rec and src.status(rec).state == "running"
    assert sh(src, "g1", "echo alive") == "alive\n"
    # The receiver's QEMU got the guest but was never told to run it.
    (left,) = dst.store.list()
    assert dst.status(left).state != "running"


@pytest.mark.integration
def test_receiver_refuses_and_cleans_up_after_a_vanished_source(
        hosts: tuple[Toolstack, Toolstack], tmp_path: Path) -> None:
    _, dst = hosts

    def source(prepare: dict[str, object]) -> tuple[socket.socket, list[dict[str, object]]]:
        recv = _Receiver(dst.state_dir)
        recv.start()
        host, port = recv.address().split(":")
        ctl = socket.create_connection((host, int(port)), timeout=30)
        f = ctl.makefile("rwb")
        said = [json.loads(f.readline())]
        f.write(json.dumps({**prepare, "token": recv.token}).encode() + b"\n")
        f.flush()
        said.append(json.loads(f.readline()))
        source.recv = recv  # type: ignore[attr-defined]
        return ctl, said

    # A header that is not one: the receiver says why and keeps nothing.
    ctl, said = source({"msg": "prepare", "header": {"version": 3}})
    assert said[0] == {"msg": "hello", "protocol": 2}
    assert said[1]["msg"] == "error" and "header.name" in str(said[1]["error"])
    ctl.close()
    assert isinstance(source.recv.outcome(), FormatError)  # type: ignore[attr-defined]
    assert dst.store.list() == []

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
    err = source.recv.outcome()  # type: ignore[attr-defined]
    assert isinstance(err, BackendError), err
    assert "source" in str(err) or "exited" in str(err)
    assert dst.store.list() == [] and not is_alive(incoming)
    assert not dst.paths(incoming).rundir.exists()


def _ask(address: str, prepare: dict[str, object]) -> dict[str, object]:
    """Connect to a receiver as a source would, send ``prepare``; its answer."""
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as ctl:
        f = ctl.makefile("rwb")
        assert json.loads(f.readline()) == {"msg": "hello", "protocol": 2}
        f.write(json.dumps(prepare).encode() + b"\n")
        f.flush()
        answer = json.loads(f.readline())
        assert isinstance(answer, dict)
        return answer


RISKY = """\
device_model_args_hvm = [ "-monitor", "unix:/tmp/evil,server=on,wait=off" ]
vif = [ "bridge=xenbr0,script=/tmp/evil-script" ]
vga_rom = "/etc/shadow"
"""


def test_the_receiver_hears_only_its_token_and_refuses_risky_settings(tmp_path: Path) -> None:
    """No token or a wrong one: "error", nothing started, the receiver waits on; with the
    token, settings that run programs or hand host files to the guest are refused."""
    recv = _Receiver(tmp_path / "dst")
    recv.start()
    address = recv.address()
    header = mig.header_to_json(replace(
        HEADER, config_text=config_text("g1", tmp_path / "g1.qcow2", tail=RISKY),
        config_path=""))
    prepare: dict[str, object] = {"msg": "prepare", "header": header, "with_storage": True,
                                  "disk_sizes": {"xvda": 32 << 20}}
    said = _ask(address, prepare)
    assert said["msg"] == "error" and "no migration token" in str(said["error"]), said
    said = _ask(address, {**prepare, "token": recv.token[:-1] + "x"})
    assert said["msg"] == "error" and "wrong migration token" in str(said["error"]), said
    # Nothing was started or created, and the receiver still waits for its source.
    assert recv.is_alive() and Toolstack(tmp_path / "dst").store.list() == []
    assert not (tmp_path / "g1.qcow2").exists()
    said = _ask(address, {**prepare, "token": recv.token})
    error = str(said["error"])
    assert said["msg"] == "error", said
    for why in ("device_model_args_hvm (QEMU arguments, passed as they are)",
                "vif script= (an executable run here)",
                "vga_rom (a host file read into the guest)", "--trust-peer-config"):
        assert why in error, error
    got = recv.outcome()
    assert isinstance(got, XenlabError) and str(got) == error
    assert Toolstack(tmp_path / "dst").store.list() == []
    assert not (tmp_path / "g1.qcow2").exists()


def test_the_receivers_overrides_may_set_what_the_wire_may_not() -> None:
    text = config_text("g1", "/srv/g1.qcow2", tail=RISKY)
    assert [w.split(" (")[0] for w in mig._untrusted(text, (), "peer")] == [
        "device_model_args_hvm", "vga_rom", "vif script="]
    mine = ('device_model_args_hvm = [ "-no-hpet" ]', 'vga_rom = "/srv/roms/vga.bin"',
            'vif = [ "bridge=xenbr0,script=vif-bridge" ]')
    assert mig._untrusted(text, mine, "peer") == []
    # vif += keeps the peer's entries, and with them the peer's script.
    assert [w.split(" (")[0] for w in mig._untrusted(
        text, (*mine[:2], 'vif += [ "bridge=xenbr1" ]'), "peer")] == ["vif script="]
    plain = config_text("g1", "/srv/g1.qcow2", tail='vif = [ "bridge=xenbr0" ]\n')
    assert mig._untrusted(plain, (), "peer") == []


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
    assert code == 1 and "missing: cannot read the migration token" in err
    code, _, err = run_cli(capsys, "vm", "migrate", "g1", "127.0.0.1:4444", "--token", "t",
                           "--token-file", str(tmp_path / "empty"), *st)
    assert code == 2 and "not both" in err
    with pytest.raises(XenlabError, match="no domain"):
        mig.migrate(ts, "nope", "127.0.0.1:4444", token="t")
    with pytest.raises(XenlabError, match="wants the token it printed"):
        mig.migrate(ts, "nope", "127.0.0.1:4444")
    with pytest.raises(XenlabError, match="expected HOST:PORT"):
        mig.serve_receive(ts, "nowhere", token="t")
    with pytest.raises(XenlabError, match="empty migration token"):
        mig.serve_receive(ts, "127.0.0.1:0", token="")
    cfg = config_text("g9", tmp_path / "missing.qcow2")
    with pytest.raises(XenlabError, match="needs a blank image of the source's size"):
        mig.receive(ts, cfg, 0, with_storage=True)
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
    header = mig.save(ts, "g1", image, snapshot=True)
    save_s = time.monotonic() - t0
    (snap,) = header.disk_snapshots
    assert (snap.vdev, snap.file) == ("xvda", str(disk))
    assert snap.name.startswith("xenlab-save-") and _tags(disk) == {snap.name}
    assert mig.read_header(image)[0] == header and ts.store.list() == []
    at_save = tmp_path / "at-save.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(disk), str(at_save)], check=True)

    # The domain is booted again from its config and writes B over A.
    ts.create(tmp_path / "g1.cfg")
    wait_ready(ts, "g1")
    assert sh(ts, "g1", "cat /mnt/disk/marker") == "A\n"
    sh(ts, "g1", "echo B > /mnt/disk/marker && echo B > /mnt/disk/later && sync")
    assert ts.shutdown("g1") == "shutdown"
    assert _compare(at_save, disk).returncode == 1  # the disk moved on

    t0 = time.monotonic()
    rec = mig.restore(ts, image, paused=True)
    restore_s = time.monotonic() - t0
    assert rec.state == "paused"
    cmp = _compare(at_save, disk)  # the disk is back where the memory left it
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert _tags(disk) == {snap.name}  # kept: the image can be restored again
    ts.unpause("g1")
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
    ts.create(cfg, create_disks="32M")
    rec = ts.get("g1")
    with pytest.raises(XenlabError, match=r"disk xvdb .*data.raw\) is raw; only qcow2"):
        mig.save(ts, "g1", tmp_path / "g1.save", snapshot=True)
    assert not (tmp_path / "g1.save").exists() and _tags(tmp_path / "g1.qcow2") == set()
    assert ts.get("g1") == rec and ts.status(rec).state == "running"
    ts.destroy("g1")

    boot(ts, tmp_path, "g1")
    rec = ts.get("g1")
    # A save that fails after the snapshot was taken deletes it again.
    with pytest.raises(BackendError, match="not completed within"):
        mig.save(ts, "g1", tmp_path / "slow.save", snapshot=True, timeout=0.5,
                 max_bandwidth=1 << 20)
    assert _tags(tmp_path / "g1.qcow2") == set() and not (tmp_path / "slow.save").exists()
    assert ts.get("g1") == rec and ts.status(rec).state == "running"
    # keep_running: the domain carries on, the snapshot is in the disk.
    header = mig.save(ts, "g1", tmp_path / "g1.save", snapshot=True, keep_running=True)
    assert _tags(tmp_path / "g1.qcow2") == {header.disk_snapshots[0].name}
    assert sh(ts, "g1", "echo alive") == "alive\n"
    ts.destroy("g1")
    # Restoring onto a disk without that snapshot is refused before anything changes.
    other = tmp_path / "other.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), "32M"], check=True)
    with pytest.raises(XenlabError, match=r"has no snapshot 'xenlab-save-.*not the disk"):
        mig.restore(ts, tmp_path / "g1.save", overrides=[_disk_spec(other)])
    assert ts.store.list() == []
    # A disk held by another QEMU cannot be reverted: the restore fails cleanly.
    boot(hosts[1], tmp_path, "g1")
    with pytest.raises(BackendError, match=r"qemu-img snapshot .*lock"):
        mig.restore(ts, tmp_path / "g1.save")
    assert ts.store.list() == []
