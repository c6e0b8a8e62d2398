"""Golden tests of xenlab.config.clib: glibc's number readers on LP64 (x86_64)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenlab.config.clib import (
    LONG_MAX,
    LONG_MIN,
    UINT_MAX,
    ULLONG_MAX,
    ULONG_MAX,
    atoi,
    sscanf_x,
    strtol,
    strtol0,
    strtoul,
    strtoull,
    to_c_int,
)

_NUMBERISH = st.text(alphabet="0123456789abcdefxXgz+- \t\n\v\f\r:.\u00a0\u0660", max_size=12)


def test_limits() -> None:
    assert (UINT_MAX, ULONG_MAX, ULLONG_MAX) == (2**32 - 1, 2**64 - 1, 2**64 - 1)
    assert (LONG_MIN, LONG_MAX) == (-(2**63), 2**63 - 1)


@pytest.mark.parametrize(
    ("text", "base", "start", "expected"),
    [
        # A sign negates modulo 2**64.
        (" -1", 0, 0, (ULONG_MAX, 3)),
        ("-2", 10, 0, (ULONG_MAX - 1, 2)),
        ("-18446744073709551615", 10, 0, (1, 21)),
        ("+7", 10, 0, (7, 2)),
        # Overflow saturates whatever the sign.
        ("18446744073709551615", 10, 0, (ULONG_MAX, 20)),
        ("18446744073709551616", 10, 0, (ULONG_MAX, 20)),
        ("-18446744073709551616", 10, 0, (ULONG_MAX, 21)),
        ("0x10000000000000000", 0, 0, (ULONG_MAX, 19)),
        # Base 0: 0x is hex, a leading 0 octal, else decimal.
        ("0x1F", 0, 0, (31, 4)),
        ("0X1f", 16, 0, (31, 4)),
        ("1f", 16, 0, (31, 2)),
        ("010", 0, 0, (8, 3)),
        ("010", 10, 0, (10, 3)),
        ("08", 0, 0, (0, 1)),
        ("0x1F", 10, 0, (0, 1)),
        ("z", 36, 0, (35, 1)),
        # A bare 0x converts only the 0: end points at the x.
        ("0x", 0, 0, (0, 1)),
        ("0x", 16, 0, (0, 1)),
        ("  -0xg", 16, 0, (0, 4)),
        # Nothing converted: 0 and end == start.
        ("", 10, 0, (0, 0)),
        ("   ", 10, 0, (0, 0)),
        ("+", 10, 0, (0, 0)),
        ("- 1", 10, 0, (0, 0)),
        ("x", 16, 0, (0, 0)),
        # Only C's six blanks, only ASCII digits.
        ("\t\n\v\f\r 7", 10, 0, (7, 7)),
        ("\u00a07", 10, 0, (0, 0)),
        ("\u0667", 10, 0, (0, 0)),
        ("1\u0660", 10, 0, (1, 1)),
        # A start index is text + start in C.
        ("ab:cd", 16, 3, (0xCD, 5)),
        ("x 12", 10, 1, (12, 4)),
        ("x y", 10, 1, (0, 1)),
        ("12", 10, 2, (0, 2)),
    ],
)
def test_strtoul(text: str, base: int, start: int, expected: tuple[int, int]) -> None:
    assert strtoul(text, base, start) == expected
    assert strtoull(text, base, start) == expected


@pytest.mark.parametrize("base", [-1, 1, 37])
def test_invalid_base(base: int) -> None:
    with pytest.raises(ValueError, match="invalid base"):
        strtoul("1", base)
    with pytest.raises(ValueError, match="invalid base"):
        strtol("1", base)


@pytest.mark.parametrize(
    ("text", "base", "expected"),
    [
        ("0x", 0, (0, 1)),  # consumes only the "0"
        ("-0x10", 0, (-16, 5)),
        (" +017", 0, (15, 5)),
        ("-1", 10, (-1, 2)),
        ("12abc", 10, (12, 2)),
        ("abc", 10, (0, 0)),
        # Saturation at the long limits.
        ("9223372036854775807", 10, (LONG_MAX, 19)),
        ("9223372036854775808", 10, (LONG_MAX, 19)),
        ("99999999999999999999999", 0, (LONG_MAX, 23)),
        ("-9223372036854775808", 10, (LONG_MIN, 20)),
        ("-9223372036854775809", 10, (LONG_MIN, 20)),
        ("-0xffffffffffffffffff", 16, (LONG_MIN, 21)),
    ],
)
def test_strtol(text: str, base: int, expected: tuple[int, int]) -> None:
    assert strtol(text, base) == expected


def test_strtol_start() -> None:
    assert strtol("port=-3", 10, 5) == (-3, 7)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (2**31 - 1, 2**31 - 1),
        (2**31, -(2**31)),
        (2**32 - 1, -1),
        (2**32, 0),
        (2**64 - 2, -2),
        (-1, -1),
        (LONG_MIN, 0),
    ],
)
def test_to_c_int(value: int, expected: int) -> None:
    assert to_c_int(value) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", 42),
        (" -7x", -7),
        ("+1", 1),
        ("abc", 0),
        ("", 0),
        ("0x10", 0),  # base 10: stops at the x
        ("010", 10),
        ("4294967297", 1),  # low 32 bits of the long
        ("2147483648", -(2**31)),
        ("99999999999999999999", -1),  # LONG_MAX, cut to int
        ("-99999999999999999999", 0),  # LONG_MIN, cut to int
    ],
)
def test_atoi(text: str, expected: int) -> None:
    assert atoi(text) == expected


@pytest.mark.parametrize(
    ("text", "start", "expected"),
    [
        ("1f", 0, (31, 2)),
        ("+0X1A", 0, (26, 5)),
        (" \t1f:", 0, (31, 4)),
        ("0", 0, (0, 1)),
        # scanf consumes a bare 0x (strtoul would stop at the x).
        ("0x", 0, (0, 2)),
        ("  0xg", 0, (0, 4)),
        ("-0x", 0, (0, 3)),
        # No number at all.
        ("", 0, None),
        ("-", 0, None),
        ("g", 0, None),
        ("x1", 0, None),
        # Negation modulo 2**64, then the low 32 bits.
        ("-1", 0, (UINT_MAX, 2)),
        ("-100000000", 0, (0, 10)),
        # Beyond 32 bits: low 32 bits; beyond 64: ULONG_MAX whatever the sign.
        ("100000000", 0, (0, 9)),
        ("1ffffffff", 0, (UINT_MAX, 9)),
        ("10000000000000001", 0, (UINT_MAX, 17)),
        ("-10000000000000001", 0, (UINT_MAX, 18)),
        # A start index, as in parse_bdf.
        ("0000:00:1f.7", 5, (0, 7)),
        ("0000:00:1f.7", 8, (0x1F, 10)),
        ("00:1f", 5, None),
    ],
)
def test_sscanf_x(text: str, start: int, expected: tuple[int, int] | None) -> None:
    assert sscanf_x(text, start) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12", 12),
        (" 12", 12),
        ("0x1f", 31),
        ("0X7fffffffffffffff", LONG_MAX),
        ("010", 8),
        ("-0", 0),
        ("-9223372036854775808", LONG_MIN),
        ("9223372036854775807", LONG_MAX),
        ("9223372036854775808", "out of range"),
        ("-9223372036854775809", "out of range"),
        ("0x8000000000000000", "out of range"),
        ("12 ", "not a valid number"),  # trailing blanks are left over
        ("08", "not a valid number"),
        ("0x", "not a valid number"),
        ("0xg", "not a valid number"),
        ("", "not a valid number"),
        ("  ", "not a valid number"),
        ("-", "not a valid number"),
        ("1.5", "not a valid number"),
    ],
)
def test_strtol0(text: str, expected: int | str) -> None:
    assert strtol0(text) == expected


@given(_NUMBERISH, st.sampled_from([0, 8, 10, 16]))
def test_strtol_agrees_with_strtoul(text: str, base: int) -> None:
    # Same scan, same end; the values agree modulo 2**64 unless either saturated.
    signed, end = strtol(text, base)
    unsigned, uend = strtoul(text, base)
    assert end == uend
    if unsigned != ULONG_MAX and signed not in (LONG_MIN, LONG_MAX):
        assert signed & ULONG_MAX == unsigned


@given(_NUMBERISH)
def test_atoi_is_strtol_base_10_into_int(text: str) -> None:
    assert atoi(text) == to_c_int(strtol(text, 10)[0])


@given(_NUMBERISH)
def test_strtol0_is_strtol_consuming_everything(text: str) -> None:
    value, end = strtol(text, 0)
    got = strtol0(text)
    if end == 0 or end != len(text):
        assert got == "not a valid number"
    elif got != "out of range":
        assert got == value
