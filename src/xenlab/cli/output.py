"""What every command group prints with: :func:`emit_json` and the shared consoles.

Output is read by people and by pipes alike, so a console never breaks a line
it was not asked to: text is soft-wrapped (a terminal folds long lines on
screen, a copied path stays whole), and when the stream is not a terminal,
tables are laid out at their natural width instead of squeezed into 80
columns (rich's default off a terminal, or ``$COLUMNS``).  Nothing printed
depends on the width of the terminal a test or a script happens to run in.
"""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console, ConsoleDimensions

# Wide enough for any table xenlab prints at its natural width; rich only
# pads a table to the width its cells need, never to the console's.
PIPE_WIDTH = 1 << 14


class PipeSafeConsole(Console):
    """A rich console that soft-wraps, and off a terminal is as wide as its widest line."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("highlight", False)
        kwargs.setdefault("soft_wrap", True)
        super().__init__(**kwargs)

    @property
    def size(self) -> ConsoleDimensions:
        """The terminal's size on a terminal; off one, :data:`PIPE_WIDTH` columns."""
        size = super().size
        return size if self.is_terminal else ConsoleDimensions(PIPE_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


stdout = PipeSafeConsole()
stderr = PipeSafeConsole(stderr=True)


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
