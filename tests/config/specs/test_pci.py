"""Tests for xenlab.config.specs.pci: libxlutil 4.17's PCI_SPEC_STRING (xl-pci-configuration(5)).

GOLDEN and ERRORS are also run against the real library in test_pci_oracle.py,
so every expectation here is libxlutil's own answer.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from xenlab.config.errors import ConfigError
from xenlab.config.specs.pci import (
    PCI_FUNC_ALL,
    PciSpec,
    RdmPolicy,
    format_pci,
    parse_bdf,
    parse_pci,
    pci_to_libxl_json,
)

ALL = PCI_FUNC_ALL

#: Accepted specs and libxl's JSON for them (libxl_device_pci_to_json).
GOLDEN: list[tuple[str, dict[str, object]]] = [
    # -- the man page's forms, with a slot that exists (its own @20 does not)
    ("36:00.0@1f,seize=1", {"bus": 0x36, "vdevfn": 0xF8, "vfunc_mask": 1, "seize": True}),
    ("36:00.0,vslot=1f,seize=1", {"bus": 0x36, "vdevfn": 0xF8, "vfunc_mask": 1, "seize": True}),
    ("bdf=36:00.0,vslot=1f,seize=1", {"bus": 0x36, "vdevfn": 0xF8, "vfunc_mask": 1, "seize": True}),
    ("0000:03:00.0", {"bus": 3, "vfunc_mask": 1}),
    ("03:00.0", {"bus": 3, "vfunc_mask": 1}),
    ("03:00.*", {"bus": 3, "vfunc_mask": ALL}),
    ("0000:03:1f.7@08", {"func": 7, "dev": 0x1F, "bus": 3, "vdevfn": 0x40, "vfunc_mask": 1}),
    ("ffff:ff:1f.7", {"func": 7, "dev": 0x1F, "bus": 0xFF, "domain": 0xFFFF, "vfunc_mask": 1}),
    ("0001:0a:1B.3", {"func": 3, "dev": 0x1B, "bus": 0x0A, "domain": 1, "vfunc_mask": 1}),
    ("name=nic0", {"name": "nic0"}),
    ("name=nic0,vslot=3,permissive=1", {"vdevfn": 0x18, "permissive": True, "name": "nic0"}),
    (
        "03:00.0,permissive=1,msitranslate=1,power_mgmt=1,seize=1",
        {
            "bus": 3,
            "vfunc_mask": 1,
            "msitranslate": True,
            "power_mgmt": True,
            "permissive": True,
            "seize": True,
        },
    ),
    ("03:00.0,rdm_policy=relaxed", {"bus": 3, "vfunc_mask": 1, "rdm_policy": "relaxed"}),
    ("03:00.0,rdm_policy=strict", {"bus": 3, "vfunc_mask": 1, "rdm_policy": "strict"}),
    # -- what the code does beyond the man page
    ("03:00.0,rdm_policy=Strict", {"bus": 3, "vfunc_mask": 1, "rdm_policy": "strict"}),
    ("03:00.0,rdm_policy=INVALID", {"bus": 3, "vfunc_mask": 1}),  # a libxl name: "unset"
    ("bdf=03:00.0", {"bus": 3, "vfunc_mask": 1}),
    ("vslot=2,bdf=03:00.1", {"func": 1, "bus": 3, "vdevfn": 0x10, "vfunc_mask": 1}),
    ("03:00.0,", {"bus": 3, "vfunc_mask": 1}),  # one trailing comma is fine
    ("03:00.0,permissive=0", {"bus": 3, "vfunc_mask": 1}),
    ("03:00.0,permissive=yes", {"bus": 3, "vfunc_mask": 1}),  # atoi("yes") == 0
    ("03:00.0,permissive=2", {"bus": 3, "vfunc_mask": 1, "permissive": True}),
    ("03:00.0,permissive= -7x", {"bus": 3, "vfunc_mask": 1, "permissive": True}),
    ("03:00.0,seize=4294967296", {"bus": 3, "vfunc_mask": 1}),  # (int) keeps 32 bits
    ("03:00.0,seize=99999999999999999999", {"bus": 3, "vfunc_mask": 1, "seize": True}),
    ("03:00.0,seize=-99999999999999999999", {"bus": 3, "vfunc_mask": 1}),  # LONG_MIN -> 0
    ("03:00.0,permissive=", {"bus": 3, "vfunc_mask": 1}),
    ("bdf=03:00.1zz", {"func": 1, "bus": 3, "vfunc_mask": 1}),  # bdf= ignores a tail
    ("vslot=1fzz,bdf=0:0.0", {"vdevfn": 0xF8, "vfunc_mask": 1}),  # so does vslot=
    ("name=a=b", {"name": "a=b"}),
    ("name=", {"name": ""}),  # empty is a name, not "default"
    ("name=x,name=y", {"name": "y"}),  # the last one wins
    ("bdf=01:00.0,bdf=02:00.1", {"func": 1, "bus": 2, "vfunc_mask": 1}),
    ("03:00.0@08,vslot=09", {"bus": 3, "vdevfn": 0x48, "vfunc_mask": 1}),
    ("0:0x1f.0", {"dev": 0x1F, "vfunc_mask": 1}),  # sscanf %x takes 0x
    ("00: 1. 0x7", {"func": 7, "dev": 1, "vfunc_mask": 1}),  # ... and blanks
    ("00:01.0x", {"dev": 1, "vfunc_mask": 1}),  # ... and a bare 0x
    ("00:01.-0", {"dev": 1, "vfunc_mask": 1}),  # ... and a sign
    ("00:+1.+2", {"func": 2, "dev": 1, "vfunc_mask": 1}),
    ("100000001:00.0", {"bus": 1, "vfunc_mask": 1}),  # one ':' so no domain; low 32 bits
    ("00:01.1@0x", {"func": 1, "dev": 1, "vfunc_mask": 1}),
    ("00:01.1@ 1", {"func": 1, "dev": 1, "vdevfn": 8, "vfunc_mask": 1}),
]

#: Refused specs: (spec, 1-based column, part of the message).
ERRORS: list[tuple[str, int, str]] = [
    ("36:00.0@20,seize=1", 9, "virtual slot 0x20 is out of range"),  # the man page's own
    ("36:00.0,vslot=20,seize=1", 15, "virtual slot 0x20 is out of range"),
    ("bdf=36:00.0,vslot=20,seize=1", 19, "virtual slot 0x20 is out of range"),
    ("", 1, "expected a BDF ([DDDD:]BB:DD.F) or name="),
    ("permissive=1", 1, "expected a BDF ([DDDD:]BB:DD.F) or name="),
    ("vslot=3,name=x,bdf=00:01.0", 9, "name= cannot be combined with a BDF"),
    ("03:00.0,name=x", 9, "name= cannot be combined with a BDF"),
    ("03:00.0,rdm_policy=", 20, "unknown rdm_policy ''"),
    ("03:00.0,rdm_policy=host", 20, "unknown rdm_policy 'host'"),
    ("03:00.0,,seize=1", 9, "unknown option ',seize'"),  # the key runs to the '='
    ("03:00.0,foo=1", 9, "unknown option 'foo'"),
    ("03:00.0,Permissive=1", 9, "unknown option 'Permissive'"),
    ("03:00.0,permissive", 9, "expected key=value, got 'permissive'"),
    ("03:00.0;seize=1", 8, "unexpected ';' after the BDF"),
    ("03:00.0 ", 8, "unexpected ' ' after the BDF"),
    (" 03:00.0", 1, "not a BDF or key=value"),
    ("0:0:0:0.0", 1, "not a BDF or key=value"),
    ("name", 1, "not a BDF or key=value"),
    ("00:01.0@", 9, "expected a virtual slot number"),
    ("00:01.0@20", 9, "virtual slot 0x20 is out of range"),
    ("00:01.0@-1", 9, "virtual slot 0xffffffff is out of range"),
    ("10000:00:00.0", 1, "domain 0x10000 is out of range"),
    ("0:100:00.0", 3, "bus 0x100 is out of range"),
    ("00:100.0", 4, "device 0x100 is out of range"),
    ("00:20.0", 4, "device 0x20 is out of range"),
    ("00:1f.8", 7, "function 0x8 is out of range"),
    ("00:1f.8,permissive=1", 7, "function 0x8 is out of range"),
    ("00:1f.g", 7, "expected a function number"),
    ("00:1f.*x", 8, "unexpected 'x' after the BDF"),
    ("00:1f.0xg", 9, "unexpected 'g' after the BDF"),
    ("00:.0", 4, "expected a hexadecimal number"),
    ("00:01", 6, "expected '.'"),  # libxlutil reads an uninitialised length here
    ("bdf=00:01.9", 11, "function 0x9 is out of range"),
    ("bdf=,name=x", 5, "not a BDF"),
    ("vslot=,name=x", 7, "expected a virtual slot number"),
    ("name=x\0y", 7, "NUL character"),
]


def test_golden_counts() -> None:
    assert len(GOLDEN) >= 25
    assert len(ERRORS) >= 25


@pytest.mark.parametrize(("spec", "expected"), GOLDEN)
def test_golden(spec: str, expected: dict[str, object]) -> None:
    p = parse_pci(spec)
    assert pci_to_libxl_json(p) == expected
    assert parse_pci(format_pci(p)) == p


@pytest.mark.parametrize(("spec", "col", "text"), ERRORS)
def test_errors(spec: str, col: int, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_pci(spec, source="dom.cfg")
    err = info.value
    assert (err.source, err.line, err.col) == ("dom.cfg", 1, col)
    assert text in err.message
    assert str(err).startswith(f"dom.cfg:1:{col}: ")


def test_typed_value() -> None:
    p = parse_pci("0000:03:1f.7@08,permissive=1,rdm_policy=relaxed")
    assert p == PciSpec(
        domain=0,
        bus=3,
        dev=0x1F,
        func=7,
        vdevfn=0x40,
        vfunc_mask=1,
        permissive=True,
        rdm_policy=RdmPolicy.RELAXED,
    )
    assert p.vslot == 8
    assert p.bdf == "0000:03:1f.7"
    assert not p.all_functions
    q = parse_pci("03:00.*")
    assert (q.func, q.vfunc_mask, q.all_functions, q.bdf, q.vslot) == (
        0,
        ALL,
        True,
        "0000:03:00.*",
        None,
    )
    r = parse_pci("name=gpu")
    assert (r.name, r.vfunc_mask, r.domain, r.bus, r.dev, r.func) == ("gpu", 0, 0, 0, 0, 0)


def test_json_key_order_is_libxl_idl_order() -> None:
    p = parse_pci(
        "0001:02:03.4@05,msitranslate=1,power_mgmt=1,permissive=1,seize=1,rdm_policy=strict"
    )
    assert list(pci_to_libxl_json(p)) == [
        "func",
        "dev",
        "bus",
        "domain",
        "vdevfn",
        "vfunc_mask",
        "msitranslate",
        "power_mgmt",
        "permissive",
        "seize",
        "rdm_policy",
    ]
    assert pci_to_libxl_json(PciSpec()) == {}


def test_base_seeds_global_options() -> None:
    # xl copies pci_permissive= etc. and the rdm= policy in before parsing.
    base = PciSpec(permissive=True, seize=True, rdm_policy=RdmPolicy.STRICT)
    p = parse_pci("03:00.0,seize=0", base=base)
    assert p == PciSpec(
        bus=3, vfunc_mask=1, permissive=True, seize=False, rdm_policy=RdmPolicy.STRICT
    )


def test_parse_bdf_is_xlu_pci_parse_bdf() -> None:
    assert parse_bdf("0000:03:00.1") == PciSpec(bus=3, func=1, vfunc_mask=1)
    assert parse_bdf("03:00.*") == PciSpec(bus=3, vfunc_mask=ALL)
    assert parse_bdf("03:00.1,whatever") == PciSpec(bus=3, func=1, vfunc_mask=1)
    with pytest.raises(ConfigError) as info:
        parse_bdf("03:00.9", source="arg")
    assert (info.value.source, info.value.col) == ("arg", 7)


# ---------------------------------------------------------------- format_pci


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("0000:03:00.0", "03:00.0"),
        ("ffff:ff:1f.7@1f", "ffff:ff:1f.7@1f"),
        ("03:00.*", "03:00.*"),
        ("bdf=36:0.0,vslot=0x1f,seize=7", "36:00.0@1f,seize=1"),
        ("name=gpu,vslot=3,rdm_policy=RELAXED", "name=gpu,vslot=03,rdm_policy=relaxed"),
        ("03:00.0,permissive=1,msitranslate=1", "03:00.0,msitranslate=1,permissive=1"),
        ("03:00.0,rdm_policy=invalid", "03:00.0"),
        ("name=", "name="),
    ],
)
def test_format_canonical(spec: str, canonical: str) -> None:
    p = parse_pci(spec)
    assert format_pci(p) == canonical
    assert parse_pci(canonical) == p


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (PciSpec(), "function 0 with vfunc_mask 0x0"),
        (PciSpec(bus=1, vfunc_mask=1, name="x"), "has no BDF fields"),
        (PciSpec(name="a,b"), "cannot hold ','"),
        (PciSpec(vfunc_mask=1, vdevfn=3), "not a slot number"),
        (PciSpec(vfunc_mask=1, dev=0x20), "out of range"),
        (PciSpec(vfunc_mask=ALL, func=2), "vfunc_mask 0xffffffff"),
    ],
)
def test_format_refuses_what_no_spec_expresses(value: PciSpec, text: str) -> None:
    with pytest.raises(ConfigError, match="format_pci:1:1: .*" + text):
        format_pci(value)


# ---------------------------------------------------------------- properties


@st.composite
def pci_specs(draw: st.DrawFn) -> PciSpec:
    """Every PciSpec a pci spec can produce (with libxl's initial base)."""
    common = {
        "vdevfn": draw(st.integers(0, 0x1F)) << 3,
        "msitranslate": draw(st.booleans()),
        "power_mgmt": draw(st.booleans()),
        "permissive": draw(st.booleans()),
        "seize": draw(st.booleans()),
        "rdm_policy": draw(st.sampled_from(RdmPolicy)),
    }
    if draw(st.booleans()):
        name = draw(st.text(st.characters(exclude_characters=",\0", codec="utf-8"), max_size=10))
        return PciSpec(name=name, **common)
    every = draw(st.booleans())
    return PciSpec(
        domain=draw(st.integers(0, 0xFFFF)),
        bus=draw(st.integers(0, 0xFF)),
        dev=draw(st.integers(0, 0x1F)),
        func=0 if every else draw(st.integers(0, 7)),
        vfunc_mask=ALL if every else 1,
        **common,
    )


@given(pci_specs())
def test_format_round_trip(p: PciSpec) -> None:
    text = format_pci(p)
    assert parse_pci(text) == p
    assert format_pci(parse_pci(text)) == text


_HEXISH = st.sampled_from(
    ["0", "00", "1", "7", "8", "1f", "20", "ff", "100", "ffff", "10000", "0x1", "0x", "-0",
     "-1", " 1", "+3", "100000001", "*", "a", "g", ""]
)  # fmt: skip
_OPTION = st.one_of(
    st.tuples(
        st.sampled_from(["permissive", "msitranslate", "seize", "power_mgmt"]),
        st.sampled_from(["0", "1", "2", "-1", "yes", "4294967296", " 7", ""]),
    ),
    st.tuples(st.just("rdm_policy"), st.sampled_from(["strict", "RELAXED", "invalid", "x", ""])),
    st.tuples(st.just("name"), st.sampled_from(["nic0", "", "a=b"])),
    st.tuples(st.just("vslot"), _HEXISH),
    st.tuples(st.sampled_from(["foo", "", "Seize"]), st.just("1")),
).map(lambda kv: f"{kv[0]}={kv[1]}")


@st.composite
def bdf_texts(draw: st.DrawFn) -> str:
    """BDF-shaped text, mostly well formed, with sscanf's odd corners."""
    numbers = [draw(_HEXISH) for _ in range(draw(st.sampled_from([2, 3])))]
    dot = draw(st.sampled_from([".", ".", ".", ":", ""]))
    return ":".join(numbers) + dot + draw(_HEXISH)


@st.composite
def pci_spec_texts(draw: st.DrawFn) -> str:
    """Spec-shaped text: an optional BDF[@slot], then options, sometimes noise."""
    items = []
    if draw(st.booleans()):
        head = draw(bdf_texts())
        if draw(st.booleans()):
            head += "@" + draw(_HEXISH)
        items.append(head)
    if draw(st.booleans()):
        items.append("bdf=" + draw(bdf_texts()) + draw(st.sampled_from(["", "zz"])))
    items += draw(st.lists(_OPTION, max_size=3))
    text = ",".join(items)
    return text + draw(st.sampled_from(["", "", ",", ",,", " "]))


@given(
    st.one_of(
        pci_spec_texts(),
        st.text(),
        st.lists(st.sampled_from(list("0123456789abcdefx:.*@,= g")), max_size=16).map("".join),
    )
)
@example("0" * 5000 + ":00.0")
@example("00:01.0@" + "f" * 100)
def test_random_text_only_raises_config_error(spec: str) -> None:
    try:
        p = parse_pci(spec)
    except ConfigError as err:
        assert err.line == 1
        assert 1 <= err.col <= len(spec) + 1
        return
    pci_to_libxl_json(p)
    assert parse_pci(format_pci(p)) == p
