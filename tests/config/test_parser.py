"""Golden tests of the xl configuration language, from libxlu_cfg_l.l / _y.y and xl.cfg(5)."""

from __future__ import annotations

import pytest

from xenlab.config import ConfigError, Op, parse
from xenlab.config.values import value_to_json


def eff(text: str) -> dict[str, object]:
    return {k: value_to_json(v) for k, v in parse(text, source="t.cfg").effective().items()}


def err(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, source="t.cfg")
    return info.value


# --- statements and values -------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("\n\n", {}),
        (";;\n", {}),
        ('name = "guest"\n', {"name": "guest"}),
        ("name='guest'\n", {"name": "guest"}),
        ("memory = 512\n", {"memory": "512"}),
        ("memory=512", {"memory": "512"}),  # last statement needs no newline
        ("a=0x10\nb=010\nc=1x2ff\n", {"a": "0x10", "b": "010", "c": "1x2ff"}),
        ("a=1;b=2;\n", {"a": "1", "b": "2"}),
        ("a=1; b=2", {"a": "1", "b": "2"}),
        ("a.b_c.9 = 1\n", {"a.b_c.9": "1"}),
        ("a = 1 # trailing comment\n", {"a": "1"}),
        ("# only a comment\n", {}),
        ("a = '#not a comment'\n", {"a": "#not a comment"}),
        ("a = \"it's\"\n", {"a": "it's"}),
        ("a = 'say \"hi\"'\n", {"a": 'say "hi"'}),
        ("a=1\na=2\n", {"a": "2"}),  # last assignment wins
        ("a=1\nb=2\na=3\n", {"a": "3", "b": "2"}),  # order of first appearance
        ("\ta\t=\t1\t\n", {"a": "1"}),
        ("a = \"é ü 中\"\n", {"a": "é ü 中"}),
    ],
)
def test_scalars(text: str, expected: dict[str, object]) -> None:
    assert eff(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a = []\n", {"a": []}),
        ("a = [ ]\n", {"a": []}),
        ("a = [\n]\n", {"a": []}),
        ('a = [ "x" ]\n', {"a": ["x"]}),
        ('a = [ "x", ]\n', {"a": ["x"]}),
        ('a = [ "x", 1 ]\n', {"a": ["x", "1"]}),
        ('a = [\n  "x",\n  "y",\n]\n', {"a": ["x", "y"]}),
        ('a = [\n\n "x"\n\n ,\n\n "y"\n\n ,\n\n ]\n', {"a": ["x", "y"]}),
        ('a = [ [ "1", "2" ], [ ], [ [ "3" ] ] ]\n', {"a": [["1", "2"], [], [["3"]]]}),
        ("a = [ # comment inside\n 1, # another\n]\n", {"a": ["1"]}),
    ],
)
def test_lists(text: str, expected: dict[str, object]) -> None:
    assert eff(text) == expected


def test_plus_equals_concatenates_strings_and_appends_lists() -> None:
    assert eff('a = "x"\na += "y"\na += \'z\'\n') == {"a": "xyz"}
    assert eff('a = [ "x" ]\na += [ "y", [ "z" ] ]\n') == {"a": ["x", "y", ["z"]]}
    assert eff('a += "only"\n') == {"a": "only"}  # no earlier value: stored as is
    assert eff("a = 1\na += 2\n") == {"a": "12"}  # numbers are text


def test_settings_keep_every_statement_with_places() -> None:
    cfg = parse('a = "x"\n\nb = [\n "y" ]\na += "z"\n', source="g.cfg")
    assert [(s.name, s.op, s.value, s.line, s.col) for s in cfg.settings] == [
        ("a", Op.ASSIGN, "x", 1, 5),
        ("b", Op.ASSIGN, ("y",), 3, 5),
        ("a", Op.ADD, "xz", 5, 6),
    ]
    setting = cfg.get("a")
    assert setting is not None and setting.value == "xz"
    assert cfg.get("nothing") is None


# --- string escapes, exactly as libxlutil's dequoter ---------------------------

@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        (r'"\n\t\r"', "\n\t\r"),
        (r'"\a\b\f\v"', "\a\b\f\v"),
        (r'"\\ \" \'"', "\\ \" '"),
        (r"'\''", "'"),
        # backslash + digit: up to three more characters are read as a decimal
        # number; at least two must be used; the value is dropped (libxlutil).
        (r'"A\101B"', "AB"),
        (r'"A\1234B"', "AB"),
        (r'"\1 2x"', "x"),
        (r'"\1+2x"', "x"),
        (r'"\099"', ""),
    ],
)
def test_escapes(literal: str, expected: str) -> None:
    assert eff(f"a = {literal}\n") == {"a": expected}


@pytest.mark.parametrize(
    ("literal", "col"),
    [
        (r'"\x41"', 6),  # never accepted by libxlutil
        (r'"ab\1"', 8),  # one digit is too few
        (r'"\12"', 6),
        (r'"\q"', 6),
        (r'"\8"', 6),
    ],
)
def test_bad_escapes_are_errors_with_column(literal: str, col: int) -> None:
    e = err(f"a = {literal}\n")
    assert (e.line, e.col) == (1, col)
    assert "backslash" in e.message
    assert str(e).startswith(f"t.cfg:1:{col}: ")


# --- errors ----------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "line", "col", "needle"),
    [
        ("a\n", 1, 2, "expected `=' or `+='"),
        ("a = \n1\n", 1, 5, "expected a value"),
        ("a\n= 1\n", 1, 2, "expected `=' or `+='"),
        ("a = b\n", 1, 5, "expected a value"),
        ("a = 1 b = 2\n", 1, 7, "expected end of line"),
        ("= 1\n", 1, 1, "expected a setting"),
        ("a = [,]\n", 1, 6, "expected a list item"),
        ("a = [ 1 2 ]\n", 1, 9, "expected `,' or `]'"),
        ("a = [ 1\n 2 ]\n", 2, 2, "expected `,' or `]'"),
        ("a = [ 1, 2\n", 2, 1, "expected `,' or `]'"),
        ('a = "open\n', 1, 5, "unterminated string"),
        ("Name = 1\n", 1, 1, "names are lower case"),
        ("a = 1\r\n", 1, 6, "unexpected character '\\r'"),
        ("a = 1\n# no newline at the end", 2, 1, "unexpected character '#'"),
        ('a = "x"\na += [ "y" ]\n', 2, 6, "can't add [list] to \"string\""),
        ('a = [ "x" ]\na += "y"\n', 2, 6, "can't add [list] to \"string\""),
    ],
)
def test_errors_have_places(text: str, line: int, col: int, needle: str) -> None:
    e = err(text)
    assert (e.line, e.col) == (line, col), str(e)
    assert needle in e.message
    assert str(e).startswith(f"t.cfg:{line}:{col}: ")


def test_every_error_is_reported_and_parsing_resumes_after_the_line() -> None:
    e = err("a = \nb = 2\nc = [ 1 2 ]\nd = 4\nE = 5\n")
    assert [(p.line, p.col) for p in e.problems] == [(1, 5), (3, 9), (5, 1)]


def test_python_looking_text_is_flagged_likely_python() -> None:
    e = err("memory = 128 + 64\n")
    assert e.likely_python
    assert "xenlab config from-xm" in str(e)
    assert (e.line, e.col) == (1, 14)
    e = err("import os\n")  # no python characters: plain syntax error
    assert not e.likely_python
    for text in ("a = (1)\n", "a = 1.5\n", "a = -1\n", "a = 'x':\n", "x = y(z)\n"):
        assert err(text).likely_python, text


def test_a_bad_character_as_the_last_byte_is_not_seen_by_libxlutil() -> None:
    # flex reaches end of input in its lexerr state and stops without a report.
    assert eff("a = 1\n(") == {"a": "1"}
    assert err("a = 1\n((").likely_python


def test_nul_bytes() -> None:
    assert eff("# a \0 in a comment\na=1\n") == {"a": "1"}
    e = err('a = "x\0y"\n')
    assert "NUL" in e.message and (e.line, e.col) == (1, 5)


def test_bytes_input_keeps_undecodable_bytes() -> None:
    cfg = parse(b'a = "\xff\xfe"\n')
    value = cfg.effective()["a"]
    assert isinstance(value, str)
    assert value.encode("utf-8", "surrogateescape") == b"\xff\xfe"
