"""``xenlab config``: check, show, print and convert xl domain configuration files.

Every input (a FILE, or ``-`` for standard input, named ``<stdin>`` in
messages) is read with a bound, :data:`xenlab.files.CONFIG_LIMIT`: a file or
stream holding more is refused at the limit plus one byte, so ``/dev/zero`` or
an endless FIFO ends at once, and a FIFO that gives no data for a few seconds
is given up on (:func:`xenlab.files.read_bounded`).  Files are written through
:func:`xenlab.atomic.atomic_write_text`: atomically, through a symlink to its
target (which keeps its mode; the link stays), never over a device, a FIFO or
a dangling or planted symlink.  Paths in these messages are shown escaped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from xenlab.atomic import atomic_write_text
from xenlab.cli.output import emit_json, printable, stdout
from xenlab.config import ConfigError, parse
from xenlab.config.model import DomainConfig, domain_config, domain_config_to_json
from xenlab.config.specs.disk import disk_to_libxl_json, parse_disk
from xenlab.config.specs.pci import parse_pci, pci_to_libxl_json
from xenlab.config.specs.vif import parse_vif, vif_to_libxl_json
from xenlab.config.values import value_to_json
from xenlab.config.writer import format_config
from xenlab.config.xm import convert_xm
from xenlab.errors import XenlabError
from xenlab.files import CONFIG_LIMIT, InputTooLargeError, read_bounded

_FILE = click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path)
_STDIN = "<stdin>"


def _is_stdin(path: Path) -> bool:
    return str(path) == "-"


def _name(path: Path) -> str:
    """How messages name ``path``."""
    return _STDIN if _is_stdin(path) else str(path)


def _read(path: Path) -> bytes:
    """The bytes of ``path`` (``-``: standard input), at most CONFIG_LIMIT of them."""
    if not _is_stdin(path):
        return read_bounded(path, CONFIG_LIMIT, what="config", name=printable(str(path)))
    stream = getattr(sys.stdin, "buffer", None)  # None: no standard input at all
    try:
        if stream is None:
            raise OSError("no standard input")
        data: bytes = stream.read(CONFIG_LIMIT + 1)  # buffered: at most this many held
    except OSError as err:
        raise XenlabError(f"{_STDIN}: cannot read: {err.strerror or err}") from err
    if len(data) > CONFIG_LIMIT:
        raise InputTooLargeError(_STDIN, CONFIG_LIMIT, "config")
    return data


def _write(path: Path, text: str) -> None:
    """``text`` to ``path`` atomically, through a symlink to its target (the link stays)."""
    atomic_write_text(path, text, name=printable(str(path)))


@click.group()
def config() -> None:
    """The xl domain-configuration language (xl.cfg(5))."""


@config.command("check")
@click.argument("files", nargs=-1, required=True, type=_FILE)
@click.option("--syntax-only", is_flag=True, help="Check the language only, not the domain.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
def check(files: Sequence[Path], syntax_only: bool, as_json: bool) -> None:
    """Check FILES; print problems as file:line:col and exit 1 if any file is invalid."""
    results: list[dict[str, object]] = []
    failed = False
    for path in files:
        result: dict[str, object] = {"file": _name(path), "ok": True, "errors": [],
                                     "warnings": []}
        try:
            parsed = parse(_read(path), source=_name(path))
            if not syntax_only:
                dc = domain_config(parsed)
                result["warnings"] = [str(w) for w in dc.warnings]
                unsafe = _unsafe_images(dc, path)
                if unsafe:
                    failed = True
                    result["ok"] = False
                    result["errors"] = unsafe
        except ConfigError as err:
            failed = True
            result["ok"] = False
            result["errors"] = [str(p) for p in err.problems]
            result["likely_python"] = err.likely_python
        results.append(result)
    if as_json:
        emit_json(results)
    else:
        for result in results:
            for line in result["errors"]:  # type: ignore[attr-defined]
                click.echo(line, err=True)
            for line in result["warnings"]:  # type: ignore[attr-defined]
                click.echo(line, err=True)
            if result["ok"]:
                click.echo(f"{result['file']}: ok")
    if failed:
        raise click.exceptions.Exit(1)


def _unsafe_images(dc: DomainConfig, path: Path) -> list[str]:
    """The disks whose images would make QEMU open a file outside their allowed
    directories (``vm.imagecheck``, as ``vm create`` checks them), one line each.

    Only disks whose files exist are read; relative targets are taken from the
    config's directory, as create takes them.
    """
    if str(path) == "-":
        return []
    from xenlab.errors import FormatError
    from xenlab.vm.imagecheck import UnsafeImageError, allowed_backing_dirs, check_disk_image

    out = []
    for d in dc.disks:
        if not d.pdev_path or d.script is not None or d.format.value == "empty":
            continue
        target = Path(path).absolute().parent / d.pdev_path
        if not target.exists():
            continue
        try:
            check_disk_image(target, d.format, allowed_backing_dirs(target))
        except (UnsafeImageError, FormatError) as err:
            out.append(f"{_name(path)}: disk {d.vdev}: {err}")
        except XenlabError:
            continue  # not an image this check reads (a device, a FIFO): create says more
    return out


def _scalar(value: object) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(_scalar(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_scalar(v)}" for k, v in value.items())
    return "" if value is None else str(value)


def _records_table(title: str, records: Sequence[Mapping[str, object]]) -> Table:
    columns: list[str] = []
    for record in records:
        columns.extend(k for k in record if k not in columns)
    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    for column in columns:
        table.add_column(column)
    for i, record in enumerate(records):
        table.add_row(str(i), *(_scalar(record.get(c)) for c in columns))
    return table


@config.command("show")
@click.argument("file", type=_FILE)
@click.option("--json", "as_json", is_flag=True, help="Print the typed domain as JSON.")
def show(file: Path, as_json: bool) -> None:
    """Show the domain FILE describes, as tables."""
    dc = domain_config(parse(_read(file), source=_name(file)))
    data = domain_config_to_json(dc)
    if as_json:
        emit_json(data)
        return
    console = stdout
    summary = Table(title=_name(file), title_justify="left", show_header=False)
    summary.add_column("key", style="bold")
    summary.add_column("value")
    device_tables: list[Table] = []
    for key, value in data.items():
        if key == "warnings":
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            device_tables.append(_records_table(key, value))
        elif isinstance(value, dict) and value and key == "extra":
            for k, v in value.items():
                summary.add_row(k, _scalar(v))
        elif value not in (None, [], {}):
            summary.add_row(key, _scalar(value))
    console.print(summary)
    for table in device_tables:
        console.print(table)
    for warning in dc.warnings:
        console.print(f"[yellow]{warning}[/yellow]")


@config.command("json")
@click.argument("file", type=_FILE)
@click.option(
    "--raw",
    is_flag=True,
    help="Print every key's effective value as the language sees it (strings and lists).",
)
def json_cmd(file: Path, raw: bool) -> None:
    """Print FILE as JSON: the typed domain, or with --raw the language's values."""
    parsed = parse(_read(file), source=_name(file))
    if raw:
        emit_json({k: value_to_json(v) for k, v in parsed.effective().items()})
    else:
        emit_json(domain_config_to_json(domain_config(parsed)))


@config.command("fmt")
@click.argument("file", type=_FILE)
@click.option("-w", "--write", is_flag=True,
              help="Rewrite FILE in place (atomically; through a symlink to its target).")
def fmt(file: Path, write: bool) -> None:
    """Print FILE in canonical form (comments are dropped)."""
    if write and _is_stdin(file):
        raise click.BadParameter("cannot rewrite standard input", param_hint="-w")
    text = format_config(parse(_read(file), source=_name(file)))
    if write:
        _write(file, text)
    else:
        # As bytes: a string that is not UTF-8 is a valid xl value (bytes, as libxlutil
        # reads them), and a text console would print its escape instead.
        click.echo(text.encode("utf-8", "surrogateescape"), nl=False)


def _spec_command(
    name: str,
    parser: Callable[..., Any],
    to_json: Callable[[Any], dict[str, object]],
    doc: str,
) -> None:
    @config.command(name, help=doc)
    @click.argument("specs", nargs=-1, required=True)
    def command(specs: Sequence[str]) -> None:
        if name == "disk":
            emit_json(to_json(parser(list(specs), source=f"{name} spec")))
            return
        results = [to_json(parser(spec, source=f"{name} spec")) for spec in specs]
        emit_json(results[0] if len(results) == 1 else results)


_spec_command(
    "disk",
    parse_disk,
    disk_to_libxl_json,
    "Parse a disk spec (xl-disk-configuration(5)) and print libxl's JSON for it.\n\n"
    "Several SPECS are parts of one disk, as xl's block-attach takes them.",
)
_spec_command(
    "vif",
    parse_vif,
    vif_to_libxl_json,
    "Parse vif specs (xl-network-configuration(5)) and print libxl's JSON for each.",
)
_spec_command(
    "pci",
    parse_pci,
    pci_to_libxl_json,
    "Parse pci specs (xl-pci-configuration(5)) and print libxl's JSON for each.",
)


@config.command("from-xm")
@click.argument("file", type=_FILE)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the xl config here (atomically; through a symlink to its target) "
                   "instead of stdout.")
def from_xm(file: Path, output: Path | None) -> None:
    """Convert an xm-era (Python) config FILE to xl, without running it."""
    result = convert_xm(_read(file), source=_name(file))
    for note in result.notes:
        click.echo(str(note), err=True)
    if output is None:
        sys.stdout.write(result.text)
    else:
        _write(output, result.text)
