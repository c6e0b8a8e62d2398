"""Conversion of xm-era (Python) domain configs to xl configs: :func:`convert_xm`.

xm (xend, removed from Xen in 2014) *executed* its config files as Python 2;
xl's libxlutil reads a small language of ``name = value`` lines instead and
gives up on ``+ - . ( ) :`` outside strings.  :func:`convert_xm` reads an xm
file with :mod:`ast` and evaluates it with a restricted evaluator that never
runs the code, maps the Python values to xl values, renames or drops the keys
that xm knew and xl does not, and writes an xl file.

Design
    The text is parsed with :func:`ast.parse` only; nothing is compiled or
    executed.  The evaluator accepts module-level plain assignments
    (``name = expr``, ``a = b = expr``, ``name += expr``), constants (str,
    int, float, bool, None), lists and tuples, ``+`` on strings, lists and
    ints, ``- * // / %`` on ints, ``str * int`` repetition, ``%`` formatting
    of strings, unary ``-``/``+``, references to names assigned earlier,
    bare string statements (docstrings) and ``pass``.  Everything else is
    refused with a :class:`ConfigError` placed at the offending node.
    ``/`` on ints floors, as it did under xm's Python 2.

State
    One :class:`_Evaluator` per call holds the names bound so far (in order
    of first assignment, each with the place of its last assignment), the
    notes and a work budget.

Defaults (with reasons)
    ``MAX_SOURCE_CHARS`` (1,000,000): real xm files are a few KiB; this
    bounds what :func:`ast.parse` is asked to build.  ``MAX_STRING_CHARS``
    (65,536): Xen caps a kernel command line at 1 KiB, and no other value
    comes close.  ``MAX_VALUE_UNITS`` (200,000) bounds one value (a string
    counts its characters, a list its items, recursively);
    ``MAX_VALUE_DEPTH`` (16) bounds list nesting (xl's vnuma needs 2);
    ``MAX_EXPR_DEPTH`` (100) bounds expression nesting so the evaluator never
    nears Python's recursion limit; ``MAX_WORK_UNITS`` (5,000,000) bounds the
    total size of all values built, so a hostile file cannot make the
    evaluator copy large strings many times.  Integers stay within
    ``[-2**63, 2**64)``, the widest any Xen option takes.

Names
    A name that is not a valid xl identifier (xl wants ``[a-z][a-z0-9_.]*``:
    ``BASE``, ``_tmp``, ``vmId``) is a helper variable: it can be referenced
    by later lines but is not written, and a note says so.  xm itself only
    read the option names it knew, so such names never configured anything.
    Other names are written as they are (xl, too, ignores names it does not
    know), except the xm options in the translation table of
    :class:`_Translator`, which are renamed, folded into others or dropped
    with a note.  ``None`` values are dropped with a note.
"""

from __future__ import annotations

import ast
import math
import posixpath
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field

from xenlab.config.errors import ConfigError, ConfigWarning, config_error
from xenlab.config.values import Value
from xenlab.config.writer import format_settings

__all__ = [
    "MAX_EXPR_DEPTH",
    "MAX_SOURCE_CHARS",
    "MAX_STRING_CHARS",
    "MAX_VALUE_DEPTH",
    "MAX_VALUE_UNITS",
    "MAX_WORK_UNITS",
    "XmConversion",
    "convert_xm",
]

MAX_SOURCE_CHARS = 1_000_000
MAX_STRING_CHARS = 65_536
MAX_VALUE_UNITS = 200_000
MAX_VALUE_DEPTH = 16
MAX_EXPR_DEPTH = 100
MAX_WORK_UNITS = 5_000_000
_INT_MIN = -(2**63)
_INT_LIMIT = 2**64
# Width and precision of one ``%`` conversion: enough for any padding a
# config wants, small enough that ``"%999999999d"`` cannot eat memory.
_MAX_FORMAT_WIDTH = 1000

_NOT_TEXT = re.compile("[\\x00\\ud800-\\udfff]")
_XL_NAME = re.compile(r"[a-z][._0-9a-z]*\Z")

_REFUSED = "xm configs are converted without running them"


@dataclass(frozen=True, slots=True)
class XmConversion:
    """The result of converting an xm config.

    ``settings`` are the xl names and values in file order (each name once,
    at its first assignment, with its final value); ``notes`` say what was
    changed, renamed or dropped, with the xm line (line 0 for notes about the
    whole file, such as a default that differs between xm and xl); ``text``
    is the xl file: the notes as comments, then one line per setting, and it
    parses back to exactly ``settings``.
    """

    settings: tuple[tuple[str, Value], ...]
    notes: tuple[ConfigWarning, ...]
    text: str

    def get(self, name: str) -> Value | None:
        """Return the value of ``name``, or None when it is not set."""
        for key, value in self.settings:
            if key == name:
                return value
        return None


# --------------------------------------------------------------------------
# Python values as the evaluator sees them


@dataclass(frozen=True, slots=True)
class _Seq:
    """A Python list (``is_list``) or tuple; ``units``/``depth`` are cached."""

    items: tuple[_Py, ...]
    is_list: bool
    units: int
    depth: int


_Py = str | int | float | bool | None | _Seq


def _units(value: _Py) -> int:
    if isinstance(value, str):
        return len(value) + 1
    if isinstance(value, _Seq):
        return value.units
    return 1


def _type_name(value: _Py) -> str:
    if isinstance(value, _Seq):
        return "list" if value.is_list else "tuple"
    if value is None:
        return "None"
    return type(value).__name__


def _to_python(value: _Py) -> object:
    """Return ``value`` as plain Python data (for ``%`` formatting)."""
    if isinstance(value, _Seq):
        items = [_to_python(item) for item in value.items]
        return items if value.is_list else tuple(items)
    return value


@dataclass(slots=True)
class _Binding:
    """A name's value and the place of its last assignment's value."""

    value: _Py
    line: int
    col: int


@dataclass(slots=True)
class _Entry:
    """One output setting while keys are being translated."""

    name: str
    value: _Py
    line: int
    col: int = 1


# --------------------------------------------------------------------------
# Describing refused constructs

_STMT_NAMES: dict[type[ast.AST], str] = {
    ast.Import: "import statement",
    ast.ImportFrom: "import statement",
    ast.If: "`if` statement",
    ast.For: "`for` loop",
    ast.AsyncFor: "`for` loop",
    ast.While: "`while` loop",
    ast.FunctionDef: "function definition",
    ast.AsyncFunctionDef: "function definition",
    ast.ClassDef: "class definition",
    ast.With: "`with` statement",
    ast.AsyncWith: "`with` statement",
    ast.Try: "`try` statement",
    ast.Raise: "`raise` statement",
    ast.Assert: "`assert` statement",
    ast.Delete: "`del` statement",
    ast.Global: "`global` statement",
    ast.Nonlocal: "`nonlocal` statement",
    ast.Return: "`return` statement",
    ast.Break: "`break` statement",
    ast.Continue: "`continue` statement",
    ast.AnnAssign: "annotated assignment",
    ast.Match: "`match` statement",
}

_EXPR_NAMES: dict[type[ast.AST], str] = {
    ast.Call: "function call",
    ast.Attribute: "attribute access",
    ast.Subscript: "subscript",
    ast.Slice: "slice",
    ast.Lambda: "lambda",
    ast.Dict: "dict",
    ast.Set: "set",
    ast.ListComp: "list comprehension",
    ast.SetComp: "set comprehension",
    ast.DictComp: "dict comprehension",
    ast.GeneratorExp: "generator expression",
    ast.Compare: "comparison",
    ast.BoolOp: "boolean operator",
    ast.IfExp: "conditional expression",
    ast.JoinedStr: "f-string",
    ast.FormattedValue: "f-string",
    ast.Starred: "starred expression",
    ast.NamedExpr: "assignment expression",
    ast.Await: "`await`",
    ast.Yield: "`yield`",
    ast.YieldFrom: "`yield`",
}

_OP_TEXT: dict[type[ast.AST], str] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.MatMult: "@",
}

_ALLOWED_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod)

_FORMAT_SPEC = re.compile(
    r"%(?P<key>\([^)]*\))?[-#0 +]*(?P<width>\*|\d+)?(?:\.(?P<prec>\*|\d*))?[hlL]?"
    r"(?P<conv>.?)",
    re.DOTALL,
)
_FORMAT_CONVERSIONS = frozenset("diouxXeEfFgGcrsa%")


class _Evaluator:
    """Evaluate the allowed subset of an xm file without running it."""

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.lines = text.split("\n")
        self.env: dict[str, _Binding] = {}
        self.notes: list[ConfigWarning] = []
        self.work = 0

    # -- places and errors ------------------------------------------------

    def place(self, node: ast.AST) -> tuple[int, int]:
        """Return the 1-based line and character column of ``node``."""
        line = int(getattr(node, "lineno", 1) or 1)
        offset = int(getattr(node, "col_offset", 0) or 0)
        # ast counts the column in UTF-8 bytes; people count characters.
        text = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        col = len(text.encode("utf-8", "surrogatepass")[:offset].decode("utf-8", "ignore"))
        return line, col + 1

    def error(self, node: ast.AST, message: str) -> ConfigError:
        line, col = self.place(node)
        return config_error(self.source, line, col, message)

    def snippet(self, node: ast.AST) -> str:
        line, col = self.place(node)
        end_line = getattr(node, "end_lineno", None)
        text = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        text = text[col - 1 :]
        if end_line == line:
            end = self.place_end(node)
            if end is not None:
                text = text[: max(end - col, 0)]
        text = text.rstrip()
        if text.endswith(":") and isinstance(node, ast.stmt):
            text = text[:-1].rstrip()
        if len(text) > 60:
            text = text[:57] + "..."
        return text

    def place_end(self, node: ast.AST) -> int | None:
        line = getattr(node, "end_lineno", None)
        offset = getattr(node, "end_col_offset", None)
        if line is None or offset is None or not 0 < line <= len(self.lines):
            return None
        raw = self.lines[line - 1].encode("utf-8", "surrogatepass")[:offset]
        return len(raw.decode("utf-8", "ignore")) + 1

    def refuse(self, node: ast.AST, what: str) -> ConfigError:
        return self.error(node, f"{what} `{self.snippet(node)}` is not allowed: {_REFUSED}")

    def note(self, line: int, message: str) -> None:
        self.notes.append(ConfigWarning(self.source, line, message))

    def charge(self, node: ast.AST, value: _Py) -> _Py:
        """Count a new value against the limits; return it."""
        units = _units(value)
        if isinstance(value, str) and len(value) > MAX_STRING_CHARS:
            raise self.error(
                node,
                f"string of {len(value)} characters is too long "
                f"(at most {MAX_STRING_CHARS} are allowed)",
            )
        if units > MAX_VALUE_UNITS:
            raise self.error(node, f"value is too large (at most {MAX_VALUE_UNITS} items)")
        self.work += units
        if self.work > MAX_WORK_UNITS:
            raise self.error(
                node, f"the config builds too much data (more than {MAX_WORK_UNITS} items)"
            )
        return value

    def check_int(self, node: ast.AST, value: int) -> int:
        if not _INT_MIN <= value < _INT_LIMIT:
            raise self.error(node, "integer is out of range (expected -2**63 to 2**64-1)")
        return value

    # -- statements -------------------------------------------------------

    def run(self, tree: ast.Module) -> None:
        for stmt in tree.body:
            self.statement(stmt)

    def statement(self, node: ast.stmt) -> None:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                self.check_target(target)
            value = self.expr(node.value, 0)
            for target in node.targets:
                assert isinstance(target, ast.Name)
                self.bind(target, node.value, value)
        elif isinstance(node, ast.AugAssign):
            self.check_target(node.target)
            assert isinstance(node.target, ast.Name)
            binding = self.env.get(node.target.id)
            if binding is None:
                raise self.error(
                    node.target,
                    f"name `{node.target.id}` is extended with `{_op(node.op)}=` "
                    "before it is assigned",
                )
            right = self.expr(node.value, 0)
            value = self.binop(node, node.op, binding.value, right)
            self.bind(node.target, node.value, value)
        elif isinstance(node, ast.Expr):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                return  # a docstring or a string used as a comment
            what = _EXPR_NAMES.get(type(node.value))
            if what is None:
                raise self.error(
                    node,
                    f"expression `{self.snippet(node)}` outside an assignment is not allowed: "
                    "an xm config only assigns names",
                )
            raise self.refuse(node.value, what)
        elif isinstance(node, ast.Pass):
            return
        else:
            raise self.refuse(node, _STMT_NAMES.get(type(node), "statement"))

    def check_target(self, target: ast.expr) -> None:
        if isinstance(target, ast.Name):
            return
        if isinstance(target, ast.Tuple | ast.List):
            raise self.refuse(target, "unpacking assignment")
        raise self.refuse(target, "assignment to " + _EXPR_NAMES.get(type(target), "expression"))

    def bind(self, target: ast.Name, value_node: ast.expr, value: _Py) -> None:
        line, col = self.place(value_node)
        binding = self.env.get(target.id)
        if binding is None:
            self.env[target.id] = _Binding(value, line, col)
        else:
            binding.value, binding.line, binding.col = value, line, col

    # -- expressions ------------------------------------------------------

    def expr(self, node: ast.expr, depth: int) -> _Py:
        if depth > MAX_EXPR_DEPTH:
            raise self.error(node, f"expression is nested too deeply (at most {MAX_EXPR_DEPTH})")
        if isinstance(node, ast.Constant):
            return self.constant(node)
        if isinstance(node, ast.Name):
            binding = self.env.get(node.id)
            if binding is None:
                raise self.error(
                    node,
                    f"name `{node.id}` is not assigned before this line "
                    "(xm's command-line variables and built-ins are not supported)",
                )
            return binding.value
        if isinstance(node, ast.List | ast.Tuple):
            items = tuple(self.expr(item, depth + 1) for item in node.elts)
            return self.make_seq(node, items, is_list=isinstance(node, ast.List))
        if isinstance(node, ast.BinOp):
            if not isinstance(node.op, _ALLOWED_OPS):
                raise self.error(
                    node,
                    f"operator `{_op(node.op)}` is not allowed: {_REFUSED} (allowed: + - * / // %)",
                )
            left = self.expr(node.left, depth + 1)
            right = self.expr(node.right, depth + 1)
            return self.binop(node, node.op, left, right)
        if isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, ast.USub | ast.UAdd):
                word = {ast.Not: "not", ast.Invert: "~"}.get(type(node.op), "?")
                raise self.error(node, f"operator `{word}` is not allowed: {_REFUSED}")
            operand = self.expr(node.operand, depth + 1)
            if isinstance(operand, bool) or not isinstance(operand, int | float):
                raise self.error(
                    node, f"unary minus or plus needs a number, not {_type_name(operand)}"
                )
            if isinstance(node.op, ast.USub):
                return self.check_int(node, -operand) if isinstance(operand, int) else -operand
            return operand
        raise self.refuse(node, _EXPR_NAMES.get(type(node), "expression"))

    def constant(self, node: ast.Constant) -> _Py:
        value = node.value
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, str):
            return self.charge(node, value)
        if isinstance(value, int):
            return self.check_int(node, value)
        if isinstance(value, float):
            if not math.isfinite(value):
                raise self.error(node, "number is not finite")
            return value
        kind = {bytes: "bytes literal", complex: "complex number"}.get(type(value), "constant")
        raise self.refuse(node, kind)

    def make_seq(self, node: ast.AST, items: tuple[_Py, ...], *, is_list: bool) -> _Seq:
        units = 1 + sum(_units(item) for item in items)
        depth = 1 + max((item.depth for item in items if isinstance(item, _Seq)), default=0)
        if depth > MAX_VALUE_DEPTH:
            raise self.error(node, f"lists are nested too deeply (at most {MAX_VALUE_DEPTH})")
        seq = _Seq(items, is_list, units, depth)
        self.charge(node, seq)
        return seq

    def binop(self, node: ast.AST, op: ast.operator, left: _Py, right: _Py) -> _Py:
        if isinstance(op, ast.Add):
            if isinstance(left, str) and isinstance(right, str):
                self.presize(node, len(left) + len(right))
                return self.charge(node, left + right)
            if isinstance(left, _Seq) and isinstance(right, _Seq) and left.is_list == right.is_list:
                self.presize(node, left.units + right.units)
                return self.make_seq(node, left.items + right.items, is_list=left.is_list)
        if isinstance(op, ast.Mult):
            if isinstance(right, str | _Seq) and _is_int(left):
                left, right = right, left
            if isinstance(left, str | _Seq) and _is_int(right):
                assert isinstance(right, int)
                count = max(right, 0)
                self.presize(node, _units(left) * count)
                if isinstance(left, str):
                    return self.charge(node, left * count)
                return self.make_seq(node, left.items * count, is_list=left.is_list)
        if isinstance(op, ast.Mod) and isinstance(left, str):
            return self.charge(node, self.format(node, left, right))
        if _is_int(left) and _is_int(right):
            assert isinstance(left, int) and isinstance(right, int)
            return self.check_int(node, self.int_op(node, op, left, right))
        raise self.error(
            node,
            f"operator `{_op(op)}` is not allowed between {_type_name(left)} "
            f"and {_type_name(right)} (only int arithmetic, string and list joining, "
            "repetition and % formatting are)",
        )

    def int_op(self, node: ast.AST, op: ast.operator, left: int, right: int) -> int:
        if isinstance(op, ast.Add):
            return left + right
        if isinstance(op, ast.Sub):
            return left - right
        if isinstance(op, ast.Mult):
            return left * right
        if right == 0:
            raise self.error(node, "division by zero")
        if isinstance(op, ast.Div):
            line, _ = self.place(node)
            self.note(
                line,
                "`/` on integers divides to a whole number here, as under xm's Python 2",
            )
            return left // right
        if isinstance(op, ast.FloorDiv):
            return left // right
        return left % right

    def presize(self, node: ast.AST, units: int) -> None:
        # Refuse before building: `"a" * 10**9` must not allocate anything.
        if units > MAX_VALUE_UNITS:
            raise self.error(node, f"value is too large (at most {MAX_VALUE_UNITS} items)")

    def format(self, node: ast.AST, template: str, args: _Py) -> str:
        if len(template) > MAX_STRING_CHARS:
            raise self.error(node, "format string is too long")
        total_width = 0
        for match in _FORMAT_SPEC.finditer(template):
            conv = match["conv"]
            if match["key"] is not None:
                raise self.error(node, "`%(name)` formatting needs a dict, which is not allowed")
            if conv not in _FORMAT_CONVERSIONS:
                raise self.error(node, f"unsupported format character {conv!r} in format string")
            for part in (match["width"], match["prec"]):
                if part == "*":
                    raise self.error(node, "`*` width in format string is not allowed")
                if part and (len(part) > 4 or int(part) > _MAX_FORMAT_WIDTH):
                    raise self.error(
                        node,
                        f"format width or precision is too large (at most {_MAX_FORMAT_WIDTH})",
                    )
                total_width += int(part) if part else 0
        self.presize(node, len(template) + total_width + _units(args) * 8)
        values = _to_python(args)
        if not (isinstance(args, _Seq) and not args.is_list):
            values = (values,)
        try:
            result = template % values
        except (TypeError, ValueError, OverflowError) as err:
            raise self.error(node, f"string formatting failed: {err}") from None
        assert isinstance(result, str)
        return result


def _text(value: _Py) -> str:
    """Return a value as xm's string options saw it."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return "" if value is None else str(value)


def _is_int(value: _Py) -> bool:
    # xm's Python 2 treated True/False as 1/0 in arithmetic, and so do we.
    return isinstance(value, int)


def _op(op: ast.AST) -> str:
    return _OP_TEXT.get(type(op), type(op).__name__)


# --------------------------------------------------------------------------
# Reading the text


def _parse(data: str | bytes, source: str) -> tuple[str, ast.Module]:
    if isinstance(data, str):
        text = data
    else:
        raw = bytes(data)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            before = raw[: err.start]
            line = before.count(b"\n") + 1
            col = len(before[before.rfind(b"\n") + 1 :].decode("utf-8", "replace")) + 1
            raise config_error(
                source, line, col, f"byte {raw[err.start]:#04x} is not UTF-8 text"
            ) from None
    if len(text) > MAX_SOURCE_CHARS:
        raise config_error(
            source, 1, 1, f"file is too large to convert (at most {MAX_SOURCE_CHARS} characters)"
        )
    bad = _NOT_TEXT.search(text)
    if bad is not None:
        head = text[: bad.start()]
        line = head.count("\n") + 1
        col = bad.start() - (head.rfind("\n") + 1) + 1
        what = "NUL character" if bad.group() == "\0" else "unpaired surrogate"
        raise config_error(source, line, col, f"{what} in the file, expected text")
    try:
        tree = ast.parse(text, filename=source, mode="exec")
    except SyntaxError as err:
        line = max(err.lineno or 1, 1)
        col = max(err.offset or 1, 1)
        raise config_error(
            source,
            line,
            col,
            f"Python syntax error: {err.msg} (xm configs are Python 2-era "
            "Python; this one does not parse as Python 3)",
        ) from None
    except (RecursionError, MemoryError):
        raise config_error(
            source, 1, 1, "expression is nested too deeply for the Python parser"
        ) from None
    except (ValueError, OverflowError, UnicodeError) as err:
        raise config_error(source, 1, 1, f"cannot parse as Python: {err}") from None
    return text, tree


# --------------------------------------------------------------------------
# Python values to xl values


def _xl_value(ev: _Evaluator, entry: _Entry, value: _Py) -> Value:
    name = entry.name
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        if "\0" in value:
            raise config_error(
                ev.source,
                entry.line,
                entry.col,
                f"value of `{name}` contains a NUL character, which xl strings cannot hold",
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise config_error(
                ev.source,
                entry.line,
                entry.col,
                f"value of `{name}` contains an unpaired surrogate, which is not text",
            ) from None
        return value
    if value is None:
        raise config_error(
            ev.source,
            entry.line,
            entry.col,
            f"`{name}` has None inside a list; xl lists hold only strings, numbers and lists",
        )
    return tuple(_xl_value(ev, entry, item) for item in value.items)


# --------------------------------------------------------------------------
# Key translation: xm names and values to xl ones

_XM_ACTIONS = frozenset(
    {"destroy", "restart", "preserve", "rename-restart", "coredump-destroy", "coredump-restart"}
)
_XL_ACTIONS = _XM_ACTIONS | {"soft-reset"}
_ACTION_KEYS = ("on_poweroff", "on_reboot", "on_crash")
_RESTART_MODES: dict[str, tuple[str, str, str]] = {
    "onreboot": ("destroy", "restart", "destroy"),
    "always": ("restart", "restart", "restart"),
    # xend wrote the invalid action 'never' here; what was meant is destroy.
    "never": ("destroy", "destroy", "destroy"),
}
_TSC_MODES = ("default", "always_emulate", "native", "native_paravirt")
_TIMER_MODES = (
    "delay_for_missed_ticks",
    "no_delay_for_missed_ticks",
    "no_missed_ticks_pending",
    "one_missed_tick_pending",
)
_RENAMES = {"cpu_cap": "cap", "irq": "irqs"}
_IP_KEYS = ("ip", "gateway", "netmask", "hostname", "interface", "dhcp", "nfs_server", "nfs_root")
#: xm options with no xl equivalent, and why.
_DROPPED: dict[str, str] = {
    "vncconsole": "xl has no such option; use `xl create -V` to start a VNC viewer",
    "vncviewer": "xl ignores it; use `xl create -V` to start a VNC viewer",
    "description": "xl has no description option",
    "features": "xl has no PV `features` option",
    "vscsi": "xl 4.17 has no PV SCSI option",
    "vusb": "xl describes USB with `usbctrl` and `usbdev`, in another syntax",
    "fda": "xl cannot attach floppy disks",
    "fdb": "xl cannot attach floppy disks",
    "isa": "xl has no ISA-only machine option",
    "guest_os_type": "xl has no guest OS type option",
    "parallel": "xl has no parallel port option",
    "monitor": "xl has no device-model monitor option",
    "monitor_path": "xl has no device-model monitor option",
    "on_xend_start": "there is no xend under xl",
    "on_xend_stop": "there is no xend under xl",
    "target": "xl sets up stub domains itself",
    "memory_sharing": "xl has no memory sharing option",
    "s3_integrity": "xl has no tboot S3 integrity option",
    "machine_address_size": "xl has no machine address size option",
    "suppress_spurious_page_faults": "xl has no such option",
    "superpages": "xl has no superpages option",
    "cpuid_check": "xl has no cpuid_check option",
    "access_control": "xl labels domains with `seclabel` instead",
    "vhpt": "an IA64 option",
    "nics": "deprecated in xm; the number of `vif` entries counts",
    "bootentry": "deprecated in xm; pass the entry in `bootloader_args`",
}


@dataclass(slots=True)
class _Translator:
    ev: _Evaluator
    entries: list[_Entry] = field(default_factory=list)

    def note(self, line: int, message: str) -> None:
        self.ev.note(line, message)

    def find(self, name: str) -> _Entry | None:
        for entry in self.entries:
            if entry.name == name:
                return entry
        return None

    def remove(self, name: str) -> _Entry | None:
        entry = self.find(name)
        if entry is not None:
            self.entries.remove(entry)
        return entry

    def replace(self, old: _Entry, new: Iterable[_Entry]) -> None:
        index = self.entries.index(old)
        self.entries[index : index + 1] = list(new)

    def error(self, entry: _Entry, message: str) -> ConfigError:
        return config_error(self.ev.source, entry.line, entry.col, message)

    def run(self) -> None:
        guest_type = self.guest_type()
        for handler in (
            self.builder,
            self.kernel_and_loader,
            self.device_model,
            self.renames,
            self.cpu,
            self.vcpu_avail,
            self.restart,
            self.actions,
            self.modes,
            self.bootargs,
            self.ip_family,
            self.cmdline,
            self.vfb,
            self.backends,
            self.dropped,
            self.boot,
        ):
            handler(guest_type)
        self.defaults()

    def guest_type(self) -> str | None:
        builder = self.find("builder")
        typ = self.find("type")
        if typ is not None and typ.value not in ("pv", "pvh", "hvm"):
            # xm never read `type`, so here it is a helper variable (say,
            # for vif strings); xl would take it as the guest type.
            self.remove("type")
            self.note(
                typ.line,
                f"dropped `type = {typ.value!r}`: xm ignored it, and xl would "
                "read it as the guest type",
            )
            typ = None
        if builder is None:
            return typ.value if typ is not None else None  # type: ignore[return-value]
        if builder.value == "hvm":
            from_builder = "hvm"
        elif builder.value in ("linux", "generic"):
            from_builder = "pv"
        else:
            raise self.error(
                builder,
                f"builder {builder.value!r} is unknown, expected 'hvm', 'linux' or 'generic'",
            )
        if typ is not None and typ.value != from_builder:
            raise self.error(builder, f"builder {builder.value!r} contradicts type {typ.value!r}")
        return from_builder

    def builder(self, guest_type: str | None) -> None:
        builder = self.find("builder")
        if builder is None:
            return
        if self.find("type") is not None:
            self.remove("builder")
            self.note(builder.line, "dropped `builder`: `type` already says the same")
            return
        self.replace(builder, [_Entry("type", guest_type, builder.line)])
        self.note(
            builder.line,
            f'`builder = {builder.value!r}` became `type = "{guest_type}"` '
            "(xl deprecates `builder`, and rejects 'linux')",
        )

    def kernel_and_loader(self, guest_type: str | None) -> None:
        kernel = self.find("kernel")
        if (
            guest_type == "hvm"
            and kernel is not None
            and isinstance(kernel.value, str)
            and posixpath.basename(kernel.value) == "hvmloader"
        ):
            self.remove("kernel")
            self.note(
                kernel.line,
                "dropped `kernel = hvmloader`: xl loads the HVM firmware itself "
                "(use `firmware_override` for a non-default one)",
            )
        loader = self.find("loader")
        if loader is None:
            return
        if isinstance(loader.value, str) and posixpath.basename(loader.value) == "hvmloader":
            self.remove("loader")
            self.note(loader.line, "dropped `loader = hvmloader`: xl loads the HVM firmware itself")
        else:
            self.replace(loader, [_Entry("firmware_override", loader.value, loader.line)])
            self.note(loader.line, "renamed `loader` to `firmware_override`")

    def device_model(self, guest_type: str | None) -> None:
        entry = self.find("device_model")
        if entry is None:
            return
        path = entry.value if isinstance(entry.value, str) else ""
        base = posixpath.basename(path)
        if base == "qemu-dm":
            self.remove("device_model")
            self.note(
                entry.line,
                f"dropped `device_model = {path!r}`: it named xm's default device model, "
                "and xl picks its own (xl ignores `device_model`)",
            )
        elif "stubdom-dm" in base:
            if guest_type == "hvm":
                self.replace(entry, [_Entry("device_model_stubdomain_override", True, entry.line)])
                self.note(
                    entry.line,
                    f"`device_model = {path!r}` became `device_model_stubdomain_override = 1`",
                )
            else:
                self.remove("device_model")
                self.note(entry.line, "dropped `device_model`: stub domains are for HVM guests")
        else:
            self.replace(entry, [_Entry("device_model_override", entry.value, entry.line)])
            self.note(
                entry.line,
                "renamed `device_model` to `device_model_override` (xl ignores "
                "`device_model`); xm's device models were qemu-xen-traditional, so also "
                "set `device_model_version` to match the binary",
            )

    def renames(self, guest_type: str | None) -> None:
        for old, new in _RENAMES.items():
            entry = self.find(old)
            if entry is None:
                continue
            value = entry.value
            if new == "irqs" and not isinstance(value, _Seq):
                value = _Seq((value,), True, 2, 1)
            if self.find(new) is not None:
                self.remove(old)
                self.note(entry.line, f"dropped `{old}`: `{new}` is also set and wins")
            else:
                self.replace(entry, [_Entry(new, value, entry.line)])
                self.note(entry.line, f"renamed `{old}` to `{new}`")

    def cpu(self, guest_type: str | None) -> None:
        entry = self.find("cpu")
        if entry is None:
            return
        cpus = self.find("cpus")
        if cpus is None:
            self.replace(entry, [_Entry("cpus", str(entry.value), entry.line)])
            self.note(entry.line, "`cpu` (xm's deprecated pinning) became `cpus`")
        elif isinstance(cpus.value, str | int):
            self.remove("cpu")
            cpus.value = f"{entry.value},{cpus.value}"
            self.note(entry.line, "merged `cpu` into `cpus` as xm did (`cpu,cpus`)")
        else:
            self.remove("cpu")
            self.note(entry.line, "dropped `cpu`: xm ignored it beside a per-vCPU `cpus` list")

    def vcpu_avail(self, guest_type: str | None) -> None:
        entry = self.find("vcpu_avail")
        if entry is None:
            return
        mask = entry.value
        vcpus_entry = self.find("vcpus")
        vcpus = vcpus_entry.value if vcpus_entry is not None else 1
        # xl can start the first N vCPUs online and no other set, so only a
        # mask of the low bits has an xl form.
        if not (
            isinstance(mask, int)
            and not isinstance(mask, bool)
            and isinstance(vcpus, int)
            and mask > 0
            and mask & (mask + 1) == 0
            and self.find("maxvcpus") is None
        ):
            self.remove("vcpu_avail")
            self.note(
                entry.line,
                "dropped `vcpu_avail`: xl can only start the first N vCPUs online "
                "(`vcpus = N` with `maxvcpus`)",
            )
            return
        online = mask.bit_length()
        if online >= vcpus:
            self.remove("vcpu_avail")
            self.note(entry.line, "dropped `vcpu_avail`: every vCPU starts online")
            return
        maxvcpus = _Entry("maxvcpus", vcpus, entry.line)
        self.replace(entry, [maxvcpus])
        if vcpus_entry is not None:
            vcpus_entry.value = online
        else:
            self.entries.insert(self.entries.index(maxvcpus), _Entry("vcpus", online, entry.line))
        self.note(
            entry.line,
            f"`vcpu_avail = {mask:#x}` became `vcpus = {online}` with `maxvcpus = {vcpus}`",
        )

    def restart(self, guest_type: str | None) -> None:
        entry = self.find("restart")
        if entry is None:
            return
        mode = _RESTART_MODES.get(entry.value) if isinstance(entry.value, str) else None
        if mode is None:
            self.remove("restart")
            self.note(entry.line, f"dropped `restart = {entry.value!r}`: xend ignored that value")
            return
        for key in _ACTION_KEYS:
            if self.remove(key) is not None:
                self.note(entry.line, f"`restart` overrides `{key}`, as it did in xend")
        self.replace(
            entry,
            [
                _Entry(key, action, entry.line)
                for key, action in zip(_ACTION_KEYS, mode, strict=True)
            ],
        )
        self.note(entry.line, f"`restart = {entry.value!r}` became on_poweroff/on_reboot/on_crash")

    def actions(self, guest_type: str | None) -> None:
        for key in (*_ACTION_KEYS, "on_watchdog", "on_soft_reset"):
            entry = self.find(key)
            if entry is not None and entry.value not in _XL_ACTIONS:
                raise self.error(
                    entry,
                    f"`{key}` action {entry.value!r} is unknown, expected one of "
                    + ", ".join(sorted(_XL_ACTIONS)),
                )

    def modes(self, guest_type: str | None) -> None:
        for key, names in (("tsc_mode", _TSC_MODES), ("timer_mode", _TIMER_MODES)):
            entry = self.find(key)
            if entry is None or isinstance(entry.value, bool) or not isinstance(entry.value, int):
                continue
            if not 0 <= entry.value < len(names):
                raise self.error(
                    entry, f"`{key}` {entry.value} is out of range, expected 0 to {len(names) - 1}"
                )
            new = names[entry.value]
            self.note(
                entry.line,
                f'`{key} = {entry.value}` became `{key} = "{new}"` (xl deprecates the numbers)',
            )
            entry.value = new

    def bootargs(self, guest_type: str | None) -> None:
        entry = self.find("bootargs")
        if entry is None:
            return
        if self.find("bootloader_args") is not None:
            self.remove("bootargs")
            self.note(entry.line, "dropped `bootargs`: `bootloader_args` is also set")
            return
        if isinstance(entry.value, str):
            try:
                words = shlex.split(entry.value)
            except ValueError as err:
                raise self.error(entry, f"cannot split `bootargs` into words: {err}") from None
            value: _Py = _Seq(tuple(words), True, 1 + sum(len(w) + 1 for w in words), 1)
        else:
            value = entry.value
        self.replace(entry, [_Entry("bootloader_args", value, entry.line)])
        self.note(entry.line, "`bootargs` became the list `bootloader_args` (split as xend did)")

    def ip_family(self, guest_type: str | None) -> None:
        found = {key: e for key in _IP_KEYS if (e := self.find(key)) is not None}
        if not found:
            return
        values = {key: _text(e.value) for key, e in found.items()}
        first = min(found.values(), key=self.entries.index)
        index = self.entries.index(first)
        extra = self.find("extra")
        old_args = _text(extra.value) if extra is not None else ""
        args = old_args
        # xm built these into the kernel command line (xm/create.py's
        # preprocess_ip and preprocess_nfs, then XendConfig); xl does not
        # know them, so the command line they made is written out instead.
        nfs_server = values.get("nfs_server", "")
        if values.get("nfs_root"):
            if not nfs_server:
                raise self.error(found["nfs_root"], "`nfs_root` needs `nfs_server`, as in xm")
            args = f"nfsroot={nfs_server}:{values['nfs_root']} {args}"
        ip = values.get("ip", "")
        dhcp = values.get("dhcp", "off")
        if (ip or dhcp != "off") and not re.search(r"ip=[^ ]+", args):
            fields = (
                ip,
                nfs_server or "127.0.255.255",
                values.get("gateway", ""),
                values.get("netmask", ""),
                values.get("hostname", ""),
                values.get("interface", "eth0"),
                dhcp,
            )
            args = "ip=" + ":".join(fields) + " " + args
        args = args.rstrip(" ") if not old_args else args
        for key in found:
            self.remove(key)
        if extra is not None:
            extra.value = args
        elif args:
            self.entries.insert(index, _Entry("extra", args, first.line))
        names = ", ".join(f"`{key}`" for key in found)
        if args == old_args:
            self.note(first.line, f"dropped {names}: xm added nothing to the command line")
        else:
            self.note(
                first.line, f"folded {names} into `extra` (the kernel command line), as xm did"
            )

    def cmdline(self, guest_type: str | None) -> None:
        entry = self.find("cmdline")
        if entry is not None and (self.find("root") or self.find("extra")):
            # xm never read `cmdline`; xl would use it and ignore root/extra.
            self.remove("cmdline")
            self.note(
                entry.line,
                "dropped `cmdline`: xm ignored it, and xl would use it in place of "
                "`root` and `extra`",
            )

    def vfb(self, guest_type: str | None) -> None:
        entry = self.find("vfb")
        if entry is None or not isinstance(entry.value, _Seq):
            return
        specs: list[_Py] = []
        changed = False
        for spec in entry.value.items:
            if isinstance(spec, str):
                parts = [p.strip() for p in spec.split(",")]
                new_parts = [{"type=vnc": "vnc=1", "type=sdl": "sdl=1"}.get(p, p) for p in parts]
                if new_parts != parts:
                    changed = True
                    spec = ",".join(new_parts)
            specs.append(spec)
        if changed:
            entry.value = _Seq(tuple(specs), True, entry.value.units, entry.value.depth)
            self.note(entry.line, "`vfb`: xm's `type=vnc`/`type=sdl` became `vnc=1`/`sdl=1`")

    def backends(self, guest_type: str | None) -> None:
        for key in ("blkif", "netif"):
            entry = self.find(key)
            if entry is None:
                continue
            if entry.value and self.find("driver_domain") is None:
                self.replace(entry, [_Entry("driver_domain", True, entry.line)])
                self.note(entry.line, f"`{key}` (a backend domain) became `driver_domain = 1`")
            else:
                self.remove(key)
                self.note(entry.line, f"dropped `{key}`")

    def dropped(self, guest_type: str | None) -> None:
        for key, why in _DROPPED.items():
            entry = self.remove(key)
            if entry is not None:
                self.note(entry.line, f"dropped `{key}`: {why}")

    def boot(self, guest_type: str | None) -> None:
        entry = self.find("boot")
        if entry is not None and isinstance(entry.value, str):
            odd = sorted(set(entry.value) - set("cdn"))
            if odd:
                self.note(
                    entry.line,
                    f"`boot` has {', '.join(odd)}: xl boots only from c (disk), d (CD-ROM) "
                    "and n (network)",
                )

    def defaults(self) -> None:
        if not any(self.find(key) for key in ("on_crash",)):
            self.note(
                0,
                "xm restarted a crashed domain by default, xl destroys it: "
                'add `on_crash = "restart"` to keep xm\'s behaviour',
            )
        if self.find("memory") is None:
            self.note(0, "xm gave 128 MiB when `memory` was not set, xl gives 32 MiB")
        if self.find("name") is None:
            self.note(0, "xl needs `name`; the file sets none")


# --------------------------------------------------------------------------
# Writing the xl file


def _comment(text: str) -> str:
    # A comment runs to the end of the line, so a value with a newline in a
    # note must not end it early.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _render(
    source: str,
    settings: tuple[tuple[str, Value], ...],
    notes: tuple[ConfigWarning, ...],
) -> str:
    lines = [f"# xl config converted from the xm config {_comment(source)} by xenlab.\n"]
    for note in notes:
        where = f"line {note.line}" if note.line else "file"
        lines.append(f"# {where}: {_comment(note.message)}\n")
    lines.append("\n")
    return "".join(lines) + format_settings(settings)


# --------------------------------------------------------------------------
# Entry point


def convert_xm(text: str | bytes, *, source: str = "<xm>") -> XmConversion:
    """Convert the xm (Python) config ``text`` to an xl config, without running it.

    ``text`` may be bytes, which must be UTF-8.  ``source`` names the file in
    messages.  Returns the xl settings in file order, notes on everything that
    was renamed, changed or dropped, and the xl text.

    :raise ConfigError: when the text is not UTF-8 or not Python, uses a
        construct outside the allowed subset (imports, calls, attribute
        access, ``if``/``for``/``def``, subscripts...), exceeds a size limit,
        or sets a value xl cannot hold or xm itself would reject (an unknown
        ``builder`` or ``on_*`` action).  The error is placed at the node.
    """
    text, tree = _parse(text, source)
    ev = _Evaluator(source, text)
    ev.run(tree)
    translator = _Translator(ev)
    for name, binding in ev.env.items():
        if not _XL_NAME.match(name):
            ev.note(
                binding.line,
                f"`{name}` is not an xl name (xl names are lowercase letters, digits, `_` "
                "and `.`, starting with a letter): kept as a helper variable, not written",
            )
            continue
        if binding.value is None:
            ev.note(binding.line, f"dropped `{name}`: it is None, which xl has no value for")
            continue
        translator.entries.append(_Entry(name, binding.value, binding.line, binding.col))
    translator.run()
    settings = tuple(
        (entry.name, _xl_value(ev, entry, entry.value)) for entry in translator.entries
    )
    notes = tuple(sorted(ev.notes, key=lambda n: n.line))
    return XmConversion(settings, notes, _render(source, settings, notes))
