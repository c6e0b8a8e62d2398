"""What every command group prints with: :func:`emit_json` and the shared consoles."""

from __future__ import annotations

import json

import click
from rich.console import Console

stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)


def emit_json(data: object) -> None:
    """Print ``data`` as indented JSON on stdout."""
    text = json.dumps(data, indent=2, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable input bytes survive as surrogates
        text = json.dumps(data, indent=2, ensure_ascii=True)
    click.echo(text)


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters and undecodable bytes as ``\\xNN``.

    Names read from archives are untrusted: an escape sequence in a member
    name must not reach the terminal, and a byte that was not UTF-8 (kept as
    a lone surrogate) must not crash a console that cannot encode it.
    """
    out: list[str] = []
    for ch in text:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # surrogateescape: the original byte
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o < 0x20 or 0x7F <= o < 0xA0 or 0xD800 <= o <= 0xDFFF:
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)
