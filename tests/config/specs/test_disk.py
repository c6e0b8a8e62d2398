"""Golden, error-place and property tests of xenlab.config.specs.disk.

The golden cases are every ``one`` line of Xen's ``tools/xl/check-xl-disk-parse``
(28 lines; a line with several words is several spec strings, as ``xl
block-attach`` passes them) and the examples and rules of
xl-disk-configuration(5).  Expected values are written by hand from those
files; where libxlutil 4.17 differs from them (``trusted``/``untrusted``) the
test pins what 4.17 does and says why.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenlab.config.errors import ConfigError
from xenlab.config.specs.disk import (
    DiskBackend,
    DiskFormat,
    DiskSpec,
    DiskSpecification,
    disk_to_libxl_json,
    format_disk,
    parse_disk,
)

RAW = DiskFormat.RAW
GUEST = DiskSpec(vdev="hda", pdev_path="/dev/vg/guest-volume")
ISO = DiskSpec(
    vdev="hdc", pdev_path="/root/image.iso", removable=True, readwrite=False, is_cdrom=True
)
EMPTY_CDROM = DiskSpec(
    vdev="hdc",
    pdev_path="",
    format=DiskFormat.EMPTY,
    removable=True,
    readwrite=False,
    is_cdrom=True,
)
ISCSI_TARGET = "iqn.2001-05.com.equallogic:0-8a0906-23fe93404-c82797962054a96d-examplehost"

# (specs as xl block-attach gets them, expected DiskSpec)
CHECK_XL_DISK_PARSE: list[tuple[list[str], DiskSpec]] = [
    (["/dev/vg/guest-volume,,hda"], GUEST),
    (["/dev/vg/guest-volume,raw,hda,rw"], GUEST),
    (["format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume"], GUEST),
    (["format=raw", "vdev=hda", "access=rw", "target=/dev/vg/guest-volume"], GUEST),
    (["raw:/dev/vg/guest-volume,hda,w"], GUEST),
    (["/root/image.iso,,hdc,cdrom"], ISO),
    (["/root/image.iso,,hdc,,cdrom"], ISO),
    (["/root/image.iso,raw,hdc,devtype=cdrom"], ISO),
    (["format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso"], ISO),
    (["format=raw", "vdev=hdc", "access=ro", "devtype=cdrom", "target=/root/image.iso"], ISO),
    (["raw:/root/image.iso,hdc:cdrom,ro"], ISO),
    (
        ["backendtype=phy,vdev=xvdb,access=w,target=/dev/vg/guest-volume"],
        DiskSpec(vdev="xvdb", pdev_path="/dev/vg/guest-volume", backend=DiskBackend.PHY),
    ),
    (["devtype=cdrom,,,hdc"], EMPTY_CDROM),
    ([",,hdc:cdrom,r"], EMPTY_CDROM),
    ([",hdc:cdrom,r"], EMPTY_CDROM),
    (["vdev=hdc,access=r,devtype=cdrom,target="], EMPTY_CDROM),
    ([",empty,hdc:cdrom,r"], EMPTY_CDROM),
    (
        ["vdev=hdc,access=r,devtype=cdrom,format=empty"],
        DiskSpec(
            vdev="hdc",
            format=DiskFormat.EMPTY,
            removable=True,
            readwrite=False,
            is_cdrom=True,
        ),
    ),
    (
        ["vdev=hdc,access=r,devtype=cdrom"],
        DiskSpec(
            vdev="hdc",
            format=DiskFormat.EMPTY,
            removable=True,
            readwrite=False,
            is_cdrom=True,
        ),
    ),
    (
        [f"iscsi:{ISCSI_TARGET},xvda,w"],
        DiskSpec(vdev="xvda", pdev_path=ISCSI_TARGET, script="block-iscsi"),
    ),
    (
        [f"vdev=xvda,access=w,script=block-iscsi,target={ISCSI_TARGET}"],
        DiskSpec(vdev="xvda", pdev_path=ISCSI_TARGET, script="block-iscsi"),
    ),
    (
        ["drbd:app01,hda,w"],
        DiskSpec(vdev="hda", pdev_path="app01", script="block-drbd"),
    ),
    (
        ["discard", "vdev=hda", "target=/some/disk/image.raw"],
        DiskSpec(vdev="hda", pdev_path="/some/disk/image.raw", discard_enable=True),
    ),
    (
        ["discard", "vdev=hda", "target=/some/disk/image.raw"],
        DiskSpec(vdev="hda", pdev_path="/some/disk/image.raw", discard_enable=True),
    ),
    (
        ["cdrom", "no-discard", "vdev=hda", "target=/some/disk/image.iso"],
        DiskSpec(
            vdev="hda",
            pdev_path="/some/disk/image.iso",
            removable=True,
            readwrite=False,
            is_cdrom=True,
            discard_enable=False,
        ),
    ),
]

# Man page examples and rules beyond check-xl-disk-parse.
MAN_PAGE: list[tuple[list[str], DiskSpec]] = [
    # "Default values apply if ... specified with an empty value"
    (["/x,,hda,"], DiskSpec(vdev="hda", pdev_path="/x")),
    (["format=,vdev=hda,access=,target=/x"], DiskSpec(vdev="hda", pdev_path="/x")),
    # every format, positionally and by name
    (["/x,qcow,hda"], DiskSpec(vdev="hda", pdev_path="/x", format=DiskFormat.QCOW)),
    (["/x,qcow2,hda"], DiskSpec(vdev="hda", pdev_path="/x", format=DiskFormat.QCOW2)),
    (["/x,vhd,hda"], DiskSpec(vdev="hda", pdev_path="/x", format=DiskFormat.VHD)),
    (
        ["format=qed,vdev=xvda,target=/x"],
        DiskSpec(vdev="xvda", pdev_path="/x", format=DiskFormat.QED),
    ),
    # every access spelling
    (["/x,,hda,r"], DiskSpec(vdev="hda", pdev_path="/x", readwrite=False)),
    (["/x,,hda,ro"], DiskSpec(vdev="hda", pdev_path="/x", readwrite=False)),
    (["/x,,hda,w"], DiskSpec(vdev="hda", pdev_path="/x")),
    # target= eats the rest of the spec, commas and trailing blanks included
    (["vdev=xvda,target=/a,b:c, "], DiskSpec(vdev="xvda", pdev_path="/a,b:c, ")),
    (["vdev=xvda,target=/x,cdrom"], DiskSpec(vdev="xvda", pdev_path="/x,cdrom")),
    # ... and may follow an empty positional target
    ([",,xvda,target=/x"], DiskSpec(vdev="xvda", pdev_path="/x")),
    # backendtype, backend, script, specification, direct-io-safe
    (
        ["backendtype=qdisk,backend=dd,script=block-x,vdev=xvda,target=/x"],
        DiskSpec(
            vdev="xvda",
            pdev_path="/x",
            backend=DiskBackend.QDISK,
            backend_domname="dd",
            script="block-x",
        ),
    ),
    (
        ["backendtype=standalone,specification=virtio,vdev=xvda,target=/x"],
        DiskSpec(
            vdev="xvda",
            pdev_path="/x",
            backend=DiskBackend.STANDALONE,
            specification=DiskSpecification.VIRTIO,
        ),
    ),
    (
        ["specification=xen,direct-io-safe,vdev=xvda,target=/x"],
        DiskSpec(
            vdev="xvda",
            pdev_path="/x",
            specification=DiskSpecification.XEN,
            direct_io_safe=True,
        ),
    ),
    # COLO
    (
        [
            "colo,colo-host=192.0.2.1,colo-port=9000,colo-export=e1,"
            "active-disk=/a.img,hidden-disk=/h.img,vdev=xvda,target=/x"
        ],
        DiskSpec(
            vdev="xvda",
            pdev_path="/x",
            colo_enable=True,
            colo_host="192.0.2.1",
            colo_port=9000,
            colo_export="e1",
            active_disk="/a.img",
            hidden_disk="/h.img",
        ),
    ),
    (["no-colo,vdev=xvda,target=/x"], DiskSpec(vdev="xvda", pdev_path="/x", colo_enable=False)),
    # deprecated prefixes
    (["qcow2:/x,hda"], DiskSpec(vdev="hda", pdev_path="/x", format=DiskFormat.QCOW2)),
    (["vhd:/x,hda"], DiskSpec(vdev="hda", pdev_path="/x", format=DiskFormat.VHD)),
    (["nbd:host:1234,xvda"], DiskSpec(vdev="xvda", pdev_path="host:1234", script="block-nbd")),
    (["enbd:h,xvda"], DiskSpec(vdev="xvda", pdev_path="h", script="block-enbd")),
    (["tap:aio:/x,xvda,w"], DiskSpec(vdev="xvda", pdev_path="/x")),
    (
        ["tap2:tapdisk:ioemu:file:phy:/x,xvda,r"],
        DiskSpec(vdev="xvda", pdev_path="/x", readwrite=False),
    ),
    (["tap:qcow2:/x,xvda"], DiskSpec(vdev="xvda", pdev_path="/x", format=DiskFormat.QCOW2)),
    # "Whitespace may appear before each parameter and will be ignored."
    (["\t /x,  raw,\n hda"], DiskSpec(vdev="hda", pdev_path="/x")),
    # <vdev>:disk, and a cdrom given in two strings
    (["/x,raw,hda:disk"], DiskSpec(vdev="hda", pdev_path="/x")),
    (
        ["/x,,hda", "cdrom"],
        DiskSpec(vdev="hda", pdev_path="/x", removable=True, readwrite=False, is_cdrom=True),
    ),
    # devtype=disk undoes cdrom; the same enum twice is fine
    (["cdrom,devtype=disk,vdev=hda,target=/x"], DiskSpec(vdev="hda", pdev_path="/x")),
    (["format=raw,format=raw,vdev=hda,target=/x"], DiskSpec(vdev="hda", pdev_path="/x")),
    # quirks
    (["/x,,hda,ro", "access=rw"], DiskSpec(vdev="hda", pdev_path="/x")),
    (
        ["/x,,:cdrom"],
        DiskSpec(vdev="", pdev_path="/x", removable=True, readwrite=False, is_cdrom=True),
    ),
    (["foo:bar,,hda"], DiskSpec(vdev="hda", pdev_path="foo:bar")),
    (
        ["cdrom,vdev=hda,format=qcow2"],
        DiskSpec(
            vdev="hda", format=DiskFormat.EMPTY, removable=True, readwrite=False, is_cdrom=True
        ),
    ),
    (["colo-port= +12abc,vdev=hda,target=/x"], DiskSpec(vdev="hda", pdev_path="/x", colo_port=12)),
    (
        ["colo-port=4294967297,vdev=hda,target=/x"],
        DiskSpec(vdev="hda", pdev_path="/x", colo_port=1),
    ),
    (
        ["colo-port=99999999999999999999,vdev=hda,target=/x"],
        DiskSpec(vdev="hda", pdev_path="/x", colo_port=-1),
    ),
    (["/x,,hda,="], DiskSpec(vdev="hda", pdev_path="/x")),
    (["a\nb,,hda"], DiskSpec(vdev="hda", pdev_path="a\nb")),
    (["target=/x\nvdev=hda"], DiskSpec(vdev="hda", pdev_path="/x")),
    (["/x,,hda,,"], DiskSpec(vdev="hda", pdev_path="/x")),
]


@pytest.mark.parametrize(("specs", "expected"), CHECK_XL_DISK_PARSE + MAN_PAGE)
def test_golden(specs: list[str], expected: DiskSpec) -> None:
    assert parse_disk(specs) == expected


def test_golden_counts() -> None:
    assert len(CHECK_XL_DISK_PARSE) == 25  # + foo, trusted, untrusted below = 28 lines
    assert len(CHECK_XL_DISK_PARSE) + len(MAN_PAGE) >= 40


def test_single_string_is_one_spec() -> None:
    assert parse_disk("/dev/vg/guest-volume,,hda") == GUEST


def test_check_xl_disk_parse_json() -> None:
    assert disk_to_libxl_json(GUEST) == {
        "pdev_path": "/dev/vg/guest-volume",
        "vdev": "hda",
        "format": "raw",
        "readwrite": 1,
    }
    assert disk_to_libxl_json(EMPTY_CDROM) == {
        "pdev_path": "",
        "vdev": "hdc",
        "format": "empty",
        "removable": 1,
        "is_cdrom": 1,
    }
    assert disk_to_libxl_json(
        parse_disk(["cdrom", "no-discard", "vdev=hda", "target=/some/disk/image.iso"])
    ) == {
        "pdev_path": "/some/disk/image.iso",
        "vdev": "hda",
        "format": "raw",
        "removable": 1,
        "is_cdrom": 1,
        "discard_enable": "False",
    }
    full = parse_disk(
        "backendtype=qdisk,backend=dd,script=s,direct-io-safe,specification=virtio,"
        "colo,colo-port=-5,vdev=xvda,access=ro,target=/x"
    )
    assert disk_to_libxl_json(full) == {
        "backend_domname": "dd",
        "pdev_path": "/x",
        "vdev": "xvda",
        "backend": "qdisk",
        "format": "raw",
        "script": "s",
        "direct_io_safe": True,
        "specification": "virtio",
        "colo_enable": "True",
        "colo_port": -5,
    }


# (specs, line, col, message start)
ERRORS: list[tuple[list[str], int, int, str]] = [
    # check-xl-disk-parse: `one $e foo`
    (["foo"], 1, 4, "no vdev specified"),
    # check-xl-disk-parse expects flags; 4.17's shipped scanner has no such
    # rule, so "trusted" is the positional target and target= repeats it.
    (
        ["trusted", "vdev=hda", "target=/some/disk/image.raw"],
        3,
        8,
        "target respecified: near `/some",
    ),
    (["untrusted", "vdev=hda", "target=/some/disk/image.raw"], 3, 8, "target respecified"),
    (["vdev=hda"], 1, 9, "no target specified (and device not removable)"),
    ([], 1, 1, "no vdev specified"),
    (["format=bogus,vdev=hda,target=/x"], 1, 8, "unknown value for format: near `bogus'"),
    (["/x,raw ,hda"], 1, 4, "unknown value for format: near `raw '"),
    (["/x,,hda,rx"], 1, 9, "unknown value for access: near `rx'"),
    (["access=no,vdev=hda,target=/x"], 1, 8, "unknown value for access: near `no'"),
    (["backendtype=tapdisk,vdev=hda,target=/x"], 1, 13, "unknown value for backendtype"),
    (["specification=scsi,vdev=hda,target=/x"], 1, 15, "unknown value for specification"),
    (["devtype=floppy,vdev=hda,target=/x"], 1, 1, "unknown value for type: near `devtype=floppy,'"),
    (["colo-port=0,vdev=hda,target=/x"], 1, 11, "unknown value for colo_port: near `0'"),
    (["vdev=hda,vdev=hda,target=/x"], 1, 15, "vdev respecified: near `hda'"),
    (["/x,,hda", "vdev=hdb"], 2, 6, "vdev respecified: near `hdb'"),
    (["format=raw,format=qcow2,vdev=hda,target=/x"], 1, 19, "format respecified: near `qcow2'"),
    (["raw:qcow2:/x,hda"], 1, 5, "format respecified: near `qcow2'"),
    (["iscsi:nbd:/x,hda"], 1, 7, "script respecified: near `block-nbd'"),
    (["backendtype=phy,backendtype=tap,vdev=hda,target=/x"], 1, 29, "backend respecified"),
    (["backend=a,backend=b,vdev=hda,target=/x"], 1, 19, "backend respecified: near `b'"),
    (["foo=bar,vdev=hda,target=/x"], 1, 1, "unknown parameter: near `foo=b'"),
    (["/x,,hda,cdrom=1"], 1, 9, "unknown parameter: near `cdrom=1'"),
    (["foo:/bar,hda"], 1, 1, "unknown deprecated disk prefix: near `foo:'"),
    (["/x, phy2:/y"], 1, 5, "unknown deprecated disk prefix: near `phy2:'"),
    (["/x,raw,hda:floppy"], 1, 12, "unknown deprecated type: near `floppy'"),
    (["/x,raw,hda,ro,extra"], 1, 15, "too many positional parameters: near `extra'"),
    (["/x,,hda,,,"], 1, 10, "too many positional parameters: near `'"),
    (["Format=raw"], 1, 7, "bad disk syntax: near `=raw'"),
    (["/x,,hda,=ro\nrw"], 1, 9, "bad disk syntax: near `=ro'"),
    (["/x,,hda,=\nrw"], 1, 9, "bad disk syntax: near `='"),  # libxlutil exits here
    (["/x,\0,hda"], 1, 4, "NUL character"),
]


@pytest.mark.parametrize(("specs", "line", "col", "message"), ERRORS)
def test_error_place(specs: list[str], line: int, col: int, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_disk(specs, source="guest.cfg")
    err = info.value
    assert (err.source, err.line, err.col) == ("guest.cfg", line, col)
    assert err.message.startswith(message)
    assert "expected" in err.message
    assert str(err).startswith(f"guest.cfg:{line}:{col}: {message}")


def test_errors_after_the_first_are_all_reported() -> None:
    with pytest.raises(ConfigError) as info:
        parse_disk("format=bad,vdev=a,vdev=b,target=/x")
    assert [(p.col, p.message.split(":")[0]) for p in info.value.problems] == [
        (8, "unknown value for format"),
        (24, "vdev respecified"),
    ]


def test_a_failing_string_stops_the_parse() -> None:
    with pytest.raises(ConfigError) as info:
        parse_disk(["/x,,hda,ro,extra", "format=bogus"])
    assert len(info.value.problems) == 1
    assert info.value.line == 1


# ---------------------------------------------------------------- properties

_TEXT = st.text(alphabet=st.sampled_from(list("abcxyz019/._-:= \t\n,éZ'\"")), max_size=12)
_NOCOMMA = _TEXT.map(lambda s: s.replace(",", ""))


@st.composite
def disk_specs(draw: st.DrawFn) -> DiskSpec:
    """DiskSpecs that parse_disk can return (its invariants hold)."""
    is_cdrom = draw(st.booleans())
    pdev: str | None = draw(
        st.one_of(
            st.none() if is_cdrom else st.nothing(),
            _TEXT.map(lambda s: s.replace("\n", "")),
            st.sampled_from(["/dev/vg/a", "", "/x,", "a\nb", " x\ny"]),
        )
    )
    fmt = draw(st.sampled_from([f for f in DiskFormat if f is not DiskFormat.UNKNOWN]))
    if is_cdrom and not pdev:
        fmt = DiskFormat.EMPTY
    opt_text = st.one_of(st.none(), _NOCOMMA)
    opt_bool = st.sampled_from([None, True, False])
    return DiskSpec(
        vdev=draw(_NOCOMMA),
        pdev_path=pdev,
        format=fmt,
        backend=draw(st.sampled_from(DiskBackend)),
        backend_domname=draw(opt_text),
        script=draw(opt_text),
        removable=is_cdrom,
        readwrite=False if is_cdrom else draw(st.booleans()),
        is_cdrom=is_cdrom,
        direct_io_safe=draw(st.booleans()),
        discard_enable=draw(opt_bool),
        specification=draw(st.sampled_from(DiskSpecification)),
        colo_enable=draw(opt_bool),
        colo_host=draw(opt_text),
        colo_port=draw(st.integers(-(2**31), 2**31 - 1)),
        colo_export=draw(opt_text),
        active_disk=draw(opt_text),
        hidden_disk=draw(opt_text),
    )


@settings(max_examples=500)
@given(disk_specs())
def test_format_round_trip(disk: DiskSpec) -> None:
    assert parse_disk(format_disk(disk)) == disk


PIECES = [
    "/dev/x", "/a b", "raw", "qcow2", "vhd", "", "hda", "hdc:cdrom", ":cdrom", "r", "rw",
    "format=raw", "format=", "vdev=hda", "vdev=", "access=ro", "devtype=cdrom", "devtype=disk",
    "cdrom", "discard", "no-discard", "trusted", "colo", "no-colo", "direct-io-safe",
    "backend=d0", "backendtype=phy", "specification=virtio", "script=s", "colo-host=h",
    "colo-port=7", "colo-export=e", "active-disk=a", "hidden-disk=h", "target=/t", "target=/t,x,",
    "target=", "raw:", "qcow2:", "iscsi:", "nbd:", "tap:", "aio:", "phy:", "file:", "a1:b",
    " ", "\t", "\n", "a\nb", "é",
]  # fmt: skip


@settings(max_examples=1000)
@given(st.lists(st.lists(st.sampled_from(PIECES), max_size=6), max_size=3))
def test_parsed_values_round_trip(parts: list[list[str]]) -> None:
    specs = [",".join(p) for p in parts]
    try:
        disk = parse_disk(specs)
    except ConfigError:
        return
    assert parse_disk(format_disk(disk)) == disk


@settings(max_examples=1000)
@given(st.one_of(st.text(max_size=40), st.lists(st.text(max_size=20), max_size=3)))
def test_random_text_raises_only_config_error(spec: str | list[str]) -> None:
    try:
        disk = parse_disk(spec)
    except ConfigError as err:
        assert err.problems
        return
    assert isinstance(disk_to_libxl_json(disk), dict)


def test_format_is_canonical() -> None:
    assert format_disk(GUEST) == "format=raw,vdev=hda,target=/dev/vg/guest-volume"
    assert format_disk(EMPTY_CDROM) == "format=empty,vdev=hdc,access=ro,devtype=cdrom,target="
    assert format_disk(DiskSpec(vdev="a", pdev_path="/x,")) == "format=raw,vdev=a,target=/x,,"
    assert format_disk(DiskSpec(vdev="a", pdev_path="p\nq")) == "p\nq,format=raw,vdev=a"


@pytest.mark.parametrize(
    "disk",
    [
        DiskSpec(vdev="a,b", pdev_path="/x"),
        DiskSpec(vdev="a"),
        DiskSpec(vdev="a", pdev_path="/x", is_cdrom=True, removable=True),
        DiskSpec(vdev="a", pdev_path="x=\ny"),
        DiskSpec(vdev="a", pdev_path="/x", format=DiskFormat.UNKNOWN),
    ],
)
def test_unwritable_disks(disk: DiskSpec) -> None:
    with pytest.raises(ConfigError, match="cannot write this disk"):
        format_disk(disk)
