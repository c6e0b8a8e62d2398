"""C library number parsing as libxlutil and xl see it: strtol, strtoul, ...

libxlutil and xl read numbers with glibc's ``strtol``, ``strtoul``,
``strtoull``, ``atoi`` and ``sscanf("%x")``.  These functions accept more
than the digits (leading blanks, a sign, a ``0x`` prefix) and have their own
overflow rules, and xl's results depend on them, so xenlab reproduces them
here exactly, for an LP64 target (x86_64): ``int`` is 32 bits, ``long``,
``unsigned long`` and ``unsigned long long`` are 64 bits.  The C locale is
assumed (``isspace`` is the six ASCII blanks, digits are ASCII only).

Every reader takes the text and, where C gets a pointer into a string, a
``start`` index; it returns ``(value, end)``, ``end`` being where C's
``endptr`` would point.  When nothing is converted ``end == start`` (as C
sets ``endptr = nptr``), except after a bare ``0x`` prefix, see `strtoul`.

The functions are pure; nothing here sets or reads ``errno``: `strtol0` is
the one reader that reports overflow, as a reason string.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "C_SPACE",
    "DEC_DIGITS",
    "HEX_DIGITS",
    "INT_MAX",
    "INT_MIN",
    "LONG_MAX",
    "LONG_MIN",
    "UINT_MAX",
    "ULLONG_MAX",
    "ULONG_MAX",
    "atoi",
    "sscanf_x",
    "strtol",
    "strtol0",
    "strtoul",
    "strtoull",
    "to_c_int",
]

#: ``isspace()`` in the C locale: space, \t, \n, \v, \f, \r.
C_SPACE: Final = " \t\n\v\f\r"
DEC_DIGITS: Final = "0123456789"
HEX_DIGITS: Final = "0123456789abcdefABCDEF"
_OCT_DIGITS: Final = "01234567"
_ALNUM: Final = "0123456789abcdefghijklmnopqrstuvwxyz"

INT_MIN: Final = -(2**31)
INT_MAX: Final = 2**31 - 1
UINT_MAX: Final = 2**32 - 1
LONG_MIN: Final = -(2**63)
LONG_MAX: Final = 2**63 - 1
ULONG_MAX: Final = 2**64 - 1
#: Same as ULONG_MAX on LP64.
ULLONG_MAX: Final = ULONG_MAX


def _blanks_and_sign(text: str, i: int) -> tuple[int, bool]:
    """Skip C blanks and one optional sign, as every C number reader does first."""
    n = len(text)
    while i < n and text[i] in C_SPACE:
        i += 1
    if i < n and text[i] in "+-":
        return i + 1, text[i] == "-"
    return i, False


def _digit(char: str, base: int) -> bool:
    value = _ALNUM.find(char.lower()) if char.isascii() else -1
    return 0 <= value < base


def _convert(text: str, base: int, start: int) -> tuple[bool, int, int]:
    """glibc's common ``strto*`` scan: (negative, magnitude, end).

    The magnitude is unbounded; the callers apply their own overflow rule.
    Nothing converted gives magnitude 0 and ``end == start``, or the ``x``
    of a bare ``0x`` prefix (glibc's rule, see `strtoul`).
    """
    if base != 0 and not 2 <= base <= 36:
        raise ValueError(f"invalid base {base}")  # C: EINVAL
    n = len(text)
    i, negative = _blanks_and_sign(text, start)
    prefix_x = -1
    if base in (0, 16) and text.startswith(("0x", "0X"), i):
        prefix_x = i + 1
        i += 2
        base = 16
    elif base == 0:
        base = 8 if text.startswith("0", i) else 10
    j = i
    while j < n and _digit(text[j], base):
        j += 1
    if j == i:
        return False, 0, prefix_x if prefix_x >= 0 else start
    return negative, int(text[i:j], base), j


def strtoul(text: str, base: int, start: int = 0) -> tuple[int, int]:
    """glibc ``strtoul(text + start, &end, base)``: (value, end).

    Leading C blanks are skipped, then one ``+`` or ``-``.  Base 0 picks 16
    after ``0x``/``0X``, 8 after a leading ``0`` and 10 otherwise; base 16
    also skips an optional ``0x``.  A ``0x`` with no hexadecimal digit after
    it converts only the ``0``: the value is 0 and ``end`` points at the
    ``x``.  With no digits at all, the value is 0 and ``end == start``.

    A magnitude above ULONG_MAX gives ULONG_MAX (C: ``errno = ERANGE``),
    whatever the sign; otherwise a ``-`` negates modulo 2**64, so ``"-1"``
    is ULONG_MAX and ``"-2"`` is ULONG_MAX - 1.
    """
    negative, value, end = _convert(text, base, start)
    if value > ULONG_MAX:
        return ULONG_MAX, end
    if negative:
        value = -value & ULONG_MAX
    return value, end


def strtoull(text: str, base: int, start: int = 0) -> tuple[int, int]:
    """glibc ``strtoull(text + start, &end, base)``: `strtoul` on LP64.

    Overflow gives ULLONG_MAX (2**64 - 1); ``-`` negates modulo 2**64.
    """
    return strtoul(text, base, start)


def strtol(text: str, base: int, start: int = 0) -> tuple[int, int]:
    """glibc ``strtol(text + start, &end, base)``: (value, end).

    Blanks, sign, base and ``0x`` rules are those of `strtoul`.  The signed
    result saturates: above LONG_MAX gives LONG_MAX, below LONG_MIN gives
    LONG_MIN (C: ``errno = ERANGE``).
    """
    negative, value, end = _convert(text, base, start)
    value = -value if negative else value
    return max(LONG_MIN, min(LONG_MAX, value)), end


def to_c_int(value: int) -> int:
    """An integer stored into a C ``int``: the low 32 bits, two's complement."""
    value &= UINT_MAX
    return value - (1 << 32) if value & 0x8000_0000 else value


def atoi(text: str) -> int:
    """glibc ``atoi(text)``: ``(int) strtol(text, NULL, 10)``.

    No error is reported: no digits give 0, ``strtol`` saturates at the
    ``long`` limits and the ``long`` is then cut to its low 32 bits, so
    ``"4294967297"`` is 1 and ``"99999999999999999999"`` (LONG_MAX) is -1.
    """
    return to_c_int(strtol(text, 10)[0])


def sscanf_x(text: str, start: int = 0) -> tuple[int, int] | None:
    """glibc ``sscanf(text + start, "%x%n", &u, &n)``: (u, start + n) or None.

    ``%x`` skips blanks and takes a sign and a ``0x`` prefix like ``strtoul``
    base 16, with one difference: scanf consumes a ``0x`` even when no
    hexadecimal digit follows (the value is then 0 and ``end`` is after the
    ``x``).  None when no number matched (sscanf returns 0, ``%n`` unset).
    The number is converted as ``strtoul`` does (saturating at ULONG_MAX
    above 64 bits, ``-`` negating modulo 2**64) and stored into an
    ``unsigned int``: the low 32 bits are kept.
    """
    n = len(text)
    i, negative = _blanks_and_sign(text, start)
    seen_zero = False
    if i < n and text[i] == "0":
        seen_zero = True
        i += 1
        if i < n and text[i] in "xX":
            i += 1
    j = i
    while j < n and text[j] in HEX_DIGITS:
        j += 1
    if j == i and not seen_zero:
        return None
    value = int(text[i:j] or "0", 16)
    if value > ULONG_MAX:
        value = ULONG_MAX
    elif negative:
        value = -value & ULONG_MAX
    return value & UINT_MAX, j


def strtol0(text: str) -> int | str:
    """libxlutil's number check: ``strtol(text, &end, 0)`` must consume everything.

    Returns the number, or the reason it is not one: ``"not a valid number"``
    when no digit was converted or anything is left after the number (even
    trailing blanks), ``"out of range"`` when ``strtol`` sets ``ERANGE``
    (the value is outside LONG_MIN..LONG_MAX).  Base 0 means ``0x1f`` is hex
    and ``010`` octal, so ``"08"`` and ``"0x"`` are not valid numbers.
    """
    negative, value, end = _convert(text, 0, 0)
    if end == 0 or end != len(text):
        return "not a valid number"
    value = -value if negative else value
    if not LONG_MIN <= value <= LONG_MAX:
        return "out of range"
    return value
