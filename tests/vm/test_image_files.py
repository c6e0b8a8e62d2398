"""Image files xenlab makes are new, this user's and 0600, and never go through a taken name.

vm.qemuimg's rule (its docstring, "Files xenlab makes") checked for each kind
of file that needs no running guest: ``qemuimg.create`` and ``convert``, disks
made by ``--create-disks``, the copy of a shut-off domain's disk (``mirror``),
the overlays of shut-off external snapshots, revert overlays and raw copies.
Every test runs under umask 022, where qemu-img alone makes 0644 files.  The
live kinds (a mirror's target, a live overlay) are checked with real guests
in tests/vm/test_mirror.py and tests/vm/test_snapshot_backends.py, planted
links in the snapshot backends in tests/vm/test_snapshot_backends.py.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.aio import sync
from tests.vm.guests import config_text, offline_domain
from xenlab.errors import XenlabError
from xenlab.vm import qemuimg
from xenlab.vm.domain import Toolstack
from xenlab.vm.domconfig import config_from_text
from xenlab.vm.mirror import mirror
from xenlab.vm.qemuimg import ImageFileError
from xenlab.vm.runtime import DISK_PATHS
from xenlab.vm.snapshot import create_snapshot, revert_snapshot


@pytest.fixture(autouse=True)
def _umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path | str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


def test_create_and_convert_make_0600_images(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    sync(qemuimg.create(base, "qcow2", "4M"))
    sync(qemuimg.create(tmp_path / "blank.raw", "raw", "1M"))
    sync(qemuimg.create(tmp_path / "over.qcow2", "qcow2", backing=base, backing_fmt="qcow2"))
    base.chmod(0o644)  # a source others may read: its copy still is not theirs
    sync(qemuimg.convert(base, "qcow2", tmp_path / "copy.raw", "raw", timeout=60))
    assert {p.name: _mode(p) for p in tmp_path.iterdir()} == {
        "base.qcow2": 0o644, "blank.raw": 0o600, "over.qcow2": 0o600, "copy.raw": 0o600}
    assert sync(qemuimg.backing_of(tmp_path / "over.qcow2", "qcow2")) == (str(base), "qcow2")
    assert (tmp_path / "copy.raw").stat().st_size == 4 << 20
    qemuimg.claim(tmp_path / "claimed")
    assert _mode(tmp_path / "claimed") == 0o600 and (tmp_path / "claimed").stat().st_size == 0


def test_a_taken_name_is_refused_never_followed(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.write_text("root secret")
    canary.chmod(0o600)
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "dangling.qcow2").symlink_to(elsewhere)
    (tmp_path / "to-canary.raw").symlink_to(canary)
    (tmp_path / "file.qcow2").write_bytes(b"mine")
    src = tmp_path / "src.raw"
    sync(qemuimg.create(src, "raw", "1M"))
    for name in ("dangling.qcow2", "to-canary.raw", "file.qcow2"):
        with pytest.raises(ImageFileError, match=r"exists .*give a new name") as e:
            sync(qemuimg.create(tmp_path / name, "qcow2", "1M"))
        assert e.value.exists
        with pytest.raises(ImageFileError, match="exists"):
            sync(qemuimg.convert(src, "raw", tmp_path / name, "raw", timeout=60))
        with pytest.raises(ImageFileError, match="exists"):
            qemuimg.claim(tmp_path / name)
    assert not os.path.lexists(elsewhere)
    assert canary.read_text() == "root secret" and _mode(canary) == 0o600
    assert (tmp_path / "file.qcow2").read_bytes() == b"mine"
    # qemu-img refusing leaves nothing either, and its message names the image.
    with pytest.raises(qemuimg.QemuImgError, match=r"new\.qcow2: Invalid image size"):
        sync(qemuimg.create(tmp_path / "new.qcow2", "qcow2", "1Q"))
    with pytest.raises(ImageFileError, match="cannot create it: No such file"):
        sync(qemuimg.create(tmp_path / "no-dir" / "x.qcow2", "qcow2", "1M"))
    assert not os.path.lexists(tmp_path / "new.qcow2") and _leftovers(tmp_path) == []


def test_remove_own_takes_back_only_this_users_regular_files(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.write_bytes(b"x")
    link = tmp_path / "link"
    link.symlink_to(mine)
    assert not qemuimg.remove_own(link) and link.is_symlink()
    assert not qemuimg.remove_own(tmp_path / "missing")
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.write_bytes(b"y")
        shutil.chown(theirs, "nobody")
        assert not qemuimg.remove_own(theirs) and theirs.exists()
    assert qemuimg.remove_own(mine) and not mine.exists()


def test_create_disks_makes_0600_disks(tmp_path: Path) -> None:
    ts = Toolstack(tmp_path / "state")
    disk = tmp_path / "new.qcow2"
    dc, _ = config_from_text(config_text("c", disk, maxmem=None), "c.cfg")
    assert sync(ts.check_disks(dc, "4M")) == [disk]
    assert _mode(disk) == 0o600
    # A dangling link where the disk should be is not created through.
    planted = tmp_path / "planted.raw"
    planted.symlink_to(tmp_path / "made-through-the-link")
    dc, _ = config_from_text(config_text("d", planted, fmt="raw", maxmem=None), "d.cfg")
    with pytest.raises(XenlabError, match="exists"):
        sync(ts.check_disks(dc, "4M"))
    assert not os.path.lexists(tmp_path / "made-through-the-link")


def test_the_copy_of_a_shut_off_domains_disk_is_0600(tmp_path: Path) -> None:
    ts, disk = offline_domain(tmp_path, "qcow2")
    res = sync(mirror(ts, "off", "xvda", tmp_path / "moved.qcow2"))
    assert res.pivoted and _mode(res.target) == 0o600
    assert ts.get("off").extra[DISK_PATHS]["xvda"]["file"] == res.target
    # A dangling link at the target's name: refused before anything is done.
    (tmp_path / "planted.qcow2").symlink_to(tmp_path / "through")
    with pytest.raises(XenlabError, match="exists; give a new file name"):
        sync(mirror(ts, "off", "xvda", tmp_path / "planted.qcow2", pivot=False))
    assert not os.path.lexists(tmp_path / "through") and _leftovers(tmp_path) == []
    assert _mode(disk) == 0o644


def test_shut_off_snapshot_files_are_0600(tmp_path: Path) -> None:
    ts, disk = offline_domain(tmp_path, "qcow2")
    sync(create_snapshot(ts, "off", "E1", external=True))
    assert _mode(f"{disk}.E1.qcow2") == 0o600
    sync(revert_snapshot(ts, "off", "E1"))
    top = ts.get("off").extra["overlays"]["xvda"]["file"]
    assert top == f"{disk}.E1~1.qcow2" and _mode(top) == 0o600

    raw = tmp_path / "raw"
    raw.mkdir()
    ts, disk = offline_domain(raw, "raw")
    sync(create_snapshot(ts, "off", "R1"))
    assert _mode(f"{disk}@R1") == 0o600
    sync(revert_snapshot(ts, "off", "R1"))
    # The disk is the user's own file: a revert keeps its mode.
    assert _mode(disk) == 0o644 and _leftovers(raw) == []
