"""Attach a terminal to a domain's serial console: :func:`attach`.

The console is QEMU's serial port on a unix socket.  Like ``xl console``,
``Ctrl-]`` detaches; the terminal is put in raw mode while attached and is
restored on every way out.  Without a terminal (a pipe), input is copied
until it ends and output until ``until`` appears or ``timeout`` passes.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import termios
import time
import tty
from pathlib import Path

from xenlab.errors import BackendError

ESCAPE = b"\x1d"  # Ctrl-]


def _connect(path: Path, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return s
        except OSError as err:
            s.close()
            if time.monotonic() > deadline:
                raise BackendError(f"{path}: cannot attach to the console: {err}") from err
            time.sleep(0.1)


def attach(
    path: Path,
    *,
    stdin: int | None = None,
    stdout: int | None = None,
    until: bytes | None = None,
    timeout: float | None = None,
) -> bytes:
    """Bridge the console socket at ``path`` with a terminal or pipes.

    Returns the console output seen (the last 64 KiB), which callers and
    tests can search.  Stops on Ctrl-], on ``until`` in the output, after
    ``timeout`` seconds, or when QEMU closes the socket.
    """
    fd_in = sys.stdin.fileno() if stdin is None else stdin
    fd_out = sys.stdout.fileno() if stdout is None else stdout
    sock = _connect(path, 10)
    seen = bytearray()
    is_tty = os.isatty(fd_in)
    saved = termios.tcgetattr(fd_in) if is_tty else None
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        if is_tty:
            tty.setraw(fd_in)
        inputs = [sock, fd_in]
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if wait == 0.0:
                break
            ready, _, _ = select.select(inputs, [], [], wait)
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    break
                os.write(fd_out, data)
                seen += data
                del seen[:-65536]
                if until is not None and until in seen:
                    break
            if fd_in in ready:
                data = os.read(fd_in, 4096)
                if not data:
                    inputs.remove(fd_in)  # a pipe ended; keep reading the console
                    continue
                if is_tty and ESCAPE in data:
                    data = data.split(ESCAPE, 1)[0]
                    if data:
                        sock.sendall(data)
                    break
                sock.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(fd_in, termios.TCSADRAIN, saved)
        sock.close()
    return bytes(seen)
