"""The ``xenlab`` command's root group and error boundary: :func:`main`."""

from __future__ import annotations

import importlib
import sys

import click

from xenlab import __version__
from xenlab.errors import XenlabError

# Each group is imported only when it runs: `xenlab vm list` should not pay
# for numpy (microcode checksums) at start-up, and the reverse.
GROUPS = {
    "config": ("xenlab.cli.config", "config", "The xl domain-configuration language."),
    "ucode": ("xenlab.cli.ucode", "ucode", "CPU microcode: scan, select, extract, build."),
    "vm": ("xenlab.cli.vm", "vm", "Run guests from xl configs on QEMU."),
    "rom": ("xenlab.cli.rom", "rom", "PCI option ROMs and VGA BIOSes: inspect, fix, dump."),
    "image": ("xenlab.cli.vm", "image", "The project's guest image."),
    "sim": ("xenlab.cli.sim", "sim", "The hypervisor simulator: scenarios, compare, sweep."),
}


class LazyGroup(click.Group):
    """A group whose subcommand modules are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *GROUPS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in GROUPS:
            module, attr, _ = GROUPS[cmd_name]
            cmd = getattr(importlib.import_module(module), attr)
            assert isinstance(cmd, click.Command)
            return cmd
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # The help line of each group without importing it.
        rows = [(name, GROUPS[name][2]) for name in sorted(GROUPS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xenlab")
def cli() -> None:
    """xenlab: an open toolkit for Xen-style virtualization work."""


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
