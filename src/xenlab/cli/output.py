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
