"""Hostile input: the parser only ever raises ConfigError with a place, and never hangs."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenlab.config import ConfigError, parse
from xenlab.config.writer import format_config


def check_parse(data: str | bytes) -> None:
    try:
        cfg = parse(data, source="fuzz.cfg")
    except ConfigError as err:
        assert err.problems
        for p in err.problems:
            assert p.source == "fuzz.cfg" and p.line >= 1 and p.col >= 1
            assert str(p).startswith(f"fuzz.cfg:{p.line}:{p.col}: ")
        return
    # A valid file survives the writer and reads back the same.
    again = parse(format_config(cfg))
    assert list(again.effective()) == list(cfg.effective())


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    check_parse(data)


_ALPHABET = st.sampled_from(list("a1=+;,[]()\"'\\#\n \tx.:-Z\x00\r\xe9"))


@settings(max_examples=500)
@given(st.text(alphabet=_ALPHABET, max_size=200))
def test_random_text_from_the_grammars_alphabet(text: str) -> None:
    check_parse(text)


@settings(max_examples=200)
@given(st.text(max_size=200))
def test_random_unicode(text: str) -> None:
    check_parse(text)


def _timed(data: str | bytes) -> tuple[float, ConfigError | None]:
    start = time.perf_counter()
    try:
        parse(data)
        error = None
    except ConfigError as err:
        error = err
    return time.perf_counter() - start, error


def test_ten_thousand_deep_list_is_a_clean_error() -> None:
    seconds, error = _timed("a = " + "[" * 10_000 + "]" * 10_000 + "\n")
    assert error is not None and "nested too deeply" in error.message
    assert seconds < 5


def test_ten_thousand_deep_unclosed_list_is_a_clean_error() -> None:
    seconds, error = _timed("a = " + "[" * 10_000)
    assert error is not None and seconds < 5


def test_deepest_list_libxlutil_accepts_parses() -> None:
    text = "a = " + "[" * 4996 + '"x"' + "]" * 4996 + "\n"
    seconds, error = _timed(text)
    assert error is None and seconds < 5
    assert parse(format_config(parse(text))).settings[0].name == "a"


@pytest.mark.parametrize(
    "unit",
    [
        'name = "guest" # a comment\nmemory = 512\ndisk = [ "file:/x,xvda,w", ]\n',
        "# " + "x" * 998 + "\n",
        '"unterminated\n',
        "((((((((((\n",
        "\0\xff" * 50 + "\n",
    ],
)
def test_ten_megabyte_files(unit: str) -> None:
    data = (unit * (10_000_000 // len(unit) + 1)).encode("utf-8", "surrogateescape")
    assert len(data) >= 10_000_000
    seconds, error = _timed(data)
    assert seconds < 60, f"{seconds:.1f} s for 10 MB"
    if error is not None:
        assert error.problems[0].line >= 1


def test_one_ten_megabyte_line() -> None:
    seconds, error = _timed('a = "' + "x" * 10_000_000 + '"\n')
    assert error is None and seconds < 10
