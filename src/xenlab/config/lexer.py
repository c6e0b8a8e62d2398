"""The lexer of the xl configuration language: :func:`tokens`, :func:`dequote`.

The token rules are libxlutil's (``libxlu_cfg_l.l``) applied with flex's
semantics (the longest match wins, then the earlier rule), which for this rule
set is a choice by the first character, made by one compiled regular
expression; a change must keep agreeing with libxlutil 4.17.  Anything else
starts a lexical error that swallows the rest of the word, and ``+ - . ( ) :``
also mark the file as likely Python (the xm era's format).  libxlutil's quirks
are kept on purpose (its escape decoding, a lexical error in the last byte, a
last comment without a newline), and one difference is on purpose: a NUL in a
quoted string is a lexical error, where libxlutil aborts.  The design (the
token table, the quirks and the difference) is in docs/config.md, section
Lexer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, NamedTuple

# Token kinds.  Punctuation tokens use their own text as their kind.
IDENT: Final = "IDENT"
NUMBER: Final = "NUMBER"
STRING: Final = "STRING"
NEWLINE: Final = "NEWLINE"
EOF: Final = "EOF"

#: How many problems of each kind are kept: a 10 MB file of junk should give
#: a readable report, not a million lines.
MAX_PROBLEMS: Final = 100


class Token(NamedTuple):
    """One token: ``kind``, its ``text`` as written, and where it starts (1-based).

    A tuple, not a dataclass: the lexer makes one per token and this is the
    parser's hot path.
    """

    kind: str
    text: str
    line: int
    col: int


@dataclass(frozen=True, slots=True)
class LexProblem:
    """A lexical error: where it starts, the offending text and what is wrong."""

    line: int
    col: int
    text: str
    message: str
    likely_python: bool


# Blanks before a token are skipped by the same match.  A NEWLINE token takes
# a newline (or a comment and its newline) and every blank or comment-only
# line after it: the grammar treats a run of NEWLINEs as one, and comment-
# heavy files lex several times faster.
_TOKEN_RE: Final = re.compile(
    r"""
    [ \t]*
    (?:
      (?P<IDENT>[a-z][._0-9a-z]*)
    | (?P<NUMBER>[0-9][0-9a-fx]*)
    | (?P<NEWLINE>(?:\n|\#[^\n]*\n)(?:[ \t]*(?:\#[^\n]*)?\n)*)
    | (?P<STRING>'[^'\\\n]*(?:\\[^\n][^'\\\n]*)*'|"[^"\\\n]*(?:\\[^\n][^"\\\n]*)*")
    | (?P<punct>\+=|[,\[\]=;])
    | (?P<python>[+\-.():])
    | (?P<bad>[^\n])
    | (?P<end>\Z)
    )
    """,
    re.VERBOSE,
)

# In the lexerr state: a run of non-blanks, or one blank, or a newline.
_LEXERR_WORD_RE: Final = re.compile(r"[^ \t\n]+")

_SIMPLE_ESCAPES: Final = {
    '"': '"',
    "'": "'",
    "\\": "\\",
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
}

# What C's strtoul(..., 10) accepts before the digits.
_STRTOUL_DEC_RE: Final = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")


def dequote(raw: str) -> tuple[str, int, str] | str:
    """Decode a quoted string token exactly as libxlutil does.

    ``raw`` includes its quotes.  Returns the decoded string, or, for a bad
    escape, a tuple ``(message, offset_in_raw, partial)``.
    """
    if "\\" not in raw:
        return raw[1:-1]
    out: list[str] = []
    i = 1
    end = len(raw) - 1
    while i < end:
        c = raw[i]
        i += 1
        if c != "\\":
            out.append(c)
            continue
        nc = raw[i]
        i += 1
        simple = _SIMPLE_ESCAPES.get(nc)
        if simple is not None:
            out.append(simple)
        elif nc == "x":
            # libxlutil skips one more character and then demands more than
            # two hex digits out of a two-character buffer: never satisfied.
            return (
                "invalid digit after backslash hexnumerical character escape"
                " in quoted string (libxlutil accepts no \\x escape)",
                i - 2,
                "".join(out),
            )
        elif "0" <= nc <= "7":
            # Up to three more characters are read with strtoul(base 10); at
            # least two must be consumed, and the value is then dropped.
            m = _STRTOUL_DEC_RE.match(raw[i : i + 3])
            if m is None or m.end() <= 1:
                return (
                    "invalid digit after backslash octalnumerical character escape"
                    " in quoted string",
                    i - 2,
                    "".join(out),
                )
            i += m.end()
        else:
            return (
                f"invalid character {nc!r} after backslash in quoted string",
                i - 2,
                "".join(out),
            )
    return "".join(out)


@dataclass(slots=True)
class LexState:
    """What the lexer learnt so far: its problems, and whether it saw Python."""

    problems: list[LexProblem] = field(default_factory=list)
    #: Set by any of ``+ - . ( ) :`` outside a string, even one that is not
    #: reported because it ends the file (libxlutil sets its flag first).
    likely_python: bool = False
    #: Every lexical error seen; only the first MAX_PROBLEMS are kept.
    count: int = 0


def tokens(text: str, state: LexState) -> Iterator[Token]:
    """Yield the tokens of ``text``, ending with one EOF token.

    Lexical errors do not stop the scan (libxlutil's behaviour): each is
    appended to ``state.problems`` and the scan goes on after the bad word.
    The scan is lazy, so ``state`` reflects only the text read so far.
    """
    problems = state.problems
    pos = 0
    line = 1
    line_start = 0
    n = len(text)
    match = _TOKEN_RE.match
    while True:
        m = match(text, pos)
        assert m is not None  # `bad` matches any non-newline, `end` the end
        kind = m.lastgroup
        assert kind is not None
        end = m.end()
        if kind in (IDENT, NUMBER):
            yield Token(kind, m.group(kind), line, m.start(kind) - line_start + 1)
            pos = end
            continue
        if kind == NEWLINE:
            tok_text = m.group(kind)
            yield Token(NEWLINE, tok_text, line, m.start(kind) - line_start + 1)
            line += tok_text.count("\n")
            line_start = text.rindex("\n", 0, end) + 1
            pos = end
            continue
        if kind == "punct":
            tok_text = m.group(kind)
            yield Token(tok_text, tok_text, line, m.start(kind) - line_start + 1)
            pos = end
            continue
        if kind == STRING and "\0" not in m.group(kind):
            yield Token(STRING, m.group(kind), line, m.start(kind) - line_start + 1)
            pos = end
            continue
        if kind == "end":
            pos = end
            break
        pos = m.start(kind)
        col = pos - line_start + 1
        # A lexical error: the lexerr state swallows the rest of the word.
        python = kind == "python"
        if python:
            state.likely_python = True
        start = pos
        pos += 1
        if kind == STRING:  # a NUL inside a string: see the module docstring
            pos = end
            message = "NUL character in quoted string"
        elif text[start] in "'\"":
            message = "unterminated string: expected a closing " + text[start]
        elif "A" <= text[start] <= "Z":
            message = (
                f"unexpected character {text[start]!r}: names are lower case,"
                " [a-z][._0-9a-z]*"
            )
        else:
            message = f"unexpected character {text[start]!r}"
        if pos >= n:
            # flex lexes bytes: a one-byte bad character at the very end
            # leaves it in the lexerr state at end of input, where it stops
            # quietly; the first byte of a longer character leaves the others
            # to be swallowed and reported.
            if len(text[start].encode("utf-8", "surrogateescape")) == 1:
                break
        else:
            w = _LEXERR_WORD_RE.match(text, pos)
            if w is not None:
                pos = w.end()
            elif text[pos] != "\n":
                pos += 1  # a single blank
        state.count += 1
        if state.count <= MAX_PROBLEMS:
            problems.append(LexProblem(line, col, text[start:pos], message, python))
        # A newline right after the bad word is still a NEWLINE token (it is
        # matched by the lexerr state's own newline rule).
    yield Token(EOF, "", line, pos - line_start + 1)
