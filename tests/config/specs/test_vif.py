"""Tests for xenlab.config.specs.vif: xl 4.17's vif spec (xl-network-configuration(5)).

The golden cases come from Xen's own tools/xl/check-xl-vif-parse (45 cases run
through ``xl -N network-attach``, hence ``strict=True``), the man page, and
reading xl_parse.c / libxlu_vif.c; the rate parser is also compared with the
real ``xlu_vif_parse_rate`` (integration).
"""

from __future__ import annotations

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from tests.oracle.libxlu import Libxlu
from xenlab.config.errors import ConfigError, ConfigWarning
from xenlab.config.specs.vif import (
    COLO_KEYS,
    NicType,
    VifSpec,
    format_vif,
    parse_rate,
    parse_vif,
    parse_vif_with_warnings,
    vif_to_libxl_json,
)

# ---------------------------------------------------------------- check-xl-vif-parse

B50 = {"rate_bytes_per_interval": 100000, "rate_interval_usecs": 50000}
K50 = {"rate_bytes_per_interval": 100, "rate_interval_usecs": 50000}
G50 = {"rate_bytes_per_interval": 50000000, "rate_interval_usecs": 50000}
S1 = {"rate_bytes_per_interval": 10000000, "rate_interval_usecs": 1000000}

#: Every case of check-xl-vif-parse, in its order: (spec, JSON or None for rc 1).
CHECK_XL_VIF_PARSE: list[tuple[str, dict[str, object] | None]] = [
    ("foo", None),
    ("rate=foo", None),
    ("rate=foo", None),
    ("rate=10MB", None),
    ("rate=10MB/m", None),
    ("rate=10ZB", None),
    ("rate=10ZB/s", None),
    ("rate=10ZB/m", None),
    ("rate=16000000b/s", B50),
    ("rate=16000000b/s@50ms", B50),
    ("rate=2000000B/s", B50),
    ("rate=2000000B/s@50ms", B50),
    ("rate=16Kb/s", K50),
    ("rate=16Kb/s@50ms", K50),
    ("rate=2KB/s", K50),
    ("rate=2KB/s@50ms", K50),
    ("rate=16Mb/s", B50),
    ("rate=16Mb/s@50ms", B50),
    ("rate=2MB/s", B50),
    ("rate=2MB/s@50ms", B50),
    ("rate=8Gb/s", G50),
    ("rate=8Gb/s@50ms", G50),
    ("rate=1GB/s", G50),
    ("rate=1GB/s@50ms", G50),
    ("rate=4294967296b/s", None),
    ("rate=4294967296Kb/s", None),
    ("rate=4294967296Mb/s", None),
    ("rate=4294967296Gb/s", None),
    ("rate=0B/s", None),
    ("rate=10Mb/s@foo", None),
    ("rate=10Mb/s@10h", None),
    ("rate=10MB/s@foo", None),
    ("rate=10MB/s@10h", None),
    ("rate=80Mb/s@1s", S1),
    ("rate=10MB/s@1s", S1),
    ("rate=1B/s@4294967296us", None),
    ("rate=1B/s@4294968ms", None),
    ("rate=1B/s@4295s", None),
    ("rate=1B/s@0us", None),
    ("rate=4294967295GB/s@5us", None),
    ("rate=4296MB/s@4294s", None),
    ("rate=@", None),
    ("trusted", {"trusted": "True"}),
    ("untrusted", {"trusted": "False"}),
]


def test_check_xl_vif_parse_has_every_case() -> None:
    # The script calls `one` 44 times (grep counts 45 lines: one is `one () {`).
    assert len(CHECK_XL_VIF_PARSE) == 44
    assert sum(1 for spec, _ in CHECK_XL_VIF_PARSE if spec == "rate=foo") == 2
    assert sum(1 for _, expected in CHECK_XL_VIF_PARSE if expected is not None) == 20


@pytest.mark.parametrize(("spec", "expected"), CHECK_XL_VIF_PARSE)
def test_check_xl_vif_parse(spec: str, expected: dict[str, object] | None) -> None:
    # xl -N network-attach 0 SPEC: devid stays -1, parse_nic_config failures fail.
    if expected is None:
        with pytest.raises(ConfigError) as info:
            parse_vif(spec, strict=True)
        assert info.value.line == 1
    else:
        assert vif_to_libxl_json(parse_vif(spec, strict=True)) == expected


ERROR_COLUMNS = [
    ("foo", 1, "unrecognized argument 'foo'"),
    ("rate=foo", 6, "invalid rate 'foo'"),
    ("rate=10MB", 6, "invalid rate '10MB'"),
    ("rate=10ZB/s", 6, "invalid rate '10ZB/s'"),
    ("rate=4294967296b/s", 6, "rate '4294967296b/s' overflows"),
    ("rate=0B/s", 6, "rate '0B/s' is zero"),
    ("rate=10Mb/s@foo", 13, "invalid replenishment interval 'foo'"),
    ("rate=10MB/s@10h", 13, "invalid replenishment interval '10h'"),
    ("rate=1B/s@4294967296us", 11, "replenishment interval '4294967296us' overflows"),
    ("rate=1B/s@4294968ms", 11, "replenishment interval overflow in '4294968ms'"),
    ("rate=1B/s@4295s", 11, "replenishment interval overflow in '4295s'"),
    ("rate=1B/s@0us", 11, "replenishment interval '0us' is zero"),
    ("rate=4294967295GB/s@5us", 6, "bytes per interval do not fit in 64 bits"),
    ("rate=@", 6, "no rate specified"),
    ("bridge=br0, rate=1MB/s@9x", 24, "invalid replenishment interval '9x'"),
    ("model=e1000,devid=x", 19, "failed to convert 'x' to a number for devid="),
    ("mtu=", 5, "failed to convert '' to a number for mtu="),
    ("devid=-1", 7, "failed to convert '-1'"),  # strtoul gives ULONG_MAX
    ("devid=99999999999999999999", 7, "failed to convert"),
    ("bridge=a\0b", 9, "NUL character"),
]


@pytest.mark.parametrize(("spec", "col", "text"), ERROR_COLUMNS)
def test_error_columns(spec: str, col: int, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_vif(spec, strict=True, source="g.cfg")
    err = info.value
    assert (err.source, err.line, err.col) == ("g.cfg", 1, col)
    assert text in err.message
    assert str(err).startswith(f"g.cfg:1:{col}: ")


def test_octal_rate_error_says_octal() -> None:
    with pytest.raises(ConfigError, match=r"is zero, expected at least 1 \(a leading 0"):
        parse_vif("rate=08B/s")


# ---------------------------------------------------------------- man page


def test_man_page_examples() -> None:
    v = parse_vif("mac=00:16:3E:74:3d:76,model=rtl8139,bridge=xenbr0")
    assert v == VifSpec(mac=(0x00, 0x16, 0x3E, 0x74, 0x3D, 0x76), model="rtl8139", bridge="xenbr0")
    assert vif_to_libxl_json(v) == {
        "model": "rtl8139",
        "mac": "00:16:3e:74:3d:76",
        "bridge": "xenbr0",
    }
    assert parse_vif("mac=00:16:3E:74:34:32") == VifSpec(mac=(0, 0x16, 0x3E, 0x74, 0x34, 0x32))
    assert parse_vif("") == VifSpec()
    assert vif_to_libxl_json(parse_vif("")) == {}
    assert parse_vif("mac=00:16:3e:5f:48:e4,bridge=xenbr1").bridge == "xenbr1"


@pytest.mark.parametrize(
    ("rate", "expected"),
    [
        ("10Mb/s", (62500, 50000)),  # 10 megabits a second
        ("250KB/s", (12500, 50000)),  # 250 kilobytes a second
        ("1MB/s@20ms", (20000, 20000)),  # "20,000 bytes replenished every 20,000 us"
        ("1MB/s@20000us", (20000, 20000)),
        ("1MB/s@20000u", (20000, 20000)),  # the regex allows a bare u
        ("1MB/s@2m", (2000, 2000)),  # ... and a bare m (milliseconds)
        ("1MB/s@2", (2000000, 2000000)),  # no unit: seconds
    ],
)
def test_man_page_rates(rate: str, expected: tuple[int, int]) -> None:
    assert parse_rate(rate) == expected
    v = parse_vif(f"rate={rate}")
    assert (v.rate_bytes_per_interval, v.rate_interval_usecs) == expected


def test_every_keyword() -> None:
    spec = (
        "mac=00:16:3e:01:02:03,bridge=xenbr1,gatewaydev=eth1,type=vif,model=e1000,"
        "vifname=web0,script=vif-route,ip=10.0.0.2 10.0.0.3,backend=netdom,rate=1MB/s,"
        "devid=4,mtu=9000,forwarddev=eth2,colo_checkpoint_host=10.0.0.9,trusted"
    )
    v = parse_vif(spec)
    assert v == VifSpec(
        backend_domname="netdom",
        devid=4,
        mtu=9000,
        model="e1000",
        mac=(0, 0x16, 0x3E, 1, 2, 3),
        ip="10.0.0.2 10.0.0.3",
        bridge="xenbr1",
        ifname="web0",
        script="vif-route",
        nictype=NicType.VIF,
        rate_bytes_per_interval=50000,
        rate_interval_usecs=50000,
        gatewaydev="eth1",
        coloft_forwarddev="eth2",
        colo=(("colo_checkpoint_host", "10.0.0.9"),),
        trusted=True,
    )
    # libxl's IDL order, defaults left out.
    assert list(vif_to_libxl_json(v).items()) == [
        ("backend_domname", "netdom"),
        ("devid", 4),
        ("mtu", 9000),
        ("model", "e1000"),
        ("mac", "00:16:3e:01:02:03"),
        ("ip", "10.0.0.2 10.0.0.3"),
        ("bridge", "xenbr1"),
        ("ifname", "web0"),
        ("script", "vif-route"),
        ("nictype", "vif"),
        ("rate_bytes_per_interval", 50000),
        ("rate_interval_usecs", 50000),
        ("gatewaydev", "eth1"),
        ("coloft_forwarddev", "eth2"),
        ("colo_checkpoint_host", "10.0.0.9"),
        ("trusted", "True"),
    ]
    assert format_vif(v) == (
        "backend=netdom,devid=4,mtu=9000,model=e1000,mac=00:16:3e:01:02:03,"
        "ip=10.0.0.2 10.0.0.3,bridge=xenbr1,vifname=web0,script=vif-route,type=vif,"
        "rate=1MB/s,gatewaydev=eth1,forwarddev=eth2,colo_checkpoint_host=10.0.0.9,trusted"
    )


def test_every_colo_key_is_accepted_in_idl_order() -> None:
    assert len(COLO_KEYS) == 48
    spec = ",".join(f"{key}=v{i}" for i, key in reversed(list(enumerate(COLO_KEYS))))
    v, warnings = parse_vif_with_warnings(spec)
    assert warnings == ()
    assert v.colo == tuple((key, f"v{i}") for i, key in enumerate(COLO_KEYS))
    assert list(vif_to_libxl_json(v)) == list(COLO_KEYS)
    assert v.colo_setting("colo_sock_mirror_port") == "v2"
    assert v.colo_setting("colo_checkpoint_port") == "v47"
    assert VifSpec().colo_setting("colo_checkpoint_port") is None


# ---------------------------------------------------------------- xl's quirks


def warnings_of(spec: str) -> list[str]:
    return [w.message for w in parse_vif_with_warnings(spec)[1]]


def test_type_values() -> None:
    assert parse_vif("type=vif").nictype is NicType.VIF
    assert parse_vif("type=ioemu").nictype is NicType.VIF_IOEMU
    assert vif_to_libxl_json(parse_vif("type=ioemu")) == {"nictype": "vif_ioemu"}
    # libxl's own name is not one xl accepts: ignored with a warning.
    v, warnings = parse_vif_with_warnings("type=vif,type=vif_ioemu")
    assert v.nictype is NicType.VIF
    assert warnings == (
        ConfigWarning(
            "vif spec", 1, "column 15: invalid type 'vif_ioemu', expected vif or ioemu; ignored"
        ),
    )
    with pytest.raises(ConfigError) as info:
        parse_vif("type=VIF", strict=True)
    assert info.value.col == 6


@pytest.mark.parametrize(
    ("value", "mac"),
    [
        ("00:16:3E:74:3d:76", (0, 0x16, 0x3E, 0x74, 0x3D, 0x76)),
        ("00-16-3e-74-3d-76", (0, 0x16, 0x3E, 0x74, 0x3D, 0x76)),  # any separator
        ("0:1:2:3:4:5", (0, 1, 2, 3, 4, 5)),  # one digit is enough
        ("00:16:3e:74:3d:76:99", (0, 0x16, 0x3E, 0x74, 0x3D, 0x76)),  # tail ignored
        ("00:16:3e:74:3d:76junk", (0, 0x16, 0x3E, 0x74, 0x3D, 0x76)),
        ("0x0a:0X0b:+c: d:-0:ff", (0x0A, 0x0B, 0x0C, 0x0D, 0, 0xFF)),  # strtoul's extras
        ("100000001:2:3:4:5:6", (1, 2, 3, 4, 5, 6)),  # low 32 bits, then <= 255
        ("0000000000ff:2:3:4:5:6", (0xFF, 2, 3, 4, 5, 6)),
        ("00:00:00:00:00:00", None),  # all-zero: libxl makes one up, as when unset
    ],
)
def test_mac_reader(value: str, mac: tuple[int, ...] | None) -> None:
    v, warnings = parse_vif_with_warnings(f"mac={value}")
    assert warnings == ()
    assert v.mac == mac


@pytest.mark.parametrize(
    ("value", "col", "kept"),
    [
        ("00:16:3e:zz:00:01", 14, (0, 0x16, 0x3E, 0, 0, 0)),  # octets before stay set
        ("00:16:3e:100:00:01", 14, (0, 0x16, 0x3E, 0, 0, 0)),  # > 255
        ("00:16:3e", 13, (0, 0x16, 0x3E, 0, 0, 0)),  # too short: C reads past the item
        ("00:16:3e:", 14, (0, 0x16, 0x3E, 0, 0, 0)),
        ("", 5, None),
        ("-1:0:0:0:0:0", 5, None),
        ("g0:16:3e:74:3d:76", 5, None),
    ],
)
def test_bad_mac(value: str, col: int, kept: tuple[int, ...] | None) -> None:
    v, warnings = parse_vif_with_warnings(f"mac={value}")
    assert v.mac == kept
    assert len(warnings) == 1
    assert warnings[0].message.startswith(f"column {col}: invalid mac {value!r}")
    with pytest.raises(ConfigError) as info:
        parse_vif(f"mac={value}", strict=True)
    assert info.value.col == col


def test_bad_mac_overwrites_part_of_an_earlier_one() -> None:
    v = parse_vif("mac=11:22:33:44:55:66,mac=77:88:zz")
    assert v.mac == (0x77, 0x88, 0x33, 0x44, 0x55, 0x66)


def test_items_are_cut_like_strtok() -> None:
    # Empty items vanish; leading spaces go, tabs and trailing spaces stay.
    v, warnings = parse_vif_with_warnings(",, bridge=xenbr0 ,  model=e1000,")
    assert v == VifSpec(bridge="xenbr0 ", model="e1000")
    assert warnings == ()
    v, warnings = parse_vif_with_warnings("\tbridge=x")
    assert v == VifSpec()
    assert [w.message for w in warnings] == [
        "column 1: unrecognized argument '\\tbridge=x', unknown key '\\tbridge'; ignored"
    ]
    # An item of spaces is an empty argument, which xl does not know.
    assert warnings_of("bridge=x,   ") == [
        "column 13: unrecognized argument '', expected key=value, trusted or untrusted; ignored"
    ]


def test_values_keep_equals_signs_and_last_one_wins() -> None:
    v = parse_vif("script=vif-bridge,ip=a=b,script=/etc/xen/scripts/vif-nat")
    assert v.ip == "a=b"
    assert v.script == "/etc/xen/scripts/vif-nat"
    assert parse_vif("bridge=").bridge == ""
    assert vif_to_libxl_json(parse_vif("bridge=")) == {"bridge": ""}


def test_keys_are_exact() -> None:
    assert warnings_of("mac =00:16:3e:00:00:01") == [
        "column 1: unrecognized argument 'mac =00:16:3e:00:00:01', unknown key 'mac '; ignored"
    ]
    assert warnings_of("Bridge=x") == [
        "column 1: unrecognized argument 'Bridge=x', unknown key 'Bridge'; ignored"
    ]
    assert warnings_of("trusted=1")[0].startswith("column 1: unrecognized argument 'trusted=1'")
    assert warnings_of("trusted ")[0].startswith("column 1: unrecognized argument 'trusted '")


def test_trusted_flags() -> None:
    assert parse_vif("trusted").trusted is True
    assert parse_vif("untrusted").trusted is False
    assert parse_vif("trusted,untrusted").trusted is False
    assert parse_vif("bridge=x").trusted is None


def test_deprecated_keys_warn_but_work() -> None:
    v, warnings = parse_vif_with_warnings("netdev=eth0,accel=foo", strict=True)
    assert v == VifSpec(gatewaydev="eth0")
    assert [w.message for w in warnings] == [
        "column 1: netdev= is deprecated, use gatewaydev= instead",
        "column 13: accel= is not supported for vifs; ignored",
    ]


def test_unknown_key_warns_with_place() -> None:
    v, warnings = parse_vif_with_warnings("bridge=xenbr0,vlan=10", source="dom.cfg")
    assert v == VifSpec(bridge="xenbr0")
    assert warnings == (
        ConfigWarning(
            "dom.cfg", 1, "column 15: unrecognized argument 'vlan=10', unknown key 'vlan'; ignored"
        ),
    )
    assert str(warnings[0]) == (
        "dom.cfg:1: warning: column 15: "
        "unrecognized argument 'vlan=10', unknown key 'vlan'; ignored"
    )
    with pytest.raises(ConfigError) as info:
        parse_vif("bridge=xenbr0,vlan=10", strict=True, source="dom.cfg")
    assert (info.value.line, info.value.col) == (1, 15)


@pytest.mark.parametrize(
    ("spec", "devid", "mtu"),
    [
        ("devid=3", 3, None),
        ("devid=0", 0, None),
        ("devid= +7", 7, None),  # strtoul skips blanks, takes a sign
        ("devid=12abc", 12, None),  # and stops at the first non-digit
        ("devid=0x10", 0, None),  # base 10
        ("devid=-2", -2, None),  # ULONG_MAX-1 into an int
        ("devid=4294967295", None, None),  # (int) 0xffffffff is -1: unset
        ("devid=4294967296", 0, None),  # low 32 bits
        ("mtu=1500", None, 1500),
        ("mtu=0", None, None),  # libxl's "default"
        ("mtu=2147483648", None, -2147483648),
    ],
)
def test_numbers(spec: str, devid: int | None, mtu: int | None) -> None:
    v = parse_vif(spec)
    assert (v.devid, v.mtu) == (devid, mtu)


@pytest.mark.parametrize(
    ("rate", "expected"),
    [
        ("010B/s", (0, 50000)),  # octal 8 bytes/s, 0.4 byte per 50 ms
        ("010B/s@1s", (8, 1000000)),
        ("0100KB/s@1s", (64000, 1000000)),
        ("018b/s@1s", (0, 1000000)),  # octal 1, then "8b": the 'b' one further on
        ("0188Mb/s@1s", (1, 1000000)),  # octal 1; no unit is seen at all
        ("1MB/s@0189ms", (1, 1)),  # octal 1, unit check sees '8': microseconds
        ("1MB/s@010ms", (8000, 8000)),
        ("7b/s", (0, 50000)),  # zero bytes a second is accepted (= unlimited)
        ("8b/s@1s", (1, 1000000)),
        ("4294967295B/s@1us", (4294, 1)),
        ("1GB/s@4294s", (4294000000000, 4294000000)),
    ],
)
def test_rate_quirks(rate: str, expected: tuple[int, int]) -> None:
    assert parse_rate(rate) == expected


def test_rate_error_place_is_inside_the_rate_text() -> None:
    with pytest.raises(ConfigError) as info:
        parse_rate("10Mb/s@10h", source="rate")
    assert (info.value.source, info.value.col) == ("rate", 8)


def test_base_seeds_defaults_and_devid() -> None:
    # xl seeds the list index and xl.conf's vif.default.* before parsing.
    base = VifSpec(devid=2, bridge="xenbr1", script="vif-openvswitch")
    assert parse_vif("mac=00:16:3e:00:00:01", base=base) == VifSpec(
        devid=2, bridge="xenbr1", script="vif-openvswitch", mac=(0, 0x16, 0x3E, 0, 0, 1)
    )
    assert parse_vif("bridge=xenbr0,devid=7", base=base).devid == 7
    assert parse_vif("bridge=xenbr0", base=base).bridge == "xenbr0"


def test_json_leaves_out_defaults() -> None:
    assert vif_to_libxl_json(VifSpec()) == {}
    assert vif_to_libxl_json(VifSpec(devid=-1, mtu=0, mac=(0, 0, 0, 0, 0, 0))) == {}
    assert vif_to_libxl_json(VifSpec(devid=0)) == {"devid": 0}
    assert vif_to_libxl_json(parse_vif("rate=7b/s")) == {"rate_interval_usecs": 50000}


# ---------------------------------------------------------------- format_vif


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("", ""),
        (
            "mac=00:16:3E:74:3d:76,model=rtl8139,bridge=xenbr0",
            "model=rtl8139,mac=00:16:3e:74:3d:76,bridge=xenbr0",
        ),
        ("rate=16000000b/s", "rate=2MB/s"),
        ("rate=10Mb/s", "rate=10Mb/s"),
        ("rate=250KB/s@50000us", "rate=2Mb/s"),  # the largest exact unit
        ("rate=1MB/s@20ms", "rate=1MB/s@20ms"),
        ("rate=80Mb/s@1s", "rate=10MB/s@1s"),
        ("rate=7b/s", "rate=1b/s"),
        ("rate=7b/s@1s", "rate=1b/s@1s"),
        ("rate=1MB/s@0189ms", "rate=1MB/s@1us"),
        ("rate=1B/s@0189ms", "rate=1b/s@1us"),
        ("rate=4294967295GB/s@4us", "rate=4294967295GB/s@4us"),
        ("rate=3B/s@7us", "rate=1b/s@7us"),
        ("untrusted,netdev=eth0,vifname=v", "vifname=v,gatewaydev=eth0,untrusted"),
        ("type=ioemu,devid=4294967294", "devid=-2,type=ioemu"),
    ],
)
def test_format_canonical(spec: str, canonical: str) -> None:
    v = parse_vif(spec)
    assert format_vif(v) == canonical
    assert parse_vif(canonical) == v


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (VifSpec(bridge="a,b"), "cannot hold ','"),
        (VifSpec(rate_bytes_per_interval=5, rate_interval_usecs=0), "rate interval 0 us"),
        (
            VifSpec(rate_bytes_per_interval=1, rate_interval_usecs=4_000_000_000),
            "no rate=... gives",
        ),
    ],
)
def test_format_refuses_what_no_spec_expresses(value: VifSpec, text: str) -> None:
    with pytest.raises(ConfigError, match="format_vif:1:1: .*" + text):
        format_vif(value)


# ---------------------------------------------------------------- properties

_VALUE = st.text(st.characters(exclude_characters=",\0", codec="utf-8"), max_size=12)
_INT32 = st.integers(-(2**31), 2**31 - 1)
_COUNT = st.one_of(
    st.integers(1, 2**32 - 1),
    st.sampled_from([1, 7, 8, 9, 10, 99, 4294967295]),
)
_RATE_TEXT = st.builds(
    lambda count, unit, interval: f"{count}{unit}/s{interval}",
    _COUNT,
    st.sampled_from(["B", "b", "KB", "Kb", "MB", "Mb", "GB", "Gb"]),
    st.one_of(
        st.just(""),
        st.builds(
            lambda n, u: f"@{n}{u}",
            st.integers(1, 2**32 - 1),
            st.sampled_from(["", "s", "ms", "us"]),
        ),
    ),
)


@st.composite
def _rates(draw: st.DrawFn) -> tuple[int, int]:
    if draw(st.booleans()):
        return (0, 0)
    try:
        return parse_rate(draw(_RATE_TEXT))
    except ConfigError:
        assume(False)
        raise


@st.composite
def vif_specs(draw: st.DrawFn) -> VifSpec:
    """Every VifSpec a vif spec can produce."""
    maybe = st.none() | _VALUE
    mac = draw(st.none() | st.tuples(*[st.integers(0, 255)] * 6))
    if mac is not None and not any(mac):
        mac = None
    colo_keys = draw(st.lists(st.sampled_from(COLO_KEYS), unique=True, max_size=4))
    colo = tuple(
        sorted(((k, draw(_VALUE)) for k in colo_keys), key=lambda kv: COLO_KEYS.index(kv[0]))
    )
    per_interval, usecs = draw(_rates())
    return VifSpec(
        backend_domname=draw(maybe),
        devid=draw(st.none() | _INT32.filter(lambda n: n != -1)),
        mtu=draw(st.none() | _INT32.filter(bool)),
        model=draw(maybe),
        mac=mac,
        ip=draw(maybe),
        bridge=draw(maybe),
        ifname=draw(maybe),
        script=draw(maybe),
        nictype=draw(st.sampled_from(NicType)),
        rate_bytes_per_interval=per_interval,
        rate_interval_usecs=usecs,
        gatewaydev=draw(maybe),
        coloft_forwarddev=draw(maybe),
        colo=colo,
        trusted=draw(st.none() | st.booleans()),
    )


@given(vif_specs())
def test_format_round_trip(v: VifSpec) -> None:
    text = format_vif(v)
    parsed, warnings = parse_vif_with_warnings(text, strict=True)
    assert parsed == v
    assert warnings == ()
    assert format_vif(parsed) == text


@given(_RATE_TEXT)
@example("4294967295GB/s@4us")
@example("1b/s@4294967295us")
def test_rate_format_round_trip(rate: str) -> None:
    try:
        numbers = parse_rate(rate)
    except ConfigError:
        return
    canonical = format_vif(
        VifSpec(rate_bytes_per_interval=numbers[0], rate_interval_usecs=numbers[1])
    )
    assert parse_rate(canonical.removeprefix("rate=")) == numbers


_SPEC_ALPHABET = st.sampled_from(
    [*"=,@:/ \t-0123456789abcdefxBbKMGsmu", "mac=", "rate=", "devid=", "mtu=", "type=", "trusted"]
)


@given(st.one_of(st.text(), st.lists(_SPEC_ALPHABET, max_size=20).map("".join)), st.booleans())
@example("rate=99999999999999999999999999B/s", False)
@example("mac=" + "f" * 40, False)
def test_random_text_only_raises_config_error(spec: str, strict: bool) -> None:
    try:
        v = parse_vif(spec, strict=strict)
    except ConfigError as err:
        assert err.line == 1
        assert 1 <= err.col <= len(spec) + 1
        return
    # Whatever parses, libxl's JSON form exists and the canonical text re-parses.
    vif_to_libxl_json(v)
    try:
        text = format_vif(v)
    except ConfigError:
        # Only values holding ',' cannot be written back (xl splits on it
        # before anything else, so none can come from a spec): never here.
        raise
    assert parse_vif(text) == v


# ---------------------------------------------------------------- the real libxlutil


@pytest.mark.integration
@given(
    st.one_of(
        _RATE_TEXT,
        st.lists(st.sampled_from(list("0123456789@BbKMGsmu/")), max_size=14).map("".join),
    )
)
@example("0189Mb/s@0189ms")
@example("4296MB/s@4294s")
@example("4294967295GB/s@4us")
@example("@")
def test_rate_matches_libxlutil(libxlu: Libxlu, rate: str) -> None:
    theirs = libxlu.parse_vif_rate(rate)
    try:
        ours = parse_rate(rate)
    except ConfigError as err:
        assert not theirs.ok, f"we refuse what libxlutil accepts: {err}"
        return
    assert theirs.ok, f"we accept what libxlutil refuses: {theirs.report}"
    assert theirs.json is not None
    assert ours == (
        theirs.json.get("rate_bytes_per_interval", 0),
        theirs.json.get("rate_interval_usecs", 0),
    )


@pytest.mark.integration
@pytest.mark.parametrize(
    ("spec", "expected"), [(s, e) for s, e in CHECK_XL_VIF_PARSE if s.startswith("rate=")]
)
def test_check_xl_vif_parse_rates_match_libxlutil(
    libxlu: Libxlu, spec: str, expected: dict[str, object] | None
) -> None:
    theirs = libxlu.parse_vif_rate(spec.removeprefix("rate="))
    assert theirs.ok == (expected is not None)
    if expected is not None:
        assert theirs.json == expected
