"""The ``xenlab`` command in-process, for tests: :func:`run_cli`."""

from __future__ import annotations

import pytest

from xenlab.cli.main import main


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``xenlab ARGS`` in-process; (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
