"""The parser of the xl configuration language: :func:`parse` text into a ConfigFile.

The grammar is libxlutil's ``libxlu_cfg_y.y``, one function per production,
with lists on an explicit stack so that nesting cannot exhaust Python's
recursion limit.  As in libxlutil, a syntax error skips to the end of its line
so one run reports every problem, and any problem makes the file invalid; junk
after a complete value and a full stack stop the parse as they stop bison, and
the stack is counted as bison counts it (``_BISON_MAX_DEPTH``, 10000 states),
so both parsers agree on every input.  Every statement is kept in file order;
lookups take the last, and ``+=`` joins to the value before it
(``xlu__cfg_set_store``).  The design (the grammar in EBNF, the semantics and
the limits) is in docs/config.md, section Parser.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from xenlab.config.errors import ConfigError
from xenlab.config.lexer import (
    EOF,
    IDENT,
    MAX_PROBLEMS,
    NEWLINE,
    NUMBER,
    STRING,
    LexState,
    Token,
    dequote,
    tokens,
)
from xenlab.config.values import ConfigFile, Op, Setting, Value
from xenlab.errors import Problem

__all__ = ["parse"]

# bison's YYMAXDEPTH, and the states on its stack when a value starts:
# the initial state, stmts, IDENT and the operator.
_BISON_MAX_DEPTH: Final = 10000
_BASE_HEIGHT: Final = 4

_BLANKS: Final = " \t"

_PYTHON_HINT: Final = (
    "this looks like an xm-style (Python) config, which xl no longer reads;"
    " convert it with `xenlab config from-xm`"
)


def _describe(tok: Token) -> str:
    if tok.kind == EOF:
        return "end of file"
    if tok.kind == NEWLINE:
        return "end of line" if tok.text == "\n" else "a comment"
    if tok.kind == IDENT:
        return f"name `{tok.text}'"
    if tok.kind == NUMBER:
        return f"number `{tok.text}'"
    if tok.kind == STRING:
        return f"string {tok.text}"
    return f"`{tok.text}'"


def _printable(text: str) -> str:
    """Show control characters in a message as escapes, the rest as written."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class _Syntax(Exception):
    """Internal: a syntax error at ``tok``; caught by the statement loop."""

    def __init__(self, tok: Token, expected: str) -> None:
        super().__init__(expected)
        self.tok = tok
        self.expected = expected


class _Stop(_Syntax):
    """Internal: an error bison cannot recover from; libxlutil stops parsing."""


class _Parser:
    """State of one parse: the token stream, the settings, the problems."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.lex = LexState()
        self.stream: Iterator[Token] = tokens(text, self.lex)
        self.tok: Token = next(self.stream)
        self.problems: list[Problem] = []
        self.count = 0
        self.settings: list[Setting] = []
        self.current: dict[str, Value] = {}

    def advance(self) -> Token:
        tok = self.tok
        if tok.kind != EOF:
            self.tok = next(self.stream)
        return tok

    def skip_newlines(self) -> None:
        while self.tok.kind == NEWLINE:
            self.advance()

    def problem(self, line: int, col: int, message: str) -> None:
        self.count += 1
        if self.count <= MAX_PROBLEMS:
            self.problems.append(Problem(self.source, line, col, message))

    # file = { stmt } [ assignment ] EOF
    def file(self) -> None:
        while True:
            kind = self.tok.kind
            if kind == EOF:
                return
            if kind == NEWLINE or kind == ";":
                self.advance()
                continue
            try:
                if kind != IDENT:
                    raise _Syntax(self.tok, "expected a setting `name = value'")
                self.assignment()
                if self.tok.kind == EOF:
                    return
                if self.tok.kind != NEWLINE and self.tok.kind != ";":
                    # bison has already reduced `stmts assignment` to the
                    # whole file here, so it cannot recover: it stops.
                    raise _Stop(self.tok, "expected end of line or `;' after the value")
                self.advance()
            except _Stop as err:
                tok = err.tok
                self.problem(tok.line, tok.col, f"syntax error near {_describe(tok)}: {err}")
                return
            except _Syntax as err:
                self.syntax_error(err)

    def syntax_error(self, err: _Syntax) -> None:
        tok = err.tok
        self.problem(
            tok.line, tok.col, f"syntax error near {_describe(tok)}: {err.expected}"
        )
        # Recover as bison does with `error NEWLINE`: drop tokens up to and
        # including the next newline.
        while self.tok.kind not in (NEWLINE, EOF):
            self.advance()
        self.advance()

    # assignment = IDENT ( "=" | "+=" ) value
    def assignment(self) -> None:
        name = self.advance()
        if self.tok.kind == "=":
            op = Op.ASSIGN
        elif self.tok.kind == "+=":
            op = Op.ADD
        else:
            raise _Syntax(self.tok, f"expected `=' or `+=' after `{name.text}'")
        self.advance()
        first = self.tok
        value = self.value()
        if op is Op.ADD and name.text in self.current:
            previous = self.current[name.text]
            if isinstance(previous, str) != isinstance(value, str):
                self.problem(
                    first.line,
                    first.col,
                    f"can't add [list] to \"string\" or vice versa: `{name.text}' is a "
                    + ("string" if isinstance(previous, str) else "list")
                    + " but `+=' gives a "
                    + ("string" if isinstance(value, str) else "list"),
                )
                return
            value = previous + value  # type: ignore[operator]
        self.current[name.text] = value
        self.settings.append(
            Setting(name.text, op, value, first.line, first.col, name.line, name.col)
        )

    def atom(self) -> str:
        tok = self.advance()
        if tok.kind == NUMBER:
            return tok.text
        decoded = dequote(tok.text)
        if isinstance(decoded, tuple):
            message, offset, partial = decoded
            self.problem(tok.line, tok.col + offset, message)
            return partial
        return decoded

    # value = STRING | NUMBER | "[" nlok [ values [ "," nlok ] ] "]"
    def value(self) -> Value:
        kind = self.tok.kind
        if kind in (STRING, NUMBER):
            return self.atom()
        if kind != "[":
            raise _Syntax(self.tok, "expected a value: a string, a number or a [list]")
        return self.list_value()

    def bison_push(self, tok: Token, height: int) -> None:
        """Fail as bison does when its state stack would reach YYMAXDEPTH."""
        if height >= _BISON_MAX_DEPTH:
            raise _Stop(tok, "lists nested too deeply (bison: memory exhausted)")

    def skip_newlines_at(self, height: int) -> None:
        """Skip an `nlok`; each NEWLINE is one more bison state while it is reduced."""
        if self.tok.kind == NEWLINE:
            self.bison_push(self.tok, height + 1)
            self.skip_newlines()

    def list_value(self) -> Value:
        # Each open list is a frame of the items read so far, and the number
        # of bison states it holds: `[ nlok` = 2, `[ nlok values` = 3,
        # `[ nlok values , nlok` = 5.  `height` is the whole bison stack, so
        # the depth limit is libxlutil's exactly, whatever the list's shape.
        # `expect_item` says whether the next token must start an item (after
        # `[` or `,`) or close/continue the list.
        stack: list[list[Value]] = []
        states: list[int] = []
        height = _BASE_HEIGHT
        expect_item = True
        while True:
            tok = self.tok
            if expect_item:
                if tok.kind == "[":
                    self.bison_push(tok, height + 2)
                    self.advance()
                    stack.append([])
                    states.append(2)
                    height += 2
                    self.skip_newlines_at(height)
                    continue
                if tok.kind in (STRING, NUMBER):
                    self.bison_push(tok, height + 2)  # value nlok
                    stack[-1].append(self.atom())
                    self.skip_newlines_at(height + 2)
                    height += 3 - states[-1]  # reduced to `[ nlok values`
                    states[-1] = 3
                    expect_item = False
                    continue
                # `]` closes both `[ ]` and a trailing `, ]`; `[ ,` cannot
                # happen here because a `,` is only read after an item.
                if tok.kind != "]":
                    raise _Syntax(tok, "expected a list item or `]'")
            if tok.kind == ",":
                self.bison_push(tok, height + 2)  # , nlok
                self.advance()
                self.skip_newlines_at(height + 2)
                height += 5 - states[-1]
                states[-1] = 5
                expect_item = True
                continue
            if tok.kind != "]":
                raise _Syntax(tok, "expected `,' or `]' in the list")
            self.bison_push(tok, height - states[-1] + 4)  # [ nlok valuelist ]
            self.advance()
            done: Value = tuple(stack.pop())
            height -= states.pop()
            if not stack:
                return done
            stack[-1].append(done)
            self.bison_push(tok, height + 2)  # value nlok, in the parent
            self.skip_newlines_at(height + 2)
            height += 3 - states[-1]
            states[-1] = 3
            expect_item = False


def parse(text: str | bytes, *, source: str = "<string>") -> ConfigFile:
    """Parse the text of an xl configuration file, exactly as libxlutil does.

    ``bytes`` are decoded as UTF-8 with ``surrogateescape``, so any byte string
    can be parsed and non-UTF-8 bytes survive in string values.  ``source``
    names the text in messages.

    :raise ConfigError: with every problem found, each as ``source:line:col``.
        ``err.likely_python`` is set when the text looks like an xm-era
        Python config.
    """
    if isinstance(text, bytes | bytearray | memoryview):
        text = bytes(text).decode("utf-8", "surrogateescape")
    parser = _Parser(text, source)
    parser.file()
    problems = parser.problems
    lex_problems = parser.lex.problems
    likely_python = parser.lex.likely_python
    if lex_problems:
        # As libxlutil does, a lexical error silences the syntax errors it
        # causes later on its own line: the bad word is the one to fix.
        first_lex_col: dict[int, int] = {}
        for lp in lex_problems:
            first_lex_col.setdefault(lp.line, lp.col)
        problems = [
            p for p in problems if not (p.line in first_lex_col and p.col > first_lex_col[p.line])
        ]
        for lp in lex_problems:
            problems.append(
                Problem(
                    source,
                    lp.line,
                    lp.col,
                    f"lexical error near `{_printable(lp.text.rstrip(_BLANKS))}': {lp.message}",
                )
            )
        problems.sort(key=lambda p: (p.line, p.col))
    hidden = parser.count - len(parser.problems) + parser.lex.count - len(lex_problems)
    if problems:
        if len(problems) > MAX_PROBLEMS:
            hidden += len(problems) - MAX_PROBLEMS
            del problems[MAX_PROBLEMS:]
        if hidden:
            last = problems[-1]
            problems.append(
                Problem(source, last.line, last.col, f"too many problems: {hidden} more not shown")
            )
        if likely_python:
            first = problems[0]
            problems.append(Problem(source, first.line, first.col, _PYTHON_HINT))
        err = ConfigError(problems)
        err.likely_python = likely_python
        raise err
    return ConfigFile(source, tuple(parser.settings))
