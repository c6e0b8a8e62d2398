"""The restricted evaluator behind :func:`xenlab.config.xm.convert_xm`: xm files read, never run.

:func:`parse_python` turns the text into an :mod:`ast` tree (bounded, UTF-8,
no NUL or lone surrogates) and :class:`Evaluator` computes the values the file
assigns; nothing is compiled or executed.  Only a small subset is accepted
(plain assignments, constants, lists and tuples, a few operators on strings
and ints, names assigned earlier); everything else is a
:class:`~xenlab.config.errors.ConfigError` placed at the node.  One evaluator
per call holds the names, the notes and a work budget, and every ``MAX_*``
bound (source, strings, values, nesting, work; integers within 64 bits) has a
reason: a new construct must stay inside them.  The design (the accepted
subset, the state and the bounds' reasons) is in docs/config.md, section xm
evaluator.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass

from xenlab.config.errors import ConfigError, ConfigWarning, config_error

__all__ = [
    "MAX_EXPR_DEPTH",
    "MAX_SOURCE_CHARS",
    "MAX_STRING_CHARS",
    "MAX_VALUE_DEPTH",
    "MAX_VALUE_UNITS",
    "MAX_WORK_UNITS",
    "Entry",
    "Evaluator",
    "Py",
    "Seq",
    "parse_python",
    "xm_text",
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
_REFUSED = "xm configs are converted without running them"

# --------------------------------------------------------------------------
# Python values as the evaluator sees them


@dataclass(frozen=True, slots=True)
class Seq:
    """A Python list (``is_list``) or tuple; ``units``/``depth`` are cached."""

    items: tuple[Py, ...]
    is_list: bool
    units: int
    depth: int


Py = str | int | float | bool | None | Seq


def _units(value: Py) -> int:
    if isinstance(value, str):
        return len(value) + 1
    if isinstance(value, Seq):
        return value.units
    return 1


def _type_name(value: Py) -> str:
    if isinstance(value, Seq):
        return "list" if value.is_list else "tuple"
    if value is None:
        return "None"
    return type(value).__name__


def _to_python(value: Py) -> object:
    """Return ``value`` as plain Python data (for ``%`` formatting)."""
    if isinstance(value, Seq):
        items = [_to_python(item) for item in value.items]
        return items if value.is_list else tuple(items)
    return value


@dataclass(slots=True)
class _Binding:
    """A name's value and the place of its last assignment's value."""

    value: Py
    line: int
    col: int


@dataclass(slots=True)
class Entry:
    """One output setting while keys are being translated."""

    name: str
    value: Py
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


class Evaluator:
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

    def charge(self, node: ast.AST, value: Py) -> Py:
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

    def bind(self, target: ast.Name, value_node: ast.expr, value: Py) -> None:
        line, col = self.place(value_node)
        binding = self.env.get(target.id)
        if binding is None:
            self.env[target.id] = _Binding(value, line, col)
        else:
            binding.value, binding.line, binding.col = value, line, col

    # -- expressions ------------------------------------------------------

    def expr(self, node: ast.expr, depth: int) -> Py:
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

    def constant(self, node: ast.Constant) -> Py:
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

    def make_seq(self, node: ast.AST, items: tuple[Py, ...], *, is_list: bool) -> Seq:
        units = 1 + sum(_units(item) for item in items)
        depth = 1 + max((item.depth for item in items if isinstance(item, Seq)), default=0)
        if depth > MAX_VALUE_DEPTH:
            raise self.error(node, f"lists are nested too deeply (at most {MAX_VALUE_DEPTH})")
        seq = Seq(items, is_list, units, depth)
        self.charge(node, seq)
        return seq

    def binop(self, node: ast.AST, op: ast.operator, left: Py, right: Py) -> Py:
        if isinstance(op, ast.Add):
            if isinstance(left, str) and isinstance(right, str):
                self.presize(node, len(left) + len(right))
                return self.charge(node, left + right)
            if isinstance(left, Seq) and isinstance(right, Seq) and left.is_list == right.is_list:
                self.presize(node, left.units + right.units)
                return self.make_seq(node, left.items + right.items, is_list=left.is_list)
        if isinstance(op, ast.Mult):
            if isinstance(right, str | Seq) and _is_int(left):
                left, right = right, left
            if isinstance(left, str | Seq) and _is_int(right):
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

    def format(self, node: ast.AST, template: str, args: Py) -> str:
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
        if not (isinstance(args, Seq) and not args.is_list):
            values = (values,)
        try:
            result = template % values
        except (TypeError, ValueError, OverflowError) as err:
            raise self.error(node, f"string formatting failed: {err}") from None
        assert isinstance(result, str)
        return result


def xm_text(value: Py) -> str:
    """Return a value as xm's string options saw it."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return "" if value is None else str(value)


def _is_int(value: Py) -> bool:
    # xm's Python 2 treated True/False as 1/0 in arithmetic, and so do we.
    return isinstance(value, int)


def _op(op: ast.AST) -> str:
    return _OP_TEXT.get(type(op), type(op).__name__)


# --------------------------------------------------------------------------
# Reading the text


def parse_python(data: str | bytes, source: str) -> tuple[str, ast.Module]:
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
