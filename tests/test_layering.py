"""The code's shape: no private name crosses a module, no file too long, no run-time cycle.

The rooms' layers are import-linter contracts in pyproject.toml (run by
``./dev.sh test``); what import-linter cannot see is checked here from the
source: a name starting with ``_`` used outside the module that defines it
(``from m import _x``, ``m._x``, a private module of another package), and
imports hidden inside functions that would close a cycle between modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "xenlab"
MAX_LINES = 1000


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(module: str, source: str) -> Iterator[str]:
    """Each place ``source`` (the text of ``module``) reaches a private name of another."""
    tree = ast.parse(source)
    package = module.rsplit(".", 1)[0]
    imported: dict[str, str] = {}  # local name -> the xenlab module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            target = node.module
            if node.level:  # relative: resolve against this package
                base = module.split(".")[: -node.level] if node.level else []
                target = ".".join([*base, node.module])
            # A private module may be used by its own package (formats/_x by formats/y).
            for part_index, part in enumerate(target.split(".")):
                owner = ".".join(target.split(".")[:part_index])
                if _private(part) and not package.startswith(owner):
                    yield f"{module}:{node.lineno}: imports private module {target}"
            for alias in node.names:
                if _private(alias.name) and target != module:
                    yield f"{module}:{node.lineno}: from {target} import {alias.name}"
                imported[alias.asname or alias.name] = f"{target}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                imported[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr)
                and isinstance(node.value, ast.Name)
                and imported.get(node.value.id, "").startswith("xenlab")):
            yield f"{module}:{node.lineno}: {node.value.id}.{node.attr}"


def _sources() -> Iterator[tuple[str, Path]]:
    for path in sorted(SRC.rglob("*.py")):
        yield _module_name(path), path


def test_the_checker_sees_private_names() -> None:
    planted = (
        "from xenlab.vm.snapshot import _img\n"
        "from xenlab.vm import qemu\n"
        "x = qemu._FORMAT_DRIVERS\n"
        "from xenlab.formats._hidden import Thing\n"
    )
    found = list(private_uses("xenlab.vm.mirror", planted))
    assert len(found) == 3, found
    # Its own package's private module, and aliasing a public name, are fine.
    fine = "from xenlab.formats._hidden import Thing\nfrom xenlab.vm.qmp import run as _run\n"
    assert list(private_uses("xenlab.formats.cpio", fine)) == []


def test_no_private_name_crosses_a_module() -> None:
    found = [use for name, path in _sources() for use in private_uses(name, path.read_text())]
    assert found == []


def test_no_source_file_over_a_thousand_lines() -> None:
    long = {name: n for name, path in _sources()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


MAX_FUNCTION = 100


def long_functions_without_a_reason(source: str) -> list[str]:
    """Functions of more than MAX_FUNCTION lines whose docstring does not say why."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION and "Why one function" not in (ast.get_docstring(node) or ""):
                out.append(f"{node.name} ({length} lines)")
    return out


def test_the_length_check_sees_a_long_function() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION + 1))
    assert long_functions_without_a_reason(f"def f():\n{body}\n") == [
        f"f ({MAX_FUNCTION + 2} lines)"]
    why = f'def f():\n    """Why one function: it is a table."""\n{body}\n'
    assert long_functions_without_a_reason(why) == []


def test_long_functions_say_why() -> None:
    found = {name: bad for name, path in _sources()
             if (bad := long_functions_without_a_reason(path.read_text()))}
    assert found == {}


def test_the_toolstack_raises_specific_errors_not_the_root() -> None:
    # A caller tells a refused value from a backend failure by class (and reads the
    # fields); the root class says nothing.
    found = [f"{path.relative_to(SRC)}:{node.lineno}"
             for path in sorted((SRC / "vm").rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
             and isinstance(node.exc.func, ast.Name) and node.exc.func.id == "XenlabError"]
    assert found == []


def test_only_the_cli_starts_an_event_loop() -> None:
    # The verbs are async; a command's one loop is cli/loop.py's (docs/backend.md).
    starts = ("asyncio.run(", "asyncio.Runner(", "new_event_loop(", "run_until_complete(")
    found = [f"{path.relative_to(SRC)}: {s}" for path in sorted(SRC.rglob("*.py"))
             if path != SRC / "cli" / "loop.py"
             for s in starts if s in path.read_text()]
    assert found == []
