"""Differential tests: parse_pci against Debian's real libxlutil 4.17.

Agreement must be exact: the same verdict and, when both accept, the same
libxl JSON (``libxl_device_pci_to_json``).  Two kinds of input are left out,
both documented in xenlab/config/specs/pci.py: a NUL character (a C string
cannot hold one; the oracle refuses it), and a BDF whose ``.F`` is missing,
where libxlutil reads an uninitialised ``%n`` length (undefined behaviour;
we always refuse).
"""

from __future__ import annotations

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from tests.config.specs.test_pci import ERRORS, GOLDEN, pci_spec_texts
from tests.oracle.libxlu import Libxlu, OracleRefuses
from xenlab.config.errors import ConfigError
from xenlab.config.specs.pci import _bdf_is_undefined, parse_pci, pci_to_libxl_json

pytestmark = pytest.mark.integration


def undefined_in_c(spec: str) -> bool:
    """Whether libxlutil's answer on ``spec`` depends on an uninitialised variable."""
    if _bdf_is_undefined(spec):
        return True
    # bdf= values: the key runs to the first '=', the value to the next ','.
    pos = 0
    while True:
        eq = spec.find("=", pos)
        if eq < 0:
            return False
        comma = spec.find(",", eq + 1)
        end = len(spec) if comma < 0 else comma
        if spec[pos:eq].endswith("bdf") and _bdf_is_undefined(spec[eq + 1 : end]):
            return True
        if comma < 0:
            return False
        pos = comma + 1


def agree(libxlu: Libxlu, spec: str) -> bool:
    """Parse ``spec`` both ways, assert agreement, return the verdict."""
    theirs = libxlu.parse_pci(spec)
    try:
        ours = parse_pci(spec)
    except ConfigError as err:
        assert not theirs.ok, f"we refuse what libxlutil accepts ({theirs.json}): {err}"
        return False
    assert theirs.ok, f"we accept what libxlutil refuses (rc {theirs.rc}): {spec!r}"
    assert pci_to_libxl_json(ours) == theirs.json
    return True


@pytest.mark.parametrize(("spec", "expected"), GOLDEN)
def test_golden_matches_libxlutil(libxlu: Libxlu, spec: str, expected: dict[str, object]) -> None:
    assert agree(libxlu, spec)
    assert libxlu.parse_pci(spec).json == expected


@pytest.mark.parametrize(
    ("spec", "col", "text"),
    [e for e in ERRORS if "\0" not in e[0] and not undefined_in_c(e[0])],
)
def test_errors_match_libxlutil(libxlu: Libxlu, spec: str, col: int, text: str) -> None:
    assert not agree(libxlu, spec)


def test_undefined_cases_are_recognised() -> None:
    assert undefined_in_c("00:01")
    assert undefined_in_c("bdf=00:01,name=x")
    assert undefined_in_c("permissive=1,bdf=1:2:3")
    assert not undefined_in_c("00:01.0,bdf=00:02.0")
    assert not undefined_in_c("name=00:01")


def test_spec_generator_reaches_both_verdicts(libxlu: Libxlu) -> None:
    # A guard on the property below: the generated specs are not all refusals.
    verdicts = {
        agree(libxlu, spec)
        for spec in ("03:00.0@1f,seize=1", "name=x,vslot=2", "00:1f.8", "bdf=0:0.0,foo=1")
    }
    assert verdicts == {True, False}


@given(
    st.one_of(
        pci_spec_texts(),
        st.lists(st.sampled_from(list("0123456789abcdefx:.*@,= -+")), max_size=16).map("".join),
        st.text(max_size=20),
    )
)
@example("00:01.0x")
@example("00:01.0xg")
@example("100000001:00.0")
@example("03:00.0,seize=-99999999999999999999")
@example("03:00.0,rdm_policy=\u212a")  # Kelvin sign: str.lower() would fold it to "k"
def test_generated_specs_match_libxlutil(libxlu: Libxlu, spec: str) -> None:
    assume(not undefined_in_c(spec))
    try:
        agree(libxlu, spec)
    except OracleRefuses:
        assume(False)
