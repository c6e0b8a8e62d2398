"""The ``xenlab`` command's root group and error boundary: :func:`main`."""

from __future__ import annotations

import sys

import click

from xenlab import __version__
from xenlab.cli.config import config
from xenlab.cli.ucode import ucode
from xenlab.cli.vm import image, vm
from xenlab.errors import XenlabError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xenlab")
def cli() -> None:
    """xenlab: an open toolkit for Xen-style virtualization work."""


cli.add_command(config)
cli.add_command(ucode)
cli.add_command(vm)
cli.add_command(image)


def main(argv: list[str] | None = None) -> None:
    """Run the command line; xenlab errors print as ``place: message`` and exit 1."""
    for stream in (sys.stdout, sys.stderr):
        # A console that cannot encode a character shows it escaped, not a traceback.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        # Without standalone mode click returns a command's exit code (from
        # click.exceptions.Exit) instead of exiting.
        code = cli.main(args=argv, prog_name="xenlab", standalone_mode=False)
    except XenlabError as err:
        click.echo(str(err), err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    if isinstance(code, int) and code:
        sys.exit(code)
