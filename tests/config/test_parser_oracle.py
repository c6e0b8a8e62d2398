"""Differential tests: our parser against Debian's real libxlutil 4.17.

Agreement must be exact: the same verdict, the same statements (name,
operator, line) in the same order, the same effective values, and the same
"likely Python" flag on failure.  One intended difference is excluded here
and documented in xenlab/config/lexer.py: a NUL byte inside a quoted string,
on which libxlutil aborts the process (the oracle refuses such input).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.oracle.libxlu import Libxlu, OracleRefuses
from xenlab.config import ConfigError, parse
from xenlab.config.values import Value
from xenlab.config.writer import format_settings, format_value

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def assert_agrees(libxlu: Libxlu, data: bytes) -> bool:
    """Parse ``data`` with both parsers and assert they agree; return the verdict."""
    try:
        theirs = libxlu.parse_cfg(data)
    except OracleRefuses:
        assume(False)
        raise AssertionError("unreachable") from None
    try:
        ours = parse(data, source="t")
    except ConfigError as err:
        assert not theirs.ok, f"we refuse what libxlutil accepts: {err}\n{data!r}"
        assert err.likely_python == theirs.likely_python, (err, theirs.report)
        return False
    assert theirs.ok, f"we accept what libxlutil refuses: {theirs.report}\n{data!r}"
    assert [(s.name, s.op.value, s.line) for s in ours.settings] == [
        (s.name, s.op, s.lineno) for s in theirs.settings
    ]
    effective: dict[str, Value] = {}
    for s in theirs.settings:
        effective[s.name] = s.value
    # Compared through the (iterative, injective) writer: `==` on lists nested
    # thousands deep would exhaust Python's recursion limit.
    assert {k: format_value(v) for k, v in ours.effective().items()} == {
        k: format_value(v) for k, v in effective.items()
    }
    return True


def corpus_files(shared_dir: Path | None) -> list[Path]:
    files = sorted(EXAMPLES.glob("*.cfg"))
    if shared_dir is not None and (shared_dir / "xlcfg").is_dir():
        files += sorted((shared_dir / "xlcfg").iterdir())
    return files


def test_shared_corpus_gets_libxlutils_verdict(libxlu: Libxlu, shared_data: Path) -> None:
    files = sorted((shared_data / "xlcfg").iterdir())
    assert len(files) >= 20
    verdicts = {f.name: assert_agrees(libxlu, f.read_bytes()) for f in files}
    # The xm examples that are valid xl as they stand parse as such.
    assert verdicts["xen-project__xen__xmexample.hvm.cfg"]


def test_own_examples_and_golden_texts_agree(libxlu: Libxlu) -> None:
    from tests.config import test_parser

    texts = [f.read_bytes() for f in sorted(EXAMPLES.glob("*.cfg"))]
    assert texts, "examples/ holds the project's own configs"
    for name in dir(test_parser):
        marks = getattr(getattr(test_parser, name), "pytestmark", [])
        for mark in marks:
            if mark.name == "parametrize":
                for case in mark.args[1]:
                    if isinstance(case[0], str) and ("=" in case[0] or case[0] == ""):
                        texts.append(case[0].encode())
    for data in texts:
        if b"\0" not in data:
            assert_agrees(libxlu, data)


@pytest.mark.parametrize(
    "text",
    [
        "a = 1\n(",  # a bad last byte: flex stops quietly, likely_python still set
        "a = \n(",
        "a = 1\n((",
        "#c",
        "a=1 #c",
        "a = 1\r\n",
        'a="\\x41"\n',
        'a="\\101"\n',
        'a="\\1"\n',
        'a="\\12"\n',
        'a="\\1 2"\n',
        'a="\\1-23"\n',
        'a = "x"\na += [ "y" ]\n',
        'a = [ "x" ]\na += [ "y" ]\na += [ [ "z" ] ]\n',
        "a += 1\n",
        "a=[\n\n1\n\n,\n\n]\n",
        "x = y(1) + 2\n",
        "Name = 1\n",
        'a = "é"\n',
        "a=1;;b=2;\n;\n",
    ],
)
def test_quirks_agree(libxlu: Libxlu, text: str) -> None:
    assert_agrees(libxlu, text.encode())


def _deep(depth: int, inner: str, later: bool, newline: bool) -> bytes:
    nl = "\n" if newline else ""
    opener = f'[{nl}"a",{nl}' if later else "["
    return f"a = {opener * depth}{inner}{(nl + ']') * depth}\n".encode()


@pytest.mark.parametrize("later", [False, True])
@pytest.mark.parametrize("newline", [False, True])
@pytest.mark.parametrize("inner", ["", '"x"', '"x",'])
def test_bison_depth_limit_agrees(libxlu: Libxlu, later: bool, newline: bool, inner: str) -> None:
    # Find libxlutil's deepest accepted nesting for this shape, then check
    # both sides of the edge.
    lo, hi = 1, 5100
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if libxlu.parse_cfg(_deep(mid, inner, later, newline)).ok:
            lo = mid
        else:
            hi = mid - 1
    assert 1900 < lo < 5000
    assert assert_agrees(libxlu, _deep(lo, inner, later, newline))
    assert not assert_agrees(libxlu, _deep(lo + 1, inner, later, newline))


# --- generated configs -------------------------------------------------------

_names = st.from_regex(r"[a-z][._0-9a-z]{0,6}", fullmatch=True)
_string_chars = st.sampled_from(list("abcXYZ019 ,:=#[]()+-.;'\"\\\tnrtx\xe9"))
_escapes = st.sampled_from(
    ["\\n", "\\t", "\\\\", "\\'", '\\"', "\\a", "\\101", "\\1", "\\12", "\\1 2", "\\x41", "\\q"]
)


@st.composite
def _string_literal(draw: st.DrawFn) -> str:
    quote = draw(st.sampled_from(["'", '"']))
    parts = draw(st.lists(st.one_of(_string_chars, _escapes), max_size=8))
    body = "".join(parts).replace(quote, "\\" + quote).replace("\n", "")
    return quote + body + quote


_atoms = st.one_of(_string_literal(), st.from_regex(r"[0-9][0-9a-fx]{0,4}", fullmatch=True))
_blank = st.sampled_from(["", " ", "\t", "\n", " # note\n", "\n\n"])


@st.composite
def _value_text(draw: st.DrawFn, depth: int = 0) -> str:
    if depth > 3 or draw(st.booleans()):
        return draw(_atoms)
    items = draw(st.lists(_value_text(depth + 1), max_size=4))
    seps = [draw(_blank) for _ in range(len(items) * 2 + 2)]
    inner = ""
    for i, item in enumerate(items):
        inner += seps[2 * i] + item + seps[2 * i + 1] + ("," if i < len(items) - 1 else "")
    if items and draw(st.booleans()):
        inner += ","
    return "[" + inner + seps[-1] + "]"


@st.composite
def _config_text(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["=", "+=", " = ", "\t+= "]))
        end = draw(st.sampled_from(["\n", ";", " ;\n", " # c\n", "\n\n"]))
        lines.append(draw(_names) + op + draw(_value_text()) + end)
    text = "".join(lines)
    if draw(st.booleans()) and text.endswith("\n"):
        text = text[:-1]  # the last statement needs no terminator
    return text


_noise = st.sampled_from([*"=+;,[]()-.:#'\"\\\n\r\t xAZ09_\x00\xff", "+=", "\\x", "\\1"])


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    text = draw(_config_text())
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        if draw(st.booleans()) and at < len(text):
            text = text[:at] + text[at + 1 :]
        else:
            text = text[:at] + draw(_noise) + text[at:]
    return text.encode("utf-8", "surrogateescape")


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(_config_text())
def test_generated_configs_agree(libxlu: Libxlu, text: str) -> None:
    assert_agrees(libxlu, text.encode())


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_mutated_configs_agree(libxlu: Libxlu, data: bytes) -> None:
    assert_agrees(libxlu, data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_random_bytes_agree(libxlu: Libxlu, data: bytes) -> None:
    assert_agrees(libxlu, data)


_values = st.recursive(
    st.text(max_size=10), lambda v: st.lists(v, max_size=3).map(tuple), max_leaves=8
)


@settings(max_examples=200)
@given(st.dictionaries(_names, _values, max_size=5))
def test_our_canonical_output_reads_the_same_in_libxlutil(
    libxlu: Libxlu, values: dict[str, Value]
) -> None:
    try:
        text = format_settings(values.items())
    except ConfigError:
        assume(False)
        return
    assert assert_agrees(libxlu, text.encode("utf-8", "surrogateescape"))
