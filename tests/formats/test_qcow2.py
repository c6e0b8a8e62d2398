"""formats.qcow2: qcow2/qcow/QED headers as QEMU reads them, QEMU's probe, and fuzzing.

Headers are built here field by field with ``struct`` (not through the
reader's layouts), and images made by the real ``qemu-img`` are read and
compared with ``qemu-img info --output=json`` on the same files.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenlab.errors import FormatError, TruncatedError
from xenlab.formats import qcow2
from xenlab.formats.qcow2 import ImageFormat, detect, parse_image, probe

MAGIC = b"QFI\xfb"


def ext(kind: int, data: bytes) -> bytes:
    return struct.pack(">II", kind, len(data)) + data + bytes(-len(data) % 8)


def qcow2_header(*, version: int = 3, backing: bytes | None = None, backing_fmt: bytes | None
                 = None, data_file: bytes | None = None, incompat: int = 0, cluster_bits: int = 16,
                 header_length: int | None = None, extra_exts: bytes = b"",
                 backing_offset: int | None = None, backing_size: int | None = None) -> bytes:
    """A qcow2 header as qemu-img lays it out: header, extensions, end marker, backing name."""
    length = (104 if version == 3 else 72) if header_length is None else header_length
    exts = b""
    if backing_fmt is not None:
        exts += ext(0xE2792ACA, backing_fmt)
    if data_file is not None:
        exts += ext(0x44415441, data_file)
        incompat |= 4
    exts += extra_exts + struct.pack(">II", 0, 0)
    name_at = length + len(exts)
    off = (name_at if backing is not None else 0) if backing_offset is None else backing_offset
    size = (len(backing) if backing is not None else 0) if backing_size is None else backing_size
    head = struct.pack(">4sIQIIQIIQQIIQ", MAGIC, version, off, size, cluster_bits, 1 << 20,
                       0, 1, 0x30000, 0x10000, 1, 0, 0)
    if version == 3:
        head += struct.pack(">QQQII", incompat, 0, 0, 4, length)
    head = head.ljust(length, b"\0")
    out = head + exts + (backing or b"")
    return out.ljust(1 << cluster_bits, b"\0")


def qcow1_header(backing: bytes | None, *, at: int = 48, cluster_bits: int = 12) -> bytes:
    head = struct.pack(">4sIQIIQBBHIQ", MAGIC, 1, at if backing else 0,
                       len(backing or b""), 0, 1 << 20, cluster_bits, 9, 0, 0, 0x1000)
    return head.ljust(at, b"\0") + (backing or b"") + bytes(512)


def qed_header(backing: bytes | None, *, raw: bool = False, features: int = 0) -> bytes:
    features |= (1 if backing else 0) | (4 if raw else 0)
    head = struct.pack("<4sIIIQQQQQII", b"QED\0", 65536, 4, 1, features, 0, 0, 65536 * 2,
                       1 << 20, 64 if backing else 0, len(backing or b""))
    return (head + (backing or b"")).ljust(65536, b"\0")


# --- qcow2 -------------------------------------------------------------------------


def test_qcow2_v3_backing_format_and_data_file() -> None:
    h = parse_image(qcow2_header(backing=b"base.raw", backing_fmt=b"raw",
                                 data_file=b"/srv/d.raw"))
    assert h.format is ImageFormat.QCOW2 and h.version == 3
    assert (h.backing_file, h.backing_format, h.data_file) == ("base.raw", "raw", "/srv/d.raw")
    assert h.cluster_size == 65536 and h.size == 1 << 20 and h.header_length == 104
    assert [e.type for e in h.extensions] == [0xE2792ACA, 0x44415441]
    assert h.extensions[0].offset == 104 and h.extensions[1].offset == 104 + 8 + 8


def test_qcow2_v2_starts_its_extensions_at_72() -> None:
    h = parse_image(qcow2_header(version=2, backing=b"b.qcow2", backing_fmt=b"qcow2"))
    assert h.version == 2 and h.header_length == 72
    assert (h.backing_file, h.backing_format) == ("b.qcow2", "qcow2")


def test_names_end_at_a_nul_as_in_qemu() -> None:
    h = parse_image(qcow2_header(backing=b"/srv/ok.raw\0/../../etc/shadow",
                                 backing_fmt=b"raw\0qcow2"))
    assert (h.backing_file, h.backing_format) == ("/srv/ok.raw", "raw")
    assert parse_image(qcow2_header(backing=b"\0x")).backing_file is None
    assert parse_image(qcow2_header(backing=b"", backing_offset=200)).backing_file is None


def test_undecodable_names_keep_their_bytes() -> None:
    h = parse_image(qcow2_header(backing=b"b\xff\xfe.raw"))
    assert h.backing_file == "b\udcff\udcfe.raw"
    assert h.backing_file.encode("utf-8", "surrogateescape") == b"b\xff\xfe.raw"


def test_data_file_counts_only_with_its_feature_bit() -> None:
    name = b"/elsewhere/data"
    with_bit = parse_image(qcow2_header(data_file=name))
    assert with_bit.data_file == "/elsewhere/data" and with_bit.incompatible_features == 4
    no_bit = qcow2_header(extra_exts=ext(0x44415441, name))
    h = parse_image(no_bit)
    assert h.data_file is None and h.data_file_name == "/elsewhere/data"
    with pytest.raises(FormatError, match=r"^img\+0x48: incompatible_features: an external"):
        parse_image(qcow2_header(incompat=4), source="img")


def test_feature_table_names() -> None:
    table = struct.pack(">BB46s", 0, 0, b"dirty bit") + struct.pack(">BB46s", 1, 0, b"lazy")
    h = parse_image(qcow2_header(extra_exts=ext(0x6803F857, table)))
    assert [(f.type, f.bit, f.name) for f in h.feature_names] == [(0, 0, "dirty bit"),
                                                                   (1, 0, "lazy")]


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"QFI", r"^x\+0x0: qcow2 header: needs 72 bytes, only 3 left"),
        (qcow2_header()[:80], r"^x\+0x48: qcow2 v3 header: needs 32 bytes, only 8 left"),
        (qcow2_header(version=4), r"^x\+0x4: version: 4: QEMU opens qcow2 versions 2 and 3"),
        (qcow2_header(cluster_bits=8) + bytes(512), r"^x\+0x14: cluster_bits: 8, expected 9-21"),
        (qcow2_header(cluster_bits=22)[:4096], r"^x\+0x14: cluster_bits: 22"),
        (qcow2_header(header_length=100), r"^x\+0x64: header_length: 100, less than 104"),
        (qcow2_header(header_length=600, cluster_bits=9),
         r"^x\+0x64: header_length: 600, more than the cluster size 512"),
        (qcow2_header(incompat=1 << 5), r"^x\+0x48: incompatible_features: 0x20: bits 0x20"),
        (qcow2_header(backing=b"b", backing_offset=0x10001),
         r"^x\+0x8: backing_file_offset: 0x10001, beyond the first cluster \(0x10000\)"),
        (qcow2_header(backing=b"a" * 1024), r"^x\+0x10: backing_file_size: 1024: the name"),
        (qcow2_header(backing=b"a", backing_offset=65500, backing_size=100),
         r"^x\+0x10: backing_file_size: 100: the name would run past 36 bytes"),
        (qcow2_header(backing_fmt=b"q" * 16), r"^x\+0x6c: backing format length: 16, more"),
        (qcow2_header(extra_exts=struct.pack(">II", 7, 0xFFFF0000)),
         r"^x\+0x6c: extension length: 4294901760: the extension runs past 0x10000"),
        (qcow2_header(backing=b"b.raw", backing_fmt=b"raw", backing_offset=108),
         r"^x\+0x6c: extension length: 3: the extension runs past 0x6c"),
        (qcow2_header(backing=b"x" * 30)[:130], r"^x\+0x70: backing file name: needs 30 bytes"),
    ],
)  # fmt: skip
def test_qcow2_headers_qemu_refuses(blob: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        qcow2.parse_qcow2(blob, source="x")


def test_too_many_extensions_are_refused_not_skipped() -> None:
    many = ext(7, b"") * (qcow2.MAX_EXTENSIONS + 1)
    blob = qcow2_header(extra_exts=many, data_file=b"/hidden")
    with pytest.raises(FormatError, match="more than 1024 extensions"):
        parse_image(blob)
    # A data file named before them is read; QEMU reads every extension.
    assert parse_image(qcow2_header(extra_exts=ext(7, b"") * 1000)).data_file is None


def test_extensions_stop_at_the_first_cluster_without_an_end_marker() -> None:
    blob = bytearray(qcow2_header(cluster_bits=9))
    blob[104:512] = ext(9, bytes(400))  # fills the cluster: no end marker, no error
    assert [e.type for e in parse_image(bytes(blob)).extensions] == [9]


# --- qcow and QED ------------------------------------------------------------------


def test_qcow1_names_a_backing_file_without_a_format() -> None:
    h = parse_image(qcow1_header(b"../base.img"))
    assert (h.format, h.version, h.backing_file, h.backing_format) == (
        ImageFormat.QCOW, 1, "../base.img", None)
    far = qcow1_header(b"/etc/passwd", at=8192)
    assert parse_image(far).backing_file == "/etc/passwd"  # anywhere in the file
    with pytest.raises(TruncatedError) as err:
        parse_image(far[:4096], source="q")
    assert (err.value.offset, err.value.need) == (8192, 11)
    with pytest.raises(FormatError, match=r"^q\+0x20: cluster_bits: 17"):
        parse_image(qcow1_header(None, cluster_bits=17), source="q")


def test_qed_backing_file_and_its_raw_bit() -> None:
    h = parse_image(qed_header(b"/srv/base"))
    assert (h.format, h.backing_file, h.backing_format) == (ImageFormat.QED, "/srv/base", None)
    assert parse_image(qed_header(b"/srv/base", raw=True)).backing_format == "raw"
    assert parse_image(qed_header(None)).backing_file is None
    with pytest.raises(FormatError, match=r"^d\+0x10: features: 0x18: unknown to QEMU"):
        parse_image(qed_header(None, features=0x10 | 8), source="d")


def test_detect_and_unknown_data() -> None:
    assert detect(qcow2_header()) is ImageFormat.QCOW2
    assert detect(qcow1_header(None)) is ImageFormat.QCOW
    assert detect(qed_header(None)) is ImageFormat.QED
    assert detect(b"\0" * 512) is None and detect(b"QFI") is None
    with pytest.raises(FormatError, match=r"^r\+0x0: magic: b'\\x00\\x00\\x00\\x00': not a"):
        parse_image(bytes(512), source="r")


# --- probing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "name", "expected"),
    [
        (qcow2_header(), "x", "qcow2"),
        (qcow1_header(None), "x", "qcow"),
        (MAGIC + bytes(100), "x", "raw"),  # version 0: neither qcow nor qcow2
        (qed_header(None), "x", "qed"),
        (b"KDMV" + bytes(60), "x", "vmdk"),
        (b"# Disk DescriptorFile\n   \r\nversion=1\n", "x", "vmdk"),
        (b"# Disk DescriptorFile\nfoo\nversion=1\n", "x", "raw"),
        (b"version=3\r\n", "x", "vmdk"),
        (b"conectix" + bytes(100), "x", "vpc"),
        (b"vhdxfile" + bytes(100), "x", "vhdx"),
        (bytes(0x40) + b"\x7f\x10\xda\xbe", "x", "vdi"),
        (b"LUKS\xba\xbe\0\x01", "x", "luks"),
        (b"WithoutFreeSpace" + bytes(48), "x", "parallels"),
        (b"Bochs Virtual HD Image\0", "x", "bochs"),
        (bytes(512), "disk.dmg", "dmg"),
        (qcow2_header(), "disk.dmg", "qcow2"),
        (bytes(512), "x", "raw"),
        (b"", "x", "raw"),
    ],
)
def test_probe_scores_as_qemu(head: bytes, name: str, expected: str) -> None:
    assert probe(head, name) == expected
    assert probe(head, name, length=0) == "raw"  # an empty file is raw whatever its name


# --- real images -------------------------------------------------------------------

qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")


def img_info(path: Path) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


def make(path: Path, *args: str, size: str | None = None) -> Path:
    tail = [size] if size else []
    subprocess.run(["qemu-img", "create", "-q", *args, str(path), *tail], check=True,
                   capture_output=True)
    return path


@qemu_img
def test_against_qemu_img_info(tmp_path: Path) -> None:
    base = make(tmp_path / "base.raw", "-f", "raw", size="1M")
    images = [
        make(tmp_path / "v3.qcow2", "-f", "qcow2", "-b", "base.raw", "-F", "raw"),
        make(tmp_path / "v2.qcow2", "-f", "qcow2", "-o", "compat=0.10", "-b", "v3.qcow2",
             "-F", "qcow2"),
        make(tmp_path / "abs.qcow2", "-f", "qcow2", "-b", str(base), "-F", "raw"),
        make(tmp_path / "dat.qcow2", "-f", "qcow2", "-o", f"data_file={tmp_path}/d.raw",
             size="1M"),
        make(tmp_path / "c2m.qcow2", "-f", "qcow2", "-o", "cluster_size=2M", size="1M"),
        make(tmp_path / "q1.qcow", "-f", "qcow", "-b", "base.raw", "-F", "raw", size="1M"),
        make(tmp_path / "q.qed", "-f", "qed", "-b", "base.raw", "-F", "raw"),
        make(tmp_path / "q2.qed", "-f", "qed", "-b", "v3.qcow2", "-F", "qcow2"),
        make(tmp_path / "plain.qed", "-f", "qed", size="1M"),
    ]
    for path in images:
        info = img_info(path)
        head = parse_image(path.read_bytes()[: 4 << 20], source=path.name)
        assert head.format.value == info["format"], path
        assert head.backing_file == info.get("backing-filename"), path
        assert head.backing_format == info.get("backing-filename-format"), path
        assert head.size == info["virtual-size"], path
        assert head.cluster_size == info.get("cluster-size"), path
        specific: dict[str, dict[str, object]] = info.get("format-specific", {})  # type: ignore[assignment]
        assert head.data_file == specific.get("data", {}).get("data-file"), path
        # QEMU's own probe of the same bytes agrees.
        assert probe(path.read_bytes()[:2048], path.name) == info["format"], path


@qemu_img
@pytest.mark.parametrize("fmt", ["vmdk", "vpc", "vdi", "vhdx", "parallels", "raw", "qcow",
                                 "qcow2", "qed"])
def test_probe_agrees_with_qemu_img(tmp_path: Path, fmt: str) -> None:
    path = make(tmp_path / f"x.{fmt}", "-f", fmt, size="1M")
    assert probe(path.read_bytes()[:2048], path.name, length=path.stat().st_size) == (
        img_info(path)["format"])


@qemu_img
def test_probe_of_text_and_dmg_names_agrees_with_qemu_img(tmp_path: Path) -> None:
    cases = {
        "desc.txt": b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\n",
        "notdesc.txt": b"# comment\nCID=1\nversion=1\n",
        "image.dmg": bytes(4096),
        "empty.img": b"",
        "zeros.img": bytes(4096),
        "vers0.img": MAGIC + bytes(4092),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        info = subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                              capture_output=True, text=True, check=False)
        if info.returncode != 0:
            # QEMU picked a driver that then refused the file: the probe said not raw.
            assert probe(data, name, length=len(data)) != "raw", (name, info.stderr)
            continue
        assert probe(data, name, length=len(data)) == json.loads(info.stdout)["format"], name


# --- fuzzing ------------------------------------------------------------------------

SEEDS = [qcow2_header(backing=b"b.raw", backing_fmt=b"raw", data_file=b"/d")[:4096],
         qcow2_header(version=2, backing=b"x")[:4096], qcow1_header(b"../b"),
         qed_header(b"/b")[:4096]]


def _only_format_errors(blob: bytes) -> None:
    start = time.monotonic()
    try:
        h = parse_image(blob, source="f")
    except FormatError:
        pass
    else:
        for name in (h.backing_file, h.data_file, h.backing_format):
            assert name is None or "\0" not in name
    probe(blob, "f.img", length=len(blob))
    assert time.monotonic() - start < 1.0


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes_raise_only_format_errors(blob: bytes) -> None:
    _only_format_errors(blob)
    _only_format_errors(MAGIC + blob)
    _only_format_errors(b"QED\0" + blob)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(SEEDS), data=st.data())
def test_mutated_headers_raise_only_format_errors(seed: bytes, data: st.DataObject) -> None:
    blob = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, 200))
        value = data.draw(st.sampled_from([0, 1, 0xFF, 0x7F, 0x80, 0x10, 0x40]))
        blob[at] = value
    cut = data.draw(st.integers(0, len(blob)))
    _only_format_errors(bytes(blob[:cut]))
    _only_format_errors(bytes(blob))


def test_the_worst_header_is_read_in_bounded_time() -> None:
    # A 2 MiB first cluster full of empty extensions: the reader stops at its limit.
    blob = qcow2_header(cluster_bits=21, extra_exts=ext(7, b"") * (1 << 17))
    start = time.monotonic()
    with pytest.raises(FormatError, match="more than 1024 extensions"):
        parse_image(blob)
    assert time.monotonic() - start < 0.5
