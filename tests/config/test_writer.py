"""The canonical writer: exact output, and parse(fmt(x)) == x for every valid config."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenlab.config import ConfigError, parse
from xenlab.config.values import Value
from xenlab.config.writer import format_config, format_settings, format_value, quote


def test_canonical_text() -> None:
    text = (
        "# comment\n"
        "name='g1' ; memory = 0x200\n"
        "disk=[ 'file:/a.img,xvda,w',\n'file:/b.img,xvdb,r' ,]\n"
        "extra = \"a\\tb\\\\c\\\"\"\n"
        "vif=[]\n"
        "name += '-x'\n"
    )
    assert format_config(parse(text)) == (
        'name = "g1-x"\n'
        "memory = 0x200\n"
        'disk = [ "file:/a.img,xvda,w", "file:/b.img,xvdb,r" ]\n'
        'extra = "a\\tb\\\\c\\""\n'
        "vif = []\n"
    )


def test_long_and_nested_lists_go_one_item_per_line() -> None:
    value: Value = (("pnode=0", "size=512"), ("pnode=1", "size=512"))
    assert format_value(value) == (
        "[\n"
        '    [ "pnode=0", "size=512" ],\n'
        '    [ "pnode=1", "size=512" ],\n'
        "]"
    )
    long = tuple(f"item-number-{i}" for i in range(10))
    assert format_value(long).count("\n") == 11


def test_quote_escapes_only_what_it_must() -> None:
    assert quote('a"b\\c\nd\re\tf\x01g') == '"a\\"b\\\\c\\nd\\re\\tf\x01g"'
    with pytest.raises(ConfigError):
        quote("nul\0")


def test_bad_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="not an xl name"):
        format_settings([("Memory", "1")])


# Values the language can hold: any string without NUL, and nested lists.
_strings = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)))
_values = st.recursive(
    _strings, lambda inner: st.lists(inner, max_size=5).map(tuple), max_leaves=20
)
_names = st.from_regex(r"[a-z][._0-9a-z]{0,8}", fullmatch=True)


@given(st.dictionaries(_names, _values, max_size=8))
def test_round_trip(settings: dict[str, Value]) -> None:
    text = format_settings(settings.items())
    assert parse(text).effective() == settings
    # The canonical form is a fixed point.
    assert format_config(parse(text)) == text
