"""check_disk_image: backing chains and data files checked before QEMU opens them.

Images are made by the real ``qemu-img`` (``-u`` where the backing file must
not be opened, or does not exist); ``qemu-img info --backing-chain`` on the
same files says what QEMU itself would open, and the walk must agree with it
wherever it allows a chain.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from xenlab.config.specs.disk import DiskFormat
from xenlab.errors import FormatError, XenlabError
from xenlab.vm.imagecheck import (
    MAX_CHAIN,
    ImageChain,
    UnsafeImageError,
    allowed_backing_dirs,
    check_disk_image,
)

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                reason="qemu-img is not installed (./dev.sh setup installs it)")


def mk(path: Path, fmt: str = "qcow2", *, backing: str | None = None, bfmt: str | None = None,
       size: str | None = None, opts: str | None = None, unsafe: bool = False) -> Path:
    args = ["qemu-img", "create", "-q", "-f", fmt]
    if unsafe:
        args.append("-u")
    if opts:
        args += ["-o", opts]
    if backing is not None:
        args += ["-b", backing]
    if bfmt is not None:
        args += ["-F", bfmt]
    args.append(str(path))
    if size is not None:
        args.append(size)
    subprocess.run(args, check=True, capture_output=True, cwd=path.parent)
    return path


def chain_info(path: Path, fmt: str = "qcow2") -> list[dict[str, object]]:
    """What QEMU opens for ``path``: qemu-img info --backing-chain (it probes as QEMU does)."""
    out = subprocess.run(["qemu-img", "info", "-U", "-f", fmt, "--backing-chain",
                          "--output=json", str(path)], capture_output=True, text=True,
                         check=True).stdout
    data = json.loads(out)
    assert isinstance(data, list)
    return data


def drop_backing_format(path: Path) -> None:
    """Turn the backing-format extension into an unknown one: no format recorded (old qcow2)."""
    blob = bytearray(path.read_bytes()[:65536])
    at = blob.find(struct.pack(">I", 0xE2792ACA))
    assert at > 0
    blob[at : at + 4] = struct.pack(">I", 0x7)
    with path.open("r+b") as f:
        f.write(blob)


def check(path: Path, fmt: str | DiskFormat = "qcow2", **env: str) -> ImageChain:
    return check_disk_image(path, fmt, allowed_backing_dirs(path, environ=env))


def refused(path: Path, fmt: str | DiskFormat = "qcow2", **env: str) -> UnsafeImageError:
    with pytest.raises(UnsafeImageError) as err:
        check(path, fmt, **env)
    assert err.value.disk == str(path)
    assert "\n" not in str(err.value)
    return err.value


def agrees_with_qemu(chain: ImageChain, fmt: str = "qcow2") -> None:
    info = chain_info(Path(chain.disk), fmt)
    assert [os.path.realpath(str(i["filename"])) for i in info] == [
        i.realpath for i in chain.images]
    assert [i["format"] for i in info] == [i.format for i in chain.images]
    assert [i.get("backing-filename") for i in info] == [i.backing_file for i in chain.images]


# --- chains that are allowed ---------------------------------------------------------


def test_chains_of_one_to_three_images_in_one_directory(tmp_path: Path) -> None:
    base = mk(tmp_path / "base.raw", "raw", size="1M")
    one = mk(tmp_path / "one.qcow2", size="1M")
    two = mk(tmp_path / "two.qcow2", backing="base.raw", bfmt="raw")
    three = mk(tmp_path / "three.qcow2", backing=str(tmp_path / "two.qcow2"), bfmt="qcow2")
    sub = tmp_path / "sub"
    sub.mkdir()
    below = mk(sub / "below.qcow2", backing="../two.qcow2", bfmt="qcow2")
    assert [i.path for i in check(one).images] == [str(one)]
    assert [(i.path, i.format) for i in check(two).images] == [
        (str(two), "qcow2"), (str(base), "raw")]
    chain = check(three)
    assert [i.format for i in chain.images] == ["qcow2", "qcow2", "raw"]
    assert chain.files == (str(three), str(two), str(base))
    for c in (check(one), check(two), chain):
        agrees_with_qemu(c)
    # A disk one level down may use its parent's images only when allowed.
    err = refused(below)
    assert err.file == str(sub / "../two.qcow2")
    assert err.reason.startswith(f"names backing file {sub}/../two.qcow2 (really {two}), "
                                 f"outside {sub} (allow it with XENLAB_BACKING_DIRS={tmp_path})")
    agrees_with_qemu(check(below, XENLAB_BACKING_DIRS=str(tmp_path)))


def test_raw_and_vhd_disks_are_never_read(tmp_path: Path) -> None:
    # A raw disk is the guest's bytes: a qcow2 header in it, naming a host
    # file, is data, and QEMU (told format=raw) never reads it as a header.
    evil = mk(tmp_path / "evil.qcow2", backing="/etc/passwd", bfmt="raw", unsafe=True, size="1M")
    disk = tmp_path / "guest.raw"
    shutil.copy(evil, disk)
    chain = check(disk, DiskFormat.RAW)
    assert [(i.format, i.backing_file) for i in chain.images] == [("raw", None)]
    fifo = tmp_path / "fifo.raw"
    os.mkfifo(fifo)  # would block a reader: raw is not opened at all
    assert check(fifo, "raw").images[0].format == "raw"
    assert check(tmp_path / "missing.vhd", DiskFormat.VHD).images[0].format == "vpc"
    assert check_disk_image(tmp_path / "x", DiskFormat.EMPTY, []).images == ()


def test_qcow_and_qed_chains(tmp_path: Path) -> None:
    base = mk(tmp_path / "base.raw", "raw", size="1M")
    qcow = mk(tmp_path / "v1.qcow", "qcow", backing="base.raw", bfmt="raw", size="1M")
    chain = check(qcow, DiskFormat.QCOW)
    # qcow records no backing format: QEMU probes base.raw, and so does the walk.
    assert [(i.format, i.probed) for i in chain.images] == [("qcow", False), ("raw", True)]
    agrees_with_qemu(chain, "qcow")
    qed = mk(tmp_path / "d.qed", "qed", backing="base.raw", bfmt="raw")
    chain = check(qed, DiskFormat.QED)
    assert [(i.format, i.probed) for i in chain.images] == [("qed", False), ("raw", False)]
    agrees_with_qemu(chain, "qed")
    assert chain.images[1].realpath == str(base)


# --- what is refused ---------------------------------------------------------------------


def test_a_host_file_as_backing_file(tmp_path: Path) -> None:
    disk = mk(tmp_path / "x.qcow2", backing="/etc/shadow", bfmt="raw", unsafe=True, size="1M")
    # QEMU itself would open it: the defect.
    assert [i["filename"] for i in chain_info(disk)][1] == "/etc/shadow"
    err = refused(disk)
    assert err.file == "/etc/shadow"
    assert str(err) == (f"disk {disk}: names backing file /etc/shadow, outside {tmp_path} "
                        "(allow it with XENLAB_BACKING_DIRS=/etc)")


def test_a_sibling_directory_is_refused_then_allowed(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "bases").mkdir()
    mk(tmp_path / "bases" / "base.qcow2", size="1M")
    disk = mk(tmp_path / "images" / "vm.qcow2", backing="../bases/base.qcow2", bfmt="qcow2")
    err = refused(disk)
    assert f"(allow it with XENLAB_BACKING_DIRS={tmp_path / 'bases'})" in str(err)
    chain = check(disk, XENLAB_BACKING_DIRS=f"/nonexistent::{tmp_path / 'bases'}")
    assert chain.images[1].realpath == str(tmp_path / "bases" / "base.qcow2")
    agrees_with_qemu(chain)
    chain = check_disk_image(disk, "qcow2", allowed_backing_dirs(disk, [tmp_path / "bases"],
                                                                   environ={}))
    assert len(chain.images) == 2
    with pytest.raises(XenlabError, match=r"^XENLAB_BACKING_DIRS: 'bases' is not an absolute"):
        allowed_backing_dirs(disk, environ={"XENLAB_BACKING_DIRS": "bases"})


def test_a_symlink_in_the_chain_pointing_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    mk(outside / "base.qcow2", size="1M")
    images = tmp_path / "images"
    images.mkdir()
    (images / "link.qcow2").symlink_to(outside / "base.qcow2")
    (images / "dir").symlink_to(outside)
    for name in ("link.qcow2", "dir/base.qcow2"):
        disk = mk(images / f"vm-{name[:3]}.qcow2", backing=name, bfmt="qcow2")
        err = refused(disk)
        assert f"(really {outside / 'base.qcow2'}), outside {images}" in err.reason
    # The disk itself may be a symlink the user made: its own directory counts.
    (images / "inner.qcow2").symlink_to(mk(images / "real.qcow2", size="1M"))
    assert check(images / "inner.qcow2").images[0].realpath == str(images / "real.qcow2")


@pytest.mark.parametrize("name", [
    'json:{"driver":"file","filename":"/etc/passwd"}',
    "nbd:localhost:10809",
    "http://example.org/disk.raw",
    "file:base.raw",
    "vvfat:fat:rw:/etc",
])
def test_protocol_and_json_backing_names(tmp_path: Path, name: str) -> None:
    disk = mk(tmp_path / "x.qcow2", backing=name, bfmt="raw", unsafe=True, size="1M")
    err = refused(disk)
    assert err.file == name
    assert f"names backing file {name!r}, a protocol or JSON name" in err.reason


def test_external_data_files(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    inside = mk(images / "in.qcow2", opts=f"data_file={images}/in.data", size="1M")
    chain = check(inside)
    assert chain.images[0].data_file == f"{images}/in.data"
    assert chain.files == (str(inside), f"{images}/in.data")
    other = tmp_path / "other"
    other.mkdir()
    out = mk(images / "out.qcow2", opts=f"data_file={other}/d.raw", size="1M")
    err = refused(out)
    assert err.file == f"{other}/d.raw"
    assert err.reason == (f"names data file {other}/d.raw, outside {images} "
                          f"(allow it with XENLAB_BACKING_DIRS={other})")
    # QEMU opens a relative data file from its working directory: ambiguous.
    rel = mk(images / "rel.qcow2", opts="data_file=rel.data", size="1M")
    assert "by a relative name" in refused(rel).reason
    # Deeper in the chain, the message says which image names it.
    top = mk(images / "top.qcow2", backing="out.qcow2", bfmt="qcow2")
    assert refused(top).reason.startswith(
        f"its backing file {out} names data file {other}/d.raw, outside")


def test_loops_and_long_chains(tmp_path: Path) -> None:
    a = mk(tmp_path / "a.qcow2", backing="b.qcow2", bfmt="qcow2", unsafe=True, size="1M")
    mk(tmp_path / "b.qcow2", backing="a.qcow2", bfmt="qcow2", unsafe=True, size="1M")
    err = refused(a)
    assert err.reason == f"its backing file {tmp_path}/b.qcow2 names {tmp_path}/a.qcow2 again: " \
                         "the backing chain loops"
    self_loop = mk(tmp_path / "self.qcow2", backing="self.qcow2", bfmt="qcow2", unsafe=True,
                   size="1M")
    assert refused(self_loop).reason.endswith("again: the backing chain loops")
    deep = tmp_path / "deep"
    deep.mkdir()
    mk(deep / "0.qcow2", size="1M")
    for n in range(1, MAX_CHAIN + 1):
        mk(deep / f"{n}.qcow2", backing=f"{n - 1}.qcow2", bfmt="qcow2", unsafe=True, size="1M")
    assert len(check(deep / f"{MAX_CHAIN - 1}.qcow2").images) == MAX_CHAIN
    start = time.monotonic()
    assert "longer than 64 images" in refused(deep / f"{MAX_CHAIN}.qcow2").reason
    assert time.monotonic() - start < 2


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    gone = mk(tmp_path / "x.qcow2", backing="gone.raw", bfmt="raw", unsafe=True, size="1M")
    assert refused(gone).reason == f"names backing file {tmp_path}/gone.raw, which does not exist"
    missing = refused(tmp_path / "nothing.qcow2")
    assert missing.reason.startswith(f"{tmp_path}/nothing.qcow2 cannot be read: No such file")
    fifo = tmp_path / "fifo.qcow2"
    os.mkfifo(fifo)
    assert refused(fifo).reason == f"{fifo} is not a regular file or a block device"
    assert refused(tmp_path, "qcow2").reason.endswith("is not a regular file or a block device")


def test_a_disk_that_is_not_its_format(tmp_path: Path) -> None:
    disk = mk(tmp_path / "raw.img", "raw", size="1M")
    with pytest.raises(FormatError, match=rf"^{disk}\+0x0: magic: b'\\x00\\x00\\x00\\x00'"):
        check(disk, "qcow2")


# --- backing files without a recorded format: QEMU's probe ---------------------------------


def test_unrecorded_format_is_probed_like_qemu(tmp_path: Path) -> None:
    mk(tmp_path / "base.raw", "raw", size="1M")
    disk = mk(tmp_path / "old.qcow2", backing="base.raw", bfmt="raw")
    drop_backing_format(disk)
    assert "backing-filename-format" not in chain_info(disk)[0]
    chain = check(disk)
    assert [(i.format, i.probed) for i in chain.images] == [("qcow2", False), ("raw", True)]
    agrees_with_qemu(chain)


def test_a_probed_backing_file_that_is_a_qcow2_naming_a_host_file(tmp_path: Path) -> None:
    # base.raw is another guest's raw disk; that guest wrote a qcow2 header
    # into it.  An image that does not record base.raw's format makes QEMU
    # probe it, find qcow2, and open /etc/passwd as its backing file.
    evil = mk(tmp_path / "evil.qcow2", backing="/etc/passwd", bfmt="raw", unsafe=True, size="1M")
    shutil.copy(evil, tmp_path / "base.raw")
    disk = mk(tmp_path / "vm.qcow2", backing="base.raw", bfmt="raw", unsafe=True, size="1M")
    drop_backing_format(disk)
    assert [i["filename"] for i in chain_info(disk)][-1] == "/etc/passwd"  # what QEMU would do
    err = refused(disk)
    assert err.reason.startswith(f"its backing file {tmp_path}/base.raw names backing file "
                                 "/etc/passwd, outside")
    # Recorded as raw, the same file is never parsed.
    ok = mk(tmp_path / "ok.qcow2", backing="base.raw", bfmt="raw", unsafe=True, size="1M")
    assert [i.format for i in check(ok).images] == ["qcow2", "raw"]


@pytest.mark.parametrize(("fmt", "content"), [
    ("vmdk", b"# Disk DescriptorFile\nversion=1\nRW 2048 FLAT \"/etc/passwd\" 0\n"),
    ("vpc", None),
    ("vdi", None),
])
def test_a_probed_backing_file_of_another_format(tmp_path: Path, fmt: str,
                                                 content: bytes | None) -> None:
    base = tmp_path / "base.img"
    if content is None:
        mk(base, fmt, size="1M")
    else:
        base.write_bytes(content)
    disk = mk(tmp_path / "vm.qcow2", backing="base.img", bfmt="raw", unsafe=True, size="1M")
    drop_backing_format(disk)
    err = refused(disk)
    assert err.reason == (f"names backing file {base} of format {fmt!r} (probed: no format is "
                          "recorded); only raw, qcow2, qcow and qed backing files are opened")


def test_a_recorded_format_other_than_the_four(tmp_path: Path) -> None:
    mk(tmp_path / "base.vmdk", "vmdk", size="1M")
    disk = mk(tmp_path / "vm.qcow2", backing="base.vmdk", bfmt="vmdk")
    assert "of format 'vmdk' (recorded)" in refused(disk).reason


def test_names_beyond_the_read_limit_are_refused(tmp_path: Path) -> None:
    # qcow (v1) may put its backing file name anywhere; QEMU reads it there.
    head = struct.pack(">4sIQIIQBBHIQ", b"QFI\xfb", 1, 5 << 20, 8, 0, 1 << 20, 12, 9, 0, 0, 4096)
    disk = tmp_path / "far.qcow"
    with disk.open("wb") as f:
        f.write(head)
        f.seek(5 << 20)
        f.write(b"base.raw")
    err = refused(disk, "qcow")
    assert err.reason == (f"{disk}: its backing file name lies at 0x500000, beyond the first "
                          "4 MiB read here: not checked, so not opened")
    near = tmp_path / "near.qcow"
    with near.open("wb") as f:
        f.write(struct.pack(">4sIQIIQBBHIQ", b"QFI\xfb", 1, 3 << 20, 11, 0, 1 << 20, 12, 9, 0,
                            0, 4096))
        f.seek(3 << 20)
        f.write(b"/etc/passwd")
    assert refused(near, "qcow").file == "/etc/passwd"  # read that far, and refused
